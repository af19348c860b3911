"""Reading VM disk files through vSphere's datastore HTTP file service, without staging.

vCenter (and ESXi) serve every datastore file at
``/folder/<path>?dcPath=<datacenter>&dsName=<datastore>`` to a client holding the SOAP
session cookie.  :class:`DatastoreFile` reads byte ranges of one such file with HTTP
``Range`` requests (a positional read, safe from several threads: one keep-alive session
per thread), so a disk is streamed block by block and never copied whole to the
connector's disk.  :func:`open_datastore_disk` turns a disk's descriptor into a
:class:`~smsblock.disk.Disk`; :class:`AreaOverlayDisk` narrows a disk to the allocated
areas changed block tracking reports.

A :class:`DatastoreFile` is also the shape a VMDK reader needs to read sparse and delta
disks without a local path (``open_vmdk(path, opener=...)``, not there yet): ``opener(p)``
takes a path relative to the datastore (joined with ``/``), and the file it returns has
``name``, ``size``, ``pread(length, offset) -> bytes``, ``readinto(offset, buf) -> int``
(thread-safe) and ``close()``.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import quote, urlencode

import requests
from requests.adapters import HTTPAdapter

from ..disk.base import Disk, DiskInfo, Extent, ExtentFile, ExtentKind, clip_extents
from ..errors import DiskFormatError, VSphereError

SECTOR = 512
#: descriptors are small; a file whose first bytes are not one is read as a sparse extent
DESCRIPTOR_PROBE = 64 * 1024
#: transient failures (reset connections, 5xx) are retried this many times
RETRIES = 3
RETRY_PAUSE = 0.5


@dataclass(frozen=True)
class DatastoreEndpoint:
    """Where and how to reach one datastore's file service."""

    base_url: str          # scheme://host:port
    dc_path: str           # the datacenter's inventory path, e.g. "DC0" or "Folder/DC0"
    ds_name: str
    cookie: str            # "vmware_soap_session=..." (a secret: never logged)
    ssl_context: ssl.SSLContext | None = None   # the same TLS checks as the SOAP session
    timeout: float = 60.0

    def url(self, path: str) -> str:
        query = urlencode({"dcPath": self.dc_path, "dsName": self.ds_name})
        return f"{self.base_url}/folder/{quote(path.lstrip('/'))}?{query}"

    def __repr__(self) -> str:     # keeps the session cookie out of logs and tracebacks
        return f"DatastoreEndpoint({self.base_url!r}, dc={self.dc_path!r}, ds={self.ds_name!r})"


