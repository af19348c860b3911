"""Conformance: hypothesis-drawn disks in every VMDK layout read exactly as qemu-img reads them.

Each example writes a raw file (zero runs, random runs, repeated bytes, sizes that are not
grain or even sector multiples), converts it with qemu-img (or VMDKstream, or a hand-made
ESXi descriptor), and checks smsblock's bytes and extents against ``qemu-img convert -O raw``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import smsblock
from smsblock.disk import ExtentKind
from conftest import qemu_raw_bytes
from vmdk_images import (QEMU_SUBFORMATS, build_cowd, make_child, oracle_raw, qemu_convert,
                         qemu_io, vmfs_sparse_descriptor, build_sesparse, sesparse_descriptor,
                         vmdkstream_convert, vmfs_descriptor, write_raw)

KiB = 1 << 10

run = st.tuples(st.sampled_from(["zero", "random", "fill"]),
                st.integers(1, 150 * KiB), st.integers(0, 2 ** 32 - 1))
disk_runs = st.lists(run, min_size=1, max_size=10)


def build(runs) -> bytes:
    out = bytearray()
    for kind, length, seed in runs:
        if kind == "zero":
            out += bytes(length)
        elif kind == "random":
            out += random.Random(seed).randbytes(length)
        else:
            out += bytes([seed & 0xFF or 1]) * length
    return bytes(out)


def make(layout: str, raw: Path, folder: Path) -> tuple[Path, bytes]:
    """(image, what qemu-img reads from it)."""
    if layout in ("vmfs", "vmfsThin"):
        img = vmfs_descriptor(folder, layout, raw, thin=layout == "vmfsThin")
        if layout == "vmfsThin":      # qemu refuses the createType; its extent is raw
            return img, qemu_raw_bytes(folder / "vmfsThin-flat.vmdk", folder, "raw")
    elif layout == "streamOptimized-footer":
        img = vmdkstream_convert(raw, folder / "footer.vmdk")
    else:
        img = qemu_convert(raw, folder / f"{layout}.vmdk", layout)
    return img, oracle_raw(img, folder)


def check_disk(img: Path, expected: bytes, rnd: random.Random) -> None:
    with smsblock.open_disk(img) as d:
        assert d.size == len(expected)
        assert d.read(0, d.size) == expected
        for _ in range(5):
            off = rnd.randrange(0, d.size + 1)
            n = rnd.randrange(0, 200 * KiB)
            assert d.read(off, n) == expected[off:off + n]
        covered = bytearray(len(expected))
        for e in d.extents():
            if e.kind is ExtentKind.DATA:
                covered[e.offset:e.end] = b"\1" * e.length
            else:
                assert not expected[e.offset:e.end].strip(b"\0")
        # every non-zero byte lies in a DATA extent
        assert all(covered[i] for i in range(len(expected)) if expected[i]) \
            if len(expected) < 4096 else _nonzero_covered(expected, covered)


def _nonzero_covered(expected: bytes, covered: bytearray) -> bool:
    import numpy as np
    data = np.frombuffer(expected, dtype=np.uint8)
    cov = np.frombuffer(bytes(covered), dtype=np.uint8)
    return bool(np.all(cov[data != 0] == 1))


LAYOUTS = QEMU_SUBFORMATS + ("vmfs", "vmfsThin", "streamOptimized-footer")


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=6)
@given(runs=disk_runs, tail=st.integers(0, 511), seed=st.integers(0, 1000))
def test_layout_reads_like_qemu(tmp_path_factory, layout, runs, tail, seed):
    folder = tmp_path_factory.mktemp(layout)
    content = build(runs) + b"\x5a" * tail           # odd sizes: not sector multiples
    if layout == "streamOptimized-footer":
        content += bytes(-len(content) % 512)         # VMDKstream needs whole sectors
    raw = folder / "src.raw"
    raw.write_bytes(content)
    img, expected = make(layout, raw, folder)
    assert expected[:len(content)] == content        # qemu agrees with the source
    check_disk(img, expected, random.Random(seed))


write_cmd = st.tuples(st.integers(0, 15), st.integers(1, 3), st.integers(1, 255),
                      st.booleans())


@settings(max_examples=6)
@given(base_runs=disk_runs, child_writes=st.lists(write_cmd, max_size=5),
       grand_writes=st.lists(write_cmd, max_size=5), seed=st.integers(0, 1000),
       layouts=st.lists(st.sampled_from(["monolithicSparse", "twoGbMaxExtentSparse"]),
                        min_size=2, max_size=2))
def test_delta_chains_read_like_qemu(tmp_path_factory, base_runs, child_writes,
                                     grand_writes, seed, layouts):
    """Deltas as embedded-descriptor sparse files or as descriptor + -s001 extent files."""
    folder = tmp_path_factory.mktemp("chain")
    size = 1 << 20
    content = build(base_runs)[:size]
    raw = write_raw(folder / "base.raw", size, [(0, content)])
    base = qemu_convert(raw, folder / "base.vmdk", "monolithicSparse", "zeroed_grain=on")
    disk = base
    for name, writes, layout in (("child", child_writes, layouts[0]),
                                 ("grand", grand_writes, layouts[1])):
        disk = make_child(disk, folder / f"{name}.vmdk", "zeroed_grain=on",
                          f"subformat={layout}")
        cmds = []
        for grain, count, pattern, zero in writes:     # whole grains, some of them zeroed
            count = min(count, 16 - grain)
            off, n = grain * 64 * KiB, count * 64 * KiB
            cmds.append(f"write -z {off} {n}" if zero else f"write -P {pattern} {off} {n}")
        if cmds:
            qemu_io(disk, *cmds)
    check_disk(disk, oracle_raw(disk, folder), random.Random(seed))


def check_esx_extent(folder, content: bytes, extent: Path, descriptor, fill: int, seed: int,
                     as_delta: bool, create_type: str) -> None:
    """An ESX snapshot extent file, alone or as the delta of a vmfs base disk filled with
    ``fill`` bytes, reads like qemu; ``descriptor`` writes the descriptor that names it."""
    sectors = len(content) // 512
    if as_delta:
        base_raw = folder / "base.raw"
        base_raw.write_bytes(bytes([fill]) * len(content))
        vmfs_descriptor(folder, "base", base_raw, thin=False)
        img = descriptor(folder, "d", extent, sectors, "base.vmdk", 0x0A0B0C0D)
    else:
        img = descriptor(folder, "d", extent, sectors)
    expected = oracle_raw(img, folder)
    if not as_delta:
        assert expected == content                    # qemu reads the extent we built
    check_disk(img, expected, random.Random(seed))
    with smsblock.open_disk(img) as d:
        assert d.info.create_type == create_type
        assert d.info.extents[0].type == create_type.upper()
        assert (d.info.parent is not None) == as_delta


def sector_content(runs) -> bytes:
    content = build(runs)
    return content + bytes(-len(content) % 512)


@settings(max_examples=8)
@given(runs=disk_runs, grain=st.sampled_from([1, 8, 128]), seed=st.integers(0, 1000),
       as_delta=st.booleans())
def test_vmfs_sparse_redo_logs_read_like_qemu(tmp_path_factory, runs, grain, seed, as_delta):
    """ESX vmfsSparse (COWD) extents, alone or as the snapshot delta of a vmfs base disk."""
    folder = tmp_path_factory.mktemp("cowd")
    content = sector_content(runs)
    delta = folder / "d-delta.vmdk"
    delta.write_bytes(build_cowd(content, grain, seed))
    check_esx_extent(folder, content, delta, vmfs_sparse_descriptor, 0x5C, seed, as_delta,
                     "vmfsSparse")


@settings(max_examples=8)
@given(runs=disk_runs, seed=st.integers(0, 1000), zero_grains=st.integers(0, 20),
       as_delta=st.booleans())
def test_sesparse_snapshot_deltas_read_like_qemu(tmp_path_factory, runs, seed, zero_grains,
                                                 as_delta):
    """ESXi seSparse extents (VMFS6 snapshots), alone or as the delta of a vmfs base disk."""
    folder = tmp_path_factory.mktemp("sesparse")
    content = sector_content(runs)
    delta = folder / "d-sesparse.vmdk"
    delta.write_bytes(build_sesparse(content, seed, zero_grains))
    check_esx_extent(folder, content, delta, sesparse_descriptor, 0x6D, seed, as_delta,
                     "seSparse")
