"""Fleet: connector credentials and what they may call, and run claims (lease, fence)
under any interleaving of claim, heartbeat, report, complete and time.

The HTTP tests talk to `smsblock serve` in a thread through RemoteControlPlane (botocore
SigV4); the claim tests drive smsblock.service.fleet directly with an injected clock, in
one process (hypothesis) and in several processes on one state database."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from smsblock.errors import ServiceError
from smsblock.service import FakeClock, SmsService
from smsblock.service.controlplane import RemoteControlPlane
from smsblock.service.fleet import STALE_CLAIM, Fleet
from test_service_server import CREDS, REGION, serving
from test_service_sources import make_vm

T0 = 1_800_000_000.0
ROOT = Path(__file__).parent.parent


def remote(srv, cred, connector_id=None) -> RemoteControlPlane:
    return RemoteControlPlane(srv.url, cred["accessKeyId"], cred["secretAccessKey"],
                              connector_id or cred["connectorId"], region=REGION,
                              source_kind="datastore", source_config={})


def register(cp) -> dict:
    return cp.call("RegisterConnector", sourceKind="datastore", vmManagerName="ds",
                   vmManagerType="VSPHERE", vmManagerId="ds-" + cp.connector_id)


def code_of(call) -> str:
    with pytest.raises(ServiceError) as e:
        call()
    return e.value.code


# --- credentials ------------------------------------------------------------------------

def test_a_connector_credential_may_call_only_its_own_connector_operations(tmp_path):
    with serving(tmp_path) as srv:
        fleet = Fleet(srv.service.state, srv.service.clock)
        a = fleet.create_credential("s3://bucket/fleet", "rack 1")
        b = fleet.create_credential("s3://bucket/fleet")
        cp_a, cp_b = remote(srv, a), remote(srv, b)
        answer = register(cp_a)
        assert answer["connector"]["connectorId"] == a["connectorId"]
        assert answer["store"] == "s3://bucket/fleet"
        register(cp_b)
        assert cp_a.heartbeat({}) == {"associated": True, "lost": []}
        # another connector's id, with A's credential: refused
        impostor = remote(srv, a, connector_id=b["connectorId"])
        assert code_of(lambda: impostor.heartbeat({})) == "AccessDeniedException"
        assert code_of(lambda: impostor.due_runs()) == "AccessDeniedException"
        # the SMS operations: not with a connector's credential
        from smsblock.service.server import TARGET_PREFIX as SMS
        assert code_of(lambda: cp_a.call("GetConnectors", prefix=SMS)) == "AccessDeniedException"
        assert code_of(lambda: cp_a.call("DeleteServerCatalog", prefix=SMS)) == \
            "AccessDeniedException"
        # the operator's credential may not act as a connector
        operator = RemoteControlPlane(srv.url, CREDS.access_key_id, CREDS.secret_access_key,
                                      a["connectorId"], region=REGION)
        assert code_of(lambda: operator.heartbeat({})) == "AccessDeniedException"
        # a wrong secret for a connector's key id
        bad = RemoteControlPlane(srv.url, a["accessKeyId"], "not-the-secret", a["connectorId"],
                                 region=REGION)
        assert code_of(lambda: bad.heartbeat({})) == "InvalidSignatureException"
        # what the operator sees: both connectors, healthy
        ids = {c["connectorId"] for c in srv.service.get_connectors()["connectorList"]}
        assert {a["connectorId"], b["connectorId"]} <= ids


def test_a_revoked_credential_is_refused_at_once(tmp_path):
    with serving(tmp_path) as srv:
        fleet = Fleet(srv.service.state, srv.service.clock)
        cred = fleet.create_credential(str(tmp_path / "store"))
        cp = remote(srv, cred)
        register(cp)
        assert cp.heartbeat({})["associated"]
        fleet.revoke_credential(cred["accessKeyId"])
        # the very next request, on the same kept-alive connection
        assert code_of(lambda: cp.heartbeat({})) == "UnrecognizedClientException"
        assert code_of(lambda: register(cp)) == "UnrecognizedClientException"
        listed = {c["accessKeyId"]: c for c in fleet.list_credentials()}
        assert listed[cred["accessKeyId"]]["revoked"] is not None
        assert "secretAccessKey" not in listed[cred["accessKeyId"]]


def test_credential_commands_print_the_secret_once_and_keep_it_private(tmp_path):
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "smsblock", "connector", "credential",
                              *args, "--state", str(state)], capture_output=True, text=True,
                             env=env, timeout=60)
        return out

    made = cli("create", "--store", "s3://b/p")
    assert made.returncode == 0, made.stderr
    cred = json.loads(made.stdout)
    assert set(cred) == {"connectorId", "accessKeyId", "secretAccessKey", "store"}
    listed = cli("list")
    assert cred["secretAccessKey"] not in listed.stdout
    assert json.loads(listed.stdout)["credentials"][0]["accessKeyId"] == cred["accessKeyId"]
    assert stat.S_IMODE((state / "state.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    revoked = cli("revoke", cred["accessKeyId"])
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked"] is True
    bad = cli("revoke", "AKIA-not-a-key")
    assert bad.returncode != 0 and "not a connector access key id" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = cli("create")
    assert missing.returncode != 0 and "--store" in missing.stderr


# --- claims --------------------------------------------------------------------------------

_TEMPLATES: dict = {}


def fleet_state(tmp_path, n_servers: int, n_connectors: int, timeout: int = 60):
    """A state with ``n_servers`` servers of one datastore, a due on-demand run each, and
    ``n_connectors`` connectors registered with that same datastore (built once per
    shape, then copied)."""
    import shutil
    key = (n_servers, n_connectors, timeout)
    if key not in _TEMPLATES:
        base = Path(__import__("tempfile").mkdtemp(prefix="fleet-template-"))
        # built once per test process and kept for it: removed when the process ends
        __import__("atexit").register(shutil.rmtree, base, True)
        (base / "state").mkdir(mode=0o700)
        (base / "state" / "config.toml").write_text(f"heartbeat_timeout_seconds = {timeout}\n")
        svc = SmsService(base / "state", clock=FakeClock(T0))
        ds = base / "ds"
        for i in range(n_servers):
            make_vm(ds, f"vm{i}", f"vm{i}", disks=(("scsi0:0", 65536),))
        for _ in range(n_connectors):
            svc.register_connector("datastore", {"path": str(ds)}, store=str(base / "store"))
        svc.import_server_catalog()
        for server in svc.get_servers(maxResults=1000)["serverList"]:
            job = svc.create_replication_job(serverId=server["serverId"], frequency=12,
                                             seedReplicationTime=T0 + 10 * 86400)
            svc.start_on_demand_replication_run(replicationJobId=job["replicationJobId"])
        svc.close()
        _TEMPLATES[key] = base / "state"
    shutil.copytree(_TEMPLATES[key], tmp_path / "state")
    clock = FakeClock(T0)
    svc = SmsService(tmp_path / "state", clock=clock)
    ids = [r["connector_id"] for r in svc.state.query(
        "SELECT connector_id FROM connectors ORDER BY connector_id")]
    runs = sorted(r["run_id"] for r in svc.state.query("SELECT run_id FROM runs"))
    assert len(runs) == n_servers
    return svc, clock, ids, runs


def run_states(svc) -> dict:
    return {r["run_id"]: (r["state"], r["fence"], r["claimed_by"])
            for r in svc.state.query("SELECT run_id, state, fence, claimed_by FROM runs")}


LEASE = 60


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["claim", "beat", "report", "complete", "fail",
                                                   "wait", "wait_long"]),
                                st.integers(0, 2), st.integers(0, 3)), max_size=60))
def test_any_interleaving_commits_each_run_once_by_its_current_holder(tmp_path_factory, steps):
    """Three connectors, four runs, any sequence of claims, heartbeats, reports,
    completions, failures and time (some past the lease), checked step by step against a
    model: a claim succeeds exactly when the run is PENDING or its holder's lease ran out
    (no heartbeat or report for heartbeat_timeout_seconds), each claim adds one to the
    fence, a heartbeat or report renews only the current holder's lease, only the
    current holder's completion or failure is recorded (the others are refused as stale),
    nothing is recorded twice; and afterwards every run still due is executed once."""
    tmp = tmp_path_factory.mktemp("claims")
    svc, clock, conns, runs = fleet_state(tmp, 4, 3, timeout=LEASE)
    fleet = Fleet(svc.state, clock)
    held: dict[str, dict] = {c: {} for c in conns}     # what each connector believes it holds
    model = {r: {"state": "PENDING", "lease": 0.0, "fence": 0, "holder": None} for r in runs}
    ended: dict[str, list] = {r: [] for r in runs}

    def current(c, run, fence) -> bool:
        m = model[run]
        return m["state"] == "ACTIVE" and m["holder"] == c and m["fence"] == fence

    for op, who, which in steps:
        c, run, now = conns[who], runs[which], clock()
        m = model[run]
        if op == "claim":
            claimable = m["state"] == "PENDING" or (m["state"] == "ACTIVE" and m["lease"] < now)
            got = fleet.claim(c, run)
            assert (got is not None) == claimable, (m, now)
            if got is not None:
                m.update(state="ACTIVE", lease=now + LEASE, fence=m["fence"] + 1, holder=c)
                assert got["fence"] == m["fence"] and got["claimedBy"] == c
                held[c][run] = got["fence"]
        elif op == "beat":
            expect_lost = {r for r, f in held[c].items() if not current(c, r, f)}
            for r, f in held[c].items():
                if current(c, r, f):
                    model[r]["lease"] = now + LEASE
            lost = fleet.heartbeat(c, held[c])["lost"]
            assert set(lost) == expect_lost
            for r in lost:
                held[c].pop(r)
        elif op in ("report", "complete", "fail") and run in held[c]:
            fence = held[c][run]
            valid = current(c, run, fence)
            try:
                if op == "report":
                    fleet.report(c, run, fence, stage="uploading", stage_progress="50%")
                    m["lease"] = now + LEASE
                elif op == "complete":
                    fleet.complete(c, run, fence, {"disks": []}, "done")
                    ended[run].append("COMPLETED")
                else:
                    fleet.fail(c, run, fence, "boom")
                    ended[run].append("FAILED")
                assert valid, (op, c, run, fence, m)
                if op != "report":
                    m["state"] = "DONE"
                    held[c].pop(run)
            except ServiceError as e:
                assert not valid and e.code == STALE_CLAIM and "reassigned" in str(e), e
                held[c].pop(run)
        elif op == "wait":
            clock.advance(10)
        elif op == "wait_long":
            clock.advance(LEASE + 1)
        states = run_states(svc)
        for run_id, mm in model.items():
            state, fence, by = states[run_id]
            assert fence == mm["fence"]
            if mm["state"] == "ACTIVE":
                assert (state, by) == ("ACTIVE", mm["holder"])
    for run_id, e in ended.items():
        assert len(e) <= 1, e                                # never a second result
    # drain: every run still due (PENDING, or ACTIVE with a lease that ran out) is
    # executed once
    clock.advance(LEASE + 1)
    executed = []
    for c in conns:
        for run_id in fleet.due_runs(c):
            got = fleet.claim(c, run_id)
            if got is not None:
                executed.append(run_id)
                fleet.complete(c, run_id, got["fence"], {"disks": []}, "done")
    assert len(executed) == len(set(executed))
    states = run_states(svc)
    for run_id in runs:      # each ended once: during the steps, or in the drain
        once = ended[run_id] + (["COMPLETED"] if run_id in executed else [])
        assert len(once) == 1 and states[run_id][0] == once[0], (run_id, once, states)
    svc.close()


CLAIMER = textwrap.dedent("""
    import json, sys, time
    from smsblock.service.state import State
    from smsblock.service.fleet import Fleet
    state = State(sys.argv[1])
    fleet = Fleet(state, time.time)
    me = sys.argv[2]
    done = []
    while True:
        due = fleet.due_runs(me)
        if not due:
            break
        for run_id in due:
            got = fleet.claim(me, run_id)
            if got is not None:
                fleet.report(me, run_id, got["fence"], stage="uploading", stage_progress="1%")
                fleet.complete(me, run_id, got["fence"], {"disks": []}, "done by " + me)
                done.append(run_id)
    print(json.dumps(done))
