"""Where a connector finds VMs and reads their disks: sources behind one protocol.

The protocol is :class:`smsblock.source.Source` (shared with the vSphere source of
issue 7): ``list_vms()`` gives :class:`~smsblock.source.VmRecord` s for the server
catalog, ``open_run(vm, previous=...)`` a context manager holding a point-in-time view of
the VM's disks (:class:`~smsblock.source.SourceDisk`, boot disk first), released on exit
whether the run completed, failed or was cancelled.

A connector stores its source as a kind and a JSON config (never secrets);
:func:`open_source` reopens it, and other kinds plug in with :func:`register_source_kind`.

:class:`DatastoreSource` (kind ``"datastore"``) reads a datastore folder (a copy of, or a
mount of, a vSphere datastore): each VM is a folder with a ``.vmx`` file and its VMDKs,
nested in datacenter and folder directories that make up the VM's ``vmPath``.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable

from ..disk import Disk, open_disk
from ..errors import ConnectorError, SmsBlockError
from ..source import Source, SourceDisk, VmRecord
from .models import VmManagerType

_SOURCE_KINDS: dict[str, Callable[[dict], Source]] = {}


def register_source_kind(kind: str, factory: Callable[[dict], Source]) -> None:
    """Make ``open_source(kind, config)`` build sources with ``factory(config)``."""
    _SOURCE_KINDS[kind] = factory


def open_source(kind: str, config: dict) -> Source:
    """Open a connector's source from its stored kind and config."""
    try:
        factory = _SOURCE_KINDS[kind]
    except KeyError:
        raise ConnectorError(f"unknown connector source kind {kind!r} "
                             f"(known: {sorted(_SOURCE_KINDS)})") from None
    return factory(config)


# --- .vmx files ------------------------------------------------------------------

_VMX_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*"(.*)"\s*$')
_DISK_KEY = re.compile(r"^(scsi|sata|nvme|ide)(\d+):(\d+)\.filename$")
_BUS_ORDER = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
_ESCAPE = re.compile(r"\|([0-9A-Fa-f]{2})")
MAX_VMX_BYTES = 1 << 20


def parse_vmx(path: str | os.PathLike) -> dict[str, str]:
    """A .vmx file as {lower-case key: value}; VMware's ``|XX`` escapes decoded.

    Keys are case-insensitive in VMware's own reader, so they are lower-cased here.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_VMX_BYTES + 1)
    except OSError as e:
        raise ConnectorError(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_VMX_BYTES:
        raise ConnectorError(f"{path}: larger than {MAX_VMX_BYTES} bytes, not a .vmx file")
    if b"\0" in raw:
        raise ConnectorError(f"{path}: binary data, not a .vmx file")
    text = raw.decode("utf-8", errors="replace")
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith(".encoding"):
            continue
        m = _VMX_LINE.match(stripped)
        if m is None:
            raise ConnectorError(f"{path}: line {lineno}: expected key = \"value\", got {stripped[:60]!r}")
        out[m.group(1).lower()] = _ESCAPE.sub(lambda e: chr(int(e.group(1), 16)), m.group(2))
    return out


def vmx_disks(vmx: dict[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(device, disk file name)] boot order first, warnings) from a parsed .vmx.

    Boot order: SCSI, SATA, NVMe, then IDE, by controller and unit number.

    Devices marked ``present = "FALSE"`` are skipped; CD-ROMs are not disks, and a
    connected one is reported as a warning (the SMS guide asks to disconnect them).
    """
    found = []
    warnings = []
    for key, value in vmx.items():
        m = _DISK_KEY.match(key)
        if m is None:
            continue
        bus, ctrl, unit = m.group(1), int(m.group(2)), int(m.group(3))
        dev = f"{bus}{ctrl}:{unit}"
        if vmx.get(f"{dev}.present", "true").lower() == "false":
            continue
        dtype = vmx.get(f"{dev}.devicetype", "").lower()
        if "cdrom" in dtype or value.lower().endswith(".iso"):
            connected = vmx.get(f"{dev}.startconnected", "true").lower() != "false"
            if connected and value and dtype != "cdrom-raw":
                warnings.append(f"CD-ROM {dev} is connected to {value!r}; disconnect it "
                                "before replicating")
            continue
        if not value:
            continue
        found.append((_BUS_ORDER[bus], ctrl, unit, dev, value))
    found.sort()
    return [(f[3], f[4]) for f in found], warnings


# --- datastore folder source -------------------------------------------------------

ESXI_DATACENTER = "ha-datacenter"   # the datacenter name a standalone ESXi host reports


