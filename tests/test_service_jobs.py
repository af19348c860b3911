"""Control-plane rules through the Python API: catalog, jobs, on-demand runs, limits, errors.

Time comes from a FakeClock; every refusal is checked for its SMS error name and for
leaving the state database unchanged.
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest

from smsblock.errors import ServiceError, UsageError
from smsblock.service import FakeClock, ServiceConfig, SmsService, State
from smsblock.service.models import (CONNECTOR_ID, JOB_ID, RUN_ID, SERVER_ID, new_connector_id,
                                     new_job_id, new_run_id, new_server_id, parse_timestamp)
from smsblock.service.state import SCHEMA_VERSION
from test_service_sources import make_datastore, make_vm

H = 3600.0
DAY = 86400.0
T0 = 1_800_000_000.0


@pytest.fixture
def env(tmp_path):
    ds = make_datastore(tmp_path / "ds", 2)
    clock = FakeClock(T0)
    svc = SmsService(tmp_path / "state", clock=clock)
    conn = svc.register_connector("datastore", {"path": str(ds)})
    svc.import_server_catalog()
    servers = [s["serverId"] for s in svc.get_servers()["serverList"]]
    yield svc, clock, servers, conn, ds
    svc.close()


def dump(svc: SmsService) -> dict:
    """Every row of every table, for "a refusal changes nothing" checks."""
    return {t: [tuple(r) for r in svc.state.query(f"SELECT * FROM {t} ORDER BY rowid")]
            for t in svc.state.tables()}


def refused(svc, code, fn, *args, **kw):
    before = dump(svc)
    with pytest.raises(ServiceError) as info:
        fn(*args, **kw)
    assert info.value.code == code, str(info.value)
    assert dump(svc) == before, "a refused call changed the state"
    return info.value


def new_job(svc, server, **kw):
    params = {"serverId": server, "seedReplicationTime": svc.clock(), "frequency": 12}
    params.update(kw)
    return svc.create_replication_job(**params)["replicationJobId"]


# --- ids, timestamps, schema --------------------------------------------------------

def test_id_shapes():
    for _ in range(50):
        assert CONNECTOR_ID.match(new_connector_id())
        assert SERVER_ID.match(new_server_id())
        assert JOB_ID.match(new_job_id())
        assert RUN_ID.match(new_run_id())


@pytest.mark.parametrize("text", ["2027-01-15T08:00:00Z", "2027-01-15T08:00:00+00:00",
                                  "2027-01-15T09:00:00+01:00", "1800000000", 1800000000,
                                  "1800000000.0", "2027-01-15 08:00:00"])
def test_timestamps_iso_8601_or_epoch(text):
    assert parse_timestamp(text).timestamp() == T0


@pytest.mark.parametrize("bad", ["yesterday", "", True, [1], "2027-13-01T00:00:00"])
def test_bad_timestamps_are_invalid_parameters(bad):
    with pytest.raises(ServiceError) as e:
        parse_timestamp(bad, "seedReplicationTime")
    assert e.value.code == "InvalidParameterException" and "seedReplicationTime" in str(e.value)


def test_schema_is_versioned_and_a_newer_one_is_refused(tmp_path):
    with State(tmp_path) as st:
        assert st.version == SCHEMA_VERSION and st.check() == "ok"
    with State(tmp_path) as st:   # reopening migrates nothing
        assert st.version == SCHEMA_VERSION
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(ServiceError, match="newer"):
        State(tmp_path)


def test_state_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SMSBLOCK_HOME", str(tmp_path / "home"))
    with State() as st:
        assert st.dir == tmp_path / "home" and (tmp_path / "home" / "state.db").exists()


def test_config_toml_overrides_limits_and_rejects_unknown_keys(tmp_path):
    (tmp_path / "config.toml").write_text("max_active_jobs = 3\nserver_replication_days = 120\n")
    cfg = ServiceConfig.load(tmp_path)
    assert cfg.max_active_jobs == 3 and cfg.server_replication_days == 120
    assert cfg.on_demand_runs_per_day == 2
    (tmp_path / "config.toml").write_text("max_jobs = 3\n")
    with pytest.raises(UsageError, match="unknown settings"):
        ServiceConfig.load(tmp_path)
    (tmp_path / "config.toml").write_text("max_active_jobs = -1\n")
    with pytest.raises(UsageError, match="non-negative"):
        ServiceConfig.load(tmp_path)


# --- connectors and catalog ----------------------------------------------------------

def test_connector_health_follows_heartbeat(env):
    svc, clock, _, conn, _ = env
    assert conn["status"] == "HEALTHY" and CONNECTOR_ID.match(conn["connectorId"])
    clock.advance(svc.config.heartbeat_timeout_seconds + 1)
    (c,) = svc.get_connectors()["connectorList"]
    assert c["status"] == "UNHEALTHY"
    svc.heartbeat(conn["connectorId"])
    assert svc.get_connectors()["connectorList"][0]["status"] == "HEALTHY"


def test_catalog_statuses_and_reimport_keeps_ids(env, tmp_path):
    svc, clock, servers, conn, ds = env
    fresh = SmsService(tmp_path / "other", clock=clock)
    assert fresh.get_servers() == {"serverCatalogStatus": "NOT_IMPORTED", "serverList": []}
    refused(fresh, "NoConnectorsAvailableException", fresh.import_server_catalog)

    first = {s["vmServer"]["vmPath"]: s["serverId"] for s in svc.get_servers()["serverList"]}
    assert set(first) == {"/Datacenters/DC1/vm/prod/vm 0", "/Datacenters/DC1/vm/prod/vm 1"}
    make_vm(ds, "DC1/prod/vm9", "vm 9")
    import shutil
    shutil.rmtree(ds / "DC1/prod/vm1")
    clock.advance(60)
    svc.import_server_catalog()
    out = svc.get_servers()
    assert out["serverCatalogStatus"] == "AVAILABLE" and out["lastModifiedOn"] == T0 + 60
    second = {s["vmServer"]["vmPath"]: s["serverId"] for s in out["serverList"]}
    assert set(second) == {"/Datacenters/DC1/vm/prod/vm 0", "/Datacenters/DC1/vm/prod/vm 9"}
    assert second["/Datacenters/DC1/vm/prod/vm 0"] == first["/Datacenters/DC1/vm/prod/vm 0"]
    # the VM that comes back gets its old id back
    make_vm(ds, "DC1/prod/vm1", "vm 1")
    svc.import_server_catalog()
    third = {s["vmServer"]["vmPath"]: s["serverId"] for s in svc.get_servers()["serverList"]}
    assert third["/Datacenters/DC1/vm/prod/vm 1"] == first["/Datacenters/DC1/vm/prod/vm 1"]


def test_get_servers_filters_by_vm_address(env):
    svc, _, servers, _, _ = env
    all_servers = svc.get_servers()["serverList"]
    addr = all_servers[1]["vmServer"]["vmServerAddress"]
    out = svc.call("GetServers", {"vmServerAddressList": [addr]})
    assert [s["serverId"] for s in out["serverList"]] == [all_servers[1]["serverId"]]
    out = svc.call("GetServers", {"vmServerAddressList": [{"vmId": "nope"}]})
    assert out["serverList"] == []


def test_delete_catalog_refused_while_a_job_lives(env):
    svc, _, servers, _, _ = env
    job = new_job(svc, servers[0])
    refused(svc, "OperationNotPermittedException", svc.delete_server_catalog)
    svc.delete_replication_job(replicationJobId=job)
    svc.delete_server_catalog()
    assert svc.get_servers()["serverCatalogStatus"] == "DELETED"
    assert svc.get_servers()["serverList"] == []
    refused(svc, "InvalidParameterException", new_job, svc, servers[0])
    svc.import_server_catalog()
    assert sorted(s["serverId"] for s in svc.get_servers()["serverList"]) == sorted(servers)


def test_disassociate_refused_while_a_job_needs_the_connector(env):
    svc, _, servers, conn, _ = env
    cid = conn["connectorId"]
    job = new_job(svc, servers[0])
    refused(svc, "OperationNotPermittedException", svc.disassociate_connector, connectorId=cid)
    refused(svc, "InvalidParameterException", svc.disassociate_connector, connectorId="c-123")
    refused(svc, "MissingRequiredParameterException", svc.disassociate_connector)
    svc.delete_replication_job(replicationJobId=job)
    svc.disassociate_connector(connectorId=cid)
    assert svc.get_connectors()["connectorList"] == []
    assert svc.get_servers()["serverList"] == []
    refused(svc, "InvalidParameterException", svc.disassociate_connector, connectorId=cid)
    refused(svc, "NoConnectorsAvailableException", svc.import_server_catalog)


# --- creating jobs ----------------------------------------------------------------------

def test_create_job_and_its_record(env):
    svc, clock, servers, _, _ = env
    job_id = new_job(svc, servers[0], frequency=24, licenseType="BYOL", roleName="sms-role",
                     description="web tier", numberOfRecentAmisToKeep=3)
    assert JOB_ID.match(job_id)
    (job,) = svc.get_replication_jobs()["replicationJobList"]
    assert job["replicationJobId"] == job_id and job["serverId"] == servers[0]
    assert job["state"] == "PENDING" and job["frequency"] == 24 and job["licenseType"] == "BYOL"
    assert job["roleName"] == "sms-role" and job["description"] == "web tier"
    assert job["numberOfRecentAmisToKeep"] == 3 and job["runOnce"] is False
    assert job["seedReplicationTime"] == T0 == job["nextReplicationRunStartTime"]
    assert job["vmServer"]["vmName"] == "vm 0" and job["serverType"] == "VIRTUAL_MACHINE"
    s = [s for s in svc.get_servers()["serverList"] if s["serverId"] == servers[0]][0]
    assert s["replicationJobId"] == job_id and s["replicationJobTerminated"] is False


def test_seed_time_window(env):
    svc, clock, servers, _, _ = env
    now = clock()
    refused(svc, "InvalidParameterException", new_job, svc, servers[0],
            seedReplicationTime=now - 3600)
    refused(svc, "InvalidParameterException", new_job, svc, servers[0],
            seedReplicationTime=now + 30 * DAY + 1)
    # a few minutes ago counts as now
    job = new_job(svc, servers[0], seedReplicationTime=now - 300)
    assert svc.get_replication_jobs(replicationJobId=job)["replicationJobList"][0][
        "seedReplicationTime"] == now
    new_job(svc, servers[1], seedReplicationTime=now + 30 * DAY)
    # the limit itself from a clock with a sub-microsecond fraction: the wire's whole
    # microseconds round it 0.5 us past the limit (found by test_scheduling_rules)
    clock.advance(3.6437245952672877 * 3600)
    now = clock()
    svc.update_replication_job(replicationJobId=job, nextReplicationRunStartTime=now + 30 * DAY)
    assert svc.get_replication_jobs(replicationJobId=job)["replicationJobList"][0][
        "nextReplicationRunStartTime"] == pytest.approx(now + 30 * DAY)


@pytest.mark.parametrize("params,code", [
    ({"roleName": "rôle"}, "InvalidParameterException"),            # IAM names are ASCII
    ({"roleName": "sms\n"}, "InvalidParameterException"),
    ({"roleName": "r" * 65}, "InvalidParameterException"),
    ({"roleName": ""}, "InvalidParameterException"),
    ({"roleName": "роль"}, "InvalidParameterException"),
    ({"frequency": 11}, "InvalidParameterException"),
    ({"frequency": 25}, "InvalidParameterException"),
    ({"frequency": None}, "MissingRequiredParameterException"),
    ({"licenseType": "FREE"}, "InvalidParameterException"),
    ({"roleName": "bad role!"}, "InvalidParameterException"),
    ({"description": "x" * 256}, "InvalidParameterException"),
    ({"numberOfRecentAmisToKeep": -1}, "InvalidParameterException"),
    ({"encrypted": True}, "InvalidParameterException"),
    ({"runOnce": "yes"}, "InvalidParameterException"),
    ({"serverId": "s-00000000"}, "InvalidParameterException"),
    ({"serverId": "server-1"}, "InvalidParameterException"),
    ({"serverId": None}, "MissingRequiredParameterException"),
    ({"seedReplicationTime": None}, "MissingRequiredParameterException"),
])
def test_create_job_refusals(env, params, code):
    svc, _, servers, _, _ = env
    refused(svc, code, new_job, svc, servers[0], **params)


def test_role_names_are_iam_role_names(env):
    svc, _, servers, _, _ = env
    ok = "A-z_0.9+=,@" + "r" * 53     # every allowed character class, 64 in all
    job = new_job(svc, servers[0], roleName=ok)
    assert svc.get_replication_jobs()["replicationJobList"][0]["roleName"] == ok
    svc.update_replication_job(replicationJobId=job, roleName="x")
    assert svc.get_replication_jobs()["replicationJobList"][0]["roleName"] == "x"


def test_identifiers_must_match_whole(env):
    """Every id check matches the whole string: a trailing newline (which ``$`` lets
    through) is not an id."""
    svc, _, servers, conn, _ = env
    job = new_job(svc, servers[0])
    for fn, kw in ((svc.get_replication_jobs, {"replicationJobId": job + "\n"}),
                   (svc.get_replication_runs, {"replicationJobId": job + "\n"}),
                   (svc.update_replication_job, {"replicationJobId": job + "\n", "frequency": 24}),
                   (svc.delete_replication_job, {"replicationJobId": job + "\n"}),
                   (svc.start_on_demand_replication_run, {"replicationJobId": job + "\n"})):
        e = refused(svc, "InvalidParameterException", fn, **kw)
        assert "is not a replication job id" in str(e)
    svc.delete_replication_job(replicationJobId=job)
    e = refused(svc, "InvalidParameterException", new_job, svc, servers[0] + "\n")
    assert "is not a server id" in str(e)
    e = refused(svc, "InvalidParameterException", svc.disassociate_connector,
                connectorId=conn["connectorId"] + "\n")
    assert "is not a connector id" in str(e)
    for pattern, value in ((CONNECTOR_ID, new_connector_id()), (SERVER_ID, new_server_id()),
                           (JOB_ID, new_job_id()), (RUN_ID, new_run_id())):
        assert pattern.fullmatch(value) and not pattern.match(value + "\n")


def _set_guest(ds, folder, guest):
    vmx = next((ds / folder).glob("*.vmx"))
    text = vmx.read_text().replace('guestOS = "ubuntu-64"\n', "")
    vmx.write_text(text + (f'guestOS = "{guest}"\n' if guest else ""))


@pytest.mark.parametrize("guest,default,aws_ok", [
    ("ubuntu-64", "BYOL", False),                 # .vmx guestOS ids
    ("rhel8-64", "BYOL", False),
    ("other4xlinux-64", "BYOL", False),
    ("ubuntu64Guest", "BYOL", False),             # vCenter guestId
    ("centos7_64Guest", "BYOL", False),
    ("windows9srv-64", "AWS", True),
    ("windows2019srv_64Guest", "AWS", True),
    ("winNetStandardGuest", "AWS", True),
    ("otherGuest", "BYOL", True),                 # not known to be Linux: both allowed
    ("freebsd-64", "BYOL", True),
    (None, "BYOL", True),
])
def test_license_type_follows_the_guest_os(env, guest, default, aws_ok):
    """SMS's "Auto" license: AWS for Windows, BYOL otherwise; a Linux server is BYOL
    only, on create and on update."""
    svc, _, servers, _, ds = env
    _set_guest(ds, "DC1/prod/vm0", guest)
    svc.import_server_catalog()
    server = [s["serverId"] for s in svc.get_servers()["serverList"]
              if s["vmServer"]["vmName"] == "vm 0"][0]
    if not aws_ok:
        e = refused(svc, "InvalidParameterException", new_job, svc, server, licenseType="AWS")
        assert "Linux" in str(e) and "BYOL" in str(e) and guest in str(e)
    job = new_job(svc, server)
    assert svc.get_replication_jobs()["replicationJobList"][0]["licenseType"] == default
    if aws_ok:
        svc.update_replication_job(replicationJobId=job, licenseType="AWS")
        assert svc.get_replication_jobs()["replicationJobList"][0]["licenseType"] == "AWS"
    else:
        refused(svc, "InvalidParameterException", svc.update_replication_job,
                replicationJobId=job, licenseType="AWS")
    svc.update_replication_job(replicationJobId=job, licenseType="BYOL")
    assert svc.get_replication_jobs()["replicationJobList"][0]["licenseType"] == "BYOL"


def test_frequency_bounds_and_run_once(env):
    svc, _, servers, _, _ = env
    new_job(svc, servers[0], frequency=12)
    new_job(svc, servers[1], frequency=None, runOnce=True)
    jobs = svc.get_replication_jobs()["replicationJobList"]
    assert [j["runOnce"] for j in jobs] == [False, True]


def test_one_job_per_server(env):
    svc, _, servers, _, _ = env
    job = new_job(svc, servers[0])
    e = refused(svc, "ReplicationJobAlreadyExistsException", new_job, svc, servers[0])
    assert job in str(e)


def test_active_job_limit_is_configurable(env):
    svc, _, servers, _, _ = env
    svc.config.max_active_jobs = 1
    new_job(svc, servers[0])
    refused(svc, "OperationNotPermittedException", new_job, svc, servers[1])
    svc.config.max_active_jobs = 2
    new_job(svc, servers[1])


def test_no_connector_for_server(env):
    svc, _, servers, conn, _ = env
    # a disassociated connector's servers leave the catalog, so mark it by hand as the
    # race "disassociated after the catalog was read" would leave it
    with svc.state.transaction() as db:
        db.execute("UPDATE connectors SET disassociated_on = 1")
    refused(svc, "NoConnectorsAvailableException", new_job, svc, servers[0])


# --- update / delete ------------------------------------------------------------------------

def test_update_job_changes_the_allowed_fields(env):
    svc, clock, servers, _, _ = env
    job = new_job(svc, servers[0])
    nxt = datetime.fromtimestamp(clock() + 5 * DAY, tz=timezone.utc).isoformat()
    svc.call("UpdateReplicationJob", {"replicationJobId": job, "frequency": 18,
                                      "nextReplicationRunStartTime": nxt,
                                      "licenseType": "BYOL", "roleName": "r2",
                                      "description": "new", "numberOfRecentAmisToKeep": 2})
    j = svc.get_replication_jobs(replicationJobId=job)["replicationJobList"][0]
    assert (j["frequency"], j["licenseType"], j["roleName"], j["description"],
            j["numberOfRecentAmisToKeep"]) == (18, "BYOL", "r2", "new", 2)
    assert j["nextReplicationRunStartTime"] == clock() + 5 * DAY
    assert j["seedReplicationTime"] == T0


@pytest.mark.parametrize("params,code", [
    ({"replicationJobId": "sms-job-00000000"}, "ReplicationJobNotFoundException"),
    ({"replicationJobId": "job-1"}, "InvalidParameterException"),
    ({"roleName": "rôle"}, "InvalidParameterException"),
    ({"roleName": "sms\n"}, "InvalidParameterException"),
    ({"frequency": 30}, "InvalidParameterException"),
    ({"nextReplicationRunStartTime": T0 - DAY}, "InvalidParameterException"),
    ({"nextReplicationRunStartTime": T0 + 31 * DAY}, "InvalidParameterException"),
    ({"licenseType": "x"}, "InvalidParameterException"),
])
def test_update_refusals(env, params, code):
    svc, _, servers, _, _ = env
    job = new_job(svc, servers[0])
    p = {"replicationJobId": job, **params}
    refused(svc, code, svc.update_replication_job, **p)


def test_delete_of_a_job_that_never_ran_is_immediate(env):
    svc, clock, servers, _, _ = env
    job = new_job(svc, servers[0])
    svc.tick()   # makes the first (PENDING) run
    svc.delete_replication_job(replicationJobId=job)
    # a deleted job stays listed, in state DELETED, with its runs (as SMS lists it)
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert (j["replicationJobId"], j["state"]) == (job, "DELETED")
    assert [r["state"] for r in j["replicationRunList"]] == ["DELETED"]
    assert "nextReplicationRunStartTime" not in j
    assert svc.get_replication_jobs(replicationJobId=job)["replicationJobList"] == [j]
    out = svc.get_replication_runs(replicationJobId=job)
    assert out["replicationJob"]["state"] == "DELETED"
    assert [r["state"] for r in out["replicationRunList"]] == ["DELETED"]
    # ... but nothing acts on it any more
    for fn in (svc.delete_replication_job, svc.start_on_demand_replication_run):
        e = refused(svc, "ReplicationJobNotFoundException", fn, replicationJobId=job)
        assert "deleted" in str(e)
    refused(svc, "ReplicationJobNotFoundException", svc.update_replication_job,
            replicationJobId=job, frequency=24)
    clock.advance(5 * DAY)
    assert svc.tick() == []
    # the server can have a new job; both are listed, the old one DELETED
    job2 = new_job(svc, servers[0])
    assert [(x["replicationJobId"], x["state"]) for x in
            svc.get_replication_jobs()["replicationJobList"]] == [(job, "DELETED"),
                                                                   (job2, "PENDING")]
    s = [s for s in svc.get_servers()["serverList"] if s["serverId"] == servers[0]][0]
    assert s["replicationJobId"] == job2 and s["replicationJobTerminated"] is False


def test_replication_job_terminated_only_for_deleted_or_failed_jobs(env):
    svc, clock, servers, _, _ = env

    def terminated(server):
        s = [s for s in svc.get_servers()["serverList"] if s["serverId"] == server][0]
        return s.get("replicationJobTerminated")

    assert terminated(servers[0]) is None                 # no job
    job = new_job(svc, servers[0], frequency=None, runOnce=True)
    assert terminated(servers[0]) is False
    svc.tick()
    finish_runs(svc)
    with svc.state.transaction() as db:   # what the executor does after a run-once run
        db.execute("UPDATE jobs SET state = 'COMPLETED', next_run_time = NULL")
    assert svc.get_replication_jobs()["replicationJobList"][0]["state"] == "COMPLETED"
    assert terminated(servers[0]) is False                # done as planned, not terminated
    for state, expected in (("PAUSED_ON_FAILURE", False), ("FAILING", False),
                            ("DELETING", False), ("FAILED", True)):
        with svc.state.transaction() as db:
            db.execute("UPDATE jobs SET state = ?", (state,))
        assert terminated(servers[0]) is expected, state
    with svc.state.transaction() as db:
        db.execute("UPDATE jobs SET state = 'ACTIVE'")
    svc.delete_replication_job(replicationJobId=job)      # never started a run: DELETED
    assert terminated(servers[0]) is True


def test_delete_of_a_job_that_ran_waits_for_the_connector(env):
    svc, _, servers, _, _ = env
    job = new_job(svc, servers[0])
    with svc.state.transaction() as db:   # as if a run had started
        db.execute("UPDATE jobs SET state = 'ACTIVE'")
        db.execute("INSERT INTO runs (run_id, job_id, type, state, scheduled_start, created, "
                   "started, completed, encrypted) VALUES ('sms-run-00000001', ?, 'ON_DEMAND', "
                   "'COMPLETED', 1, 1, 1, 2, 0)", (job,))
    svc.delete_replication_job(replicationJobId=job)
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert j["state"] == "DELETING" and j.get("nextReplicationRunStartTime") is None
    refused(svc, "ReplicationJobAlreadyExistsException", new_job, svc, servers[0])
    refused(svc, "OperationNotPermittedException", svc.start_on_demand_replication_run,
            replicationJobId=job)
    refused(svc, "OperationNotPermittedException", svc.delete_replication_job,
            replicationJobId=job)


# --- on-demand runs ---------------------------------------------------------------------------

def finish_runs(svc, state="COMPLETED"):
    with svc.state.transaction() as db:
        db.execute("UPDATE runs SET state = ?, completed = ? WHERE state IN ('PENDING', 'ACTIVE')",
                   (state, svc.clock()))


def test_on_demand_limit_per_rolling_24_hours(env):
    svc, clock, servers, _, _ = env
    job = new_job(svc, servers[0], seedReplicationTime=clock() + 10 * DAY)
    r1 = svc.start_on_demand_replication_run(replicationJobId=job, description="first")
    assert RUN_ID.match(r1["replicationRunId"])
    refused(svc, "OperationNotPermittedException", svc.start_on_demand_replication_run,
            replicationJobId=job)
    finish_runs(svc)
    clock.advance(10 * H)
    svc.start_on_demand_replication_run(replicationJobId=job)
    finish_runs(svc, "FAILED")
    clock.advance(10 * H)
    refused(svc, "ReplicationRunLimitExceededException", svc.start_on_demand_replication_run,
            replicationJobId=job)
    clock.advance(4 * H + 1)   # the first run is now more than 24 h old
    svc.start_on_demand_replication_run(replicationJobId=job)
    runs = svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
    assert [r["type"] for r in runs] == ["ON_DEMAND"] * 3
    assert runs[-1]["description"] == "first" and runs[0]["state"] == "PENDING"
    assert runs[0]["scheduledStartTime"] == clock()


def test_on_demand_limit_is_configurable(env):
    svc, clock, servers, _, _ = env
    svc.config.on_demand_runs_per_day = 3
    job = new_job(svc, servers[0], seedReplicationTime=clock() + DAY)
    for _ in range(3):
        svc.start_on_demand_replication_run(replicationJobId=job)
        finish_runs(svc)
    refused(svc, "ReplicationRunLimitExceededException", svc.start_on_demand_replication_run,
            replicationJobId=job)


def test_replication_window_closes_after_90_days(env):
    svc, clock, servers, _, _ = env
    job = new_job(svc, servers[0])
    with svc.state.transaction() as db:   # the first run started now
        db.execute("UPDATE servers SET first_run_time = ? WHERE server_id = ?", (clock(), servers[0]))
    clock.advance(90 * DAY)
    refused(svc, "ServerCannotBeReplicatedException", svc.start_on_demand_replication_run,
            replicationJobId=job)
    svc.tick()
    j = svc.get_replication_jobs(replicationJobId=job)["replicationJobList"][0]
    assert j["state"] == "COMPLETED" and "90-day" in j["statusMessage"]
    assert "nextReplicationRunStartTime" not in j
    svc.delete_replication_job(replicationJobId=job)
    refused(svc, "ServerCannotBeReplicatedException", new_job, svc, servers[0])
    svc.config.server_replication_days = 120
    new_job(svc, servers[0])


# --- the wire entry point and pagination -----------------------------------------------------

def test_call_checks_member_names_and_types(env):
    svc, _, servers, _, _ = env
    refused(svc, "InvalidParameterException", svc.call, "CreateReplicationJob",
            {"serverId": servers[0], "seedReplicationTime": T0, "frequency": "12"})
    refused(svc, "InvalidParameterException", svc.call, "CreateReplicationJob",
            {"serverId": servers[0], "seedReplicationTime": T0, "bogus": 1})
    refused(svc, "InvalidParameterException", svc.call, "GetServers", {"maxResults": True})
    refused(svc, "UnknownOperationException", svc.call, "DeleteApp", {})
    out = svc.call("CreateReplicationJob", {"serverId": servers[0], "frequency": 12,
                                            "seedReplicationTime": "2027-01-15T08:00:00Z"})
    assert JOB_ID.match(out["replicationJobId"])


def test_pagination_with_max_results_and_next_token(env):
    svc, clock, servers, _, ds = env
    for i in range(2, 7):
        make_vm(ds, f"DC1/more/vm{i}", f"vm {i}")
    svc.import_server_catalog()
    seen, token, pages = [], None, 0
    while True:
        out = svc.call("GetServers", {"maxResults": 2, **({"nextToken": token} if token else {})})
        assert len(out["serverList"]) <= 2
        seen += [s["serverId"] for s in out["serverList"]]
        pages += 1
        token = out.get("nextToken")
        if not token:
            break
    assert pages == 4 and len(seen) == len(set(seen)) == 7
    assert len(svc.get_servers()["serverList"]) == 7   # default page of 50
    refused(svc, "InvalidParameterException", svc.get_servers, nextToken="garbage!")
    refused(svc, "InvalidParameterException", svc.get_servers, maxResults=0)
    tok = svc.get_servers(maxResults=1)["nextToken"]
    refused(svc, "InvalidParameterException", svc.get_connectors, nextToken=tok)
    # runs page too
    job = new_job(svc, servers[0])
    for _ in range(3):
        svc.tick()
        finish_runs(svc)
        clock.advance(12 * H)
    r1 = svc.get_replication_runs(replicationJobId=job, maxResults=2)
    r2 = svc.get_replication_runs(replicationJobId=job, maxResults=2, nextToken=r1["nextToken"])
    assert len(r1["replicationRunList"]) == 2 and len(r2["replicationRunList"]) == 1
    assert "nextToken" not in r2
    assert "replicationRunList" not in r1["replicationJob"]


def test_import_from_an_unreadable_source_fails_and_keeps_the_catalog(env):
    # (one bad .vmx is not an unreadable source: see test_service_catalog_import.py)
    svc, _, servers, _, ds = env
    ds.rename(ds.with_name("elsewhere"))
    before = svc.state.query("SELECT status, last_modified_on FROM catalog")
    with pytest.raises(ServiceError) as e:
        svc.import_server_catalog()
    assert e.value.code == "NoConnectorsAvailableException" and "does not exist" in str(e.value)
    assert svc.state.query("SELECT status, last_modified_on FROM catalog") == before
    assert "does not exist" in svc.last_catalog_import()["error"]
    assert svc.get_servers()["serverCatalogStatus"] == "AVAILABLE"
    assert sorted(s["serverId"] for s in svc.get_servers()["serverList"]) == sorted(servers)


def test_migrations_upgrade_an_existing_database_in_order(tmp_path, monkeypatch):
    from smsblock.service import state as state_mod
    with State(tmp_path) as st:
        with st.transaction() as db:
            db.execute("UPDATE catalog SET status = 'AVAILABLE'")
    # a later smsblock adds a migration: the old file upgrades and keeps its rows
    monkeypatch.setattr(state_mod, "MIGRATIONS", state_mod.MIGRATIONS + [
        ["ALTER TABLE servers ADD COLUMN notes TEXT",
         "CREATE TABLE audit (at REAL NOT NULL, what TEXT NOT NULL)"]])
    monkeypatch.setattr(state_mod, "SCHEMA_VERSION", len(state_mod.MIGRATIONS))
    with State(tmp_path) as st:
        assert st.version == SCHEMA_VERSION + 1
        assert st.query("SELECT status FROM catalog")[0][0] == "AVAILABLE"
        assert "notes" in [r[1] for r in st.query("PRAGMA table_info(servers)")]
    # a failing migration leaves the database at the old version, unchanged
    monkeypatch.setattr(state_mod, "MIGRATIONS", state_mod.MIGRATIONS + [
        ["CREATE TABLE half (x)", "THIS IS NOT SQL"]])
    monkeypatch.setattr(state_mod, "SCHEMA_VERSION", len(state_mod.MIGRATIONS))
    with pytest.raises(ServiceError):
        State(tmp_path)
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None
    db.close()


@contextlib.contextmanager
def catalog_of(folder: Path, n: int):
    """A service over a datastore of ``n`` VMs, its catalog imported: ``(svc, clock,
    server ids)``; closed after."""
    folder.mkdir(exist_ok=True)
    ds = make_datastore(folder / "ds", n)
    clock = FakeClock(T0)
    svc = SmsService(folder / "state", clock=clock)
    try:
        svc.register_connector("datastore", {"path": str(ds)})
        svc.import_server_catalog()
        yield svc, clock, [s["serverId"] for s in svc.get_servers(maxResults=100)["serverList"]]
    finally:
        svc.close()


def with_wrapped_db(svc, monkeypatch, wrap, fn) -> None:
    """Call ``fn`` with every transaction and snapshot of ``svc`` handing out ``wrap(db)``."""
    real = {name: getattr(svc.state, name) for name in ("transaction", "snapshot")}

    def wrapped(open_):
        @contextlib.contextmanager
        def opened():
            with open_() as db:
                yield wrap(db)
        return opened
    for name, open_ in real.items():
        monkeypatch.setattr(svc.state, name, wrapped(open_))
    try:
        fn()
    finally:
        for name, open_ in real.items():
            monkeypatch.setattr(svc.state, name, open_)


def counting_statements(svc, monkeypatch):
    """A function that calls ``fn`` and returns how many statements its transactions and
    snapshots ran (at least one: a count of nothing proves nothing)."""
    class Counting:
        def __init__(self, db, counted):
            self.db, self.counted = db, counted

        def execute(self, *args):
            self.counted.append(args[0])
            return self.db.execute(*args)

    def statements(fn) -> int:
        counted: list = []
        with_wrapped_db(svc, monkeypatch, lambda db: Counting(db, counted), fn)
        assert counted, "no statement was counted"
        return len(counted)
    return statements


def rows_read(svc, monkeypatch, fn) -> int:
    """Rows ``fn`` fetches from the service's database."""
    counted = [0]

    class Cursor:
        def __init__(self, cur):
            self.cur = cur

        def fetchall(self):
            out = self.cur.fetchall()
            counted[0] += len(out)
            return out

        def fetchone(self):
            out = self.cur.fetchone()
            counted[0] += out is not None
            return out

    class Counting:
        def __init__(self, db):
            self.db = db

        def execute(self, *args):
            return Cursor(self.db.execute(*args))
    with_wrapped_db(svc, monkeypatch, Counting, fn)
    assert counted[0], "no row was counted"
    return counted[0]


