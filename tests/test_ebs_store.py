"""EbsStore against moto in server mode (EBS direct APIs + EC2), through the fault proxy
that records what we send.

moto falls short of AWS in three ways, and these tests name each gap and check our side
of the contract on the wire instead:
* it ignores ``ParentSnapshotId`` (a child lists and serves only blocks written to it):
  we check the StartSnapshot request carries the previous run's snapshot, and read back
  through the chain of parents ourselves;
* it does not check block checksums or the aggregate: we recompute both from the bodies
  the proxy captured;
* it answers 500 for a block never written to a snapshot: our reader asks only for
  blocks a snapshot lists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_fixtures import *  # noqa: F401,F403  (fixtures)
from fault_proxy import FaultProxy, Rule

from smsblock.manifest import BlockState, ManifestReader
from smsblock.engine import prune, replicate, restore, verify
from smsblock.store import StoreConfig, open_store
from smsblock.store.ebs import EBS_BLOCK, EbsStore, linear_checksum

ROOT = Path(__file__).resolve().parent.parent
N_BLOCKS = 6
DISK_SIZE = N_BLOCKS * EBS_BLOCK - 4096          # the last block is short: padded on the wire

pytestmark = pytest.mark.timeout(120)


def make_disk(path: Path, seed: int, base: bytes | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    if base is None:
        data = rng.integers(0, 16, DISK_SIZE, dtype=np.uint8)
        data[EBS_BLOCK:2 * EBS_BLOCK] = 0              # block 1: zero
    else:
        data = np.frombuffer(base, np.uint8).copy()
        data[2 * EBS_BLOCK + 100:2 * EBS_BLOCK + 200] = 7     # block 2 changed
        data[5 * EBS_BLOCK:] = 3                               # block 5 (short) changed
        data[3 * EBS_BLOCK:4 * EBS_BLOCK] = 0                  # block 3 became zero
    raw = data.tobytes()
    path.write_bytes(raw)
    return raw


@pytest.fixture
def capture(moto, aws_env):
    proxy = FaultProxy(("127.0.0.1", moto.port), capture_bodies=True).start()
    yield proxy
    proxy.stop()


def ebs_store(tmp_path, endpoint, **kw) -> EbsStore:
    store = EbsStore("ebs://us-east-1", staging=str(tmp_path / "staging"), endpoint_url=endpoint,
                     parallel=2, **kw)
    store.initialise(StoreConfig(pack_size=1 << 20))
    return store


def two_runs(tmp_path, endpoint, server: str, seed: int):
    """An EBS store with two runs of a disk (the second changes blocks 2, 3 and 5):
    ``(store, first bytes, second bytes)``."""
    store = ebs_store(tmp_path, endpoint)
    disk = tmp_path / "disk.raw"
    first = make_disk(disk, seed)
    replicate(disk, store, server)
    second = make_disk(disk, seed, first)
    replicate(disk, store, server)
    return store, first, second


def block_puts(proxy, snap):
    return {int(r.path.rsplit("/", 1)[-1]): r for r in proxy.requests("PUT", f"/snapshots/{snap}/blocks/")}


def check_wire_contract(proxy, snap, expected_indices, parent):
    """What AWS would check and moto does not: per-block checksums, the count, the
    LINEAR aggregate, the parent."""
    start = [r for r in proxy.requests("POST", r"^/snapshots$") if r.status == 201 or r.status == 200]
    bodies = [json.loads(r.body) for r in start]
    mine = [b for b in bodies if b.get("ParentSnapshotId") == parent] if parent else \
        [b for b in bodies if "ParentSnapshotId" not in b]
    assert mine, f"no StartSnapshot with ParentSnapshotId={parent}: {bodies}"
    puts = block_puts(proxy, snap)
    assert sorted(puts) == sorted(expected_indices)
    digests = {}
    for i, r in puts.items():
        assert len(r.body) == EBS_BLOCK and r.headers["x-amz-data-length"] == str(EBS_BLOCK)
        assert r.headers["x-amz-checksum-algorithm"] == "SHA256"
        digest = hashlib.sha256(r.body).digest()
        assert base64.b64decode(r.headers["x-amz-checksum"]) == digest, f"block {i}"
        digests[i] = digest
    [done] = proxy.requests("POST", f"/snapshots/completion/{snap}")
    assert done.headers["x-amz-changedblockscount"] == str(len(expected_indices))
    assert done.headers["x-amz-checksum-aggregation-method"] == "LINEAR"
    assert done.headers["x-amz-checksum-algorithm"] == "SHA256"
    aggregate = hashlib.sha256(b"".join(digests[i] for i in sorted(digests))).digest()
    assert base64.b64decode(done.headers["x-amz-checksum"]) == aggregate
    return puts


def test_runs_become_snapshot_chain_with_only_changed_blocks(tmp_path, moto, capture):
    store = ebs_store(tmp_path, capture.url)
    disk = tmp_path / "disk.raw"
    first = make_disk(disk, 1)
    s1 = replicate(disk, store, "vm")
    m1 = store.load_manifest("vm")
    rec1 = store.snapshot_record("vm")
    snap1 = rec1["snapshot_id"]
    assert s1.published == {"ebs": rec1}
    assert rec1["parent_snapshot_id"] is None and rec1["chain"] == [snap1]
    assert "ebs" not in m1.meta, "the committed manifest is never rewritten"
    data1 = [i for i in range(N_BLOCKS) if m1.states[i] == BlockState.DATA]
    assert data1 == [0, 2, 3, 4, 5]
    puts = check_wire_contract(capture, snap1, data1, None)
    assert puts[5].body[:DISK_SIZE - 5 * EBS_BLOCK] == first[5 * EBS_BLOCK:]
    assert puts[5].body[DISK_SIZE - 5 * EBS_BLOCK:] == bytes(4096)          # zero padding

    capture.clear()
    second = make_disk(disk, 1, first)
    replicate(disk, store, "vm")
    rec2 = store.snapshot_record("vm")
    snap2 = rec2["snapshot_id"]
    assert rec2["parent_snapshot_id"] == snap1 and rec2["chain"] == [snap2, snap1]
    puts = check_wire_contract(capture, snap2, [2, 3, 5], snap1)
    assert puts[3].body == bytes(EBS_BLOCK), "a block that became zero is written as zeros"

    # read back from EBS (GetSnapshotBlock, following parents), not from the staged packs
    capture.clear()
    for run_id, content, snap in ((s1.run_id, first, snap1), (None, second, snap2)):
        out = tmp_path / f"snap-{snap}.raw"
        assert store.restore_snapshot("vm", out, run_id=run_id) == snap
        assert out.read_bytes() == content
    gets = capture.requests("GET", r"/snapshots/snap-[^/]+/blocks/\d+")
    assert gets and all(r.status == 200 for r in gets)
    # moto gap: block 0 lives in snap1 only; moto does not inherit it into snap2 (AWS does),
    # and answers 500 for it, so it must have been read from the parent
    assert not capture.requests("GET", f"/snapshots/{snap2}/blocks/0")
    assert capture.requests("GET", f"/snapshots/{snap1}/blocks/0")
    assert verify(store).ok and verify(store).leftovers == []


def test_moto_gaps_are_what_we_say(moto, aws_env):
    """Pin the moto behaviour the tests above work around, so a change in moto shows."""
    ebs = moto.boto3_client("ebs", retries=False)
    parent = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    block = b"\x01" * EBS_BLOCK
    # a wrong checksum is accepted (AWS refuses it)
    ebs.put_snapshot_block(SnapshotId=parent, BlockIndex=0, BlockData=block, DataLength=EBS_BLOCK,
                           Checksum=base64.b64encode(b"\0" * 32).decode(), ChecksumAlgorithm="SHA256")
    ebs.complete_snapshot(SnapshotId=parent, ChangedBlocksCount=1)
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)["SnapshotId"]
    ebs.complete_snapshot(SnapshotId=child, ChangedBlocksCount=0)
    # the child does not list (inherit) the parent's block
    assert ebs.list_snapshot_blocks(SnapshotId=child)["Blocks"] == []
    import botocore.exceptions
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ebs.get_snapshot_block(SnapshotId=child, BlockIndex=0, BlockToken="x")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500


def test_cli_every_command_with_ebs_store(tmp_path, moto, aws_env):
    url = f"ebs://us-east-1?store={tmp_path / 'staging'}"
    disk = tmp_path / "disk.raw"
    first = make_disk(disk, 2)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cli(*args):
        p = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout
    s1 = json.loads(cli("replicate", disk, "--store", url, "--server", "app", "--create", "--json"))
    second = make_disk(disk, 2, first)
    s2 = json.loads(cli("replicate", disk, "--store", url, "--server", "app", "--json"))
    runs = json.loads(cli("runs", "--store", url, "--server", "app", "--json"))["runs"]
    assert [r["run_id"] for r in runs] == [s1["run_id"], s2["run_id"]]
    assert all(r["summary"]["snapshot_id"].startswith("snap-") for r in runs)
    out = tmp_path / "out.raw"
    cli("restore", "--store", url, "--server", "app", "--run", s1["run_id"], "-o", out)
    assert out.read_bytes() == first
    assert json.loads(cli("verify", "--store", url, "--json"))["ok"]
    store = open_store(url)
    assert isinstance(store, EbsStore) and store.url == "ebs://us-east-1"
    snap2 = store.snapshot_record("app")["snapshot_id"]
    assert s2["published"]["ebs"]["snapshot_id"] == snap2
    store.restore_snapshot("app", out)
    assert out.read_bytes() == second
    p = json.loads(cli("prune", "--store", url, "--server", "app", "--keep", "1", "--json"))
    assert p["runs_deleted"] == [s1["run_id"]]
    # the kept run still reads from EBS through its recorded chain
    store = open_store(url)
    assert store.snapshot_record("app")["snapshot_id"] == snap2
    assert not (tmp_path / "staging" / "ebs-snapshots" / "us-east-1" / "app" / f"{s1['run_id']}.json").exists(), \
        "a pruned run's snapshot record goes with it"
    store.restore_snapshot("app", out)
    assert out.read_bytes() == second


def test_killed_run_leaves_a_pending_snapshot_that_is_reported_then_pruned(tmp_path, moto, aws_env, caplog):
    staging = tmp_path / "staging"
    url = f"ebs://us-east-1?store={staging}"
    disk = tmp_path / "disk.raw"
    first = make_disk(disk, 3)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SMSBLOCK_S3_BANDWIDTH="600K")
    proc = subprocess.Popen([sys.executable, "-m", "smsblock", "replicate", str(disk), "--store", url,
                             "--server", "k", "--create", "--json"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pending_dir = staging / "ebs-pending"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if pending_dir.is_dir() and any(n.endswith(".json") for n in os.listdir(pending_dir)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = open_store(url)
    pending = store.pending_snapshots()
    assert len(pending) == 1
    [(snap, record)] = pending.items()
    # the run was committed before its snapshot started: it is a run, not published
    [killed] = store.list_run_ids("k")
    assert record["server_id"] == "k" and record["run_id"] == killed
    assert store.snapshot_record("k") is None
    report = verify(store)
    assert report.ok and f"ebs-pending:{snap}" in report.leftovers
    with caplog.at_level(logging.WARNING, logger="smsblock.store.ebs"):
        latest = replicate(disk, store, "k")
    assert f"snapshot {snap} of run {killed} of k was never completed" in caplog.text
    assert latest.published["ebs"]["parent_snapshot_id"] is None, "nothing published to build on"
    out = tmp_path / "out.raw"
    store.restore_snapshot("k", out)
    assert out.read_bytes() == first
    # the killed run is published after the fact, from its own blocks
    assert store.publish_run("k", killed)["ebs"]["snapshot_id"] != snap
    store.restore_snapshot("k", out, run_id=killed)
    assert out.read_bytes() == first
    pr = prune(store, "k", 1)
    assert pr.leftovers_removed >= 1
    assert open_store(url).pending_snapshots() == {}
    ec2 = moto.boto3_client("ec2")
    ids = [s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]]
    assert snap not in ids


def test_block_put_faults_are_retried(tmp_path, moto, capture, caplog):
    store = ebs_store(tmp_path, capture.url, read_timeout=1)
    disk = tmp_path / "disk.raw"
    first = make_disk(disk, 4)
    capture.add(Rule("status", method="PUT", path=r"/blocks/2$", status=503, code="ServiceUnavailableException"),
                Rule("reset", method="PUT", path=r"/blocks/3$"),
                Rule("status", method="POST", path=r"/completion/", status=500, code="InternalServerException"),
                Rule("status", method="GET", path=r"/blocks/4\?", status=429, code="ThrottlingException"))
    with caplog.at_level(logging.WARNING, logger="smsblock.store.retry"):
        replicate(disk, store, "f")
        out = tmp_path / "out.raw"
        store.restore_snapshot("f", out)
    assert out.read_bytes() == first
    assert len(capture.faults()) == 4
    assert "put block 2 of snapshot" in caplog.text and "complete snapshot" in caplog.text
    assert "get block 4 of snapshot" in caplog.text


def test_ebs_needs_512k_blocks(tmp_path, moto, aws_env):
    store = ebs_store(tmp_path, moto.url)
    disk = tmp_path / "disk.raw"
    make_disk(disk, 5)
    from smsblock.errors import UsageError
    with pytest.raises(UsageError, match="512 KiB blocks"):     # refused before the run
        replicate(disk, store, "x", block_size=64 << 10)
    assert store.list_run_ids("x") == [] and store.list_packs() == {}


def test_linear_checksum_is_sha256_of_digests_in_index_order():
    blocks = {5: b"b" * 10, 1: b"a" * 10}
    digests = [hashlib.sha256(blocks[i]).digest() for i in sorted(blocks)]
    expected = base64.b64encode(hashlib.sha256(digests[0] + digests[1]).digest()).decode()
    assert linear_checksum(digests) == expected


def test_staging_store_from_the_config_file(tmp_path, moto, aws_env, monkeypatch):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[s3]\nparallel = 3\n[ebs]\nstore = "{tmp_path / "from-config"}"\nparallel = 5\n')
    monkeypatch.setenv("SMSBLOCK_CONFIG", str(cfg))
    store = open_store("ebs://eu-west-1")
    assert store.staging.url == str(tmp_path / "from-config")
    assert store.settings.parallel == 5 and store.region == "eu-west-1"
    monkeypatch.setenv("SMSBLOCK_EBS_STORE", str(tmp_path / "from-env"))
    assert open_store("ebs://eu-west-1").staging.url == str(tmp_path / "from-env")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    from smsblock.errors import UsageError
    with pytest.raises(UsageError, match="no region"):
        open_store("ebs://")


def test_s3_staging_store_and_a_snapshot_that_never_completes(tmp_path, moto, bucket, capture):
    """Staging in S3 (packs, manifests, records and the pending-snapshot journal under its
    prefix).  EBS publishes after the commit: a CompleteSnapshot refused for good fails
    the publish, not the run.  The run is stored and restores from the packs, its
    snapshot is pending (journalled in S3, reported by verify, removed by prune), and
    publishing it again once EBS answers makes it a snapshot the next run builds on."""
    from smsblock.errors import PermanentStoreError, PublishError
    from smsblock.store.s3 import S3Store
    staging = S3Store(f"s3://{bucket}/staging", endpoint_url=moto.url, part_size=64 << 10,
                      multipart_threshold=256 << 10)
    store = EbsStore("ebs://us-east-1", staging=staging, endpoint_url=capture.url)
    store.initialise(StoreConfig(pack_size=1 << 20))
    disk = tmp_path / "disk.raw"
    first = make_disk(disk, 6)
    capture.add(Rule("status", method="POST", path=r"/completion/", status=403, code="AccessDeniedException"))
    with pytest.raises(PublishError, match="AccessDeniedException") as failed:
        replicate(disk, store, "s3s")
    assert isinstance(failed.value.__cause__, PermanentStoreError)
    run1 = failed.value.run_id
    assert failed.value.summary.run_id == run1 and f"--run {run1}" in str(failed.value)
    [snap] = store.pending_snapshots()
    assert moto.boto3_client("s3").get_object(Bucket=bucket, Key=f"staging/ebs-pending/{snap}.json")
    assert f"ebs-pending:{snap}" in verify(store).leftovers and store.list_run_ids("s3s") == [run1]
    assert store.snapshot_record("s3s") is None
    assert [r.summary["snapshot_id"] for r in store.runs("s3s")] == [None]
    out = tmp_path / "out.raw"
    restore(store, "s3s", out)                  # not published: read from the staged packs
    assert out.read_bytes() == first

    capture.clear()                             # EBS answers again
    record1 = store.publish_run("s3s", run1)["ebs"]
    assert record1["parent_snapshot_id"] is None and record1["snapshot_id"] != snap
    assert store.publish_run("s3s") == {"ebs": record1}, "a published run is not published again"
    second = replicate(disk, store, "s3s")
    assert second.blocks_stored == 0, "the first run's blocks were staged already"
    record2 = second.published["ebs"]
    assert record2["parent_snapshot_id"] == record1["snapshot_id"] and record2["changed_blocks"] == 0
    assert moto.boto3_client("s3").get_object(
        Bucket=bucket, Key=f"staging/ebs-snapshots/us-east-1/s3s/{second.run_id}.json")
    store.restore_snapshot("s3s", out)
    assert out.read_bytes() == first
    prune(store, "s3s", 1)
    assert store.pending_snapshots() == {} and verify(store).leftovers == []


def test_restore_reads_the_snapshot_not_the_staged_packs(tmp_path, moto, capture):
    """The engine's restore (API and CLI) of an ebs:// run reads its EBS snapshot with
    GetSnapshotBlock: after the staged packs are deleted, every run still restores exactly."""
    store, first, second = two_runs(tmp_path, capture.url, "rd", 7)
    for pack_id in list(store.staging.list_packs()):     # EBS is now the only copy
        store.staging.delete_pack(pack_id)
    capture.clear()
    for run_id, want in zip(store.list_run_ids("rd"), (first, second)):
        out = tmp_path / f"{run_id}.raw"
        restore(store, "rd", out, run_id=run_id)
        assert out.read_bytes() == want
    assert capture.requests("GET", r"/snapshots/snap-[^/]+/blocks/\d+")
    assert not [r for r in capture.log if "/snapshots" not in r.path]


def test_blocks_to_write_against_a_reference():
    """blocks_to_write vs a plain loop over the two manifests' blocks."""
    from smsblock.manifest import Manifest
    from smsblock.store.ebs import blocks_to_write
    rng = np.random.default_rng(3)

    def manifest(n):
        return Manifest(n * EBS_BLOCK, EBS_BLOCK)
    for _ in range(50):
        n_old, n_new = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        old, new = manifest(n_old), manifest(n_new)
        for m in (old, new):
            m.states[:] = rng.integers(0, 3, m.n_blocks)
            data = m.states == BlockState.DATA
            m.hashes[data] = rng.integers(0, 2, (int(data.sum()), 16))
        want = []
        for i in range(n_new):
            if i >= n_old:
                if new.states[i] == BlockState.DATA:
                    want.append(i)
            elif old.states[i] != new.states[i] or (
                    new.states[i] == BlockState.DATA and (old.hashes[i] != new.hashes[i]).any()):
                want.append(i)
        first = np.flatnonzero(new.states == BlockState.DATA).tolist()
        assert blocks_to_write(old, new).tolist() == want
        assert blocks_to_write(None, new).tolist() == first
        # read a window at a time from files, as a publish does
        r_old, r_new = ManifestReader(old.to_bytes()), ManifestReader(new.to_bytes())
        assert blocks_to_write(r_old, r_new).tolist() == want
        assert blocks_to_write(None, r_new).tolist() == first


