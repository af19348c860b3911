"""Whole inspection reports of complete disks built with real tools, the report of a stored
run, and the number of bytes inspection reads from a large sparse disk."""

from __future__ import annotations

import pytest

from image_builders import (DISTROS, GRUB2_BOOT_IMG, CountingDisk, MiB, blkid, fake_root,
                            mkfs_ext, mkfs_simple, mkfs_windows, need_fuse, partition_disk,
                            place, write_boot_code)
from smsblock import open_disk
from smsblock.image.validate import inspect_and_validate

LINUX_LAYOUT = """label: dos
label-id: 0x0badcafe
start=2048, size=16384, type=83, bootable
start=18432, size=4096, type=82
start=22528, size=57344, type=5
start=24576, size=8192, type=e
start=34816, size=36864, type=83
"""


@pytest.fixture(scope="module")
def linux_disk(tmp_path_factory):
    """MBR + GRUB 2 boot.img; 1: ext4 root (CentOS 7.2.1511), 2: swap, 3: extended
    holding 5: FAT16 (vfat) and 6: JFS."""
    d = tmp_path_factory.mktemp("linux")
    disk = d / "linux.img"
    parts = partition_disk(disk, 48 * MiB, LINUX_LAYOUT)
    root = fake_root(d, "centos-7.2.1511")
    images = {1: mkfs_ext(d / "p1.img", "ext4", 8 * MiB, label="rootfs", root=root),
              2: mkfs_simple(d / "p2.img", "swap", 2 * MiB, "swap0"),
              5: mkfs_simple(d / "p5.img", "fat16", 4 * MiB, "BOOTFAT"),
              6: mkfs_simple(d / "p6.img", "jfs", 18 * MiB, "data")}
    starts = {int(p["node"].rsplit("img", 1)[1]): p["start"] * 512 for p in parts}
    for n, img in images.items():
        place(disk, starts[n], img)
    write_boot_code(disk, GRUB2_BOOT_IMG.read_bytes())
    return disk, starts


def _part(number, start, size, ptype, fs, label, uuid, *, bootable=False, kind="primary",
          type_name=None, fs_variant=None):
    return {"number": number, "start": start, "size": size, "type": ptype, "bootable": bootable,
            "filesystem": fs, "label": label, "uuid": uuid, "kind": kind, "type_name": type_name,
            "fs_variant": fs_variant, "name": None}


def test_linux_disk_whole_report(linux_disk):
    disk, starts = linux_disk
    uuid = {n: blkid(disk, off).get("UUID") for n, off in starts.items()}
    with open_disk(disk) as d:
        report = inspect_and_validate(d, source="linux.img").to_dict()
    assert report == {
        "source": "linux.img", "disk_size": 48 * MiB, "partition_table": "mbr",
        "disk_id": "0badcafe",
        "partitions": [
            _part(1, 2048 * 512, 16384 * 512, "0x83", "ext4", "rootfs", uuid[1], bootable=True,
                  type_name="Linux"),
            _part(2, 18432 * 512, 4096 * 512, "0x82", "swap", "swap0", uuid[2],
                  type_name="Linux swap", fs_variant="2"),
            _part(3, 22528 * 512, 57344 * 512, "0x05", None, None, None, kind="extended",
                  type_name="Extended"),
            _part(5, 24576 * 512, 8192 * 512, "0x0e", "vfat", "BOOTFAT", uuid[5], kind="logical",
                  type_name="FAT16 (LBA)", fs_variant="FAT16"),
            _part(6, 34816 * 512, 36864 * 512, "0x83", "jfs", "data", uuid[6], kind="logical",
                  type_name="Linux"),
        ],
        "boot_code": "grub2", "boot_code_detail": None,
        "os": {"family": "linux", "distribution": "centos", "version": "7.2.1511",
               "architecture": "x86_64", "name": "CentOS Linux 7 (Core)", "edition": None,
               "service_pack": None, "root_partition": 1, "root_filesystem": "ext4",
               "sources": ["etc/centos-release", "etc/redhat-release", "etc/os-release"]},
        "findings": [
            {"severity": "info", "code": "mbr", "message": "The disk uses MBR partitioning."},
            {"severity": "info", "code": "os-supported",
             "message": "CentOS 7.2.1511 is on the supported list."},
        ],
        "ok": True,
    }
    assert all(v for n, v in uuid.items() if n != 3)     # blkid found every filesystem


