"""Fleet end to end: `smsblock serve` over HTTPS (a throwaway CA and server certificate
made with the openssl CLI), remote connectors (`connector register --endpoint`,
`connector run --connector-dir`) talking to it only over HTTPS, their disks going to an
S3 store (moto in server mode), the AWS CLI verifying the same certificate; a connector
killed mid-run and resumed by another; a connector that comes back after its run was
reassigned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_fixtures import *  # noqa: F401,F403 - moto, aws_env, bucket
from test_service_sources import bootable_image, make_vm
from smsblock.backend.retry import RetryPolicy

ROOT = Path(__file__).parent.parent
AKID = "AKIDFLEETOPERATOR"
SECRET = "fleet-operator-secret/with+chars"

pytestmark = pytest.mark.xdist_group("fleet")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca_and_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA (ca.pem) and a server certificate it signed for 127.0.0.1 and
    localhost (server.pem, server.key), made with Debian's openssl at test time."""
    folder.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=smsblock test CA",
            cwd=folder)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                                    "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf",
            cwd=folder)
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


def env_with(aws_env, **extra) -> dict:
    return dict(os.environ, **aws_env, PYTHONPATH=str(ROOT), **extra)


def smsblock(env, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"smsblock {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


class Serve:
    """`smsblock serve --tls-cert --tls-key` in a subprocess on a free port."""

    def __init__(self, env, state: Path, cert: Path, key: Path):
        env = dict(env, SMSBLOCK_ACCESS_KEY_ID=AKID, SMSBLOCK_SECRET_ACCESS_KEY=SECRET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smsblock", "serve", "--state", str(state), "--host",
             "127.0.0.1", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on https://" not in line:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r}")
        self.url = line.split("listening on ")[1].split()[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


class Fleet:
    """A control plane over HTTPS, a datastore, an S3 store, and helpers to drive them."""

    def __init__(self, tmp_path: Path, aws_env: dict, bucket: str, aws_models=None,
                 config: str = ""):
        self.tmp = tmp_path
        self.env = env_with(aws_env)
        self.ca, cert, key = make_ca_and_cert(tmp_path / "tls")
        self.state = tmp_path / "state"
        self.state.mkdir(mode=0o700)
        (self.state / "config.toml").write_text(config)
        self.store = f"s3://{bucket}/fleet"
        self.serve = Serve(self.env, self.state, cert, key)
        self.aws_models = aws_models

    def credential(self, name: str) -> Path:
        path = self.tmp / f"{name}.json"
        if path.exists():           # one credential per connector
            return path
        cred = smsblock(self.env, "connector", "credential", "create", "--state", self.state,
                        "--store", self.store, "--description", name).stdout
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cred)
        return path

    def register(self, name: str, ds: Path, *extra, check=True):
        cred = self.credential(name)
        return smsblock(self.env, "connector", "register", "--endpoint", self.serve.url,
                        "--credentials-file", cred, "--datastore", ds,
                        "--connector-dir", self.tmp / name, *extra, check=check)

    def run_once(self, name: str, *extra, check=True):
        return smsblock(self.env, "connector", "run", "--connector-dir", self.tmp / name,
                        "--once", *extra, check=check)

    def start(self, name: str, *extra) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "smsblock", "connector", "run",
                                 "--connector-dir", str(self.tmp / name), "--poll-interval",
                                 "0.3", "--heartbeat-interval", "0.3", *extra],
                                stdout=subprocess.DEVNULL, stderr=log, env=self.env)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def aws(self, *args, ca=True, check=True):
        env = dict(self.env, AWS_DATA_PATH=str(self.aws_models), AWS_ACCESS_KEY_ID=AKID,
                   AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1", AWS_PAGER="")
        env.pop("AWS_ENDPOINT_URL", None)
        proc = subprocess.run(["aws", "sms", *map(str, args), "--endpoint-url", self.serve.url,
                               "--output", "json", *(["--ca-bundle", str(self.ca)] if ca else [])],
                              capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout) if proc.stdout.strip() else {}
        return proc

    def sms(self, *args):
        """An operator's `smsblock sms` on the control plane's state (same host)."""
        out = smsblock(self.env, "sms", *args, "--state", self.state).stdout
        return json.loads(out) if out.strip() else {}

    def job_with_run(self) -> tuple[str, str, str]:
        self.sms("import-server-catalog")
        (server,) = self.sms("get-servers")["serverList"]
        job = self.sms("create-replication-job", "--server-id", server["serverId"],
                       "--seed-replication-time", str(int(time.time()) + 10 * 86400),
                       "--frequency", "12")["replicationJobId"]
        run = self.sms("start-on-demand-replication-run", "--replication-job-id",
                       job)["replicationRunId"]
        return server["serverId"], job, run

    def runs(self, job: str) -> list[dict]:
        return self.sms("get-replication-runs", "--replication-job-id", job)["replicationRunList"]

    def close(self) -> None:
        self.serve.stop()


def test_remote_connector_over_https_replicates_into_s3(tmp_path, aws_env, bucket, aws_models):
    """register --endpoint https://... (verified with --ca-bundle; refused without),
    then `connector run` uploads its catalog, claims the run, reports, registers the
    image and completes over HTTPS only, its disk going to the S3 store the control
    plane named; the AWS CLI sees it all through the same certificate."""
    image = bootable_image(tmp_path / "img")
    ds = tmp_path / "ds"
    make_vm(ds, "DC1/web01", "web01", image=image)
    fleet = Fleet(tmp_path, aws_env, bucket, aws_models)
    try:
        # an unverified certificate is refused ...
        bad = fleet.register("conn-a", ds, check=False)
        assert bad.returncode != 0 and "certificate verify failed" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and not (tmp_path / "conn-a" / "connector.json").exists()
        assert "certificate verify failed" in fleet.aws("get-connectors", ca=False,
                                                       check=False).stderr
        # ... unless --insecure says so, explicitly; with the CA bundle it is verified
        reg = json.loads(fleet.register("conn-b", ds, "--insecure").stdout)
        assert reg["store"] == fleet.store
        reg = json.loads(fleet.register("conn-a", ds, "--ca-bundle", fleet.ca).stdout)
        settings = tmp_path / "conn-a" / "connector.json"
        assert oct(settings.stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_path / "conn-a").stat().st_mode & 0o777) == "0o700"
        connectors = fleet.aws("get-connectors")["connectorList"]
        assert reg["connectorId"] in {c["connectorId"] for c in connectors}
        assert all(c["status"] == "HEALTHY" for c in connectors)
        # the catalog comes from the connector's own listing (the control plane does
        # not reach the datastore itself: it is not told where it is)
        first = json.loads(fleet.run_once("conn-a").stdout)
        assert first["completed"] == []
        server, job, run = fleet.job_with_run()
        done = json.loads(fleet.run_once("conn-a").stdout)
        assert done["completed"] == [run], done
        (r,) = fleet.aws("get-replication-runs", "--replication-job-id", job)["replicationRunList"]
        assert r["state"] == "COMPLETED" and r["amiId"].startswith("ami-"), r
        # the image was made (and is kept) on the connector's side
        assert (tmp_path / "conn-a" / "images" / r["amiId"]).is_dir()
        # the blocks are in S3, restorable byte for byte
        out = tmp_path / "restored.raw"
        smsblock(fleet.env, "restore", "--store", fleet.store, "--server", server, "-o", out)
        assert out.read_bytes() == image.read_bytes()
    finally:
        fleet.close()


