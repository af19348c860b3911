"""Operating system detection on filesystems that mkfs populated from fake root trees:
ext2/3/4 (mkfs -d), XFS (protofile), Btrfs (--rootdir), NTFS with a SOFTWARE hive."""

from __future__ import annotations

import shutil
import struct

import pytest

from image_builders import (DISTROS, MiB, blkid, fake_root, mkfs_btrfs, mkfs_ext, mkfs_simple,
                            mkfs_windows, mkfs_xfs, need_fuse, patch)
from smsblock import open_disk
from smsblock.image.btrfs import BtrfsVolume
from smsblock.image.inspect import inspect_disk
from smsblock.image.fsreaders import open_linux_reader
from smsblock.image.osdetect import detect_linux, elf_architecture, linux_release
from smsblock.image.region import Region

EXT_KINDS = ("ext2", "ext3", "ext4")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("roots")
    return base


def _os(path):
    with open_disk(path) as d:
        return inspect_disk(d)


def bare_report(img, fs, label, distro, *, fs_variant=None) -> dict:
    """The whole report of a bare filesystem holding ``distro``'s fake root; labels and
    UUIDs as blkid sees them."""
    dist, version, pretty = DISTROS[distro]["expect"]
    oracle = blkid(img)
    assert (oracle["TYPE"], oracle["LABEL"]) == (fs, label)
    size = img.stat().st_size
    return {
        "source": None, "disk_size": size, "partition_table": "none", "disk_id": None,
        "partitions": [{"number": 0, "start": 0, "size": size, "type": None, "bootable": False,
                        "filesystem": fs, "label": label, "uuid": oracle["UUID"],
                        "kind": "whole-disk", "type_name": None, "fs_variant": fs_variant,
                        "name": None}],
        "boot_code": "none", "boot_code_detail": None,
        "os": {"family": "linux", "distribution": dist, "version": version,
               "architecture": "x86_64", "name": pretty, "edition": None, "service_pack": None,
               "root_partition": 0, "root_filesystem": fs, "sources": DISTROS[distro]["sources"]},
        "findings": [{"severity": "info", "code": "bare-filesystem",
                      "message": f"The disk holds a bare {fs} filesystem without a partition table."}],
        "ok": True,
    }


@pytest.mark.parametrize("i,distro", list(enumerate(sorted(DISTROS))))
def test_each_distribution_on_ext(roots, tmp_path, i, distro):
    kind = EXT_KINDS[i % 3]
    root = fake_root(roots, distro, merged_usr=bool(i % 2))
    img = mkfs_ext(tmp_path / "fs.img", kind, 4 * MiB, label=f"r{i}", root=root)
    assert _os(img).to_dict() == bare_report(img, kind, f"r{i}", distro)


@pytest.mark.parametrize("fs,distro", [("xfs", "centos-7.2.1511"), ("xfs", "sles-12sp1"),
                                       ("btrfs", "ubuntu-16.10"), ("btrfs", "debian-7.8")])
def test_root_on_xfs_and_btrfs(roots, tmp_path, fs, distro):
    root = fake_root(roots, distro, merged_usr=True)
    make = mkfs_xfs if fs == "xfs" else mkfs_btrfs
    img = make(tmp_path / f"{fs}.img", label=f"{fs}root", root=root)
    assert _os(img).to_dict() == bare_report(img, fs, f"{fs}root", distro,
                                             fs_variant="V5" if fs == "xfs" else None)


def test_most_precise_version_wins():
    osr = 'ID="centos"\nVERSION_ID="7"\n'
    assert linux_release({"etc/os-release": osr,
                          "etc/redhat-release": "CentOS Linux release 7.2.1511 (Core)"})[:2] == \
        ("centos", "7.2.1511")
    assert linux_release({"etc/os-release": 'ID=debian\nVERSION_ID="7"\n',
                          "etc/debian_version": "7.8"})[:2] == ("debian", "7.8")
    # disagreeing versions: the first file believed, and said so
    dist, ver, _, _, findings = linux_release({"etc/redhat-release": "CentOS release 6.5 (Final)",
                                               "etc/os-release": 'ID=centos\nVERSION_ID="7"\n'})
    assert (dist, ver) == ("centos", "6.5") and [f.code for f in findings] == ["os-version-disagree"]
    assert linux_release({})[0] is None
    assert linux_release({"etc/os-release": "garbage without equals\n\x00\x01"})[0] is None


