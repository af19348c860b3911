"""The on-disk block index (smsblock/blockindex.py): against a dict built from the same
entries, on real stores (a second writer process, prune, S3), damaged files and a
writer killed in the middle of a merge."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_fixtures import *  # noqa: F401,F403  (fixtures)
from cloud_fixtures import FAST
from smsblock import blockindex as B
from smsblock.engine import prune, replicate, restore
from smsblock.manifest import BlockState
from smsblock.pack import INDEX_DTYPE, BlockIndex, sealed_size
from smsblock.store import LocalStore, StoreConfig
from smsblock.store.base import DamageRecord

ROOT = Path(__file__).resolve().parent.parent
BS = 64 << 10


def make_pack(addresses: list[bytes]) -> np.ndarray:
    """A pack index of these addresses (frames back to back after the header)."""
    idx = np.zeros(len(addresses), INDEX_DTYPE)
    off = 16
    for i, a in enumerate(addresses):
        clen = 100 + (a[31] % 50)
        idx[i] = (np.frombuffer(a, np.uint8), off, clen, 4096)
        off += clen
    return idx


def pack_id(index: np.ndarray) -> str:
    return hashlib.sha256(index.tobytes()).hexdigest()


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny fence blocks, segments and merge buffers: every boundary case in a few
    hundred entries."""
    monkeypatch.setattr(B, "FENCE_EVERY", 4)
    monkeypatch.setattr(B, "WINDOW", 6)
    monkeypatch.setattr(B, "MAX_SEGMENTS", 2)
    monkeypatch.setattr(B, "BUILD_CHUNK", 16)
    monkeypatch.setattr(B, "MERGE_BUDGET", 8)
    monkeypatch.setattr(B, "MERGE_MIN", 3)
    monkeypatch.setattr(B, "LOOKUP_CHUNK", 5)


# --- against the Python meaning ----------------------------------------------------------

KEYS = [b"\x00" * 8, b"\x7f" + b"\xff" * 7, b"\xff" * 8, b"\x12\x34\x56\x78\x9a\xbc\xde\xf0"]

address = st.one_of(
    st.binary(min_size=32, max_size=32),
    # a shared first 8 bytes (the key): collisions inside fence blocks and across them
    st.tuples(st.sampled_from(KEYS), st.binary(min_size=24, max_size=24)).map(lambda t: t[0] + t[1]))

op = st.one_of(
    st.tuples(st.just("add"), st.lists(address, min_size=1, max_size=40, unique=True),
              st.integers(0, 8)),                       # + copies of existing addresses
    st.tuples(st.just("remove"), st.integers(0, 100)),
    st.tuples(st.just("cut"), st.integers(0, 100)),     # listed with another size
    st.tuples(st.just("damage"), st.integers(0, 100), st.booleans()),
    st.tuples(st.just("undamage"), st.integers(0, 100)),
    st.tuples(st.just("reopen"),))


def expected(address: bytes, packs, listed, damage, for_new_runs):
    """``(good, usable)``: locations (pack id, offset) a lookup may answer with."""
    good, usable = set(), set()
    for pid, index in packs.items():
        if listed.get(pid) != sealed_size(index):
            continue
        record = damage.get(pid)
        if record is not None and address in record.addresses:
            continue
        for e in index[(index["address"] == np.frombuffer(address, np.uint8)).all(axis=1)]:
            loc = (pid, int(e["offset"]))
            if record is not None and record.pack:
                if not for_new_runs:
                    usable.add(loc)
            else:
                good.add(loc)
                usable.add(loc)
    return good, usable


