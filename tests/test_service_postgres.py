"""The control plane on PostgreSQL: two `smsblock serve` processes on one database keep
the limits under concurrent requests, two schedulers make one run per slot, schema
versions, the dialect layer, and errors that name the host but never the password.

(The state-heavy service modules also run whole on PostgreSQL: see conftest.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from smsblock.errors import ServiceError, UsageError
from smsblock.service import SmsService
from smsblock.service.state import (SCHEMA_VERSION, VERSION_TABLE, State, pg_ddl, pg_sql,
                                    redact)
from test_service_server import CREDS
from test_service_sources import make_vm

ROOT = Path(__file__).resolve().parent.parent


def smsblock(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


class Serve:
    """A `smsblock serve --state postgresql://...` subprocess on a free port."""

    def __init__(self, url: str, local: Path):
        env = dict(os.environ, SMSBLOCK_HOME=str(local),
                   SMSBLOCK_ACCESS_KEY_ID=CREDS.access_key_id,
                   SMSBLOCK_SECRET_ACCESS_KEY=CREDS.secret_access_key)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smsblock", "serve", "--state", url, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
        self.line = line
        self.url = line.split("listening on ")[1].split()[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def sms_client(url: str, aws_models):
    import boto3
    from botocore.config import Config
    os.environ["AWS_DATA_PATH"] = str(aws_models)
    return boto3.session.Session(
        aws_access_key_id=CREDS.access_key_id, aws_secret_access_key=CREDS.secret_access_key,
        region_name="us-east-1").client(
            "sms", endpoint_url=url,
            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=60))


def catalog_of(tmp_path: Path, url: str | None, n: int) -> tuple[Path, list[str]]:
    """A datastore of ``n`` VMs registered and imported into the database at ``url``
    (None: a SQLite state directory); returns the local directory and the server ids."""
    ds, local = tmp_path / "ds", tmp_path / ("local" if url else "sqlite")
    for i in range(n):
        make_vm(ds, f"vm{i:03d}", f"vm{i:03d}", fmt="raw", disks=(("scsi0:0", 4096),))
    with SmsService(state=State(url, local_dir=local) if url else State(local)) as svc:
        svc.register_connector("datastore", {"path": str(ds)})
        svc.import_server_catalog()
        servers = [r["server_id"] for r in svc.state.query(
            "SELECT server_id FROM servers WHERE in_catalog = 1 ORDER BY vm_name")]
    assert len(servers) == n
    return local, servers


def error_code(e: BaseException) -> str:
    return e.response["Error"]["Code"]


def test_two_serve_processes_keep_the_job_and_on_demand_limits(postgres_server, tmp_path,
                                                               aws_models):
    url = postgres_server.new_database()
    local, servers = catalog_of(tmp_path, url, 60)
    serves = [Serve(url, local), Serve(url, local)]
    try:
        assert "state postgresql://postgres@" in serves[0].line   # the database, no password
        clients = [sms_client(s.url, aws_models) for s in serves]
        clients[0].get_connectors(), clients[1].get_connectors()      # connections warm
        seed = time.time() + 3600
        go = threading.Barrier(30)

        def create(i: int):
            if i < 30:
                go.wait(30)
            try:
                return clients[i % 2].create_replication_job(
                    serverId=servers[i], seedReplicationTime=seed, frequency=12)
            except clients[i % 2].exceptions.ClientError as e:
                return e
        with ThreadPoolExecutor(30) as pool:
            results = list(pool.map(create, range(60)))
        made = [r["replicationJobId"] for r in results if isinstance(r, dict)]
        refused = [r for r in results if not isinstance(r, dict)]
        assert len(made) == 50 and len(set(made)) == 50, [str(r) for r in refused][:3]
        assert {error_code(e) for e in refused} == {"OperationNotPermittedException"}
        assert all("limit of 50 active replication jobs" in str(e) for e in refused)
        for c in clients:     # both processes see the same 50 jobs
            listed = c.get_replication_jobs(maxResults=100)["replicationJobList"]
            assert sorted(j["replicationJobId"] for j in listed) == sorted(made)

        # on-demand runs: one at a time per job, and 2 per 24 hours, across both processes
        job = made[0]
        state = State(url, local_dir=local)
        started: list[str] = []
        for _ in range(3):
            burst = threading.Barrier(5)

            def on_demand(i: int):
                burst.wait(30)
                try:
                    return clients[i % 2].start_on_demand_replication_run(replicationJobId=job)
                except clients[i % 2].exceptions.ClientError as e:
                    return e
            with ThreadPoolExecutor(5) as pool:
                results = list(pool.map(on_demand, range(5)))
            ok = [r["replicationRunId"] for r in results if isinstance(r, dict)]
            codes = {error_code(r) for r in results if not isinstance(r, dict)}
            if len(started) < 2:
                # one wins; the others find its run PENDING
                assert len(ok) == 1 and codes == {"OperationNotPermittedException"}, codes
                started += ok
                with state.transaction() as db:      # the connector's part: the run ends
                    db.execute("UPDATE runs SET state = 'COMPLETED', completed = ? "
                               "WHERE run_id = ?", (time.time(), ok[0]))
            else:
                assert ok == [] and codes == {"ReplicationRunLimitExceededException"}, codes
        runs = state.query("SELECT run_id FROM runs WHERE job_id = ? AND type = 'ON_DEMAND'",
                           (job,))
        assert sorted(r["run_id"] for r in runs) == sorted(started)
        state.close()
    finally:
        for s in serves:
            s.stop()


TICKER = """
import sys, time
from smsblock.service import SmsService
from smsblock.service.state import State
svc = SmsService(state=State(sys.argv[1], local_dir=sys.argv[2]))
end, made = time.time() + float(sys.argv[3]), 0
while time.time() < end:
    made += len(svc.tick())
