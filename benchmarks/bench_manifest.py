"""Manifest save/load, format versions 1, 2 and 3 (issue 11, outcome 2).

A 1 TiB disk at 512 KiB blocks (2 Mi blocks) holding 1 GiB of data (2048 DATA blocks in 8
clusters, a ZERO block before each): the file size and the time to save (serialise, write,
fsync, rename) and to load (read, check, build the in-memory table) in each format.
Version 1 stores 49 bytes per block whatever they hold; versions 2 and 3 store ranges and
the DATA blocks' entries, so their size follows the data (version 3's digest also costs
what the file costs, not the disk's size).  ``test_open_reader`` times a ManifestReader's
checked open of the version 3 file (what the engine does instead of a load).  Run with ``-s`` to see the figures;
they are also in ``extra_info``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from smsblock.manifest import BlockState, Manifest, ManifestReader

KIB, GIB, TIB = 1 << 10, 1 << 30, 1 << 40
BLOCK = 512 * KIB
ROUNDS = 5


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    n = TIB // BLOCK
    m = Manifest(TIB, BLOCK, address_algorithm="blake3", meta={"server_id": "bench"})
    rng = np.random.default_rng(3)
    per = GIB // BLOCK // 8
    for w in np.sort(rng.choice(n // (per + 1), 8, replace=False)) * (per + 1):
        m.states[w] = BlockState.ZERO
        m.states[w + 1:w + 1 + per] = BlockState.DATA
    data = m.states == BlockState.DATA
    m.hashes[data] = rng.integers(0, 256, (int(data.sum()), 16), dtype=np.uint8)
    m.addresses[data] = rng.integers(0, 256, (int(data.sum()), 32), dtype=np.uint8)
    return m


def _write(m: Manifest, path, version: int) -> None:
    if version == 3:
        m.save(path)
    else:       # the v1 and v2 writers are kept for tests only: same write path as save()
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(m._to_bytes_v1() if version == 1 else m._to_bytes_v2())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_save(benchmark, manifest, tmp_path, version):
    path = tmp_path / "run.manifest"
    benchmark.pedantic(_write, args=(manifest, path, version), rounds=ROUNDS, iterations=1)
    size = os.path.getsize(path)
    benchmark.extra_info.update(version=version, bytes=size)
    print(f"\nv{version} save: {size} bytes, {benchmark.stats.stats.min * 1000:.1f} ms")
    if version >= 2:
        assert size <= 256 * KIB


@pytest.mark.parametrize("version", [1, 2, 3])
def test_load(benchmark, manifest, tmp_path, version):
    path = tmp_path / "run.manifest"
    _write(manifest, path, version)
    back = benchmark.pedantic(Manifest.load, args=(path,), rounds=ROUNDS, iterations=1)
    assert back == manifest
    benchmark.extra_info.update(version=version, bytes=os.path.getsize(path))
    print(f"\nv{version} load: {os.path.getsize(path)} bytes, "
          f"{benchmark.stats.stats.min * 1000:.1f} ms")


def test_open_reader(benchmark, manifest, tmp_path):
    path = tmp_path / "run.manifest"
    _write(manifest, path, 3)

    def open_close():
        with ManifestReader(path) as r:
            return r.count(BlockState.DATA)

    data = benchmark.pedantic(open_close, rounds=ROUNDS, iterations=1)
    assert data == manifest.count(BlockState.DATA)
    print(f"\nv3 reader open: {benchmark.stats.stats.min * 1000:.1f} ms")