class DatastoreSource:
    """VMs in a datastore folder: ``ROOT/<datacenter>/<folder>.../<vm folder>/<name>.vmx``.

    The first directory level is the datacenter and the levels below it the VM folders,
    so ``ROOT/DC1/prod/web/web.vmx`` gets ``vmPath`` ``/Datacenters/DC1/vm/prod/<name>``
    (``name`` is the .vmx ``displayName``).  A VM folder directly under ROOT is in the
    datacenter ``ha-datacenter``, as on a standalone ESXi host.  ``vmId`` is the .vmx
    path relative to ROOT, which stays the same across imports; ``vmManagerId`` is a
    UUID derived from ROOT's absolute path.

    The disks are read as the files are (a VMDK snapshot chain is followed to its base):
    point it at a powered-off VM, a copy, or a storage snapshot for a consistent image.
    Changes between runs are found by the engine's hashing diff.
    """

    kind = "datastore"
    manager_type = VmManagerType.VSPHERE.value

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ConnectorError(f"datastore folder {root} does not exist or is not a directory")
        self.manager_name = str(self.root)
        self.manager_id = str(uuid.uuid5(uuid.NAMESPACE_URL, self.root.as_uri()))

    @classmethod
    def from_config(cls, config: dict) -> "DatastoreSource":
        if not isinstance(config, dict) or not isinstance(config.get("path"), str):
            raise ConnectorError(f"datastore source config {config!r} has no path")
        return cls(config["path"])

    def config(self) -> dict:
        return {"path": str(self.root)}

    def close(self) -> None:
        pass

    def list_vms(self) -> list[VmRecord]:
        vms = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
            dirnames.sort()
            vmx_files = sorted(f for f in filenames if f.lower().endswith(".vmx"))
            if not vmx_files:
                continue
            dirnames[:] = []  # a VM folder holds no other VMs
            for name in vmx_files:
                vms.append(self._record(Path(dirpath) / name)[0])
        return vms

    @staticmethod
    def _walk_error(err: OSError) -> None:
        raise ConnectorError(f"{err.filename}: cannot list: {err.strerror}")

    def _record(self, vmx_path: Path) -> tuple[VmRecord, list[tuple[str, Path]]]:
        vmx = parse_vmx(vmx_path)
        rel = vmx_path.relative_to(self.root)
        name = vmx.get("displayname") or vmx_path.stem
        parents = list(rel.parts[:-2])  # directories above the VM folder
        datacenter = parents[0] if parents else ESXI_DATACENTER
        vm_path = "/" + "/".join(["Datacenters", datacenter, "vm", *parents[1:], name])
        disks, warnings = vmx_disks(vmx)
        if not disks:
            warnings.append("the .vmx names no disks")
        identity = {k: v for k, v in (("biosUuid", vmx.get("uuid.bios")),
                                      ("instanceUuid", vmx.get("vc.uuid")),
                                      ("guestOS", vmx.get("guestos"))) if v}
        record = VmRecord(vmId=rel.as_posix(), vmName=name, vmPath=vm_path,
                          vmManagerName=self.manager_name, vmManagerId=self.manager_id,
                          vmManagerType=self.manager_type, identity=identity, warnings=warnings)
        return record, [(dev, Path(f) if os.path.isabs(f) else vmx_path.parent / f)
                        for dev, f in disks]

    def open_run(self, vm: VmRecord | dict, *, previous: dict | None = None,
                 previous_disks: dict[str, Disk] | None = None, cancel=None) -> "DatastoreRun":
        vm_id = vm.vmId if isinstance(vm, VmRecord) else vm.get("vmId")
        if not isinstance(vm_id, str):
            raise ConnectorError(f"no vmId in {vm!r}")
        path = (self.root / vm_id).resolve()
        if not path.is_relative_to(self.root) or path.suffix.lower() != ".vmx":
            raise ConnectorError(f"VM id {vm_id!r} is not a .vmx under {self.root}")
        if not path.is_file():
            raise ConnectorError(f"VM {vm_id!r} is gone from the datastore {self.root}")
        record, disks = self._record(path)
        if not disks:
            raise ConnectorError(f"VM {vm_id!r} ({self.root}): the .vmx names no disks")
        return DatastoreRun(self.root, vm_id, disks, record.warnings)


class DatastoreRun:
    """The disks of one VM of a datastore folder, open for one run."""

    def __init__(self, root: Path, vm_id: str, disks: list[tuple[str, Path]], warnings: list[str]):
        self.root = root
        self.vm_id = vm_id
        self._paths = disks
        self.warnings = list(warnings)
        self.disks: list[SourceDisk] = []
        self.moved_to = None     # vmId is the .vmx path: a moved folder is another VM

    def __enter__(self) -> "DatastoreRun":
        try:
            for n, (dev, p) in enumerate(self._paths, 1):
                resolved = p.resolve()
                if not resolved.is_relative_to(self.root):
                    raise ConnectorError(f"VM {self.vm_id!r}: disk {p} is outside the datastore {self.root}")
                if not resolved.is_file():
                    raise ConnectorError(f"VM {self.vm_id!r}: disk {p} does not exist")
                self.disks.append(SourceDisk(
                    key=dev, label=f"Hard disk {n}", location=str(resolved.relative_to(self.root)),
                    disk=open_disk(resolved), change_method="hash",
                    change_reason="datastore folder: no changed block tracking, hashing diff"))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for d in self.disks:
            with contextlib.suppress(SmsBlockError, OSError):
                d.disk.close()
        self.disks = []

    def record(self) -> dict[str, Any]:
        return {"source": "datastore", "vmId": self.vm_id,
                "disks": [d.record() for d in self.disks]}


def _open_vsphere(config: dict) -> Source:
    from ..source.vsphere import VSphereSource   # pyVmomi only when a vCenter is used
    return VSphereSource.from_config(config)


register_source_kind(DatastoreSource.kind, DatastoreSource.from_config)
register_source_kind("vsphere", _open_vsphere)
