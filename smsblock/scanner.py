"""The block scan: cut a disk into blocks, classify and hash them, find what changed.

:func:`scan` reads only the blocks that a DATA extent touches (unallocated ranges and
ZERO extents are never read), in batches of consecutive blocks, from ``threads`` worker
threads.  Each batch is copied into the worker's reused buffer with one read (``preadv``
for raw files, ``readinto`` for other disks; both release the GIL) and handed to the
native loop (``smsblock._scan``, GIL released) that marks all-zero
blocks ZERO without hashing them, hashes the others with xxh3-128 and compares them to
the previous run's manifest.  Only then, and only for changed DATA blocks, does Python
run again: ``on_changed(index, view)``.

Memory is bounded by ``threads`` batch buffers (1 MiB each by default), plus the
manifest's arrays (49 bytes per block) and 16 bytes per run of touched blocks.
"""

from __future__ import annotations

import array
import datetime
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from ._scan import scan_batch
from .disk.base import Disk
from .disk.raw import RawDisk
from .errors import DiskIOError, UsageError
from .manifest import DEFAULT_BLOCK_SIZE, Manifest, check_block_size
from .progress import CancelToken, ProgressCallback, ThreadSafeProgress, check_cancel, with_phase

__all__ = ["scan", "plan_reads", "check_changed_extents", "ChangedRuns", "DEFAULT_BATCH_BYTES",
           "MAX_CHANGED_EXTENTS"]

#: bytes per read+hash batch: big enough that syscalls and Python cost little, small
#: enough that the batch is still in the CPU cache when the hash loop runs over it
DEFAULT_BATCH_BYTES = 1024 * 1024

OnChanged = Callable[[int, memoryview], None]

#: most extents one change list may hold (16 bytes each once checked: 160 MB at most)
MAX_CHANGED_EXTENTS = 10_000_000


def _extent_int(value, what: str, index: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"changed extent {index}: {what} must be an integer, not "
                         f"{type(value).__name__}")
    return int(value)


def check_changed_extents(extents, disk_size: int, block_size: int, *,
                          max_count: int | None = None) -> "ChangedRuns":
    """Check a change list and return the ``(first_block, end_block)`` runs it touches.

    ``extents`` is an iterable of ``(offset, length)`` pairs or of objects with
    ``.offset`` and ``.length`` (bytes).  Every extent must have an integer offset >= 0
    and length >= 1, end within ``disk_size``, and start at or after the end of the one
    before it (sorted, not overlapping; touching is fine).  The whole list is checked
    before anything is read: UsageError naming the first bad extent and its index.
    Runs are block-aligned (an extent touching part of a block covers the whole block),
    sorted, and merged where they touch.
    """
    if isinstance(extents, (str, bytes, bytearray, dict)) or not hasattr(extents, "__iter__"):
        raise UsageError("changed extents must be a list of (offset, length) pairs, not "
                         f"{type(extents).__name__}")
    if max_count is None:
        max_count = MAX_CHANGED_EXTENTS
    firsts, ends = array.array("q"), array.array("q")
    prev_end = 0
    for i, ext in enumerate(extents):
        if i >= max_count:
            raise UsageError(f"changed extents: more than {max_count} extents")
        if hasattr(ext, "offset") and hasattr(ext, "length"):
            offset, length = ext.offset, ext.length
        elif isinstance(ext, (tuple, list, np.ndarray)) and len(ext) == 2:
            offset, length = ext
        else:
            raise UsageError(f"changed extent {i}: not an (offset, length) pair: "
                             f"{type(ext).__name__}")
        offset = _extent_int(offset, "offset", i)
        length = _extent_int(length, "length", i)
        where = f"changed extent {i} (offset {offset}, length {length})"
        if offset < 0:
            raise UsageError(f"{where}: the offset is negative")
        if length < 1:
            raise UsageError(f"{where}: the length must be at least 1")
        if offset + length > disk_size:
            raise UsageError(f"{where}: ends at {offset + length}, past the end of the "
                             f"{disk_size}-byte disk")
        if offset < prev_end:
            raise UsageError(f"{where}: starts before the end of extent {i - 1} "
                             f"({prev_end}): extents must be sorted and not overlap")
        prev_end = offset + length
        first, end = offset // block_size, (offset + length - 1) // block_size + 1
        if ends and first <= ends[-1]:
            ends[-1] = max(ends[-1], end)
        else:
            firsts.append(first)
            ends.append(end)
    return ChangedRuns(firsts, ends)


class ChangedRuns:
    """The ``(first_block, end_block)`` runs of a checked change list (16 bytes a run)."""

    def __init__(self, firsts: array.array, ends: array.array):
        self.firsts, self.ends = firsts, ends

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.firsts, self.ends)

    def __len__(self) -> int:
        return len(self.firsts)

    @property
    def blocks(self) -> int:
        return int(sum(e - f for f, e in self))


