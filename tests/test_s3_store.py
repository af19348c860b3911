"""S3Store against moto in server mode (real HTTP + SigV4 through boto3), directly and
through a fault-injecting proxy: every store command through the API and the CLI, layout,
multipart with bounded memory, retries, permanent errors, SIGKILL resume, prune of
incomplete uploads, the lock, settings (env, config file, URL, proxy, CA bundle, verify)."""

from __future__ import annotations

import json
import re
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cloud_fixtures import *  # noqa: F401,F403  (fixtures)
from cloud_fixtures import FAST, make_tls_cert
from fault_proxy import FaultProxy, Rule

from smsblock.errors import PermanentStoreError, StoreLockedError, TransientStoreError, UsageError
from smsblock.engine import prune, replicate, restore, verify
from smsblock.store import StoreConfig, open_store
from smsblock.store.s3 import S3Store
from smsblock.store.s3config import CloudSettings
from smsblock.store.throttle import ThrottledBody, TokenBucket

ROOT = Path(__file__).resolve().parent.parent
BS = 64 << 10
N_BLOCKS = 32                     # a 2 MiB disk
PACK_SIZE = 256 << 10             # ~8 compressed blocks a pack: multipart (parts of 64K)

pytestmark = pytest.mark.timeout(120)


def make_disk(path: Path, seed: int, base: bytes | None = None, change: int = 8) -> bytes:
    """Compressible random data with two zero blocks; with ``base``, ``change`` blocks
    rewritten and one block zeroed."""
    rng = np.random.default_rng(seed)
    if base is None:
        data = rng.integers(0, 16, N_BLOCKS * BS, dtype=np.uint8)
        data[3 * BS:5 * BS] = 0
    else:
        data = np.frombuffer(base, np.uint8).copy()
        for i in rng.choice(N_BLOCKS, change, replace=False):
            data[i * BS:(i + 1) * BS] = rng.integers(0, 16, BS, dtype=np.uint8)
        data[10 * BS:11 * BS] = 0
    raw = data.tobytes()
    path.write_bytes(raw)
    return raw


def new_store(url: str, **kw) -> S3Store:
    store = S3Store(url, **{**FAST, **kw})
    return store


def keys(moto, bucket: str, prefix: str = "") -> list[str]:
    s3 = moto.boto3_client("s3")
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    for k, v in FAST.items():
        full_env.setdefault(f"SMSBLOCK_S3_{k.upper()}", str(v))
    proc = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"smsblock {' '.join(map(str, args))}: {proc.returncode}\n{proc.stderr}")
    return proc


# --- every command, API and CLI ------------------------------------------------------

def test_api_every_command_and_layout(tmp_path, moto, bucket):
    url = f"s3://{bucket}/stores/api"
    store = new_store(url)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "disk.raw"
    contents = [make_disk(disk, 1)]
    s1 = replicate(disk, store, "web-1", block_size=BS)
    contents.append(make_disk(disk, 2, contents[0]))
    s2 = replicate(disk, store, "web-1")
    assert s1.blocks_stored == N_BLOCKS - 2 and s2.blocks_stored <= 8
    # the layout: config, packs under their content ids, one manifest per run; nothing else
    ks = keys(moto, bucket, "stores/api/")
    assert "stores/api/config.json" in ks
    packs = [k for k in ks if k.startswith("stores/api/packs/")]
    assert packs and all(k.split("/")[-1][:2] == k.split("/")[-2] and k.endswith(".pack") for k in packs)
    assert sorted(k for k in ks if "/runs/" in k) == [
        f"stores/api/runs/web-1/{s.run_id}.manifest" for s in (s1, s2)]
    assert not [k for k in ks if "/locks/" in k], "lock objects are released"
    assert set(ks) == {"stores/api/config.json", *packs, *(k for k in ks if "/runs/" in k)}

    fresh = open_store(url)              # environment settings only: a second client
    runs = fresh.runs("web-1")
    assert [r.run_id for r in runs] == [s1.run_id, s2.run_id]
    for r, content in zip(runs, contents):
        out = tmp_path / f"{r.run_id}.raw"
        restore(fresh, "web-1", out, run_id=r.run_id)
        assert out.read_bytes() == content
        assert fresh.run_disk("web-1", r.run_id).read(0, N_BLOCKS * BS) == content
    report = verify(fresh)
    assert report.ok, report.problems
    assert report.packs_checked == len(packs) and report.leftovers == []
    pr = prune(fresh, "web-1", 1)
    assert pr.runs_deleted == [s1.run_id]
    assert verify(open_store(url)).ok
    out = tmp_path / "after-prune.raw"
    restore(open_store(url), "web-1", out)
    assert out.read_bytes() == contents[1]