# --- a connector killed mid-run, a connector that comes back ----------------------------

RANDOM_DISK = 4 << 20


def two_connectors(tmp_path, aws_env, bucket):
    """A fleet whose heartbeat timeout is 2 s, two connectors (A, B) on one datastore, a
    VM (bootable disk + 4 MiB of random data) and a due run; the S3 store is created
    with small packs so that a run seals packs as it goes."""
    from smsblock.store import open_store
    from smsblock.store.base import StoreConfig
    from conftest import qemu_img
    image = bootable_image(tmp_path / "img")
    ds = tmp_path / "ds"
    make_vm(ds, "DC1/db01", "db01", image=image, disks=(("scsi0:0", 0), ("scsi0:1", RANDOM_DISK)))
    raw = tmp_path / "random.raw"
    raw.write_bytes(os.urandom(RANDOM_DISK))
    qemu_img("convert", "-f", "raw", "-O", "vmdk", raw, ds / "DC1/db01/db01_1.vmdk")
    fleet = Fleet(tmp_path, aws_env, bucket, config="heartbeat_timeout_seconds = 2\n")
    open_store(fleet.store).initialise(StoreConfig(pack_size=4096))
    for name in ("conn-a", "conn-b"):
        fleet.register(name, ds, "--ca-bundle", fleet.ca)
        fleet.run_once(name)           # uploads its catalog
    return fleet


