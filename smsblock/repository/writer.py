"""The pack writer of a run: :class:`PackSink` (a writer thread filling packs, a syncer
thread putting each sealed pack under its id), :class:`BlockStorer` (a run's
``on_changed``: address a block, skip it when the store holds it, compress it) and
:func:`start_run` (the start-up work a run's dedup needs, done while the scan starts)."""

from __future__ import annotations

import collections
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import zstandard

from ..errors import Cancelled, SmsBlockError, StoreError
from ..pack import (WRITE_CHUNK, BlockIndex, PackWriter, address_function, give_buffer,
                    looks_incompressible, raw_frame_size, write_raw_frame)
from ..progress import CancelToken, check_cancel
from .repository import Repository
from .fingerprints import PackFingerprints, check_changed_packs, note_sealed

log = logging.getLogger(__name__)

# --- a run's start-up work, maybe in the background -----------------------------------

@dataclass
class RunStart:
    """What a run's dedup needs from the store: the block index (without damaged
    packs) and the ids of packs with a damage record."""

    index: BlockIndex
    damaged: set[str] = field(default_factory=set)


#: run the start-up work beside the scan: None = for remote stores (tests set it)
BACKGROUND_START: bool | None = None


def start_run(store: Repository, *, threads: int = 2,
              cancel: CancelToken | None = None) -> "Future[RunStart]":
    """The store's side of a run's start: packs changed since this client last saw them
    are read whole first, so damage found is recorded before the index is built and the
    run never builds on it; then the block index brought up to date with the listing,
    which leaves out the blocks a damage record names (the run stores them again).

    For a remote store (S3) this runs on a thread of its own, overlapping the scan: it
    mostly waits for the network (a listing, pack indexes), and the scan's first changed
    block comes after a few MiB.  For a local store it runs here, before the scan: there
    it is a few ms of CPU, and beside a scan that keeps both cores busy it cost the run
    more CPU than it hid time (2 cores, 1 GiB, 2 % changed, three in-process A/Bs of 24-30
    rounds: 4-10 ms more CPU a run, wall time within noise).  The caller holds the store
    lock until the future is done (``concurrent.futures.wait``)."""
    def work() -> RunStart:
        stats = store.list_pack_stats()     # one listing for both
        checked = check_changed_packs(store, threads=threads, cancel=cancel, stats=stats)
        # a pack whose index no longer reads counts as absent (as if not listed)
        index = store.block_index(for_new_runs=True,
                                  listed={pid: st.size for pid, st in stats.items()
                                          if pid not in checked.unreadable})
        # an unreadable pack counts as damaged: stored again under its id (the same blocks
        # in the same order), it is put over the bad copy, never skipped as present
        return RunStart(index, set(store.list_damage_records()) | checked.unreadable)
    background = BACKGROUND_START
    if background is None:
        background = store.backend.remote
    made: Future = Future()
    if not background:
        made.set_result(work())         # its error is raised here, before the scan
        return made

    def make() -> None:
        try:
            made.set_result(work())
        except BaseException as e:      # raised again by result(), in the threads that ask
            made.set_exception(e)
    threading.Thread(target=make, name="smsblock-run-start", daemon=True).start()
    return made

#: bytes handed to the pack writer thread and not written yet (filled write buffers,
#: blocks to look up): the threads that hand them over wait beyond this (bounds memory)
IN_FLIGHT_BYTES = 16 << 20
INDEX_BATCH = 1 << 18     # index entries of put packs held for the block index (~12 MiB)


class _FrameBuffers:
    """Buffers for raw frames (blocks that do not compress), reused by every run of the
    process: filling a fresh 512 KiB buffer costs 128 page faults, measured at 3-4x the
    copy itself.  A buffer goes back once the pack writer has copied its frame."""

    KEEP_BYTES = 8 << 20        # what stays allocated between uses

    def __init__(self):
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self._lock:
            free = self._free.get(size)
            if free:
                self._kept -= size
                return free.pop()
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            if self._kept + len(buf) <= self.KEEP_BYTES:
                self._free.setdefault(len(buf), []).append(buf)
                self._kept += len(buf)


