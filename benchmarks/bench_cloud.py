"""Cloud store benchmark (issue 4, outcome 6): a full run and a 2 %-change incremental run
of an image (``SMSBLOCK_BENCH_CLOUD_MIB`` MiB, default 2048) into S3 (moto in server mode
on loopback, a separate process) and, in the same session, into the local store.

For each run: wall time, throughput over the disk size, bytes stored, and for S3 the
requests made and bytes sent (counted by a botocore ``before-send`` hook on the store's
client: every HTTP request, retries included).  Figures are printed (run with ``-s``) and
kept in ``extra_info``.  The machine is shared by other jobs and moto is a Python server
(it, not the network, bounds S3 throughput here): figures are noisy, compare them taken
together.

    python3 -m pytest benchmarks/bench_cloud.py --benchmark-only -p no:xdist -s
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from moto_server import MotoServer  # noqa: E402

from smsblock.engine import replicate  # noqa: E402
from smsblock.store import StoreConfig, open_store  # noqa: E402
from smsblock.store.s3 import S3Store  # noqa: E402

MIB = 1 << 20
BS = 512 << 10
SIZE = int(os.environ.get("SMSBLOCK_BENCH_CLOUD_MIB", "2048")) * MIB
CHANGED = 0.02
RESULTS: dict[str, dict] = {}


def make_images(folder: Path) -> tuple[Path, Path]:
    """v1: disk-like blocks (a quarter incompressible, half small-alphabet binary, an
    eighth zeros, an eighth holes); v2: v1 with 2 % of its data blocks rewritten."""
    rng = np.random.default_rng(11)
    n = SIZE // BS
    v1, v2 = folder / "v1.raw", folder / "v2.raw"
    alphabet = np.array([0, 0, 0, 0, 1, 2, 0xFF, 0x40, 0x10, 0x7F], np.uint8)
    data_blocks = [i for i in range(n) if i % 8 < 6]
    changed = set(rng.choice(data_blocks, int(len(data_blocks) * CHANGED), replace=False).tolist())
    with open(v1, "wb") as f1, open(v2, "wb") as f2:
        f1.truncate(SIZE)
        f2.truncate(SIZE)
        for i in range(n):
            kind = i % 8
            if kind == 7:
                continue
            block = (bytes(BS) if kind == 6 else rng.bytes(BS) if kind < 2
                     else rng.choice(alphabet, BS).tobytes())
            f1.seek(i * BS)
            f1.write(block)
            if i in changed:
                block = rng.choice(alphabet, BS).tobytes()
            f2.seek(i * BS)
            f2.write(block)
    return v1, v2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("bench-cloud"))


@pytest.fixture(scope="module")
def moto():
    server = MotoServer(part_min_size=None).start()      # S3's real 5 MiB part minimum
    os.environ.update(server.client_env())
    yield server
    server.stop()


def _run_pair(benchmark, name: str, store, images, kind: str) -> None:
    v1, v2 = images
    store.initialise(StoreConfig())
    stats = getattr(store, "stats", None)
    out = {}
    for label, image in (("full", v1), ("incremental", v2)):
        before = dict(stats) if stats is not None else {}
        t0 = time.perf_counter()
        if label == "full":
            s = replicate(image, store, "bench")
        else:
            s = benchmark.pedantic(replicate, args=(image, store, "bench"), rounds=1, iterations=1)
        seconds = time.perf_counter() - t0
        row = {"seconds": round(seconds, 3), "MiB/s": round(SIZE / MIB / seconds, 1),
               "blocks_stored": s.blocks_stored, "bytes_stored": s.bytes_stored}
        if stats is not None:
            row["requests"] = stats["requests"] - before.get("requests", 0)
            row["bytes_sent"] = stats["bytes_sent"] - before.get("bytes_sent", 0)
        out[label] = row
        RESULTS[f"{kind} {label}"] = row
    benchmark.extra_info.update({f"{k}_{m}": v for k, r in out.items() for m, v in r.items()})
    print()
    for key, row in RESULTS.items():
        print(f"  {key:<18} " + "  ".join(f"{k}={v}" for k, v in row.items()))


def test_local_store_full_and_incremental(benchmark, images, tmp_path):
    path = tmp_path / "store"
    shutil.rmtree(path, ignore_errors=True)
    _run_pair(benchmark, "local", open_store(path), images, "local")


def test_s3_store_full_and_incremental(benchmark, images, moto, tmp_path):
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    moto.boto3_client("s3").create_bucket(Bucket=bucket)
    store = S3Store(f"s3://{bucket}/bench", staging_dir=str(tmp_path / "staging"))
    _run_pair(benchmark, "s3", store, images, "s3")
    store.close()
