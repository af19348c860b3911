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

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import os
import queue
import secrets
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterator

import numpy as np
import xxhash
import zstandard

from .disk import Disk, DiskInfo, Extent, ExtentKind, open_disk
from .disk.blocks import BlockDisk
from .errors import (Cancelled, ManifestError, RunNotFoundError, SmsBlockError, StoreCorruptError,
                     StoreError, UsageError)
from .manifest import DEFAULT_BLOCK_SIZE, BlockState, Manifest, check_block_size, diff
from .pack import BlockIndex, BlockLocation, PackWriter, address_function, verify_pack
from .progress import CancelToken, ProgressCallback, check_cancel, with_phase
from .scanner import check_changed_extents, scan
from .store import Store, open_store
from .store.base import check_run_id, check_server_id

__all__ = ["replicate", "restore", "verify", "verify_run_against_disk", "prune", "RunSummary",
           "VerifyReport", "DeepVerifyReport",
           "PruneReport", "RunDisk", "new_run_id", "MAX_RUN_META"]

log = logging.getLogger(__name__)
QUEUE_DEPTH = 16          # compressed blocks waiting for the pack writer (bounds memory)


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _CheckReport:
    """What a check found: ``ok`` when ``problems`` is empty; ``to_dict`` says it too."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class VerifyReport(_CheckReport):
    """What :func:`verify` checked and found; ``ok`` when ``problems`` is empty."""

    packs_checked: int = 0
    blocks_checked: int = 0
    bytes_checked: int = 0
    runs_checked: int = 0
    problems: list[str] = field(default_factory=list)
    unreferenced_packs: int = 0       # packs no run uses (left by a killed run; prune removes)
    damaged_packs: int = 0            # packs with damage recorded (new runs store those blocks again)
    leftovers: list[str] = field(default_factory=list)


@dataclass
class DeepVerifyReport(_CheckReport):
    """What :func:`verify_run_against_disk` found: the blocks whose content in the run
    differs from the disk's now (``differing_blocks``: the first
    :data:`MAX_LISTED_BLOCKS` indexes; ``blocks_differing`` counts them all)."""

    server_id: str
    run_id: str
    disk_size: int
    block_size: int
    blocks_checked: int = 0
    blocks_differing: int = 0
    differing_blocks: list[int] = field(default_factory=list)
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)


MAX_LISTED_BLOCKS = 1000     # differing block indexes a deep verify report lists


@dataclass
class PruneReport:
    """What :func:`prune` removed."""

    runs_deleted: list[str] = field(default_factory=list)
    runs_kept: list[str] = field(default_factory=list)
    packs_deleted: int = 0
    packs_rewritten: int = 0
    blocks_deleted: int = 0
    bytes_freed: int = 0
    leftovers_removed: int = 0
    #: packs a rewrite could not replace for want of space (kept whole; prune again later)
    packs_left: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the pack writer ----------------------------------------------------------------

class _PackSink:
    """Owns the pack being filled.  A writer thread appends frames from a bounded queue
    and seals the pack each time it reaches the store's pack size; a syncer thread then
    fsyncs it and puts it under its id, while the writer already fills the next pack
    (disk writes overlap compression)."""

    _STOP = object()

    def __init__(self, store: Store, damaged: set[str] = frozenset()):
        self.store = store
        self.damaged = set(damaged)     # ids of packs with a damage record
        self.pack_size = store.config.pack_size
        self.algorithm = store.config.address
        self.blocks_stored = 0
        self.bytes_stored = 0
        self.bytes_uncompressed = 0
        self.packs_sealed = 0
        self.error: BaseException | None = None
        self._closing = False
        self._writer: PackWriter | None = None
        self._queue: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._sealed: queue.Queue = queue.Queue(2)      # packs written, waiting for fsync
        self._thread = threading.Thread(target=self._run, name="smsblock-pack-writer", daemon=True)
        self._syncer = threading.Thread(target=self._sync_loop, name="smsblock-pack-sync", daemon=True)
        self._thread.start()
        self._syncer.start()

    def submit(self, address: bytes, frame: bytes, ulen: int) -> None:
        while True:
            if self.error is not None:
                raise StoreError(f"pack writer failed: {self.error}")
            if self._closing:       # a scan thread still running after the run stopped
                raise Cancelled("the run was stopped")
            try:
                self._queue.put((address, frame, ulen), timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is self._STOP:
                    return
                if self.error is not None:
                    continue            # drain: submitters raise the error
                address, frame, ulen = item
                if self._writer is None:
                    self._writer = PackWriter(self.store.staging_path(".pack.tmp"), self.algorithm)
                self._writer.add(address, frame, ulen)
                self.blocks_stored += 1
                self.bytes_stored += len(frame)
                self.bytes_uncompressed += ulen
                if self._writer.size >= self.pack_size:
                    self._seal()
        except BaseException as e:      # reported to the submitting threads and close()
            self.error = e
            while self._queue.get() is not self._STOP:
                pass

    def _seal(self) -> None:
        writer, self._writer = self._writer, None
        pack_id, idx = writer.seal(sync=False)
        self._put_sealed((writer, pack_id, idx))

    def _put_sealed(self, item) -> None:
        while True:
            if self.error is not None:
                raise StoreError(f"pack sync failed: {self.error}")
            try:
                self._sealed.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _sync_loop(self) -> None:
        while True:
            item = self._sealed.get()
            if item is self._STOP:
                return
            writer, pack_id, idx = item
            try:
                if self.error is None:
                    writer.sync()
                    if pack_id in self.damaged:
                        # the same blocks stored again under the damaged pack's id: a sound
                        # copy, put over the damaged one
                        self.store.replace_pack(pack_id, writer.path)
                        self.store.delete_damage_record(pack_id)
                        self.store.forget_pack(pack_id)
                    else:
                        self.store.put_pack(pack_id, writer.path)
                    # not added to the run's index: the run's claimed set already skips
                    # these blocks, and a dict entry per stored block would cost memory
                    self.packs_sealed += 1
                    continue
            except BaseException as e:
                self.error = e
            writer.discard()

    def close(self, seal: bool = True) -> None:
        """Stop the threads; seal the partial pack (``seal``) or discard it.  Every pack
        sealed before this returns is durable and visible."""
        self._closing = True
        self._queue.put(self._STOP)
        self._thread.join()
        try:
            if self._writer is not None:
                if seal and self.error is None and self._writer.count:
                    self._seal()
                else:
                    self._writer.discard()
                    self._writer = None
        finally:
            self._sealed.put(self._STOP)
            self._syncer.join()
        if self.error is not None:
            err = self.error
            if isinstance(err, SmsBlockError):
                raise err
            raise StoreError(f"pack writer failed: {err}") from err


class _BlockStorer:
    """``on_changed`` of a run: address each changed block, store it unless the store
    already has it.  Called concurrently from the scan's worker threads."""

    def __init__(self, store: Store, index: BlockIndex, sink: _PackSink, n_blocks: int,
                 cancel: CancelToken | None):
        cfg = store.config
        self.address_of = address_function(cfg.address)
        self.level = cfg.zstd_level
        self.index = index
        self.sink = sink
        self.cancel = cancel
        self.addresses = np.zeros((n_blocks, 32), np.uint8)
        self.changed = np.zeros(n_blocks, bool)
        self._claimed: set[bytes] = set()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return c

    def __call__(self, index: int, view) -> None:
        check_cancel(self.cancel)
        address = self.address_of(view)
        self.addresses[index] = np.frombuffer(address, np.uint8)
        self.changed[index] = True
        with self._lock:
            if address in self._claimed:
                return
            self._claimed.add(address)
        if address in self.index:
            return
        frame = self._compressor().compress(view)
        self.sink.submit(address, frame, len(view))


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
            return _replicate_locked(disk, store, server_id, block_size, progress, cancel,
                                     threads, source, meta, change_block_size,
                                     changed_extents)
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
    t0 = time.monotonic()
    cfg = store.config
    previous_id = store.latest_run_id(server_id)
    previous = store.load_manifest(server_id, previous_id) if previous_id else None
    if block_size is None:
        block_size = previous.block_size if previous is not None else DEFAULT_BLOCK_SIZE
    check_block_size(block_size)
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
    # blocks a damage record names are not in it: the run stores them again
    index = store.block_index(for_new_runs=True)
    n_blocks = (disk.size + block_size - 1) // block_size
    sink = _PackSink(store, set(store.list_damage_records()))
    storer = _BlockStorer(store, index, sink, n_blocks, cancel)
    sealed = False
    try:
        manifest = scan(disk, block_size=block_size, previous=previous, on_changed=storer,
                        threads=threads, progress=progress, cancel=cancel,
                        changed_runs=changed_runs)
        data = manifest.states == BlockState.DATA
        carried = data & ~storer.changed
        if carried.any():
            if not comparable:
                raise StoreError("scan reported unchanged blocks without a comparable previous run")
            carried_addr = previous.addresses[carried]
            missing = ~index.contains_all(carried_addr)
            if missing.any():
                # the previous run references blocks the store lost: store them again
                for i in np.flatnonzero(carried)[missing]:
                    check_cancel(cancel)
                    off, length = manifest.block_range(int(i))
                    buf = bytearray(length)
                    disk.readinto(off, buf)
                    storer(int(i), memoryview(buf))
                carried[np.flatnonzero(carried)[missing]] = False
            storer.addresses[carried] = previous.addresses[carried]
        sealed = True
        sink.close(seal=True)
    except BaseException:
        if not sealed:
            # keep every complete block written so far: the next run finds it in the index
            try:
                sink.close(seal=True)
            except SmsBlockError:
                pass
        raise
    check_cancel(cancel)

    manifest.addresses[:] = storer.addresses
    manifest.addresses[~data] = 0
    manifest.address_algorithm = cfg.address
    if (manifest.addresses[data] == 0).all(axis=1).any():
        raise StoreError("internal error: a data block has no content address")

    if previous is not None and previous.block_size == block_size:
        blocks_changed = len(diff(previous, manifest))      # also across a size change
    else:
        blocks_changed = int(np.count_nonzero(manifest.states != BlockState.UNALLOCATED))
    bytes_read = manifest.meta["scan"]["bytes_read"]
    created = run_id[2:25]
    summary = RunSummary(
        run_id=run_id, server_id=server_id, disk_size=disk.size, block_size=block_size,
        blocks_total=manifest.n_blocks, blocks_data=int(np.count_nonzero(data)),
        blocks_zero=manifest.count(BlockState.ZERO),
        blocks_unallocated=manifest.count(BlockState.UNALLOCATED),
        blocks_changed=blocks_changed, blocks_data_changed=int(np.count_nonzero(storer.changed)),
        blocks_stored=sink.blocks_stored, bytes_read=bytes_read, bytes_stored=sink.bytes_stored,
        bytes_stored_uncompressed=sink.bytes_uncompressed, seconds=0.0,
        previous_run_id=previous_id, address_algorithm=cfg.address)
    summary.seconds = round(time.monotonic() - t0, 6)
    manifest.meta.update({
        "server_id": server_id, "run_id": run_id,
        "created": datetime.strptime(created, _TS_FORMAT).replace(tzinfo=timezone.utc).isoformat(),
        "source": source if source is not None else disk.path,
        "previous_run_id": previous_id, "summary": summary.to_dict(),
        "user": meta or {}})     # the embedder's, under its own key: it cannot clobber ours
    # the blocks are sealed in the store; the run becomes visible with its manifest
    storing = with_phase(progress, "storing")
    if storing is not None:
        storing(0, sink.bytes_stored)
    store.put_manifest_bytes(server_id, run_id, manifest.to_bytes())
    if storing is not None:
        storing(sink.bytes_stored, sink.bytes_stored)
    summary.seconds = round(time.monotonic() - t0, 6)
    return summary


