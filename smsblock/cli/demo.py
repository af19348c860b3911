"""``smsblock demo``: the main job on embedded defaults, end to end, in one folder.

It builds a small bootable-looking Linux disk with real tools (sfdisk, mkfs.ext4 -d,
GRUB's boot.img when installed), exports it as a streamOptimized VMDK (as an OVF export
would), replicates it into a local store, changes a file inside the guest filesystem
(debugfs), replicates again (only the changed blocks travel), restores both runs and
checks them byte for byte against the disk as it was, and inspects the latest run
through the store.  Everything lands in ``--dir`` (default ``./demo-out``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from ..errors import SmsBlockError, UsageError
from ..fsutil import make_root, write_new_file
from ..progress import terminal_progress
from . import print_json

MIB = 1 << 20
DISK_SIZE = 256 * MIB
PART_START = 1 * MIB
GRUB_BOOT_IMG = Path("/usr/lib/grub/i386-pc/boot.img")

OS_RELEASE = """NAME="Ubuntu"
VERSION="16.04.7 LTS (Xenial Xerus)"
ID=ubuntu
ID_LIKE=debian
PRETTY_NAME="Ubuntu 16.04.7 LTS"
VERSION_ID="16.04"
"""
LSB_RELEASE = """DISTRIB_ID=Ubuntu
DISTRIB_RELEASE=16.04
DISTRIB_CODENAME=xenial
DISTRIB_DESCRIPTION="Ubuntu 16.04.7 LTS"
"""


def register(sub) -> None:
    p = sub.add_parser("demo", help="replicate a sample disk twice, restore and inspect it (no setup needed)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="demo-out", help="working folder (default ./demo-out; must be new, empty or an earlier demo's, which is emptied)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    p.set_defaults(func=run_demo)


def _tool(*cmd: str, **kw) -> None:
    exe = shutil.which(cmd[0]) or shutil.which(cmd[0], path="/usr/sbin:/sbin")
    if exe is None:
        raise UsageError(f"the demo needs {cmd[0]} (run scripts/setup.sh)")
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SmsBlockError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def _make_root_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(OS_RELEASE)
    (root / "etc/lsb-release").write_text(LSB_RELEASE)
    (root / "etc/hostname").write_text("demo-web-01\n")
    (root / "bin").mkdir()
    shell = shutil.which("sh")
    if shell:     # a real ELF binary, so inspection can tell the architecture
        shutil.copyfile(os.path.realpath(shell), root / "bin/sh")
    (root / "boot/grub").mkdir(parents=True)
    (root / "boot/grub/grub.cfg").write_text("set default=0\nmenuentry 'Ubuntu' { linux /vmlinuz root=/dev/sda1 }\n")
    data = root / "srv/data"
    data.mkdir(parents=True)
    rng = hashlib.sha256(b"smsblock demo")
    for i in range(24):      # ~24 MiB of incompressible-ish "application data"
        chunk = b"".join(hashlib.sha256(rng.digest() + bytes([i, j % 256, j // 256])).digest()
                         for j in range(MIB // 32))
        (data / f"table-{i:02d}.dat").write_bytes(chunk)
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/syslog").write_text("demo boot\n" * 2000)


def _splice(fs_image: Path, disk: Path) -> None:
    """Copy the filesystem image into the disk at the partition's start, in place."""
    with open(fs_image, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(PART_START)
        shutil.copyfileobj(src, dst, 4 * MIB)


def _build_disk(work: Path) -> tuple[Path, Path]:
    disk = work / "sample-disk.raw"
    fs_image = work / "rootfs.ext4"
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        root = Path(tmp) / "root"
        _make_root_tree(root)
        with open(disk, "wb") as f:
            f.truncate(DISK_SIZE)
        _tool("sfdisk", "--quiet", str(disk), input=f"label: dos\nstart={PART_START // 512}, type=83, bootable\n")
        with open(fs_image, "wb") as f:
            f.truncate(DISK_SIZE - PART_START)
        _tool("mkfs.ext4", "-q", "-F", "-L", "rootfs", "-U", "6f0e4a35-1c3b-4d52-9a0e-5d7ad0c7e001",
              "-E", "root_owner=0:0", "-d", str(root), str(fs_image))
    _splice(fs_image, disk)
    if GRUB_BOOT_IMG.is_file():      # GRUB 2's boot.img in the MBR's boot-code area
        with open(disk, "r+b") as f:
            f.write(GRUB_BOOT_IMG.read_bytes()[:440])
    return disk, fs_image


def _change_guest(work: Path, disk: Path, fs_image: Path) -> None:
    """Between the runs the VM writes a log file and rewrites one data table."""
    new_log = work / "app.log"
    new_log.write_text("".join(f"request {i} served in {i % 17} ms\n" for i in range(40000)))
    table = work / "table-03.dat"
    table.write_bytes(hashlib.sha256(b"changed").digest() * (MIB // 32))
    _tool("debugfs", "-w", "-R", f"write {new_log} /var/log/app.log", str(fs_image))
    _tool("debugfs", "-w", "-R", "rm /srv/data/table-03.dat", str(fs_image))
    _tool("debugfs", "-w", "-R", f"write {table} /srv/data/table-03.dat", str(fs_image))
    _splice(fs_image, disk)
    new_log.unlink()
    table.unlink()


DEMO_MARKER = ".smsblock-demo"


def _made_by_an_earlier_demo(work: Path) -> bool:
    """``work`` is a 0700 folder of this user holding the demo's marker as a regular file
    of this user (neither followed through a link)."""
    try:
        folder, marker = work.lstat(), (work / DEMO_MARKER).lstat()
    except OSError:
        return False
    uid = os.getuid()
    return (stat.S_ISDIR(folder.st_mode) and folder.st_uid == uid and not folder.st_mode & 0o077
            and stat.S_ISREG(marker.st_mode) and marker.st_uid == uid)


def run_demo(args) -> int:
    from ..disk.writer import convert
    from ..image.validate import inspect_and_validate
    from ..engine import replicate, restore, verify
    from ..store import open_store

    def init_store(path):
        open_store(path).initialise()

    work = Path(args.dir).resolve()
    if work.exists():
        # only a folder an earlier demo of this user made is wiped: --dir ~ must not be, nor
        # a folder where someone else dropped a marker (or a link to one)
        if not _made_by_an_earlier_demo(work) and (not work.is_dir() or any(work.iterdir())):
            raise UsageError(f"--dir {work}: exists and is not an earlier demo's folder "
                             "(give a new or empty folder)")
        shutil.rmtree(work)
    make_root(work)         # 0700
    write_new_file(work / DEMO_MARKER, b"made by smsblock demo; the next demo run deletes this folder\n")
    store_dir = work / "store"
    server = "s-demo0001"
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    result: dict = {"dir": str(work), "store": str(store_dir), "server_id": server, "runs": []}

    init_store(store_dir)     # the store is made explicitly, as `smsblock init` does
    say(f"== created the store {store_dir} (smsblock init)")
    say(f"== building a sample Linux disk ({DISK_SIZE // MIB} MiB, MBR, ext4, GRUB) in {work}")
    disk, fs_image = _build_disk(work)
    vmdk = work / "sample-disk.vmdk"

    expected = {}
    for label in ("first", "second"):
        if label == "second":
            say("== the guest changes: a new log file, one data table rewritten")
            _change_guest(work, disk, fs_image)
        with terminal_progress("export: write streamOptimized VMDK") as progress:
            convert(disk, vmdk, format="vmdk", progress=progress)
        say(f"== exported as streamOptimized VMDK: {vmdk.name} ({vmdk.stat().st_size // 1024} KiB)")
        with terminal_progress(f"replicate ({label} run): scan and store") as progress:
            summary = replicate(vmdk, store_dir, server, progress=progress, create=False)
        s = summary.to_dict()
        expected[s["run_id"]] = _sha256(disk)
        result["runs"].append(s)
        say(f"== {label} run {s['run_id']}: {s['blocks_total']} blocks, {s['blocks_changed']} changed, "
            f"{s['blocks_stored']} stored ({s['bytes_stored'] / MIB:.1f} MiB after zstd), "
            f"{s['blocks_zero']} zero, {s['blocks_unallocated']} unallocated, {s['seconds']:.2f} s")

    store = open_store(store_dir)
    restored = []
    for run_id, digest in expected.items():
        out = work / f"restored-{run_id}.raw"
        with terminal_progress("restore: write raw") as progress:
            restore(store, server, out, run_id=run_id, progress=progress)
        same = _sha256(out) == digest
        restored.append({"run_id": run_id, "path": str(out), "byte_exact": same})
        say(f"== restored {run_id}: {'byte-exact' if same else 'DIFFERS from the disk at that run'}")
        out.unlink()
    result["restores"] = restored

    report = verify(store)
    result["verify"] = report.to_dict()
    say(f"== verify: {'ok' if report.ok else 'PROBLEMS'}")

    with store.run_disk(server) as run_disk:
        inspection = inspect_and_validate(run_disk, source=f"{store_dir} {server} (latest run)")
    result["inspect"] = inspection.to_dict()
    if not args.json:
        osinfo = inspection.os
        say(f"== inspect latest run: {inspection.partition_table} partition table, boot code "
            f"{inspection.boot_code}, " + ", ".join(
                f"partition {p.number}: {p.filesystem} {p.label or ''}".strip()
                for p in inspection.partitions))
        if osinfo is not None:
            say(f"   OS: {osinfo.family} {osinfo.distribution} {osinfo.version} {osinfo.architecture or ''}")
        for f in inspection.findings:
            say(f"   [{f.severity}] {f.message}")
        say(f"   can boot in the cloud: {'yes' if inspection.ok else 'no'}")
        say(f"\nTry: smsblock servers --store {store_dir}")
        say(f"     smsblock runs --store {store_dir} --server {server}")
        say(f"     smsblock restore --store {store_dir} --server {server} -o disk.raw")
    ok = all(r["byte_exact"] for r in restored) and report.ok
    if args.json:
        print_json(result)
    return 0 if ok else 1
