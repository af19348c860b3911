"""Replication runs and what reads them back: replicate, restore, verify, prune.

One run (:func:`replicate`)::

    scan(disk, previous=latest manifest) ──on_changed(i, block)──► content address
        │                                  (worker threads)        │ already in the store? skip
        │                                                          ▼
        │                                          zstd (one compressor per thread)
        │                                                          │ bounded queue
        ▼                                                          ▼
    manifest (addresses of new blocks;             pack writer thread: append, seal each
    unchanged ones from the previous run)          full pack (fsync, then put under its id)
        │
        └──► put manifest, last: the run now exists

A run killed at any moment leaves only sealed packs (immutable, indexed, found by the next
run's dedup index so their blocks are not stored again) and temp files (removed by
:func:`prune`); earlier runs are untouched.  Runs hold the store lock shared, prune holds
it exclusive, so prune never deletes a pack a running replicate is about to reference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import time
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from .disk import Disk, open_disk
from .errors import Cancelled, PublishError, SmsBlockError, StoreError, UsageError
from .manifest import (DEFAULT_BLOCK_SIZE, BlockState, ManifestReader, ManifestWriter,
                       check_block_size)
from .progress import CancelToken, ProgressCallback, check_cancel, with_phase
from .repository import prune as _prune, verify as _verify
from .repository.prune import PruneReport
from .repository.rundisk import RunDisk
from .repository.verify import DeepVerifyReport, VerifyReport
from .repository.writer import BlockStorer, PackSink, start_run
from .scanner import Gap, check_changed_extents, scan_meta, scan_stream
from .store import open_store
from .store.base import check_run_id, check_server_id

__all__ = ["replicate", "restore", "verify", "verify_run_against_disk", "prune", "RunSummary",
           "VerifyReport", "DeepVerifyReport",
           "PruneReport", "RunDisk", "new_run_id", "MAX_RUN_META"]

log = logging.getLogger(__name__)

# --- run ids -------------------------------------------------------------------

_TS_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def new_run_id(latest: str | None = None) -> str:
    """``r-YYYYMMDDTHHMMSS.ffffffZ-xxxxxxxx`` (UTC): sorting ids sorts runs by time.

    When ``latest`` (the server's newest run id) is not older than now (clock steps, two
    runs in one microsecond), the new id takes ``latest``'s time plus 1 µs, so ids of one
    server stay strictly increasing.
    """
    now = datetime.now(timezone.utc)
    if latest is not None:
        last = datetime.strptime(check_run_id(latest)[2:25], _TS_FORMAT).replace(tzinfo=timezone.utc)
        if now <= last:
            now = last + timedelta(microseconds=1)
    return f"r-{now.strftime(_TS_FORMAT)}-{secrets.token_hex(4)}"


# --- summaries and reports ---------------------------------------------------------

@dataclass
class RunSummary:
    """What one run did.  ``blocks_changed`` counts blocks that differ from the previous
    run (state or content; against an empty disk for a first run), ``blocks_stored`` the
    blocks this run added to the store (new content not already stored anywhere)."""

    run_id: str
    server_id: str
    disk_size: int
    block_size: int
    blocks_total: int
    blocks_data: int
    blocks_zero: int
    blocks_unallocated: int
    blocks_changed: int
    blocks_data_changed: int
    blocks_stored: int
    bytes_read: int
    bytes_stored: int
    bytes_stored_uncompressed: int
    seconds: float
    previous_run_id: str | None = None
    address_algorithm: str = "blake3"
    #: what the store's publishers made of the run once it was committed:
    #: ``{"ebs": {"snapshot_id": ...}}`` for an ``ebs://`` store, else empty
    published: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- replicate ---------------------------------------------------------------------

def replicate(disk, store, server_id: str, *, block_size: int | None = None,
              progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
              threads: int = 2, source: str | None = None,
              meta: dict | None = None, create: bool = True,
              change_block_size: bool = False, changed_extents=None) -> RunSummary:
    """Perform one replication run of ``disk`` for ``server_id`` into ``store``.

    ``disk`` is a :class:`~smsblock.disk.Disk` or a path; ``store`` a Store or a path/URL.
    ``create=True`` creates the store when it does not exist; ``create=False`` (what the
    CLI passes unless ``--create``) raises StoreError instead, so a mistyped path fails.
    The first run stores every data block; later runs scan against
    the server's latest manifest and store only changed blocks the store does not hold
    yet.  ``block_size`` defaults to the previous run's (512 KiB for a first run); a
    different one than the previous run's is refused (StoreError: no block of the
    previous run can be reused, the whole disk is stored again) unless
    ``change_block_size=True``.
    ``progress(done, total)`` reports scanned bytes; ``cancel`` stops the run at the next
    block, leaving the store valid (blocks sealed so far are kept for the next run) and
    raising :class:`~smsblock.errors.Cancelled`.  Returns a :class:`RunSummary`; the
    run's manifest, written last, makes the run visible.  ``meta`` (the embedder's own:
    a snapshot name, a ticket) is a JSON object of string keys, at most
    :data:`MAX_RUN_META` bytes as JSON, kept with the run (``RunInfo.meta``, ``runs --json``).

    ``changed_extents`` (byte ``(offset, length)`` pairs, or objects with ``.offset`` and
    ``.length``, e.g. from changed block tracking or an LVM thin / ZFS / Ceph RBD diff)
    lists what changed on the disk since the server's latest run: only the blocks those
    extents touch are read and hashed; every other block is carried over from that run.
    The list must be sorted, not overlapping, within the disk, at most
    :data:`~smsblock.scanner.MAX_CHANGED_EXTENTS` long, and the latest run must have
    the same block size and disk size; otherwise UsageError, before anything is read or
    written.  A list that misses a change makes a wrong run: :func:`verify_run_against_disk`
    re-reads the whole disk to prove a run equals a full scan.
    """
    check_server_id(server_id)
    meta = check_run_meta(meta)
    store = open_store(store)
    own_disk = not isinstance(disk, Disk)
    if own_disk:
        disk = open_disk(disk)
    try:
        if not create:
            store.require()
        if changed_extents is not None and not store.exists():
            # a change list builds on a previous run: never create a store for it
            raise UsageError(f"replicate: changed extents need a previous run of server "
                             f"{server_id}; there is no store at {store.url}")
        with store.lock(exclusive=False, purpose="replicate"):
            store.initialise()
            summary = _replicate_locked(disk, store, server_id, block_size, progress, cancel,
                                        threads, source, meta, change_block_size,
                                        changed_extents)
            if store.publishers:        # after the commit: the run exists whatever they do
                try:
                    summary.published = store.publish_committed(
                        server_id, summary.run_id, progress=progress, cancel=cancel)
                except (PublishError, Cancelled) as e:     # the run is stored: say which
                    e.summary = summary
                    raise
            return summary
    finally:
        if own_disk:
            disk.close()


MAX_RUN_META = 16 << 10    # bytes of replicate(meta=...) as JSON: labels, not data


def check_run_meta(meta) -> dict:
    """``meta`` as a detached JSON object ({} for None); UsageError when it is not one
    (string keys at every level, JSON values, at most MAX_RUN_META bytes)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise UsageError(f"replicate: meta must be a dict (a JSON object), not {type(meta).__name__}")
    try:
        text = json.dumps(meta, allow_nan=False, separators=(",", ":"))   # ASCII, as stored
        copy = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise UsageError("replicate: meta is not JSON: " + " ".join(str(e).split())[:200]) from None
    if copy != meta:    # int keys turned into strings, tuples into lists, ...
        raise UsageError("replicate: meta must have string keys and JSON values (str, "
                         "int, float, bool, None, list, dict) at every level")
    if len(text) > MAX_RUN_META:
        raise UsageError(f"replicate: meta is {len(text)} bytes as JSON, more than "
                         f"{MAX_RUN_META}")
    return copy


