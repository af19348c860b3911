"""Disk writers: streamOptimized VMDK (as VMware exports it) and sparse raw, plus convert().

Both writers stream: they walk the source's extents in order, read a few MiB ahead in
worker threads and write in order, so memory stays bounded whatever the disk size (the
VMDK writer keeps only the grain directory, 4 bytes per 32 MiB of disk, and the grain
table being filled).  They write ``DST.part`` and rename it to ``DST`` when complete; a
failed or cancelled write removes the partial file.

The streamOptimized layout (see docs/disk-formats.md):

    sector 0      sparse header: version 3, flags NL-detect | compressed | markers,
                  compressAlgorithm deflate, gdOffset = GD_AT_END (0xffff...ffff)
    sector 1..20  embedded descriptor (createType="streamOptimized")
    sector 128..  for each grain table's 512 grains (32 MiB of disk), in disk order:
                    each non-zero grain: grain marker (LBA, size) + zlib data, padded to 512
                    then, if any grain of the table was written: GT marker + grain table
                  GD marker + grain directory
                  footer marker + footer (the header with the real gdOffset)
                  end-of-stream marker
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import secrets
import stat
import struct
import sys
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import DiskError, DiskIOError, UsageError
from ..fsutil import create_file, fsync_dir, is_link, remove_file
from ..progress import CancelToken, ProgressCallback, check_cancel, with_phase
from .base import Disk

__all__ = ["write_stream_optimized", "write_raw", "convert", "format_for_path",
           "GRAIN_SIZE", "GD_AT_END"]

SECTOR = 512
GRAIN_SECTORS = 128                     # 64 KiB grains, as VMware writes them
GRAIN_SIZE = GRAIN_SECTORS * SECTOR
GTES_PER_GT = 512                       # one grain table covers 32 MiB
GT_SECTORS = GTES_PER_GT * 4 // SECTOR
DESCRIPTOR_SECTORS = 20                 # VMware reserves 20 sectors for the descriptor
OVERHEAD_SECTORS = 128                  # first grain at 64 KiB, as VMware does

VMDK_MAGIC = b"KDMV"
VMDK_VERSION = 3                        # streamOptimized is version 3
FLAG_NL_DETECT = 1 << 0                 # the \n \r\n check bytes are valid
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF

MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

# Grain and table offsets are 32-bit sector numbers: the file cannot pass 2 TiB.
MAX_FILE_SECTORS = 1 << 32
MAX_VMDK_SIZE = MAX_FILE_SECTORS * SECTOR

ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
DEFAULT_ADAPTER = "lsilogic"
DEFAULT_HW_VERSION = "4"                # readable by every VMware product and VM Import
DEFAULT_LEVEL = 1                       # libdeflate level: ~3x faster than 6, ~9% larger

BATCH_GRAINS = 16                       # 1 MiB of disk per worker task
RAW_CHUNK = 1 << 20
RAW_HOLE_BLOCK = 4096                   # zero blocks this size stay holes in raw output
WRITEBACK_WINDOW = 8 << 20              # durable writes: start writeback every 8 MiB

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")


# --- helpers shared by both writers ---------------------------------------------

def _ordered_results(pool: ThreadPoolExecutor, fn: Callable, items: Iterable,
                     window: int, cancel: CancelToken | None) -> Iterator:
    """``fn(item)`` for each item on the pool, results in item order, ``window`` in flight."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            check_cancel(cancel)
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            check_cancel(cancel)
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


@contextlib.contextmanager
def _worker_pipeline(fn: Callable, items: Iterable, threads: int, cancel: CancelToken | None,
                     name: str) -> Iterator[Iterator]:
    """Run ``fn`` over ``items`` on ``threads`` workers; yield the results in order.

    At most ``2 * threads + 2`` items are in flight, which bounds memory.  However the
    block is left (done, error, cancel, Ctrl-C), queued work is dropped and running work
    finished before this returns, so no worker outlives the output file.
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    results = _ordered_results(pool, fn, items, 2 * threads + 2, cancel)
    try:
        yield results
    finally:
        results.close()
        pool.shutdown(wait=True, cancel_futures=True)


def write_all(fd: int, data, offset: int, path: str) -> None:
    """The one raw write of the project: all of ``data`` at ``offset`` of ``fd`` (a file
    or a device), ``pwrite`` until done; DiskIOError naming ``path`` and the offset."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise DiskIOError(f"write failed: {e.strerror}", path, offset + done) from None
        if n <= 0:
            raise DiskIOError("write returned no progress", path, offset + done)
        done += n


