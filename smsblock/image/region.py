"""A bounded byte range of a disk (a partition), readable by offset or as a file object.

Filesystem libraries (the libyal bindings) want a Python file object; a :class:`Region`
gives them one over any :class:`~smsblock.disk.Disk` (a raw file, a VMDK, a stored run),
so they read only the sectors they need and nothing is copied out first.
"""

from __future__ import annotations

import io
import threading


class Region(io.RawIOBase):
    """Bytes ``[start, start + size)`` of ``disk``; reads past the disk's end are short."""

    def __init__(self, disk, start: int = 0, size: int | None = None):
        super().__init__()
        self.disk = disk
        self.start = start
        avail = max(0, disk.size - start)
        self.size = avail if size is None else max(0, size)
        self._pos = 0
        self._lock = threading.Lock()

    # -- random access -------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` inside the region (short at its end)."""
        if offset < 0 or length <= 0 or offset >= self.size:
            return b""
        length = min(length, self.size - offset)
        return self.disk.read(self.start + offset, length)

    def pread_exact(self, offset: int, length: int) -> bytes:
        """Like :meth:`pread`, padded with zeros to ``length`` (for fixed-size headers)."""
        data = self.pread(offset, length)
        return data if len(data) == length else data + bytes(length - len(data))

    # -- file object ----------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            if size is None or size < 0:
                size = self.size - self._pos
            data = self.pread(self._pos, size)
            self._pos += len(data)
            return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        memoryview(b).cast("B")[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        with self._lock:
            if whence == io.SEEK_SET:
                pos = offset
            elif whence == io.SEEK_CUR:
                pos = self._pos + offset
            elif whence == io.SEEK_END:
                pos = self.size + offset
            else:
                raise ValueError(f"bad whence {whence}")
            if pos < 0:
                raise OSError("seek before the start of the region")
            self._pos = pos
            return pos

    def tell(self) -> int:
        return self._pos

    # names libbfio looks for on Python file objects
    def get_offset(self) -> int:
        return self._pos

    def get_size(self) -> int:
        return self.size
