"""Raw disk images: the file's bytes are the disk's bytes.

Sparse-aware: allocated extents come from ``SEEK_DATA``/``SEEK_HOLE`` (holes read as
zeros and are not extents).  Filesystems without hole reporting simply report the
whole file as data, which is correct, only slower to scan.
"""

from __future__ import annotations

import os
import stat
from typing import Iterator

from ..errors import DiskError
from .base import Disk, DiskInfo, Extent, ExtentFile, ExtentKind
from .files import LocalFile


class RawDisk(Disk):
    """A raw image file or block device; ``size`` overrides the file's own size (bytes
    past the file's end then read as zeros)."""

    def __init__(self, path, size: int | None = None):
        self.path = os.fspath(path)
        self._file = LocalFile(self.path)
        mode = os.fstat(self._file.fileno()).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            self.close()
            raise DiskError("not a regular file or block device", self.path)
        self.size = self._file.size if size is None else size
        self.info = DiskInfo(
            path=self.path, format="raw", virtual_size=self.size,
            extents=[ExtentFile("RW", (self.size + 511) // 512, "FLAT", self.path)])

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        want = max(0, min(len(view), self.size - offset))
        got = self._file.readinto(offset, view[:want])
        view[got:want] = bytes(want - got)     # past the file's end, inside the size: zeros
        return want

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        start, end = self._clip(start, end)
        for a, b in self._file.data_ranges(start, min(end, self._file.size)):
            yield Extent(a, b - a, ExtentKind.DATA)

    def close(self) -> None:
        self._file.close()

    def fileno(self) -> int:
        return self._file.fileno()