def _replicate_locked(disk, store, server_id, block_size, progress, cancel, threads,
                      source, meta=None, change_block_size=True,
                      changed_extents=None) -> RunSummary:
    previous_id = store.latest_run_id(server_id)
    # read in windows, never whole: memory does not follow the disk's size
    previous = store.open_manifest(server_id, previous_id) if previous_id else None
    try:
        return _run(disk, store, server_id, block_size, progress, cancel, threads, source,
                    meta, change_block_size, changed_extents, previous_id, previous)
    finally:
        if previous is not None:
            previous.close()


def _run(disk, store, server_id, block_size, progress, cancel, threads, source, meta,
         change_block_size, changed_extents, previous_id, previous) -> RunSummary:
    t0 = time.monotonic()
    if block_size is None:
        block_size = previous.block_size if previous is not None else DEFAULT_BLOCK_SIZE
    check_block_size(block_size)
    store.check_publishable(block_size)
    if previous is not None and block_size != previous.block_size and not change_block_size:
        raise StoreError(
            f"{store.url}: server {server_id}'s runs use {previous.block_size}-byte blocks, not "
            f"{block_size}: a new block size reuses none of the stored blocks and stores the "
            f"whole disk again (allow it with --change-block-size, change_block_size=True)")
    comparable = (previous is not None and previous.block_size == block_size
                  and previous.disk_size == disk.size)
    changed_runs = None
    if changed_extents is not None:
        # checked whole before anything is read or written
        if not comparable:
            raise UsageError(
                f"replicate: changed extents need a previous run of server {server_id} with "
                f"the same block size and disk size ({block_size}-byte blocks, "
                f"{disk.size} bytes); " + (
                    "it has none" if previous is None else
                    f"run {previous_id} has {previous.block_size}-byte blocks and "
                    f"{previous.disk_size} bytes") + ": run once without them")
        changed_runs = check_changed_extents(changed_extents, disk.size, block_size)
    run_id = new_run_id(previous_id)
    # changed packs checked, then the block index (without damaged packs: the run
    # stores their blocks again), on a thread of its own while the scan starts
    start = start_run(store, threads=threads, cancel=cancel)
    try:
        return _run_started(disk, store, server_id, block_size, progress, cancel, threads,
                            source, meta, changed_runs, previous_id, previous, comparable,
                            run_id, start, t0)
    finally:
        futures.wait([start])       # nothing of this run goes on after it returns


