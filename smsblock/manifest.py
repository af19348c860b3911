"""Run manifests: the per-block table of one replication run, its file format, and diff.

A :class:`Manifest` cuts a disk into ``n_blocks`` fixed blocks of ``block_size`` bytes
(the last one short when the disk size is not a multiple) and records, per block:

* ``states[i]``: a :class:`BlockState` (unallocated, zero, data);
* ``hashes[i]``: the xxh3-128 of the block's bytes (canonical, big-endian) for DATA
  blocks, 16 zero bytes otherwise — the fast "did it change" hash;
* ``addresses[i]``: the content address (32 bytes, ``address_algorithm``) under which a
  store keeps the block, for DATA blocks, zeros otherwise.

The binary formats are documented field by field in ``docs/formats.md``.
Version 3 (what everything writes) stores runs of equal state as 24-byte records and only
the entries (hash, address) of the blocks that have them, in zstd frames of at most 1 MiB
decoded, so a file's size follows the data on the disk, not its size; its digest is over
the runs, so computing it costs what the file costs.  Versions 1 (per-block sections) and
2 (version 3's layout, a per-block digest) still load.

Two ways to hold a table:

* :class:`Manifest`: the whole table as arrays (49 bytes a block), for small disks and
  API users: :meth:`Manifest.to_bytes`, :meth:`Manifest.from_bytes`, :func:`diff`;
* streaming, in memory that does not follow the disk's size (what the engine uses):
  :class:`ManifestWriter` writes a file a run or a window of blocks at a time,
  :class:`ManifestReader` reads one by windows (:meth:`~ManifestReader.window`), runs
  (:meth:`~ManifestReader.runs`) or single blocks (:meth:`~ManifestReader.entry`, a
  frame table and a few cached frames), and :func:`iter_diff` / :func:`diff_count`
  compare two tables a window at a time.  A Manifest has the same read methods, so code
  written for a reader takes either.
"""

from __future__ import annotations

import enum
import bisect
import collections
import contextlib
import hashlib
import io
import json
import os
import struct
import threading

import numpy as np
import zstandard

from .errors import ManifestError, UsageError
from .fsutil import replace_file