def test_sent_blocks_keep_the_aggregate_in_index_order():
    """The LINEAR aggregate is built as blocks go, so they must go in ascending order."""
    from smsblock.errors import UsageError
    from smsblock.publish.ebs import SentBlocks
    digests = {i: hashlib.sha256(bytes([i])).digest() for i in (2, 5, 9)}
    sent = SentBlocks()
    for i in sorted(digests):
        sent.add(i, digests[i])
    assert sent.count == 3 and sent.checksum == linear_checksum(digests[i] for i in (2, 5, 9))
    with pytest.raises(UsageError, match="ascending"):
        sent.add(5, digests[5])


def test_snapshot_tokens_are_listed_a_window_at_a_time(tmp_path, moto, capture, monkeypatch):
    """A restore from EBS lists block tokens per window (StartingBlockIndex), never the
    whole chain up front, and is byte-exact across window edges and the chain."""
    import smsblock.publish.ebs as publish_ebs
    monkeypatch.setattr(publish_ebs, "LOOKUP_WINDOW", 2)
    store, _first, second = two_runs(tmp_path, capture.url, "win", 5)
    capture.clear()
    out = tmp_path / "out.raw"
    restore(store, "win", out)
    assert out.read_bytes() == second
    lists = [r.path for r in capture.requests("GET", r"/snapshots/snap-[^/]+/blocks(\?|$)")]
    starts = sorted({int(q.split("startingBlockIndex=")[1].split("&")[0])
                     for q in lists if "startingBlockIndex=" in q})
    assert starts == [2, 4], lists          # windows 1 and 2; window 0 starts at 0
    assert all("maxResults=" in q for q in lists)


