"""Making VMDK test images with real tools (qemu-img, qemu-io, python3-vmdkstream).

Shared by the VMDK reader, conformance and bad-input tests.  Every image is made by a
tool that is not smsblock, so the reader is checked against independent writers.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import qemu_img

#: the createTypes `qemu-img convert -O vmdk -o subformat=...` writes
QEMU_SUBFORMATS = ("monolithicSparse", "streamOptimized", "monolithicFlat",
                   "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
VMDKSTREAM = "/usr/lib/python3/dist-packages/VMDKstream.py"


def write_raw(path: Path, size: int, pieces=()) -> Path:
    """A raw file of ``size`` bytes, zero except ``pieces`` [(offset, bytes)]."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    return path


def qemu_convert(raw: Path, out: Path, subformat: str, *extra: str) -> Path:
    opts = f"subformat={subformat}" + "".join("," + e for e in extra)
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", opts, raw, out)
    return out


def vmdkstream_convert(raw: Path, out: Path) -> Path:
    """streamOptimized with markers, grain directory at the end and a footer."""
    proc = subprocess.run(["/usr/bin/python3", VMDKSTREAM, str(raw), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"VMDKstream failed: {proc.stderr.strip()}")
    return out


def vmfs_descriptor(folder: Path, name: str, raw: Path, thin: bool) -> Path:
    """An ESXi-style descriptor (createType vmfs/vmfsThin) around a flat copy of ``raw``.

    qemu-img cannot create these layouts, so the descriptor is written as ESXi writes it.
    """
    flat = folder / f"{name}-flat.vmdk"
    data = raw.read_bytes()
    sectors = -(-len(data) // 512)
    with open(flat, "wb") as f:
        f.truncate(sectors * 512)
        # a thin disk keeps its zero regions as holes
        for off in range(0, len(data), 65536):
            chunk = data[off:off + 65536]
            if not thin or chunk.strip(b"\0"):
                f.seek(off)
                f.write(chunk)
    desc = folder / f"{name}.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=0a0b0c0d\n"
        f"parentCID=ffffffff\ncreateType=\"{'vmfsThin' if thin else 'vmfs'}\"\n\n"
        f"# Extent description\nRW {sectors} VMFS \"{flat.name}\"\n\n"
        "# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n"
        "ddb.virtualHWVersion = \"14\"\n")
    return desc


def qemu_io(path: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "vmdk"]
    for c in commands:
        args += ["-c", c]
    args.append(str(path))
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0 or "error" in proc.stdout.lower() + proc.stderr.lower():
        raise AssertionError(f"qemu-io {commands} failed: {proc.stdout}{proc.stderr}")


def make_child(parent: Path, child: Path, *options: str) -> Path:
    """A snapshot delta of ``parent`` as qemu-img makes it (parentFileNameHint relative)."""
    args = ["create", "-f", "vmdk", "-b", parent.name, "-F", "vmdk"]
    if options:
        args += ["-o", ",".join(options)]
    qemu_img(*args, child)
    return child


def patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first ``old`` with ``new`` (same length) in place, e.g. in a descriptor."""
    assert len(old) == len(new), "a patch must keep the file's layout"
    data = path.read_bytes()
    at = data.find(old)
    assert at >= 0, f"{old!r} not in {path}"
    path.write_bytes(data[:at] + new + data[at + len(old):])


def image_files(path: Path) -> list[Path]:
    """The descriptor and every extent file next to it that belongs to the image."""
    stem = path.stem
    return sorted(p for p in path.parent.iterdir()
                  if p == path or (p.name.startswith(stem + "-") and p.suffix == ".vmdk"))


def oracle_raw(path: Path, tmp: Path) -> bytes:
    """What qemu-img reads from the image (the oracle)."""
    out = tmp / f"oracle-{os.getpid()}-{path.stem}.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def build_cowd(content: bytes, grain_sectors: int, seed: int = 0) -> bytes:
    """An ESX vmfsSparse (COWD) redo log holding ``content`` (a whole number of sectors).

    No tool here writes COWD (only ESX does), so tests build it from the layout qemu's
    reader and libyal's notes describe: a 2048-byte header (magic, version, flags,
    capacity, grain size, GD sector, GD entries, next free sector), the grain directory
    at sector 4, grain tables of 4096 entries, then the grains, stored in a shuffled
    order so that some are back to back in the file and some are not.
    """
    import random
    import struct
    assert len(content) % 512 == 0
    capacity = len(content) // 512
    gbytes = grain_sectors * 512
    n_grains = -(-capacity // grain_sectors)
    n_gts = -(-n_grains // 4096)
    gd_sectors = -(-n_gts * 4 // 512)
    gt_at = 4 + gd_sectors
    data_at = gt_at + n_gts * 32
    gd = [gt_at + 32 * i for i in range(n_gts)]
    gt = [0] * (n_gts * 4096)
    order = [g for g in range(n_grains) if content[g * gbytes:(g + 1) * gbytes].strip(b"\0")]
    rnd = random.Random(seed)
    order = sorted(order, key=lambda g: (g // 3, rnd.random()))   # runs of 3 reshuffled
    body = bytearray()
    for g in order:
        gt[g] = data_at + len(body) // 512
        body += content[g * gbytes:(g + 1) * gbytes].ljust(gbytes, b"\0")
    header = struct.pack("<4sIIIIIII", b"COWD", 1, 3, capacity, grain_sectors, 4, n_gts,
                         data_at + len(body) // 512).ljust(2048, b"\0")
    meta = header + struct.pack(f"<{n_gts}I", *gd).ljust(gd_sectors * 512, b"\0")
    meta += struct.pack(f"<{len(gt)}I", *gt)
    return meta + bytes(body)


def _delta_descriptor(folder: Path, name: str, delta: Path, capacity: int, create_type: str,
                      extent_type: str, cid: int, parent: str | None, parent_cid: int) -> Path:
    desc = folder / f"{name}.vmdk"
    hint = f'parentFileNameHint="{parent}"\n' if parent else ""
    desc.write_text(
        f"# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\n"
        f"parentCID={parent_cid:08x}\ncreateType=\"{create_type}\"\n{hint}\n"
        f"# Extent description\nRW {capacity} {extent_type} \"{delta.name}\"\n\n"
        "# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n")
    return desc


def vmfs_sparse_descriptor(folder: Path, name: str, delta: Path, capacity: int,
                           parent: str | None = None, parent_cid: int = 0xFFFFFFFF) -> Path:
    """An ESXi vmfsSparse descriptor around a COWD delta (a snapshot's -000001.vmdk)."""
    return _delta_descriptor(folder, name, delta, capacity, "vmfsSparse", "VMFSSPARSE",
                             0x1234ABCD, parent, parent_cid)


def build_sesparse(content: bytes, seed: int = 0, zero_grains: int = 0) -> bytes:
    """An ESXi seSparse extent (VMFS6 snapshot delta) holding ``content``.

    Only ESXi writes seSparse, so the tests build it from the layout qemu's reader checks:
    a const header (magic 0xcafebabe, version 2.1, 4 KiB grains, 32 KiB grain tables of
    4096 64-bit entries), a volatile header (0xcafecafe, no journal to replay), a grain
    directory of entries 0x10000000_<table number>, the tables, then the grains in a
    shuffled order.  Table entries: 0 unallocated, 0x2... zero, 0x3... allocated with the
    grain number's low 12 bits in bits 48-59 and the rest in bits 0-47.  The first
    ``zero_grains`` all-zero grains are stored as zero entries instead of unallocated.
    """
    import random
    import struct
    assert len(content) % 512 == 0
    capacity = len(content) // 512
    n_grains = -(-capacity // 8)
    n_gts = max(1, -(-n_grains // 4096))
    gd_sectors = -(-n_gts * 8 // 512)
    gd_at, gts_at = 8, 8 + gd_sectors
    grains_at = gts_at + n_gts * 64
    rnd = random.Random(seed)
    used = [g for g in range(n_grains) if content[g * 4096:(g + 1) * 4096].strip(b"\0")]
    zeros = [g for g in range(n_grains) if g not in set(used)][:zero_grains]
    order = sorted(used, key=lambda g: (g // 3, rnd.random()))
    tables = [0] * (n_gts * 4096)
    body = bytearray()
    for number, g in enumerate(order):
        tables[g] = (0x3 << 60) | ((number & 0xFFF) << 48) | (number >> 12)
        body += content[g * 4096:(g + 1) * 4096].ljust(4096, b"\0")
    for g in zeros:
        tables[g] = 0x2 << 60
    # tables are numbered in reverse, to check the directory is followed, not assumed
    gd = [0x1000000000000000 | (n_gts - 1 - i) for i in range(n_gts)]
    table_bytes = bytearray(n_gts * 32768)
    for i in range(n_gts):
        slot = n_gts - 1 - i
        table_bytes[slot * 32768:(slot + 1) * 32768] = struct.pack(
            "<4096Q", *tables[i * 4096:(i + 1) * 4096])
    const = struct.pack("<26Q", 0xCAFEBABE, 0x0000000200000001, capacity, 8, 64, 0, 0, 0, 0, 0,
                        1, 1, 2, 1, 3, 5, gd_at, gd_sectors, gts_at, n_gts * 64, 0, 0, 0, 0,
                        grains_at, len(body) // 512).ljust(512, b"\0")
    volatile = struct.pack("<4Q", 0xCAFECAFE, 0, 1, 0).ljust(512, b"\0")
    meta = const + volatile + bytes(6 * 512)
    meta += struct.pack(f"<{n_gts}Q", *gd).ljust(gd_sectors * 512, b"\0") + bytes(table_bytes)
    return meta + bytes(body)


def sesparse_descriptor(folder: Path, name: str, delta: Path, capacity: int,
                        parent: str | None = None, parent_cid: int = 0xFFFFFFFF) -> Path:
    """An ESXi seSparse descriptor (a VMFS6 snapshot's -000001.vmdk)."""
    return _delta_descriptor(folder, name, delta, capacity, "seSparse", "SESPARSE",
                             0x5678ABCD, parent, parent_cid)
