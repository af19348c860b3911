"""Where a connector finds VMs and reads their disks: sources behind one protocol.

The protocol is :class:`smsblock.source.Source` (shared with the vSphere source of
issue 7): ``list_vms()`` gives :class:`~smsblock.source.VmRecord` s for the server
catalog, ``open_run(vm, previous=...)`` a context manager holding a point-in-time view of
the VM's disks (:class:`~smsblock.source.SourceDisk`, boot disk first), released on exit
whether the run completed, failed or was cancelled.

A connector stores its source as a kind and a JSON config (never secrets);
:func:`open_source` reopens it, and other kinds plug in with :func:`register_source_kind`.

:class:`DatastoreSource` (kind ``"datastore"``) reads a datastore folder (a copy of, or a
mount of, a vSphere datastore): each VM is a folder with a ``.vmx`` file and its VMDKs,
nested in datacenter and folder directories that make up the VM's ``vmPath``.

The datastore is untrusted input: every file it reads (``.vmx`` files, the disk files a
run opens) must be a regular file inside the root, reached without following a symbolic
link (:func:`open_beneath`: one ``O_NOFOLLOW`` step per path component from the root),
opened non-blocking (a FIFO cannot hang the reader) and, for the text files, no larger
than a cap.  One bad VM is a *problem* of the listing (``DatastoreSource.list_problems``),
not a failure of it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import re
import stat
import uuid
from pathlib import Path
from typing import Any, Callable

from ..disk import COWD_MAGIC, SESPARSE_MAGIC, SPARSE_MAGIC, Disk, RawDisk
from ..disk.descriptor import looks_like_descriptor
from ..disk.files import LocalFile
from ..errors import ConnectorError, SmsBlockError, UsageError
from ..progress import check_cancel
from ..source import Source, SourceDisk, VmRecord
from .models import VmManagerType, echo

log = logging.getLogger(__name__)
_SOURCE_KINDS: dict[str, Callable[[dict], Source]] = {}

#: the entry point group plugins declare their source kinds in (the entry point's name
#: is the kind, its object a factory ``f(config) -> Source`` or a class with ``from_config``)
ENTRY_POINT_GROUP = "smsblock.sources"
SOURCE_KIND = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _check_kind(kind) -> str:
    if not isinstance(kind, str) or not SOURCE_KIND.fullmatch(kind):
        raise UsageError(f"connector source kind {str(kind)[:80]!r} is not a kind name "
                         "(lower-case letters, digits, '.', '_', '-'; at most 64)")
    return kind


def register_source_kind(kind: str, factory: Callable[[dict], Source]) -> None:
    """Make ``open_source(kind, config)`` build sources with ``factory(config)``.

    For this process only; to make a kind usable from the CLI and the connector too,
    declare it as an entry point of the group :data:`ENTRY_POINT_GROUP` (docs/api.md)."""
    if not callable(factory):
        raise UsageError(f"connector source kind {kind!r}: the factory is not callable")
    _SOURCE_KINDS[_check_kind(kind)] = factory


def _plugin_entry_points(kind: str | None = None) -> list:
    """Entry points of :data:`ENTRY_POINT_GROUP` (named ``kind`` when given)."""
    from importlib.metadata import entry_points
    eps = entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in eps if kind is None or ep.name == kind]


def _plugin_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    package = f"{dist.name} {dist.version}: " if dist is not None else ""
    return f"plugin {package}{ep.value}"


def _load_plugin(kind: str) -> Callable[[dict], Source] | None:
    """The factory a plugin declares for ``kind``, registered; None when none does."""
    eps = _plugin_entry_points(kind)
    values = {ep.value for ep in eps}
    if not eps:
        return None
    if len(values) > 1:
        raise ConnectorError(f"connector source kind {kind!r} is declared by more than one "
                             f"plugin ({'; '.join(sorted(_plugin_name(ep) for ep in eps))}); "
                             "uninstall all but one")
    ep = eps[0]
    try:
        obj = ep.load()
    except Exception as e:   # noqa: BLE001 - whatever a broken plugin raises, one line
        raise ConnectorError(f"connector source kind {kind!r}: {_plugin_name(ep)} failed to "
                             f"load: {type(e).__name__}: {one_line(e)}") from None
    factory = getattr(obj, "from_config", obj) if isinstance(obj, type) else obj
    if not callable(factory):
        raise ConnectorError(f"connector source kind {kind!r}: {_plugin_name(ep)} is not a "
                             "factory (a callable taking the config dict) nor a class with "
                             "from_config")
    _SOURCE_KINDS[kind] = factory
    return factory


def one_line(e: BaseException, limit: int = 300) -> str:
    """An error as one line of at most ``limit`` characters (its type when it says nothing)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def source_kinds() -> list[str]:
    """Every kind :func:`open_source` knows: registered ones and installed plugins' ones."""
    try:
        plugins = {ep.name for ep in _plugin_entry_points()}
    except Exception:   # noqa: BLE001 - a broken installation must not hide the built-ins
        plugins = set()
    return sorted(set(_SOURCE_KINDS) | plugins)


