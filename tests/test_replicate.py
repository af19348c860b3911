"""Replication runs end to end: properties over random disks and change sets, restore,
verify, prune, cancellation, progress and the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import smsblock
from smsblock.errors import Cancelled, RunNotFoundError, StoreLockedError, UsageError
from smsblock.manifest import BlockState, diff
from smsblock.progress import CancelToken
from smsblock.engine import new_run_id, prune, replicate, restore, verify
from smsblock.store import StoreConfig, open_store

from conftest import qemu_img

BS = 64 * 1024          # the smallest block size keeps disks tiny


def pattern(seed: int, length: int) -> bytes:
    """Deterministic, partly compressible block content for a pattern id (>= 1)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 16, length, dtype=np.uint8).tobytes()


def write_disk(path, blocks: list, size: int) -> bytes:
    """Write a sparse raw disk: per block None = hole, 0 = written zeros, k = pattern k.
    Returns the disk's bytes as a reader must see them."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for i, b in enumerate(blocks):
            off = i * BS
            length = min(BS, size - off)
            if b is None:
                continue
            data = bytes(length) if b == 0 else pattern(b, length)
            f.seek(off)
            f.write(data)
            content[off:off + length] = data
    return bytes(content)


def new_store(path, pack_size=256 * 1024, address="sha256"):
    store = open_store(path)
    store.initialise(StoreConfig(pack_size=pack_size, address=address))
    return store


def stored_addresses(store) -> set[bytes]:
    return {bytes(e["address"]) for pid, size in store.list_packs().items()
            for e in store.pack_index(pid, size)}


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def blocks_of(content: bytes) -> list[bytes]:
    return [content[o:o + BS] for o in range(0, len(content), BS)]


block_kind = st.one_of(st.none(), st.just(0), st.integers(1, 6))


@st.composite
def disk_history(draw):
    n = draw(st.integers(1, 10))
    tail = draw(st.sampled_from([0, 4096, 30000]))   # a short last block sometimes
    size = n * BS - (BS - tail if tail else 0)
    first = draw(st.lists(block_kind, min_size=n, max_size=n))
    changes = draw(st.lists(st.dictionaries(st.integers(0, n - 1), block_kind, max_size=n),
                            min_size=0, max_size=3))
    return size, first, changes


@settings(max_examples=20)
@given(history=disk_history())
def test_every_run_restores_and_stores_exactly_the_new_changed_blocks(tmp_path_factory, history):
    size, blocks, changes = history
    tmp = tmp_path_factory.mktemp("prop")
    store = new_store(tmp / "store")
    disk_path = tmp / "disk.raw"
    snapshots = []      # (run_id, bytes)
    previous = None
    for step in range(len(changes) + 1):
        if step:
            for i, kind in changes[step - 1].items():
                blocks[i] = kind
        content = write_disk(disk_path, blocks, size)
        before = stored_addresses(store) if store.exists() else set()
        s = replicate(disk_path, store, "srv-a", block_size=BS)
        # stored = the distinct addresses of changed data blocks the store did not hold
        new_blocks = blocks_of(content)
        old_blocks = blocks_of(previous) if previous is not None else [None] * len(new_blocks)
        expected = {sha(b) for i, b in enumerate(new_blocks)
                    if blocks[i] not in (None, 0) and b != old_blocks[i]} - before
        assert s.blocks_stored == len(expected)
        assert stored_addresses(store) == before | expected
        m = store.load_manifest("srv-a", s.run_id)
        assert s.blocks_total == m.n_blocks == len(new_blocks)
        assert s.blocks_data == sum(1 for b in blocks if b not in (None, 0))
        assert s.blocks_zero + s.blocks_unallocated + s.blocks_data == s.blocks_total
        for i, b in enumerate(new_blocks):
            if m.states[i] == BlockState.DATA:
                assert m.addresses[i].tobytes() == sha(b)
            else:
                assert b == bytes(len(b)) and not m.addresses[i].any()
        if step:
            prev_m = store.load_manifest("srv-a", snapshots[-1][0])
            assert s.blocks_changed == len(diff(prev_m, m))
        snapshots.append((s.run_id, content))
        previous = content

    assert [r.run_id for r in store.runs("srv-a")] == [rid for rid, _ in snapshots]
    for run_id, content in snapshots:
        out = tmp / f"{run_id}.raw"
        restore(store, "srv-a", out, run_id=run_id)
        assert out.read_bytes() == content
        with store.run_disk("srv-a", run_id) as d:
            assert d.read(0, size) == content
    assert verify(store).ok

    # another server with the same disk stores nothing new: dedup across servers
    s = replicate(disk_path, store, "srv-b", block_size=BS)
    assert s.blocks_stored == 0
    restore(store, "srv-b", tmp / "b.raw")
    assert (tmp / "b.raw").read_bytes() == snapshots[-1][1]


@settings(max_examples=10)
@given(history=disk_history(), keep=st.integers(0, 3))
def test_prune_keeps_what_kept_runs_need_and_drops_the_rest(tmp_path_factory, history, keep):
    size, blocks, changes = history
    tmp = tmp_path_factory.mktemp("prune")
    store = new_store(tmp / "store", pack_size=100_000)
    disk_path = tmp / "disk.raw"
    runs = []
    for step in range(len(changes) + 1):
        if step:
            for i, kind in changes[step - 1].items():
                blocks[i] = kind
        content = write_disk(disk_path, blocks, size)
        runs.append((replicate(disk_path, store, "a", block_size=BS).run_id, content))
    other = write_disk(tmp / "other.raw", [7, 1, None], 3 * BS)
    replicate(tmp / "other.raw", store, "b", block_size=BS)

    report = prune(store, "a", keep)
    kept = runs[max(0, len(runs) - keep):] if keep else []
    assert [r.run_id for r in store.runs("a")] == [rid for rid, _ in kept]
    assert report.runs_deleted == [rid for rid, _ in runs[:len(runs) - len(kept)]]
    # exactly the blocks the remaining runs (of both servers) use are left
    live = set()
    for sid in ("a", "b"):
        for r in store.runs(sid):
            m = store.load_manifest(sid, r.run_id)
            live |= {a.tobytes() for a in m.addresses[m.states == BlockState.DATA]}
    assert stored_addresses(store) == live
    assert verify(store).ok
    for run_id, content in kept:
        restore(store, "a", tmp / "out.raw", run_id=run_id)
        assert (tmp / "out.raw").read_bytes() == content
    restore(store, "b", tmp / "outb.raw")
    assert (tmp / "outb.raw").read_bytes() == other


def test_zero_and_unallocated_blocks_are_recorded_not_stored(tmp_path):
    store = new_store(tmp_path / "s")
    content = write_disk(tmp_path / "d.raw", [1, 0, None, 2, 0, None], 6 * BS)
    s = replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    m = store.load_manifest("srv")
    assert list(m.states) == [2, 1, 0, 2, 1, 0]
    assert (s.blocks_zero, s.blocks_unallocated) == (2, 2)
    assert s.blocks_data == 2 and s.blocks_stored == 2
    assert s.bytes_stored_uncompressed == 2 * BS
    # data that becomes zero is recorded as zero, and not stored
    content = write_disk(tmp_path / "d.raw", [0, 0, None, 2, 0, None], 6 * BS)
    s2 = replicate(tmp_path / "d.raw", store, "srv")
    assert s2.blocks_stored == 0 and s2.blocks_data == 1 and s2.blocks_changed == 1
    assert s2.block_size == BS                       # taken from the previous run
    restore(store, "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content


def test_summary_fields_and_cli_json(tmp_path):
    write_disk(tmp_path / "d.raw", [1, 2, 0, None], 4 * BS)
    env = dict(os.environ, PYTHONPATH=str(os.path.dirname(os.path.dirname(smsblock.__file__))))
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                              capture_output=True, text=True, env=env)
    p = cli("replicate", tmp_path / "d.raw", "--store", tmp_path / "st", "--server", "s-1",
            "--create", "--block-size", "64K", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    for key in ("run_id", "blocks_total", "blocks_zero", "blocks_unallocated", "blocks_changed",
                "blocks_stored", "bytes_read", "bytes_stored", "seconds"):
        assert key in doc
    assert doc["blocks_total"] == 4 and doc["blocks_stored"] == 2 and doc["bytes_read"] >= 2 * BS
    p = cli("runs", "--store", tmp_path / "st", "--server", "s-1", "--json")
    assert [r["run_id"] for r in json.loads(p.stdout)["runs"]] == [doc["run_id"]]
    p = cli("restore", "--store", tmp_path / "st", "--server", "s-1", "-o", tmp_path / "o.raw")
    assert p.returncode == 0 and (tmp_path / "o.raw").read_bytes() == (tmp_path / "d.raw").read_bytes()
    p = cli("verify", "--store", tmp_path / "st", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True
    p = cli("prune", "--store", tmp_path / "st", "--server", "s-1", "--keep", "1", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["runs_deleted"] == []
    p = cli("runs", "--store", tmp_path / "nothing", "--server", "s-1")
    assert p.returncode != 0 and "no smsblock store" in p.stderr
    if importlib.util.find_spec("smsblock.store.s3") is None:     # until issue 4 lands
        p = cli("replicate", tmp_path / "d.raw", "--store", "s3://bucket/x", "--server", "s-1")
        assert p.returncode == 2 and "not available yet" in p.stderr
    p = cli("replicate", tmp_path / "d.raw", "--store", tmp_path / "st", "--server", "../x")
    assert p.returncode == 2 and "server id" in p.stderr
    p = cli("restore", "--store", tmp_path / "st", "--server", "s-1", "--run", "r-nope", "-o", tmp_path / "x")
    assert p.returncode != 0 and "r-nope" in p.stderr


def test_restore_vmdk_matches_qemu_img(tmp_path):
    content = write_disk(tmp_path / "d.raw", [3, None, 0, 4, 5], 5 * BS - 1000)
    store = new_store(tmp_path / "s")
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    restore(store, "srv", tmp_path / "o.vmdk", format="vmdk")
    qemu_img("compare", "-f", "vmdk", "-F", "raw", tmp_path / "o.vmdk", tmp_path / "d.raw")
    # raw output is sparse: the hole and the zero block take no space
    restore(store, "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content
    assert os.stat(tmp_path / "o.raw").st_blocks * 512 <= 3 * BS + 65536


def test_run_disk_extents_follow_block_states(tmp_path):
    write_disk(tmp_path / "d.raw", [1, 1, 0, None, None, 2], 6 * BS)
    store = new_store(tmp_path / "s")
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    with store.run_disk("srv") as d:
        kinds = [(e.offset // BS, e.length // BS, e.kind.value) for e in d.extents()]
        m = d.manifest.to_manifest()        # a ManifestReader: whole for the check
        expect = []
        for i, s in enumerate(m.states):
            if s == BlockState.UNALLOCATED:
                continue
            kind = "data" if s == BlockState.DATA else "zero"
            if expect and expect[-1][2] == kind and expect[-1][0] + expect[-1][1] == i:
                expect[-1] = (expect[-1][0], expect[-1][1] + 1, kind)
            else:
                expect.append((i, 1, kind))
        assert kinds == expect
        assert d.read(BS - 10, 20) == pattern(1, BS)[-10:] + pattern(1, BS)[:10]


def test_verify_reports_damaged_and_missing_blocks(tmp_path):
    write_disk(tmp_path / "d.raw", [1, 2, 3], 3 * BS)
    store = new_store(tmp_path / "s", pack_size=4096)      # one block per pack
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    packs = sorted(store.list_packs())
    assert len(packs) == 3
    # flip a byte inside the first block frame of one pack
    path = store.pack_name(packs[0])
    raw = bytearray(open(path, "rb").read())
    raw[40] ^= 0xFF
    open(path, "wb").write(raw)
    report = verify(store)
    assert not report.ok and any(path in p for p in report.problems)
    assert any("referenced blocks are missing or damaged" in p for p in report.problems)
    # a missing pack
    os.unlink(store.pack_name(packs[1]))
    report = verify(store)
    assert sum("missing or damaged" in p for p in report.problems) == 1
    assert "2 referenced blocks" in " ".join(report.problems)


def test_verify_reports_corrupt_manifest(tmp_path):
    write_disk(tmp_path / "d.raw", [1], BS)
    store = new_store(tmp_path / "s")
    s = replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    path = tmp_path / "s" / "runs" / "srv" / f"{s.run_id}.manifest"
    raw = bytearray(path.read_bytes())
    raw[130] ^= 1
    path.write_bytes(raw)
    report = verify(store)
    assert not report.ok and any(s.run_id in p for p in report.problems)


def test_next_run_repairs_blocks_the_store_lost(tmp_path):
    content = write_disk(tmp_path / "d.raw", [1, 2], 2 * BS)
    store = new_store(tmp_path / "s", pack_size=4096)
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    os.unlink(store.pack_name(sorted(store.list_packs())[0]))
    s = replicate(tmp_path / "d.raw", open_store(tmp_path / "s"), "srv")
    assert s.blocks_stored == 1 and s.blocks_changed == 0
    restore(tmp_path / "s", "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content


def test_cancel_leaves_store_valid_and_keeps_sealed_blocks(tmp_path):
    blocks = list(range(1, 41))
    content1 = write_disk(tmp_path / "d.raw", blocks[:5] + [None] * 35, 40 * BS)
    store = new_store(tmp_path / "s", pack_size=4096)
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    write_disk(tmp_path / "d.raw", blocks, 40 * BS)
    token = CancelToken()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done >= 10 * BS:
            token.cancel("test")

    with pytest.raises(Cancelled):
        replicate(tmp_path / "d.raw", store, "srv", progress=progress, cancel=token)
    assert len(store.runs("srv")) == 1
    assert verify(store).ok
    restore(store, "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content1
    sealed = len(stored_addresses(store))
    assert sealed > 5
    s = replicate(tmp_path / "d.raw", store, "srv")
    assert s.blocks_stored == 40 - sealed
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))     # progress never goes back


def test_progress_reaches_total(tmp_path):
    write_disk(tmp_path / "d.raw", [1, 2, None, 3], 4 * BS)
    seen = []
    replicate(tmp_path / "d.raw", tmp_path / "s", "srv", block_size=BS,
              progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    out = []
    restore(tmp_path / "s", "srv", tmp_path / "o.raw", progress=lambda d, t: out.append((d, t)))
    # the raw writer's (as convert's and a VMDK restore's): how far through the disk
    assert out[-1] == (4 * BS, 4 * BS)
    assert [d for d, _ in out] == sorted(d for d, _ in out)


def test_prune_is_refused_while_a_run_holds_the_lock(tmp_path):
    write_disk(tmp_path / "d.raw", [1], BS)
    store = new_store(tmp_path / "s")
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    with store.lock(exclusive=False, purpose="replicate"):
        with pytest.raises(StoreLockedError):
            prune(store, "srv", 0)
    with store.lock(exclusive=True, purpose="prune"):
        with pytest.raises(StoreLockedError):
            replicate(tmp_path / "d.raw", store, "srv")
    assert prune(store, "srv", 0).runs_deleted


def test_an_open_run_disk_holds_prune_off(tmp_path):
    # prune deletes and rewrites packs, even ones a kept run reads: a reader holds the
    # store lock shared from run_disk() to close(), re-entrantly with other shared holders
    disk, store_dir = tmp_path / "d.raw", tmp_path / "s"
    store = new_store(store_dir, pack_size=4096)        # one block per pack
    first = write_disk(disk, [1, 2, 3], 3 * BS)
    old_id = replicate(disk, store, "srv", block_size=BS).run_id
    second = write_disk(disk, [1, 4, None], 3 * BS)
    replicate(disk, store, "srv")
    with store.run_disk("srv") as reader:               # the latest: kept by --keep 1
        with pytest.raises(StoreLockedError, match="cannot prune"):
            prune(store, "srv", 1)
        cli = subprocess.run([sys.executable, "-m", "smsblock", "prune", "--store", str(store_dir),
                              "--server", "srv", "--keep", "1"], capture_output=True, text=True)
        assert cli.returncode != 0 and "locked" in cli.stderr      # another process too
        with store.run_disk("srv", old_id) as old:      # more shared holders: fine
            assert old.read(0, 3 * BS) == first
        restore(store, "srv", tmp_path / "out.raw")
        assert reader.read(0, 3 * BS) == second == (tmp_path / "out.raw").read_bytes()
    with pytest.raises(RunNotFoundError):               # a failed open releases the lock too
        store.run_disk("srv", "r-20000101T000000.000000Z-00000000")
    assert prune(store, "srv", 1).runs_deleted == [old_id]
    assert verify(store).ok
    with store.run_disk("srv") as reader:
        assert reader.read(0, 3 * BS) == second


def test_prune_after_a_prune_killed_between_a_rewrite_and_the_delete(tmp_path):
    # a killed prune can leave a rewritten pack next to the pack it replaces (same live
    # blocks twice); the next prune rewrites the old one into that very pack again and
    # must then keep it, also when its id sorts after the old pack's
    later = 0
    for seed in range(1, 7):
        disk, store_dir = tmp_path / f"d{seed}.raw", tmp_path / f"s{seed}"
        store = new_store(store_dir, pack_size=100 * 1024)     # about 3 blocks a pack
        write_disk(disk, [seed, seed + 10, seed + 20], 3 * BS)
        replicate(disk, store, "srv", block_size=BS)
        (old_pack,) = store.list_packs()
        content = write_disk(disk, [seed, seed + 30, seed + 40], 3 * BS)
        replicate(disk, store, "srv")

        def killed(pack_id):
            raise KeyboardInterrupt("killed after the rewrite was stored")
        store.delete_pack = killed
        with pytest.raises(KeyboardInterrupt):
            prune(store, "srv", 1)
        del store.delete_pack
        rewrite = set(store.list_packs()) - {old_pack}
        later += any(p > old_pack for p in rewrite)
        assert verify(store).ok
        prune(store, "srv", 1)
        report = verify(store)
        assert report.ok and report.unreferenced_packs == 0
        restore(store, "srv", tmp_path / "out.raw")
        assert (tmp_path / "out.raw").read_bytes() == content
    assert later, "no rewrite sorted after its old pack: the case is not exercised"


def test_prune_removes_leftovers_and_unreferenced_packs(tmp_path):
    write_disk(tmp_path / "d.raw", [1, 2], 2 * BS)
    store = new_store(tmp_path / "s", pack_size=4096)
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    (tmp_path / "s" / "tmp" / "dead.pack.tmp").write_bytes(b"half a pack")
    # a sealed pack no run references, as a killed run leaves it
    from smsblock.pack import PackWriter
    w = PackWriter(store.staging_path(".pack.tmp"), "sha256")
    w.add(sha(b"x" * 10), __import__("zstandard").ZstdCompressor().compress(b"x" * 10), 10)
    pid, _ = w.seal()
    store.put_pack(pid, w.path)
    report = verify(store)
    assert report.ok and report.unreferenced_packs == 1 and report.leftovers == ["dead.pack.tmp"]
    r = prune(store, "srv", 5)
    assert r.packs_deleted == 1 and r.leftovers_removed == 1 and r.runs_deleted == []
    report = verify(store)
    assert report.ok and report.unreferenced_packs == 0 and not report.leftovers


def test_blake3_store(tmp_path):
    content = write_disk(tmp_path / "d.raw", [1, 2, 1], 3 * BS)
    store = new_store(tmp_path / "s", address="blake3")
    s = replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    assert s.blocks_stored == 2 and s.address_algorithm == "blake3"
    assert store.load_manifest("srv").address_algorithm == "blake3"
    assert verify(store).ok
    restore(store, "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content


def test_errors_name_what_is_wrong(tmp_path):
    write_disk(tmp_path / "d.raw", [1], BS)
    with pytest.raises(UsageError, match="block size"):
        replicate(tmp_path / "d.raw", tmp_path / "s", "srv", block_size=1000)
    replicate(tmp_path / "d.raw", tmp_path / "s", "srv", block_size=BS)
    with pytest.raises(RunNotFoundError):
        restore(tmp_path / "s", "other", tmp_path / "o.raw")
    with pytest.raises(UsageError):
        restore(tmp_path / "s", "srv", tmp_path / "o.raw", run_id="latest")
    with pytest.raises(UsageError):
        restore(tmp_path / "s", "srv", tmp_path / "o.raw", format="qcow2")
    with pytest.raises(UsageError):
        prune(tmp_path / "s", "srv", -1)


def test_run_ids_sort_by_time_even_within_a_microsecond():
    ids = [new_run_id()]
    for _ in range(200):
        ids.append(new_run_id(ids[-1]))
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    future = "r-29991231T235959.999999Z-00000000"
    assert new_run_id(future) > future


def test_a_damaged_pack_index_does_not_stop_runs_or_restores(tmp_path, caplog):
    content = write_disk(tmp_path / "d.raw", [1, 2], 2 * BS)
    store = new_store(tmp_path / "s", pack_size=4096)
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    packs = sorted(store.list_packs())
    path = store.pack_name(packs[0])
    raw = bytearray(open(path, "rb").read())
    raw[-64] ^= 0xFF                                 # the footer
    open(path, "wb").write(raw)
    fresh = open_store(tmp_path / "s")
    report = verify(fresh)
    assert not report.ok and any(path in p and "footer magic" in p for p in report.problems)
    s = replicate(tmp_path / "d.raw", fresh, "srv")
    assert s.blocks_stored == 1 and "left out of the block index" in caplog.text
    restore(fresh, "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content
    # the block was packed again alone, so under the same pack id: the store healed
    assert verify(fresh).ok


def test_disk_that_grows_shrinks_or_is_empty(tmp_path):
    store = new_store(tmp_path / "s")
    c1 = write_disk(tmp_path / "d.raw", [1, 2, 3], 3 * BS)
    r1 = replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    c2 = write_disk(tmp_path / "d.raw", [1, 2, 3, 4, None], 5 * BS - 7)     # grown
    r2 = replicate(tmp_path / "d.raw", store, "srv")
    assert r2.blocks_stored == 1 and r2.blocks_changed == 2 and r2.blocks_data_changed == 4
    c3 = write_disk(tmp_path / "d.raw", [1], 1000)                           # shrunk
    r3 = replicate(tmp_path / "d.raw", store, "srv")
    assert r3.blocks_total == 1 and r3.blocks_stored == 1      # a short block is new content
    c4 = write_disk(tmp_path / "d.raw", [], 0)                              # empty
    r4 = replicate(tmp_path / "d.raw", store, "srv")
    assert r4.blocks_total == 0 and r4.blocks_stored == 0
    for run, content in ((r1, c1), (r2, c2), (r3, c3), (r4, c4)):
        restore(store, "srv", tmp_path / "o.raw", run_id=run.run_id)
        assert (tmp_path / "o.raw").read_bytes() == content
    assert verify(store).ok


def test_prune_deletes_nothing_when_a_manifest_does_not_load(tmp_path):
    from smsblock.errors import ManifestError
    write_disk(tmp_path / "d.raw", [1], BS)
    store = new_store(tmp_path / "s")
    r1 = replicate(tmp_path / "d.raw", store, "a", block_size=BS)
    write_disk(tmp_path / "d.raw", [2], BS)
    replicate(tmp_path / "d.raw", store, "a")
    rb = replicate(tmp_path / "d.raw", store, "b", block_size=BS)
    path = tmp_path / "s" / "runs" / "b" / f"{rb.run_id}.manifest"
    path.write_bytes(path.read_bytes()[:-1])
    packs = store.list_packs()
    with pytest.raises(ManifestError, match=rb.run_id):
        prune(store, "a", 1)
    assert r1.run_id in store.list_run_ids("a") and store.list_packs() == packs


# the CLI in-process, then this address space's own peak (VmHWM): rusage maxrss would
# carry the forking parent's high-water mark over exec
_RSS_CHILD = """
import contextlib, io, sys
from smsblock.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(sys.argv[1:])
print(rc, next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def test_peak_rss_of_a_run_on_a_big_sparse_disk_is_bounded(tmp_path):
    """A 64 GiB sparse disk with 24 MiB of data: the run's peak RSS stays far below 256 MiB
    (the per-block arrays are ~130 bytes a block; nothing grows with the data)."""
    disk = tmp_path / "big.raw"
    rng = np.random.default_rng(1)
    with open(disk, "wb") as f:
        f.truncate(64 << 30)
        for k in range(12):
            f.seek(k * (5 << 30) + 12345)
            f.write(rng.integers(0, 16, 2 << 20, dtype=np.uint8).tobytes())
    env = dict(os.environ, PYTHONPATH=str(os.path.dirname(os.path.dirname(smsblock.__file__))))
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, "replicate", str(disk),
                          "--store", str(tmp_path / "s"), "--server", "big", "--create"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "0"
    assert int(out[1]) * 1024 <= 256 << 20
    m = open_store(tmp_path / "s").load_manifest("big")
    assert m.n_blocks == 131072 and m.count(BlockState.DATA) == 12 * 5


def test_restore_to_a_device_writes_through(tmp_path):
    """A non-regular output (a device) is written in place, zeros included, not renamed."""
    write_disk(tmp_path / "d.raw", [1, 0, None], 3 * BS)
    store = new_store(tmp_path / "s")
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    restore(store, "srv", "/dev/null")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 1 MiB file full of 0xAA (old bytes a restore must overwrite)."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xaa" * (1 << 20))
    p = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop device here: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_restore_onto_a_block_device_writes_every_byte(tmp_path, loop_device):
    """A block device keeps its old bytes: the restore writes the run's zeros and holes
    as zeros, in place, and leaves the bytes past the disk alone; a device smaller than
    the disk is refused before anything is written."""
    dev, backing = loop_device
    size = 5 * BS - 512
    want = write_disk(tmp_path / "d.raw", [1, 0, None, 2, None], size)
    store = new_store(tmp_path / "s")
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    restore(store, "srv", dev)
    got = backing.read_bytes()
    assert got[:size] == want and got[size:] == b"\xaa" * ((1 << 20) - size)

    write_disk(tmp_path / "big.raw", [3] * 17, 17 * BS)        # 1 MiB + 64 KiB
    replicate(tmp_path / "big.raw", store, "big", block_size=BS)
    with pytest.raises(UsageError, match=f"{dev}: the device holds {1 << 20} bytes"):
        restore(store, "big", dev)
    assert backing.read_bytes() == got