def test_elf_architecture_from_a_real_binary():
    head = bytearray(open(shutil.which("true"), "rb").read(64))
    assert elf_architecture(bytes(head)) == "x86_64"
    struct.pack_into("<H", head, 18, 3)
    head[4] = 1
    assert elf_architecture(bytes(head)) == "i386"
    struct.pack_into("<H", head, 18, 183)
    head[4] = 2
    assert elf_architecture(bytes(head)) == "aarch64"
    assert elf_architecture(b"#!/bin/sh\n") is None


def test_btrfs_reader_reads_inline_and_regular_extents(tmp_path):
    root = tmp_path / "tree"
    (root / "etc/deep/er").mkdir(parents=True)
    small = b"small file\n"
    big = bytes(range(256)) * 300            # 76800 bytes: regular (non-inline) extents
    (root / "etc/small").write_bytes(small)
    (root / "etc/deep/er/big").write_bytes(big)
    (root / "link").symlink_to("etc/deep/er/big")
    img = mkfs_btrfs(tmp_path / "b.img", label="t", root=root)
    with open_disk(img) as d:
        reader = open_linux_reader("btrfs", Region(d))
        assert reader.read_file("etc/small") == small
        assert reader.read_file("etc/deep/er/big", 1 << 20) == big
        assert reader.read_file("link", 1 << 20) == big
        assert reader.read_file("etc/missing") is None
        assert reader.read_file("etc/deep/../small") == small
        vol = BtrfsVolume(Region(d))
        assert vol.child(vol.root(), "etc") is not None


def test_btrfs_large_directory_is_read_once(roots, tmp_path):
    """/etc with 3000 more entries: the dozen release-file lookups there read its
    directory items once, not once per lookup (which would near the work budget)."""
    import shutil
    root = tmp_path / "root"
    shutil.copytree(fake_root(roots, "debian-7.8"), root, symlinks=True)
    for i in range(3000):
        (root / "etc" / f"file{i:04d}").touch()
    img = mkfs_btrfs(tmp_path / "b.img", label="big", root=root)
    with open_disk(img) as d:
        reader = open_linux_reader("btrfs", Region(d))
        info, _ = detect_linux(reader)
        assert (info.distribution, info.version) == ("debian", "7.8")
        assert reader.volume._items_seen < 2 * 3000, reader.volume._items_seen


def test_symlink_loop_is_a_finding(tmp_path):
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").symlink_to("os-release")
    img = mkfs_ext(tmp_path / "e.img", "ext4", 4 * MiB, label="loop", root=root)
    report = _os(img)
    assert report.os is None
    assert [f.code for f in report.findings] == ["bare-filesystem", "fs-unreadable"]
    assert "too many symbolic links" in report.findings[1].message


def test_unreadable_filesystem_is_a_finding(roots, tmp_path):
    """An ext4 whose group descriptors are wiped: identified, but unreadable, not a crash."""
    img = mkfs_ext(tmp_path / "e.img", "ext4", 4 * MiB, label="broken",
                   root=fake_root(roots, "debian-7.8"), extra=["-b", "4096"])
    patch(img, 4096, bytes(4096))           # block size 4096: descriptors in block 1
    report = _os(img)
    assert report.partitions[0].filesystem == "ext4"
    assert report.os is None
    assert [f.code for f in report.findings] == ["bare-filesystem", "fs-unreadable"]


def test_damaged_btrfs_tree_is_a_finding(roots, tmp_path):
    img = mkfs_btrfs(tmp_path / "b.img", label="broken", root=fake_root(roots, "debian-7.8"))
    with open(img, "rb") as f:
        f.seek(0x10000 + 0x50)
        root_tree = struct.unpack("<Q", f.read(8))[0]
    with open_disk(img) as d:
        phys = BtrfsVolume(Region(d)).physical(root_tree)
    patch(img, phys + 0x30, b"\xff" * 8)    # the root tree node no longer names itself
    report = _os(img)
    assert report.os is None
    assert [f.code for f in report.findings] == ["bare-filesystem", "fs-unreadable"]
    assert "names another address" in report.findings[1].message


