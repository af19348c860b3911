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
import errno
import os
from typing import Iterator

import numpy as np

from ..errors import (DescriptorError, DiskIOError, DiskFormatError, CidMismatchError,
                      ParentChainError, TruncatedDiskError, UnsupportedFormatError)
from .base import Disk, DiskInfo, Extent, ExtentFile, ExtentKind, clip_extents
from .descriptor import (FLAT_TYPES, MAX_DESCRIPTOR_BYTES, NO_PARENT_CID, Descriptor,
                         parse_descriptor, resolve_extent_path)
from .sparse import MAGIC, SECTOR, SparseExtent

COWD_MAGIC = b"COWD"
#: a snapshot chain deeper than this is a loop we failed to see, or hostile
MAX_CHAIN_DEPTH = 255


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

    def __init__(self, start: int, length: int, path: str, file_offset: int):
        self.start, self.length, self.path, self.file_offset = start, length, path, file_offset
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise DiskIOError(f"cannot open flat extent: {e.strerror}", path) from None
        size = os.fstat(self._fd).st_size
        if size < file_offset + length:
            os.close(self._fd)
            self._fd = -1
            raise TruncatedDiskError(f"flat extent file of {size} bytes is shorter than the "
                                     f"{file_offset + length} bytes its descriptor line needs",
                                     path, size)
        self._seek_data = hasattr(os, "SEEK_DATA")

    def readinto(self, offset, view, holes):
        done, want = 0, len(view)
        while done < want:
            at = self.file_offset + offset + done
            try:
                n = os.preadv(self._fd, [view[done:]], at)
            except OSError as e:
                raise DiskIOError(f"read failed: {e.strerror}", self.path, at) from None
            if n == 0:
                raise TruncatedDiskError("flat extent file shrank while open", self.path, at)
            done += n

    def extents(self, lo, hi):
        """DATA where the file holds data (SEEK_DATA/SEEK_HOLE); holes read as zeros."""
        base = self.file_offset
        pos = lo
        while pos < hi:
            if not self._seek_data:
                yield pos, hi - pos, ExtentKind.DATA
                return
            try:
                data = os.lseek(self._fd, base + pos, os.SEEK_DATA) - base
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                if e.errno == errno.EINVAL:
                    self._seek_data = False
                    continue
                raise DiskIOError(f"SEEK_DATA failed: {e.strerror}", self.path, base + pos) from None
            if data >= hi:
                return
            data = max(data, pos)
            hole = min(os.lseek(self._fd, base + data, os.SEEK_HOLE) - base, hi)
            yield data, hole - data, ExtentKind.DATA
            pos = hole

    def close(self):
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)


class _SparsePart(_Part):
    """A hosted sparse extent; bytes past its own capacity read as unallocated."""

    def __init__(self, start: int, length: int, extent: SparseExtent):
        self.start, self.length, self.extent = start, length, extent
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
        self.extent.close()


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

    def _raw_extents(self, start: int, end: int) -> Iterator[Extent]:
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        for part in self._parts[i:]:
            if part.start >= end:
                break
            lo, hi = max(start, part.start), min(end, part.start + part.length)
            if lo >= hi:
                continue
            for off, length, kind in part.extents(lo - part.start, hi - part.start):
                a = part.start + off
                if kind is not None:
                    yield Extent(a, length, kind)
                elif self.parent is not None:
                    yield from self.parent.extents(a, min(a + length, self.parent.size))

    def close(self) -> None:
        self._closed = True
        for part in getattr(self, "_parts", ()):
            part.close()
        self._parts = []
        if getattr(self, "parent", None) is not None:
            self.parent.close()


# --- opening -------------------------------------------------------------------------

def open_vmdk(path, *, ignore_cid_mismatch: bool = False,
              allow_outside_paths: bool = False) -> VmdkDisk:
    """Open a VMDK (descriptor file or sparse file with embedded descriptor), with parents.

    Raises a :class:`DiskFormatError` subclass naming the file and offset on malformed or
    hostile input, :class:`UnsafeExtentPathError` for extents or parents outside the
    descriptor's folder (unless ``allow_outside_paths``), :class:`ParentChainError` for a
    missing or looping parent chain and :class:`CidMismatchError` when a child's
    parentCID is not its parent's CID (unless ``ignore_cid_mismatch``).
    """
    return _open(os.fspath(path), ignore_cid_mismatch, allow_outside_paths, [])


def _open(path: str, ignore_cid: bool, allow_outside: bool, chain: list[str]) -> VmdkDisk:
    """Open one disk of a chain; ``chain`` holds the real paths of the children above it."""
    chain = chain + [os.path.realpath(path)]

    parts: list[_Part] = []
    try:
        head = _read_head(path)
        if head[:4] == COWD_MAGIC:
            raise UnsupportedFormatError("ESX vmfsSparse (COWD) extents are not read", path, 0)
        if head[:4] == MAGIC:
            desc, info = _open_monolithic(path, parts)
        else:
            desc, info = _open_descriptor_file(path, parts, allow_outside)
        info.compressed = any(p.compressed for p in parts)
        parent = _open_parent(path, desc, info, ignore_cid, allow_outside, chain)
    except BaseException:
        for p in parts:
            p.close()
        raise
    return VmdkDisk(path, parts, info, parent)