class DatastoreFile:
    """One datastore file read by byte ranges over HTTP (``pread`` semantics)."""

    def __init__(self, endpoint: DatastoreEndpoint, path: str,
                 verify_tls: Callable[[Exception], VSphereError] | None = None,
                 relogin: Callable[[], str] | None = None):
        self.endpoint = endpoint
        self.path = path                                   # path inside the datastore
        self.name = f"[{endpoint.ds_name}] {path}"         # vSphere's way of naming it
        self._url = endpoint.url(path)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._tls_error = verify_tls
        self._relogin = relogin            # () -> new session cookie, after an HTTP 401
        self._cookie = endpoint.cookie
        self.bytes_read = 0
        self.size = self._head()

    # -- HTTP -----------------------------------------------------------------
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            if self.endpoint.ssl_context is not None:
                s.mount("https://", _ContextAdapter(self.endpoint.ssl_context))
            self._local.session = s
            with self._lock:
                s.headers["Cookie"] = self._cookie
                self._sessions.append(s)
        return s

    def _request(self, method: str, headers: dict | None = None, stream: bool = False):
        r = self._request_once(method, headers, stream)
        if r.status_code == 401 and self._relogin is not None:
            # the session ended during a long stream: log in again once and go on
            r.close()
            cookie = self._relogin()
            with self._lock:
                self._cookie = cookie
                for s in self._sessions:
                    s.headers["Cookie"] = cookie
            r = self._request_once(method, headers, stream)
        return r

    def _request_once(self, method: str, headers: dict | None, stream: bool):
        last: Exception | None = None
        for attempt in range(RETRIES + 1):
            try:
                r = self._session().request(method, self._url, headers=headers, stream=stream,
                                            timeout=self.endpoint.timeout, allow_redirects=False)
            except requests.exceptions.SSLError as e:
                raise self._tls(e) from None
            except (requests.ConnectionError, requests.Timeout) as e:
                last = e
            else:
                if r.status_code < 500:
                    return r
                last = VSphereError(f"{self.name}: datastore file service answered "
                                    f"HTTP {r.status_code} {r.reason}")
                r.close()
            if attempt < RETRIES:
                time.sleep(RETRY_PAUSE * (attempt + 1))
        if isinstance(last, VSphereError):
            raise last
        raise VSphereError(f"{self.name}: cannot read from the datastore file service at "
                           f"{self.endpoint.base_url}: {_reason(last)}")

    def _tls(self, e: Exception) -> VSphereError:
        if self._tls_error is not None:
            return self._tls_error(e)
        return VSphereError(f"{self.name}: TLS failure on the datastore file service: {_reason(e)}")

    def _check(self, r, offset: int | None = None) -> None:
        if r.status_code in (200, 206):
            return
        where = f" at offset {offset}" if offset is not None else ""
        if r.status_code == 401:
            raise VSphereError(f"{self.name}: the datastore file service refused the session "
                               "(HTTP 401): log in again")
        if r.status_code == 403:
            raise VSphereError(f"{self.name}: access denied by the datastore file service "
                               "(HTTP 403): the account needs the privilege Datastore.Browse on "
                               f"datastore {self.endpoint.ds_name}")
        if r.status_code == 404:
            raise VSphereError(f"{self.name}: file not found on datastore "
                               f"{self.endpoint.ds_name} (HTTP 404)")
        raise VSphereError(f"{self.name}: datastore file service answered HTTP "
                           f"{r.status_code} {r.reason}{where}")

    def _head(self) -> int:
        r = self._request("HEAD")
        with r:
            self._check(r)
            length = r.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise VSphereError(f"{self.name}: the datastore file service gave no file size")
        return int(length)

    # -- reading --------------------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` from ``offset``; short only at the end of the file."""
        view = memoryview(buf).cast("B")
        want = max(0, min(len(view), self.size - offset))
        if want == 0:
            return 0
        r = self._request("GET", headers={"Range": f"bytes={offset}-{offset + want - 1}"},
                          stream=True)
        with r:
            self._check(r, offset)
            if r.status_code != 206:
                # a server that ignores Range would send the whole file: refuse, never stage it
                raise VSphereError(f"{self.name}: the datastore file service ignored the Range "
                                   "request (HTTP 200); cannot stream the disk")
            done = 0
            try:
                for chunk in r.iter_content(chunk_size=256 * 1024):
                    n = min(len(chunk), want - done)
                    view[done:done + n] = chunk[:n]
                    done += n
                    if done >= want:
                        break
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                raise VSphereError(f"{self.name}: connection lost at offset {offset + done}: "
                                   f"{_reason(e)}") from None
        if done < want:
            raise VSphereError(f"{self.name}: datastore file service sent {done} of {want} "
                               f"bytes at offset {offset}")
        with self._lock:
            self.bytes_read += done
        return done

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        n = self.readinto(offset, buf)
        return bytes(buf[:n])

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()


class _ContextAdapter(HTTPAdapter):
    """requests with our SSLContext (CA bundle; hostname and expiry checks as configured)."""

    def __init__(self, context: ssl.SSLContext):
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        if not self._context.check_hostname:
            kwargs["assert_hostname"] = False
        return super().init_poolmanager(*args, **kwargs)


def _reason(e: Exception | None) -> str:
    """The innermost human-readable reason of a requests/urllib3 exception chain."""
    text = str(e) if e is not None else "unknown error"
    for marker in ("Errno", "timed out", "Connection refused", "Name or service not known"):
        i = text.find(f"[{marker}") if marker == "Errno" else text.find(marker)
        if i >= 0:
            return text[i:].rstrip("')\" ")
    return text


class FlatHttpDisk(Disk):
    """A disk made of FLAT/VMFS/ZERO extents (vSphere's usual thick or thin base disk)."""

    def __init__(self, descriptor: DatastoreFile,
                 extents: list[tuple[int, str, DatastoreFile | None, int]], info: DiskInfo):
        # extents: (sectors, type, file or None for ZERO, start offset in the file in sectors)
        self.path = descriptor.name
        self._files = [f for _, _, f, _ in extents if f is not None]
        self._map: list[tuple[int, int, DatastoreFile | None, int]] = []
        pos = 0
        for sectors, _kind, f, start in extents:
            length = sectors * SECTOR
            self._map.append((pos, length, f, start * SECTOR))
            pos += length
        self.size = pos
        self.info = info

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        want = max(0, min(len(view), self.size - offset))
        done = 0
        for start, length, f, file_start in self._map:
            if done >= want:
                break
            pos = offset + done
            if pos >= start + length or pos < start:
                continue
            n = min(want - done, start + length - pos)
            part = view[done:done + n]
            if f is None:
                part[:] = bytes(n)
            else:
                inner = file_start + pos - start
                got = f.readinto(inner, part) if inner < f.size else 0
                if got < n:      # a thin flat file shorter than its extent reads as zeros
                    part[got:] = bytes(n - got)
            done += n
        return done

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        start, end = self._clip(start, end)
        whole = (Extent(s, n, ExtentKind.DATA if f is not None else ExtentKind.ZERO)
                 for s, n, f, _ in self._map)
        yield from clip_extents(whole, start, end)

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._files)

    def close(self) -> None:
        for f in self._files:
            f.close()