# --- reading a run back ---------------------------------------------------------------

class RunDisk(BlockDisk):
    """A read-only :class:`~smsblock.disk.Disk` over one run, reading blocks from the packs.

    DATA blocks are extents of kind DATA, ZERO blocks extents of kind ZERO, unallocated
    blocks are gaps.  Thread-safe; keeps a few inflated blocks cached.  ``hold`` (what
    :meth:`Store.run_disk` passes: the store lock it took) is closed by :meth:`close`.
    """

    def __init__(self, store: Store, manifest: Manifest, index: BlockIndex | None = None,
                 hold: contextlib.ExitStack | None = None):
        super().__init__()
        self._hold = hold
        self.store = store
        self.manifest = manifest
        meta = manifest.meta
        self.path = f"{store.url}#{meta.get('server_id', '?')}/{meta.get('run_id', '?')}"
        self.size = manifest.disk_size
        self.info = DiskInfo(path=self.path, format="run", virtual_size=self.size)
        self.block_size = manifest.block_size
        self._index = index if index is not None else store.block_index()

    def fetch_block(self, i: int) -> bytes | None:
        if self.manifest.states[i] != BlockState.DATA:
            return None
        address = self.manifest.addresses[i].tobytes()
        loc = self._index.get(address)
        if loc is None:
            raise StoreCorruptError(f"block {i} ({address.hex()[:16]}...) is not in the store",
                                    self.path, i * self.block_size)
        try:
            data = self.store.read_block(loc)
        except StoreCorruptError:
            self._record_damage(loc.pack_id, address)
            raise
        expected = self.manifest.block_range(i)[1]
        if len(data) != expected:
            raise StoreCorruptError(f"stored block {i} has {len(data)} bytes, expected {expected}",
                                    self.path, i * self.block_size)
        # the run's own change hash (xxh3-128, ~10 GB/s) catches a block damaged in the
        # store, so a restore never writes wrong bytes silently
        if xxhash.xxh3_128_digest(data) != self.manifest.hashes[i].tobytes():
            if address_function(self.store.config.address)(data) != address:
                self._record_damage(loc.pack_id, address)
            raise StoreCorruptError(f"stored block {i} ({address.hex()[:16]}...) does not match "
                                    "the run's hash: the store is damaged (run verify)",
                                    self.path, i * self.block_size)
        return data

    def _record_damage(self, pack_id: str, address: bytes) -> None:
        # the next run then stores this block again instead of building on the bad copy
        self.store.record_damage(pack_id, [address], problems=[
            f"{self.store.pack_name(pack_id)}: block {address.hex()[:16]}... does not read back"],
            by="read")

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        start, end = self._clip(start, end)
        if start >= end:
            return
        bs = self.manifest.block_size
        states = self.manifest.states
        first, last = start // bs, (end - 1) // bs + 1
        s = states[first:last]
        # runs of equal state: boundaries where the state changes
        cuts = np.flatnonzero(s[1:] != s[:-1]) + 1
        bounds = np.concatenate([[0], cuts, [len(s)]])
        for a, b in zip(bounds[:-1], bounds[1:]):
            state = s[a]
            if state == BlockState.UNALLOCATED:
                continue
            lo = max(start, (first + int(a)) * bs)
            hi = min(end, (first + int(b)) * bs)
            yield Extent(lo, hi - lo, ExtentKind.DATA if state == BlockState.DATA else ExtentKind.ZERO)

    def close(self) -> None:
        """Release what the disk holds (the store lock of :meth:`Store.run_disk`); idempotent."""
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.close()