def _read_head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(SECTOR)
    except OSError as e:
        raise DiskIOError(f"cannot open: {e.strerror}", path) from None


def _open_monolithic(path: str, parts: list[_Part]) -> tuple[Descriptor | None, DiskInfo]:
    """A sparse file carrying its own descriptor (monolithicSparse, streamOptimized, deltas)."""
    extent = SparseExtent(path)
    parts.append(_SparsePart(0, extent.size, extent))
    desc = None
    if extent.descriptor_bytes is not None:
        desc_at = extent.first_header.descriptor_offset * SECTOR
        desc = parse_descriptor(extent.descriptor_bytes, path, desc_at)
    default_type = "streamOptimized" if extent.header.compressed else "monolithicSparse"
    access = desc.extents[0].access if desc is not None and len(desc.extents) == 1 else "RW"
    info = _info(path, desc, extent.size, default_type)
    info.extents = [ExtentFile(access, extent.header.capacity, "SPARSE", path)]
    return desc, info


def _open_descriptor_file(path: str, parts: list[_Part],
                          allow_outside: bool) -> tuple[Descriptor, DiskInfo]:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DiskIOError(f"cannot stat: {e.strerror}", path) from None
    if size > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError(f"not a VMDK descriptor: a {size}-byte file without a sparse "
                              "header", path, 0)
    with open(path, "rb") as f:
        text = f.read(MAX_DESCRIPTOR_BYTES)
    desc = parse_descriptor(text, path, 0)
    info = _info(path, desc, desc.total_sectors * SECTOR, None)
    start = 0
    for line in desc.extents:
        length = line.sectors * SECTOR
        file_path = None
        if line.type == "ZERO" or line.access == "NOACCESS":
            part: _Part = _ZeroPart(start, length)
        elif line.type in FLAT_TYPES:
            file_path = _extent_file(line, path, allow_outside)
            part = _FlatPart(start, length, file_path, line.offset * SECTOR)
        elif line.type == "SPARSE":
            file_path = _extent_file(line, path, allow_outside)
            if _read_head(file_path)[:4] != MAGIC:
                raise UnsupportedFormatError("SPARSE extent is not a hosted sparse (KDMV) "
                                             "file", file_path, 0)
            part = _SparsePart(start, length, SparseExtent(file_path))
        else:
            raise UnsupportedFormatError(f"{line.type} extents (line {line.line_no}) are not read",
                                         path, line.at)
        parts.append(part)
        info.extents.append(ExtentFile(line.access, line.sectors, line.type, file_path,
                                       line.offset))
        start += length
    return desc, info


def _extent_file(line, descriptor_path: str, allow_outside: bool) -> str:
    file_path = resolve_extent_path(line.path, descriptor_path, allow_outside, at=line.at)
    if not os.path.isfile(file_path):
        raise DescriptorError(f"extent file {line.path!r} (line {line.line_no}) not found or "
                              "not a regular file", descriptor_path, line.at)
    return file_path


def _info(path: str, desc: Descriptor | None, size: int, default_type: str | None) -> DiskInfo:
    info = DiskInfo(path=path, format="vmdk", virtual_size=size, create_type=default_type)
    if desc is not None:
        info.create_type = desc.create_type or default_type
        info.cid = desc.cid(path)
        info.parent_cid = desc.parent_cid(path)
        info.adapter_type = desc.adapter_type
    return info


def _open_parent(path: str, desc: Descriptor | None, info: DiskInfo, ignore_cid: bool,
                 allow_outside: bool, chain: list[str]) -> VmdkDisk | None:
    if desc is None:
        return None
    hint = desc.parent_hint
    if hint is None:
        if info.parent_cid not in (None, NO_PARENT_CID):
            raise ParentChainError(f"parentCID={info.parent_cid:08x} but no "
                                   "parentFileNameHint names the parent", path,
                                   desc.at.get("parentCID"))
        return None
    hint_at = desc.at.get("parentFileNameHint")
    parent_path = resolve_extent_path(hint, path, allow_outside, what="parent", at=hint_at)
    if not os.path.exists(parent_path):
        raise ParentChainError(f"parent disk {hint!r} not found ({parent_path})", path, hint_at)
    real = os.path.realpath(parent_path)
    if real in chain:
        raise ParentChainError(f"snapshot parent chain loops: {' -> '.join(chain + [real])}",
                               path, hint_at)
    if len(chain) > MAX_CHAIN_DEPTH:
        raise ParentChainError(f"snapshot parent chain deeper than {MAX_CHAIN_DEPTH}",
                               path, hint_at)
    parent = _open(parent_path, ignore_cid, allow_outside, chain)
    try:
        if info.parent_cid != parent.info.cid and not ignore_cid:
            raise CidMismatchError(
                f"parentCID {_hex(info.parent_cid)} does not match the CID "
                f"{_hex(parent.info.cid)} of parent {parent_path} (the parent changed after "
                "the snapshot was taken; ignore_cid_mismatch to read anyway)", path,
                desc.at.get("parentCID"))
    except BaseException:
        parent.close()
        raise
    info.parent = parent.info
    return parent


def _hex(v: int | None) -> str:
    return "none" if v is None else f"{v:08x}"