def open_source(kind: str, config: dict) -> Source:
    """Open a connector's source from its stored kind and config.

    Kinds registered with :func:`register_source_kind` come first; an unknown kind is
    looked up among the installed plugins' entry points (loaded on first use)."""
    factory = _SOURCE_KINDS.get(kind) if isinstance(kind, str) else None
    if factory is None:
        factory = _load_plugin(_check_kind(kind))
    if factory is None:
        raise ConnectorError(f"unknown connector source kind {kind!r} (known: "
                             f"{source_kinds()}; a plugin declares one as an entry point "
                             f"of the group {ENTRY_POINT_GROUP!r})")
    try:
        source = factory(config)
    except (SmsBlockError, ModuleNotFoundError):   # the CLI names the missing extra
        raise
    except Exception as e:   # noqa: BLE001 - a plugin's bug is one line naming it
        raise ConnectorError(f"connector source kind {kind!r}: opening the source failed: "
                             f"{type(e).__name__}: {one_line(e)}") from None
    for attr in ("manager_type", "manager_name", "manager_id"):
        if not isinstance(getattr(source, attr, None), str):
            with contextlib.suppress(Exception):
                source.close()
            raise ConnectorError(f"connector source kind {kind!r}: the source has no "
                                 f"{attr} string (see smsblock.source.Source)")
    return source


# --- .vmx files ------------------------------------------------------------------

_VMX_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*"(.*)"\s*$')
_DISK_KEY = re.compile(r"^(scsi|sata|nvme|ide)(\d+):(\d+)\.filename$")
_BUS_ORDER = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
_ESCAPE = re.compile(r"\|([0-9A-Fa-f]{2})")
MAX_VMX_BYTES = 1 << 20


MAX_FOLDER_DEPTH = 32    # folder levels below the datastore root searched for VMs
# what a .vmx may make the catalog hold (docs/service.md): vSphere's own VM name limit,
# and caps on the other values taken from the file
MAX_VM_NAME = 80
MAX_IDENTITY_TEXT = 128  # uuid.bios, vc.uuid, guestOS
MAX_DISK_NAME = 1024     # a disk's fileName
MAX_DISKS = 256
MAX_WARNINGS = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _refusal(name: str, mode: int) -> str:
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode)
            or stat.S_ISBLK(mode) else "a directory" if stat.S_ISDIR(mode) else "special")
    return f"{name}: {kind}, not a regular file; refused (only regular files are read)"


def _safe_parts(rel: str) -> list[str]:
    """The components of a path relative to a root; ``..`` escaping it is refused."""
    normal = posixpath.normpath(rel) if rel else ""
    if "\0" in rel or not normal or normal == "." or posixpath.isabs(normal) or \
            normal == ".." or normal.startswith("../"):
        raise ConnectorError(f"{rel!r} is not a path inside the datastore")
    return normal.split("/")


