"""The engine window by window (issue 11, outcome 3): runs made with tiny scan windows
equal runs made with one window, and read back as the disk.

``smsblock.scanner.WINDOW_BLOCKS`` (and the gap a window may span) is lowered to a few
blocks so that a small disk is cut into many windows and gaps: a first run, an
incremental run, a change-list run, then restore, verify, diff and prune, each compared
with the same steps at the default window size and with the disk's bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smsblock import scanner
from smsblock.engine import prune, replicate, restore, verify
from smsblock.manifest import diff
from smsblock.store import open_store

KIB = 1024
BS = 64 * KIB
N = 120


def write_blocks(path, layout, rng, size):
    """``layout[i]``: None hole, 0 zeros, 1 random data, 2 a fixed block (dedup)."""
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)
        for i, kind in enumerate(layout):
            if kind is None:
                continue
            f.seek(i * BS)
            n = min(BS, size - i * BS)
            f.write(bytes(n) if kind == 0 else b"\x42" * n if kind == 2
                    else rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def change(disk, blocks, size, seed):
    rng = np.random.default_rng(seed)
    with open(disk, "r+b") as f:
        for i in blocks:
            f.seek(i * BS)
            f.write(rng.integers(0, 256, min(BS, size - i * BS), dtype=np.uint8).tobytes())


def table(m):
    return m.states.tobytes(), m.hashes.tobytes(), m.addresses.tobytes()


def summary(s):
    d = s.to_dict()
    for k in ("run_id", "seconds", "previous_run_id"):
        d.pop(k)
    return d


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([None, None, None, 0, 1, 1, 2]), min_size=N, max_size=N),
       st.lists(st.integers(0, N - 1), min_size=1, max_size=6, unique=True),
       st.integers(1, 5), st.integers(0, 3), st.integers(0, BS - 1))
def test_tiny_windows_make_the_same_runs(tmp_path_factory, layout, changed, window, gap, tail):
    tmp_path = tmp_path_factory.mktemp("w")
    size = N * BS - tail
    disk = tmp_path / "disk.raw"
    changed = sorted(changed)
    extents = [(i * BS, min(BS, size - i * BS)) for i in changed]
    runs = {}
    for name, blocks in (("one-window", None), ("tiny", window)):
        disk.unlink(missing_ok=True)
        write_blocks(disk, layout, np.random.default_rng(tail), size)
        store = open_store(tmp_path / name)
        with pytest.MonkeyPatch.context() as mp:
            if blocks is not None:          # many windows and gaps on a small disk
                mp.setattr(scanner, "WINDOW_BLOCKS", blocks)
                mp.setattr(scanner, "WINDOW_GAP_BLOCKS", gap)
            first = replicate(disk, store, "vm", block_size=BS)
            change(disk, changed[::2], size, 1)
            second = replicate(disk, store, "vm")
            change(disk, changed, size, 2)
            third = replicate(disk, store, "vm", changed_extents=extents)
        manifests = [store.load_manifest("vm", r) for r in store.list_run_ids("vm")]
        runs[name] = (store, [summary(first), summary(second), summary(third)], manifests)
    (_, sums_a, mans_a), (store, sums_b, mans_b) = runs["one-window"], runs["tiny"]
    assert sums_a == sums_b
    assert [table(m) for m in mans_a] == [table(m) for m in mans_b]
    assert sums_b[1]["blocks_changed"] == len(diff(mans_b[0], mans_b[1]))
    assert sums_b[2]["blocks_changed"] == len(diff(mans_b[1], mans_b[2]))
    # the tiny-window store reads back as the disk, verifies, and prunes
    out = tmp_path / "restored.raw"
    restore(store, "vm", out)
    assert out.read_bytes() == disk.read_bytes()
    assert verify(store).ok
    prune(store, "vm", keep=1)
    assert verify(store).ok
    out.unlink()
    restore(store, "vm", out)
    assert out.read_bytes() == disk.read_bytes()
