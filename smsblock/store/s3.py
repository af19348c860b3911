"""S3Store: a store in an S3 bucket under a prefix (``s3://BUCKET/PREFIX``).

Layout (the local store's, as keys)::

    PREFIX/config.json                          store settings, created with If-None-Match: *
    PREFIX/locks/exclusive.json                 prune's lock object (owner + lease)
    PREFIX/locks/shared-<uuid>.json             one per run or reader holding the lock shared
    PREFIX/packs/<id[:2]>/<id>.pack             sealed packs (immutable; id = SHA-256 of index)
    PREFIX/runs/<server_id>/<run_id>.manifest   one per completed run, put last in one PUT
    PREFIX/damaged/<pack_id>.json               damage records (what verify found damaged)

Packs are built in a local staging folder, then uploaded: in one PUT with Content-MD5
below ``multipart_threshold``, else as a multipart upload whose parts go up in parallel
(``parallel`` at a time, each read from the staged file only when its turn comes, so
memory stays at ``parallel * part_size``), each with its Content-MD5.  Keys are pure
functions of content, so a retried or resumed upload lands on the same key and a pack
already there (same size) is not sent again.  A run killed mid-upload leaves an
incomplete multipart upload under the prefix and maybe a staged file: leftovers that
:func:`smsblock.engine.prune` aborts and deletes.

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
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlparse

import numpy as np

from ..errors import RunNotFoundError, StoreError, StoreLockedError, TransientStoreError, UsageError
from ..fsutil import make_root, open_subdir, remove_file, replace_file, subdir
from ..pack import INDEX_DTYPE, is_pack_id, pack_id_of, read_index, sealed_size
from .base import (RUN_ID_RE, SERVER_ID_RE, PackStat, Store, check_run_id, check_server_id,
                   no_store_error)
from .retry import RetryPolicy, error_code, http_status
from .s3config import CloudSettings
from .throttle import ThrottledBody, TokenBucket

log = logging.getLogger("smsblock.store.s3")

MANIFEST_SUFFIX = ".manifest"
LOCK_EXCLUSIVE = "locks/exclusive.json"
LOCK_SHARED = "locks/shared-"


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


class S3Store(Store):
    """A store at ``s3://BUCKET/PREFIX``; ``settings`` or keyword overrides shape the client
    (see :class:`~smsblock.store.s3config.CloudSettings`)."""

    def __init__(self, url: str, settings: CloudSettings | None = None, **overrides):
        super().__init__()
        import botocore.exceptions
        self._bx = botocore.exceptions
        self.bucket, self.prefix, query = parse_s3_url(url)
        self.settings = settings or CloudSettings.load(url_query=query, **overrides)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.client = self.settings.client("s3", max_pool=self.settings.parallel)
        self.retry = RetryPolicy(self.settings.retry_attempts, self.settings.retry_seconds)
        self._bucket_limit = TokenBucket(self.settings.bandwidth) if self.settings.bandwidth else None
        self._pool: ThreadPoolExecutor | None = None
        self._ra_lock = threading.Lock()
        self._ra_windows: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._ra_last: dict[str, int] = {}
        self._pool_lock = threading.Lock()
        self.stats = {"requests": 0, "bytes_sent": 0}
        self._stats_lock = threading.Lock()
        self.client.meta.events.register("before-send.s3", self._count_request)
        staging = self.settings.staging_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smsblock", "staging")
        url_hash = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.staging_dir = os.path.join(os.path.expanduser(staging), url_hash)
        # pack indexes are immutable and named by their own SHA-256: safe to keep locally
        self.index_cache_dir = os.path.join(os.path.expanduser(staging), "index-cache", url_hash)

    def __repr__(self) -> str:
        return f"<S3Store {self.url}>"

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

    # -- creation and config ---------------------------------------------------------
    def exists(self) -> bool:
        # a GET, not a HEAD: a HEAD's 404 cannot tell a missing bucket from a missing key
        self._config_bytes = self._get("config.json", "read the store config")
        return self._config_bytes is not None

    def _read_config(self) -> bytes:
        data = getattr(self, "_config_bytes", None) or self._get("config.json", "read the store config")
        if data is None:
            raise no_store_error(self.url)
        return data

    def _create(self, config_bytes: bytes) -> None:
        if self.exists():
            return
        objects, _, _ = self._list("", "check the prefix is free")
        strangers = [o["Key"] for o in objects if not self._rel(o["Key"]).startswith("locks/")]
        # a racing first run may have created the store since: its config is the first
        # object it puts, so keys beside the config mean the store exists now
        if strangers and not self.exists():
            raise StoreError(f"{self.url}: prefix holds other objects ({strangers[0]}...) and is "
                             "not a smsblock store")
        try:
            self._put("config.json", config_bytes, "create the store", IfNoneMatch="*")
        except self._bx.ClientError as e:
            if not _precondition_failed(e):    # a racing creator won: its config stands
                raise StoreError(f"{self.url}: cannot create store: {e}") from None

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
    def _pack_rel(self, pack_id: str) -> str:
        return f"packs/{pack_id[:2]}/{pack_id}.pack"

    def pack_name(self, pack_id: str) -> str:
        return self._where(self._pack_rel(pack_id))

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

    def initialise(self, config=None):
        """Create the store if needed; then finish the uploads of sealed packs that dead
        runs on this machine left staged (see :meth:`resume_staged_packs`)."""
        cfg = super().initialise(config)
        self.resume_staged_packs()
        return cfg

    def resume_staged_packs(self) -> list[str]:
        """Upload sealed packs left in the staging folder by runs that no longer run (a
        SIGKILL or a lost network during an upload), sending only the parts their
        incomplete multipart upload lacks.  Unsealed or damaged files are left for prune.
        Returns the pack ids made visible."""
        done = []
        try:
            fd = self._staging_fd()
        except FileNotFoundError:
            return done
        except OSError as e:
            log.warning("%s: %s; staged packs not resumed", self.staging_dir, e.strerror)
            return done
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        uploads: dict[str, list[str]] | None = None
        for name in names:
            pid, _, rest = name.partition("-")
            if not name.endswith(".pack.tmp") or not pid.isdigit() or _pid_alive(int(pid)):
                continue
            path = os.path.join(self.staging_dir, name)
            pack_id = self._sealed_pack_id(path)
            if pack_id is None:
                continue
            if uploads is None:
                uploads = {}
                for key, uid in self._multipart_uploads():
                    uploads.setdefault(key, []).append(uid)
            rel = self._pack_rel(pack_id)
            pending = uploads.get(self._key(rel), [])
            log.info("%s: finishing the upload a dead run left (%s)", self.pack_name(pack_id),
                     f"{len(pending)} incomplete upload(s)" if pending else "not started")
            try:
                self._put_pack_resuming(pack_id, path, pending)
            except (StoreError, self._bx.ClientError) as e:
                # not fatal: the run stores these blocks again, prune clears what is left
                log.warning("%s: cannot finish the upload a dead run left: %s",
                            self.pack_name(pack_id), e)
                continue
            done.append(pack_id)
        return done

    def _sealed_pack_id(self, path: str) -> str | None:
        """The id of a complete, intact pack file, else None."""
        from ..pack import verify_pack
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                def read(o, n):
                    return os.pread(f.fileno(), n, o)
                _, index = read_index(read, size, path, check_id=False)
                pack_id = pack_id_of(index.tobytes())
                _, good, problems = verify_pack(read, size, f"{pack_id}.pack", self.config.address)
        except (OSError, StoreError):
            return None
        if problems or good is None or not good.all():
            return None
        return pack_id

    def pack_index(self, pack_id: str, size: int) -> np.ndarray:
        """A pack's index: from the local index cache when it holds bytes whose SHA-256 is
        the pack id (the id *is* the index's hash, so a cached copy verifies itself),
        else read from S3 (footer + index: two ranged GETs) and cached."""
        with self._cache_lock:
            hit = self._index_cache.get(pack_id)
        if hit is not None and sealed_size(hit) == size:
            return hit
        path = os.path.join(self.index_cache_dir, pack_id[:2], pack_id + ".idx")
        try:
            with open(path, "rb") as f:
                raw = f.read()
            index = np.frombuffer(raw, INDEX_DTYPE).copy() \
                if len(raw) % INDEX_DTYPE.itemsize == 0 else None
            # the object in S3 must still be the pack the index describes: a pack cut
            # short there is read (and found damaged) rather than built upon
            if index is not None and pack_id_of(raw) == pack_id and sealed_size(index) == size:
                with self._cache_lock:
                    self._index_cache[pack_id] = index
                return index
        except OSError:
            pass
        index = super().pack_index(pack_id, size)
        self._cache_index(pack_id, index)
        return index

    def _cache_index(self, pack_id: str, index: np.ndarray) -> None:
        name = pack_id + ".idx"
        try:    # 0700 folders, a new 0600 file (O_EXCL), renamed in the same folder
            make_root(self.index_cache_dir)
            with subdir(self.index_cache_dir, pack_id[:2], create=True) as fd:
                replace_file(name, index.tobytes(), dir_fd=fd, sync=False)
        except OSError as e:        # a cache: failing to fill it costs only time
            log.debug("%s: cannot cache the index of pack %s: %s", self.url, pack_id, e)

    def _remote_size(self, rel: str) -> int | None:
        def go():
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"]
            except self._bx.ClientError as e:
                if _not_found(e):
                    return None
                raise
        return self._call(f"look for {self._where(rel)}", go)

    def put_pack(self, pack_id: str, staged_path: str) -> None:
        self._put_pack_resuming(pack_id, staged_path, [])

    def replace_pack(self, pack_id: str, staged_path: str) -> None:
        self._put_pack_resuming(pack_id, staged_path, [], replace=True)

    def _put_pack_resuming(self, pack_id: str, staged_path: str, upload_ids: list[str],
                           replace: bool = False) -> None:
        """put_pack, continuing one of ``upload_ids`` (incomplete uploads of this key)."""
        rel = self._pack_rel(pack_id)
        try:
            size = os.path.getsize(staged_path)
        except OSError as e:
            raise StoreError(f"{staged_path}: staged pack unreadable: {e.strerror}") from None
        if not replace and self._remote_size(rel) == size:
            log.info("%s: already in the store, not sent again", self.pack_name(pack_id))
        elif upload_ids:
            self._multipart_upload(rel, staged_path, size, resume=upload_ids)
        elif size < self.settings.multipart_threshold:
            with open(staged_path, "rb") as f:
                data = f.read()
            self._put_once(rel, data, "upload pack")
        else:
            self._multipart_upload(rel, staged_path, size)
        try:        # the index, read from the local copy, goes to the index cache
            with open(staged_path, "rb") as f:
                _, index = read_index(lambda o, n: os.pread(f.fileno(), n, o), size,
                                      self.pack_name(pack_id))
            self._cache_index(pack_id, index)
        except (OSError, StoreError) as e:
            log.debug("%s: index not cached: %s", self.pack_name(pack_id), e)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged_path)

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

    def list_pack_stats(self) -> dict[str, PackStat]:
        objects, _, _ = self._list("packs/", "list packs")
        out = {}
        for o in objects:
            parts = self._rel(o["Key"]).split("/")
            if len(parts) == 3 and parts[2].endswith(".pack"):
                pid = parts[2][:-5]
                if is_pack_id(pid) and pid.startswith(parts[1]):
                    out[pid] = PackStat(int(o["Size"]),
                                        _fingerprint(o.get("ETag"), o["Size"], o.get("LastModified")))
        return out

    def pack_fingerprint(self, pack_id: str) -> str | None:
        rel = self._pack_rel(pack_id)

        def go():
            try:
                h = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            except self._bx.ClientError as e:
                if _not_found(e):
                    return None
                raise
            return _fingerprint(h.get("ETag"), h["ContentLength"], h.get("LastModified"))
        return self._call(f"look at {self._where(rel)}", go)

    @contextlib.contextmanager
    def cache_dir(self):
        # beside the pack-index cache: this machine's, private, per store URL
        parent, name = os.path.split(self.index_cache_dir)
        try:
            make_root(parent)
            fd = open_subdir(parent, name, create=True)
        except OSError as e:
            raise StoreError(f"{self.index_cache_dir}: cannot open: {e.strerror}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def read_pack(self, pack_id: str, offset: int, length: int) -> bytes:
        """Bytes of a pack by ranged GET.  Reads that continue where the previous read of
        the same pack ended (a restore walking a pack) fetch ``readahead`` bytes at once
        and serve the following reads from them; other reads fetch exactly what they ask."""
        if length <= 0:
            return b""
        ahead = self.settings.readahead
        if not ahead or length >= ahead:
            return self._read_range(pack_id, offset, length)
        with self._ra_lock:
            for (pid, start), window in self._ra_windows.items():
                if pid == pack_id and start <= offset and offset + length <= start + len(window):
                    self._ra_windows.move_to_end((pid, start))
                    self._ra_last[pack_id] = offset + length
                    return window[offset - start:offset - start + length]
                if pid == pack_id and start <= offset < start + len(window) and len(window) < ahead:
                    # the window reached the pack's end: this read is short there
                    self._ra_last[pack_id] = start + len(window)
                    return window[offset - start:]
            last = self._ra_last.get(pack_id)
            sequential = last is not None and last <= offset <= last + ahead // 4
            self._ra_last[pack_id] = offset + length
        if not sequential:
            return self._read_range(pack_id, offset, length)
        window = self._read_range(pack_id, offset, ahead)
        with self._ra_lock:
            self._ra_windows[(pack_id, offset)] = window
            while len(self._ra_windows) > 4:          # memory: at most 4 windows
                self._ra_windows.popitem(last=False)
        return window[:length]

    def _read_range(self, pack_id: str, offset: int, length: int) -> bytes:
        rel = self._pack_rel(pack_id)

        def go():
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(rel),
                                           Range=f"bytes={offset}-{offset + length - 1}")
            except self._bx.ClientError as e:
                if error_code(e) == "InvalidRange" or http_status(e) == 416:
                    return b""
                if _not_found(e):
                    raise StoreError(f"{self.pack_name(pack_id)}: pack is missing") from None
                raise
            return self._whole_body(r)
        data = self._call(f"read {length} bytes at {offset} of {self.pack_name(pack_id)}", go)
        return data[:length]

    def delete_pack(self, pack_id: str) -> None:
        self.forget_pack(pack_id)
        with self._ra_lock:
            for k in [k for k in self._ra_windows if k[0] == pack_id]:
                del self._ra_windows[k]
            self._ra_last.pop(pack_id, None)
        self._delete(self._pack_rel(pack_id), "delete pack")
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.index_cache_dir, pack_id[:2], pack_id + ".idx"))

    # -- manifests -------------------------------------------------------------------------
    def _manifest_rel(self, server_id: str, run_id: str) -> str:
        return f"runs/{check_server_id(server_id)}/{check_run_id(run_id)}{MANIFEST_SUFFIX}"

    def list_servers(self) -> list[str]:
        _, prefixes, _ = self._list("runs/", "list servers", delimiter="/")
        names = [self._rel(p).rstrip("/").split("/")[-1] for p in prefixes]
        # keys that are not servers (written by hand or other tools) are skipped, as locally
        return sorted(n for n in names if SERVER_ID_RE.fullmatch(n) and self.list_run_ids(n))

    def list_run_ids(self, server_id: str) -> list[str]:
        objects, _, _ = self._list(f"runs/{check_server_id(server_id)}/", "list runs")
        out = []
        for o in objects:
            name = self._rel(o["Key"]).split("/")[-1]
            if name.endswith(MANIFEST_SUFFIX) and RUN_ID_RE.fullmatch(name[:-len(MANIFEST_SUFFIX)]):
                out.append(name[:-len(MANIFEST_SUFFIX)])
        return sorted(out)

    def get_manifest_bytes(self, server_id: str, run_id: str) -> bytes:
        rel = self._manifest_rel(server_id, run_id)
        data = self._get(rel, "read manifest")
        if data is None:
            raise RunNotFoundError(f"{self.url}: no run {run_id!r} of server {server_id!r}")
        return data

    def put_manifest_bytes(self, server_id: str, run_id: str, data: bytes) -> None:
        self._put(self._manifest_rel(server_id, run_id), bytes(data), "publish manifest")

    def delete_manifest(self, server_id: str, run_id: str) -> None:
        self._delete(self._manifest_rel(server_id, run_id), "delete manifest")

    # -- damage records ----------------------------------------------------------------------
    def _damage_rel(self, pack_id: str) -> str:
        if not is_pack_id(pack_id):
            raise StoreError(f"{self.url}: {pack_id!r} is not a pack id")
        return f"damaged/{pack_id}.json"

    def put_damage_record(self, pack_id: str, data: bytes) -> None:
        self._put(self._damage_rel(pack_id), bytes(data), "record damage")

    def list_damage_records(self) -> dict[str, bytes]:
        objects, _, _ = self._list("damaged/", "list damage records")
        out = {}
        for o in objects:
            name = self._rel(o["Key"]).split("/")[-1]
            if name.endswith(".json") and is_pack_id(name[:-5]) and int(o.get("Size", 0)) <= 1 << 20:
                data = self._get(f"damaged/{name}", "read a damage record")
                if data is not None:
                    out[name[:-5]] = data
        return out

    def delete_damage_record(self, pack_id: str) -> None:
        self._delete(self._damage_rel(pack_id), "delete a damage record")

    # -- leftovers ----------------------------------------------------------------------------
    def _multipart_uploads(self) -> list[tuple[str, str]]:
        out, kw = [], {"Bucket": self.bucket, "Prefix": self._key("")}
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
