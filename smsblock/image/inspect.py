"""Inspect a disk: partition table, filesystems, MBR boot code, operating system.

:func:`inspect_disk` reads only what it needs: sector 0, extended boot records, GPT
headers and entries, a few KiB of superblocks per partition, and the blocks the
filesystem libraries touch to find a handful of small files.  Anything damaged becomes a
finding; nothing read from the disk can make it raise (only the disk's own I/O errors do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import bootcode
from .filesystems import identify, looks_like_boot_sector
from .findings import ERROR, INFO, WARNING, Finding, has_errors
from .fsreaders import Unreadable, ntfs_label, open_linux_reader, open_ntfs
from .osdetect import LINUX_READABLE, OsInfo, detect_linux, detect_windows
from .partitions import Partition, read_partition_table
from .region import Region

# far above any real disk (GPT's usual table holds 128); a hostile table can list 32768
MAX_INSPECTED_PARTITIONS = 256
MAX_OTHER_OS_NAMED = 8


@dataclass(slots=True)
class PartitionReport:
    """A partition and the filesystem found in it (``start`` and ``size`` in bytes)."""

    number: int
    start: int
    size: int
    type: str | None
    bootable: bool
    filesystem: str | None = None
    label: str | None = None
    uuid: str | None = None
    kind: str = "primary"
    type_name: str | None = None
    fs_variant: str | None = None
    name: str | None = None

    def to_dict(self) -> dict:
        return {"number": self.number, "start": self.start, "size": self.size, "type": self.type,
                "bootable": self.bootable, "filesystem": self.filesystem, "label": self.label,
                "uuid": self.uuid, "kind": self.kind, "type_name": self.type_name,
                "fs_variant": self.fs_variant, "name": self.name}


@dataclass(slots=True)
class InspectionReport:
    """Everything inspection found; ``findings`` include validation once validated."""

    disk_size: int
    partition_table: str
    partitions: list[PartitionReport] = field(default_factory=list)
    boot_code: str = bootcode.NONE
    boot_code_detail: str | None = None
    os: OsInfo | None = None
    findings: list[Finding] = field(default_factory=list)
    source: str | None = None
    disk_id: str | None = None

    @property
    def ok(self) -> bool:
        return not has_errors(self.findings)

    def to_dict(self) -> dict:
        return {"source": self.source, "disk_size": self.disk_size,
                "partition_table": self.partition_table, "disk_id": self.disk_id,
                "partitions": [p.to_dict() for p in self.partitions],
                "boot_code": self.boot_code, "boot_code_detail": self.boot_code_detail,
                "os": self.os.to_dict() if self.os else None,
                "findings": [f.to_dict() for f in self.findings], "ok": self.ok}


def inspect_disk(disk, *, source: str | None = None) -> InspectionReport:
    """Describe ``disk`` (any :class:`~smsblock.disk.Disk`); see the module docstring."""
    whole = Region(disk)
    sector0 = whole.pread_exact(0, 512)
    table = read_partition_table(disk, vbr_check=looks_like_boot_sector)
    report = InspectionReport(disk.size, table.kind, source=source, disk_id=table.disk_id)
    report.findings.extend(table.findings)
    if table.kind != "none":
        code = bootcode.classify(sector0)
        report.boot_code, report.boot_code_detail = code.kind, code.detail

    entries: list[tuple[PartitionReport, Region]] = []
    skipped = 0
    if table.kind == "none":
        info, found = identify(whole)
        report.findings.extend(found)
        if info is not None:
            entries.append((PartitionReport(0, 0, disk.size, None, False, info.type, info.label,
                                            info.uuid, "whole-disk", fs_variant=info.variant), whole))
            report.findings.append(Finding(INFO, "bare-filesystem",
                                           f"The disk holds a bare {info.type} filesystem without a "
                                           "partition table."))
        elif disk.size >= 512:
            report.findings.append(Finding(WARNING, "no-partition-table",
                                           "The disk has neither a partition table nor a filesystem "
                                           "that could be recognised."))
    for part in table.partitions:
        rep = _partition_report(part)
        report.partitions.append(rep)
        if part.is_container or part.start >= disk.size:
            continue
        if len(entries) >= MAX_INSPECTED_PARTITIONS:
            skipped += 1
            continue
        region = Region(disk, part.start, min(part.size, disk.size - part.start))
        info, found = identify(region)
        report.findings.extend(_with_partition(found, part.number))
        if info is not None:
            rep.filesystem, rep.label, rep.uuid, rep.fs_variant = info.type, info.label, info.uuid, info.variant
        entries.append((rep, region))
    if skipped:
        report.findings.append(Finding(WARNING, "partitions-not-inspected",
                                       f"The table lists {len(entries) + skipped} partitions; the "
                                       f"filesystems of the {skipped} after the first "
                                       f"{MAX_INSPECTED_PARTITIONS} are not looked at."))
    report.partitions.extend(rep for rep, _ in entries if rep.kind == "whole-disk")
    report.os = _detect_os(entries, report.findings)
    return report


def _partition_report(part: Partition) -> PartitionReport:
    return PartitionReport(part.number, part.start, part.size, part.type, part.bootable,
                           kind=part.kind, type_name=part.type_name, name=part.name)


def _with_partition(findings, number):
    return [Finding(f.severity, f.code, f"Partition {number}: {f.message}") for f in findings]


def _where(rep: PartitionReport) -> str:
    return "The disk's filesystem" if rep.kind == "whole-disk" else f"Partition {rep.number}"


def _detect_os(entries, findings: list[Finding]) -> OsInfo | None:
    """The first operating system found, bootable partitions first."""
    found: list[OsInfo] = []
    for rep, region in sorted(entries, key=lambda e: (not e[0].bootable, e[0].number)):
        fs = rep.filesystem
        try:
            if fs in LINUX_READABLE:
                info, more = detect_linux(open_linux_reader(fs, region))
            elif fs == "ntfs":
                volume = open_ntfs(region)
                rep.label = ntfs_label(volume)
                info, more = detect_windows(volume)
            else:
                continue
        except Unreadable as e:
            findings.append(Finding(WARNING, "fs-unreadable",
                                    f"{_where(rep)} ({fs}) could not be read to look for an "
                                    f"operating system: {e}."))
            continue
        except Exception as e:   # a library failing mid-lookup on damaged metadata
            findings.append(Finding(WARNING, "fs-unreadable",
                                    f"{_where(rep)} ({fs}) could not be read to look for an "
                                    f"operating system: {type(e).__name__}: {e}."))
            continue
        findings.extend(more)
        if info is not None:
            info.root_partition, info.root_filesystem = rep.number, fs
            found.append(info)
    if len(found) > 1:
        rest = ", ".join(f"{o.distribution} {o.version or ''} on partition {o.root_partition}".strip()
                         for o in found[1:1 + MAX_OTHER_OS_NAMED])
        if len(found) > 1 + MAX_OTHER_OS_NAMED:
            rest += f" and {len(found) - 1 - MAX_OTHER_OS_NAMED} more"
        findings.append(Finding(INFO, "os-multiple",
                                f"More than one operating system was found; the one on partition "
                                f"{found[0].root_partition} was taken (also: {rest})."))
    if any(rep.filesystem == "lvm2" for rep, _ in entries) and not found:
        findings.append(Finding(INFO, "lvm-not-inspected",
                                "An LVM2 physical volume is present; logical volumes are not "
                                "looked into, so a root filesystem inside LVM is not seen."))
    return found[0] if found else None


__all__ = ["inspect_disk", "InspectionReport", "PartitionReport", "ERROR", "WARNING", "INFO"]