def test_verify_and_restore_can_be_cancelled(tmp_path):
    write_disk(tmp_path / "d.raw", [1, 2, 3, 4], 4 * BS)
    store = new_store(tmp_path / "s", pack_size=4096)
    replicate(tmp_path / "d.raw", store, "srv", block_size=BS)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        verify(store, cancel=token)
    with pytest.raises(Cancelled):
        restore(store, "srv", tmp_path / "o.raw", cancel=token)
    assert not (tmp_path / "o.raw").exists() and not (tmp_path / "o.raw.part").exists()


def test_block_disk_reads_match_its_blocks_across_boundaries():
    """BlockDisk.readinto (shared by RunDisk and the EBS SnapshotDisk) vs the plain meaning:
    the concatenation of the blocks, zeros where a block is None, cut at the disk's size."""
    import random
    from smsblock.disk.blocks import BlockDisk

    class Blocks(BlockDisk):
        def __init__(self, blocks, size, bs):
            super().__init__()
            self.blocks, self.size, self.block_size, self.path = blocks, size, bs, "mem"
            self.fetched = 0

        def fetch_block(self, i):
            self.fetched += 1
            b = self.blocks[i]
            return None if b is None else b[:max(0, min(self.block_size, self.size - i * self.block_size))]

    rnd = random.Random(7)
    bs, size = 64, 64 * 5 + 17
    blocks = [None if rnd.random() < 0.3 else rnd.randbytes(bs) for _ in range(6)]
    whole = b"".join(bytes(bs) if b is None else b for b in blocks)[:size]
    disk = Blocks(blocks, size, bs)
    for _ in range(300):
        off, n = rnd.randrange(0, size + 20), rnd.randrange(0, 200)
        assert disk.read(off, n) == whole[off:off + n]
    assert disk.fetched < 300 * 2, "the cache spares re-fetching the blocks just read"


