"""Streaming manifests (issue 11, outcome 3): windows give what the whole table gives.

* ManifestWriter fed in runs and windows of any size writes what Manifest.to_bytes writes
  (same digest, same table), and ManifestReader reads versions 1, 2 and 3 window by window,
  block by block and run by run as the whole Manifest does;
* iter_diff / diff_count over readers equal diff over whole manifests;
* scan_stream with small windows equals a whole scan (the reference is built from the
  disk's bytes, not from the code under test);
* a corrupt frame is one ManifestError naming the file and the frame's offset.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smsblock.disk import open_disk
from smsblock.errors import ManifestError, UsageError
from smsblock.manifest import (BlockState, Manifest, ManifestReader, ManifestWriter,
                               copy_manifest, diff, diff_count, iter_diff)
from smsblock.scanner import Gap, check_changed_extents, scan, scan_stream

KIB = 1024
BS = 64 * KIB


@st.composite
def layouts(draw, max_runs: int = 30):
    """A manifest made of runs of random states and lengths, DATA entries random, now
    and then a non-DATA block with a hash or address left in it."""
    runs = draw(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 400)), max_size=max_runs))
    n = sum(c for _, c in runs)
    tail = draw(st.integers(0, BS - 1)) if n else 0
    m = Manifest(max(0, n * BS - tail), BS, meta={"k": draw(st.integers(0, 9))},
                 address_algorithm="blake3")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    at = 0
    for state, count in runs:
        m.states[at:at + count] = state
        at += count
    data = m.states == BlockState.DATA
    m.hashes[data] = rng.integers(0, 3, (int(data.sum()), 16), dtype=np.uint8)
    m.addresses[data] = rng.integers(0, 256, (int(data.sum()), 32), dtype=np.uint8)
    if n and draw(st.booleans()):
        m.addresses[rng.integers(0, n, 2), 3] |= 4
    return m


def write_in_pieces(m: Manifest, cuts: list[int], as_runs: bool) -> bytes:
    """``m`` through a ManifestWriter, cut at ``cuts``: each piece a window, or its runs."""
    out = io.BytesIO()
    w = ManifestWriter(out, m.disk_size, m.block_size, m.address_algorithm)
    edges = sorted({0, m.n_blocks, *(c % (m.n_blocks + 1) for c in cuts)})
    for s, e in zip(edges[:-1], edges[1:]):
        if as_runs:
            for state, a, count, h, ad in m.runs(s, e):
                w.add_run(state, count, h, ad)
        else:
            w.add_window(m.states[s:e], m.hashes[s:e], m.addresses[s:e])
    digest = w.finish(m.meta)
    assert digest == m.digest
    assert w.counts == [m.count(BlockState(i)) for i in range(3)]
    return out.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.lists(st.integers(0, 10_000), max_size=6), st.booleans(),
       st.integers(1, 700), st.data())
def test_writer_and_reader_equal_the_whole_manifest(m, cuts, as_runs, window, data):
    raw = write_in_pieces(m, cuts, as_runs)
    assert Manifest.from_bytes(raw) == m                       # the whole-table reader agrees
    for version, blob in ((3, raw), (3, m.to_bytes()), (2, m._to_bytes_v2()),
                          (1, m._to_bytes_v1())):
        r = ManifestReader(blob, "x")
        assert r.version == version and r.meta == m.meta and r.n_blocks == m.n_blocks
        assert [r.count(BlockState(i)) for i in range(3)] == [m.count(BlockState(i)) for i in range(3)]
        assert r.to_manifest() == m
        for s in range(0, m.n_blocks, window):
            e = min(m.n_blocks, s + window)
            states, hashes, addresses = r.window(s, e)
            assert (states == m.states[s:e]).all() and (hashes == m.hashes[s:e]).all()
            assert (addresses == m.addresses[s:e]).all()
            u = r.uniform(s, e)
            if u is not None:
                assert (m.states[s:e] == u).all() and not m.hashes[s:e].any()
        at = 0
        for state, start, count, h, ad in r.runs():
            assert start == at and (m.states[start:start + count] == state).all()
            if h is None:
                assert not m.hashes[start:start + count].any()
            else:
                assert (h == m.hashes[start:start + count]).all()
                assert (ad == m.addresses[start:start + count]).all()
            at += count
        assert at == m.n_blocks
        if m.n_blocks:
            i = data.draw(st.integers(0, m.n_blocks - 1))
            assert r.entry(i) == (int(m.states[i]), m.hashes[i].tobytes(),
                                  m.addresses[i].tobytes())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.lists(st.integers(0, 10_000), max_size=6),
       st.sampled_from([200, 1000, 5000, 1 << 20]))
def test_windows_write_the_bytes_runs_write(m, cuts, frame_max):
    """add_window (records of a window as one array) writes, byte for byte, what add_run
    writes run by run, also where frames fill up inside a window (small frames here); the
    reader's windows (all of a frame's records at once) read it back across frames."""
    import smsblock.manifest as manifest_module
    saved = manifest_module.FRAME_RAW_MAX
    manifest_module.FRAME_RAW_MAX = frame_max
    try:
        raw = write_in_pieces(m, cuts, False)
        assert raw == write_in_pieces(m, cuts, True)
        # and windows read back across many frames, cut anywhere, are the table's
        r = ManifestReader(raw, "x")
        edges = sorted({0, m.n_blocks, *(c % (m.n_blocks + 1) for c in cuts)})
        for s, e in [*zip(edges[:-1], edges[1:]), (0, m.n_blocks), (1, m.n_blocks + 5)]:
            states, hashes, addresses = r.window(s, e)
            e = min(e, m.n_blocks)
            assert (states == m.states[s:e]).all() and (hashes == m.hashes[s:e]).all()
            assert (addresses == m.addresses[s:e]).all()
    finally:
        manifest_module.FRAME_RAW_MAX = saved


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), layouts(), st.integers(1, 500))
def test_windowed_diff_equals_the_whole_diff(a, b, window):
    want = diff(a, b)
    ra, rb = ManifestReader(a.to_bytes()), ManifestReader(b.to_bytes())
    for old, new in ((ra, rb), (a, rb), (ra, b)):
        got = [idx for *_, idx in iter_diff(old, new, window)]
        assert all(len(idx) <= window for idx in got)       # memory: a window, tails too
        got = np.concatenate(got) if got else np.zeros(0, np.int64)
        assert got.tolist() == want.tolist()
        assert diff_count(old, new) == len(want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_copy_with_new_meta_keeps_every_block(m):
    """copy_manifest (what a publisher uses to add its record to a run): from any
    version, the same blocks, the new meta, and version 3's digest."""
    for blob in (m.to_bytes(), m._to_bytes_v2(), m._to_bytes_v1()):
        out = io.BytesIO()
        digest = copy_manifest(ManifestReader(blob, "x"), out, {"ebs": {"snapshot_id": "snap-1"}})
        copy = ManifestReader(out.getvalue(), "copy")
        assert copy.version == 3 and digest == copy.digest == m.digest
        assert copy.meta == {"ebs": {"snapshot_id": "snap-1"}}
        got = copy.to_manifest()
        got.meta = m.meta
        assert got == m


