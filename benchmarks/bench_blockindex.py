"""The on-disk block index at 20 million entries (issue 11, outcome 4).

Synthetic packs of 4096 entries (random addresses, as BLAKE3 gives them) are indexed
once; then: the time to build it, the time to open it as a new process does (every
segment's checksum is checked), lookups per second in batches of 4096 (hits and misses,
``contains_all`` as the engine calls it, and single ``in`` lookups), and the peak RSS
(``ru_maxrss``) of a child process that opens the index and runs a replicate-sized
stream of lookups: a 1 TiB disk of 512 KiB blocks, 2 Mi lookups in batches of 4096 plus
20 000 single ones.  The target is at most 128 MiB.  The peer is the previous in-memory
index (sorted numpy arrays of every entry) built from the same packs, whose peak RSS a
child process reports too, when the machine has the memory for it.

``SMSBLOCK_BENCH_INDEX_ENTRIES`` changes the size (default 20 000 000).  Run with ``-s``
to see the figures; they are also in ``extra_info``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from smsblock import blockindex as B

ENTRIES = int(os.environ.get("SMSBLOCK_BENCH_INDEX_ENTRIES", 20_000_000))
PER_PACK = 4096
BATCH = 4096
MIB = 1 << 20
RSS_TARGET = 128 * MIB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# shared by this module and the child processes it starts
COMMON = """
import numpy as np
from smsblock.pack import INDEX_DTYPE, sealed_size
PER_PACK = %d

def pack(i):
    rng = np.random.default_rng(i)
    idx = np.zeros(PER_PACK, INDEX_DTYPE)
    idx["address"] = rng.integers(0, 256, (PER_PACK, 32), dtype=np.uint8)
    idx["clen"] = 60000
    idx["offset"] = 16 + np.arange(PER_PACK, dtype=np.uint64) * 60000
    idx["ulen"] = 512 << 10
    return idx

SIZE = sealed_size(pack(0))

def listing(n_packs):
    return {f"{i:064x}": SIZE for i in range(n_packs)}

_pool = []

def hits(rng, n):
    # addresses of random entries, drawn from 64 random packs (an 8 MiB pool)
    if not _pool:
        pick = np.random.default_rng(1 << 40).integers(0, N_PACKS, 64)
        _pool.append(np.concatenate([pack(int(p))["address"] for p in pick]))
    return _pool[0][rng.integers(0, len(_pool[0]), n)]

def misses(rng, n):
    # seeds of packs are below 2**40: these never collide with an entry
    return np.random.default_rng([rng.integers(1 << 62), 7]).integers(0, 256, (n, 32), dtype=np.uint8)