def test_restore_refuses_damaged_blocks_and_output_inside_the_store(tmp_path):
    """A block damaged in a pack is an error naming the block, never wrong bytes written;
    an output path inside a local store is refused before anything is written."""
    import glob
    from smsblock.errors import StoreCorruptError, UsageError
    disk = tmp_path / "d.raw"
    disk.write_bytes(os.urandom(3 * 512 * 1024))
    store = tmp_path / "st"
    replicate(disk, store, "s1")
    config = (store / "config.json").read_bytes()
    with pytest.raises(UsageError, match="inside the store"):
        restore(store, "s1", store / "config.json")
    assert (store / "config.json").read_bytes() == config
    [pack] = glob.glob(str(store / "packs" / "**" / "*.pack"), recursive=True)
    with open(pack, "r+b") as f:        # zstd frames of random data hold it raw: flip a byte
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(StoreCorruptError, match="does not match the run's hash"):
        restore(store, "s1", tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists() and not (tmp_path / "out.raw.part").exists()


def test_a_runs_own_dedup_memory_is_bounded_and_costs_only_space(tmp_path, monkeypatch):
    """A run dedups its own new blocks exactly for the last CLAIMED_MAX of them, in bounded
    memory: a copy further back is stored twice (space, not correctness), and the run
    still restores byte for byte."""
    from smsblock.repository.writer import BlockStorer
    monkeypatch.setattr(BlockStorer, "CLAIMED_MAX", 4)
    seen = []
    real = BlockStorer.store_block

    def watched(self, view):
        out = real(self, view)
        seen.append(len(self._claimed))
        return out
    monkeypatch.setattr(BlockStorer, "store_block", watched)
    bs = 64 << 10
    rng = np.random.default_rng(7)
    blocks = [rng.integers(0, 256, bs, dtype=np.uint8).tobytes() for _ in range(8)]
    # block 0 again right after itself (deduped) and after 7 others (further back than 4)
    layout = [0, 0, 1, 2, 3, 4, 5, 6, 7, 0]
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"".join(blocks[i] for i in layout))
    store = tmp_path / "store"
    s = replicate(str(disk), str(store), "srv", block_size=bs)
    assert max(seen) <= 4
    assert s.blocks_stored == 9          # 8 distinct blocks, block 0 once more (evicted)
    restore(str(store), "srv", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == disk.read_bytes()


# --- a run's start-up work overlaps the scan; blocks that do not compress are stored raw ----

def _mixed_disk(path, n: int, seed: int) -> bytes:
    """n 64 KiB blocks: even ones random (incompressible), odd ones compressible."""
    rng = np.random.default_rng(seed)
    content = b"".join(rng.bytes(BS) if i % 2 == 0 else pattern(seed * 100 + i, BS)
                       for i in range(n))
    path.write_bytes(content)
    return content


def test_blocks_that_do_not_compress_are_stored_raw_and_read_back(tmp_path, monkeypatch):
    """A random block costs no zstd pass over its bytes (a sample says it would not
    shrink): it is stored as a zstd frame of raw blocks, which restore and verify read;
    compressible blocks are still compressed."""
    import zstandard
    from smsblock.pack import raw_frame_size
    from smsblock.repository.writer import BlockStorer
    compressed = []
    real = BlockStorer._compressor

    class Watched:
        def __init__(self, c):
            self.c = c

        def compress(self, data):
            compressed.append(len(data))
            return self.c.compress(data)
    monkeypatch.setattr(BlockStorer, "_compressor", lambda self: Watched(real(self)))
    disk = tmp_path / "d.raw"
    content = _mixed_disk(disk, 8, 1)
    store = new_store(tmp_path / "s", pack_size=1 << 20)
    s = replicate(disk, store, "srv", block_size=BS)
    assert s.blocks_stored == 8
    assert compressed.count(BS) == 4, "only the compressible blocks go to zstd whole"
    by_address = {}
    for pid, size in store.list_packs().items():
        raw = open(store.pack_name(pid), "rb").read()
        for e in store.pack_index(pid, size):
            by_address[bytes(e["address"])] = raw[int(e["offset"]):int(e["offset"]) + int(e["clen"])]
    for i, block in enumerate(blocks_of(content)):
        frame = by_address[sha(block)]
        assert zstandard.ZstdDecompressor().decompress(frame) == block
        if i % 2 == 0:
            assert len(frame) == raw_frame_size(BS) and frame[4] == 0xA0
        else:
            assert len(frame) < 0.6 * BS          # 16 symbols: about half
    assert verify(store).ok
    restore(store, "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content


def test_a_slow_start_still_dedups_exactly(tmp_path, monkeypatch):
    """While the run's start-up work (pack checks, block index) is not done, changed
    blocks are addressed and compressed and the pack writer looks them up once the index
    is there: blocks the store holds are not stored again."""
    import threading
    import time as _time
    from smsblock.repository import writer as W
    disk = tmp_path / "d.raw"
    content = _mixed_disk(disk, 12, 2)
    store = new_store(tmp_path / "s", pack_size=1 << 20)
    replicate(disk, store, "a", block_size=BS)          # every block of the disk is stored
    # server b: the same blocks, in another order, and two new ones
    blocks = blocks_of(content)
    rng = np.random.default_rng(9)
    layout = [blocks[i] for i in rng.permutation(len(blocks))] + [rng.bytes(BS), rng.bytes(BS)]
    disk.write_bytes(b"".join(layout))
    real = W.check_changed_packs
    started = threading.Event()
    checked = []

    def slow(*a, **k):
        started.set()
        _time.sleep(0.5)            # the scan has queued every block by then
        return real(*a, **k)
    monkeypatch.setattr(W, "check_changed_packs", slow)
    monkeypatch.setattr(W, "BACKGROUND_START", True)       # as for a remote store
    real_submit = W.PackSink.submit

    def submit(self, address, frame, ulen, check=False, buffer=None):
        checked.append(check)
        return real_submit(self, address, frame, ulen, check, buffer)
    monkeypatch.setattr(W.PackSink, "submit", submit)
    s = replicate(disk, store, "b", block_size=BS)
    assert started.is_set() and checked and all(checked), "blocks went to the writer unchecked"
    assert s.blocks_stored == 2 and s.blocks_data == 14
    assert len(stored_addresses(store)) == 14
    assert sum(len(store.pack_index(p, n)) for p, n in store.list_packs().items()) == 14
    restore(store, "b", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == disk.read_bytes()


# an error in the pack writer's own error path shows only as a thread's warning
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("where", ["check_changed_packs", "block_index"])
def test_a_failed_start_fails_the_run_with_its_own_error(tmp_path, monkeypatch, where,
                                                         background):
    """An error of the start-up work, which runs beside the scan, ends the run with that
    error (not a wrapped one), publishes no run, leaves no thread behind and releases the
    store lock; the next run works."""
    import threading
    import time as _time
    from smsblock.errors import StoreError
    from smsblock.repository import writer as W
    from smsblock.repository.repository import Repository
    disk = tmp_path / "d.raw"
    _mixed_disk(disk, 6, 3)
    store = new_store(tmp_path / "s", pack_size=1 << 20)
    replicate(disk, store, "srv", block_size=BS)
    _mixed_disk(disk, 6, 4)                             # every block changed

    def broken(*a, **k):
        _time.sleep(0.2)            # the scan is under way, blocks are queued
        raise StoreError("listing the packs failed: injected")
    monkeypatch.setattr(W, "BACKGROUND_START", background)
    if where == "check_changed_packs":
        monkeypatch.setattr(W, "check_changed_packs", broken)
    else:
        monkeypatch.setattr(Repository, "block_index", broken)
    runs = [r.run_id for r in store.runs("srv")]
    with pytest.raises(StoreError, match="^listing the packs failed: injected$"):
        replicate(disk, store, "srv", block_size=BS)
    assert not [t for t in threading.enumerate() if t.name.startswith("smsblock-")]
    assert [r.run_id for r in store.runs("srv")] == runs
    monkeypatch.undo()
    prune(store, "srv", keep=1)                         # the exclusive lock is free
    s = replicate(disk, store, "srv", block_size=BS)
    assert s.blocks_stored == 6


def test_the_manifest_names_only_durable_visible_packs(tmp_path, monkeypatch):
    """The last pack is made durable while the manifest is finished, but the manifest is
    published only after it is visible; a failure to put it fails the run, unpublished."""
    import time as _time
    from smsblock.errors import StoreError
    from smsblock.repository.repository import Repository
    disk = tmp_path / "d.raw"
    _mixed_disk(disk, 6, 5)
    store = new_store(tmp_path / "s", pack_size=1 << 30)      # one pack, sealed at the end
    real_put, real_publish = Repository.put_pack, Repository.put_manifest_file
    seen = []

    def slow_put(self, pack_id, path, **kw):
        _time.sleep(0.3)
        real_put(self, pack_id, path, **kw)
        seen.append(("pack", pack_id))

    def publish(self, server_id, run_id, staged):
        seen.append(("manifest", sorted(self.list_packs())))
        return real_publish(self, server_id, run_id, staged)
    monkeypatch.setattr(Repository, "put_pack", slow_put)
    monkeypatch.setattr(Repository, "put_manifest_file", publish)
    replicate(disk, store, "srv", block_size=BS)
    assert [k for k, _ in seen] == ["pack", "manifest"] and seen[0][1] in seen[1][1]

    def failing_put(self, pack_id, path, **kw):
        raise StoreError("cannot put the pack: injected")
    monkeypatch.setattr(Repository, "put_pack", failing_put)
    runs = [r.run_id for r in store.runs("srv")]
    _mixed_disk(disk, 6, 6)
    with pytest.raises(StoreError, match="injected"):
        replicate(disk, store, "srv", block_size=BS)
    assert [r.run_id for r in store.runs("srv")] == runs
    assert not list((tmp_path / "s" / "tmp").glob("*.manifest.tmp"))


def test_a_run_that_stores_nothing_starts_no_pack_writer(tmp_path, monkeypatch):
    """The pack writer's threads start on first use: an unchanged run starts neither (the
    scan does not wait for thread starts), a run that stores starts them and ends them."""
    import threading
    disk = tmp_path / "d.raw"
    _mixed_disk(disk, 6, 7)
    store = new_store(tmp_path / "s", pack_size=1 << 20)
    replicate(disk, store, "srv", block_size=BS)
    started = []
    real = threading.Thread.start

    def start(self):
        started.append(self.name)
        return real(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    s = replicate(disk, store, "srv", block_size=BS)
    assert s.blocks_stored == 0
    assert not [n for n in started if n.startswith("smsblock-pack")], started
    _mixed_disk(disk, 6, 8)
    s = replicate(disk, store, "srv", block_size=BS)
    assert s.blocks_stored == 6
    assert {"smsblock-pack-writer", "smsblock-pack-sync"} <= set(started)
    assert not [t for t in threading.enumerate() if t.name.startswith("smsblock-")]


def test_the_last_pack_is_sealed_as_soon_as_the_last_window_is_in(tmp_path, monkeypatch):
    """A run without a change list stores nothing after the scan's last window, so it
    closes its pack writer then: the last pack is sealed and synced while the window's
    records and the manifest are written.  A change-list run keeps it open (blocks it
    carries may need storing again).  A second close only waits."""
    from smsblock import manifest as M, scanner
    from smsblock.repository import writer as W
    sinks, closed_at_window = [], []
    real_init, real_add = W.PackSink.__init__, M.ManifestWriter.add_window

    def init(self, *a, **k):
        real_init(self, *a, **k)
        sinks.append(self)

    def add_window(self, *a, **k):
        closed_at_window.append(sinks[-1]._closed)
        return real_add(self, *a, **k)
    monkeypatch.setattr(W.PackSink, "__init__", init)
    monkeypatch.setattr(M.ManifestWriter, "add_window", add_window)
    monkeypatch.setattr(scanner, "WINDOW_BLOCKS", 4)
    disk = tmp_path / "d.raw"
    _mixed_disk(disk, 12, 1)
    store = new_store(tmp_path / "s", pack_size=1 << 20)
    assert replicate(disk, store, "srv", block_size=BS).blocks_stored == 12
    assert closed_at_window == [False, False, True]
    content = _mixed_disk(disk, 12, 2)
    closed_at_window.clear()
    s = replicate(disk, store, "srv", changed_extents=[(0, 12 * BS)])
    assert s.blocks_stored == 12 and closed_at_window == [False, False, False]
    restore(store, "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content


def test_a_close_interrupted_before_the_syncer_stops_is_finished_by_the_next(tmp_path):
    """The engine's early close may be interrupted (Ctrl-C in a program that embeds
    smsblock, while the writer's queue is full); the close on the run's error path must
    then do the rest (stop the writer, which seals the partial pack and stops the
    syncer), not wait forever for threads nobody stopped.  Found in review."""
    import threading
    import time as _time
    import zstandard
    from smsblock.repository.writer import PackSink
    store = new_store(tmp_path / "s", pack_size=64 << 10)
    sink = PackSink(store)
    rng = np.random.default_rng(1)
    c = zstandard.ZstdCompressor()
    for i in range(5):          # 40 KiB that do not compress: a pack every two blocks
        block = rng.bytes(40 << 10)
        sink.submit(bytes([i]) * 32, c.compress(block), len(block))
    deadline = _time.monotonic() + 10
    while sink._syncer not in sink._started_threads and _time.monotonic() < deadline:
        _time.sleep(0.01)
    real_put, fired = sink._queue.put, []

    def interrupted_put(*a, **k):
        if not fired:           # interrupted while the queue is full, before the put
            fired.append(1)
            raise KeyboardInterrupt
        return real_put(*a, **k)
    sink._queue.put = interrupted_put
    with pytest.raises(KeyboardInterrupt):
        sink.close(seal=True, wait=False)
    second = threading.Thread(target=lambda: sink.close(seal=True), daemon=True)
    second.start()
    second.join(10)
    assert not second.is_alive(), "the second close waits for a syncer nobody stopped"
    assert sink._writer is None and sink.error is None
    assert sink.packs_sealed == 3 == len(store.list_packs())
    sink.close()                # once stopped, a close only waits


def test_a_failure_to_index_the_new_packs_costs_the_run_nothing(tmp_path, monkeypatch, caplog):
    """Adding the packs a run put to the block index is a cache update: an error there
    (here mid-run, every pack) is logged, and the run ends, whole; the next run indexes
    the packs from the listing.  Found in review: it killed the syncer and hung the run."""
    import threading
    from smsblock.repository import writer as W
    from smsblock.repository.repository import Repository

    def broken(self, packs):
        raise RuntimeError("injected")
    monkeypatch.setattr(W, "INDEX_BATCH", 1)
    monkeypatch.setattr(Repository, "index_new_packs", broken)
    disk = tmp_path / "d.raw"
    content = _mixed_disk(disk, 12, 3)
    store = new_store(tmp_path / "s", pack_size=64 << 10)
    done = []
    run = threading.Thread(target=lambda: done.append(replicate(disk, store, "srv", block_size=BS)),
                           daemon=True)
    run.start()
    run.join(60)
    assert done, "the run hung"
    assert done[0].blocks_stored == 12 and "injected" in caplog.text
    monkeypatch.undo()
    assert replicate(disk, store, "srv").blocks_stored == 0
    restore(store, "srv", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content


def test_a_pack_the_writer_thread_fills_is_sealed_after_the_buffers_queued_for_it(tmp_path, monkeypatch):
    """Scan workers append blocks themselves and hand each filled 4 MiB write buffer to
    the writer thread; a block that had to wait for the run's start is added by the writer
    thread.  When that block fills the pack, the pack must be sealed only after the
    buffers the workers queued for it are written (sealing at once wrote them after the
    seal, into a file the syncer may already have put and closed).  Found in review."""
    from concurrent.futures import Future
    import zstandard
    from smsblock import pack as P
    from smsblock.repository.writer import PackSink, start_run
    store = new_store(tmp_path / "s", pack_size=P.WRITE_CHUNK + 4096)
    events = []
    real_write_at, real_seal = P.PackWriter.write_at, P.PackWriter.seal

    sealing = set()

    def write_at(self, buf, offset, length):
        events.append(("tail" if id(self) in sealing else "write", id(self), offset))
        return real_write_at(self, buf, offset, length)

    def seal(self, sync=True):
        events.append(("seal", id(self), None))
        sealing.add(id(self))
        try:
            return real_seal(self, sync)
        finally:
            sealing.discard(id(self))
    monkeypatch.setattr(P.PackWriter, "write_at", write_at)
    monkeypatch.setattr(P.PackWriter, "seal", seal)
    rng = np.random.default_rng(5)
    start = Future()
    sink = PackSink(store, start=start)
    late = rng.integers(0, 4, 512 << 10, dtype=np.uint8).tobytes()     # compresses, > 4 KiB
    late_frame = zstandard.ZstdCompressor().compress(late)
    assert len(late_frame) > 8192
    # the writer thread takes this block and waits for the run's start
    sink.submit(b"\x01" * 32, late_frame, len(late), check=True)
    # meanwhile the workers' 8 raw blocks fill the first write buffer: handed over, queued
    blocks = [rng.bytes(512 << 10) for _ in range(8)]
    for i, block in enumerate(blocks):
        sink.append(bytes([2 + i]) * 32, block, len(block), raw=True)
    start.set_result(start_run(store).result())     # the late block fills the pack
    sink.close(seal=True)
    assert sink.error is None and sink.blocks_stored == 9
    sealed_at = {w: i for i, (what, w, _o) in enumerate(events) if what == "seal"}
    assert sealed_at, events
    for i, (what, w, offset) in enumerate(events):
        if what == "write" and w in sealed_at:
            assert i < sealed_at[w], f"buffer at {offset} written after its pack was sealed"
    by_address = {bytes([2 + i]) * 32: b for i, b in enumerate(blocks)}
    by_address[b"\x01" * 32] = late
    found = 0
    for pack_id, size in store.list_packs().items():
        for e in store.pack_index(pack_id, size):
            frame = store.read_pack(pack_id, int(e["offset"]), int(e["clen"]))
            assert zstandard.ZstdDecompressor().decompress(frame) == by_address[bytes(e["address"])]
            found += 1
    assert found == 9


def _sink_for_appends(tmp_path, pack_size):
    from concurrent.futures import Future
    from smsblock.repository.writer import PackSink, start_run
    store = new_store(tmp_path / "s", pack_size=pack_size)
    start = Future()
    start.set_result(start_run(store).result())
    return store, PackSink(store, start=start)


def _stored_blocks_match(store, by_address) -> int:
    """Every block in the store's packs decompresses to what was appended under its
    address; returns how many there are."""
    import zstandard
    d = zstandard.ZstdDecompressor()
    found = 0
    for pack_id, size in store.list_packs().items():
        for e in store.pack_index(pack_id, size):
            frame = store.read_pack(pack_id, int(e["offset"]), int(e["clen"]))
            assert d.decompress(frame) == by_address[bytes(e["address"])], \
                f"block {bytes(e['address'])[0]} of pack {pack_id} is not its data"
            found += 1
    return found


def test_close_waits_for_an_append_in_progress_and_refuses_later_ones(tmp_path, monkeypatch):
    """The engine's error path closes the sink while scan workers may still append.
    An append in progress (here the one that fills the first write buffer) finishes
    before the STOP is queued, so its buffer is written before the last pack is sealed;
    an append that comes after is refused (Cancelled) and adds nothing: no pack file
    nobody seals, no count changed after the counts were final.  Found in review: the
    buffer was queued after the writer thread had drained the queue, and the pack was
    sealed and put with 4 MiB never written."""
    import threading
    from smsblock import pack as P
    from smsblock.repository.writer import PackSink
    store, sink = _sink_for_appends(tmp_path, 64 << 20)
    rng = np.random.default_rng(1)
    blocks = {bytes([i + 1]) * 32: rng.bytes(512 << 10) for i in range(8)}
    addresses = list(blocks)
    for a in addresses[:7]:
        sink.append(a, blocks[a], len(blocks[a]), raw=True)
    in_add, go = threading.Event(), threading.Event()
    real_add_raw = P.PackWriter.add_raw

    def slow_add_raw(self, address, data):
        if address == addresses[7]:
            in_add.set()
            go.wait(10)
        return real_add_raw(self, address, data)
    monkeypatch.setattr(P.PackWriter, "add_raw", slow_add_raw)
    worker = threading.Thread(target=lambda: sink.append(addresses[7], blocks[addresses[7]],
                                                         512 << 10, raw=True), daemon=True)
    worker.start()
    assert in_add.wait(10)
    closer = threading.Thread(target=lambda: sink.close(seal=True, wait=False), daemon=True)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close went on while a block was half added"
    go.set()
    worker.join(10)
    closer.join(10)
    sink.wait()
    assert sink.error is None and sink.blocks_stored == 8
    counted = sink.blocks_stored
    with pytest.raises(Cancelled):
        sink.append(b"\x09" * 32, b"late" * 1000, 4000, raw=True)
    assert sink.blocks_stored == counted
    assert _stored_blocks_match(store, blocks) == 8
    assert not list((tmp_path / "s").rglob("*.tmp")), "a staged pack nobody seals"


def test_full_packs_waiting_for_their_seal_hold_back_the_workers(tmp_path, monkeypatch):
    """A full pack waiting to be sealed keeps an open file and a 4 MiB buffer: it counts
    in the bytes handed to the writer thread, so with small packs and a slow put (S3)
    the workers wait instead of piling up open packs.  Found in review (200 open packs)."""
    import threading
    store, sink = _sink_for_appends(tmp_path, 256 << 10)
    release = threading.Event()
    real_put = type(store).put_pack
    monkeypatch.setattr(type(store), "put_pack",
                        lambda self, *a, **k: (release.wait(30), real_put(self, *a, **k))[1])
    rng = np.random.default_rng(2)
    block = rng.bytes(512 << 10)
    appended = []

    def worker():
        for i in range(60):             # every block a full pack
            sink.append(i.to_bytes(4, "little") * 8, block, len(block), raw=True)
            appended.append(i)
    t = threading.Thread(target=worker, daemon=True)
    t.start()
    t.join(3)
    assert t.is_alive() and len(appended) < 12, f"{len(appended)} full packs queued, none put"
    release.set()
    t.join(30)
    sink.close(seal=True)
    assert len(appended) == 60 and sink.packs_sealed == 60


def test_an_append_that_fails_midway_fails_the_sink_and_stores_no_broken_pack(tmp_path, monkeypatch):
    """An append that fails once part of its frame is in the pack (no memory for the next
    write buffer) leaves the pack's index and its bytes out of step: that pack is never
    sealed and the sink fails (what was queued for the writer thread is dropped: the run
    fails, the next run stores those blocks again); whatever pack was put is whole.  Found
    in review: the error path sealed it with every later offset wrong."""
    from smsblock import pack as P
    from smsblock.errors import StoreError
    store, sink = _sink_for_appends(tmp_path, 6 << 20)      # 12 raw blocks a pack
    rng = np.random.default_rng(3)
    blocks = {bytes([i + 1]) * 32: rng.bytes(512 << 10) for i in range(20)}
    real_take, fail = P._take_buffer, []

    def take():
        if fail:
            raise MemoryError("mmap: Cannot allocate memory (test)")
        return real_take()
    monkeypatch.setattr(P, "_take_buffer", take)
    stored = 0
    with pytest.raises(MemoryError):
        for i, (address, block) in enumerate(blocks.items()):
            if i == 19:     # the second pack's block that fills its write buffer
                fail.append(1)
            sink.append(address, block, len(block), raw=True)
            stored += 1
    with pytest.raises(StoreError, match="could not be added"):
        sink.close(seal=True)
    assert stored == 19 and sink.packs_sealed in (0, 1)
    assert _stored_blocks_match(store, blocks) == 12 * sink.packs_sealed   # whole or none
    assert not list((tmp_path / "s").rglob("*.tmp"))
