"""smsblock: move live VM disks to the cloud block by block.

The public API is re-exported here; see docs/ for guides and the file formats.
"""

__version__ = "0.1.0"

from . import errors
from .disk import Disk, DiskInfo, Extent, ExtentKind, open_disk
from .disk.writer import convert, write_raw, write_stream_optimized
from .progress import CancelToken
from .manifest import BlockState, Manifest, diff
from .scanner import scan
from .engine import (DeepVerifyReport, PruneReport, RunSummary, VerifyReport, prune, replicate,
                     restore, verify, verify_run_against_disk)
from .store import open_store

__all__ = ["errors", "open_disk", "Disk", "DiskInfo", "Extent", "ExtentKind", "CancelToken",
           "convert", "write_raw", "write_stream_optimized",
           "open_store", "replicate", "restore", "verify", "verify_run_against_disk", "prune",
           "RunSummary", "VerifyReport", "DeepVerifyReport", "PruneReport", "scan", "Manifest",
           "BlockState", "diff"]
