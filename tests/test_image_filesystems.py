"""Superblock identification on filesystems the real mkfs tools made, with blkid as oracle;
MBR boot code from GRUB's own images."""

from __future__ import annotations

import struct

import pytest

from image_builders import (GRUB2_BOOT_IMG, GRUB_LEGACY_STAGE1, MiB, SYSLINUX_MBR, blkid,
                            mkfs_btrfs, mkfs_ext, mkfs_simple, mkfs_xfs, patch, run, sparse_file)
from smsblock import open_disk
from smsblock.image import bootcode
from smsblock.image.filesystems import identify
from smsblock.image.region import Region

BLKID_TYPES = {"LVM2_member": "lvm2"}


@pytest.fixture(scope="module")
def fs_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("fs")
    return {
        "ext2": mkfs_ext(d / "ext2.img", "ext2", 4 * MiB, label="e2"),
        "ext3": mkfs_ext(d / "ext3.img", "ext3", 8 * MiB, label="e3"),
        "ext4": mkfs_ext(d / "ext4.img", "ext4", 8 * MiB, label="root4"),
        "ext4-nojournal": mkfs_ext(d / "ext4nj.img", "ext4", 4 * MiB, label="nj",
                                   extra=["-O", "^has_journal"]),
        "ext3-1k": mkfs_ext(d / "ext31k.img", "ext3", 4 * MiB, label="small", extra=["-b", "1024"]),
        "xfs": mkfs_xfs(d / "xfs.img", label="xfsroot"),
        "btrfs": mkfs_btrfs(d / "btrfs.img", label="broot"),
        "jfs": mkfs_simple(d / "jfs.img", "jfs", 16 * MiB, "jfsvol"),
        "swap": mkfs_simple(d / "swap.img", "swap", 1 * MiB, "swappy"),
        "fat12": mkfs_simple(d / "fat12.img", "fat12", 1 * MiB, "F12"),
        "fat16": mkfs_simple(d / "fat16.img", "fat16", 16 * MiB, "F16"),
        "fat32": mkfs_simple(d / "fat32.img", "fat32", 40 * MiB, "F32"),
        "ntfs": mkfs_simple(d / "ntfs.img", "ntfs", 4 * MiB, "WinVol"),
    }


