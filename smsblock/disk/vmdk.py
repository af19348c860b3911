"""VMDK disks: every hosted layout, flat VMFS extents and snapshot delta chains.

A VMDK disk is a sequence of *parts* laid end to end, one per descriptor extent line:
sparse extents (``KDMV``, read by the native core), flat extents (plain files, maybe at
an offset), and ZERO/NOACCESS extents (read as zeros).  A monolithicSparse or
streamOptimized file is a single sparse part whose descriptor is embedded in it.

A delta disk names its parent with ``parentFileNameHint``: grains the child never wrote
read through to the parent, and the parent's CID must equal the child's ``parentCID``
(:class:`CidMismatchError` otherwise, unless ``ignore_cid_mismatch``).
"""

from __future__ import annotations

import bisect
import os
from typing import Iterator

import numpy as np

from ..errors import (DescriptorError, DiskIOError, CidMismatchError,
                      ParentChainError, TruncatedDiskError, UnsupportedFormatError)
from .base import Disk, DiskInfo, Extent, ExtentFile, ExtentKind, clip_extents
from .descriptor import (FLAT_TYPES, MAX_DESCRIPTOR_BYTES, NO_PARENT_CID, Descriptor,
                         parse_descriptor)
from .files import LocalFiles, OpenerFiles
from .sparse import COWD_MAGIC, MAGIC, SECTOR, SESPARSE_MAGIC, OpenBudget, SparseExtent
#: a snapshot chain deeper than this is a loop we failed to see, or hostile
MAX_CHAIN_DEPTH = 255
#: bytes of a delta chain's address space whose extents are resolved at a time
EXTENT_WINDOW = 1 << 30


# --- parts: the pieces a VMDK disk is made of ----------------------------------------

