"""EBS as a publisher: once a run's manifest is committed (the run exists, its blocks
durable in the repository), the run also becomes an EBS snapshot (EBS direct APIs),
recorded beside the run; and the one EBS uploader the image step's EC2 target uses too.

:class:`EbsUploader` is the one place smsblock talks to the EBS direct APIs: one retry
policy (:class:`~smsblock.backend.retry.RetryPolicy`, botocore's own retries off), one
bandwidth cap (:class:`~smsblock.backend.throttle.TokenBucket`), one checksum code
(:func:`block_checksum`, :func:`linear_checksum`): ``StartSnapshot``,
``PutSnapshotBlock`` (512 KiB blocks, base64 SHA-256, ``parallel`` at a time),
``CompleteSnapshot``, ``ListSnapshotBlocks``/``GetSnapshotBlock`` (checksums checked),
waiting for and deleting snapshots.

:class:`EbsPublisher` publishes a committed run (:meth:`EbsPublisher.publish`, run by
:meth:`Repository.publish_run <smsblock.repository.repository.Repository.publish_run>`):

1. ``StartSnapshot`` with ``ParentSnapshotId`` = the snapshot of the server's newest
   earlier *published* run (none for a first run, when block size changed or the disk
   shrank), tags ``smsblock:server``/``smsblock:run``; the snapshot id goes into the
   repository's journal (``ebs-pending/``) at once;
2. ``PutSnapshotBlock`` for exactly the blocks that changed since that run (the manifest
   diff).  Blocks that became zero or unallocated are written as zeros, so the parent's
   old data does not show through;
3. ``CompleteSnapshot`` with ``ChangedBlocksCount`` and the linear aggregate checksum:
   SHA-256 over the concatenated per-block SHA-256 digests in block-index order, base64;
4. the record (snapshot id, parent, the chain of ancestors) is written to
   ``ebs-snapshots/<region>/<server_id>/<run_id>.json`` and the journal entry removed.

A run whose publish failed or died stays a run (it restores from the packs); publishing
it again, or the next run, starts from the last published run.  Stores written before
records moved here keep them in the manifest's ``meta["ebs"]``; :meth:`EbsPublisher.record`
reads both.

Snapshots need 512 KiB blocks (the engine's default block size).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
import secrets
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
from ..errors import RunNotFoundError, StoreCorruptError, StoreError, UsageError
from ..manifest import BlockState, Manifest, ManifestReader, entry_batches, iter_diff
from ..progress import check_cancel, with_phase
from ..repository.repository import Repository, check_run_id, check_server_id
from ..repository.rundisk import RunDisk

log = logging.getLogger("smsblock.store.ebs")

EBS_BLOCK = 512 << 10
GIB = 1 << 30
PENDING_DIR = "ebs-pending"
RECORDS_DIR = "ebs-snapshots"   # RECORDS_DIR/<region>/<server_id>/<run_id>.json: a published run
MAX_RECORD = 1 << 20            # bytes of a record read back (a chain of ~20,000 snapshots)
SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{8,32}")
LIST_PAGE = 10000               # ListSnapshotBlocks' largest page
LOOKUP_WINDOW = 8192            # blocks (4 GiB) whose tokens a SnapshotDisk holds at once


def block_checksum(data) -> bytes:
    """The raw SHA-256 digest EBS checks a block against (sent base64)."""
    return hashlib.sha256(data).digest()


def linear_checksum(digests_in_index_order) -> str:
    """CompleteSnapshot's LINEAR aggregate: base64 SHA-256 over the per-block SHA-256
    digests concatenated in ascending block-index order (computed by :class:`SentBlocks`,
    the one place that code lives)."""
    sent = SentBlocks()
    for i, digest in enumerate(digests_in_index_order):
        sent.add(i, digest)
    return sent.checksum


def iter_blocks_to_write(previous, manifest):
    """Block indices a snapshot with ``previous``'s snapshot as parent must be given, in
    ascending order, as int64 arrays of at most a window each: every changed block
    (zeroed ones included); for a first snapshot, the data blocks.  ``previous`` and
    ``manifest`` are :class:`Manifest` or :class:`ManifestReader`: memory is a window
    whatever the disks' sizes."""
    if previous is None:
        for indices, *_ in entry_batches(manifest):
            yield indices
        return
    for _start, _end, old_state, new_state, changed in iter_diff(previous, manifest):
        # past the new disk's end there is nothing to write; past the parent's end (a
        # grown disk) the volume reads zeros already, so only data blocks need writing
        if new_state is None or (old_state is None and new_state != BlockState.DATA):
            continue
        yield changed


