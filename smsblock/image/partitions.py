"""Partition tables: MBR (primary, extended, logical) and GPT, read defensively.

Every field read from the disk is checked before it is trusted: partitions that overlap or
run past the end of the disk, extended chains that loop or leave their container, GPT
headers with bad CRCs, all become :class:`~.findings.Finding` objects instead of
exceptions, so a damaged disk is still described as far as it can be.  Only the sectors
holding the tables are read (sector 0, each EBR, the GPT headers and entry arrays).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field

from .findings import ERROR, INFO, WARNING, Finding
from .region import Region

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
EXTENDED_TYPES = {0x05, 0x0F, 0x85}
PROTECTIVE_TYPE = 0xEE
MAX_LOGICAL = 128                  # Linux reads at most this many; more means a broken chain
GPT_SIGNATURE = b"EFI PART"
GPT_MAX_ENTRIES_BYTES = 4 << 20    # far above any real table (128 x 128 B = 16 KiB)
MAX_OVERLAP_FINDINGS = 32

MBR_TYPE_NAMES = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "NTFS/exFAT",
    0x0B: "FAT32", 0x0C: "FAT32 (LBA)", 0x0E: "FAT16 (LBA)", 0x0F: "Extended (LBA)",
    0x27: "Windows recovery", 0x42: "Windows dynamic", 0x82: "Linux swap", 0x83: "Linux",
    0x85: "Linux extended", 0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xEE: "GPT protective",
    0xEF: "EFI system", 0xFD: "Linux RAID",
}
GPT_TYPE_NAMES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI system",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
}


@dataclass(slots=True)
class Partition:
    """One partition: ``start`` and ``size`` in bytes, ``type`` as "0x83" (MBR) or a GUID."""

    number: int
    start: int
    size: int
    type: str
    bootable: bool = False
    kind: str = "primary"          # primary, extended, logical, gpt, whole-disk
    name: str | None = None        # GPT partition name
    uuid: str | None = None        # GPT unique partition GUID (not the filesystem's)

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def type_name(self) -> str | None:
        if self.type.startswith("0x"):
            return MBR_TYPE_NAMES.get(int(self.type, 16))
        return GPT_TYPE_NAMES.get(self.type)

    @property
    def is_container(self) -> bool:
        return self.kind == "extended"


@dataclass(slots=True)
class PartitionTable:
    """What the disk's partition table says: ``kind`` is "mbr", "gpt" or "none"."""

    kind: str
    partitions: list[Partition] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sector_size: int = SECTOR
    disk_id: str | None = None     # MBR disk signature (hex) or GPT disk GUID


def read_partition_table(disk, *, vbr_check=None) -> PartitionTable:
    """Read the MBR (and the GPT behind a protective MBR) of ``disk``.

    ``vbr_check(sector0) -> bool`` tells whether sector 0 is a filesystem's own boot
    sector (a bare NTFS or FAT volume also ends in 55 AA); such a disk has no table.
    """
    region = Region(disk)
    sector0 = region.pread_exact(0, SECTOR)
    if disk.size < SECTOR:
        return PartitionTable("none", findings=[Finding(
            WARNING, "disk-too-small", f"The disk is only {disk.size} bytes, smaller than one sector.")])
    if sector0[510:512] != MBR_SIGNATURE:
        return PartitionTable("none")
    if vbr_check is not None and vbr_check(sector0):
        return PartitionTable("none")
    entries = _mbr_entries(sector0)
    if any(status not in (0x00, 0x80) for status, ptype, _s, _n in entries if ptype != 0):
        # not a partition table: boot flags must be 0x00 or 0x80 (Linux's own test)
        return PartitionTable("none", findings=[Finding(
            INFO, "mbr-invalid", "Sector 0 ends in 55 AA but its partition entries are not "
            "valid (boot flags other than 0x00/0x80); no partition table is assumed.")])
    if any(ptype == PROTECTIVE_TYPE for _, ptype, _s, _n in entries):
        return _read_gpt(region, entries)
    return _read_mbr(region, sector0, entries)


