"""Crash safety: `smsblock replicate` and `smsblock prune` killed with SIGKILL at random moments.

After every kill the store must verify, every completed run must restore byte-exact, and
the next complete run must not store again the blocks the killed runs sealed.  Half the
kills land at a uniform random time over a run's length (including start-up), half a
random few milliseconds after the run starts writing packs, so many land mid-pack.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smsblock.disk import open_disk
from smsblock.manifest import BlockState
from smsblock.pack import address_function
from smsblock.engine import prune, replicate, restore, verify
from smsblock.store import StoreConfig, open_store

ROOT = Path(__file__).resolve().parent.parent
BS = 64 * 1024
N_BLOCKS = 128                      # an 8 MiB disk
ITERATIONS = 10


def disk_content(seed: int, base: bytes | None) -> bytes:
    """A disk: random 4-bit data (compressible by half), some zero blocks; when ``base``
    is given, a random third of its blocks changed."""
    rng = np.random.default_rng(seed)
    if base is None:
        data = rng.integers(0, 16, N_BLOCKS * BS, dtype=np.uint8)
        data[5 * BS:7 * BS] = 0
        return data.tobytes()
    data = np.frombuffer(base, np.uint8).copy()
    for i in rng.choice(N_BLOCKS, N_BLOCKS // 3, replace=False):
        data[i * BS:(i + 1) * BS] = rng.integers(0, 16, BS, dtype=np.uint8)
    return data.tobytes()


def stored_addresses(store) -> set[bytes]:
    store = open_store(store.root)         # fresh: no cached indexes of deleted packs
    return {bytes(e["address"]) for pid, size in store.list_packs().items()
            for e in store.pack_index(pid, size)}


def start_run(disk: Path, store: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "smsblock", "replicate", str(disk), "--store", str(store),
         "--server", "crash", "--create", "--block-size", "64K", "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def writing_started(store: Path, packs_before: int) -> bool:
    tmp = store / "tmp"
    try:
        if any(n.endswith(".pack.tmp") for n in os.listdir(tmp)):
            return True
    except FileNotFoundError:
        pass
    return len(open_store(store).list_packs()) > packs_before


def seeded_random(what: str) -> tuple[random.Random, int]:
    """A random source with a fresh seed, printed so that a failure can be replayed."""
    seed = random.SystemRandom().randrange(1 << 30)
    print(f"{what} seed {seed}")
    return random.Random(seed), seed


def new_store(path: Path):
    store = open_store(path)
    store.initialise(StoreConfig(pack_size=256 * 1024))     # ~8 blocks a pack: many packs
    return store


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_store_valid_and_resumable(tmp_path):
    rnd, seed = seeded_random("crash test")
    store_dir = tmp_path / "store"
    store = new_store(store_dir)
    disk = tmp_path / "disk.raw"

    # a first complete run, timed: the window the kills are spread over
    content = disk_content(seed, None)
    disk.write_bytes(content)
    t0 = time.monotonic()
    p = start_run(disk, store_dir)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    full_time = time.monotonic() - t0
    completed = {r.run_id: content for r in store.runs("crash")}

    killed_mid_pack = 0
    grew = 0
    for it in range(ITERATIONS):
        content = disk_content(seed + it + 1, content)
        disk.write_bytes(content)
        before = stored_addresses(store)
        packs_before = len(store.list_packs())
        p = start_run(disk, store_dir)
        mode = it % 3 if it < ITERATIONS - 1 else 2   # the last kill leaves sealed blocks
        if mode == 0:           # anywhere in the run, start-up included
            time.sleep(rnd.uniform(0, full_time))
        else:                   # once it writes its first pack (1) or has sealed one (2)
            deadline = time.monotonic() + 60
            while p.poll() is None and time.monotonic() < deadline and not (
                    writing_started(store_dir, packs_before) if mode == 1
                    else len(open_store(store_dir).list_packs()) > packs_before):
                time.sleep(0.0005)
            time.sleep(rnd.uniform(0, 0.02) if it < ITERATIONS - 1 else 0)
            killed_mid_pack += p.poll() is None
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        runs_before = len(completed)

        for r in store.runs("crash"):          # a run that finished before the kill counts
            completed.setdefault(r.run_id, content)
        # blocks sealed by a run that never completed: the next run must not store them again
        grew += len(completed) == runs_before and len(stored_addresses(store)) > len(before)
        report = verify(store_dir)
        assert report.ok, report.problems
        for run_id, expect in completed.items():
            out_path = tmp_path / "restored.raw"
            restore(store_dir, "crash", out_path, run_id=run_id)
            assert out_path.read_bytes() == expect, f"run {run_id} after kill {it}"

    print(f"kills while storing: {killed_mid_pack}, killed runs that left sealed blocks: {grew}")
    assert killed_mid_pack > 0 and grew > 0, "no kill landed while a run was storing blocks"

    # the next run completes and stores only what no killed run sealed
    latest = store.runs("crash")[-1].run_id
    previous_content = completed[latest]
    before = stored_addresses(store)
    p = start_run(disk, store_dir)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    import json
    summary = json.loads(out)
    old = [previous_content[i:i + BS] for i in range(0, len(content), BS)]
    new = [content[i:i + BS] for i in range(0, len(content), BS)]
    address = address_function(store.config.address)
    changed = {address(b) for a, b in zip(old, new)
               if a != b and b != bytes(len(b))}
    print(f"final run: {len(changed)} changed, {len(changed & before)} already sealed, stored {summary['blocks_stored']}")
    assert summary["blocks_stored"] == len(changed - before)
    assert changed & before, "the last killed run sealed nothing the final run needed"
    completed[summary["run_id"]] = content

    # prune removes what the killed runs left behind, and nothing any run needs
    report = verify(store_dir)
    prune(store_dir, "crash", keep=100)
    after = verify(store_dir)
    assert after.ok and after.unreferenced_packs == 0 and not after.leftovers
    live = set()
    for r in store.runs("crash"):
        m = store.load_manifest("crash", r.run_id)
        live |= {a.tobytes() for a in m.addresses[m.states == BlockState.DATA]}
    assert stored_addresses(store) == live
    for run_id, expect in completed.items():
        restore(store_dir, "crash", tmp_path / "restored.raw", run_id=run_id)
        assert (tmp_path / "restored.raw").read_bytes() == expect


def test_ctrl_c_stops_a_run_cleanly(tmp_path):
    """SIGINT cancels: exit status 130, the partial pack sealed (no temp files), no run."""
    store_dir = tmp_path / "store"
    store = new_store(store_dir)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(disk_content(5, None) * 2)
    p = start_run(disk, store_dir)
    deadline = time.monotonic() + 60
    while p.poll() is None and not store.list_packs() and time.monotonic() < deadline:
        time.sleep(0.0005)
    if p.poll() is not None:
        pytest.skip("the run finished before it could be interrupted (machine too fast)")
    os.kill(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 130 and b"interrupted" in err
    assert store.runs("crash") == [] and store.list_leftovers() == []
    report = verify(store_dir)
    assert report.ok and report.blocks_checked > 0


def start_prune(store: Path, keep: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "smsblock", "prune", "--store", str(store), "--server", "crash",
         "--keep", str(keep)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def prune_started(store: Path, n_runs: int, packs: set[str]) -> bool:
    """Whether prune has removed a run, staged a rewritten pack or changed the packs."""
    try:
        if any(n.endswith(".pack.tmp") for n in os.listdir(store / "tmp")):
            return True
    except FileNotFoundError:
        pass
    s = open_store(store)
    return len(s.list_run_ids("crash")) < n_runs or set(s.list_packs()) != packs


@pytest.mark.slow
def test_sigkill_during_prune_leaves_store_valid(tmp_path):
    """prune killed at random moments (start-up, deleting runs, rewriting or deleting packs):
    the store verifies, every run still there restores byte-exact, and a later prune
    finishes the job (no unreferenced packs, no leftovers, only live blocks stored)."""
    rnd, seed = seeded_random("prune crash test")
    master = tmp_path / "master"
    store = new_store(master)                               # many packs: many rewrites
    disk = tmp_path / "disk.raw"
    contents = {}
    content = None
    for k in range(5):
        content = disk_content(seed + k, content)
        disk.write_bytes(content)
        with open_disk(disk) as d:
            contents[replicate(d, store, "crash", block_size=BS).run_id] = content
    packs = set(store.list_packs())
    keep = 2

    # a complete prune on a copy, timed: the window the uniform kills are spread over
    shutil.copytree(master, tmp_path / "timed")
    t0 = time.monotonic()
    p = start_prune(tmp_path / "timed", keep)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    full_time = time.monotonic() - t0

    killed_mid_prune = 0
    for it in range(8):
        work = tmp_path / f"kill{it}"
        shutil.copytree(master, work)
        p = start_prune(work, keep)
        if it % 2 == 0:         # anywhere, start-up included
            time.sleep(rnd.uniform(0, full_time))
        else:                   # once prune has begun to change the store
            deadline = time.monotonic() + 60
            while p.poll() is None and time.monotonic() < deadline \
                    and not prune_started(work, len(contents), packs):
                time.sleep(0.0002)
            time.sleep(rnd.uniform(0, 0.01))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            killed_mid_prune += prune_started(work, len(contents), packs)
        p.communicate(timeout=60)

        report = verify(work)
        assert report.ok, (it, report.problems)
        left = open_store(work).list_run_ids("crash")
        assert left[-keep:] == list(contents)[-keep:]        # kept runs are never touched
        for run_id in left:
            restore(work, "crash", tmp_path / "restored.raw", run_id=run_id)
            assert (tmp_path / "restored.raw").read_bytes() == contents[run_id], (it, run_id)

        prune(work, "crash", keep)                            # a later prune completes it
        after = verify(work)
        assert after.ok and after.unreferenced_packs == 0 and not after.leftovers
        w = open_store(work)
        live = set()
        for run_id in w.list_run_ids("crash"):
            m = w.load_manifest("crash", run_id)
            live |= {a.tobytes() for a in m.addresses[m.states == BlockState.DATA]}
        assert stored_addresses(w) == live
        for run_id in list(contents)[-keep:]:
            restore(work, "crash", tmp_path / "restored.raw", run_id=run_id)
            assert (tmp_path / "restored.raw").read_bytes() == contents[run_id]
        shutil.rmtree(work)
    print(f"kills after prune had changed the store: {killed_mid_prune}")
    assert killed_mid_prune > 0, "no kill landed while prune was changing the store"
