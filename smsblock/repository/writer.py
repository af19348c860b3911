"""The pack writer of a run: :class:`PackSink` (a writer thread filling packs, a syncer
thread putting each sealed pack under its id) and :class:`BlockStorer` (a run's
``on_changed``: address a block, skip it when the store holds it, compress it)."""

from __future__ import annotations

import collections
import queue
import threading

import numpy as np
import zstandard

from ..errors import Cancelled, SmsBlockError, StoreError
from ..pack import BlockIndex, PackWriter, address_function
from ..progress import CancelToken, check_cancel
from .repository import Repository
from .fingerprints import PackFingerprints, note_sealed

QUEUE_DEPTH = 16          # compressed blocks waiting for the pack writer (bounds memory)


# --- the pack writer ----------------------------------------------------------------

class PackSink:
    """Owns the pack being filled.  A writer thread appends frames from a bounded queue
    and seals the pack each time it reaches the store's pack size; a syncer thread then
    fsyncs it and puts it under its id, while the writer already fills the next pack
    (disk writes overlap compression)."""

    _STOP = object()

    def __init__(self, store: Repository, damaged: set[str] = frozenset()):
        self.store = store
        self.damaged = set(damaged)     # ids of packs with a damage record
        self.pack_size = store.config.pack_size
        self.algorithm = store.config.address
        self.blocks_stored = 0
        self.bytes_stored = 0
        self.bytes_uncompressed = 0
        self.packs_sealed = 0
        self.fingerprints = PackFingerprints(store)
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
                    # sealed by this client: the next run need not read it to trust it
                    note_sealed(self.store, self.fingerprints, pack_id)
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


class BlockStorer:
    """``on_changed`` of a run: address each changed block, store it unless the store
    already has it.  Called concurrently from the scan's worker threads; the address
    goes into the scan window's ``addresses``."""

    CLAIMED_MAX = 1 << 18

    def __init__(self, store: Repository, index: BlockIndex, sink: PackSink,
                 cancel: CancelToken | None):
        cfg = store.config
        self.address_of = address_function(cfg.address)
        self.level = cfg.zstd_level
        self.index = index
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
        if address in self.index:
            return address
        frame = self._compressor().compress(view)
        self.sink.submit(address, frame, len(view))
        return address