def test_gpt_disk_whole_report(tmp_path):
    disk = tmp_path / "gpt.img"
    parts = partition_disk(disk, 16 * MiB, "label: gpt\nlabel-id: 11111111-2222-3333-4444-555555555555\n"
                                           "start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n"
                                           "start=4096, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\n")
    root = fake_root(tmp_path, "debian-8.0")
    place(disk, 4096 * 512, mkfs_ext(tmp_path / "r.img", "ext3", 8 * MiB, label="deb", root=root))
    write_boot_code(disk, GRUB2_BOOT_IMG.read_bytes())
    with open_disk(disk) as d:
        report = inspect_and_validate(d).to_dict()
    fs_uuid = blkid(disk, 4096 * 512)["UUID"]
    assert report == {
        "source": None, "disk_size": 16 * MiB, "partition_table": "gpt",
        "disk_id": "11111111-2222-3333-4444-555555555555",
        "partitions": [
            {"number": 1, "start": 2048 * 512, "size": 2048 * 512,
             "type": "21686148-6449-6e6f-744e-656564454649", "bootable": False, "filesystem": None,
             "label": None, "uuid": None, "kind": "gpt", "type_name": "BIOS boot", "fs_variant": None,
             "name": None},
            {"number": 2, "start": 4096 * 512, "size": 16384 * 512,
             "type": "0fc63daf-8483-4772-8e79-3d69d8477de4", "bootable": False, "filesystem": "ext3",
             "label": "deb", "uuid": fs_uuid, "kind": "gpt", "type_name": "Linux filesystem",
             "fs_variant": None, "name": "root"},
        ],
        "boot_code": "grub2", "boot_code_detail": None,
        "os": {"family": "linux", "distribution": "debian", "version": "8.0", "architecture": "x86_64",
               "name": "Debian GNU/Linux 8 (jessie)", "edition": None, "service_pack": None,
               "root_partition": 2, "root_filesystem": "ext3",
               "sources": ["etc/os-release", "etc/debian_version"]},
        "findings": [
            {"severity": "error", "code": "gpt-not-supported",
             "message": "The disk is partitioned with GPT; imported images must use MBR partitioning "
                        "(legacy BIOS boot). Convert the disk to MBR before importing it."},
            {"severity": "info", "code": "os-supported",
             "message": "Debian 8.0 is on the supported list."},
        ],
        "ok": False,
    }
    assert parts[1]["name"] == "root"


def test_windows_disk_whole_report(tmp_path):
    need_fuse()
    disk = tmp_path / "win.img"
    partition_disk(disk, 24 * MiB, "label: dos\nlabel-id: 0x5eed5eed\nstart=2048, size=40960, type=7, bootable\n")
    vol = mkfs_windows(tmp_path / "c.img", label="System",
                       values={"ProductName": "Windows Server 2008 R2 Enterprise", "CurrentVersion": "6.1",
                               "CurrentBuildNumber": "7601", "CSDVersion": "Service Pack 1",
                               "EditionID": "ServerEnterprise"}, size=20 * MiB)
    place(disk, 2048 * 512, vol)
    serial = blkid(disk, 2048 * 512)["UUID"]
    with open_disk(disk) as d:
        report = inspect_and_validate(d).to_dict()
    assert report["partitions"] == [_part(1, 2048 * 512, 40960 * 512, "0x07", "ntfs", "System", serial,
                                          bootable=True, type_name="NTFS/exFAT")]
    assert report["boot_code"] == "none"
    assert report["os"] == {"family": "windows", "distribution": "Windows Server 2008 R2 Enterprise",
                            "version": "6.1.7601", "architecture": "x86_64",
                            "name": "Windows Server 2008 R2 Enterprise", "edition": "ServerEnterprise",
                            "service_pack": "Service Pack 1", "root_partition": 1,
                            "root_filesystem": "ntfs", "sources": ["Windows/System32/config/SOFTWARE"]}
    assert report["findings"] == [
        {"severity": "info", "code": "mbr", "message": "The disk uses MBR partitioning."},
        {"severity": "warning", "code": "bootloader-not-windows",
         "message": "The MBR boot code is none, not the Windows MBR; the image may not boot."},
        {"severity": "info", "code": "os-supported",
         "message": "Windows Server 2008 R2 Enterprise is on the supported list."},
    ]
    assert report["ok"] is True