# --- restore ----------------------------------------------------------------------

def _restore_raw(run: RunDisk, out_path: str, progress, cancel, mode) -> None:
    from .disk.writer import PartialFile, output_path
    try:    # followed: a device is often named by a link (/dev/disk/by-id/...)
        st = os.stat(out_path)
    except OSError:
        st = None
    if st is not None and (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        try:
            fd = os.open(out_path, os.O_WRONLY | os.O_CLOEXEC)
            kind = os.fstat(fd).st_mode
        except OSError as e:
            raise StoreError(f"{out_path}: cannot open: {e.strerror}") from None
        try:
            if not (stat.S_ISBLK(kind) or stat.S_ISCHR(kind)):     # swapped since the stat
                raise UsageError(f"{out_path}: changed while opening; not a device any more")
            _write_run(run, fd, out_path, progress, cancel, device=True)
        finally:
            os.close(fd)
        return
    # a file: written as OUT.part (new, O_EXCL | O_NOFOLLOW, 0600 or ``mode``), renamed
    # over OUT when complete, removed on failure
    with PartialFile(output_path(out_path), mode) as part:
        _write_run(run, part.fd, out_path, progress, cancel, device=False)
        part.commit()


def _write_run(run: RunDisk, fd: int, out_path: str, progress, cancel, device: bool) -> None:
    m = run.manifest
    data_blocks = np.flatnonzero(m.states == BlockState.DATA)
    total = sum(m.block_range(int(i))[1] for i in data_blocks)
    done = 0
    try:
        if not device:
            os.ftruncate(fd, m.disk_size)
        bs = m.block_size
        if device:      # a block device keeps old bytes: write the zeros too
            zeros = bytes(bs)
            for i in np.flatnonzero(m.states != BlockState.DATA):
                off, length = m.block_range(int(i))
                os.pwrite(fd, zeros[:length], off)
        for i in data_blocks:
            check_cancel(cancel)
            i = int(i)
            data = run.block(i)
            off = i * bs
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, off)
                view = view[n:]
                off += n
            done += len(data)
            if progress is not None:
                progress(done, total)
        try:
            os.fsync(fd)
        except OSError as e:
            if not device or e.errno != errno.EINVAL:   # character devices cannot fsync
                raise
    except OSError as e:
        raise StoreError(f"{out_path}: write failed: {e.strerror}") from None
    if progress is not None:
        progress(total, total)