def open_datastore_disk(open_file: Callable[[str], DatastoreFile], path: str) -> Disk:
    """Open the disk whose descriptor (or single sparse file) is ``path`` in the datastore.

    ``open_file(path)`` returns a :class:`DatastoreFile` for a path in the same datastore.
    Flat disks (descriptor + ``-flat.vmdk``, the layout ESXi writes) are read here; sparse
    and delta (snapshot child) disks by the VMDK reader through ``open_file``.
    """
    from ..disk.descriptor import looks_like_descriptor, parse_descriptor
    top = open_file(path)
    head = top.pread(min(top.size, DESCRIPTOR_PROBE), 0)
    if looks_like_descriptor(head) and not head.startswith(b"KDMV"):
        try:
            desc = parse_descriptor(head, top.name)
        except DiskFormatError as e:
            top.close()
            raise VSphereError(f"{top.name}: bad VMDK descriptor: {e}") from None
        flat = all(e.type in ("FLAT", "VMFS", "ZERO") for e in desc.extents)
        if flat and desc.parent_hint is None:
            return _open_flat(open_file, top, desc)
    return _open_with_vmdk_reader(open_file, top, path)


def _open_flat(open_file, top: DatastoreFile, desc) -> Disk:
    folder = top.path.rsplit("/", 1)[0] + "/" if "/" in top.path else ""
    extents, files = [], {}
    try:
        for e in desc.extents:
            f = None
            if e.type != "ZERO":
                if "/" in e.path or e.path.startswith(".."):
                    raise VSphereError(f"{top.name}: extent file {e.path!r} is outside the "
                                       "disk's folder; refused")
                f = files.get(e.path) or open_file(folder + e.path)
                files[e.path] = f
            extents.append((e.sectors, e.type, f, e.offset))
    except BaseException:
        top.close()
        for f in files.values():
            f.close()
        raise
    info = DiskInfo(path=top.name, format="vmdk", virtual_size=desc.total_sectors * SECTOR,
                    create_type=desc.create_type, adapter_type=desc.adapter_type,
                    extents=[ExtentFile("RW", s, t, f.name if f else None, o)
                             for s, t, f, o in extents])
    try:
        info.cid = desc.cid(top.name)
    except DiskFormatError:
        pass
    top.close()          # the descriptor was read whole; the flat files do the rest
    return FlatHttpDisk(top, extents, info)


def _open_with_vmdk_reader(open_file, top: DatastoreFile, path: str) -> Disk:
    """Sparse, stream-optimised, seSparse and delta (snapshot child) disks: the VMDK
    reader, reading every file of the chain through the datastore file service."""
    from ..disk.vmdk import open_vmdk
    top.close()
    return open_vmdk(path, opener=open_file)


class AreaOverlayDisk(Disk):
    """``top`` inside ``areas``, zeros outside: a disk narrowed to its allocated areas
    (CBT's ``changeId "*"``); what is outside them reads as zeros and is not an extent.
    (Areas changed since a previous run are not an overlay: they go to the engine as
    ``SourceDisk.changed_extents``.)
    """

    def __init__(self, top: Disk, areas: list[tuple[int, int]]):
        self.top = top
        self.path, self.size, self.info = top.path, top.size, top.info
        merged: list[tuple[int, int]] = []
        for s, n in sorted(areas):
            e = min(s + n, top.size)
            if e <= s:
                continue
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.areas = merged            # [start, end) pairs

    def _pieces(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(start, end, inside an area) pieces covering ``[start, end)``."""
        pos = start
        for s, e in self.areas:
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                yield pos, s, False
            yield max(s, pos), min(e, end), True
            pos = min(e, end)
        if pos < end:
            yield pos, end, False

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        want = max(0, min(len(view), self.size - offset))
        for s, e, inside in self._pieces(offset, offset + want):
            part = view[s - offset:e - offset]
            if inside:
                self.top.readinto(s, part)
            else:
                part[:] = bytes(e - s)
        return want

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        start, end = self._clip(start, end)

        def all_extents():
            for s, e, inside in self._pieces(start, end):
                if inside:
                    yield Extent(s, e - s, ExtentKind.DATA)
        yield from clip_extents(all_extents(), start, end)

    def close(self) -> None:
        self.top.close()
