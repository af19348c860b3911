"""The global block index on disk: content address -> where the block is stored.

A store of 100 TiB of unique blocks has ~200 million blocks; an index held whole in
memory would cost ~12 GiB in every run.  This index lives in files and costs a few MiB of
memory whatever the store's size.

Layout.  The index is a small set of *segments*: each an immutable file of fixed-width
records sorted by address (an LSM tree of one level).  Records are looked up with
``pread`` through a small in-memory *fence* (the key of every ``FENCE_EVERY``-th record,
1/8 byte per entry): a lookup reads one ~3.4 KiB block of records per segment.  A run
adds the packs it puts as a new segment at its end (:func:`index_new_packs`, from the
indexes its pack writer holds); other packs added to the store since the index was last
opened become a new segment when it is next opened; when there are
too many segments, or too many entries of packs that are gone, segments are merged
(streamed, in bounded memory) into one.  A file ``CURRENT`` names the live segments.

Why this design (measured, see benchmarks/bench_blockindex.py): sorted fixed-width
records are the pack indexes' own form, so building is a sort and a streamed merge of
numpy arrays, a batch of addresses is sorted and looked up by binary search in the fence
and one ``pread`` per fence block it touches (smsblock/_blockindex.pyx, the GIL
released), and a segment is written once and never updated (an atomic rename publishes
it).  At 20 M entries: 52 bytes an entry on disk, opened in ~0.35 s (the checksums), a
run's peak RSS 63 MiB where the in-memory index held 1.1 GiB (2.4 GiB peak while
built).  Reading with ``pread`` rather than a memory map keeps the process's RSS at the
size of one batch (a memory map counts every touched page, and the kernel maps 16
pages around each fault: +33 MiB for one batch of 4096 in a measurement; gathering
through it with numpy was no faster).  SQLite (in the standard library;
lmdb would be a new native dependency) was measured against it at 2 M entries (a
``WITHOUT ROWID`` table keyed by address, batches as ``IN (...)`` queries of 500): 119
bytes an entry on disk against 52, 13x slower to build and 5x slower batch lookups, with
no gain for data that only ever grows by whole packs.

The truth is the store's pack listing: :meth:`DiskIndex.sync` adds the packs listed but
not indexed (their indexes come from the store's pack-index cache or its footer reads),
and lookups ignore entries of packs no longer listed, or listed with another size (a
pack cut short); those entries are dropped at the next merge.  So several writers adding
packs and a prune deleting packs never make the index wrong, only stale until the next
open.

Files (owner-only, created through :mod:`smsblock.fsutil`): ``lock`` (flock: shared to
read ``CURRENT`` and open segments, exclusive to change anything), ``CURRENT`` (JSON,
replaced atomically), ``seg-*.sbi`` (segments, written under a temporary name, then
renamed).  A process killed at any moment leaves the old ``CURRENT`` or the new one,
each naming complete segments; files no ``CURRENT`` names are removed by the next
writer.  Every segment carries a checksum of its whole content, checked when a process
opens it: a damaged or truncated segment is never used; it is dropped with a one-line
warning and its packs are indexed again from the packs.  The format is in docs/formats.md.

Nothing here is fsynced: the index is a cache of the packs (which are), and what a
crash of the machine can leave of unsynced files (a ``CURRENT`` or segment empty, short,
zero-filled, or missing, an old ``CURRENT``) either fails its parse or checksum, so that
part is rebuilt from the packs with a warning, or names complete segments.  An entry
counts only while its pack is listed with its size, so a stale index is never wrong, and
a run pays no fsync for it (four a run, measured at 2 ms each on a busy disk).

A store's index lives in ``STORE/index/`` for a local store and in the local cache of a
remote one (next to the S3 pack-index cache), so a run against S3 lists the packs but
reads no pack index it has read before.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import struct
import tempfile
import threading
import uuid
import weakref
from typing import Callable, Iterable

import numpy as np
import xxhash

from .errors import StoreError
from .keyset import isin, sorted_unique
from .fsutil import (create_file, make_root, open_dir, open_lock_file, open_subdir,
                     remove_file, replace_file)
from . import _blockindex as _native
from .pack import BlockLocation, sealed_size

log = logging.getLogger(__name__)

MAGIC = b"SMSBBIDX"
VERSION = 1
FENCE_EVERY = 64                   # records per fence entry (one read per lookup)
HEADER = struct.Struct("<8sHHIQQQ16s8s")     # 64 bytes, see docs/formats.md
assert HEADER.size == 64

#: one record as stored: the address split into a big-endian key (its first 8 bytes, so
#: keys sort as addresses do) and the rest, then where the block is
RECORD_DTYPE = np.dtype([("key", ">u8"), ("tail", "u1", (24,)), ("pack", "<u4"),
                         ("offset", "<u8"), ("clen", "<u4"), ("ulen", "<u4")])
assert RECORD_DTYPE.itemsize == 52
REC = RECORD_DTYPE.itemsize
RECORD = struct.Struct("<32sIQII")          # the same record, for one at a time
assert RECORD.size == REC
#: a segment's pack table row: pack id (raw 32 bytes), pack size, entries
PACK_DTYPE = np.dtype([("id", "u1", (32,)), ("size", "<u8"), ("entries", "<u8")])
assert PACK_DTYPE.itemsize == 48

CURRENT = "CURRENT"
CURRENT_FORMAT = "smsblock-block-index"
MAX_SEGMENTS = 4            # more than this after an update: merge the small ones
DEAD_FRACTION = 0.25        # entries of packs gone above this share: merge everything
BUILD_CHUNK = 256 << 10     # entries sorted in memory at once when indexing new packs
MERGE_BUDGET = 256 << 10    # entries buffered in memory by a merge, all inputs together
MERGE_MIN = 1024            # ... but at least this many per input
WINDOW = FENCE_EVERY + 2    # records read per probe: the block and two more
LOOKUP_CHUNK = 64 << 10     # addresses probed at once by a batch lookup (3.3 MiB of records)
HASH_CHUNK = 1 << 20

RANK_GOOD, RANK_SUSPECT, RANK_GONE = 0, 1, 2


class IndexDamaged(Exception):
    """A segment or CURRENT that does not check out (internal: it is rebuilt)."""


def keys_of(addresses: np.ndarray) -> np.ndarray:
    """Native uint64 keys (big-endian value of the first 8 bytes) of an (n, 32) array."""
    return np.ascontiguousarray(addresses[:, :8]).view(">u8").reshape(-1).astype(np.uint64)


def records_of(index: np.ndarray, pack_row: int) -> np.ndarray:
    """A pack index (``pack.INDEX_DTYPE``) as records of pack table row ``pack_row``."""
    rec = np.empty(len(index), RECORD_DTYPE)
    addr = index["address"]
    rec["key"] = np.ascontiguousarray(addr[:, :8]).view(">u8").reshape(-1)
    rec["tail"] = addr[:, 8:]
    rec["pack"] = pack_row
    rec["offset"] = index["offset"]
    rec["clen"] = index["clen"]
    rec["ulen"] = index["ulen"]
    return rec


def _addresses(rec: np.ndarray) -> np.ndarray:
    """(n, 32) address bytes of records (a copy)."""
    return np.ascontiguousarray(rec).view(np.uint8).reshape(-1, REC)[:, :32]


def _pread_exact(fd: int, length: int, offset: int, where: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise IndexDamaged(f"{where}: file ends at {offset + len(data)}, expected {offset + length}")
    return data


# --- segments ---------------------------------------------------------------------------

class Segment:
    """One open, checked segment file: its fence and pack table in memory, records read
    with ``pread``.  Thread-safe (reads only); the descriptor closes with the object."""

    def __init__(self, dir_fd: int, name: str, where: str):
        self.name = name
        self.path = os.path.join(where, name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            raise IndexDamaged(f"{self.path}: missing") from None
        except OSError as e:
            raise IndexDamaged(f"{self.path}: cannot open: {e.strerror}") from None
        self.fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise IndexDamaged(f"{self.path}: not a regular file")
        raw = os.pread(self.fd, HEADER.size, 0)
        if len(raw) != HEADER.size:
            raise IndexDamaged(f"{self.path}: truncated ({st.st_size} bytes)")
        magic, version, every, flags, n, n_packs, _res, body_hash, head_hash = HEADER.unpack(raw)
        if magic != MAGIC:
            raise IndexDamaged(f"{self.path}: not a block index segment")
        if xxhash.xxh3_64_digest(raw[:56]) != head_hash:
            raise IndexDamaged(f"{self.path}: header checksum mismatch")
        if version != VERSION or every != FENCE_EVERY or flags != 0:
            raise IndexDamaged(f"{self.path}: unsupported segment (version {version}, "
                               f"fence {every})")
        self.n, self.n_packs = n, n_packs
        n_fence = (n + FENCE_EVERY - 1) // FENCE_EVERY
        self.fence_offset = HEADER.size + n * REC
        self.packs_offset = self.fence_offset + 8 * n_fence
        size = self.packs_offset + n_packs * PACK_DTYPE.itemsize
        if st.st_size != size:
            raise IndexDamaged(f"{self.path}: {st.st_size} bytes, its header says {size} "
                               "(truncated or extended)")
        # the whole file, every time a process opens it: a damaged index is never used
        h = xxhash.xxh3_128()
        buf = bytearray(min(HASH_CHUNK, max(size - HEADER.size, 1)))
        pos = HEADER.size
        while pos < size:
            view = memoryview(buf)[:min(len(buf), size - pos)]
            got = os.preadv(self.fd, [view], pos)
            if got != len(view):
                raise IndexDamaged(f"{self.path}: short read at {pos}")
            h.update(view)
            pos += got
        if h.digest() != body_hash:
            raise IndexDamaged(f"{self.path}: checksum mismatch (damaged)")
        self.fence = np.frombuffer(_pread_exact(self.fd, 8 * n_fence, self.fence_offset, self.path),
                                   "<u8").astype(np.uint64)
        self.packs = np.frombuffer(_pread_exact(self.fd, n_packs * PACK_DTYPE.itemsize,
                                                self.packs_offset, self.path), PACK_DTYPE)
        self.size = size
        if n_fence > 1 and (self.fence[1:] < self.fence[:-1]).any():
            raise IndexDamaged(f"{self.path}: fence out of order")

    def close(self) -> None:
        self._closer()

    def pack_hex(self, row: int) -> str:
        # not cached: a long restore meets every pack of a large store
        return self.packs["id"][row].tobytes().hex()

    # -- reading records ----------------------------------------------------------------
    def read(self, start: int, count: int) -> np.ndarray:
        """Records ``[start, start + count)`` (clipped to the segment)."""
        count = max(0, min(count, self.n - start))
        raw = _pread_exact(self.fd, count * REC, HEADER.size + start * REC, self.path)
        return np.frombuffer(raw, RECORD_DTYPE)

    def probe(self, qk: np.ndarray, q: np.ndarray):
        """Batch lookup of (m, 32) addresses ``q`` (sorted by their keys ``qk``, so
        queries in one fence block share its read): ``(hit, records, multi)`` per query;
        ``multi`` marks queries whose key occurs more than once here (copies in several
        packs, or another address with the same first 8 bytes): those need
        :meth:`matches`."""
        m = len(q)
        out = np.zeros((m, REC), np.uint8)
        flags = np.zeros(m, np.uint8)
        try:
            _native.probe(self.fd, self.fence, self.n, FENCE_EVERY, HEADER.size,
                          np.ascontiguousarray(q, np.uint8), out, flags)
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror}") from None
        return (flags & 1).astype(bool), out.view(RECORD_DTYPE).reshape(m), (flags & 2).astype(bool)

    def first_at_or_after(self, key: int) -> int:
        """Position of the first record with key >= ``key``."""
        b = max(int(np.searchsorted(self.fence, np.uint64(key), "left")) - 1, 0)
        block = self.read(b * FENCE_EVERY, WINDOW)
        return b * FENCE_EVERY + int(np.count_nonzero(block["key"] < np.uint64(key)))

    def matches(self, address: bytes) -> list[bytes]:
        """Every record of ``address`` here (copies in several packs), as bytes."""
        key = int.from_bytes(address[:8], "big")
        pos, out = self.first_at_or_after(key), []
        while pos < self.n:
            chunk = self.read(pos, WINDOW)
            for r in chunk:
                if int(r["key"]) != key:
                    return out
                raw = r.tobytes()
                if raw[:32] == address:
                    out.append(raw)
            pos += len(chunk)
        return out

    def find_one(self, address: bytes):
        """The single lookup: ``(record bytes or None, multi)`` as :meth:`probe`."""
        try:
            raw, multi = _native.probe_one(self.fd, self.fence, self.n, FENCE_EVERY,
                                           HEADER.size, address)
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror}") from None
        return raw, multi


class SegmentWriter:
    """Writes one segment from records given in key order (streamed: bounded memory)."""

    def __init__(self, dir_fd: int, where: str):
        self.dir_fd = dir_fd
        self.name = f"seg-{uuid.uuid4().hex}.sbi"
        self.tmp = f".{self.name}.tmp"
        self.where = where
        self.fd = create_file(self.tmp, dir_fd=dir_fd)
        self.n = 0
        self.hash = xxhash.xxh3_128()
        self.fence: list[np.ndarray] = []
        self._last = -1
        try:
            os.pwrite(self.fd, bytes(HEADER.size), 0)
        except BaseException:
            self.discard()
            raise

    def write(self, rec: np.ndarray) -> None:
        if not len(rec):
            return
        # exactly the file's dtype (numpy's concatenate turns big-endian fields native)
        rec = rec.astype(RECORD_DTYPE, copy=False)
        keys = rec["key"]
        if int(keys[0]) < self._last or (len(rec) > 1 and (keys[1:] < keys[:-1]).any()):
            raise AssertionError("segment records out of order")
        self._last = int(keys[-1])
        first = (-self.n) % FENCE_EVERY
        self.fence.append(keys[first::FENCE_EVERY].astype("<u8"))
        data = np.ascontiguousarray(rec).tobytes()
        self.hash.update(data)
        _write_all(self.fd, data, HEADER.size + self.n * REC)
        self.n += len(rec)

    def finish(self, packs: np.ndarray) -> str:
        """Write fence, pack table and header; publish under :attr:`name` (not
        fsynced: see the module docstring)."""
        try:
            tail = (np.concatenate(self.fence) if self.fence else np.zeros(0, "<u8")).tobytes() \
                + np.ascontiguousarray(packs, PACK_DTYPE).tobytes()
            self.hash.update(tail)
            _write_all(self.fd, tail, HEADER.size + self.n * REC)
            head = HEADER.pack(MAGIC, VERSION, FENCE_EVERY, 0, self.n, len(packs), 0,
                               self.hash.digest(), b"")[:56]
            os.pwrite(self.fd, head + xxhash.xxh3_64_digest(head), 0)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            self.discard()
            raise
        return self.name

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            remove_file(self.tmp, dir_fd=self.dir_fd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _sort(rec: np.ndarray) -> np.ndarray:
    # records of one key may come in any order: the quick sort, on native keys
    return np.take(rec, np.argsort(rec["key"].astype(np.uint64)))


# --- the index in one folder ------------------------------------------------------------

class DiskIndex:
    """The segments in one folder, shared by every user in this process
    (:meth:`for_dir`); :meth:`sync` brings it up to date with a pack listing."""

    _open: "weakref.WeakValueDictionary[str, DiskIndex]" = weakref.WeakValueDictionary()
    _open_lock = threading.Lock()

    @classmethod
    def for_dir(cls, root: str, *parts: str, create_root: bool = True) -> "DiskIndex":
        path = os.path.join(os.path.abspath(root), *parts)
        with cls._open_lock:
            di = cls._open.get(path)
            if di is None:
                di = cls._open[path] = cls(root, *parts, create_root=create_root)
            return di

    @classmethod
    def opened(cls, root: str, *parts: str) -> "DiskIndex | None":
        """The index in that folder if this process has it open (:meth:`for_dir`), else
        None."""
        with cls._open_lock:
            return cls._open.get(os.path.join(os.path.abspath(root), *parts))

    def __init__(self, root: str, *parts: str, create_root: bool = True):
        """The index in ``root/parts...``: ``root`` (a folder the user named, or the
        user's cache) is followed, and made when missing unless ``create_root`` is false
        (a store's root: never made here); ``parts`` (``index`` inside a store) are
        never followed: a link planted there is refused."""
        self.root, self.parts = os.path.abspath(root), parts
        self.create_root = create_root
        self.path = os.path.join(self.root, *parts)
        self.segments: dict[str, Segment] = {}
        self.generation = -1
        self._lock = threading.Lock()
        #: called between writing a merged segment and publishing it (tests)
        self.before_publish: Callable[[], None] | None = None

    # -- locking and CURRENT --------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, exclusive: bool):
        dfd = _open_folder(self.root, self.parts, self.create_root)
        try:
            lfd = open_lock_file("lock", dir_fd=dfd)
            try:
                # held only while CURRENT is read or the index changed: waiting is short
                # unless another process indexes many new packs, which this one needs too
                mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
                try:
                    fcntl.flock(lfd, mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("%s: waiting for another process to finish updating the block "
                             "index", self.path)
                    fcntl.flock(lfd, mode)
                yield dfd
            finally:
                os.close(lfd)
        finally:
            os.close(dfd)

    def _read_current(self, dfd: int) -> tuple[int, list[str]]:
        try:
            fd = os.open(CURRENT, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return 0, []
        except OSError as e:
            raise IndexDamaged(f"{self.path}/{CURRENT}: cannot open: {e.strerror}") from None
        try:
            raw = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        try:
            d = json.loads(raw)
            if d.get("format") != CURRENT_FORMAT or d.get("version") != 1:
                raise ValueError("not a block index CURRENT file")
            names = d["segments"]
            gen = d["generation"]
            if not isinstance(gen, int) or not all(
                    isinstance(s, str) and s.startswith("seg-") and s.endswith(".sbi")
                    and "/" not in s for s in names):
                raise ValueError("bad segment list")
            return gen, list(names)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IndexDamaged(f"{self.path}/{CURRENT}: does not read ({e})") from None

    def _write_current(self, dfd: int, gen: int, names: list[str]) -> None:
        data = json.dumps({"format": CURRENT_FORMAT, "version": 1, "generation": gen,
                           "segments": names}, indent=1).encode() + b"\n"
        replace_file(CURRENT, data, dir_fd=dfd, sync=False)     # a cache: see the docstring

    def _load(self, dfd: int, names: list[str]) -> tuple[dict[str, Segment], list[str]]:
        """Open the named segments (reusing open ones); return ``(segments, damaged)``."""
        segs, bad = {}, []
        for name in names:
            seg = self.segments.get(name)
            if seg is None:
                try:
                    seg = Segment(dfd, name, self.path)
                except IndexDamaged as e:
                    bad.append(str(e))
                    continue
            segs[name] = seg
        return segs, bad

    # -- sync -----------------------------------------------------------------------------
    def sync(self, listed: dict[str, int], read_index: Callable[[str, int], np.ndarray | None]
             ) -> tuple[list[Segment], list[str]]:
        """Bring the index up to date with ``listed`` (``{pack_id: size}``): index the
        packs it lacks (``read_index(pack_id, size)`` gives a pack's index, or None to
        leave the pack out), merge when there are too many segments or dead entries.
        Returns ``(segments, lacking)``: the live segments to look up in, and the listed
        packs they lack because the index could not be written (a full disk): the
        caller holds those in memory for this process."""
        with self._lock:
            listed_keys = _pack_keys(listed)
            try:
                try:
                    with self._locked(exclusive=False) as dfd:
                        gen, names = self._read_current(dfd)
                        if gen != self.generation or set(names) != set(self.segments):
                            segs, bad = self._load(dfd, names)
                        else:
                            segs, bad = self.segments, []
                    self.segments = segs        # checked: not checked again below
                    if not bad and not self._needs_work(segs, listed_keys):
                        self.generation = gen
                        return list(segs.values()), []
                except IndexDamaged:
                    pass        # the exclusive pass below finds it again and rebuilds
                with self._locked(exclusive=True) as dfd:
                    self._update(dfd, listed, listed_keys, read_index)
                return list(self.segments.values()), []
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EPERM):
                    # a link planted in a store, a lock file smsblock did not make
                    raise StoreError(f"{e.filename or self.path}: {e.strerror} (the block "
                                     "index is not used through it)") from None
                # the index is a cache of the packs: a run goes on without updating it
                log.warning("%s: cannot update the block index (%s): the packs it lacks "
                            "are held in memory by this process", self.path, e.strerror or e)
                segs = list(self.segments.values())
                lacking = ~isin(listed_keys, _indexed_keys(segs))
                return segs, [pid for pid, lack in zip(listed, lacking.tolist()) if lack]

    def add_packs(self, packs: dict[str, tuple[int, np.ndarray]]) -> bool:
        """Index packs just sealed for the store, from the indexes their writer
        holds (``{pack_id: (size, index)}``), as one new segment (or a few, at
        :data:`BUILD_CHUNK` entries each), so the next :meth:`sync` has nothing to read.
        Packs indexed already are skipped; merging is left to :meth:`sync`.  Returns
        whether the index changed; a damaged ``CURRENT`` or segment is left for
        :meth:`sync` to rebuild.  Raises OSError."""
        with self._lock:
            try:
                with self._locked(exclusive=True) as dfd:
                    gen, names = self._read_current(dfd)
                    segs, bad = self._load(dfd, names)
                    if bad:
                        return False
                    sizes = {pid: size for pid, (size, _index) in packs.items()}
                    known = isin(_pack_keys(sizes), _indexed_keys(segs.values())).tolist()
                    todo = sorted(pid for pid, k in zip(sizes, known) if not k)
                    if not todo:
                        return False
                    new = self._index_packs(dfd, todo, sizes, lambda pid, _size: packs[pid][1])
                    for seg in new:
                        segs[seg.name] = seg
                    gen += 1
                    self._write_current(dfd, gen, list(segs))
                    self.segments, self.generation = segs, gen
                    return True
            except IndexDamaged:
                return False

    def _needs_work(self, segs: dict[str, Segment], listed_keys: np.ndarray) -> bool:
        have = _indexed_keys(segs.values())
        if not isin(listed_keys, have).all():
            return True
        total, dead = _dead_entries(segs.values(), listed_keys)
        return len(segs) > MAX_SEGMENTS or (total and dead > DEAD_FRACTION * total)

    def _update(self, dfd: int, listed, listed_keys, read_index) -> None:
        try:
            gen, names = self._read_current(dfd)
        except IndexDamaged as e:
            log.warning("%s: rebuilding the block index from the packs", e)
            gen, names = 0, []
        segs, bad = self._load(dfd, names)
        for problem in bad:
            log.warning("%s: rebuilding its part of the block index from the packs", problem)
        self._collect_garbage(dfd, set(segs))
        have = _indexed_keys(segs.values())
        lacking = ~isin(listed_keys, have)
        missing = [pid for pid, lack in zip(listed, lacking.tolist()) if lack]
        new = self._index_packs(dfd, sorted(missing), listed, read_index)
        if len(new) > 1:        # many packs at once (a first open): one segment of them
            merged = merge_segments(dfd, self.path, new, listed_keys)
            new = [merged] if merged is not None else []
        changed = bool(new) or bool(bad) or set(names) != set(segs)
        for seg in new:
            segs[seg.name] = seg
        # merge: everything when many entries are dead, else the small segments
        total, dead = _dead_entries(segs.values(), listed_keys)
        group: list[Segment] = []
        if total and dead > DEAD_FRACTION * total:
            group = list(segs.values())
        elif len(segs) > MAX_SEGMENTS:
            by_size = sorted(segs.values(), key=lambda s: s.n)
            take = len(by_size) - MAX_SEGMENTS // 2 + 1
            group, acc = by_size[:take], sum(s.n for s in by_size[:take])
            for s in by_size[take:]:          # geometric tiers: absorb a peer-sized one
                if s.n > acc:
                    break
                group.append(s)
                acc += s.n
        if len(group) > 1 or (group and dead):
            merged = merge_segments(dfd, self.path, group, listed_keys)
            if self.before_publish is not None:
                self.before_publish()
            for s in group:
                del segs[s.name]
            if merged is not None:
                segs[merged.name] = merged
            changed = True
        if changed:
            gen += 1
            self._write_current(dfd, gen, list(segs))
            self._collect_garbage(dfd, set(segs))
        self.segments, self.generation = segs, gen

    def _collect_garbage(self, dfd: int, keep: set[str]) -> None:
        """Remove segment files (and temporary ones) CURRENT does not name: left by a
        killed writer or replaced by a merge.  Only under the exclusive lock."""
        for name in os.listdir(dfd):
            ours = (name.startswith("seg-") and name.endswith(".sbi")) or \
                (name.startswith(".seg-") and name.endswith(".tmp")) or \
                (name.startswith(".") and name.endswith(".tmp") and len(name) == 37)
            if ours and name not in keep:
                with contextlib.suppress(OSError):
                    remove_file(name, dir_fd=dfd)

    def _index_packs(self, dfd, missing: list[str], listed: dict[str, int],
                     read_index) -> list[Segment]:
        """New segments holding the packs ``missing`` (read one by one, sorted in chunks
        of :data:`BUILD_CHUNK` entries, so memory stays bounded)."""
        out: list[Segment] = []
        parts, rows, count = [], [], 0

        def flush():
            nonlocal parts, rows, count
            if not rows:
                return
            w = SegmentWriter(dfd, self.path)
            try:
                w.write(_sort(np.concatenate(parts)) if parts else np.zeros(0, RECORD_DTYPE))
                w.finish(np.array(rows, PACK_DTYPE))
            except BaseException:
                w.discard()
                raise
            out.append(Segment(dfd, w.name, self.path))
            parts, rows, count = [], [], 0

        for pid in missing:
            size = listed[pid]
            index = read_index(pid, size)
            if index is None:
                continue
            parts.append(records_of(index, len(rows)))
            rows.append((np.frombuffer(bytes.fromhex(pid), np.uint8), size, len(index)))
            count += len(index)
            if count >= BUILD_CHUNK:
                flush()
        flush()
        return out


def _pack_keys(listed: dict[str, int]) -> np.ndarray:
    """One comparable item per (pack id, size): what identifies a pack's content."""
    a = np.zeros(len(listed), PACK_DTYPE)
    if listed:
        a["id"] = np.frombuffer(b"".join(bytes.fromhex(p) for p in listed), np.uint8).reshape(-1, 32)
        a["size"] = np.fromiter(listed.values(), np.uint64, len(listed))
    return _row_keys(a)


def _row_keys(packs: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(packs[["id", "size"]]).view(np.uint8).reshape(-1, PACK_DTYPE.itemsize)[:, :40]
    return np.ascontiguousarray(ids).view(np.dtype((np.void, 40))).reshape(-1)


def _indexed_keys(segs: Iterable[Segment]) -> np.ndarray:
    parts = [_row_keys(s.packs) for s in segs if s.n_packs]
    return sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.dtype((np.void, 40)))


def _dead_entries(segs: Iterable[Segment], listed_keys: np.ndarray) -> tuple[int, int]:
    total = dead = 0
    for s in segs:
        total += s.n
        if s.n_packs:
            gone = ~isin(_row_keys(s.packs), listed_keys)
            dead += int(s.packs["entries"][gone].sum())
    return total, dead


def merge_segments(dfd: int, where: str, group: list[Segment], listed_keys: np.ndarray
                   ) -> Segment | None:
    """One segment holding the entries of ``group`` whose packs are listed (each pack
    once), streamed: at most :data:`MERGE_BUDGET` entries in memory."""
    # the merged pack table; per input a map from its rows to the new ones (-1: dropped)
    rows, seen, maps = [], {}, []
    for s in group:
        keep = isin(_row_keys(s.packs), listed_keys)
        m = np.full(max(s.n_packs, 1), -1, np.int64)
        for r in np.flatnonzero(keep).tolist():
            k = s.packs[r].tobytes()[:40]
            if k in seen:
                continue            # the same pack in two segments (a lost race): once
            seen[k] = m[r] = len(rows)
            rows.append(s.packs[r])
        maps.append(m)
    w = SegmentWriter(dfd, where)
    try:
        chunk = max(MERGE_MIN, MERGE_BUDGET // max(len(group), 1))
        cursor = [0] * len(group)
        bufs: list[np.ndarray | None] = [None] * len(group)
        while True:
            for i, s in enumerate(group):
                if (bufs[i] is None or not len(bufs[i])) and cursor[i] < s.n:
                    bufs[i] = s.read(cursor[i], chunk)
                    cursor[i] += len(bufs[i])
            live = [i for i in range(len(group)) if bufs[i] is not None and len(bufs[i])]
            if not live:
                break
            # everything up to the smallest last key of a buffer that has more behind it
            bound = min((int(bufs[i]["key"][-1]) for i in live if cursor[i] < group[i].n),
                        default=None)
            take = []
            for i in live:
                b = bufs[i]
                cut = len(b) if bound is None else int(np.searchsorted(b["key"], np.uint64(bound), "right"))
                part, bufs[i] = b[:cut], b[cut:]
                if len(part):
                    new_rows = maps[i][part["pack"].astype(np.int64)]
                    part = part[new_rows >= 0].copy()
                    part["pack"] = new_rows[new_rows >= 0]
                    take.append(part)
            if take:
                w.write(_sort(np.concatenate(take)))
        if not rows and not w.n:
            w.discard()
            return None
        w.finish(np.array(rows, PACK_DTYPE) if rows else np.zeros(0, PACK_DTYPE))
    except BaseException:
        w.discard()
        raise
    return Segment(dfd, w.name, where)


# --- the index a run uses ---------------------------------------------------------------

class BlockIndex:
    """Where every stored block lives: address -> :class:`~smsblock.pack.BlockLocation`.

    ``BlockIndex(packs)`` indexes a ``{pack_id: index array}`` dict in a private
    temporary folder (removed with the object); :meth:`Store.block_index` gives one over
    the store's own on-disk index (see the module docstring), filtered by the store's
    pack listing and damage records.  Lookups are thread-safe; :meth:`add` records packs
    written by this process (kept in memory until the next open lists them).
    """

    def __init__(self, packs: dict[str, np.ndarray] | None = None):
        tmp = tempfile.mkdtemp(prefix="smsblock-index-")          # 0700
        self._tmp = weakref.finalize(self, shutil.rmtree, tmp, True)
        packs = packs or {}
        listed = {pid: sealed_size(index) for pid, index in packs.items()}
        di = DiskIndex(tmp)
        segs, lacking = di.sync(listed, lambda pid, size: packs[pid])
        self._init(segs, listed, {}, False)
        for pid in lacking:
            self.add(pid, packs[pid])

    @classmethod
    def _view(cls, segments: list[Segment], listed: dict[str, int], damage: dict,
              for_new_runs: bool, disk_index: "DiskIndex | None" = None) -> "BlockIndex":
        self = cls.__new__(cls)
        self._tmp = None
        self._disk_index = disk_index   # kept open while the view lives (index_new_packs)
        self._init(segments, listed, damage, for_new_runs)
        return self

    def _init(self, segments, listed, damage, for_new_runs) -> None:
        self._lock = threading.Lock()
        self._extra: dict[bytes, BlockLocation] = {}
        self._segments = list(segments)
        self._named: dict[tuple[int, int], set] = {}
        self._ranks: list[np.ndarray] = []
        listed_keys = _pack_keys(listed)
        keys = [_row_keys(s.packs) for s in self._segments]
        for s, k in zip(self._segments, keys):      # vectorised: a store has many packs
            rank = np.full(max(s.n_packs, 1), RANK_GONE, np.int8)
            rank[:s.n_packs][isin(k, listed_keys)] = RANK_GOOD
            self._ranks.append(rank)
        every = np.concatenate(keys) if keys else np.zeros(0, np.dtype((np.void, 40)))
        if len(sorted_unique(every)) != len(every):
            seen: set[bytes] = set()                # a pack indexed twice (a lost race)
            for s, k, rank in zip(self._segments, keys, self._ranks):
                for r in range(s.n_packs):
                    if k[r].tobytes() in seen:
                        rank[r] = RANK_GONE         # its first copy serves
                    seen.add(k[r].tobytes())
        if damage:          # a few packs: found by id
            wanted = np.array([np.void(bytes.fromhex(p)) for p in damage], np.dtype((np.void, 32)))
            for si, s in enumerate(self._segments):
                ids = np.ascontiguousarray(s.packs["id"]).view(np.dtype((np.void, 32))).reshape(-1)
                for r in np.flatnonzero(isin(ids, wanted)).tolist():
                    if self._ranks[si][r] == RANK_GONE:
                        continue
                    record = damage[s.pack_hex(r)]
                    if record.pack:
                        self._ranks[si][r] = RANK_GONE if for_new_runs else RANK_SUSPECT
                    if record.addresses and self._ranks[si][r] != RANK_GONE:
                        self._named[(si, r)] = record.addresses
        entries = sum(int(s.packs["entries"][rank[:s.n_packs] != RANK_GONE].sum())
                      for s, rank in zip(self._segments, self._ranks))
        entries -= sum(len(a) for a in self._named.values())
        self._entries = max(entries, 0)

    @property
    def pack_ids(self) -> list[str]:
        """The ids of the packs lookups use."""
        return sorted({s.pack_hex(r) for s, rank in zip(self._segments, self._ranks)
                       for r in np.flatnonzero(rank[:s.n_packs] != RANK_GONE).tolist()})

    def close(self) -> None:
        """Remove a private index's folder (a store's index stays); idempotent."""
        self._segments = []
        self._ranks = []
        if self._tmp is not None:
            self._tmp()

    def __len__(self) -> int:
        return self._entries + len(self._extra)

    def _rank(self, si: int, row: int, address: bytes) -> int:
        rank = int(self._ranks[si][row]) if row < len(self._ranks[si]) else RANK_GONE
        if rank != RANK_GONE and (si, row) in self._named and address in self._named[(si, row)]:
            return RANK_GONE
        return rank

    def _best(self, address: bytes):
        """``(segment, pack row, offset, clen, ulen)`` of the best copy, or None."""
        best, best_rank = None, RANK_GONE
        for si, s in enumerate(self._segments):
            raw, multi = s.find_one(address)
            for r in s.matches(address) if multi else ([raw] if raw is not None else []):
                _, row, offset, clen, ulen = RECORD.unpack(r)
                rank = self._rank(si, row, address)
                if rank == RANK_GOOD:
                    return si, row, offset, clen, ulen
                if rank < best_rank:
                    best, best_rank = (si, row, offset, clen, ulen), rank
        return best

    def get(self, address: bytes) -> BlockLocation | None:
        address = bytes(address)
        if self._extra:
            loc = self._extra.get(address)
            if loc is not None:
                return loc
        hit = self._best(address)
        if hit is None:
            return None
        si, row, offset, clen, ulen = hit
        return BlockLocation(self._segments[si].pack_hex(row), offset, clen, ulen)

    def __contains__(self, address: bytes) -> bool:
        address = bytes(address)
        return (bool(self._extra) and address in self._extra) or self._best(address) is not None

    def add(self, pack_id: str, index: np.ndarray) -> None:
        with self._lock:
            for e in index:
                self._extra.setdefault(e["address"].tobytes(), BlockLocation(
                    pack_id, int(e["offset"]), int(e["clen"]), int(e["ulen"])))

    def _lookup(self, addresses: np.ndarray, keep: bool):
        """``(found, seg_of, recs, slow)`` per address (``seg_of`` and ``recs``, the
        record found, only with ``keep``); ``slow`` marks those :meth:`get` answers (a
        key that repeats in a segment, or blocks added here).  The addresses are
        sorted, then probed :data:`LOOKUP_CHUNK` at a time: memory stays bounded
        however many the caller passes."""
        n = len(addresses)
        found = np.zeros(n, bool)
        slow = np.zeros(n, bool)
        seg_of = np.full(n if keep else 0, -1, np.int64)
        recs = np.zeros(n if keep else 0, RECORD_DTYPE)
        if n and self._segments:
            qk = keys_of(addresses)
            order = np.argsort(qk)             # sorted: one read per fence block
            for c in range(0, n, LOOKUP_CHUNK):
                todo = order[c:c + LOOKUP_CHUNK]
                best = np.full(len(todo), RANK_GONE, np.int8)
                pos = np.arange(len(todo))
                for si, s in enumerate(self._segments):
                    if not len(pos):
                        break
                    at = todo[pos]
                    hit, rows, multi = s.probe(qk[at], addresses[at])
                    ranks = np.full(len(pos), RANK_GONE, np.int8)
                    if hit.any():
                        ranks[hit] = self._ranks[si][rows["pack"][hit].astype(np.int64)]
                        if self._named:
                            for i in np.flatnonzero(hit & (ranks != RANK_GONE)).tolist():
                                row = int(rows["pack"][i])
                                if (si, row) in self._named:
                                    ranks[i] = self._rank(si, row, rows[i].tobytes()[:32])
                    better = ranks < best[pos]
                    best[pos[better]] = ranks[better]
                    if keep and better.any():
                        seg_of[at[better]] = si
                        recs[at[better]] = rows[better]
                    slow[at[multi]] = True
                    # a sound copy ends the search; repeated keys go the slow way
                    pos = pos[(best[pos] != RANK_GOOD) & ~multi]
                found[todo] = best != RANK_GONE
        if self._extra:
            slow |= ~found
        return found, seg_of, recs, slow

    def locate_many(self, addresses: np.ndarray):
        """Batch lookup of an (n, 32) uint8 array: ``(found, pack_ids, offset, clen,
        ulen)``, ``pack_ids`` a list (None where not found), the rest numpy arrays."""
        addresses = np.ascontiguousarray(addresses, np.uint8).reshape(-1, 32)
        found, seg_of, recs, slow = self._lookup(addresses, True)
        n = len(addresses)
        pack_ids: list[str | None] = [None] * n
        for i in np.flatnonzero(found & ~slow).tolist():
            pack_ids[i] = self._segments[int(seg_of[i])].pack_hex(int(recs["pack"][i]))
        offset, clen, ulen = (recs["offset"].astype(np.uint64), recs["clen"].astype(np.uint32),
                              recs["ulen"].astype(np.uint32))
        for i in np.flatnonzero(slow).tolist():          # the rare rest one by one
            loc = self.get(addresses[i].tobytes())
            found[i] = loc is not None
            pack_ids[i] = loc.pack_id if loc else None
            offset[i], clen[i], ulen[i] = (loc.offset, loc.clen, loc.ulen) if loc else (0, 0, 0)
        return found, pack_ids, offset, clen, ulen

    def contains_all(self, addresses: np.ndarray) -> np.ndarray:
        """Vectorised membership for an (n, 32) address array: a bool array."""
        addresses = np.ascontiguousarray(addresses, np.uint8).reshape(-1, 32)
        found, _, _, slow = self._lookup(addresses, False)
        for i in np.flatnonzero(slow).tolist():
            found[i] = self.get(addresses[i].tobytes()) is not None
        return found


# --- a store's index ----------------------------------------------------------------------

_fallback_dirs: dict[str, str] = {}


def _open_folder(root: str, parts: tuple[str, ...], create_root: bool) -> int:
    """A descriptor of ``root/parts...``, made 0700 where missing (``root`` only when
    ``create_root``), no part followed through a link."""
    if create_root:
        make_root(root)
    fd = open_subdir(root)
    try:
        for part in parts:
            nxt = open_dir(part, dir_fd=fd, create=True)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def index_dir_of(store) -> tuple[str, tuple[str, ...], bool]:
    """Where a store's index lives, as ``(root, parts, create_root)`` (see
    :class:`DiskIndex`): the backend says (``STORE/index`` for a local store, next to
    the pack-index cache for S3, the staging store's for EBS, else the user's cache)."""
    return store.block_index_dir()


def _usable_dir(root: str, parts: tuple[str, ...], create_root: bool):
    """``(root, parts, create_root)``, or a private temporary folder when it cannot be
    written (a read-only store): the index is then built for this process only."""
    path = os.path.join(root, *parts)
    try:
        os.close(_open_folder(root, parts, create_root))
        if not os.access(path, os.W_OK):
            raise OSError(errno.EACCES, "not writable", path)
        return root, parts, create_root
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS):
            raise StoreError(f"{e.filename or path}: cannot keep the block index here: "
                             f"{e.strerror}") from None
        tmp = _fallback_dirs.get(path)
        if tmp is None:
            log.warning("%s: cannot keep the block index here (%s): building it in a "
                        "temporary folder for this process", path, e.strerror)
            tmp = _fallback_dirs[path] = tempfile.mkdtemp(prefix="smsblock-index-")
            atexit.register(shutil.rmtree, tmp, True)
        return tmp, (), False


def index_new_packs(store, packs: dict[str, tuple[int, np.ndarray]]) -> bool:
    """Add packs this process has just sealed for ``store`` (``{pack_id: (size,
    index)}``; put, or still being put: an entry counts only once its pack is listed
    with that size) to the store's on-disk index, from the indexes their writer holds:
    the next run's
    :func:`store_block_index` then reads no pack index and writes no segment before its
    scan starts (~2-3 ms a run on a local store, measured).  Only while this process has
    the index open (a run's index holds it: its segments are checked already, and
    opening them all again would cost more than the next sync saves).  Best effort: the
    index is a cache, and a pack left out is indexed from the listing by the next sync.
    Returns whether they were added."""
    root, parts, _create_root = index_dir_of(store)
    di = DiskIndex.opened(root, *parts)
    if di is None or not packs:
        return False
    try:
        return di.add_packs(packs)
    except OSError as e:
        log.info("%s: %d new pack(s) not added to the block index now (%s): the next run "
                 "adds them", store.url, len(packs), e.strerror or e)
        return False


def store_block_index(store, *, for_new_runs: bool = False,
                      listed: dict[str, int] | None = None) -> BlockIndex:
    """:meth:`Store.block_index`: sync the store's on-disk index with its pack listing
    (``listed``, ``{pack_id: size}``, or the store's own), then a view that leaves out
    (or ranks last) what the damage records name."""
    from .errors import StoreCorruptError
    if listed is None:
        listed = store.list_packs()
    damage = store.damage()

    def read(pid: str, size: int):
        try:
            return store.pack_index(pid, size)
        except StoreCorruptError as e:
            log.warning("%s (left out of the block index; run verify)", e)
            return None
        finally:
            store.forget_pack(pid)      # indexed on disk now: not kept in memory too

    root, parts, create_root = _usable_dir(*index_dir_of(store))
    di = DiskIndex.for_dir(root, *parts, create_root=create_root)
    segments, lacking = di.sync(listed, read)
    view = BlockIndex._view(segments, listed, damage, for_new_runs, disk_index=di)
    for pid in lacking:         # the index could not be written: these in memory
        record = damage.get(pid)
        if record is not None and record.pack and for_new_runs:
            continue
        index = read(pid, listed[pid])
        if index is not None and record is not None and record.addresses:
            index = index[~record.holds(index["address"])]
        if index is not None:
            view.add(pid, index)
    return view
