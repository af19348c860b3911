"""The control plane on a vSphere connector (issue 7's source) against vcsim: register
with --vcenter, import the catalog from vCenter's inventory, run a job into an image."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from test_service_sources import bootable_image

vsphere_tests = pytest.importorskip("test_vsphere")   # skips without pyVmomi
Vcsim, USER, PASSWORD = vsphere_tests.Vcsim, vsphere_tests.USER, vsphere_tests.PASSWORD


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = Vcsim(tmp_path_factory.mktemp("vcsim-svc"))
    yield s
    s.stop()


def smsblock(*args, env):
    proc = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout and PASSWORD not in proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def test_vcenter_connector_catalog_and_run(sim, tmp_path):
    """`connector register --vcenter`, catalog import, an on-demand run through the
    connector (snapshot, HTTP stream, engine, image step), restore equal to qemu-img,
    snapshot gone, no secret stored or printed."""
    from conftest import qemu_raw_bytes
    env = dict(os.environ, SMSBLOCK_VCENTER_PASSWORD=PASSWORD)
    st = tmp_path / "state"
    conn = smsblock("connector", "register", "--state", st, "--vcenter", sim.url,
                    "--username", USER, env=env)
    settings = vsphere_tests.VCenterSettings.from_options(sim.url, USER, environ=env)
    with vsphere_tests.VSphereSource(settings) as src:
        instance_uuid = src.content.about.instanceUuid
        vm_id = vsphere_tests._vm(src, "DC0_H0_VM0").vmId
    assert conn["vmManagerType"] == "VSPHERE" and conn["vmManagerName"] == "127.0.0.1"
    assert conn["vmManagerId"] == instance_uuid
    config = sqlite3.connect(st / "state.db").execute(
        "SELECT source_kind, source_config FROM connectors").fetchone()
    assert config[0] == "vsphere" and PASSWORD not in config[1]

    smsblock("sms", "import-server-catalog", "--state", st, env=env)
    servers = smsblock("sms", "get-servers", "--state", st, env=env)["serverList"]
    by_name = {s["vmServer"]["vmName"]: s for s in servers}
    vm = by_name["DC0_H0_VM0"]["vmServer"]
    assert vm["vmPath"] == "/Datacenters/DC0/vm/DC0_H0_VM0"
    assert vm["vmServerAddress"]["vmManagerId"] == conn["vmManagerId"]
    assert vm["vmServerAddress"]["vmId"] == vm_id

    desc = vsphere_tests._put_flat_vmdk(sim, "DC0_H0_VM0", tmp_path,
                                        image=bootable_image(tmp_path / "img"))
    server_id = by_name["DC0_H0_VM0"]["serverId"]
    # the guest OS comes from vCenter's guestId (the license rule of create-replication-job)
    from pyVmomi import vim
    with vsphere_tests.VSphereSource(settings) as src:
        guest_id = src.get(vim.VirtualMachine(vm_id, src._si._stub),
                           "config.guestId")["config.guestId"]
    record = json.loads(sqlite3.connect(st / "state.db").execute(
        "SELECT vm_record FROM servers WHERE server_id = ?", (server_id,)).fetchone()[0])
    assert guest_id and record["identity"]["guestOS"] == guest_id
    job = smsblock("sms", "create-replication-job", "--state", st, "--server-id", server_id,
                   "--seed-replication-time", int(time.time()) + 86400,
                   "--frequency", 24, env=env)["replicationJobId"]
    run = smsblock("sms", "start-on-demand-replication-run", "--state", st,
                   "--replication-job-id", job, env=env)["replicationRunId"]
    did = smsblock("connector", "run", "--state", st, "--once", env=env)
    runs = smsblock("sms", "get-replication-runs", "--state", st, "--replication-job-id", job,
                    env=env)["replicationRunList"]
    assert did["completed"] == [run], [r.get("statusMessage") for r in runs]
    assert runs[0]["amiId"].startswith("ami-")
    assert "hashing diff" in runs[0]["statusMessage"]     # CBT is off on vcsim's VMs
    summary = json.loads(sqlite3.connect(st / "state.db").execute(
        "SELECT summary FROM runs WHERE run_id = ?", (run,)).fetchone()[0])
    assert summary["changeMethod"] == summary["disks"][0]["changeMethod"] == "hash"
    with vsphere_tests.VSphereSource(settings) as src:
        assert vsphere_tests._snapshots(src, vm_id) == []
    restored = tmp_path / "restored.raw"
    subprocess.run([sys.executable, "-m", "smsblock", "restore", "--store", st / "store",
                    "--server", server_id, "-o", restored], check=True, timeout=120,
                   capture_output=True)
    assert restored.read_bytes() == qemu_raw_bytes(desc, tmp_path)
    for f in st.rglob("*"):
        if f.is_file():
            assert PASSWORD.encode() not in f.read_bytes(), f
