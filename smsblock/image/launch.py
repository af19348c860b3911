"""Launch a registered image: under QEMU on this machine, or as an EC2 instance.

Local launches boot the catalog image's disk (its streamOptimized VMDK) through a qcow2
copy-on-write overlay: QEMU opens the VMDK read-only as the overlay's backing file, so the
stored image is never modified, and every write of the guest lands in the overlay.  The
serial console goes to ``console.log`` and the firmware's (SeaBIOS) debug port to
``firmware.log``.  KVM is used when ``/dev/kvm`` can be opened, software emulation (TCG)
otherwise; ``$SMSBLOCK_QEMU_ACCEL`` (``kvm`` or ``tcg``) forces one.

Each launch is a folder ``CATALOG/launches/i-<17 hex>/`` (0700, created exclusively)
holding ``launch.json`` (the record), the overlay and the logs.  QEMU runs in its own
process group so :meth:`Launches.terminate` ends it with everything it started;
terminating removes the overlay and keeps the record and the console logs.

The ec2 target calls RunInstances with an AMI id (one ``image create --target ec2``
registered) at a configurable endpoint; terminate calls TerminateInstances.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..errors import ImageError, ImageNotFoundError, UsageError
from ..fsutil import create_file, make_root, open_subdir, remove_file, replace_file
from .catalog import Catalog, check_image_id

INSTANCE_ID = re.compile(r"i-[0-9a-f]{17}")
EC2_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8}(?:[0-9a-f]{9})?")
TARGETS = ("local", "ec2")
# how the disk is attached: NVMe as on EC2's Nitro instances (the default), virtio, IDE
DISK_BUSES = ("nvme", "virtio", "ide")
LAUNCHES = "launches"
RECORD_FILE = "launch.json"
OVERLAY_FILE = "overlay.qcow2"
CONSOLE_FILE = "console.log"
FIRMWARE_FILE = "firmware.log"
QEMU_LOG_FILE = "qemu.log"
DISK_READS_FILE = "disk-reads.log"      # QEMU's block-layer read trace (boot tests only)
QEMU = "qemu-system-x86_64"
DEFAULT_MEMORY_MIB = 512
DEFAULT_INSTANCE_TYPE = "t3.micro"

# QEMU processes this Python process started, by instance id: waited for on terminate
# so they leave no zombie behind.
_children: dict[str, subprocess.Popen] = {}


def new_instance_id() -> str:
    """``i-`` followed by 17 random hex digits (EC2's long id format)."""
    return "i-" + secrets.token_hex(9)[:17]


def check_instance_id(instance_id: str) -> str:
    if not isinstance(instance_id, str) or not EC2_INSTANCE_ID.fullmatch(instance_id):
        raise UsageError(f"{instance_id!r} is not an instance id (i- followed by 17 hex digits)")
    return instance_id


# CPUID leaf 1 ECX bits of x86-64-v2 (SSE3, SSSE3, CX16, SSE4.1, SSE4.2, POPCNT)
_V2_ECX = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23)
_KVM_GET_API_VERSION = 0xAE00
_KVM_GET_SUPPORTED_CPUID = 0xC008AE05        # _IOWR(0xAE, 0x05, struct kvm_cpuid2)


