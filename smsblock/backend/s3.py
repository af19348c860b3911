"""S3Backend: named objects as keys under ``s3://BUCKET/PREFIX``.

An object ``a/b/c`` is the key ``PREFIX/a/b/c``.  The backend's own keys::

    PREFIX/locks/exclusive.json                 prune's lock object (owner + lease)
    PREFIX/locks/shared-<uuid>.json             one per run or reader holding the lock shared

Large objects are built in a local staging folder, then uploaded: in one PUT with
Content-MD5 below ``multipart_threshold``, else as a multipart upload whose parts go up in
parallel (``parallel`` at a time, each read from the staged file only when its turn comes,
so memory stays at ``parallel * part_size``), each with its Content-MD5.  Names are pure
functions of content, so a retried or resumed upload lands on the same key and an object
already there (same size) is not sent again.  A writer killed mid-upload leaves an
incomplete multipart upload under the prefix and maybe a staged file: leftovers, or
finished by the next writer on the machine (:meth:`S3Backend.orphaned_staged`, ``put(...,
resume=True)``).  Requests whose answers were lost are recognised (HEAD or ListParts
before a retry; a token in the lock object), answers that end early are retried, and
every request goes through the one retry policy (:mod:`smsblock.backend.retry`) and the
one bandwidth cap (:mod:`smsblock.backend.throttle`).

The lock.  S3 has no flock; it has strongly consistent reads after writes and
conditional writes.  A shared holder PUTs its own ``shared-<uuid>`` object, then checks
that no live ``exclusive.json`` exists; prune creates ``exclusive.json`` with
``If-None-Match: *`` (only one can win), then checks that no live shared object exists.
Whichever writes second sees the first, so a run and a prune never both proceed (both
may back off: a lock is never waited for, it fails at once with StoreLockedError).
Every lock object is a lease: it records owner host, pid, purpose and ``ttl`` and is
re-written every ``ttl/4`` while held.  One is dead once S3's clock (the ``Date`` of the
response that listed it) is ``ttl`` past its ``Last-Modified``, or at once when it names
a process on this host that no longer runs (a SIGKILLed run).  Dead lock objects are
ignored and are leftovers for prune.  An exclusive lock is re-written and released with
``If-Match`` on its ETag, so a holder that lost its lease never deletes a newer one.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlparse

from ..errors import StoreError, StoreLockedError, TransientStoreError, UsageError
from ..fsutil import make_root, open_subdir, remove_file
from .base import Backend, ObjectStat, check_name, check_prefix, private_folder
from .readahead import Readahead
from .retry import RetryPolicy, error_code, http_status
from .s3config import CloudSettings
from .throttle import ThrottledBody, TokenBucket

log = logging.getLogger("smsblock.store.s3")

LOCK_EXCLUSIVE = "locks/exclusive.json"
LOCK_SHARED = "locks/shared-"
INTERNAL = "locks/"

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")   # S3's rules, with legacy names


def parse_s3_url(url: str) -> tuple[str, str, str]:
    """``s3://BUCKET/PREFIX?query`` -> ``(bucket, prefix without slashes, query)``."""
    if any(ord(c) < 32 or ord(c) == 127 for c in url):     # urlparse would drop them silently
        raise UsageError(f"{url!r}: control characters in an S3 store URL")
    p = urlparse(url)
    if p.scheme.lower() != "s3" or not p.netloc:
        raise UsageError(f"{url}: not an S3 store URL (s3://BUCKET/PREFIX)")
    if not _BUCKET.fullmatch(p.netloc):
        raise UsageError(f"{url}: {p.netloc!r} is not a bucket name (letters, digits, '.', '_', '-')")
    prefix = p.path.strip("/")
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/") if prefix):
        raise UsageError(f"{url}: the prefix must not have empty, '.' or '..' parts")
    return p.netloc, prefix, p.query


def _md5_b64(data) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _not_found(exc: BaseException) -> bool:
    """A missing key (a missing bucket is another matter: a permanent error)."""
    code = error_code(exc)
    return code != "NoSuchBucket" and (code in ("NoSuchKey", "404", "NotFound") or http_status(exc) == 404)


def _precondition_failed(exc: BaseException) -> bool:
    return (error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict")
            or http_status(exc) in (409, 412))


