"""Raw disks: bytes, sparse extents from SEEK_DATA/SEEK_HOLE, reads past the end, errors."""

import os
import threading

import pytest
from hypothesis import given, strategies as st

import smsblock
from smsblock.disk import ExtentKind, RawDisk
from smsblock.errors import DiskIOError, SmsBlockError, UsageError


def make_sparse(path, size, pieces):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)


def test_reads_bytes_and_reports_sparse_extents(tmp_path):
    p = tmp_path / "d.raw"
    mib = 1 << 20
    make_sparse(p, 8 * mib, [(mib, os.urandom(4096)), (5 * mib, b"x" * mib)])
    with smsblock.open_disk(p) as d:
        assert d.info.format == "raw" and d.size == 8 * mib
        exts = list(d.extents())
        assert all(e.kind is ExtentKind.DATA for e in exts)
        covered = set()
        for e in exts:
            covered.update(range(e.offset // 4096, e.end // 4096))
        assert mib // 4096 in covered and 5 * mib // 4096 in covered
        assert 3 * mib // 4096 not in covered          # a hole is not an extent
        assert d.read(5 * mib, 3) == b"xxx"
        assert d.read(8 * mib - 2, 10) == b"\0\0"      # clipped at the end
        assert d.read(9 * mib, 10) == b""
        assert d.allocated_bytes() < 3 * mib


@given(data=st.binary(min_size=0, max_size=20000), off=st.integers(0, 25000),
       length=st.integers(0, 25000))
def test_read_matches_file_bytes(tmp_path_factory, data, off, length):
    p = tmp_path_factory.mktemp("raw") / "d.raw"
    p.write_bytes(data)
    with RawDisk(p) as d:
        assert d.read(off, length) == data[off:off + length]
        ext = list(d.extents(off, off + length))
        for e in ext:
            assert off <= e.offset and e.end <= min(len(data), off + length)


def test_parallel_readinto_is_thread_safe(tmp_path):
    p = tmp_path / "d.raw"
    blob = os.urandom(4 << 20)
    p.write_bytes(blob)
    errors = []
    with RawDisk(p) as d:
        def worker(seed):
            buf = bytearray(65536)
            for i in range(64):
                off = ((seed * 7919 + i * 104729) % 64) * 65536
                d.readinto(off, buf)
                if bytes(buf) != blob[off:off + 65536]:
                    errors.append(off)
        ts = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    assert not errors


def test_errors_are_smsblock_errors(tmp_path):
    with pytest.raises(DiskIOError, match="missing.raw"):
        smsblock.open_disk(tmp_path / "missing.raw")
    p = tmp_path / "d.raw"
    p.write_bytes(b"abc")
    with RawDisk(p) as d, pytest.raises(UsageError):
        d.read(-1, 2)
    with pytest.raises(SmsBlockError, match="not a regular file"):
        RawDisk(tmp_path)


def test_declared_size_past_the_file_reads_zeros(tmp_path):
    """A size larger than the file (a disk whose tail was never written): zeros, no extent."""
    p = tmp_path / "d.raw"
    p.write_bytes(b"abc" * 1000)
    with RawDisk(p, size=10000) as d:
        assert d.size == 10000 and d.info.virtual_size == 10000
        assert d.read(2990, 100) == b"abc"[2990 % 3:] + b"abc" * 3 + bytes(90)
        buf = bytearray(b"\xff" * 8000)
        assert d.readinto(2000, buf) == 8000
        assert bytes(buf) == (b"abc" * 1000)[2000:] + bytes(7000)
        assert all(e.end <= 3000 for e in d.extents())
        assert d.fileno() >= 0
