"""VMDK text descriptors: the ``# Disk DescriptorFile`` that says what a disk is made of.

A descriptor lives in its own small file (monolithicFlat, twoGbMaxExtent*, vmfs) or is
embedded in a sparse extent (monolithicSparse, streamOptimized).  It holds ``key=value``
lines (CID, parentCID, createType, parentFileNameHint), the extent lines
(``RW 20480 SPARSE "disk-s001.vmdk"``, ``RW 4096 FLAT "disk-flat.vmdk" 0``,
``RW 100 ZERO``) and the disk database (``ddb.adapterType = "lsilogic"``).

The input is untrusted: its size is capped, every line is checked, and extent or parent
paths that leave the descriptor's folder are refused unless the caller allows them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import DescriptorError, UnsafeExtentPathError

#: descriptors are a few hundred bytes; anything past this is not a descriptor
MAX_DESCRIPTOR_BYTES = 1 << 20
#: a disk made of more extent lines than this is hostile (a 2 TB twoGbMaxExtent disk has 1024)
MAX_EXTENT_LINES = 65536
#: the largest VMDK anyone makes is ESXi's 62 TB; past 64 TiB a size is hostile (and would
#: drive per-block allocations further on), so disks and extents are refused above it
MAX_DISK_BYTES = 1 << 46
#: a flat extent's start in its file (a raw device may be larger than any disk)
MAX_FLAT_OFFSET_BYTES = 1 << 62

NO_PARENT_CID = 0xFFFFFFFF
ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
#: extent types we know (VMFSSPARSE: ESX redo logs, COWD; SESPARSE: VMFS6 snapshots)
EXTENT_TYPES = ("SPARSE", "FLAT", "VMFS", "VMFSRDM", "VMFSRAW", "ZERO",
                "VMFSSPARSE", "SESPARSE")
FLAT_TYPES = ("FLAT", "VMFS", "VMFSRDM", "VMFSRAW")

_EXTENT_RE = re.compile(
    r'^(?P<access>[A-Z]+)\s+(?P<sectors>\d+)\s+(?P<type>[A-Z]+)'
    r'(?:\s+"(?P<path>[^"]*)"(?:\s+(?P<offset>\d+))?)?\s*$')
_KEY_RE = re.compile(r'[A-Za-z0-9_.]+')
_ENCODING_RE = re.compile(r'encoding\s*=\s*"?(windows-125\d|iso-8859-\d+)"?', re.I)
#: sector counts and offsets are at most 2^64 (20 digits); int() of more is slow or refused
_MAX_DIGITS = 20


@dataclass(slots=True)
class ExtentLine:
    """One extent line as written (path not yet resolved)."""

    access: str
    sectors: int
    type: str
    path: str | None
    offset: int          # FLAT: start in the file, in sectors
    line_no: int
    at: int = 0          # byte offset of the line in the descriptor's file


@dataclass(slots=True)
class Descriptor:
    """A parsed descriptor; ``values`` holds every ``key=value`` (quotes removed)."""

    values: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)
    #: byte offset (in the descriptor's file) of each key's line, for error messages
    at: dict[str, int] = field(default_factory=dict)

    @property
    def create_type(self) -> str | None:
        return self.values.get("createType")

    @property
    def adapter_type(self) -> str | None:
        return self.values.get("ddb.adapterType")

    @property
    def parent_hint(self) -> str | None:
        hint = self.values.get("parentFileNameHint")
        return hint or None

    def cid(self, where: str) -> int | None:
        return self._hex("CID", where)

    def parent_cid(self, where: str) -> int | None:
        return self._hex("parentCID", where)

    def _hex(self, key: str, where: str) -> int | None:
        raw = self.values.get(key)
        if raw is None:
            return None
        try:
            value = int(raw, 16)
        except ValueError:
            raise DescriptorError(f"{key}={raw!r} is not a hexadecimal number", where,
                                  self.at.get(key)) from None
        if not 0 <= value <= 0xFFFFFFFF:
            raise DescriptorError(f"{key}={raw!r} does not fit 32 bits", where, self.at.get(key))
        return value

    @property
    def total_sectors(self) -> int:
        return sum(e.sectors for e in self.extents)


def looks_like_descriptor(data: bytes) -> bool:
    """True when ``data`` (the start of a file) reads as a text descriptor."""
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    head = data.split(b"\0", 1)[0]        # descriptor text ends at its first NUL
    return text.startswith(b"# Disk DescriptorFile") or (
        b"createType" in head and b"version=" in head)


def parse_descriptor(data: bytes, where: str, base_offset: int = 0) -> Descriptor:
    """Parse descriptor text; ``where`` names the file and ``base_offset`` its place in it.

    Raises :class:`DescriptorError` (with the byte offset of the bad line) on anything
    that is not a well-formed descriptor.
    """
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError(f"descriptor of {len(data)} bytes is larger than "
                              f"{MAX_DESCRIPTOR_BYTES}", where, base_offset)
    nul = data.find(b"\0")
    if nul >= 0:
        # the text ends at the first NUL: descriptors are padded to whole sectors, and
        # qemu-img pads its descriptor files with whatever was in memory after the string
        data = data[:nul]
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    encoding = "utf-8"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        # older VMware products write encoding="windows-1252" (or another code page)
        encoding = _declared_encoding(data)
        if encoding is None:
            raise DescriptorError("descriptor is not UTF-8 text (and names no other "
                                  "encoding)", where, base_offset + e.start) from None

    desc = Descriptor()
    pos = 0
    for line_no, raw_line in enumerate(data.splitlines(keepends=True), 1):
        line_offset = base_offset + pos
        pos += len(raw_line)
        line = raw_line.decode(encoding, errors="replace").strip()
        if not line or line.startswith("#"):
            continue
        if line.split(None, 1)[0] in ACCESS_MODES:
            desc.extents.append(_parse_extent(line, line_no, where, line_offset))
            if len(desc.extents) > MAX_EXTENT_LINES:
                raise DescriptorError(f"more than {MAX_EXTENT_LINES} extent lines",
                                      where, line_offset)
            continue
        # split by hand: a regex with a lazy value and trailing blanks is quadratic in them
        key, eq, value = line.partition("=")
        key = key.rstrip()
        if not eq or _KEY_RE.fullmatch(key) is None:
            raise DescriptorError(f"line {line_no} is neither key=value nor an extent: "
                                  f"{_short(line)!r}", where, line_offset)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        desc.values[key] = value
        desc.at[key] = line_offset
    if not desc.extents:
        raise DescriptorError("descriptor lists no extents", where, base_offset)
    if desc.total_sectors * 512 > MAX_DISK_BYTES:
        raise DescriptorError(f"extents add up to {desc.total_sectors} sectors, an absurd size "
                              f"(more than the {MAX_DISK_BYTES >> 40} TiB a VMDK may hold)",
                              where, desc.extents[0].at)
    return desc


def _declared_encoding(data: bytes) -> str | None:
    """The ``encoding="..."`` a non-UTF-8 descriptor names (a code page we decode), if any."""
    for raw in data.splitlines():
        m = _ENCODING_RE.match(raw.decode("latin-1").strip())
        if m is not None:
            return m.group(1).lower()
    return None


def _parse_extent(line: str, line_no: int, where: str, offset: int) -> ExtentLine:
    m = _EXTENT_RE.match(line)
    if m is None:
        raise DescriptorError(f"malformed extent line {line_no}: {_short(line)!r}", where, offset)
    if len(m["sectors"]) > _MAX_DIGITS or len(m["offset"] or "") > _MAX_DIGITS:
        raise DescriptorError(f"absurdly long number on extent line {line_no}", where, offset)
    access, etype, path = m["access"], m["type"], m["path"]
    sectors = int(m["sectors"])
    if etype not in EXTENT_TYPES:
        raise DescriptorError(f"unknown extent type {etype!r} on line {line_no}", where, offset)
    if sectors <= 0 or sectors * 512 > MAX_DISK_BYTES:
        raise DescriptorError(f"extent of {sectors} sectors on line {line_no} (1 to "
                              f"{MAX_DISK_BYTES // 512} expected)", where, offset)
    if etype == "ZERO":
        if path is not None:
            raise DescriptorError(f"ZERO extent with a file on line {line_no}", where, offset)
    elif not path:
        raise DescriptorError(f"{etype} extent without a file name on line {line_no}",
                              where, offset)
    flat_offset = int(m["offset"]) if m["offset"] is not None else 0
    if m["offset"] is not None and etype not in FLAT_TYPES:
        raise DescriptorError(f"{etype} extent with a start offset on line {line_no}",
                              where, offset)
    if flat_offset * 512 > MAX_FLAT_OFFSET_BYTES:
        raise DescriptorError(f"absurd flat extent offset on line {line_no}", where, offset)
    return ExtentLine(access, sectors, etype, path, flat_offset, line_no, offset)


def resolve_extent_path(name: str, descriptor_path: str, allow_outside: bool,
                        what: str = "extent", at: int | None = None) -> str:
    """The path of a file a descriptor names, relative to the descriptor's folder.

    Absolute names and names that climb out of the folder (``../``) are refused with
    :class:`UnsafeExtentPathError` unless ``allow_outside``.
    """
    if "\0" in name:
        raise UnsafeExtentPathError(f"{what} file name contains a NUL byte", descriptor_path,
                                    at)
    folder = os.path.dirname(os.path.abspath(descriptor_path))
    if os.path.isabs(name):
        if not allow_outside:
            raise UnsafeExtentPathError(
                f"{what} file {name!r} is an absolute path (allow_outside_paths to accept)",
                descriptor_path, at)
        return os.path.normpath(name)
    normal = os.path.normpath(name)
    path = os.path.normpath(os.path.join(folder, normal))
    if allow_outside:
        return path
    if normal == ".." or normal.startswith("../"):
        raise UnsafeExtentPathError(
            f"{what} file {name!r} is outside the descriptor's folder "
            f"(allow_outside_paths to accept)", descriptor_path, at)
    # a symbolic link inside the folder must not lead out of it either
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([real_folder, real]) != real_folder:
        raise UnsafeExtentPathError(
            f"{what} file {name!r} is a link to {real}, outside the descriptor's folder "
            f"(allow_outside_paths to accept)", descriptor_path, at)
    return path


def _short(line: str, limit: int = 80) -> str:
    return line if len(line) <= limit else line[:limit] + "..."
