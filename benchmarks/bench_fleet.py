"""Fleet load benchmark (issue 14, outcome 6), loopback only, bounded in time.

One PostgreSQL (tests/postgres_server.py), two ``smsblock serve`` processes on it (plain
HTTP on 127.0.0.1: TLS is covered by tests/test_fleet_remote.py and left out here so
that the figures are the control plane's, not the handshakes'), an S3 endpoint (moto in
server mode, tests/moto_server.py) as the fleet's store, two datastore folders of
``SMSBLOCK_BENCH_FLEET_SERVERS`` / 2 VMs each (default 500 in all: tiny raw disks of a
few hundred KiB, written here), four remote connectors (real ``smsblock connector run``
processes, each registered with its own credential: two per datastore, through
different ``serve`` processes) and 50 replication jobs.

The jobs' first runs come from both sources of runs: half from the scheduler (a seed
time a few seconds ahead; the connectors' passes make the due runs), half on demand.
Once the first run of one of 10 jobs is done it gets a second, incremental, on-demand run, asked of
both ``serve`` processes at once (exactly one is accepted); a job that then has two
on-demand runs in 24 hours is refused a third.  A 51st ``CreateReplicationJob``
(several at once, on both processes, once 48 exist) must be refused.

Meanwhile a load generator sends GetConnectors, GetServers, GetReplicationJobs and
GetReplicationRuns at ``SMSBLOCK_BENCH_FLEET_RPS`` (default 50) requests per second,
alternating between the two processes (boto3, SigV4), on an open-loop schedule: a
request's latency counts from the time it was due, so a slow server cannot slow the
offered load down and hide its own latency.

Checked: every run ends COMPLETED with claim 1 (executed once: a second claim would
add to its fence) and none is left over; the store's manifests are exactly the runs'
(one stored run per completed run and server, none extra); the limits; the latency
targets (p50 <= 20 ms, p99 <= 100 ms: reported, and asserted only with
``SMSBLOCK_BENCH_FLEET_STRICT=1``, since the machine is shared); throughput; the
``serve`` processes' peak RSS (VmHWM).  A hard deadline (``SMSBLOCK_BENCH_FLEET_DEADLINE``,
600 s) fails the benchmark with a clear message if it is exceeded.

    python3 -m pytest benchmarks/bench_fleet.py --benchmark-only -p no:xdist -s
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from moto_server import MotoServer  # noqa: E402
from postgres_server import PostgresServer, postgres_binaries  # noqa: E402

SERVERS = int(os.environ.get("SMSBLOCK_BENCH_FLEET_SERVERS", "500"))
JOBS = 50
SECOND_RUNS = 10        # jobs that get a second (incremental, on-demand) run
RACE_EXTRA = 4          # bootable VMs beyond JOBS: the last 2 jobs are raced for by 6 VMs
CONNECTORS = 4
RPS = float(os.environ.get("SMSBLOCK_BENCH_FLEET_RPS", "50"))
LOAD_SECONDS = float(os.environ.get("SMSBLOCK_BENCH_FLEET_LOAD_SECONDS", "60"))
DEADLINE = float(os.environ.get("SMSBLOCK_BENCH_FLEET_DEADLINE", "600"))
STRICT = os.environ.get("SMSBLOCK_BENCH_FLEET_STRICT", "") not in ("", "0")
TARGET_P50, TARGET_P99 = 0.020, 0.100
AKID, SECRET = "AKIDBENCHOPERATOR", "bench-operator-secret"
REGION = "us-east-1"
KIB = 1024


class DeadlineExceeded(Exception):
    pass


def _alarm(*_):
    raise DeadlineExceeded(f"bench_fleet: the hard deadline of {DEADLINE:.0f} s was exceeded "
                           "(set SMSBLOCK_BENCH_FLEET_DEADLINE to change it)")


# --- the datastores ---------------------------------------------------------------------------

def write_vm(folder: Path, name: str, disk: bytes | None, size: int, rng: random.Random) -> None:
    """A VM folder: a .vmx and one raw disk (``disk`` if given, else ``size`` bytes of
    which a few scattered 4 KiB blocks are random: a tiny, real, distinct disk)."""
    folder.mkdir(parents=True)
    img = folder / f"{folder.name}.img"
    with open(img, "wb") as f:
        if disk is not None:
            f.write(disk)
        else:
            f.truncate(size)
            for off in range(0, size, 64 * KIB):
                f.seek(off)
                f.write(rng.randbytes(4 * KIB))
    (folder / f"{folder.name}.vmx").write_text(
        f'.encoding = "UTF-8"\ndisplayName = "{name}"\nguestOS = "ubuntu-64"\n'
        f'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "{img.name}"\n')


def make_datastores(tmp: Path, boot: bytes) -> tuple[list[Path], list[str]]:
    """Two datastore folders of SERVERS/2 VMs; the first (JOBS + RACE_EXTRA)/2 of each
    (named job-*) have a bootable disk (so the image step succeeds), each made distinct by
    256 KiB of random data after its partition; the others a 256 KiB raw disk."""
    rng = random.Random(14)
    stores, job_vms = [], []
    for d in range(2):
        ds = tmp / f"ds{d}"
        for i in range(SERVERS // 2):
            if i < (JOBS + RACE_EXTRA) // 2:
                name = f"job-{d}-{i:03d}"
                disk = bytearray(boot)
                disk[-(512 * KIB):-(256 * KIB)] = rng.randbytes(256 * KIB)
                write_vm(ds / "DC1" / name, name, bytes(disk), 0, rng)
                job_vms.append(name)
            else:
                name = f"vm-{d}-{i:03d}"
                write_vm(ds / "DC1" / f"rack{i % 10}" / name, name, None, 256 * KIB, rng)
        stores.append(ds)
    return stores, job_vms


# --- processes --------------------------------------------------------------------------------

class Serve:
    """``smsblock serve --state postgresql://...`` on a free loopback port."""

    def __init__(self, env: dict, url: str, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smsblock", "serve", "--state", url, "--host", "127.0.0.1",
             "--port", "0"], stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on http://" not in line:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r}; see {log}")
        self.url = line.split("listening on ")[1].split()[0]

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


