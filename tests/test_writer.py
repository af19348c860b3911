"""Disk writers: streamOptimized VMDK and sparse raw, checked against qemu-img (the oracle),
the VMDK layout VMware writes, a second independent writer (Debian's python3-vmdkstream),
and the native grain compressor against Python's zlib."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import smsblock
from smsblock import _deflate
from smsblock.disk import Disk, DiskInfo, Extent, ExtentKind, RawDisk
from smsblock.disk.writer import (GD_AT_END, GRAIN_SIZE, convert, format_for_path,
                                  write_raw, write_stream_optimized)
from smsblock.errors import Cancelled, DiskIOError, UsageError
from smsblock.progress import CancelToken

from conftest import qemu_img

MIB = 1 << 20
SECTOR = 512


# --- test disks -----------------------------------------------------------------

def make_raw(path: Path, size: int, pieces) -> Path:
    """A sparse raw file of ``size`` bytes with ``(offset, bytes)`` pieces written in."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data[: max(0, size - off)])
    return path


@st.composite
def disk_contents(draw, max_size=3 * MIB):
    """A disk size (often not a grain or sector multiple) and pieces: random data,
    explicit zero runs (allocated zeros) and repetitive data, at grain-ish offsets."""
    size = draw(st.one_of(
        st.integers(1, max_size),
        st.integers(1, max_size // GRAIN_SIZE).map(lambda g: g * GRAIN_SIZE),
        st.integers(1, max_size // SECTOR).map(lambda s: s * SECTOR)))
    pieces = []
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))
    for _ in range(draw(st.integers(0, 6))):
        off = draw(st.one_of(st.integers(0, size - 1),
                             st.integers(0, (size - 1) // GRAIN_SIZE).map(lambda g: g * GRAIN_SIZE)))
        length = draw(st.sampled_from([1, 511, 512, 4096, GRAIN_SIZE - 1, GRAIN_SIZE,
                                       GRAIN_SIZE + 1, 3 * GRAIN_SIZE + 77, 200_000]))
        kind = draw(st.sampled_from(["random", "zeros", "pattern"]))
        if kind == "random":
            data = rnd.randbytes(length)
        elif kind == "zeros":
            data = bytes(length)
        else:
            data = (b"smsblock-%d " % off) * (length // 10 + 1)
        pieces.append((off, data[:length]))
    return size, pieces


def raw_sparse_extents(path) -> list[tuple[int, int]]:
    with RawDisk(path) as d:
        return [(e.offset, e.end) for e in d.extents()]


# --- reading back what the writer wrote ------------------------------------------------

HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")


def parse_header(sector: bytes) -> dict:
    f = HEADER.unpack_from(sector)
    keys = ["magic", "version", "flags", "capacity", "grain", "desc_offset", "desc_size",
            "gtes", "rgd", "gd", "overhead", "unclean", "check", "compress"]
    return dict(zip(keys, f))


def walk_stream(data: bytes) -> tuple[dict, str, list]:
    """Parse a streamOptimized file front to back: header, descriptor and every record
    as ("grain", lba, payload_bytes, sector) / ("gt"|"gd"|"footer", sector, table) / ("eos",)."""
    head = parse_header(data[:SECTOR])
    desc = data[head["desc_offset"] * SECTOR:(head["desc_offset"] + head["desc_size"]) * SECTOR]
    records = []
    pos = head["overhead"]
    while pos * SECTOR < len(data):
        value, size = struct.unpack_from("<QI", data, pos * SECTOR)
        if size:
            payload = data[pos * SECTOR + 12: pos * SECTOR + 12 + size]
            records.append(("grain", value, payload, pos))
            pos += -(-(12 + size) // SECTOR)
            continue
        kind = struct.unpack_from("<I", data, pos * SECTOR + 12)[0]
        assert data[pos * SECTOR + 16:(pos + 1) * SECTOR] == bytes(SECTOR - 16), "marker padding"
        name = {0: "eos", 1: "gt", 2: "gd", 3: "footer"}[kind]
        if name == "eos":
            assert value == 0
            records.append(("eos",))
            pos += 1
            assert pos * SECTOR == len(data), "end-of-stream marker is the last sector"
            break
        body = data[(pos + 1) * SECTOR:(pos + 1 + value) * SECTOR]
        records.append((name, pos + 1, body))
        pos += 1 + value
    return head, desc.rstrip(b"\0").decode(), records


def descriptor_fields(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def expected_grains(raw: bytes) -> dict[int, bytes]:
    """The grains a streamOptimized copy must hold: every non-zero 64 KiB grain, the last
    one cut at the sector-rounded size (zero-padded)."""
    padded = raw + bytes(-len(raw) % SECTOR)
    out = {}
    for off in range(0, len(padded), GRAIN_SIZE):
        g = padded[off:off + GRAIN_SIZE]
        if any(g):
            out[off // SECTOR] = g
    return out


# --- native compressor and zero test vs Python ----------------------------------------------

@given(data=st.binary(max_size=3 * GRAIN_SIZE), level=st.sampled_from([0, 1, 6, 12]))
def test_native_compress_inflates_with_python_zlib(data, level):
    c = _deflate.GrainCompressor(level)
    assert zlib.decompress(c.compress(data)) == data


@given(grains=st.lists(st.one_of(
           st.just(bytes(GRAIN_SIZE)),
           st.binary(min_size=1, max_size=64).map(lambda b: (b * GRAIN_SIZE)[:GRAIN_SIZE]),
           st.integers(0, GRAIN_SIZE - 1).map(lambda i: bytes(i) + b"\1" + bytes(GRAIN_SIZE - i - 1)),
           st.randoms(use_true_random=False).map(lambda r: r.randbytes(GRAIN_SIZE))),
           min_size=1, max_size=5),
       tail=st.integers(0, GRAIN_SIZE // SECTOR - 1), first=st.integers(0, 2 ** 40))
def test_pack_grains_records_match_python_meaning(grains, tail, first):
    data = b"".join(grains)
    if tail:        # a short last grain, as at the end of a disk
        data = data[:len(data) - GRAIN_SIZE + tail * SECTOR]
    c = _deflate.GrainCompressor(1)
    n = -(-len(data) // GRAIN_SIZE)
    out = bytearray(c.record_bound(GRAIN_SIZE, n))
    sizes = np.zeros(n, dtype=np.int64)
    used = c.pack_grains(data, GRAIN_SIZE, first, out, sizes)
    assert used == int(sizes.sum())
    pos = 0
    for i in range(n):
        grain = data[i * GRAIN_SIZE:(i + 1) * GRAIN_SIZE]
        if not any(grain):
            assert sizes[i] == 0
            continue
        assert sizes[i] > 0 and sizes[i] % SECTOR == 0
        rec = bytes(out[pos:pos + sizes[i]])
        lba, clen = struct.unpack_from("<QI", rec)
        assert lba == first + i * (GRAIN_SIZE // SECTOR)
        assert 12 + clen <= len(rec) < 12 + clen + SECTOR
        assert zlib.decompress(rec[12:12 + clen]) == grain
        assert rec[12 + clen:] == bytes(len(rec) - 12 - clen)
        pos += sizes[i]


@given(buf=st.one_of(st.binary(max_size=20000),
                     st.tuples(st.integers(0, 20000), st.integers(0, 20000)).map(
                         lambda t: bytes(t[0]) + b"\x80" + bytes(t[1])),
                     st.integers(0, 70000).map(bytes)),
       skip=st.integers(0, 7))
def test_zero_detection_matches_python(buf, skip):
    view = memoryview(buf)[skip:]          # unaligned starts too
    assert _deflate.is_zero(view) == (not any(view))


@given(buf=st.lists(st.sampled_from([bytes(1000), b"\0" * 999 + b"x", b"y" * 1000]),
                    max_size=30).map(b"".join),
       block=st.sampled_from([1, 512, 4096, 1000, 3000]))
def test_nonzero_runs_match_python(buf, block):
    want, start = [], None
    for off in range(0, len(buf), block):
        nz = any(buf[off:off + block])
        if nz and start is None:
            start = off
        if not nz and start is not None:
            want.append((start, off))
            start = None
    if start is not None:
        want.append((start, len(buf)))
    assert _deflate.nonzero_runs(buf, block) == want


def test_pack_grains_releases_the_gil():
    """While one thread compresses, another keeps running Python code."""
    data = random.Random(1).randbytes(GRAIN_SIZE) * 256          # 16 MiB, one native call
    c = _deflate.GrainCompressor(6)
    out = bytearray(c.record_bound(GRAIN_SIZE, 256))
    sizes = np.zeros(256, dtype=np.int64)
    state = {"in_call": False, "span": []}

    def work():
        state["in_call"] = True
        state["t0"] = time.perf_counter()
        c.pack_grains(data, GRAIN_SIZE, 0, out, sizes)
        state["t1"] = time.perf_counter()
        state["in_call"] = False

    t = threading.Thread(target=work)
    t.start()
    while t.is_alive():
        if state["in_call"]:
            state["span"].append(time.perf_counter())
    t.join()
    call = state["t1"] - state["t0"]
    ticks = [x for x in state["span"] if state["t0"] <= x <= state["t1"]]
    assert ticks and ticks[-1] - ticks[0] > 0.3 * call, (
        f"main thread ran {ticks[-1] - ticks[0] if ticks else 0:.3f} s of a {call:.3f} s call")


def test_compressor_rejects_bad_arguments():
    with pytest.raises(ValueError):
        _deflate.GrainCompressor(13)
    c = _deflate.GrainCompressor(1)
    with pytest.raises(ValueError):
        c.pack_grains(bytes(GRAIN_SIZE), 1000, 0, bytearray(10 ** 6), np.zeros(1, np.int64))
    with pytest.raises(ValueError):
        c.pack_grains(bytes(2 * GRAIN_SIZE), GRAIN_SIZE, 0, bytearray(10), np.zeros(2, np.int64))


# --- streamOptimized: qemu-img as the oracle -----------------------------------------------

def qemu_info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", path).stdout)


@given(content=disk_contents())
def test_stream_optimized_is_identical_and_clean_for_qemu(tmp_path_factory, content):
    size, pieces = content
    d = tmp_path_factory.mktemp("so")
    src = make_raw(d / "src.raw", size, pieces)
    out = d / "out.vmdk"
    with RawDisk(src) as disk:
        write_stream_optimized(disk, out)
    assert "Images are identical" in qemu_img("compare", src, out).stdout
    assert "No errors" in qemu_img("check", out).stdout
    info = qemu_info(out)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["virtual-size"] == -(-size // SECTOR) * SECTOR
    # what the file holds, grain by grain, is exactly the non-zero grains of the source
    raw = src.read_bytes()
    head, _, records = walk_stream(out.read_bytes())
    got = {r[1]: zlib.decompress(r[2]) for r in records if r[0] == "grain"}
    assert got == expected_grains(raw)
    assert head["capacity"] * SECTOR >= size


def test_stream_optimized_layout_is_vmwares(tmp_path):
    size = 100 * MIB + 1000           # four grain tables, the third one empty, odd size
    rnd = random.Random(7)
    pieces = [(0, rnd.randbytes(5000)),
              (32 * MIB - 100, rnd.randbytes(300)),           # straddles tables 0 and 1
              (2 * GRAIN_SIZE, bytes(GRAIN_SIZE)),            # allocated zeros: left out
              (size - 700, b"tail" * 100)]
    src = make_raw(tmp_path / "src.raw", size, pieces)
    out = tmp_path / "disk.vmdk"
    with RawDisk(src) as disk:
        write_stream_optimized(disk, out, adapter_type="ide")
    data = out.read_bytes()
    assert len(data) % SECTOR == 0
    head, desc, records = walk_stream(data)

    # sparse header as VMware writes a stream: v3, NL-detect + compressed + markers, deflate,
    # GD at the end, 64 KiB grains, 512 entries a table, descriptor at sector 1
    assert head["magic"] == b"KDMV" and head["version"] == 3
    assert head["flags"] == 0x00030001
    assert head["compress"] == 1 and head["gd"] == GD_AT_END and head["rgd"] == 0
    assert head["grain"] == 128 and head["gtes"] == 512 and head["desc_offset"] == 1
    assert head["check"] == b"\n \r\n" and head["unclean"] == 0
    assert head["overhead"] == 128 and head["capacity"] == -(-size // SECTOR)
    assert data[79:SECTOR] == bytes(SECTOR - 79)

    fields = descriptor_fields(desc)
    assert desc.startswith("# Disk DescriptorFile\n")
    assert fields["createType"] == "streamOptimized"
    assert fields["parentCID"] == "ffffffff"
    assert len(fields["CID"]) == 8 and fields["CID"] not in ("ffffffff", "fffffffe")
    assert fields["ddb.adapterType"] == "ide"
    assert fields["ddb.geometry.heads"] == "16" and fields["ddb.geometry.sectors"] == "63"
    assert int(fields["ddb.geometry.cylinders"]) == -(-head["capacity"] // (16 * 63))
    assert fields["encoding"] == "UTF-8"
    assert fields["ddb.virtualHWVersion"]
    assert f'RW {head["capacity"]} SPARSE "disk.vmdk"' in desc

    kinds = [r[0] for r in records]
    # grains of table 0, GT 0, grains of table 1, GT 1, (table 2 empty: no GT), grains of
    # table 3, GT 3, then GD, footer, end of stream
    assert kinds == ["grain", "grain", "gt", "grain", "gt", "grain", "gt",
                     "gd", "footer", "eos"]
    lbas = [r[1] for r in records if r[0] == "grain"]
    assert lbas == sorted(lbas)
    # every grain table entry points at the grain marker of its own LBA; the GD at the GTs
    grain_at = {r[3]: r[1] for r in records if r[0] == "grain"}
    gt_sectors = [r[1] for r in records if r[0] == "gt"]
    gd_rec = next(r for r in records if r[0] == "gd")
    gd = struct.unpack_from("<4I", gd_rec[2])
    assert list(gd) == gt_sectors[:2] + [0] + gt_sectors[2:]
    assert gd_rec[2][16:] == bytes(len(gd_rec[2]) - 16)
    seen = 0
    for t, gt_sector in enumerate(gd):
        if not gt_sector:
            continue
        gt_rec = next(r for r in records if r[0] == "gt" and r[1] == gt_sector)
        entries = struct.unpack("<512I", gt_rec[2])
        for i, sector in enumerate(entries):
            if sector:
                assert grain_at[sector] == (t * 512 + i) * 128
                seen += 1
    assert seen == len(grain_at) == 4
    # footer: the header again with the real GD offset; EOS is the last sector
    footer = next(r for r in records if r[0] == "footer")[2]
    assert parse_header(footer) == {**head, "gd": gd_rec[1]}
    assert footer[79:] == bytes(SECTOR - 79)
    assert data[-1536:-1024][:16] == struct.pack("<QII", 1, 0, 3)
    assert data[-SECTOR:] == struct.pack("<QII", 0, 0, 0).ljust(SECTOR, b"\0")
    assert "Images are identical" in qemu_img("compare", src, out).stdout


def test_cid_is_random_and_threads_do_not_change_the_stream(tmp_path):
    rnd = random.Random(3)
    src = make_raw(tmp_path / "src.raw", 6 * MIB,
                   [(i * 300_000, rnd.randbytes(100_000)) for i in range(20)])
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.vmdk"
        with RawDisk(src) as disk:
            write_stream_optimized(disk, out, threads=threads)
        outs.append(out.read_bytes())
    cids = [descriptor_fields(walk_stream(o)[1])["CID"] for o in outs]
    assert cids[0] != cids[1]
    overhead = parse_header(outs[0])["overhead"] * SECTOR
    assert outs[0][overhead:] == outs[1][overhead:]      # grains written in disk order


VMDKSTREAM_PY = "/usr/bin/python3"


def vmdkstream_available() -> bool:
    return subprocess.run([VMDKSTREAM_PY, "-c", "import VMDKstream"],
                          capture_output=True).returncode == 0


def test_same_layout_as_an_independent_writer(tmp_path):
    """Debian's python3-vmdkstream writes the same stream: the same records in the same
    order (grain LBAs, skipped zero grains and empty tables, GD, footer, EOS)."""
    if not vmdkstream_available():
        pytest.fail("python3-vmdkstream is not installed (scripts/setup.sh installs it)")
    rnd = random.Random(11)
    src = make_raw(tmp_path / "src.raw", 100 * MIB,
                   [(0, rnd.randbytes(70_000)), (5 * MIB, bytes(GRAIN_SIZE)),
                    (32 * MIB + 5, b"x" * 10), (96 * MIB, rnd.randbytes(3 * MIB))])
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    with RawDisk(src) as disk:
        write_stream_optimized(disk, ours)
    subprocess.run([VMDKSTREAM_PY, "-c", "import sys, VMDKstream; "
                    "VMDKstream.convert_to_stream(sys.argv[1], sys.argv[2])", src, theirs],
                   check=True)

    def shape(path):
        head, _, records = walk_stream(path.read_bytes())
        return ([(r[0], r[1]) if r[0] == "grain" else r[0] for r in records],
                {k: v for k, v in head.items() if k not in ("desc_size",)})

    (our_records, our_head), (their_records, their_head) = shape(ours), shape(theirs)
    assert our_records == their_records
    assert our_head == their_head
    assert "Images are identical" in qemu_img("compare", theirs, ours).stdout


def test_multi_table_sparse_disk_and_straddling_extent(tmp_path):
    rnd = random.Random(5)
    size = 97 * MIB + 3
    src = make_raw(tmp_path / "src.raw", size,
                   [(32 * MIB - 3000, rnd.randbytes(6000)), (64 * MIB, b"\1"),
                    (size - 3, b"end")])
    out = tmp_path / "o.vmdk"
    convert(src, out)
    assert "Images are identical" in qemu_img("compare", src, out).stdout
    assert "No errors" in qemu_img("check", out).stdout
    assert out.stat().st_size < 200_000


# --- raw: sparse, byte-exact ---------------------------------------------------------------

@given(content=disk_contents())
def test_raw_output_is_byte_exact_and_sparse(tmp_path_factory, content):
    size, pieces = content
    d = tmp_path_factory.mktemp("raw")
    src = make_raw(d / "src.raw", size, pieces)
    out = d / "out.raw"
    with RawDisk(src) as disk:
        write_raw(disk, out)
    raw = src.read_bytes()
    assert out.read_bytes() == raw
    assert "Images are identical" in qemu_img("compare", "-f", "raw", "-F", "raw", src, out).stdout
    # every allocated range of the output holds a non-zero byte in each 4 KiB block
    blob = out.read_bytes()
    for s, e in raw_sparse_extents(out):
        for b in range(s - s % 4096, e, 4096):
            assert any(blob[b:b + 4096]), f"zero block at {b} written to the output"


def test_raw_leaves_holes_for_unallocated_and_zero_ranges(tmp_path):
    src = make_raw(tmp_path / "src.raw", 64 * MIB,
                   [(MIB, os.urandom(8192)), (10 * MIB, bytes(8 * MIB)), (60 * MIB, b"z")])
    out = tmp_path / "out.raw"
    convert(src, out, format="raw")
    assert out.stat().st_size == 64 * MIB
    assert out.stat().st_blocks * 512 <= 64 * 1024        # 8 KiB + one 4 KiB block (+fs slack)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_output_is_fsynced_unless_asked_not_to(tmp_path, monkeypatch, fmt):
    """The file (and the folder holding its new name) reach the disk by default; with
    fsync=False nothing is synced and the bytes are the same."""
    src = make_raw(tmp_path / "src.raw", 3 * MIB, [(MIB, os.urandom(70000))])
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    convert(src, tmp_path / f"durable.{fmt}", format=fmt)
    assert synced == [str(tmp_path / f"durable.{fmt}.part"), str(tmp_path)]
    synced.clear()
    convert(src, tmp_path / f"fast.{fmt}", format=fmt, fsync=False)
    assert synced == []
    if fmt == "raw":
        assert (tmp_path / "fast.raw").read_bytes() == (tmp_path / "durable.raw").read_bytes()
    assert "Images are identical" in qemu_img(
        "compare", "-f", "raw", src, tmp_path / f"fast.{fmt}").stdout


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_durable_writes_start_writeback_behind_the_writer(tmp_path, monkeypatch, fmt):
    """Writeback of what is written starts every WRITEBACK_WINDOW bytes, in order, from 0
    (so the final fsync has little left); never without fsync."""
    from smsblock.disk import writer
    src = make_raw(tmp_path / "src.raw", 40 * MIB, [(0, os.urandom(30 * MIB))])
    calls = []
    monkeypatch.setattr(_deflate, "start_writeback", lambda fd, off, n: calls.append((off, n)))
    out = tmp_path / f"o.{fmt}"
    convert(src, out, format=fmt)
    assert len(calls) >= 2
    assert [off for off, _ in calls] == [sum(n for _, n in calls[:i]) for i in range(len(calls))]
    assert all(n >= writer.WRITEBACK_WINDOW for _, n in calls)
    assert sum(n for _, n in calls) <= out.stat().st_size
    calls.clear()
    convert(src, tmp_path / f"fast.{fmt}", format=fmt, fsync=False)
    assert calls == []


# --- progress, cancel, failure, memory --------------------------------------------------------

class SyntheticDisk(Disk):
    """A big disk that exists only as a function: every 4th MiB holds patterned data."""

    def __init__(self, size: int, fail_at: int | None = None):
        self.path = "synthetic"
        self.size = size
        self.fail_at = fail_at
        self.info = DiskInfo(path=self.path, format="raw", virtual_size=size)

    def readinto(self, offset, buf):
        view = memoryview(buf).cast("B")
        if self.fail_at is not None and offset <= self.fail_at < offset + len(view):
            raise DiskIOError("injected read failure", self.path, self.fail_at)
        n = max(0, min(len(view), self.size - offset))
        pattern = (b"%016x" % offset) * (n // 16 + 1)
        view[:n] = pattern[:n]
        return n

    def extents(self, start=0, end=None):
        for off in range(0, self.size, 4 * MIB):
            yield Extent(off, min(MIB, self.size - off), ExtentKind.DATA)
            if off + MIB < self.size:
                yield Extent(off + MIB, min(MIB, self.size - off - MIB), ExtentKind.ZERO)


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_progress_is_monotonic_and_complete(tmp_path, fmt):
    calls = []
    convert(SyntheticDisk(20 * MIB), tmp_path / f"o.{fmt}", format=fmt,
            progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (20 * MIB, 20 * MIB)
    assert all(t == 20 * MIB for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) > 3


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_cancel_removes_partial_output_and_keeps_old_file(tmp_path, fmt):
    out = tmp_path / f"o.{fmt}"
    out.write_bytes(b"previous")
    token = CancelToken()

    def progress(done, total):
        if done > 2 * MIB:
            token.cancel("stop")
    with pytest.raises(Cancelled):
        convert(SyntheticDisk(64 * MIB), out, format=fmt, progress=progress, cancel=token)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_failed_read_removes_partial_output(tmp_path, fmt):
    out = tmp_path / f"o.{fmt}"
    with pytest.raises(DiskIOError, match="injected read failure"):
        convert(SyntheticDisk(40 * MIB, fail_at=24 * MIB + 5), out, format=fmt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_memory_stays_bounded(tmp_path, fmt):
    disk = SyntheticDisk(128 * MIB)
    tracemalloc.start()
    try:
        convert(disk, tmp_path / f"o.{fmt}", format=fmt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * MIB, f"peak {peak} bytes for a 128 MiB disk"


def test_synthetic_disk_round_trips_through_qemu(tmp_path):
    disk = SyntheticDisk(9 * MIB + 512)
    out, raw = tmp_path / "s.vmdk", tmp_path / "s.raw"
    convert(disk, out)
    convert(disk, raw)
    assert "Images are identical" in qemu_img("compare", raw, out).stdout
    expected = bytearray(disk.size)
    for e in disk.extents():
        if e.is_data:
            disk.readinto(e.offset, memoryview(expected)[e.offset:e.end])
    assert raw.read_bytes() == bytes(expected)


# --- bad parameters and paths -------------------------------------------------------------------

def test_bad_parameters_raise_one_clear_error(tmp_path):
    src = make_raw(tmp_path / "s.raw", MIB, [(0, b"x")])
    empty = make_raw(tmp_path / "e.raw", 0, [])
    with pytest.raises(UsageError, match="unknown output format"):
        convert(src, tmp_path / "o", format="qcow2")
    with pytest.raises(UsageError, match="is a directory"):
        convert(src, tmp_path)
    with pytest.raises(UsageError, match="overwrite the source"):
        convert(src, src, format="vmdk")
    with pytest.raises(UsageError, match="empty disk"):
        convert(empty, tmp_path / "o.vmdk")
    with pytest.raises(DiskIOError, match="missing.raw"):
        convert(tmp_path / "missing.raw", tmp_path / "o.raw")
    with pytest.raises(DiskIOError, match="directory"):
        convert(tmp_path, tmp_path / "o.raw")
    with pytest.raises(DiskIOError, match="folder does not exist"):
        convert(src, tmp_path / "no" / "o.raw")
    with RawDisk(src) as disk:
        with pytest.raises(UsageError, match="adapter"):
            write_stream_optimized(disk, tmp_path / "o.vmdk", adapter_type="nvme")
        with pytest.raises(ValueError):
            write_stream_optimized(disk, tmp_path / "o.vmdk", level=99)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.raw", "s.raw"]
    assert src.read_bytes()[:1] == b"x"


def test_refuses_disks_larger_than_a_vmdk_holds(tmp_path):
    with pytest.raises(UsageError, match="more than a streamOptimized VMDK holds"):
        convert(SyntheticDisk(3 << 40), tmp_path / "big.vmdk")
    assert list(tmp_path.iterdir()) == []


def test_output_through_a_symlink_and_never_onto_a_device(tmp_path):
    src = make_raw(tmp_path / "s.raw", MIB, [(5, b"abc")])
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "disk.vmdk"
    target.write_bytes(b"old")
    link = tmp_path / "link.vmdk"
    link.symlink_to(target)
    convert(src, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert "Images are identical" in qemu_img("compare", src, target).stdout
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["disk.vmdk"]
    for fmt in ("raw", "vmdk"):
        with pytest.raises(UsageError, match="not a regular file"):
            convert(src, "/dev/null", format=fmt)
    assert not os.path.exists("/dev/null.part")


def test_format_from_extension():
    assert format_for_path("a/b.VMDK") == "vmdk"
    assert format_for_path("b.img") == "raw" and format_for_path("b") == "raw"


# --- VMDK sources and reading our output back with smsblock's reader -----------------------------

@given(content=disk_contents(max_size=2 * MIB))
def test_smsblock_reads_its_own_stream_back(tmp_path_factory, content):
    size, pieces = content
    d = tmp_path_factory.mktemp("rb")
    src = make_raw(d / "src.raw", size, pieces)
    out = d / "out.vmdk"
    convert(src, out)
    padded = src.read_bytes() + bytes(-size % SECTOR)
    with smsblock.open_disk(out) as disk:
        assert disk.info.create_type == "streamOptimized"
        assert disk.size == len(padded)
        assert disk.read(0, disk.size) == padded


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized", "monolithicFlat"])
def test_convert_qemu_made_vmdk_to_raw_and_vmdk(tmp_path, subformat):
    rnd = random.Random(subformat)
    size = 3 * MIB
    src_raw = make_raw(tmp_path / "content.raw", size,
                       [(0, rnd.randbytes(9000)), (MIB + 17, b"q" * 70_000),
                        (2 * MIB, bytes(GRAIN_SIZE)), (size - 5, b"12345")])
    src = tmp_path / "src.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", src_raw, src)
    raw_out, vmdk_out = tmp_path / "out.raw", tmp_path / "out.vmdk"
    convert(src, raw_out)
    convert(src, vmdk_out)
    assert raw_out.read_bytes() == src_raw.read_bytes()
    assert "Images are identical" in qemu_img("compare", src, vmdk_out).stdout
    assert "No errors" in qemu_img("check", vmdk_out).stdout


@settings(max_examples=10)
@given(content=disk_contents(max_size=2 * MIB),
       subformat=st.sampled_from(["monolithicSparse", "streamOptimized", "twoGbMaxExtentFlat"]))
def test_vmdk_sources_convert_exactly(tmp_path_factory, content, subformat):
    size, pieces = content
    size = -(-size // SECTOR) * SECTOR          # qemu-img makes VMDKs of whole sectors
    d = tmp_path_factory.mktemp("vs")
    src_raw = make_raw(d / "content.raw", size, pieces)
    src = d / "src.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", src_raw, src)
    convert(src, d / "out.raw")
    convert(src, d / "out.vmdk")
    assert (d / "out.raw").read_bytes() == src_raw.read_bytes()
    assert "Images are identical" in qemu_img("compare", src_raw, d / "out.vmdk").stdout


def test_convert_vmware_samples(tmp_path, vmdk_samples):
    for name in ("streamOptimizedWithMarkers.vmdk", "monolithicSparse.vmdk"):
        out = tmp_path / (name + ".out.vmdk")
        convert(vmdk_samples / name, out)
        assert "Images are identical" in qemu_img("compare", vmdk_samples / name, out).stdout


def test_convert_flattens_a_snapshot_chain(tmp_path):
    """A qemu-made delta chain: grains the child wrote win, the rest read through."""
    rnd = random.Random(9)
    base_raw = make_raw(tmp_path / "base.raw", 4 * MIB,
                        [(0, rnd.randbytes(200_000)), (3 * MIB, b"base" * 5000)])
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    qemu_img("convert", "-O", "vmdk", base_raw, base)
    qemu_img("create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    # the child gets its own grains over part of the base (qemu-io is qemu's own writer)
    subprocess.run(["qemu-io", "-c", f"write -P 0x5a {MIB - 4096} 150016", str(child)],
                   check=True, capture_output=True)
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", child, want)
    out_raw, out_vmdk = tmp_path / "flat.raw", tmp_path / "flat.vmdk"
    convert(child, out_raw)
    convert(child, out_vmdk)
    assert out_raw.read_bytes() == want.read_bytes()
    assert "Images are identical" in qemu_img("compare", want, out_vmdk).stdout
    with smsblock.open_disk(out_vmdk) as d:
        assert d.info.parent is None and d.info.parent_cid == 0xFFFFFFFF


def test_raw_copy_reads_as_many_blocks_at_once_as_the_disk_says(tmp_path):
    """A disk whose reads wait on a network (an EBS snapshot: one GetSnapshotBlock per
    block) says how many readers pay off; write_raw runs that many: here every block
    read waits until 4 are in flight at once, which 2 readers would never reach."""
    from smsblock.disk.blocks import BlockDisk
    bs = 1 << 20                                    # one block per raw chunk
    blocks = [bytes([i + 1]) * bs for i in range(8)]

    class Remote(BlockDisk):
        read_parallelism = 4

        def __init__(self):
            super().__init__()
            self.block_size, self.size, self.path = bs, len(blocks) * bs, "remote"
            self.info = DiskInfo(path="remote", format="raw", virtual_size=self.size)
            self.together = threading.Barrier(4, timeout=10)

        def fetch_block(self, i):
            self.together.wait()
            return blocks[i]

        def extents(self, start=0, end=None):
            start, end = self._clip(start, end)
            yield Extent(start, end - start, ExtentKind.DATA)

    out = tmp_path / "out.raw"
    write_raw(Remote(), out)
    assert out.read_bytes() == b"".join(blocks)
