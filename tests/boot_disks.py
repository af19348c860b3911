"""Real bootable Linux disks for the boot tests, built from Debian packages without mounting.

* the kernel and its modules come from the ``linux-image-*-amd64`` package, unpacked with
  ``dpkg-deb`` (never installed on the host); ``scripts/setup.sh --debug`` downloads it to
  ``build/boot-debs/`` (``$SMSBLOCK_BOOT_DEBS`` overrides the folder);
* the initramfs (a ``newc`` cpio written here, so device nodes need no root) holds
  busybox-static, the modules for an ATA disk and ext4, and an ``/init`` that behaves like
  the distributions' ones: it finds ``root=``, mounts it read-only and switches to
  ``/sbin/init``, or says ``ALERT!`` and stops, which panics the kernel;
* the root is ext4 populated with ``mke2fs -d``: busybox as init, a getty on ttyS0,
  Debian 12 release files (so validation passes), the kernel and initramfs in /boot;
* GRUB boots it: ``grub-mkimage`` makes core.img (prefix ``(hd0,msdos1)/boot/grub``),
  written into the gap after the MBR at sector 1 (its blocklist already points at
  sector 2), and boot.img's code (which loads sector 1) goes into the MBR.

:func:`boot_disk` builds one variant: ``good`` boots to a login prompt; ``no-boot-code``,
``missing-kernel``, ``bad-root``, ``no-init`` stop at each stage in turn.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

from image_builders import MiB, mkfs_ext, partition_disk, place, run, write_boot_code

REPO = Path(__file__).resolve().parent.parent
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
BUSYBOX = Path("/bin/busybox")
ROOT_UUID = "6c0d2a51-3b8e-4f0a-9d61-5a7e1f0b2c3d"
WRONG_UUID = "00000000-dead-beef-0000-000000000000"
# what an ATA disk (QEMU's default IDE controller) and ext4 need, dependencies included
MODULES = ("ata_piix", "sd_mod", "nvme", "virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
VARIANTS = ("good", "no-boot-code", "missing-kernel", "bad-root", "no-init")
DISK_SIZE = 64 * MiB
PART_START = 2048          # sectors: a 1 MiB boot gap for core.img, as fdisk leaves it


def kernel_deb() -> Path:
    folder = Path(os.environ.get("SMSBLOCK_BOOT_DEBS") or REPO / "build" / "boot-debs")
    debs = sorted(folder.glob("linux-image-*-amd64_*_amd64.deb"))
    debs = [d for d in debs if "-dbg" not in d.name and "unsigned" not in d.name]
    if not debs:
        raise RuntimeError(f"no linux-image-*-amd64 .deb in {folder}: run scripts/setup.sh --debug "
                           f"(or apt-get download linux-image-$(uname -r | cut -d- -f1-2)-amd64 there)")
    return debs[-1]


def unpack_kernel(work: Path) -> tuple[Path, Path]:
    """Unpack the kernel package's /boot and /lib/modules; return (vmlinuz, modules dir)."""
    dest = work / "kernel"
    if not dest.exists():
        tmp = work / "kernel.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(kernel_deb())],
                               stdout=subprocess.PIPE)
        tar = subprocess.run(
            ["tar", "-x", "-C", str(tmp), "--wildcards", "./boot/vmlinuz-*",
             "./lib/modules/*/kernel/drivers/ata/*", "./lib/modules/*/kernel/drivers/scsi/*",
             "./lib/modules/*/kernel/fs/*", "./lib/modules/*/kernel/lib/*",
             "./lib/modules/*/kernel/block/*", "./lib/modules/*/kernel/drivers/nvme/*",
             "./lib/modules/*/kernel/drivers/virtio/*", "./lib/modules/*/kernel/drivers/block/*",
             "./lib/modules/*/kernel/crypto/*", "./lib/modules/*/kernel/arch/x86/crypto/*"],
            stdin=deb.stdout, capture_output=True, text=True)
        deb.stdout.close()
        if deb.wait() != 0 or tar.returncode != 0:
            raise RuntimeError(f"cannot unpack {kernel_deb()}: {tar.stderr.strip()}")
        tmp.rename(dest)
    vmlinuz = next((dest / "boot").glob("vmlinuz-*"))
    modules = next((dest / "lib" / "modules").iterdir())
    return vmlinuz, modules


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + 9:data.index(b"\0", at + 9)].decode()
    return [d for d in value.split(",") if d]


def module_closure(modules: Path, names) -> list[Path]:
    """The ``.ko`` files for ``names`` and what they depend on, dependencies first."""
    index = {}
    for ko in modules.rglob("*.ko*"):
        index[ko.name.split(".ko")[0].replace("-", "_")] = ko
    order: list[Path] = []

    def visit(name):
        ko = index[name.replace("-", "_")]
        if ko in order:
            return
        for dep in _modinfo_depends(ko):
            visit(dep)
        order.append(ko)

    for name in names:
        visit(name)
    return order


class Cpio:
    """A ``newc`` cpio archive built in memory (device nodes without root)."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.ino = 100

    def _add(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        self.ino += 1
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        entry = header + name.encode() + b"\0"
        entry += b"\0" * (-len(entry) % 4) + data
        entry += b"\0" * (-len(entry) % 4)
        self.parts.append(entry)

    def dir(self, name):
        self._add(name, stat.S_IFDIR | 0o755)

    def file(self, name, data: bytes, mode=0o755):
        self._add(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor):
        self._add(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return b"".join(self.parts)


# /init: what initramfs-tools does, in little: modules, wait for root=, mount, switch
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in MODULES; do insmod /lib/modules/$m.ko; done
root=$(sed -n 's/.*root=\([^ ]*\).*/\1/p' /proc/cmdline)
dev=""
for i in $(seq 50); do
  case "$root" in
    UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
    *) [ -b "$root" ] && dev=$root ;;
  esac
  [ -n "$dev" ] && break
  sleep 0.1
done
if [ -z "$dev" ]; then
  echo "ALERT!  $root does not exist.  Dropping to a shell!"
  exit 1
fi
if ! mount -t ext4 -o ro "$dev" /root; then
  echo "ALERT!  cannot mount $dev on /root"
  exit 1
fi
mount --move /dev /root/dev
exec switch_root /root /sbin/init
"""