__all__ = ["BlockState", "Manifest", "ManifestReader", "ManifestWriter", "diff", "iter_diff",
           "diff_count", "entry_batches", "check_block_size", "WINDOW_BLOCKS",
           "DEFAULT_BLOCK_SIZE", "MIN_BLOCK_SIZE", "MAX_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 512 * 1024        # the EBS direct API block size
MIN_BLOCK_SIZE = 64 * 1024             # one VMDK grain
MAX_BLOCK_SIZE = 4 * 1024 * 1024

HASH_SIZE = 16                         # xxh3-128
ADDRESS_SIZE = 32                      # SHA-256 or BLAKE3-256

MAGIC = b"SMSBMANI"
VERSION = 3                            # what to_bytes()/save() write; 1 and 2 still load
TRAILER_MAGIC = b"SMSBEND\0"
DIGEST_DOMAIN = b"smsblock manifest digest v1\0"       # versions 1 and 2: per block
DIGEST_DOMAIN_V3 = b"smsblock manifest digest v3\0"    # version 3: per run
WINDOW_BLOCKS = 1 << 16                # blocks a streaming pass holds as arrays at once

# Version 1 header, little-endian: magic, version, header size, disk size, block size,
# block count, address algorithm (NUL-padded ASCII), meta length, flags, digest, reserved.
_HEADER = struct.Struct("<8sIIQIQ16sQI32s32s")
HEADER_SIZE = _HEADER.size             # 128
_TRAILER = struct.Struct("<8s32s")      # trailer magic, SHA-256 of all bytes before it
TRAILER_SIZE = _TRAILER.size           # 40
MAX_META_SIZE = 16 * 1024 * 1024

# Version 2 (docs/formats.md): header | frames | meta | footer | trailer.  Everything the
# writer learns only at the end (digest, frame count, lengths) is in the footer, so a
# writer can stream the file in one pass and a reader can size it from its two ends.
# Header: magic, version, header size, disk size, block size, block count, algorithm,
# flags, reserved.  Fields up to the algorithm sit where version 1 has them.
_HEADER_V2 = struct.Struct("<8sIIQIQ16sI8s")
HEADER_V2_SIZE = _HEADER_V2.size       # 64
FOOTER_MAGIC = b"SMSBMFTR"
_FOOTER = struct.Struct("<8sQQQ32s")   # magic, frame count, body length, meta length, digest
FOOTER_SIZE = _FOOTER.size             # 64
_TAIL_SIZE = FOOTER_SIZE + TRAILER_SIZE
# Frame header: stored length, raw length, encoding, reserved, record count, first block,
# block count.  A frame's raw content is its records' headers, then the hashes of the
# blocks of its records that carry arrays, then their addresses (columns compress and
# load as whole arrays).
_FRAME = struct.Struct("<IIB3sIQQ")
FRAME_HEADER_SIZE = _FRAME.size        # 32
FRAME_RAW_MAX = 1 << 20                # decoded bytes per frame: the reader's memory bound
FRAME_STORED, FRAME_ZSTD = 0, 1
ZSTD_LEVEL = 3
ZSTD_MAX_WINDOW = 1 << 23              # refuse frames that ask a decoder for more
# Record: state, flags, reserved, first block, block count.
_RECORD = np.dtype([("state", "u1"), ("flags", "u1"), ("reserved", "u1", 6),
                    ("start", "<u8"), ("count", "<u8")])
RECORD_HEADER_SIZE = _RECORD.itemsize  # 24
RECORD_ARRAYS = 1                      # flag: the record's blocks have hashes and addresses
ENTRY_SIZE = HASH_SIZE + ADDRESS_SIZE  # 48
MAX_BLOCKS = 1 << 40                   # 64 PiB at 64 KiB blocks


class BlockState(enum.IntEnum):
    """What a block of the disk holds."""

    UNALLOCATED = 0     #: no DATA extent touches it: never read, reads as zeros
    ZERO = 1            #: read (allocated) but all zeros: not hashed, not stored
    DATA = 2            #: holds data: hashed, stored by content address


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is a power of two from 64 KiB to 4 MiB, else raise UsageError."""
    if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
            or block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)):
        raise UsageError(f"block size {block_size!r} is not a power of two from "
                         f"{MIN_BLOCK_SIZE} (64 KiB) to {MAX_BLOCK_SIZE} (4 MiB)")
    return int(block_size)


def _check_algorithm(name) -> str:
    raw = name.encode("ascii", "replace") if isinstance(name, str) else b""
    if not raw or len(raw) > 16 or b"\0" in raw or not name.isprintable():
        raise UsageError(f"address algorithm name {name!r} must be 1-16 printable ASCII characters")
    return name


def blocks_for(disk_size: int, block_size: int) -> int:
    """Number of blocks covering ``disk_size`` bytes (the last one may be short)."""
    return (disk_size + block_size - 1) // block_size


class Manifest:
    """The block table of one run (see the module docstring for the fields).

    ``states``, ``hashes`` and ``addresses`` are numpy arrays of shapes ``(n,)``,
    ``(n, 16)`` and ``(n, 32)``, dtype uint8; missing ones start as zeros (all blocks
    unallocated).  ``meta`` is a JSON-serialisable dict (server_id, run_id, created,
    source, ...).  ``address_algorithm`` names the content-address hash ("sha256",
    "blake3"; "none" while no block has an address).
    """

    def __init__(self, disk_size: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 states=None, hashes=None, addresses=None, meta: dict | None = None,
                 address_algorithm: str = "none"):
        if not isinstance(disk_size, (int, np.integer)) or disk_size < 0:
            raise UsageError(f"disk size {disk_size!r} is not a non-negative integer")
        self.disk_size = int(disk_size)
        self.block_size = check_block_size(block_size)
        n = blocks_for(self.disk_size, self.block_size)
        self.states = _array(states, (n,), "states")
        self.hashes = _array(hashes, (n, HASH_SIZE), "hashes")
        self.addresses = _array(addresses, (n, ADDRESS_SIZE), "addresses")
        self.meta = dict(meta or {})
        self.address_algorithm = address_algorithm

    # -- shape ------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return len(self.states)

    def block_range(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of block ``index`` on the disk."""
        offset = index * self.block_size
        return offset, min(self.block_size, self.disk_size - offset)

    def count(self, state: BlockState) -> int:
        """How many blocks are in ``state``."""
        return int(np.count_nonzero(self.states == state))

    # -- the reader interface (what ManifestReader has too) -----------------
    def window(self, start: int, end: int):
        """Blocks ``start`` .. ``end``: ``(states, hashes, addresses)`` views."""
        return self.states[start:end], self.hashes[start:end], self.addresses[start:end]

    def runs(self, start: int = 0, end: int | None = None):
        """Runs ``(state, start, count, hashes, addresses)`` as :meth:`ManifestReader.runs`."""
        end = self.n_blocks if end is None else min(end, self.n_blocks)
        yield from _runs_by_window(self.window, max(0, start), end)

    def entry(self, index: int) -> tuple[int, bytes, bytes]:
        """Block ``index``'s ``(state, xxh3-128, address)``."""
        return (int(self.states[index]), self.hashes[index].tobytes(),
                self.addresses[index].tobytes())

    def uniform(self, start: int, end: int) -> int | None:
        return None

    @property
    def address_algorithm(self) -> str:
        return self._address_algorithm

    @address_algorithm.setter
    def address_algorithm(self, name: str) -> None:
        self._address_algorithm = _check_algorithm(name)

    # -- digest -----------------------------------------------------------
    @property
    def digest(self) -> bytes:
        """The version 3 digest: SHA-256 over the table's maximal runs in block order
        (docs/formats.md, "Digest"): one value that changes when any block's content or
        state does, computed in time proportional to the runs and entries (a streaming
        writer computes it as it goes)."""
        self._check_states()
        d = _RunDigest(self.disk_size, self.block_size)
        states, starts, counts, carried, hashes, addresses = self._runs()
        at = 0
        for state, count, carries in zip(states.tolist(), counts.tolist(), carried.tolist()):
            if carries:
                d.add(state, count, hashes[at:at + count], addresses[at:at + count])
                at += count
            else:
                d.add(state, count)
        return d.digest()

    def _digest_v1(self) -> bytes:
        """The digest versions 1 and 2 store: SHA-256 over every block in index order,
        ``SHA-256(domain || disk_size u64le || block_size u32le || record_0 || ... )``
        where ``record_i = state (1 byte) || xxh3-128 (16) || address (32)``."""
        h = hashlib.sha256(DIGEST_DOMAIN)
        h.update(struct.pack("<QI", self.disk_size, self.block_size))
        step = 1 << 16          # blocks per chunk: bounded temporary memory
        for s in range(0, self.n_blocks, step):
            records = np.concatenate(
                [self.states[s:s + step, None], self.hashes[s:s + step],
                 self.addresses[s:s + step]], axis=1)
            h.update(records.tobytes())
        return h.digest()

    # -- copies and equality ---------------------------------------------
    def copy(self) -> "Manifest":
        """A deep copy with its own writable arrays and meta."""
        return Manifest(self.disk_size, self.block_size, states=self.states.copy(),
                        hashes=self.hashes.copy(), addresses=self.addresses.copy(),
                        meta=json.loads(json.dumps(self.meta)),
                        address_algorithm=self.address_algorithm)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return (self.disk_size == other.disk_size and self.block_size == other.block_size
                and self.address_algorithm == other.address_algorithm
                and self.meta == other.meta
                and np.array_equal(self.states, other.states)
                and np.array_equal(self.hashes, other.hashes)
                and np.array_equal(self.addresses, other.addresses))

    __hash__ = None

    def __repr__(self) -> str:
        return (f"<Manifest disk_size={self.disk_size} block_size={self.block_size} "
                f"blocks={self.n_blocks} data={self.count(BlockState.DATA)} "
                f"zero={self.count(BlockState.ZERO)}>")

    # -- binary format ----------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialise to the current binary format (version 2, docs/formats.md)."""
        self._check_states()
        out = io.BytesIO()
        w = ManifestWriter(out, self.disk_size, self.block_size, self.address_algorithm)
        for s in range(0, self.n_blocks, WINDOW_BLOCKS):
            e = min(self.n_blocks, s + WINDOW_BLOCKS)
            w.add_window(self.states[s:e], self.hashes[s:e], self.addresses[s:e])
        w.finish(self.meta)
        return out.getvalue()

    def _to_bytes_v2(self) -> bytes:
        """Serialise to format version 2 (per-block digest).  Kept so tests can write the
        files older releases wrote; nothing in the library writes it."""
        self._check_states()
        return _encode_v2(self.disk_size, self.block_size, self.address_algorithm,
                          self._digest_v1(), *self._runs(), _meta_bytes(self.meta))

    def _to_bytes_v1(self) -> bytes:
        """Serialise to format version 1 (per-block sections).  Kept so tests can write
        the files older releases wrote; nothing in the library writes it."""
        self._check_states()
        meta = _meta_bytes(self.meta)
        header = _HEADER.pack(MAGIC, 1, HEADER_SIZE, self.disk_size, self.block_size,
                              self.n_blocks, self.address_algorithm.encode("ascii"),
                              len(meta), 0, self._digest_v1(), bytes(32))
        parts = [header, self.states.tobytes(), self.hashes.tobytes(),
                 self.addresses.tobytes(), meta]
        h = hashlib.sha256()
        for p in parts:
            h.update(p)
        parts.append(_TRAILER.pack(TRAILER_MAGIC, h.digest()))
        return b"".join(parts)

    def _check_states(self) -> None:
        bad = ~np.isin(self.states, (BlockState.UNALLOCATED, BlockState.ZERO, BlockState.DATA))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UsageError(f"block {i} has invalid state {int(self.states[i])}")

    def _runs(self):
        """The table as v2 runs, in block order: ``(states, starts, counts, carries,
        hashes, addresses)``, the first four one entry per run, ``carries`` true for DATA
        runs and for the (unusual) non-DATA blocks whose hash or address is not all zeros;
        ``hashes`` and ``addresses`` hold the entries of the carrying runs' blocks."""
        n = self.n_blocks
        step = 1 << 20          # blocks per chunk: bounded temporary memory
        keys = np.empty(n, np.uint8)
        for s in range(0, n, step):
            e = min(n, s + step)
            carries = ((self.states[s:e] == BlockState.DATA) | self.hashes[s:e].any(axis=1)
                       | self.addresses[s:e].any(axis=1))
            keys[s:e] = self.states[s:e] * 2 + carries
        starts = np.flatnonzero(np.diff(keys)).astype(np.uint64) + 1
        starts = np.concatenate([np.zeros(min(n, 1), np.uint64), starts])
        counts = np.diff(np.append(starts, np.uint64(n)))
        run_keys = keys[starts.astype(np.intp)]
        carried = (run_keys & 1).astype(bool)
        idx = _expand(starts[carried], counts[carried])
        return (run_keys >> 1, starts, counts, carried, self.hashes[idx], self.addresses[idx])

    @classmethod
    def from_bytes(cls, data, path: str | os.PathLike | None = None) -> "Manifest":
        """Parse a version 1 or 2 file; raise ManifestError (naming ``path`` and the
        offset) on any truncation, bad field or checksum mismatch.  Version 1 arrays view
        ``data`` (writable only when ``data`` is); version 2 arrays are new."""
        view = memoryview(data).cast("B")
        where = path if path is not None else "<manifest>"
        if _peek_version(view, len(view), where) == 1:
            return cls._from_v1(view, where)
        version = _peek_version(view, len(view), where)
        head, frames = _decode_v2(view, where)
        n = head.n_blocks
        try:    # the in-memory table is 49 bytes a block, whatever the file's size
            states = np.zeros(n, np.uint8)
            hashes = np.zeros((n, HASH_SIZE), np.uint8)
            addresses = np.zeros((n, ADDRESS_SIZE), np.uint8)
            for first, count, recs, h, a in frames:
                states[first:first + count] = np.repeat(recs["state"],
                                                        recs["count"].astype(np.intp))
                carried = (recs["flags"] & RECORD_ARRAYS).astype(bool)
                idx = _expand(recs["start"][carried], recs["count"][carried])
                hashes[idx] = h
                addresses[idx] = a
        except MemoryError:
            raise ManifestError(f"{n} blocks do not fit in memory", where, 28) from None
        m = cls(head.disk_size, head.block_size, states=states, hashes=hashes,
                addresses=addresses, meta=head.meta, address_algorithm=head.algorithm)
        if (m.digest if version >= 3 else m._digest_v1()) != head.digest:
            raise ManifestError("digest does not match the blocks", where, head.digest_offset)
        return m

    @classmethod
    def _from_v1(cls, view, where) -> "Manifest":
        size = len(view)

        def fail(message: str, offset: int):
            raise ManifestError(message, where, offset)

        disk_size, block_size, n_blocks, algo_name, meta_len, digest, expected = \
            _check_header(view, size, where)
        end = expected - TRAILER_SIZE
        tmagic, checksum = _TRAILER.unpack_from(view, end)
        if tmagic != TRAILER_MAGIC:
            fail(f"bad trailer magic {tmagic!r}", end)
        if hashlib.sha256(view[:end]).digest() != checksum:
            fail("checksum mismatch: the manifest is corrupt", end + 8)

        pos = HEADER_SIZE
        states = np.frombuffer(view, np.uint8, n_blocks, pos)
        pos += n_blocks
        hashes = np.frombuffer(view, np.uint8, n_blocks * HASH_SIZE, pos).reshape(n_blocks, HASH_SIZE)
        pos += n_blocks * HASH_SIZE
        addresses = np.frombuffer(view, np.uint8, n_blocks * ADDRESS_SIZE, pos).reshape(
            n_blocks, ADDRESS_SIZE)
        pos += n_blocks * ADDRESS_SIZE
        bad = np.flatnonzero(states > BlockState.DATA)
        if len(bad):
            fail(f"block {int(bad[0])} has invalid state {int(states[bad[0]])}",
                 HEADER_SIZE + int(bad[0]))
        meta = _parse_meta(view[pos:pos + meta_len], where, pos)
        m = cls(disk_size, block_size, states=states, hashes=hashes, addresses=addresses,
                meta=meta, address_algorithm=algo_name)
        if m._digest_v1() != digest:
            fail("digest does not match the blocks", 64)
        return m

    # -- files ------------------------------------------------------------
    def save(self, path) -> None:
        """Write atomically: temp file in the same folder, fsync, rename, fsync the folder."""
        replace_file(os.fspath(path), self.to_bytes())

    @classmethod
    def load(cls, path) -> "Manifest":
        """Read and check a manifest file (arrays are writable)."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                # the header (v2: and footer) says how big the file must be: never read
                # a wrong file whole
                head = f.read(HEADER_SIZE)
                if _peek_version(head, size, path) == 1:
                    _check_header(head, size, path)
                else:
                    f.seek(max(0, size - _TAIL_SIZE))
                    _check_v2_sizes(head, f.read(_TAIL_SIZE), size, path)
                f.seek(0)
                buf = bytearray(size)
                got = f.readinto(buf)
        except OSError as e:
            raise ManifestError(f"cannot read: {e.strerror}", path) from None
        if got != size:
            raise ManifestError(f"file shrank while reading ({got} of {size} bytes)", path, got)
        return cls.from_bytes(buf, path)


def _peek_version(head, size: int, where) -> int:
    """The format version of a file of ``size`` bytes starting with ``head`` (1 or 2)."""
    if size < 12 or len(head) < 12:
        raise ManifestError(f"truncated: {size} bytes, a header needs {HEADER_V2_SIZE}",
                            where, min(size, len(head)))
    magic, version = struct.unpack_from("<8sI", head, 0)
    if magic != MAGIC:
        raise ManifestError(f"bad magic {magic!r}, expected {MAGIC!r}: not a smsblock manifest",
                            where, 0)
    if version not in (1, 2, 3):
        raise ManifestError(f"unsupported manifest version {version} (this reader knows 1, "
                            f"2 and 3)", where, 8)
    return version


def _check_header(head, size: int, where) -> tuple:
    """Check the version 1 header in ``head`` (at least its first bytes) against a file of
    ``size`` bytes; return ``(disk_size, block_size, n_blocks, algorithm, meta_length,
    digest, expected_size)`` or raise ManifestError naming ``where`` and the field's offset."""

    def fail(message: str, offset: int):
        raise ManifestError(message, where, offset)

    if size < HEADER_SIZE or len(head) < HEADER_SIZE:
        fail(f"truncated: {size} bytes, a header needs {HEADER_SIZE}", min(size, len(head)))
    (magic, version, header_size, disk_size, block_size, n_blocks, algo, meta_len,
     flags, digest, _reserved) = _HEADER.unpack_from(head, 0)
    if version != 1:
        fail(f"version {version} is not 1", 8)
    if header_size != HEADER_SIZE:
        fail(f"header size {header_size}, expected {HEADER_SIZE}", 12)
    algo_name = _check_shape(disk_size, block_size, n_blocks, algo, fail)
    if flags != 0:
        fail(f"unknown flags {flags:#x}", 60)
    if meta_len > MAX_META_SIZE:
        fail(f"meta length {meta_len} exceeds {MAX_META_SIZE}", 52)
    expected = HEADER_SIZE + n_blocks * (1 + HASH_SIZE + ADDRESS_SIZE) + meta_len + TRAILER_SIZE
    if size < expected:
        fail(f"truncated: {size} bytes, header says {expected}", size)
    if size > expected:
        fail(f"{size - expected} unexpected bytes after the trailer", expected)
    return disk_size, block_size, n_blocks, algo_name, meta_len, digest, expected


def _check_shape(disk_size, block_size, n_blocks, algo, fail) -> str:
    """Checks common to both versions' headers (same offsets); returns the algorithm name."""
    if (block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)):
        fail(f"block size {block_size} is not a power of two from 64 KiB to 4 MiB", 24)
    if n_blocks != blocks_for(disk_size, block_size):
        fail(f"block count {n_blocks} does not cover disk size {disk_size} "
             f"in blocks of {block_size}", 28)
    try:
        algo_name = algo.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        algo_name = ""
    if not algo_name or "\0" in algo_name or not algo_name.isprintable():
        fail(f"bad address algorithm name {algo!r}", 36)
    return algo_name