def _read_exact(disk: Disk, offset: int, view: memoryview) -> None:
    n = disk.readinto(offset, view)
    if n != len(view):
        raise DiskIOError(f"short read: {n} of {len(view)} bytes inside the disk",
                          disk.path, offset + n)


def check_mode(mode) -> int | None:
    """An output file mode the user asked for (None: the private default, 0600)."""
    if mode is None:
        return None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise UsageError(f"file mode {mode!r} must be permission bits 0-0o777 (e.g. 0o640)")
    return mode


class PartialFile:
    """``DST.part`` while writing; renamed to ``DST`` on success, removed on any failure.

    ``DST.part`` is created new (``O_EXCL | O_NOFOLLOW``): a link planted there is refused,
    never written through; a regular file there (a killed run's) is replaced.  The
    output is private (0600) unless ``mode`` asks for other permission bits, which are
    then set exactly (the umask does not narrow them).
    """

    def __init__(self, dst: str, mode: int | None = None):
        self.dst = dst
        self.part = dst + ".part"
        self.mode = check_mode(mode)
        self.fd = -1
        self._created = False

    def __enter__(self) -> "PartialFile":
        try:
            self.fd = create_file(self.part, replace_stale=True)
            self._created = True
            if self.mode is not None:
                os.fchmod(self.fd, self.mode)
        except OSError as e:
            self._close_and_remove()
            raise DiskIOError(f"cannot create: {e.strerror}", self.part) from None
        except BaseException:
            # Ctrl-C right after the file appeared, maybe before create_file returned its
            # descriptor: a regular file there is ours (or the leftover it replaced)
            self._created = self._created or not is_link(self.part)
            self._close_and_remove()
            raise
        return self

    def _close_and_remove(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._created:
            with contextlib.suppress(OSError):
                self._remove()

    def _remove(self) -> None:
        remove_file(self.part)

    def commit(self, fsync: bool = True) -> None:
        """Rename ``.part`` to ``DST``; with ``fsync``, data, then the rename, reach the disk."""
        try:
            if fsync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.part, self.dst)
            if fsync:
                fsync_dir(os.path.dirname(os.path.abspath(self.dst)))
        except OSError as e:
            raise DiskIOError(f"cannot finish: {e.strerror}", self.dst) from None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._remove()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class _Writeback:
    """Starts the kernel writing the output every ``WRITEBACK_WINDOW`` bytes behind the
    writer, so the final fsync waits for the last window only (measured: durable writes
    1.6x faster than one fsync at the end).  Called from one thread, with ``end`` the
    offset below which everything is written."""

    def __init__(self, fd: int, enabled: bool):
        self.fd, self.enabled, self.started = fd, enabled, 0

    def written_up_to(self, end: int) -> None:
        if self.enabled and end - self.started >= WRITEBACK_WINDOW:
            from .._deflate import start_writeback
            start_writeback(self.fd, self.started, end - self.started)
            self.started = end


