"""Build test disks for the image step with real tools: sfdisk, mkfs.*, mkntfs + ntfs-3g,
hivexregedit, mkswap, GRUB's boot.img.  Helpers only; the tests are in test_image_*.py."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

from smsblock.disk.base import Disk

MiB = 1 << 20
GRUB2_BOOT_IMG = Path("/usr/lib/grub/i386-pc/boot.img")
GRUB_LEGACY_STAGE1 = Path("/usr/lib/grub/x86_64-pc/stage1")
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")


def run(*args, input=None, cwd=None) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, input=input, cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}): "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def blkid(path: Path, offset: int = 0) -> dict:
    """What libblkid (util-linux, the oracle) says about the filesystem at ``offset``."""
    args = ["blkid", "-p", "-o", "export"] + (["-O", str(offset)] if offset else []) + [str(path)]
    proc = subprocess.run(args, capture_output=True, text=True)
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


# --- fake root trees: the release files of each supported distribution ---------------

DISTROS: dict[str, dict] = {
    "ubuntu-14.04": {"files": {
        "etc/os-release": 'NAME="Ubuntu"\nVERSION="14.04.5 LTS, Trusty Tahr"\nID=ubuntu\n'
                          'ID_LIKE=debian\nPRETTY_NAME="Ubuntu 14.04.5 LTS"\nVERSION_ID="14.04"\n',
        "etc/lsb-release": "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=14.04\nDISTRIB_CODENAME=trusty\n"
                           'DISTRIB_DESCRIPTION="Ubuntu 14.04.5 LTS"\n',
        "etc/debian_version": "jessie/sid\n"},
        "sources": ["etc/os-release", "etc/lsb-release"],
        "expect": ("ubuntu", "14.04", "Ubuntu 14.04.5 LTS"), "supported": True},
    "ubuntu-16.10": {"files": {
        "usr/lib/os-release": 'NAME="Ubuntu"\nVERSION="16.10 (Yakkety Yak)"\nID=ubuntu\n'
                              'PRETTY_NAME="Ubuntu 16.10"\nVERSION_ID="16.10"\n',
        "etc/debian_version": "stretch/sid\n"},
        "links": {"etc/os-release": "../usr/lib/os-release"},
        "sources": ["etc/os-release"],
        "expect": ("ubuntu", "16.10", "Ubuntu 16.10"), "supported": True},
    "ubuntu-18.04": {"files": {
        "etc/os-release": 'NAME="Ubuntu"\nID=ubuntu\nPRETTY_NAME="Ubuntu 18.04.6 LTS"\nVERSION_ID="18.04"\n'},
        "sources": ["etc/os-release"],
        "expect": ("ubuntu", "18.04", "Ubuntu 18.04.6 LTS"), "supported": False},
    "rhel-7.1": {"files": {
        "etc/redhat-release": "Red Hat Enterprise Linux Server release 7.1 (Maipo)\n",
        "etc/os-release": 'NAME="Red Hat Enterprise Linux Server"\nVERSION="7.1 (Maipo)"\nID="rhel"\n'
                          'VERSION_ID="7.1"\nPRETTY_NAME="Red Hat Enterprise Linux Server 7.1 (Maipo)"\n'},
        "sources": ["etc/redhat-release", "etc/os-release"],
        "expect": ("rhel", "7.1", "Red Hat Enterprise Linux Server 7.1 (Maipo)"), "supported": True},
    "rhel-6.0": {"files": {
        "etc/redhat-release": "Red Hat Enterprise Linux Server release 6.0 (Santiago)\n"},
        "sources": ["etc/redhat-release"],
        "expect": ("rhel", "6.0", "Red Hat Enterprise Linux Server release 6.0 (Santiago)"),
        "supported": False, "refused": True},
    "centos-7.2.1511": {"files": {
        "etc/redhat-release": "CentOS Linux release 7.2.1511 (Core)\n",
        "etc/centos-release": "CentOS Linux release 7.2.1511 (Core)\n",
        "etc/os-release": 'NAME="CentOS Linux"\nVERSION="7 (Core)"\nID="centos"\nID_LIKE="rhel fedora"\n'
                          'VERSION_ID="7"\nPRETTY_NAME="CentOS Linux 7 (Core)"\n'},
        "sources": ["etc/centos-release", "etc/redhat-release", "etc/os-release"],
        "expect": ("centos", "7.2.1511", "CentOS Linux 7 (Core)"), "supported": True},
    "centos-6.5": {"files": {"etc/redhat-release": "CentOS release 6.5 (Final)\n",
                             "etc/centos-release": "CentOS release 6.5 (Final)\n"},
                   "sources": ["etc/centos-release", "etc/redhat-release"],
        "expect": ("centos", "6.5", "CentOS release 6.5 (Final)"), "supported": True},
    "sles-11sp4": {"files": {
        "etc/SuSE-release": "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\nPATCHLEVEL = 4\n"},
        "sources": ["etc/SuSE-release"],
        "expect": ("suse", "11.4", "SUSE Linux Enterprise Server 11 (x86_64)"), "supported": True},
    "sles-12sp1": {"files": {
        "etc/os-release": 'NAME="SLES"\nVERSION="12-SP1"\nVERSION_ID="12.1"\n'
                          'PRETTY_NAME="SUSE Linux Enterprise Server 12 SP1"\nID="sles"\n',
        "etc/SuSE-release": "SUSE Linux Enterprise Server 12 (x86_64)\nVERSION = 12\nPATCHLEVEL = 1\n"},
        "sources": ["etc/os-release", "etc/SuSE-release"],
        "expect": ("suse", "12.1", "SUSE Linux Enterprise Server 12 SP1"), "supported": True},
    "debian-7.8": {"files": {
        "etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 7 (wheezy)"\nNAME="Debian GNU/Linux"\n'
                          'VERSION_ID="7"\nVERSION="7 (wheezy)"\nID=debian\n',
        "etc/debian_version": "7.8\n"},
        "sources": ["etc/os-release", "etc/debian_version"],
        "expect": ("debian", "7.8", "Debian GNU/Linux 7 (wheezy)"), "supported": True},
    "debian-6.0.8": {"files": {"etc/debian_version": "6.0.8\n"},
                     "sources": ["etc/debian_version"],
        "expect": ("debian", "6.0.8", None), "supported": True},
    "debian-8.0": {"files": {
        "etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 8 (jessie)"\nVERSION_ID="8"\nID=debian\n',
        "etc/debian_version": "8.0\n"},
        "sources": ["etc/os-release", "etc/debian_version"],
        "expect": ("debian", "8.0", "Debian GNU/Linux 8 (jessie)"), "supported": True},
    "oracle-6.6": {"files": {
        "etc/oracle-release": "Oracle Linux Server release 6.6\n",
        "etc/redhat-release": "Red Hat Enterprise Linux Server release 6.6 (Santiago)\n",
        "etc/os-release": 'NAME="Oracle Linux Server"\nVERSION="6.6"\nID="ol"\nVERSION_ID="6.6"\n'
                          'PRETTY_NAME="Oracle Linux Server 6.6"\n'},
        "sources": ["etc/oracle-release", "etc/os-release"],
        "expect": ("oracle", "6.6", "Oracle Linux Server 6.6"), "supported": True},
    "fedora-21": {"files": {
        "etc/fedora-release": "Fedora release 21 (Twenty One)\n",
        "etc/redhat-release": "Fedora release 21 (Twenty One)\n",
        "etc/os-release": 'NAME=Fedora\nVERSION="21 (Server Edition)"\nID=fedora\nVERSION_ID=21\n'
                          'PRETTY_NAME="Fedora 21 (Server Edition)"\nVARIANT_ID=server\n'},
        "sources": ["etc/fedora-release", "etc/redhat-release", "etc/os-release"],
        "expect": ("fedora", "21", "Fedora 21 (Server Edition)"), "supported": True},
}


def fake_root(base: Path, distro: str, *, merged_usr: bool = False) -> Path:
    """A root tree with ``distro``'s release files and a real x86_64 ELF as /bin/sh."""
    spec = DISTROS[distro]
    root = base / f"root-{distro}{'-usr' if merged_usr else ''}"
    if root.exists():
        return root
    for rel, text in spec["files"].items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for rel, target in spec.get("links", {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)
    elf = Path(shutil.which("true"))
    if merged_usr:           # /bin -> usr/bin, /usr/bin/sh -> dash (as Debian does)
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        shutil.copy(elf, root / "usr/bin/dash")
        os.symlink("dash", root / "usr/bin/sh")
        os.symlink("usr/bin", root / "bin")
    else:
        (root / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy(elf, root / "bin/sh")
    return root


# --- filesystem images ----------------------------------------------------------------

def mkfs_ext(path: Path, kind: str, size: int, *, label: str, root: Path | None = None,
             extra=()) -> Path:
    sparse_file(path, size)
    args = [f"mkfs.{kind}", "-q", "-F", "-L", label, *extra]
    if root is not None:
        args += ["-d", root]
    run(*args, path)
    return path


def xfs_protofile(root: Path) -> str:
    """An mkfs.xfs protofile describing ``root`` (files, dirs, symlinks)."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int):
        for entry in sorted(d.iterdir()):
            pad = " " * depth
            if entry.is_symlink():
                lines.append(f"{pad}{entry.name} l--777 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{pad}{entry.name} d--755 0 0")
                walk(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---755 0 0 {entry}")
    walk(root, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def mkfs_xfs(path: Path, *, label: str, root: Path | None = None, size: int = 300 * MiB) -> Path:
    sparse_file(path, size)
    args = ["mkfs.xfs", "-q", "-f", "-L", label]
    if root is not None:
        proto = path.with_suffix(".proto")
        proto.write_text(xfs_protofile(root))
        args += ["-p", proto]
    run(*args, path)
    return path


def mkfs_btrfs(path: Path, *, label: str, root: Path | None = None, size: int = 128 * MiB) -> Path:
    sparse_file(path, size)
    run("mkfs.btrfs", "-q", "-f", "-L", label, *(["--rootdir", root] if root else []), path)
    return path


def mkfs_simple(path: Path, kind: str, size: int, label: str) -> Path:
    sparse_file(path, size)
    if kind == "jfs":
        run("mkfs.jfs", "-q", "-L", label, path)
    elif kind == "swap":
        run("mkswap", "-L", label, path)
    elif kind.startswith("fat"):
        run("mkfs.fat", "-F", kind[3:], "-s", "1", "-n", label, path)   # 1 sector/cluster: small FATs
    elif kind == "ntfs":
        run("mkntfs", "-q", "-F", "-f", "-L", label, path)
    else:
        raise ValueError(kind)
    return path


# --- a Windows system volume ------------------------------------------------------------

def empty_hive() -> bytes:
    """A registry hive holding only its root key (and the root's security cell).

    No Debian tool creates a hive from nothing (hivex, reged and Samba's regpatch all
    open an existing one), so this seed follows the documented regf layout; the keys and
    values are then written by hivexregedit, and read back by libregf.
    """
    hbin = bytearray(4096)
    hbin[0:4] = b"hbin"
    struct.pack_into("<III", hbin, 4, 0, 4096, 0)
    name = b"ROOT"
    nk = bytearray(0x4C + len(name))
    nk[0:2] = b"nk"
    struct.pack_into("<H", nk, 2, 0x2C)               # hive entry, no delete, ASCII name
    struct.pack_into("<I", nk, 0x10, 0xFFFFFFFF)
    struct.pack_into("<IIII", nk, 0x14, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF)
    struct.pack_into("<II", nk, 0x24, 0, 0xFFFFFFFF)
    sk_off = 0x20 + 0x60
    struct.pack_into("<II", nk, 0x2C, sk_off, 0xFFFFFFFF)
    struct.pack_into("<HH", nk, 0x48, len(name), 0)
    nk[0x4C:] = name
    cell = struct.pack("<i", -0x60) + bytes(nk)
    hbin[0x20:0x20 + len(cell)] = cell
    sd = struct.pack("<BBHIIII", 1, 0, 0x8004, 0, 0, 0, 0)
    sk = b"sk" + struct.pack("<HIIII", 0, sk_off, sk_off, 1, len(sd)) + sd
    size = (len(sk) + 4 + 7) & ~7
    hbin[sk_off:sk_off + 4] = struct.pack("<i", -size)
    hbin[sk_off + 4:sk_off + 4 + len(sk)] = sk
    free_off = sk_off + size
    hbin[free_off:free_off + 4] = struct.pack("<i", 4096 - free_off)
    base = bytearray(4096)
    base[0:4] = b"regf"
    struct.pack_into("<IIQIIIIIII", base, 4, 1, 1, 0, 1, 3, 0, 1, 0x20, 4096, 1)
    csum = 0
    for i in range(0, 508, 4):
        csum ^= struct.unpack_from("<I", base, i)[0]
    struct.pack_into("<I", base, 508, csum)
    return bytes(base + hbin)


def software_hive(path: Path, values: dict) -> Path:
    """A SOFTWARE hive whose Microsoft\\Windows NT\\CurrentVersion holds ``values``
    (str -> REG_SZ, int -> REG_DWORD), written by hivexregedit --merge."""
    path.write_bytes(empty_hive())
    lines = ["Windows Registry Editor Version 5.00", "", "[\\Microsoft]", "",
             "[\\Microsoft\\Windows NT]", "", "[\\Microsoft\\Windows NT\\CurrentVersion]"]
    for k, v in values.items():
        lines.append(f'"{k}"=dword:{v:08x}' if isinstance(v, int) else f'"{k}"="{v}"')
    reg = path.with_suffix(".reg")
    reg.write_text("\n".join(lines) + "\n")
    run("hivexregedit", "--merge", path, reg)
    return path


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("ntfs-3g") is not None


def need_fuse() -> None:
    """Skip a test that needs an ntfs-3g FUSE mount where there is none, except in CI
    (``CI=true``), where a missing /dev/fuse or ntfs-3g is a failure, never a silent skip."""
    if fuse_available():
        return
    import pytest
    why = "ntfs-3g and /dev/fuse are needed to make folders in an NTFS image"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI must provide them (scripts/setup.sh, --device /dev/fuse)")
    pytest.skip(why)


def mkfs_windows(path: Path, *, label: str, values: dict, size: int = 16 * MiB,
                 wow64: bool = True) -> Path:
    """An NTFS volume (mkntfs) holding Windows\\System32\\config\\SOFTWARE.

    ntfs-3g's image tools cannot create folders (ntfscp copies into existing ones), so the
    folders are made through an ntfs-3g FUSE mount of the image file (no loop device).
    """
    mkfs_simple(path, "ntfs", size, label)
    hive = software_hive(path.with_suffix(".SOFTWARE"), values)
    mnt = path.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    run("ntfs-3g", path, mnt)
    try:
        (mnt / "Windows/System32/config").mkdir(parents=True)
        if wow64:
            (mnt / "Windows/SysWOW64").mkdir()
        shutil.copy(hive, mnt / "Windows/System32/config/SOFTWARE")
    finally:
        run("umount", mnt)
    return path


# --- whole disks ------------------------------------------------------------------------

def partition_disk(path: Path, size: int, script: str) -> list[dict]:
    """Partition a sparse disk with sfdisk; return sfdisk's own view of the partitions."""
    sparse_file(path, size)
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path, input=script)
    table = json.loads(run("sfdisk", "--json", path))["partitiontable"]
    return table["partitions"]


def place(disk: Path, offset: int, image: Path) -> None:
    """Copy a filesystem image into the disk at ``offset``, keeping holes."""
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        fd = src.fileno()
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data_at, os.SEEK_HOLE)
            src.seek(data_at)
            left = hole - data_at
            dst.seek(offset + data_at)
            while left:
                chunk = src.read(min(left, 4 * MiB))
                dst.write(chunk)
                left -= len(chunk)
            pos = hole


class CountingDisk(Disk):
    """Wraps a disk and counts the bytes and calls read through ``readinto``."""

    def __init__(self, disk):
        self.inner = disk
        self.path, self.size, self.info = disk.path, disk.size, disk.info
        self.bytes_read = 0
        self.reads = 0

    def readinto(self, offset, buf):
        n = self.inner.readinto(offset, buf)
        self.bytes_read += n
        self.reads += 1
        return n

    def extents(self, start=0, end=None):
        return self.inner.extents(start, end)


def write_boot_code(disk: Path, code: bytes) -> None:
    """Put boot code into the MBR's first 440 bytes (what grub-install does with boot.img)."""
    with open(disk, "r+b") as f:
        f.write(code[:440])


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
