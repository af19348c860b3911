"""Run manifests: the per-block table of one replication run, its file format, and diff.

A :class:`Manifest` cuts a disk into ``n_blocks`` fixed blocks of ``block_size`` bytes
(the last one short when the disk size is not a multiple) and records, per block:

* ``states[i]``: a :class:`BlockState` (unallocated, zero, data);
* ``hashes[i]``: the xxh3-128 of the block's bytes (canonical, big-endian) for DATA
  blocks, 16 zero bytes otherwise — the fast "did it change" hash;
* ``addresses[i]``: the content address (32 bytes, ``address_algorithm``) under which a
  store keeps the block, for DATA blocks, zeros otherwise.

The binary format is documented field by field in ``docs/formats.md``; :meth:`to_bytes`
and :meth:`from_bytes` are its writer and reader.  The arrays load with
``np.frombuffer`` straight from the file's sections, so loading is linear in the block
count.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import struct
import secrets

import numpy as np

from .errors import ManifestError, UsageError
from .fsutil import create_file, fsync_dir

__all__ = ["BlockState", "Manifest", "diff", "check_block_size",
           "DEFAULT_BLOCK_SIZE", "MIN_BLOCK_SIZE", "MAX_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 512 * 1024        # the EBS direct API block size
MIN_BLOCK_SIZE = 64 * 1024             # one VMDK grain
MAX_BLOCK_SIZE = 4 * 1024 * 1024

HASH_SIZE = 16                         # xxh3-128
ADDRESS_SIZE = 32                      # SHA-256 or BLAKE3-256

MAGIC = b"SMSBMANI"
VERSION = 1
TRAILER_MAGIC = b"SMSBEND\0"
DIGEST_DOMAIN = b"smsblock manifest digest v1\0"

# Header, little-endian: magic, version, header size, disk size, block size, block count,
# address algorithm (NUL-padded ASCII), meta length, flags, digest, reserved (zeros).
_HEADER = struct.Struct("<8sIIQIQ16sQI32s32s")
HEADER_SIZE = _HEADER.size             # 128
_TRAILER = struct.Struct("<8s32s")      # trailer magic, SHA-256 of all bytes before it
TRAILER_SIZE = _TRAILER.size           # 40
MAX_META_SIZE = 16 * 1024 * 1024


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

    @property
    def address_algorithm(self) -> str:
        return self._address_algorithm

    @address_algorithm.setter
    def address_algorithm(self, name: str) -> None:
        raw = name.encode("ascii", "replace") if isinstance(name, str) else b""
        if not raw or len(raw) > 16 or b"\0" in raw or not name.isprintable():
            raise UsageError(f"address algorithm name {name!r} must be 1-16 printable ASCII characters")
        self._address_algorithm = name

    # -- digest -----------------------------------------------------------
    @property
    def digest(self) -> bytes:
        """SHA-256 over every block in index order (docs/formats.md, "Digest").

        ``SHA-256(domain || disk_size u64le || block_size u32le || record_0 || ... )``
        where ``record_i = state (1 byte) || xxh3-128 (16) || address (32)``: like EBS's
        linear checksum, one value that changes when any block's content or state does.
        """
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
        """Serialise to the binary format of docs/formats.md."""
        bad = ~np.isin(self.states, (BlockState.UNALLOCATED, BlockState.ZERO, BlockState.DATA))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UsageError(f"block {i} has invalid state {int(self.states[i])}")
        meta = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode()
        if len(meta) > MAX_META_SIZE:
            raise UsageError(f"manifest meta is {len(meta)} bytes, more than {MAX_META_SIZE}")
        header = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, self.disk_size, self.block_size,
                              self.n_blocks, self.address_algorithm.encode("ascii"),
                              len(meta), 0, self.digest, bytes(32))
        parts = [header, self.states.tobytes(), self.hashes.tobytes(),
                 self.addresses.tobytes(), meta]
        h = hashlib.sha256()
        for p in parts:
            h.update(p)
        parts.append(_TRAILER.pack(TRAILER_MAGIC, h.digest()))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data, path: str | os.PathLike | None = None) -> "Manifest":
        """Parse the binary format; raise ManifestError (naming ``path`` and the offset)
        on any truncation, bad field or checksum mismatch.  Arrays view ``data``
        (writable only when ``data`` is)."""
        view = memoryview(data).cast("B")
        size = len(view)
        where = path if path is not None else "<manifest>"

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
        try:
            meta = json.loads(bytes(view[pos:pos + meta_len]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            fail(f"meta is not valid JSON: {e}", pos)
        if not isinstance(meta, dict):
            fail("meta is not a JSON object", pos)
        m = cls(disk_size, block_size, states=states, hashes=hashes, addresses=addresses,
                meta=meta, address_algorithm=algo_name)
        if m.digest != digest:
            fail("digest does not match the blocks", 64)
        return m

    # -- files ------------------------------------------------------------
    def save(self, path) -> None:
        """Write atomically: temp file in the same folder, fsync, rename, fsync the folder."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        data = self.to_bytes()
        tmp = os.path.join(folder, f".manifest-{secrets.token_hex(8)}.tmp")
        fd = create_file(tmp)       # 0600, O_EXCL | O_NOFOLLOW
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        fsync_dir(folder)

    @classmethod
    def load(cls, path) -> "Manifest":
        """Read and check a manifest file (arrays are writable)."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                # the header says how big the file must be: never read a wrong file whole
                _check_header(f.read(HEADER_SIZE), size, path)
                f.seek(0)
                buf = bytearray(size)
                got = f.readinto(buf)
        except OSError as e:
            raise ManifestError(f"cannot read: {e.strerror}", path) from None
        if got != size:
            raise ManifestError(f"file shrank while reading ({got} of {size} bytes)", path, got)
        return cls.from_bytes(buf, path)


def _check_header(head, size: int, where) -> tuple:
    """Check the header in ``head`` (at least its first bytes) against a file of ``size``
    bytes; return ``(disk_size, block_size, n_blocks, algorithm, meta_length, digest,
    expected_size)`` or raise ManifestError naming ``where`` and the field's offset."""

    def fail(message: str, offset: int):
        raise ManifestError(message, where, offset)

    if size < HEADER_SIZE or len(head) < HEADER_SIZE:
        fail(f"truncated: {size} bytes, a header needs {HEADER_SIZE}", min(size, len(head)))
    (magic, version, header_size, disk_size, block_size, n_blocks, algo, meta_len,
     flags, digest, _reserved) = _HEADER.unpack_from(head, 0)
    if magic != MAGIC:
        fail(f"bad magic {magic!r}, expected {MAGIC!r}: not a smsblock manifest", 0)
    if version != VERSION:
        fail(f"unsupported manifest version {version} (this reader knows {VERSION})", 8)
    if header_size != HEADER_SIZE:
        fail(f"header size {header_size}, expected {HEADER_SIZE}", 12)
    if (block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)):
        fail(f"block size {block_size} is not a power of two from 64 KiB to 4 MiB", 24)
    if n_blocks != blocks_for(disk_size, block_size):
        fail(f"block count {n_blocks} does not cover disk size {disk_size} "
             f"in blocks of {block_size}", 28)
    if flags != 0:
        fail(f"unknown flags {flags:#x}", 60)
    try:
        algo_name = algo.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        algo_name = ""
    if not algo_name or "\0" in algo_name or not algo_name.isprintable():
        fail(f"bad address algorithm name {algo!r}", 36)
    if meta_len > MAX_META_SIZE:
        fail(f"meta length {meta_len} exceeds {MAX_META_SIZE}", 52)
    expected = HEADER_SIZE + n_blocks * (1 + HASH_SIZE + ADDRESS_SIZE) + meta_len + TRAILER_SIZE
    if size < expected:
        fail(f"truncated: {size} bytes, header says {expected}", size)
    if size > expected:
        fail(f"{size - expected} unexpected bytes after the trailer", expected)
    return disk_size, block_size, n_blocks, algo_name, meta_len, digest, expected


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
