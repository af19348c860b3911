"""Readers of files inside a guest filesystem, by path, through a :class:`~.region.Region`.

ext2/3/4 (libfsext), XFS (libfsxfs) and Btrfs (:mod:`.btrfs`) behind one path lookup that
follows symbolic links as the guest would (its own root, at most 40 hops); NTFS volumes
(libfsntfs) and a file object over an NTFS file for libregf.  Every failure to read
becomes :class:`Unreadable` with a one-line reason.
"""

from __future__ import annotations

import stat

from .region import Region

MAX_RELEASE_FILE = 64 << 10
MAX_SYMLINK_HOPS = 40


class Unreadable(Exception):
    """A filesystem that should be readable could not be read; the message says why."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class PathReader:
    """Path lookup over a filesystem library's directory primitives."""

    def root(self): ...
    def child(self, node, name): ...
    def link_target(self, node) -> str | None: ...
    def read(self, node, limit: int) -> bytes: ...

    def lookup(self, path: str):
        """The node at ``path`` (symlinks followed as the guest would, with / as its root)."""
        root = self.root()
        stack = [root]
        parts = [c for c in path.split("/") if c and c != "."]
        hops = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            node = self.child(stack[-1], name)
            if node is None:
                return None
            target = self.link_target(node)
            if target is not None:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise Unreadable(f"too many symbolic links resolving /{path}")
                if target.startswith("/"):
                    stack = [root]
                parts = [c for c in target.split("/") if c and c != "."] + parts
                continue
            stack.append(node)
        return stack[-1]

    def read_file(self, path: str, limit: int = MAX_RELEASE_FILE) -> bytes | None:
        node = self.lookup(path)
        return None if node is None else self.read(node, limit)


class _LibyalReader(PathReader):
    """libfsext / libfsxfs volumes (file entries with POSIX modes).

    Nodes are (resolved path, file entry); children are looked up by full path because
    libfsext 20260821's lookup by name fails on valid directories.
    """

    def __init__(self, module, region: Region):
        self.volume = module.volume()
        self.volume.open_file_object(region)

    def root(self):
        return "", self.volume.get_root_directory()

    def child(self, node, name):
        path = f"{node[0]}/{name}"
        try:
            entry = self.volume.get_file_entry_by_path(path)
        except OSError as e:      # a missing path is None; an error means damaged metadata
            raise Unreadable(f"looking up {path}: {_first_line(e)}") from None
        return None if entry is None else (path, entry)

    def link_target(self, node):
        mode = node[1].file_mode
        if mode is not None and stat.S_ISLNK(mode):
            return node[1].symbolic_link_target
        return None

    def read(self, node, limit):
        size = min(node[1].size or 0, limit)
        return node[1].read_buffer_at_offset(size, 0) if size else b""


class _BtrfsReader(PathReader):
    def __init__(self, region: Region):
        from .btrfs import BtrfsVolume
        self.volume = BtrfsVolume(region)

    def root(self):
        return self.volume.root()

    def child(self, node, name):
        return self.volume.child(node, name)

    def link_target(self, node):
        from .btrfs import FT_SYMLINK
        if node.type == FT_SYMLINK:
            return self.volume.read(node, 4096).decode("utf-8", "surrogateescape")
        return None

    def read(self, node, limit):
        return self.volume.read(node, limit)


def open_linux_reader(fs_type: str, region: Region) -> PathReader:
    """A path reader for an ext2/3/4, XFS or Btrfs filesystem; raises :class:`Unreadable`."""
    try:
        if fs_type == "btrfs":
            return _BtrfsReader(region)
        if fs_type in ("ext2", "ext3", "ext4"):
            import pyfsext as module
        elif fs_type == "xfs":
            import pyfsxfs as module
        else:
            raise Unreadable(f"no reader for {fs_type}")
        return _LibyalReader(module, region)
    except ImportError as e:
        raise Unreadable(f"the {e.name} library is not installed (pip install smsblock[image])") from None
    except Unreadable:
        raise
    except Exception as e:      # the libraries raise IOError/OSError; btrfs raises BtrfsError
        raise Unreadable(_first_line(e)) from None


# --- NTFS -------------------------------------------------------------------------

class EntryFile:
    """A file object over a libfsntfs file entry, for libregf."""

    def __init__(self, entry):
        self.entry = entry
        self.size = entry.get_size()
        self.pos = 0

    def read(self, size=-1):
        if size is None or size < 0:
            size = self.size - self.pos
        size = max(0, min(size, self.size - self.pos))
        data = self.entry.read_buffer_at_offset(size, self.pos) if size else b""
        self.pos += len(data)
        return data

    def seek(self, offset, whence=0):
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self):
        return self.pos

    def get_offset(self):
        return self.pos

    def get_size(self):
        return self.size


def open_ntfs(region: Region):
    """A libfsntfs volume over ``region``; raises :class:`Unreadable`."""
    try:
        import pyfsntfs
    except ImportError:
        raise Unreadable("the pyfsntfs library is not installed (pip install smsblock[image])") from None
    try:
        volume = pyfsntfs.volume()
        volume.open_file_object(region)
        return volume
    except Exception as e:
        raise Unreadable(_first_line(e)) from None


def ntfs_label(volume) -> str | None:
    try:
        return volume.get_name() or None
    except Exception:
        return None


def ntfs_entry(volume, path):
    """The file entry at a backslash ``path`` of an NTFS volume, or None."""
    try:
        return volume.get_file_entry_by_path(path)
    except Exception:
        return None


