"""Where a VMDK's files come from: the local filesystem, or an opener (datastore HTTP).

The VMDK reader never touches paths or file descriptors directly; it asks a *file space*
to open, name and locate files relative to a descriptor.  ``LocalFiles`` is the local
filesystem (positional reads on file descriptors, ``SEEK_DATA``/``SEEK_HOLE``, real-path
checks against symbolic links).  ``OpenerFiles`` wraps an ``opener(path) -> file``
whose files have ``name``, ``size``, ``pread(length, offset)``, ``readinto(offset, buf)``
(thread-safe) and ``close()``, as ``smsblock.source.datastore_http.DatastoreFile`` has;
paths there are ``/``-separated and relative to the datastore.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat

from ..errors import DiskIOError, UnsafeExtentPathError
from .descriptor import resolve_extent_path


class LocalFile:
    """A local file read with ``pread`` (no shared position: safe from several threads)."""

    def __init__(self, path: str):
        self.path = self.name = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise DiskIOError(f"cannot open: {e.strerror}", path) from None
        st = os.fstat(self._fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        else:
            self.size = st.st_size
        self._seek_data = hasattr(os, "SEEK_DATA") and stat.S_ISREG(st.st_mode)

    def fileno(self) -> int:
        return self._fd

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise DiskIOError(f"read failed: {e.strerror}", self.path, offset) from None

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise DiskIOError(f"read failed: {e.strerror}", self.path, offset + done) from None
            if n == 0:
                break
            done += n
        return done

    def data_ranges(self, lo: int, hi: int):
        """(start, end) ranges of [lo, hi) that may hold data (SEEK_DATA/SEEK_HOLE)."""
        pos = lo
        while pos < hi:
            if not self._seek_data:
                yield pos, hi
                return
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                if e.errno == errno.EINVAL:
                    self._seek_data = False
                    continue
                raise DiskIOError(f"SEEK_DATA failed: {e.strerror}", self.path, pos) from None
            if data >= hi:
                return
            data = max(data, pos)
            try:
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), hi)
            except OSError as e:
                raise DiskIOError(f"SEEK_HOLE failed: {e.strerror}", self.path, data) from None
            yield data, hole
            pos = hole

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self.close()


class OpenerFile:
    """A file from an opener, with the few extras the reader wants."""

    def __init__(self, inner, path: str):
        self.inner = inner
        self.path = path
        self.name = getattr(inner, "name", path)
        self.size = inner.size
        self.closed = False

    def fileno(self) -> int:
        return -1

    def pread(self, length: int, offset: int) -> bytes:
        return self.inner.pread(length, offset)

    def readinto(self, offset: int, buf) -> int:
        return self.inner.readinto(offset, buf)

    def data_ranges(self, lo: int, hi: int):
        # an opener's file that knows its holes (a local file: SEEK_DATA) says so; others
        # are all data
        inner = getattr(self.inner, "data_ranges", None)
        if inner is not None:
            yield from inner(lo, hi)
        elif lo < hi:
            yield lo, hi

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()


class LocalFiles:
    """The local filesystem."""

    def open(self, path: str) -> LocalFile:
        return LocalFile(path)

    def is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def resolve(self, name: str, descriptor_path: str, allow_outside: bool,
                what: str = "extent", at: int | None = None) -> str:
        return resolve_extent_path(name, descriptor_path, allow_outside, what, at)

    def identity(self, path: str) -> str:
        return os.path.realpath(path)


class OpenerFiles:
    """Files reached through ``opener(path)``; paths are ``/``-separated."""

    def __init__(self, opener):
        self.opener = opener

    def open(self, path: str) -> OpenerFile:
        return OpenerFile(self.opener(path), path)

    def is_file(self, path: str) -> bool:
        return True          # the opener says so when it is asked to open it

    def resolve(self, name: str, descriptor_path: str, allow_outside: bool,
                what: str = "extent", at: int | None = None) -> str:
        if "\0" in name:
            raise UnsafeExtentPathError(f"{what} file name contains a NUL byte",
                                        descriptor_path, at)
        name = name.replace("\\", "/")
        folder = posixpath.dirname(descriptor_path)
        if posixpath.isabs(name):
            if not allow_outside:
                raise UnsafeExtentPathError(
                    f"{what} file {name!r} is an absolute path (allow_outside_paths to "
                    "accept)", descriptor_path, at)
            return posixpath.normpath(name)
        normal = posixpath.normpath(name)
        if (normal == ".." or normal.startswith("../")) and not allow_outside:
            raise UnsafeExtentPathError(
                f"{what} file {name!r} is outside the descriptor's folder "
                "(allow_outside_paths to accept)", descriptor_path, at)
        return posixpath.normpath(posixpath.join(folder, normal))

    def identity(self, path: str) -> str:
        return posixpath.normpath(path)
