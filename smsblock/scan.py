"""The block scan: cut a disk into blocks, classify and hash them, find what changed.

:func:`scan` reads only the blocks that a DATA extent touches (unallocated ranges and
ZERO extents are never read), in batches of consecutive blocks, from ``threads`` worker
threads.  Each batch is read with one ``readinto`` call (the readers release the GIL),
or, for raw files, viewed straight in the page cache through one shared read-only
mapping, and handed to the native loop (``smsblock._scan``, GIL released) that marks all-zero
blocks ZERO without hashing them, hashes the others with xxh3-128 and compares them to
the previous run's manifest.  Only then, and only for changed DATA blocks, does Python
run again: ``on_changed(index, view)``.

Memory is bounded by ``threads`` batch buffers (a few MiB each; for a mapped file, up to
32 MiB of finished batches' pages stay mapped until their page-table entries are dropped), plus the
manifest's arrays (49 bytes per block) and 16 bytes per run of touched blocks.
"""

from __future__ import annotations

import array
import datetime
import mmap
import os
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from ._scan import scan_batch
from .disk.base import Disk
from .disk.raw import RawDisk
from .errors import DiskIOError, UsageError
from .manifest import DEFAULT_BLOCK_SIZE, Manifest, blocks_for, check_block_size
from .progress import CancelToken, ProgressCallback, ThreadSafeProgress, check_cancel

__all__ = ["scan", "plan_reads", "DEFAULT_BATCH_BYTES", "MAP_BATCH_BYTES"]

#: bytes per read+hash batch: big enough that syscalls and Python cost little, small
#: enough that the batch is still in the CPU cache when the hash loop runs over it
DEFAULT_BATCH_BYTES = 1024 * 1024
#: bytes per batch when the file is mapped: no copy to keep in cache, so bigger batches
#: only save Python work
MAP_BATCH_BYTES = 8 * 1024 * 1024

OnChanged = Callable[[int, memoryview], None]


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


class _CopyLoader:
    """Reads a batch through ``disk.readinto`` into a reused, page-aligned buffer."""

    def __init__(self, disk: Disk, capacity: int):
        self._disk = disk
        self._capacity = capacity
        self._buf = None

    def load(self, offset: int, nbytes: int) -> memoryview:
        if self._buf is None:   # allocated on first use: mapped scans rarely need it
            self._buf = memoryview(_aligned_buffer(self._capacity))
            self._ro = self._buf.toreadonly()
        got = self._disk.readinto(offset, self._buf[:nbytes])
        if got != nbytes:
            raise DiskIOError(f"short read: {got} of {nbytes} bytes", self._disk.path, offset + got)
        return self._ro[:nbytes]

    def done(self, data: memoryview, offset: int) -> None:
        _release(data)