# --- MBR -----------------------------------------------------------------------

def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """The four (status, type, start LBA, sector count) entries of an MBR or EBR."""
    out = []
    for i in range(4):
        e = sector[446 + 16 * i: 462 + 16 * i]
        status, ptype = e[0], e[4]
        start, count = struct.unpack_from("<II", e, 8)
        out.append((status, ptype, start, count))
    return out


def _read_mbr(region: Region, sector0: bytes, entries) -> PartitionTable:
    table = PartitionTable("mbr", disk_id=f"{struct.unpack_from('<I', sector0, 440)[0]:08x}")
    findings = table.findings
    extended: Partition | None = None
    for i, (status, ptype, start, count) in enumerate(entries):
        if ptype == 0:
            continue
        number = i + 1
        if count == 0:
            findings.append(Finding(WARNING, "partition-empty",
                                    f"Partition {number} (type 0x{ptype:02x}) has a size of zero; ignored."))
            continue
        part = Partition(number, start * SECTOR, count * SECTOR, f"0x{ptype:02x}",
                         bootable=status == 0x80,
                         kind="extended" if ptype in EXTENDED_TYPES else "primary")
        table.partitions.append(part)
        if part.is_container:
            if extended is None:
                extended = part
            else:
                findings.append(Finding(WARNING, "extended-multiple",
                                        f"Partition {number} is a second extended partition; only "
                                        f"partition {extended.number}'s logical partitions are read."))
    if extended is not None:
        table.partitions.extend(_read_logical(region, extended, findings))
    _check_bounds(table, region.size)
    return table


def _read_logical(region: Region, ext: Partition, findings: list[Finding]) -> list[Partition]:
    """Walk the chain of extended boot records inside ``ext``, guarding against loops."""
    out: list[Partition] = []
    ext_lba = ext.start // SECTOR
    ext_end_lba = ext.end // SECTOR
    ebr_lba = ext_lba
    seen: set[int] = set()
    number = 5
    while True:
        if ebr_lba in seen:
            findings.append(Finding(ERROR, "extended-loop",
                                    f"The extended partition's chain of boot records loops back to "
                                    f"sector {ebr_lba}; logical partitions after it are ignored."))
            break
        if len(out) >= MAX_LOGICAL:
            findings.append(Finding(ERROR, "extended-too-many",
                                    f"The extended partition chain has more than {MAX_LOGICAL} "
                                    "logical partitions; the rest are ignored."))
            break
        if not ext_lba <= ebr_lba < ext_end_lba:
            findings.append(Finding(ERROR, "ebr-out-of-bounds",
                                    f"An extended boot record points to sector {ebr_lba}, outside the "
                                    f"extended partition (sectors {ext_lba}-{ext_end_lba - 1}); "
                                    "logical partitions after it are ignored."))
            break
        seen.add(ebr_lba)
        ebr = region.pread_exact(ebr_lba * SECTOR, SECTOR)
        if ebr[510:512] != MBR_SIGNATURE:
            if ebr_lba != ext_lba or any(ebr):
                findings.append(Finding(ERROR, "ebr-bad-signature",
                                        f"The extended boot record at sector {ebr_lba} lacks the 55 AA "
                                        "signature; logical partitions from there on are ignored."))
            break
        e = _mbr_entries(ebr)
        status, ptype, rel, count = e[0]
        if ptype != 0 and count > 0:
            start_lba = ebr_lba + rel
            part = Partition(number, start_lba * SECTOR, count * SECTOR, f"0x{ptype:02x}",
                             bootable=status == 0x80, kind="logical")
            if part.start < ext.start or part.end > ext.end:
                findings.append(Finding(ERROR, "logical-outside-extended",
                                        f"Logical partition {number} (sectors {start_lba}-"
                                        f"{start_lba + count - 1}) lies outside its extended partition "
                                        f"(sectors {ext_lba}-{ext_end_lba - 1})."))
            out.append(part)
            number += 1
        _, ntype, nrel, ncount = e[1]
        if ntype not in EXTENDED_TYPES or ncount == 0:
            break
        ebr_lba = ext_lba + nrel
    return out


