"""Snapshot sources: where a connector finds VMs and reads a consistent copy of their disks.

A source lists the VMs of its virtualisation manager for the server catalog
(:meth:`Source.list_vms`) and, for one replication run of one VM, opens a
:class:`SourceRun`: a context manager that takes a snapshot on entry, exposes the
snapshot's disks as :class:`~smsblock.disk.Disk` objects, and removes the snapshot on exit,
whether the run completed, failed or was cancelled.

Sources: :mod:`smsblock.source.vsphere` (vCenter through pyVmomi).  The datastore-folder
source of the control plane follows the same shape.

Other sources need no base class, only this shape.  A connector reopens its source with
``factory(config)`` (:func:`smsblock.service.sources.open_source`): kinds are registered
in a process with :func:`~smsblock.service.sources.register_source_kind`, or declared by
an installed package as an entry point of the group ``smsblock.sources`` (then the CLI,
the connector and ``smsblock serve`` find them too).  Sources are never shared between
threads: each catalog import and each run opens its own and closes it; a run's disks are
read by the engine's worker threads concurrently.  Failures are
:class:`~smsblock.errors.ConnectorError` (one line: what and where).  docs/api.md
("Writing a snapshot source") has the details and a worked, tested example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..disk.base import Disk


@dataclass
class VmRecord:
    """One VM as the catalog needs it, with the SMS API's field names where they exist."""

    vmId: str                 # the manager's id of the VM (vSphere: managed object id)
    vmName: str
    vmPath: str               # "/Datacenters/DC/vm/Folder/.../name"
    vmManagerName: str
    vmManagerId: str
    vmManagerType: str        # "VSPHERE"
    #: identities that survive a move (vSphere: instance UUID and BIOS UUID)
    identity: dict[str, str] = field(default_factory=dict)
    #: things the operator should fix before replicating (connected CD-ROMs, ...)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"vmId": self.vmId, "vmName": self.vmName, "vmPath": self.vmPath,
                "vmManagerName": self.vmManagerName, "vmManagerId": self.vmManagerId,
                "vmManagerType": self.vmManagerType, "identity": dict(self.identity),
                "warnings": list(self.warnings)}


@dataclass
class SourceDisk:
    """One disk of a snapshot, ready for the engine."""

    key: str                  # stable name of the disk within the VM (vSphere: device key)
    label: str                # "Hard disk 1"
    location: str             # "[datastore] folder/file.vmdk"
    disk: Disk
    #: "cbt" when only the areas changed block tracking reported are read over the
    #: network, "hash" when the whole disk is read and the engine's hashing finds changes
    change_method: str = "hash"
    change_reason: str = ""   # why the method was chosen (shown in the run's record)
    change_id: str | None = None  # to hand back as ``previous`` on the next run
    #: byte ``(offset, length)`` extents changed since the previous run (sorted, not
    #: overlapping), when the source knows them (changed block tracking); the engine then
    #: reads and hashes only those and carries every other block over from the server's
    #: latest run in the store (``replicate(changed_extents=...)``).  None: unknown, the
    #: whole of ``disk`` is read and hashed.  Only set it when that latest run is the
    #: previous run the list is relative to (or later), with the same disk size.
    changed_extents: list[tuple[int, int]] | None = None

    def record(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "location": self.location,
                "size": self.disk.size, "changeMethod": self.change_method,
                "changeReason": self.change_reason, "changeId": self.change_id}


class SourceRun(Protocol):
    """A snapshot being read; use as a context manager (exit removes the snapshot)."""

    disks: list[SourceDisk]
    warnings: list[str]
    #: optional: the VM's catalog record (``VmRecord.to_dict()``) when the source found it
    #: at a new place (vMotion); the control plane then updates the server's vmId/vmPath
    moved_to: dict | None

    def __enter__(self) -> "SourceRun": ...
    def __exit__(self, *exc) -> None: ...

    def record(self) -> dict[str, Any]:
        """JSON-serialisable facts for the run's record; give it back as ``previous``."""
        ...


class Source(Protocol):
    """A virtualisation manager a connector is registered with."""

    manager_type: str
    manager_name: str
    manager_id: str

    def list_vms(self) -> list[VmRecord]:
        """The VMs for the catalog; may take a ``cancel`` keyword (a CancelToken)."""
        ...

    def open_run(self, vm: VmRecord | dict, *, previous: dict | None = None,
                 previous_disks: dict[str, Disk] | None = None, cancel=None) -> SourceRun:
        """A not yet entered run of ``vm`` (a catalog record: check its ``vmId``);
        ``previous`` is the job's last completed run's :meth:`SourceRun.record`, and
        ``previous_disks`` that run's disks in the store by :attr:`SourceDisk.key`."""
        ...

    def close(self) -> None: ...


__all__ = ["VmRecord", "SourceDisk", "SourceRun", "Source"]
