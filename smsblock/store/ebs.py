"""EbsStore: ``ebs://[REGION]``: every run also becomes an EBS snapshot (EBS direct APIs).

SMS staged each replication run in S3 and turned it into an EBS snapshot; this store does
the same.  It wraps a *staging store* that holds packs and manifests exactly like any
store (a local directory by default, ``~/.smsblock/ebs/<region>``, or any store URL given
as ``?store=s3://bucket/prefix``, ``$SMSBLOCK_EBS_STORE`` or ``store = ...`` under ``[ebs]``
in the config file),
so runs, dedup, verify and prune work as everywhere.  Publishing a run's manifest (the
last step of a run) first turns the run into a snapshot:

1. ``StartSnapshot`` with ``ParentSnapshotId`` = the previous run's snapshot (none for a
   first run, or when block or disk size changed), tags ``smsblock:server``/``smsblock:run``;
   the snapshot id goes into the staging store's journal (``ebs-pending/``) at once;
2. ``PutSnapshotBlock`` for exactly the blocks that changed since the previous run (the
   manifest diff), ``parallel`` at a time: 512 KiB each (the last block zero-padded),
   base64 SHA-256 checksum, ``ChecksumAlgorithm=SHA256``.  Blocks that became zero or
   unallocated are written as zeros, so the parent's old data does not show through;
3. ``CompleteSnapshot`` with ``ChangedBlocksCount`` and the linear aggregate checksum:
   SHA-256 over the concatenated per-block SHA-256 digests in block-index order, base64;
4. the snapshot id, its parent and the chain of ancestors go into the manifest's
   ``meta["ebs"]``, the manifest is published, and the journal entry is removed.

A run killed between 1 and 4 leaves a pending snapshot in the journal: ``verify`` lists it
among the leftovers (``ebs-pending:snap-...``), the next run warns about it, and ``prune``
deletes it (EC2 ``DeleteSnapshot``) and its journal entry.  It is reported, never lost.

Reading back: :meth:`EbsStore.snapshot_disk` is a Disk over a run's snapshot that reads
blocks with ``GetSnapshotBlock`` (checksums checked), following the chain of parents:
a block is read from the newest snapshot in the chain whose ``ListSnapshotBlocks``
lists it (AWS lists a child's inherited blocks too; moto lists only blocks written to
that snapshot, so the parents are asked as well).  :meth:`EbsStore.restore_snapshot`
writes it to a raw file.  The engine's ``restore`` reads the staged packs.

Snapshots need 512 KiB blocks (the engine's default block size).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Iterator
from urllib.parse import parse_qsl, urlencode, urlparse

import numpy as np

from ..disk import DiskInfo, Extent, ExtentKind
from ..disk.blocks import BlockDisk
from ..errors import StoreCorruptError, StoreError, UsageError
from ..manifest import BlockState, Manifest, diff
from ..fsutil import remove_file, replace_file, subdir
from .base import Store
from .retry import RetryPolicy, error_code
from .s3config import CloudSettings, config_file_path
from .throttle import ThrottledBody, TokenBucket

log = logging.getLogger("smsblock.store.ebs")

EBS_BLOCK = 512 << 10
GIB = 1 << 30
PENDING_DIR = "ebs-pending"
_SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{8,32}")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


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


def _ebs_section_store() -> str | None:
    try:
        import tomllib
        with open(config_file_path(), "rb") as f:
            value = tomllib.load(f).get("ebs", {}).get("store")
        return str(value) if value else None
    except (FileNotFoundError, ValueError, OSError):
        return None


# --- the journal of pending snapshots (in the staging store) --------------------------

class _Journal:
    """Small JSON records next to the staging store's runs: one per pending snapshot."""

    def __init__(self, staging: Store):
        self.staging = staging

    def _local(self) -> str | None:
        root = getattr(self.staging, "root", None)
        return os.path.join(root, PENDING_DIR) if root else None

    @staticmethod
    def _check(snapshot_id: str) -> str:
        # the id becomes a file name: never a path, whatever the endpoint answered
        if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id):
            raise StoreError(f"EBS returned a malformed snapshot id {snapshot_id!r}")
        return snapshot_id

    def put(self, snapshot_id: str, record: dict) -> None:
        self._check(snapshot_id)
        data = json.dumps(record, sort_keys=True).encode()
        folder = self._local()
        if folder is not None:
            # inside the local staging store: a 0700 folder, never a link; a new 0600 file
            with subdir(self.staging.root, PENDING_DIR, create=True) as fd:
                replace_file(snapshot_id + ".json", data, dir_fd=fd)
        else:
            self.staging._put(f"{PENDING_DIR}/{snapshot_id}.json", data, "journal a pending snapshot")

    def remove(self, snapshot_id: str) -> None:
        self._check(snapshot_id)
        folder = self._local()
        if folder is not None:
            with contextlib.suppress(FileNotFoundError), \
                    subdir(self.staging.root, PENDING_DIR) as fd:
                remove_file(snapshot_id + ".json", dir_fd=fd)
        else:
            self.staging._delete(f"{PENDING_DIR}/{snapshot_id}.json", "clear a journalled snapshot")

    def records(self) -> dict[str, dict]:
        out = {}
        folder = self._local()
        if folder is not None:
            try:
                names = sorted(os.listdir(folder))
            except FileNotFoundError:
                return out
            for n in names:
                if n.endswith(".json") and _SNAPSHOT_ID.fullmatch(n[:-5]):
                    with contextlib.suppress(OSError, ValueError):
                        with open(os.path.join(folder, n), "rb") as f:
                            out[n[:-5]] = json.loads(f.read())
            return out
        objects, _, _ = self.staging._list(f"{PENDING_DIR}/", "list pending snapshots")
        for o in objects:
            name = o["Key"].rsplit("/", 1)[-1]
            if name.endswith(".json") and _SNAPSHOT_ID.fullmatch(name[:-5]):
                data = self.staging._get(f"{PENDING_DIR}/{name}", "read a pending snapshot record")
                with contextlib.suppress(ValueError, TypeError):
                    out[name[:-5]] = json.loads(data)
        return out