def _run_started(disk, store, server_id, block_size, progress, cancel, threads, source, meta,
                 changed_runs, previous_id, previous, comparable, run_id, start,
                 t0) -> RunSummary:
    cfg = store.config
    n_blocks = (disk.size + block_size - 1) // block_size
    # the blocks changed since the previous run (diff's meaning), counted window by window
    diffed = previous if previous is not None and previous.block_size == block_size else None
    counter = _ChangeCounter(diffed)
    run_meta = scan_meta(disk)
    staged = store.staging_path(".manifest.tmp")
    writer = ManifestWriter(staged, disk.size, block_size, cfg.address)
    published = False
    try:
        sink = PackSink(store, start=start)
        storer = BlockStorer(store, start, sink, cancel)
        data_changed = 0
        try:
            stream = scan_stream(disk, block_size=block_size, previous=previous,
                                 on_changed=storer, threads=threads, progress=progress,
                                 cancel=cancel, changed_runs=changed_runs, addresses=True)
            for seg in stream:
                if isinstance(seg, Gap):
                    if seg.carry:       # a change-list run: as in the previous run, unread
                        _carry_runs(previous, seg, writer, start.result().index, storer, disk,
                                    cancel)
                    else:
                        writer.add_run(BlockState.UNALLOCATED, seg.end - seg.start)
                        counter.gap(seg.start, seg.end)
                    continue
                data_changed += _fill_window(seg, comparable, start, storer, disk, cancel,
                                             block_size)
                if seg.last and changed_runs is None:
                    # nothing is stored after the last window: the last pack is sealed
                    # while the window's records are written (the run's critical path)
                    sink.close(seal=True, wait=False)
                writer.add_window(seg.states, seg.hashes, seg.addresses)
                counter.window(seg)
            start.result()      # its error, if no block needed it
        except BaseException:
            # keep every complete block written so far: the next run finds it in the index
            _quietly(lambda: sink.close(seal=True))
            raise
        try:
            # the last pack reaches the disk while the manifest is finished
            sink.close(seal=True, wait=False)
            sink.written()      # the counts the manifest's summary gives
            summary, storing = _finish_manifest(
                disk, store, server_id, block_size, progress, cancel, source, meta, changed_runs,
                previous_id, run_id, t0, n_blocks, diffed, counter, run_meta, writer, sink,
                stream, data_changed)
        except BaseException:
            _quietly(sink.wait)
            raise
        sink.wait()         # every pack durable and visible before the manifest names it
        store.put_manifest_file(server_id, run_id, staged)
        published = True
    finally:
        if not published:
            writer.abort()
    if storing is not None:
        storing(sink.bytes_stored, sink.bytes_stored)
    summary.seconds = round(time.monotonic() - t0, 6)
    return summary