def test_a_page_reads_a_page_of_rows_whatever_the_catalog_size(tmp_path, monkeypatch):
    """GetServers, GetReplicationJobs and GetReplicationRuns cut their pages in the
    database (LIMIT/OFFSET): the rows a page of 2 reads do not grow with the catalog
    (they used to read every row, so paging through N servers read N^2/2 rows)."""
    read = {}
    for n in (8, 24):
        with catalog_of(tmp_path / str(n), n) as (svc, _clock, servers):
            assert len(servers) == n
            jobs_made = [new_job(svc, srv, seedReplicationTime=T0 + DAY) for srv in servers]
            page = svc.get_servers(maxResults=2)
            second = svc.get_servers(maxResults=2, nextToken=page["nextToken"])
            assert [s["serverId"] for s in page["serverList"] + second["serverList"]] == servers[:4]
            read[n] = (rows_read(svc, monkeypatch, lambda: svc.get_servers(maxResults=2)),
                       rows_read(svc, monkeypatch, lambda: svc.get_servers(
                           maxResults=2, nextToken=page["nextToken"])),
                       rows_read(svc, monkeypatch, lambda: svc.get_replication_jobs(maxResults=2)))
            assert len(jobs_made) == n
    assert read[8] == read[24], read


def test_an_address_filter_is_applied_by_the_database(tmp_path, monkeypatch):
    """GetServers' vmServerAddressList keeps its meaning (an address matches the servers
    equal in the members it gives; one giving none matches all), and the database applies
    it: a filtered page reads a page of rows whatever the catalog size (it used to read
    the whole catalog and filter in Python)."""
    read = {}
    for n in (8, 24):
        with catalog_of(tmp_path / str(n), n) as (svc, _clock, servers):
            listed = svc.get_servers(maxResults=100)["serverList"]
            addr = {s["serverId"]: s["vmServer"]["vmServerAddress"] for s in listed}
            one, two, three = servers[1], servers[4], servers[6]
            manager = addr[one]["vmManagerId"]
            filters = [
                [addr[one]],
                [{"vmId": addr[two]["vmId"]}, {"vmManagerId": "nobody", "vmId": addr[three]["vmId"]}],
                [{"vmManagerId": manager}],
                [{"vmManagerId": "other"}, addr[three], addr[three], {"vmId": "nope"}],
                [{}, {"vmId": "nope"}],
                [{"vmManagerId": manager, "vmId": "nope"}],
            ]
            for f in filters:
                want = [sid for sid in servers if any(
                    all(addr[sid][k] == v for k, v in a.items()) for a in f)]
                got, token = [], None
                while True:         # paged: the filter holds on every page
                    page = svc.get_servers(maxResults=2, vmServerAddressList=f,
                                           **({"nextToken": token} if token else {}))
                    got += [s["serverId"] for s in page["serverList"]]
                    token = page.get("nextToken")
                    if not token:
                        break
                assert got == want, f
            read[n] = rows_read(svc, monkeypatch, lambda: svc.get_servers(
                maxResults=2, vmServerAddressList=[addr[one], addr[two], addr[three]]))
    assert read[8] == read[24], read