def restore(store, server_id: str, out_path, *, run_id: str | None = None, format: str = "raw",
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
            mode: int | None = None) -> Manifest:
    """Write the disk exactly as it was at a run (default: the latest) to ``out_path``.

    ``format="raw"`` writes a sparse raw image (holes where the run has zero or
    unallocated blocks); ``format="vmdk"`` a streamOptimized VMDK.  A cancelled or failed
    raw restore leaves no partial file behind.  The output file is private (0600) unless
    ``mode`` gives its permission bits.  Returns the run's manifest.
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
    with store.lock(exclusive=False, purpose="restore"):
        manifest = store.load_manifest(check_server_id(server_id), run_id)
        run = store.restore_source(manifest)
        if format == "raw":
            _restore_raw(run, out_path, progress, cancel, mode)
        else:
            from .disk.writer import write_stream_optimized
            write_stream_optimized(run, out_path, progress=progress, cancel=cancel, mode=mode)
    return manifest


# --- verify ----------------------------------------------------------------------------

def _bounded_map(pool: ThreadPoolExecutor, fn, items, window: int):
    """``pool.map`` in order with at most ``window`` items in flight (bounded memory)."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def verify(store, *, progress: ProgressCallback | None = None,
           cancel: CancelToken | None = None, threads: int = 2) -> VerifyReport:
    """Read every pack and check every block against its content address; load every
    manifest (its own checksums) and check every block it references is in the store.

    Problems are collected in the report, not raised; ``report.ok`` tells.
    ``progress`` counts pack bytes read.
    """
    progress = with_phase(progress, "verifying")
    store = open_store(store)
    store.require()
    report = VerifyReport()
    with store.lock(exclusive=False, purpose="verify"):
        algorithm = store.config.address
        packs = store.list_packs()
        total = sum(packs.values())
        done = 0
        good_packs: dict[str, np.ndarray] = {}
        damage = store.damage()

        def check(item):
            pack_id, size = item
            check_cancel(cancel)
            return pack_id, size, verify_pack(lambda o, n: store.read_pack(pack_id, o, n), size,
                                              store.pack_name(pack_id), algorithm)

        # two packs at a time: inflating and hashing release the GIL
        with ThreadPoolExecutor(threads, thread_name_prefix="smsblock-verify") as pool:
            results = _bounded_map(pool, check, sorted(packs.items()), threads * 2)
            for pack_id, size, (index, good, problems) in results:
                report.packs_checked += 1
                report.problems.extend(problems)
                if index is not None:
                    report.blocks_checked += len(index)
                    good_packs[pack_id] = index[good]
                    _update_damage_record(store, pack_id, index, good, problems,
                                          damage.get(pack_id))
                report.bytes_checked += size
                done += size
                if progress is not None:
                    progress(done, total)
        good_index = BlockIndex(good_packs)
        referenced: set[str] = set()
        for server_id, run_id in store.iter_manifests():
            check_cancel(cancel)
            report.runs_checked += 1
            where = f"{store.url}: run {server_id}/{run_id}"
            try:
                m = store.load_manifest(server_id, run_id)
            except (ManifestError, RunNotFoundError) as e:
                report.problems.append(f"{where}: {e}")
                continue
            report.problems.extend(_check_manifest(m, server_id, run_id, algorithm,
                                                   good_index, where, referenced))
        report.unreferenced_packs = sum(1 for p in good_packs if p not in referenced)
        report.damaged_packs = sum(1 for p in store.list_damage_records() if p in packs)
        report.leftovers = store.list_leftovers()
    return report