class _HeadV2:
    """The fixed fields of a version 2 file (header and footer), checked."""

    __slots__ = ("disk_size", "block_size", "n_blocks", "algorithm", "frame_count",
                 "body_length", "meta_length", "digest", "digest_offset", "meta")


def _check_v2_sizes(head, tail, size: int, where) -> _HeadV2:
    """Check a version 2 header (``head``, the file's first bytes) and footer (``tail``,
    its last ``_TAIL_SIZE`` bytes) against a file of ``size`` bytes, before anything is
    read whole or allocated: every count is bounded here."""

    def fail(message: str, offset: int):
        raise ManifestError(message, where, offset)

    least = HEADER_V2_SIZE + _TAIL_SIZE
    if size < least or len(head) < HEADER_V2_SIZE or len(tail) < _TAIL_SIZE:
        fail(f"truncated: {size} bytes, a version 2 manifest needs at least {least}",
             min(size, len(head)))
    (_magic, _version, header_size, disk_size, block_size, n_blocks, algo, flags,
     reserved) = _HEADER_V2.unpack_from(head, 0)
    if header_size != HEADER_V2_SIZE:
        fail(f"header size {header_size}, expected {HEADER_V2_SIZE}", 12)
    algo_name = _check_shape(disk_size, block_size, n_blocks, algo, fail)
    if n_blocks > MAX_BLOCKS:
        fail(f"block count {n_blocks} exceeds {MAX_BLOCKS}", 28)
    if flags != 0:
        fail(f"unknown flags {flags:#x}", 52)
    if reserved != bytes(8):
        fail("reserved header bytes are not zero", 56)
    at = size - _TAIL_SIZE
    fmagic, frame_count, body_length, meta_length, digest = \
        _FOOTER.unpack_from(tail, len(tail) - _TAIL_SIZE)
    if fmagic != FOOTER_MAGIC:
        fail(f"bad footer magic {fmagic!r}: the file is truncated, extended or corrupt", at)
    if frame_count > n_blocks:                    # every frame covers at least one block
        fail(f"frame count {frame_count} exceeds the block count {n_blocks}", at + 8)
    # a record header per block and its hash and address bound a frame's bytes
    most = frame_count * FRAME_HEADER_SIZE + n_blocks * (RECORD_HEADER_SIZE + ENTRY_SIZE)
    if body_length > most or body_length < frame_count * FRAME_HEADER_SIZE:
        fail(f"frames length {body_length} is impossible for {frame_count} frames of "
             f"{n_blocks} blocks", at + 16)
    if meta_length > MAX_META_SIZE:
        fail(f"meta length {meta_length} exceeds {MAX_META_SIZE}", at + 24)
    expected = HEADER_V2_SIZE + body_length + meta_length + _TAIL_SIZE
    if size != expected:
        fail(f"file is {size} bytes, its header and footer say {expected}: truncated or "
             f"extended", min(size, expected))
    h = _HeadV2()
    h.disk_size, h.block_size, h.n_blocks, h.algorithm = disk_size, block_size, n_blocks, algo_name
    h.frame_count, h.body_length, h.meta_length = frame_count, body_length, meta_length
    h.digest, h.digest_offset, h.meta = digest, at + 32, None
    return h


def _decode_v2(view, where):
    """Check a whole version 2 file in ``view`` (sizes, trailer checksum, meta) and return
    ``(head, frames)``: ``frames`` yields, in block order, one decoded frame at a time (at
    most FRAME_RAW_MAX bytes) as ``(first_block, block_count, records, hashes,
    addresses)``: its checked records (a structured array of ``_RECORD``) and the
    hashes (m, 16) and addresses (m, 32) of the blocks of its records that carry them."""
    size = len(view)
    head = _check_v2_sizes(view[:HEADER_V2_SIZE], view[max(0, size - _TAIL_SIZE):], size, where)
    end = size - TRAILER_SIZE
    tmagic, checksum = _TRAILER.unpack_from(view, end)
    if tmagic != TRAILER_MAGIC:
        raise ManifestError(f"bad trailer magic {tmagic!r}", where, end)
    if hashlib.sha256(view[:end]).digest() != checksum:
        raise ManifestError("checksum mismatch: the manifest is corrupt", where, end + 8)
    meta_at = HEADER_V2_SIZE + head.body_length
    head.meta = _parse_meta(view[meta_at:meta_at + head.meta_length], where, meta_at)
    return head, _frames_v2(view, head, where)


def _runs_v2(view, where):
    """A checked version 2 file as runs ``(state, start, count, hashes, addresses)`` in
    block order (hashes and addresses None when the run carries none): what a streaming
    reader does, in memory bounded by one frame whatever the disk size."""
    _head, frames = _decode_v2(view, where)
    for _first, _count, recs, hashes, addresses in frames:
        at = 0
        for state, flags, _r, start, count in recs.tolist():
            if flags & RECORD_ARRAYS:
                yield state, start, count, hashes[at:at + count], addresses[at:at + count]
                at += count
            else:
                yield state, start, count, None, None


def _frame_header(raw, pos: int, block: int, n: int, end: int, where) -> tuple:
    """Check the frame header ``raw`` (32 bytes) found at file offset ``pos``, expected to
    start at ``block`` of ``n``, with the frames ending at ``end``; return ``(stored,
    raw_len, encoding, n_records, first, count)``."""
    def fail(message: str, offset: int):
        raise ManifestError(message, where, offset)

    if end - pos < FRAME_HEADER_SIZE or len(raw) < FRAME_HEADER_SIZE:
        fail(f"frame header truncated: {end - pos} bytes left of the frames", pos)
    stored, raw_len, encoding, reserved, n_records, first, count = _FRAME.unpack_from(raw, 0)
    if reserved != bytes(3):
        fail("reserved frame header bytes are not zero", pos + 9)
    if first != block:
        fail(f"frame starts at block {first}, expected {block}", pos + 16)
    if count < 1 or count > n - first:
        fail(f"frame block count {count} is outside 1..{n - first}", pos + 24)
    if raw_len > FRAME_RAW_MAX:
        fail(f"frame raw length {raw_len} exceeds {FRAME_RAW_MAX}", pos + 4)
    if n_records < 1 or n_records > raw_len // RECORD_HEADER_SIZE:
        fail(f"record count {n_records} is impossible in {raw_len} bytes", pos + 12)
    if stored > end - pos - FRAME_HEADER_SIZE:
        fail(f"frame length {stored} runs past the frames", pos)
    if encoding == FRAME_STORED:
        if stored != raw_len:
            fail(f"stored frame length {stored} is not its raw length {raw_len}", pos)
    elif encoding != FRAME_ZSTD:
        fail(f"unknown frame encoding {encoding}", pos + 8)
    return stored, raw_len, encoding, n_records, first, count