def _fan_out_chunk_tree(img, levels):
    """Rewrite a real Btrfs's chunk tree as ``levels`` internal levels whose every key
    pointer names the same child: a tree of a few nodes that fans out exponentially."""
    with open_disk(img) as d:
        vol = BtrfsVolume(Region(d))
        ns, root = vol.nodesize, vol.chunk_root
        leaf = bytearray(d.read(vol.physical(root), ns))
        chunk = vol._chunk(root)
        free = (a for a in range(chunk.logical, chunk.logical + chunk.length, ns)
                if not any(d.read(vol.physical(a), ns)))          # unused system chunk space
        spots = [next(free) for _ in range(levels)]
        phys = {a: vol.physical(a) for a in [root] + spots}
    struct.pack_into("<Q", leaf, 0x30, spots[0])                 # the old leaf, moved
    patch(img, phys[spots[0]], bytes(leaf))
    n = (ns - 101) // 33
    for level in range(1, levels + 1):
        at = root if level == levels else spots[level]
        node = bytearray(ns)
        node[:101] = leaf[:101]
        struct.pack_into("<QI", node, 0x30, at, 0)
        struct.pack_into("<I", node, 0x60, n)
        node[0x64] = level
        for i in range(n):
            struct.pack_into("<QBQQQ", node, 101 + 33 * i, i, 0, 0, spots[level - 1], 1)
        patch(img, phys[at], bytes(node))
    patch(img, 0x10000 + 0xC7, bytes([levels]))                  # the superblock's chunk level


def test_btrfs_fan_out_tree_is_bounded(tmp_path):
    """493^4 paths through five nodes: the reader gives up after its budget, quickly."""
    import time
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    img = mkfs_btrfs(tmp_path / "b.img", label="fan", root=root)
    _fan_out_chunk_tree(img, 4)
    t0 = time.monotonic()
    report = _os(img)
    assert time.monotonic() - t0 < 10
    assert report.os is None
    assert [f.code for f in report.findings] == ["bare-filesystem", "fs-unreadable"]
    assert "repeat their children" in report.findings[1].message


def test_btrfs_fan_out_of_two_levels_still_reads(tmp_path):
    """The same trick one level deep is a real (if odd) tree: it still reads."""
    root = fake_root(tmp_path, "debian-7.8")
    img = mkfs_btrfs(tmp_path / "b.img", label="fan", root=root)
    _fan_out_chunk_tree(img, 1)
    assert _os(img).os.version == "7.8"


def test_btrfs_compressed_extents_are_bounded():
    """A few KiB that decompress to 256 MiB yield at most MAX_FILE bytes and no more
    memory; damaged compressed data is a BtrfsError."""
    import tracemalloc
    import zlib

    import zstandard
    from smsblock.image.btrfs import MAX_FILE, BtrfsError, _decompress
    bombs = {1: zlib.compress(bytes(64 * MiB), 9),
             3: zstandard.ZstdCompressor(level=3).compress(bytes(256 * MiB))}
    for kind, bomb in bombs.items():
        assert len(bomb) < 128 << 10
        tracemalloc.start()
        try:
            out = _decompress(bomb, kind, 1 << 40, 257)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert out == bytes(MAX_FILE) and peak < 4 * MiB, (kind, peak)
        assert _decompress(bomb, kind, 100, 257) == bytes(100)
        with pytest.raises(BtrfsError, match="inode 257"):
            _decompress(b"\x00garbage" * 20, kind, 4096, 257)
    with pytest.raises(BtrfsError, match="LZO"):
        _decompress(b"x", 2, 10, 257)


WINDOWS = {
    "2012r2": ({"ProductName": "Windows Server 2012 R2 Standard", "CurrentVersion": "6.3",
                "CurrentBuildNumber": "9600", "EditionID": "ServerStandard"}, True,
               ("Windows Server 2012 R2 Standard", "6.3.9600", "x86_64", "ServerStandard", None)),
    "win10": ({"ProductName": "Windows 10 Pro", "CurrentVersion": "6.3", "CurrentBuild": "14393",
               "CurrentMajorVersionNumber": 10, "CurrentMinorVersionNumber": 0,
               "EditionID": "Professional"}, True,
              ("Windows 10 Pro", "10.0.14393", "x86_64", "Professional", None)),
    "2003-32": ({"ProductName": "Microsoft Windows Server 2003", "CurrentVersion": "5.2",
                 "CurrentBuildNumber": "3790", "CSDVersion": "Service Pack 2"}, False,
                ("Microsoft Windows Server 2003", "5.2.3790", "i386", None, "Service Pack 2")),
    "win7-32": ({"ProductName": "Windows 7 Ultimate", "CurrentVersion": "6.1",
                 "CurrentBuildNumber": "7601", "CSDVersion": "Service Pack 1",
                 "EditionID": "Ultimate"}, False,
                ("Windows 7 Ultimate", "6.1.7601", "i386", "Ultimate", "Service Pack 1")),
}