def verify_run_against_disk(store, server_id: str, disk, run_id: str | None = None, *,
                            progress: ProgressCallback | None = None,
                            cancel: CancelToken | None = None,
                            threads: int = 2) -> DeepVerifyReport:
    """Re-read the whole ``disk`` (a Disk or a path) and compare it with a run's manifest
    (``run_id``; None: the server's latest run), block by block: proves that a run made
    from a change list equals a full scan of the disk as it is now.

    A block differs when its content does: a DATA block whose xxh3-128 differs, or that
    is DATA on one side and zeros (ZERO or UNALLOCATED, both restored as zeros) on the
    other.  Differences are collected in the report (``report.ok``), not raised; a disk
    of another size than the run's is one problem.  ``progress`` counts bytes read.
    """
    progress = with_phase(progress, "verifying")
    check_server_id(server_id)
    if run_id is not None:
        check_run_id(run_id)
    store = open_store(store)
    store.require()
    own_disk = not isinstance(disk, Disk)
    if own_disk:
        disk = open_disk(disk)
    try:
        with store.lock(exclusive=False, purpose="verify"):
            if run_id is None:
                run_id = store.latest_run_id(server_id)
                if run_id is None:
                    raise RunNotFoundError(f"{store.url}: no runs of server {server_id!r}")
            m = store.load_manifest(server_id, run_id)
        report = DeepVerifyReport(server_id=server_id, run_id=run_id, disk_size=m.disk_size,
                                  block_size=m.block_size)
        if disk.size != m.disk_size:
            report.problems.append(f"{disk.path}: the disk is {disk.size} bytes, run "
                                   f"{server_id}/{run_id} {m.disk_size} bytes")
            return report
        now = scan(disk, block_size=m.block_size, threads=threads, progress=progress,
                   cancel=cancel)
        data_run, data_now = m.states == BlockState.DATA, now.states == BlockState.DATA
        differ = (data_run != data_now) | (
            data_run & data_now & (m.hashes != now.hashes).any(axis=1))
        idx = np.flatnonzero(differ)
        report.blocks_checked = now.n_blocks
        report.bytes_read = now.meta["scan"]["bytes_read"]
        report.blocks_differing = len(idx)
        report.differing_blocks = idx[:MAX_LISTED_BLOCKS].tolist()
        if len(idx):
            shown = ", ".join(map(str, report.differing_blocks[:10]))
            more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
            report.problems.append(
                f"run {server_id}/{run_id}: {len(idx)} of {now.n_blocks} blocks differ from "
                f"{disk.path} (blocks {shown}{more}; {m.block_size}-byte blocks)")
        return report
    finally:
        if own_disk:
            disk.close()