def output_path(dst) -> str:
    """The file to (re)place: DST itself, or the file a DST symlink points to.

    The output is written next to it as ``.part`` and renamed over it, so DST must be a
    regular file or not exist (never a directory or a device node: a rename would replace
    the node, not write the device).
    """
    dst = os.fspath(dst)
    if os.path.islink(dst):
        dst = os.path.realpath(dst)     # replace the target; the link keeps pointing at it
    if os.path.isdir(dst):
        raise UsageError(f"{dst}: is a directory (give the output file's name)")
    if os.path.exists(dst) and not stat.S_ISREG(os.stat(dst).st_mode):
        raise UsageError(f"{dst}: not a regular file (smsblock writes image files only)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise DiskIOError("cannot create: folder does not exist", dst)
    return dst


def _source_files(disk: Disk) -> list[str]:
    files = [disk.path]
    info = disk.info
    while info is not None:
        files.extend(e.path for e in info.extents if e.path)
        files.append(info.path)
        info = info.parent
    return files


def _check_not_source(disk: Disk, dst: str) -> None:
    if not os.path.exists(dst):
        return
    for f in _source_files(disk):
        try:
            if os.path.samefile(f, dst):
                raise UsageError(f"{dst}: output would overwrite the source file {f}")
        except OSError:
            continue


def _data_grain_runs(disk: Disk, unit: int, merge_gap: int = 0) -> Iterator[tuple[int, int]]:
    """``(first, end)`` unit indices covering every DATA extent, merged, in order.

    Runs at most ``merge_gap`` units apart are merged: reading a short gap (zeros, by the
    disk contract) costs less than a separate worker task for each scattered grain.
    """
    cur = None
    for e in disk.extents():
        if not e.is_data or e.length <= 0:
            continue
        first, end = e.offset // unit, -(-e.end // unit)
        if cur is not None and first <= cur[1] + merge_gap:
            cur = (cur[0], max(cur[1], end))
            continue
        if cur is not None:
            yield cur
        cur = (first, end)
    if cur is not None:
        yield cur


# --- streamOptimized VMDK ---------------------------------------------------------

def _geometry(capacity: int, adapter: str) -> tuple[int, int, int]:
    heads, sectors = (16, 63) if adapter == "ide" else (255, 63)
    max_cyl = 16383 if adapter == "ide" else 65535
    return max(1, min(-(-capacity // (heads * sectors)), max_cyl)), heads, sectors


def _descriptor(capacity: int, extent_name: str, cid: int, adapter: str,
                hw_version: str) -> bytes:
    cyl, heads, sectors = _geometry(capacity, adapter)
    name = "".join(c for c in extent_name if c not in '"\r\n') or "disk.vmdk"
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity} SPARSE "{name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.adapterType = "{adapter}"\n'
        f'ddb.geometry.cylinders = "{cyl}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{sectors}"\n'
        f'ddb.longContentID = "{secrets.token_hex(16)}"\n'
        f'ddb.virtualHWVersion = "{hw_version}"\n'
    )
    return text.encode("utf-8")


def _sparse_header(capacity: int, desc_sectors: int, overhead: int, gd_offset: int) -> bytes:
    head = _HEADER.pack(
        VMDK_MAGIC, VMDK_VERSION, FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity, GRAIN_SECTORS, 1, desc_sectors, GTES_PER_GT,
        0,                      # no redundant grain directory in a stream
        gd_offset, overhead,
        0,                      # cleanly closed
        b"\n \r\n", COMPRESSION_DEFLATE)
    return head.ljust(SECTOR, b"\0")


def _marker(value: int, kind: int) -> bytes:
    return _MARKER.pack(value, 0, kind).ljust(SECTOR, b"\0")


def _le32(values: array) -> bytes:
    if sys.byteorder == "big":
        values = array("I", values)
        values.byteswap()
    return values.tobytes()


class _StreamWriter:
    """Appends grains and tables to the output, tracking the sector position."""

    def __init__(self, fd: int, path: str, capacity: int):
        self.fd, self.path = fd, path
        self.pos = 0                        # next free sector
        n_grains = -(-capacity // GRAIN_SECTORS)
        self.gd = array("I", bytes(4 * -(-n_grains // GTES_PER_GT)))
        self.gt = array("I", bytes(4 * GTES_PER_GT))
        self.gt_index = -1
        self.gt_used = False

    def append(self, data) -> int:
        """Write sector-aligned ``data`` at the end; return its first sector."""
        n = len(data)
        assert n % SECTOR == 0
        start = self.pos
        if start + n // SECTOR > MAX_FILE_SECTORS:
            raise DiskError("streamOptimized output would pass 2 TiB (32-bit sector "
                            "offsets)", self.path, start * SECTOR)
        write_all(self.fd, data, start * SECTOR, self.path)
        self.pos += n // SECTOR
        return start

    def pad_to(self, sector: int) -> None:
        if sector > self.pos:
            write_all(self.fd, bytes((sector - self.pos) * SECTOR), self.pos * SECTOR, self.path)
            self.pos = sector

    def grains(self, first_grain: int, records, sizes: np.ndarray) -> None:
        """Write packed grain records of consecutive grains starting at ``first_grain``."""
        table = first_grain // GTES_PER_GT
        if table != self.gt_index:
            self.flush_table()
            self.gt_index = table
        sector = self.append(records) if len(records) else self.pos
        for i in np.flatnonzero(sizes):
            self.gt[(first_grain + int(i)) % GTES_PER_GT] = sector
            sector += int(sizes[i]) // SECTOR
            self.gt_used = True

    def flush_table(self) -> None:
        """Write the current grain table (if any grain of it was written) and point the GD at it."""
        if self.gt_index >= 0 and self.gt_used:
            self.append(_marker(GT_SECTORS, MARKER_GT))
            self.gd[self.gt_index] = self.append(_le32(self.gt))
        self.gt = array("I", bytes(4 * GTES_PER_GT))
        self.gt_index, self.gt_used = -1, False

    def directory(self) -> int:
        """Write the GD marker and grain directory; return the directory's sector."""
        raw = _le32(self.gd)
        raw += bytes(-len(raw) % SECTOR)
        self.append(_marker(len(raw) // SECTOR, MARKER_GD))
        return self.append(raw)


def write_stream_optimized(disk: Disk, out_path, *, progress: ProgressCallback | None = None,
                           cancel: CancelToken | None = None, adapter_type: str | None = None,
                           level: int = DEFAULT_LEVEL, threads: int = 2,
                           hw_version: str = DEFAULT_HW_VERSION, fsync: bool = True,
                           mode: int | None = None) -> None:
    """Write ``disk`` as a streamOptimized VMDK (the layout of OVF exports and VM Import).

    Grains are 64 KiB, zlib-compressed with libdeflate at ``level`` by ``threads`` worker
    threads and written in disk order; all-zero grains, ZERO extents and unallocated
    ranges are left out.  A size that is not a multiple of 512 is rounded up to whole
    sectors (the VMDK capacity unit) with zeros.  ``adapter_type`` defaults to the
    source's when it is a VMDK adapter type, else ``lsilogic``.  Memory stays bounded
    (a few MiB of grains in flight, plus the grain directory).  With ``fsync`` (the
    default) the file is on disk when this returns; ``fsync=False`` leaves that to the
    kernel (faster for scratch copies).
    """
    progress = with_phase(progress, "converting")
    from .._deflate import GrainCompressor

    out_path = output_path(out_path)
    _check_not_source(disk, out_path)
    size = disk.size
    if size <= 0:
        raise UsageError(f"{disk.path}: an empty disk cannot be written as a VMDK")
    if size > MAX_VMDK_SIZE:
        raise UsageError(f"{disk.path}: {size} bytes is more than a streamOptimized VMDK "
                         f"holds ({MAX_VMDK_SIZE} bytes)")
    if threads < 1:
        raise UsageError(f"threads must be at least 1, not {threads}")
    adapter = adapter_type or (disk.info.adapter_type
                               if disk.info.adapter_type in ADAPTER_TYPES else DEFAULT_ADAPTER)
    if adapter not in ADAPTER_TYPES:
        raise UsageError(f"unknown adapter type {adapter!r} (expected one of "
                         f"{', '.join(ADAPTER_TYPES)})")
    GrainCompressor(level)          # a bad level fails here, before any file exists

    capacity = -(-size // SECTOR)
    padded_size = capacity * SECTOR
    cid = secrets.randbelow(0xFFFFFFFE)     # never ffffffff ("no parent") or fffffffe
    descriptor = _descriptor(capacity, os.path.basename(out_path), cid, adapter, hw_version)
    desc_sectors = max(DESCRIPTOR_SECTORS, -(-len(descriptor) // SECTOR))
    overhead = max(OVERHEAD_SECTORS, -(-(1 + desc_sectors) // GRAIN_SECTORS) * GRAIN_SECTORS)

    local = threading.local()

    def compress_batch(batch: tuple[int, int]):
        first, count = batch
        start = first * GRAIN_SIZE
        length = min(count * GRAIN_SIZE, padded_size - start)
        buf = bytearray(length)             # zeros: the sector padding past ``size``
        _read_exact(disk, start, memoryview(buf)[:min(length, size - start)])
        comp = getattr(local, "compressor", None)
        if comp is None:
            comp = local.compressor = GrainCompressor(level)
        out = bytearray(comp.record_bound(GRAIN_SIZE, count))
        sizes = np.zeros(count, dtype=np.int64)
        used = comp.pack_grains(buf, GRAIN_SIZE, start // SECTOR, out, sizes)
        return first, count, memoryview(out)[:used], sizes

    def batches() -> Iterator[tuple[int, int]]:
        for first, end in _data_grain_runs(disk, GRAIN_SIZE, merge_gap=BATCH_GRAINS // 4):
            g = first
            while g < end:
                table_end = (g // GTES_PER_GT + 1) * GTES_PER_GT
                n = min(BATCH_GRAINS, end - g, table_end - g)
                yield g, n
                g += n

    with PartialFile(out_path, mode) as part:
        w = _StreamWriter(part.fd, part.part, capacity)
        w.append(_sparse_header(capacity, desc_sectors, overhead, GD_AT_END))
        w.append(descriptor + bytes(desc_sectors * SECTOR - len(descriptor)))
        w.pad_to(overhead)
        if progress:
            progress(0, size)
        writeback = _Writeback(part.fd, fsync)
        with _worker_pipeline(compress_batch, batches(), threads, cancel, "vmdk-deflate") as results:
            for first, count, records, sizes in results:
                w.grains(first, records, sizes)
                writeback.written_up_to(w.pos * SECTOR)
                if progress:
                    progress(min(size, (first + count) * GRAIN_SIZE), size)
        check_cancel(cancel)
        w.flush_table()
        gd_sector = w.directory()
        w.append(_marker(1, MARKER_FOOTER))
        w.append(_sparse_header(capacity, desc_sectors, overhead, gd_sector))
        w.append(_marker(0, MARKER_EOS))
        part.commit(fsync)
    if progress:
        progress(size, size)


# --- raw ------------------------------------------------------------------------

def write_raw(disk: Disk, out_path, *, progress: ProgressCallback | None = None,
              cancel: CancelToken | None = None, threads: int | None = None, fsync: bool = True,
              mode: int | None = None, allow_device: bool = False) -> None:
    """Write ``disk``'s bytes to a raw image, byte for byte, sparse: the one raw-disk
    writer (convert, restore, an EBS snapshot read back).

    The output is truncated to the disk's size and only DATA extents are read; inside
    them, 4 KiB blocks that are all zeros are not written either, so unallocated and
    zero ranges stay holes.  ``threads`` worker threads (default: the disk's
    ``read_parallelism``) read and write chunks in parallel, a bounded number ahead of
    the progress report.  With ``fsync`` (the
    default) the file is on disk when this returns; ``fsync=False`` leaves the writing
    to the kernel (faster for scratch copies).

    ``allow_device``: an ``out_path`` that is a block or character device (a restore
    onto a volume) is written in place, every byte, zeros included (a device keeps its
    old bytes; it cannot be truncated or renamed); a block device smaller than the disk
    is refused before anything is written.  Otherwise a device is refused.
    """
    progress = with_phase(progress, "converting")
    if threads is None:
        threads = disk.read_parallelism
    if threads < 1:
        raise UsageError(f"threads must be at least 1, not {threads}")
    if allow_device and _is_device(out_path):
        with _DeviceOutput(os.fspath(out_path), disk.size) as device:
            _copy_raw(disk, device.fd, device.path, progress, cancel, threads, fsync,
                      whole=True)
            device.finish(fsync)
        return
    out_path = output_path(out_path)
    _check_not_source(disk, out_path)
    with PartialFile(out_path, mode) as part:
        try:
            os.ftruncate(part.fd, disk.size)
        except OSError as e:
            raise DiskIOError(f"cannot set size {disk.size}: {e.strerror}", part.part) from None
        _copy_raw(disk, part.fd, part.part, progress, cancel, threads, fsync, whole=False)
        part.commit(fsync)
    if progress:
        progress(disk.size, disk.size)


def _copy_raw(disk: Disk, fd: int, where: str, progress, cancel, threads: int, fsync: bool,
              whole: bool) -> None:
    """Copy ``disk`` to ``fd`` in chunks on ``threads`` workers: its DATA extents with
    zero blocks left as holes, or (``whole``) every byte."""
    from .._deflate import nonzero_runs
    size = disk.size
    local = threading.local()

    def chunks() -> Iterator[tuple[int, int]]:
        runs = [(0, -(-size // RAW_CHUNK))] if whole else _data_grain_runs(disk, RAW_CHUNK)
        for first, end in runs:
            for c in range(first, end):
                start = c * RAW_CHUNK
                yield start, min(RAW_CHUNK, size - start)

    def copy_chunk(chunk: tuple[int, int]) -> tuple[int, int]:
        # Workers write too: raw output has no order, and page-cache copies then run on
        # both cores.  Zero blocks are skipped so they stay holes.  Each worker reuses
        # one buffer: readinto overwrites all of it.
        start, length = chunk
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(RAW_CHUNK))
        view = buf[:length]
        _read_exact(disk, start, view)
        if whole:
            write_all(fd, view, start, where)
        else:
            for s, t in nonzero_runs(view, RAW_HOLE_BLOCK):
                write_all(fd, view[s:t], start + s, where)
        return start, length

    if progress:
        progress(0, size)
    writeback = _Writeback(fd, fsync)
    with _worker_pipeline(copy_chunk, chunks(), threads, cancel, "raw-copy") as results:
        for start, length in results:      # in order: all below start + length is written
            writeback.written_up_to(start + length)
            if progress:
                progress(start + length, size)
    check_cancel(cancel)


def _is_device(path) -> bool:
    try:        # followed: a device is often named by a link (/dev/disk/by-id/...)
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)


class _DeviceOutput:
    """A device opened for writing in place (see :func:`write_raw`)."""

    def __init__(self, path: str, size: int):
        self.path, self.size, self.fd = path, size, -1

    def __enter__(self) -> "_DeviceOutput":
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            kind = os.fstat(self.fd).st_mode
        except OSError as e:
            self.__exit__()
            raise DiskIOError(f"cannot open: {e.strerror}", self.path) from None
        if not (stat.S_ISBLK(kind) or stat.S_ISCHR(kind)):      # swapped since the stat
            self.__exit__()
            raise UsageError(f"{self.path}: changed while opening; not a device any more")
        if stat.S_ISBLK(kind):
            capacity = os.lseek(self.fd, 0, os.SEEK_END)
            if capacity < self.size:
                self.__exit__()
                raise UsageError(f"{self.path}: the device holds {capacity} bytes, the disk "
                                 f"{self.size}")
        return self

    def finish(self, fsync: bool) -> None:
        if not fsync:
            return
        try:
            os.fsync(self.fd)
        except OSError as e:
            if e.errno != errno.EINVAL:         # character devices cannot fsync
                raise DiskIOError(f"cannot finish: {e.strerror}", self.path) from None

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- convert --------------------------------------------------------------------

FORMATS = ("raw", "vmdk")


def format_for_path(path) -> str:
    """The output format a file name asks for: ``.vmdk`` → vmdk, anything else → raw."""
    return "vmdk" if os.fspath(path).lower().endswith(".vmdk") else "raw"


def convert(src, dst, *, format: str | None = None, progress: ProgressCallback | None = None,
            cancel: CancelToken | None = None, src_format: str | None = None,
            fsync: bool = True, mode: int | None = None) -> None:
    """Copy a disk (a path or an open :class:`Disk`) to ``dst`` as raw or streamOptimized VMDK.

    ``format`` is "raw" or "vmdk"; None picks it from ``dst``'s extension.  ``src_format``
    forces the source's format when ``src`` is a path (detected otherwise).  The output
    appears only when complete; a failed or cancelled convert leaves no ``dst`` behind
    (an existing ``dst`` is replaced only on success).  With ``fsync`` (the default) it
    is on disk when this returns.  The output is private (0600) unless ``mode`` gives
    its permission bits (see :class:`PartialFile`).
    """
    from . import open_disk

    dst = os.fspath(dst)
    fmt = format or format_for_path(dst)
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format {fmt!r} (expected raw or vmdk)")
    writer = write_stream_optimized if fmt == "vmdk" else write_raw
    if isinstance(src, Disk):
        writer(src, dst, progress=progress, cancel=cancel, fsync=fsync, mode=mode)
        return
    src = os.fspath(src)
    try:
        st = os.stat(src)
    except OSError as e:
        raise DiskIOError(f"cannot open: {e.strerror}", src) from None
    if stat.S_ISDIR(st.st_mode):
        raise DiskIOError("is a directory, not a disk image", src)
    with open_disk(src, format=src_format) as disk:
        writer(disk, dst, progress=progress, cancel=cancel, fsync=fsync, mode=mode)
