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
    env = dict(os.environ, SMSBLOCK_VCENTER_PASSWORD=PASSWORD)
    st = tmp_path / "state"
    conn = smsblock("connector", "register", "--state", st, "--vcenter", sim.url,
                    "--username", USER, env=env)
    assert conn["vmManagerType"] == "VSPHERE" and conn["vmManagerName"] == "127.0.0.1"
    config = sqlite3.connect(st / "state.db").execute(
        "SELECT source_kind, source_config FROM connectors").fetchone()
    assert config[0] == "vsphere" and PASSWORD not in config[1]

    smsblock("sms", "import-server-catalog", "--state", st, env=env)
    servers = smsblock("sms", "get-servers", "--state", st, env=env)["serverList"]
    by_name = {s["vmServer"]["vmName"]: s for s in servers}
    assert "DC0_H0_VM0" in by_name
    vm = by_name["DC0_H0_VM0"]["vmServer"]
    assert vm["vmPath"].startswith("/Datacenters/DC0/vm/") and vm["vmPath"].endswith("/DC0_H0_VM0")
    assert vm["vmServerAddress"]["vmManagerId"] == conn["vmManagerId"]
    assert vm["vmServerAddress"]["vmId"].startswith("vm-")

    vsphere_tests._put_flat_vmdk(sim, "DC0_H0_VM0", tmp_path, image=bootable_image(tmp_path / "img"))
    job = smsblock("sms", "create-replication-job", "--state", st, "--server-id",
                   by_name["DC0_H0_VM0"]["serverId"], "--seed-replication-time",
                   int(time.time()) + 86400,
                   "--frequency", 24, env=env)["replicationJobId"]
    run = smsblock("sms", "start-on-demand-replication-run", "--state", st,
                   "--replication-job-id", job, env=env)["replicationRunId"]
    did = smsblock("connector", "run", "--state", st, "--once", env=env)
    runs = smsblock("sms", "get-replication-runs", "--state", st, "--replication-job-id", job,
                    env=env)["replicationRunList"]
    assert did["completed"] == [run], [r.get("statusMessage") for r in runs]
    assert runs[0]["amiId"].startswith("ami-")
    summary = json.loads(sqlite3.connect(st / "state.db").execute(
        "SELECT summary FROM runs WHERE run_id = ?", (run,)).fetchone()[0])
    assert summary["disks"][0]["changeMethod"] in ("cbt", "hash")
