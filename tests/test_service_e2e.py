"""End to end: `smsblock serve` on 127.0.0.1 driven by the unmodified AWS CLI (v1) with the
official SMS model, through the SMS guide's walkthrough; bad signatures; kill -9.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import qemu_raw_bytes
from test_service_sources import bootable_image, make_vm

pytestmark = pytest.mark.xdist_group("sms-e2e")

AKID = "AKIDSMSBLOCKTEST"
SECRET = "smsblock-test-secret/with+chars"


def smsblock(*args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"smsblock {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


class Server:
    """A `smsblock serve` subprocess on a free port."""

    def __init__(self, state: Path):
        env = dict(os.environ, SMSBLOCK_ACCESS_KEY_ID=AKID, SMSBLOCK_SECRET_ACCESS_KEY=SECRET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smsblock", "serve", "--state", str(state),
             "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
        self.url = line.split("listening on ")[1].split()[0]

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def aws_env(aws_models, tmp_path):
    return dict(os.environ, AWS_DATA_PATH=str(aws_models), AWS_ACCESS_KEY_ID=AKID,
                AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
                AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
                AWS_PAGER="")


def aws(env, server: Server, *args, expect_error: str | None = None):
    proc = subprocess.run(["aws", "sms", *map(str, args), "--endpoint-url", server.url,
                           "--output", "json"], capture_output=True, text=True, env=env,
                          timeout=120)
    if expect_error is not None:
        assert proc.returncode != 0, f"aws sms {args} should fail with {expect_error}"
        assert f"({expect_error})" in proc.stderr, proc.stderr
        return proc.stderr
    assert proc.returncode == 0, f"aws sms {args} failed: {proc.stderr}"
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def test_aws_cli_walkthrough(tmp_path, aws_env):
    ds, state = tmp_path / "ds", tmp_path / "state"
    vmx = make_vm(ds, "DC1/Linux/web01", "web01", image=bootable_image(tmp_path / "img"))
    conn = json.loads(smsblock("connector", "register", "--state", state, "--datastore", ds).stdout)
    server = Server(state)
    try:
        # 1. the connector shows up
        out = aws(aws_env, server, "get-connectors")
        (c,) = out["connectorList"]
        assert c["connectorId"] == conn["connectorId"] and c["status"] == "HEALTHY"
        assert c["vmManagerType"] == "VSPHERE"

        # 2. catalog
        # (the CLI's paginator keeps only serverList; --no-paginate shows the status)
        assert aws(aws_env, server, "get-servers", "--no-paginate")[
            "serverCatalogStatus"] == "NOT_IMPORTED"
        assert aws(aws_env, server, "import-server-catalog") == {}
        out = aws(aws_env, server, "get-servers", "--no-paginate")
        assert out["serverCatalogStatus"] == "AVAILABLE"
        (srv,) = out["serverList"]
        assert srv["vmServer"]["vmPath"] == "/Datacenters/DC1/vm/Linux/web01"
        server_id = srv["serverId"]

        # 3. a job, seeded in an hour (an on-demand run now does not wait for the seed run)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        seed = datetime.fromtimestamp(time.time() + 3600, tz=timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        job_id = aws(aws_env, server, "create-replication-job", "--server-id", server_id,
                     "--seed-replication-time", seed, "--frequency", 12, "--license-type", "BYOL",
                     "--description", "walkthrough", "--number-of-recent-amis-to-keep", 2
                     )["replicationJobId"]
        aws(aws_env, server, "create-replication-job", "--server-id", server_id,
            "--seed-replication-time", now, "--frequency", 12,
            expect_error="ReplicationJobAlreadyExistsException")
        via_aws = aws(aws_env, server, "get-replication-jobs")
        (job,) = via_aws["replicationJobList"]
        assert job["replicationJobId"] == job_id and job["state"] == "PENDING"
        # `smsblock sms` prints what `aws sms` prints for the same state
        assert json.loads(smsblock("sms", "get-replication-jobs", "--state", state).stdout) == via_aws
        assert json.loads(smsblock("sms", "get-servers", "--state", state).stdout) == \
            aws(aws_env, server, "get-servers", "--no-paginate")
        assert job["licenseType"] == "BYOL" and job["frequency"] == 12

        # 4. an on-demand run, executed by the connector
        run_id = aws(aws_env, server, "start-on-demand-replication-run", "--replication-job-id",
                     job_id, "--description", "first")["replicationRunId"]
        aws(aws_env, server, "start-on-demand-replication-run", "--replication-job-id", job_id,
            expect_error="OperationNotPermittedException")
        did = json.loads(smsblock("connector", "run", "--state", state, "--once").stdout)
        assert did["completed"] == [run_id], aws(aws_env, server, "get-replication-runs",
                                                 "--replication-job-id", job_id)

        out = aws(aws_env, server, "get-replication-runs", "--replication-job-id", job_id,
                  "--no-paginate")
        runs = {r["replicationRunId"]: r for r in out["replicationRunList"]}
        assert runs[run_id]["state"] == "COMPLETED" and runs[run_id]["type"] == "ON_DEMAND"
        assert runs[run_id]["completedTime"] > 0 and runs[run_id]["description"] == "first"
        assert [r for r in runs.values() if r["type"] == "AUTOMATIC"] == []   # seed ahead
        assert out["replicationJob"]["state"] == "ACTIVE"
        ami = runs[run_id]["amiId"]
        assert ami.startswith("ami-") and out["replicationJob"]["latestAmiId"] == ami
        # the image is in the local catalog under STATE/images
        assert (state / "images" / ami / "image.json").is_file()

        # the run's blocks are in STATE/store under the server id
        restored = tmp_path / "restored.raw"
        smsblock("restore", "--store", state / "store", "--server", server_id, "-o", restored)
        disk = vmx.parent / "web01.vmdk"
        assert restored.read_bytes() == qemu_raw_bytes(disk, tmp_path)

        # 5. update
        later = datetime.fromtimestamp(time.time() + 2 * 86400, tz=timezone.utc).isoformat()
        assert aws(aws_env, server, "update-replication-job", "--replication-job-id", job_id,
                   "--frequency", 24, "--next-replication-run-start-time", later,
                   "--role-name", "sms", "--description", "updated") == {}
        (job,) = aws(aws_env, server, "get-replication-jobs", "--replication-job-id",
                     job_id)["replicationJobList"]
        assert job["frequency"] == 24 and job["description"] == "updated"
        assert abs(job["nextReplicationRunStartTime"] - (time.time() + 2 * 86400)) < 60

        # 6. delete, the connector removes the blocks, then the catalog and the connector go
        aws(aws_env, server, "disassociate-connector", "--connector-id", conn["connectorId"],
            expect_error="OperationNotPermittedException")
        aws(aws_env, server, "delete-server-catalog", expect_error="OperationNotPermittedException")
        assert aws(aws_env, server, "delete-replication-job", "--replication-job-id", job_id) == {}
        did = json.loads(smsblock("connector", "run", "--state", state, "--once").stdout)
        assert did["deleted_jobs"] == [job_id]
        # the deleted job stays listed, DELETED (as SMS lists it)
        assert [(j["replicationJobId"], j["state"]) for j in aws(
            aws_env, server, "get-replication-jobs")["replicationJobList"]] == [(job_id, "DELETED")]
        from smsblock.store import open_store
        store = open_store(state / "store")
        assert store.list_run_ids(server_id) == [] and store.list_packs() == {}
        assert (state / "images" / ami / "image.json").is_file()   # images are kept
        assert aws(aws_env, server, "delete-server-catalog") == {}
        out = aws(aws_env, server, "get-servers", "--no-paginate")
        assert out["serverCatalogStatus"] == "DELETED" and out["serverList"] == []
        assert aws(aws_env, server, "disassociate-connector", "--connector-id",
                   conn["connectorId"]) == {}
        assert aws(aws_env, server, "get-connectors")["connectorList"] == []
        server.proc.terminate()
        assert server.proc.wait(30) == 0     # SIGTERM: a clean stop
    finally:
        server.stop()


def test_bad_signatures_are_refused_and_change_nothing(tmp_path, aws_env):
    ds, state = tmp_path / "ds", tmp_path / "state"
    make_vm(ds, "DC1/a", "a")
    smsblock("connector", "register", "--state", state, "--datastore", ds)
    server = Server(state)
    try:
        bad = dict(aws_env, AWS_SECRET_ACCESS_KEY="not-the-secret")
        aws(bad, server, "import-server-catalog", expect_error="InvalidSignatureException")
        other = dict(aws_env, AWS_ACCESS_KEY_ID="AKIDSOMEONEELSE")
        aws(other, server, "import-server-catalog", expect_error="UnrecognizedClientException")
        assert aws(aws_env, server, "get-servers", "--no-paginate")[
            "serverCatalogStatus"] == "NOT_IMPORTED"
        # unsigned, and signed but tampered on the way
        import urllib.request
        req = urllib.request.Request(server.url + "/", data=b"{}", method="POST", headers={
            "X-Amz-Target": "AWSServerMigrationService_V2016_10_24.ImportServerCatalog",
            "Content-Type": "application/x-amz-json-1.1"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400
        assert json.loads(e.value.read())["__type"] == "MissingAuthenticationTokenException"
        import boto3
        from botocore.exceptions import ClientError
        os.environ["AWS_DATA_PATH"] = aws_env["AWS_DATA_PATH"]
        client = boto3.session.Session(aws_access_key_id=AKID, aws_secret_access_key=SECRET,
                                       region_name="us-east-1").client(
            "sms", endpoint_url=server.url)

        def tamper(request, **_):
            # after signing: same length, other content
            assert request.body == b'{"maxResults": 5}', request.body
            request.body = b'{"maxResults": 6}'
        client.meta.events.register_last("before-send.sms.GetServers", tamper)
        with pytest.raises(ClientError) as e:
            client.get_servers(maxResults=5)
        assert e.value.response["Error"]["Code"] == "InvalidSignatureException"
        client.meta.events.unregister("before-send.sms.GetServers", tamper)
        assert client.get_servers()["serverCatalogStatus"] == "NOT_IMPORTED"
    finally:
        server.stop()


def test_kill9_of_the_server_mid_requests_leaves_state_usable(tmp_path, aws_env):
    import boto3
    ds, state = tmp_path / "ds", tmp_path / "state"
    for i in range(4):
        make_vm(ds, f"DC1/vm{i}", f"vm{i}")
    smsblock("connector", "register", "--state", state, "--datastore", ds)
    server = Server(state)
    os.environ["AWS_DATA_PATH"] = aws_env["AWS_DATA_PATH"]

    def client(url):
        return boto3.session.Session(aws_access_key_id=AKID, aws_secret_access_key=SECRET,
                                     region_name="us-east-1").client(
            "sms", endpoint_url=url, config=__import__("botocore.config").config.Config(
                retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))

    sms = client(server.url)
    sms.import_server_catalog()
    servers = [s["serverId"] for s in sms.get_servers()["serverList"]]
    seed = datetime.now(timezone.utc)
    job_ids = [sms.create_replication_job(serverId=s, seedReplicationTime=seed, frequency=12)[
        "replicationJobId"] for s in servers]
    written: list[int] = []
    stop = threading.Event()

    def hammer():
        n = 0
        while not stop.is_set():
            n += 1
            freq = 12 + n % 13
            try:
                sms.update_replication_job(replicationJobId=job_ids[n % 4], frequency=freq)
                sms.import_server_catalog()
                written.append(freq)
            except Exception:
                return   # the server is gone

    t = threading.Thread(target=hammer)
    t.start()
    time.sleep(1.0)
    server.kill9()
    stop.set()
    t.join(30)
    assert written, "no request got through before the kill"

    db = sqlite3.connect(state / "state.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    server2 = Server(state)
    try:
        sms2 = client(server2.url)
        jobs = sms2.get_replication_jobs()["replicationJobList"]
        assert sorted(j["replicationJobId"] for j in jobs) == sorted(job_ids)
        assert all(12 <= j["frequency"] <= 24 for j in jobs)
        assert sms2.get_servers()["serverCatalogStatus"] in ("AVAILABLE", "IMPORTING")
        sms2.import_server_catalog()   # a catalog left IMPORTING recovers by importing again
        assert sms2.get_servers()["serverCatalogStatus"] == "AVAILABLE"
        assert sorted(s["serverId"] for s in sms2.get_servers()["serverList"]) == sorted(servers)
        sms2.update_replication_job(replicationJobId=job_ids[0], frequency=13)
    finally:
        server2.stop()


class FifoSourceServer(Server):
    """`smsblock serve` with the FIFO-fed test source kind registered (tests/fifo_source.py)."""

    def __init__(self, state: Path):
        tests = str(Path(__file__).parent)
        env = dict(os.environ, SMSBLOCK_ACCESS_KEY_ID=AKID, SMSBLOCK_SECRET_ACCESS_KEY=SECRET,
                   PYTHONPATH=os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH"))
                                              if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fifo_source", "serve", "--state", str(state),
             "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
        self.url = line.split("listening on ")[1].split()[0]


def test_aws_cli_sees_importing_during_a_slow_import_and_a_killed_server_recovers(tmp_path, aws_env):
    """ImportServerCatalog returns while the source is still listing; get-servers answers
    IMPORTING at once; kill -9 of the server midway leaves no IMPORTING behind."""
    import fifo_source
    from smsblock.service import SmsService
    state, fifo = tmp_path / "state", tmp_path / "vms.fifo"
    os.mkfifo(fifo)
    with SmsService(state) as svc:
        svc.register_connector(fifo_source.KIND, {"fifo": str(fifo)})
    timeout = ("--cli-read-timeout", 15)
    server = FifoSourceServer(state)
    try:
        start = time.monotonic()
        assert aws(aws_env, server, "import-server-catalog", *timeout) == {}
        took_import = time.monotonic() - start
        start = time.monotonic()
        out = aws(aws_env, server, "get-servers", "--no-paginate", *timeout)
        took_get = time.monotonic() - start
        assert out["serverCatalogStatus"] == "IMPORTING" and out["serverList"] == []
        # the aws CLI itself takes a second or so to start; the server adds no wait
        assert took_import < 15 and took_get < 10, (took_import, took_get)
        aws(aws_env, server, "import-server-catalog", *timeout,
            expect_error="OperationNotPermittedException")
        server.kill9()
    finally:
        server.stop()
    server = FifoSourceServer(state)
    try:
        out = aws(aws_env, server, "get-servers", "--no-paginate", *timeout)
        assert out["serverCatalogStatus"] == "NOT_IMPORTED"      # back to before the import
        assert not list(state.glob("catalog-import-*"))
        assert aws(aws_env, server, "import-server-catalog", *timeout) == {}
        assert fifo_source.feed(fifo, ["web01", "db01"], timeout=30)
        deadline = time.monotonic() + 30
        while (out := aws(aws_env, server, "get-servers", "--no-paginate", *timeout))[
                "serverCatalogStatus"] == "IMPORTING" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert out["serverCatalogStatus"] == "AVAILABLE"
        assert sorted(s["vmServer"]["vmName"] for s in out["serverList"]) == ["db01", "web01"]
    finally:
        fifo_source.feed(fifo, [], timeout=0)
        server.stop()
