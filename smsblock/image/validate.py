"""Validation of an inspected disk against the image rules (the SMS user guide's).

Each rule gives a :class:`~.findings.Finding` with a severity and a plain reason:
MBR partitioning (GPT refused), Windows on NTFS, a Linux root on ext2/3/4, Btrfs, JFS or
XFS, GRUB legacy or GRUB 2 for Linux, and the OS and version on the supported list.
``allow_unsupported`` turns the OS-list errors into warnings.
"""

from __future__ import annotations

from . import bootcode
from .findings import ERROR, INFO, WARNING, Finding
from .inspect import InspectionReport, inspect_disk
from .rules import REFUSED, SUPPORTED, Rules, load_rules

#: codes of the findings ``allow_unsupported`` relaxes from error to warning
OS_LIST_CODES = ("os-unsupported", "os-refused", "os-not-found")
# Linux root filesystems whose files OS detection reads (osdetect.py); others are only identified
READABLE_LINUX_ROOTS = ("ext2", "ext3", "ext4", "xfs", "btrfs")


def validate(report: InspectionReport, *, rules: Rules | None = None,
             allow_unsupported: bool = False) -> list[Finding]:
    """The validation findings for ``report`` (inspection's own findings not included)."""
    rules = rules or load_rules()
    out: list[Finding] = []
    add = out.append

    if report.partition_table == "gpt":
        add(Finding(ERROR, "gpt-not-supported",
                    "The disk is partitioned with GPT; imported images must use MBR partitioning "
                    "(legacy BIOS boot). Convert the disk to MBR before importing it."))
    elif report.partition_table == "none":
        add(Finding(ERROR, "no-partition-table",
                    "The disk has no MBR partition table, so it cannot boot with legacy BIOS."))
    else:
        add(Finding(INFO, "mbr", "The disk uses MBR partitioning."))

    os_info = report.os
    if os_info is None:
        fs_seen = sorted({p.filesystem for p in report.partitions if p.filesystem})
        # allowed Linux roots whose files smsblock cannot read (JFS): the OS may be there
        unread = [fs for fs in fs_seen if fs in rules.linux_root_filesystems
                  and fs not in READABLE_LINUX_ROOTS]
        if unread:
            add(Finding(WARNING, "os-not-read",
                        f"No operating system was recognised, but the disk has a {unread[0]} "
                        "filesystem, which may hold a Linux root that smsblock cannot read; the "
                        "operating system and version were not checked against the supported list."))
            if report.boot_code not in rules.linux_bootloaders:
                found = report.boot_code_detail or report.boot_code
                add(Finding(ERROR, "bootloader-unsupported",
                            f"The MBR boot code is {found}, not GRUB; Linux disks must boot with "
                            "GRUB legacy or GRUB 2 installed in the MBR."))
        else:
            readable = ", ".join(fs for fs in rules.linux_root_filesystems if fs in READABLE_LINUX_ROOTS)
            add(Finding(ERROR, "os-not-found",
                        "No operating system was found on the disk "
                        f"(filesystems seen: {', '.join(fs_seen) or 'none'}); only Windows on NTFS "
                        f"and Linux with a root filesystem on {readable} can be recognised."))
        if report.boot_code == bootcode.WINDOWS and "ntfs" not in fs_seen:
            add(Finding(ERROR, "windows-not-ntfs",
                        "The disk has Windows boot code but no NTFS partition; Windows must be "
                        "installed on NTFS."))
    elif os_info.family == "linux":
        _linux(report, rules, add)
    else:
        _windows(report, rules, add)

    if os_info is not None and not os_info.architecture:
        add(Finding(WARNING, "architecture-unknown",
                    "The processor architecture could not be determined; x86_64 is assumed."))

    if allow_unsupported:
        out = [Finding(WARNING, f.code, f"{f.message} (accepted: --allow-unsupported)")
               if f.code in OS_LIST_CODES and f.severity == ERROR else f for f in out]
    return out


def _os_list(verdict, add) -> None:
    if verdict.status == SUPPORTED:
        add(Finding(INFO, "os-supported", verdict.reason))
        if verdict.unchecked:
            add(Finding(WARNING, "os-edition-unknown", verdict.unchecked))
    elif verdict.status == REFUSED:
        add(Finding(ERROR, "os-refused", verdict.reason))
    else:
        add(Finding(ERROR, "os-unsupported", verdict.reason))


def _linux(report: InspectionReport, rules: Rules, add) -> None:
    os_info = report.os
    root_fs = os_info.root_filesystem
    if root_fs not in rules.linux_root_filesystems:
        add(Finding(ERROR, "linux-root-filesystem",
                    f"The Linux root filesystem is {root_fs}; it must be one of "
                    f"{', '.join(rules.linux_root_filesystems)}."))
    if report.boot_code not in rules.linux_bootloaders:
        found = report.boot_code_detail or report.boot_code
        add(Finding(ERROR, "bootloader-unsupported",
                    f"The MBR boot code is {found}, not GRUB; Linux disks must boot with GRUB "
                    "legacy or GRUB 2 installed in the MBR."))
    _os_list(rules.check_linux(os_info.distribution, os_info.version, os_info.architecture), add)


def _windows(report: InspectionReport, rules: Rules, add) -> None:
    os_info = report.os
    if os_info.root_filesystem not in rules.windows_filesystems:
        add(Finding(ERROR, "windows-not-ntfs",
                    f"Windows is on {os_info.root_filesystem}; it must be on NTFS."))
    if report.boot_code not in rules.windows_bootloaders:
        found = report.boot_code_detail or report.boot_code
        add(Finding(WARNING, "bootloader-not-windows",
                    f"The MBR boot code is {found}, not the Windows MBR; the image may not boot."))
    if report.partition_table == "mbr" and not any(p.bootable for p in report.partitions):
        add(Finding(ERROR, "no-active-partition",
                    "No partition is marked active (bootable); the Windows MBR boots only the "
                    "active partition."))
    _os_list(rules.check_windows(os_info.distribution, os_info.edition, os_info.service_pack,
                                 os_info.architecture), add)


def inspect_and_validate(disk, *, rules: Rules | None = None, allow_unsupported: bool = False,
                         source: str | None = None) -> InspectionReport:
    """Inspect ``disk`` and append the validation findings; ``report.ok`` says if it passes."""
    report = inspect_disk(disk, source=source)
    report.findings.extend(validate(report, rules=rules, allow_unsupported=allow_unsupported))
    return report