def _frame_payload(dctx, payload, fields: tuple, where, pos: int):
    """Decode one checked frame's ``payload``: ``(records, hashes, addresses)``."""
    stored, raw_len, encoding, n_records, first, count = fields
    raw = payload if encoding == FRAME_STORED else _unzstd(dctx, payload, raw_len, where, pos)
    return _records(raw, n_records, first, count, where, pos)


def _frames_v2(view, head: _HeadV2, where):
    n = head.n_blocks
    pos, end = HEADER_V2_SIZE, HEADER_V2_SIZE + head.body_length
    block = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    for _ in range(head.frame_count):
        fields = _frame_header(view[pos:pos + FRAME_HEADER_SIZE], pos, block, n, end, where)
        stored, first, count = fields[0], fields[4], fields[5]
        payload = view[pos + FRAME_HEADER_SIZE:pos + FRAME_HEADER_SIZE + stored]
        yield (first, count, *_frame_payload(dctx, payload, fields, where, pos))
        block = first + count
        pos += FRAME_HEADER_SIZE + stored
    if pos != end:
        raise ManifestError(f"{end - pos} bytes after the last frame", where, pos)
    if block != n:
        raise ManifestError(f"the frames cover {block} of {n} blocks", where, pos)


def _unzstd(dctx, payload, raw_len: int, where, pos: int) -> bytes:
    """One zstd frame that decodes to exactly ``raw_len`` bytes and fills ``payload``."""
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
        if declared != raw_len:        # the decoder allocates what the frame declares
            raise ManifestError(f"zstd frame declares {declared} bytes, the frame header "
                                f"{raw_len}", where, pos)
        obj = dctx.decompressobj()
        raw = obj.decompress(payload)
        ok = obj.eof and not obj.unused_data and len(raw) == raw_len
    except zstandard.ZstdError as e:
        raise ManifestError(f"frame does not decompress: {e}", where, pos) from None
    if not ok:
        raise ManifestError("frame is not exactly one zstd frame of its raw length", where, pos)
    return raw


def _records(raw, k: int, first: int, count: int, where, pos: int):
    """Check the ``k`` records of one decoded frame (``pos``: the frame's offset, for
    errors) covering blocks ``first`` .. ``first + count``; return ``(records, hashes,
    addresses)``."""

    def fail(message: str, i: int):
        raise ManifestError(f"record {i} of the frame: {message}", where, pos)

    def first_bad(mask) -> int:
        return int(np.flatnonzero(mask)[0])

    recs = np.frombuffer(raw, _RECORD, k)
    states, flags, counts = recs["state"], recs["flags"], recs["count"]
    if (bad := states > BlockState.DATA).any():
        fail(f"invalid state {states[first_bad(bad)]}", first_bad(bad))
    if (bad := (flags & np.uint8(0xFF ^ RECORD_ARRAYS)) != 0).any() or (bad := recs["reserved"].any(axis=1)).any():
        fail("unknown flags or reserved bytes not zero", first_bad(bad))
    if (bad := (states == BlockState.DATA) & ~(flags & RECORD_ARRAYS).astype(bool)).any():
        fail("DATA record without hashes and addresses", first_bad(bad))
    if (bad := (counts < 1) | (counts > count)).any():
        fail(f"block count {counts[first_bad(bad)]} is outside 1..{count}", first_bad(bad))
    ends = np.cumsum(counts, dtype=np.uint64) + np.uint64(first)     # < 2**57: no overflow
    if (bad := recs["start"] != ends - counts).any():
        i = first_bad(bad)
        fail(f"starts at block {recs['start'][i]}, expected {int(ends[i] - counts[i])}", i)
    if int(ends[-1]) != first + count:
        fail(f"the records cover {int(ends[-1]) - first} of the frame's {count} blocks", k - 1)
    m = int(counts[(flags & RECORD_ARRAYS).astype(bool)].sum(dtype=np.uint64))
    if k * RECORD_HEADER_SIZE + m * ENTRY_SIZE != len(raw):
        fail(f"{k} records carrying {m} entries do not fill the frame's {len(raw)} bytes", k - 1)
    at = k * RECORD_HEADER_SIZE
    hashes = np.frombuffer(raw, np.uint8, m * HASH_SIZE, at).reshape(m, HASH_SIZE)
    addresses = np.frombuffer(raw, np.uint8, m * ADDRESS_SIZE, at + m * HASH_SIZE).reshape(
        m, ADDRESS_SIZE)
    return recs, hashes, addresses


def _expand(starts, counts) -> np.ndarray:
    """The block indices of runs ``(starts[i], counts[i])``, concatenated (intp)."""
    counts = np.asarray(counts, np.intp)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.intp)
    base = np.asarray(starts, np.intp) - (np.cumsum(counts) - counts)
    return np.repeat(base, counts) + np.arange(total, dtype=np.intp)


def _encode_v2(disk_size: int, block_size: int, algorithm: str, digest: bytes, states,
               starts, counts, carries, hashes, addresses, meta: bytes) -> bytes:
    """Version 2 bytes from a sparse description of the table: runs ``i`` of ``counts[i]``
    blocks in ``states[i]`` from block ``starts[i]``, in block order and covering every
    block; ``carries[i]`` true when the run's blocks have hashes and addresses (always for
    DATA), whose entries ``hashes`` (m, 16) and ``addresses`` (m, 32) hold in block order.
    Memory beyond the input and output: a 24-byte record per run and one frame;
    ``digest`` is written as given (the caller's, over every block: docs/formats.md)."""
    n = blocks_for(disk_size, block_size)
    states = np.asarray(states, np.uint8)
    starts = np.asarray(starts, np.uint64)
    counts = np.asarray(counts, np.uint64)
    carries = np.asarray(carries, bool)
    hashes = np.ascontiguousarray(hashes, np.uint8).reshape(-1, HASH_SIZE)
    addresses = np.ascontiguousarray(addresses, np.uint8).reshape(-1, ADDRESS_SIZE)
    if not (len(states) == len(starts) == len(counts) == len(carries)):
        raise UsageError("runs: states, starts, counts and carries differ in length")
    ends = np.cumsum(counts, dtype=np.uint64)
    if ((counts < 1).any() or (states > BlockState.DATA).any()
            or (starts != ends - counts).any() or int(ends[-1] if len(ends) else 0) != n
            or (~carries & (states == BlockState.DATA)).any()):
        raise UsageError(f"runs do not cover the {n} blocks in order with valid states")
    if len(hashes) != len(addresses) or len(hashes) != int(counts[carries].sum()):
        raise UsageError("hashes and addresses do not match the carrying runs' blocks")
    # cut carrying runs so that each fits in one frame
    most = (FRAME_RAW_MAX - RECORD_HEADER_SIZE) // ENTRY_SIZE
    pieces = np.where(carries, (counts + np.uint64(most - 1)) // np.uint64(most), 1).astype(np.intp)
    if (pieces > 1).any():
        first_piece = np.cumsum(pieces) - pieces
        k = np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)   # piece number
        states, carries = np.repeat(states, pieces), np.repeat(carries, pieces)
        starts_r, counts_r = np.repeat(starts, pieces), np.repeat(counts, pieces)
        starts = starts_r + np.uint64(most) * k.astype(np.uint64)
        # only carrying runs are cut: a range of any length is one record
        counts = np.where(carries, np.minimum(counts_r - np.uint64(most) * k.astype(np.uint64),
                                              np.uint64(most)), counts_r)
    recs = np.zeros(len(states), _RECORD)
    recs["state"], recs["flags"] = states, carries * RECORD_ARRAYS
    recs["start"], recs["count"] = starts, counts
    sizes = RECORD_HEADER_SIZE + ENTRY_SIZE * np.where(carries, counts, 0).astype(np.int64)
    cum = np.cumsum(sizes)
    entries = np.cumsum(np.where(carries, counts, 0).astype(np.int64))   # entries up to run i

    out = [_HEADER_V2.pack(MAGIC, 2, HEADER_V2_SIZE, disk_size, block_size, n,
                           algorithm.encode("ascii"), 0, bytes(8))]
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    i, base, frames = 0, 0, 0
    while i < len(recs):
        j = int(np.searchsorted(cum, base + FRAME_RAW_MAX, side="right"))   # > i: all fit
        e0 = int(entries[i - 1]) if i else 0
        e1 = int(entries[j - 1])
        raw = b"".join([recs[i:j].tobytes(), hashes[e0:e1].tobytes(), addresses[e0:e1].tobytes()])
        packed = cctx.compress(raw)
        # compress only where that helps (hashes and addresses are random bytes)
        encoding, body = (FRAME_ZSTD, packed) if len(packed) < len(raw) else (FRAME_STORED, raw)
        first = int(starts[i])
        out.append(_FRAME.pack(len(body), len(raw), encoding, bytes(3), j - i, first,
                               int(starts[j - 1] + counts[j - 1]) - first))
        out.append(body)
        frames += 1
        base = int(cum[j - 1])
        i = j
    body_length = sum(len(p) for p in out) - HEADER_V2_SIZE
    out.append(meta)
    out.append(_FOOTER.pack(FOOTER_MAGIC, frames, body_length, len(meta), digest))
    h = hashlib.sha256()
    for p in out:
        h.update(p)
    out.append(_TRAILER.pack(TRAILER_MAGIC, h.digest()))
    return b"".join(out)