class _FileMap:
    """One read-only mapping of a raw file for the whole scan, shared by the workers.

    Hashing straight from the page cache saves the copy a read makes (half the CPU), and
    one mapping for the whole scan avoids an mmap/munmap pair per batch (both take the
    address-space lock for writing, which serialises the workers).

    Each batch is populated first with MADV_POPULATE_READ, which reports a failed read
    or a shrunken file as an error (DiskIOError here) where touching the pages would
    raise SIGBUS.  Touched pages count as resident memory, so every ``ZAP_BYTES`` the
    page-table entries of finished batches are dropped (MADV_DONTNEED: the page cache
    keeps the data).
    """

    ZAP_BYTES = 32 * 1024 * 1024

    def __init__(self, disk: Disk, length: int):
        self._disk = disk
        self._fd = disk.fileno()
        self._map = mmap.mmap(self._fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self._view = memoryview(self._map).toreadonly()
        self.length = length
        self._lock = threading.Lock()
        self._finished: list[tuple[int, int]] = []
        self._finished_bytes = 0

    def load(self, offset: int, nbytes: int) -> memoryview:
        try:
            self._map.madvise(_MADV_POPULATE_READ, offset, nbytes)
        except OSError as e:
            if os.fstat(self._fd).st_size < offset + nbytes:
                raise DiskIOError("the file shrank during the scan", self._disk.path,
                                  offset) from None
            raise DiskIOError(f"read failed: {e.strerror}", self._disk.path, offset) from None
        return self._view[offset:offset + nbytes]

    def done(self, data: memoryview, offset: int) -> None:
        nbytes = len(data)
        _release(data)
        with self._lock:
            self._finished.append((offset, nbytes))
            self._finished_bytes += nbytes
            if self._finished_bytes < self.ZAP_BYTES:
                return
            finished, self._finished, self._finished_bytes = self._finished, [], 0
        for off, n in finished:     # only finished batches: others may be mid-hash
            self._map.madvise(mmap.MADV_DONTNEED, off, n)

    def close(self) -> None:
        _release(self._view)
        try:
            self._map.close()
        except BufferError:     # a callee kept a buffer: the mapping ends when it does
            pass


# Linux 5.14+; where it is missing, scans read instead of mapping.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else -1)


def _open_file_map(disk: Disk) -> _FileMap | None:
    """A mapping of the part of a raw regular file the disk covers (batches past the
    file's end go through readinto, which fills zeros), or None where mapping is not
    possible or not safe (no MADV_POPULATE_READ to turn read errors into errors)."""
    if not isinstance(disk, RawDisk) or _MADV_POPULATE_READ < 0:
        return None
    try:
        st = os.fstat(disk.fileno())
        length = min(st.st_size, disk.size)
        if not stat.S_ISREG(st.st_mode) or length <= 0:
            return None
        file_map = _FileMap(disk, length)
    except (OSError, ValueError, OverflowError):   # cannot map here: read instead
        return None
    try:
        file_map._map.madvise(_MADV_POPULATE_READ, 0, min(length, mmap.PAGESIZE))
    except OSError:             # kernel without it (EINVAL), or the first page fails
        file_map.close()
        return None
    return file_map


def scan(disk: Disk, *, block_size: int = DEFAULT_BLOCK_SIZE, previous: Manifest | None = None,
         on_changed: OnChanged | None = None, threads: int = 2,
         progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
         batch_bytes: int | None = None, use_mmap: bool = True) -> Manifest:
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
    blocks; default 1 MiB, 8 MiB when mapped); memory use is about ``threads *
    batch_bytes``.  Raw regular files are mapped (``use_mmap``) rather than copied: the
    hash reads the page cache directly, half the CPU time of a copy.  Each batch is
    faulted in first, so a failed read or a file that shrank raises DiskIOError; a raw
    file must still not shrink while it is scanned (a shrink in the instant between
    that and the hash would fault, as for any program that maps a file).
    """
    block_size = check_block_size(block_size)
    if not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer, not {threads!r}")
    if batch_bytes is not None and batch_bytes < 1:
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

    # Materialise the plan (one pair per run of touched blocks) so that progress knows
    # its total before the first read.
    run_firsts, run_ends = array.array("q"), array.array("q")    # 16 bytes a run
    total = 0
    for first, end in plan_reads(disk, block_size):
        run_firsts.append(first)
        run_ends.append(end)
        total += min(end * block_size, size) - first * block_size
    meter = ThreadSafeProgress(progress, total)
    file_map = _open_file_map(disk) if use_mmap else None
    map_limit = file_map.length if file_map is not None else 0
    if batch_bytes is None:
        batch_bytes = MAP_BATCH_BYTES if map_limit else DEFAULT_BATCH_BYTES
    blocks_per_batch = max(1, batch_bytes // block_size)
    batches = _batches(zip(run_firsts, run_ends), blocks_per_batch)
    lock = threading.Lock()
    failed = threading.Event()
    counters = {"changed": 0, "bytes_read": 0}

    def next_batch():
        with lock:
            return next(batches, None)

    def worker() -> None:
        copier = _CopyLoader(disk, blocks_per_batch * block_size)
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
                loader = file_map if offset + nbytes <= map_limit else copier
                data = loader.load(offset, nbytes)
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
                    loader.done(data, offset)
                meter.add(nbytes)
        except BaseException:
            failed.set()
            raise
        finally:
            with lock:
                counters["changed"] += n_changed
                counters["bytes_read"] += bytes_read

    try:
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
    finally:
        if file_map is not None:
            file_map.close()
    check_cancel(cancel)
    manifest.meta["scan"] = {
        "blocks_changed": counters["changed"],
        "bytes_read": counters["bytes_read"],
        "seconds": round(time.monotonic() - started, 6),
    }
    return manifest