def check_view(view, packs, listed, damage, for_new_runs, probes):
    arr = np.array([np.frombuffer(a, np.uint8) for a in probes], np.uint8).reshape(-1, 32)
    found, pids, offset, clen, ulen = view.locate_many(arr)
    assert list(view.contains_all(arr)) == list(found)
    n_entries = 0
    for pid, index in packs.items():
        record = damage.get(pid)
        if listed.get(pid) == sealed_size(index) and not (record and record.pack and for_new_runs):
            n_entries += len(index) - (len(record.addresses) if record else 0)
    assert len(view) == n_entries
    for i, a in enumerate(probes):
        good, usable = expected(a, packs, listed, damage, for_new_runs)
        loc = view.get(a)
        want = good or usable
        got = None if loc is None else (loc.pack_id, loc.offset)
        assert (got is None) == (not want), (a.hex(), got, want)
        if got is not None:
            assert got in want
            e = packs[loc.pack_id][packs[loc.pack_id]["offset"] == loc.offset][0]
            assert (loc.clen, loc.ulen) == (int(e["clen"]), int(e["ulen"]))
            assert e["address"].tobytes() == a
        assert bool(found[i]) == (got is not None)
        if found[i]:
            assert (pids[i], int(offset[i])) in want
        assert (a in view) == (got is not None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=12), for_new_runs=st.booleans(),
       misses=st.lists(address, max_size=8))
def test_lookups_match_a_dict_through_adds_removes_and_merges(small_blocks, ops, for_new_runs, misses):
    """Random sequences of packs added, removed (prune), cut short, damaged and merged
    (tiny segments merge all the time), looked up one by one and in batches."""
    with tempfile.TemporaryDirectory() as tmp:
        di = B.DiskIndex(tmp)
        packs: dict[str, np.ndarray] = {}     # every pack ever made
        listed: dict[str, int] = {}
        damage: dict[str, DamageRecord] = {}
        seen: list[bytes] = []

        def read(pid, size):
            return packs[pid] if sealed_size(packs[pid]) == size else None

        for o in ops:
            ids = sorted(listed)
            if o[0] == "add":
                extra = [seen[(len(seen) * 7 + k) % len(seen)] for k in range(o[2])] if seen else []
                addrs = list(dict.fromkeys(o[1] + extra))
                index = make_pack(addrs)
                pid = pack_id(index)
                packs[pid] = index
                listed[pid] = sealed_size(index)
                seen += addrs
            elif o[0] in ("remove", "cut") and ids:
                pid = ids[o[1] % len(ids)]
                if o[0] == "remove":
                    del listed[pid]
                else:
                    listed[pid] -= 1
            elif o[0] == "damage" and ids:
                pid = ids[o[1] % len(ids)]
                addrs = [e.tobytes() for e in packs[pid]["address"][::3]]
                damage[pid] = DamageRecord(pid, set(addrs), o[2])
            elif o[0] == "undamage" and damage:
                damage.pop(sorted(damage)[o[1] % len(damage)])
            elif o[0] == "reopen":
                di = B.DiskIndex(tmp)       # another process: everything read from the files
            segs, lacking = di.sync(listed, read)
            assert lacking == []
            assert len(segs) <= B.MAX_SEGMENTS + 1
            view = BlockIndex._view(segs, listed, damage, for_new_runs)
            check_view(view, packs, listed, damage, for_new_runs, seen + misses)
        # a merge keeps exactly the packs listed with their size, each once
        dfd = os.open(tmp, os.O_RDONLY)
        try:
            merged = B.merge_segments(dfd, tmp, list(di.segments.values()), B._pack_keys(listed))
        finally:
            os.close(dfd)
        kept = sorted(merged.pack_hex(r) for r in range(merged.n_packs)) if merged else []
        assert kept == sorted(p for p in listed if listed[p] == sealed_size(packs[p]))
        assert (merged.n if merged else 0) == sum(len(packs[p]) for p in kept)


def test_block_index_of_a_dict_and_added_packs():
    """``BlockIndex(packs)`` (what verify builds from the packs it checked) and ``add``."""
    rng = np.random.default_rng(1)
    a = [rng.bytes(32) for _ in range(300)]
    p1, p2 = make_pack(a[:200]), make_pack(a[150:250])
    bi = BlockIndex({pack_id(p1): p1, pack_id(p2): p2})
    assert len(bi) == 300
    assert all(x in bi for x in a[:250]) and not any(x in bi for x in a[250:])
    assert sorted(bi.pack_ids) == sorted([pack_id(p1), pack_id(p2)])
    p3 = make_pack(a[250:])
    bi.add(pack_id(p3), p3)
    arr = np.frombuffer(b"".join(a), np.uint8).reshape(-1, 32)
    found, pids, offset, clen, ulen = bi.locate_many(arr)
    assert found.all() and pids[299] == pack_id(p3) and int(offset[299]) == int(p3["offset"][-1])
    folder = bi._tmp.peek()[2][0]
    assert os.path.isdir(folder) and stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    bi.close()
    assert not os.path.exists(folder)
    empty = BlockIndex()
    assert len(empty) == 0 and empty.get(a[0]) is None and not empty.contains_all(arr).any()


