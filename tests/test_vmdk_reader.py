"""VMDK reader: VMware samples, every qemu-made layout, delta chains, metadata, threads.

qemu-img is the oracle for bytes; a pure-Python reading of the sparse format (below) is
the meaning the native core (smsblock._vmdk) is checked against.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import smsblock
from smsblock.disk import ExtentKind
from smsblock.disk.vmdk import VmdkDisk
from smsblock.errors import (CidMismatchError, DiskIOError, ParentChainError,
                             UnsafeExtentPathError)
from conftest import qemu_img, qemu_raw_bytes
from vmdk_images import (QEMU_SUBFORMATS, make_child, oracle_raw, patch_bytes, qemu_convert,
                         qemu_io, vmdkstream_convert, vmfs_descriptor, write_raw)

KiB, MiB = 1 << 10, 1 << 20

SAMPLES = {  # file -> (createType, virtual size, sha256 of the raw content), from the README
    "monolithicSparse.vmdk": ("monolithicSparse", 10485760,
                              "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    "streamOptimized.vmdk": ("streamOptimized", 10485760,
                             "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    "streamOptimizedWithMarkers.vmdk": (
        "streamOptimized", 1048576,
        "92c0f8b4280377437056f57c51ef51a5f8aeb1462ac630ef0633febcbfc3db4e"),
    "twoGbMaxExtentSparse.vmdk": ("twoGbMaxExtentSparse", 10485760,
                                  "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    "vmfs_thick.vmdk": ("vmfs", 2097152,
                        "8d43c795d24bce01b49f92744f934c1072210dcac170bb1c83a5aa56df46ab7d"),
}


# --- a pure-Python meaning of a hosted sparse extent -----------------------------------

def reference_sparse(path: Path) -> tuple[bytes, list[int]]:
    """(content, GT entry per grain) of one KDMV file, the slow obvious way."""
    data = path.read_bytes()
    fmt = "<4sIIQQQQIQQQB4sH"
    h = struct.unpack_from(fmt, data)
    if h[9] == 0xFFFFFFFFFFFFFFFF:                       # GD at end: header is the footer
        h = struct.unpack_from(fmt, data, len(data) - 1024)
    _, _, flags, capacity, grain, _, _, per_gt, _, gd, _, _, _, algo = h
    size, gbytes = capacity * 512, grain * 512
    n_grains = -(-capacity // grain)
    out = bytearray(n_grains * gbytes)
    entries = []
    for g in range(n_grains):
        gt = struct.unpack_from("<I", data, gd * 512 + 4 * (g // per_gt))[0]
        e = struct.unpack_from("<I", data, gt * 512 + 4 * (g % per_gt))[0] if gt else 0
        entries.append(e)
        if e in (0, 1):
            continue
        if algo == 1:
            start = e * 512
            if flags & (1 << 17):
                lba, n = struct.unpack_from("<QI", data, start)
                assert lba == g * grain
                comp = data[start + 12:start + 12 + n]
            else:
                comp = data[start:]
            plain = zlib.decompressobj().decompress(comp)
        else:
            plain = data[e * 512:e * 512 + gbytes]
        out[g * gbytes:g * gbytes + len(plain)] = plain
    return bytes(out[:size]), entries


def assert_extents_consistent(disk, content: bytes) -> None:
    """Extents are sorted, merged and inside the disk; data outside them and in ZERO is zero."""
    exts = list(disk.extents())
    pos = 0
    for i, e in enumerate(exts):
        assert e.offset >= pos and e.length > 0 and e.end <= disk.size
        if i and exts[i - 1].end == e.offset:
            assert exts[i - 1].kind is not e.kind, "adjacent extents of one kind not merged"
        assert not content[pos:e.offset].strip(b"\0"), f"data in the gap {pos}..{e.offset}"
        if e.kind is ExtentKind.ZERO:
            assert not content[e.offset:e.end].strip(b"\0")
        pos = e.end
    assert not content[pos:].strip(b"\0")


def sample_content(size: int, seed: int = 1) -> list[tuple[int, bytes]]:
    """Pieces of a test disk: random runs, a compressible run, zero runs between."""
    rnd = __import__("random").Random(seed)
    pieces, off = [], 4096
    while off < size:
        n = rnd.choice([512, 4096, 65536, 100000, 200000])
        n = min(n, size - off)
        body = rnd.randbytes(n) if rnd.random() < 0.6 else bytes([rnd.randrange(256)]) * n
        pieces.append((off, body))
        off += n + rnd.choice([0, 65536, 300000])
    return pieces


# --- VMware-written samples -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_vmware_samples_read_to_their_sha256(vmdk_samples, name):
    create_type, size, digest = SAMPLES[name]
    with smsblock.open_disk(vmdk_samples / name) as d:
        assert isinstance(d, VmdkDisk)
        assert d.info.format == "vmdk" and d.info.create_type == create_type
        assert d.size == size == d.info.virtual_size
        content = d.read(0, d.size)
        assert hashlib.sha256(content).hexdigest() == digest
        assert_extents_consistent(d, content)
        assert d.info.compressed == (create_type == "streamOptimized")


def test_vmware_sample_metadata(vmdk_samples):
    with smsblock.open_disk(vmdk_samples / "vmfs_thick.vmdk") as d:
        assert d.info.cid == 0x0172E8A4 and d.info.parent_cid == 0xFFFFFFFF
        assert d.info.adapter_type == "lsilogic" and d.info.parent is None
        [ext] = d.info.extents
        assert (ext.access, ext.sectors, ext.type) == ("RW", 4096, "VMFS")
        assert ext.path == str(vmdk_samples / "vmfs_thick-flat.vmdk")
    with smsblock.open_disk(vmdk_samples / "twoGbMaxExtentSparse.vmdk") as d:
        assert d.info.adapter_type == "buslogic"
        assert [e.type for e in d.info.extents] == ["SPARSE"]
        assert d.info.extents[0].path.endswith("twoGbMaxExtentSparse-s001.vmdk")
        assert d.info.to_dict()["cid"] == "00000000"


@pytest.mark.parametrize("name", ["monolithicSparse.vmdk", "streamOptimized.vmdk",
                                  "streamOptimizedWithMarkers.vmdk"])
def test_native_core_matches_python_reference_on_samples(vmdk_samples, name):
    content, entries = reference_sparse(vmdk_samples / name)
    with smsblock.open_disk(vmdk_samples / name) as d:
        assert d.read(0, d.size) == content
        ext = d._parts[0].extent
        assert ext.grain_entries(0, len(entries)).tolist() == entries


# --- qemu-made layouts ------------------------------------------------------------------

LAYOUTS = QEMU_SUBFORMATS + ("vmfs", "vmfsThin", "streamOptimized-footer")


def make_layout(layout: str, raw: Path, folder: Path) -> Path:
    if layout in ("vmfs", "vmfsThin"):
        return vmfs_descriptor(folder, layout, raw, thin=layout == "vmfsThin")
    if layout == "streamOptimized-footer":
        return vmdkstream_convert(raw, folder / "footer.vmdk")
    return qemu_convert(raw, folder / f"{layout}.vmdk", layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_read_byte_exact_like_qemu(tmp_path, layout):
    size = 3 * MiB + 4608                       # not a grain multiple
    raw = write_raw(tmp_path / "src.raw", size, sample_content(size))
    img = make_layout(layout, raw, tmp_path)
    if layout == "vmfsThin":    # qemu refuses createType vmfsThin; its flat extent is raw
        expected = qemu_raw_bytes(tmp_path / "vmfsThin-flat.vmdk", tmp_path, "raw")
    else:
        expected = oracle_raw(img, tmp_path)
    with smsblock.open_disk(img) as d:
        assert d.size == len(expected)
        assert d.read(0, d.size) == expected
        # unaligned pieces, across grain and extent boundaries
        for off, n in [(1, 70000), (65535, 2), (d.size - 1000, 5000), (123457, 400000)]:
            assert d.read(off, n) == expected[off:off + n]
        assert_extents_consistent(d, expected)
        data_bytes = sum(e.length for e in d.extents() if e.is_data)
        if layout not in ("monolithicFlat", "twoGbMaxExtentFlat", "vmfs"):
            assert data_bytes < size * 0.9        # zero runs are not data
        expected_type = {"streamOptimized-footer": "streamOptimized"}.get(layout, layout)
        assert d.info.create_type == expected_type


def test_two_gb_split_layouts_span_several_extents(tmp_path):
    """twoGbMaxExtent* split at 2 GiB: a sparse 4.5 GiB disk with data in every extent."""
    size = 4 * 1024 * MiB + 512 * MiB
    pieces = [(4096, b"a" * 4096), (2048 * MiB - 100, b"b" * 200), (4096 * MiB + 7, b"c" * 9)]
    raw = write_raw(tmp_path / "big.raw", size, pieces)
    for layout in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        img = qemu_convert(raw, tmp_path / f"{layout}.vmdk", layout)
        with smsblock.open_disk(img) as d:
            assert len(d.info.extents) == 3 and d.size == size
            for off, data in pieces:
                assert d.read(off - 10, len(data) + 20) == b"\0" * 10 + data + b"\0" * 10
            exts = [e for e in d.extents() if e.is_data]
            assert sum(e.length for e in exts) < 64 * MiB
            for off, data in pieces:
                assert any(e.offset <= off and off + len(data) <= e.end for e in exts)
        for p in tmp_path.glob(f"{layout}*"):
            p.unlink()


@settings(max_examples=15)
@given(ranges=st.lists(st.tuples(st.integers(0, 3 * MiB), st.integers(0, 300000)),
                       min_size=1, max_size=8))
def test_native_reads_match_python_reference(tmp_path_factory, ranges):
    folder = tmp_path_factory.mktemp("ref")
    size = 2 * MiB + 1536
    raw = write_raw(folder / "src.raw", size, sample_content(size, seed=7))
    for img in (qemu_convert(raw, folder / "s.vmdk", "monolithicSparse"),
                qemu_convert(raw, folder / "o.vmdk", "streamOptimized"),
                vmdkstream_convert(raw, folder / "f.vmdk")):
        content, entries = reference_sparse(img)
        with smsblock.open_disk(img) as d:
            for off, n in ranges:
                assert d.read(off, n) == content[off:off + n]
            kinds = {0: None, 1: ExtentKind.ZERO}
            grain = d._parts[0].extent.header.grain_bytes
            for e in d.extents():
                for g in range(e.offset // grain, -(-e.end // grain)):
                    assert kinds.get(entries[g], ExtentKind.DATA) is e.kind


# --- snapshot delta chains --------------------------------------------------------------

def make_chain(folder: Path) -> tuple[Path, Path, Path]:
    size = 2 * MiB
    raw = write_raw(folder / "base.raw", size, [(0, os.urandom(300000)),
                                                (MiB, os.urandom(200000))])
    base = qemu_convert(raw, folder / "base.vmdk", "monolithicSparse")
    child = make_child(base, folder / "child.vmdk")
    qemu_io(child, "write -P 0x55 0 64k", "write -P 0x66 1100k 10k")
    grand = make_child(child, folder / "grand.vmdk")
    qemu_io(grand, "write -P 0x77 60k 8k", "write -P 0x88 1900k 64k")
    return base, child, grand


def test_delta_chain_reads_through_to_parents(tmp_path):
    base, child, grand = make_chain(tmp_path)
    for img, depth in ((child, 1), (grand, 2)):
        expected = oracle_raw(img, tmp_path)
        with smsblock.open_disk(img) as d:
            assert d.read(0, d.size) == expected
            assert d.read(65000, 200000) == expected[65000:265000]
            assert len(d.info.parent_chain) == depth
            assert d.info.parent_chain[-1] == str(base)
            assert d.info.parent_cid == d.info.parent.cid
            assert_extents_consistent(d, expected)
            # the union: the parent's data shows through where the child has none
            assert any(e.offset <= MiB < e.end for e in d.extents())


def test_zero_grain_in_child_hides_parent_data(tmp_path):
    raw = write_raw(tmp_path / "p.raw", MiB, [(0, b"\xaa" * MiB)])
    parent = qemu_convert(raw, tmp_path / "p.vmdk", "monolithicSparse")
    child = make_child(parent, tmp_path / "c.vmdk", "zeroed_grain=on")
    qemu_io(child, "write -z 128k 128k")
    expected = oracle_raw(child, tmp_path)
    assert expected[128 * KiB:256 * KiB] == bytes(128 * KiB)
    with smsblock.open_disk(child) as d:
        assert d.read(0, d.size) == expected
        exts = list(d.extents())
        assert [(e.offset, e.length, e.kind) for e in exts] == [
            (0, 128 * KiB, ExtentKind.DATA), (128 * KiB, 128 * KiB, ExtentKind.ZERO),
            (256 * KiB, MiB - 256 * KiB, ExtentKind.DATA)]


def test_cid_mismatch_is_refused_unless_ignored(tmp_path):
    base, child, _ = make_chain(tmp_path)
    with smsblock.open_disk(child) as d:
        cid = d.info.parent_cid
    wrong = (cid ^ 0x1) & 0xFFFFFFFF
    patch_bytes(child, b"parentCID=%x" % cid, b"parentCID=%x" % wrong)
    with pytest.raises(CidMismatchError) as err:
        smsblock.open_disk(child)
    assert str(child) in str(err.value) and f"{wrong:08x}" in str(err.value)
    assert err.value.offset == 0x200 + child.read_bytes()[0x200:0x2000].index(b"parentCID=")
    expected = oracle_raw(base, tmp_path)
    with smsblock.open_disk(child, ignore_cid_mismatch=True) as d:
        assert d.read(MiB, 1000) == expected[MiB:MiB + 1000]


def test_parent_chain_loop_is_refused(tmp_path):
    raw = write_raw(tmp_path / "p0.raw", MiB, [(0, b"\x11" * 5000)])
    p0 = qemu_convert(raw, tmp_path / "p0.vmdk", "monolithicSparse")
    c1 = make_child(p0, tmp_path / "c1.vmdk")
    c2 = make_child(c1, tmp_path / "c2.vmdk")
    # c1 now names c2 as its parent: c2 -> c1 -> c2
    patch_bytes(c1, b'parentFileNameHint="p0.vmdk"', b'parentFileNameHint="c2.vmdk"')
    with pytest.raises(ParentChainError, match="loops") as err:
        smsblock.open_disk(c2, ignore_cid_mismatch=True)
    assert err.value.path == str(c1) and err.value.offset is not None
    patch_bytes(c1, b'parentFileNameHint="c2.vmdk"', b'parentFileNameHint="c1.vmdk"')
    with pytest.raises(ParentChainError, match="loops"):     # its own parent
        smsblock.open_disk(c1, ignore_cid_mismatch=True)


def test_missing_parent_is_refused(tmp_path):
    base, child, _ = make_chain(tmp_path)
    base.unlink()
    with pytest.raises(ParentChainError, match="not found"):
        smsblock.open_disk(child)


def test_parent_outside_the_folder_needs_permission(tmp_path):
    raw = write_raw(tmp_path / "p.raw", MiB, [(0, b"\x11" * 5000)])
    qemu_convert(raw, tmp_path / "p.vmdk", "monolithicSparse")
    sub = tmp_path / "snap"
    sub.mkdir()
    qemu_img("create", "-f", "vmdk", "-b", "../p.vmdk", "-F", "vmdk", sub / "c.vmdk")
    with pytest.raises(UnsafeExtentPathError, match="outside"):
        smsblock.open_disk(sub / "c.vmdk")
    with smsblock.open_disk(sub / "c.vmdk", allow_outside_paths=True) as d:
        assert d.read(0, 5000) == b"\x11" * 5000
        assert d.info.parent.path == str(tmp_path / "p.vmdk")


# --- threads -----------------------------------------------------------------------------

def run_in_threads(target, *arg_tuples) -> None:
    """``target(*args)`` for each ``args``, each on its own thread, all at once; the first
    failure is raised here once all have finished."""
    errors = []

    def guarded(*args):
        try:
            target(*args)
        except BaseException as e:      # surfaced after join
            errors.append(e)
    threads = [threading.Thread(target=guarded, args=args) for args in arg_tuples]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_two_threads_reading_halves_of_a_compressed_disk(tmp_path):
    size = 4 * MiB
    raw = write_raw(tmp_path / "src.raw", size, sample_content(size, seed=3))
    img = qemu_convert(raw, tmp_path / "s.vmdk", "streamOptimized")
    expected = raw.read_bytes()
    results = {}
    with smsblock.open_disk(img) as d:
        def reader(lo, hi):
            got = bytearray(hi - lo)
            for _ in range(3):
                for off in range(lo, hi, 192 * KiB + 512):    # ranges split grains
                    n = min(192 * KiB + 512, hi - off)
                    d.readinto(off, memoryview(got)[off - lo:off - lo + n])
                results[lo] = bytes(got)
        run_in_threads(reader, (0, size // 2), (size // 2, size))
    assert results[0] + results[size // 2] == expected


def test_readinto_contract(tmp_path):
    raw = write_raw(tmp_path / "src.raw", MiB, [(0, b"z" * MiB)])
    img = qemu_convert(raw, tmp_path / "s.vmdk", "monolithicSparse")
    with smsblock.open_disk(img) as d:
        buf = bytearray(100)
        assert d.readinto(MiB - 40, buf) == 40 and buf[:40] == b"z" * 40
        assert d.readinto(MiB + 5, buf) == 0
        assert d.read(MiB - 1, 10) == b"z"
        assert list(d.extents(MiB // 2, MiB // 2 + 10)) == [
            smsblock.Extent(MiB // 2, 10, ExtentKind.DATA)]
        assert re.match(r"<VmdkDisk '.*s.vmdk' size=1048576>", repr(d))
    with pytest.raises(DiskIOError, match="after close"):
        d.read(0, 10)


def test_native_read_releases_the_gil(tmp_path):
    """Another Python thread keeps counting while one readinto inflates many grains."""
    words = b"the quick brown fox jumps over the lazy dog %d\n"
    # one read of 64 MiB inflates for ~50 ms: long enough for the scheduler to give the
    # counter a share even when the other core is busy; a GIL-holding read leaves it 0
    text = b"".join(words % i for i in range(1600000))[:64 * MiB]
    raw = write_raw(tmp_path / "t.raw", 64 * MiB, [(0, text)])
    img = qemu_convert(raw, tmp_path / "t.vmdk", "streamOptimized")
    buf = bytearray(64 * MiB)
    box, stop = [0], threading.Event()

    def count():
        while not stop.is_set():
            box[0] += 1

    with smsblock.open_disk(img) as d:
        d.readinto(0, buf)                                   # warm the page cache
        t = threading.Thread(target=count)
        t.start()
        try:
            best = 0.0
            for _ in range(5):
                time.sleep(0.01)                             # counter alone: its speed
                a0, t0 = box[0], time.perf_counter()
                time.sleep(0.05)
                solo_rate = (box[0] - a0) / (time.perf_counter() - t0)
                b0, t1 = box[0], time.perf_counter()
                d.readinto(0, buf)                           # counter during one long read
                during = (box[0] - b0) / (time.perf_counter() - t1)
                best = max(best, during / max(solo_rate, 1))
        finally:
            stop.set()
            t.join()
        assert buf == text
    # were the GIL held for the read, the counter would stand still during it
    print(f"counter speed during the read: {best:.0%}")
    assert best > 0.3, f"counter ran at {best:.0%} of its solo speed during the read"


def test_child_larger_than_its_parent(tmp_path):
    raw = write_raw(tmp_path / "p.raw", MiB, [(MiB - 4096, b"\x99" * 4096)])
    qemu_convert(raw, tmp_path / "p.vmdk", "monolithicSparse")
    child = tmp_path / "c.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "p.vmdk", "-F", "vmdk", child, str(3 * MiB))
    qemu_io(child, "write -P 0x12 2M 64k")
    expected = oracle_raw(child, tmp_path)
    with smsblock.open_disk(child) as d:
        assert d.size == 3 * MiB and d.info.parent.virtual_size == MiB
        assert d.read(0, d.size) == expected
        assert_extents_consistent(d, expected)
        assert [(e.offset, e.length) for e in d.extents()] == [
            (MiB - 64 * KiB, 64 * KiB), (2 * MiB, 64 * KiB)]


# --- files from an opener (the datastore HTTP shape) -------------------------------------

class FakeRemoteFile:
    """A file with DatastoreFile's shape, served from a local folder (no descriptor)."""

    def __init__(self, root: Path, path: str, log: list, fail_after: int | None = None):
        self.name = f"[ds1] {path}"
        self._data = (root / path).read_bytes()
        self.size = len(self._data)
        self._log, self._fail_after = log, fail_after

    def readinto(self, offset, buf):
        view = memoryview(buf).cast("B")
        self._log.append((self.name, offset, len(view)))
        if self._fail_after is not None and len(self._log) > self._fail_after:
            raise smsblock.errors.VSphereError(f"{self.name}: connection lost")
        n = max(0, min(len(view), self.size - offset))
        view[:n] = self._data[offset:offset + n]
        return n

    def pread(self, length, offset):
        buf = bytearray(max(0, min(length, self.size - offset)))
        return bytes(buf[:self.readinto(offset, buf)])

    def close(self):
        pass


