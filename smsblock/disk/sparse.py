"""Sparse VMDK extents (hosted ``KDMV``, ESX ``COWD``): header, footer, GD, native reads.

Layout (all little-endian, offsets in 512-byte sectors): a 512-byte header, an optional
embedded descriptor, a grain directory (GD) of uint32 entries each pointing at a grain
table (GT) of ``numGTEsPerGT`` uint32 entries, each pointing at a grain of ``grainSize``
sectors.  A GT entry 0 is an unallocated grain (read through to the parent, or zeros),
1 is a zero grain.  streamOptimized extents (compressAlgorithm 1) store each grain as
a marker (lba u64, size u32) followed by a zlib stream; when ``gdOffset`` is
``GD_AT_END`` the real header is the footer at the end of the file.

ESX vmfsSparse redo logs (``COWD``) have the same two-level map with 32-bit header fields,
4096 entries per grain table, no compression and no embedded descriptor.

Everything read from the file is checked before it is used: sizes are capped by what the
file can hold, and the native core (``smsblock._vmdk``) checks every GT entry it follows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .. import _vmdk
from ..errors import (CorruptGrainError, CorruptGrainTableError, CorruptHeaderError,
                      DiskIOError, DiskFormatError, TruncatedDiskError, UnsupportedFormatError)
from .base import ExtentKind
from .descriptor import MAX_DESCRIPTOR_BYTES, MAX_DISK_BYTES, looks_like_descriptor

SECTOR = 512
MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_NONE, COMPRESS_DEFLATE = 0, 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

#: grains larger than this (in sectors: 1 MiB) are not written by anyone and would make
#: per-grain buffers big; VMware and qemu use 128 (64 KiB)
MAX_GRAIN_SECTORS = 2048
MAX_GTES_PER_GT = 512 * 8
MAX_CAPACITY_SECTORS = MAX_DISK_BYTES // SECTOR
#: grain directory entries of one extent (qemu allows 32M; 8M covers 64 TiB of seSparse and
#: 8 TiB of 1-sector grains in 512-entry tables); each costs 12 bytes of memory
MAX_GD_ENTRIES = 1 << 23
#: grain directories of one open disk (all its extents and chain links) held in memory
DIRECTORY_BUDGET_BYTES = 384 << 20
#: grain tables kept in memory per open disk, all its files together (4 bytes per grain:
#: 128 MiB covers 2 TiB of 64 KiB grains); past it, tables are re-read per thread as needed
GT_CACHE_BYTES = 128 << 20
#: where qemu looks for a sparse file's descriptor when the header gives none (sector 1, up
#: to 20 sectors of text)
FALLBACK_DESCRIPTOR_AT = SECTOR
FALLBACK_DESCRIPTOR_BYTES = 20 * SECTOR

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")   # 79 bytes, then padding to 512

#: ESX vmfsSparse (redo log) extents: a 32-bit header, fixed 4096-entry grain tables
COWD_MAGIC = b"COWD"
COWD_GTES_PER_GT = 4096
_COWD_HEADER = struct.Struct("<4sIIIIIII")   # magic version flags capacity grain gd gd_entries ...


@dataclass(slots=True)
class SparseHeader:
    version: int
    flags: int
    capacity: int            # sectors
    grain_sectors: int
    descriptor_offset: int   # sectors
    descriptor_size: int     # sectors
    gtes_per_gt: int
    rgd_offset: int          # sectors
    gd_offset: int           # sectors
    overhead: int            # sectors
    unclean_shutdown: int
    check_bytes: bytes
    compress_algorithm: int

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESS_DEFLATE

    @property
    def has_markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def grain_bytes(self) -> int:
        return self.grain_sectors * SECTOR

    @property
    def n_grains(self) -> int:
        return -(-self.capacity // self.grain_sectors)

    @property
    def n_gts(self) -> int:
        return -(-self.n_grains // self.gtes_per_gt)


def parse_header(raw: bytes, path: str, offset: int = 0) -> SparseHeader:
    """Decode and check a 512-byte sparse header (or footer copy) found at ``offset``."""
    if len(raw) < _HEADER.size:
        raise TruncatedDiskError("sparse header is cut short", path, offset)
    fields = _HEADER.unpack_from(raw)
    if fields[0] != MAGIC:
        raise CorruptHeaderError(f"bad sparse header magic {fields[0]!r}", path, offset)
    h = SparseHeader(*fields[1:])
    if h.version not in (1, 2, 3):
        raise UnsupportedFormatError(f"sparse extent version {h.version} (1-3 are read)",
                                     path, offset + 4)
    if h.flags & FLAG_NEWLINE_TEST and h.check_bytes != b"\n \r\n":
        raise CorruptHeaderError("newline check bytes damaged (file copied in text mode?)",
                                 path, offset + 73)
    if h.compress_algorithm not in (COMPRESS_NONE, COMPRESS_DEFLATE):
        raise UnsupportedFormatError(f"compression algorithm {h.compress_algorithm}",
                                     path, offset + 77)
    g = h.grain_sectors
    if g == 0 or g & (g - 1) or g > MAX_GRAIN_SECTORS:
        raise CorruptHeaderError(f"grain size of {g} sectors (a power of two up to "
                                 f"{MAX_GRAIN_SECTORS} expected)", path, offset + 20)
    if not 0 < h.gtes_per_gt <= MAX_GTES_PER_GT:
        raise CorruptHeaderError(f"{h.gtes_per_gt} entries per grain table", path, offset + 44)
    if h.capacity > MAX_CAPACITY_SECTORS:
        raise CorruptHeaderError(f"capacity of {h.capacity} sectors is absurd", path, offset + 12)
    return h


def parse_cowd_header(raw: bytes, path: str) -> SparseHeader:
    """Decode an ESX vmfsSparse (``COWD``) header into the fields a sparse extent uses."""
    if len(raw) < _COWD_HEADER.size:
        raise TruncatedDiskError("COWD header is cut short", path, 0)
    magic, version, flags, capacity, grain, gd, gd_entries, _ = _COWD_HEADER.unpack_from(raw)
    if magic != COWD_MAGIC:
        raise CorruptHeaderError(f"bad COWD header magic {magic!r}", path, 0)
    if grain == 0 or grain & (grain - 1) or grain > MAX_GRAIN_SECTORS:
        raise CorruptHeaderError(f"grain size of {grain} sectors (a power of two up to "
                                 f"{MAX_GRAIN_SECTORS} expected)", path, 16)
    h = SparseHeader(version=version, flags=flags, capacity=capacity, grain_sectors=grain,
                     descriptor_offset=0, descriptor_size=0, gtes_per_gt=COWD_GTES_PER_GT,
                     rgd_offset=0, gd_offset=gd, overhead=min(gd, 4), unclean_shutdown=0,
                     check_bytes=b"", compress_algorithm=COMPRESS_NONE)
    if gd_entries < h.n_gts:
        raise CorruptGrainTableError(f"COWD grain directory has {gd_entries} entries, the "
                                     f"capacity of {capacity} sectors needs {h.n_gts}", path, 24)
    return h


#: ESXi seSparse extents (snapshots on VMFS6): 64-bit headers and grain table entries
SESPARSE_MAGIC = struct.pack("<Q", 0xCAFEBABE)
SESPARSE_VOLATILE_MAGIC = 0xCAFECAFE
SESPARSE_VERSION = 0x0000000200000001
_SE_HEADER = struct.Struct("<26Q")            # const header fields, then 304 bytes of zeros


@dataclass(slots=True)
class SeSparseLayout:
    grain_dir_offset: int       # sectors
    grain_dir_entries: int
    grain_tables_offset: int    # sectors
    grains_offset: int          # sectors


def parse_sesparse_header(raw: bytes, path: str) -> tuple[SparseHeader, SeSparseLayout, int]:
    """Decode a seSparse const header: (header, layout, volatile header sector).

    The format is not published; like qemu, only the one variant ESXi writes is accepted
    (version 2.1, 4 KiB grains, 4096-entry grain tables, no flags, zero reserved fields).
    """
    if len(raw) < 512:
        raise TruncatedDiskError("seSparse header is cut short", path, 0)
    (magic, version, capacity, grain, gt_size, flags, r1, r2, r3, r4, vol_off, _vol_size,
     _jh_off, _jh_size, _j_off, _j_size, gd_off, gd_size, gts_off, _gts_size, _fb_off,
     _fb_size, _bm_off, _bm_size, grains_off, _grains_size) = _SE_HEADER.unpack_from(raw)
    if magic != 0xCAFEBABE:
        raise CorruptHeaderError(f"bad seSparse magic {magic:#x}", path, 0)
    if version != SESPARSE_VERSION:
        raise UnsupportedFormatError(f"seSparse version {version:#018x}", path, 8)
    if grain != 8:
        raise UnsupportedFormatError(f"seSparse grain of {grain} sectors (8 are read)", path, 24)
    if gt_size != 64:
        raise UnsupportedFormatError(f"seSparse grain table of {gt_size} sectors (64 are read)",
                                     path, 32)
    if flags or r1 or r2 or r3 or r4 or raw[208:512].strip(b"\0"):
        raise UnsupportedFormatError("seSparse flags or reserved fields set", path, 40)
    if capacity > MAX_CAPACITY_SECTORS:
        raise CorruptHeaderError(f"capacity of {capacity} sectors is absurd", path, 16)
    h = SparseHeader(version=2, flags=0, capacity=capacity, grain_sectors=8,
                     descriptor_offset=0, descriptor_size=0, gtes_per_gt=gt_size * 512 // 8,
                     rgd_offset=0, gd_offset=gd_off, overhead=min(grains_off, MAX_CAPACITY_SECTORS),
                     unclean_shutdown=0, check_bytes=b"", compress_algorithm=COMPRESS_NONE)
    layout = SeSparseLayout(gd_off, gd_size * 512 // 8, gts_off, grains_off)
    if layout.grain_dir_entries < h.n_gts:
        raise CorruptGrainTableError(f"seSparse grain directory has {layout.grain_dir_entries} "
                                     f"entries, the capacity needs {h.n_gts}", path, 136)
    return h, layout, vol_off


class OpenBudget:
    """The memory one open disk may spend on sparse metadata, whatever its shape.

    Shared by every sparse extent of the disk and of its parents: grain directories (read
    whole, 12 bytes per entry) up to ``DIRECTORY_BUDGET_BYTES`` all together, and cached
    grain tables up to ``GT_CACHE_BYTES`` all together (past it, tables are re-read).
    """

    def __init__(self, table_bytes: int | None = None, directory_bytes: int | None = None):
        self.tables = _vmdk.CacheBudget(GT_CACHE_BYTES if table_bytes is None else table_bytes)
        self.directory_left = (DIRECTORY_BUDGET_BYTES if directory_bytes is None
                               else directory_bytes)

    def charge_directory(self, nbytes: int, path: str, offset: int) -> None:
        if nbytes > self.directory_left:
            raise DiskFormatError(f"grain directory of {nbytes // 12} entries passes what one "
                                  f"open disk may hold in memory ({DIRECTORY_BUDGET_BYTES >> 20}"
                                  " MiB of directories, its parents included)", path, offset)
        self.directory_left -= nbytes


class SparseExtent:
    """One ``KDMV`` sparse extent file, read through the native core.

    ``file`` is a :class:`~smsblock.disk.files.LocalFile` (read with ``pread`` with the
    GIL released) or an opener's file (read through its ``readinto``); the extent owns it.
    ``budget`` is the :class:`OpenBudget` of the open disk (a fresh one when None).
    """

    def __init__(self, file, budget: OpenBudget | None = None):
        self.file = file
        self.path = file.name
        self.budget = OpenBudget() if budget is None else budget
        self.descriptor_at: int | None = None     # where descriptor_bytes were found
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------
    def _pread(self, length: int, offset: int, what: str) -> bytes:
        if offset < 0 or offset + length > self.file_size:
            raise TruncatedDiskError(f"{what} ({length} bytes) lies past the end of the "
                                     f"file ({self.file_size} bytes)", self.path, offset)
        data = self.file.pread(length, offset)
        if len(data) != length:
            raise TruncatedDiskError(f"{what} is cut short", self.path, offset + len(data))
        return data

    def _open(self) -> None:
        self.file_size = self.file.size
        if self.file_size < SECTOR:
            raise TruncatedDiskError(f"file of {self.file_size} bytes is too short for a "
                                     "sparse header", self.path, 0)
        raw = self._pread(SECTOR, 0, "sparse header")
        self.cowd = raw[:4] == COWD_MAGIC
        self.sesparse = raw[:8] == SESPARSE_MAGIC
        self._capacity_at = 16 if self.sesparse else 12      # for error messages
        se = None
        if self.sesparse:
            h, se, volatile_at = parse_sesparse_header(raw, self.path)
            self._check_volatile_header(volatile_at)
            # the grain area may start at the end of a delta nothing was written to yet
            h.overhead = min(h.overhead, self.file_size // SECTOR)
        elif self.cowd:
            h = parse_cowd_header(raw, self.path)
        else:
            h = parse_header(raw, self.path, 0)
        self.first_header = h
        if h.gd_offset == GD_AT_END and not (self.cowd or self.sesparse):
            h = self._read_footer(h)
            self._capacity_at = self.file_size - 2 * SECTOR + 12
        self.header = h
        self.descriptor_bytes = self._read_embedded_descriptor(self.first_header)
        self.size = h.capacity * SECTOR
        entry_bytes = 8 if se else 4
        self._check_layout(h, entry_bytes)
        # the directory stays in memory (4 bytes, plus 8 for the table pointer, per entry)
        self.budget.charge_directory(h.n_gts * 12, self.path, h.gd_offset * SECTOR)
        gd = self._read_se_gd(h, se) if se else self._read_gd(h)
        fd = self.file.fileno()
        self.core = _vmdk.SparseCore(
            fd, self.file_size, self.size, h.grain_bytes, h.gtes_per_gt, gd,
            h.compressed, h.has_markers, h.overhead * SECTOR,
            h.gd_offset * SECTOR, h.n_gts * entry_bytes, None if fd >= 0 else self.file,
            self.budget.tables, se is not None, se.grains_offset if se else 0)

    def _check_volatile_header(self, at: int) -> None:
        if at * SECTOR + SECTOR > self.file_size:
            raise TruncatedDiskError("seSparse volatile header lies past the end of the file",
                                     self.path, 80)
        raw = self._pread(SECTOR, at * SECTOR, "seSparse volatile header")
        magic, _free_gt, _txn, replay = struct.unpack_from("<4Q", raw)
        if magic != SESPARSE_VOLATILE_MAGIC:
            raise CorruptHeaderError(f"bad seSparse volatile header magic {magic:#x}",
                                     self.path, at * SECTOR)
        if replay:
            raise UnsupportedFormatError("seSparse journal needs replaying (the disk was not "
                                         "closed cleanly)", self.path, at * SECTOR + 24)

    def _read_se_gd(self, h: SparseHeader, se: SeSparseLayout) -> np.ndarray:
        """seSparse directory entries (0, or 0x10000000_xxxxxxxx: a table number) as sectors."""
        out = np.zeros(h.n_gts, dtype=np.uint32)
        step = 1 << 16           # in pieces: the temporaries stay small
        for first in range(0, h.n_gts, step):
            n = min(step, h.n_gts - first)
            out[first:first + n] = self._se_gd_piece(h, se, first, n)
        return out

    def _se_gd_piece(self, h: SparseHeader, se: SeSparseLayout, first: int,
                     n: int) -> np.ndarray:
        at = h.gd_offset * SECTOR + 8 * first
        raw = np.frombuffer(self._pread(n * 8, at, "grain directory"), dtype="<u8")
        used = raw != 0
        bad = used & ((raw & np.uint64(0xFFFFFFFF00000000)) != np.uint64(0x1000000000000000))
        sectors = np.uint64(se.grain_tables_offset) + (raw & np.uint64(0xFFFFFFFF)) * np.uint64(
            h.gtes_per_gt * 8 // SECTOR)
        bad |= used & (sectors > np.uint64(0xFFFFFFFF))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CorruptGrainTableError(f"seSparse grain directory entry {int(raw[i]):#018x} "
                                         "is not a grain table number", self.path, at + 8 * i)
        return np.where(used, sectors, 0).astype(np.uint32)

    def _read_footer(self, first: SparseHeader) -> SparseHeader:
        """gdOffset == GD_AT_END: the footer (3 sectors before the end) has the real header."""
        at = self.file_size - 3 * SECTOR
        if at < SECTOR:
            raise TruncatedDiskError("header says the grain directory is at the end, but "
                                     "the file has no room for a footer", self.path, 56)
        raw = self._pread(3 * SECTOR, at, "footer")
        lba, size, mtype = struct.unpack_from("<QII", raw, 0)
        if size != 0 or mtype != MARKER_FOOTER:
            raise CorruptHeaderError("footer marker missing or damaged", self.path, at)
        eos_lba, eos_size, eos_type = struct.unpack_from("<QII", raw, 2 * SECTOR)
        if (eos_lba, eos_size, eos_type) != (0, 0, MARKER_EOS):
            raise CorruptHeaderError("end-of-stream marker missing after the footer",
                                     self.path, at + 2 * SECTOR)
        footer = parse_header(raw[SECTOR:2 * SECTOR], self.path, at + SECTOR)
        if footer.gd_offset == GD_AT_END:
            raise CorruptHeaderError("footer does not say where the grain directory is",
                                     self.path, at + SECTOR + 56)
        return footer

    def _read_embedded_descriptor(self, h: SparseHeader) -> bytes | None:
        if h.descriptor_offset == 0 or h.descriptor_size == 0:
            return None if self.cowd or self.sesparse else self._fallback_descriptor()
        size = h.descriptor_size * SECTOR
        self.descriptor_at = h.descriptor_offset * SECTOR
        if size > MAX_DESCRIPTOR_BYTES:
            raise CorruptHeaderError(f"embedded descriptor of {h.descriptor_size} sectors is "
                                     "absurdly large", self.path, 36)
        return self._pread(size, h.descriptor_offset * SECTOR, "embedded descriptor")

    def _fallback_descriptor(self) -> bytes | None:
        """Descriptor text at sector 1 of a header that points at none, as qemu reads it.

        qemu always takes a sparse file's descriptor (CID, parentFileNameHint) from sector 1,
        whatever the header says; a delta whose header lost its descriptorOffset still has
        a parent there.  Only text that reads as a descriptor is taken (VMware's extent
        files keep a grain directory there).
        """
        n = min(FALLBACK_DESCRIPTOR_BYTES, self.file_size - FALLBACK_DESCRIPTOR_AT)
        if n <= 0:
            return None
        text = self._pread(n, FALLBACK_DESCRIPTOR_AT, "descriptor").split(b"\0", 1)[0]
        if not looks_like_descriptor(text):
            return None
        self.descriptor_at = FALLBACK_DESCRIPTOR_AT
        return text

    def _check_layout(self, h: SparseHeader, entry_bytes: int = 4) -> None:
        gd_bytes = h.n_gts * entry_bytes
        gd_at = h.gd_offset * SECTOR
        if h.n_gts > MAX_GD_ENTRIES:
            raise CorruptHeaderError(
                f"grain directory of {h.n_gts} entries ({h.capacity} sectors of capacity in "
                f"{h.gtes_per_gt}-entry tables of {h.grain_sectors}-sector grains); at most "
                f"{MAX_GD_ENTRIES} are read", self.path, self._capacity_at)
        if h.capacity and h.gd_offset == 0:
            raise CorruptHeaderError("no grain directory offset", self.path, 56)
        # the GD must fit in the file: this also caps every allocation that follows from
        # the (untrusted) capacity, since the GD grows with it
        if gd_at + gd_bytes > self.file_size:
            raise CorruptGrainTableError(
                f"grain directory of {h.n_gts} entries ({h.capacity} sectors of capacity) "
                f"does not fit in the file of {self.file_size} bytes", self.path, gd_at)
        if h.overhead * SECTOR > self.file_size:
            raise TruncatedDiskError(f"file ends before its metadata area "
                                     f"({h.overhead} sectors)", self.path, 64)

    def _read_gd(self, h: SparseHeader) -> np.ndarray:
        if h.n_gts == 0:
            return np.zeros(0, dtype=np.uint32)
        raw = self._pread(h.n_gts * 4, h.gd_offset * SECTOR, "grain directory")
        return np.frombuffer(raw, dtype="<u4").astype(np.uint32)

    # -- reading ------------------------------------------------------------
    def readinto(self, offset: int, view: memoryview, status: np.ndarray | None) -> None:
        """Fill ``view`` with the extent's bytes at ``offset`` (inside the capacity).

        ``status`` (uint8, one per grain touched) receives 0 unallocated, 1 zero,
        2 data; unallocated grains are zero-filled here.
        """
        if self.file.closed:
            raise DiskIOError("read after close", self.path, offset)
        rc = self.core.read(offset, view, status)
        if rc is not None:
            raise self._error(rc)

    def grain_entries(self, first: int, count: int) -> np.ndarray:
        """The GT entries of grains ``first .. first+count-1`` (uint32)."""
        if self.file.closed:
            raise DiskIOError("read after close", self.path)
        out = np.empty(count, dtype=np.uint32)
        rc = self.core.entries(first, out)
        if rc is not None:
            raise self._error(rc)
        return out

    def extents(self, start: int, end: int):
        """Yield (offset, length, kind-or-None) runs inside ``[start, end)``; None = unallocated."""
        g = self.header.grain_bytes
        end = min(end, self.size)
        if start >= end:
            return
        first, last = start // g, (end - 1) // g
        step = max(self.header.gtes_per_gt, 1 << 16)
        for chunk in range(first, last + 1, step):
            n = min(step, last + 1 - chunk)
            ent = self.grain_entries(chunk, n)
            kind = np.where(ent == 0, 0, np.where(ent == 1, 1, 2)).astype(np.int8)
            cuts = np.flatnonzero(np.diff(kind)) + 1
            starts = np.concatenate(([0], cuts))
            stops = np.concatenate((cuts, [n]))
            for s, t in zip(starts.tolist(), stops.tolist()):
                lo = max(start, (chunk + s) * g)
                hi = min(end, (chunk + t) * g)
                k = kind[s]
                yield lo, hi - lo, (None if k == 0 else ExtentKind.ZERO if k == 1
                                    else ExtentKind.DATA)

    def _error(self, rc) -> DiskFormatError:
        code, offset, detail = rc
        cls = {"io": DiskIOError, "truncated": TruncatedDiskError,
               "gt": CorruptGrainTableError, "grain": CorruptGrainError}.get(code, DiskFormatError)
        return cls(detail, self.path, offset)

    def close(self) -> None:
        self.file.close()