# --- real stores --------------------------------------------------------------------------

def make_disk(path: Path, seed: int, blocks: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 16, blocks * BS, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def oracle(store) -> dict[bytes, set[str]]:
    """address -> packs holding it, from every listed pack's own index."""
    out: dict[bytes, set[str]] = {}
    for pid, size in store.list_packs().items():
        for e in store.pack_index(pid, size):
            out.setdefault(e["address"].tobytes(), set()).add(pid)
    return out


def run_addresses(store) -> set[bytes]:
    out = set()
    for sid, rid in store.iter_manifests():
        m = store.load_manifest(sid, rid)
        out |= {a.tobytes() for a in m.addresses[m.states == BlockState.DATA]}
    return out


def check_store_index(store, probes):
    want = oracle(store)
    index = store.block_index()
    arr = np.array([np.frombuffer(a, np.uint8) for a in probes], np.uint8).reshape(-1, 32)
    found, pids, *_ = index.locate_many(arr)
    for i, a in enumerate(probes):
        assert bool(found[i]) == (a in want)
        if found[i]:
            assert pids[i] in want[a]
            assert index.get(a).pack_id in want[a]
    assert len(index) == sum(len(v) for v in want.values())


def test_added_packs_are_found_and_spare_the_next_sync_its_reads(tmp_path):
    """``DiskIndex.add_packs`` (a run's pack writer, from the indexes it holds): the
    packs become one segment that lookups find; a second add, or a sync listing them,
    reads and writes nothing; a damaged CURRENT is left for sync to rebuild."""
    rng = np.random.default_rng(4)
    a = [rng.bytes(32) for _ in range(120)]
    p1, p2, p3 = make_pack(a[:50]), make_pack(a[40:90]), make_pack(a[90:])
    packs = {pack_id(p): (sealed_size(p), p) for p in (p1, p2)}
    listed = {pid: size for pid, (size, _p) in packs.items()}
    di = B.DiskIndex(str(tmp_path / "ix"))
    reads = []

    def read(pid, size):
        reads.append(pid)
        return {pack_id(p3): p3}[pid]
    assert di.sync({}, read) == ([], [])
    assert di.add_packs(packs)
    assert len(di.segments) == 1
    assert not di.add_packs(packs)
    segs, lacking = di.sync(listed, read)
    assert reads == [] and not lacking and len(segs) == 1
    check_view(BlockIndex._view(segs, listed, {}, True), {pid: p for pid, (_s, p) in packs.items()},
               listed, {}, True, a + [rng.bytes(32)])
    # a pack the add did not bring is indexed from the listing, as before
    listed3 = {**listed, pack_id(p3): sealed_size(p3)}
    segs, _ = di.sync(listed3, read)
    assert reads == [pack_id(p3)]
    check_view(BlockIndex._view(segs, listed3, {}, False),
               {pack_id(p): p for p in (p1, p2, p3)}, listed3, {}, False, a)
    # a damaged CURRENT: nothing added, the next sync rebuilds from the packs
    (tmp_path / "ix" / "CURRENT").write_bytes(b"{not json")
    p4 = make_pack([rng.bytes(32)])
    assert not di.add_packs({pack_id(p4): (sealed_size(p4), p4)})
    assert (tmp_path / "ix" / "CURRENT").read_bytes() == b"{not json"


def test_a_run_puts_its_packs_in_the_index_only_while_it_is_open(tmp_path, monkeypatch):
    """The run that puts packs adds them to the store's index (the next run starts with
    nothing to read); without an open index in the process, nothing is opened for it."""
    from smsblock.repository.repository import Repository
    store = LocalStore(tmp_path / "store")
    store.initialise(StoreConfig(pack_size=256 << 10))
    make_disk(tmp_path / "d.raw", 1)
    replicate(tmp_path / "d.raw", store, "s", block_size=BS)
    B.DiskIndex._open.clear()           # as a new process
    reads = []
    real = Repository.pack_index
    monkeypatch.setattr(Repository, "pack_index",
                        lambda self, pid, size: reads.append(pid) or real(self, pid, size))
    view = store.block_index(for_new_runs=True)
    assert reads == [] and len(view) == len(oracle(store)) > 0
    reads.clear()
    check_store_index(store, sorted(run_addresses(store)))
    # nothing open for this store in the process: the add is skipped, not paid for
    view.close()
    del view
    B.DiskIndex._open.clear()
    p = make_pack([b"\x01" * 32])
    before = sorted(os.listdir(tmp_path / "store" / "index"))
    assert not B.index_new_packs(store, {pack_id(p): (sealed_size(p), p)})
    assert sorted(os.listdir(tmp_path / "store" / "index")) == before


def child_replicate(store: Path, disk: Path, server: str) -> subprocess.Popen:
    code = (f"from smsblock.engine import replicate; "
            f"replicate({str(disk)!r}, {str(store)!r}, {server!r}, block_size={BS})")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_store_index_follows_writers_and_prune(tmp_path):
    """A second writer process adds packs, two writers run at once, prune deletes packs:
    every lookup matches the packs' own indexes, and restores read through it."""
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    store.initialise(StoreConfig(pack_size=256 << 10))
    disks = {s: tmp_path / f"{s}.raw" for s in ("a", "b", "c", "d")}
    content = {s: make_disk(d, i) for i, (s, d) in enumerate(disks.items())}
    replicate(disks["a"], store, "a", block_size=BS)
    first = store.block_index()
    assert len(first) > 0
    assert child_replicate(store_dir, disks["b"], "b").wait(60) == 0
    # two writers at once, each syncing the index as it starts
    both = [child_replicate(store_dir, disks["c"], "c"), child_replicate(store_dir, disks["d"], "d")]
    assert [p.wait(60) for p in both] == [0, 0]
    content["a"] = make_disk(disks["a"], 9)
    replicate(disks["a"], store, "a", block_size=BS)
    stale = {a.tobytes() for a in np.random.default_rng(3).integers(0, 256, (20, 32), np.uint8)}
    probes = sorted(run_addresses(store) | stale)
    check_store_index(store, probes)
    # the view taken before the other writers still answers for what it knew
    m = store.load_manifest("a", store.list_run_ids("a")[0])
    assert first.contains_all(m.addresses[m.states == BlockState.DATA]).all()
    before = set(oracle(store))
    report = prune(store, "a", keep=1)
    assert report.runs_deleted
    gone = before - set(oracle(store))
    assert gone, "prune freed blocks"
    check_store_index(store, probes)
    assert not store.block_index().contains_all(
        np.array([np.frombuffer(a, np.uint8) for a in gone])).any()
    for s in ("a", "b", "c", "d"):
        restore(store, s, tmp_path / f"{s}.out")
        assert (tmp_path / f"{s}.out").read_bytes() == content[s]
    # files: owner-only, in the store
    folder = store_dir / "index"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    names = sorted(os.listdir(folder))
    assert "CURRENT" in names and "lock" in names and any(n.endswith(".sbi") for n in names)
    assert all(stat.S_IMODE((folder / n).stat().st_mode) == 0o600 for n in names)
    assert not [n for n in names if n.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "current", "missing",
                                    # what a machine crash leaves of files never fsynced
                                    "zeros", "empty", "current-empty", "current-zeros"])