def blocks_to_write(previous, manifest) -> np.ndarray:
    """:func:`iter_blocks_to_write` in one array (small manifests, tests)."""
    parts = list(iter_blocks_to_write(previous, manifest))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def check_snapshot_id(snapshot_id) -> str:
    # the id becomes an object name: never a path, whatever the endpoint answered
    if not isinstance(snapshot_id, str) or not SNAPSHOT_ID.fullmatch(snapshot_id):
        raise StoreError(f"EBS returned a malformed snapshot id {snapshot_id!r}")
    return snapshot_id


class SentBlocks:
    """The blocks a snapshot was given, in ascending index order: their ``count`` and
    the LINEAR aggregate ``checksum`` (:func:`linear_checksum`), kept as they go."""

    def __init__(self):
        self.count = 0
        self.last = -1
        self._sha = hashlib.sha256()

    def add(self, index: int, digest: bytes) -> None:
        if index <= self.last:      # the aggregate is defined in ascending index order
            raise UsageError(f"block {index} sent after block {self.last}: blocks go in "
                             "ascending order")
        self.last = index
        self.count += 1
        self._sha.update(digest)

    @property
    def checksum(self) -> str:
        return base64.b64encode(self._sha.digest()).decode()


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
                   on_block: Callable[[int], None] | None = None) -> "SentBlocks":
        """Send blocks ``indexes`` (ascending; any iterable, consumed as it goes;
        ``read_block(i)``: bytes, None for zeros), ``parallel`` at a time with a window
        of futures (at most ~2 * parallel blocks in memory); ``skip_zero``: an all-zero
        block is not sent (a new snapshot reads it as zeros).  ``on_block(i)`` runs in
        this thread after each block, in order.  Returns what was sent: its count and
        the linear aggregate checksum, built as the blocks go (memory does not follow
        their number)."""
        from .._deflate import is_zero
        zeros = bytes(EBS_BLOCK)
        sent = SentBlocks()

        def put(i: int) -> bytes | None:
            check_cancel(cancel)
            data = read_block(i)
            if skip_zero and (data is None or is_zero(data)):
                return None
            return self.put_block(snap, i, zeros if data is None else data)

        window = 2 * self.settings.parallel
        it = iter(indexes)
        with ThreadPoolExecutor(self.settings.parallel, thread_name_prefix="smsblock-ebs") as pool:
            while True:
                batch = [int(i) for _, i in zip(range(window), it)]
                if not batch:
                    return sent
                futures = [(i, pool.submit(put, i)) for i in batch]
                try:
                    for i, fut in futures:
                        digest = fut.result()
                        if digest is not None:
                            sent.add(i, digest)
                        check_cancel(cancel)        # cancelled by the last on_block, say
                        if on_block is not None:
                            on_block(i)
                except BaseException:
                    for _, fut in futures:
                        fut.cancel()
                    raise

    def complete(self, snap: str, changed: int, checksum: str | None = None) -> None:
        """CompleteSnapshot; with ``checksum`` (:attr:`SentBlocks.checksum`), the linear
        aggregate EBS checks the blocks against."""
        kw = dict(SnapshotId=snap, ChangedBlocksCount=changed)
        if checksum is not None:
            kw.update(Checksum=checksum, ChecksumAlgorithm="SHA256",
                      ChecksumAggregationMethod="LINEAR")
        self.call(f"complete snapshot {snap}", lambda: self.ebs.complete_snapshot(**kw))

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

    def list_block_pages(self, snap: str, start: int = 0) -> Iterator[list[tuple[int, str]]]:
        """Pages of ``(index, token)`` of a snapshot's blocks from block ``start`` on,
        each sorted.  AWS sorts across pages too; an endpoint that ignores
        ``StartingBlockIndex`` and order (moto) gives everything in one page, from which
        the blocks below ``start`` are dropped here."""
        kw = {"SnapshotId": snap, "MaxResults": LIST_PAGE}
        if start:
            kw["StartingBlockIndex"] = int(start)
        while True:
            r = self.call(f"list blocks of snapshot {snap}",
                          lambda kw=dict(kw): self.ebs.list_snapshot_blocks(**kw))
            yield sorted((int(b["BlockIndex"]), b["BlockToken"]) for b in r.get("Blocks", [])
                         if int(b["BlockIndex"]) >= start)
            if not r.get("NextToken"):
                return
            kw["NextToken"] = r["NextToken"]

    def list_blocks(self, snap: str, start: int = 0) -> Iterator[tuple[int, str]]:
        """``(index, token)`` of a snapshot's blocks from block ``start`` on, ascending."""
        for page in self.list_block_pages(snap, start):
            yield from page

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

