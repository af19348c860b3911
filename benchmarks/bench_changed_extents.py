"""A run given its changed extents vs a full incremental run (issue 11, outcome 6).

Each round writes 1 % of the blocks of an 8 GiB raw disk (``SMSBLOCK_BENCH_CHANGED_MIB``
MiB; whole blocks and small writes inside blocks, at random places), then times, on the
same change:

* a full incremental run (``replicate``: reads and hashes the whole disk, stores the
  changed blocks) — measured in the untimed setup of the benchmark round, into its own
  store that has the same history;
* the run given the changed extents (``replicate(changed_extents=...)``): reads and hashes
  only the listed blocks.

Target: the listed run takes at most 0.1x the full one (best rounds compared).  The page
cache is warm for both (the disk is read once before each round).  Run with ``-s`` to see
the figures; they are kept in ``extra_info``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from smsblock.engine import replicate
from smsblock.store import StoreConfig, open_store

MIB = 1 << 20
BS = 512 * 1024
SIZE = int(os.environ.get("SMSBLOCK_BENCH_CHANGED_MIB", str(8 * 1024))) * MIB
CHUNK = 64 * MIB


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    """A dense raw disk: a 64 MiB random chunk over and over (every block is read and
    hashed by a full scan; the first run stores one copy only, so the setup is quick)."""
    path = tmp_path_factory.mktemp("bench-changed") / "disk.raw"
    chunk = np.random.default_rng(5).bytes(CHUNK)
    with open(path, "wb") as f:
        for off in range(0, SIZE, CHUNK):
            f.write(chunk[:min(CHUNK, SIZE - off)])
    return path


def _fresh(path: Path):
    shutil.rmtree(path, ignore_errors=True)
    store = open_store(path)
    store.initialise(StoreConfig())
    return store


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MIB)
        while f.readinto(buf):
            pass


def _change_one_percent(path: Path, rng) -> list[tuple[int, int]]:
    """Write 1 % of the blocks (half whole, half a few KiB inside); the sorted list."""
    n_blocks = SIZE // BS
    picked = np.sort(rng.choice(n_blocks, max(1, n_blocks // 100), replace=False))
    extents = []
    with open(path, "r+b") as f:
        for k, i in enumerate(picked.tolist()):
            if k % 2:
                off, length = i * BS, BS
            else:
                off, length = i * BS + int(rng.integers(0, BS - 8192)), 4096 + int(rng.integers(0, 4096))
            f.seek(off)
            f.write(rng.bytes(length))
            extents.append((off, length))
    return extents


def test_changed_extents_run_vs_full_run(benchmark, disk, tmp_path):
    listed, full = tmp_path / "listed", tmp_path / "full"
    _fresh(listed)
    _fresh(full)
    replicate(disk, listed, "srv")
    replicate(disk, full, "srv")
    rng = np.random.default_rng(17)
    state = {"extents": None}
    full_times, full_summaries = [], []

    def setup():
        state["extents"] = _change_one_percent(disk, rng)
        _warm(disk)
        t = time.perf_counter()
        full_summaries.append(replicate(disk, full, "srv"))
        full_times.append(time.perf_counter() - t)
        return (), {}

    def ours():
        return replicate(disk, listed, "srv", changed_extents=state["extents"])

    summary = benchmark.pedantic(ours, setup=setup, rounds=3, iterations=1)
    ours_s, full_s = benchmark.stats.stats.min, min(full_times)
    ratio = ours_s / full_s
    figures = dict(disk_gib=round(SIZE / (1 << 30), 2), extents=len(state["extents"]),
                   listed_run_s=round(ours_s, 4), full_run_s=round(full_s, 3),
                   listed_bytes_read=summary.bytes_read,
                   full_bytes_read=full_summaries[-1].bytes_read,
                   ratio_vs_full=round(ratio, 4), target="<= 0.1x the full run")
    benchmark.extra_info.update(figures)
    print("\n" + ", ".join(f"{k}={v}" for k, v in figures.items()))
    # the same change found both ways
    assert summary.blocks_changed == full_summaries[-1].blocks_changed
    m_listed = open_store(listed).load_manifest("srv")
    m_full = open_store(full).load_manifest("srv")
    assert np.array_equal(m_listed.hashes, m_full.hashes)
    assert ratio <= 0.1