def test_cli_every_command(tmp_path, moto, bucket):
    url = f"s3://{bucket}/cli"
    disk = tmp_path / "disk.raw"
    first = make_disk(disk, 3)
    s1 = json.loads(cli("replicate", disk, "--store", url, "--server", "db", "--create", "--block-size", "64K",
                        "--json").stdout)
    second = make_disk(disk, 4, first)
    s2 = json.loads(cli("replicate", disk, "--store", url, "--server", "db", "--json").stdout)
    assert s1["blocks_stored"] == N_BLOCKS - 2 and 0 < s2["blocks_stored"] <= 8
    runs = json.loads(cli("runs", "--store", url, "--server", "db", "--json").stdout)
    assert [r["run_id"] for r in runs["runs"]] == [s1["run_id"], s2["run_id"]]
    out = tmp_path / "out.raw"
    cli("restore", "--store", url, "--server", "db", "--run", s1["run_id"], "-o", out)
    assert out.read_bytes() == first
    cli("restore", "--store", url, "--server", "db", "-o", out)
    assert out.read_bytes() == second
    v = json.loads(cli("verify", "--store", url, "--json").stdout)
    assert v["ok"] and v["runs_checked"] == 2
    p = json.loads(cli("prune", "--store", url, "--server", "db", "--keep", "1", "--json").stdout)
    assert p["runs_deleted"] == [s1["run_id"]]
    assert json.loads(cli("verify", "--store", url, "--json").stdout)["ok"]
    # a store that is not there: one line, non-zero
    r = cli("runs", "--store", f"s3://{bucket}/nothing", "--server", "db", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "no smsblock store" in r.stderr


# --- uploads: multipart, parallel, bounded memory, idempotent --------------------------

def test_multipart_parts_carry_md5_and_memory_stays_bounded(tmp_path, bucket, fault_proxy):
    store = new_store(f"s3://{bucket}/mp", endpoint_url=fault_proxy.url, parallel=3)
    store.initialise()
    pack = tmp_path / "big.pack.tmp"
    payload = np.random.default_rng(5).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    pack.write_bytes(payload)
    pack_id = "ab" + "0" * 62
    fault_proxy.clear()
    tracemalloc.start()
    store.put_pack(pack_id, str(pack))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 64 parts of 64 KiB, 3 at a time: the pack is never held whole
    assert peak < 2 << 20, f"peak {peak} bytes while uploading a 4 MiB pack"
    parts = fault_proxy.requests("PUT", r"partNumber=")
    assert len(parts) == 64
    assert fault_proxy.max_concurrency("PUT", r"partNumber=") in (2, 3)     # parallel, bounded
    assert all("content-md5" in r.headers for r in parts)
    assert len(fault_proxy.requests("POST", r"\?uploads")) == 1
    assert store.read_pack(pack_id, 0, len(payload)) == payload
    assert store.read_pack(pack_id, len(payload) - 10, 100) == payload[-10:]
    assert store.read_pack(pack_id, len(payload) + 5, 10) == b""
    assert not pack.exists()
    # the same id again (a retried or resumed run): a HEAD, nothing sent
    pack.write_bytes(payload)
    fault_proxy.clear()
    store.put_pack(pack_id, str(pack))
    assert [r.method for r in fault_proxy.log] == ["HEAD"]


def test_bandwidth_cap_paces_uploads(bucket):
    bucket_limit = TokenBucket(1 << 20, burst=64 << 10)
    body = ThrottledBody(bytes(512 << 10), bucket_limit)
    t0 = time.monotonic()
    while body.read(8192):
        pass
    first = time.monotonic() - t0
    body.seek(0)                 # a rewind (botocore hashing the payload) costs nothing
    t0 = time.monotonic()
    assert len(body.read()) == 512 << 10
    assert time.monotonic() - t0 < 0.3
    assert 0.35 < first < 5, first          # 448 KiB beyond the burst at 1 MiB/s
    store = new_store(f"s3://{bucket}/bw", bandwidth="1M")
    store.initialise()
    t0 = time.monotonic()
    store.backend.put("blob", bytes(768 << 10))      # through the backend: the one cap
    assert time.monotonic() - t0 > 0.5


# --- faults -------------------------------------------------------------------------

def test_transient_faults_are_retried_and_logged(tmp_path, bucket, fault_proxy, caplog):
    url = f"s3://{bucket}/faults"
    store = new_store(url, endpoint_url=fault_proxy.url, read_timeout=1)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "disk.raw"
    content = make_disk(disk, 7)
    fault_proxy.add(
        Rule("status", method="PUT", path=r"partNumber=2\b", status=503, code="SlowDown"),
        Rule("reset", method="PUT", path=r"partNumber=3\b"),
        Rule("status", method="POST", path=r"uploadId=", status=500, code="InternalError"),
        Rule("stall", method="PUT", path=r"/runs/", stall=3),
        Rule("status", method="GET", path=r"/config\.json", status=503, code="ServiceUnavailable"))
    with caplog.at_level(logging.WARNING, logger="smsblock.store.retry"):
        replicate(disk, store, "s1", block_size=BS)
        fault_proxy.add(Rule("cut", method="GET", path=r"/packs/", skip=3, times=2),
                        Rule("reset", method="GET", path=r"list-type=2", times=1))
        out = tmp_path / "out.raw"
        restore(store, "s1", out)
    assert out.read_bytes() == content
    fired = [(r.fault, r.method, r.path[-60:]) for r in fault_proxy.faults()]
    assert len(fired) == 8, "\n".join(map(str, fired))
    text = caplog.text
    assert "SlowDown (HTTP 503)" in text and "upload part 2 of" in text and "upload part 3 of" in text
    assert "complete multipart upload of" in text and "InternalError" in text
    assert "publish manifest" in text and "timeout" in text.lower()
    assert "read the store config" in text
    assert "read " in text and "bytes at" in text          # a cut GET of a pack range
    assert verify(open_store(url)).ok


def test_retry_budget_is_bounded(tmp_path, bucket, fault_proxy):
    store = new_store(f"s3://{bucket}/budget", endpoint_url=fault_proxy.url, retry_attempts=3)
    store.initialise()
    fault_proxy.clear()
    fault_proxy.add(Rule("status", method="PUT", status=503, code="SlowDown", times=-1))
    with pytest.raises(TransientStoreError, match=r"publish manifest.*gave up after 3 attempts.*SlowDown"):
        store.put_manifest_bytes("s", "r-20260101T000000.000000Z-00000000", b"x")
    assert len(fault_proxy.requests("PUT")) == 3


@pytest.mark.parametrize("code,status", [("AccessDenied", 403), ("InvalidAccessKeyId", 403),
                                         ("SignatureDoesNotMatch", 403)])
def test_permanent_errors_fail_fast_in_one_line(tmp_path, bucket, fault_proxy, code, status):
    fault_proxy.add(Rule("status", status=status, code=code, times=-1))
    disk = tmp_path / "disk.raw"
    make_disk(disk, 8)
    r = cli("replicate", disk, "--store", f"s3://{bucket}/perm", "--server", "x", "--create",
            env={"AWS_ENDPOINT_URL": fault_proxy.url}, check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and code in lines[0] and lines[0].startswith("smsblock: error:"), r.stderr
    assert len(fault_proxy.log) == 1, "no retry of a permanent error"


def test_missing_bucket_is_one_clear_line(tmp_path, moto, aws_env):
    disk = tmp_path / "disk.raw"
    make_disk(disk, 9)
    r = cli("replicate", disk, "--store", "s3://no-such-bucket-here/x", "--server", "x", "--create",
            check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "NoSuchBucket" in lines[0] and "create the bucket first" in lines[0], r.stderr
    with pytest.raises(PermanentStoreError, match="NoSuchBucket"):
        open_store("s3://no-such-bucket-here/x").exists()


def test_sigkill_resume_uploads_only_what_is_missing(tmp_path, moto, bucket):
    url = f"s3://{bucket}/kill"
    new_store(url).initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "disk.raw"
    content = make_disk(disk, 11)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SMSBLOCK_S3_BANDWIDTH="400K",
               **{f"SMSBLOCK_S3_{k.upper()}": str(v) for k, v in FAST.items()})
    proc = subprocess.Popen([sys.executable, "-m", "smsblock", "replicate", str(disk), "--store", url,
                             "--server", "k", "--block-size", "64K", "--json"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(new_store(url).list_packs()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = new_store(url)
    packs_before = store.list_packs()
    assert len(packs_before) >= 2 and store.list_run_ids("k") == []
    report = verify(store)
    assert report.ok and report.unreferenced_packs == len(packs_before)
    # packs the killed run had sealed but not (fully) uploaded are finished from staging
    # (the next replicate does this first; called here to count what it made visible)
    resumed = store.resume_staged_packs()
    packs_mid = store.list_packs()
    assert set(packs_mid) == set(packs_before) | set(resumed)
    stored_before = [bytes(e["address"]) for p, n in packs_mid.items() for e in store.pack_index(p, n)]
    summary = replicate(disk, store, "k", block_size=BS)
    data_blocks = N_BLOCKS - 2
    assert summary.blocks_stored == data_blocks - len(set(stored_before))
    after = store.list_packs()
    assert set(packs_mid) <= set(after)
    every = [bytes(e["address"]) for p, n in after.items() for e in store.pack_index(p, n)]
    assert len(every) == len(set(every)) == data_blocks, "each block stored once"
    out = tmp_path / "out.raw"
    restore(store, "k", out)
    assert out.read_bytes() == content
    # what the killed run left (an incomplete upload, staged files, its lock object) goes
    leftovers = verify(store).leftovers
    assert any(n.startswith("lock:") for n in leftovers), leftovers
    pr = prune(store, "k", 1)
    assert pr.leftovers_removed == len(leftovers)
    assert verify(new_store(url)).leftovers == []
    assert not moto.boto3_client("s3").list_multipart_uploads(Bucket=bucket, Prefix="kill/").get("Uploads")


def test_prune_aborts_incomplete_multipart_uploads_under_the_prefix(moto, bucket):
    url = f"s3://{bucket}/mine"
    store = new_store(url)
    store.initialise()
    s3 = moto.boto3_client("s3")
    ours = s3.create_multipart_upload(Bucket=bucket, Key="mine/packs/ab/ab.pack")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="mine/packs/ab/ab.pack", UploadId=ours, PartNumber=1,
                   Body=b"x" * 1000)
    theirs = s3.create_multipart_upload(Bucket=bucket, Key="other/file")["UploadId"]
    assert verify(store).leftovers == [f"multipart:mine/packs/ab/ab.pack?uploadId={ours}"]
    pr = prune(store, "nobody", 0)
    assert pr.leftovers_removed == 1 and pr.bytes_freed >= 1000
    left = [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == [theirs]


# --- the lock ------------------------------------------------------------------------

def test_lock_shared_and_exclusive_exclude_each_other(moto, bucket):
    url = f"s3://{bucket}/lock"
    a, b = new_store(url), new_store(url)
    a.initialise()
    with a.lock(False, "replicate"), b.lock(False, "verify"):
        with pytest.raises(StoreLockedError, match="a run or reader is using it"):
            with b.lock(True, "prune"):
                pass
    assert not [k for k in keys(moto, bucket, "lock/locks/")]
    with a.lock(True, "prune"):
        with pytest.raises(StoreLockedError, match="prune is running"):
            with b.lock(False, "replicate"):
                pass
        with pytest.raises(StoreLockedError):
            with b.lock(True, "prune"):
                pass
    assert not [k for k in keys(moto, bucket, "lock/locks/")]


def test_dead_and_expired_lock_objects_do_not_block(moto, bucket):
    url = f"s3://{bucket}/dead"
    store = new_store(url, lock_ttl=1)
    store.initialise()
    s3 = moto.boto3_client("s3")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    dead_pid = int(done.stdout)
    import socket
    s3.put_object(Bucket=bucket, Key="dead/locks/shared-dead.json", Body=json.dumps(
        {"host": socket.gethostname(), "pid": dead_pid, "purpose": "replicate", "ttl": 3600}))
    s3.put_object(Bucket=bucket, Key="dead/locks/shared-elsewhere.json", Body=json.dumps(
        {"host": "another-host", "pid": 1, "purpose": "replicate", "ttl": 2}))
    with pytest.raises(StoreLockedError, match="another-host"):
        with store.lock(True, "prune"):
            pass
    time.sleep(3.2)                     # the other host's lease runs out (S3's clock)
    report = prune(store, "x", 0)
    assert report.leftovers_removed == 2
    assert keys(moto, bucket, "dead/locks/") == []
    # a prune killed on this host: its exclusive lock blocks nobody, the next prune replaces it
    s3.put_object(Bucket=bucket, Key="dead/locks/exclusive.json", Body=json.dumps(
        {"host": socket.gethostname(), "pid": dead_pid, "purpose": "prune", "ttl": 3600}))
    with store.lock(False, "replicate"):
        pass
    with store.lock(True, "prune"):
        body = json.loads(s3.get_object(Bucket=bucket, Key="dead/locks/exclusive.json")["Body"].read())
        assert body["pid"] == os.getpid()
    assert keys(moto, bucket, "dead/locks/") == []


# --- settings --------------------------------------------------------------------------

def test_settings_precedence_and_aws_environment(tmp_path, moto, bucket, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[s3]\nparallel = 2\nbandwidth = "1M"\nregion = "eu-west-1"\nread-timeout = 7\n')
    monkeypatch.setenv("SMSBLOCK_CONFIG", str(cfg))
    monkeypatch.setenv("SMSBLOCK_S3_PARALLEL", "5")
    s = CloudSettings.load(url_query="bandwidth=2M")
    assert (s.parallel, s.bandwidth, s.region, s.read_timeout) == (5, 2 << 20, "eu-west-1", 7.0)
    assert CloudSettings.load(url_query="parallel=9", parallel=11).parallel == 11
    with pytest.raises(UsageError, match="must not be given in a URL"):
        open_store(f"s3://{bucket}/x?secret_access_key=abc")
    with pytest.raises(UsageError, match="unknown cloud store settings: colour"):
        CloudSettings.load(url_query="colour=blue")
    monkeypatch.setenv("SMSBLOCK_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(UsageError, match="does not exist"):
        CloudSettings.load()
    monkeypatch.delenv("SMSBLOCK_CONFIG")
    monkeypatch.delenv("SMSBLOCK_S3_PARALLEL")
    monkeypatch.setenv("HOME", str(tmp_path))      # ~/.smsblock/config.toml
    (tmp_path / ".smsblock").mkdir()
    (tmp_path / ".smsblock" / "config.toml").write_text("[s3]\nparallel = 6\n")
    assert CloudSettings.load().parallel == 6
    s = CloudSettings.load(proxy="http://u:hunter2@127.0.0.1:3128", access_key_id="AK",
                           secret_access_key="SK")
    assert "hunter2" not in json.dumps(s.redacted()) and s.redacted()["secret_access_key"] == "***"
    # the standard variables: AWS_ENDPOINT_URL_S3 beats AWS_ENDPOINT_URL, keys from the env
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")     # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.url)
    store = open_store(f"s3://{bucket}/env")
    store.initialise()
    assert store.exists()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-NOT-KNOWN")
    creds = CloudSettings.load().session().get_credentials()
    assert creds.access_key == "AKIA-NOT-KNOWN"


def test_proxy_with_user_and_password(tmp_path, moto, bucket):
    proxy = FaultProxy(require_auth="alice:s3cr et").start()
    try:
        from urllib.parse import quote
        url = f"s3://{bucket}/via-proxy"
        store = new_store(url, proxy=f"http://alice:{quote('s3cr et')}@127.0.0.1:{proxy.port}")
        store.initialise()
        disk = tmp_path / "disk.raw"
        content = make_disk(disk, 12)
        replicate(disk, store, "p", block_size=BS)
        out = tmp_path / "out.raw"
        restore(store, "p", out)
        assert out.read_bytes() == content
        assert proxy.log and all(r.status != 407 for r in proxy.log)
        assert all(r.path.startswith(f"/{bucket}/") or r.path.startswith("/") for r in proxy.log)
        # HTTP_PROXY from the environment, as boto3 users expect; a wrong password: 407
        bad = FaultProxy(require_auth="alice:right").start()
        r = cli("runs", "--store", url, "--server", "p", check=False,
                env={"HTTP_PROXY": f"http://alice:wrong@127.0.0.1:{bad.port}"})
        bad.stop()
        assert r.returncode != 0 and [x.status for x in bad.log][:1] == [407]
    finally:
        proxy.stop()


def test_ca_bundle_and_verify_reach_botocore(tmp_path, moto, bucket, monkeypatch):
    cert, key = make_tls_cert(str(tmp_path))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls = FaultProxy(("127.0.0.1", moto.port), ssl_context=ctx).start()   # re-signs TLS
    try:
        url = f"s3://{bucket}/tls"
        with pytest.raises(PermanentStoreError, match="set ca_bundle") as e:
            new_store(url, endpoint_url=tls.url).exists()
        assert "\n" not in str(e.value)
        store = new_store(url, endpoint_url=tls.url, ca_bundle=cert)
        store.initialise()
        assert store.exists()
        assert new_store(url, endpoint_url=tls.url, verify=False).exists()
        monkeypatch.setenv("AWS_CA_BUNDLE", cert)
        assert new_store(url, endpoint_url=tls.url).exists()
        monkeypatch.delenv("AWS_CA_BUNDLE")
        r = cli("runs", "--store", url, "--server", "x", check=False, env={"AWS_ENDPOINT_URL": tls.url})
        assert r.returncode == 1 and "ca_bundle" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        r = cli("runs", "--store", url, "--server", "x", env={"AWS_ENDPOINT_URL": tls.url,
                                                              "SMSBLOCK_S3_CA_BUNDLE": cert})
        assert "no runs" in r.stdout
        r = cli("runs", "--store", url + "?verify=false", "--server", "x",
                env={"AWS_ENDPOINT_URL": tls.url})
        assert "no runs" in r.stdout
        assert len(tls.log) >= 3
        # the corporate set-up: HTTPS_PROXY (CONNECT, with a password) + the re-signing CA
        corp = FaultProxy(require_auth="me:pw").start()
        try:
            r = cli("runs", "--store", url, "--server", "x",
                    env={"AWS_ENDPOINT_URL": tls.url.replace("127.0.0.1", "localhost"),
                         "HTTPS_PROXY": f"http://me:pw@127.0.0.1:{corp.port}", "AWS_CA_BUNDLE": cert})
            assert "no runs" in r.stdout, r.stderr
            assert [x.method for x in corp.log][:1] == ["CONNECT"]
        finally:
            corp.stop()
    finally:
        tls.stop()


def test_pack_indexes_are_cached_locally_and_verified_by_their_id(tmp_path, bucket, fault_proxy):
    url = f"s3://{bucket}/cache"
    store = new_store(url, endpoint_url=fault_proxy.url)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "disk.raw"
    make_disk(disk, 13)
    replicate(disk, store, "c", block_size=BS)
    packs = store.list_packs()
    fault_proxy.clear()
    second = new_store(url, endpoint_url=fault_proxy.url)     # a new process, same machine
    index = second.block_index()
    assert len(index) == N_BLOCKS - 2
    assert not fault_proxy.requests("GET", r"/packs/"), "indexes came from the local cache"
    # a damaged cache entry is not trusted: it is read again from S3
    victim = sorted(packs)[0]
    cached = Path(second.index_cache_dir) / victim[:2] / f"{victim}.idx"
    raw = bytearray(cached.read_bytes())
    raw[0] ^= 1
    cached.write_bytes(bytes(raw))
    third = new_store(url, endpoint_url=fault_proxy.url)
    assert (third.pack_index(victim, packs[victim]) == store.pack_index(victim, packs[victim])).all()
    assert len(fault_proxy.requests("GET", victim)) == 2        # footer + index
    assert cached.read_bytes() != bytes(raw)                     # and the cache is mended


def test_run_cut_off_by_the_network_resumes_with_only_what_is_missing(tmp_path, bucket, fault_proxy):
    url = f"s3://{bucket}/cut"
    store = new_store(url, endpoint_url=fault_proxy.url, retry_attempts=2, parallel=1)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "disk.raw"
    content = make_disk(disk, 14)
    # the link dies for good after a few pack uploads: every later upload is reset
    fault_proxy.add(Rule("reset", method="PUT", path=r"/packs/", skip=12, times=-1))
    with pytest.raises(TransientStoreError, match="gave up after 2 attempts"):
        replicate(disk, store, "n", block_size=BS)
    fault_proxy.clear()
    store = new_store(url, endpoint_url=fault_proxy.url)
    have = {bytes(e["address"]) for p, n in store.list_packs().items() for e in store.pack_index(p, n)}
    assert 0 < len(have) < N_BLOCKS - 2
    summary = replicate(disk, store, "n", block_size=BS)
    assert summary.blocks_stored == N_BLOCKS - 2 - len(have)
    out = tmp_path / "out.raw"
    restore(store, "n", out)
    assert out.read_bytes() == content
    report = verify(store)
    assert report.ok
    prune(store, "n", 1)
    assert verify(new_store(url)).leftovers == []


# --- the retry policy's classification, and S3 against the local store ---------------------

def _client_error(code: str, status: int):
    import botocore.exceptions
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_retry_classification_and_one_line_messages():
    import botocore.exceptions as bx
    import urllib3.exceptions as ux
    from smsblock.store.retry import RetryPolicy, classify
    for code, status in [("SlowDown", 503), ("InternalError", 500), ("ServiceUnavailable", 503),
                         ("ThrottlingException", 400), ("Whatever", 502), ("Weird", 429)]:
        assert classify(_client_error(code, status)) == "transient", code
    for code, status in [("AccessDenied", 403), ("NoSuchBucket", 404), ("InvalidAccessKeyId", 403),
                         ("SignatureDoesNotMatch", 403), ("ExpiredToken", 400), ("Anything", 401)]:
        assert classify(_client_error(code, status)) == "permanent", code
    for code, status in [("NoSuchKey", 404), ("PreconditionFailed", 412), ("InvalidRange", 416)]:
        assert classify(_client_error(code, status)) == "other", code
    assert classify(bx.ReadTimeoutError(endpoint_url="http://x")) == "transient"
    assert classify(bx.ConnectionClosedError(endpoint_url="http://x")) == "transient"
    assert classify(bx.EndpointConnectionError(endpoint_url="http://x")) == "transient"
    assert classify(ux.ProtocolError("reset")) == "transient"
    assert classify(bx.SSLError(endpoint_url="https://x", error="bad cert")) == "permanent"
    assert classify(bx.NoCredentialsError()) == "permanent"
    assert classify(ValueError("x")) == "other"
    # the policy: transient retried within budget, permanent at once, other passed through
    calls = []
    policy = RetryPolicy(attempts=4, seconds=10, base_delay=0.001)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("SlowDown", 503)
        return "ok"
    assert policy.call("flaky thing", flaky) == "ok" and len(calls) == 3 and policy.retries == 2
    with pytest.raises(PermanentStoreError) as e:
        policy.call("denied thing", lambda: (_ for _ in ()).throw(_client_error("AccessDenied", 403)))
    assert str(e.value).startswith("denied thing: AccessDenied (HTTP 403): m") and "\n" not in str(e.value)
    with pytest.raises(bx.ClientError):
        policy.call("missing thing", lambda: (_ for _ in ()).throw(_client_error("NoSuchKey", 404)))
    slow = RetryPolicy(attempts=100, seconds=0.05, base_delay=0.02)
    with pytest.raises(TransientStoreError, match="gave up after"):
        slow.call("slow thing", lambda: (_ for _ in ()).throw(_client_error("SlowDown", 503)))


from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402


@hsettings(max_examples=4)
@given(st.data())
def test_s3_store_keeps_the_local_store_s_guarantees(moto, aws_env, tmp_path_factory, data):
    """Random disks and change sets, replicated into S3 and into a local store side by
    side: the same blocks stored, the same manifests (states, addresses), every run
    restoring byte-exact from both."""
    from smsblock.store import LocalStore
    tmp = tmp_path_factory.mktemp("equiv")
    bucket = f"eq-{os.urandom(6).hex()}"
    moto.boto3_client("s3").create_bucket(Bucket=bucket)
    s3 = new_store(f"s3://{bucket}/e")
    local = LocalStore(tmp / "local")
    for st_ in (s3, local):
        st_.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp / "disk.raw"
    content = make_disk(disk, data.draw(st.integers(0, 1000)))
    contents = [content]
    for run in range(data.draw(st.integers(1, 3))):
        if run:
            content = make_disk(disk, data.draw(st.integers(0, 1000)), content,
                                change=data.draw(st.integers(0, 6)))
            contents.append(content)
        a = replicate(disk, s3, "h", block_size=BS)
        b = replicate(disk, local, "h", block_size=BS)
        assert (a.blocks_stored, a.blocks_changed, a.bytes_stored_uncompressed) == \
            (b.blocks_stored, b.blocks_changed, b.bytes_stored_uncompressed)
        ma, mb = s3.load_manifest("h"), local.load_manifest("h")
        assert (ma.states == mb.states).all() and (ma.addresses == mb.addresses).all()
    for run_id, want in zip(s3.list_run_ids("h"), contents):
        out = tmp / "out.raw"
        restore(s3, "h", out, run_id=run_id)
        assert out.read_bytes() == want
    assert verify(s3).ok


def test_killed_mid_multipart_the_next_run_sends_only_the_missing_parts(tmp_path, moto, bucket,
                                                                        fault_proxy):
    url = f"s3://{bucket}/parts"
    new_store(url).initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "disk.raw"
    content = make_disk(disk, 15)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SMSBLOCK_S3_BANDWIDTH="120K",
               **{f"SMSBLOCK_S3_{k.upper()}": str(v) for k, v in FAST.items()})
    env["SMSBLOCK_S3_PARALLEL"] = "1"          # parts in order: the kill lands mid-pack
    proc = subprocess.Popen([sys.executable, "-m", "smsblock", "replicate", str(disk), "--store", url,
                             "--server", "m", "--block-size", "64K"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    s3 = moto.boto3_client("s3")
    sent_before: dict[str, set[int]] = {}
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix="parts/").get("Uploads", [])
            for u in uploads:
                parts = s3.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts", [])
                if len(parts) >= 2:
                    sent_before = {u["UploadId"]: {p["PartNumber"] for p in parts}}
                    break
            if sent_before:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sent_before, "no multipart upload was caught half done"
    [(upload_id, numbers)] = sent_before.items()
    numbers = {p["PartNumber"] for p in s3.list_parts(Bucket=bucket, Key=[
        u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix="parts/")["Uploads"]
        if u["UploadId"] == upload_id][0], UploadId=upload_id)["Parts"]}
    fault_proxy.clear()
    store = new_store(url, endpoint_url=fault_proxy.url)
    summary = replicate(disk, store, "m", block_size=BS)
    resent = {int(re.search(r"partNumber=(\d+)", r.path).group(1))
              for r in fault_proxy.requests("PUT", f"uploadId={upload_id}")}
    assert not resent & numbers, f"parts {sorted(resent & numbers)} were sent twice"
    assert fault_proxy.requests("POST", f"uploadId={upload_id}"), "the dead run's upload was completed"
    out = tmp_path / "out.raw"
    restore(store, "m", out)
    assert out.read_bytes() == content
    assert summary.blocks_stored < N_BLOCKS - 2
    assert verify(store).ok
    prune(store, "m", 1)
    assert verify(new_store(url)).leftovers == []


class _CountingBucket:
    def __init__(self):
        self.paid = 0

    def consume(self, n):
        assert n > 0
        self.paid += n


@hsettings(max_examples=200)
@given(st.binary(max_size=300_000), st.lists(st.tuples(st.sampled_from(["read", "seek"]),
                                                       st.integers(-1, 200_000)), max_size=12))
def test_throttled_body_reads_like_bytesio_and_pays_each_byte_once(data, ops):
    import io
    counter = _CountingBucket()
    body, ref = ThrottledBody(data, counter), io.BytesIO(data)
    reached = 0
    for op, n in ops:
        if op == "read":
            start = ref.tell()
            got = body.read(n)
            want = ref.read(n) if n < 0 else ref.read(min(n, 64 << 10))
            assert got == want
            if got:
                reached = max(reached, start + len(got))
        else:
            pos = max(0, n)
            assert body.seek(pos) == ref.seek(pos)
        assert body.tell() == ref.tell()
    assert counter.paid == reached


def test_store_at_the_bucket_root(tmp_path, moto, bucket):
    store = new_store(f"s3://{bucket}")
    assert store.url == f"s3://{bucket}"
    store.initialise()
    disk = tmp_path / "disk.raw"
    content = make_disk(disk, 16)
    replicate(disk, store, "root", block_size=BS)
    assert "config.json" in keys(moto, bucket)
    out = tmp_path / "out.raw"
    restore(open_store(f"s3://{bucket}/"), "root", out)
    assert out.read_bytes() == content
    moto.boto3_client("s3").put_object(Bucket=bucket, Key="x/other", Body=b"1")
    other = f"s3://{bucket}-2"
    moto.boto3_client("s3").create_bucket(Bucket=other[5:])
    moto.boto3_client("s3").put_object(Bucket=other[5:], Key="someone-else.txt", Body=b"1")
    from smsblock.errors import StoreError
    with pytest.raises(StoreError, match="not a smsblock store"):
        new_store(other).initialise()
    with pytest.raises(UsageError):
        open_store(f"s3://{bucket}/a/../b")


def test_sequential_pack_reads_are_fetched_ahead_random_ones_exactly(tmp_path, bucket, fault_proxy):
    url = f"s3://{bucket}/ra"
    store = new_store(url, endpoint_url=fault_proxy.url, readahead="1M")
    store.initialise(StoreConfig(pack_size=4 << 20))            # one pack holds the disk
    disk = tmp_path / "disk.raw"
    content = make_disk(disk, 17)
    replicate(disk, store, "ra", block_size=BS)
    packs = store.list_packs()
    pack_id, size = max(packs.items(), key=lambda kv: kv[1])
    fault_proxy.clear()
    reader = new_store(url, endpoint_url=fault_proxy.url, readahead="1M")
    out = tmp_path / "out.raw"
    restore(reader, "ra", out)
    assert out.read_bytes() == content
    gets = fault_proxy.requests("GET", "/packs/")
    # 30 blocks of ~32 KiB compressed, read by the restore's 2 threads at two places at
    # once: per pack at most its footer, index, one exact read per thread before its reads
    # are seen as a stream, and one 1 MiB window; not one GET per block (interleaved
    # threads once broke the stream apart: 8 GETs)
    assert len(gets) <= 5 * len(packs) and len(gets) < 15, [r.headers.get("range") for r in gets]
    # a lone read is not amplified
    expect = new_store(url, readahead=0).read_pack(pack_id, 1000, 100)
    fault_proxy.clear()
    lone = new_store(url, endpoint_url=fault_proxy.url, readahead="1M")
    assert lone.read_pack(pack_id, 1000, 100) == expect
    [r] = fault_proxy.requests("GET", pack_id)
    assert r.headers["range"] == "bytes=1000-1099"
    # reads from windows are the same bytes as exact reads, to the pack's end
    whole = new_store(url, readahead=0).read_pack(pack_id, 0, size)
    ra = new_store(url, readahead="256K")
    pos, step = 16, 40_000
    while pos < size:
        assert ra.read_pack(pack_id, pos, step) == whole[pos:pos + step]
        pos += step
    assert ra.read_pack(pack_id, size - 10, 100) == whole[-10:]


def test_stray_keys_under_runs_are_not_servers_or_runs(moto, bucket):
    """Keys left under runs/ by hand or other tools must not stop verify and prune."""
    url = f"s3://{bucket}/stores/stray"
    store = new_store(url)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    rid = "r-20260101T000000.000000Z-0123abcd"
    store.put_manifest_bytes("srv", rid, b"bytes")
    s3 = moto.boto3_client("s3")
    for key in ("runs/.DS_Store", "runs/bad server/r-x.manifest", "runs/srv/r-junk.manifest",
                "runs/srv/notes.txt"):
        s3.put_object(Bucket=bucket, Key=f"stores/stray/{key}", Body=b"")
    assert store.list_servers() == ["srv"] and store.list_run_ids("srv") == [rid]
    assert list(store.iter_manifests()) == [("srv", rid)]


@pytest.mark.parametrize("env", [
    {"SMSBLOCK_S3_PARALLEL": "x"}, {"SMSBLOCK_S3_CONNECT_TIMEOUT": "abc"},
    {"AWS_ENDPOINT_URL": "ftp://x"}, {"AWS_ENDPOINT_URL_S3": "http://[::1"},
    {"AWS_DEFAULT_REGION": "bad region!"}])
def test_bad_settings_are_one_line(tmp_path, env):
    """Nonsense in settings is a one-line error naming the setting, never a traceback."""
    import subprocess
    import sys
    full = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", **env}
    p = subprocess.run([sys.executable, "-m", "smsblock", "runs", "--store", "s3://b/p", "--server", "x"],
                       capture_output=True, text=True, env=full, timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_large_remote_manifest_is_read_from_a_private_file_not_memory(tmp_path, moto, bucket,
                                                                        monkeypatch):
    """A manifest over MANIFEST_IN_MEMORY (a dense multi-TiB disk's is GBs) is fetched in
    ranged pieces into an unlinked 0600 file and read from there; restore is byte-exact."""
    from smsblock.repository.repository import Repository
    store = new_store(f"s3://{bucket}/stores/bigman")
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "disk.raw"
    raw = make_disk(disk, 3)
    replicate(disk, store, "web-1", block_size=BS)
    monkeypatch.setattr(Repository, "MANIFEST_IN_MEMORY", 64)
    monkeypatch.setattr(Repository, "MANIFEST_PIECE", 100)
    pieces = []
    real = Repository.get_manifest_bytes

    def counted(self, server_id, run_id, offset=0, length=None):
        pieces.append(length)
        return real(self, server_id, run_id, offset, length)
    monkeypatch.setattr(Repository, "get_manifest_bytes", counted)
    with store.open_manifest("web-1") as m:
        assert m.meta["server_id"] == "web-1"
    assert len(pieces) > 2 and all(p is not None and p <= 100 for p in pieces)
    restore(store, "web-1", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == raw
