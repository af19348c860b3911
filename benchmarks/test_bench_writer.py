"""Writer throughput: smsblock's streamOptimized and raw writers next to qemu-img convert.

A 256 MiB raw disk, half zeros (holes) and half disk-like data (a mix of incompressible,
text-like and structured binary grains), written as streamOptimized VMDK and as sparse raw
by smsblock and by ``qemu-img convert`` in the same run, with the same durability: smsblock
fsyncs its output by default, so qemu-img runs with ``-t writeback`` (one fdatasync at the
end; its default for convert, ``-t unsafe``, never syncs).  Run with ``make bench``; the
machine is usually shared, so compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from smsblock.disk import open_disk
from smsblock.disk.writer import write_raw, write_stream_optimized

MIB = 1 << 20
SIZE = 256 * MIB
GRAIN = 64 * 1024
WORDS = [b"kernel", b"module", b"the", b"of", b"config", b"0x7f3a", b"error", b"init",
         b"usr", b"lib", b"python3", b"return", b"static", b"void", b"int", b"{", b"}", b"\n"]


def disk_like_grain(rnd: random.Random, i: int) -> bytes:
    kind = i % 4
    if kind == 0:                                   # already compressed media, packages
        return rnd.randbytes(GRAIN)
    if kind == 1:                                   # text: logs, sources, configs
        out = bytearray()
        while len(out) < GRAIN:
            out += rnd.choice(WORDS) + b" "
        return bytes(out[:GRAIN])
    if kind == 2:                                   # binaries: small integers, padding
        return bytes(rnd.choice((0, 0, 0, 1, 2, 0xff, rnd.randrange(256)))
                     for _ in range(GRAIN))
    return (rnd.randbytes(512) + bytes(1536)) * (GRAIN // 2048)   # tables, inodes


@pytest.fixture(scope="module")
def bench_disk(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "disk.raw"
    rnd = random.Random(2024)
    samples = [disk_like_grain(rnd, i) for i in range(64)]
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE // 2, GRAIN):      # first half data, second half holes
            f.seek(off)
            f.write(samples[(off // GRAIN * 7) % len(samples)])
    return path


def _qemu_convert(*args):
    """qemu-img convert, durable like smsblock's writers (fdatasync of the output)."""
    subprocess.run(["qemu-img", "convert", "-t", "writeback", *map(str, args)], check=True,
                   capture_output=True)


def _run(benchmark, fn, label):
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["MiB_per_s_virtual"] = round(SIZE / MIB / seconds, 1)
    benchmark.extra_info["what"] = label


def test_stream_optimized_smsblock(benchmark, bench_disk, tmp_path):
    out = tmp_path / "o.vmdk"

    def run():
        with open_disk(bench_disk) as d:
            write_stream_optimized(d, out)
    _run(benchmark, run, "smsblock streamOptimized (libdeflate level 1, 2 threads, fsync)")
    benchmark.extra_info["output_bytes"] = os.path.getsize(out)


def test_stream_optimized_qemu_img(benchmark, bench_disk, tmp_path):
    out = tmp_path / "q.vmdk"
    _run(benchmark, lambda: _qemu_convert("-O", "vmdk", "-o", "subformat=streamOptimized",
                                          bench_disk, out),
         "qemu-img convert -t writeback -O vmdk streamOptimized")
    benchmark.extra_info["output_bytes"] = os.path.getsize(out)


def test_raw_smsblock(benchmark, bench_disk, tmp_path):
    out = tmp_path / "o.raw"

    def run():
        with open_disk(bench_disk) as d:
            write_raw(d, out)
    _run(benchmark, run, "smsblock sparse raw (2 threads, fsync)")


def test_raw_qemu_img(benchmark, bench_disk, tmp_path):
    out = tmp_path / "q.raw"
    _run(benchmark, lambda: _qemu_convert("-O", "raw", bench_disk, out),
         "qemu-img convert -t writeback -O raw")