def test_get_servers_costs_the_same_queries_for_a_page_of_one_server_or_many(
        tmp_path, monkeypatch):
    """GetServers finds the job each server of its page shows (its live job, else its
    latest: a deleted one) in one statement, not one or two per server; the answer says
    which job as before."""
    with catalog_of(tmp_path, 5) as (svc, _clock, servers):
        statements = counting_statements(svc, monkeypatch)
        one = statements(lambda: svc.get_servers(maxResults=1))
        assert statements(svc.get_servers) == one
        deleted = new_job(svc, servers[0], seedReplicationTime=T0 + DAY)
        svc.delete_replication_job(replicationJobId=deleted)
        live = new_job(svc, servers[1], seedReplicationTime=T0 + DAY)
        gone = new_job(svc, servers[2], seedReplicationTime=T0 + DAY)
        svc.delete_replication_job(replicationJobId=gone)
        again = new_job(svc, servers[2], seedReplicationTime=T0 + DAY)
        assert statements(svc.get_servers) == one
        shown = {s["serverId"]: (s.get("replicationJobId"), s.get("replicationJobTerminated"))
                 for s in svc.get_servers()["serverList"]}
        assert shown[servers[0]] == (deleted, True)
        assert shown[servers[1]] == (live, False)
        assert shown[servers[2]] == (again, False)
        assert shown[servers[3]] == shown[servers[4]] == (None, None)