def make_opener(root: Path, log: list, fail_after: int | None = None):
    def opener(path):
        if not (root / path).is_file():
            raise smsblock.errors.VSphereError(f"[ds1] {path}: file not found (HTTP 404)")
        return FakeRemoteFile(root, path, log, fail_after)
    return opener


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_read_through_an_opener(vmdk_samples, name):
    from smsblock.disk.vmdk import open_vmdk
    log = []
    with open_vmdk(name, opener=make_opener(vmdk_samples, log)) as d:
        assert d.path == f"[ds1] {name}"
        content = d.read(0, d.size)
        assert hashlib.sha256(content).hexdigest() == SAMPLES[name][2]
        assert_extents_consistent(d, content)
    assert log and all(n > 0 for _, _, n in log)


def test_chain_read_through_an_opener(tmp_path):
    from smsblock.disk.vmdk import open_vmdk
    base, child, grand = make_chain(tmp_path)
    expected = oracle_raw(grand, tmp_path)
    log = []
    with open_vmdk("grand.vmdk", opener=make_opener(tmp_path, log)) as d:
        assert d.info.parent_chain == ["[ds1] child.vmdk", "[ds1] base.vmdk"]
        assert d.read(0, d.size) == expected
    with pytest.raises(UnsafeExtentPathError):
        sub = tmp_path / "sub"
        sub.mkdir()
        qemu_img("create", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk", sub / "c.vmdk")
        open_vmdk("sub/c.vmdk", opener=make_opener(tmp_path, log))


def test_opener_failures_surface_unchanged(tmp_path):
    from smsblock.disk.vmdk import open_vmdk
    raw = write_raw(tmp_path / "src.raw", 2 * MiB, sample_content(2 * MiB, seed=5))
    qemu_convert(raw, tmp_path / "s.vmdk", "streamOptimized")
    log = []
    with open_vmdk("s.vmdk", opener=make_opener(tmp_path, log, fail_after=6)) as d:
        with pytest.raises(smsblock.errors.VSphereError, match="connection lost"):
            d.read(0, d.size)
    with pytest.raises(smsblock.errors.VSphereError, match="404"):
        open_vmdk("nope.vmdk", opener=make_opener(tmp_path, []))


def test_two_threads_through_an_opener(tmp_path):
    from smsblock.disk.vmdk import open_vmdk
    size = 4 * MiB
    raw = write_raw(tmp_path / "src.raw", size, sample_content(size, seed=8))
    qemu_convert(raw, tmp_path / "s.vmdk", "streamOptimized")
    expected = raw.read_bytes()
    got = bytearray(size)
    with open_vmdk("s.vmdk", opener=make_opener(tmp_path, [])) as d:
        def reader(lo, hi):
            for off in range(lo, hi, 300 * KiB):
                n = min(300 * KiB, hi - off)
                d.readinto(off, memoryview(got)[off:off + n])
        run_in_threads(reader, (0, size // 2), (size // 2, size))
    assert got == expected


def test_looks_like_descriptor(vmdk_samples):
    from smsblock.disk.descriptor import looks_like_descriptor
    assert looks_like_descriptor((vmdk_samples / "vmfs_thick.vmdk").read_bytes())
    assert not looks_like_descriptor((vmdk_samples / "monolithicSparse.vmdk").read_bytes()[:4096])
    assert not looks_like_descriptor(bytes(1024))


@pytest.mark.parametrize("budget", [0, 16 * KiB, 1 << 30])
def test_grain_table_cache_budget(tmp_path, monkeypatch, budget):
    """Past the cache budget tables are re-read per thread: same bytes, bounded memory."""
    from smsblock.disk import sparse
    from vmdk_images import build_cowd
    monkeypatch.setattr(sparse, "GT_CACHE_BYTES", budget)
    size = 40 * MiB                                    # 2 grain tables of 64 KiB grains
    pieces = [(i * 7 * MiB + 12345, os.urandom(70000)) for i in range(6)]
    raw = write_raw(tmp_path / "src.raw", size, pieces)
    content = raw.read_bytes()
    images = [qemu_convert(raw, tmp_path / "s.vmdk", "monolithicSparse"),
              qemu_convert(raw, tmp_path / "o.vmdk", "streamOptimized")]
    cowd = tmp_path / "d-delta.vmdk"                  # 1-sector grains: 8 tables of 16 KiB
    cowd.write_bytes(build_cowd(content[:8 * MiB] + bytes(8 * MiB), 1, 4))
    for img in images + [cowd]:
        expected = content if img != cowd else content[:8 * MiB] + bytes(8 * MiB)
        with smsblock.open_disk(img) as d:
            def reader(lo, hi):
                assert d.read(lo, hi - lo) == expected[lo:hi]
            half = d.size // 2 + 4096
            run_in_threads(reader, (0, half), (half, d.size))
            assert_extents_consistent(d, expected)
            core = d._parts[0].extent.core
            assert core.cached_table_bytes <= budget
            if budget >= 1 << 20:
                assert core.cached_table_bytes > 0