""" % PER_PACK

N_PACKS = ENTRIES // PER_PACK
ns: dict = {"N_PACKS": N_PACKS}
exec(COMMON, ns)


def _build(folder: str) -> float:
    t = time.perf_counter()
    di = B.DiskIndex(folder)
    segs, lacking = di.sync(ns["listing"](N_PACKS), lambda pid, size: ns["pack"](int(pid, 16)))
    assert not lacking and sum(s.n for s in segs) == N_PACKS * PER_PACK
    return time.perf_counter() - t


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("blockindex") / "index")
    seconds = _build(folder)
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    print(f"\nbuilt {N_PACKS * PER_PACK} entries in {seconds:.1f} s, {size / MIB:.0f} MiB on disk "
          f"({size / (N_PACKS * PER_PACK):.1f} bytes an entry)")
    return folder, seconds, size


def _open(folder: str):
    B.DiskIndex._open.clear()
    di = B.DiskIndex(folder)            # nothing cached: as a new process
    segs, _ = di.sync(ns["listing"](N_PACKS), lambda pid, size: pytest.fail("rebuilt"))
    return B.BlockIndex._view(segs, ns["listing"](N_PACKS), {}, False)


def test_build(benchmark, built):
    folder, seconds, size = built
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(entries=N_PACKS * PER_PACK, build_seconds=round(seconds, 2),
                                bytes_on_disk=size)
    print(f"\nbuild: {seconds:.1f} s for {N_PACKS * PER_PACK} entries "
          f"({N_PACKS * PER_PACK / seconds / 1e6:.2f} M entries/s)")


def test_open(benchmark, built):
    folder = built[0]
    view = benchmark.pedantic(_open, args=(folder,), rounds=3, iterations=1)
    assert len(view) == N_PACKS * PER_PACK
    benchmark.extra_info.update(open_seconds=round(benchmark.stats.stats.min, 3))
    print(f"\nopen (checksums of every segment checked): {benchmark.stats.stats.min * 1000:.0f} ms")


@pytest.mark.parametrize("kind", ["hits", "misses", "mixed"])
def test_batch_lookups(benchmark, built, kind):
    view = _open(built[0])
    rng = np.random.default_rng(11)
    if kind == "hits":
        batch = ns["hits"](rng, BATCH)
    elif kind == "misses":
        batch = ns["misses"](rng, BATCH)
    else:
        batch = np.concatenate([ns["hits"](rng, BATCH // 2), ns["misses"](rng, BATCH // 2)])
        rng.shuffle(batch)
    found = benchmark(view.contains_all, batch)
    assert found.sum() == {"hits": BATCH, "misses": 0, "mixed": BATCH // 2}[kind]
    rate = BATCH / benchmark.stats.stats.mean
    benchmark.extra_info.update(lookups_per_second=round(rate))
    print(f"\n{kind}: {rate / 1e3:.0f} K lookups/s in batches of {BATCH}")


def test_single_lookups(benchmark, built):
    view = _open(built[0])
    rng = np.random.default_rng(12)
    probes = [a.tobytes() for a in np.concatenate([ns["hits"](rng, 500), ns["misses"](rng, 500)])]

    def run():
        return sum(1 for a in probes if a in view)
    assert benchmark(run) == 500
    rate = len(probes) / benchmark.stats.stats.mean
    benchmark.extra_info.update(lookups_per_second=round(rate))
    print(f"\nsingle `in`: {rate / 1e3:.0f} K lookups/s ({1e6 / rate:.1f} us each)")


RUN_CHILD = COMMON + """
import resource, sys, time
from smsblock import blockindex as B
folder, N_PACKS = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
di = B.DiskIndex(folder)
segs, _ = di.sync(listing(N_PACKS), None)
view = B.BlockIndex._view(segs, listing(N_PACKS), {}, False)
opened = time.perf_counter() - t
rng = np.random.default_rng(5)
found = 0
lookups = (1 << 40) // (512 << 10)          # a 1 TiB disk of 512 KiB blocks
t = time.perf_counter()
for _ in range(lookups // %d):
    batch = np.concatenate([hits(rng, %d // 2), misses(rng, %d // 2)])
    found += int(view.contains_all(batch).sum())
for a in misses(rng, 20000):
    found += a.tobytes() in view
took = time.perf_counter() - t
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "found": found, "lookups": lookups + 20000, "open": opened, "seconds": took}))
""".replace("import resource", "import json, resource") % (BATCH, BATCH, BATCH)


def _child(code: str, *args) -> dict:
    # started by a shell, not by this (large) process: Linux carries a process's peak
    # RSS across exec, so a direct child's ru_maxrss would start at this one's
    out = subprocess.run(["/bin/sh", "-c", '"$0" -c "$1" "$2" "$3"; exit $?', sys.executable,
                          code, *map(str, args), *[""] * (2 - len(args))],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_of_a_run(benchmark, built):
    got = benchmark.pedantic(_child, args=(RUN_CHILD, built[0], N_PACKS), rounds=1, iterations=1)
    assert got["found"] == (got["lookups"] - 20000) // 2
    benchmark.extra_info.update(peak_rss=got["maxrss"], lookups=got["lookups"],
                                lookups_per_second=round(got["lookups"] / got["seconds"]))
    print(f"\nrun against {N_PACKS * PER_PACK} entries: peak RSS {got['maxrss'] / MIB:.0f} MiB, "
          f"{got['lookups']} lookups in {got['seconds']:.1f} s, opened in {got['open'] * 1000:.0f} ms")
    assert got["maxrss"] <= RSS_TARGET


MEMORY_CHILD = COMMON + """
import json, resource, sys
N_PACKS = int(sys.argv[1])
# the in-memory index this replaces (pack.BlockIndex before issue 11): every entry in
# sorted numpy arrays, ~60 bytes an entry, built from the pack indexes
entries = np.concatenate([pack(i) for i in range(N_PACKS)])
packs = np.repeat(np.arange(N_PACKS, dtype=np.uint32), PER_PACK)
keys = np.ascontiguousarray(entries["address"][:, :8]).view("<u8").reshape(-1)
order = np.argsort(keys, kind="stable")
keys, entries, packs = keys[order], entries[order], packs[order]
del order
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "held": keys.nbytes + entries.nbytes + packs.nbytes}))
"""


def test_peer_in_memory_index_rss(benchmark):
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    need = ENTRIES * 200
    if avail < need:
        pytest.skip(f"the in-memory peer needs ~{need / MIB:.0f} MiB, {avail / MIB:.0f} available")
    got = benchmark.pedantic(_child, args=(MEMORY_CHILD, N_PACKS), rounds=1, iterations=1)
    benchmark.extra_info.update(peak_rss=got["maxrss"], held=got["held"])
    print(f"\nin-memory index of {N_PACKS * PER_PACK} entries: holds {got['held'] / MIB:.0f} MiB, "
          f"peak RSS {got['maxrss'] / MIB:.0f} MiB")