""")


def test_connector_processes_racing_for_runs_execute_each_once(tmp_path):
    """Four processes (four connectors of one datastore) on one state database claim
    and complete 24 due runs as fast as they can: each run is executed by exactly one."""
    svc, clock, conns, runs = fleet_state(tmp_path, 24, 4, timeout=300)
    # the runs are due at the fake clock's time; the processes use the real one
    svc.state.query("UPDATE runs SET scheduled_start = 0")
    svc.close()
    script = tmp_path / "claimer.py"
    script.write_text(CLAIMER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "state"), c],
                              stdout=subprocess.PIPE, text=True, env=env) for c in conns]
    done = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    every = [r for d in done for r in d]
    assert sorted(every) == sorted(runs)           # each once, none left
    svc = SmsService(tmp_path / "state", clock=clock)
    rows = svc.state.query("SELECT state, fence, status_message FROM runs")
    assert {(r["state"], r["fence"]) for r in rows} == {("COMPLETED", 1)}
    by = {r["status_message"] for r in rows}
    svc.close()
    assert len(by) >= 1


def test_connector_operations_refuse_bad_input_with_one_line_errors(tmp_path):
    """Whatever a connector's request holds, the answer is a declared-style error in one
    bounded line (never a 500), and nothing changes."""
    with serving(tmp_path) as srv:
        fleet = Fleet(srv.service.state, srv.service.clock)
        cred = fleet.create_credential(str(tmp_path / "store"))
        cp = remote(srv, cred)
        register(cp)
        c = cred["connectorId"]
        bad = [
            ("Heartbeat", {"connectorId": c, "runs": {"not-a-run": 1}}),
            ("Heartbeat", {"connectorId": c, "runs": {"sms-run-0123abcd": "1"}}),
            ("Heartbeat", {"connectorId": c, "extra": 1}),
            ("Heartbeat", {}),
            ("ClaimRun", {"connectorId": c, "runId": "sms-run-0123abcd' OR 1=1"}),
            ("ReportRun", {"connectorId": c, "runId": "sms-run-0123abcd", "fence": True}),
            ("ReportRun", {"connectorId": c, "runId": "sms-run-0123abcd", "fence": 1,
                           "summary": {"x": "y" * 300_000}}),
            ("CompleteRun", {"connectorId": c, "runId": "sms-run-0123abcd", "fence": 1,
                             "summary": {"disks": "x"}, "message": "m"}),
            ("CompleteRun", {"connectorId": c, "runId": "sms-run-0123abcd", "fence": 1,
                             "summary": {"disks": []}, "message": "m", "amiId": "ami-zz"}),
            ("UploadCatalog", {"connectorId": c, "vms": [{"vmId": "x"}]}),
            ("UploadCatalog", {"connectorId": c, "vms": [], "problems": [1]}),
            ("UploadCatalog", {"connectorId": c, "vms": "x"}),
            ("RegisterConnector", {"sourceKind": "datastore", "vmManagerName": "m",
                                   "vmManagerType": "HYPERV-NOT", "vmManagerId": "ds-" + c}),
            ("RegisterConnector", {"sourceKind": "datastore", "vmManagerName": "m",
                                   "vmManagerType": "VSPHERE", "vmManagerId": "another-vcenter"}),
            ("NoSuchOperation", {"connectorId": c}),
        ]
        before = srv.service.state.query("SELECT * FROM connectors")
        for op, params in bad:
            with pytest.raises(ServiceError) as e:
                cp.call(op, **params)
            assert e.value.code in ("InvalidParameterException", "MissingRequiredParameterException",
                                    "AccessDeniedException", "UnknownOperationException",
                                    "SerializationException"), (op, e.value.code, str(e.value))
            assert "\n" not in str(e.value) and len(str(e.value)) <= 1024
        assert [dict(r) for r in srv.service.state.query("SELECT * FROM connectors")] == \
            [dict(r) for r in before]


def test_a_completion_sent_again_after_a_lost_answer_is_not_refused(tmp_path):
    svc, clock, conns, runs = fleet_state(tmp_path, 1, 1)
    fleet = Fleet(svc.state, clock)
    got = fleet.claim(conns[0], runs[0])
    first = fleet.complete(conns[0], runs[0], got["fence"], {"disks": []}, "done")
    again = fleet.complete(conns[0], runs[0], got["fence"], {"disks": []}, "done")
    assert first["state"] == again["state"] == "COMPLETED"
    with pytest.raises(ServiceError) as e:           # but not a failure after it
        fleet.fail(conns[0], runs[0], got["fence"], "late")
    assert e.value.code == STALE_CLAIM
    assert run_states(svc)[runs[0]][0] == "COMPLETED"
    svc.close()


SERVE_WITHOUT_BOTOCORE = textwrap.dedent("""
    import sys
    sys.modules["botocore"] = None      # any import of it fails: serve must not need it
    sys.modules["boto3"] = None
    from smsblock.service import SmsService
    from smsblock.service.fleet import Fleet
    from smsblock.service.server import ServerCredentials, make_server
    import json
    svc = SmsService(sys.argv[1])
    cred = Fleet(svc.state, svc.clock).create_credential(sys.argv[1] + "/store")
    srv = make_server(svc, "127.0.0.1", 0, ServerCredentials("AKIDOP", "secret"),
                      region="us-west-2")
    print(json.dumps({"url": srv.url, "cred": cred}), flush=True)
    srv.serve_forever(poll_interval=0.05)
""")


def test_serve_answers_connectors_without_botocore(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(SERVE_WITHOUT_BOTOCORE)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "state")],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        started = json.loads(proc.stdout.readline())

        class Srv:
            url = started["url"]
        cp = remote(Srv, started["cred"])
        assert register(cp)["connector"]["connectorId"] == started["cred"]["connectorId"]
        assert cp.heartbeat({}) == {"associated": True, "lost": []}
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