def _meta_bytes(meta: dict) -> bytes:
    raw = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > MAX_META_SIZE:
        raise UsageError(f"manifest meta is {len(raw)} bytes, more than {MAX_META_SIZE}")
    return raw


def _parse_meta(raw, where, offset: int) -> dict:
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"meta is not valid JSON: {e}", where, offset) from None
    if not isinstance(meta, dict):
        raise ManifestError("meta is not a JSON object", where, offset)
    return meta


def _array(value, shape: tuple, name: str) -> np.ndarray:
    if value is None:
        return np.zeros(shape, np.uint8)
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        raise UsageError(f"manifest {name} must be uint8, not {arr.dtype}")
    if arr.shape != shape:
        raise UsageError(f"manifest {name} has shape {arr.shape}, expected {shape}")
    return arr


def diff(old: Manifest, new: Manifest) -> np.ndarray:
    """Indices (int64, ascending) of the blocks that differ between two manifests.

    A block differs when its state changed, or both are DATA and their xxh3-128 hashes
    differ.  When the disk sizes differ, every block beyond the shorter disk's blocks
    counts as changed.  Different block sizes cannot be compared: UsageError.
    """
    if old.block_size != new.block_size:
        raise UsageError(f"cannot diff manifests with block sizes {old.block_size} "
                         f"and {new.block_size}")
    n = min(old.n_blocks, new.n_blocks)
    os_, ns = old.states[:n], new.states[:n]
    changed = os_ != ns
    both_data = (os_ == BlockState.DATA) & (ns == BlockState.DATA)
    changed |= both_data & (old.hashes[:n] != new.hashes[:n]).any(axis=1)
    idx = np.flatnonzero(changed).astype(np.int64)
    if old.n_blocks != new.n_blocks:
        idx = np.concatenate([idx, np.arange(n, max(old.n_blocks, new.n_blocks), dtype=np.int64)])
    return idx


# --- streaming: version 3 digest, writer, reader, windowed diff ---------------------------

class _RunDigest:
    """The version 3 digest, fed runs in block order (docs/formats.md, "Digest"):
    ``SHA-256(domain || disk_size u64le || block_size u32le || R_0 || R_1 || ...)`` where
    ``R`` is one maximal run of blocks of equal state and equal "carries entries": the
    entries (xxh3-128 || address, 48 bytes) of its blocks when it carries them, then
    ``state u8 || carries u8 || count u64le``.  Runs may be fed in pieces: equal
    neighbours merge, so every split of one table gives one digest."""

    _TAIL = struct.Struct("<BBQ")

    def __init__(self, disk_size: int, block_size: int):
        self._h = hashlib.sha256(DIGEST_DOMAIN_V3)
        self._h.update(struct.pack("<QI", disk_size, block_size))
        self._key = None
        self._count = 0

    def add(self, state: int, count: int, hashes=None, addresses=None) -> None:
        key = (int(state), hashes is not None)
        if key != self._key:
            self._close()
            self._key = key
        self._count += int(count)
        if hashes is not None and count:
            self._h.update(np.concatenate([hashes, addresses], axis=1).tobytes())

    def add_runs(self, states, counts, carries, entries) -> None:
        """Many runs at once (what :meth:`add` does for each, vectorised): ``states``,
        ``counts``, ``carries`` one per run; ``entries`` (m, 48) the hash || address rows
        of the carrying runs' blocks, in order."""
        states = np.asarray(states, np.uint8)
        counts = np.asarray(counts, np.uint64)
        carries = np.asarray(carries, bool)
        k = len(states)
        if k == 0:
            return
        keys = states.astype(np.int64) * 2 + carries
        # merge neighbours of one key (equal keys are one maximal run)
        starts = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1])
        keys, counts = keys[starts], np.add.reduceat(counts, starts)
        first = (int(keys[0]) >> 1, bool(keys[0] & 1))
        if first != self._key:
            self._close()
            self._key, self._count = first, 0
        if len(keys) == 1:
            self._count += int(counts[0])
            if len(entries):
                self._h.update(np.ascontiguousarray(entries).tobytes())
            return
        counts = counts.copy()
        counts[0] += np.uint64(self._count)
        # the byte stream: each run's entries then its tail, the last run's tail withheld
        ent = np.where(keys & 1, counts, 0).astype(np.int64)
        ent[0] -= self._count if self._key[1] else 0     # the open run's entries went already
        tails = np.zeros(len(keys) - 1, self._TAIL_DTYPE)
        tails["state"], tails["carries"] = keys[:-1] >> 1, keys[:-1] & 1
        tails["count"] = counts[:-1]
        tail_at = np.cumsum(ent[:-1] * ENTRY_SIZE) + np.arange(len(keys) - 1) * self._TAIL.size
        total = int(ent.sum()) * ENTRY_SIZE + (len(keys) - 1) * self._TAIL.size
        out = np.empty(total, np.uint8)
        mask = np.zeros(total, bool)
        idx = (tail_at[:, None] + np.arange(self._TAIL.size)).reshape(-1)
        mask[idx] = True
        out[idx] = tails.view(np.uint8)
        out[~mask] = np.ascontiguousarray(entries, np.uint8).reshape(-1)
        self._h.update(out.tobytes())
        self._key = (int(keys[-1]) >> 1, bool(keys[-1] & 1))
        self._count = int(counts[-1])

    _TAIL_DTYPE = np.dtype([("state", "u1"), ("carries", "u1"), ("count", "<u8")])

    def _close(self) -> None:
        if self._key is not None and self._count:
            self._h.update(self._TAIL.pack(self._key[0], self._key[1], self._count))
        self._key, self._count = None, 0

    def digest(self) -> bytes:
        self._close()
        return self._h.digest()


def _runs_by_window(window, start: int, end: int):
    """Runs ``(state, start, count, hashes, addresses)`` of blocks [start, end) of a table
    read ``window(s, e)`` a window at a time (hashes/addresses only for runs that carry them)."""
    for s in range(start, end, WINDOW_BLOCKS):
        states, hashes, addresses = window(s, min(end, s + WINDOW_BLOCKS))
        for state, a, count, carries in zip(*_window_runs(states, hashes, addresses)):
            if carries:
                yield state, s + a, count, hashes[a:a + count], addresses[a:a + count]
            else:
                yield state, s + a, count, None, None


def _window_runs(states, hashes, addresses):
    """Runs of a window of per-block arrays: ``(state, start, count, carries)`` lists
    (``start`` relative to the window), a run carrying entries when it is DATA or any of
    its blocks has a non-zero hash or address (what version 2 and 3 files keep)."""
    st, starts, counts, carries = _window_run_arrays(states, hashes, addresses)
    return st.tolist(), starts.tolist(), counts.tolist(), carries.tolist()


def _window_run_arrays(states, hashes, addresses):
    """:func:`_window_runs` as numpy arrays (uint8, int64, int64, bool)."""
    n = len(states)
    if n == 0:
        return (np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64),
                np.zeros(0, bool))
    carries = states == BlockState.DATA
    if hashes is not None:
        carries = carries | hashes.any(axis=1)
    if addresses is not None:
        carries = carries | addresses.any(axis=1)
    keys = states.astype(np.uint8) * np.uint8(2) + carries
    starts = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1]).astype(np.int64)
    counts = np.diff(np.append(starts, n))
    run_keys = keys[starts]
    return run_keys >> 1, starts, counts, (run_keys & 1).astype(bool)