def _quietly(fn) -> None:
    """``fn()`` on a path that already fails: the first error is the one to report."""
    try:
        fn()
    except SmsBlockError:
        pass


def _finish_manifest(disk, store, server_id, block_size, progress, cancel, source, meta,
                     changed_runs, previous_id, run_id, t0, n_blocks, diffed, counter,
                     run_meta, writer, sink, stream, data_changed):
    """The run's summary and meta, written with the manifest's end (not published yet)."""
    check_cancel(cancel)
    cfg = store.config
    counts = writer.counts
    if diffed is not None:
        blocks_changed = counter.finish(n_blocks)       # also across a size change
    else:
        blocks_changed = n_blocks - counts[BlockState.UNALLOCATED]
    run_meta["scan"] = dict(stream.stats)
    if changed_runs is not None:
        run_meta["scan"]["changed_list_blocks"] = changed_runs.blocks
    bytes_read = stream.stats["bytes_read"]
    created = run_id[2:25]
    summary = RunSummary(
        run_id=run_id, server_id=server_id, disk_size=disk.size, block_size=block_size,
        blocks_total=n_blocks, blocks_data=counts[BlockState.DATA],
        blocks_zero=counts[BlockState.ZERO],
        blocks_unallocated=counts[BlockState.UNALLOCATED],
        blocks_changed=blocks_changed, blocks_data_changed=data_changed,
        blocks_stored=sink.blocks_stored, bytes_read=bytes_read, bytes_stored=sink.bytes_stored,
        bytes_stored_uncompressed=sink.bytes_uncompressed, seconds=0.0,
        previous_run_id=previous_id, address_algorithm=cfg.address)
    summary.seconds = round(time.monotonic() - t0, 6)
    run_meta.update({
        "server_id": server_id, "run_id": run_id,
        "created": datetime.strptime(created, _TS_FORMAT).replace(tzinfo=timezone.utc).isoformat(),
        "source": source if source is not None else disk.path,
        "previous_run_id": previous_id, "summary": summary.to_dict(),
        "user": meta or {}})     # the embedder's, under its own key: it cannot clobber ours
    # the blocks are sealed in the store; the run becomes visible with its manifest
    storing = with_phase(progress, "storing")
    if storing is not None:
        storing(0, sink.bytes_stored)
    writer.finish(run_meta)
    return summary, storing


def _read_block(disk, index: int, block_size: int) -> memoryview:
    off = index * block_size
    buf = bytearray(min(block_size, disk.size - off))
    disk.readinto(off, buf)
    return memoryview(buf)


def _fill_window(w, comparable: bool, start, storer, disk, cancel, block_size: int) -> int:
    """Give the window's DATA blocks their content addresses: changed ones have theirs
    from the storer; unchanged ones take the previous run's, stored again when the store
    lost them.  Returns how many DATA blocks were changed (or stored again)."""
    data = w.states == BlockState.DATA
    changed = data & (w.changed != 0)
    carried = np.flatnonzero(data & ~changed)
    restored = 0
    if len(carried):
        if not comparable or w.prev_addresses is None:
            raise StoreError("scan reported unchanged blocks without a comparable previous run")
        w.addresses[carried] = w.prev_addresses[carried]
        missing = carried[~start.result().index.contains_all(w.prev_addresses[carried])]
        # the previous run references blocks the store lost: store them again
        for k in missing.tolist():
            check_cancel(cancel)
            storer(w, k, _read_block(disk, w.start + k, block_size))
        restored = len(missing)
    w.addresses[~data] = 0
    if (w.addresses[data] == 0).all(axis=1).any():
        raise StoreError("internal error: a data block has no content address")
    return int(np.count_nonzero(changed)) + restored


def _carry_runs(previous, gap, writer, index, storer, disk, cancel) -> None:
    """Blocks a change list leaves out: the previous run's, run by run; DATA blocks the
    store lost are read and stored again."""
    bs = previous.block_size
    for state, start, count, hashes, addresses in previous.runs(gap.start, gap.end):
        if hashes is None:
            writer.add_run(state, count)
            continue
        if state == BlockState.DATA:
            missing = np.flatnonzero(~index.contains_all(addresses))
            if len(missing):
                addresses = addresses.copy()
                for k in missing.tolist():
                    check_cancel(cancel)
                    addresses[k] = np.frombuffer(
                        storer.store_block(_read_block(disk, start + k, bs)), np.uint8)
        writer.add_run(state, count, hashes, addresses)


