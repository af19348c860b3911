"""Bounded memory (issue 11, outcomes 2, 3 and 6): peak RSS of every command, manifest
size, and a sparse disk's run time against a dense disk holding the same bytes.

Each command runs as the CLI (``python -m smsblock ...``) in its own child process; its
peak RSS is the child's own VmHWM, read at its exit (``ru_maxrss`` from ``wait4`` would
also count the parent's memory the child was spawned from):

* (a) a sparse raw disk of 16 TiB - 4 KiB (ext4's largest file; ``SMSBLOCK_BENCH_SPARSE_TIB``
  changes it) holding 1 GiB of random data in 2048 extents of 512 KiB spread over it;
* (b) a dense raw disk of 8 GiB (``SMSBLOCK_BENCH_DENSE_GIB``) of disk-like blocks;

commands: ``scan``, ``replicate`` (first, then incremental after 16 extents changed),
``restore`` (the latest run, to a raw file), ``verify``, ``diff`` (the two runs'
manifests) and ``prune --keep 1``.  Target: at most 128 MiB each.  Also: the sparse
disk's run manifest (target at most 256 KiB), and the first replicate of the sparse
disk against that of a dense 1 GiB disk holding the same 2048 extents back to back
(target at most 1.5x).

Disks live in ``SMSBLOCK_BENCH_DIR`` (default /var/tmp/smsblock-bench) and are reused;
stores and restores go to pytest's tmp folder and are removed.  Run with ``-s`` to see
the figures; they are also kept in ``extra_info``.  The machine may be shared: times are
noisy, compare figures taken together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
CHUNK = 512 * 1024
N_CHUNKS = 2048                       # 1 GiB of data
SPARSE_SIZE = int(float(os.environ.get("SMSBLOCK_BENCH_SPARSE_TIB", "16")) * TIB) - 4096
DENSE_SIZE = int(float(os.environ.get("SMSBLOCK_BENCH_DENSE_GIB", "8")) * GIB)
BENCH_DIR = Path(os.environ.get("SMSBLOCK_BENCH_DIR", "/var/tmp/smsblock-bench"))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# the child that runs the CLI and reports its own peak RSS, as the CI test measures it
from test_memory_bounded import CHILD  # noqa: E402
RSS_TARGET = 128 * MIB
pytestmark = pytest.mark.timeout(3600)     # making the 8 GiB disk and every command on it
MANIFEST_TARGET = 256 * 1024


def _chunk_offsets(size: int, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(size // CHUNK - 1, N_CHUNKS, replace=False)) * CHUNK


def _chunk(i: int) -> bytes:
    return np.random.default_rng(1000 + i).bytes(CHUNK)


def _make_once(path: Path, build) -> Path:
    ok = path.with_suffix(path.suffix + ".ok")
    if not ok.exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        build(tmp)
        os.replace(tmp, path)
        ok.write_text("ok\n")
    return path


def _sparse(tmp: Path) -> None:
    with open(tmp, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for i, off in enumerate(_chunk_offsets(SPARSE_SIZE).tolist()):
            f.seek(off)
            f.write(_chunk(i))


def _same_bytes_dense(tmp: Path) -> None:
    with open(tmp, "wb") as f:
        for i in range(N_CHUNKS):
            f.write(_chunk(i))


def _dense(tmp: Path) -> None:
    """Disk-like blocks: a quarter random, half text-like, an eighth small-alphabet data,
    an eighth written zeros; every 512 KiB block unique (a counter in its first bytes).
    Cut from two 64 MiB pools at random places: quick to make on a shared machine."""
    rng = np.random.default_rng(11)
    words = np.frombuffer(b"the kernel module config /usr/lib python3 return 0x7f3a error\n",
                          np.uint8)
    pools = [np.frombuffer(rng.bytes(64 * MIB), np.uint8),
             rng.choice(words, 64 * MIB).astype(np.uint8),
             rng.choice(np.array([0, 0, 0, 1, 2, 255, 64], np.uint8), 64 * MIB)]
    chunk = 8 * MIB
    with open(tmp, "wb") as f:
        for i in range(DENSE_SIZE // chunk):
            kind = i % 8
            if kind == 7:
                f.write(bytes(chunk))
                continue
            pool = pools[0] if kind < 2 else pools[1] if kind < 6 else pools[2]
            at = int(rng.integers(0, len(pool) - chunk))
            block = pool[at:at + chunk].copy().reshape(-1, CHUNK)
            block[:, :8] = np.arange(i * len(block), (i + 1) * len(block),
                                     dtype=">u8").view(np.uint8).reshape(-1, 8)
            f.write(block.tobytes())


@pytest.fixture(scope="module")
def sparse() -> Path:
    return _make_once(BENCH_DIR / f"mem-sparse-{SPARSE_SIZE}.raw", _sparse)


@pytest.fixture(scope="module")
def same_bytes_dense() -> Path:
    return _make_once(BENCH_DIR / "mem-dense-same-1g.raw", _same_bytes_dense)


@pytest.fixture(scope="module")
def dense() -> Path:
    return _make_once(BENCH_DIR / f"mem-dense-{DENSE_SIZE}.raw", _dense)


def _cli_rss(*args: str, env: dict | None = None) -> tuple[float, int, str]:
    """Run the CLI in a child: (seconds, its own peak RSS in bytes, its stdout)."""
    hwm = BENCH_DIR / f"mem-hwm-{os.getpid()}.txt"
    env = dict(env or os.environ, PYTHONPATH=str(ROOT), SMSBLOCK_HWM_FILE=str(hwm))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, (args, proc.stderr[-2000:])
    rss = int(hwm.read_text())
    hwm.unlink()
    return seconds, rss, proc.stdout


def _change_extents(path: Path, offsets, count: int = 16) -> None:
    """Rewrite ``count`` data extents in place (new random bytes): an incremental run."""
    rng = np.random.default_rng(int(time.time()))
    with open(path, "r+b") as f:
        for off in offsets[:count]:
            f.seek(int(off))
            f.write(rng.bytes(CHUNK))


def _every_command(disk: Path, work: Path, change) -> dict:
    """Run every command once on ``disk``; return {command: (seconds, rss)} and more."""
    store, out = work / "store", work / "restored.raw"
    shutil.rmtree(store, ignore_errors=True)
    res = {}
    s, rss, _ = _cli_rss("scan", str(disk), "-o", str(work / "scan.manifest"), "--json")
    res["scan"] = (s, rss)
    s, rss, text = _cli_rss("replicate", str(disk), "--store", str(store), "--server", "vm",
                            "--create", "--json")
    res["replicate_first"] = (s, rss)
    res["first_summary"] = json.loads(text)
    change()
    s, rss, text = _cli_rss("replicate", str(disk), "--store", str(store), "--server", "vm",
                            "--json")
    res["replicate_incremental"] = (s, rss)
    res["incremental_summary"] = json.loads(text)
    s, rss, _ = _cli_rss("restore", "--store", str(store), "--server", "vm", "-o", str(out))
    res["restore"] = (s, rss)
    out.unlink()
    s, rss, _ = _cli_rss("verify", "--store", str(store), "--json")
    res["verify"] = (s, rss)
    manifests = sorted((store / "runs" / "vm").glob("*.manifest"))
    res["manifest_bytes"] = [m.stat().st_size for m in manifests]
    s, rss, _ = _cli_rss("diff", str(manifests[0]), str(manifests[1]), "--json")
    res["diff"] = (s, rss)
    s, rss, _ = _cli_rss("prune", "--store", str(store), "--server", "vm", "--keep", "1", "--json")
    res["prune"] = (s, rss)
    shutil.rmtree(store, ignore_errors=True)
    return res


COMMANDS = ["scan", "replicate_first", "replicate_incremental", "restore", "verify", "diff",
            "prune"]


def _report(benchmark, **figures) -> None:
    benchmark.extra_info.update(figures)
    print("\n" + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _figures(prefix: str, res: dict) -> dict:
    out = {}
    for c in COMMANDS:
        out[f"{prefix}_{c}_rss_mib"] = round(res[c][1] / MIB, 1)
        out[f"{prefix}_{c}_s"] = round(res[c][0], 2)
    return out


def test_sparse_16tib_every_command(benchmark, sparse, tmp_path):
    offsets = _chunk_offsets(SPARSE_SIZE)
    res = benchmark.pedantic(lambda: _every_command(sparse, tmp_path,
                                                    lambda: _change_extents(sparse, offsets)),
                             rounds=1, iterations=1)
    figs = _figures("sparse", res)
    _report(benchmark, sparse_size=SPARSE_SIZE, **figs,
            manifest_bytes=res["manifest_bytes"],
            blocks_changed=res["incremental_summary"]["blocks_changed"],
            target="RSS <= 128 MiB each, manifest <= 256 KiB")
    assert max(res[c][1] for c in COMMANDS) <= RSS_TARGET, figs
    assert max(res["manifest_bytes"]) <= MANIFEST_TARGET, res["manifest_bytes"]


def test_dense_8gib_every_command(benchmark, dense, tmp_path):
    offsets = np.arange(0, DENSE_SIZE, DENSE_SIZE // 16)[:16]
    res = benchmark.pedantic(lambda: _every_command(dense, tmp_path,
                                                    lambda: _change_extents(dense, offsets)),
                             rounds=1, iterations=1)
    figs = _figures("dense", res)
    _report(benchmark, dense_size=DENSE_SIZE, **figs, manifest_bytes=res["manifest_bytes"],
            target="RSS <= 128 MiB each")
    assert max(res[c][1] for c in COMMANDS) <= RSS_TARGET, figs


def test_sparse_16tib_into_an_ebs_store(benchmark, sparse, tmp_path):
    """replicate (first, incremental) and restore of the 16 TiB sparse disk with an
    ``ebs://`` store (moto in server mode for EBS; the staging store local): each run
    also becomes an EBS snapshot (windowed diff, manifest copied frame by frame), and
    the restore reads the snapshot back.  moto holds the snapshot blocks (1 GiB) in its
    own process, not ours."""
    from moto_server import MotoServer
    moto = MotoServer().start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        (tmp_path / "empty.toml").write_text("")
        env.update(moto.client_env(), SMSBLOCK_CONFIG=str(tmp_path / "empty.toml"))
        url = f"ebs://us-east-1?store={tmp_path / 'staging'}"
        offsets = _chunk_offsets(SPARSE_SIZE)

        def every():
            res = {}
            s, rss, text = _cli_rss("replicate", str(sparse), "--store", url, "--server", "vm",
                                    "--create", "--json", env=env)
            res["ebs_replicate_first"] = (s, rss, json.loads(text))
            _change_extents(sparse, offsets)
            s, rss, text = _cli_rss("replicate", str(sparse), "--store", url, "--server", "vm",
                                    "--json", env=env)
            res["ebs_replicate_incremental"] = (s, rss, json.loads(text))
            out = tmp_path / "restored.raw"
            s, rss, _ = _cli_rss("restore", "--store", url, "--server", "vm", "-o", str(out),
                                 env=env)
            res["ebs_restore"] = (s, rss, None)
            out.unlink()
            return res
        res = benchmark.pedantic(every, rounds=1, iterations=1)
    finally:
        moto.stop()
        shutil.rmtree(tmp_path / "staging", ignore_errors=True)
    figs = {}
    for k, (s, rss, _) in res.items():
        figs[f"{k}_rss_mib"], figs[f"{k}_s"] = round(rss / MIB, 1), round(s, 2)
    _report(benchmark, sparse_size=SPARSE_SIZE, **figs,
            blocks_changed=res["ebs_replicate_incremental"][2]["blocks_changed"],
            target="RSS <= 128 MiB each")
    assert max(rss for _s, rss, _ in res.values()) <= RSS_TARGET, figs


def test_sparse_run_time_vs_dense_same_bytes(benchmark, sparse, same_bytes_dense, tmp_path):
    """First replicate of the 16 TiB sparse disk vs a dense 1 GiB disk of the same bytes
    (each into a fresh store; best of two; both disks' pages are cached by a first pass)."""
    def run(disk: Path, name: str) -> float:
        store = tmp_path / name
        shutil.rmtree(store, ignore_errors=True)
        s, _, _ = _cli_rss("replicate", str(disk), "--store", str(store), "--server", "vm",
                           "--create", "--json")
        shutil.rmtree(store, ignore_errors=True)
        return s

    def scan_time(disk: Path) -> float:
        s, _, _ = _cli_rss("scan", str(disk), "-o", str(tmp_path / "m"), "--json")
        return s

    run(sparse, "warm1"), run(same_bytes_dense, "warm2")
    dense_s = min(run(same_bytes_dense, "d") for _ in range(2))
    sparse_s = benchmark.pedantic(lambda: min(run(sparse, "s") for _ in range(2)),
                                  rounds=1, iterations=1)
    dense_scan = min(scan_time(same_bytes_dense) for _ in range(2))
    sparse_scan = min(scan_time(sparse) for _ in range(2))
    _report(benchmark, sparse_replicate_s=round(sparse_s, 2), dense_1g_replicate_s=round(dense_s, 2),
            replicate_ratio=round(sparse_s / dense_s, 3), sparse_scan_s=round(sparse_scan, 2),
            dense_1g_scan_s=round(dense_scan, 2), scan_ratio=round(sparse_scan / dense_scan, 3),
            target="<= 1.5x")
    assert sparse_s <= 1.5 * dense_s
