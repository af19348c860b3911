"""Disk image readers and writers: raw and VMDK, behind one :class:`Disk` protocol."""

from __future__ import annotations

import os

from ..errors import DiskIOError, UsageError
from .base import Disk, DiskInfo, Extent, ExtentFile, ExtentKind
from .descriptor import looks_like_descriptor
from .raw import RawDisk

__all__ = ["open_disk", "detect_format", "Disk", "DiskInfo", "Extent", "ExtentFile",
           "ExtentKind", "RawDisk"]

SPARSE_MAGIC = b"KDMV"      # VMDK hosted sparse extent header
COWD_MAGIC = b"COWD"        # ESX vmfsSparse redo log
SESPARSE_MAGIC = b"\xbe\xba\xfe\xca\0\0\0\0"   # ESXi seSparse (VMFS6 snapshots)


def detect_format(path) -> str:
    """Return "vmdk" or "raw" from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise DiskIOError(f"cannot open: {e.strerror}", os.fspath(path)) from None
    if head[:4] in (SPARSE_MAGIC, COWD_MAGIC) or head[:8] == SESPARSE_MAGIC:
        return "vmdk"
    return "vmdk" if looks_like_descriptor(head) else "raw"


def open_disk(path, *, format: str | None = None, ignore_cid_mismatch: bool = False,
              allow_outside_paths: bool = False) -> Disk:
    """Open a disk image for reading; the format is detected unless given.

    ``ignore_cid_mismatch`` accepts a snapshot child whose parentCID does not match its
    parent's CID; ``allow_outside_paths`` accepts descriptor extents and parents outside
    the descriptor's folder.  Both are refused by default, as bad input.
    """
    fmt = format or detect_format(path)
    if fmt == "raw":
        return RawDisk(path)
    if fmt == "vmdk":
        from .vmdk import open_vmdk
        return open_vmdk(path, ignore_cid_mismatch=ignore_cid_mismatch,
                         allow_outside_paths=allow_outside_paths)
    raise UsageError(f"unknown disk format {fmt!r} (expected raw or vmdk)")