def kvm_usable() -> bool:
    """Whether KVM can run a current distribution here: ``/dev/kvm`` opens read-write,
    speaks API 12 and offers the x86-64-v2 CPU features.  Some sandboxes offer a
    ``/dev/kvm`` without them, on which guests hang; software emulation is used there."""
    import fcntl
    import struct

    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION) != 12:
            return False
        n = 256
        buf = bytearray(struct.pack("II", n, 0) + bytes(40 * n))
        fcntl.ioctl(fd, _KVM_GET_SUPPORTED_CPUID, buf, True)
        for i in range(min(struct.unpack_from("I", buf)[0], n)):
            function, _, _, _, _, ecx, _ = struct.unpack_from("7I", buf, 8 + 40 * i)
            if function == 1:
                return ecx & _V2_ECX == _V2_ECX
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def choose_accel() -> str:
    forced = os.environ.get("SMSBLOCK_QEMU_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise UsageError(f"SMSBLOCK_QEMU_ACCEL={forced!r}: expected kvm or tcg")
        if forced == "kvm" and not kvm_usable():
            raise ImageError("SMSBLOCK_QEMU_ACCEL=kvm but /dev/kvm cannot be opened")
        return forced
    return "kvm" if kvm_usable() else "tcg"


def _qemu_path(value: str) -> str:
    """A path inside a QEMU ``key=value,...`` option: commas are doubled."""
    return value.replace(",", ",,")


def _exclusive_file(path: Path) -> None:
    """Create an empty owner-only file; fails on anything already there (a planted link)."""
    os.close(create_file(path))


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (boot tests)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _name(instance_id: str) -> str:
    """QEMU's ``-name`` of an instance: how its process is recognised."""
    return f"smsblock-{instance_id}"


def _pid_runs(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive and still the QEMU whose command line holds ``marker``
    (a reused pid of another program is not ours to signal)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z" and marker.encode() in cmdline


def _drive(overlay: Path, bus: str) -> list[str]:
    drive = f"file={_qemu_path(str(overlay))},format=qcow2,cache=unsafe"
    if bus == "ide":
        return ["-drive", f"{drive},if=ide"]
    device = {"nvme": "nvme,serial=smsblock-root,drive=root,bootindex=0",
              "virtio": "virtio-blk-pci,drive=root,bootindex=0"}[bus]
    return ["-drive", f"{drive},if=none,id=root", "-device", device]


def qemu_command(overlay: Path, console: Path, firmware: Path, *, accel: str,
                 memory_mib: int, name: str, disk_bus: str = "nvme",
                 disk_reads: Path | None = None) -> list[str]:
    # every guest read of the disk, to see boot code load its next stage
    trace = ["-trace", "blk_co_preadv", "-D", str(disk_reads)] if disk_reads else []
    return [
        QEMU, "-name", name, "-machine", f"pc,accel={accel}",
        # the x86-64-v2 baseline current distributions (RHEL 9) need: "host" trips QEMU 7.2
        # under nested KVM, and "max" makes software emulation 2-3 times slower
        "-cpu", "Nehalem",
        "-m", str(memory_mib), "-smp", "1",
        # no default NIC, VGA, CD-ROM or floppy: the firmware boots the disk or nothing
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        "-no-reboot",                                   # a reboot or panic=-1 ends QEMU
        "-chardev", f"file,id=console,path={_qemu_path(str(console))}", "-serial", "chardev:console",
        "-chardev", f"file,id=firmware,path={_qemu_path(str(firmware))}",
        "-device", "isa-debugcon,iobase=0x402,chardev=firmware",
        *_drive(overlay, disk_bus),
        *trace,
    ]


class Launches:
    """The launched instances recorded in a catalog's ``launches`` folder."""

    def __init__(self, catalog: Catalog | None = None):
        self.catalog = catalog if isinstance(catalog, Catalog) else Catalog(catalog)
        self.root = self.catalog.root / LAUNCHES

    # --- records ------------------------------------------------------------------

    def _dir(self, instance_id: str) -> Path:
        return self.root / check_instance_id(instance_id)

    def _save(self, record: dict) -> None:
        d = self._dir(record["instance_id"])
        replace_file(d / RECORD_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())

    def _load(self, instance_id: str) -> dict:
        path = self._dir(instance_id) / RECORD_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise ImageNotFoundError(f"no launched instance {instance_id} in {self.root}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ImageError(f"{path}: unreadable launch record ({e})") from None
        if not isinstance(record, dict) or record.get("instance_id") != instance_id:
            raise ImageError(f"{path}: the record does not describe instance {instance_id}")
        return record

    def _refresh(self, record: dict) -> dict:
        """A local instance whose QEMU has ended on its own is ``stopped``."""
        if record.get("target") == "local" and record.get("state") == "running":
            child = _children.get(record["instance_id"])
            alive = child.poll() is None if child is not None else \
                _pid_runs(record.get("pid", -1), _name(record["instance_id"]))
            if not alive:
                record["state"] = "stopped"
                if child is not None:
                    record["exit_status"] = child.returncode
                    _children.pop(record["instance_id"], None)
                self._save(record)
        return record

    def show(self, instance_id: str) -> dict:
        return self._refresh(self._load(instance_id))

    def list(self) -> list[dict]:
        out = []
        if not self.root.is_dir():
            return out
        for entry in sorted(self.root.iterdir()):
            if EC2_INSTANCE_ID.fullmatch(entry.name) and (entry / RECORD_FILE).is_file():
                try:
                    out.append(self.show(entry.name))
                except ImageError:
                    continue
        return sorted(out, key=lambda r: (r.get("launched", ""), r["instance_id"]))

    def _new_dir(self, instance_id: str) -> Path:
        # the catalog a 0700 root, `launches` a 0700 folder of it that is not a link
        make_root(self.catalog.root)
        os.close(open_subdir(self.catalog.root, LAUNCHES, create=True))
        d = self.root / instance_id
        os.mkdir(d, 0o700)                        # exclusive: an existing name fails
        return d

    # --- launch -------------------------------------------------------------------

    def launch(self, image_id: str, target: str = "local", *, memory_mib: int = DEFAULT_MEMORY_MIB,
               endpoint_url: str | None = None, region: str | None = None,
               instance_type: str = DEFAULT_INSTANCE_TYPE, disk_bus: str = "nvme",
               die_with_parent: bool = False, trace_disk_reads: bool = False) -> dict:
        """Start an instance of ``image_id``; returns its launch record.

        ``die_with_parent`` kills QEMU when the calling thread ends (boot tests);
        ``trace_disk_reads`` logs the guest's disk reads to ``disk-reads.log``."""
        check_image_id(image_id)
        if target not in TARGETS:
            raise UsageError(f"unknown launch target {target!r} (expected {' or '.join(TARGETS)})")
        if target == "ec2":
            return self._launch_ec2(image_id, endpoint_url, region, instance_type)
        if not isinstance(memory_mib, int) or not 64 <= memory_mib <= 65536:
            raise UsageError(f"memory {memory_mib!r} MiB is outside 64-65536")
        if disk_bus not in DISK_BUSES:
            raise UsageError(f"unknown disk bus {disk_bus!r} (expected {', '.join(DISK_BUSES)})")
        image = self.catalog.show(image_id)
        backing = Path(image["disk_path"])
        if not backing.is_file():
            raise ImageError(f"image {image_id} has no disk file at {backing}")
        for tool in (QEMU, "qemu-img"):
            if shutil.which(tool) is None:
                raise ImageError(f"launching locally needs {tool} (Debian packages qemu-system-x86, "
                                 f"qemu-utils)")
        accel = choose_accel()
        instance_id = new_instance_id()
        while (self.root / instance_id).exists():
            instance_id = new_instance_id()
        d = self._new_dir(instance_id)
        overlay, console, firmware = d / OVERLAY_FILE, d / CONSOLE_FILE, d / FIRMWARE_FILE
        reads = d / DISK_READS_FILE if trace_disk_reads else None
        for f in (overlay, console, firmware, reads):
            if f is not None:
                _exclusive_file(f)
        fmt = image.get("disk", {}).get("format", "vmdk")
        made = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt,
                               "-b", str(backing.resolve()), str(overlay)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            shutil.rmtree(d, ignore_errors=True)
            raise ImageError(f"cannot make the overlay of {backing}: {made.stderr.strip()}")
        cmd = qemu_command(overlay, console, firmware, accel=accel, memory_mib=memory_mib,
                           name=_name(instance_id), disk_bus=disk_bus, disk_reads=reads)
        record = {"instance_id": instance_id, "image_id": image_id, "target": "local",
                  "state": "pending", "launched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "accel": accel, "memory_mib": memory_mib, "disk_bus": disk_bus, "overlay": str(overlay),
                  "console_log": str(console), "firmware_log": str(firmware),
                  "disk_reads_log": str(reads) if reads else None,
                  "backing": str(backing), "command": cmd}
        self._save(record)
        # created new and written through this descriptor: never reopened by its name
        with os.fdopen(create_file(d / QEMU_LOG_FILE), "wb") as log:
            try:
                # own session and process group: terminate signals the whole group
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True, close_fds=True,
                                        preexec_fn=_die_with_parent if die_with_parent else None)
            except OSError as e:
                record["state"] = "failed"
                self._save(record)
                raise ImageError(f"cannot start {QEMU}: {e}") from None
        _children[instance_id] = proc
        record.update(state="running", pid=proc.pid, pgid=proc.pid)
        self._save(record)
        # a QEMU that refuses its arguments ends at once: say so instead of "running"
        try:
            proc.wait(0.3)
        except subprocess.TimeoutExpired:
            return record
        _children.pop(instance_id, None)
        record.update(state="failed", exit_status=proc.returncode)
        remove_file(overlay)
        self._save(record)
        err = (d / QEMU_LOG_FILE).read_text(errors="replace").strip().splitlines()
        raise ImageError(f"{QEMU} ended at once ({proc.returncode}): {err[-1] if err else 'no message'}")

    def _launch_ec2(self, image_id, endpoint_url, region, instance_type) -> dict:
        from .ec2 import run_instance

        result = run_instance(image_id, instance_type=instance_type, endpoint_url=endpoint_url,
                              region=region)
        instance_id = check_instance_id(result["instance_id"])
        self._new_dir(instance_id)
        record = {"instance_id": instance_id, "image_id": image_id, "target": "ec2",
                  "state": result["state"],
                  "launched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "instance_type": instance_type, "endpoint_url": endpoint_url,
                  "region": result["region"]}
        self._save(record)
        return record

    # --- terminate ----------------------------------------------------------------

    def terminate(self, instance_id: str, *, grace: float = 5.0) -> dict:
        """Stop the instance (its whole process group), remove its overlay."""
        record = self._load(instance_id)
        if record.get("target") == "ec2":
            from .ec2 import terminate_ec2_instance
            record["state"] = terminate_ec2_instance(instance_id, endpoint_url=record.get("endpoint_url"),
                                                 region=record.get("region"))
            self._save(record)
            return record
        if record.get("state") in ("running", "pending"):
            self._kill(record, grace)
        child = _children.pop(instance_id, None)
        if child is not None and child.returncode is not None:
            record["exit_status"] = child.returncode
        remove_file(record["overlay"])
        record["state"] = "terminated"
        record["terminated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._save(record)
        return record

    def _kill(self, record: dict, grace: float) -> None:
        child = _children.get(record["instance_id"])
        pid = record.get("pid")
        if child is not None:
            alive = lambda: child.poll() is None                       # noqa: E731
        elif isinstance(pid, int) and pid > 1:
            alive = lambda: _pid_runs(pid, _name(record["instance_id"]))  # noqa: E731
        else:
            return
        if not alive():
            return
        pgid = record.get("pgid", pid)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not alive():
                    return
                time.sleep(0.05)
        raise ImageError(f"instance {record['instance_id']} (pid {pid}) did not end after SIGKILL")


def launch_image(image_id: str, target: str = "local", *, catalog=None, **kwargs) -> dict:
    """Launch ``image_id`` (see :meth:`Launches.launch`); returns the launch record."""
    return Launches(catalog).launch(image_id, target, **kwargs)


def list_launches(catalog=None) -> list[dict]:
    return Launches(catalog).list()


def terminate_instance(instance_id: str, *, catalog=None) -> dict:
    return Launches(catalog).terminate(instance_id)
