"""One exception tree for everything smsblock refuses or fails at.

Every error a user can cause (bad disk images, bad parameters, a broken store, a
server fault) is a subclass of :class:`SmsBlockError`.  The CLI prints ``str(err)``
as one line and exits non-zero; library users catch the class they care about.

Errors about a place in a file carry ``path`` and ``offset`` and put both in the
message, so "what and where" is always answered.
"""

from __future__ import annotations

import os


class SmsBlockError(Exception):
    """Base of every error smsblock raises on purpose."""

    #: process exit status the CLI uses for this class of error
    exit_status = 1


class UsageError(SmsBlockError):
    """A parameter or option is missing, malformed or out of range."""

    exit_status = 2


class Cancelled(SmsBlockError):
    """The operation was cancelled through its cancellation token."""

    exit_status = 130


class LocatedError(SmsBlockError):
    """An error about a byte position in a file."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 offset: int | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        self.reason = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


# --- disk images -------------------------------------------------------------

class DiskError(LocatedError):
    """A disk image cannot be opened, read or written."""


class DiskFormatError(DiskError):
    """The disk image is malformed, truncated, hostile or unsupported."""


class UnsupportedFormatError(DiskFormatError):
    """A format or variant we recognise but do not read (or do not recognise at all)."""


class TruncatedDiskError(DiskFormatError):
    """The file ends before a structure the format says is there."""


class CorruptHeaderError(DiskFormatError):
    """A header or footer has a bad magic, version, field or checksum."""


class DescriptorError(DiskFormatError):
    """A VMDK text descriptor is malformed or names impossible extents."""


class UnsafeExtentPathError(DescriptorError):
    """A descriptor names an extent outside its own folder (``../``, absolute)."""


class CorruptGrainTableError(DiskFormatError):
    """A grain directory or grain table entry is out of range or overlaps metadata."""


class CorruptGrainError(DiskFormatError):
    """A grain's data cannot be decoded (bad marker, bad deflate stream, too large)."""


class ParentChainError(DiskFormatError):
    """A snapshot delta chain is broken: missing parent, loop, or CID mismatch."""


class CidMismatchError(ParentChainError):
    """A child's parentCID does not match its parent's CID."""


class DiskIOError(DiskError):
    """The operating system failed to read or write a disk image."""


# --- manifests, packs, stores -----------------------------------------------

class ManifestError(LocatedError):
    """A run manifest is malformed, truncated or fails its checksum."""


class StoreError(SmsBlockError):
    """A block store cannot be opened, read or written."""


class StoreCorruptError(StoreError, LocatedError):
    """Data in a store fails its checks (pack, index or content address)."""

    def __init__(self, message: str, path=None, offset=None):
        LocatedError.__init__(self, message, path, offset)


class RunNotFoundError(StoreError):
    """The requested server or run does not exist in the store."""


class StoreLockedError(StoreError):
    """Another process holds the store's lock for this operation."""


class TransientStoreError(StoreError):
    """A remote store failed in a way worth retrying (5xx, reset, timeout)."""


class PermanentStoreError(StoreError):
    """A remote store refused in a way retrying cannot fix (access, bucket, credentials)."""


class PublishError(StoreError):
    """A run is committed in the store, but a publisher (an ``ebs://`` store's EBS
    snapshot) failed to publish it.  The run is kept: it restores from the store, and
    publishing it again (``smsblock publish``, :meth:`Repository.publish_run`) or the next
    run picks up from there.  ``server_id`` and ``run_id`` name the run; ``summary`` is
    its :class:`~smsblock.engine.RunSummary` when a replicate raised it."""

    def __init__(self, message: str, server_id: str, run_id: str):
        super().__init__(message)
        self.server_id = server_id
        self.run_id = run_id
        self.summary = None


# --- images -----------------------------------------------------------------

class ImageError(SmsBlockError):
    """A machine image cannot be inspected, validated or registered."""


class ImageValidationError(ImageError):
    """Validation found errors; ``findings`` holds them."""

    def __init__(self, message: str, findings=()):
        super().__init__(message)
        self.findings = list(findings)


class ImageNotFoundError(ImageError):
    """No image with that id in the catalog."""


# --- service (SMS control plane) ------------------------------------------------

class ServiceError(SmsBlockError):
    """An SMS API error; ``code`` is the SMS exception name sent on the wire."""

    code = "InternalError"
    http_status = 400

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class ConnectorError(SmsBlockError):
    """A connector's source (datastore folder, vCenter) cannot be reached or used."""


class VSphereError(ConnectorError):
    """vCenter refused or failed an operation; the message says what to fix."""
