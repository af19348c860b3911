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

The snapshot work is :class:`smsblock.publish.ebs.EbsPublisher` (a publisher that runs
once a run's manifest is complete and before it is committed, so that the committed
manifest names a complete snapshot) over the one EBS uploader the image step uses too.

Reading back: :meth:`EbsStore.snapshot_disk` is a Disk over a run's snapshot that reads
blocks with ``GetSnapshotBlock`` (checksums checked), following the chain of parents:
a block is read from the newest snapshot in the chain whose ``ListSnapshotBlocks``
lists it (AWS lists a child's inherited blocks too; moto lists only blocks written to
that snapshot, so the parents are asked as well).  :meth:`EbsStore.restore_snapshot`
writes it to a raw file.  The engine's ``restore`` reads the staged packs.

Snapshots need 512 KiB blocks (the engine's default block size).
"""

from __future__ import annotations

import contextlib
import os
import re
from urllib.parse import parse_qsl, urlencode, urlparse

from ..backend.s3config import CloudSettings, config_file_path
from ..errors import UsageError
from ..manifest import ManifestReader, copy_manifest
from ..publish.ebs import (EBS_BLOCK, GIB, PENDING_DIR, EbsPublisher, EbsUploader,  # noqa: F401
                           SnapshotDisk, block_checksum, blocks_to_write, linear_checksum)
from ..repository.repository import Repository

_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def _ebs_section_store() -> str | None:
    try:
        import tomllib
        with open(config_file_path(), "rb") as f:
            value = tomllib.load(f).get("ebs", {}).get("store")
        return str(value) if value else None
    except (FileNotFoundError, ValueError, OSError):
        return None


class EbsStore(Repository):
    """See the module docstring.  ``staging`` is a Store or store URL (default: a local
    directory per region); ``settings``/``overrides`` shape the boto3 clients."""

    def __init__(self, url: str = "ebs://", *, staging=None, settings: CloudSettings | None = None,
                 **overrides):
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
        if not isinstance(self.staging, Repository) or isinstance(self.staging, EbsStore):
            raise UsageError(f"{url}: the staging store must be a local directory or s3:// "
                             f"(not {self.staging.url})")
        # the staging store's objects, this URL's name: runs, dedup, verify and prune work
        # as everywhere; the publisher makes each run a snapshot before its manifest is in
        super().__init__(self.staging.backend)
        self.url = f"ebs://{self.region}"
        self.uploader = EbsUploader(self.settings)
        self.publisher = EbsPublisher(self, self.uploader, self.region, self.url)

    def __repr__(self) -> str:
        return f"<EbsStore {self.url} staging={self.staging.url}>"

    # what embedders and tests read of the uploader
    ebs = property(lambda self: self.uploader.ebs)
    ec2 = property(lambda self: self.uploader.ec2)
    retry = property(lambda self: self.uploader.retry)

    def close(self) -> None:
        self.staging.close()

    # -- publishing a run = completing its snapshot, then committing its manifest -------
    def put_manifest_bytes(self, server_id: str, run_id: str, data: bytes) -> None:
        self._publish(server_id, run_id, ManifestReader(bytes(data), f"{self.url}: {server_id}/{run_id}"))

    def put_manifest_file(self, server_id: str, run_id: str, staged_path: str) -> None:
        # read a window at a time, never whole (a dense 16 TiB disk's manifest is GBs)
        self._publish(server_id, run_id, ManifestReader(staged_path))
        os.unlink(staged_path)

    def _publish(self, server_id: str, run_id: str, manifest: ManifestReader) -> None:
        """Snapshot the run, then commit its manifest with the snapshot's record in
        ``meta["ebs"]``: copied a frame at a time into a new staged file."""
        with manifest:
            meta = dict(manifest.meta)
            info = meta["ebs"] = self.publisher.publish(server_id, run_id, manifest)
            summary = meta.get("summary")
            if isinstance(summary, dict):        # so `smsblock runs` shows it too
                meta["summary"] = dict(summary, snapshot_id=info["snapshot_id"])
            staged = self.staging_path(".manifest")
            copy_manifest(manifest, staged, meta)
        try:
            super().put_manifest_file(server_id, run_id, staged)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        self.publisher.done(info)

    def snapshot_run(self, server_id: str, run_id: str, manifest) -> dict:
        """Turn a run into a completed EBS snapshot (see :meth:`EbsPublisher.publish`)."""
        return self.publisher.publish(server_id, run_id, manifest)

    # -- pending snapshots: leftovers ------------------------------------------------------------
    def pending_snapshots(self) -> dict[str, dict]:
        """Snapshots started by runs that never published: ``{snapshot_id: record}``."""
        return self.publisher.pending()

    def list_leftovers(self) -> list[str]:
        return super().list_leftovers() + [f"ebs-pending:{s}" for s in self.pending_snapshots()]

    def remove_leftover(self, name: str) -> int:
        if not name.startswith("ebs-pending:"):
            return super().remove_leftover(name)
        self.publisher.delete_pending(name.split(":", 1)[1])
        return 0

    # -- reading snapshots back ----------------------------------------------------------------
    def snapshot_disk(self, server_id: str, run_id: str | None = None) -> SnapshotDisk:
        """A Disk over a run's EBS snapshot, read with GetSnapshotBlock (close it: it
        holds the run's manifest open)."""
        held = contextlib.ExitStack()
        try:
            manifest = held.enter_context(self.open_manifest(server_id, run_id))
            return self.publisher.snapshot_disk(manifest, held)
        except BaseException:
            held.close()
            raise

    def restore_source(self, manifest) -> SnapshotDisk:
        """The disk a restore of this run reads: its snapshot (GetSnapshotBlock), not the
        staged packs.  It has RunDisk's ``manifest`` and ``block(i)`` too."""
        return self.publisher.snapshot_disk(manifest)

    def restore_snapshot(self, server_id: str, out_path, *, run_id: str | None = None,
                         progress=None, cancel=None) -> str:
        """Write a run's snapshot (read from EBS) to a sparse raw image; return its id."""
        from ..disk.writer import write_raw
        with self.snapshot_disk(server_id, run_id) as disk:
            write_raw(disk, out_path, progress=progress, cancel=cancel)
            return disk.chain[0]
