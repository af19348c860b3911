"""Pack files: many zstd-compressed, content-addressed blocks in one immutable file.

A pack is written front to back and sealed once, then never changes::

    header   16 bytes   magic "SMSBPACK", u16 version, u16 address algorithm, u32 zero
    frames   ...        one zstd frame per block, back to back (content size in the frame)
    index    48 * n     per block: address[32], u64 offset, u32 compressed length,
                        u32 uncompressed length (little endian, in write order)
    footer   64 bytes   magic "SMSBPIDX", u16 version, u16 algorithm, u32 n,
                        u64 index offset, sha256(index)[32],
                        xxh3-64(header + frames)[8] (version 2; 8 zero bytes in version 1)

Version 2 added the frame checksum: a zstd decoder ignores some bits of a frame (unused
header flags, slack bits of its entropy tables), so only a checksum over the bytes lets
``verify`` see damage anywhere in a pack.  Version 1 packs are still read.

The pack's name (its id) is the hex SHA-256 of its index bytes, so it is a pure function
of the content: a retried upload lands on the same name, and nothing is ever renamed or
rewritten at the protocol level.  Everything here reads through a ``read_range(offset,
length)`` callable, so a remote store can serve packs with ranged GETs.

The content address of a block is a cryptographic hash of its *uncompressed* bytes
(SHA-256 or BLAKE3, fixed per store in its config).  :class:`BlockIndex` maps addresses to
their place in the store's packs: the global dedup index.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zstandard

from . import _frames
from ._deflate import start_writeback
from .errors import StoreCorruptError, UsageError
from .fsutil import create_file, remove_file

PACK_MAGIC = b"SMSBPACK"
FOOTER_MAGIC = b"SMSBPIDX"
PACK_VERSION = 2                                 # what new packs are written as
READ_VERSIONS = (1, 2)                           # what a reader accepts
HEADER = struct.Struct("<8sHHI")                 # 16 bytes
FOOTER = struct.Struct("<8sHHIQ32s8s")           # 64 bytes, the last 8 reserved (zero)
ADDRESS_SIZE = 32
MAX_BLOCK = 4 << 20                              # the largest block size a store accepts

#: one index entry, exactly as it is laid out in the file
INDEX_DTYPE = np.dtype([("address", "u1", (ADDRESS_SIZE,)), ("offset", "<u8"),
                        ("clen", "<u4"), ("ulen", "<u4")])
assert INDEX_DTYPE.itemsize == 48

ALGORITHMS = {"sha256": 1, "blake3": 2}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}

ReadRange = Callable[[int, int], bytes]


def address_function(algorithm: str) -> Callable[[object], bytes]:
    """The content-address function ``f(bytes-like) -> 32 bytes`` of an algorithm name."""
    if algorithm == "sha256":
        return lambda data: hashlib.sha256(data).digest()
    if algorithm == "blake3":
        import blake3
        return lambda data: blake3.blake3(data).digest()
    raise UsageError(f"unknown content-address algorithm {algorithm!r} (sha256 or blake3)")


def pack_id_of(index_bytes: bytes) -> str:
    return hashlib.sha256(index_bytes).hexdigest()


_PACK_ID = re.compile(r"[0-9a-f]{64}")


def is_pack_id(name: str) -> bool:
    # every listed pack passes here on each run: one regex match, not a loop per character
    return isinstance(name, str) and _PACK_ID.fullmatch(name) is not None


# --- block frames ----------------------------------------------------------------

# A block that does not compress is stored as a zstd frame of raw (stored) blocks: any
# zstd decoder reads it, and making it costs a copy where zstd's attempt costs ~140 us a
# 512 KiB block at level 1 and a fresh output buffer (a page fault per 4 KiB filled).
RAW_BLOCK_MAX = _frames.BLOCK_MAX      # zstd's largest block: a raw frame's pieces
SAMPLE_MIN = 64 << 10               # smaller blocks are simply compressed
SAMPLE_PIECES = 8                   # pieces a block is sampled with, from start to end ...
SAMPLE_PIECE = 1024                 # ... of this many bytes each
INCOMPRESSIBLE = 0.97               # a sample that zstd shrinks by less: stored raw

#: bytes of the raw zstd frame of ``n`` bytes (:func:`write_raw_frame`); the format is
#: written down once, in ``_frames.pyx``
raw_frame_size = _frames.raw_frame_size


def write_raw_frame(out, data) -> int:
    """Write into ``out`` (a writable buffer of at least :func:`raw_frame_size` bytes)
    one zstd frame holding ``data`` uncompressed, with its content size; return its
    length.  The frame is valid zstd (RFC 8878): magic, a single-segment frame header
    with a 4-byte content size, then raw blocks of at most 128 KiB, each after a 3-byte
    header (last-block bit, type 0 = raw, size).  Native (``_frames``): the copy runs
    without the GIL."""
    src = memoryview(data).cast("B")
    if len(src) >= 1 << 32:
        raise UsageError(f"a block of {len(src)} bytes is too large for a frame")
    with memoryview(out).cast("B") as dst:
        return _frames.write_raw_frame(dst, src)


def looks_incompressible(data, compressor) -> bool:
    """Whether zstd (``compressor``) would barely shrink ``data``, judged from
    :data:`SAMPLE_PIECES` pieces of :data:`SAMPLE_PIECE` bytes spread over it (random
    or already compressed content: media, archives, encrypted volumes).  Blocks under
    :data:`SAMPLE_MIN` bytes are never judged so.  A block that repeats itself only at a
    long distance can be misjudged: stored raw, it costs space, never correctness."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n < SAMPLE_MIN:
        return False
    # first and last bytes and six between, 1/7 of the rest apart: not on power-of-two
    # boundaries, so data laid out in 2^k-byte pieces (file system blocks, a random half
    # and a zero half) is not seen through its random parts only
    step = (n - SAMPLE_PIECE) / (SAMPLE_PIECES - 1)
    sample = b"".join(view[round(i * step):round(i * step) + SAMPLE_PIECE]
                      for i in range(SAMPLE_PIECES))
    return len(compressor.compress(sample)) >= INCOMPRESSIBLE * len(sample)