def test_memory_does_not_follow_the_disk_size(tmp_path, moto, aws_env):
    """Issue 11: an ebs:// store publishes (diff, snapshot, record) and restores
    a window at a time.  The CLI on a 64 GiB and on a 1 TiB sparse disk holding the same
    8 MiB has the same peak RSS; a whole manifest of the 1 TiB disk is 96 MiB more."""
    from test_memory_bounded import SLACK, make_disk as sparse_disk, run_cli
    rss = {}
    for size in (64 << 30, 1 << 40):
        work = tmp_path / str(size)
        work.mkdir()
        url = f"ebs://us-east-1?store={work / 'staging'}"
        disk = work / "disk.raw"
        offsets = sparse_disk(disk, size)
        first, out = run_cli("replicate", str(disk), "--store", url, "--server", "vm",
                             "--create", "--json", cwd=work)
        assert json.loads(out)["blocks_data"] == 16
        with open(disk, "r+b") as f:
            f.seek(offsets[3])
            f.write(b"\x55" * 4096)
        second, out = run_cli("replicate", str(disk), "--store", url, "--server", "vm",
                              "--json", cwd=work)
        assert json.loads(out)["blocks_changed"] == 1
        restored, _ = run_cli("restore", "--store", url, "--server", "vm", "-o",
                              str(work / "out.raw"), cwd=work)
        with open(disk, "rb") as a, open(work / "out.raw", "rb") as b:
            for off in offsets:             # the data (the holes are holes on both sides)
                a.seek(off)
                b.seek(off)
                assert a.read(512 << 10) == b.read(512 << 10)
        assert os.path.getsize(work / "out.raw") == size
        store = open_store(url)
        info = store.snapshot_record("vm")
        assert info["changed_blocks"] == 1 and len(info["chain"]) == 2
        rss[size] = {"first": first, "incremental": second, "restore": restored}
    small, big = rss[64 << 30], rss[1 << 40]
    for what in small:
        assert big[what] - small[what] < SLACK, (what, small, big)


