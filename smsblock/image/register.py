"""``image create``: turn a replication run into a registered machine image.

The run's disk is read straight from the store (:meth:`Store.run_disk`), inspected and
validated; unless ``force`` is set, a disk with error findings is refused with them
(:class:`~smsblock.errors.ImageValidationError`).  The local target streams the run into
a streamOptimized VMDK in the catalog while reading it (no restored copy first) and
writes the image record.  The ec2 target writes a full EBS snapshot of the run through
the EBS direct APIs and calls RegisterImage (:mod:`.ec2`) at a configurable endpoint.
"""

from __future__ import annotations

import time

from ..errors import ImageValidationError, UsageError
from .catalog import Catalog
from .findings import ERROR
from .rules import Rules, load_rules
from .validate import inspect_and_validate

TARGETS = ("local", "ec2")
ROOT_DEVICE = "/dev/sda1"
BOOT_MODE = "legacy-bios"


def _refusal(report) -> str:
    errors = [f for f in report.findings if f.severity == ERROR]
    lines = "; ".join(f"[{f.code}] {f.message}" for f in errors)
    return f"the disk does not pass validation ({len(errors)} error(s)): {lines}"


def create_image(store, server_id: str, run_id: str | None = None, *, target: str = "local",
                 catalog: Catalog | None = None, force: bool = False,
                 allow_unsupported: bool = False, license_type: str = "Auto",
                 name: str | None = None, description: str | None = None,
                 rules: Rules | None = None, endpoint_url: str | None = None,
                 region: str | None = None, progress=None, cancel=None) -> dict:
    """Inspect, validate and register the run; returns the image record (a dict)."""
    from ..store import open_store

    if target not in TARGETS:
        raise UsageError(f"unknown image target {target!r} (expected {' or '.join(TARGETS)})")
    rules = rules or load_rules()
    store = open_store(store)
    disk = store.run_disk(server_id, run_id)
    try:
        run_id = disk.manifest.meta.get("run_id", run_id) if hasattr(disk, "manifest") else run_id
        report = inspect_and_validate(disk, rules=rules, allow_unsupported=allow_unsupported,
                                      source=f"{store.url}#{server_id}/{run_id}")
        os_family = report.os.family if report.os else None
        resolved_license = rules.resolve_license(license_type, os_family)
        if not report.ok and not force:
            raise ImageValidationError(_refusal(report), report.findings)
        architecture = (report.os.architecture if report.os else None) or "x86_64"
        record = {
            "name": name or f"{server_id}-{run_id}",
            "description": description or "",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": target,
            "source": {"store": store.url, "server_id": server_id, "run_id": run_id},
            "os": report.os.to_dict() if report.os else None,
            "architecture": architecture,
            "boot_mode": BOOT_MODE,
            "root_device_name": ROOT_DEVICE,
            "license_type": resolved_license,
            "license_type_requested": license_type,
            "forced": bool(force and not report.ok),
            "ok": report.ok,
            "findings": [f.to_dict() for f in report.findings],
            "inspection": report.to_dict(),
            "disk": {"virtual_size": disk.size},
        }
        if target == "ec2":
            from .ec2 import register_ec2
            result = register_ec2(disk, name=record["name"],
                                  description=record["description"] or f"smsblock {server_id} {run_id}",
                                  architecture=architecture, endpoint_url=endpoint_url,
                                  region=region, tags={"smsblock:server": server_id,
                                                       "smsblock:run": run_id},
                                  progress=progress, cancel=cancel)
            return dict(record, image_id=result["ec2_image_id"], ec2=result)
        from ..disk.writer import write_stream_optimized

        catalog = catalog or Catalog()
        return catalog.add(lambda path: write_stream_optimized(disk, path, progress=progress,
                                                               cancel=cancel), record)
    finally:
        disk.close()
