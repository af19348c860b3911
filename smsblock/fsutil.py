"""Small file-system helpers shared by everything that makes files durable."""

from __future__ import annotations

import errno
import os


def fsync_dir(path) -> None:
    """Make renames and creations in the folder ``path`` durable.

    Filesystems that cannot fsync a folder (EINVAL) are left as they are.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def remove_file(path) -> int:
    """Delete a file; return the bytes freed (0 when it was already gone)."""
    try:
        size = os.path.getsize(path)
        os.unlink(path)
        return size
    except FileNotFoundError:
        return 0