# --- GPT -----------------------------------------------------------------------

@dataclass(slots=True)
class _GptHeader:
    lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entries_lba: int
    n_entries: int
    entry_size: int
    entries: bytes


def _read_gpt(region: Region, mbr_entries) -> PartitionTable:
    # 512-byte sectors unless the primary header sits at 4096 (a 4Kn disk); when no header
    # is valid with the first guess, the other size is tried (a 4Kn disk whose primary
    # header is damaged has its backup in the last 4 KiB)
    sizes = (SECTOR, 4096)
    if region.pread_exact(SECTOR, 8) != GPT_SIGNATURE and region.pread_exact(4096, 8) == GPT_SIGNATURE:
        sizes = (4096, SECTOR)
    sector_size = sizes[0]
    header, findings = _gpt_pick_header(region, sector_size)
    if header is None:
        header, other_findings = _gpt_pick_header(region, sizes[1])
        if header is None:
            return PartitionTable("gpt", findings=findings, sector_size=sector_size)
        sector_size, findings = sizes[1], other_findings
    if len([t for _, t, _s, _n in mbr_entries if t != 0]) > 1:
        findings.append(Finding(INFO, "gpt-hybrid-mbr",
                                "The protective MBR also lists other partitions (a hybrid MBR)."))
    table = PartitionTable("gpt", findings=findings, sector_size=sector_size, disk_id=header.disk_guid)
    for i in range(header.n_entries):
        e = header.entries[i * header.entry_size:(i + 1) * header.entry_size]
        type_raw = e[0:16]
        if type_raw == bytes(16):
            continue
        first, last, attrs = struct.unpack_from("<QQQ", e, 32)
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        number = i + 1
        if last < first:
            findings.append(Finding(ERROR, "partition-negative-size",
                                    f"GPT partition {number} ends (LBA {last}) before it starts "
                                    f"(LBA {first}); ignored."))
            continue
        part = Partition(number, first * sector_size, (last - first + 1) * sector_size,
                         str(uuid.UUID(bytes_le=type_raw)), bootable=bool(attrs & 4), kind="gpt",
                         name=name or None, uuid=str(uuid.UUID(bytes_le=e[16:32])))
        if first < header.first_usable or last > header.last_usable:
            findings.append(Finding(WARNING, "gpt-outside-usable",
                                    f"GPT partition {number} (LBA {first}-{last}) lies outside the "
                                    f"usable area (LBA {header.first_usable}-{header.last_usable})."))
        table.partitions.append(part)
    _check_bounds(table, region.size)
    return table


def _gpt_pick_header(region: Region, sector_size: int):
    """(header, findings): the primary GPT header, else the backup; (None, [error])."""
    n_sectors = region.size // sector_size
    primary, why_primary = _gpt_header(region, 1, sector_size, n_sectors)
    backup_lba = primary.alternate_lba if primary is not None else n_sectors - 1
    backup, why_backup = _gpt_header(region, backup_lba, sector_size, n_sectors)
    if backup is None and backup_lba != n_sectors - 1:
        backup, why_backup = _gpt_header(region, n_sectors - 1, sector_size, n_sectors)
    if primary is not None:
        if backup is None:
            return primary, [Finding(WARNING, "gpt-backup-damaged",
                                     f"The backup GPT header is damaged or missing ({why_backup}); "
                                     "the primary header was used.")]
        return primary, []
    if backup is not None:
        return backup, [Finding(WARNING, "gpt-primary-damaged",
                                f"The primary GPT header at LBA 1 is damaged ({why_primary}); the "
                                f"backup header at LBA {backup.lba} was used.")]
    return None, [Finding(ERROR, "gpt-unreadable",
                          f"The disk has a protective MBR but neither GPT header is valid "
                          f"(primary: {why_primary}; backup: {why_backup}).")]