class ManifestWriter:
    """Write a version 3 manifest in one pass, a run or a window of blocks at a time.

    ``file`` is a binary file object open for writing (positioned at its start), or a
    path: a new private file (``O_EXCL | O_NOFOLLOW``, 0600).  Blocks are added in order
    with :meth:`add_run` and :meth:`add_window`; :meth:`finish` writes meta, footer and
    trailer.  Memory: one frame (at most 1 MiB decoded) whatever the disk size; the
    digest and the trailer checksum are computed as the bytes go out.  ``counts[state]``
    counts the blocks added in each state.
    """

    def __init__(self, file, disk_size: int, block_size: int, algorithm: str = "none"):
        if not isinstance(disk_size, (int, np.integer)) or disk_size < 0:
            raise UsageError(f"disk size {disk_size!r} is not a non-negative integer")
        self.disk_size = int(disk_size)
        self.block_size = check_block_size(block_size)
        self.n_blocks = blocks_for(self.disk_size, self.block_size)
        if self.n_blocks > MAX_BLOCKS:
            raise UsageError(f"{self.n_blocks} blocks exceed the format's {MAX_BLOCKS}")
        self.algorithm = _check_algorithm(algorithm)
        self.next_block = 0
        self.counts = [0, 0, 0]
        self.size = 0
        self.digest: bytes | None = None
        self._own = not hasattr(file, "write")
        if self._own:
            from .fsutil import create_file
            self.path = os.fspath(file)
            self._file = os.fdopen(create_file(self.path), "wb")
        else:
            self.path, self._file = None, file
        self._sha = hashlib.sha256()
        self._digest = _RunDigest(self.disk_size, self.block_size)
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        # the pending frame's records: [state, carries, start, count] rows and, from
        # add_window, record arrays (one per window: no Python object per run)
        self._recs: list = []
        self._hashes: list[np.ndarray] = []
        self._addresses: list[np.ndarray] = []
        self._raw = 0                           # decoded bytes of the pending frame
        self._frames = 0
        self._write(_HEADER_V2.pack(MAGIC, VERSION, HEADER_V2_SIZE, self.disk_size,
                                    self.block_size, self.n_blocks, algorithm.encode("ascii"),
                                    0, bytes(8)))

    def _write(self, data) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def add_run(self, state: int, count: int, hashes=None, addresses=None, *,
                _digest: bool = True) -> None:
        """``count`` blocks in ``state``; ``hashes`` (count, 16) and ``addresses`` (count,
        32) give their entries (required for DATA, None for blocks without any)."""
        state, count = int(state), int(count)
        if state not in (BlockState.UNALLOCATED, BlockState.ZERO, BlockState.DATA):
            raise UsageError(f"block {self.next_block} has invalid state {state}")
        if count < 0 or count > self.n_blocks - self.next_block:
            raise UsageError(f"a run of {count} blocks at block {self.next_block} is outside "
                             f"the {self.n_blocks} blocks")
        carries = hashes is not None or addresses is not None
        if state == BlockState.DATA and not carries:
            raise UsageError(f"DATA run at block {self.next_block} without hashes and addresses")
        if carries:
            hashes = np.zeros((count, HASH_SIZE), np.uint8) if hashes is None else hashes
            addresses = np.zeros((count, ADDRESS_SIZE), np.uint8) if addresses is None else addresses
            if hashes.shape != (count, HASH_SIZE) or addresses.shape != (count, ADDRESS_SIZE):
                raise UsageError(f"entries of shapes {hashes.shape} and {addresses.shape} for "
                                 f"a run of {count} blocks")
        if count == 0:
            return
        if _digest:
            self._digest.add(state, count, hashes if carries else None, addresses)
        self.counts[state] += count
        if not carries:
            if self._last_is(state, False):
                self._grow_last(count)
            else:
                if self._raw + RECORD_HEADER_SIZE > FRAME_RAW_MAX:
                    self._flush()
                self._add_row(state, False, count)
            self.next_block += count
            return
        done = 0
        while done < count:
            extend = self._last_is(state, True)
            room = (FRAME_RAW_MAX - self._raw - (0 if extend else RECORD_HEADER_SIZE)) // ENTRY_SIZE
            if room < 1:
                self._flush()
                continue
            take = min(room, count - done)
            if extend:
                self._grow_last(take)
            else:
                self._add_row(state, True, take)
            self._hashes.append(hashes[done:done + take])
            self._addresses.append(addresses[done:done + take])
            self._raw += take * ENTRY_SIZE
            self.next_block += take
            done += take

    def _last_is(self, state: int, carries: bool) -> bool:
        """Whether the pending frame's last record is a run of ``state``/``carries`` (a
        run continuing it extends it)."""
        if not self._recs:
            return False
        last = self._recs[-1]
        if isinstance(last, list):
            return last[0] == state and last[1] == carries
        return int(last["state"][-1]) == state and bool(last["flags"][-1] & RECORD_ARRAYS) == carries

    def _grow_last(self, count: int) -> None:
        last = self._recs[-1]
        if isinstance(last, list):
            last[3] += count
        else:
            last["count"][-1] += count

    def _add_row(self, state: int, carries: bool, count: int) -> None:
        self._recs.append([state, carries, self.next_block, count])
        self._raw += RECORD_HEADER_SIZE

    def add_window(self, states, hashes=None, addresses=None) -> None:
        """The next ``len(states)`` blocks as per-block arrays (shapes (n,), (n, 16),
        (n, 32); hashes and addresses None when all zero)."""
        states = np.asarray(states, np.uint8)
        n = len(states)
        if n > self.n_blocks - self.next_block:
            raise UsageError(f"a window of {n} blocks at block {self.next_block} is outside "
                             f"the {self.n_blocks} blocks")
        if not n:
            return
        if not (states != states[0]).any():
            # one state (a scan's windows mostly are): one run, no run detection
            state = int(states[0])
            if state == BlockState.DATA:
                self.add_run(state, n,
                             hashes if hashes is not None else np.zeros((n, HASH_SIZE), np.uint8),
                             addresses if addresses is not None
                             else np.zeros((n, ADDRESS_SIZE), np.uint8))
                return
            if not ((hashes is not None and hashes.any())
                    or (addresses is not None and addresses.any())):
                self.add_run(state, n)
                return
        if hashes is None:
            hashes = np.zeros((n, HASH_SIZE), np.uint8)
        if addresses is None:
            addresses = np.zeros((n, ADDRESS_SIZE), np.uint8)
        if len(hashes) != n or len(addresses) != n:
            raise UsageError(f"a window of {n} blocks with {len(hashes)} hashes and "
                             f"{len(addresses)} addresses")
        st, starts, counts, carries = _window_run_arrays(states, hashes, addresses)
        if len(st) and (st.max() > BlockState.DATA or (~carries & (st == BlockState.DATA)).any()):
            raise UsageError(f"a window at block {self.next_block} has an invalid state")
        # the digest of the whole window at once (vectorised), then the frames
        carried = np.repeat(carries, counts)
        self._digest.add_runs(st, counts, carries,
                              np.concatenate([hashes[carried], addresses[carried]], axis=1))
        if len(st) and self._last_is(int(st[0]), bool(carries[0])):
            # the first run continues the frame's last record: that one merges by itself
            a, c, carry = int(starts[0]), int(counts[0]), bool(carries[0])
            self.add_run(int(st[0]), c, *((hashes[a:a + c], addresses[a:a + c])
                                          if carry else ()), _digest=False)
            st, starts, counts, carries = st[1:], starts[1:], counts[1:], carries[1:]
            if not len(st):
                return
            n_carried = int(np.count_nonzero(carried)) - (c if carry else 0)
            first = a + c
        else:
            n_carried, first = int(np.count_nonzero(carried)), 0
        need = len(st) * RECORD_HEADER_SIZE + n_carried * ENTRY_SIZE
        if self._raw + need > FRAME_RAW_MAX:
            # frames fill up inside the window: run by run, splitting where a frame is full
            for state, start, count, carry in zip(st.tolist(), starts.tolist(),
                                                  counts.tolist(), carries.tolist()):
                if carry:
                    self.add_run(state, count, hashes[start:start + count],
                                 addresses[start:start + count], _digest=False)
                else:
                    self.add_run(state, count, _digest=False)
            return
        # the whole rest of the window fits the pending frame: one record array
        recs = np.zeros(len(st), _RECORD)
        recs["state"], recs["flags"] = st, carries.astype(np.uint8) * RECORD_ARRAYS
        recs["start"], recs["count"] = starts + self.next_block - first, counts
        self._recs.append(recs)
        if n_carried:
            rest = carried[first:]
            self._hashes.append(hashes[first:][rest])
            self._addresses.append(addresses[first:][rest])
        for state, total in enumerate(np.bincount(st, weights=counts, minlength=3).tolist()):
            self.counts[state] += int(total)
        self._raw += need
        self.next_block += n - first

    def _flush(self) -> None:
        if not self._recs:
            return
        parts, rows = [], []
        for item in self._recs + [None]:
            if isinstance(item, list):
                rows.append(item)
                continue
            if rows:
                recs = np.zeros(len(rows), _RECORD)
                cols = list(zip(*rows))
                recs["state"], recs["flags"] = cols[0], np.asarray(cols[1], np.uint8) * RECORD_ARRAYS
                recs["start"], recs["count"] = cols[2], cols[3]
                parts.append(recs)
                rows = []
            if item is not None:
                parts.append(item)
        recs = np.concatenate(parts) if len(parts) > 1 else parts[0]
        raw = b"".join([recs.tobytes(), *(np.ascontiguousarray(h).tobytes() for h in self._hashes),
                        *(np.ascontiguousarray(a).tobytes() for a in self._addresses)])
        packed = self._cctx.compress(raw)
        # compress only where that helps (hashes and addresses are random bytes)
        encoding, body = (FRAME_ZSTD, packed) if len(packed) < len(raw) else (FRAME_STORED, raw)
        first = int(recs["start"][0])
        self._write(_FRAME.pack(len(body), len(raw), encoding, bytes(3), len(recs), first,
                                self.next_block - first))
        self._write(body)
        self._frames += 1
        self._recs, self._hashes, self._addresses, self._raw = [], [], [], 0

    def finish(self, meta: dict | None = None) -> bytes:
        """Write the rest (every block must have been added); return the digest.  A
        writer on a path fsyncs and closes its file."""
        if self.next_block != self.n_blocks:
            raise UsageError(f"the manifest has {self.next_block} of its {self.n_blocks} blocks")
        self._flush()
        body_length = self.size - HEADER_V2_SIZE
        raw_meta = _meta_bytes(meta or {})
        self.digest = self._digest.digest()
        self._write(raw_meta)
        self._write(_FOOTER.pack(FOOTER_MAGIC, self._frames, body_length, len(raw_meta),
                                 self.digest))
        self._write(_TRAILER.pack(TRAILER_MAGIC, self._sha.digest()))
        if self._own:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self.digest

    def abort(self) -> None:
        """Close and remove a file the writer created (a failed run)."""
        if self._own and not self._file.closed:
            self._file.close()
        if self._own:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class ManifestReader:
    """A manifest file (any version) read in windows, never whole.

    ``source`` is a path, the file's bytes, or an open file descriptor (which the reader
    then owns and closes).  Opening checks the whole file in one
    sequential pass in bounded memory (sizes, trailer checksum, every frame, the digest)
    and keeps a table of its frames (24 bytes a frame); then :meth:`runs`,
    :meth:`window` and :meth:`entry` decode only the frames they need (a few decoded
    frames are cached: sequential and nearby reads decode each once).  Thread-safe.

    It has the read side of :class:`Manifest`: ``disk_size``, ``block_size``,
    ``n_blocks``, ``meta``, ``address_algorithm``, ``digest`` (the file's), ``version``,
    :meth:`count`, :meth:`block_range`; :meth:`to_manifest` loads it whole.
    """

    CACHED_FRAMES = 4

    def __init__(self, source, where=None):
        self._fd = None
        if isinstance(source, int) and not isinstance(source, bool):   # an open fd: ours now
            self._fd = source
            self.where = f"<fd {source}>" if where is None else where
            try:
                self._size = os.fstat(self._fd).st_size
            except OSError as e:
                self.close()
                raise ManifestError(f"cannot read: {e.strerror}", self.where) from None
            self._view = None
        elif isinstance(source, (str, os.PathLike)):
            self.where = os.fspath(source) if where is None else where
            try:
                self._fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                self._size = os.fstat(self._fd).st_size
            except OSError as e:
                self.close()
                raise ManifestError(f"cannot read: {e.strerror}", self.where) from None
            self._view = None
        else:
            self.where = "<manifest>" if where is None else where
            self._view = memoryview(source).cast("B")
            self._size = len(self._view)
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- file access ----------------------------------------------------------
    def _read(self, offset: int, n: int):
        if self._view is not None:
            return self._view[offset:offset + n]
        parts, got = [], 0
        while got < n:
            try:
                chunk = os.pread(self._fd, n - got, offset + got)
            except OSError as e:
                raise ManifestError(f"cannot read: {e.strerror}", self.where, offset + got) from None
            if not chunk:
                raise ManifestError(f"file shrank while reading ({offset + got} of "
                                    f"{self._size} bytes)", self.where, offset + got)
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- opening: one checked pass ----------------------------------------------
    def _open(self) -> None:
        where, size = self.where, self._size
        head = self._read(0, min(size, HEADER_SIZE))
        self.version = _peek_version(head, size, where)
        if self.version == 1:
            (self.disk_size, self.block_size, self.n_blocks, self.address_algorithm,
             meta_len, digest, _expected) = _check_header(head, size, where)
            meta_at = HEADER_SIZE + self.n_blocks * (1 + HASH_SIZE + ADDRESS_SIZE)
            self._v1_at = (HEADER_SIZE, HEADER_SIZE + self.n_blocks,
                           HEADER_SIZE + self.n_blocks * (1 + HASH_SIZE))
            digest_offset = 64
        else:
            h = _check_v2_sizes(head[:HEADER_V2_SIZE], self._read(max(0, size - _TAIL_SIZE),
                                                                 _TAIL_SIZE), size, where)
            self.disk_size, self.block_size, self.n_blocks = h.disk_size, h.block_size, h.n_blocks
            self.address_algorithm, meta_len, digest = h.algorithm, h.meta_length, h.digest
            self._head = h
            meta_at = HEADER_V2_SIZE + h.body_length
            digest_offset = h.digest_offset
        # the trailer checksum, read in pieces
        end = size - TRAILER_SIZE
        tmagic, checksum = _TRAILER.unpack(self._read(end, TRAILER_SIZE))
        if tmagic != TRAILER_MAGIC:
            raise ManifestError(f"bad trailer magic {tmagic!r}", where, end)
        sha = hashlib.sha256()
        step = 4 << 20
        for at in range(0, end, step):
            sha.update(self._read(at, min(step, end - at)))
        if sha.digest() != checksum:
            raise ManifestError("checksum mismatch: the manifest is corrupt", where, end + 8)
        self.meta = _parse_meta(self._read(meta_at, meta_len), where, meta_at)
        self.digest = digest
        self._counts = [0, 0, 0]
        if self.version == 1:
            self._open_v1(digest_offset)
        else:
            self._open_frames(digest_offset)

    def _open_frames(self, digest_offset: int) -> None:
        h, where = self._head, self.where
        n = self.n_blocks
        pos, end = HEADER_V2_SIZE, HEADER_V2_SIZE + h.body_length
        block = 0
        self._positions, self._fields, self._firsts = [], [], []   # a few words a frame
        d = (_RunDigest(self.disk_size, self.block_size) if self.version >= 3
             else hashlib.sha256(DIGEST_DOMAIN))
        if self.version < 3:
            d.update(struct.pack("<QI", self.disk_size, self.block_size))
        for i in range(h.frame_count):
            fields = _frame_header(self._read(pos, min(FRAME_HEADER_SIZE, end - pos)), pos, block,
                                   n, end, where)
            self._positions.append(pos)
            self._fields.append(fields)
            self._firsts.append(fields[4])
            if self.version >= 3:       # a frame's records at once (vectorised)
                recs, hashes, addresses, _base = self._frame(i)
                self._counts = [c + int(k) for c, k in zip(self._counts, np.bincount(
                    recs["state"], weights=recs["count"].astype(np.float64), minlength=3))]
                d.add_runs(recs["state"], recs["count"], (recs["flags"] & RECORD_ARRAYS) != 0,
                           np.concatenate([hashes, addresses], axis=1))
            else:
                for state, _start, count, hashes, addresses in self._frame_runs(i):
                    self._counts[state] += count
                    _feed_v1(d, state, count, hashes, addresses)
            block = fields[4] + fields[5]
            pos += FRAME_HEADER_SIZE + fields[0]
        if pos != end:
            raise ManifestError(f"{end - pos} bytes after the last frame", where, pos)
        if block != n:
            raise ManifestError(f"the frames cover {block} of {n} blocks", where, pos)
        if d.digest() != self.digest:
            raise ManifestError("digest does not match the blocks", where, digest_offset)

    def _open_v1(self, digest_offset: int) -> None:
        d = hashlib.sha256(DIGEST_DOMAIN)
        d.update(struct.pack("<QI", self.disk_size, self.block_size))
        for s in range(0, self.n_blocks, WINDOW_BLOCKS):
            e = min(self.n_blocks, s + WINDOW_BLOCKS)
            states, hashes, addresses = self._window_v1(s, e)
            bad = np.flatnonzero(states > BlockState.DATA)
            if len(bad):
                raise ManifestError(f"block {s + int(bad[0])} has invalid state "
                                    f"{int(states[bad[0]])}", self.where,
                                    HEADER_SIZE + s + int(bad[0]))
            self._counts = [c + int(k) for c, k in
                            zip(self._counts, np.bincount(states, minlength=3))]
            d.update(np.concatenate([states[:, None], hashes, addresses], axis=1).tobytes())
        if d.digest() != self.digest:
            raise ManifestError("digest does not match the blocks", self.where, digest_offset)

    # -- frames ---------------------------------------------------------------------
    def _frame(self, i: int):
        """Frame ``i`` decoded: ``(records, hashes, addresses, entry_base)``, cached."""
        with self._lock:
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                return hit
        pos = self._positions[i]
        fields = self._fields[i]
        payload = self._read(pos + FRAME_HEADER_SIZE, fields[0])
        recs, hashes, addresses = _frame_payload(self._dctx_for_thread(), payload, fields,
                                                 self.where, pos)
        carried = np.where(recs["flags"] & RECORD_ARRAYS, recs["count"], 0).astype(np.int64)
        base = np.cumsum(carried) - carried
        item = (recs, hashes, addresses, base)
        with self._lock:
            self._cache[i] = item
            while len(self._cache) > self.CACHED_FRAMES:
                self._cache.popitem(last=False)
        return item

    def _dctx_for_thread(self):
        # a ZstdDecompressor is not safe to share between threads
        local = self.__dict__.setdefault("_local", threading.local())
        d = getattr(local, "d", None)
        if d is None:
            d = local.d = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        return d

    def _frame_runs(self, i: int, start: int = 0, end: int | None = None):
        recs, hashes, addresses, base = self._frame(i)
        rec_starts = recs["start"]
        lo = max(0, int(np.searchsorted(rec_starts, start, side="right")) - 1)
        hi = len(recs) if end is None else int(np.searchsorted(rec_starts, end, side="left"))
        states = recs["state"][lo:hi].tolist()
        flags = recs["flags"][lo:hi].tolist()
        starts = rec_starts[lo:hi].tolist()
        counts = recs["count"][lo:hi].tolist()
        bases = base[lo:hi].tolist()
        for state, flag, rs, rc, rb in zip(states, flags, starts, counts, bases):
            a, b = max(rs, start), rs + rc if end is None else min(rs + rc, end)
            if a >= b:
                continue
            if flag & RECORD_ARRAYS:
                k = rb + a - rs
                yield state, a, b - a, hashes[k:k + b - a], addresses[k:k + b - a]
            else:
                yield state, a, b - a, None, None

    # -- the read side -------------------------------------------------------------
    def count(self, state: BlockState) -> int:
        return self._counts[int(state)]

    def block_range(self, index: int) -> tuple[int, int]:
        offset = index * self.block_size
        return offset, min(self.block_size, self.disk_size - offset)

    def runs(self, start: int = 0, end: int | None = None):
        """Runs ``(state, start, count, hashes, addresses)`` covering blocks ``start`` ..
        ``end`` in order (hashes and addresses None for runs without entries).  Runs are
        not necessarily maximal: a neighbour may have the same state."""
        end = self.n_blocks if end is None else min(end, self.n_blocks)
        start = max(0, start)
        if start >= end:
            return
        if self.version == 1:
            yield from _runs_by_window(self._window_v1, start, end)
            return
        i = bisect.bisect_right(self._firsts, start) - 1
        while i < len(self._firsts) and self._firsts[i] < end:
            yield from self._frame_runs(i, start, end)
            i += 1

    def window(self, start: int, end: int):
        """Blocks ``start`` .. ``end`` as new arrays ``(states, hashes, addresses)``."""
        end = min(end, self.n_blocks)
        start = max(0, start)
        if self.version == 1:
            return self._window_v1(start, end)
        n = max(0, end - start)
        states = np.zeros(n, np.uint8)
        hashes = np.zeros((n, HASH_SIZE), np.uint8)
        addresses = np.zeros((n, ADDRESS_SIZE), np.uint8)
        if not n:
            return states, hashes, addresses
        i = bisect.bisect_right(self._firsts, start) - 1
        while i < len(self._firsts) and self._firsts[i] < end:
            self._frame_into_window(i, start, end, states, hashes, addresses)
            i += 1
        return states, hashes, addresses

    def _frame_into_window(self, i: int, start: int, end: int, states, hashes, addresses) -> None:
        """Frame ``i``'s part of blocks ``start`` .. ``end`` into the window's arrays, all
        its records at once (a window of short runs is thousands of them)."""
        recs, f_hashes, f_addresses, base = self._frame(i)
        rec_starts = recs["start"].astype(np.int64)
        rec_ends = rec_starts + recs["count"].astype(np.int64)
        lo = np.maximum(rec_starts, start)          # each record clipped to the window
        hi = np.minimum(rec_ends, end)
        keep = hi > lo
        if not keep.any():
            return
        lo, hi, rec_starts = lo[keep], hi[keep], rec_starts[keep]
        lengths = hi - lo
        first = int(lo[0]) - start                  # the clipped records are contiguous
        covered = slice(first, first + int(lengths.sum()))
        states[covered] = np.repeat(recs["state"][keep], lengths)
        carries = (recs["flags"][keep] & RECORD_ARRAYS) != 0
        if not carries.any():
            return
        # entry rows of the carrying records' clipped parts, in block order
        c_len = lengths[carries]
        c_first = base[keep][carries] + (lo[carries] - rec_starts[carries])
        rows = np.arange(int(c_len.sum())) + np.repeat(c_first - (np.cumsum(c_len) - c_len), c_len)
        at = np.flatnonzero(np.repeat(carries, lengths)) + first
        hashes[at] = f_hashes[rows]
        addresses[at] = f_addresses[rows]

    def _window_v1(self, start: int, end: int):
        n = max(0, end - start)
        s_at, h_at, a_at = self._v1_at
        states = np.frombuffer(bytearray(self._read(s_at + start, n)), np.uint8)
        hashes = np.frombuffer(bytearray(self._read(h_at + start * HASH_SIZE, n * HASH_SIZE)),
                               np.uint8).reshape(n, HASH_SIZE)
        addresses = np.frombuffer(bytearray(self._read(a_at + start * ADDRESS_SIZE,
                                                       n * ADDRESS_SIZE)),
                                  np.uint8).reshape(n, ADDRESS_SIZE)
        return states, hashes, addresses

    def entry(self, index: int) -> tuple[int, bytes, bytes]:
        """Block ``index``'s ``(state, xxh3-128, address)``."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} is outside the {self.n_blocks} blocks")
        for state, _a, _c, h, ad in self.runs(index, index + 1):
            if h is None:
                return state, bytes(HASH_SIZE), bytes(ADDRESS_SIZE)
            return state, h[0].tobytes(), ad[0].tobytes()
        raise IndexError(index)

    def uniform(self, start: int, end: int) -> int | None:
        """The state of blocks ``start`` .. ``end`` when one run without entries covers
        them all, else None (a quick test before a window is built)."""
        for state, a, count, h, _ad in self.runs(start, end):
            return state if h is None and a + count >= min(end, self.n_blocks) else None
        return None

    def to_manifest(self) -> Manifest:
        """The whole table in memory (49 bytes a block)."""
        states, hashes, addresses = self.window(0, self.n_blocks)
        return Manifest(self.disk_size, self.block_size, states=states, hashes=hashes,
                        addresses=addresses, meta=self.meta,
                        address_algorithm=self.address_algorithm)

    def __repr__(self) -> str:
        return (f"<ManifestReader {self.where} v{self.version} blocks={self.n_blocks} "
                f"data={self.count(BlockState.DATA)}>")


def _feed_v1(h, state: int, count: int, hashes, addresses) -> None:
    """Feed a run to a version 1/2 (per-block) digest in bounded pieces."""
    for s in range(0, count, WINDOW_BLOCKS):
        k = min(WINDOW_BLOCKS, count - s)
        rec = np.zeros((k, 1 + ENTRY_SIZE), np.uint8)
        rec[:, 0] = state
        if hashes is not None:
            rec[:, 1:1 + HASH_SIZE] = hashes[s:s + k]
            rec[:, 1 + HASH_SIZE:] = addresses[s:s + k]
        h.update(rec.tobytes())


def iter_diff(old, new, window: int = WINDOW_BLOCKS):
    """The blocks that differ between two manifests (:class:`Manifest` or
    :class:`ManifestReader`), streamed by merging their runs: ``(start, end, old_state,
    new_state, changed)`` per stretch of blocks in one state on each side, ``changed``
    the ascending block indices (int64) that differ in it, by the rules of :func:`diff`.
    Stretches without change are left out; blocks beyond the shorter disk come last, with
    ``old_state`` or ``new_state`` None for the side that lacks them.  Work follows the
    runs and entries, not the disks' sizes; memory is a frame or ``window`` blocks of
    each side."""
    if old.block_size != new.block_size:
        raise UsageError(f"cannot diff manifests with block sizes {old.block_size} "
                         f"and {new.block_size}")
    n = min(old.n_blocks, new.n_blocks)
    for s in range(0, n, window):
        e = min(n, s + window)
        a_runs, b_runs = old.runs(s, e), new.runs(s, e)
        a, b = next(a_runs, None), next(b_runs, None)
        at = s
        while a is not None and b is not None:
            a_state, a_start, a_count, a_h, _ = a
            b_state, b_start, b_count, b_h, _ = b
            end = min(a_start + a_count, b_start + b_count)
            if a_state != b_state:
                yield at, end, a_state, b_state, np.arange(at, end, dtype=np.int64)
            elif a_state == BlockState.DATA:
                ha = a_h[at - a_start:end - a_start]
                hb = b_h[at - b_start:end - b_start]
                idx = np.flatnonzero((ha != hb).any(axis=1))
                if len(idx):
                    yield at, end, a_state, b_state, idx.astype(np.int64) + at
            at = end
            if at == a_start + a_count:
                a = next(a_runs, None)
            if at == b_start + b_count:
                b = next(b_runs, None)
    longer = old if old.n_blocks > new.n_blocks else new
    for state, start, count, _h, _a in longer.runs(n, longer.n_blocks):
        # a tail run may span TiBs: its indices go out ``window`` at a time
        for s in range(start, start + count, window):
            e = min(start + count, s + window)
            yield (s, e, state if longer is old else None, state if longer is new else None,
                   np.arange(s, e, dtype=np.int64))


def copy_manifest(source, file, meta: dict) -> bytes:
    """Write ``source``'s blocks (a :class:`Manifest` or :class:`ManifestReader`, any
    version) as a version 3 manifest with ``meta`` in place of its own, to ``file`` (a
    path or a binary file, as :class:`ManifestWriter` takes); return the digest.  A
    frame at a time, so a manifest of any size is rewritten in bounded memory."""
    writer = ManifestWriter(file, source.disk_size, source.block_size, source.address_algorithm)
    try:
        for state, _start, count, hashes, addresses in source.runs():
            writer.add_run(state, count, hashes, addresses)
        return writer.finish(meta)
    except BaseException:
        writer.abort()
        raise


def diff_count(old, new) -> int:
    """How many blocks :func:`diff` would list, in windows."""
    return sum(len(c) for *_, c in iter_diff(old, new))


def entry_batches(m, start: int = 0, end: int | None = None, batch: int = WINDOW_BLOCKS,
                  data_only: bool = True):
    """The blocks of ``m`` (a :class:`Manifest` or :class:`ManifestReader`) that carry
    entries, in batches of about ``batch``: ``(indices int64, states, hashes,
    addresses)``.  ``data_only``: only DATA blocks.  Memory: one batch."""
    parts: list = []
    have = 0
    for state, s, count, h, a in m.runs(start, end):
        if h is None or (data_only and state != BlockState.DATA):
            continue
        parts.append((state, s, count, h, a))
        have += count
        if have >= batch:
            yield _join_entries(parts)
            parts, have = [], 0
    if parts:
        yield _join_entries(parts)


def _join_entries(parts):
    idx = np.concatenate([np.arange(s, s + c, dtype=np.int64) for _st, s, c, _h, _a in parts])
    states = np.concatenate([np.full(c, st, np.uint8) for st, _s, c, _h, _a in parts])
    hashes = np.concatenate([h for *_, h, _a in parts]) if len(parts) > 1 else parts[0][3]
    addresses = np.concatenate([a for *_, a in parts]) if len(parts) > 1 else parts[0][4]
    return idx, states, hashes, addresses