INITTAB = """::sysinit:/etc/init.d/rcS
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
"""

RCS = """#!/bin/sh
mount -t proc proc /proc
hostname smsboot
"""

GRUB_CFG = """serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "Debian GNU/Linux" {{
  linux /boot/{kernel} root={root} ro console=ttyS0,115200 panic=-1
  initrd /boot/initrd.img
}}
"""


def build_initramfs(work: Path) -> Path:
    out = work / "initrd.img"
    if out.exists():
        return out
    _, modules = unpack_kernel(work)
    kos = module_closure(modules, MODULES)
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "root", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", BUSYBOX.read_bytes())
    names = []
    for ko in kos:
        data = ko.read_bytes()
        name = ko.name.split(".ko")[0]
        if ko.name.endswith(".xz"):
            import lzma
            data = lzma.decompress(data)
        c.file(f"lib/modules/{name}.ko", data, 0o644)
        names.append(name)
    c.file("init", INIT.replace("MODULES", " ".join(names)).encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(c.bytes(), compresslevel=6))
    tmp.rename(out)
    return out


def build_core_img(work: Path) -> Path:
    out = work / "core.img"
    if not out.exists():
        run("grub-mkimage", "-O", "i386-pc", "-o", out, "-p", "(hd0,msdos1)/boot/grub",
            "biosdisk", "part_msdos", "ext2", "linux", "normal", "configfile", "serial",
            "terminal", "echo")
    return out


RELEASES = {   # /etc/os-release, /etc/debian_version
    "debian-12": ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                  'VERSION_ID="12"\nVERSION="12 (bookworm)"\nID=debian\n', "12.8\n"),
    # on the SMS supported list, for the service's image step (which allows no other)
    "debian-8": ('PRETTY_NAME="Debian GNU/Linux 8 (jessie)"\nNAME="Debian GNU/Linux"\n'
                 'VERSION_ID="8"\nVERSION="8 (jessie)"\nID=debian\n', "8.0\n"),
}


def root_tree(work: Path, variant: str, release: str = "debian-12") -> Path:
    vmlinuz, _ = unpack_kernel(work)
    root = work / f"root-{variant}-{release}"
    if root.exists():
        shutil.rmtree(root)
    for d in ("bin", "sbin", "etc/init.d", "dev", "proc", "sys", "tmp", "root", "boot/grub"):
        (root / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    for name in ("sh", "mount", "hostname", "sed"):
        os.symlink("busybox", root / "bin" / name)
    os.symlink("../bin/busybox", root / "sbin/getty")
    if variant != "no-init":
        os.symlink("../bin/busybox", root / "sbin/init")
    (root / "etc/inittab").write_text(INITTAB)
    (root / "etc/init.d/rcS").write_text(RCS)
    (root / "etc/init.d/rcS").chmod(0o755)
    (root / "etc/hostname").write_text("smsboot\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/os-release").write_text(RELEASES[release][0])
    (root / "etc/debian_version").write_text(RELEASES[release][1])
    shutil.copy(vmlinuz, root / "boot" / vmlinuz.name)
    shutil.copy(build_initramfs(work), root / "boot/initrd.img")
    kernel = vmlinuz.name if variant != "missing-kernel" else vmlinuz.name + "-gone"
    root_arg = f"UUID={WRONG_UUID if variant == 'bad-root' else ROOT_UUID}"
    (root / "boot/grub/grub.cfg").write_text(GRUB_CFG.format(kernel=kernel, root=root_arg))
    return root


def boot_disk(work: Path, variant: str = "good", release: str = "debian-12") -> Path:
    """A raw disk of ``variant`` (see the module docstring) in ``work``; kernel, initramfs
    and core.img are made once per ``work`` folder."""
    if variant not in VARIANTS:
        raise ValueError(variant)
    work.mkdir(parents=True, exist_ok=True)
    name = variant if release == "debian-12" else f"{variant}-{release}"
    disk = work / f"boot-{name}.raw"
    if disk.exists():
        return disk
    root = root_tree(work, variant, release)
    part_size = DISK_SIZE - PART_START * 512
    fs = mkfs_ext(work / f"root-{name}.ext4", "ext4", part_size, label="root", root=root,
                  extra=("-U", ROOT_UUID, "-E", "root_owner=0:0"))
    tmp = work / f"boot-{name}.tmp"
    partition_disk(tmp, DISK_SIZE, f"label: dos\nstart={PART_START}, type=83, bootable\n")
    place(tmp, PART_START * 512, fs)
    fs.unlink()
    shutil.rmtree(root)
    if variant != "no-boot-code":
        core = build_core_img(work).read_bytes()
        if len(core) > (PART_START - 1) * 512:
            raise RuntimeError(f"core.img ({len(core)} bytes) does not fit the boot gap")
        with open(tmp, "r+b") as f:
            f.seek(512)
            f.write(core)
        # boot.img loads the sector at 0x5c (default 1: core.img's first sector)
        write_boot_code(tmp, (GRUB_DIR / "boot.img").read_bytes())
    tmp.rename(disk)
    return disk
