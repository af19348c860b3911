"""Findings of the attack review of the datastore source (real folders, real disks made
by qemu-img): caps on what a .vmx puts in the catalog, names that cannot fake another
VM's vmPath, short failure reasons, hard links, and a root replaced by a link."""

from __future__ import annotations

import os

import pytest

from smsblock.errors import ConnectorError
from smsblock.service import SmsService
from smsblock.service.executor import RunExecutor
from smsblock.service.sources import (MAX_VM_NAME, DatastoreSource, open_beneath, open_source)
from test_service_executor import FakeImageStep, job_for, run_now, setup
from test_service_sources import make_vm


def _catalog(root):
    src = DatastoreSource(root)
    return src, {vm.vmId: vm for vm in src.list_vms()}


# --- finding 4: .vmx values -----------------------------------------------------------------

def test_a_display_name_cannot_fake_or_duplicate_another_vms_path(tmp_path):
    ds = tmp_path / "ds"
    make_vm(ds, "DC1/prod/ok", "ok")
    make_vm(ds, "DC1/other", "prod/ok")
    make_vm(ds, "DC1/far/away/x", "../../../DC1/vm/prod/ok")
    make_vm(ds, "DC1/pct", "prod%2fok")
    _, vms = _catalog(ds)
    paths = {vm.vmPath for vm in vms.values()}
    assert len(paths) == 4, paths
    assert vms["DC1/prod/ok/ok.vmx"].vmPath == "/Datacenters/DC1/vm/prod/ok"
    assert vms["DC1/other/other.vmx"].vmPath == "/Datacenters/DC1/vm/prod%2fok"
    assert vms["DC1/far/away/x/x.vmx"].vmPath == \
        "/Datacenters/DC1/vm/far/away/..%2f..%2f..%2fDC1%2fvm%2fprod%2fok"
    assert vms["DC1/pct/pct.vmx"].vmPath == "/Datacenters/DC1/vm/prod%252fok"


def test_long_or_control_character_values_from_a_vmx_are_capped(tmp_path):
    ds = tmp_path / "ds"
    make_vm(ds, "DC1/long", "n" * (MAX_VM_NAME + 1))
    make_vm(ds, "DC1/ctl", "a|0Ab")                      # a newline, escaped in the .vmx
    make_vm(ds, "DC1/max", "m" * MAX_VM_NAME)
    make_vm(ds, "DC1/guest", "guest", extra=f'guestos = "{"g" * 5000}"\n'
            f'ide1:0.deviceType = "cdrom-image"\nide1:0.fileName = "{"c" * 100000}.iso"\n')
    make_vm(ds, "DC1/disk", "disk", extra=f'scsi0:1.fileName = "{"d" * 5000}.vmdk"\n')
    src, vms = _catalog(ds)
    assert set(vms) == {"DC1/max/max.vmx", "DC1/guest/guest.vmx"}
    reasons = {p["location"]: p["reason"] for p in src.list_problems}
    assert "displayName" in reasons["DC1/long/long.vmx"]
    assert "displayName" in reasons["DC1/ctl/ctl.vmx"]
    assert "fileName" in reasons["DC1/disk/disk.vmx"]
    assert all(len(r) < 400 for r in reasons.values())
    guest = vms["DC1/guest/guest.vmx"]
    assert "guestOS" not in guest.identity
    assert sum(len(w) for w in guest.warnings) < 1000, guest.warnings


def test_a_failure_reason_quoting_the_vmx_is_short(tmp_path):
    svc, server, vmx = setup(tmp_path)
    try:
        job = job_for(svc, server)
        long_name = "d/" * 400 + "x.vmdk"          # does not exist: the run fails quoting it
        vmx.write_text(vmx.read_text().replace('fileName = "web.vmdk"', f'fileName = "{long_name}"'))
        run = run_now(svc, job, RunExecutor(svc.state, svc.clock, image_step=FakeImageStep()))
        assert run["state"] == "FAILED"
        assert len(run["statusMessage"]) <= 420, len(run["statusMessage"])
        j = svc.get_replication_jobs(replicationJobId=job)["replicationJobList"][0]
        assert len(j["statusMessage"]) <= 460
    finally:
        svc.close()


# --- finding 11: hard links -------------------------------------------------------------------

def test_a_hard_link_inside_the_datastore_is_refused(tmp_path):
    ds = tmp_path / "ds"
    vmx = make_vm(ds, "DC1/web", "web")
    outside = tmp_path / "secret.img"
    outside.write_bytes(b"s" * 65536)
    disk = vmx.parent / "web.vmdk"
    disk.unlink()
    os.link(outside, disk)
    with pytest.raises(ConnectorError, match="2 hard links; refused"):
        open_beneath(ds, "DC1/web/web.vmdk")
    src = DatastoreSource(ds)
    (vm,) = src.list_vms()
    with pytest.raises(ConnectorError, match="hard links"):
        with src.open_run(vm):
            pass
    os.link(vmx, tmp_path / "other.vmx")        # a linked .vmx is left out, with the reason
    assert src.list_vms() == []
    assert "hard links" in src.list_problems[0]["reason"]


# --- finding 12: a root replaced by a link after registration ---------------------------------

@pytest.mark.parametrize("where", ["root", "parent"])
def test_a_registered_root_replaced_by_a_link_is_refused(tmp_path, where):
    real = tmp_path / "a" / "ds"
    make_vm(real, "DC1/web", "web")
    make_vm(tmp_path / "elsewhere" / "ds", "DC1/evil", "evil")
    svc = SmsService(tmp_path / "state")
    try:
        svc.register_connector("datastore", {"path": str(real)})
        svc.import_server_catalog()
        (server,) = svc.get_servers()["serverList"]
        config = {"path": str(real), "pinned": True}
        src = open_source("datastore", config)
        (vm,) = src.list_vms()
        if where == "root":
            os.rename(real, tmp_path / "a" / "moved")
            os.symlink(tmp_path / "elsewhere" / "ds", real)
        else:
            os.rename(tmp_path / "a", tmp_path / "a-moved")
            os.symlink(tmp_path / "elsewhere", tmp_path / "a")
        for attempt in (lambda: open_source("datastore", config),
                        src.list_vms, lambda: src.open_run(vm)):
            with pytest.raises(ConnectorError, match="no longer the folder registered"):
                attempt()
    finally:
        svc.close()
    assert server["vmServer"]["vmPath"] == "/Datacenters/DC1/vm/web"


def test_a_registered_root_is_stored_pinned(tmp_path):
    real = tmp_path / "ds"
    make_vm(real, "DC1/web", "web")
    os.symlink(real, tmp_path / "link")
    src = DatastoreSource(tmp_path / "link")        # registration resolves the link
    assert src.config() == {"path": str(real), "pinned": True}