def test_get_replication_jobs_costs_the_same_queries_for_one_job_or_many(tmp_path, monkeypatch):
    """GetReplicationJobs reads a page of jobs, their servers and their latest runs in a
    fixed number of statements (on PostgreSQL each is a round trip: two per job made the
    fleet benchmark's listing of 50 jobs take ~300 ms), and its answer is each job's own
    (GetReplicationJobs of that one job): server, and its latest runs newest first."""
    with catalog_of(tmp_path, 5) as (svc, clock, servers):
        statements = counting_statements(svc, monkeypatch)
        jobs_made = [new_job(svc, servers[0], seedReplicationTime=T0 + DAY)]
        one = statements(svc.get_replication_jobs)
        for server in servers[1:]:
            jobs_made.append(new_job(svc, server, seedReplicationTime=T0 + DAY))
        for i, job in enumerate(jobs_made[:3]):         # runs for some: 0, 1 or 2 each
            for _ in range(min(i, 2)):
                run = svc.start_on_demand_replication_run(replicationJobId=job)
                svc.state.query("UPDATE runs SET state = 'COMPLETED', completed = ? "
                                "WHERE run_id = ?", (clock(), run["replicationRunId"]))
                clock.advance(60)
        assert statements(svc.get_replication_jobs) == one == 3
        listed = svc.get_replication_jobs()["replicationJobList"]
        assert [j["replicationJobId"] for j in listed] == jobs_made
        for job in listed:       # as GetReplicationRuns shows the job and its runs
            alone = svc.get_replication_runs(replicationJobId=job["replicationJobId"])
            assert {k: v for k, v in job.items() if k != "replicationRunList"} == \
                alone["replicationJob"]
            assert job.get("replicationRunList", []) == alone["replicationRunList"]
            assert job["vmServer"]["vmName"]
        assert [len(j.get("replicationRunList", [])) for j in listed] == [0, 1, 2, 0, 0]
        runs = listed[2]["replicationRunList"]
        assert runs[0]["scheduledStartTime"] > runs[1]["scheduledStartTime"]