def _not_that_folder(path: str) -> str:
    return (f"datastore folder {path} is no longer the folder registered: it (or a folder "
            "on its way) is now a symbolic link or not a folder; refused (register the "
            "connector again with the folder's real path)")


def open_root(root: str | os.PathLike, *, pinned: bool = False) -> int:
    """A descriptor of the folder ``root``.  ``pinned``: ``root`` is the real path
    recorded at registration, and must still be it: no symbolic link on the way (the
    last one refused by O_NOFOLLOW on the open itself)."""
    path = os.fspath(root)
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | (os.O_NOFOLLOW if pinned else 0))
    except OSError as e:
        if pinned and e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ConnectorError(_not_that_folder(path)) from None
        if e.errno == errno.ENOENT:
            raise ConnectorError(f"datastore folder {path} does not exist") from None
        raise ConnectorError(f"datastore {path}: cannot open: {e.strerror}") from None
    if pinned and os.path.realpath(path) != path:
        os.close(fd)
        raise ConnectorError(_not_that_folder(path))
    return fd


def open_beneath(root: str | os.PathLike, rel: str, *, pinned: bool = False) -> int:
    """A read-only descriptor of the regular file ``root/rel``, found without following
    any symbolic link below ``root`` and without blocking (FIFOs, devices, sockets,
    directories and links are refused before they are opened for reading).  A file with
    more than one hard link is refused too: it may be a file outside ``root``.
    ``pinned``: see :func:`open_root`."""
    parts = _safe_parts(rel)
    where = f"{os.fspath(root)}/{'/'.join(parts)}"
    fd = open_root(root, pinned=pinned)
    try:
        for n, name in enumerate(parts):
            last = n == len(parts) - 1
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise ConnectorError(f"{where}: does not exist") from None
                raise ConnectorError(f"{where}: cannot read: {e.strerror}") from None
            if not last and not stat.S_ISDIR(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
                raise ConnectorError(f"{where}: {name!r} on the way is {kind}; refused "
                                     "(no link inside the datastore is followed)")
            if last and not stat.S_ISREG(st.st_mode):
                raise ConnectorError(_refusal(where, st.st_mode))
            flags = _NOFOLLOW | os.O_RDONLY | (os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
                                               if last else os.O_DIRECTORY)
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):   # swapped for a link meanwhile
                    raise ConnectorError(f"{where}: a symbolic link or not a regular file; "
                                         "refused") from None
                raise ConnectorError(f"{where}: cannot open: {e.strerror}") from None
            os.close(fd)
            fd = nfd
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or \
                    (last and not stat.S_ISREG(now.st_mode)):
                raise ConnectorError(f"{where}: changed while it was opened; refused")
            if last and now.st_nlink > 1:
                raise ConnectorError(f"{where}: has {now.st_nlink} hard links; refused (a "
                                     "hard link may be a file outside the datastore: copy "
                                     "the file instead of linking it)")
        out, fd = fd, -1
        return out
    finally:
        if fd >= 0:
            os.close(fd)


