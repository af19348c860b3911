"""Inspection benchmarks: how long ``inspect_and_validate`` takes and how much it reads.

A 64 GiB sparse disk (MBR, GRUB 2, an ext4 root holding CentOS 7.2.1511's release files,
swap, and a 300 MiB XFS in a 63 GiB partition) is inspected as a raw file and as a run in
a local store (read through the packs, nothing restored).  The peer is ``blkid -p`` on
each partition (identification only, no OS lookup), run the same number of times.
Figures are noisy on the shared machine; the bytes read are exact.  Run with ``-s``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from image_builders import (GRUB2_BOOT_IMG, CountingDisk, MiB, fake_root, mkfs_ext, mkfs_simple,  # noqa: E402
                            mkfs_xfs, partition_disk, place, write_boot_code)
from smsblock import open_disk  # noqa: E402
from smsblock.image.validate import inspect_and_validate  # noqa: E402


@pytest.fixture(scope="module")
def big_disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-image")
    disk = d / "big.img"
    parts = partition_disk(disk, 64 << 30, "label: dos\nstart=2048, size=16384, type=83, bootable\n"
                                           "start=18432, size=4096, type=82\nstart=22528, type=83\n")
    starts = [p["start"] * 512 for p in parts]
    place(disk, starts[0], mkfs_ext(d / "r.img", "ext4", 8 * MiB, label="root",
                                    root=fake_root(d, "centos-7.2.1511")))
    place(disk, starts[1], mkfs_simple(d / "s.img", "swap", 2 * MiB, "swap"))
    place(disk, starts[2], mkfs_xfs(d / "x.img", label="data"))
    write_boot_code(disk, GRUB2_BOOT_IMG.read_bytes())
    return disk, starts


def test_bench_inspect_raw(benchmark, big_disk):
    disk, _ = big_disk
    with open_disk(disk) as raw:
        counting = CountingDisk(raw)
        inspect_and_validate(counting)
        report = benchmark(inspect_and_validate, raw)
    assert report.ok
    benchmark.extra_info["bytes_read_per_inspection"] = counting.bytes_read
    print(f"\ninspect 64 GiB raw: {benchmark.stats.stats.mean * 1000:.1f} ms, "
          f"{benchmark.extra_info['bytes_read_per_inspection']} bytes read per inspection")


def test_bench_inspect_stored_run(benchmark, big_disk, tmp_path):
    from smsblock.engine import replicate
    from smsblock.store import open_store
    disk, _ = big_disk
    with open_disk(disk) as raw:
        replicate(raw, str(tmp_path / "store"), "big")
    store = open_store(str(tmp_path / "store"))

    def inspect_run():
        with store.run_disk("big") as run:
            return inspect_and_validate(run)
    report = benchmark(inspect_run)
    assert report.ok and report.os.version == "7.2.1511"
    print(f"\ninspect 64 GiB stored run: {benchmark.stats.stats.mean * 1000:.1f} ms")


def test_bench_blkid_peer(benchmark, big_disk):
    disk, starts = big_disk

    def blkid_all():
        for off in starts:
            subprocess.run(["blkid", "-p", "-O", str(off), str(disk)], capture_output=True)
    t0 = time.perf_counter()
    benchmark(blkid_all)
    print(f"\nblkid -p on 3 partitions: {benchmark.stats.stats.mean * 1000:.1f} ms "
          f"(wall {time.perf_counter() - t0:.2f} s total)")