def test_get_operations_read_while_another_process_holds_the_write_lock(env):
    """GetReplicationJobs, GetReplicationRuns and GetServers are reads in a snapshot: they
    answer at once while a writer elsewhere (another `serve`, a connector) holds the write
    lock, and a write waits for it as before."""
    import threading
    import time
    from smsblock.service.state import State
    svc, clock, servers, conn, ds = env
    job = new_job(svc, servers[0])
    target, extra = __import__("postgres_server").state_target(svc.state)
    other = State(target, local_dir=extra["SMSBLOCK_HOME"]) if extra else State(target)
    holding, release = threading.Event(), threading.Event()

    def writer():
        with other.transaction() as db:
            db.execute("UPDATE jobs SET description = ? WHERE job_id = ?", ("held", job))
            holding.set()
            release.wait(20)
    t = threading.Thread(target=writer)
    t.start()
    try:
        assert holding.wait(10)
        t0 = time.monotonic()
        assert [j["replicationJobId"] for j in
                svc.get_replication_jobs()["replicationJobList"]] == [job]
        svc.get_replication_runs(replicationJobId=job)
        assert len(svc.get_servers()["serverList"]) == len(servers)
        assert time.monotonic() - t0 < 2, "a read waited for the writer"
        # the writer's change is not seen before it commits
        assert svc.get_replication_jobs()["replicationJobList"][0].get("description") != "held"
    finally:
        release.set()
        t.join(20)
        other.close()
    assert svc.get_replication_jobs()["replicationJobList"][0]["description"] == "held"
