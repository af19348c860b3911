"""The backend protocol: named immutable objects plus a lock, and nothing else.

A backend knows nothing about packs, manifests or runs: the repository
(:mod:`smsblock.repository`) decides names and contents.  Names are ``/``-separated
paths of 1-4 components, each ``[A-Za-z0-9][A-Za-z0-9._-]*`` (checked with
:func:`check_name`), so a name is never a path outside the backend.

* :meth:`Backend.put` makes an object visible in one atomic, durable step, from bytes or
  from a file staged with :meth:`Backend.staging_path` (consumed); ``create_only`` never
  replaces an object that is there; a put from a file of an object already there with the
  same size is not sent again unless ``replace`` (names are content-derived);
* :meth:`Backend.get` reads a whole object or a byte range (None when it is missing);
* :meth:`Backend.list` lists objects under a prefix with their :class:`ObjectStat`:
  size and a fingerprint that changes whenever the object does;
* :meth:`Backend.lock` is the store lock: shared by runs and readers, exclusive by prune;
* leftovers are what killed writers left (staged files, incomplete uploads, dead locks);
* :meth:`Backend.cache_dir` is this client's private folder for what it keeps about the
  objects (pack-index cache, fingerprints).
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
from dataclasses import dataclass

from ..errors import StoreError
from ..fsutil import make_root, open_subdir

_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MAX_DEPTH = 4


@dataclass(frozen=True)
class ObjectStat:
    """An object as a listing shows it: its size and a fingerprint that changes whenever
    the stored object does (written, truncated, replaced, removed and put back): a local
    file's inode, size, mtime and ctime (nobody can set a ctime back); an S3 object's
    ETag, size and LastModified.  None: the backend cannot tell."""

    size: int
    fingerprint: str | None = None


def check_name(name: str, where: str = "") -> list[str]:
    """The components of an object name; StoreError unless every one is a plain name."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or len(parts) > MAX_DEPTH or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise StoreError(f"{where}: {name!r} is not an object name")
    return parts


def check_prefix(prefix: str, where: str = "") -> list[str]:
    """The folder components of a listing prefix (``""`` or ``"a/"``, ``"a/b/"``)."""
    if prefix == "":
        return []
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise StoreError(f"{where}: {prefix!r} is not a listing prefix (ends with /)")
    return check_name(prefix[:-1], where)


@contextlib.contextmanager
def private_folder(root: str, *parts: str, make_parent: bool = False):
    """A descriptor of the 0700 folder ``root/parts...`` (made when missing, never through
    a link below ``root``; ``make_parent``: ``root`` made too), as a context manager;
    StoreError naming it when it cannot be had."""
    try:
        if make_parent:
            make_root(root)
        fd = open_subdir(root, *parts, create=True)
    except OSError as e:
        path = os.path.join(root, *parts)
        raise StoreError(f"{path}: cannot open: {e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


class Backend(abc.ABC):
    """Named immutable objects and a lock; see the module docstring.  Thread-safe."""

    url: str
    #: reads cross a network: the repository keeps pack indexes in :meth:`cache_dir`
    remote: bool = False

    @abc.abstractmethod
    def prepare(self) -> None:
        """Make what a first put needs (a local root folder); nothing visible."""

    def open_fd(self, name: str, *, what: str | None = None) -> int | None:
        """A read-only descriptor of a regular-file object (the caller closes it), so a
        large object can be read in pieces without a request each; None where objects
        are not local files, or when it is missing (then read with :meth:`get`, which
        tells the two apart)."""
        return None

    @abc.abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None, *,
            what: str | None = None) -> bytes | None:
        """The object's bytes (``length`` None: to its end; short only at its end);
        None when it does not exist.  ``what`` (here and below) says what the request is
        for, in logs and errors ("publish manifest")."""

    @abc.abstractmethod
    def put(self, name: str, data: bytes | None = None, *, path: str | None = None,
            create_only: bool = False, replace: bool = False, resume: bool = False,
            what: str | None = None) -> bool:
        """Make ``data`` (or the staged file ``path``, consumed) the object ``name``.
        ``create_only``: an object already there is kept (returns False).  From a file:
        an object there with the file's size is taken as this one unless ``replace``;
        ``resume`` continues an incomplete upload of this name a dead writer left."""

    @abc.abstractmethod
    def delete(self, name: str, *, what: str | None = None) -> None:
        """Remove an object (missing is fine)."""

    @abc.abstractmethod
    def list(self, prefix: str = "", *, what: str | None = None) -> dict[str, ObjectStat]:
        """Every object whose name starts with the folder ``prefix``, at any depth."""

    def names(self, prefix: str = "", *, what: str | None = None) -> list[str]:
        """The names :meth:`list` gives, without sizes or fingerprints (a backend that
        can list names more cheaply says so)."""
        return list(self.list(prefix, what=what))

    @abc.abstractmethod
    def stat(self, name: str) -> ObjectStat | None:
        """The object's size and fingerprint now, None when missing."""

    @abc.abstractmethod
    def lock(self, exclusive: bool, purpose: str) -> contextlib.AbstractContextManager:
        """Hold the store lock; StoreLockedError at once when it cannot be had."""

    @abc.abstractmethod
    def staging_path(self, suffix: str) -> str:
        """A fresh local file path to build a large object in (for :meth:`put`)."""

    def orphaned_staged(self, suffix: str) -> list[str]:
        """Staged files (``suffix``) of writers that no longer run, whose put may be
        finished (a backend whose staged files are only leftovers returns none)."""
        return []

    @abc.abstractmethod
    def list_leftovers(self) -> list[str]:
        """Names of what killed writers left behind."""

    @abc.abstractmethod
    def remove_leftover(self, name: str) -> int:
        """Remove one leftover; return the bytes freed."""

    @abc.abstractmethod
    def cache_dir(self) -> contextlib.AbstractContextManager[int]:
        """A descriptor of this client's private folder for this backend (0700, created
        when missing, never a link), as a context manager."""

    def block_index_dir(self) -> tuple[str, tuple[str, ...], bool]:
        """Where this client keeps the on-disk block index of this backend, as
        ``(root, parts, create_root)`` (see :class:`smsblock.blockindex.DiskIndex`):
        by default the user's cache, per backend URL."""
        import hashlib
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return (os.path.join(base, "smsblock", "block-index",
                             hashlib.sha256(self.url.encode()).hexdigest()[:16]), (), True)

    def where(self, name: str = "") -> str:
        """How an object is named in messages (a path or a URL)."""
        return f"{self.url}/{name}" if name else self.url

    def holds_path(self, path) -> bool:
        """Whether a local file path lies inside the backend's storage."""
        return False

    def close(self) -> None:
        pass