# --- the store ---------------------------------------------------------------------------

class EbsStore(Store):
    """See the module docstring.  ``staging`` is a Store or store URL (default: a local
    directory per region); ``settings``/``overrides`` shape the boto3 clients."""

    def __init__(self, url: str = "ebs://", *, staging=None, settings: CloudSettings | None = None,
                 **overrides):
        super().__init__()
        p = urlparse(url)
        if p.scheme.lower() != "ebs":
            raise UsageError(f"{url}: not an EBS store URL (ebs://[REGION])")
        if p.path.strip("/"):
            raise UsageError(f"{url}: an EBS store URL names only a region (ebs://REGION?store=...)")
        query = dict(parse_qsl(p.query))
        staging = (staging or query.pop("store", None) or os.environ.get("SMSBLOCK_EBS_STORE")
                   or _ebs_section_store())
        region = p.netloc or None
        if region:
            overrides.setdefault("region", region)
        self.settings = settings or CloudSettings.load(url_query=urlencode(query), section="ebs",
                                                       **overrides)
        self.region = self.settings.region or self.settings.session().region_name
        if not self.region:
            raise UsageError(f"{url}: no region (ebs://REGION, AWS_DEFAULT_REGION or the config file)")
        if not isinstance(self.region, str) or not _REGION.fullmatch(self.region):
            # it names the default staging folder: never a path
            raise UsageError(f"{url}: {self.region!r} is not an AWS region name")
        self.url = f"ebs://{self.region}"
        if staging is None:
            staging = os.path.join(os.path.expanduser("~/.smsblock/ebs"), self.region)
        from . import open_store
        self.staging = open_store(staging)
        if not (hasattr(self.staging, "root") or hasattr(self.staging, "_put")):
            raise UsageError(f"{url}: the staging store must be a local directory or s3:// "
                             f"(not {self.staging.url})")
        self.ebs = self.settings.client("ebs", max_pool=self.settings.parallel)
        self._ec2 = None
        self.retry = RetryPolicy(self.settings.retry_attempts, self.settings.retry_seconds)
        self._limit = TokenBucket(self.settings.bandwidth) if self.settings.bandwidth else None
        self.journal = _Journal(self.staging)

    def __repr__(self) -> str:
        return f"<EbsStore {self.url} staging={self.staging.url}>"

    @property
    def ec2(self):
        if self._ec2 is None:
            self._ec2 = self.settings.client("ec2")
        return self._ec2

    def _call(self, what: str, fn):
        return self.retry.call(what, fn)

    # -- the staging store does the storing ---------------------------------------------
    def exists(self) -> bool:
        return self.staging.exists()

    def _read_config(self) -> bytes:
        return self.staging._read_config()

    def _create(self, config_bytes: bytes) -> None:
        self.staging._create(config_bytes)

    def lock(self, exclusive: bool, purpose: str):
        return self.staging.lock(exclusive, purpose)

    def initialise(self, config=None):
        cfg = super().initialise(config)
        resume = getattr(self.staging, "resume_staged_packs", None)
        if resume is not None:          # an S3 staging store finishes dead runs' uploads
            resume()
        return cfg

    def staging_path(self, suffix: str) -> str:
        return self.staging.staging_path(suffix)

    def put_pack(self, pack_id: str, staged_path: str) -> None:
        self.staging.put_pack(pack_id, staged_path)

    def replace_pack(self, pack_id: str, staged_path: str) -> None:
        self.staging.replace_pack(pack_id, staged_path)

    def list_packs(self) -> dict[str, int]:
        return self.staging.list_packs()

    def read_pack(self, pack_id: str, offset: int, length: int) -> bytes:
        return self.staging.read_pack(pack_id, offset, length)

    def delete_pack(self, pack_id: str) -> None:
        self.forget_pack(pack_id)
        self.staging.delete_pack(pack_id)

    def pack_name(self, pack_id: str) -> str:
        return self.staging.pack_name(pack_id)

    def list_servers(self) -> list[str]:
        return self.staging.list_servers()

    def list_run_ids(self, server_id: str) -> list[str]:
        return self.staging.list_run_ids(server_id)

    def get_manifest_bytes(self, server_id: str, run_id: str) -> bytes:
        return self.staging.get_manifest_bytes(server_id, run_id)

    def delete_manifest(self, server_id: str, run_id: str) -> None:
        self.staging.delete_manifest(server_id, run_id)

    def put_damage_record(self, pack_id: str, data: bytes) -> None:
        self.staging.put_damage_record(pack_id, data)

    def list_damage_records(self) -> dict[str, bytes]:
        return self.staging.list_damage_records()

    def delete_damage_record(self, pack_id: str) -> None:
        self.staging.delete_damage_record(pack_id)

    def close(self) -> None:
        self.staging.close()

    # -- publishing a run = completing its snapshot ------------------------------------------
    def put_manifest_bytes(self, server_id: str, run_id: str, data: bytes) -> None:
        manifest = Manifest.from_bytes(bytearray(data), f"{self.url}: {server_id}/{run_id}")
        manifest.meta["ebs"] = self.snapshot_run(server_id, run_id, manifest)
        summary = manifest.meta.get("summary")
        if isinstance(summary, dict):        # so `smsblock runs` shows it too
            summary["snapshot_id"] = manifest.meta["ebs"]["snapshot_id"]
        self.staging.put_manifest_bytes(server_id, run_id, manifest.to_bytes())
        self.journal.remove(manifest.meta["ebs"]["snapshot_id"])

    def _previous(self, server_id: str, run_id: str) -> Manifest | None:
        earlier = [r for r in self.staging.list_run_ids(server_id) if r < run_id]
        return self.staging.load_manifest(server_id, earlier[-1]) if earlier else None

    def snapshot_run(self, server_id: str, run_id: str, manifest: Manifest) -> dict:
        """Turn a run (its manifest, blocks in the staging store) into a completed EBS
        snapshot; return what goes into ``meta["ebs"]``."""
        if manifest.block_size != EBS_BLOCK:
            raise StoreError(f"{self.url}: EBS snapshots need 512 KiB blocks; this run has "
                             f"{manifest.block_size} (replicate with --block-size 512K)")
        for snap, rec in self.pending_snapshots().items():
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
        start = dict(VolumeSize=volume_gib, ClientToken=hashlib.sha256(f"{server_id}/{run_id}".encode()).hexdigest(),
                     Description=f"smsblock run {run_id} of {server_id}",
                     Tags=[{"Key": "smsblock:server", "Value": server_id},
                           {"Key": "smsblock:run", "Value": run_id}])
        if parent:
            start["ParentSnapshotId"] = parent
        snap = self._call(f"start snapshot of {server_id}/{run_id}",
                          lambda: self.ebs.start_snapshot(**start))["SnapshotId"]
        self.journal.put(snap, {"server_id": server_id, "run_id": run_id, "parent": parent,
                                "started": datetime.now(timezone.utc).isoformat()})
        log.info("%s: snapshot %s (parent %s): %d blocks to write", self.url, snap, parent, len(todo))
        digests = self._put_blocks(snap, manifest, todo)
        checksum = linear_checksum(digests[i] for i in sorted(digests))
        self._call(f"complete snapshot {snap}", lambda: self.ebs.complete_snapshot(
            SnapshotId=snap, ChangedBlocksCount=len(todo), Checksum=checksum,
            ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR"))
        chain = [snap] + list(prev_ebs.get("chain", [])) if parent else [snap]
        return {"snapshot_id": snap, "parent_snapshot_id": parent, "chain": chain,
                "region": self.region, "volume_size_gib": volume_gib,
                "changed_blocks": int(len(todo)), "checksum": checksum}

    def _put_blocks(self, snap: str, manifest: Manifest, todo: np.ndarray) -> dict[int, bytes]:
        from ..repository.rundisk import RunDisk
        run = RunDisk(self.staging, manifest)
        digests: dict[int, bytes] = {}
        lock = threading.Lock()
        zeros = bytes(EBS_BLOCK)

        def put(i: int) -> None:
            data = run.block(i)
            if data is None:
                data = zeros
            elif len(data) < EBS_BLOCK:
                data = data + bytes(EBS_BLOCK - len(data))
            digest = block_checksum(data)
            b64 = base64.b64encode(digest).decode()
            self._call(f"put block {i} of snapshot {snap}", lambda: self.ebs.put_snapshot_block(
                SnapshotId=snap, BlockIndex=i, BlockData=self._body(data), DataLength=EBS_BLOCK,
                Checksum=b64, ChecksumAlgorithm="SHA256"))
            with lock:
                digests[i] = digest

        # a window of futures at a time: at most ~2 * parallel blocks in memory
        window = 2 * self.settings.parallel
        with ThreadPoolExecutor(self.settings.parallel, thread_name_prefix="smsblock-ebs") as pool:
            for s in range(0, len(todo), window):
                for fut in [pool.submit(put, int(i)) for i in todo[s:s + window]]:
                    fut.result()
        return digests

    def _body(self, data: bytes):
        return ThrottledBody(data, self._limit) if self._limit else data

    # -- pending snapshots: leftovers ------------------------------------------------------------
    def pending_snapshots(self) -> dict[str, dict]:
        """Snapshots started by runs that never published: ``{snapshot_id: record}``."""
        return self.journal.records()

    def list_leftovers(self) -> list[str]:
        return self.staging.list_leftovers() + [f"ebs-pending:{s}" for s in self.pending_snapshots()]

    def remove_leftover(self, name: str) -> int:
        if not name.startswith("ebs-pending:"):
            return self.staging.remove_leftover(name)
        snap = name.split(":", 1)[1]

        def delete():
            try:
                self.ec2.delete_snapshot(SnapshotId=snap)
            except Exception as e:
                if error_code(e) not in ("InvalidSnapshot.NotFound",):
                    raise
        self._call(f"delete pending snapshot {snap}", delete)
        self.journal.remove(snap)
        return 0

    # -- reading snapshots back ----------------------------------------------------------------
    def snapshot_disk(self, server_id: str, run_id: str | None = None) -> "SnapshotDisk":
        """A Disk over a run's EBS snapshot, read with GetSnapshotBlock."""
        return self.restore_source(self.load_manifest(server_id, run_id))

    def restore_source(self, manifest: Manifest) -> "SnapshotDisk":
        """The disk a restore of this run reads: its snapshot (GetSnapshotBlock), not the
        staged packs.  It has RunDisk's ``manifest`` and ``block(i)`` too."""
        info = manifest.meta.get("ebs")
        if not info:
            raise StoreError(f"{self.url}: run {manifest.meta.get('server_id')}/"
                             f"{manifest.meta.get('run_id')} has no snapshot")
        return SnapshotDisk(self, list(info["chain"]), manifest.disk_size,
                            f"{self.url}/{info['snapshot_id']}", manifest)

    def restore_snapshot(self, server_id: str, out_path, *, run_id: str | None = None,
                         progress=None, cancel=None) -> str:
        """Write a run's snapshot (read from EBS) to a sparse raw image; return its id."""
        from ..disk.writer import write_raw
        with self.snapshot_disk(server_id, run_id) as disk:
            write_raw(disk, out_path, progress=progress, cancel=cancel)
            return disk.chain[0]


class SnapshotDisk(BlockDisk):
    """A read-only Disk over an EBS snapshot chain (newest first); see :mod:`.ebs`."""

    def __init__(self, store: EbsStore, chain: list[str], size: int, path: str,
                 manifest: Manifest | None = None):
        super().__init__()
        self.block_size = EBS_BLOCK
        self.store = store
        self.manifest = manifest
        self.chain = chain
        self.path = path
        self.size = size
        self.info = DiskInfo(path=path, format="ebs-snapshot", virtual_size=size)
        self._where: dict[int, tuple[str, str]] = {}
        for snap in reversed(chain):            # older first: newer entries override
            for index, token in self._list_blocks(snap):
                self._where[index] = (snap, token)

    def _list_blocks(self, snap: str) -> Iterator[tuple[int, str]]:
        kw = {"SnapshotId": snap}
        while True:
            r = self.store._call(f"list blocks of snapshot {snap}",
                                 lambda kw=dict(kw): self.store.ebs.list_snapshot_blocks(**kw))
            for b in r.get("Blocks", []):
                yield int(b["BlockIndex"]), b["BlockToken"]
            if not r.get("NextToken"):
                return
            kw["NextToken"] = r["NextToken"]

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

        def get():
            r = self.store.ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=i, BlockToken=token)
            data = r["BlockData"].read()
            want = r.get("Checksum")
            if want and base64.b64encode(block_checksum(data)).decode() != want:
                raise StoreCorruptError(f"block {i} of snapshot {snap} fails its SHA-256 checksum",
                                        self.path, i * EBS_BLOCK)
            return data
        data = self.store._call(f"get block {i} of snapshot {snap}", get)
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