def _update_damage_record(store: Store, pack_id: str, index: np.ndarray, good: np.ndarray,
                          problems: list[str], old) -> None:
    """Make the pack's damage record say what verify just found (a read of every byte)."""
    bad = index["address"][~good]
    whole = len(problems) > len(bad)          # damage outside the frames
    if not problems:
        if old is not None:
            with contextlib.suppress(StoreError):
                store.delete_damage_record(pack_id)
        return
    found = {a.tobytes() for a in bad}
    if old is not None and (old.addresses, old.pack) == (found, whole):
        return
    store.record_damage(pack_id, found, pack=whole, problems=problems, by="verify", replace=True)


def _check_manifest(m: Manifest, server_id, run_id, algorithm, index: BlockIndex, where,
                    referenced: set[str]) -> list[str]:
    problems = []
    if m.meta.get("server_id") != server_id or m.meta.get("run_id") != run_id:
        problems.append(f"{where}: manifest says it is run {m.meta.get('server_id')}/"
                        f"{m.meta.get('run_id')}")
    data = m.states == BlockState.DATA
    if data.any() and m.address_algorithm != algorithm:
        problems.append(f"{where}: addresses are {m.address_algorithm}, the store uses {algorithm}")
        return problems
    no_addr = data & (m.addresses == 0).all(axis=1)
    if no_addr.any():
        problems.append(f"{where}: {int(no_addr.sum())} data blocks have no address "
                        f"(first: block {int(np.flatnonzero(no_addr)[0])})")
    stray = ~data & (m.addresses != 0).any(axis=1)
    if stray.any():
        problems.append(f"{where}: {int(stray.sum())} non-data blocks carry an address "
                        f"(first: block {int(np.flatnonzero(stray)[0])})")
    rows = np.flatnonzero(data & ~no_addr)
    present = index.contains_all(m.addresses[rows])
    if not present.all():
        first = int(rows[np.flatnonzero(~present)[0]])
        problems.append(f"{where}: {int((~present).sum())} referenced blocks are missing or "
                        f"damaged in the store (first: block {first})")
    for r in rows[present]:
        loc = index.get(m.addresses[r].tobytes())
        referenced.add(loc.pack_id)
        if loc.ulen != m.block_range(int(r))[1]:
            problems.append(f"{where}: block {int(r)} is stored with {loc.ulen} bytes, "
                            f"expected {m.block_range(int(r))[1]}")
            break
    return problems


# --- prune ----------------------------------------------------------------------------

def _address_view(a: np.ndarray) -> np.ndarray:
    """Rows of an (n, 32) uint8 array as single comparable items."""
    return np.ascontiguousarray(a).view(np.dtype((np.void, 32))).reshape(-1)


