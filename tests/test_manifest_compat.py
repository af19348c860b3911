"""Stores written by previous releases (manifest format versions 1 and 2) keep working.

The previous code is taken from this checkout's git history (OLD_COMMITS: the last commit
whose manifests are version 1, and the last whose manifests are version 2), unpacked with
``git archive`` and run as its own CLI (``python -m smsblock replicate``) to write a store
of two runs.  Today's code then lists, restores and verifies those runs, replicates a third
run on top (written as version 3, compared against the old manifest before it) and
restores that too.

Native modules: when the old commit's native sources (setup.py, smsblock/*.pyx, csrc/)
equal this tree's, the built modules of this tree are copied; else the old tree is built
(about a minute).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the last commits that write manifest format versions 1 and 2 (parents of 2 and 3)
OLD_COMMITS = {1: "a89cdca", 2: "6a67fc2"}
VERSION_OF: dict = {}          # old code folder -> the manifest version it writes
NATIVE = ["setup.py", "csrc", "smsblock/*.pyx", "smsblock/*.pxd"]
KIB, MIB = 1 << 10, 1 << 20


def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=check)


@pytest.fixture(scope="module", params=sorted(OLD_COMMITS), ids=lambda v: f"v{v}")
def old_code(request, tmp_path_factory) -> Path:
    version = request.param
    OLD_COMMIT = OLD_COMMITS[version]
    if shutil.which("git") is None:
        pytest.fail("git is needed to take the previous release's code from history")
    if git("cat-file", "-e", f"{OLD_COMMIT}^{{commit}}", check=False).returncode != 0:
        pytest.fail(f"commit {OLD_COMMIT} (the last manifest-v{version} writer) is not in "
                    f"{ROOT}'s history: run the tests from a full clone (not shallow)")
    where = tmp_path_factory.mktemp("old-smsblock")
    archive = git("archive", "--format=tar", OLD_COMMIT, "setup.py", "csrc", "smsblock").stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    same_native = git("diff", "--quiet", OLD_COMMIT, "--", *NATIVE, check=False).returncode == 0
    built = sorted((ROOT / "smsblock").glob("_*.so"))
    if same_native and built:
        for so in built:
            shutil.copy2(so, where / "smsblock" / so.name)
    else:
        proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                              cwd=where, capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, SMSBLOCK_DEBUG="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"VERSION = {version}" in (where / "smsblock" / "manifest.py").read_text()
    VERSION_OF[where] = version
    return where


def cli(code: Path, *args: str) -> dict | str:
    env = dict(os.environ, PYTHONPATH=str(code))
    proc = subprocess.run([sys.executable, "-m", "smsblock", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=code)
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
    return json.loads(proc.stdout) if "--json" in args else proc.stdout


def write_disk(path: Path, size: int, seed: int, spots) -> bytes:
    """A sparse raw disk with random data at ``spots`` (offset, length); its bytes."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in spots:
            f.seek(off)
            f.write(rng.integers(0, 256, length, dtype=np.uint8).tobytes())
    return path.read_bytes()


def test_store_written_by_the_previous_format_keeps_working(old_code, tmp_path):
    store, disk = tmp_path / "store", tmp_path / "disk.raw"
    size = 48 * MIB
    first = write_disk(disk, size, 1, [(0, 3 * MIB), (20 * MIB + 4096, MIB), (47 * MIB, MIB)])
    create = ["--create"] if VERSION_OF[old_code] >= 2 else []    # asked for since then
    cli(old_code, "replicate", str(disk), "--store", str(store), "--server", "web",
        "--block-size", "64K", "--json", *create)
    with open(disk, "r+b") as f:                    # change a few blocks, zero others
        f.seek(MIB)
        f.write(b"\x5a" * 200 * KIB)
        f.seek(47 * MIB)
        f.write(bytes(MIB))
    second = disk.read_bytes()
    cli(old_code, "replicate", str(disk), "--store", str(store), "--server", "web", "--json")
    files = sorted((store / "runs" / "web").glob("*.manifest"))
    assert len(files) == 2
    for f in files:
        assert f.read_bytes()[8:12] == VERSION_OF[old_code].to_bytes(4, "little")   # the old format

    # today's code reads the old store
    runs = cli(ROOT, "runs", "--store", str(store), "--server", "web", "--json")
    run_ids = [r["run_id"] for r in runs["runs"]]
    assert len(run_ids) == 2
    for run_id, want in zip(run_ids, (first, second)):
        out = tmp_path / f"{run_id}.raw"
        cli(ROOT, "restore", "--store", str(store), "--server", "web", "--run", run_id,
            "-o", str(out))
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(want).digest()
    report = cli(ROOT, "verify", "--store", str(store), "--json")
    assert report["ok"] and report["runs_checked"] == 2, report

    # and replicates on top of it: the new run compares against the old manifest before it
    with open(disk, "r+b") as f:
        f.seek(30 * MIB)
        f.write(b"\x77" * 64 * KIB)
    third = disk.read_bytes()
    s = cli(ROOT, "replicate", str(disk), "--store", str(store), "--server", "web", "--json")
    assert s["blocks_changed"] == 1 and s["blocks_stored"] == 1, s
    files = sorted((store / "runs" / "web").glob("*.manifest"))
    assert len(files) == 3
    assert files[-1].read_bytes()[8:12] == (3).to_bytes(4, "little")    # written as version 3
    out = tmp_path / "third.raw"
    cli(ROOT, "restore", "--store", str(store), "--server", "web", "-o", str(out))
    assert out.read_bytes() == third
    report = cli(ROOT, "verify", "--store", str(store), "--json")
    assert report["ok"] and report["runs_checked"] == 3 and not report["problems"], report

    # the old code still reads the store's old runs after today's code wrote to it
    out = tmp_path / "old-reads-first.raw"
    cli(old_code, "restore", "--store", str(store), "--server", "web", "--run", run_ids[0],
        "-o", str(out))
    assert out.read_bytes() == first