def _parts_fit(parts: dict, size: int, part_size: int) -> bool:
    """Whether uploaded ``parts`` ({number: (size, ...)}) are the parts of a ``size``-byte
    file cut in ``part_size`` pieces (so they can be kept when resuming)."""
    if part_size <= 0:
        return False
    n = (size + part_size - 1) // part_size
    for number, (psize, *_rest) in parts.items():
        want = part_size if number < n else size - (n - 1) * part_size if number == n else -1
        if psize != want:
            return False
    return True


class _Missing(Exception):
    """A ranged read of an object that is not there."""


def _fingerprint(etag, size, last_modified) -> str | None:
    """ETag, size and LastModified (whole seconds: a listing gives milliseconds, a HEAD
    seconds) of an object: an overwrite changes them."""
    if not etag or last_modified is None:
        return None
    return f"{etag.strip(chr(34))}.{int(size)}.{int(last_modified.timestamp())}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class S3Backend(Backend):
    """Objects under ``s3://BUCKET/PREFIX``; ``settings`` or keyword overrides shape the
    client (see :class:`~smsblock.backend.s3config.CloudSettings`)."""

    remote = True

    def __init__(self, url: str, settings: CloudSettings | None = None, **overrides):
        import botocore.exceptions
        self._bx = botocore.exceptions
        self.bucket, self.prefix, query = parse_s3_url(url)
        self.settings = settings or CloudSettings.load(url_query=query, **overrides)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.client = self.settings.client("s3", max_pool=self.settings.parallel)
        self.retry = RetryPolicy(self.settings.retry_attempts, self.settings.retry_seconds)
        self._bucket_limit = TokenBucket(self.settings.bandwidth) if self.settings.bandwidth else None
        self._pool: ThreadPoolExecutor | None = None
        self._readahead = Readahead(self._read_range, self.settings.readahead)
        self._pool_lock = threading.Lock()
        self.stats = {"requests": 0, "bytes_sent": 0}
        self._stats_lock = threading.Lock()
        self.client.meta.events.register("before-send.s3", self._count_request)
        staging = self.settings.staging_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smsblock", "staging")
        url_hash = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.staging_dir = os.path.join(os.path.expanduser(staging), url_hash)
        # what the repository keeps about the objects on this machine (pack indexes,
        # fingerprints), per store URL
        self.index_cache_dir = os.path.join(os.path.expanduser(staging), "index-cache", url_hash)

    def __repr__(self) -> str:
        return f"<S3Backend {self.url}>"

    # -- plumbing ------------------------------------------------------------------
    def _count_request(self, request, **_):
        n = int(request.headers.get("Content-Length") or 0)
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["bytes_sent"] += n

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def _where(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}"

    def _call(self, what: str, fn):
        return self.retry.call(what, fn)

    def _body(self, data):
        return ThrottledBody(data, self._bucket_limit) if self._bucket_limit else bytes(data)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.parallel, thread_name_prefix="smsblock-s3")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _get(self, rel: str, what: str, **kw) -> bytes | None:
        """An object's bytes, None when it does not exist."""
        def go():
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(rel), **kw)
            except self._bx.ClientError as e:
                if _not_found(e):
                    return None
                raise
            return self._whole_body(r)
        return self._call(f"{what} ({self._where(rel)})", go)

    def _whole_body(self, r: dict) -> bytes:
        """A GET's body, checked against the answer's length: an answer that ends early
        (cut by a proxy, without its Content-Length) is retried, never taken as the object."""
        data = r["Body"].read()
        expect = r.get("ContentLength")
        content_range = r.get("ContentRange") or ""
        if "/" in content_range and "-" in content_range:      # "bytes a-b/total"
            first, _, last = content_range.split()[-1].split("/")[0].partition("-")
            expect = int(last) - int(first) + 1
        if expect is None or len(data) != int(expect):
            raise self._bx.IncompleteReadError(actual_bytes=len(data),
                                               expected_bytes=-1 if expect is None else int(expect))
        return data

    def _put(self, rel: str, data: bytes, what: str, **kw) -> dict:
        return self._call(f"{what} ({self._where(rel)})", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(rel), Body=self._body(data), ContentMD5=_md5_b64(data),
            ContentLength=len(data), **kw))

    def _put_once(self, rel: str, data: bytes, what: str) -> None:
        """A PUT whose retries first ask whether an earlier try landed (its answer lost
        to a reset or a stall): then the bytes are not sent again."""
        md5_hex = hashlib.md5(data).hexdigest()
        tries = [0]

        def go():
            tries[0] += 1
            if tries[0] > 1:
                try:
                    head = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
                    if head["ETag"].strip('"').lower() == md5_hex and head["ContentLength"] == len(data):
                        log.info("%s: the earlier try landed, not sent again", self._where(rel))
                        return head
                except self._bx.ClientError as e:
                    if not _not_found(e):
                        raise
            return self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=self._body(data),
                                          ContentMD5=_md5_b64(data), ContentLength=len(data))
        return self._call(f"{what} ({self._where(rel)})", go)

    def _delete(self, rel: str, what: str, **kw) -> None:
        self._call(f"{what} ({self._where(rel)})",
                   lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(rel), **kw))

    def _list(self, rel_prefix: str, what: str, delimiter: str | None = None):
        """``(objects, common prefixes, server time)`` under a relative prefix."""
        objects, prefixes, now = [], [], None
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self._key(rel_prefix)}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            r = self._call(f"{what} (list {self._where(rel_prefix)})",
                           lambda kw=kw: self.client.list_objects_v2(**kw))
            objects.extend(r.get("Contents", []))
            prefixes.extend(p["Prefix"] for p in r.get("CommonPrefixes", []))
            date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            if date and now is None:
                now = email.utils.parsedate_to_datetime(date)
            if not r.get("IsTruncated"):
                break
            token = r.get("NextContinuationToken")
        return objects, prefixes, now or datetime.now(timezone.utc)

    # -- objects -------------------------------------------------------------------------
    def _rel_of(self, name: str) -> str:
        check_name(name, self.url)
        if name.startswith(INTERNAL):
            raise StoreError(f"{self.url}: {name!r} is not an object name")
        return name

    def where(self, name: str = "") -> str:
        return self._where(name) if name else self.url

    def prepare(self) -> None:
        pass

    def get(self, name: str, offset: int = 0, length: int | None = None, *,
            what: str | None = None) -> bytes | None:
        rel = self._rel_of(name)
        if offset == 0 and length is None:
            return self._get(rel, what or f"read {name}")
        if length is None:
            st = self.stat(name)
            if st is None:
                return None
            length = max(0, st.size - offset)
        try:
            return self._read(rel, offset, length)
        except _Missing:
            return None

    def put(self, name: str, data: bytes | None = None, *, path: str | None = None,
            create_only: bool = False, replace: bool = False, resume: bool = False,
            what: str | None = None) -> bool:
        rel = self._rel_of(name)
        self._forget_reads(rel)
        if path is None:
            if not create_only:
                self._put(rel, bytes(data), what or f"put {name}")
                return True
            try:
                self._put(rel, bytes(data), what or f"create {name}", IfNoneMatch="*")
                return True
            except self._bx.ClientError as e:
                if not _precondition_failed(e):    # a racing creator won: its object stands
                    raise StoreError(f"{self._where(rel)}: cannot create: {e}") from None
                return False
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise StoreError(f"{path}: staged file unreadable: {e.strerror}") from None
        pending = [uid for key, uid in self._multipart_uploads(rel) if key == self._key(rel)] \
            if resume else []
        if not replace and self._remote_size(rel) == size:
            log.info("%s: already there, not sent again", self._where(rel))
        elif pending:
            self._multipart_upload(rel, path, size, resume=pending)
        elif size < self.settings.multipart_threshold:
            with open(path, "rb") as f:
                body = f.read()
            self._put_once(rel, body, what or f"upload {name}")
        else:
            self._multipart_upload(rel, path, size)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True

    def delete(self, name: str, *, what: str | None = None) -> None:
        rel = self._rel_of(name)
        self._forget_reads(rel)
        self._delete(rel, what or f"delete {name}")

    def stat(self, name: str) -> ObjectStat | None:
        rel = self._rel_of(name)

        def go():
            try:
                h = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            except self._bx.ClientError as e:
                if _not_found(e):
                    return None
                raise
            return ObjectStat(int(h["ContentLength"]),
                              _fingerprint(h.get("ETag"), h["ContentLength"], h.get("LastModified")))
        return self._call(f"look at {self._where(rel)}", go)

    def list(self, prefix: str = "", *, what: str | None = None) -> dict[str, ObjectStat]:
        check_prefix(prefix, self.url)
        objects, _, _ = self._list(prefix, what or f"list {prefix or 'objects'}")
        out = {}
        for o in objects:
            name = self._rel(o["Key"])
            if name.startswith(INTERNAL) or not name.startswith(prefix):
                continue
            out[name] = ObjectStat(int(o["Size"]),
                                   _fingerprint(o.get("ETag"), o["Size"], o.get("LastModified")))
        return out

    def _forget_reads(self, rel: str) -> None:
        self._readahead.forget(rel)

    # -- staging and cache -------------------------------------------------------------------
    def _staging_fd(self, create: bool = False) -> int:
        """The staging folder (0700, never a link; its parent is the user's setting)."""
        parent, name = os.path.split(self.staging_dir)
        if create:
            make_root(parent)
        return open_subdir(parent, name, create=create)

    def staging_path(self, suffix: str) -> str:
        # the pid in the name tells a later run whether the file's writer is gone; the
        # file itself is created O_EXCL | O_NOFOLLOW, 0600, by PackWriter
        try:
            os.close(self._staging_fd(create=True))
        except OSError as e:
            raise StoreError(f"{self.staging_dir}: cannot stage: {e.strerror}") from None
        return os.path.join(self.staging_dir, f"{os.getpid()}-{uuid.uuid4().hex}{suffix}")

    def orphaned_staged(self, suffix: str) -> list[str]:
        """Staged files of processes on this machine that no longer run (the pid is in
        the name): their puts can be finished."""
        try:
            fd = self._staging_fd()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning("%s: %s; staged files not resumed", self.staging_dir, e.strerror)
            return []
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        out = []
        for name in names:
            pid, _, _ = name.partition("-")
            if name.endswith(suffix) and pid.isdigit() and not _pid_alive(int(pid)):
                out.append(os.path.join(self.staging_dir, name))
        return out

    def block_index_dir(self):
        # beside the pack-index cache: a run against S3 reads no pack index twice
        return self.index_cache_dir, ("blocks",), True

    def cache_dir(self):
        # beside the staging folder: this machine's, private, per store URL
        parent, name = os.path.split(self.index_cache_dir)
        return private_folder(parent, name, make_parent=True)

    # -- lock ----------------------------------------------------------------------------
    def _lock_body(self, purpose: str) -> bytes:
        # the token tells this holder its own lock object apart from anyone else's, when
        # the answer to one of its own conditional requests was lost and the retry fails
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
                           "ttl": self.settings.lock_ttl, "token": uuid.uuid4().hex,
                           "started": datetime.now(timezone.utc).isoformat()}).encode()

    def _own_lock_etag(self, rel: str, body: bytes) -> str | None:
        """The ETag of the lock object at ``rel`` when it is ours (same token), else None."""
        def go():
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            except self._bx.ClientError as e:
                if _not_found(e):
                    return None
                raise
            return self._whole_body(r), r["ETag"]
        got = self._call(f"read the lock object ({self._where(rel)})", go)
        if got is None:
            return None
        try:
            mine = json.loads(body)["token"] == json.loads(got[0]).get("token")
        except (ValueError, AttributeError):
            return None
        return got[1] if mine else None

    def _lock_state(self, obj: dict, now: datetime) -> tuple[bool, str]:
        """``(alive, owner text)`` of a listed lock object."""
        rel = self._rel(obj["Key"])
        body = self._get(rel, "read a lock object")
        if body is None:
            return False, "gone"
        try:
            info = json.loads(body)
            host, pid, ttl = str(info["host"]), int(info["pid"]), float(info["ttl"])
            purpose = str(info.get("purpose", "?"))
        except (ValueError, KeyError, TypeError):
            return False, "unreadable lock object"
        owner = f"{purpose} by pid {pid} on {host}"
        if (now - obj["LastModified"]).total_seconds() > ttl:
            return False, owner
        if host == socket.gethostname() and not _pid_alive(pid):
            return False, owner
        return True, owner

    def _live_locks(self, rel_prefix: str, skip: str | None = None) -> list[str]:
        objects, _, now = self._list(rel_prefix, "look for lock holders")
        owners = []
        for o in objects:
            if skip is not None and self._rel(o["Key"]) == skip:
                continue
            alive, owner = self._lock_state(o, now)
            if alive:
                owners.append(owner)
        return owners

    @contextlib.contextmanager
    def lock(self, exclusive: bool, purpose: str):
        if exclusive:
            with self._exclusive_lock(purpose):
                yield
        else:
            with self._shared_lock(purpose):
                yield

    @contextlib.contextmanager
    def _shared_lock(self, purpose: str):
        rel = f"{LOCK_SHARED}{uuid.uuid4().hex}.json"
        body = self._lock_body(purpose)
        placed = None           # None: maybe (a transient failure may have landed)
        try:
            try:
                self._put(rel, body, "take the store lock (shared)")
                placed = True
            except TransientStoreError:
                raise
            except BaseException:
                placed = False              # refused (permanent): nothing to remove
                raise
            holders = self._live_locks(LOCK_EXCLUSIVE)
            if holders:
                raise StoreLockedError(f"{self.url}: store is locked, prune is running "
                                       f"({holders[0]}); cannot {purpose} now")
            with self._lease(lambda: self._put(rel, body, "renew the store lock (shared)")):
                yield
        finally:
            try:
                if placed is not False:     # a PUT that landed though its answer was lost too
                    self._delete(rel, "release the store lock (shared)")
            except StoreError as e:
                log.warning("%s: lock object %s left behind (prune removes it once dead): %s",
                            self.url, rel, e)

    @contextlib.contextmanager
    def _exclusive_lock(self, purpose: str):
        body = self._lock_body(purpose)
        etag = None
        for _ in range(2):
            try:
                etag = self._put(LOCK_EXCLUSIVE, body, "take the store lock (exclusive)",
                                 IfNoneMatch="*")["ETag"]
                break
            except self._bx.ClientError as e:
                if not _precondition_failed(e):
                    raise StoreError(f"{self.url}: cannot take the store lock: {e}") from None
            # a first try that created the object but whose answer was lost: it is ours
            etag = self._own_lock_etag(LOCK_EXCLUSIVE, body)
            if etag is not None:
                break
            objects, _, now = self._list(LOCK_EXCLUSIVE, "look at the exclusive lock")
            live = [o for o in objects if self._lock_state(o, now)[0]]
            if live:
                raise StoreLockedError(f"{self.url}: store is locked, prune is running "
                                       f"({self._lock_state(live[0], now)[1]}); cannot {purpose} now")
            for o in objects:        # a dead holder's lock: remove exactly that object
                with contextlib.suppress(self._bx.ClientError):
                    self._delete(LOCK_EXCLUSIVE, "remove a dead exclusive lock", IfMatch=o["ETag"])
        if etag is None:
            raise StoreLockedError(f"{self.url}: store is locked, another prune took it; "
                                   f"cannot {purpose} now")
        state = {"etag": etag}
        try:
            holders = self._live_locks(LOCK_SHARED)
            if holders:
                raise StoreLockedError(f"{self.url}: store is locked, a run or reader is using it "
                                       f"({holders[0]}); cannot {purpose} now")

            def renew():
                try:
                    state["etag"] = self._put(LOCK_EXCLUSIVE, body, "renew the store lock (exclusive)",
                                              IfMatch=state["etag"])["ETag"]
                except self._bx.ClientError as e:
                    # a renewal that landed but whose answer was lost changed the ETag
                    etag = self._own_lock_etag(LOCK_EXCLUSIVE, body) if _precondition_failed(e) else None
                    if etag is None:
                        raise
                    state["etag"] = etag
            with self._lease(renew):
                yield
        finally:
            self._release_exclusive(body, state)

    def _release_exclusive(self, body: bytes, state: dict) -> None:
        for _ in range(3):
            try:
                self._delete(LOCK_EXCLUSIVE, "release the store lock (exclusive)", IfMatch=state["etag"])
                return
            except self._bx.ClientError as e:
                if _not_found(e):
                    return
                if not _precondition_failed(e):
                    log.warning("%s: exclusive lock not released (%s)", self.url, e)
                    return
            except StoreError as e:
                log.warning("%s: exclusive lock not released (%s)", self.url, e)
                return
            # the ETag moved under us (a renewal whose answer was lost): still ours?
            try:
                etag = self._own_lock_etag(LOCK_EXCLUSIVE, body)
            except StoreError as e:
                log.warning("%s: exclusive lock not released (%s)", self.url, e)
                return
            if etag is None:
                return              # gone, or another holder's now: not ours to delete
            state["etag"] = etag

    @contextlib.contextmanager
    def _lease(self, renew):
        """Run ``renew`` every ttl/4 in a thread while the body runs."""
        stop = threading.Event()
        period = self.settings.lock_ttl / 4

        def loop():
            while not stop.wait(period):
                try:
                    renew()
                except Exception as e:      # keep trying: the lease lasts ttl
                    log.warning("%s: cannot renew the store lock: %s", self.url, e)
        t = threading.Thread(target=loop, name="smsblock-s3-lease", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    # -- packs ---------------------------------------------------------------------------
    def _remote_size(self, rel: str) -> int | None:
        def go():
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"]
            except self._bx.ClientError as e:
                if _not_found(e):
                    return None
                raise
        return self._call(f"look for {self._where(rel)}", go)

    def _uploaded_parts(self, key: str, upload_id: str) -> dict[int, tuple[int, str, str]]:
        """``{part number: (size, ETag, hex MD5 or "")}`` of an incomplete upload."""
        out, marker = {}, 0
        while True:
            r = self._call(f"list parts of upload {upload_id} of s3://{self.bucket}/{key}",
                           lambda m=marker: self.client.list_parts(Bucket=self.bucket, Key=key,
                                                                   UploadId=upload_id, PartNumberMarker=m))
            for p in r.get("Parts", []):
                etag = p["ETag"]
                out[int(p["PartNumber"])] = (int(p["Size"]), etag, etag.strip('"').lower())
            if not r.get("IsTruncated"):
                return out
            marker = int(r["NextPartNumberMarker"])

    def _multipart_upload(self, rel: str, path: str, size: int, resume: list[str] = ()) -> None:
        key, where = self._key(rel), self._where(rel)
        part_size = self.settings.part_size
        n_parts = (size + part_size - 1) // part_size
        have: dict[int, tuple[int, str, str]] = {}
        upload_id = None
        for uid in resume:           # continue an upload a dead run began, with its part size
            try:
                parts = self._uploaded_parts(key, uid)
            except self._bx.ClientError:
                continue
            upload_id = uid
            guess = max((p[0] for p in parts.values()), default=part_size)
            if _parts_fit(parts, size, guess):
                part_size, have = guess, parts
                n_parts = (size + part_size - 1) // part_size
            break
        if upload_id is None:
            upload_id = self._call(f"start multipart upload of {where}", lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key)["UploadId"])
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        failed = threading.Event()

        def send(number: int) -> dict:
            if failed.is_set():
                raise StoreError("upload abandoned")
            offset = (number - 1) * part_size
            data = os.pread(fd, min(part_size, size - offset), offset)
            md5 = _md5_b64(data)
            md5_hex = hashlib.md5(data).hexdigest()
            known = have.get(number)
            if known is not None and known[0] == len(data) and known[2] == md5_hex:
                return {"PartNumber": number, "ETag": known[1]}      # already there: not resent
            tries = [0]

            def go():
                tries[0] += 1
                if tries[0] > 1:        # did an earlier try land, its answer lost?
                    r = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               PartNumberMarker=number - 1, MaxParts=1)
                    for p in r.get("Parts", []):
                        if int(p["PartNumber"]) == number and int(p["Size"]) == len(data) \
                                and p["ETag"].strip('"').lower() == md5_hex:
                            return {"ETag": p["ETag"]}
                return self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                    Body=self._body(data), ContentMD5=md5, ContentLength=len(data))
            r = self._call(f"upload part {number} of {n_parts} of {where}", go)
            return {"PartNumber": number, "ETag": r["ETag"]}

        try:
            futures = [self._executor().submit(send, i) for i in range(1, n_parts + 1)]
            parts = []
            for fut in futures:
                try:
                    parts.append(fut.result())
                except BaseException:
                    failed.set()
                    raise
            self._complete(key, where, upload_id, parts, size)
        except BaseException:
            failed.set()
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as e:       # prune aborts it later
                log.warning("%s: cannot abort the failed upload %s (prune will): %s", where, upload_id, e)
            raise
        finally:
            os.close(fd)

    def _complete(self, key, where, upload_id, parts, size) -> None:
        def go():
            try:
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts})
            except self._bx.ClientError as e:
                # a retried complete whose first try succeeded (the answer was lost)
                if error_code(e) == "NoSuchUpload" and self._remote_size(self._rel(key)) == size:
                    return
                raise
        self._call(f"complete multipart upload of {where}", go)

    def _read(self, rel: str, offset: int, length: int) -> bytes:
        """Bytes of an object by ranged GET; reads near other recent reads of the same
        object (a restore walking a pack) come from ``readahead`` windows (readahead.py)."""
        return self._readahead.read(rel, offset, length)

    def _read_range(self, rel: str, offset: int, length: int) -> bytes:

        def go():
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(rel),
                                           Range=f"bytes={offset}-{offset + length - 1}")
            except self._bx.ClientError as e:
                if error_code(e) == "InvalidRange" or http_status(e) == 416:
                    return b""
                if _not_found(e):
                    raise _Missing() from None
                raise
            return self._whole_body(r)
        data = self._call(f"read {length} bytes at {offset} of {self._where(rel)}", go)
        return data[:length]

    # -- leftovers ----------------------------------------------------------------------------
    def _multipart_uploads(self, rel_prefix: str = "") -> list[tuple[str, str]]:
        out, kw = [], {"Bucket": self.bucket, "Prefix": self._key(rel_prefix)}
        while True:
            r = self._call(f"list incomplete uploads under {self.url}",
                           lambda kw=dict(kw): self.client.list_multipart_uploads(**kw))
            out.extend((u["Key"], u["UploadId"]) for u in r.get("Uploads", []))
            if not r.get("IsTruncated"):
                return out
            kw["KeyMarker"] = r.get("NextKeyMarker")
            kw["UploadIdMarker"] = r.get("NextUploadIdMarker")

    def list_leftovers(self) -> list[str]:
        """Incomplete multipart uploads under the prefix (``multipart:KEY?uploadId=ID``),
        staged files on this machine (``staging:NAME``) and dead lock objects (``lock:KEY``)."""
        names = [f"multipart:{key}?uploadId={uid}" for key, uid in self._multipart_uploads()]
        try:
            fd = self._staging_fd()
            try:
                names += [f"staging:{n}" for n in sorted(os.listdir(fd))]
            finally:
                os.close(fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{self.staging_dir}: cannot list staged files: {e.strerror}") from None
        objects, _, now = self._list("locks/", "look for dead locks")
        names += [f"lock:{o['Key']}" for o in objects if not self._lock_state(o, now)[0]]
        return names

    def remove_leftover(self, name: str) -> int:
        kind, _, rest = name.partition(":")
        if kind == "multipart":
            key, _, uid = rest.partition("?uploadId=")
            freed = 0
            with contextlib.suppress(self._bx.ClientError):
                r = self._call(f"list parts of upload {uid} of {key}", lambda: self.client.list_parts(
                    Bucket=self.bucket, Key=key, UploadId=uid))
                freed = sum(int(p.get("Size", 0)) for p in r.get("Parts", []))

            def abort():
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=uid)
                except self._bx.ClientError as e:
                    if error_code(e) != "NoSuchUpload":
                        raise
            self._call(f"abort incomplete upload {uid} of s3://{self.bucket}/{key}", abort)
            return freed
        if kind == "staging":
            try:
                fd = self._staging_fd()
            except FileNotFoundError:
                return 0
            except OSError as e:
                raise StoreError(f"{self.staging_dir}: cannot remove a staged file: {e.strerror}") from None
            try:
                return remove_file(os.path.basename(rest), dir_fd=fd)
            except IsADirectoryError:
                return 0
            finally:
                os.close(fd)
        if kind == "lock":
            rel = self._rel(rest)
            if rel.startswith("locks/"):
                self._delete(rel, "remove a dead lock object")
            return 0
        raise StoreError(f"{self.url}: unknown leftover {name!r}")
