"""EbsStore: ``ebs://[REGION]``: every run also becomes an EBS snapshot (EBS direct APIs).

SMS staged each replication run in S3 and turned it into an EBS snapshot; this store does
the same.  It wraps a *staging store* that holds packs and manifests exactly like any
store (a local directory by default, ``~/.smsblock/ebs/<region>``, or any store URL given
as ``?store=s3://bucket/prefix``, ``$SMSBLOCK_EBS_STORE`` or ``store = ...`` under ``[ebs]``
in the config file),
so runs, dedup, verify and prune work as everywhere.  Once a run's manifest is committed,
its publisher (:class:`smsblock.publish.ebs.EbsPublisher`, over the one EBS uploader the
image step uses too) turns the run into a snapshot:

1. ``StartSnapshot`` with ``ParentSnapshotId`` = the snapshot of the server's newest
   published run (none for a first run, or when block size changed or the disk shrank),
   tags ``smsblock:server``/``smsblock:run``; the snapshot id goes into the staging
   store's journal (``ebs-pending/``) at once;
2. ``PutSnapshotBlock`` for exactly the blocks that changed since that run (the manifest
   diff), ``parallel`` at a time: 512 KiB each (the last block zero-padded), base64
   SHA-256 checksum, ``ChecksumAlgorithm=SHA256``.  Blocks that became zero or
   unallocated are written as zeros, so the parent's old data does not show through;
3. ``CompleteSnapshot`` with ``ChangedBlocksCount`` and the linear aggregate checksum:
   SHA-256 over the concatenated per-block SHA-256 digests in block-index order, base64;
4. the snapshot's record (id, parent, chain of ancestors) is written beside the run
   (``ebs-snapshots/<region>/<server>/<run>.json``) and the journal entry removed.

A failed publish (EBS down, credentials) is a PublishError naming the run: the run is
stored and restores from the packs; ``smsblock publish`` (or :meth:`publish_run`)
publishes it again, and the next run builds on the newest published run.  A publish
killed between 1 and 4 leaves a pending snapshot in the journal: ``verify`` lists it
among the leftovers (``ebs-pending:snap-...``), the next publish warns about it, and
``prune`` deletes it (EC2 ``DeleteSnapshot``) and its journal entry.  It is reported,
never lost.

Reading back: :meth:`EbsStore.snapshot_disk` is a Disk over a run's snapshot that reads
blocks with ``GetSnapshotBlock`` (checksums checked), following the chain of parents:
a block is read from the newest snapshot in the chain whose ``ListSnapshotBlocks``
lists it (AWS lists a child's inherited blocks too; moto lists only blocks written to
that snapshot, so the parents are asked as well).  :meth:`EbsStore.restore_snapshot`
writes it to a raw file.  The engine's ``restore`` reads a published run from its
snapshot, a run not published from the staged packs.

Snapshots need 512 KiB blocks (the engine's default block size).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from urllib.parse import parse_qsl, urlencode, urlparse

from ..backend.s3config import CloudSettings, config_file_path
from ..errors import StoreError, UsageError
from ..publish.ebs import (EBS_BLOCK, GIB, PENDING_DIR, EbsPublisher, EbsUploader,  # noqa: F401
                           SnapshotDisk, block_checksum, blocks_to_write, linear_checksum)
from ..repository.repository import Repository

log = logging.getLogger("smsblock.store.ebs")
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
        # as everywhere; the publisher makes each committed run a snapshot
        super().__init__(self.staging.backend)
        self.url = f"ebs://{self.region}"
        self.uploader = EbsUploader(self.settings)
        self.publisher = EbsPublisher(self, self.uploader, self.region, self.url)
        self.publishers = [self.publisher]

    def __repr__(self) -> str:
        return f"<EbsStore {self.url} staging={self.staging.url}>"

    # what embedders and tests read of the uploader
    ebs = property(lambda self: self.uploader.ebs)
    ec2 = property(lambda self: self.uploader.ec2)
    retry = property(lambda self: self.uploader.retry)

    def close(self) -> None:
        self.staging.close()

    # -- runs and their snapshots ---------------------------------------------------------
    def snapshot_record(self, server_id: str, run_id: str | None = None) -> dict | None:
        """The snapshot record of a run (default: the latest); None while not published."""
        return self.publisher.record(server_id, self._run_of(server_id, run_id))

    def runs(self, server_id: str):
        """As every store's, with each run's ``summary["snapshot_id"]`` (None: the run
        is not published)."""
        out = super().runs(server_id)
        for info in out:
            record = self.publisher.record_or_none(server_id, info.run_id)
            info.summary["snapshot_id"] = record["snapshot_id"] if record else None
        return out

    # -- pending snapshots: leftovers ------------------------------------------------------------
    def pending_snapshots(self) -> dict[str, dict]:
        """Snapshots started by runs that never published: ``{snapshot_id: record}``."""
        return self.publisher.pending()

    def list_leftovers(self) -> list[str]:
        return (super().list_leftovers()
                + [f"ebs-pending:{s}" for s in self.pending_snapshots()]
                + [f"ebs-record:{server}/{run}" for server, run in self.publisher.orphan_records()])

    def remove_leftover(self, name: str) -> int:
        if name.startswith("ebs-pending:"):
            self.publisher.delete_pending(name.split(":", 1)[1])
            return 0
        if name.startswith("ebs-record:"):
            server_id, _, run_id = name.split(":", 1)[1].partition("/")
            self.publisher.forget_orphan(server_id, run_id)
            return 0
        return super().remove_leftover(name)

    # -- reading snapshots back ----------------------------------------------------------------
    def snapshot_disk(self, server_id: str, run_id: str | None = None) -> SnapshotDisk:
        """A Disk over a run's EBS snapshot, read with GetSnapshotBlock (close it: it
        holds the run's manifest open)."""
        run_id = self._run_of(server_id, run_id)
        held = contextlib.ExitStack()
        try:
            manifest = held.enter_context(self.open_manifest(server_id, run_id))
            record = self.publisher.record(server_id, run_id)
            if record is None:
                raise StoreError(f"{self.url}: run {run_id} of {server_id} is not published "
                                 f"(no snapshot; `smsblock publish` publishes it)")
            return self.publisher.snapshot_disk(record, manifest, held)
        except BaseException:
            held.close()
            raise

    def restore_source(self, manifest):
        """The disk a restore of this run reads: its snapshot (GetSnapshotBlock), not the
        staged packs; a run not published reads the packs.  Either has RunDisk's
        ``manifest`` and ``block(i)``."""
        server_id, run_id = manifest.meta.get("server_id"), manifest.meta.get("run_id")
        record = self.publisher.record_or_none(server_id, run_id) if server_id and run_id \
            else None
        if record is None:
            log.warning("%s: run %s of %s is not published: restoring it from the staged packs",
                        self.url, run_id, server_id)
            return super().restore_source(manifest)
        return self.publisher.snapshot_disk(record, manifest)

    def restore_snapshot(self, server_id: str, out_path, *, run_id: str | None = None,
                         progress=None, cancel=None) -> str:
        """Write a run's snapshot (read from EBS) to a sparse raw image; return its id."""
        from ..disk.writer import write_raw
        with self.snapshot_disk(server_id, run_id) as disk:
            write_raw(disk, out_path, progress=progress, cancel=cancel)
            return disk.chain[0]