def test_large_sparse_disk_reads_only_what_it_needs(tmp_path, linux_disk):
    """A 64 GiB disk: a root filesystem, swap, and a 63 GiB partition. Inspection reads
    the tables, superblocks and the few files it looks for: well under 1 MiB."""
    disk = tmp_path / "big.img"
    partition_disk(disk, 64 << 30, "label: dos\nstart=2048, size=16384, type=83, bootable\n"
                                   "start=18432, size=4096, type=82\nstart=22528, type=83\n")
    src, starts = linux_disk
    with open(src, "rb") as f:
        for n in (1, 2):
            f.seek(starts[n])
            chunk = f.read({1: 8 * MiB, 2: 2 * MiB}[n])
            with open(disk, "r+b") as out:
                out.seek(starts[n])
                out.write(chunk)
    write_boot_code(disk, GRUB2_BOOT_IMG.read_bytes())
    with open_disk(disk) as raw:
        counting = CountingDisk(raw)
        report = inspect_and_validate(counting)
    assert report.ok and report.os.version == "7.2.1511"
    assert report.partitions[2].size > 63 << 30 and report.partitions[2].filesystem is None
    print(f"inspected 64 GiB disk: {counting.bytes_read} bytes in {counting.reads} reads")
    assert counting.bytes_read < 1 * MiB, counting.bytes_read
    assert counting.reads < 400, counting.reads


def test_stored_run_inspects_like_the_file(tmp_path, linux_disk):
    from smsblock.engine import replicate
    from smsblock.store import open_store

    disk, _ = linux_disk
    store_dir = tmp_path / "store"
    with open_disk(disk) as d:
        replicate(d, str(store_dir), "srv-1")
        want = inspect_and_validate(d).to_dict()
    store = open_store(str(store_dir))
    with store.run_disk("srv-1") as run:
        got = inspect_and_validate(run).to_dict()
    assert got == want


def _one_partition_disk(tmp_path, distro, kind, boot_code):
    disk = tmp_path / "d.img"
    partition_disk(disk, 12 * MiB, "label: dos\nstart=2048, type=83, bootable\n")
    place(disk, 2048 * 512, mkfs_ext(tmp_path / "r.img", kind, 8 * MiB, label="root",
                                     root=fake_root(tmp_path, distro)))
    write_boot_code(disk, boot_code)
    return disk


def _one_partition_report(disk, distro, kind, boot_code, findings) -> dict:
    """The whole report of a disk from :func:`_one_partition_disk` (blkid as oracle)."""
    dist, version, pretty = DISTROS[distro]["expect"]
    return {
        "source": None, "disk_size": 12 * MiB, "partition_table": "mbr",
        "disk_id": blkid(disk)["PTUUID"],
        "partitions": [_part(1, 2048 * 512, (12 * MiB) - 2048 * 512, "0x83", kind, "root",
                             blkid(disk, 2048 * 512)["UUID"], bootable=True, type_name="Linux")],
        "boot_code": boot_code, "boot_code_detail": None,
        "os": {"family": "linux", "distribution": dist, "version": version, "architecture": "x86_64",
               "name": pretty, "edition": None, "service_pack": None, "root_partition": 1,
               "root_filesystem": kind, "sources": DISTROS[distro]["sources"]},
        "findings": [{"severity": "info", "code": "mbr", "message": "The disk uses MBR partitioning."}]
                    + [{"severity": sev, "code": code, "message": msg} for sev, code, msg in findings],
        "ok": all(sev != "error" for sev, _, _ in findings),
    }


