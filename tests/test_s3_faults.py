"""S3 stores under faults and damage, against moto in server mode through the fault proxy:
requests whose answers are lost (the lock, pack uploads), prune under resets, 503s,
stalls and cut answers, first runs racing on a fresh prefix, damaged packs in S3."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cloud_fixtures import *  # noqa: F401,F403  (fixtures)
from cloud_fixtures import FAST
from fault_proxy import Rule

from smsblock.engine import prune, replicate, restore, verify
from smsblock.errors import SmsBlockError
from smsblock.store import StoreConfig
from smsblock.store.s3 import S3Store

ROOT = Path(__file__).resolve().parent.parent
BS = 64 << 10
N_BLOCKS = 24
PACK_SIZE = 128 << 10             # ~4 compressed blocks a pack: single PUTs

pytestmark = pytest.mark.timeout(180)


def make_disk(path: Path, seed: int, base: bytes | None = None, change: int = 6) -> bytes:
    rng = np.random.default_rng(seed)
    if base is None:
        data = rng.integers(0, 16, N_BLOCKS * BS, dtype=np.uint8)
    else:
        data = np.frombuffer(base, np.uint8).copy()
        for i in rng.choice(N_BLOCKS, change, replace=False):
            data[i * BS:(i + 1) * BS] = rng.integers(0, 16, BS, dtype=np.uint8)
    raw = data.tobytes()
    path.write_bytes(raw)
    return raw


def new_store(url: str, **kw) -> S3Store:
    return S3Store(url, **{**FAST, **kw})


def lock_keys(moto, bucket, prefix) -> list[str]:
    r = moto.boto3_client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/locks/")
    return [o["Key"] for o in r.get("Contents", [])]


def restores(store, server, content, tmp_path) -> None:
    out = tmp_path / "out.raw"
    restore(store, server, out)
    assert out.read_bytes() == content


# --- first runs racing ------------------------------------------------------------------

def test_first_runs_of_two_servers_racing_on_a_fresh_prefix_both_succeed(tmp_path, bucket,
                                                                       fault_proxy):
    """Server B finds no store, then lists the prefix only after server A created it
    and stored packs: B must take A's store, not call it somebody else's prefix."""
    url = f"s3://{bucket}/race"
    disk_a, disk_b = tmp_path / "a.raw", tmp_path / "b.raw"
    content_a, content_b = make_disk(disk_a, 1), make_disk(disk_b, 2)
    fault_proxy.add(Rule("delay", method="GET", path=r"prefix=race%2F(&|$)", stall=2.0))
    result = {}

    def run_b():
        try:
            result["b"] = replicate(disk_b, new_store(url, endpoint_url=fault_proxy.url), "b",
                                    block_size=BS)
        except BaseException as e:          # reported below
            result["b"] = e
    t = threading.Thread(target=run_b)
    t.start()
    while not fault_proxy.requests("GET", r"prefix=race%2F(&|$)") and t.is_alive():
        threading.Event().wait(0.01)
    a = replicate(disk_a, new_store(url), "a", block_size=BS)      # while B's listing waits
    t.join(60)
    assert not isinstance(result["b"], BaseException), result["b"]
    assert fault_proxy.faults(), "B's listing was not held back past A's creation"
    store = new_store(url)
    assert a.blocks_stored == N_BLOCKS and result["b"].blocks_stored == N_BLOCKS
    restores(store, "a", content_a, tmp_path)
    restores(store, "b", content_b, tmp_path)
    assert verify(store).ok


# --- requests whose answers were lost -------------------------------------------------------

@pytest.mark.parametrize("action", ["drop", "hang"])
def test_a_lock_request_whose_answer_was_lost_does_not_lock_out_its_holder(tmp_path, moto, bucket,
                                                                          fault_proxy, action):
    url = f"s3://{bucket}/lost"
    store = new_store(url, endpoint_url=fault_proxy.url, read_timeout=1)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "d.raw"
    content = make_disk(disk, 3)
    # the shared lock's PUT of a run lands, its answer is lost
    fault_proxy.add(Rule(action, method="PUT", path=r"/locks/shared-", stall=2))
    replicate(disk, store, "s", block_size=BS)
    assert lock_keys(moto, bucket, "lost") == []
    # prune's conditional PUT of the exclusive lock lands, its answer is lost: the retry
    # gets 412 from the object it made itself
    fault_proxy.add(Rule(action, method="PUT", path=r"/locks/exclusive\.json", stall=2))
    prune(store, "s", 1)
    assert [r.fault for r in fault_proxy.faults()] == [action, action]
    assert lock_keys(moto, bucket, "lost") == [], "prune left its own lock behind"
    # and the release's answer lost: still released, the next prune (same process) runs
    fault_proxy.add(Rule(action, method="DELETE", path=r"/locks/exclusive\.json", stall=2))
    prune(store, "s", 1)
    assert lock_keys(moto, bucket, "lost") == []
    prune(new_store(url), "s", 1)
    restores(store, "s", content, tmp_path)


@pytest.mark.parametrize("action", ["drop", "hang"])
def test_a_pack_upload_whose_answer_was_lost_is_not_sent_again(tmp_path, moto, bucket, fault_proxy,
                                                               action):
    """A pack PUT (and a multipart part) that reached S3 but whose answer was lost: the
    retry asks S3 first and does not send the pack's blocks a second time."""
    url = f"s3://{bucket}/once-{action}"
    store = new_store(url, endpoint_url=fault_proxy.url, read_timeout=1)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "d.raw"
    content = make_disk(disk, 4)
    fault_proxy.add(Rule(action, method="PUT", path=r"/packs/.*\.pack$", skip=1, times=2, stall=2))
    replicate(disk, store, "s", block_size=BS)
    puts = fault_proxy.requests("PUT", r"/packs/.*\.pack$")
    assert len(fault_proxy.faults()) == 2
    sent = [r.path.split("?")[0] for r in puts]
    assert len(sent) == len(set(sent)), "a pack was sent twice"
    restores(store, "s", content, tmp_path)
    # multipart: a part's answer lost
    url = f"s3://{bucket}/parts-{action}"
    store = new_store(url, endpoint_url=fault_proxy.url, read_timeout=1)
    store.initialise(StoreConfig(pack_size=1 << 20))                # ~8 parts a pack
    fault_proxy.clear()
    fault_proxy.add(Rule(action, method="PUT", path=r"partNumber=2\b", times=1, stall=2),
                    Rule(action, method="POST", path=r"uploadId=", times=1, stall=2))   # complete
    replicate(disk, store, "s", block_size=BS)
    parts = [r.path for r in fault_proxy.requests("PUT", r"partNumber=")]
    assert len(fault_proxy.faults()) == 2 and len(parts) == len(set(parts)), "a part was sent twice"
    restores(store, "s", content, tmp_path)
    assert verify(store).ok