_frame_buffers = _FrameBuffers()


# --- the pack writer ----------------------------------------------------------------

class PackSink:
    """Owns the pack being filled.  The scan workers append their blocks' frames to it
    themselves (:meth:`append`, under a lock): a raw frame is written straight into the
    pack's write buffer, hashed as it is copied.  A writer thread writes each filled
    buffer, and seals the pack once it reaches the store's pack size; a syncer thread then
    fsyncs it and puts it under its id, while the next pack fills (disk writes overlap
    the scan).

    Handing each block to the writer thread instead (:meth:`submit`, still the way for
    blocks to be looked up once the start's index is ready) cost a run more: a second
    copy of each raw block, and a wake-up of a third thread on two busy cores per block
    (1-8 GiB, 2 % changed, in-process A/B: see the commit).  At :meth:`close` the writer thread seals the
    partial pack and adds the run's packs to the on-disk block index, beside the syncer,
    while the run writes its manifest (these are the run's critical path)."""

    _STOP = object()
    _FLUSH = object()       # (_FLUSH, writer, buffer, offset, length): write it
    _SEAL = object()        # (_SEAL, writer): seal it, hand it to the syncer
    _BLOCK = object()       # (_BLOCK, address, frame, ulen, check, buffer): add it

    def __init__(self, store: Repository, damaged: set[str] = frozenset(),
                 start: "Future[RunStart] | None" = None):
        """``start`` (:func:`start_run`, maybe still running): blocks submitted with
        ``check`` are looked up in its index before they are written, and its damaged
        packs join ``damaged``; the writer waits for it before its first block."""
        self.store = store
        self.damaged = set(damaged)     # ids of packs with a damage record
        self._start = start
        self._index: BlockIndex | None = None
        self._start_failed = False
        self.pack_size = store.config.pack_size
        self.algorithm = store.config.address
        self.blocks_stored = 0
        self.bytes_stored = 0
        self.bytes_uncompressed = 0
        self.packs_sealed = 0
        self.fingerprints = PackFingerprints(store)
        self.error: BaseException | None = None
        self._closing = False
        self._closed = False
        self._seal_at_stop = True
        self._written = threading.Event()     # the writer thread took its last block
        self._writer: PackWriter | None = None
        # unbounded: a worker may put while it holds the append lock; memory is bounded
        # by IN_FLIGHT_BYTES, waited for outside the lock
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()           # the pack being filled
        self._room = threading.Condition()      # _in_flight fell
        self._in_flight = 0
        self._sealed: queue.Queue = queue.Queue(2)      # packs written, waiting for fsync
        # started on first use: the scan does not wait for them, and a run that stores
        # nothing starts neither
        self._thread = threading.Thread(target=self._run, name="smsblock-pack-writer", daemon=True)
        self._syncer = threading.Thread(target=self._sync_loop, name="smsblock-pack-sync", daemon=True)
        self._started_threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()

    def _ensure(self, thread: threading.Thread) -> None:
        if thread not in self._started_threads:
            with self._threads_lock:
                if self._closing and thread is self._thread:
                    raise Cancelled("the run was stopped")
                if thread not in self._started_threads:
                    thread.start()
                    self._started_threads.add(thread)

    def _check_open(self) -> None:
        if self.error is not None:
            if self._start_failed:      # the run's start-up failed: its own error
                raise self.error
            raise StoreError(f"pack writer failed: {self.error}")
        self._check_not_closing()
        self._ensure(self._thread)

    def submit(self, address: bytes, frame, ulen: int, check: bool = False,
               buffer: bytearray | None = None) -> None:
        """Hand a block's frame to the writer thread; ``check``: unless the start's
        index holds it (it was not ready when the block was addressed); ``buffer``
        (holding ``frame``) goes back to the raw-frame buffers once the frame is copied."""
        self._check_open()
        self._wait_room()
        with self._lock:        # queued before a close's STOP, or refused
            self._check_not_closing()
            self._hand_over(len(frame), (self._BLOCK, address, frame, ulen, check, buffer))

    def append(self, address: bytes, data, ulen: int, raw: bool = False) -> None:
        """Add a block's frame to the pack from this thread; ``raw``: ``data`` is the
        block itself, stored as a raw frame (written straight into the write buffer)."""
        self._check_open()
        with self._lock:
            # under the lock that close() takes to stop: what an append queues (filled
            # buffers, a full pack's seal) is ahead of the STOP, and nothing is added
            # to a pack after the writer thread took the last one
            self._check_not_closing()
            try:
                full = self._add(address, data, ulen, raw)
            except BaseException as e:
                # the pack may hold part of this block (bytes in the buffer and the
                # checksum, not in the index): never sealed; the run cannot go on
                if self.error is None:
                    self.error = StoreError(f"a block could not be added to the pack: "
                                            f"{type(e).__name__}: {e}")
                raise
            if full is not None:    # behind its buffers; counted, as a full pack's fd,
                self._hand_over(WRITE_CHUNK, (self._SEAL, full))  # file and buffer wait
        self._wait_room()

    def _check_not_closing(self) -> None:
        if self._closing:       # a scan thread still running after the run stopped
            raise Cancelled("the run was stopped")

    def _add(self, address: bytes, data, ulen: int, raw: bool) -> PackWriter | None:
        """Append to the pack being filled (under ``_lock``); return it once it is full
        (no longer the one being filled), to be sealed.  Never waits (the lock is held)."""
        if self._writer is None:
            self._writer = PackWriter(self.store.staging_path(".pack.tmp"), self.algorithm,
                                      flush=self._flush)
        if raw:
            clen = self._writer.add_raw(address, data)
        else:
            self._writer.add(address, data, ulen)
            clen = len(data)
        self.blocks_stored += 1
        self.bytes_stored += clen
        self.bytes_uncompressed += ulen
        if self._writer.size >= self.pack_size:
            writer, self._writer = self._writer, None
            return writer
        return None

    def _flush(self, writer: PackWriter, buf, offset: int, length: int) -> None:
        """A PackWriter's filled buffer: written by the writer thread (at once, when this
        is the writer thread)."""
        if threading.current_thread() is self._thread:
            try:
                writer.write_at(buf, offset, length)
            finally:
                give_buffer(buf)
            return
        self._hand_over(length, (self._FLUSH, writer, buf, offset, length))

    def _hand_over(self, nbytes: int, item) -> None:
        with self._room:
            self._in_flight += nbytes
        self._queue.put(item)

    def _done(self, nbytes: int) -> None:
        with self._room:
            self._in_flight -= nbytes
            self._room.notify_all()

    def _wait_room(self) -> None:
        with self._room:
            while self._in_flight > IN_FLIGHT_BYTES and self.error is None:
                self._room.wait(0.2)

    def _started(self) -> None:
        """Wait for the run's start-up work (the first time only)."""
        if self._start is None or self._index is not None:
            return
        try:
            start = self._start.result()
        except BaseException:
            self._start_failed = True
            raise
        self.damaged |= start.damaged
        self._index = start.index

    def _run(self) -> None:
        # packs sealed here, added to the on-disk block index once the last is sealed (or
        # every INDEX_BATCH entries), while the syncer still syncs and puts them: lookups
        # count an entry only once its pack is listed, so the next run starts with
        # nothing to index
        sealed: dict[str, tuple[int, "np.ndarray"]] = {}
        stopped = False
        try:
            while True:
                item = self._queue.get()
                if item is self._STOP:
                    stopped = True
                    break
                self._handle(item, sealed)
            # a pack this thread filled queued its seal behind its buffers, maybe behind
            # the STOP too
            for item in self._leftovers():
                self._handle(item, sealed)
            # the run's last block is in: the partial pack is sealed here, while the run
            # writes its manifest and the syncer syncs and puts the packs before it
            with self._lock:
                writer, self._writer = self._writer, None
            if writer is not None:
                if self._seal_at_stop and self.error is None and writer.count:
                    self._seal(writer, sealed)
                else:
                    writer.discard()
            self._written.set()         # the counts are final: the manifest goes on
            self._index_sealed(sealed)
        except BaseException as e:      # reported to the submitting threads and close()
            if self.error is None:      # the first error is the one to report
                self.error = e
            with self._room:
                self._room.notify_all()
            if not stopped:
                while (item := self._queue.get()) is not self._STOP:
                    self._drop(item)
            for item in self._leftovers():
                self._drop(item)
            self._discard_partial()
        finally:
            self._written.set()
            if self._syncer in self._started_threads:
                self._sealed.put(self._STOP)

    def _leftovers(self):
        """What is queued now, without waiting."""
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item, sealed: dict) -> None:
        if self.error is not None:
            self._drop(item)            # drain: submitters raise the error
            return
        kind = item[0]
        if kind is self._FLUSH:
            _k, writer, buf, offset, length = item
            try:
                writer.write_at(buf, offset, length)
            finally:
                give_buffer(buf)
                self._done(length)
        elif kind is self._SEAL:
            try:
                self._seal(item[1], sealed)
            finally:
                self._done(WRITE_CHUNK)
        else:
            self._take_block(item)

    def _take_block(self, item) -> None:
        """A block handed over by :meth:`submit`: added unless it needs the start's
        index and that holds it (it was not ready to say so)."""
        _k, address, frame, ulen, check, buffer = item
        nbytes = len(frame)
        try:
            self._started()
            if not (check and address in self._index):
                with self._lock:
                    full = self._add(address, frame, ulen, raw=False)
                    if full is not None:
                        # not sealed at once: buffers the scan workers filled may still
                        # be queued for it; its seal goes behind them
                        self._hand_over(WRITE_CHUNK, (self._SEAL, full))
        finally:
            if buffer is not None:      # copied into the pack: the buffer is free
                frame.release()
                _frame_buffers.give(buffer)
            self._done(nbytes)

    def _drop(self, item) -> None:
        """An item left after the writer failed: its buffers go back, its pack goes."""
        if item is self._STOP:
            return
        kind = item[0]
        if kind is self._FLUSH:
            give_buffer(item[2])
            self._done(item[4])
        elif kind is self._SEAL:
            item[1].discard()
            self._done(WRITE_CHUNK)
        else:
            nbytes = len(item[2])       # before the frame's view is released
            if item[5] is not None:
                item[2].release()
                _frame_buffers.give(item[5])
            self._done(nbytes)

    def _discard_partial(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.discard()

    def _seal(self, writer: PackWriter, sealed: dict) -> None:
        """Seal a full (or the last) pack and hand it to the syncer."""
        self._started()         # the start's damaged packs: put over, not beside
        try:
            pack_id, idx = writer.seal(sync=False)
            self._put_sealed((writer, pack_id, idx))
        except BaseException:
            writer.discard()        # never the syncer's: nobody else removes its file
            raise
        sealed[pack_id] = (writer.sealed_size, idx)
        if sum(len(i) for _s, i in sealed.values()) >= INDEX_BATCH:
            self._index_sealed(sealed)

    def _index_sealed(self, sealed: dict) -> None:
        try:
            self.store.index_new_packs(sealed)
        except Exception as e:      # a cache: the next run's sync indexes them
            log.warning("%s: new packs not added to the block index: %s", self.store.url, e)
        sealed.clear()

    def _put_sealed(self, item) -> None:
        self._ensure(self._syncer)
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
                    # sealed by this client: the next run need not read it to trust it
                    note_sealed(self.store, self.fingerprints, pack_id)
                    # not added to this run's view: its claimed set already skips them
                    self.packs_sealed += 1
                    continue
            except BaseException as e:
                self.error = e
            writer.discard()

    def close(self, seal: bool = True, wait: bool = True) -> None:
        """Stop taking blocks: the writer thread seals the partial pack (``seal``; else
        discards it) after the blocks queued before, hands it to the syncer and stops.
        With ``wait`` (the default), return once every pack is durable and visible;
        ``wait=False`` returns at once: call :meth:`written` before reading the counts
        and :meth:`wait` before anything names the blocks.  A second call only waits;
        after an interrupted one it does the rest."""
        if self._closed:
            if wait:
                self.wait()
            return
        with self._lock, self._threads_lock:
            # no writer thread starts after this, and no block is added: what appends
            # queued is ahead of the STOP
            self._closing = True
        if self._thread in self._started_threads:
            self._seal_at_stop = seal
            self._queue.put(self._STOP)
        self._closed = True
        if wait:
            self.wait()

    def written(self) -> None:
        """After :meth:`close`: wait until the writer thread has taken every block and
        sealed the last pack (the counts are final); raise its error."""
        if self._thread in self._started_threads:
            self._written.wait()
        self._raise_error()

    def wait(self) -> None:
        """After :meth:`close`: wait until every sealed pack is durable and visible;
        raise the writer's or syncer's error."""
        if self._thread in self._started_threads:
            self._thread.join()
        if self._syncer in self._started_threads:
            self._syncer.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self.error is not None:
            err = self.error
            if isinstance(err, SmsBlockError):
                raise err
            raise StoreError(f"pack writer failed: {err}") from err


class BlockStorer:
    """``on_changed`` of a run: address each changed block, store it unless the store
    already has it.  Called concurrently from the scan's worker threads; the address
    goes into the scan window's ``addresses``."""

    CLAIMED_MAX = 1 << 18

    def __init__(self, store: Repository, index: "BlockIndex | Future[RunStart]", sink: PackSink,
                 cancel: CancelToken | None):
        """``index``: the block index, or the run's start (:func:`start_run`) that makes
        it; while that is not ready, blocks are compressed and handed to ``sink`` (built
        with the same start) to be looked up there."""
        cfg = store.config
        self.address_of = address_function(cfg.address)
        self.level = cfg.zstd_level
        self._start = index if isinstance(index, Future) else None
        self._index = None if self._start is not None else index
        self.sink = sink
        self.cancel = cancel
        # addresses this run has stored, newest last: exact dedup within a run for the last
        # CLAIMED_MAX new blocks (128 GiB of 512 KiB blocks), in bounded memory (~100 bytes
        # each); a copy further back than that is stored twice, which costs space only
        self._claimed: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return c

    def __call__(self, window, k: int, view) -> None:
        window.addresses[k] = np.frombuffer(self.store_block(view), np.uint8)

    def store_block(self, view) -> bytes:
        """Store one block unless the store (or this run) has it; return its address."""
        check_cancel(self.cancel)
        address = self.address_of(view)
        with self._lock:
            if address in self._claimed:
                return address
            self._claimed[address] = None
            if len(self._claimed) > self.CLAIMED_MAX:
                self._claimed.popitem(last=False)
        index = self._index
        if index is None and self._start.done():
            index = self._index = self._start.result().index  # raises the start's error
        if index is not None and address in index:
            return address
        compressor = self._compressor()
        if index is not None:
            if looks_incompressible(view, compressor):
                self.sink.append(address, view, len(view), raw=True)
            else:
                self.sink.append(address, compressor.compress(view), len(view))
            return address
        buffer = None
        if looks_incompressible(view, compressor):
            buffer = _frame_buffers.take(raw_frame_size(len(view)))
            frame = memoryview(buffer)[:write_raw_frame(buffer, view)]
        else:
            frame = compressor.compress(view)
        # no index yet: the pack writer looks the block up once it has one, so the scan
        # does not wait for the start-up work
        self.sink.submit(address, frame, len(view), check=index is None, buffer=buffer)
        return address