def test_grub_legacy_centos6_is_importable(tmp_path):
    from image_builders import GRUB_LEGACY_STAGE1
    disk = _one_partition_disk(tmp_path, "centos-6.5", "ext3", GRUB_LEGACY_STAGE1.read_bytes())
    with open_disk(disk) as d:
        r = inspect_and_validate(d)
    assert r.to_dict() == _one_partition_report(disk, "centos-6.5", "ext3", "grub-legacy", [
        ("info", "os-supported", "CentOS 6.5 is on the supported list.")])


def test_unsupported_os_and_allow_unsupported(tmp_path):
    disk = _one_partition_disk(tmp_path, "ubuntu-18.04", "ext4", GRUB2_BOOT_IMG.read_bytes())
    with open_disk(disk) as d:
        strict = inspect_and_validate(d)
        relaxed = inspect_and_validate(d, allow_unsupported=True)
    why = "Ubuntu 18.04 is not on the supported list (supported Ubuntu versions: 12.04-16.10)."
    assert strict.to_dict() == _one_partition_report(disk, "ubuntu-18.04", "ext4", "grub2", [
        ("error", "os-unsupported", why)])
    assert relaxed.to_dict() == _one_partition_report(disk, "ubuntu-18.04", "ext4", "grub2", [
        ("warning", "os-unsupported", f"{why} (accepted: --allow-unsupported)")])


def test_refused_rhel60_and_no_bootloader(tmp_path):
    disk = _one_partition_disk(tmp_path, "rhel-6.0", "ext4", bytes(440))
    with open_disk(disk) as d:
        r = inspect_and_validate(d)
    assert r.to_dict() == _one_partition_report(disk, "rhel-6.0", "ext4", "none", [
        ("error", "bootloader-unsupported", "The MBR boot code is none, not GRUB; Linux disks must "
                                            "boot with GRUB legacy or GRUB 2 installed in the MBR."),
        ("error", "os-refused", "Red Hat Enterprise Linux 6.0 is refused: RHEL 6.0 lacks the "
                                "drivers needed to boot in the cloud.")])


def test_bare_fat_volume_is_not_an_mbr(tmp_path):
    """A FAT boot sector also ends in 55 AA; it must not be read as a partition table."""
    img = mkfs_simple(tmp_path / "fat.img", "fat16", 16 * MiB, "BARE")
    with open_disk(img) as d:
        r = inspect_and_validate(d)
    assert r.partition_table == "none" and r.boot_code == "none"
    assert [(p.number, p.kind, p.filesystem, p.label, p.fs_variant) for p in r.partitions] == \
        [(0, "whole-disk", "vfat", "BARE", "FAT16")]
    assert [f.code for f in r.findings] == ["bare-filesystem", "no-partition-table", "os-not-found"]


@pytest.mark.parametrize("size", [0, 1, 511, 512, 4096])
def test_tiny_disks(size):
    from test_image_partitions import BytesDisk
    r = inspect_and_validate(BytesDisk(b"\x55\xaa" * (size // 2)))
    assert r.partition_table == "none" and r.os is None and not r.ok


def test_missing_fuse_fails_in_ci_and_skips_elsewhere(monkeypatch):
    """The NTFS tests need a FUSE mount; in CI its absence must fail, not skip silently."""
    import image_builders
    monkeypatch.setattr(image_builders, "fuse_available", lambda: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must provide"):
        image_builders.need_fuse()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        image_builders.need_fuse()
