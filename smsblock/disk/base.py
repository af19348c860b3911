"""The disk protocol every reader implements.

A :class:`Disk` is a read-only, random-access view of a virtual disk's guest-visible
bytes.  Its contract, relied on by the scan, the image step and the writers:

* ``size`` is the virtual size in bytes.
* ``readinto(offset, buf)`` fills ``buf`` with the bytes at ``offset`` and returns the
  count filled; it is short only at the end of the disk.  It is safe to call from several
  threads at once (no shared file position), and the native readers release the GIL
  while they copy and inflate, so threads really run in parallel.
* ``extents(start, end)`` yields the ranges that may hold data, sorted, not
  overlapping, adjacent ranges of the same kind merged.  Bytes outside every extent read
  as zeros.  ``ZERO`` extents are known to read as zeros (a VMDK zero grain, say); a
  reader never has to read them.  ``DATA`` extents may still contain zeros.
* ``info`` carries the metadata (format, createType, CIDs, adapter, extents, parents).
* ``path`` names the disk in messages (it need not be a file); ``close()`` is idempotent,
  and nothing reads after it or while it runs.
* Failures are :mod:`smsblock.errors` classes: ``DiskIOError(message, path, offset)`` when
  the storage fails, ``DiskFormatError`` when what it holds is malformed; never zeros for
  a read that failed.

A disk of one's own subclasses :class:`Disk` and implements ``readinto``, ``extents`` and
``close`` and sets ``path``, ``size`` and ``info``; docs/api.md ("Writing a Disk") has
the details and a worked, tested example.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, asdict
from typing import Iterator

from ..errors import UsageError


class ExtentKind(str, enum.Enum):
    DATA = "data"
    ZERO = "zero"


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of the virtual disk: ``[offset, offset + length)``."""

    offset: int
    length: int
    kind: ExtentKind = ExtentKind.DATA

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_data(self) -> bool:
        return self.kind is ExtentKind.DATA


@dataclass(slots=True)
class ExtentFile:
    """One line of a VMDK descriptor's extent section (or the single file of a raw disk)."""

    access: str          # RW, RDONLY, NOACCESS
    sectors: int         # size in 512-byte sectors
    type: str            # SPARSE, FLAT, VMFS, VMFSSPARSE, ZERO, ...
    path: str | None     # resolved file path (None for ZERO extents)
    offset: int = 0      # FLAT extents: start offset in the file, in sectors


@dataclass(slots=True)
class DiskInfo:
    """What a reader knows about a disk besides its bytes."""

    path: str
    format: str                          # "raw" or "vmdk"
    virtual_size: int
    create_type: str | None = None       # VMDK createType
    cid: int | None = None
    parent_cid: int | None = None
    adapter_type: str | None = None
    extents: list[ExtentFile] = field(default_factory=list)
    parent: "DiskInfo | None" = None     # the next disk down a snapshot chain
    compressed: bool = False             # grains are deflate-compressed

    @property
    def parent_chain(self) -> list[str]:
        """Paths of the parents, nearest first."""
        chain, p = [], self.parent
        while p is not None:
            chain.append(p.path)
            p = p.parent
        return chain

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parent"] = self.parent.to_dict() if self.parent else None
        d["parent_chain"] = self.parent_chain
        for key in ("cid", "parent_cid"):
            if d[key] is not None:
                d[key] = f"{d[key]:08x}"
        return d


class Disk:
    """Base class of disk readers; see the module docstring for the contract.

    ``readinto`` is called from several threads at once (the scan's workers), each with
    its own buffer; ``extents`` should answer from what the disk knew when it was opened.
    """

    path: str
    size: int
    info: DiskInfo
    #: readers that pay off at once when copying the disk whole (write_raw's threads):
    #: local files keep 2 cores busy with 2; a disk read over a network service, whose
    #: time is latency (an EBS snapshot), says more
    read_parallelism: int = 2

    # -- to implement -----------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        raise NotImplementedError

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- shared -----------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (fewer only past the end of the disk)."""
        self._check_range(offset, length)
        length = max(0, min(length, self.size - offset))
        buf = bytearray(length)
        n = self.readinto(offset, buf)
        return bytes(buf) if n == length else bytes(buf[:n])

    def allocated_bytes(self) -> int:
        """Bytes in DATA extents (what a copy has to read)."""
        return sum(e.length for e in self.extents() if e.is_data)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise UsageError(f"{self.path}: negative read offset or length ({offset}, {length})")

    def _clip(self, start: int, end: int | None) -> tuple[int, int]:
        end = self.size if end is None else min(end, self.size)
        if start < 0:
            raise UsageError(f"{self.path}: negative extent start {start}")
        return start, end

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} size={self.size}>"


def clip_extents(extents, start: int, end: int) -> Iterator[Extent]:
    """Cut sorted extents to ``[start, end)`` and merge adjacent ones of one kind."""
    pending: Extent | None = None
    for e in extents:
        s, t = max(e.offset, start), min(e.end, end)
        if s >= t:
            if e.offset >= end:
                break
            continue
        if pending is not None and pending.end == s and pending.kind is e.kind:
            pending = Extent(pending.offset, t - pending.offset, e.kind)
            continue
        if pending is not None:
            yield pending
        pending = Extent(s, t - s, e.kind)
    if pending is not None:
        yield pending