def test_windowed_diff_refuses_other_block_sizes():
    with pytest.raises(UsageError, match="block sizes"):
        list(iter_diff(Manifest(BS, BS), Manifest(2 * BS, 2 * BS)))


def test_an_empty_window_is_nothing_and_a_window_past_the_disk_is_refused_at_once():
    w = ManifestWriter(io.BytesIO(), 4 * BS, BS, "blake3")
    w.add_window(np.zeros(0, np.uint8))                       # nothing added
    w.add_window(np.full(2, BlockState.ZERO, np.uint8))
    w.add_window(np.zeros(0, np.uint8), np.zeros((0, 16), np.uint8), np.zeros((0, 32), np.uint8))
    with pytest.raises(UsageError, match="outside"):
        w.add_window(np.array([0, 1, 0], np.uint8))           # 3 blocks where 2 are left
    assert w.next_block == 2
    w.add_run(BlockState.UNALLOCATED, 2)
    w.finish()
    m = Manifest(4 * BS, BS, address_algorithm="blake3")
    m.states[:2] = BlockState.ZERO
    assert w.digest == m.digest


def test_a_window_is_clamped_at_block_zero():
    m = Manifest(6 * BS, BS, address_algorithm="blake3")
    m.states[:] = [2, 1, 0, 2, 2, 1]
    m.hashes[m.states == 2] = 7
    m.addresses[m.states == 2] = 9
    r = ManifestReader(m.to_bytes(), "x")
    states, hashes, addresses = r.window(-3, 4)
    assert (states == m.states[:4]).all() and (hashes == m.hashes[:4]).all()


