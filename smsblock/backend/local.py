"""LocalBackend: named objects as files under a local directory.

An object ``a/b/c`` is the file ``ROOT/a/b/c``.  Besides objects the root holds ``lock``
(flock: shared by runs and readers, exclusive by prune), ``tmp/`` (staged files, and the
temporary files of atomic puts; anything left there is a leftover) and ``cache/`` (what
clients keep about the objects); none of them is listed as an object.

A put of bytes writes a new file in ``tmp/``, fsyncs it and renames it into place (then
fsyncs the folder): the local form of an atomic, immutable put.  Everything is created
owner-only (files 0600, folders 0700), new files with ``O_EXCL``, and every folder below
the root is opened without following links and used through its descriptor (see
:mod:`smsblock.fsutil`): a link planted at ``tmp``, ``packs``, ``runs/SERVER`` or ``lock``
is refused with a StoreError, never written or deleted through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import uuid

from ..errors import StoreError, StoreLockedError
from ..fsutil import (FILE_MODE, fsync_dir, make_root, open_lock_file, open_subdir, remove_file, replace_file,
                      subdir, write_new_file)
from .base import Backend, ObjectStat, check_name, check_prefix, private_folder

log = logging.getLogger("smsblock.store.local")
INTERNAL = ("lock", "tmp", "cache")         # the backend's own, never objects


def _fingerprint(st: os.stat_result) -> str:
    """Inode, size, mtime and ctime: any write, truncate or replace changes one of them,
    and no user can set a ctime back."""
    return f"{st.st_ino}.{st.st_size}.{st.st_mtime_ns}.{st.st_ctime_ns}"


def _where(e: OSError, default: str) -> str:
    """The path an error is about: the link or folder a helper named, else ``default``."""
    return e.filename if isinstance(e.filename, str) and os.path.isabs(e.filename) else default


class LocalBackend(Backend):
    """Objects under the directory ``root``."""

    def __init__(self, root):
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root

    def __repr__(self) -> str:
        return f"<LocalBackend {self.root!r}>"

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def where(self, name: str = "") -> str:
        return self._p(*name.split("/")) if name else self.root

    def _parts(self, name: str) -> list[str]:
        parts = check_name(name, self.root)
        if parts[0] in INTERNAL:
            raise StoreError(f"{self.root}: {name!r} is not an object name")
        return parts

    def prepare(self) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"{self.root}: exists and is not a directory")
        try:
            make_root(self.root)
            os.close(open_subdir(self.root, "tmp", create=True))
        except OSError as e:
            raise StoreError(f"{_where(e, self.root)}: cannot create: {e.strerror}") from None

    # -- objects -------------------------------------------------------------------
    def open_fd(self, name: str, *, what: str | None = None) -> int | None:
        # None when missing too: the caller's get() then says so in its own terms
        parts = self._parts(name)
        path = self.where(name)
        try:
            with subdir(self.root, *parts[:-1]) as folder_fd:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                             dir_fd=folder_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{_where(e, path)}: cannot {what or 'open'}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(f"{path}: not a regular file")
        return fd

    def get(self, name: str, offset: int = 0, length: int | None = None, *,
            what: str | None = None) -> bytes | None:
        path = self.where(name)
        fd = self.open_fd(name, what=what)
        if fd is None:
            return None
        try:
            if length is None:
                length = max(0, os.fstat(fd).st_size - offset)
            out = bytearray()
            while len(out) < length:
                chunk = os.pread(fd, length - len(out), offset + len(out))
                if not chunk:
                    break
                out += chunk
            return bytes(out)
        except OSError as e:
            raise StoreError(f"{path}: offset {offset}: read failed: {e.strerror}") from None
        finally:
            os.close(fd)

    def put(self, name: str, data: bytes | None = None, *, path: str | None = None,
            create_only: bool = False, replace: bool = False, resume: bool = False,
            what: str | None = None) -> bool:
        parts = self._parts(name)
        dest = self.where(name)
        try:
            with subdir(self.root, "tmp", create=True) as tmp_fd, \
                    subdir(self.root, *parts[:-1], create=True) as folder_fd:
                if path is not None:
                    staged = self._staged_name(path)
                    # whoever staged it: a regular file, owner-only, before it is visible
                    fd = os.open(staged, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 dir_fd=tmp_fd)
                    try:
                        if not stat.S_ISREG(os.fstat(fd).st_mode):
                            raise StoreError(f"{path}: not a regular file")
                        os.fchmod(fd, FILE_MODE)
                    finally:
                        os.close(fd)
                    # renameat replaces a name, never writes through a link that was there
                    os.replace(staged, parts[-1], src_dir_fd=tmp_fd, dst_dir_fd=folder_fd)
                    fsync_dir(folder_fd)
                    return True
                if not create_only:
                    replace_file(parts[-1], bytes(data), dir_fd=folder_fd, tmp_dir_fd=tmp_fd)
                    return True
                tmp = f"{uuid.uuid4().hex}.tmp"
                write_new_file(tmp, bytes(data), dir_fd=tmp_fd)
                try:    # a link never replaces a racing creator's object
                    os.link(tmp, parts[-1], src_dir_fd=tmp_fd, dst_dir_fd=folder_fd,
                            follow_symlinks=False)
                    created = True
                except FileExistsError:
                    created = False
                os.unlink(tmp, dir_fd=tmp_fd)
                fsync_dir(folder_fd)
                return created
        except OSError as e:
            raise StoreError(f"{_where(e, dest)}: cannot {what or 'write'}: {e.strerror}") from None

    def delete(self, name: str, *, what: str | None = None) -> None:
        parts = self._parts(name)
        try:
            with subdir(self.root, *parts[:-1]) as folder_fd:
                remove_file(parts[-1], dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{_where(e, self.where(name))}: cannot {what or 'delete'}: "
                             f"{e.strerror}") from None

    def stat(self, name: str) -> ObjectStat | None:
        parts = self._parts(name)
        try:
            with subdir(self.root, *parts[:-1]) as folder_fd:
                st = os.stat(parts[-1], dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{_where(e, self.where(name))}: cannot stat: {e.strerror}") from None
        return ObjectStat(st.st_size, _fingerprint(st)) if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix: str = "", *, what: str | None = None) -> dict[str, ObjectStat]:
        return self._list(prefix, what, True)

    def names(self, prefix: str = "", *, what: str | None = None) -> list[str]:
        # the entries' types from the directory itself: no stat per object (a run looks
        # up its server's latest run among all of them)
        return list(self._list(prefix, what, False))

    def _list(self, prefix: str, what: str | None, with_stats: bool) -> dict:
        parts = check_prefix(prefix, self.root)
        out: dict = {}
        try:
            fd = open_subdir(self.root, *parts)
        except FileNotFoundError:
            return out
        except OSError as e:
            raise StoreError(f"{_where(e, self._p(*parts))}: cannot {what or 'list'}: "
                             f"{e.strerror}") from None
        try:
            self._walk(fd, parts, out, with_stats)
        finally:
            os.close(fd)
        return out

    def _walk(self, fd: int, parts: list[str], out: dict, with_stats: bool = True) -> None:
        with os.scandir(fd) as entries:
            found = list(entries)
        for e in found:
            if not parts and e.name in INTERNAL:
                continue
            try:
                if with_stats:
                    st = e.stat(follow_symlinks=False)
                    mode = st.st_mode
                else:       # d_type; DirEntry stats only where the file system lacks it
                    mode = (stat.S_IFREG if e.is_file(follow_symlinks=False) else
                            stat.S_IFDIR if e.is_dir(follow_symlinks=False) else
                            stat.S_IFLNK if e.is_symlink() else 0)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode):
                out["/".join(parts + [e.name])] = (ObjectStat(st.st_size, _fingerprint(st))
                                                   if with_stats else None)
            elif stat.S_ISDIR(mode) and len(parts) + 1 < 4:
                try:
                    sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=fd)
                except OSError:
                    continue        # gone, or swapped for a link since the scan
                try:
                    self._walk(sub, parts + [e.name], out, with_stats)
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(mode):      # not this backend's objects
                log.warning("%s: is a symbolic link; left out", self._p(*parts, e.name))

    # -- lock -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, exclusive: bool, purpose: str):
        try:
            make_root(self.root)      # a first replicate locks before creating
            with subdir(self.root) as root_fd:
                fd = open_lock_file("lock", dir_fd=root_fd)
        except OSError as e:
            raise StoreError(f"{self._p('lock')}: cannot open lock file: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    other = "a run or reader is using it" if exclusive else "prune is running"
                    raise StoreLockedError(f"{self.root}: store is locked, {other}; cannot {purpose} now") from None
                raise
            yield
        finally:
            os.close(fd)   # releases the flock

    # -- staging, leftovers, cache ---------------------------------------------------------
    def staging_path(self, suffix: str) -> str:
        # the folder is checked (no link) and made here; the file itself is created with
        # O_EXCL | O_NOFOLLOW by whoever writes it (PackWriter)
        try:
            os.close(open_subdir(self.root, "tmp", create=True))
        except OSError as e:
            raise StoreError(f"{self._p('tmp')}: cannot stage: {e.strerror}") from None
        return self._p("tmp", f"{uuid.uuid4().hex}{suffix}")

    def _staged_name(self, staged_path: str) -> str:
        if os.path.dirname(os.path.abspath(staged_path)) != self._p("tmp"):
            raise StoreError(f"{staged_path}: not a file staged in {self._p('tmp')}")
        return os.path.basename(staged_path)

    def list_leftovers(self) -> list[str]:
        try:
            with subdir(self.root, "tmp") as tmp_fd:
                return sorted(os.listdir(tmp_fd))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"{self._p('tmp')}: cannot list leftovers: {e.strerror}") from None

    def remove_leftover(self, name: str) -> int:
        try:
            with subdir(self.root, "tmp") as tmp_fd:
                return remove_file(os.path.basename(name), dir_fd=tmp_fd)
        except FileNotFoundError:
            return 0
        except IsADirectoryError:
            log.warning("%s: a folder in the store's tmp, left alone", self._p("tmp", name))
            return 0
        except OSError as e:
            raise StoreError(f"{self._p('tmp', name)}: cannot remove leftover: {e.strerror}") from None

    def block_index_dir(self):
        # inside the store: the index travels with the packs it indexes
        return self.root, ("index",), False

    def cache_dir(self):
        # inside the root: what a client knows of the objects travels with them
        return private_folder(self.root, "cache")

    def holds_path(self, path) -> bool:
        root, target = os.path.realpath(self.root), os.path.realpath(path)
        return os.path.commonpath([root, target]) == root
