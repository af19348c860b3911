"""EBS as a publisher: after a run's manifest is committed to the repository, the run also
becomes an EBS snapshot (EBS direct APIs); and the one EBS uploader the image step's EC2
target uses too.

:class:`EbsUploader` is the one place smsblock talks to the EBS direct APIs: one retry
policy (:class:`~smsblock.backend.retry.RetryPolicy`, botocore's own retries off), one
bandwidth cap (:class:`~smsblock.backend.throttle.TokenBucket`), one checksum code
(:func:`block_checksum`, :func:`linear_checksum`): ``StartSnapshot``,
``PutSnapshotBlock`` (512 KiB blocks, base64 SHA-256, ``parallel`` at a time),
``CompleteSnapshot``, ``ListSnapshotBlocks``/``GetSnapshotBlock`` (checksums checked),
waiting for and deleting snapshots.

:class:`EbsPublisher` turns a run into a snapshot (:meth:`EbsPublisher.publish`):

1. ``StartSnapshot`` with ``ParentSnapshotId`` = the previous run's snapshot (none for a
   first run, or when block or disk size changed), tags ``smsblock:server``/``smsblock:run``;
   the snapshot id goes into the repository's journal (``ebs-pending/``) at once;
2. ``PutSnapshotBlock`` for exactly the blocks that changed since the previous run (the
   manifest diff).  Blocks that became zero or unallocated are written as zeros, so the
   parent's old data does not show through;
3. ``CompleteSnapshot`` with ``ChangedBlocksCount`` and the linear aggregate checksum:
   SHA-256 over the concatenated per-block SHA-256 digests in block-index order, base64;
4. the snapshot id, its parent and the chain of ancestors go into the manifest's
   ``meta["ebs"]``; the caller puts the manifest and then clears the journal entry.

Snapshots need 512 KiB blocks (the engine's default block size).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Iterator

import numpy as np

from ..backend.retry import RetryPolicy, error_code
from ..backend.s3config import CloudSettings
from ..backend.throttle import ThrottledBody, TokenBucket
from ..disk import DiskInfo, Extent, ExtentKind
from ..disk.blocks import BlockDisk
from ..errors import StoreCorruptError, StoreError
from ..manifest import BlockState, Manifest, diff
from ..progress import check_cancel
from ..repository.repository import Repository
from ..repository.rundisk import RunDisk

log = logging.getLogger("smsblock.store.ebs")

EBS_BLOCK = 512 << 10
GIB = 1 << 30
PENDING_DIR = "ebs-pending"
SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{8,32}")


def block_checksum(data) -> bytes:
    """The raw SHA-256 digest EBS checks a block against (sent base64)."""
    return hashlib.sha256(data).digest()


def linear_checksum(digests_in_index_order) -> str:
    """CompleteSnapshot's LINEAR aggregate: base64 SHA-256 over the per-block SHA-256
    digests concatenated in ascending block-index order."""
    h = hashlib.sha256()
    for d in digests_in_index_order:
        h.update(d)
    return base64.b64encode(h.digest()).decode()


def blocks_to_write(previous: Manifest | None, manifest: Manifest) -> np.ndarray:
    """Block indices a snapshot with ``previous``'s snapshot as parent must be given:
    every changed block (zeroed ones included); for a first snapshot, the data blocks."""
    if previous is None:
        return np.flatnonzero(manifest.states == BlockState.DATA).astype(np.int64)
    changed = np.asarray(diff(previous, manifest), np.int64)
    # diff counts every block past the shorter disk as changed: past the new disk's end
    # there is nothing to write, and past the parent's end (a grown disk) the volume
    # reads zeros already, so only data blocks need writing there
    changed = changed[changed < manifest.n_blocks]
    tail = changed >= previous.n_blocks
    return changed[~tail | (manifest.states[changed] == BlockState.DATA)]


def check_snapshot_id(snapshot_id) -> str:
    # the id becomes an object name: never a path, whatever the endpoint answered
    if not isinstance(snapshot_id, str) or not SNAPSHOT_ID.fullmatch(snapshot_id):
        raise StoreError(f"EBS returned a malformed snapshot id {snapshot_id!r}")
    return snapshot_id


# --- the one EBS uploader ----------------------------------------------------------------

class EbsUploader:
    """EBS direct APIs (and the EC2 calls around snapshots) under one retry policy and
    one bandwidth cap; see the module docstring."""

    def __init__(self, settings: CloudSettings, *, ebs=None, ec2=None):
        self.settings = settings
        self.ebs = ebs if ebs is not None else settings.client("ebs", max_pool=settings.parallel)
        self._ec2 = ec2
        self.retry = RetryPolicy(settings.retry_attempts, settings.retry_seconds)
        self._limit = TokenBucket(settings.bandwidth) if settings.bandwidth else None

    @property
    def ec2(self):
        if self._ec2 is None:
            self._ec2 = self.settings.client("ec2")
        return self._ec2

    def call(self, what: str, fn):
        """``fn()`` under the retry policy; ``what`` names it in logs and errors."""
        return self.retry.call(what, fn)

    def _body(self, data: bytes):
        return ThrottledBody(data, self._limit) if self._limit else data

    def start(self, *, volume_gib: int, description: str, tags: dict,
              parent: str | None = None, client_token: str | None = None) -> str:
        kw = dict(VolumeSize=volume_gib, Description=description[:255],
                  Tags=[{"Key": k, "Value": str(v)} for k, v in tags.items()])
        if client_token:
            kw["ClientToken"] = client_token
        if parent:
            kw["ParentSnapshotId"] = parent
        r = self.call(f"start snapshot ({description[:80]})", lambda: self.ebs.start_snapshot(**kw))
        return check_snapshot_id(r["SnapshotId"])

    def put_block(self, snap: str, index: int, data: bytes) -> bytes:
        """Send one block (zero-padded to 512 KiB); return its SHA-256 digest."""
        if len(data) < EBS_BLOCK:
            data = bytes(data) + bytes(EBS_BLOCK - len(data))
        digest = block_checksum(data)
        b64 = base64.b64encode(digest).decode()
        self.call(f"put block {index} of snapshot {snap}", lambda: self.ebs.put_snapshot_block(
            SnapshotId=snap, BlockIndex=index, BlockData=self._body(data), DataLength=EBS_BLOCK,
            Checksum=b64, ChecksumAlgorithm="SHA256"))
        return digest

    def put_blocks(self, snap: str, indexes, read_block: Callable[[int], bytes | None], *,
                   skip_zero: bool = False, cancel=None,
                   on_block: Callable[[int], None] | None = None) -> dict[int, bytes]:
        """Send blocks ``indexes`` (any iterable, consumed as it goes; ``read_block(i)``:
        bytes, None for zeros), ``parallel`` at a time with a window of futures (at most
        ~2 * parallel blocks in memory); ``skip_zero``: an all-zero block is not sent (a
        new snapshot reads it as zeros).  ``on_block(i)`` runs in this thread after each
        block, in order.  Returns ``{index: digest}`` of the blocks sent."""
        from .._deflate import is_zero
        digests: dict[int, bytes] = {}
        lock = threading.Lock()
        zeros = bytes(EBS_BLOCK)

        def put(i: int) -> None:
            check_cancel(cancel)
            data = read_block(i)
            if skip_zero and (data is None or is_zero(data)):
                return
            digest = self.put_block(snap, i, zeros if data is None else data)
            with lock:
                digests[i] = digest

        window = 2 * self.settings.parallel
        it = iter(indexes)
        with ThreadPoolExecutor(self.settings.parallel, thread_name_prefix="smsblock-ebs") as pool:
            while True:
                batch = [int(i) for _, i in zip(range(window), it)]
                if not batch:
                    return digests
                futures = [(i, pool.submit(put, i)) for i in batch]
                try:
                    for i, fut in futures:
                        fut.result()
                        check_cancel(cancel)        # cancelled by the last on_block, say
                        if on_block is not None:
                            on_block(i)
                except BaseException:
                    for _, fut in futures:
                        fut.cancel()
                    raise

    def complete(self, snap: str, changed: int, digests: dict[int, bytes] | None = None) -> str | None:
        """CompleteSnapshot; with ``digests``, the linear aggregate checksum (returned)."""
        kw = dict(SnapshotId=snap, ChangedBlocksCount=changed)
        checksum = None
        if digests is not None:
            checksum = linear_checksum(digests[i] for i in sorted(digests))
            kw.update(Checksum=checksum, ChecksumAlgorithm="SHA256",
                      ChecksumAggregationMethod="LINEAR")
        self.call(f"complete snapshot {snap}", lambda: self.ebs.complete_snapshot(**kw))
        return checksum

    def wait_completed(self, snap: str, cancel=None, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            state = self.call(f"look at snapshot {snap}", lambda: self.ec2.describe_snapshots(
                SnapshotIds=[snap]))["Snapshots"][0].get("State")
            if state == "completed":
                return
            if state == "error":
                raise StoreError(f"EBS snapshot {snap} ended in state error")
            if time.monotonic() > deadline:
                raise StoreError(f"EBS snapshot {snap} still {state} after {timeout:.0f} s")
            check_cancel(cancel)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def delete_snapshot(self, snap: str) -> None:
        """Delete a snapshot (one that is gone already is fine)."""
        def delete():
            try:
                self.ec2.delete_snapshot(SnapshotId=snap)
            except Exception as e:
                if error_code(e) not in ("InvalidSnapshot.NotFound",):
                    raise
        self.call(f"delete snapshot {snap}", delete)

    def list_blocks(self, snap: str) -> Iterator[tuple[int, str]]:
        kw = {"SnapshotId": snap}
        while True:
            r = self.call(f"list blocks of snapshot {snap}",
                          lambda kw=dict(kw): self.ebs.list_snapshot_blocks(**kw))
            for b in r.get("Blocks", []):
                yield int(b["BlockIndex"]), b["BlockToken"]
            if not r.get("NextToken"):
                return
            kw["NextToken"] = r["NextToken"]

    def get_block(self, snap: str, i: int, token: str, where: str) -> bytes:
        """A block of a snapshot, checked against its SHA-256 checksum."""
        def get():
            r = self.ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=i, BlockToken=token)
            data = r["BlockData"].read()
            want = r.get("Checksum")
            if want and base64.b64encode(block_checksum(data)).decode() != want:
                raise StoreCorruptError(f"block {i} of snapshot {snap} fails its SHA-256 checksum",
                                        where, i * EBS_BLOCK)
            return data
        return self.call(f"get block {i} of snapshot {snap}", get)


# --- the publisher -------------------------------------------------------------------------

class Journal:
    """Small JSON objects in the repository's backend, one per pending snapshot."""

    def __init__(self, repository: Repository):
        self.backend = repository.backend

    def put(self, snapshot_id: str, record: dict) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        self.backend.put(f"{PENDING_DIR}/{check_snapshot_id(snapshot_id)}.json", data)

    def remove(self, snapshot_id: str) -> None:
        self.backend.delete(f"{PENDING_DIR}/{check_snapshot_id(snapshot_id)}.json")

    def records(self) -> dict[str, dict]:
        out = {}
        for name, st in self.backend.list(f"{PENDING_DIR}/").items():
            base = name.split("/")[-1]
            if name.count("/") == 1 and base.endswith(".json") \
                    and SNAPSHOT_ID.fullmatch(base[:-5]) and st.size <= 1 << 20:
                data = self.backend.get(name)
                try:
                    out[base[:-5]] = json.loads(data)
                except (TypeError, ValueError):
                    continue
        return out