def test_the_manifest_is_committed_before_the_snapshot_starts(tmp_path, moto, aws_env, monkeypatch):
    """Issue 11, outcome 1: EBS publishes after the run's manifest is committed."""
    store = ebs_store(tmp_path, moto.url)
    disk = tmp_path / "disk.raw"
    make_disk(disk, 8)
    seen = []
    real_start = store.uploader.start

    def start(**kw):
        seen.append((store.list_run_ids("o"), kw["tags"]["smsblock:run"]))
        return real_start(**kw)
    monkeypatch.setattr(store.uploader, "start", start)
    s = replicate(disk, store, "o")
    assert seen == [([s.run_id], s.run_id)], "the run was listed when its snapshot started"


def test_a_run_that_failed_to_publish_is_skipped_as_parent_and_published_later(tmp_path, moto, capture):
    """Run 2's publish fails: run 3's snapshot builds on run 1's (the newest published),
    with exactly the blocks that differ from run 1.  `smsblock publish` publishes run 2
    later, also on run 1's snapshot.  Every snapshot restores byte for byte."""
    from smsblock.errors import PublishError
    store = ebs_store(tmp_path, capture.url)
    disk = tmp_path / "disk.raw"
    first = make_disk(disk, 9)
    s1 = replicate(disk, store, "p")
    snap1 = s1.published["ebs"]["snapshot_id"]
    second = make_disk(disk, 9, first)               # blocks 2, 3 and 5 change
    capture.add(Rule("status", method="POST", path=r"^/snapshots$", status=403,
                     code="AccessDeniedException"))
    with pytest.raises(PublishError) as failed:
        replicate(disk, store, "p")
    run2 = failed.value.run_id
    assert store.snapshot_record("p", run2) is None
    third = bytearray(second)
    third[4 * EBS_BLOCK:4 * EBS_BLOCK + 10] = b"x" * 10      # block 4 changes too
    disk.write_bytes(bytes(third))
    capture.clear()
    s3 = replicate(disk, store, "p")
    rec3 = s3.published["ebs"]
    assert rec3["parent_snapshot_id"] == snap1 and rec3["chain"] == [rec3["snapshot_id"], snap1]
    check_wire_contract(capture, rec3["snapshot_id"], [2, 3, 4, 5], snap1)

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    url = f"ebs://us-east-1?store={tmp_path / 'staging'}"
    p = subprocess.run([sys.executable, "-m", "smsblock", "publish", "--store", url, "--server", "p",
                        "--run", run2, "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rec2 = json.loads(p.stdout)["published"]["ebs"]
    assert rec2["parent_snapshot_id"] == snap1 and rec2 == store.snapshot_record("p", run2)
    p = subprocess.run([sys.executable, "-m", "smsblock", "runs", "--store", url, "--server", "p"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.count(", snapshot snap-") == 3, p.stdout + p.stderr
    for run_id, want in ((s1.run_id, first), (run2, second), (s3.run_id, bytes(third))):
        out = tmp_path / f"{run_id}.raw"
        store.restore_snapshot("p", out, run_id=run_id)
        assert out.read_bytes() == want, run_id


def test_publish_needs_a_store_that_publishes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    disk = tmp_path / "disk.raw"
    make_disk(disk, 1)
    local = tmp_path / "local"
    replicate(disk, str(local), "l", create=True)
    p = subprocess.run([sys.executable, "-m", "smsblock", "publish", "--store", str(local),
                        "--server", "l"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "nothing to publish runs to" in p.stderr, p.stderr


def test_stores_that_kept_records_in_the_manifest_still_work(tmp_path, moto, capture):
    """Stores written before records moved out of the manifest have each run's snapshot
    in ``meta["ebs"]``: it is read from there, as the parent of the next run too."""
    from smsblock.manifest import copy_manifest
    store, first, second = two_runs(tmp_path, capture.url, "old", 10)
    runs_dir = tmp_path / "staging" / "runs" / "old"
    records = {}
    for run_id in store.list_run_ids("old"):         # rewrite them as the old code did
        records[run_id] = record = store.snapshot_record("old", run_id)
        (tmp_path / "staging" / "ebs-snapshots" / "us-east-1" / "old" / f"{run_id}.json").unlink()
        path = runs_dir / f"{run_id}.manifest"
        with ManifestReader(str(path)) as m:
            copy_manifest(m, str(path) + ".new", dict(m.meta, ebs=record))
        os.replace(str(path) + ".new", path)
    store = ebs_store(tmp_path, capture.url)
    assert [store.snapshot_record("old", r) for r in records] == list(records.values())
    assert [r.summary["snapshot_id"] for r in store.runs("old")] == \
        [r["snapshot_id"] for r in records.values()]
    capture.clear()
    s3 = replicate(tmp_path / "disk.raw", store, "old")
    latest = list(records.values())[-1]
    assert s3.published["ebs"]["parent_snapshot_id"] == latest["snapshot_id"]
    assert s3.published["ebs"]["changed_blocks"] == 0
    out = tmp_path / "out.raw"
    for run_id, want in zip(store.list_run_ids("old"), (first, second, second)):
        store.restore_snapshot("old", out, run_id=run_id)
        assert out.read_bytes() == want


def test_a_published_snapshot_left_in_the_journal_is_never_pruned(tmp_path, moto, capture, monkeypatch):
    """The record is written, then the journal entry removed: when the removal fails (or
    the process dies between the two), the run is published all the same, the stale
    entry is cleared instead of being listed as pending, and prune keeps the snapshot.
    Found in review: prune deleted the snapshot of a published run."""
    from smsblock.errors import StoreError
    from smsblock.publish import ebs as E
    store = ebs_store(tmp_path, capture.url)
    disk = tmp_path / "disk.raw"
    content = make_disk(disk, 4)
    real_remove, calls = E.Journal.remove, []

    def remove(self, snap):
        calls.append(snap)
        if len(calls) == 1:
            raise StoreError("journal: connection reset (test)")
        return real_remove(self, snap)
    monkeypatch.setattr(E.Journal, "remove", remove)
    s = replicate(disk, store, "j")
    snap = s.published["ebs"]["snapshot_id"]
    assert (tmp_path / "staging" / "ebs-pending" / f"{snap}.json").exists()
    assert store.pending_snapshots() == {} and verify(store).leftovers == []
    assert not (tmp_path / "staging" / "ebs-pending" / f"{snap}.json").exists()
    prune(store, "j", 1)
    ids = [x["SnapshotId"] for x in moto.boto3_client("ec2").describe_snapshots(
        OwnerIds=["self"])["Snapshots"]]
    assert snap in ids, "prune deleted the snapshot of a published run"
    store.restore_snapshot("j", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == content


def test_two_publishes_of_one_run_leave_one_record_and_report_the_other_snapshot(
        tmp_path, moto, capture, monkeypatch):
    """Two publishes of one run at once (`smsblock publish` twice): the first record
    written stays, both callers get it, and the other snapshot stays pending (a
    leftover that prune deletes), never complete and unreported.  Found in review."""
    import threading
    from smsblock.errors import PublishError
    from smsblock.publish import ebs as E
    store = ebs_store(tmp_path, capture.url)
    disk = tmp_path / "disk.raw"
    make_disk(disk, 5)
    capture.add(Rule("status", method="POST", path=r"^/snapshots$", status=403,
                     code="AccessDeniedException"))
    with pytest.raises(PublishError) as failed:
        replicate(disk, store, "c")
    run = failed.value.run_id
    capture.clear()
    both = threading.Barrier(2)
    real = E.EbsPublisher._snapshot
    monkeypatch.setattr(E.EbsPublisher, "_snapshot",
                        lambda self, *a: (both.wait(10), real(self, *a))[1])
    got = []
    threads = [threading.Thread(target=lambda: got.append(store.publish_run("c", run)["ebs"]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    recorded = store.snapshot_record("c", run)
    assert got == [recorded, recorded]
    tagged = [x["SnapshotId"] for x in moto.boto3_client("ec2").describe_snapshots(
        OwnerIds=["self"])["Snapshots"] if {"Key": "smsblock:run", "Value": run} in x.get("Tags", [])]
    others = [x for x in tagged if x != recorded["snapshot_id"]]
    assert len(others) == 1 and verify(store).leftovers == [f"ebs-pending:{others[0]}"]
    prune(store, "c", 1)
    assert verify(store).leftovers == [] and store.snapshot_record("c", run) == recorded


def test_a_run_publishes_under_the_lock_it_holds(tmp_path, moto, bucket, capture, monkeypatch):
    """replicate publishes the run it committed under its own shared lock, without a
    second one, which an S3 store refuses while a prune's exclusive lock object stands
    (a prune on another host about to give up).  Found in review: the committed run
    failed with StoreLockedError, not a publish error."""
    from smsblock.backend import s3 as B
    from smsblock.repository.repository import Repository
    from smsblock.store.s3 import S3Store
    staging = S3Store(f"s3://{bucket}/staging", endpoint_url=moto.url)
    store = EbsStore("ebs://us-east-1", staging=staging, endpoint_url=capture.url)
    store.initialise(StoreConfig(pack_size=1 << 20))
    disk = tmp_path / "disk.raw"
    make_disk(disk, 6)
    real = Repository.publish_committed
    lock_body = staging.backend._lock_body("prune")

    def publish_committed(self, *a, **k):
        self.backend._put(B.LOCK_EXCLUSIVE, lock_body, "a prune on another host")
        try:
            return real(self, *a, **k)
        finally:
            self.backend._delete(B.LOCK_EXCLUSIVE, "test")
    monkeypatch.setattr(Repository, "publish_committed", publish_committed)
    s = replicate(disk, store, "n")
    assert s.published["ebs"]["snapshot_id"].startswith("snap-")


def test_a_damaged_or_misplaced_record_is_refused_and_skipped_as_a_parent(tmp_path, moto, capture):
    """A record is checked against the run and region it is read for; a damaged one
    is an error where it is asked for by name, and taken as not published where runs
    are listed or a parent is looked for, so one bad record stops nothing else."""
    from smsblock.errors import StoreCorruptError
    store, first, second = two_runs(tmp_path, capture.url, "bad", 11)
    run1, run2 = store.list_run_ids("bad")
    records = tmp_path / "staging" / "ebs-snapshots" / "us-east-1" / "bad"
    snap1 = store.snapshot_record("bad", run1)["snapshot_id"]
    (records / f"{run2}.json").write_bytes((records / f"{run1}.json").read_bytes())
    with pytest.raises(StoreCorruptError, match="run_id"):
        store.snapshot_record("bad", run2)
    (records / f"{run2}.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match="not JSON"):
        store.snapshot_record("bad", run2)
    assert [r.summary["snapshot_id"] for r in store.runs("bad")] == [snap1, None]
    s3 = replicate(tmp_path / "disk.raw", store, "bad")
    assert s3.published["ebs"]["parent_snapshot_id"] == snap1
    store.restore_snapshot("bad", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == second


def test_a_record_whose_run_is_gone_is_a_leftover(tmp_path, moto, capture, monkeypatch):
    """Prune deletes a run, then its snapshot record: when the second step fails (or
    the process dies between them), the record is reported by verify and removed by the
    next prune, never taken for a run; a record whose run exists is never removed so."""
    from smsblock.errors import StoreError, UsageError
    from smsblock.publish import ebs as E
    store, first, second = two_runs(tmp_path, capture.url, "orph", 12)
    run1, run2 = store.list_run_ids("orph")
    real_forget = E.EbsPublisher.forget

    def failing_forget(self, server_id, run_id):
        raise StoreError("delete snapshot record: connection reset (test)")
    monkeypatch.setattr(E.EbsPublisher, "forget", failing_forget)
    with pytest.raises(StoreError, match="connection reset"):
        prune(store, "orph", 1)
    monkeypatch.setattr(E.EbsPublisher, "forget", real_forget)
    assert store.list_run_ids("orph") == [run2]
    assert verify(store).leftovers == [f"ebs-record:orph/{run1}"]
    with pytest.raises(UsageError, match="exists"):
        store.remove_leftover(f"ebs-record:orph/{run2}")
    prune(store, "orph", 1)
    assert verify(store).leftovers == [] and store.snapshot_record("orph", run2) is not None
    store.restore_snapshot("orph", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == second
