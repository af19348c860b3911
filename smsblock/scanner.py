"""The block scan: cut a disk into blocks, classify and hash them, find what changed.

:func:`scan` reads only the blocks that a DATA extent touches (unallocated ranges and
ZERO extents are never read), in batches of consecutive blocks, from ``threads`` worker
threads.  Each batch is copied into the worker's reused buffer with one read (``preadv``
for raw files, ``readinto`` for other disks; both release the GIL) and handed to the
native loop (``smsblock._scan``, GIL released) that marks all-zero
blocks ZERO without hashing them, hashes the others with xxh3-128 and compares them to
the previous run's manifest.  Only then, and only for changed DATA blocks, does Python
run again: ``on_changed(index, view)``.

:func:`scan_stream` is the scan itself: it yields the disk in block order as
:class:`Gap` ranges (nothing read there) and :class:`ScanWindow` windows (per-block
arrays of at most ``window_blocks`` blocks, grouped around the blocks it reads), so memory
is ``threads`` batch buffers (1 MiB each by default) and a few windows (49 bytes a block
of a window), whatever the disk's size.  :func:`scan` collects the stream into a whole
:class:`~smsblock.manifest.Manifest` (49 bytes a block of the disk) for small disks.
"""

from __future__ import annotations

import array
import collections
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
from .manifest import WINDOW_BLOCKS as WINDOW_BLOCKS     # blocks per window; tests lower it
from .progress import CancelToken, ProgressCallback, ThreadSafeProgress, check_cancel, with_phase

