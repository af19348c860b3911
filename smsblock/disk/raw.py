"""Raw disk images: the file's bytes are the disk's bytes.

Sparse-aware: allocated extents come from ``SEEK_DATA``/``SEEK_HOLE`` (holes read as
zeros and are not extents).  Filesystems without hole reporting simply report the
whole file as data, which is correct, only slower to scan.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

from ..errors import DiskIOError, DiskError
from .base import Disk, DiskInfo, Extent, ExtentFile, ExtentKind


class RawDisk(Disk):
    def __init__(self, path, size: int | None = None):
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise DiskIOError(f"cannot open: {e.strerror}", self.path) from None
        st = os.fstat(self._fd)
        if stat.S_ISBLK(st.st_mode):
            file_size = os.lseek(self._fd, 0, os.SEEK_END)
            self._sparse_aware = False
        elif stat.S_ISREG(st.st_mode):
            file_size = st.st_size
            self._sparse_aware = hasattr(os, "SEEK_DATA")
        else:
            self.close()
            raise DiskError("not a regular file or block device", self.path)
        self.size = file_size if size is None else size
        self._file_size = file_size
        self.info = DiskInfo(
            path=self.path, format="raw", virtual_size=self.size,
            extents=[ExtentFile("RW", (self.size + 511) // 512, "FLAT", self.path)])

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        want = max(0, min(len(view), self.size - offset))
        done = 0
        while done < want:
            try:
                n = os.preadv(self._fd, [view[done:want]], offset + done)
            except OSError as e:
                raise DiskIOError(f"read failed: {e.strerror}", self.path, offset + done) from None
            if n == 0:      # past the file's end but inside a declared size: zeros
                view[done:want] = bytes(want - done)
                done = want
                break
            done += n
        return done

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        start, end = self._clip(start, end)
        end_data = min(end, self._file_size)
        if not self._sparse_aware:
            if start < end_data:
                yield Extent(start, end_data - start, ExtentKind.DATA)
            return
        pos = start
        while pos < end_data:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # no data after pos
                    return
                if e.errno == errno.EINVAL:     # hole reporting unsupported here
                    yield Extent(pos, end_data - pos, ExtentKind.DATA)
                    return
                raise DiskIOError(f"SEEK_DATA failed: {e.strerror}", self.path, pos) from None
            if data >= end_data:
                return
            try:
                hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            except OSError as e:
                raise DiskIOError(f"SEEK_HOLE failed: {e.strerror}", self.path, data) from None
            hole = min(hole, end_data)
            yield Extent(data, hole - data, ExtentKind.DATA)
            pos = hole

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def fileno(self) -> int:
        return self._fd

    def __del__(self):
        self.close()