def _checked_record(raw: bytes, where: str, expect: dict) -> dict:
    """A snapshot record read back, checked: its ids become API arguments, and it must
    be the record of the run and region asked for (``expect``; a key a record lacks, as
    records kept in manifests by earlier versions lack the run's ids, is not checked)."""
    if len(raw) > MAX_RECORD:
        raise StoreCorruptError(f"{where}: snapshot record larger than {MAX_RECORD} bytes", where)
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StoreCorruptError(f"{where}: snapshot record is not JSON", where) from None
    chain = record.get("chain") if isinstance(record, dict) else None
    if not isinstance(chain, list) or not chain \
            or not all(isinstance(c, str) and SNAPSHOT_ID.fullmatch(c) for c in chain) \
            or record.get("snapshot_id") != chain[0]:
        raise StoreCorruptError(f"{where}: snapshot record without a valid snapshot chain", where)
    for key, want in expect.items():
        if key in record and record[key] != want:
            raise StoreCorruptError(f"{where}: the snapshot record is for {key} "
                                    f"{str(record[key])[:80]!r}, not {want!r}", where)
    return record


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

    name = "ebs"

    def __init__(self, repository: Repository, uploader: EbsUploader, region: str, url: str):
        self.repository = repository
        self.uploader = uploader
        self.region = region
        self.url = url
        self.journal = Journal(repository)

    # -- records: what a published run's snapshot is --------------------------------------
    def _record_rel(self, server_id: str, run_id: str) -> str:
        # per region: one staging store may feed snapshots in several regions
        return (f"{RECORDS_DIR}/{self.region}/{check_server_id(server_id)}/"
                f"{check_run_id(run_id)}.json")

    def record(self, server_id: str, run_id: str) -> dict | None:
        """The run's snapshot record (``snapshot_id``, ``parent_snapshot_id``, ``chain``
        newest first, ``region``, ``volume_size_gib``, ``changed_blocks``, ``checksum``);
        None while the run is not published.  Stores written before records moved out of
        the manifest keep theirs in the manifest's ``meta["ebs"]``: read from there."""
        name = self._record_rel(server_id, run_id)
        raw = self.repository.backend.get(name, 0, MAX_RECORD + 1, what="read snapshot record")
        if raw is not None:
            return _checked_record(raw, f"{self.url}: {name}", {
                "server_id": server_id, "run_id": run_id, "region": self.region})
        try:
            with self.repository.open_manifest(server_id, run_id) as manifest:
                legacy = manifest.meta.get("ebs")
        except RunNotFoundError:
            return None
        if not legacy or (isinstance(legacy, dict) and legacy.get("region") != self.region):
            return None         # none, or a snapshot in another region
        return _checked_record(json.dumps(legacy).encode(), f"{self.url}: {server_id}/{run_id}",
                               {"region": self.region})

    def record_or_none(self, server_id: str, run_id: str) -> dict | None:
        """:meth:`record`, with a damaged record logged and taken as none: one bad
        record must not stop every later run's publish, nor the listing of runs."""
        try:
            return self.record(server_id, run_id)
        except StoreCorruptError as e:
            log.warning("%s: %s: taken as not published", self.url, e)
            return None

    def forget(self, server_id: str, run_id: str) -> None:
        """The run was deleted: so is its record (its snapshot stays in EBS)."""
        self.repository.backend.delete(self._record_rel(server_id, run_id),
                                       what="delete snapshot record")

    def orphan_records(self) -> list[tuple[str, str]]:
        """``(server_id, run_id)`` of records whose run is gone (a prune that died
        between deleting the run and its record): leftovers."""
        prefix = f"{RECORDS_DIR}/{self.region}/"
        runs: dict[str, set[str]] = {}
        out = []
        for name in self.repository.backend.names(prefix, what="list snapshot records"):
            parts = name[len(prefix):].split("/")
            if len(parts) != 2 or not parts[1].endswith(".json"):
                continue
            server_id, run_id = parts[0], parts[1][:-len(".json")]
            try:
                check_server_id(server_id)
                check_run_id(run_id)
            except UsageError:
                continue            # not a name this publisher writes
            if server_id not in runs:
                runs[server_id] = set(self.repository.list_run_ids(server_id))
            if run_id not in runs[server_id]:
                out.append((server_id, run_id))
        return sorted(out)

    def forget_orphan(self, server_id: str, run_id: str) -> None:
        """Delete the record of a run that is gone (never of a run that exists)."""
        if run_id in self.repository.list_run_ids(check_server_id(server_id)):
            raise UsageError(f"{self.url}: run {run_id} of {server_id} exists: its snapshot "
                             f"record is not a leftover")
        self.forget(server_id, run_id)

    def _base(self, server_id: str, run_id: str) -> tuple[str, dict] | tuple[None, None]:
        """The newest earlier run of the server that is published, and its record: the
        new snapshot's parent (a run that failed to publish is skipped)."""
        earlier = [r for r in self.repository.list_run_ids(server_id) if r < run_id]
        for other in reversed(earlier):
            record = self.record_or_none(server_id, other)
            if record is not None:
                return other, record
        return None, None

    # -- publishing ------------------------------------------------------------------------
    def check_block_size(self, block_size: int) -> None:
        if block_size != EBS_BLOCK:
            raise UsageError(f"{self.url}: EBS snapshots need 512 KiB blocks, not {block_size} "
                             f"(replicate with --block-size 512K)")

    def publish(self, server_id: str, run_id: str, *, progress=None, cancel=None) -> dict:
        """Turn a committed run (its manifest, blocks in the repository) into a
        completed EBS snapshot and record it; return the record.  A published run
        returns its record.  The snapshot is in the journal from its start until its
        record is written.  Both manifests are read a window at a time: memory does not
        follow the disk's size."""
        known = self.record(server_id, run_id)
        if known is not None:
            self._clear_journal(server_id, run_id, known)
            return known
        for snap, rec in self.pending().items():
            if rec.get("server_id") == server_id:
                log.warning("%s: snapshot %s of run %s of %s was never completed (prune "
                            "deletes it)", self.url, snap, rec.get("run_id"), server_id)
        with contextlib.ExitStack() as held:
            manifest = held.enter_context(self.repository.open_manifest(server_id, run_id))
            if manifest.block_size != EBS_BLOCK:
                raise StoreError(f"{self.url}: EBS snapshots need 512 KiB blocks; run {run_id} "
                                 f"of {server_id} has {manifest.block_size} (replicate with "
                                 f"--block-size 512K)")
            base_id, base = self._base(server_id, run_id)
            previous = None
            if base_id is not None:
                previous = held.enter_context(self.repository.open_manifest(server_id, base_id))
                if previous.block_size != manifest.block_size \
                        or previous.disk_size > manifest.disk_size:
                    previous = base = None      # a volume cannot shrink: a new lineage
            record = self._snapshot(server_id, run_id, manifest, previous, base, progress, cancel)
        # create-only: of two publishes of one run, the first record stays; the other's
        # snapshot stays in the journal, reported by verify and deleted by prune
        if not self.repository.backend.put(self._record_rel(server_id, run_id),
                                           json.dumps(record, sort_keys=True).encode(),
                                           create_only=True, what="write snapshot record"):
            known = self.record(server_id, run_id)
            log.warning("%s: run %s of %s was published meanwhile (snapshot %s); snapshot %s "
                        "is left pending (prune deletes it)", self.url, run_id, server_id,
                        known and known["snapshot_id"], record["snapshot_id"])
            return known
        try:
            self.journal.remove(record["snapshot_id"])
        except StoreError as e:     # published all the same: pending() clears it later
            log.warning("%s: snapshot %s of %s/%s is recorded; its journal entry stays for "
                        "now: %s", self.url, record["snapshot_id"], server_id, run_id, e)
        return record

    def _clear_journal(self, server_id: str, run_id: str, record: dict) -> None:
        """A journal entry for a recorded snapshot (its removal failed or was cut off
        after the record was written) is no longer pending."""
        for snap, entry in self.journal.records().items():
            if snap == record["snapshot_id"] and entry.get("server_id") == server_id \
                    and entry.get("run_id") == run_id:
                self.journal.remove(snap)

    def _snapshot(self, server_id, run_id, manifest, previous, base, progress, cancel) -> dict:
        parent = base["snapshot_id"] if base else None
        volume_gib = max(1, -(-manifest.disk_size // GIB))
        # counted first (a manifest diff, a window at a time), so progress has a total
        total = sum(len(i) for i in iter_blocks_to_write(previous, manifest)) * EBS_BLOCK
        report = with_phase(progress, "uploading")
        if report is not None:
            report(0, total)
        # one token per attempt: the retry policy's repeats start one snapshot, and
        # publishing the run again never gets back a snapshot an earlier attempt completed
        snap = self.uploader.start(
            volume_gib=volume_gib, description=f"smsblock run {run_id} of {server_id}",
            tags={"smsblock:server": server_id, "smsblock:run": run_id}, parent=parent,
            client_token=secrets.token_hex(32))
        self.journal.put(snap, {"server_id": server_id, "run_id": run_id, "parent": parent,
                                "started": datetime.now(timezone.utc).isoformat()})
        log.info("%s: snapshot %s (parent %s) of %s/%s", self.url, snap, parent, server_id, run_id)
        todo = (int(i) for indices in iter_blocks_to_write(previous, manifest)
                for i in indices.tolist())
        run = RunDisk(self.repository, manifest)
        done = 0

        def on_block(_i: int) -> None:
            nonlocal done
            done += EBS_BLOCK
            if report is not None:
                report(done, total)
        sent = self.uploader.put_blocks(snap, todo, run.block, cancel=cancel, on_block=on_block)
        self.uploader.complete(snap, sent.count, sent.checksum)
        log.info("%s: snapshot %s: %d blocks written", self.url, snap, sent.count)
        chain = [snap] + list(base["chain"]) if parent else [snap]
        return {"snapshot_id": snap, "parent_snapshot_id": parent, "chain": chain,
                "server_id": server_id, "run_id": run_id,
                "region": self.region, "volume_size_gib": volume_gib,
                "changed_blocks": sent.count, "checksum": sent.checksum,
                "published": datetime.now(timezone.utc).isoformat()}

    def pending(self) -> dict[str, dict]:
        """Snapshots started and never recorded (the publish died or failed):
        ``{snapshot_id: journal entry}``.  An entry whose snapshot is its run's record
        (the publish died between the two writes) is not pending: it is cleared."""
        out = {}
        for snap, entry in self.journal.records().items():
            if self._recorded(snap, entry):
                self.journal.remove(snap)
                continue
            out[snap] = entry
        return out

    def _recorded(self, snap: str, entry: dict) -> bool:
        server_id, run_id = entry.get("server_id"), entry.get("run_id")
        if not (isinstance(server_id, str) and isinstance(run_id, str)):
            return False
        try:
            record = self.record(server_id, run_id)
        except (UsageError, StoreCorruptError):     # ids not ours, a damaged record
            return False
        return record is not None and record["snapshot_id"] == snap

    def delete_pending(self, snap: str) -> None:
        entry = self.journal.records().get(check_snapshot_id(snap))
        if entry is not None and self._recorded(snap, entry):
            self.journal.remove(snap)       # a published run's snapshot: never deleted
            return
        self.uploader.delete_snapshot(snap)
        self.journal.remove(snap)

    def snapshot_disk(self, info: dict, manifest: Manifest | ManifestReader,
                      hold: contextlib.ExitStack | None = None) -> "SnapshotDisk":
        """A Disk over the snapshot of a run (its :meth:`record` ``info`` and its
        manifest); ``hold`` is closed with it."""
        return SnapshotDisk(self.uploader, list(info["chain"]), manifest.disk_size,
                            f"{self.url}/{info['snapshot_id']}", manifest, hold)


class SnapshotDisk(BlockDisk):
    """A read-only Disk over an EBS snapshot chain (newest first): a block is read from
    the newest snapshot in the chain whose ``ListSnapshotBlocks`` lists it (AWS lists a
    child's inherited blocks too; moto lists only blocks written to that snapshot, so
    the parents are asked as well).

    Block tokens are listed a window of :data:`LOOKUP_WINDOW` blocks at a time
    (``StartingBlockIndex``), the last two windows kept: memory does not follow the
    disk's size.  With the run's ``manifest`` (a :class:`Manifest` or
    :class:`ManifestReader`), only its DATA blocks are asked for (the others read as
    zeros: the snapshot has them as zeros or not at all), older snapshots are listed only
    for DATA blocks the newer ones lack, and the extents are the manifest's."""

    def __init__(self, uploader: EbsUploader, chain: list[str], size: int, path: str,
                 manifest: Manifest | ManifestReader | None = None,
                 hold: contextlib.ExitStack | None = None):
        super().__init__(hold)
        self.block_size = EBS_BLOCK
        self.uploader = uploader
        # each block is one GetSnapshotBlock: reads wait on the network, so a copy reads
        # as many at once as the store puts
        self.read_parallelism = max(2, uploader.settings.parallel)
        self.manifest = manifest
        self.chain = chain
        self.path = path
        self.size = size
        self.info = DiskInfo(path=path, format="ebs-snapshot", virtual_size=size)
        self._windows: dict[int, dict[int, tuple[str, str]]] = {}
        self._lock = threading.Lock()

    def _data_blocks(self, lo: int, hi: int) -> set[int] | None:
        """The manifest's DATA blocks in [lo, hi) (None without a manifest)."""
        if self.manifest is None:
            return None
        out: set[int] = set()
        for indices, *_ in entry_batches(self.manifest, lo, hi):
            out.update(indices.tolist())
        return out

    def _window(self, w: int) -> dict[int, tuple[str, str]]:
        """``{index: (snapshot, token)}`` for the blocks of window ``w``."""
        with self._lock:
            found = self._windows.get(w)
            if found is not None:
                return found
            lo, hi = w * LOOKUP_WINDOW, (w + 1) * LOOKUP_WINDOW
            wanted = self._data_blocks(lo, hi)
            found = {}
            for snap in self.chain:                 # newest first: the first to list it wins
                if wanted is not None and wanted.issubset(found):
                    break
                for page in self.uploader.list_block_pages(snap, lo):
                    for index, token in page:
                        if index < hi:
                            found.setdefault(index, (snap, token))
                    if page and page[-1][0] >= hi:      # the window is listed
                        break
            if len(self._windows) >= 2:
                self._windows.pop(next(iter(self._windows)))
            self._windows[w] = found
            return found

    def fetch_block(self, i: int) -> bytes | None:
        """Block ``i`` from the newest snapshot that has it; None when it reads as zeros
        (not DATA in the run, or never in the snapshot chain)."""
        data_in_run = None
        if self.manifest is not None:
            data_in_run = self.manifest.entry(i)[0] == BlockState.DATA
            if not data_in_run:
                return None
        where = self._window(i // LOOKUP_WINDOW).get(i)
        if where is None:
            if data_in_run:
                raise StoreCorruptError(f"block {i} is data in the run but in no snapshot of "
                                        f"{self.chain}", self.path, i * EBS_BLOCK)
            return None
        snap, token = where
        data = self.uploader.get_block(snap, i, token, self.path)
        return data[:max(0, min(EBS_BLOCK, self.size - i * EBS_BLOCK))]

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        start, end = self._clip(start, end)
        if self.manifest is not None:
            blocks = self.manifest.runs(start // EBS_BLOCK, -(-end // EBS_BLOCK))
            listed = ((a, a + count) for state, a, count, _h, _a in blocks
                      if state == BlockState.DATA)
        else:                                       # every block any snapshot lists
            listed = ((i, i + 1) for i, _ in _merged(
                [self.uploader.list_blocks(s, start // EBS_BLOCK) for s in self.chain]))
        run = None                                  # merged [lo, hi) in bytes
        for a, b in listed:
            lo, hi = max(start, a * EBS_BLOCK), min(end, b * EBS_BLOCK, self.size)
            if lo >= hi:
                if a * EBS_BLOCK >= end:
                    break
                continue
            if run is not None and run[1] == lo:
                run[1] = hi
                continue
            if run is not None:
                yield Extent(run[0], run[1] - run[0], ExtentKind.DATA)
            run = [lo, hi]
        if run is not None:
            yield Extent(run[0], run[1] - run[0], ExtentKind.DATA)


def _merged(listings):
    """Ascending ``(index, token)`` of several ascending listings, each index once."""
    import heapq
    last = None
    for index, token in heapq.merge(*listings, key=lambda b: b[0]):
        if index != last:
            last = index
            yield index, token