class _ChangeCounter:
    """Counts the blocks :func:`~smsblock.manifest.diff` would list between the previous
    run (same block size, any disk size) and the new one, fed in block order."""

    def __init__(self, previous):
        self.previous = previous
        self.n = 0

    def gap(self, start: int, end: int) -> None:
        """Blocks now UNALLOCATED: changed where the previous run had them otherwise."""
        p = self.previous
        if p is None:
            return
        pe = min(end, p.n_blocks)
        for state, _s, count, _h, _a in p.runs(start, pe):
            if state != BlockState.UNALLOCATED:
                self.n += count
        self.n += max(0, end - max(start, p.n_blocks))

    def window(self, w) -> None:
        p = self.previous
        if p is None:
            return
        pe = min(w.end, p.n_blocks)
        if pe > w.start:
            if w.prev_states is not None:
                ps, ph = w.prev_states, w.prev_hashes
            else:
                ps, ph, _ = p.window(w.start, pe)
            k = pe - w.start
            s, h = w.states[:k], w.hashes[:k]
            both = (s == BlockState.DATA) & (ps == BlockState.DATA)
            self.n += int(np.count_nonzero((s != ps) | (both & (h != ph).any(axis=1))))
        self.n += max(0, w.end - max(w.start, p.n_blocks))

    def finish(self, n_blocks: int) -> int:
        return self.n + max(0, self.previous.n_blocks - n_blocks)


# --- restore ----------------------------------------------------------------------

def restore(store, server_id: str, out_path, *, run_id: str | None = None, format: str = "raw",
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
            mode: int | None = None) -> ManifestReader:
    """Write the disk exactly as it was at a run (default: the latest) to ``out_path``.

    ``format="raw"`` writes a sparse raw image (holes where the run has zero or
    unallocated blocks); ``format="vmdk"`` a streamOptimized VMDK.  A cancelled or failed
    raw restore leaves no partial file behind.  The output file is private (0600) unless
    ``mode`` gives its permission bits.  Returns the run's manifest, a (closed)
    :class:`~smsblock.manifest.ManifestReader`: its ``meta``, sizes and counts.
    """
    progress = with_phase(progress, "converting")
    from .disk.writer import check_mode
    store = open_store(store)
    store.require()
    out_path = os.fspath(out_path)
    check_mode(mode)
    if format not in ("raw", "vmdk"):
        raise UsageError(f"unknown output format {format!r} (raw or vmdk)")
    if store.holds_path(out_path):
        raise UsageError(f"{out_path}: the restore's output must not be inside the store "
                         f"({store.url})")
    with store.lock(exclusive=False, purpose="restore"), \
            store.open_manifest(check_server_id(server_id), run_id) as manifest:
        run = store.restore_source(manifest)
        # the one raw-disk writer: a file written as OUT.part and renamed when complete,
        # or a device written in place (zeros too)
        from .disk.writer import write_raw, write_stream_optimized
        if format == "raw":
            write_raw(run, out_path, progress=progress, cancel=cancel, mode=mode,
                      allow_device=True)
        else:
            write_stream_optimized(run, out_path, progress=progress, cancel=cancel, mode=mode)
    return manifest


# --- the repository's checks on a Store or a path/URL -------------------------------------

def verify(store, **kw) -> VerifyReport:
    """:func:`smsblock.repository.verify.verify` (read every pack, check every manifest)
    on a Store or a store path/URL."""
    return _verify.verify(open_store(store), **kw)


def verify_run_against_disk(store, server_id: str, disk, run_id: str | None = None,
                            **kw) -> DeepVerifyReport:
    """:func:`smsblock.repository.verify.verify_run_against_disk` (re-read the whole disk
    and compare it with a run) on a Store or a store path/URL."""
    return _verify.verify_run_against_disk(open_store(store), server_id, disk, run_id, **kw)


def prune(store, server_id: str, keep: int, **kw) -> PruneReport:
    """:func:`smsblock.repository.prune.prune` (delete old runs and the blocks no run
    references) on a Store or a store path/URL."""
    return _prune.prune(open_store(store), server_id, keep, **kw)