def _plan_in_runs(disk: Disk, block_size: int, runs) -> Iterator[tuple[int, int]]:
    """Like :func:`plan_reads`, but only within the block ``runs`` (sorted, disjoint):
    the blocks of those runs that a DATA extent touches.  Asks the disk for the
    extents of those byte ranges only."""
    size = disk.size
    for run_first, run_end in runs:
        lo, hi = run_first * block_size, min(run_end * block_size, size)
        cur_first = cur_end = -1
        for extent in disk.extents(lo, hi):
            if not extent.is_data or extent.length <= 0:
                continue
            a, b = max(extent.offset, lo), min(extent.end, hi)
            if a >= b:
                continue
            first, end = a // block_size, (b - 1) // block_size + 1
            if first <= cur_end:
                cur_end = max(cur_end, end)
                continue
            if cur_end > cur_first:
                yield cur_first, cur_end
            cur_first, cur_end = first, end
        if cur_end > cur_first:
            yield cur_first, cur_end


def plan_reads(disk: Disk, block_size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(first_block, end_block)`` runs of the blocks some DATA extent touches.

    Sorted, not overlapping, adjacent runs merged.  A block only partly covered by a
    DATA extent is in a run (it is read whole; the reader fills the rest with zeros).
    Blocks touched only by ZERO extents or by nothing are in no run: never read.
    """
    n_blocks = (disk.size + block_size - 1) // block_size
    run_first = run_end = -1
    for extent in disk.extents():
        if not extent.is_data or extent.length <= 0:
            continue
        first = max(0, extent.offset // block_size)
        end = min(n_blocks, (extent.end - 1) // block_size + 1)    # a reader past its size
        if first >= end:
            continue
        if first <= run_end:
            run_end = max(run_end, end)
            continue
        if run_end > run_first:
            yield run_first, run_end
        run_first, run_end = first, end
    if run_end > run_first:
        yield run_first, run_end


def _batches(runs: Iterator[tuple[int, int]], blocks_per_batch: int) -> Iterator[tuple[int, int]]:
    """Split runs into ``(first_block, count)`` batches of at most ``blocks_per_batch``."""
    for first, end in runs:
        for b in range(first, end, blocks_per_batch):
            yield b, min(blocks_per_batch, end - b)


def _aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer (aligned copies and vector loads are fastest)."""
    raw = np.empty(nbytes + 4096, np.uint8)
    skip = (-raw.ctypes.data) % 4096
    return raw[skip:skip + nbytes]


def _release(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:         # the callee still holds a derived buffer: let GC end it
        pass


class _BatchReader:
    """One worker's reader: each batch is read with ``disk.readinto`` (``preadv`` for raw
    files; the GIL is released during the copy, so two workers use both cores) into a
    reused, page-aligned buffer.

    A raw file reads as zeros past its end, so after each batch that reaches past where
    the file now ends, a file that is now shorter than when the scan started has shrunk
    under the scan: DiskIOError naming where it ends now.  (Hashing from a shared mapping
    of the page cache instead used less CPU, but a file shrinking under the mapping kills
    the process with SIGBUS; the copy still measured below ``xxhsum -H2``'s time.)
    """

    def __init__(self, disk: Disk, capacity: int, file_length: int | None):
        self._disk = disk
        self._capacity = capacity
        self._file_length = file_length     # None: not a raw regular file
        self._buf = None

    def load(self, offset: int, nbytes: int) -> memoryview:
        if self._buf is None:   # allocated on first use: a worker may get no batch
            self._buf = memoryview(_aligned_buffer(self._capacity))
            self._ro = self._buf.toreadonly()
        got = self._disk.readinto(offset, self._buf[:nbytes])
        if got != nbytes:
            raise DiskIOError(f"short read: {got} of {nbytes} bytes", self._disk.path, offset + got)
        if self._file_length is not None:
            self._check_not_shrunk(min(offset + nbytes, self._file_length))
        return self._ro[:nbytes]

    def _check_not_shrunk(self, end: int) -> None:
        try:
            now = os.fstat(self._disk.fileno()).st_size
        except OSError as e:
            raise DiskIOError(f"cannot stat the file: {e.strerror}", self._disk.path, end) from None
        if now < end:
            raise DiskIOError("the file shrank during the scan", self._disk.path, now)


def _file_length(disk: Disk) -> int | None:
    """The bytes of a raw regular file the disk covers when the scan starts (a file
    ending before them has shrunk), or None where that does not apply."""
    if not isinstance(disk, RawDisk):
        return None
    try:
        st = os.fstat(disk.fileno())
    except (OSError, ValueError):
        return None
    return min(st.st_size, disk.size) if stat.S_ISREG(st.st_mode) else None


def scan(disk: Disk, *, block_size: int = DEFAULT_BLOCK_SIZE, previous: Manifest | None = None,
         on_changed: OnChanged | None = None, threads: int = 2,
         progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
         batch_bytes: int | None = None, changed_runs=None) -> Manifest:
    """Scan ``disk`` into a :class:`~smsblock.manifest.Manifest` (content addresses left zero).

    Every block becomes UNALLOCATED (no DATA extent touches it: not read), ZERO (read,
    all zeros: not hashed) or DATA (xxh3-128 in ``hashes``).

    ``on_changed(index, view)`` is called, from the worker threads and concurrently,
    for every DATA block whose hash differs from ``previous`` (every DATA block when
    ``previous`` is None or has another block size or disk size).  ``view`` is a
    read-only memoryview of the block's bytes (short for the last block of a disk whose
    size is not a block multiple), valid only during the call: copy what you keep.  An
    exception from ``on_changed`` stops the scan and is re-raised.

    ``progress(done, total)`` counts the bytes of the blocks that are read;
    ``cancel`` stops the scan at the next batch with :class:`~smsblock.errors.Cancelled`.
    ``threads`` worker threads read and hash batches of ``batch_bytes`` (rounded to whole
    blocks; default 1 MiB); memory use is about ``threads * batch_bytes``.  A failed
    read, or a raw file that shrinks while it is scanned, raises DiskIOError.

    ``changed_runs`` (from :func:`check_changed_extents`) makes a change-list scan:
    only the blocks of those runs are looked at (read where a DATA extent touches
    them, UNALLOCATED otherwise); every other block keeps ``previous``'s state and
    hash, unread.  ``previous`` must then have this block size and disk size.
    """
    progress = with_phase(progress, "reading")
    block_size = check_block_size(block_size)
    if not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer, not {threads!r}")
    if batch_bytes is None:
        batch_bytes = DEFAULT_BATCH_BYTES
    if not isinstance(batch_bytes, int) or batch_bytes < 1:
        raise UsageError(f"batch_bytes must be positive, not {batch_bytes!r}")
    started = time.monotonic()
    size = disk.size
    manifest = Manifest(size, block_size, meta={
        "source": getattr(disk, "path", None),
        "format": getattr(getattr(disk, "info", None), "format", None),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    n = manifest.n_blocks
    prev_states = prev_hashes = None
    if previous is not None and previous.block_size == block_size and previous.disk_size == size:
        prev_states, prev_hashes = previous.states, previous.hashes
    changed = np.zeros(n, np.uint8)
    if changed_runs is not None:
        if prev_states is None:
            raise UsageError("a change-list scan needs a previous manifest with the same "
                             f"block size ({block_size}) and disk size ({size})")
        # blocks outside the list carry over; those in it start unallocated, then are read
        manifest.states[:] = prev_states
        manifest.hashes[:] = prev_hashes
        for first, end in changed_runs:
            manifest.states[first:end] = 0
            manifest.hashes[first:end] = 0
        plan = _plan_in_runs(disk, block_size, changed_runs)
    else:
        plan = plan_reads(disk, block_size)

    # Materialise the plan (one pair per run of touched blocks) so that progress knows
    # its total before the first read.
    run_firsts, run_ends = array.array("q"), array.array("q")    # 16 bytes a run
    total = 0
    for first, end in plan:
        run_firsts.append(first)
        run_ends.append(end)
        total += min(end * block_size, size) - first * block_size
    meter = ThreadSafeProgress(progress, total)
    file_length = _file_length(disk)
    blocks_per_batch = max(1, batch_bytes // block_size)
    batches = _batches(zip(run_firsts, run_ends), blocks_per_batch)
    lock = threading.Lock()
    failed = threading.Event()
    counters = {"changed": 0, "bytes_read": 0}

    def next_batch():
        with lock:
            return next(batches, None)

    def worker() -> None:
        reader = _BatchReader(disk, blocks_per_batch * block_size, file_length)
        n_changed = bytes_read = 0
        try:
            while not failed.is_set():
                batch = next_batch()
                if batch is None:
                    break
                check_cancel(cancel)
                first, count = batch
                offset = first * block_size
                nbytes = min(count * block_size, size - offset)
                data = reader.load(offset, nbytes)
                try:
                    bytes_read += nbytes
                    found = scan_batch(data, nbytes, block_size, first, manifest.states,
                                       manifest.hashes, prev_states, prev_hashes, changed)
                    n_changed += found
                    if found and on_changed is not None:
                        for k in np.flatnonzero(changed[first:first + count]).tolist():
                            start = k * block_size
                            view = data[start:min(start + block_size, nbytes)]
                            try:
                                on_changed(first + k, view)
                            finally:
                                _release(view)      # a kept view must not see later batches
                finally:
                    _release(data)
                meter.add(nbytes)
        except BaseException:
            failed.set()
            raise
        finally:
            with lock:
                counters["changed"] += n_changed
                counters["bytes_read"] += bytes_read

    if threads == 1:
        worker()
    else:
        pool = ThreadPoolExecutor(threads, thread_name_prefix="smsblock-scan")
        try:
            futures = [pool.submit(worker) for _ in range(threads)]
            for f in futures:   # siblings of a failed worker stop quietly: one error
                f.result()
        except BaseException:   # KeyboardInterrupt too: workers stop at their next batch
            failed.set()
            raise
        finally:
            pool.shutdown(wait=True)
    check_cancel(cancel)
    manifest.meta["scan"] = {
        "blocks_changed": counters["changed"],
        "bytes_read": counters["bytes_read"],
        "seconds": round(time.monotonic() - started, 6),
    }
    if changed_runs is not None:
        manifest.meta["scan"]["changed_list_blocks"] = changed_runs.blocks
    return manifest