EXPECTED = {"ext2": ("ext2", None), "ext3": ("ext3", None), "ext4": ("ext4", None),
            "ext4-nojournal": ("ext4", None), "ext3-1k": ("ext3", None), "xfs": ("xfs", "V5"),
            "btrfs": ("btrfs", None), "jfs": ("jfs", None), "swap": ("swap", "2"),
            "fat12": ("vfat", "FAT12"), "fat16": ("vfat", "FAT16"), "fat32": ("vfat", "FAT32"),
            "ntfs": ("ntfs", None)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_identify_matches_blkid(fs_images, name):
    path = fs_images[name]
    oracle = blkid(path)
    with open_disk(path) as d:
        info, findings = identify(Region(d))
    assert findings == []
    assert (info.type, info.variant) == EXPECTED[name]
    assert BLKID_TYPES.get(oracle["TYPE"], oracle["TYPE"]) == info.type
    assert info.uuid is not None and info.uuid.lower() == oracle["UUID"].lower()
    if name == "ntfs":
        assert info.label is None          # NTFS labels live in $Volume: read by libfsntfs later
    else:
        assert info.label == oracle["LABEL"]
    if info.type == "vfat":
        assert info.variant == oracle["VERSION"]


def test_ext_feature_flags_decide_the_version(fs_images):
    """ext3 + an ext4-only feature flag (extents) is ext4; drop the journal flag: ext2."""
    import shutil
    path = fs_images["ext3"].with_name("ext3-mod.img")
    shutil.copy(fs_images["ext3"], path)
    with open(path, "rb") as f:
        f.seek(1024 + 0x5C)
        compat, incompat = struct.unpack("<II", f.read(8))
    patch(path, 1024 + 0x60, struct.pack("<I", incompat | 0x40))
    with open_disk(path) as d:
        assert identify(Region(d))[0].type == "ext4"
    patch(path, 1024 + 0x5C, struct.pack("<II", compat & ~0x4, incompat))
    with open_disk(path) as d:
        assert identify(Region(d))[0].type == "ext2"


def test_lvm2_physical_volume_label(tmp_path):
    """pvcreate needs a block device, so the label is written per LVM's on-disk format."""
    path = sparse_file(tmp_path / "pv.img", 4 * MiB)
    label = bytearray(512)
    label[0:8] = b"LABELONE"
    struct.pack_into("<QII", label, 8, 1, 0, 32)
    label[24:32] = b"LVM2 001"
    label[32:64] = b"abcdefABCDEF0123456789ghijklmnop"
    patch(path, 512, bytes(label))
    with open_disk(path) as d:
        info, _ = identify(Region(d))
    assert (info.type, info.uuid) == ("lvm2", "abcdef-ABCD-EF01-2345-6789-ghij-klmnop")


@pytest.mark.parametrize("name,offset,junk", [
    ("ext4", 1024 + 0x18, struct.pack("<I", 40)),        # log block size 40
    ("xfs", 4, struct.pack(">I", 3)),                     # block size 3
    ("btrfs", 0x10000 + 0x94, struct.pack("<I", 7)),      # node size 7
    ("jfs", 0x8000 + 24, struct.pack("<I", 5)),
    ("fat16", 13, b"\x03"),                               # 3 sectors per cluster
    ("ntfs", 11, struct.pack("<H", 300)),                 # 300 bytes per sector
])
def test_garbage_superblock_is_a_finding(fs_images, tmp_path, name, offset, junk):
    import shutil
    path = tmp_path / f"{name}.img"
    shutil.copy(fs_images[name], path)
    patch(path, offset, junk)
    with open_disk(path) as d:
        info, findings = identify(Region(d))
    assert info is None
    assert [f.code for f in findings] == ["fs-garbage-superblock"]
    assert "offset" in findings[0].message


def test_reads_are_small(fs_images):
    """Identification reads a few KiB per partition, whatever its size."""
    class Counting:
        def __init__(self, disk):
            self.disk, self.size, self.bytes = disk, disk.size, 0

        def read(self, offset, length):
            self.bytes += length
            return self.disk.read(offset, length)

    for name in ("xfs", "swap", "ntfs", "fat32"):
        with open_disk(fs_images[name]) as d:
            c = Counting(d)
            identify(Region(c))
            assert c.bytes <= 16 << 10, (name, c.bytes)


# --- boot code ---------------------------------------------------------------------

def test_grub2_boot_img():
    assert bootcode.classify(GRUB2_BOOT_IMG.read_bytes()) == bootcode.BootCode("grub2")


def test_grub_legacy_stage1():
    assert bootcode.classify(GRUB_LEGACY_STAGE1.read_bytes()) == bootcode.BootCode("grub-legacy")


def test_grub2_as_written_into_an_mbr(tmp_path):
    """boot.img written over a partitioned disk's boot code, as grub-install does."""
    from image_builders import partition_disk, write_boot_code
    from smsblock.image.inspect import inspect_disk
    disk = tmp_path / "d.img"
    partition_disk(disk, 4 * MiB, "label: dos\nstart=2048, type=83, bootable\n")
    write_boot_code(disk, GRUB2_BOOT_IMG.read_bytes())
    with open_disk(disk) as d:
        r = inspect_disk(d)
    assert (r.partition_table, r.boot_code) == ("mbr", "grub2")
    assert r.partitions[0].bootable


def test_other_loaders_and_none(tmp_path):
    assert bootcode.classify(SYSLINUX_MBR.read_bytes()) == bootcode.BootCode("other", "SYSLINUX MBR")
    disk = sparse_file(tmp_path / "m.img", 1 * MiB)
    run("install-mbr", "-f", disk)
    assert bootcode.classify(disk.read_bytes()[:512]).kind == "other"
    assert bootcode.classify(bytes(512)) == bootcode.BootCode("none")
    assert bootcode.classify(bytes(440) + b"\x01" * 72) == bootcode.BootCode("none")
    assert bootcode.classify(b"\x90" * 440).kind == "other"


def test_windows_mbr_by_its_messages():
    """No Debian tool writes a Microsoft MBR, so this one is built from the strings and the
    prologue every Windows MBR (2000 to 10) carries; the layout around them is arbitrary."""
    code = bytearray(440)
    code[0:7] = b"\x33\xc0\x8e\xd0\xbc\x00\x7c"
    msgs = b"Invalid partition table\0Error loading operating system\0Missing operating system\0"
    code[0x163:0x163 + len(msgs)] = msgs
    assert bootcode.classify(bytes(code)).kind == "windows"
    code2 = bytearray(440)
    code2[0:7] = b"\x33\xc0\x8e\xd0\xbc\x00\x7c"
    code2[100:104] = b"TCPA"
    assert bootcode.classify(bytes(code2)).kind == "windows"
    # the same messages without both present are not enough
    assert bootcode.classify(b"\x00" * 100 + b"Missing operating system." + bytes(315)).kind == "other"