def test_writer_refuses_what_is_not_a_table():
    w = ManifestWriter(io.BytesIO(), 10 * BS, BS)
    with pytest.raises(UsageError, match="without hashes"):
        w.add_run(BlockState.DATA, 2)
    with pytest.raises(UsageError, match="invalid state"):
        w.add_run(7, 2)
    with pytest.raises(UsageError, match="outside"):
        w.add_run(0, 11)
    w.add_run(0, 4)
    with pytest.raises(UsageError, match="4 of its 10 blocks"):
        w.finish({})


def test_writer_on_a_path_is_private_and_refuses_a_planted_link(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    (tmp_path / "m").symlink_to(target)
    with pytest.raises(OSError):
        ManifestWriter(tmp_path / "m", BS, BS)
    assert target.read_bytes() == b"keep"
    w = ManifestWriter(tmp_path / "n", 3 * BS, BS)
    w.add_run(BlockState.ZERO, 3)
    w.finish({"a": 1})
    assert os.stat(tmp_path / "n").st_mode & 0o777 == 0o600
    assert ManifestReader(tmp_path / "n").to_manifest() == Manifest(
        3 * BS, BS, states=np.ones(3, np.uint8), meta={"a": 1})


def reseal(raw: bytes) -> bytes:
    """``raw`` with its trailer checksum made right again (a damage that passes it)."""
    body = raw[:-40]
    return body + b"SMSBEND\0" + hashlib.sha256(body).digest()


@pytest.mark.parametrize("offset, value, message, at", [
    (64 + 9, b"\x01", "reserved frame header bytes are not zero", 64 + 9),
    (64 + 32, b"\x09", "record 0 of the frame: invalid state 9", 64),
    (64 + 32 + 3 * 24 + 5, b"\xff", "digest does not match the blocks", None),
    (64 + 4, b"\xff\xff\x0f\x00", "is not its raw length 1048575", 64),
])
@pytest.mark.parametrize("resealed", [False, True])
def test_a_corrupt_frame_is_one_error_naming_file_and_offset(tmp_path, offset, value, message,
                                                             at, resealed):
    rng = np.random.default_rng(3)
    m = Manifest(300 * BS, BS, address_algorithm="sha256")
    m.states[10:200] = BlockState.DATA          # random entries: the frame is stored as is
    m.hashes[10:200] = rng.integers(0, 256, (190, 16), dtype=np.uint8)
    m.addresses[10:200] = rng.integers(0, 256, (190, 32), dtype=np.uint8)
    raw = bytearray(m.to_bytes())
    assert raw[64 + 8] == 0                     # FRAME_STORED
    raw[offset:offset + len(value)] = value
    raw = reseal(bytes(raw)) if resealed else bytes(raw)
    path = tmp_path / "bad.manifest"
    path.write_bytes(raw)
    for source in (path, raw):
        with pytest.raises(ManifestError) as e:
            ManifestReader(source, str(path))
        text = str(e.value)
        assert text.startswith(f"{path}, offset ") and "\n" not in text
        if not resealed:
            assert "checksum mismatch" in text
        else:
            assert message in text
            if at is not None:
                assert f"offset {at}:" in text
    with pytest.raises(ManifestError, match="checksum mismatch" if not resealed else message):
        Manifest.load(path)


def test_reader_names_a_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="cannot read"):
        ManifestReader(tmp_path / "nope")


# -- the windowed scan -------------------------------------------------------------