__all__ = ["scan", "scan_stream", "ScanStream", "ScanWindow", "Gap", "plan_reads", "check_changed_extents", "ChangedRuns", "DEFAULT_BATCH_BYTES",
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


#: largest gap (blocks) between two read runs that one window spans; longer gaps are
#: passed on as ranges, never as per-block arrays
WINDOW_GAP_BLOCKS = 1024
#: windows read or waiting for the consumer at once (bounds memory to a few windows)
WINDOWS_IN_FLIGHT = 3


class Gap:
    """Blocks ``start`` .. ``end`` that the scan did not look at: UNALLOCATED, or (in a
    change-list scan, ``carry``) as in the previous manifest."""

    __slots__ = ("start", "end", "carry")

    def __init__(self, start: int, end: int, carry: bool):
        self.start, self.end, self.carry = start, end, carry

    def __repr__(self) -> str:
        return f"Gap({self.start}, {self.end}, carry={self.carry})"


class ScanWindow:
    """Blocks ``start`` .. ``end`` as scanned: ``states``, ``hashes`` and ``changed``
    (1 for DATA blocks whose hash or state differs from the previous run) indexed from
    ``start``; ``prev_states``, ``prev_hashes``, ``prev_addresses`` the previous run's
    (None without a comparable one); ``addresses`` zeros for the consumer to fill (when
    the scan was asked for them)."""

    __slots__ = ("start", "end", "states", "hashes", "changed", "prev_states", "prev_hashes",
                 "prev_addresses", "addresses", "batches", "pending", "n_changed", "last")

    def __init__(self, start: int, end: int, addresses: bool):
        n = end - start
        self.start, self.end = start, end
        self.states = np.zeros(n, np.uint8)
        self.hashes = np.zeros((n, 16), np.uint8)
        self.changed = np.zeros(n, np.uint8)
        self.addresses = np.zeros((n, 32), np.uint8) if addresses else None
        self.prev_states = self.prev_hashes = self.prev_addresses = None
        self.batches: collections.deque = collections.deque()
        self.pending = 0
        self.n_changed = 0
        self.last = False       # the scan reads nothing after this window

    def __repr__(self) -> str:
        return f"ScanWindow({self.start}, {self.end})"


def _group(zones, window_blocks: int, gap: int) -> Iterator[tuple[int, int, list]]:
    """Group sorted ``(first, end)`` zones into windows ``(start, end, zones)`` at most
    ``window_blocks`` long, no two zones in a window more than ``gap`` blocks apart."""
    cur_s = cur_e = None
    cur: list = []
    for first, end in zones:
        while first < end:
            if cur and (first - cur_e > gap or first >= cur_s + window_blocks):
                yield cur_s, cur_e, cur
                cur = []
            if not cur:
                cur_s = first
            piece_end = min(end, cur_s + window_blocks)
            cur.append((first, piece_end))
            cur_e = piece_end
            first = piece_end
    if cur:
        yield cur_s, cur_e, cur


class ScanStream:
    """:func:`scan_stream`'s result: iterate it for the segments; ``stats`` (blocks
    changed, bytes read, seconds) is complete once it is exhausted."""

    def __init__(self, gen, stats: dict):
        self._gen, self.stats = gen, stats

    def __iter__(self):
        return self._gen

    def close(self) -> None:
        self._gen.close()


def scan_stream(disk: Disk, *, block_size: int = DEFAULT_BLOCK_SIZE, previous=None,
                on_changed=None, threads: int = 2, progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None, batch_bytes: int | None = None,
                changed_runs=None, addresses: bool = False,
                window_blocks: int | None = None) -> ScanStream:
    """Scan ``disk`` as :func:`scan` does, in windows: yields, in block order and
    covering every block, :class:`Gap` ranges and :class:`ScanWindow` windows of at
    most ``window_blocks`` blocks (default :data:`WINDOW_BLOCKS`).  Memory is a few
    windows whatever the disk's size.

    ``previous`` is a :class:`~smsblock.manifest.Manifest` or
    :class:`~smsblock.manifest.ManifestReader`.  ``on_changed(window, k, view)`` is
    called from the worker threads for block ``window.start + k`` (a changed DATA
    block) before its window is yielded; ``addresses=True`` gives each window a zeroed
    ``addresses`` array for it to fill.
    """
    progress = with_phase(progress, "reading")
    block_size = check_block_size(block_size)
    if not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer, not {threads!r}")
    if batch_bytes is None:
        batch_bytes = DEFAULT_BATCH_BYTES
    if not isinstance(batch_bytes, int) or batch_bytes < 1:
        raise UsageError(f"batch_bytes must be positive, not {batch_bytes!r}")
    if window_blocks is None:
        window_blocks = WINDOW_BLOCKS
    if not isinstance(window_blocks, int) or window_blocks < 1:
        raise UsageError(f"window_blocks must be positive, not {window_blocks!r}")
    size = disk.size
    n = (size + block_size - 1) // block_size
    prev = None
    if previous is not None and previous.block_size == block_size and previous.disk_size == size:
        prev = previous
    if changed_runs is not None:
        if prev is None:
            raise UsageError("a change-list scan needs a previous manifest with the same "
                             f"block size ({block_size}) and disk size ({size})")
        zones = lambda: iter(changed_runs)       # noqa: E731
        total_plan = _plan_in_runs(disk, block_size, changed_runs)
    else:
        zones = lambda: plan_reads(disk, block_size)     # noqa: E731
        total_plan = plan_reads(disk, block_size)
    # one pass over the extents for the progress total (when someone watches); nothing
    # is kept
    total = 0
    if progress is not None:
        for first, end in total_plan:
            total += min(end * block_size, size) - first * block_size
    stats = {"blocks_changed": 0, "bytes_read": 0, "seconds": 0.0}
    return ScanStream(_scan_gen(disk, block_size, n, size, prev, on_changed, threads, progress,
                                cancel, batch_bytes, changed_runs, addresses, window_blocks,
                                zones(), total, stats), stats)


def _scan_gen(disk, block_size, n, size, prev, on_changed, threads, progress, cancel,
              batch_bytes, changed_runs, want_addresses, window_blocks, zones, total, stats):
    started = time.monotonic()
    carry = changed_runs is not None
    meter = ThreadSafeProgress(progress, total)
    file_length = _file_length(disk)
    blocks_per_batch = max(1, batch_bytes // block_size)
    groups = _group(zones, window_blocks, min(WINDOW_GAP_BLOCKS, window_blocks))
    upcoming: list = []     # the group after the newest window's: is that window the last?
    cond = threading.Condition()
    queue: collections.deque = collections.deque()      # windows made, not yet yielded
    state = {"exhausted": False, "error": None, "current": None}
    failed = threading.Event()

    def make_window():
        """The next window with its batches (called under ``cond``), or None."""
        group = upcoming.pop() if upcoming else next(groups, None)
        if group is None:
            return None
        upcoming.append(next(groups, None))
        ws, we, zs = group
        w = ScanWindow(ws, we, want_addresses)
        w.last = upcoming[0] is None
        if prev is not None:
            w.prev_states, w.prev_hashes, w.prev_addresses = prev.window(ws, we)
        if carry:
            # blocks outside the list keep the previous run's; those in it start
            # unallocated, then are read
            w.states[:] = w.prev_states
            w.hashes[:] = w.prev_hashes
            for first, end in zs:
                w.states[first - ws:end - ws] = 0
                w.hashes[first - ws:end - ws] = 0
            reads = _plan_in_runs(disk, block_size, zs)
        else:
            reads = zs
        w.batches.extend(_batches(reads, blocks_per_batch))
        w.pending = len(w.batches)
        return w

    def next_batch():
        with cond:
            while True:
                if failed.is_set():
                    return None
                w = state["current"]
                if w is not None and w.batches:
                    return w, w.batches.popleft()
                if state["exhausted"]:
                    return None
                if len(queue) >= WINDOWS_IN_FLIGHT:
                    cond.wait()
                    continue
                w = make_window()
                if w is None:
                    state["exhausted"] = True
                    cond.notify_all()
                    return None
                queue.append(w)
                state["current"] = w
                if not w.pending:
                    cond.notify_all()

    def worker() -> None:
        reader = _BatchReader(disk, blocks_per_batch * block_size, file_length)
        n_changed = bytes_read = 0
        try:
            while True:
                item = next_batch()
                if item is None:
                    break
                check_cancel(cancel)
                w, (first, count) = item
                offset = first * block_size
                nbytes = min(count * block_size, size - offset)
                data = reader.load(offset, nbytes)
                try:
                    bytes_read += nbytes
                    k0 = first - w.start
                    found = scan_batch(data, nbytes, block_size, k0, w.states, w.hashes,
                                       w.prev_states, w.prev_hashes, w.changed)
                    n_changed += found
                    if found and on_changed is not None:
                        for k in np.flatnonzero(w.changed[k0:k0 + count]).tolist():
                            start = k * block_size
                            view = data[start:min(start + block_size, nbytes)]
                            try:
                                on_changed(w, k0 + k, view)
                            finally:
                                _release(view)      # a kept view must not see later batches
                finally:
                    _release(data)
                meter.add(nbytes)
                with cond:
                    w.pending -= 1
                    if not w.pending:
                        cond.notify_all()
        except BaseException as e:
            with cond:
                if state["error"] is None:
                    state["error"] = e
                failed.set()
                cond.notify_all()
        finally:
            with cond:
                stats["blocks_changed"] += n_changed
                stats["bytes_read"] += bytes_read

    pool = ThreadPoolExecutor(threads, thread_name_prefix="smsblock-scan")
    futures = []
    try:
        futures = [pool.submit(worker) for _ in range(threads)]
        done = 0
        while True:
            with cond:
                while True:
                    if state["error"] is not None:
                        raise state["error"]
                    if queue and not queue[0].pending and not queue[0].batches:
                        w = queue.popleft()
                        cond.notify_all()
                        break
                    if not queue and state["exhausted"]:
                        w = None
                        break
                    cond.wait(0.1)
            if w is None:
                break
            if w.start > done:
                yield Gap(done, w.start, carry)
            yield w
            done = w.end
        for f in futures:
            f.result()
        if state["error"] is not None:
            raise state["error"]
        check_cancel(cancel)
        if done < n:
            yield Gap(done, n, carry)
        stats["seconds"] = round(time.monotonic() - started, 6)
    finally:
        failed.set()
        with cond:
            cond.notify_all()
        pool.shutdown(wait=True)


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

    The result holds the whole table in memory (49 bytes a block): for big disks use
    :func:`scan_stream` (or ``smsblock scan``, which writes the file window by window).
    """
    size = disk.size
    manifest = Manifest(size, check_block_size(block_size), meta=scan_meta(disk))
    callback = None
    if on_changed is not None:
        callback = lambda w, k, view: on_changed(w.start + k, view)   # noqa: E731
    stream = scan_stream(disk, block_size=block_size, previous=previous, on_changed=callback,
                         threads=threads, progress=progress, cancel=cancel,
                         batch_bytes=batch_bytes, changed_runs=changed_runs)
    for seg in stream:
        if isinstance(seg, Gap):
            if seg.carry:
                states, hashes, _ = previous.window(seg.start, seg.end)
                manifest.states[seg.start:seg.end] = states
                manifest.hashes[seg.start:seg.end] = hashes
            continue
        manifest.states[seg.start:seg.end] = seg.states
        manifest.hashes[seg.start:seg.end] = seg.hashes
    manifest.meta["scan"] = dict(stream.stats)
    if changed_runs is not None:
        manifest.meta["scan"]["changed_list_blocks"] = changed_runs.blocks
    return manifest


def scan_meta(disk: Disk) -> dict:
    """The meta a scan's manifest starts with: where the disk is, its format, when."""
    return {
        "source": getattr(disk, "path", None),
        "format": getattr(getattr(disk, "info", None), "format", None),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