# --- writing -------------------------------------------------------------------

WRITE_CHUNK = 4 << 20       # bytes per write, from one reused page-aligned buffer
DIRECT_ALIGN = 4096         # O_DIRECT file offsets and lengths (any common logical block)
_O_DIRECT = getattr(os, "O_DIRECT", 0)

# Buffers kept for the next writer: a buffer's pages are faulted in once, not per pack
# (first touches of fresh memory are what a pack write through the page cache cost).
_spare_buffers: list[mmap.mmap] = []
_spare_lock = threading.Lock()
MAX_SPARE_BUFFERS = 4       # a filling pack, one being sealed, buffers being written


def _take_buffer() -> mmap.mmap:
    with _spare_lock:
        if _spare_buffers:
            return _spare_buffers.pop()
    return mmap.mmap(-1, WRITE_CHUNK)       # page-aligned, as O_DIRECT needs


_scratches = threading.local()


def _scratch(size: int) -> bytearray:
    """A per-thread buffer of at least ``size`` bytes, reused (no page faults each time)."""
    buf = getattr(_scratches, "buf", None)
    if buf is None or len(buf) < size:
        buf = _scratches.buf = bytearray(size)
    return buf


def give_buffer(buf: mmap.mmap) -> None:
    with _spare_lock:
        if len(_spare_buffers) < MAX_SPARE_BUFFERS:
            _spare_buffers.append(buf)
            return
    buf.close()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False where the filesystem refuses it."""
    if not _O_DIRECT:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError:
        return False
    return on


class PackWriter:
    """Appends compressed blocks to a local file; :meth:`seal` writes index + footer.

    Not thread-safe: one writer thread owns it.  The file is fsynced by :meth:`seal`,
    before the store makes it visible under its id.

    Bytes go through one reused, page-aligned buffer of :data:`WRITE_CHUNK` and are
    written with ``O_DIRECT`` where the filesystem allows it: a pack is written once and
    read rarely, so it is not copied into fresh page-cache pages (measured: that copy
    cost the writer thread 50-60 ms of CPU per 20 MiB pack, as much as hashing 600 MiB,
    and it evicted the page cache of the disk being read).  The tail is written padded
    to :data:`DIRECT_ALIGN` and the file cut back to its size.  Elsewhere (tmpfs, some
    network filesystems) it is written through the page cache, with writeback started
    behind the writer so that the fsync waits only for the tail.
    """

    def __init__(self, path, algorithm: str, flush: Callable | None = None):
        """``flush(writer, buf, offset, length)``, when given, takes each filled write
        buffer instead of it being written here: it must call :meth:`write_at` (in
        order, before :meth:`seal`) and hand the buffer back with :func:`give_buffer`.
        The appending thread then never waits for the device."""
        self.path = os.fspath(path)
        self._flush = flush
        self.algorithm = algorithm
        self._alg_id = ALGORITHMS[algorithm]
        # a new private file: never through a link, never over a file that was there
        self._fd: int | None = create_file(self.path)
        self.direct = _set_direct(self._fd, True)
        self._buf: mmap.mmap | None = _take_buffer()
        self._fill = 0              # bytes of the buffer not written yet
        self._flushed = 0           # bytes of the file written (where the buffer starts)
        header = HEADER.pack(PACK_MAGIC, PACK_VERSION, self._alg_id, 0)
        self._put(header)
        # header + frames: the footer's checksum (hashed without the GIL)
        self._frames_hash = _frames.Xxh3Stream(header)
        self._offset = HEADER.size
        self._entries: list[tuple[bytes, int, int, int]] = []

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes written so far (frames and header)."""
        return self._offset

    def _put(self, data, hashed: bool = False) -> None:
        """Append ``data``; ``hashed``: frames, fed to the frames checksum as they are
        copied (one pass over them, in the same section without the GIL)."""
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), WRITE_CHUNK - self._fill)
            if hashed:
                _frames.copy_hashed_into(self._buf, self._fill, view[:n], self._frames_hash)
            else:
                _frames.copy_into(self._buf, self._fill, view[:n])      # without the GIL
            self._fill += n
            view = view[n:]
            if self._fill == WRITE_CHUNK:
                self._buffer_full()

    def _buffer_full(self) -> None:
        if self._flush is None:
            self.write_at(self._buf, self._flushed, WRITE_CHUNK)
        else:
            buf, self._buf = self._buf, _take_buffer()
            self._flush(self, buf, self._flushed, WRITE_CHUNK)
        self._flushed += WRITE_CHUNK
        self._fill = 0

    def _write_buffer(self, length: int) -> None:
        """Write the buffer's first ``length`` bytes at the file's ``_flushed`` offset."""
        self.write_at(self._buf, self._flushed, length)

    def write_at(self, buf, offset: int, length: int) -> None:
        """Write ``buf[:length]`` at ``offset`` of the file (a filled write buffer)."""
        with memoryview(buf) as whole, whole[:length] as view:
            done = 0
            while done < length:
                try:
                    done += os.pwrite(self._fd, view[done:], offset + done)
                except OSError as e:
                    if not (self.direct and e.errno == errno.EINVAL):
                        raise
                    # an alignment this device does not take: the page cache, then
                    self.direct = _set_direct(self._fd, False)
        if not self.direct:
            start_writeback(self._fd, offset, length)

    def add(self, address: bytes, frame: bytes, ulen: int) -> None:
        self._put(frame, hashed=True)
        self._entries.append((address, self._offset, len(frame), ulen))
        self._offset += len(frame)

    def add_raw(self, address: bytes, data) -> int:
        """Add ``data`` as a raw frame (:func:`write_raw_frame`), written straight into
        the write buffer where it fits: one copy of the block on its way to the disk,
        not two.  Returns the frame's length."""
        src = memoryview(data).cast("B")
        need = raw_frame_size(len(src))
        if need <= WRITE_CHUNK - self._fill:
            n = _frames.write_raw_frame_hashed(self._buf, self._fill, src, self._frames_hash)
            self._fill += n
            if self._fill == WRITE_CHUNK:
                self._buffer_full()
        else:       # across the end of the buffer: framed aside, then copied in
            scratch = _scratch(need)
            n = write_raw_frame(scratch, src)
            with memoryview(scratch)[:n] as frame:
                self._put(frame, hashed=True)
        self._entries.append((address, self._offset, n, len(src)))
        self._offset += n
        return n

    def seal(self, sync: bool = True) -> tuple[str, np.ndarray]:
        """Write the index and footer, fsync, close; return ``(pack_id, index)``.

        With ``sync=False`` the file stays open and unsynced: call :meth:`sync` (from
        another thread, say, so the next pack fills while this one reaches the disk).
        """
        self._flush = None      # the tail is written here, after the buffers handed out
        index = np.zeros(len(self._entries), INDEX_DTYPE)
        if self._entries:       # by column: a structured row at a time is slow
            cols = list(zip(*self._entries))
            index["address"] = np.frombuffer(b"".join(cols[0]), np.uint8).reshape(-1, ADDRESS_SIZE)
            index["offset"], index["clen"], index["ulen"] = cols[1], cols[2], cols[3]
        index_bytes = index.tobytes()
        self._put(index_bytes)
        self._put(FOOTER.pack(FOOTER_MAGIC, PACK_VERSION, self._alg_id, len(index),
                              self._offset, hashlib.sha256(index_bytes).digest(),
                              self._frames_hash.digest()))
        self.sealed_size = self._offset + len(index_bytes) + FOOTER.size
        tail = self._fill
        if tail:
            if self.direct:
                padded = -(-tail // DIRECT_ALIGN) * DIRECT_ALIGN
                self._buf[tail:padded] = bytes(padded - tail)
                self._write_buffer(padded)
                os.ftruncate(self._fd, self.sealed_size)
            else:
                self._write_buffer(tail)
        self._release_buffer()
        if sync:
            self.sync()
        return pack_id_of(index_bytes), index

    def _release_buffer(self) -> None:
        if self._buf is not None:
            buf, self._buf = self._buf, None
            give_buffer(buf)

    def sync(self) -> None:
        """fsync and close a sealed pack."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Close and delete the unsealed file (an error path)."""
        try:
            self._release_buffer()
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
        finally:
            remove_file(self.path)


# --- reading -------------------------------------------------------------------

@dataclass(frozen=True)
class PackFooter:
    algorithm: str
    count: int
    index_offset: int
    index_sha256: bytes
    version: int = PACK_VERSION
    frames_xxh3: bytes | None = None      # xxh3-64 of header + frames (version 2)


def parse_footer(raw: bytes, name: str, size: int) -> PackFooter:
    """Check and decode a pack's last 64 bytes."""
    if size < HEADER.size + FOOTER.size:
        raise StoreCorruptError(f"pack too small ({size} bytes)", name, 0)
    if len(raw) != FOOTER.size:
        raise StoreCorruptError("short read of pack footer", name, max(0, size - FOOTER.size))
    magic, version, alg, count, index_offset, digest, last = FOOTER.unpack(raw)
    where = size - FOOTER.size
    if magic != FOOTER_MAGIC:
        raise StoreCorruptError("bad pack footer magic", name, where)
    if version not in READ_VERSIONS:
        raise StoreCorruptError(f"unsupported pack version {version}", name, where)
    if version == 1 and last != bytes(8):
        raise StoreCorruptError("reserved pack footer bytes are not zero", name, where + 56)
    if alg not in ALGORITHM_NAMES:
        raise StoreCorruptError(f"unknown address algorithm id {alg}", name, where)
    if index_offset + count * INDEX_DTYPE.itemsize != where or index_offset < HEADER.size:
        raise StoreCorruptError(f"index of {count} entries at {index_offset} does not end at the footer",
                                name, where)
    return PackFooter(ALGORITHM_NAMES[alg], count, index_offset, digest, version,
                      last if version >= 2 else None)


def read_index(read_range: ReadRange, size: int, name: str, *, check_id: bool = True) -> tuple[PackFooter, np.ndarray]:
    """Read and check a pack's footer and index (two ranged reads).

    Checks the index checksum, that the name is the index's id (``check_id``), and that
    every entry lies inside the frame area without overlapping another.
    """
    footer = parse_footer(read_range(size - FOOTER.size, FOOTER.size), name, size)
    raw = read_range(footer.index_offset, footer.count * INDEX_DTYPE.itemsize)
    if len(raw) != footer.count * INDEX_DTYPE.itemsize:
        raise StoreCorruptError("short read of pack index", name, footer.index_offset)
    if hashlib.sha256(raw).digest() != footer.index_sha256:
        raise StoreCorruptError("pack index checksum mismatch", name, footer.index_offset)
    if check_id and pack_id_of(raw) != os.path.basename(name).split(".")[0]:
        raise StoreCorruptError("pack name is not the id of its index", name, footer.index_offset)
    index = np.frombuffer(raw, INDEX_DTYPE).copy()
    if len(index):
        order = np.argsort(index["offset"], kind="stable")
        starts = index["offset"][order].astype(np.int64)
        ends = starts + index["clen"][order].astype(np.int64)
        bad = (starts < HEADER.size) | (ends > footer.index_offset) | (index["ulen"][order] > MAX_BLOCK)
        bad[1:] |= starts[1:] < ends[:-1]
        if bad.any():
            i = int(order[int(np.argmax(bad))])
            raise StoreCorruptError(f"index entry {i} out of range, overlapping or too large",
                                    name, footer.index_offset + i * INDEX_DTYPE.itemsize)
    return footer, index


def sealed_size(index: np.ndarray) -> int:
    """The size of the pack an index belongs to (its frames fill the space from the
    header to the index): a cached index is trusted only for a pack of this size."""
    end = int((index["offset"].astype(np.int64) + index["clen"]).max()) if len(index) else HEADER.size
    return end + len(index) * INDEX_DTYPE.itemsize + FOOTER.size


def check_header(raw: bytes, name: str, footer: PackFooter) -> None:
    """Check a pack's first 16 bytes, every one of them, against its footer."""
    if len(raw) != HEADER.size:
        raise StoreCorruptError("short read of pack header", name, 0)
    magic, version, alg, zero = HEADER.unpack(raw)
    if magic != PACK_MAGIC or version != footer.version or ALGORITHM_NAMES.get(alg) != footer.algorithm:
        raise StoreCorruptError("bad pack header (magic, version or algorithm)", name, 0)
    if zero != 0:
        raise StoreCorruptError("reserved pack header bytes are not zero", name, 12)


_decompressors = threading.local()


def decompress_block(frame: bytes, ulen: int, name: str = "?", offset: int | None = None) -> bytes:
    """Inflate one stored frame, checking it yields exactly ``ulen`` bytes."""
    d = getattr(_decompressors, "d", None)
    if d is None:
        d = _decompressors.d = zstandard.ZstdDecompressor()
    try:
        data = d.decompress(frame, max_output_size=ulen)
    except zstandard.ZstdError as e:
        raise StoreCorruptError(f"block frame does not decompress: {e}", name, offset) from None
    if len(data) != ulen:
        raise StoreCorruptError(f"block frame gives {len(data)} bytes, index says {ulen}", name, offset)
    return data


#: bytes verify reads from a pack at once (per thread; with the frame being cut from the
#: pieces, about twice this is held): 4 MiB keeps a verify of any store under 128 MiB
VERIFY_CHUNK = 4 << 20


def verify_pack(read_range: ReadRange, size: int, name: str, algorithm: str,
                on_bytes: Callable[[int], None] | None = None
                ) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Read a whole pack and check every part of it: footer, index, header (every byte),
    that the frames fill the space between header and index exactly, the frame checksum
    (version 2) and every block against its content address.

    Returns ``(index or None, good, problems)``: ``good`` marks the index entries whose
    block decompresses to bytes matching its address; problems are one-line strings.
    ``index`` is None when the index does not read (the pack is unusable).  Each bad
    frame gives one problem; more problems than bad frames means damage outside the
    frames (header, gaps, a checksum mismatch the blocks do not show).
    """
    problems: list[str] = []
    try:
        footer, index = read_index(read_range, size, name)
    except StoreCorruptError as e:
        return None, None, [str(e)]
    good = np.zeros(len(index), bool)
    header = read_range(0, HEADER.size)
    try:
        check_header(header, name, footer)
    except StoreCorruptError as e:
        problems.append(str(e))
    if footer.algorithm != algorithm:
        problems.append(f"{name}: pack uses {footer.algorithm}, store uses {algorithm}")
        return index, good, problems
    order = np.argsort(index["offset"], kind="stable")
    starts = index["offset"][order].astype(np.int64)
    ends = starts + index["clen"][order].astype(np.int64)
    expect = np.concatenate([[HEADER.size], ends[:-1]]) if len(index) else np.zeros(0, np.int64)
    gap = np.flatnonzero(starts != expect)
    if len(gap) or (ends[-1] if len(index) else HEADER.size) != footer.index_offset:
        at = int(expect[gap[0]]) if len(gap) else int(ends[-1]) if len(index) else HEADER.size
        problems.append(f"{name}: offset {at}: bytes between the frames that no index entry covers")
    hasher = _frames.Xxh3Stream(header)
    addr = address_function(algorithm)
    # read the frame area front to back in large pieces: every byte is hashed once and
    # each frame is cut from the pieces (memory: one piece plus one frame)
    buf, buf_start, pos = bytearray(), HEADER.size, HEADER.size
    k = 0
    while pos < footer.index_offset or k < len(order):
        if pos < footer.index_offset and (k >= len(order) or int(ends[k]) > buf_start + len(buf)):
            chunk = read_range(pos, min(VERIFY_CHUNK, footer.index_offset - pos))
            if not chunk:
                problems.append(f"{name}: offset {pos}: pack ends inside its frames")
                break
            hasher.update(chunk)
            if k < len(order):          # bytes after the last frame are only hashed
                buf += chunk
            pos += len(chunk)
            continue
        if k >= len(order):
            break
        i = int(order[k])
        off, clen, ulen = int(starts[k]), int(index["clen"][i]), int(index["ulen"][i])
        k += 1
        if off < buf_start or off + clen > buf_start + len(buf):
            continue                        # outside what was read (a gap problem above)
        frame = bytes(buf[off - buf_start: off - buf_start + clen])
        drop = off + clen - buf_start
        del buf[:drop]
        buf_start += drop
        try:
            data = decompress_block(frame, ulen, name, off)
        except StoreCorruptError as e:
            problems.append(str(e))
            continue
        if addr(data) != index["address"][i].tobytes():
            problems.append(f"{name}: offset {off}: block does not match its content address "
                            f"{index['address'][i].tobytes().hex()[:16]}...")
        else:
            good[i] = True
        if on_bytes is not None:
            on_bytes(clen)
    # a bad frame explains a checksum mismatch; with every block good, the mismatch is
    # damage the decoder ignores (or in the header or gaps), reported on its own
    if footer.frames_xxh3 is not None and pos == footer.index_offset and good.all() \
            and hasher.digest() != footer.frames_xxh3:
        problems.append(f"{name}: offset {HEADER.size}: header and frames do not match the "
                        "footer's checksum (damage no block shows)")
    return index, good, problems


# --- the global dedup index ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BlockLocation:
    pack_id: str
    offset: int
    clen: int
    ulen: int


# the index itself lives on disk (smsblock/blockindex.py); imported last, as it uses
# the names above
from .blockindex import BlockIndex  # noqa: E402,F401