def read_beneath(root: str | os.PathLike, rel: str, limit: int, what: str, *,
                 pinned: bool = False) -> bytes:
    """At most ``limit`` bytes of the regular file ``root/rel`` (see :func:`open_beneath`);
    a larger file is refused, never read whole."""
    fd = open_beneath(root, rel, pinned=pinned)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ConnectorError(f"{os.fspath(root)}/{rel}: {size} bytes, larger than "
                                 f"{limit} bytes; not a {what}")
        chunks, got = [], 0
        while got <= limit:
            chunk = os.read(fd, limit + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise ConnectorError(f"{os.fspath(root)}/{rel}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > limit:        # grew while read
        raise ConnectorError(f"{os.fspath(root)}/{rel}: larger than {limit} bytes; not a {what}")
    return raw


def parse_vmx(path: str | os.PathLike) -> dict[str, str]:
    """A .vmx file as {lower-case key: value}; VMware's ``|XX`` escapes decoded.

    Keys are case-insensitive in VMware's own reader, so they are lower-cased here.
    The file itself must be a regular file (not a link, FIFO or device) of at most
    :data:`MAX_VMX_BYTES`.
    """
    path = Path(path)
    return parse_vmx_bytes(read_beneath(path.parent, path.name, MAX_VMX_BYTES, ".vmx file"),
                           str(path))


def parse_vmx_bytes(raw: bytes, name: str) -> dict[str, str]:
    """The text of a .vmx file parsed; errors name the line, never quote its content
    (the file may not be a .vmx at all)."""
    if len(raw) > MAX_VMX_BYTES:
        raise ConnectorError(f"{name}: larger than {MAX_VMX_BYTES} bytes, not a .vmx file")
    if b"\0" in raw:
        raise ConnectorError(f"{name}: binary data, not a .vmx file")
    text = raw.decode("utf-8", errors="replace")
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith(".encoding"):
            continue
        m = _VMX_LINE.match(stripped)
        if m is None:
            raise ConnectorError(f"{name}: line {lineno}: not a .vmx line (key = \"value\")")
        out[m.group(1).lower()] = _ESCAPE.sub(lambda e: chr(int(e.group(1), 16)), m.group(2))
    return out


def vmx_disks(vmx: dict[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(device, disk file name)] boot order first, warnings) from a parsed .vmx.

    Boot order: SCSI, SATA, NVMe, then IDE, by controller and unit number.

    Devices marked ``present = "FALSE"`` are skipped; CD-ROMs are not disks, and a
    connected one is reported as a warning (the SMS guide asks to disconnect them).
    """
    found = []
    warnings = []
    for key, value in vmx.items():
        m = _DISK_KEY.match(key)
        if m is None:
            continue
        bus, ctrl, unit = m.group(1), int(m.group(2)), int(m.group(3))
        dev = f"{bus}{ctrl}:{unit}"
        if vmx.get(f"{dev}.present", "true").lower() == "false":
            continue
        dtype = vmx.get(f"{dev}.devicetype", "").lower()
        if "cdrom" in dtype or value.lower().endswith(".iso"):
            connected = vmx.get(f"{dev}.startconnected", "true").lower() != "false"
            if connected and value and dtype != "cdrom-raw" and len(warnings) < MAX_WARNINGS:
                warnings.append(f"CD-ROM {dev} is connected to {echo(value)}; disconnect "
                                "it before replicating")
            continue
        if not value:
            continue
        if len(value) > MAX_DISK_NAME or _CONTROL.search(value):
            raise ConnectorError(f"{dev}.fileName is longer than {MAX_DISK_NAME} characters "
                                 "or holds control characters; not a disk file name")
        found.append((_BUS_ORDER[bus], ctrl, unit, dev, value))
        if len(found) > MAX_DISKS:
            raise ConnectorError(f"the .vmx names more than {MAX_DISKS} disks")
    found.sort()
    return [(f[3], f[4]) for f in found], warnings


# --- datastore folder source -------------------------------------------------------

ESXI_DATACENTER = "ha-datacenter"   # the datacenter name a standalone ESXi host reports


class DatastoreSource:
    """VMs in a datastore folder: ``ROOT/<datacenter>/<folder>.../<vm folder>/<name>.vmx``.

    The first directory level is the datacenter and the levels below it the VM folders,
    so ``ROOT/DC1/prod/web/web.vmx`` gets ``vmPath`` ``/Datacenters/DC1/vm/prod/<name>``
    (``name`` is the .vmx ``displayName``).  A VM folder directly under ROOT is in the
    datacenter ``ha-datacenter``, as on a standalone ESXi host.  ``vmId`` is the .vmx
    path relative to ROOT, which stays the same across imports; ``vmManagerId`` is a
    UUID derived from ROOT's absolute path.

    The disks are read as the files are (a VMDK snapshot chain is followed to its base):
    point it at a powered-off VM, a copy, or a storage snapshot for a consistent image.
    Changes between runs are found by the engine's hashing diff.
    """

    kind = "datastore"
    manager_type = VmManagerType.VSPHERE.value

    def __init__(self, root: str | os.PathLike, *, pinned: bool = False):
        #: pinned: ``root`` is the real path recorded at registration (``config()``),
        #: and every use refuses it once it is not that folder any more (a link put in
        #: its place is not followed)
        self.pinned = pinned
        if pinned:
            self.root = Path(os.fspath(root))
            if not self.root.is_absolute():
                raise ConnectorError(f"datastore folder {root} is not an absolute path")
            os.close(open_root(self.root, pinned=True))
        else:
            self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ConnectorError(f"datastore folder {root} does not exist or is not a directory")
        self.manager_name = str(self.root)
        self.manager_id = str(uuid.uuid5(uuid.NAMESPACE_URL, self.root.as_uri()))
        #: the VMs (or folders) the last list_vms() left out: [{"location", "reason"}]
        self.list_problems: list[dict[str, str]] = []

    @classmethod
    def from_config(cls, config: dict) -> "DatastoreSource":
        if not isinstance(config, dict) or not isinstance(config.get("path"), str):
            raise ConnectorError(f"datastore source config {echo(config)} has no path")
        return cls(config["path"], pinned=config.get("pinned") is True)

    def config(self) -> dict:
        # the real path, pinned: a link later put in its place is refused, not followed
        return {"path": str(self.root), "pinned": True}

    def close(self) -> None:
        pass

    def list_vms(self, cancel=None) -> list[VmRecord]:
        """Every VM whose .vmx can be read; the others are in :attr:`list_problems`
        (``[{"location": .vmx or folder, "reason": ...}]``), each logged, never fatal.
        ``cancel`` (a :class:`~smsblock.progress.CancelToken`) is checked per folder."""
        vms: list[VmRecord] = []
        self.list_problems = []
        root_fd = open_root(self.root, pinned=self.pinned)
        try:
            os.listdir(root_fd)
        except OSError as e:
            os.close(root_fd)
            raise ConnectorError(f"datastore folder {self.root}: cannot list: {e.strerror}") from None
        try:
            return self._list(root_fd, vms, cancel)
        finally:
            os.close(root_fd)

    def _list(self, root_fd: int, vms: list[VmRecord], cancel) -> list[VmRecord]:

        def unreadable(err: OSError) -> None:
            where = err.filename if isinstance(err.filename, str) else "a folder"
            if where.startswith("./"):      # walked from the root's descriptor
                where = where[2:]
            self._problem(where, f"cannot list: {err.strerror}")

        # fwalk works on folder descriptors and does not follow links: a folder swapped for
        # a link while it is walked is not entered
        # walked from the root's descriptor: the very folder checked by open_root
        for dirpath, dirnames, filenames, _ in os.fwalk(".", dir_fd=root_fd, onerror=unreadable):
            check_cancel(cancel)
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, ".")
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
            vmx_files = sorted(f for f in filenames if f.lower().endswith(".vmx"))
            if not vmx_files:
                if rel_dir.count("/") + 1 >= MAX_FOLDER_DEPTH and dirnames:
                    self._problem(rel_dir, f"folders deeper than {MAX_FOLDER_DEPTH} levels "
                                           "are not searched for VMs")
                    dirnames[:] = []
                continue
            dirnames[:] = []  # a VM folder holds no other VMs
            for name in vmx_files:
                rel = f"{rel_dir}/{name}" if rel_dir else name
                try:
                    vms.append(self._record(rel)[0])
                except ConnectorError as e:
                    self._problem(rel, str(e))
        return vms

    def _problem(self, location: str, reason: str) -> None:
        log.warning("datastore %s: %s left out of the catalog: %s", self.root, location, reason)
        self.list_problems.append({"location": location, "reason": reason})

    def _record(self, rel: str) -> tuple[VmRecord, list[tuple[str, str, str | None]]]:
        """The VM of the .vmx ``ROOT/rel`` and its disks as (device, file named in the
        .vmx, path relative to ROOT or None when it lies outside ROOT)."""
        vmx = parse_vmx_bytes(read_beneath(self.root, rel, MAX_VMX_BYTES, ".vmx file",
                                           pinned=self.pinned), f"{self.root}/{rel}")
        parts = rel.split("/")
        name = vmx.get("displayname") or posixpath.splitext(parts[-1])[0]
        if len(name) > MAX_VM_NAME or _CONTROL.search(name):
            raise ConnectorError(f"{self.root}/{rel}: displayName is longer than "
                                 f"{MAX_VM_NAME} characters or holds control characters")
        # as vSphere does in inventory paths: a name cannot add levels to vmPath
        name = name.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")
        parents = parts[:-2]  # directories above the VM folder
        datacenter = parents[0] if parents else ESXI_DATACENTER
        vm_path = "/" + "/".join(["Datacenters", datacenter, "vm", *parents[1:], name])
        disks, warnings = vmx_disks(vmx)
        if not disks:
            warnings.append("the .vmx names no disks")
        identity = {}
        for key, member in (("uuid.bios", "biosUuid"), ("vc.uuid", "instanceUuid"),
                            ("guestos", "guestOS")):
            value = vmx.get(key)
            if value and (len(value) > MAX_IDENTITY_TEXT or _CONTROL.search(value)):
                warnings.append(f"{key} is longer than {MAX_IDENTITY_TEXT} characters or "
                                "holds control characters; ignored")
            elif value:
                identity[member] = value
        record = VmRecord(vmId=rel, vmName=name, vmPath=vm_path,
                          vmManagerName=self.manager_name, vmManagerId=self.manager_id,
                          vmManagerType=self.manager_type, identity=identity, warnings=warnings)
        return record, [(dev, f, self._inside(posixpath.dirname(rel), f)) for dev, f in disks]

    def _inside(self, folder: str, name: str) -> str | None:
        """``name`` (absolute, or relative to ROOT/folder) as a path relative to ROOT;
        None when it is outside ROOT (judged on the names: links are refused on open)."""
        if os.path.isabs(name):
            joined = os.path.normpath(name)
            root = str(self.root)
            if not joined.startswith(root.rstrip("/") + "/"):
                return None
            rel = joined[len(root.rstrip("/")) + 1:]
        else:
            rel = posixpath.normpath(posixpath.join(folder, name.replace("\\", "/")))
        if rel in ("", ".", "..") or rel.startswith("../") or "\0" in rel:
            return None
        return rel

    def open_run(self, vm: VmRecord | dict, *, previous: dict | None = None,
                 previous_disks: dict[str, Disk] | None = None, cancel=None) -> "DatastoreRun":
        vm_id = vm.vmId if isinstance(vm, VmRecord) else vm.get("vmId")
        if not isinstance(vm_id, str):
            raise ConnectorError(f"no vmId in {vm!r}")
        try:
            rel = "/".join(_safe_parts(vm_id))
        except ConnectorError:
            rel = None
        if rel is None or not rel.lower().endswith(".vmx"):
            raise ConnectorError(f"VM id {echo(vm_id)} is not a .vmx under {self.root}")
        os.close(open_root(self.root, pinned=self.pinned))    # as list_vms: not a link now
        try:
            st = os.stat(self.root / rel, follow_symlinks=False)
        except OSError:
            st = None
        if st is None:
            raise ConnectorError(f"VM {echo(vm_id)} is gone from the datastore {self.root}")
        record, disks = self._record(rel)
        if not disks:
            raise ConnectorError(f"VM {echo(vm_id)} ({self.root}): the .vmx names no disks")
        return DatastoreRun(self.root, vm_id, disks, record.warnings, pinned=self.pinned)


class _BeneathFile(LocalFile):
    """A :class:`LocalFile` over a descriptor from :func:`open_beneath`."""

    def __init__(self, fd: int, name: str):     # noqa: super().__init__ opens by path
        self.path = self.name = name
        self._fd = fd
        st = os.fstat(fd)
        self.size = st.st_size
        self._seek_data = hasattr(os, "SEEK_DATA")


def _detect(fd: int) -> str:
    head = os.pread(fd, 1024, 0)
    if head[:4] in (SPARSE_MAGIC, COWD_MAGIC) or head[:8] == SESPARSE_MAGIC:
        return "vmdk"
    return "vmdk" if looks_like_descriptor(head) else "raw"


def open_datastore_disk(root: Path, rel: str, *, pinned: bool = False) -> Disk:
    """A disk of the datastore with every file of it (descriptor, extents, parents)
    opened by :func:`open_beneath`: regular files inside ``root``, no link followed."""
    fd = open_beneath(root, rel, pinned=pinned)
    try:
        fmt = _detect(fd)
        if fmt == "raw":
            # the descriptor's own file through /proc: the very file checked, whatever
            # happens to the name meanwhile
            disk = RawDisk(f"/proc/self/fd/{fd}")
            disk.path = disk.info.path = str(root / rel)
            return disk
    finally:
        os.close(fd)

    from ..disk.vmdk import open_vmdk

    def opener(path: str) -> _BeneathFile:
        return _BeneathFile(open_beneath(root, path, pinned=pinned), f"{root}/{path}")
    return open_vmdk(rel, opener=opener)


class DatastoreRun:
    """The disks of one VM of a datastore folder, open for one run."""

    def __init__(self, root: Path, vm_id: str, disks: list[tuple[str, str, str | None]],
                 warnings: list[str], *, pinned: bool = False):
        self.root = root
        self.pinned = pinned
        self.vm_id = vm_id
        self._paths = disks
        self.warnings = list(warnings)
        self.disks: list[SourceDisk] = []
        self.moved_to = None     # vmId is the .vmx path: a moved folder is another VM

    def __enter__(self) -> "DatastoreRun":
        try:
            for n, (dev, named, rel) in enumerate(self._paths, 1):
                if rel is None:
                    raise ConnectorError(f"VM {self.vm_id!r}: disk {named} is outside the "
                                         f"datastore {self.root}")
                try:
                    disk = open_datastore_disk(self.root, rel, pinned=self.pinned)
                except ConnectorError as e:
                    raise ConnectorError(f"VM {self.vm_id!r}: disk {named}: {e}") from None
                self.disks.append(SourceDisk(
                    key=dev, label=f"Hard disk {n}", location=rel, disk=disk,
                    change_method="hash",
                    change_reason="datastore folder: no changed block tracking, hashing diff"))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for d in self.disks:
            with contextlib.suppress(SmsBlockError, OSError):
                d.disk.close()
        self.disks = []

    def record(self) -> dict[str, Any]:
        return {"source": "datastore", "vmId": self.vm_id,
                "disks": [d.record() for d in self.disks]}


def _open_vsphere(config: dict) -> Source:
    from ..source.vsphere import VSphereSource   # pyVmomi only when a vCenter is used
    return VSphereSource.from_config(config)


def _open_uploaded(config: dict) -> Source:
    from .fleet import UploadedCatalog           # a remote connector's uploaded VM list
    return UploadedCatalog(config)


register_source_kind(DatastoreSource.kind, DatastoreSource.from_config)
register_source_kind("vsphere", _open_vsphere)
register_source_kind("uploaded", _open_uploaded)