def _live_addresses(store: Store, server_id: str, doomed: list[str]) -> np.ndarray:
    """The content addresses (unique, as ``_address_view`` items) every run but the doomed
    ones references.  Read before prune deletes anything: a manifest that does not load
    stops prune with nothing removed."""
    parts = []
    for sid, rid in store.iter_manifests():
        if sid == server_id and rid in doomed:
            continue
        m = store.load_manifest(sid, rid)
        parts.append(_address_view(m.addresses[m.states == BlockState.DATA]))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.dtype((np.void, 32)))


def _readable_packs(store: Store) -> tuple[list[tuple[str, int]], list[np.ndarray]]:
    """``([(pack_id, size)], [index])`` of the packs whose index reads; a damaged one is
    left alone for a human (verify reports it)."""
    packs, indexes = [], []
    for pack_id, size in sorted(store.list_packs().items()):
        try:
            indexes.append(store.pack_index(pack_id, size))
            packs.append((pack_id, size))
        except StoreCorruptError as e:
            log.warning("%s (prune leaves this pack alone)", e)
    return packs, indexes


def _entry_ranks(store: Store, packs: list[tuple[str, int]], indexes: list[np.ndarray]
                 ) -> tuple[np.ndarray, set[str]]:
    """Per index entry (in pack order) how good a copy of its block it is: 0 sound,
    1 in a pack damaged outside its frames (readable, used only when no sound copy
    exists), 2 a damaged frame (never kept).  Frames a record names are read again first,
    so a wrong or stale record never costs a block.  Also returns the ids of packs with a
    damage record."""
    damage = store.damage()
    ranks = []
    for (pack_id, _), index in zip(packs, indexes):
        rank = np.zeros(len(index), np.int8)
        record = damage.get(pack_id)
        if record is not None:
            if record.pack:
                rank[:] = 1
            for i in np.flatnonzero(record.holds(index["address"])):
                e = index[i]
                loc = BlockLocation(pack_id, int(e["offset"]), int(e["clen"]), int(e["ulen"]))
                try:
                    sound = address_function(store.config.address)(store.read_block(loc)) \
                        == e["address"].tobytes()
                except StoreCorruptError:
                    sound = False
                if not sound:
                    rank[i] = 2
            if not record.pack and not (rank == 2).any():
                store.delete_damage_record(pack_id)      # every named frame reads fine now
        ranks.append(rank)
    return (np.concatenate(ranks) if ranks else np.zeros(0, np.int8)), set(damage)


def _wanted_entries(indexes: list[np.ndarray], live: np.ndarray,
                    ranks: np.ndarray | None = None) -> np.ndarray:
    """One flag per index entry, in pack order: a run uses the entry's block and it is the
    best copy of its address (the first sound one; copies come from concurrent runs, an
    interrupted prune, or a run that stored a damaged block again)."""
    addrs = _address_view(np.concatenate([ix["address"] for ix in indexes])
                          if indexes else np.zeros((0, 32), np.uint8))
    if ranks is None:
        ranks = np.zeros(len(addrs), np.int8)
    # sort by address, then rank, then position: the first of each address is its best copy
    _, group = np.unique(addrs, return_inverse=True)
    order = np.lexsort((np.arange(len(addrs)), ranks, group.reshape(-1)))
    sorted_addrs = addrs[order]
    first = np.ones(len(order), bool)
    first[1:] = sorted_addrs[1:] != sorted_addrs[:-1]
    wanted = np.zeros(len(addrs), bool)
    wanted[order[first]] = True
    return wanted & (ranks < 2) & np.isin(addrs, live)


def _rewrite_pack(store: Store, pack_id: str, entries: np.ndarray) -> tuple[str, int]:
    """Put a new pack of ``entries`` of ``pack_id`` (frames copied as they are); return
    its id and size."""
    writer = PackWriter(store.staging_path(".pack.tmp"), store.config.address)
    try:
        for e in entries:
            frame = store.read_pack(pack_id, int(e["offset"]), int(e["clen"]))
            writer.add(e["address"].tobytes(), frame, int(e["ulen"]))
        new_id, _ = writer.seal()
    except BaseException:
        writer.discard()
        raise
    store.put_pack(new_id, writer.path)
    return new_id, writer.sealed_size