# --- prune under faults ----------------------------------------------------------------------

PRUNE_FAULTS = [        # each kind of fault, and each kind of request prune makes
    ("cut", "GET", r"/packs/"), ("truncate", "GET", r"/packs/"), ("drop", "DELETE", r"/packs/"), ("hang", "PUT", r"/packs/"),
    ("truncate", "GET", r"list-type=2"), ("truncate", "GET", r"/runs/"), ("stall", "GET", r"/runs/"),
    ("status", "PUT", r"/locks/"),
]


def _copy_prefix(s3, bucket, src, dst) -> None:
    for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{src}/").get("Contents", []):
        s3.copy_object(Bucket=bucket, Key=f"{dst}/{o['Key'][len(src) + 1:]}",
                       CopySource={"Bucket": bucket, "Key": o["Key"]})


def test_prune_retries_faults_like_replicate(tmp_path, moto, bucket, fault_proxy):
    """Each fault, twice, on each kind of request prune makes (a copy of one store each
    time): prune completes, and leaves the store as a clean prune does."""
    disk = tmp_path / "d.raw"
    first = make_disk(disk, 5)
    seed = new_store(f"s3://{bucket}/seed")
    seed.initialise(StoreConfig(pack_size=PACK_SIZE))
    replicate(disk, seed, "s", block_size=BS)
    second = make_disk(disk, 6, first)
    replicate(disk, seed, "s")
    s3 = moto.boto3_client("s3")
    for n, (action, method, path) in enumerate(PRUNE_FAULTS):
        _copy_prefix(s3, bucket, "seed", f"p{n}")
        url = f"s3://{bucket}/p{n}"
        fault_proxy.clear()
        fault_proxy.add(Rule(action, method=method, path=path, times=1, stall=1.1))
        store = new_store(url, endpoint_url=fault_proxy.url, read_timeout=1)
        report = prune(store, "s", 1)
        assert fault_proxy.faults(), (action, method, path)
        assert len(report.runs_deleted) == 1 and report.packs_deleted + report.packs_rewritten > 0
        after = verify(new_store(url))
        assert after.ok and after.unreferenced_packs == 0 and after.leftovers == [], \
            (action, method, path, after.problems, after.leftovers)
    restores(new_store(url), "s", second, tmp_path)