class EbsPublisher:
    """Publishes a repository's runs as EBS snapshots (see the module docstring)."""

    def __init__(self, repository: Repository, uploader: EbsUploader, region: str, url: str):
        self.repository = repository
        self.uploader = uploader
        self.region = region
        self.url = url
        self.journal = Journal(repository)

    def _previous(self, server_id: str, run_id: str) -> Manifest | None:
        earlier = [r for r in self.repository.list_run_ids(server_id) if r < run_id]
        return self.repository.load_manifest(server_id, earlier[-1]) if earlier else None

    def publish(self, server_id: str, run_id: str, manifest: Manifest) -> dict:
        """Turn a run (its manifest, blocks in the repository) into a completed EBS
        snapshot; return what goes into ``meta["ebs"]``.  The snapshot stays in the
        journal until :meth:`done` (after the manifest is put)."""
        if manifest.block_size != EBS_BLOCK:
            raise StoreError(f"{self.url}: EBS snapshots need 512 KiB blocks; this run has "
                             f"{manifest.block_size} (replicate with --block-size 512K)")
        for snap, rec in self.journal.records().items():
            if rec.get("server_id") == server_id:
                log.warning("%s: snapshot %s of an unfinished run %s of %s is still pending "
                            "(prune deletes it)", self.url, snap, rec.get("run_id"), server_id)
        previous = self._previous(server_id, run_id)
        prev_ebs = (previous.meta.get("ebs") or {}) if previous is not None else {}
        parent = prev_ebs.get("snapshot_id")
        if parent and (previous.block_size != manifest.block_size
                       or previous.disk_size > manifest.disk_size):
            parent = None           # a volume cannot shrink: start a new lineage
        if parent is None:
            previous = None
        volume_gib = max(1, -(-manifest.disk_size // GIB))
        todo = blocks_to_write(previous, manifest)
        snap = self.uploader.start(
            volume_gib=volume_gib, description=f"smsblock run {run_id} of {server_id}",
            tags={"smsblock:server": server_id, "smsblock:run": run_id}, parent=parent,
            client_token=hashlib.sha256(f"{server_id}/{run_id}".encode()).hexdigest())
        self.journal.put(snap, {"server_id": server_id, "run_id": run_id, "parent": parent,
                                "started": datetime.now(timezone.utc).isoformat()})
        log.info("%s: snapshot %s (parent %s): %d blocks to write", self.url, snap, parent, len(todo))
        run = RunDisk(self.repository, manifest)
        digests = self.uploader.put_blocks(snap, todo, run.block)
        checksum = self.uploader.complete(snap, len(todo), digests)
        chain = [snap] + list(prev_ebs.get("chain", [])) if parent else [snap]
        return {"snapshot_id": snap, "parent_snapshot_id": parent, "chain": chain,
                "region": self.region, "volume_size_gib": volume_gib,
                "changed_blocks": int(len(todo)), "checksum": checksum}

    def done(self, info: dict) -> None:
        """The run's manifest is in: its snapshot is no longer pending."""
        self.journal.remove(info["snapshot_id"])

    def pending(self) -> dict[str, dict]:
        """Snapshots started by runs that never published: ``{snapshot_id: record}``."""
        return self.journal.records()

    def delete_pending(self, snap: str) -> None:
        self.uploader.delete_snapshot(check_snapshot_id(snap))
        self.journal.remove(snap)

    def snapshot_disk(self, manifest: Manifest) -> "SnapshotDisk":
        info = manifest.meta.get("ebs")
        if not info:
            raise StoreError(f"{self.url}: run {manifest.meta.get('server_id')}/"
                             f"{manifest.meta.get('run_id')} has no snapshot")
        return SnapshotDisk(self.uploader, list(info["chain"]), manifest.disk_size,
                            f"{self.url}/{info['snapshot_id']}", manifest)


class SnapshotDisk(BlockDisk):
    """A read-only Disk over an EBS snapshot chain (newest first): a block is read from
    the newest snapshot in the chain whose ``ListSnapshotBlocks`` lists it (AWS lists a
    child's inherited blocks too; moto lists only blocks written to that snapshot, so
    the parents are asked as well)."""

    def __init__(self, uploader: EbsUploader, chain: list[str], size: int, path: str,
                 manifest: Manifest | None = None):
        super().__init__()
        self.block_size = EBS_BLOCK
        self.uploader = uploader
        self.manifest = manifest
        self.chain = chain
        self.path = path
        self.size = size
        self.info = DiskInfo(path=path, format="ebs-snapshot", virtual_size=size)
        self._where: dict[int, tuple[str, str]] = {}
        for snap in reversed(chain):            # older first: newer entries override
            for index, token in uploader.list_blocks(snap):
                self._where[index] = (snap, token)

    def fetch_block(self, i: int) -> bytes | None:
        """Block ``i`` from the newest snapshot that has it; None when the snapshot
        chain never had it (reads as zeros)."""
        where = self._where.get(i)
        if where is None:
            if self.manifest is not None and self.manifest.entry(i)[0] == BlockState.DATA:
                raise StoreCorruptError(f"block {i} is data in the run but in no snapshot of "
                                        f"{self.chain}", self.path, i * EBS_BLOCK)
            return None
        snap, token = where
        data = self.uploader.get_block(snap, i, token, self.path)
        return data[:max(0, min(EBS_BLOCK, self.size - i * EBS_BLOCK))]

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        start, end = self._clip(start, end)
        run = None                                   # merged [lo, hi) of listed blocks
        for i in sorted(self._where):
            lo, hi = max(start, i * EBS_BLOCK), min(end, (i + 1) * EBS_BLOCK, self.size)
            if lo >= hi:
                continue
            if run is not None and run[1] == lo:
                run[1] = hi
                continue
            if run is not None:
                yield Extent(run[0], run[1] - run[0], ExtentKind.DATA)
            run = [lo, hi]
        if run is not None:
            yield Extent(run[0], run[1] - run[0], ExtentKind.DATA)
