"""`smsblock connector ...` and `smsblock sms VERB` in process: options, JSON output, errors."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest

from smsblock.cli import main
from test_service_sources import make_datastore


def cli(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def ok(capsys, *args):
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    return json.loads(out) if out.strip() else {}


@pytest.fixture
def state(tmp_path, capsys):
    ds = make_datastore(tmp_path / "ds", 3)
    st = tmp_path / "state"
    conn = ok(capsys, "connector", "register", "--state", st, "--datastore", ds)
    return st, conn


def test_register_prints_the_connector(state, capsys):
    st, conn = state
    assert conn["connectorId"].startswith("c-") and len(conn["connectorId"]) == 19
    assert conn["status"] == "HEALTHY" and conn["vmManagerType"] == "VSPHERE"
    assert isinstance(conn["associatedOn"], float)
    out = ok(capsys, "sms", "get-connectors", "--state", st)
    assert out["connectorList"] == [conn]


def test_register_needs_exactly_one_source(tmp_path, capsys):
    status, _, err = cli(capsys, "connector", "register", "--state", tmp_path)
    assert status == 2 and "exactly one" in err
    status, _, err = cli(capsys, "connector", "register", "--state", tmp_path,
                         "--datastore", tmp_path / "missing")
    assert status == 1 and "does not exist" in err
    status, _, err = cli(capsys, "connector", "register", "--state", tmp_path,
                         "--vcenter", "vc.example:8443")
    assert status == 2 and "--username" in err
    status, _, err = cli(capsys, "connector", "register", "--state", tmp_path,
                         "--datastore", tmp_path, "--username", "svc")
    assert status == 2 and "--username is only valid with --vcenter" in err
    assert ok(capsys, "sms", "get-connectors", "--state", tmp_path)["connectorList"] == []


@pytest.mark.sqlite_only     # the default state directory's own database file
def test_state_from_smsblock_home(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SMSBLOCK_HOME", str(tmp_path / "home"))
    ds = make_datastore(tmp_path / "ds", 1)
    ok(capsys, "connector", "register", "--datastore", ds)
    assert (tmp_path / "home" / "state.db").exists()
    assert len(ok(capsys, "sms", "get-connectors")["connectorList"]) == 1


def test_sms_verbs_walkthrough(state, capsys):
    st, conn = state
    assert ok(capsys, "sms", "import-server-catalog", "--state", st) == {}
    out = ok(capsys, "sms", "get-servers", "--state", st, "--max-results", 2)
    assert len(out["serverList"]) == 2 and out["nextToken"]
    rest = ok(capsys, "sms", "get-servers", "--state", st, "--next-token", out["nextToken"])
    assert len(rest["serverList"]) == 1 and "nextToken" not in rest
    server = out["serverList"][0]
    addr = server["vmServer"]["vmServerAddress"]
    filt = ok(capsys, "sms", "get-servers", "--state", st, "--vm-server-address-list",
              f"vmManagerId={addr['vmManagerId']},vmId={addr['vmId']}")
    assert [s["serverId"] for s in filt["serverList"]] == [server["serverId"]]
    filt = ok(capsys, "sms", "get-servers", "--state", st, "--vm-server-address-list",
              json.dumps([addr]))
    assert [s["serverId"] for s in filt["serverList"]] == [server["serverId"]]

    # the seed slot an hour ahead: an on-demand run now does not wait for it
    seed = datetime.fromtimestamp(time.time() + 3600, tz=timezone.utc).isoformat()
    job = ok(capsys, "sms", "create-replication-job", "--state", st, "--server-id",
             server["serverId"], "--seed-replication-time", seed, "--frequency", 12,
             "--no-run-once", "--license-type", "BYOL", "--role-name", "sms",
             "--number-of-recent-amis-to-keep", 1)["replicationJobId"]
    # epoch seconds work too
    other = rest["serverList"][0]["serverId"]
    ok(capsys, "sms", "create-replication-job", "--state", st, "--server-id", other,
       "--seed-replication-time", int(time.time()) + 3600, "--run-once")
    jobs = ok(capsys, "sms", "get-replication-jobs", "--state", st)["replicationJobList"]
    assert len(jobs) == 2 and jobs[0]["replicationJobId"] == job and jobs[1]["runOnce"] is True
    run = ok(capsys, "sms", "start-on-demand-replication-run", "--state", st,
             "--replication-job-id", job, "--description", "now")["replicationRunId"]
    runs = ok(capsys, "sms", "get-replication-runs", "--state", st, "--replication-job-id", job)
    assert runs["replicationRunList"][0]["replicationRunId"] == run
    assert runs["replicationJob"]["replicationJobId"] == job
    assert ok(capsys, "sms", "update-replication-job", "--state", st, "--replication-job-id", job,
              "--frequency", 20, "--next-replication-run-start-time",
              int(time.time()) + 86400, "--description", "d") == {}
    (j,) = ok(capsys, "sms", "get-replication-jobs", "--state", st, "--replication-job-id",
              job)["replicationJobList"]
    assert j["frequency"] == 20 and j["description"] == "d"
    assert ok(capsys, "sms", "delete-replication-job", "--state", st,
              "--replication-job-id", job) == {}
    status, out, err = cli(capsys, "sms", "disassociate-connector", "--state", st,
                           "--connector-id", conn["connectorId"])
    assert status == 255 and "(OperationNotPermittedException)" in err   # the other job
    status, _, err = cli(capsys, "sms", "delete-server-catalog", "--state", st)
    assert status == 255 and "(OperationNotPermittedException)" in err


def test_errors_look_like_aws_and_exit_255(state, capsys):
    st, _ = state
    status, out, err = cli(capsys, "sms", "create-replication-job", "--state", st,
                           "--server-id", "s-12345678", "--seed-replication-time", "soon",
                           "--frequency", 12)
    assert status == 255 and out == ""
    assert "An error occurred (InvalidParameterException) when calling the " \
           "CreateReplicationJob operation:" in err and "seedReplicationTime" in err
    status, _, err = cli(capsys, "sms", "get-replication-runs", "--state", st,
                         "--replication-job-id", "sms-job-00000000")
    # GetReplicationRuns does not declare ReplicationJobNotFound (issue 10)
    assert status == 255 and "(InvalidParameterException)" in err and "does not exist" in err
    status, _, err = cli(capsys, "sms", "get-servers", "--state", st, "--next-token", "zzz")
    assert status == 255 and "(InvalidParameterException)" in err
    status, _, err = cli(capsys, "sms", "get-servers", "--state", st,
                         "--vm-server-address-list", "vmName=x")
    assert status == 2 and "vmManagerId" in err


def test_connector_run_once_prints_what_it_did(state, capsys):
    st, _ = state
    ok(capsys, "sms", "import-server-catalog", "--state", st)
    server = ok(capsys, "sms", "get-servers", "--state", st)["serverList"][0]["serverId"]
    job = ok(capsys, "sms", "create-replication-job", "--state", st, "--server-id", server,
             "--seed-replication-time", datetime.now(timezone.utc).isoformat(),
             "--frequency", 12)["replicationJobId"]
    did = ok(capsys, "connector", "run", "--state", st, "--once")
    assert len(did["scheduled"]) == 1 and did["scheduled"] == did["failed"]  # blank disk: no image
    runs = ok(capsys, "sms", "get-replication-runs", "--state", st, "--replication-job-id", job)
    (r,) = runs["replicationRunList"]
    assert r["type"] == "AUTOMATIC" and r["state"] == "FAILED" and "validation" in r["statusMessage"]


@pytest.mark.sqlite_only     # the connector process opens the state directory itself
def test_connector_run_loop_executes_due_runs_into_the_given_store(tmp_path, capsys):
    """The long-running connector (a real process): picks the seed run, stops on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    ds = make_datastore(tmp_path / "ds", 1)
    st, store = tmp_path / "state", tmp_path / "elsewhere"
    ok(capsys, "connector", "register", "--state", st, "--datastore", ds, "--store", store)
    ok(capsys, "sms", "import-server-catalog", "--state", st)
    server = ok(capsys, "sms", "get-servers", "--state", st)["serverList"][0]["serverId"]
    job = ok(capsys, "sms", "create-replication-job", "--state", st, "--server-id", server,
             "--seed-replication-time", int(time.time()), "--frequency", 12)["replicationJobId"]
    proc = subprocess.Popen([sys.executable, "-m", "smsblock", "connector", "run", "--state",
                             str(st), "--poll-interval", "0.2"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            runs = ok(capsys, "sms", "get-replication-runs", "--state", st,
                      "--replication-job-id", job)["replicationRunList"]
            if runs and runs[0]["state"] in ("COMPLETED", "FAILED"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the connector did not run the seed run")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
    from smsblock.store import open_store
    assert len(open_store(store).list_run_ids(server)) == 1   # blocks went to --store
    assert not (st / "store").exists()


def test_license_role_and_deleted_jobs_through_the_cli(state, capsys):
    """The SMS rules as `smsblock sms` shows them: a Linux server (the test VMs' .vmx say
    ubuntu-64) defaults to BYOL and refuses AWS, role names are ASCII IAM names, and a
    deleted job stays listed as DELETED."""
    st, _ = state
    ok(capsys, "sms", "import-server-catalog", "--state", st)
    server = ok(capsys, "sms", "get-servers", "--state", st)["serverList"][0]["serverId"]
    seed = int(time.time()) + 3600
    base = ("sms", "create-replication-job", "--state", st, "--server-id", server,
            "--seed-replication-time", seed, "--frequency", 12)
    status, out, err = cli(capsys, *base, "--license-type", "AWS")
    assert status == 255 and out == "" and len(err.strip().splitlines()) == 1
    assert "(InvalidParameterException)" in err and "Linux" in err and "BYOL" in err
    status, _, err = cli(capsys, *base, "--role-name", "sms-rôle")
    assert status == 255 and "roleName" in err and "ASCII" in err
    job = ok(capsys, *base, "--role-name", "sms-role")["replicationJobId"]
    (j,) = ok(capsys, "sms", "get-replication-jobs", "--state", st)["replicationJobList"]
    assert (j["licenseType"], j["roleName"]) == ("BYOL", "sms-role")
    ok(capsys, "sms", "delete-replication-job", "--state", st, "--replication-job-id", job)
    (j,) = ok(capsys, "sms", "get-replication-jobs", "--state", st)["replicationJobList"]
    assert (j["replicationJobId"], j["state"]) == (job, "DELETED")
    [s] = [s for s in ok(capsys, "sms", "get-servers", "--state", st)["serverList"]
           if s["serverId"] == server]
    assert s["replicationJobTerminated"] is True
    status, _, err = cli(capsys, "sms", "start-on-demand-replication-run", "--state", st,
                         "--replication-job-id", job)
    # StartOnDemandReplicationRun declares no ReplicationJobNotFoundException: the model's
    # InvalidParameterException carries the reason
    assert status == 255 and "(InvalidParameterException)" in err and "deleted" in err