def reference_table(raw: bytes, disk_size: int, allocated: list[tuple[int, int]]):
    """States and hashes a scan must give, from the bytes and the allocated ranges."""
    n = -(-disk_size // BS)
    states = np.zeros(n, np.uint8)
    hashes = np.zeros((n, 16), np.uint8)
    touched = np.zeros(n, bool)
    for off, length in allocated:
        touched[off // BS:(off + length - 1) // BS + 1] = True
    for i in np.flatnonzero(touched):
        block = raw[i * BS:min((i + 1) * BS, disk_size)]
        if block.count(0) == len(block):
            states[i] = BlockState.ZERO
        else:
            states[i] = BlockState.DATA
            hashes[i] = np.frombuffer(xxhash.xxh3_128_digest(block), np.uint8)
    return states, hashes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 399), st.integers(1, 3), st.booleans()), max_size=12),
       st.integers(1, 40), st.integers(1, 3), st.data())
def test_windowed_scan_equals_the_whole_scan(tmp_path, spots, window, threads, data):
    size = 400 * BS - 123
    path = tmp_path / f"d{len(spots)}-{window}-{threads}.raw"
    rng = np.random.default_rng(len(spots) * 7 + window)
    allocated = []
    with open(path, "wb") as f:
        f.truncate(size)
        for block, count, zeros in spots:
            off = block * BS + 4096
            length = min(count * BS, size - off)
            if length <= 0:
                continue
            f.seek(off)
            f.write(bytes(length) if zeros else rng.integers(0, 256, length, np.uint8).tobytes())
            allocated.append((off, length))
    raw = path.read_bytes()
    # what the filesystem reports allocated (4 KiB pages it wrote) is what a scan reads
    with open_disk(path) as disk:
        allocated = [(e.offset, e.length) for e in disk.extents() if e.is_data]
        states, hashes = reference_table(raw, size, allocated)
        seen = []
        stream = scan_stream(disk, block_size=BS, threads=threads, window_blocks=window,
                             on_changed=lambda w, k, v: seen.append(w.start + k))
        got_s = np.zeros_like(states)
        got_h = np.zeros_like(hashes)
        at = 0
        lasts = []
        for seg in stream:
            assert seg.start == at and seg.end > seg.start
            if isinstance(seg, Gap):
                assert not seg.carry
            else:
                assert seg.end - seg.start <= window
                got_s[seg.start:seg.end] = seg.states
                got_h[seg.start:seg.end] = seg.hashes
                # the scan reads nothing after its last window (the engine seals then)
                lasts.append(seg.last)
                assert len(seen) == len(set(seen)) and (not seg.last or sorted(seen) ==
                        np.flatnonzero(states == BlockState.DATA).tolist())
            at = seg.end
        assert at == len(states)
        assert lasts == [False] * (len(lasts) - 1) + [True] * bool(lasts)
        assert (got_s == states).all() and (got_h == hashes).all()
        assert sorted(seen) == np.flatnonzero(states == BlockState.DATA).tolist()
        whole = scan(disk, block_size=BS)
        assert (whole.states == states).all() and (whole.hashes == hashes).all()
        # a change-list scan in windows keeps the blocks outside the list
        if len(states) and data.draw(st.booleans()):
            first = data.draw(st.integers(0, len(states) - 1))
            extents = [(first * BS, BS)]
            runs = check_changed_extents(extents, size, BS)
            prev = Manifest(size, BS, states=np.full(len(states), 1, np.uint8))
            m = scan(disk, block_size=BS, previous=prev, changed_runs=runs)
            expect = np.ones_like(states)
            expect[first] = states[first]
            assert (m.states == expect).all()


def test_scan_stream_memory_does_not_follow_a_sparse_disk(tmp_path):
    """A 1 TiB sparse file with a few blocks: the stream yields gaps for the empty
    ranges, windows only around the data, and none bigger than asked."""
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 40)
        for off in (0, 300 << 30, (1 << 40) - BS):
            f.seek(off)
            f.write(b"\x01" * BS)
    with open_disk(path) as disk:
        segs = list(scan_stream(disk, block_size=512 * KIB))
    windows = [s for s in segs if not isinstance(s, Gap)]
    assert sum(s.end - s.start for s in segs) == (1 << 40) // (512 * KIB)
    assert len(windows) == 3 and all(w.end - w.start <= 1 for w in windows)
