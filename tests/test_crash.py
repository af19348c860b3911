"""Crash safety: `smsblock replicate` killed with SIGKILL at random moments.

After every kill the store must verify, every completed run must restore byte-exact, and
the next complete run must not store again the blocks the killed runs sealed.  Half the
kills land at a uniform random time over a run's length (including start-up), half a
random few milliseconds after the run starts writing packs, so many land mid-pack.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smsblock.manifest import BlockState
from smsblock.pack import address_function
from smsblock.replicate import prune, restore, verify
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
         "--server", "crash", "--block-size", "64K", "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def writing_started(store: Path, packs_before: int) -> bool:
    tmp = store / "tmp"
    try:
        if any(n.endswith(".pack.tmp") for n in os.listdir(tmp)):
            return True
    except FileNotFoundError:
        pass
    return len(open_store(store).list_packs()) > packs_before


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_store_valid_and_resumable(tmp_path):
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    seed = rnd.randrange(1 << 30)
    print(f"crash test seed {seed}")
    rnd.seed(seed)
    store_dir = tmp_path / "store"
    store = open_store(store_dir)
    store.initialise(StoreConfig(pack_size=256 * 1024))     # ~8 blocks a pack: many seals
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
    store = open_store(store_dir)
    store.initialise(StoreConfig(pack_size=256 * 1024))
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