def smsblock(env, *args, timeout=120) -> str:
    proc = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"smsblock {args[:3]} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def sms_client(endpoint: str):
    import boto3
    from botocore.config import Config
    # a session of its own: it reads AWS_DATA_PATH (the SMS model) when made
    return boto3.session.Session().client("sms", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=AKID, aws_secret_access_key=SECRET,
                        config=Config(retries={"total_max_attempts": 1},
                                      max_pool_connections=4, read_timeout=30))


def error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)


# --- the load generator ----------------------------------------------------------------------

OPERATIONS = ("get_connectors", "get_servers", "get_replication_jobs", "get_replication_runs")


class LoadGenerator:
    """Open-loop Get* requests at RPS, alternating between the endpoints; a request's
    latency is measured from the time it was due (so queueing on our side counts)."""

    def __init__(self, endpoints: list[str], job_ids: list[str], workers: int = 8):
        # at most ``workers`` connections per serve process: on loopback every client has
        # the same address, and serve takes 16 connections per address (the connectors
        # need some of them)
        self.endpoints = endpoints
        self.job_ids = job_ids
        self.local = threading.local()
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="load")
        self.stop = threading.Event()
        self.results: list[tuple[str, float, float, str | None]] = []   # op, latency, service, error
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._schedule, daemon=True)
        self.submitted: list = []          # futures of the requests offered

    def _client(self, endpoint: str):
        clients = getattr(self.local, "clients", None)
        if clients is None:
            clients = self.local.clients = {e: sms_client(e) for e in self.endpoints}
        return clients[endpoint]

    def _one(self, n: int, due: float) -> None:
        op = OPERATIONS[n % len(OPERATIONS)]
        client = self._client(self.endpoints[n % len(self.endpoints)])
        kwargs = {"replicationJobId": self.job_ids[n % len(self.job_ids)]} \
            if op == "get_replication_runs" else {}
        start = time.monotonic()
        err = None
        try:
            getattr(client, op)(**kwargs)
        except Exception as e:       # counted, not raised: the load goes on
            err = error_code(e)
        end = time.monotonic()
        with self.lock:
            self.results.append((op, end - due, end - start, err))

    def _schedule(self) -> None:
        t0 = time.monotonic()
        n = 0
        while not self.stop.is_set():
            due = t0 + n / RPS
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.submitted.append(self.pool.submit(self._one, n, due))
            n += 1
        self.offered_seconds = time.monotonic() - t0

    def start(self) -> None:
        # connections and model loading outside the measure, in every worker thread (each
        # has its own clients: making 16 of them inside the measure was a ~3 s stall of
        # the generator itself, p99 2.9 s); the barrier puts one warm-up on each thread
        barrier = threading.Barrier(self.workers)

        def warm() -> None:
            for e in self.endpoints:
                for _ in range(2):
                    self._client(e).get_connectors()
            barrier.wait(60)
        for f in [self.pool.submit(warm) for _ in range(self.workers)]:
            f.result()
        self.thread.start()

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        # requests still queued (the servers could not keep up) are not sent: cancelled
        # here, and counted
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.unsent = sum(f.cancelled() for f in self.submitted)
        return self.offered_seconds


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))] if s else float("nan")