@pytest.mark.parametrize("name", sorted(WINDOWS))
def test_windows_from_software_hive(tmp_path, name):
    need_fuse()
    values, wow64, expect = WINDOWS[name]
    img = mkfs_windows(tmp_path / "w.img", label="System", values=values, wow64=wow64)
    product, version, arch, edition, sp = expect
    size, serial = img.stat().st_size, blkid(img)["UUID"]
    assert _os(img).to_dict() == {
        "source": None, "disk_size": size, "partition_table": "none", "disk_id": None,
        "partitions": [{"number": 0, "start": 0, "size": size, "type": None, "bootable": False,
                        "filesystem": "ntfs", "label": "System", "uuid": serial,
                        "kind": "whole-disk", "type_name": None, "fs_variant": None, "name": None}],
        "boot_code": "none", "boot_code_detail": None,
        "os": {"family": "windows", "distribution": product, "version": version,
               "architecture": arch, "name": product, "edition": edition, "service_pack": sp,
               "root_partition": 0, "root_filesystem": "ntfs",
               "sources": ["Windows/System32/config/SOFTWARE"]},
        "findings": [{"severity": "info", "code": "bare-filesystem",
                      "message": "The disk holds a bare ntfs filesystem without a partition table."}],
        "ok": True,
    }


# --- random damage to real filesystems: findings, never exceptions ---------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from smsblock.disk.base import Disk  # noqa: E402


class OverlayDisk(Disk):
    """A disk with some bytes replaced (the damage), read through another disk."""

    def __init__(self, raw, mutations: dict[int, int]):
        self.raw, self.mutations = raw, mutations
        self.path, self.size, self.info = raw.path, raw.size, raw.info

    def readinto(self, offset, buf):
        n = self.raw.readinto(offset, buf)
        view = memoryview(buf).cast("B")
        for pos, value in self.mutations.items():
            if offset <= pos < offset + n:
                view[pos - offset] = value
        return n

    def extents(self, start=0, end=None):
        return self.raw.extents(start, end)


@pytest.fixture(scope="module")
def damage_targets(tmp_path_factory):
    """Real ext4, XFS, Btrfs and NTFS volumes, and the byte ranges holding their metadata
    (NTFS: boot sector and the first MFT records; XFS: superblock, AG headers, root inodes)."""
    d = tmp_path_factory.mktemp("damage")
    root = fake_root(d, "centos-7.2.1511", merged_usr=True)
    ext4 = mkfs_ext(d / "e.img", "ext4", 4 * MiB, label="x", root=root)
    xfs = mkfs_xfs(d / "x.img", label="x", root=root)
    btrfs = mkfs_btrfs(d / "b.img", label="x", root=root)
    ntfs = mkfs_simple(d / "n.img", "ntfs", 4 * MiB, "x")
    with open_disk(btrfs) as disk:
        vol = BtrfsVolume(Region(disk))
        nodes = [vol.physical(a) for a in (vol.root_tree, vol.chunk_root, vol.default_tree[0])]
    boot = ntfs.read_bytes()[:512]
    cluster = struct.unpack_from("<H", boot, 11)[0] * boot[13]
    mft = struct.unpack_from("<Q", boot, 0x30)[0] * cluster
    return {"ext4": (ext4, [(0, 64 << 10)]),
            "xfs": (xfs, [(0, 96 << 10)]),
            "btrfs": (btrfs, [(0x10000, 0x11000)] + [(p, p + vol.nodesize) for p in nodes]),
            "ntfs": (ntfs, [(0, 512), (mft, mft + 16 * 1024)])}


@settings(max_examples=60)
@given(st.sampled_from(["ext4", "xfs", "btrfs", "ntfs"]), st.data())
def test_random_metadata_damage_never_raises(damage_targets, kind, data):
    path, ranges = damage_targets[kind]
    mutations = {}
    for _ in range(data.draw(st.integers(1, 24))):
        lo, hi = data.draw(st.sampled_from(ranges))
        mutations[data.draw(st.integers(lo, hi - 1))] = data.draw(st.integers(0, 255))
    with open_disk(path) as raw:
        report = inspect_disk(OverlayDisk(raw, mutations))
    if report.os is None:
        assert report.partitions == [] or report.findings
    report.to_dict()
