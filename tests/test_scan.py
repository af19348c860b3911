"""The block scan: native loop vs a pure-Python reference, read discipline, change callbacks, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import numpy as np
import pytest
import xxhash
from hypothesis import given, strategies as st

from smsblock import open_disk
from smsblock._scan import scan_batch
from smsblock.cli import main
from smsblock.disk.base import Disk, DiskInfo, Extent, ExtentKind
from smsblock.disk.raw import RawDisk
from smsblock.errors import Cancelled, DiskIOError, UsageError
from smsblock.manifest import BlockState, Manifest
from smsblock.progress import CancelToken
from smsblock.scanner import plan_reads, scan

from conftest import qemu_img

KIB = 1024
BS = 64 * KIB


# -- the meaning of a scan, in plain Python ------------------------------------

def reference_scan(disk: Disk, block_size: int) -> Manifest:
    """Block i: UNALLOCATED unless a DATA extent touches it; else ZERO if all its bytes
    are zero; else DATA with the xxh3-128 of its bytes."""
    m = Manifest(disk.size, block_size)
    touched = set()
    for e in disk.extents():
        if e.kind is ExtentKind.DATA and e.length > 0:
            touched.update(range(e.offset // block_size, (e.end - 1) // block_size + 1))
    for i in sorted(touched):
        data = disk.read(i * block_size, block_size)
        if data.count(0) == len(data):
            m.states[i] = BlockState.ZERO
        else:
            m.states[i] = BlockState.DATA
            m.hashes[i] = np.frombuffer(xxhash.xxh3_128_digest(data), np.uint8)
    return m


def same_blocks(a: Manifest, b: Manifest) -> None:
    assert (a.disk_size, a.block_size, a.n_blocks) == (b.disk_size, b.block_size, b.n_blocks)
    np.testing.assert_array_equal(a.states, b.states)
    np.testing.assert_array_equal(a.hashes, b.hashes)
    assert not a.addresses.any() and not b.addresses.any()


class MemoryDisk(Disk):
    """A disk in memory with given extents; records every read (to check read discipline)."""

    def __init__(self, data: bytes, extents: list[Extent]):
        self.path = "<memory>"
        self.data = data
        self.size = len(data)
        self._extents = extents
        self.info = DiskInfo(path=self.path, format="memory", virtual_size=self.size)
        self.reads: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def readinto(self, offset, buf):
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.size - offset))
        with self._lock:
            self.reads.append((offset, n))
        view[:n] = self.data[offset:offset + n]
        return n

    def extents(self, start=0, end=None):
        yield from self._extents


# -- drawn disks ---------------------------------------------------------------

@st.composite
def memory_disks(draw):
    """A disk made of segments: random data, written zeros, holes; extents as a reader
    would report them (DATA over data and written zeros, some ZERO extents over holes)."""
    size = draw(st.integers(0, 12 * BS + 3 * KIB))
    data = bytearray(size)
    extents = []
    pos = 0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    while pos < size:
        length = min(size - pos, draw(st.integers(1, 3 * BS)))
        kind = draw(st.sampled_from(["data", "zeros", "hole", "zero-extent", "sprinkle"]))
        if kind == "data":
            data[pos:pos + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        elif kind == "sprinkle":        # one non-zero byte somewhere: must not read as zero
            data[pos + int(rng.integers(0, length))] = 1 + int(rng.integers(0, 255))
        if kind in ("data", "zeros", "sprinkle"):
            extents.append(Extent(pos, length, ExtentKind.DATA))
        elif kind == "zero-extent":
            extents.append(Extent(pos, length, ExtentKind.ZERO))
        pos += length
    return MemoryDisk(bytes(data), extents)


@st.composite
def raw_layouts(draw):
    """Segments of a sparse raw file: (offset, bytes) writes; the rest stays a hole."""
    size = draw(st.integers(1, 10 * BS + 5 * KIB))
    writes = []
    for _ in range(draw(st.integers(0, 6))):
        off = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - off, 2 * BS)))
        fill = draw(st.sampled_from(["random", "zeros"]))
        seed = draw(st.integers(0, 2**32 - 1))
        writes.append((off, length, fill, seed))
    return size, writes


def make_raw(path, layout) -> bytes:
    size, writes = layout
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length, fill, seed in writes:
            chunk = (np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
                     if fill == "random" else bytes(length))
            f.seek(off)
            f.write(chunk)
            content[off:off + length] = chunk
    return bytes(content)


# -- native loop vs reference ------------------------------------------------

@given(memory_disks(), st.sampled_from([BS, 2 * BS]), st.sampled_from([1, 2]),
       st.sampled_from([BS, 3 * BS, 1 << 20]))
def test_scan_matches_reference_on_drawn_disks(disk, block_size, threads, batch):
    m = scan(disk, block_size=block_size, threads=threads, batch_bytes=batch)
    same_blocks(m, reference_scan(disk, block_size))


@given(raw_layouts(), st.sampled_from([BS, 128 * KIB]))
def test_scan_matches_reference_on_sparse_raw_files(tmp_path_factory, layout, block_size):
    path = tmp_path_factory.mktemp("raw") / "disk.raw"
    content = make_raw(path, layout)
    got = {}
    with open_disk(path) as disk:
        m = scan(disk, block_size=block_size,
                 on_changed=lambda i, v: got.__setitem__(i, bytes(v)))
        same_blocks(m, reference_scan(disk, block_size))
        same_blocks(scan(disk, block_size=block_size, batch_bytes=block_size), m)
    # and against the file's bytes: DATA blocks hash the content, others are zero content
    for i in range(m.n_blocks):
        block = content[i * block_size:(i + 1) * block_size]
        if m.states[i] == BlockState.DATA:
            assert bytes(m.hashes[i]) == xxhash.xxh3_128_digest(block)
        else:
            assert block.count(0) == len(block)
    assert sorted(got) == [i for i in range(m.n_blocks) if m.states[i] == BlockState.DATA]
    assert all(got[i] == content[i * block_size:(i + 1) * block_size] for i in got)
    path.unlink()


@given(st.binary(min_size=0, max_size=5 * BS), st.data())
def test_scan_batch_native_vs_python(payload, data):
    # zero out some blocks so both branches run
    buf = bytearray(payload)
    n = -(-len(buf) // BS)
    for k in range(n):
        if data.draw(st.booleans()):
            buf[k * BS:(k + 1) * BS] = bytes(len(buf[k * BS:(k + 1) * BS]))
    first = data.draw(st.integers(0, 3))
    total = first + n + data.draw(st.integers(0, 2))
    states = np.zeros(total, np.uint8)
    hashes = np.zeros((total, 16), np.uint8)
    hashes[:] = 0xAA        # stale values must be overwritten inside the batch
    changed = np.zeros(total, np.uint8)
    prev_states = np.array(data.draw(st.lists(st.integers(0, 2), min_size=total, max_size=total)),
                           np.uint8)
    prev_hashes = np.zeros((total, 16), np.uint8)
    expect_hash, expect_state, expect_changed = {}, {}, {}
    for k in range(n):
        block = bytes(buf[k * BS:(k + 1) * BS])
        i = first + k
        if block.count(0) == len(block):
            expect_state[i], expect_hash[i], expect_changed[i] = 1, bytes(16), 0
        else:
            digest = xxhash.xxh3_128_digest(block)
            expect_state[i], expect_hash[i] = 2, digest
            if data.draw(st.booleans()):
                prev_hashes[i] = np.frombuffer(digest, np.uint8)
            expect_changed[i] = int(prev_states[i] != 2 or bytes(prev_hashes[i]) != digest)
    arr = np.frombuffer(bytes(buf) + bytes(7), np.uint8)    # buffer longer than nbytes
    got = scan_batch(arr, len(buf), BS, first, states, hashes, prev_states, prev_hashes, changed)
    assert got == sum(expect_changed.values())
    for i in range(first, first + n):
        assert states[i] == expect_state[i]
        assert bytes(hashes[i]) == expect_hash[i]
        assert changed[i] == expect_changed[i]
    assert not states[:first].any() and not states[first + n:].any()
    # without a previous manifest every DATA block is changed
    scan_batch(arr, len(buf), BS, first, states, hashes, None, None, changed)
    assert [int(changed[i]) for i in range(first, first + n)] == [
        int(expect_state[i] == 2) for i in range(first, first + n)]


def test_scan_batch_refuses_bad_geometry():
    states, hashes, changed = np.zeros(2, np.uint8), np.zeros((2, 16), np.uint8), np.zeros(2, np.uint8)
    buf = np.zeros(3 * BS, np.uint8)
    with pytest.raises(ValueError):
        scan_batch(buf, 3 * BS, BS, 0, states, hashes, None, None, changed)     # 3 blocks > 2
    with pytest.raises(ValueError):
        scan_batch(buf, 4 * BS, BS, 0, states, hashes, None, None, changed)     # past the buffer
    with pytest.raises(ValueError):
        scan_batch(buf, BS, BS, 0, states, hashes, np.zeros(5, np.uint8),
                   np.zeros((5, 16), np.uint8), changed)


# -- read discipline ---------------------------------------------------------

@given(memory_disks(), st.sampled_from([BS, 2 * BS]), st.sampled_from([1, 2]))
def test_only_blocks_touched_by_data_extents_are_read(disk, block_size, threads):
    m = scan(disk, block_size=block_size, threads=threads, batch_bytes=2 * block_size)
    touched = set()
    for e in disk._extents:
        if e.kind is ExtentKind.DATA:
            touched.update(range(e.offset // block_size, (e.end - 1) // block_size + 1))
    read_blocks = []
    for offset, length in disk.reads:
        assert offset % block_size == 0
        read_blocks.extend(range(offset // block_size, -(-(offset + length) // block_size)))
    assert sorted(read_blocks) == sorted(touched)           # each touched block read once
    assert {i for i in range(m.n_blocks) if m.states[i] == BlockState.UNALLOCATED} == \
        set(range(m.n_blocks)) - touched
    assert m.meta["scan"]["bytes_read"] == sum(n for _, n in disk.reads)


def test_unallocated_and_zero_extents_are_never_read():
    size = 10 * BS
    data = bytearray(size)
    data[BS + 5] = 1                                    # block 1: data
    disk = MemoryDisk(bytes(data), [
        Extent(BS, 10, ExtentKind.DATA),                # touches block 1 only
        Extent(3 * BS, 4 * BS, ExtentKind.ZERO),        # blocks 3-6: known zeros, not read
        Extent(8 * BS + 100, 1, ExtentKind.DATA),       # block 8: allocated, reads as zeros
    ])
    m = scan(disk, block_size=BS)
    assert sorted(disk.reads) == [(BS, BS), (8 * BS, BS)]
    assert m.states.tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 1, 0]
    assert not m.hashes[[0, 2, 3, 4, 5, 6, 7, 8, 9]].any()     # zero blocks never hashed


def test_extents_past_the_disk_size_are_clipped():
    disk = MemoryDisk(os.urandom(2 * BS), [Extent(BS, 5 * BS)])
    assert list(plan_reads(disk, BS)) == [(1, 2)]
    assert scan(disk, block_size=BS).states.tolist() == [0, 2]


def test_plan_merges_runs():
    disk = MemoryDisk(bytes(8 * BS), [Extent(0, 10), Extent(BS - 1, 2), Extent(2 * BS, BS),
                                      Extent(4 * BS, 1, ExtentKind.ZERO), Extent(6 * BS, 1)])
    assert list(plan_reads(disk, BS)) == [(0, 3), (6, 7)]


def test_raw_file_in_one_block_batches_on_two_workers(tmp_path):
    # each worker's reused buffer: a batch never sees another batch's bytes
    path = tmp_path / "d.raw"
    path.write_bytes(os.urandom(40 * BS + 123))
    with open_disk(path) as disk:
        for _ in range(3):
            same_blocks(scan(disk, block_size=BS, batch_bytes=BS), reference_scan(disk, BS))


def test_raw_disk_larger_than_its_file(tmp_path):
    # a declared size past the file's end: read inside the file, zeros after
    path = tmp_path / "short.raw"
    path.write_bytes(os.urandom(3 * BS + 10))
    disk = RawDisk(path, size=6 * BS + 5)
    for batch in (BS, 2 * BS, None):
        m = scan(disk, block_size=BS, batch_bytes=batch)
        same_blocks(m, reference_scan(disk, BS))
        assert m.states.tolist() == [2, 2, 2, 2, 0, 0, 0]


def test_raw_file_shrinking_during_the_scan_is_an_error(tmp_path):
    path = tmp_path / "shrinks.raw"
    path.write_bytes(os.urandom(8 * BS))

    def truncate(index, view):
        os.truncate(path, BS)           # only the next batch's size check sees it

    with open_disk(path) as disk, pytest.raises(DiskIOError, match="shrank") as e:
        scan(disk, block_size=BS, threads=1, batch_bytes=BS, on_changed=truncate)
    assert e.value.offset == BS


def test_raw_file_shrinking_under_two_workers_is_an_error_not_a_crash(tmp_path):
    # batches are copied, not mapped: a shrink can never fault (SIGBUS) a worker
    path = tmp_path / "shrinks.raw"
    content = os.urandom(64 * BS)
    path.write_bytes(content)
    both = threading.Barrier(2, timeout=30)    # both workers inside their first batch
    first_call, intact = set(), []

    def truncate(index, view):
        if threading.get_ident() in first_call:
            return
        first_call.add(threading.get_ident())
        if both.wait() == 0:
            os.truncate(path, 3 * BS + 100)     # 30 of 32 batches still to read
        both.wait()
        intact.append(bytes(view) == content[index * BS:(index + 1) * BS])

    with open_disk(path) as disk, pytest.raises(DiskIOError, match="shrank") as e:
        scan(disk, block_size=BS, threads=2, batch_bytes=2 * BS, on_changed=truncate)
    assert intact == [True, True] and e.value.offset >= 3 * BS + 100


# -- change detection --------------------------------------------------------

@given(memory_disks(), st.data())
def test_on_changed_gets_exactly_the_changed_data_blocks(disk, data):
    old = scan(disk, block_size=BS)
    # change some blocks: rewrite bytes, zero them, or leave them
    content = bytearray(disk.data)
    for i in range(old.n_blocks):
        action = data.draw(st.sampled_from(["keep", "keep", "flip", "zero"]))
        lo, hi = i * BS, min((i + 1) * BS, len(content))
        if action == "flip":
            content[lo + data.draw(st.integers(0, hi - lo - 1))] ^= 0x5A
        elif action == "zero":
            content[lo:hi] = bytes(hi - lo)
    new_disk = MemoryDisk(bytes(content), [Extent(0, len(content))] if content else [])
    got = {}
    lock = threading.Lock()

    def on_changed(index, view):
        assert view.readonly
        with lock:
            assert index not in got
            got[index] = bytes(view)

    new = scan(new_disk, block_size=BS, previous=old, on_changed=on_changed)
    ref = reference_scan(new_disk, BS)
    same_blocks(new, ref)
    expected = {i for i in range(new.n_blocks) if new.states[i] == BlockState.DATA and (
        old.states[i] != BlockState.DATA or bytes(old.hashes[i]) != bytes(new.hashes[i]))}
    assert set(got) == expected
    for i, block in got.items():
        assert block == bytes(content[i * BS:(i + 1) * BS])
    assert new.meta["scan"]["blocks_changed"] == len(expected)


def test_incompatible_previous_reports_every_data_block():
    data = os.urandom(3 * BS + 100)
    disk = MemoryDisk(data, [Extent(0, len(data))])
    first = scan(disk, block_size=BS)
    same = []
    scan(disk, block_size=BS, previous=first, on_changed=lambda i, v: same.append(i))
    assert same == []
    other_bs = []
    scan(disk, block_size=2 * BS, previous=first, on_changed=lambda i, v: other_bs.append(i))
    assert sorted(other_bs) == [0, 1]
    grown = MemoryDisk(data + os.urandom(10), [Extent(0, len(data) + 10)])
    other_size = []
    scan(grown, block_size=BS, previous=first, on_changed=lambda i, v: other_size.append((i, len(v))))
    assert sorted(other_size) == [(0, BS), (1, BS), (2, BS), (3, 110)]      # short last block


def test_view_is_released_after_the_callback():
    data = os.urandom(2 * BS)
    kept = []
    scan(MemoryDisk(data, [Extent(0, len(data))]), block_size=BS, on_changed=lambda i, v: kept.append(v))
    assert len(kept) == 2
    with pytest.raises(ValueError):
        bytes(kept[0])      # released: cannot show a later batch's bytes


def test_keyboard_interrupt_stops_the_workers():
    data = os.urandom(64 * BS)
    calls = []

    def interrupt(index, view):
        calls.append(index)
        if len(calls) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(MemoryDisk(data, [Extent(0, len(data))]), block_size=BS, batch_bytes=BS,
             on_changed=interrupt)
    assert len(calls) <= 3
    assert not [t for t in threading.enumerate() if t.name.startswith("smsblock-scan")]


# -- errors, cancellation, progress --------------------------------------------

def test_callback_error_stops_the_scan():
    data = os.urandom(20 * BS)
    calls = []

    def boom(index, view):
        calls.append(index)
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        scan(MemoryDisk(data, [Extent(0, len(data))]), block_size=BS, on_changed=boom,
             batch_bytes=BS)
    assert len(calls) <= 2      # one per worker, then everything stops


def test_cancel():
    token = CancelToken()
    data = os.urandom(20 * BS)
    seen = []

    def cancel_after_first(index, view):
        seen.append(index)
        token.cancel("user asked")

    with pytest.raises(Cancelled, match="user asked"):
        scan(MemoryDisk(data, [Extent(0, len(data))]), block_size=BS,
             on_changed=cancel_after_first, cancel=token, batch_bytes=BS)
    assert len(seen) < 20


def test_short_read_is_an_error():
    class Short(MemoryDisk):
        def readinto(self, offset, buf):
            return max(0, super().readinto(offset, buf) - 1)

    with pytest.raises(DiskIOError, match="short read"):
        scan(Short(os.urandom(BS), [Extent(0, BS)]), block_size=BS)


def test_progress_counts_read_bytes():
    data = os.urandom(5 * BS + 3)
    disk = MemoryDisk(data, [Extent(0, BS), Extent(3 * BS, 2 * BS + 3)])
    seen = []
    lock = threading.Lock()

    def progress(done, total):
        with lock:
            seen.append((done, total))

    scan(disk, block_size=BS, progress=progress, batch_bytes=BS)
    assert seen[-1] == (3 * BS + 3, 3 * BS + 3)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("kwargs", [{"block_size": 32 * KIB}, {"block_size": 8 << 20},
                                    {"block_size": 3 * BS}, {"threads": 0}, {"batch_bytes": 0}])
def test_bad_parameters(kwargs):
    with pytest.raises(UsageError):
        scan(MemoryDisk(bytes(BS), [Extent(0, BS)]), **kwargs)


def test_empty_disk():
    m = scan(MemoryDisk(b"", []))
    assert m.n_blocks == 0 and m.disk_size == 0


# -- VMDK disks (qemu-img made) scan like their raw content ------------------------------

@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_vmdk_scans_like_raw(tmp_path, subformat):
    raw = tmp_path / "disk.raw"
    rng = np.random.default_rng(7)
    size = 40 * BS + 3 * 512
    with open(raw, "wb") as f:
        f.truncate(size)
        for off, length in [(0, 5000), (3 * BS, 2 * BS), (9 * BS + 100, 10), (39 * BS, BS + 1536)]:
            f.seek(off)
            f.write(rng.integers(0, 256, length, dtype=np.uint8).tobytes())
        f.seek(20 * BS)
        f.write(bytes(3 * BS))      # written zeros
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, vmdk)
    with open_disk(raw) as r, open_disk(vmdk) as v:
        assert v.size == r.size == size
        mr, mv = scan(r, block_size=BS), scan(v, block_size=BS)
        same_blocks(mv, reference_scan(v, BS))
    data_r = mr.states == BlockState.DATA
    np.testing.assert_array_equal(data_r, mv.states == BlockState.DATA)
    np.testing.assert_array_equal(mr.hashes, mv.hashes)
    assert mv.states[[0, 3, 4, 9, 39, 40]].tolist() == [2] * 6
    assert (mv.states == BlockState.UNALLOCATED).sum() >= 30       # grains never written


def test_vmdk_zero_grains_are_not_read(tmp_path):
    # qemu-io writes a zeroed grain (GTE 1) with "write -z" on a zeroed_grain image
    vmdk = tmp_path / "zg.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "zeroed_grain=on", vmdk, "4M")
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 128k", "-c", "write -z 1M 512k",
                    "-c", "write -P 0 2M 64k", str(vmdk)], check=True, capture_output=True)
    with open_disk(vmdk) as disk:
        kinds = [(e.offset, e.length, e.kind) for e in disk.extents()]
        assert (1 << 20, 512 * KIB, ExtentKind.ZERO) in kinds
        reads = []
        inner = disk.readinto

        def counting_readinto(offset, buf):
            reads.append((offset, len(memoryview(buf))))
            return inner(offset, buf)

        disk.readinto = counting_readinto
        m = scan(disk, block_size=BS)
    assert all(off + n <= (1 << 20) or off >= (1 << 20) + 512 * KIB for off, n in reads)
    expected = [0] * 64
    expected[0:2] = [2, 2]          # data
    expected[32] = 1                # written zeros inside an allocated grain
    assert m.states.tolist() == expected            # the zero grains stay unallocated


# -- CLI -----------------------------------------------------------------------

def test_cli_scan_then_diff(tmp_path, capsys):
    disk = tmp_path / "d.raw"
    with open(disk, "wb") as f:
        f.truncate(8 * BS + 77)
        f.write(os.urandom(2 * BS))
    assert main(["scan", str(disk), "-o", str(tmp_path / "a.man"), "--block-size", "64K",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["blocks_total"], out["blocks_data"], out["block_size"]) == (9, 2, BS)
    assert out["blocks_data"] + out["blocks_zero"] + out["blocks_unallocated"] == 9
    a = Manifest.load(tmp_path / "a.man")
    same_blocks(a, reference_scan(open_disk(disk), BS))
    assert out["digest"] == a.digest.hex()

    with open(disk, "r+b") as f:
        f.seek(BS + 5)
        f.write(b"changed")
        f.seek(5 * BS)
        f.write(b"new data")
    assert main(["scan", str(disk), "-o", str(tmp_path / "b.man"), "--block-size", "65536",
                 "--previous", str(tmp_path / "a.man")]) == 0
    text = capsys.readouterr().out
    assert "2 changed" in text and "9 blocks of 65536 bytes" in text
    assert main(["diff", str(tmp_path / "a.man"), str(tmp_path / "b.man"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] == [1, 5] and out["changed_count"] == 2 and out["blocks_total"] == 9


@pytest.mark.parametrize("size", ["3K", "8M", "100000", "big"])
def test_cli_scan_refuses_bad_block_size(tmp_path, capsys, size):
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"x")
    assert main(["scan", str(disk), "-o", str(tmp_path / "m"), "--block-size", size]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_cancel_token_wakes_a_waiter_at_once_and_times_out_otherwise():
    token = CancelToken()
    assert token.wait(0.01) is False and not token.cancelled
    threading.Timer(0.05, token.cancel, ("stop",)).start()
    assert token.wait(10) is True and token.reason == "stop"
    with pytest.raises(Cancelled, match="stop"):
        token.check()