class _Part:
    """``length`` bytes of the virtual disk starting at ``start``."""

    start: int
    length: int
    compressed = False

    def readinto(self, offset: int, view: memoryview, holes: list | None) -> None:
        """Fill view with the bytes at offset (part-relative).

        When ``holes`` is a list, append (offset, length) ranges (part-relative) that are
        unallocated here and must come from the parent; they are zero-filled.
        """
        raise NotImplementedError

    def extents(self, lo: int, hi: int) -> Iterator[tuple[int, int, ExtentKind | None]]:
        """Part-relative (offset, length, kind) runs in [lo, hi); kind None = unallocated."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ZeroPart(_Part):
    """A ZERO extent (or a NOACCESS one): reads as zeros, stores nothing."""

    def __init__(self, start: int, length: int):
        self.start, self.length = start, length

    def readinto(self, offset, view, holes):
        view[:] = bytes(len(view))

    def extents(self, lo, hi):
        if lo < hi:
            yield lo, hi - lo, ExtentKind.ZERO


class _FlatPart(_Part):
    """A flat extent: the bytes at ``file_offset`` in one file (FLAT, VMFS, ...)."""

    def __init__(self, start: int, length: int, file, file_offset: int, release):
        self.start, self.length, self.file, self.file_offset = start, length, file, file_offset
        self.path = file.name
        self._release = release
        if file.size < file_offset + length:
            release()
            raise TruncatedDiskError(f"flat extent file of {file.size} bytes is shorter than "
                                     f"the {file_offset + length} bytes its descriptor line "
                                     "needs", self.path, file.size)

    def readinto(self, offset, view, holes):
        at = self.file_offset + offset
        if self.file.closed:
            raise DiskIOError("read after close", self.path, at)
        if self.file.readinto(at, view) != len(view):
            raise TruncatedDiskError("flat extent file shrank while open", self.path, at)

    def extents(self, lo, hi):
        """DATA where the file may hold data (SEEK_DATA/SEEK_HOLE); holes read as zeros."""
        base = self.file_offset
        for a, b in self.file.data_ranges(base + lo, base + hi):
            yield a - base, b - a, ExtentKind.DATA

    def close(self):
        release, self._release = self._release, None
        if release is not None:
            release()


class _SparsePart(_Part):
    """A hosted sparse extent; bytes past its own capacity read as unallocated."""

    def __init__(self, start: int, length: int, extent: SparseExtent, release):
        self.start, self.length, self.extent = start, length, extent
        self._release = release
        self.compressed = extent.header.compressed
        self._grain = extent.header.grain_bytes

    def readinto(self, offset, view, holes):
        inside = max(0, min(len(view), self.extent.size - offset))
        if inside:
            sub = view[:inside]
            if holes is None:
                self.extent.readinto(offset, sub, None)
            else:
                g = self._grain
                first = offset // g
                status = np.empty((offset + inside - 1) // g - first + 1, dtype=np.uint8)
                self.extent.readinto(offset, sub, status)
                self._collect_holes(status, first, offset, offset + inside, holes)
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)
            if holes is not None:
                holes.append((offset + inside, len(view) - inside))

    def _collect_holes(self, status, first, lo, hi, holes):
        if len(status) == 1:             # one grain: no need for numpy's run finding
            if status[0] == 0:
                holes.append((lo, hi - lo))
            return
        unalloc = status == 0
        if not unalloc.any():
            return
        edges = np.flatnonzero(np.diff(np.concatenate(([0], unalloc.view(np.int8), [0]))))
        g = self._grain
        for s, t in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            a = max(lo, (first + s) * g)
            b = min(hi, (first + t) * g)
            holes.append((a, b - a))

    def extents(self, lo, hi):
        yield from self.extent.extents(lo, min(hi, self.extent.size))
        if hi > self.extent.size:
            a = max(lo, self.extent.size)
            yield a, hi - a, None

    def close(self):
        release, self._release = self._release, None
        if release is not None:
            release()


class _Shared:
    """What every part of one open disk (its parents included) shares.

    Each file is opened once, whichever extent lines and chain links name it (so its
    grain directory and tables are in memory once), and one :class:`OpenBudget` bounds
    the sparse metadata of them all.  ``get`` hands out a reference; the last ``release``
    closes the object.
    """

    def __init__(self, fs):
        self.fs = fs
        self.budget = OpenBudget()
        self._objects: dict[tuple[str, str], list] = {}

    def get(self, kind: str, path: str, make):
        """(object, release) for ``path`` opened as ``kind``; ``make(path)`` opens it once."""
        key = (kind, self.fs.identity(path))
        entry = self._objects.get(key)
        if entry is None:
            entry = self._objects[key] = [make(path), 0]
        entry[1] += 1
        return entry[0], lambda: self._release(key)

    def _release(self, key) -> None:
        entry = self._objects[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._objects[key]
            entry[0].close()


# --- the disk ------------------------------------------------------------------------

class VmdkDisk(Disk):
    """A VMDK disk (all parts of one descriptor), with its parent chain below it."""

    def __init__(self, path: str, parts: list[_Part], info: DiskInfo,
                 parent: "VmdkDisk | None"):
        self.path = path
        self._parts = parts
        self._starts = [p.start for p in parts]
        self.size = info.virtual_size
        self.info = info
        self.parent = parent
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise DiskIOError("read after close", self.path)

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        self._check_open()
        want = max(0, min(len(view), self.size - offset))
        end = offset + want
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        pos = offset
        while pos < end and i < len(self._parts):
            part = self._parts[i]
            lo, hi = max(pos, part.start), min(end, part.start + part.length)
            if lo < hi:
                holes = [] if self.parent is not None else None
                part.readinto(lo - part.start, view[lo - offset:hi - offset], holes)
                for h_off, h_len in holes or ():
                    a = part.start + h_off
                    self._read_parent(a, view[a - offset:a - offset + h_len])
                pos = hi
            i += 1
        if pos < end:        # descriptor extents shorter than the disk: zeros
            view[pos - offset:want] = bytes(end - pos)
        return want

    def _read_parent(self, offset: int, view: memoryview) -> None:
        n = max(0, min(len(view), self.parent.size - offset))
        if n:
            self.parent.readinto(offset, view[:n])
        # past the parent's end stays zero (filled by the part)

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        self._check_open()
        start, end = self._clip(start, end)
        return clip_extents(self._raw_extents(start, end), start, end)

    def _own_runs(self, start: int, end: int) -> Iterator[tuple[int, int, ExtentKind | None]]:
        """(offset, length, kind) runs of this disk alone; kind None = unallocated here."""
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        for part in self._parts[i:]:
            if part.start >= end:
                break
            lo, hi = max(start, part.start), min(end, part.start + part.length)
            if lo >= hi:
                continue
            for off, length, kind in part.extents(lo - part.start, hi - part.start):
                yield part.start + off, length, kind

    def _raw_extents(self, start: int, end: int) -> Iterator[Extent]:
        if self.parent is None:
            for a, length, kind in self._own_runs(start, end):
                if kind is not None:
                    yield Extent(a, length, kind)
            return
        # a chain is resolved link by link over a window at a time, not by nesting one
        # generator per link: resuming nested generators costs their depth at every step,
        # which made a deep chain with many holes quadratic
        for w in range(start, end, EXTENT_WINDOW):
            found: list[Extent] = []
            todo = [(w, min(end, w + EXTENT_WINDOW))]
            disk: VmdkDisk | None = self
            while disk is not None and todo:
                holes = []
                for lo, hi in todo:
                    for a, length, kind in disk._own_runs(lo, min(hi, disk.size)):
                        if kind is not None:
                            found.append(Extent(a, length, kind))
                        else:
                            holes.append((a, a + length))
                todo, disk = holes, disk.parent
            found.sort(key=lambda e: e.offset)
            yield from found

    def close(self) -> None:
        self._closed = True
        for part in getattr(self, "_parts", ()):
            part.close()
        self._parts = []
        if getattr(self, "parent", None) is not None:
            self.parent.close()


# --- opening -------------------------------------------------------------------------

def open_vmdk(path, *, ignore_cid_mismatch: bool = False, allow_outside_paths: bool = False,
              opener=None) -> VmdkDisk:
    """Open a VMDK (descriptor file or sparse file with embedded descriptor), with parents.

    ``opener`` reads the disk's files from somewhere else than the local filesystem:
    ``opener(path)`` returns a file with ``name``, ``size``, ``pread(length, offset)``,
    ``readinto(offset, buf)`` (thread-safe) and ``close()`` (as
    ``smsblock.source.datastore_http.DatastoreFile``); ``path`` and the paths the
    descriptors name are then ``/``-separated paths of that file space.

    Raises a :class:`DiskFormatError` subclass naming the file and offset on malformed or
    hostile input, :class:`UnsafeExtentPathError` for extents or parents outside the
    descriptor's folder (unless ``allow_outside_paths``), :class:`ParentChainError` for a
    missing or looping parent chain and :class:`CidMismatchError` when a child's
    parentCID is not its parent's CID (unless ``ignore_cid_mismatch``).
    """
    fs = LocalFiles() if opener is None else OpenerFiles(opener)
    path = os.fspath(path)
    return _open(_Shared(fs), path, ignore_cid_mismatch, allow_outside_paths, [])


def _open(shared: _Shared, path: str, ignore_cid: bool, allow_outside: bool,
          chain: list[str]) -> VmdkDisk:
    """Open one disk of a chain; ``chain`` holds the identities of the children above it."""
    fs = shared.fs
    chain = chain + [fs.identity(path)]
    parts: list[_Part] = []
    try:
        top = fs.open(path)
        try:
            head = top.pread(SECTOR, 0)
        except BaseException:
            top.close()
            raise
        if head[:4] in (MAGIC, COWD_MAGIC) or head[:8] == SESPARSE_MAGIC:
            desc, info = _open_monolithic(shared, path, top, parts)
        else:
            try:
                text = _read_descriptor_file(top)
            finally:
                top.close()
            desc, info = _open_descriptor_file(shared, path, top.name, text, parts,
                                               allow_outside)
        info.compressed = any(p.compressed for p in parts)
        parent = _open_parent(shared, path, desc, info, ignore_cid, allow_outside, chain)
    except BaseException:
        for p in parts:
            p.close()
        raise
    return VmdkDisk(info.path, parts, info, parent)


def _open_monolithic(shared: _Shared, path: str, top,
                     parts: list[_Part]) -> tuple[Descriptor | None, DiskInfo]:
    """A sparse file carrying its own descriptor (monolithicSparse, streamOptimized, deltas)."""
    def make(_path):
        return SparseExtent(top, shared.budget)
    extent, release = shared.get("sparse", path, make)
    if extent.file is not top:
        top.close()              # another extent line or chain link has it open already
    parts.append(_SparsePart(0, extent.size, extent, release))
    name = top.name
    desc = None
    if extent.descriptor_bytes is not None:
        desc = parse_descriptor(extent.descriptor_bytes, name, extent.descriptor_at)
    default_type = ("vmfsSparse" if extent.cowd else "seSparse" if extent.sesparse else
                    "streamOptimized" if extent.header.compressed else "monolithicSparse")
    access = desc.extents[0].access if desc is not None and len(desc.extents) == 1 else "RW"
    info = _info(name, desc, extent.size, default_type)
    info.extents = [ExtentFile(access, extent.header.capacity,
                               "VMFSSPARSE" if extent.cowd else
                               "SESPARSE" if extent.sesparse else "SPARSE", name)]
    return desc, info


def _read_descriptor_file(top) -> bytes:
    if top.size > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError(f"not a VMDK descriptor: a {top.size}-byte file without a sparse "
                              "header", top.name, 0)
    return top.pread(top.size, 0)


def _open_descriptor_file(shared: _Shared, path: str, name: str, text: bytes,
                          parts: list[_Part], allow_outside: bool) -> tuple[Descriptor, DiskInfo]:
    fs = shared.fs
    desc = parse_descriptor(text, name, 0)
    info = _info(name, desc, desc.total_sectors * SECTOR, None)
    start = 0
    for line in desc.extents:
        length = line.sectors * SECTOR
        file_name = None
        if line.type == "ZERO" or line.access == "NOACCESS":
            part: _Part = _ZeroPart(start, length)
        elif line.type in FLAT_TYPES:
            f, release = _open_extent(shared, "flat", line, path, name, allow_outside,
                                      lambda p: fs.open(p))
            file_name = f.name
            part = _FlatPart(start, length, f, line.offset * SECTOR, release)
        elif line.type in ("SPARSE", "VMFSSPARSE", "SESPARSE"):
            extent, release = _open_extent(shared, "sparse", line, path, name, allow_outside,
                                           lambda p: _open_sparse(shared, fs.open(p), line))
            file_name = extent.path
            part = _SparsePart(start, length, extent, release)
        else:
            raise UnsupportedFormatError(f"{line.type} extents (line {line.line_no}) are not read",
                                         name, line.at)
        parts.append(part)
        info.extents.append(ExtentFile(line.access, line.sectors, line.type, file_name,
                                       line.offset))
        start += length
    return desc, info


def _open_extent(shared: _Shared, kind: str, line, path: str, name: str, allow_outside: bool,
                 make):
    fs = shared.fs
    file_path = fs.resolve(line.path, path, allow_outside, at=line.at)
    if not fs.is_file(file_path):
        raise DescriptorError(f"extent file {line.path!r} (line {line.line_no}) not found or "
                              "not a regular file", name, line.at)
    try:
        return shared.get(kind, file_path, make)
    except DiskIOError as e:
        if e.offset is not None:
            raise
        # the file itself could not be opened: say which descriptor line named it
        raise DiskIOError(f"extent file {line.path!r} (line {line.line_no}): {e.reason}",
                          name, line.at) from None


def _open_sparse(shared: _Shared, f, line) -> SparseExtent:
    """A sparse extent file; like qemu, the header's magic decides how it is read."""
    try:
        head = f.pread(8, 0)
    except BaseException:
        f.close()
        raise
    if head[:4] not in (MAGIC, COWD_MAGIC) and head != SESPARSE_MAGIC:
        f.close()
        raise UnsupportedFormatError(f"{line.type} extent is not a hosted sparse "
                                     "(KDMV), vmfsSparse (COWD) or seSparse file", f.name, 0)
    return SparseExtent(f, shared.budget)