def _gpt_header(region: Region, lba: int, ss: int, n_sectors: int):
    """Parse and verify the GPT header at ``lba``: (header, None) or (None, why not)."""
    if lba <= 0 or lba >= n_sectors:
        return None, f"LBA {lba} is outside the disk"
    raw = region.pread_exact(lba * ss, ss)
    if raw[:8] != GPT_SIGNATURE:
        return None, f"no 'EFI PART' signature at LBA {lba}"
    hsize, hcrc = struct.unpack_from("<II", raw, 12)
    if not 92 <= hsize <= ss:
        return None, f"header size {hsize} out of range at LBA {lba}"
    check = bytearray(raw[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        return None, f"header CRC32 mismatch at LBA {lba}"
    my_lba, alt_lba, first_usable, last_usable = struct.unpack_from("<QQQQ", raw, 24)
    if my_lba != lba:
        return None, f"header at LBA {lba} says it lives at LBA {my_lba}"
    disk_guid = str(uuid.UUID(bytes_le=raw[56:72]))
    entries_lba, n_entries, entry_size, entries_crc = struct.unpack_from("<QIII", raw, 72)
    if entry_size < 128 or entry_size % 8 or n_entries * entry_size > GPT_MAX_ENTRIES_BYTES:
        return None, f"entry array of {n_entries} x {entry_size} bytes is implausible"
    nbytes = n_entries * entry_size
    if entries_lba == 0 or entries_lba * ss + nbytes > n_sectors * ss:
        return None, f"entry array at LBA {entries_lba} lies outside the disk"
    entries = region.pread_exact(entries_lba * ss, nbytes)
    if zlib.crc32(entries) != entries_crc:
        return None, f"partition entry array CRC32 mismatch (array at LBA {entries_lba})"
    return _GptHeader(lba, alt_lba, first_usable, last_usable, disk_guid, entries_lba,
                      n_entries, entry_size, entries), None


# --- checks common to both -------------------------------------------------------

def _check_bounds(table: PartitionTable, disk_size: int) -> None:
    findings = table.findings
    for p in table.partitions:
        if p.end > disk_size:
            findings.append(Finding(ERROR, "partition-past-end",
                                    f"Partition {p.number} ends at byte {p.end}, past the end of "
                                    f"the disk ({disk_size} bytes)."))
        if p.start == 0 and table.kind == "mbr":
            findings.append(Finding(ERROR, "partition-overlaps-table",
                                    f"Partition {p.number} starts at sector 0, over the partition table."))
    # overlaps: containers hold logicals by design, so compare within each level
    levels = [[p for p in table.partitions if p.kind != "logical"],
              [p for p in table.partitions if p.kind == "logical"]]
    overlaps = (pair for group in levels for pair in _overlapping_pairs(group))
    for count, (a, b) in enumerate(overlaps):
        if count == MAX_OVERLAP_FINDINGS:   # a hostile GPT can hold n^2/2 overlapping pairs
            findings.append(Finding(ERROR, "partition-overlap",
                                    f"More partitions overlap; only the first "
                                    f"{MAX_OVERLAP_FINDINGS} overlapping pairs are listed."))
            break
        findings.append(Finding(ERROR, "partition-overlap",
                                f"Partitions {a.number} and {b.number} overlap (bytes "
                                f"{b.start}-{min(a.end, b.end) - 1} belong to both)."))


def _overlapping_pairs(group: list[Partition]):
    """(a, b) for each pair of partitions in ``group`` sharing bytes, by start, lazily."""
    ordered = sorted(group, key=lambda p: (p.start, p.number))
    for a_i, a in enumerate(ordered):
        for b in ordered[a_i + 1:]:
            if b.start >= a.end:
                break
            yield a, b
