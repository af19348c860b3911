"""File-system helpers: durable writes, and creating and removing files safely.

Everything smsblock creates is private (files 0600, folders 0700) and is created so that
a symbolic link planted where smsblock writes cannot redirect it:

* a new file is always created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never opened
  through a link, never truncating a file that was there);
* a folder that smsblock owns (inside a store, a catalog, a staging area) is opened with
  ``O_DIRECTORY | O_NOFOLLOW``, one component at a time from its root, and the files in
  it are created, renamed and removed relative to that descriptor (``openat``,
  ``renameat``, ``unlinkat``), so swapping a component for a link cannot send a delete
  elsewhere.  The root a user names (``--store DIR``, ``--state DIR``) may itself be a
  link: the user chose it.

Helpers raise ``OSError`` (errno ``ELOOP`` for a link, with a readable ``strerror``), so
callers keep turning ``e.strerror`` into their one-line error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid

FILE_MODE = 0o600
DIR_MODE = 0o700

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
LINK_REFUSED = "is a symbolic link (smsblock does not write or delete through links)"


def link_error(path) -> OSError:
    return OSError(errno.ELOOP, LINK_REFUSED, os.fspath(path))


def _explain(e: OSError, name, dir_fd) -> OSError:
    """Turn the ELOOP/ENOTDIR/EEXIST of a refused link into a readable error."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return link_error(e.filename or name)
    return e


def fsync_dir(path) -> None:
    """Make renames and creations in the folder ``path`` (a path or an open folder
    descriptor) durable.  Filesystems that cannot fsync a folder (EINVAL) are left as
    they are."""
    fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        if fd is not path:
            os.close(fd)


# --- folders ---------------------------------------------------------------------------

def open_dir(name, *, dir_fd: int | None = None, create: bool = False,
             follow: bool = False) -> int:
    """A descriptor of the folder ``name`` (relative to ``dir_fd``); the last component
    must not be a link unless ``follow``.  ``create`` makes it (0700) when missing."""
    flags = os.O_RDONLY | _DIRECTORY | _CLOEXEC | (0 if follow else _NOFOLLOW)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as e:
        raise _explain(e, name, dir_fd) from None
    with contextlib.suppress(FileExistsError):     # a racing creator is fine
        os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        raise _explain(e, name, dir_fd) from None