def _info(path: str, desc: Descriptor | None, size: int, default_type: str | None) -> DiskInfo:
    info = DiskInfo(path=path, format="vmdk", virtual_size=size, create_type=default_type)
    if desc is not None:
        info.create_type = desc.create_type or default_type
        info.cid = desc.cid(path)
        info.parent_cid = desc.parent_cid(path)
        info.adapter_type = desc.adapter_type
    return info


def _open_parent(shared: _Shared, path: str, desc: Descriptor | None, info: DiskInfo,
                 ignore_cid: bool, allow_outside: bool, chain: list[str]) -> VmdkDisk | None:
    fs = shared.fs
    if desc is None:
        return None
    hint = desc.parent_hint
    if hint is None:
        if info.parent_cid not in (None, NO_PARENT_CID):
            raise ParentChainError(f"parentCID={info.parent_cid:08x} but no "
                                   "parentFileNameHint names the parent", info.path,
                                   desc.at.get("parentCID"))
        return None
    hint_at = desc.at.get("parentFileNameHint")
    parent_path = fs.resolve(hint, path, allow_outside, what="parent", at=hint_at)
    if not fs.is_file(parent_path):
        raise ParentChainError(f"parent disk {hint!r} not found ({parent_path})", info.path,
                               hint_at)
    real = fs.identity(parent_path)
    if real in chain:
        raise ParentChainError(f"snapshot parent chain loops: {' -> '.join(chain + [real])}",
                               info.path, hint_at)
    if len(chain) > MAX_CHAIN_DEPTH:
        raise ParentChainError(f"snapshot parent chain deeper than {MAX_CHAIN_DEPTH}",
                               info.path, hint_at)
    parent = _open(shared, parent_path, ignore_cid, allow_outside, chain)
    try:
        if info.parent_cid is None and not ignore_cid:
            raise CidMismatchError(
                f"parentFileNameHint names parent {parent_path} but no parentCID says which "
                "state of it this delta was taken from (ignore_cid_mismatch to read anyway)",
                info.path, hint_at)
        if info.parent_cid != parent.info.cid and not ignore_cid:
            raise CidMismatchError(
                f"parentCID {_hex(info.parent_cid)} does not match the CID "
                f"{_hex(parent.info.cid)} of parent {parent_path} (the parent changed after "
                "the snapshot was taken; ignore_cid_mismatch to read anyway)", info.path,
                desc.at.get("parentCID"))
    except BaseException:
        parent.close()
        raise
    info.parent = parent.info
    return parent


def _hex(v: int | None) -> str:
    return "none" if v is None else f"{v:08x}"