def prune(store, server_id: str, keep: int, *, progress: ProgressCallback | None = None,
          dry_run: bool = False) -> PruneReport:
    """Keep the newest ``keep`` runs of ``server_id`` and delete the older ones, then delete
    every stored block no remaining run (of any server) references: packs with no live
    block are deleted, packs with some are rewritten with only the live ones (frames copied
    as they are).  Also removes what killed runs left (temp files, unreferenced packs).

    It works on a full disk: leftovers and dead packs go first, and a rewrite that finds
    no space keeps its pack whole (``packs_left`` counts them) instead of failing.

    Takes the store lock exclusively: fails with StoreLockedError while a run or a
    :meth:`Store.run_disk` reader uses the store.  ``dry_run=True``
    changes nothing and returns what would be deleted (runs, whole packs and the blocks
    in them; blocks a rewrite would drop are counted too, their bytes are not).
    """
    progress = with_phase(progress, "pruning")
    store = open_store(store)
    store.require()
    check_server_id(server_id)
    if not isinstance(keep, int) or keep < 0:
        raise UsageError(f"--keep must be a non-negative integer, not {keep!r}")
    report = PruneReport()
    with store.lock(exclusive=True, purpose="prune"):
        ids = store.list_run_ids(server_id)
        doomed = ids[:max(0, len(ids) - keep)]
        report.runs_kept = ids[len(doomed):]
        live = _live_addresses(store, server_id, doomed)
        if dry_run:
            return _prune_dry_run(store, doomed, live, report)
        for run_id in doomed:        # oldest first: a crash midway still keeps the newest
            store.delete_manifest(server_id, run_id)
            report.runs_deleted.append(run_id)

        # what frees space without taking any goes first, so prune works on a full disk:
        # what killed runs left, then packs with no live block; rewrites (which write a
        # new pack before the old one goes) last, each skipped when the disk is full
        for name in store.list_leftovers():
            report.bytes_freed += store.remove_leftover(name)
            report.leftovers_removed += 1

        packs, indexes = _readable_packs(store)
        ranks, recorded = _entry_ranks(store, packs, indexes)
        wanted_all = _wanted_entries(indexes, live, ranks)
        done, total, start = 0, sum(size for _, size in packs), 0
        rewrites = []
        for (pack_id, size), index in zip(packs, indexes):
            want = wanted_all[start:start + len(index)]
            start += len(index)
            if not want.any():
                store.delete_pack(pack_id)
                report.packs_deleted += 1
                report.blocks_deleted += len(index)
                report.bytes_freed += size
                done += size
                if progress is not None:
                    progress(done, total)
            elif not want.all():
                rewrites.append((pack_id, size, index, want))
            else:
                done += size
        written = set()
        for pack_id, size, index, want in rewrites:
            # a pack a rewrite earlier in this loop wrote may have been there already (a
            # killed prune's rewrite, its old pack not yet deleted): it now holds the
            # only copies of its blocks, though they counted as the second ones
            if pack_id not in written:
                try:
                    new_id, new_size = _rewrite_pack(store, pack_id, index[want])
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    log.warning("%s: no space to rewrite it without its %d dead blocks; kept "
                                "whole (prune again once there is room)", store.pack_name(pack_id),
                                int((~want).sum()))
                    report.packs_left += 1
                else:
                    written.add(new_id)
                    if new_id != pack_id:   # the new pack is in place: the old one can go
                        store.delete_pack(pack_id)
                        if pack_id in recorded:
                            # the copy holds only sound frames (rank 0 or 1), with a new header
                            store.delete_damage_record(pack_id)
                    report.packs_rewritten += 1
                    report.blocks_deleted += int((~want).sum())
                    report.bytes_freed += max(0, size - new_size)
            done += size
            if progress is not None:
                progress(done, total)

        # records of packs that are gone (deleted above, or by an earlier, killed prune)
        remaining = store.list_packs()
        for pack_id in store.list_damage_records():
            if pack_id not in remaining:
                store.delete_damage_record(pack_id)
        if progress is not None and total:
            progress(total, total)      # packs that stayed whole were passed over silently
    return report


def _prune_dry_run(store: Store, doomed: list[str], live: np.ndarray,
                   report: PruneReport) -> PruneReport:
    """What :func:`prune` would delete, computed without changing anything."""
    report.runs_deleted = list(doomed)
    packs, indexes = _readable_packs(store)
    wanted_all = _wanted_entries(indexes, live)
    start = 0
    for (_pack_id, size), index in zip(packs, indexes):
        want = wanted_all[start:start + len(index)]
        start += len(index)
        if not want.any():
            report.packs_deleted += 1
            report.bytes_freed += size
        elif not want.all():
            report.packs_rewritten += 1
        report.blocks_deleted += int((~want).sum())
    report.leftovers_removed = len(store.list_leftovers())
    return report