def make_root(path) -> None:
    """Create a root folder smsblock owns (a store, a state folder, a catalog) owner-only;
    its missing parents get the usual permissions, as ``mkdir -p`` gives them."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)


def open_subdir(root, *parts: str, create: bool = False) -> int:
    """A descriptor of ``root/parts[0]/parts[1]/...``: ``root`` is followed (the user
    named it), every part is opened without following a link (and made 0700 when
    ``create`` and missing).  Close it with ``os.close``."""
    fd = open_dir(root, create=create, follow=True)
    try:
        for part in parts:
            if not part or "/" in part or part in (".", ".."):
                raise OSError(errno.EINVAL, f"bad folder name {part!r}", os.fspath(root))
            nxt = open_dir(part, dir_fd=fd, create=create)
            os.close(fd)
            fd = nxt
    except OSError as e:
        os.close(fd)
        if e.filename in parts:     # name the whole path, not the component
            e.filename = os.path.join(os.fspath(root), *parts[:parts.index(e.filename) + 1])
        raise
    return fd


@contextlib.contextmanager
def subdir(root, *parts: str, create: bool = False):
    """:func:`open_subdir` as a context manager (yields the descriptor)."""
    fd = open_subdir(root, *parts, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


# --- files -----------------------------------------------------------------------------

def create_file(name, *, dir_fd: int | None = None, mode: int = FILE_MODE,
                replace_stale: bool = False) -> int:
    """Create a new file (``O_EXCL | O_NOFOLLOW``, ``mode`` before the umask) and return
    a write descriptor.  An existing name is an error (``FileExistsError``; a link is
    named as one), except that with ``replace_stale`` a regular file there (a killed
    run's leftover) is unlinked first: unlinking never touches another file's data."""
    try:
        return os.open(name, _NEW_FILE, mode, dir_fd=dir_fd)
    except FileExistsError as e:
        err = _explain(e, name, dir_fd)
        if not replace_stale or err is not e:
            raise err from None
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a regular file (left alone)", os.fspath(name))
    os.unlink(name, dir_fd=dir_fd)
    try:
        return os.open(name, _NEW_FILE, mode, dir_fd=dir_fd)
    except OSError as e:
        raise _explain(e, name, dir_fd) from None


def write_new_file(name, data: bytes, *, dir_fd: int | None = None, mode: int = FILE_MODE,
                   sync: bool = True) -> None:
    """Create ``name`` (as :func:`create_file`) holding ``data``; fsynced unless told not
    to.  A failed write removes the file."""
    fd = create_file(name, dir_fd=dir_fd, mode=mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)


def replace_file(name, data: bytes, *, dir_fd: int | None = None, tmp_dir_fd: int | None = None,
                 mode: int = FILE_MODE, sync: bool = True) -> None:
    """The one atomic small-file write: ``data`` goes to a new temporary file (as
    :func:`write_new_file`: private, never through a link, fsynced), which is then renamed
    over ``name`` and the folder fsynced; readers see the old file or the new one, never a
    part.  ``name`` is relative to ``dir_fd`` (a path when None); the temporary file is
    made in ``tmp_dir_fd`` (default: the same folder, which must be on the same filesystem).
    ``sync=False`` skips both fsyncs (a cache that may be lost)."""
    if tmp_dir_fd is None:
        tmp_dir_fd = dir_fd
    folder = os.path.dirname(os.fspath(name)) if dir_fd is None else ""
    tmp = os.path.join(folder, f".{uuid.uuid4().hex}.tmp") if tmp_dir_fd is None \
        else f".{uuid.uuid4().hex}.tmp"
    write_new_file(tmp, data, dir_fd=tmp_dir_fd, mode=mode, sync=sync)
    try:
        os.replace(tmp, name, src_dir_fd=tmp_dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=tmp_dir_fd)
        raise
    if sync:
        fsync_dir(dir_fd if dir_fd is not None else (folder or "."))


def append_file(name, data: bytes, *, dir_fd: int | None = None, mode: int = FILE_MODE) -> None:
    """Append ``data`` to ``name`` (created ``mode`` when missing) in one ``write`` with
    ``O_APPEND``: a short record (a journal line) lands whole even when several processes
    append at once.  Never through a link; only a regular file is appended to."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC,
                     mode, dir_fd=dir_fd)
    except OSError as e:
        raise _explain(e, name, dir_fd) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (not appended to)", os.fspath(name))
        os.write(fd, data)
    finally:
        os.close(fd)


def read_file_at(name, *, dir_fd: int | None = None) -> bytes | None:
    """The bytes of a regular file smsblock made (``name`` relative to ``dir_fd``), read
    without following a link or blocking on a FIFO; None when it does not exist."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _explain(e, name, dir_fd) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(name))
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def read_small_file(path, limit: int) -> bytes:
    """The bytes of a small regular file a user names (a password file, a JSON option):
    opened without blocking (a FIFO could hang the caller), refused unless it is a
    regular file (a device could be endless), at most ``limit`` bytes.  Raises ``OSError``
    with a readable ``strerror``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        chunks, got = [], 0
        while got <= limit:
            chunk = os.read(fd, limit + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if got > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
    return b"".join(chunks)


def first_line(data: bytes, limit: int) -> bytes:
    """The first line of ``data`` with its end of line, at most ``limit`` bytes (as
    ``readline(limit)`` gives it)."""
    end = data.find(b"\n", 0, limit)
    return data[:end + 1] if end >= 0 else data[:limit]


def open_lock_file(name, *, dir_fd: int | None = None, mode: int = FILE_MODE) -> int:
    """Open (creating it 0600 if missing) a lock file for ``flock``: never through a link,
    and only a plain regular file with one name, since a caller may write its pid in it."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC,
                     mode, dir_fd=dir_fd)
    except OSError as e:
        raise _explain(e, name, dir_fd) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise OSError(errno.EPERM, "is not a plain file smsblock made (not used as a lock)",
                      os.fspath(name))
    return fd


def is_link(name, *, dir_fd: int | None = None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def remove_file(name, *, dir_fd: int | None = None) -> int:
    """Delete a file (or a link itself, never what it points to); return the bytes freed
    (0 when it was already gone).  A folder is not removed (``IsADirectoryError``)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder (left alone)", os.fspath(name))
        os.unlink(name, dir_fd=dir_fd)
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    except FileNotFoundError:
        return 0