print(made)
"""


def test_two_schedulers_make_exactly_one_run_per_due_slot(postgres_server, tmp_path):
    url = postgres_server.new_database()
    local, servers = catalog_of(tmp_path, url, 24)
    now = time.time()
    with SmsService(state=State(url, local_dir=local)) as svc:
        seeds = {}
        for i, server in enumerate(servers):    # slots fall due while both schedulers tick
            seed = now + 1.5 + (i % 8) * 0.25
            job = svc.create_replication_job(serverId=server, seedReplicationTime=seed,
                                             frequency=12)["replicationJobId"]
            seeds[job] = seed
    tickers = [subprocess.Popen([sys.executable, "-c", TICKER, url, str(local), "5"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in tickers]
    assert all(p.returncode == 0 for p in tickers), [e for _, e in outs]
    made = [int(o) for o, _ in outs]
    with State(url, local_dir=local) as state:
        runs = state.query("SELECT job_id, scheduled_start, state FROM runs "
                           "WHERE type = 'AUTOMATIC'")
        seeds = {r["job_id"]: r["seed_time"] for r in state.query(
            "SELECT job_id, seed_time FROM jobs")}
    assert sum(made) == len(runs) == len(seeds) == len(servers), made
    assert sorted((r["job_id"], r["scheduled_start"]) for r in runs) == sorted(seeds.items())
    assert {r["state"] for r in runs} == {"PENDING"}


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_slot_is_unique_on_both_dialects(postgres_server, tmp_path, dialect):
    """The second line of defence: a second scheduled run of one slot cannot be stored."""
    url = postgres_server.new_database() if dialect == "postgresql" else None
    local, servers = catalog_of(tmp_path, url, 1)
    with SmsService(state=State(url, local_dir=local) if url else State(local)) as svc:
        job = svc.create_replication_job(serverId=servers[0], seedReplicationTime=time.time(),
                                         frequency=12)["replicationJobId"]
        insert = ("INSERT INTO runs (run_id, job_id, type, state, scheduled_start, created, "
                  "encrypted) VALUES (?, ?, ?, ?, 10, 10, 0)")
        with svc.state.transaction() as db:
            db.execute(insert, ("r1", job, "AUTOMATIC", "PENDING"))
            # a MISSED record of the slot, a run of it that ended (the job was given the
            # same instant again) and an on-demand run at its time are fine
            db.execute(insert, ("r2", job, "AUTOMATIC", "MISSED"))
            db.execute(insert, ("r3", job, "AUTOMATIC", "FAILED"))
            db.execute(insert, ("r4", job, "ON_DEMAND", "PENDING"))
        for state in ("PENDING", "ACTIVE"):     # a second live run of the slot is not
            with pytest.raises(Exception, match="(?i)unique"):
                with svc.state.transaction() as db:
                    db.execute(insert, ("r5", job, "AUTOMATIC", state))
        with pytest.raises(Exception, match="(?i)unique"):
            with svc.state.transaction() as db:   # nor one made live again
                db.execute("UPDATE runs SET state = 'ACTIVE' WHERE run_id = 'r3'")
        assert [r[0] for r in svc.state.query("SELECT run_id FROM runs ORDER BY rowid")] == \
            ["r1", "r2", "r3", "r4"]


def test_schema_is_versioned_and_a_newer_one_is_refused(postgres_server, tmp_path):
    url = postgres_server.new_database()
    with State(url, local_dir=tmp_path) as st:
        assert st.version == SCHEMA_VERSION
        assert st.tables() == ["catalog", "connector_credentials", "connectors", "images", "jobs", "runs", "servers"]
        assert st.check() == "ok"
    with State(url, local_dir=tmp_path) as st:      # reopening migrates nothing
        assert st.version == SCHEMA_VERSION
        st.query(f"UPDATE {VERSION_TABLE} SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ServiceError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        State(url, local_dir=tmp_path)
    p = smsblock("sms", "get-connectors", "--state", url, env={"SMSBLOCK_HOME": str(tmp_path)})
    assert p.returncode != 0 and p.stdout == ""
    assert "newer than this smsblock" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_processes_opening_a_fresh_database_at_once_migrate_it_once(postgres_server,
                                                                      tmp_path):
    url = postgres_server.new_database()
    code = ("import sys; from smsblock.service.state import State; "
            "s = State(sys.argv[1], local_dir=sys.argv[2]); print(s.version)")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [o.strip() for o, _ in outs] == [str(SCHEMA_VERSION)] * 4, [e for _, e in outs]
    with State(url, local_dir=tmp_path) as st:
        assert st.query(f"SELECT COUNT(*) FROM {VERSION_TABLE}")[0][0] == 1
        assert st.query("SELECT COUNT(*) FROM catalog")[0][0] == 1


def test_connection_failures_are_one_line_naming_the_host_never_the_password(tmp_path):
    import socket
    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://alice:Sekr3t-pw@127.0.0.1:{port}/fleet"
    with pytest.raises(ServiceError) as e:
        State(url, local_dir=tmp_path)
    text = str(e.value)
    assert f"127.0.0.1:{port}" in text and "Sekr3t" not in text and "\n" not in text
    for argv in (("sms", "get-connectors", "--state", url),
                 ("serve", "--state", url, "--port", "0"),
                 ("connector", "run", "--state", url)):
        p = smsblock(*argv, env={"SMSBLOCK_HOME": str(tmp_path), "SMSBLOCK_ACCESS_KEY_ID": "A",
                                 "SMSBLOCK_SECRET_ACCESS_KEY": "B"})
        assert p.returncode != 0, argv
        assert "Sekr3t" not in p.stderr + p.stdout, argv
        assert f"127.0.0.1:{port}" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    # a URL that does not parse is a usage error, redacted too
    with pytest.raises(UsageError) as e:
        State("postgresql://alice:Sekr3t-pw@host/db?bogus_option=1", local_dir=tmp_path)
    assert "Sekr3t" not in str(e.value)


def test_pg_sql_numbers_placeholders_outside_quotes_and_comments():
    assert pg_sql("SELECT * FROM t WHERE a = ? AND b IN (?, ?)") == \
        "SELECT * FROM t WHERE a = $1 AND b IN ($2, $3)"
    assert pg_sql("SELECT '?', \"a?b\", 'it''s ?' FROM t -- why?\nWHERE c = ?") == \
        "SELECT '?', \"a?b\", 'it''s ?' FROM t -- why?\nWHERE c = $1"


def test_pg_ddl_keeps_sqlite_widths_and_insertion_order():
    assert pg_ddl("CREATE TABLE t (a REAL, b INTEGER NOT NULL)") == \
        "CREATE TABLE t (rowid BIGSERIAL NOT NULL, a DOUBLE PRECISION, b BIGINT NOT NULL)"
    assert pg_ddl("ALTER TABLE t ADD COLUMN c REAL") == \
        "ALTER TABLE t ADD COLUMN c DOUBLE PRECISION"
    assert pg_ddl("INSERT INTO t (a) VALUES ('REAL')") == "INSERT INTO t (a) VALUES ('REAL')"
    assert pg_ddl("CREATE TABLE IF NOT EXISTS u (b BLOB)") == \
        "CREATE TABLE IF NOT EXISTS u (rowid BIGSERIAL NOT NULL, b BYTEA)"


def test_redact_hides_url_passwords():
    assert redact("at postgresql://u:p%40ss@h:5/db failed") == "at postgresql://u:***@h:5/db failed"
    assert redact("postgres://h/db") == "postgres://h/db"
    assert redact("password was hunter2", "hunter2") == "password was ***"


def test_a_state_on_postgresql_keeps_booleans_times_and_rows_as_sqlite_does(postgres_server,
                                                                            tmp_path):
    """The dialect layer: the same statements and values give the same rows."""
    rows = []
    for state in (State(tmp_path / "sqlite"), State(postgres_server.new_database(),
                                                    local_dir=tmp_path / "pg")):
        with state:
            with state.transaction() as db:
                db.execute("INSERT INTO images (ami_id, job_id, run_id, created) "
                           "VALUES (?,?,?,?)", ("ami-2", "j", "r", 1_800_000_000.123456))
                db.execute("INSERT INTO images (ami_id, job_id, run_id, created) "
                           "VALUES (?,?,?,?)", ("ami-1", "j", "r", 1_800_000_000.123456))
                db.execute("UPDATE jobs SET encrypted = ? WHERE job_id = ?", (True, "none"))
                assert db.execute("SELECT * FROM jobs WHERE job_id = ?", ("none",)).fetchone() \
                    is None
            got = state.query("SELECT ami_id, created FROM images ORDER BY created, rowid")
            rows.append([(r["ami_id"], r["created"], r[0]) for r in got])
            assert json.dumps(dict(zip(got[0].keys(), got[0])))      # rows are mappings
    assert rows[0] == rows[1] == [("ami-2", 1_800_000_000.123456, "ami-2"),
                                  ("ami-1", 1_800_000_000.123456, "ami-1")]


def test_a_lost_connection_is_replaced(postgres_server, tmp_path):
    """The database server ending the session (restart, pg_terminate_backend, idle
    timeout) costs no call: the next transaction or read reconnects."""
    import psycopg
    url = postgres_server.new_database()
    with State(url, local_dir=tmp_path) as st:
        for use in ("transaction", "query"):
            pid = st.query("SELECT pg_backend_pid()")[0][0]
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if use == "transaction":
                with st.transaction() as db:
                    db.execute("UPDATE catalog SET status = ? WHERE id = 1", ("X",))
            assert st.query("SELECT status FROM catalog")[0]["status"] == "X"
            assert st.query("SELECT pg_backend_pid()")[0][0] != pid


IMPORTER = """
import sys, time
from smsblock.service import catalog
from smsblock.service.state import State
state = State(sys.argv[1], local_dir=sys.argv[2])
job = catalog.begin_import(state, time.time())
print(job.import_id, flush=True)
time.sleep(60)
"""


def test_a_catalog_import_is_seen_alive_from_another_host_until_its_process_dies(
        postgres_server, tmp_path):
    """Two `serve` processes on one database need not share a directory: an import
    under way in one (a process with its own local directory, as on another host) stays
    IMPORTING for the other, and goes back to its previous status once it is killed."""
    url = postgres_server.new_database()
    local, servers = catalog_of(tmp_path, url, 2)
    proc = subprocess.Popen([sys.executable, "-c", IMPORTER, url, str(tmp_path / "host2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        import_id = proc.stdout.readline().strip()
        assert import_id, proc.stderr.read()
        with SmsService(state=State(url, local_dir=local)) as svc:
            for _ in range(3):
                assert svc.get_servers()["serverCatalogStatus"] == "IMPORTING"
            with pytest.raises(ServiceError, match="still under way"):
                svc.import_server_catalog()
            proc.kill()
            proc.wait(10)
            deadline = time.monotonic() + 10     # the server notices the closed socket
            while svc.get_servers()["serverCatalogStatus"] == "IMPORTING":
                assert time.monotonic() < deadline, "the dead import stays IMPORTING"
                time.sleep(0.05)
            assert svc.get_servers()["serverCatalogStatus"] == "AVAILABLE"
            assert len(svc.get_servers()["serverList"]) == 2
            assert "killed" in svc.state.query("SELECT import_outcome FROM catalog")[0][0]
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("ci,outcome", [("true", "fail"), ("", "skip")])
def test_missing_postgresql_binaries_fail_in_ci_and_skip_elsewhere(monkeypatch, ci, outcome):
    import postgres_server
    monkeypatch.setattr(postgres_server.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(postgres_server.shutil, "which", lambda name: None)
    monkeypatch.delenv("SMSBLOCK_PG_BIN", raising=False)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="install Debian's postgresql package"):
        postgres_server.postgres_binaries()


def test_session_lock_names_are_checked(postgres_server, tmp_path):
    with State(postgres_server.new_database(), local_dir=tmp_path) as st:
        with pytest.raises(ValueError, match="lock names"):
            st.try_session_lock("x'); SELECT 1; --")
        lock = st.try_session_lock("catalog-import-0123456789abcdef")
        assert st.session_lock_held("catalog-import-0123456789abcdef")
        assert st.try_session_lock("catalog-import-0123456789abcdef") is None
        lock.release()
        assert not st.session_lock_held("catalog-import-0123456789abcdef")


def test_without_psycopg_a_database_url_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psycopg", None)      # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'psycopg\[binary\]'"):
        State("postgresql://u:pw@db.example.com/sms", local_dir=tmp_path)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_job_given_the_instant_of_its_ended_slot_again_gets_a_run(postgres_server,
                                                                     tmp_path, dialect):
    """The slot index leaves ended runs out: a run that failed at its slot's instant,
    then UpdateReplicationJob putting the next slot on that same instant (the grace
    makes it "now"), makes a second run of the slot, as the scheduler's rules say."""
    from smsblock.service import FakeClock
    url = postgres_server.new_database() if dialect == "postgresql" else None
    local, servers = catalog_of(tmp_path, url, 1)
    clock = FakeClock(float(int(time.time())))     # whole seconds: timestamps keep them
    with SmsService(state=State(url, local_dir=local) if url else State(local),
                    clock=clock) as svc:
        job = svc.create_replication_job(serverId=servers[0], seedReplicationTime=clock(),
                                         frequency=12)["replicationJobId"]
        [first] = svc.tick()
        with svc.state.transaction() as db:
            db.execute("UPDATE runs SET state = 'FAILED', completed = ? WHERE run_id = ?",
                       (clock(), first))
        svc.update_replication_job(replicationJobId=job, nextReplicationRunStartTime=clock())
        [second] = svc.tick()
        runs = svc.state.query("SELECT run_id, scheduled_start, state FROM runs "
                               "ORDER BY rowid")
        assert [(r[0], r[2]) for r in runs] == [(first, "FAILED"), (second, "PENDING")]
        assert runs[0][1] == runs[1][1]