def test_a_damaged_index_file_is_rebuilt_from_the_packs(tmp_path, caplog, damage):
    store = LocalStore(tmp_path / "store")
    store.initialise(StoreConfig(pack_size=256 << 10))
    make_disk(tmp_path / "d.raw", 1)
    replicate(tmp_path / "d.raw", store, "s", block_size=BS)
    probes = sorted(run_addresses(store))
    check_store_index(store, probes)
    folder = tmp_path / "store" / "index"
    seg = next(p for p in folder.iterdir() if p.name.endswith(".sbi"))
    raw = bytearray(seg.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10       # inside the records: only the checksum tells
        seg.write_bytes(raw)
    elif damage == "truncate":
        seg.write_bytes(raw[:-7])
    elif damage == "extend":
        seg.write_bytes(raw + b"\0")
    elif damage == "current":
        (folder / "CURRENT").write_bytes(b"{not json")
    elif damage == "zeros":
        seg.write_bytes(bytes(len(raw)))
    elif damage == "empty":
        seg.write_bytes(b"")
    elif damage == "current-empty":
        (folder / "CURRENT").write_bytes(b"")
    elif damage == "current-zeros":
        (folder / "CURRENT").write_bytes(bytes(len((folder / "CURRENT").read_bytes())))
    else:
        seg.unlink()
    B.DiskIndex._open.clear()           # as a new process
    with caplog.at_level(logging.WARNING, logger="smsblock.blockindex"):
        check_store_index(store, probes)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "rebuilding" in warnings[0], warnings
    on_current = damage.startswith("current")
    assert ("CURRENT" if on_current else seg.name) in warnings[0]
    assert not seg.exists() or on_current
    B.DiskIndex._open.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smsblock.blockindex"):
        check_store_index(store, probes)
    assert not caplog.records, "rebuilt once, sound since"


def test_the_index_costs_a_run_no_fsync(tmp_path, monkeypatch):
    """The index is a cache of the packs: a run's update of it (a new segment, CURRENT,
    a merge) fsyncs nothing; what a crash can leave of it is rebuilt (the test above)."""
    store = LocalStore(tmp_path / "store")
    store.initialise(StoreConfig(pack_size=256 << 10))
    make_disk(tmp_path / "d.raw", 1)
    replicate(tmp_path / "d.raw", store, "s", block_size=BS)
    folder = os.path.realpath(tmp_path / "store" / "index")
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(B, "MAX_SEGMENTS", 1)           # every run merges too
    for seed in (2, 3):
        make_disk(tmp_path / "d.raw", seed)
        replicate(tmp_path / "d.raw", store, "s", block_size=BS)
    assert synced, "the run's packs and manifest are fsynced"
    assert not [p for p in synced if p == folder or p.startswith(folder + "/")], synced
    B.DiskIndex._open.clear()
    check_store_index(store, sorted(run_addresses(store)))


def test_a_full_disk_leaves_lookups_right(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    store.initialise(StoreConfig(pack_size=256 << 10))
    make_disk(tmp_path / "d.raw", 1)
    replicate(tmp_path / "d.raw", store, "s", block_size=BS)
    probes = sorted(run_addresses(store))
    # a full disk: the index cannot be written, the run goes on from memory
    folder = tmp_path / "store" / "index"
    for p in folder.iterdir():
        if p.name.endswith(".sbi"):
            p.unlink()
    (folder / "CURRENT").unlink(missing_ok=True)
    B.DiskIndex._open.clear()

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(B.SegmentWriter, "__init__", no_space)
        check_store_index(store, probes)
    assert any("cannot update the block index" in r.getMessage() for r in caplog.records)


MERGE_CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from smsblock import blockindex as B
    from smsblock.pack import INDEX_DTYPE, sealed_size
    folder, mode = sys.argv[1], sys.argv[2]
    packs = {}
    rng = np.random.default_rng(5)
    for i in range(12):
        idx = np.zeros(40000, INDEX_DTYPE)
        idx["address"] = rng.integers(0, 256, (len(idx), 32), dtype=np.uint8)
        idx["offset"] = 16 + np.arange(len(idx)) * 100
        idx["clen"] = 100
        idx["ulen"] = 4096
        packs[f"{i:064x}"] = idx
    listed = {p: sealed_size(i) for p, i in packs.items()}
    B.MAX_SEGMENTS = 100            # build many segments first: 12 opens, a pack each
    di = B.DiskIndex(folder)
    for n in range(1, 13):
        di.sync(dict(list(listed.items())[:n]), lambda p, s: packs[p])
    print("built", flush=True)
    B.MAX_SEGMENTS = 2
    B.MERGE_BUDGET = 4096           # a slow, many-step merge
    sys.stdin.readline()
    di = B.DiskIndex(folder)            # as a new process: reads the files
    if mode == "publish":
        def hook():
            print("merged", flush=True)
            time.sleep(60)
        di.before_publish = hook
    di.sync(listed, lambda p, s: packs[p])
    print("done", flush=True)
""")


@pytest.mark.parametrize("mode", ["writing", "publish"])
def test_a_writer_killed_mid_merge_leaves_a_usable_index(tmp_path, mode):
    """kill -9 while the merged segment is being written, and after it is written but
    before CURRENT names it: the next open uses the old segments, then tidies up."""
    folder = tmp_path / "index"
    child = subprocess.Popen([sys.executable, "-c", MERGE_CHILD, str(folder), mode],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "built"
        segments_before = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sbi"))
        assert len(segments_before) == 12
        child.stdin.write("go\n")
        child.stdin.flush()
        if mode == "publish":
            assert child.stdout.readline().strip() == "merged"
        else:
            deadline = time.monotonic() + 30
            while not any(p.name.endswith(".tmp") and p.stat().st_size > 1 << 20
                          for p in folder.iterdir()):
                assert time.monotonic() < deadline and child.poll() is None
                time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    left = sorted(p.name for p in folder.iterdir())
    assert any(n.endswith(".tmp") for n in left) or len([n for n in left if n.endswith(".sbi")]) == 13
    # a reader (shared lock) sees the old, complete index
    rng = np.random.default_rng(5)
    packs = {}
    for i in range(12):
        idx = np.zeros(40000, INDEX_DTYPE)
        idx["address"] = rng.integers(0, 256, (len(idx), 32), dtype=np.uint8)
        idx["offset"] = 16 + np.arange(len(idx)) * 100
        idx["clen"] = 100
        idx["ulen"] = 4096
        packs[f"{i:064x}"] = idx
    listed = {p: sealed_size(i) for p, i in packs.items()}
    di = B.DiskIndex(str(folder))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "MAX_SEGMENTS", 100)
        segs, lacking = di.sync(listed, lambda p, s: pytest.fail("no pack is read again"))
    assert lacking == [] and sorted(s.name for s in segs) == segments_before
    view = BlockIndex._view(segs, listed, {}, False)
    probe = np.concatenate([packs[p]["address"][::997] for p in packs])
    assert view.contains_all(probe).all()
    # the next writer merges and removes what the killed one left
    segs, _ = B.DiskIndex(str(folder)).sync(listed, lambda p, s: pytest.fail("no pack is read again"))
    assert len(segs) <= B.MAX_SEGMENTS
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".sbi")) == sorted(s.name for s in segs)
    view = BlockIndex._view(segs, listed, {}, False)
    assert view.contains_all(probe).all() and len(view) == 12 * 40000


# --- S3: the index lives in the local cache --------------------------------------------------

def test_a_second_run_against_s3_reads_no_pack_index(tmp_path, moto, bucket, fault_proxy):
    from smsblock.store.s3 import S3Store
    url = f"s3://{bucket}/bi"
    store = S3Store(url, **FAST, endpoint_url=fault_proxy.url)
    store.initialise(StoreConfig(pack_size=256 << 10))
    disk = tmp_path / "d.raw"
    make_disk(disk, 4)
    replicate(disk, store, "s", block_size=BS)
    packs = store.list_packs()
    assert len(packs) > 2
    # a first open indexes the packs; then even without the per-pack index cache, a
    # new process lists the packs and reads none of them
    B.DiskIndex._open.clear()
    store.block_index()
    cache = Path(store.index_cache_dir)
    for p in cache.glob("*/*.idx"):
        p.unlink()
    assert (cache / "blocks" / "CURRENT").exists()
    fault_proxy.clear()
    B.DiskIndex._open.clear()
    second = S3Store(url, **FAST, endpoint_url=fault_proxy.url)
    make_disk(disk, 5)
    summary = replicate(disk, second, "s", block_size=BS)
    assert summary.blocks_stored > 0
    assert fault_proxy.requests("GET", r"list-type=2|prefix="), "the packs were listed"
    assert not fault_proxy.requests("GET", r"/packs/"), "no pack (index) was read"
    check_store_index(S3Store(url, **FAST, endpoint_url=fault_proxy.url), sorted(run_addresses(second)))


def test_a_link_planted_at_the_index_folder_is_refused(tmp_path):
    from smsblock.errors import StoreError
    store = LocalStore(tmp_path / "store")
    store.initialise(StoreConfig(pack_size=256 << 10))
    make_disk(tmp_path / "d.raw", 1)
    replicate(tmp_path / "d.raw", store, "s", block_size=BS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    index = tmp_path / "store" / "index"
    for p in index.iterdir():
        p.unlink()
    index.rmdir()
    index.symlink_to(elsewhere)
    B.DiskIndex._open.clear()
    with pytest.raises(StoreError, match="symbolic link"):
        store.block_index()
    assert list(elsewhere.iterdir()) == []


def test_an_index_is_never_made_for_a_store_that_is_not_there(tmp_path):
    from smsblock.errors import StoreError
    store = LocalStore(tmp_path / "nothing")
    with pytest.raises(StoreError):
        store.block_index()
    assert not (tmp_path / "nothing").exists()


#: pack(i): the index of a pack of 500 random entries made from its number, the same in
#: the writers below and in the test that checks what they left
PACK_OF_NUMBER = textwrap.dedent("""
    import numpy as np
    from smsblock.pack import INDEX_DTYPE
    def pack(i):
        rng = np.random.default_rng(i)
        idx = np.zeros(500, INDEX_DTYPE)
        idx["address"] = rng.integers(0, 256, (500, 32), dtype=np.uint8)
        idx["offset"] = 16 + np.arange(500) * 10
        idx["clen"] = 10
        idx["ulen"] = 4096
        return idx
""")

WRITER_CHILD = PACK_OF_NUMBER + textwrap.dedent("""
    import sys
    from smsblock import blockindex as B
    from smsblock.pack import sealed_size
    folder, me = sys.argv[1], int(sys.argv[2])
    B.MAX_SEGMENTS = 2              # merges all the time, racing the other writers
    size = sealed_size(pack(0))
    mine = [me * 100 + k for k in range(12)]
    others = [i for i in range(400) if i // 100 != me and i % 100 < 12]
    for step in range(1, 13):
        # my packs so far, plus whatever the others may have added (a listing later in time)
        listed = {f"{i:064x}": size for i in mine[:step] + others[:step * 3]}
        segs, lacking = B.DiskIndex(folder).sync(listed, lambda p, s: pack(int(p, 16)))
        view = B.BlockIndex._view(segs, listed, {}, False)
        assert not lacking
        probe = np.concatenate([pack(i)["address"][::50] for i in mine[:step]])
        assert view.contains_all(probe).all(), "a pack of mine is missing"
    print("ok", flush=True)
""")


def test_writers_adding_packs_at_once_keep_the_index_whole(tmp_path):
    """Four processes add packs and merge at the same time, each with its own listing:
    each always finds its own packs, and the index ends holding every pack once."""
    folder = tmp_path / "index"
    kids = [subprocess.Popen([sys.executable, "-c", WRITER_CHILD, str(folder), str(me)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}) for me in range(4)]
    outs = [k.communicate(timeout=120)[0] for k in kids]
    assert [k.returncode for k in kids] == [0] * 4 and all(o.strip() == "ok" for o in outs)
    every = [me * 100 + k for me in range(4) for k in range(12)]
    made: dict = {}
    exec(PACK_OF_NUMBER, made)
    pack = made["pack"]
    listed = {f"{i:064x}": sealed_size(pack(0)) for i in every}
    segs, _ = B.DiskIndex(str(folder)).sync(listed, lambda p, s: pack(int(p, 16)))
    view = BlockIndex._view(segs, listed, {}, False)
    assert len(view) == 48 * 500
    probe = np.concatenate([pack(i)["address"] for i in every])
    found, pids, offset, _, _ = view.locate_many(probe)
    assert found.all()
    assert pids == [f"{i:064x}" for i in every for _ in range(500)]
    assert (offset == np.tile(16 + np.arange(500) * 10, 48)).all()
