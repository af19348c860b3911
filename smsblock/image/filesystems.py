"""Filesystem identification from superblocks: type, label and UUID.

Reads a few fixed places of a partition (its first 4 KiB, 32 KiB and 64 KiB in) and
recognises NTFS, ext2/ext3/ext4 (told apart by feature flags, as libblkid does), XFS,
Btrfs, JFS, FAT12/16/32, Linux swap and LVM2 physical volumes.  A magic number with
impossible fields around it is reported as a garbage superblock, not trusted.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

from .findings import WARNING, Finding
from .region import Region

# ext feature flags (linux/fs/ext4/ext4.h)
EXT_COMPAT_HAS_JOURNAL = 0x0004
EXT_INCOMPAT_JOURNAL_DEV = 0x0008
# what ext3 understands; anything beyond makes the filesystem ext4 (libblkid's rule)
EXT3_INCOMPAT_SUPP = 0x0002 | 0x0004 | 0x0010        # filetype, recover, meta_bg
EXT3_RO_COMPAT_SUPP = 0x0001 | 0x0002 | 0x0004       # sparse_super, large_file, btree_dir
EXT2_INCOMPAT_SUPP = 0x0002 | 0x0010                 # filetype, meta_bg

FILESYSTEMS = ("ntfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "jfs", "vfat", "swap", "lvm2")


@dataclass(slots=True)
class FsInfo:
    """An identified filesystem (or swap / LVM2 PV) at the start of a region."""

    type: str                      # one of FILESYSTEMS
    label: str | None = None
    uuid: str | None = None
    variant: str | None = None     # FAT12/FAT16/FAT32; swap/LVM versions
    block_size: int | None = None


class _Probe:
    """Cached fixed-offset reads of one region (each place is read once)."""

    def __init__(self, region: Region):
        self.region = region
        self._cache: dict[tuple[int, int], bytes] = {}

    def at(self, offset: int, length: int) -> bytes:
        key = (offset, length)
        if key not in self._cache:
            self._cache[key] = self.region.pread_exact(offset, length)
        return self._cache[key]


def identify(region: Region) -> tuple[FsInfo | None, list[Finding]]:
    """Identify the filesystem at the start of ``region``: (info or None, findings)."""
    probe = _Probe(region)
    findings: list[Finding] = []
    for fn in (_ntfs, _fat, _xfs, _ext, _btrfs, _jfs, _swap, _lvm2):
        try:
            info = fn(probe)
        except _Garbage as g:
            findings.append(Finding(WARNING, "fs-garbage-superblock", str(g)))
            continue
        if info is not None:
            return info, findings
    return None, findings


def looks_like_boot_sector(sector0: bytes) -> bool:
    """True when a sector ending in 55 AA is an NTFS or FAT volume boot record, not an MBR."""
    probe = _Probe(Region(_BytesDisk(sector0)))
    try:
        return _ntfs(probe) is not None or _fat(probe) is not None
    except _Garbage:
        return False


class _Garbage(Exception):
    """A magic number was found but the structure around it is impossible."""


class _BytesDisk:
    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def read(self, offset, length):
        return self.data[offset:offset + length]


def _text(raw: bytes) -> str | None:
    s = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return s or None


def _uuid(raw: bytes) -> str | None:
    return None if raw == bytes(16) else str(uuidlib.UUID(bytes=raw))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- the probes, each reading fixed places only -----------------------------------

def _ntfs(p: _Probe) -> FsInfo | None:
    bs = p.at(0, 512)
    if bs[3:11] != b"NTFS    ":
        return None
    bps, spc = struct.unpack_from("<HB", bs, 11)
    if not (_is_pow2(bps) and 256 <= bps <= 4096) or spc == 0:
        raise _Garbage(f"NTFS boot sector with impossible geometry ({bps} bytes/sector, "
                       f"{spc} sectors/cluster) at offset {p.region.start}")
    serial = struct.unpack_from("<Q", bs, 0x48)[0]
    # the label lives in the $Volume file, read later by the NTFS library
    return FsInfo("ntfs", None, f"{serial:016X}", block_size=bps * (spc if spc <= 128 else 1))


def _fat(p: _Probe) -> FsInfo | None:
    bs = p.at(0, 512)
    if bs[510:512] != b"\x55\xaa" or bs[0] not in (0xEB, 0xE9):
        return None
    if bs[54:57] != b"FAT" and bs[82:87] != b"FAT32":
        return None
    bps, spc, reserved, nfats, root_entries, total16, _media, fat16 = \
        struct.unpack_from("<HBHBHHBH", bs, 11)
    total32 = struct.unpack_from("<I", bs, 32)[0]
    if not (_is_pow2(bps) and 512 <= bps <= 4096 and _is_pow2(spc) and reserved > 0
            and nfats in (1, 2)):
        raise _Garbage(f"FAT boot sector with impossible fields at offset {p.region.start}")
    total = total16 or total32
    if fat16 == 0:              # FAT32: the FAT size moves to the extended BPB
        fat_size = struct.unpack_from("<I", bs, 36)[0]
        serial, label = struct.unpack_from("<I", bs, 67)[0], bs[71:82]
    else:
        fat_size = fat16
        serial, label = struct.unpack_from("<I", bs, 39)[0], bs[43:54]
    root_sectors = (root_entries * 32 + bps - 1) // bps
    data_sectors = total - reserved - nfats * fat_size - root_sectors
    if total == 0 or fat_size == 0 or data_sectors <= 0:
        raise _Garbage(f"FAT boot sector with impossible sizes at offset {p.region.start}")
    clusters = data_sectors // spc
    # the FAT type follows from the cluster count alone (Microsoft's FAT specification)
    variant = "FAT12" if clusters < 4085 else "FAT16" if clusters < 65525 else "FAT32"
    lab = _text(label)
    if lab == "NO NAME":
        lab = None
    return FsInfo("vfat", lab, f"{serial >> 16:04X}-{serial & 0xFFFF:04X}", variant,
                  bps * spc)


def _xfs(p: _Probe) -> FsInfo | None:
    sb = p.at(0, 512)
    if sb[:4] != b"XFSB":
        return None
    blocksize = struct.unpack_from(">I", sb, 4)[0]
    if not (_is_pow2(blocksize) and 512 <= blocksize <= 65536):
        raise _Garbage(f"XFS superblock with block size {blocksize} at offset {p.region.start}")
    version = struct.unpack_from(">H", sb, 100)[0] & 0xF
    return FsInfo("xfs", _text(sb[108:120]), _uuid(sb[32:48]), f"V{version}", blocksize)


def _ext(p: _Probe) -> FsInfo | None:
    sb = p.at(1024, 1024)
    if struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return None
    log_block = struct.unpack_from("<I", sb, 0x18)[0]
    inodes, blocks = struct.unpack_from("<II", sb, 0)
    rev = struct.unpack_from("<I", sb, 0x4C)[0]
    if log_block > 6 or inodes == 0 or blocks == 0 or rev > 1:
        raise _Garbage(f"ext superblock magic with impossible fields (log block size {log_block}, "
                       f"{inodes} inodes, revision {rev}) at offset {p.region.start + 1024}")
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    if incompat & EXT_INCOMPAT_JOURNAL_DEV:
        return None             # an external journal device, not a filesystem
    if compat & EXT_COMPAT_HAS_JOURNAL:
        kind = "ext3"
        if incompat & ~EXT3_INCOMPAT_SUPP or ro_compat & ~EXT3_RO_COMPAT_SUPP:
            kind = "ext4"
    elif incompat & ~EXT2_INCOMPAT_SUPP or ro_compat & ~EXT3_RO_COMPAT_SUPP:
        kind = "ext4"           # ext4 without a journal
    else:
        kind = "ext2"
    return FsInfo(kind, _text(sb[0x78:0x88]), _uuid(sb[0x68:0x78]), block_size=1024 << log_block)


def _btrfs(p: _Probe) -> FsInfo | None:
    sb = p.at(0x10000, 4096)
    if sb[0x40:0x48] != b"_BHRfS_M":
        return None
    sectorsize, nodesize = struct.unpack_from("<II", sb, 0x90)
    if not (_is_pow2(sectorsize) and _is_pow2(nodesize) and 4096 <= nodesize <= 65536):
        raise _Garbage(f"Btrfs superblock with impossible sizes at offset {p.region.start + 0x10000}")
    return FsInfo("btrfs", _text(sb[0x12B:0x22B]), _uuid(sb[0x20:0x30]), block_size=sectorsize)


def _jfs(p: _Probe) -> FsInfo | None:
    sb = p.at(0x8000, 512)
    if sb[:4] != b"JFS1":
        return None
    bsize = struct.unpack_from("<I", sb, 24)[0]
    if not (_is_pow2(bsize) and 512 <= bsize <= 65536):
        raise _Garbage(f"JFS superblock with block size {bsize} at offset {p.region.start + 0x8000}")
    label = _text(sb[152:168]) or _text(sb[101:112])
    return FsInfo("jfs", label, _uuid(sb[136:152]), block_size=bsize)


def _swap(p: _Probe) -> FsInfo | None:
    for page in (4096, 8192, 16384, 65536):
        magic = p.at(page - 10, 10)
        if magic in (b"SWAPSPACE2", b"SWAP-SPACE"):
            if magic == b"SWAP-SPACE":
                return FsInfo("swap", variant="1")
            hdr = p.at(1024, 44)
            version = struct.unpack_from("<I", hdr, 0)[0]
            if version != 1 and struct.unpack_from(">I", hdr, 0)[0] != 1:
                raise _Garbage(f"swap signature with version {version} at offset {p.region.start}")
            return FsInfo("swap", _text(hdr[28:44]), _uuid(hdr[12:28]), "2", page)
    return None


def _lvm2(p: _Probe) -> FsInfo | None:
    for sector in range(4):
        lab = p.at(sector * 512, 512)
        if lab[:8] != b"LABELONE":
            continue
        if lab[24:32] != b"LVM2 001":
            return None
        offset = struct.unpack_from("<I", lab, 20)[0]
        if not 32 <= offset <= 512 - 32:
            raise _Garbage(f"LVM2 label with header offset {offset} at offset "
                           f"{p.region.start + sector * 512}")
        raw = lab[offset:offset + 32].decode("ascii", "replace")
        # LVM prints PV UUIDs in groups of 6-4-4-4-4-4-6 characters
        groups, pos, parts = (6, 4, 4, 4, 4, 4, 6), 0, []
        for g in groups:
            parts.append(raw[pos:pos + g])
            pos += g
        return FsInfo("lvm2", None, "-".join(parts), "LVM2 001")
    return None