# --- the benchmark ---------------------------------------------------------------------------

def test_fleet_load(benchmark, tmp_path):
    benchmark.pedantic(lambda: run_fleet(tmp_path, benchmark.extra_info), rounds=1, iterations=1)


def run_fleet(tmp: Path, info: dict) -> None:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(DEADLINE))
    started = time.monotonic()
    pg = moto = None
    serves: list[Serve] = []
    connectors: list[subprocess.Popen] = []
    os.environ["AWS_DATA_PATH"] = str(ROOT.parent / "shared" / "aws-models")
    try:
        pg = PostgresServer(postgres_binaries())
        url = pg.new_database()
        moto = MotoServer().start()
        bucket = f"smsblock-{uuid.uuid4().hex[:12]}"
        moto.boto3_client("s3").create_bucket(Bucket=bucket)
        home = tmp / "home"
        home.mkdir(mode=0o700)
        env = dict(os.environ, **moto.client_env(), PYTHONPATH=str(ROOT),
                   SMSBLOCK_HOME=str(home), SMSBLOCK_CONFIG=str(tmp / "config.toml"),
                   AWS_CONFIG_FILE=str(tmp / "aws-config"),
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-credentials"),
                   NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            env.pop(k, None)
        (tmp / "config.toml").write_text("")
        # one bootable disk (the image step's), copied and made distinct per job VM
        from test_service_sources import bootable_image
        boot = bootable_image(tmp / "boot").read_bytes()
        t = time.monotonic()
        datastores, _ = make_datastores(tmp, boot)
        say("datastores made")
        info["setup_datastores_s"] = round(time.monotonic() - t, 1)

        serve_env = dict(env, SMSBLOCK_ACCESS_KEY_ID=AKID, SMSBLOCK_SECRET_ACCESS_KEY=SECRET)
        serves = [Serve(serve_env, url, tmp / f"serve{i}.log") for i in range(2)]
        endpoints = [s.url for s in serves]

        # four connectors, each with its own credential: two per datastore (sharing its
        # runs and its store), registered through different serve processes
        names = [f"conn{i}" for i in range(CONNECTORS)]
        for i, name in enumerate(names):
            store = f"s3://{bucket}/ds{i % 2}"
            cred = smsblock(env, "connector", "credential", "create", "--state", url,
                            "--store", store, "--description", name)
            path = tmp / f"{name}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(cred)
            smsblock(env, "connector", "register", "--endpoint", endpoints[i // 2],
                     "--credentials-file", path, "--datastore", datastores[i % 2],
                     "--connector-dir", tmp / name)
        for i, name in enumerate(names):
            cenv = dict(env, SMSBLOCK_S3_STAGING_DIR=str(tmp / f"staging-{name}"))
            log = open(tmp / f"{name}.log", "w")
            connectors.append(subprocess.Popen(
                [sys.executable, "-m", "smsblock", "connector", "run", "--connector-dir",
                 str(tmp / name), "--poll-interval", "0.5", "--heartbeat-interval", "2"],
                stdout=subprocess.DEVNULL, stderr=log, env=cenv))
            log.close()

        say("connectors started")
        ops = [sms_client(e) for e in endpoints]
        servers = wait_for_catalog(ops[0], connectors)
        info["setup_s"] = round(time.monotonic() - started, 1)
        say(f"catalog imported: {len(servers)} servers")

        # 50 jobs: half scheduled a few seconds ahead, half with an on-demand run now
        by_name = {s["vmServer"]["vmName"]: s["serverId"] for s in servers}
        job_servers = sorted(v for k, v in by_name.items() if k.startswith("job-"))
        assert len(job_servers) == JOBS + RACE_EXTRA, len(job_servers)
        spare = sorted(v for k, v in by_name.items() if not k.startswith("job-"))
        jobs: dict[str, str] = {}        # job id -> how its first run came
        now = time.time()
        for i, server in enumerate(job_servers[:JOBS - 2]):
            scheduled = i % 2 == 0
            seed = now + 15 if scheduled else now + 10 * 86400
            job = ops[i % 2].create_replication_job(
                serverId=server, seedReplicationTime=seed, frequency=12)["replicationJobId"]
            jobs[job] = "scheduled" if scheduled else "on-demand"
        # the last ones race: 6 creates at once on both processes, 2 may succeed; every
        # racer is bootable, since any two may win and their runs make images (a raw
        # spare winning failed its run's image step: the benchmark failed by chance)
        racers = job_servers[JOBS - 2:]
        with ThreadPoolExecutor(len(racers)) as pool:
            outcomes = list(pool.map(lambda a: try_call(
                ops[a[0] % 2].create_replication_job, serverId=a[1],
                seedReplicationTime=now + 10 * 86400, frequency=12), enumerate(racers)))
        won = [o["replicationJobId"] for o in outcomes if isinstance(o, dict)]
        refused = [o for o in outcomes if not isinstance(o, dict)]
        assert len(won) == 2 and len(refused) == len(racers) - 2, outcomes
        assert all(r == "OperationNotPermittedException" for r in refused), refused
        for job in won:
            jobs[job] = "on-demand"
        # ... and once 50 exist, a 51st is refused by either process
        for op in ops:
            assert try_call(op.create_replication_job, serverId=spare[5],
                            seedReplicationTime=now + 86400, frequency=12) == \
                "OperationNotPermittedException"
        info["limit_51st_job_refused"] = True
        for i, (job, how) in enumerate(jobs.items()):
            if how == "on-demand":
                ops[i % 2].start_on_demand_replication_run(replicationJobId=job)

        # the load, while the runs go on
        load = LoadGenerator(endpoints, list(jobs))
        load.start()
        say("jobs made; load started")
        t_runs = time.monotonic()
        second = set(list(jobs)[:SECOND_RUNS])
        second_done: set[str] = set()
        limit_refused: set[str] = set()
        try:
            while True:
                runs = {job: ops[0].get_replication_runs(replicationJobId=job)[
                    "replicationRunList"] for job in jobs}
                for job, rl in runs.items():
                    failed = [r for r in rl if r["state"] in ("FAILED", "MISSED")]
                    assert not failed, f"job {job}: {failed[0].get('statusMessage')}"
                    done = [r for r in rl if r["state"] == "COMPLETED"]
                    if len(rl) == 1 and len(done) == 1 and job in second and \
                            job not in second_done:
                        # the second run: asked of both processes at once, one wins
                        with ThreadPoolExecutor(2) as pool:
                            got = list(pool.map(lambda op: try_call(
                                op.start_on_demand_replication_run, replicationJobId=job), ops))
                        assert sum(isinstance(g, dict) for g in got) == 1, got
                        second_done.add(job)
                    elif len(rl) == 2 and len(done) == 2 and jobs[job] == "on-demand" \
                            and job not in limit_refused:
                        assert try_call(ops[1].start_on_demand_replication_run,
                                        replicationJobId=job) == \
                            "ReplicationRunLimitExceededException"
                        limit_refused.add(job)
                finished = sum(1 for job, rl in runs.items()
                               if len(rl) == (2 if job in second else 1) and
                               all(r["state"] == "COMPLETED" for r in rl) and
                               (jobs[job] == "scheduled" or job not in second or
                                job in limit_refused))
                for c in connectors:
                    assert c.poll() is None, f"a connector exited ({c.returncode})"
                say(f"{finished} jobs with all their runs done")
                if finished == len(jobs) and time.monotonic() - t_runs >= LOAD_SECONDS:
                    break
                time.sleep(1)
        finally:
            offered = load.finish()
            say("load stopped")
        runs_seconds = time.monotonic() - t_runs
        info["load_avg_at_end"] = os.getloadavg()

        # the stores are read here with the connectors' S3 settings (moto's)
        saved = {k: os.environ.get(k) for k in moto.client_env()}
        os.environ.update(moto.client_env())
        try:
            check_runs_once(url, bucket, jobs, second, info)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        info["on_demand_limit_refused_jobs"] = len(limit_refused)
        info["runs_wall_s"] = round(runs_seconds, 1)
        info["runs_per_minute"] = round(info["runs"] / runs_seconds * 60, 1)
        info["serve_peak_rss_mib"] = [round(s.peak_rss() / (1 << 20), 1) for s in serves]
        report_latency(load, offered, info)
        info["total_s"] = round(time.monotonic() - started, 1)
        say("figures: " + json.dumps(info))
        if STRICT:
            assert info["get_p50_ms"] <= TARGET_P50 * 1000 and \
                info["get_p99_ms"] <= TARGET_P99 * 1000, info
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for c in connectors:
            if c.poll() is None:
                c.terminate()
        for c in connectors:
            try:
                c.wait(15)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        for s in serves:
            s.stop()
        if moto is not None:
            moto.stop()
        if pg is not None:
            pg.stop()


def say(what: str) -> None:
    print(f"bench_fleet {time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def try_call(fn, **kwargs):
    """The answer, or the error code of a refusal."""
    try:
        return fn(**kwargs)
    except Exception as e:
        return error_code(e)


def wait_for_catalog(op, connectors) -> list[dict]:
    """Until the connectors have uploaded their VMs and ImportServerCatalog has all."""
    while True:
        for c in connectors:
            assert c.poll() is None, f"a connector exited ({c.returncode})"
        healthy = [c for c in op.get_connectors()["connectorList"] if c["status"] == "HEALTHY"]
        if len(healthy) == CONNECTORS:
            op.import_server_catalog()
            servers = []
            kwargs = {}
            while True:
                page = op.get_servers(**kwargs)
                servers += page["serverList"]
                if not page.get("nextToken"):
                    break
                kwargs = {"nextToken": page["nextToken"]}
            if len(servers) >= SERVERS:
                assert len(servers) == SERVERS, len(servers)
                return servers
        time.sleep(1)


def check_runs_once(url: str, bucket: str, jobs: dict, second: set, info: dict) -> None:
    """Every run COMPLETED on its first claim, none left over, and the stores' manifests
    are exactly the runs' stored runs (one per completed run, none extra)."""
    import psycopg
    from psycopg.rows import dict_row
    from smsblock.store import open_store
    with psycopg.connect(url, row_factory=dict_row) as db:
        rows = db.execute("SELECT r.run_id, r.job_id, r.type, r.state, r.fence, r.summary, "
                          "j.server_id FROM runs r JOIN jobs j ON j.job_id = r.job_id").fetchall()
    assert {r["job_id"] for r in rows} == set(jobs)
    bad = [r for r in rows if r["state"] != "COMPLETED" or r["fence"] != 1]
    assert not bad, bad
    per_job = {}
    for r in rows:
        per_job.setdefault(r["job_id"], []).append(r)
    assert all(len(v) == (2 if k in second else 1) for k, v in per_job.items()), \
        {k: len(v) for k, v in per_job.items()}
    automatic = sum(r["type"] == "AUTOMATIC" for r in rows)
    assert automatic == sum(how == "scheduled" for how in jobs.values()), automatic
    expected: dict[str, set[str]] = {}
    for r in rows:
        summary = json.loads(r["summary"])
        for disk in summary["disks"]:
            expected.setdefault(r["server_id"], set()).add(disk["run_id"])
    stored: dict[str, list[str]] = {}
    for d in range(2):
        store = open_store(f"s3://{bucket}/ds{d}")
        for server in store.list_servers():
            stored[server] = list(store.list_run_ids(server))
    assert {k: sorted(v) for k, v in stored.items()} == \
        {k: sorted(v) for k, v in expected.items()}, (stored, expected)
    info["runs"] = len(rows)
    info["runs_automatic"] = automatic
    info["runs_executed_once"] = True
    info["store_manifests"] = sum(len(v) for v in stored.values())


def report_latency(load: LoadGenerator, offered: float, info: dict) -> None:
    results = load.results
    ok = [r for r in results if r[3] is None]
    errors = {}
    for r in results:
        if r[3] is not None:
            errors[r[3]] = errors.get(r[3], 0) + 1
    lat = [r[1] for r in ok]
    info["get_requests"] = len(results)
    info["get_unsent_at_end"] = load.unsent
    info["get_errors"] = errors
    info["get_offered_rps"] = RPS
    info["get_throughput_rps"] = round(len(ok) / offered, 1)
    info["get_p50_ms"] = round(percentile(lat, 50) * 1000, 1)
    info["get_p99_ms"] = round(percentile(lat, 99) * 1000, 1)
    info["get_max_ms"] = round(max(lat) * 1000, 1) if lat else None
    info["get_service_p50_ms"] = round(percentile([r[2] for r in ok], 50) * 1000, 1)
    for op in OPERATIONS:
        mine = [r[1] for r in ok if r[0] == op]
        info[f"{op}_p50_p99_ms"] = (round(percentile(mine, 50) * 1000, 1),
                                    round(percentile(mine, 99) * 1000, 1))
    info["targets_met"] = info["get_p50_ms"] <= TARGET_P50 * 1000 and \
        info["get_p99_ms"] <= TARGET_P99 * 1000