def test_prune_that_cannot_get_through_fails_in_one_line(tmp_path, moto, bucket, fault_proxy):
    url = f"s3://{bucket}/down"
    store = new_store(url)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "d.raw"
    first = make_disk(disk, 7)
    replicate(disk, store, "s", block_size=BS)
    make_disk(disk, 8, first)
    replicate(disk, store, "s")
    env = dict(os.environ, PYTHONPATH=str(ROOT), AWS_ENDPOINT_URL=fault_proxy.url,
               **{f"SMSBLOCK_S3_{k.upper()}": str(v) for k, v in FAST.items()})
    env["SMSBLOCK_S3_RETRY_ATTEMPTS"] = "2"
    env["SMSBLOCK_S3_READ_TIMEOUT"] = "1"
    for action, method, path in [("reset", "DELETE", r"/packs/"), ("truncate", "GET", r"/packs/"),
                                 ("stall", "PUT", r"/locks/"), ("truncate", "GET", r"/runs/")]:
        fault_proxy.clear()
        fault_proxy.add(Rule(action, method=method, path=path, times=-1, stall=1.5))
        p = subprocess.run([sys.executable, "-m", "smsblock", "prune", "--store", url, "--server",
                            "s", "--keep", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        # retries are logged as warnings; a failure is one error line, never a traceback
        errors = [x for x in p.stderr.splitlines() if not x.startswith("smsblock: WARNING:")]
        assert "Traceback" not in p.stderr, (action, method, path, p.stderr)
        assert p.returncode == 0 or (len(errors) == 1 and errors[0].startswith("smsblock: error:")), \
            (action, method, path, p.stderr)
    fault_proxy.clear()
    prune(new_store(url), "s", 1)
    assert verify(new_store(url)).ok


# --- damage in S3 -------------------------------------------------------------------------------

def test_a_damaged_pack_in_s3_is_stored_again_and_pruned(tmp_path, moto, bucket):
    url = f"s3://{bucket}/dmg"
    store = new_store(url)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "d.raw"
    content = make_disk(disk, 9)
    replicate(disk, store, "s", block_size=BS)
    s3 = moto.boto3_client("s3")
    packs = sorted(store.list_packs())
    for victim, offset in ((packs[0], 300), (packs[1], 13)):      # a frame; a header byte
        key = f"dmg/packs/{victim[:2]}/{victim}.pack"
        raw = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        raw[offset] ^= 0x5A
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    fresh = new_store(url)
    report = verify(fresh)
    assert not report.ok and report.damaged_packs == 2
    s = replicate(disk, new_store(url), "s")
    assert s.blocks_changed == 0 and s.blocks_stored > 1, "the damaged blocks were stored again"
    restores(new_store(url), "s", content, tmp_path)
    prune(new_store(url), "s", 1)
    after = verify(new_store(url))
    assert after.ok and after.damaged_packs == 0, after.problems
    restores(new_store(url), "s", content, tmp_path)


def test_a_pack_cut_short_in_s3_is_not_built_upon_through_the_index_cache(tmp_path, moto, bucket):
    """The local index cache verifies itself by the pack id, but the object in S3 may be
    gone or cut short since: the next run must store those blocks again."""
    url = f"s3://{bucket}/short"
    store = new_store(url)
    store.initialise(StoreConfig(pack_size=PACK_SIZE))
    disk = tmp_path / "d.raw"
    content = make_disk(disk, 10)
    replicate(disk, store, "s", block_size=BS)
    victim = sorted(store.list_packs())[0]
    key = f"short/packs/{victim[:2]}/{victim}.pack"
    s3 = moto.boto3_client("s3")
    raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=raw[:len(raw) // 2])
    n_blocks = len(store.pack_index(victim, len(raw)))
    s = replicate(disk, new_store(url), "s")
    assert s.blocks_stored == n_blocks, "blocks of the cut pack were taken from the cache"
    restores(new_store(url), "s", content, tmp_path)
    prune(new_store(url), "s", 1)
    restores(new_store(url), "s", content, tmp_path)