def packs(store_url) -> tuple[int, int]:
    """(blocks in all sealed packs, distinct block addresses among them)."""
    from smsblock.store import open_store
    store = open_store(store_url)
    addresses = [bytes(a) for pid, size in store.list_packs().items()
                 for a in store.pack_index(pid, size)["address"]]
    return len(addresses), len(set(addresses))


def run_row(fleet, run) -> dict:
    import sqlite3
    db = sqlite3.connect(fleet.state / "state.db")
    db.row_factory = sqlite3.Row
    try:
        return dict(db.execute("SELECT * FROM runs WHERE run_id = ?", (run,)).fetchone())
    finally:
        db.close()


def start_slow(fleet, name):
    """Connector ``name`` running, its uploads capped at 1 MiB/s (its own staging area)."""
    env = dict(fleet.env, SMSBLOCK_S3_BANDWIDTH="1M",
               SMSBLOCK_S3_STAGING_DIR=str(fleet.tmp / f"staging-{name}"))
    log = open(fleet.tmp / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "smsblock", "connector", "run",
                             "--connector-dir", str(fleet.tmp / name), "--poll-interval", "0.3",
                             "--heartbeat-interval", "0.3"],
                            stdout=subprocess.DEVNULL, stderr=log, env=env)


def wait_until_uploading(fleet, run, proc, min_blocks=2, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, fleet.log("conn-a")
        row = run_row(fleet, run)
        if row["state"] == "ACTIVE" and row["stage"] == "uploading" and \
                packs(fleet.store)[0] >= min_blocks:
            return
        time.sleep(0.1)
    raise AssertionError(f"the run did not get to uploading: {run_row(fleet, run)}")


def wait_for_lease(row) -> None:
    """Until the lease of the run ``row`` (its state row) has run out."""
    time.sleep(max(0.0, row["lease_until"] - time.time()) + 0.2)


def test_a_connector_killed_mid_run_is_resumed_by_another_sending_nothing_twice(
        tmp_path, aws_env, bucket):
    """kill -9 of connector A while it uploads: after the heartbeat timeout connector B
    claims the run again (fence 2) and completes it; what A had sealed in the store is
    not sent again (B stores only the rest, and no block is in the store twice)."""
    fleet = two_connectors(tmp_path, aws_env, bucket)
    a = None
    try:
        server, job, run = fleet.job_with_run()
        a = start_slow(fleet, "conn-a")
        wait_until_uploading(fleet, run, a)
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        sealed_by_a, _ = packs(fleet.store)
        row = run_row(fleet, run)
        assert (row["state"], row["fence"]) == ("ACTIVE", 1)
        # not claimable before the lease runs out ...
        b_id = json.loads((tmp_path / "conn-b" / "connector.json").read_text())["connectorId"]
        from smsblock.service.fleet import Fleet as FleetOps
        from smsblock.service.state import State
        with State(fleet.state) as state:
            due = FleetOps(state, time.time).due_runs(b_id)
            if time.time() < row["lease_until"]:
                assert run not in due
        wait_for_lease(row)
        # ... then B resumes it
        b = fleet.run_once("conn-b")
        assert json.loads(b.stdout)["completed"] == [run], b.stderr
        assert "resumed: claim 2" in b.stderr, b.stderr
        row = run_row(fleet, run)
        assert (row["state"], row["fence"], row["claimed_by"]) == ("COMPLETED", 2, b_id)
        summary = json.loads(row["summary"])
        stored_by_b = sum(d["blocks_stored"] for d in summary["disks"])
        data_blocks = sum(d["blocks_data"] for d in summary["disks"])
        total, distinct = packs(fleet.store)
        assert 0 < sealed_by_a < total            # A was killed mid-run
        assert total == distinct                   # no block is in the store twice
        assert stored_by_b == total - sealed_by_a  # B sent only what A had not sealed
        assert stored_by_b < data_blocks
        (r,) = fleet.runs(job)
        assert r["state"] == "COMPLETED" and r["amiId"].startswith("ami-")
        # the data is whole
        out = tmp_path / "disk1.raw"
        smsblock(fleet.env, "restore", "--store", fleet.store, "--server", f"{server}-disk1",
                 "-o", out)
        assert out.read_bytes() == (tmp_path / "random.raw").read_bytes()
    finally:
        if a is not None and a.poll() is None:
            a.kill()
        fleet.close()


def test_a_connector_back_after_its_run_was_reassigned_commits_nothing(
        tmp_path, aws_env, bucket):
    """Connector A is frozen (SIGSTOP) mid-run past the heartbeat timeout; B takes the
    run over and completes it; when A wakes up, the control plane refuses its stale
    claim: A stops the run, says so in its log, and commits no second result."""
    fleet = two_connectors(tmp_path, aws_env, bucket)
    a = None
    try:
        server, job, run = fleet.job_with_run()
        a = start_slow(fleet, "conn-a")
        wait_until_uploading(fleet, run, a)
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(0.5)             # a request A had under way is answered
        wait_for_lease(run_row(fleet, run))
        b = fleet.run_once("conn-b")
        assert json.loads(b.stdout)["completed"] == [run], b.stderr
        completed_b = run_row(fleet, run)
        os.kill(a.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while "was reassigned" not in fleet.log("conn-a") and time.monotonic() < deadline:
            time.sleep(0.2)
        log = fleet.log("conn-a")
        assert "was reassigned to another connector" in log and "discarded" in log, log
        assert a.poll() is None               # A goes on serving
        time.sleep(1)
        row = run_row(fleet, run)
        assert row == completed_b             # B's result, untouched
        (r,) = fleet.runs(job)
        assert r["state"] == "COMPLETED"
        import sqlite3
        db = sqlite3.connect(fleet.state / "state.db")
        assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1
        db.close()
    finally:
        if a is not None and a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.terminate()
            a.wait(10)
        fleet.close()


# --- TLS and proxies, in-process ------------------------------------------------------------

@pytest.fixture
def tls_server(tmp_path):
    """`serve --tls-cert --tls-key` in a thread, with one connector credential."""
    from smsblock.service.fleet import Fleet as FleetOps
    from test_service_server import serving
    ca, cert, key = make_ca_and_cert(tmp_path / "tls")
    with serving(tmp_path, tls_cert=str(cert), tls_key=str(key)) as srv:
        cred = FleetOps(srv.service.state, srv.service.clock).create_credential(
            str(tmp_path / "store"))
        yield srv, ca, cred


def control_plane(srv, cred, **kw):
    from smsblock.service.controlplane import RemoteControlPlane
    from test_service_server import REGION
    return RemoteControlPlane(srv.url, cred["accessKeyId"], cred["secretAccessKey"],
                              cred["connectorId"], region=REGION, source_kind="datastore", **kw)


def test_https_is_tls_1_2_or_later_and_a_stalled_handshake_holds_up_no_one(tls_server):
    import socket
    import ssl
    srv, ca, cred = tls_server
    assert srv.url.startswith("https://")
    host, port = srv.server_address[:2]
    stalled = socket.create_connection((host, port))        # never says hello
    try:
        cp = control_plane(srv, cred, ca_bundle=str(ca))
        answer = cp.call("RegisterConnector", sourceKind="datastore", vmManagerName="ds",
                         vmManagerType="VSPHERE", vmManagerId="ds-1")
        assert answer["connector"]["connectorId"] == cred["connectorId"]
        ctx = ssl.create_default_context(cafile=str(ca))
        with ctx.wrap_socket(socket.create_connection((host, port)),
                             server_hostname="127.0.0.1") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(ca))
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(socket.create_connection((host, port)), server_hostname="127.0.0.1")
        # the web console is served over the same HTTPS
        import urllib.request
        page = urllib.request.urlopen(srv.url + "/", context=ctx, timeout=10)
        assert page.status == 200 and b"<html" in page.read().lower()
        # an unverified certificate: refused (system CAs), unless --insecure
        from smsblock.errors import ConnectorError
        with pytest.raises(ConnectorError, match="certificate verify failed"):
            control_plane(srv, cred).heartbeat({})
        assert control_plane(srv, cred, insecure=True).heartbeat({})["associated"]
    finally:
        stalled.close()


def test_the_proxy_settings_apply_to_the_control_plane(tls_server, monkeypatch):
    from smsblock.errors import ConnectorError
    srv, ca, cred = tls_server
    for k in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")       # nothing listens there
    with pytest.raises(ConnectorError, match="cannot be reached"):
        control_plane(srv, cred, ca_bundle=str(ca), retry=RetryPolicy(2, 1.0)).heartbeat({})
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert control_plane(srv, cred, ca_bundle=str(ca)).heartbeat({}) == \
        {"associated": False, "lost": []}


def test_a_busy_control_plane_is_asked_again_not_failed(tmp_path):
    """503 and 429 (a control plane at its connection limit, a burst) are retried with
    backoff: the connector's call succeeds once the control plane answers, and a control
    plane that stays busy past the retry budget is one clear ConnectorError."""
    from fault_proxy import FaultProxy, Rule
    from smsblock.errors import ConnectorError
    from smsblock.service.fleet import Fleet as FleetOps
    from test_service_server import serving
    with serving(tmp_path) as srv:
        cred = FleetOps(srv.service.state, srv.service.clock).create_credential(
            str(tmp_path / "store"))
        proxy = FaultProxy(srv.server_address[:2]).start()
        try:
            via_proxy = type("Via", (), {"url": proxy.url})
            cp = control_plane(via_proxy, cred,
                               retry=RetryPolicy(8, 30.0, base_delay=0.05, max_delay=0.2))
            proxy.rules = [Rule("status", status=503, times=3), Rule("status", status=429, times=2)]
            assert cp.heartbeat({}) == {"associated": False, "lost": []}
            assert [r.status for r in proxy.log] == [503] * 3 + [429] * 2 + [200]
            assert cp.retry.retries == 5
            proxy.rules = [Rule("status", status=503, times=-1)]
            cp = control_plane(via_proxy, cred,
                               retry=RetryPolicy(3, 30.0, base_delay=0.05, max_delay=0.2))
            with pytest.raises(ConnectorError, match=r"gave up after 3 attempts.*busy"):
                cp.heartbeat({})
        finally:
            proxy.stop()


def test_serve_tls_options_are_checked(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), SMSBLOCK_ACCESS_KEY_ID=AKID,
               SMSBLOCK_SECRET_ACCESS_KEY=SECRET)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for args, says in ((["--tls-cert", tmp_path / "junk.pem"], "go together"),
                       (["--tls-cert", tmp_path / "junk.pem", "--tls-key", tmp_path / "junk.pem"],
                        "not a certificate chain"),
                       (["--tls-cert", tmp_path / "nope.pem", "--tls-key", tmp_path / "nope.pem"],
                        "no such file")):
        out = smsblock(env, "serve", "--state", tmp_path / "state", "--port", "0", *args,
                       check=False, timeout=60)
        assert out.returncode != 0 and says in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_remote_connectors_of_one_datastore_share_its_runs_each_run_once(
        tmp_path, aws_env, bucket):
    """Three remote connectors on one datastore, started at once over HTTPS against six
    due runs: every run is executed by exactly one of them (claim 1 of each run, each
    run in exactly one connector's output)."""
    ds = tmp_path / "ds"
    for i in range(6):
        make_vm(ds, f"vm{i}", f"vm{i}", disks=(("scsi0:0", 65536),))
    fleet = Fleet(tmp_path, aws_env, bucket)
    names = ["conn-a", "conn-b", "conn-c"]
    try:
        for name in names:
            fleet.register(name, ds, "--ca-bundle", fleet.ca)
            fleet.run_once(name)                       # uploads its catalog
        fleet.sms("import-server-catalog")
        runs = []
        for server in fleet.sms("get-servers")["serverList"]:
            job = fleet.sms("create-replication-job", "--server-id", server["serverId"],
                            "--seed-replication-time", str(int(time.time()) + 10 * 86400),
                            "--frequency", "12")["replicationJobId"]
            runs.append(fleet.sms("start-on-demand-replication-run", "--replication-job-id",
                                  job)["replicationRunId"])
        assert len(runs) == 6
        procs = [subprocess.Popen([sys.executable, "-m", "smsblock", "connector", "run",
                                   "--connector-dir", str(tmp_path / n), "--once"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env=fleet.env) for n in names]
        outputs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
        executed = [r for out in outputs for key in ("completed", "failed")
                    for r in out[key]]
        assert sorted(executed) == sorted(runs), outputs     # each once, none left
        for run in runs:
            row = run_row(fleet, run)
            assert row["fence"] == 1 and row["state"] in ("COMPLETED", "FAILED"), row
    finally:
        fleet.close()
