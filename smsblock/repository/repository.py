"""The repository: what a store holds, on top of any backend.

A store holds these objects, all immutable once visible and all under deterministic
names, so one repository fits a local folder, S3 and the like (:mod:`smsblock.backend`):

* ``config.json``: one small JSON object written when the store is created (content-address
  algorithm, compression, pack size), created only if absent;
* packs ``packs/<id[:2]>/<id>.pack`` (see :mod:`smsblock.pack`); the id is the SHA-256 of
  the pack's index, so writing a pack twice writes the same object;
* manifests ``runs/<server_id>/<run_id>.manifest``; a run exists exactly when its manifest
  does, and the manifest is put last, in one atomic put;
* damage records ``damaged/<pack_id>.json``: what ``verify`` (or a read that hit a bad
  block) found damaged in that pack.  A new run never dedups against a recorded block, so
  it stores the block again; readers prefer undamaged copies; prune drops damaged copies.

Here live the dedup index, run listing, reading blocks back, the pack-index cache of remote
backends and finishing the puts of packs a dead writer staged.

Publishers (:attr:`Repository.publishers`; an ``ebs://`` store's EBS snapshots) run after
a run's manifest is committed (:meth:`Repository.publish_run`): a run exists, restores
and dedups whatever a publisher does, and a publisher keeps its own records, outside the
immutable manifest.  A failed publish is a :class:`~smsblock.errors.PublishError` naming
the committed run, which can be published again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import numpy as np

from ..backend.base import Backend, ObjectStat
from ..errors import (Cancelled, PublishError, RunNotFoundError, SmsBlockError, StoreCorruptError,
                      StoreError, UsageError)
from ..fsutil import open_dir, read_file_at, remove_file, replace_file
from ..keyset import isin
from ..manifest import Manifest
from ..pack import (ALGORITHMS, INDEX_DTYPE, BlockIndex, BlockLocation, decompress_block, is_pack_id,
                    pack_id_of, read_index, sealed_size, verify_pack)

PackStat = ObjectStat     # a pack as a listing shows it: size and fingerprint
MANIFEST_SUFFIX = ".manifest"
MAX_DAMAGE_RECORD = 1 << 20

log = logging.getLogger("smsblock.store")
STORE_FORMAT = "smsblock-store"
STORE_VERSION = 1
DEFAULT_PACK_SIZE = 64 << 20
SERVER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")   # always fullmatch
RUN_ID_RE = re.compile(r"r-[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{8}")   # ASCII digits only


def no_store_error(url: str) -> StoreError:
    """The one message for a path or URL that holds no store (stores are created only on
    purpose: a mistyped path must not start a second one)."""
    return StoreError(f"{url}: no smsblock store here (create one with `smsblock init {url}` "
                      f"or `replicate --create`)")


def check_server_id(server_id: str) -> str:
    if not isinstance(server_id, str) or not SERVER_ID_RE.fullmatch(server_id):
        raise UsageError(f"server id {server_id!r} must be 1-128 characters of letters, digits, "
                         "'.', '_' and '-', starting with a letter or digit")
    return server_id


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise UsageError(f"run id {run_id!r} is not of the form r-YYYYMMDDTHHMMSS.ffffffZ-xxxxxxxx")
    return run_id


@dataclass
class StoreConfig:
    """Settings fixed when a store is created (``config.json``)."""

    # content address of blocks: blake3 (measured ~25 % faster end to end than sha256 on a
    # first full run here) or sha256 (what an EBS sink wants per block: no second hash)
    address: str = "blake3"
    compression: str = "zstd"
    zstd_level: int = 1
    pack_size: int = DEFAULT_PACK_SIZE  # a pack is sealed once its frames reach this size
    format: str = STORE_FORMAT
    version: int = STORE_VERSION

    def __post_init__(self):
        if self.address not in ALGORITHMS:
            raise UsageError(f"unknown content-address algorithm {self.address!r} (sha256 or blake3)")
        if self.compression != "zstd":
            raise UsageError(f"unknown compression {self.compression!r} (zstd)")
        if not (1 <= int(self.zstd_level) <= 19):
            raise UsageError(f"zstd level {self.zstd_level} out of range 1-19")
        if int(self.pack_size) < 4096:
            raise UsageError(f"pack size {self.pack_size} is too small (at least 4096)")

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "StoreConfig":
        try:
            d = json.loads(data)
        except ValueError as e:
            raise StoreCorruptError(f"store config is not JSON: {e}", where) from None
        if not isinstance(d, dict) or d.get("format") != STORE_FORMAT:
            raise StoreCorruptError("not a smsblock store config", where)
        if d.get("version") != STORE_VERSION:
            raise StoreCorruptError(f"unsupported store version {d.get('version')!r}", where)
        known = {k: d[k] for k in ("address", "compression", "zstd_level", "pack_size") if k in d}
        try:
            return cls(**known)
        except UsageError as e:
            raise StoreCorruptError(str(e), where) from None


@dataclass
class DamageRecord:
    """What is known damaged in one pack: ``addresses`` (32-byte content addresses of
    frames that do not give their block) and ``pack`` (damage outside the frames, or
    too many bad frames to list: no new run builds on any block of the pack)."""

    pack_id: str
    addresses: set = field(default_factory=set)
    pack: bool = False
    problems: list = field(default_factory=list)
    by: str = "verify"

    MAX_ADDRESSES = 4096            # more than this: the pack is marked as a whole
    MAX_PROBLEMS = 8

    def holds(self, addresses: np.ndarray) -> np.ndarray:
        """Per row of an (n, 32) address array: whether the record names it."""
        if not self.addresses:
            return np.zeros(len(addresses), bool)
        rows = np.ascontiguousarray(addresses).view(np.dtype((np.void, 32))).reshape(-1)
        named = np.array([np.void(a) for a in self.addresses], np.dtype((np.void, 32)))
        return isin(rows, named)

    def to_bytes(self) -> bytes:
        addresses, pack = sorted(a.hex() for a in self.addresses), self.pack
        if len(addresses) > self.MAX_ADDRESSES:
            addresses, pack = [], True
        return (json.dumps({"format": "smsblock-damage", "version": 1, "pack_id": self.pack_id,
                            "pack": pack, "addresses": addresses,
                            "problems": [str(p)[:500] for p in self.problems[:self.MAX_PROBLEMS]],
                            "by": self.by, "found": datetime.now(timezone.utc).isoformat()},
                           indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, pack_id: str, raw: bytes, where: str) -> "DamageRecord":
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("format") != "smsblock-damage" \
                    or d.get("pack_id") != pack_id:
                raise ValueError("not a damage record of this pack")
            addresses = {bytes.fromhex(a) for a in d.get("addresses", [])}
            if any(len(a) != 32 for a in addresses):
                raise ValueError("bad address")
            return cls(pack_id, addresses, bool(d.get("pack")), list(d.get("problems", [])),
                       str(d.get("by", "?")))
        except (ValueError, TypeError, AttributeError) as e:
            # an unreadable record cannot clear anything: the whole pack stays suspect
            log.warning("%s: damage record of pack %s does not read (%s): the whole pack "
                        "counts as damaged", where, pack_id, e)
            return cls(pack_id, set(), True, [f"unreadable damage record: {e}"], "?")


@dataclass
class RunInfo:
    """One completed run of a server, as :meth:`Store.runs` lists it."""

    server_id: str
    run_id: str
    created: str
    summary: dict = field(default_factory=dict)
    #: the embedder's metadata given to ``replicate(meta=...)`` ({} when none)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)




class Repository:
    """A block store over a :class:`~smsblock.backend.base.Backend`; see the module
    docstring.  Thread-safe for reads."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.url = backend.url
        self._config: StoreConfig | None = None
        self._config_bytes: bytes | None = None
        self._index_cache: dict[str, np.ndarray] = {}
        self._cache_lock = threading.Lock()
        #: what runs after a run is committed (:meth:`publish_run`): objects with a
        #: ``name``, ``publish(server_id, run_id, *, progress, cancel) -> dict`` (its
        #: record of the run; publishing a published run returns the record),
        #: ``forget(server_id, run_id)`` (the run was deleted) and ``check_block_size(block_size)`` (UsageError before a
        #: run it could never publish)
        self.publishers: list = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # == names =============================================================
    @staticmethod
    def _pack_rel(pack_id: str, where: str = "") -> str:
        if not is_pack_id(pack_id):     # it becomes a name: never a path
            raise StoreError(f"{where}: {pack_id!r} is not a pack id (64 hex digits)")
        return f"packs/{pack_id[:2]}/{pack_id}.pack"

    def _manifest_rel(self, server_id: str, run_id: str) -> str:
        return f"runs/{check_server_id(server_id)}/{check_run_id(run_id)}{MANIFEST_SUFFIX}"

    def _damage_rel(self, pack_id: str) -> str:
        if not is_pack_id(pack_id):
            raise StoreError(f"{self.url}: {pack_id!r} is not a pack id")
        return f"damaged/{pack_id}.json"

    # == creation and config ===============================================
    def exists(self) -> bool:
        """Whether the store has been created (its config object is there)."""
        self._config_bytes = self.backend.get("config.json", what="read the store config")
        return self._config_bytes is not None

    def _read_config(self) -> bytes:
        data = self._config_bytes or self.backend.get("config.json", what="read the store config")
        if data is None:
            raise no_store_error(self.url)
        return data

    def _create(self, config_bytes: bytes) -> None:
        self.backend.prepare()
        if self.exists():
            return
        strangers = sorted(self.backend.names("", what="check the prefix is free"))
        # a racing first run may have created the store since: its config is the first
        # object it puts, so objects beside the config mean the store exists now
        if strangers and not self.exists():
            raise StoreError(f"{self.url}: not empty (holds {strangers[0]}...) and not a "
                             "smsblock store")
        self.backend.put("config.json", config_bytes, create_only=True, what="create the store")   # a racing creator's stands

    def lock(self, exclusive: bool, purpose: str) -> contextlib.AbstractContextManager:
        """Hold the store lock: shared for runs and reads, exclusive for prune.

        Raises :class:`~smsblock.errors.StoreLockedError` at once when it cannot be had.
        """
        return self.backend.lock(exclusive, purpose)

    def staging_path(self, suffix: str) -> str:
        """A fresh local file path to build a pack in (left-overs are found by prune)."""
        return self.backend.staging_path(suffix)

    def cache_dir(self):
        """This client's private folder for what it keeps about the store."""
        return self.backend.cache_dir()

    def holds_path(self, path) -> bool:
        """Whether a local file path lies inside the store (writing there would damage it)."""
        return self.backend.holds_path(path)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # == packs ==============================================================
    def pack_name(self, pack_id: str) -> str:
        """How a pack is named in messages (a path or a URL)."""
        return self.backend.where(self._pack_rel(pack_id, self.url))

    def put_pack(self, pack_id: str, staged_path: str, *, replace: bool = False,
                 resume: bool = False) -> None:
        """Make the sealed, fsynced file at ``staged_path`` visible as pack ``pack_id``
        (consuming the staged file).  Idempotent: the same id always has the same bytes.
        ``replace``: a pack already stored under this id is overwritten (it is damaged,
        a damage record names it, and this is a sound copy)."""
        rel = self._pack_rel(pack_id, self.url)
        index = None
        if self.backend.remote:      # the index, read from the local copy, goes to the cache
            try:
                with open(staged_path, "rb") as f:
                    _, index = read_index(lambda o, n: os.pread(f.fileno(), n, o),
                                          os.fstat(f.fileno()).st_size, self.pack_name(pack_id))
            except (OSError, StoreError) as e:
                log.debug("%s: index not cached: %s", self.pack_name(pack_id), e)
        self.backend.put(rel, path=staged_path, replace=replace, resume=resume,
                         what="upload pack" if self.backend.remote else "store pack")
        if index is not None:
            self._cache_index(pack_id, index)

    def replace_pack(self, pack_id: str, staged_path: str) -> None:
        """:meth:`put_pack` over a damaged pack of the same id."""
        self.put_pack(pack_id, staged_path, replace=True)

    def list_pack_stats(self) -> dict[str, PackStat]:
        """Every visible pack with its size and fingerprint, from one listing."""
        out = {}
        for name, st in self.backend.list("packs/", what="list packs").items():
            parts = name.split("/")
            if len(parts) == 3 and parts[2].endswith(".pack"):
                pid = parts[2][:-5]
                if is_pack_id(pid) and pid.startswith(parts[1]):
                    out[pid] = st
        return out

    def list_packs(self) -> dict[str, int]:
        """Every visible pack: ``{pack_id: size in bytes}``."""
        return {pid: st.size for pid, st in self.list_pack_stats().items()}

    def pack_fingerprint(self, pack_id: str) -> str | None:
        """The fingerprint :meth:`list_pack_stats` gives this pack now (None: missing)."""
        st = self.backend.stat(self._pack_rel(pack_id, self.url))
        return st.fingerprint if st is not None else None

    def read_pack(self, pack_id: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a pack (short only at its end)."""
        if length <= 0:
            return b""
        data = self.backend.get(self._pack_rel(pack_id, self.url), offset, length)
        if data is None:
            raise StoreError(f"{self.pack_name(pack_id)}: pack is missing")
        return data

    def delete_pack(self, pack_id: str) -> None:
        """Remove a pack (missing is fine)."""
        rel = self._pack_rel(pack_id, self.url)
        self.forget_pack(pack_id)
        self.backend.delete(rel, what="delete pack")
        if self.backend.remote:
            with contextlib.suppress(OSError, StoreError), self.cache_dir() as fd, \
                    _folder_at(fd, pack_id[:2]) as sub:
                remove_file(pack_id + ".idx", dir_fd=sub)

    def resume_staged_packs(self) -> list[str]:
        """Put sealed packs left staged by writers that no longer run (a SIGKILL or a lost
        network during an upload), sending only what their incomplete upload lacks.
        Unsealed or damaged files are left for prune.  Returns the pack ids made visible."""
        done = []
        for path in self.backend.orphaned_staged(".pack.tmp"):
            pack_id = self._sealed_pack_id(path)
            if pack_id is None:
                continue
            log.info("%s: finishing the put a dead run left", self.pack_name(pack_id))
            try:
                self.put_pack(pack_id, path, resume=True)
            except StoreError as e:
                # not fatal: the run stores these blocks again, prune clears what is left
                log.warning("%s: cannot finish the put a dead run left: %s",
                            self.pack_name(pack_id), e)
                continue
            done.append(pack_id)
        return done

    def _sealed_pack_id(self, path: str) -> str | None:
        """The id of a complete, intact pack file, else None."""
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

    # -- the pack-index cache (remote backends) --------------------------------
    def _cached_index(self, pack_id: str, size: int) -> np.ndarray | None:
        """A pack's index from this machine's cache when it holds bytes whose SHA-256 is
        the pack id (the id *is* the index's hash, so a cached copy verifies itself) and
        describe a pack of this size (else the object was cut short: read it)."""
        try:
            with self.cache_dir() as fd, _folder_at(fd, pack_id[:2]) as sub:
                raw = read_file_at(pack_id + ".idx", dir_fd=sub)
        except (OSError, StoreError):
            return None
        if raw is None or len(raw) % INDEX_DTYPE.itemsize:
            return None
        index = np.frombuffer(raw, INDEX_DTYPE).copy()
        if pack_id_of(raw) == pack_id and sealed_size(index) == size:
            return index
        return None

    def _cache_index(self, pack_id: str, index: np.ndarray) -> None:
        try:    # 0700 folders, a new 0600 file (O_EXCL), renamed in the same folder
            with self.cache_dir() as fd, _folder_at(fd, pack_id[:2], create=True) as sub:
                replace_file(pack_id + ".idx", index.tobytes(), dir_fd=sub, sync=False)
        except (OSError, StoreError) as e:        # a cache: failing to fill it costs only time
            log.debug("%s: cannot cache the index of pack %s: %s", self.url, pack_id, e)

    # == manifests ===========================================================
    def list_servers(self) -> list[str]:
        """Server ids with at least one run."""
        out = set()
        for name in self.backend.names("runs/", what="list servers"):
            parts = name.split("/")
            # other names (.DS_Store, lost+found...) are not servers: skipped, not an error
            if len(parts) == 3 and SERVER_ID_RE.fullmatch(parts[1]) \
                    and parts[2].endswith(MANIFEST_SUFFIX) \
                    and RUN_ID_RE.fullmatch(parts[2][:-len(MANIFEST_SUFFIX)]):
                out.add(parts[1])
        return sorted(out)

    def list_run_ids(self, server_id: str) -> list[str]:
        """Run ids of a server, sorted (= oldest first)."""
        prefix = f"runs/{check_server_id(server_id)}/"
        ids = (n[len(prefix):-len(MANIFEST_SUFFIX)] for n in self.backend.names(prefix, what="list runs")
               if n.endswith(MANIFEST_SUFFIX) and n.count("/") == 2)
        return sorted(i for i in ids if RUN_ID_RE.fullmatch(i))

    def get_manifest_bytes(self, server_id: str, run_id: str, offset: int = 0,
                           length: int | None = None) -> bytes:
        """A run's manifest, or ``length`` bytes of it from ``offset`` (a reader that
        streams a large manifest); RunNotFoundError when missing."""
        data = self.backend.get(self._manifest_rel(server_id, run_id), offset, length,
                                what="read manifest")
        if data is None:
            raise RunNotFoundError(f"{self.url}: no run {run_id!r} of server {server_id!r}")
        return data

    def put_manifest_bytes(self, server_id: str, run_id: str, data: bytes) -> None:
        """Commit a run's manifest in one atomic, durable step (the run exists from
        then on; :meth:`publish_run` comes after)."""
        self.backend.put(self._manifest_rel(server_id, run_id), bytes(data), what="publish manifest")

    def put_manifest_file(self, server_id: str, run_id: str, staged_path: str) -> None:
        """Commit a run's manifest from a file built at :meth:`staging_path` (consumed):
        a large manifest need not be held in memory.  Atomic and durable like
        :meth:`put_manifest_bytes`."""
        self.backend.put(self._manifest_rel(server_id, run_id), path=staged_path, replace=True,
                         what="publish manifest")

    def delete_manifest(self, server_id: str, run_id: str) -> None:
        """Remove a run (missing is fine), then the publishers' records of it."""
        self.backend.delete(self._manifest_rel(server_id, run_id), what="delete manifest")
        for publisher in self.publishers:
            publisher.forget(server_id, run_id)

    # == publishing a committed run ==========================================
    def publish_run(self, server_id: str, run_id: str | None = None, *, progress=None,
                    cancel=None) -> dict[str, dict]:
        """Run every publisher on a committed run (default: the server's latest);
        return ``{publisher name: its record}`` ({} for a store without publishers).
        A run already published is not published again.  A publisher's failure is a
        PublishError naming the run, which stays committed (Cancelled stays Cancelled)."""
        if not self.publishers:
            return {}
        # shared, as a run's: prune cannot delete the packs a publisher reads
        with self.lock(exclusive=False, purpose="publish a run"):
            run_id = self._run_of(server_id, run_id)
            if self.backend.stat(self._manifest_rel(server_id, run_id)) is None:
                raise RunNotFoundError(f"{self.url}: no run {run_id!r} of server {server_id!r}")
            return self.publish_committed(server_id, run_id, progress=progress, cancel=cancel)

    def publish_committed(self, server_id: str, run_id: str, *, progress=None,
                          cancel=None) -> dict[str, dict]:
        """:meth:`publish_run` for a caller that holds the store lock (a replicate that
        has just committed ``run_id``): no second lock, which an S3 store may refuse
        while a prune asks for it."""
        out = {}
        for publisher in self.publishers:
            try:
                out[publisher.name] = publisher.publish(server_id, run_id, progress=progress,
                                                        cancel=cancel)
            except Cancelled:
                log.warning("%s: run %s of %s is stored; publishing it to %s was cancelled",
                            self.url, run_id, server_id, publisher.name)
                raise
            except SmsBlockError as e:
                raise PublishError(
                    f"{self.url}: run {run_id} of server {server_id} is stored (it restores "
                    f"from the store), but publishing it to {publisher.name} failed: {e} "
                    f"(`smsblock publish --server {server_id} --run {run_id}` tries again)",
                    server_id, run_id) from e
        return out

    def check_publishable(self, block_size: int) -> None:
        """UsageError, before a run starts, when a publisher could not publish a run of
        ``block_size``-byte blocks (EBS snapshots have 512 KiB blocks)."""
        for publisher in self.publishers:
            publisher.check_block_size(block_size)


    # == damage records ======================================================
    def put_damage_record(self, pack_id: str, data: bytes) -> None:
        """Write (or replace) a pack's damage record in one atomic step."""
        self.backend.put(self._damage_rel(pack_id), bytes(data), what="write damage record")

    def list_damage_records(self) -> dict[str, bytes]:
        """Every damage record: ``{pack_id: bytes}``."""
        out = {}
        for name, st in self.backend.list("damaged/", what="list damage records").items():
            base = name.split("/")[-1]
            if name.count("/") == 1 and base.endswith(".json") and is_pack_id(base[:-5]) \
                    and st.size <= MAX_DAMAGE_RECORD:
                data = self.backend.get(name, what="read a damage record")
                if data is not None:
                    out[base[:-5]] = data
        return out

    def delete_damage_record(self, pack_id: str) -> None:
        """Remove a pack's damage record (missing is fine)."""
        self.backend.delete(self._damage_rel(pack_id), what="delete damage record")

    # == leftovers ===========================================================
    def list_leftovers(self) -> list[str]:
        """Names of unfinished objects killed runs left behind (temp files, uploads)."""
        return self.backend.list_leftovers()

    def remove_leftover(self, name: str) -> int:
        """Remove one leftover; return the bytes freed."""
        return self.backend.remove_leftover(name)

    # == shared logic ======================================================

    @property
    def config(self) -> StoreConfig:
        if self._config is None:
            self._config = StoreConfig.from_bytes(self._read_config(), self.url)
        return self._config

    def initialise(self, config: StoreConfig | None = None) -> StoreConfig:
        """Create the store if it does not exist yet; return its config.  Then finish the
        puts of sealed packs that dead runs on this machine left staged."""
        if not self.exists():
            self._create((config or StoreConfig()).to_bytes())
        self._config = None
        cfg = self.config
        self.resume_staged_packs()
        return cfg

    def require(self) -> None:
        """Raise StoreError unless the store exists."""
        if not self.exists():
            raise no_store_error(self.url)

    def pack_index(self, pack_id: str, size: int) -> np.ndarray:
        """A sealed pack's index (cached: packs never change)."""
        with self._cache_lock:
            hit = self._index_cache.get(pack_id)
        if hit is not None and sealed_size(hit) == size:     # else cut short or replaced
            return hit
        if self.backend.remote:
            index = self._cached_index(pack_id, size)
            if index is not None:
                with self._cache_lock:
                    self._index_cache[pack_id] = index
                return index
        _, index = read_index(lambda o, n: self.read_pack(pack_id, o, n), size,
                              self.pack_name(pack_id))
        with self._cache_lock:
            self._index_cache[pack_id] = index
        if self.backend.remote:
            self._cache_index(pack_id, index)
        return index

    def forget_pack(self, pack_id: str) -> None:
        with self._cache_lock:
            self._index_cache.pop(pack_id, None)

    def block_index_dir(self) -> tuple[str, tuple[str, ...], bool]:
        """Where the on-disk block index lives: the backend's choice (an EBS store
        shares its staging store's backend, so its index too)."""
        return self.backend.block_index_dir()

    def block_index(self, *, for_new_runs: bool = False,
                    listed: dict[str, int] | None = None) -> BlockIndex:
        """The global block index: on disk (:mod:`smsblock.blockindex`), brought up to
        date with the pack listing (packs it lacks are indexed from their indexes).

        A pack whose index is damaged is left out with a warning (``verify`` reports it):
        its blocks count as absent, so a run stores them again instead of failing.
        Blocks a damage record names are left out too; the other blocks of a pack whose
        record marks it damaged as a whole come after every other copy (a reader finds
        an undamaged copy first).  ``for_new_runs`` (a run's dedup index) leaves such
        packs out entirely: a run never builds on a damaged pack.  ``listed``: the
        store's :meth:`list_packs`, when the caller has it already.
        """
        from ..blockindex import store_block_index     # on disk, synced with the listing
        return store_block_index(self, for_new_runs=for_new_runs, listed=listed)

    def index_new_packs(self, packs: dict[str, tuple[int, np.ndarray]]) -> bool:
        """Add packs this process has just sealed (``{pack_id: (size, index)}``, the
        indexes their writer holds) to the on-disk block index; best effort (see
        :func:`smsblock.blockindex.index_new_packs`)."""
        from ..blockindex import index_new_packs
        return index_new_packs(self, packs)

    # -- damage records ------------------------------------------------------
    def damage(self) -> dict[str, "DamageRecord"]:
        """The damage records, parsed; one that does not parse marks its whole pack."""
        out = {}
        for pid, raw in self.list_damage_records().items():
            out[pid] = DamageRecord.from_bytes(pid, raw, self.url)
        return out

    def record_damage(self, pack_id: str, addresses=(), *, pack: bool = False,
                      problems=(), by: str = "verify", replace: bool = False) -> None:
        """Record blocks of a pack (content addresses), or the pack as a whole, as
        damaged; merged with the pack's record unless ``replace``.  Best effort: a
        failure to write is logged, never raised (the damage itself is reported)."""
        try:
            old = None if replace else self.damage().get(pack_id)
            record = DamageRecord(pack_id, set(addresses), pack, list(problems), by)
            if old is not None:
                record.addresses |= old.addresses
                record.pack = record.pack or old.pack
                record.problems = (old.problems + record.problems)[:DamageRecord.MAX_PROBLEMS]
                if (record.addresses, record.pack) == (old.addresses, old.pack):
                    return
            self.put_damage_record(pack_id, record.to_bytes())
        except (StoreError, OSError) as e:
            log.warning("%s: cannot record the damage of pack %s: %s", self.url, pack_id, e)

    def read_block(self, location: BlockLocation) -> bytes:
        """A stored block's uncompressed bytes."""
        frame = self.read_pack(location.pack_id, location.offset, location.clen)
        if len(frame) != location.clen:
            raise StoreCorruptError("pack ends inside a block frame", self.pack_name(location.pack_id),
                                    location.offset)
        return decompress_block(frame, location.ulen, self.pack_name(location.pack_id), location.offset)

    # -- runs ------------------------------------------------------------
    def _run_of(self, server_id: str, run_id: str | None) -> str:
        """``run_id`` checked, or the server's latest run (RunNotFoundError: none)."""
        check_server_id(server_id)
        if run_id is None:
            ids = self.list_run_ids(server_id)
            if not ids:
                raise RunNotFoundError(f"{self.url}: no runs of server {server_id!r}")
            run_id = ids[-1]
        return check_run_id(run_id)

    def load_manifest(self, server_id: str, run_id: str | None = None) -> Manifest:
        """A run's manifest; ``run_id=None`` is the server's latest run."""
        run_id = self._run_of(server_id, run_id)
        data = self.get_manifest_bytes(server_id, run_id)
        return Manifest.from_bytes(bytearray(data), f"{self.url}: {server_id}/{run_id}")

    def open_manifest(self, server_id: str, run_id: str | None = None):
        """A run's manifest as a :class:`~smsblock.manifest.ManifestReader` (checked whole
        when opened, then read in windows: memory does not follow the disk's size);
        ``run_id=None`` is the server's latest run.  Close it when done."""
        from ..manifest import ManifestReader
        run_id = self._run_of(server_id, run_id)
        where = f"{self.url}: {server_id}/{run_id}"
        fd = self.backend.open_fd(self._manifest_rel(server_id, run_id), what="read manifest")
        return ManifestReader(fd if fd is not None else self._fetch_manifest(server_id, run_id),
                              where)

    #: a remote manifest larger than this is fetched in pieces into a private temporary
    #: file (a dense multi-TiB disk's is GBs), not into memory
    MANIFEST_IN_MEMORY = 64 << 20
    MANIFEST_PIECE = 8 << 20

    def _fetch_manifest(self, server_id: str, run_id: str):
        """A remote manifest: its bytes when it is small (one request, as before), else a
        descriptor of an unlinked private file it was fetched into piece by piece."""
        head = self.get_manifest_bytes(server_id, run_id, 0, self.MANIFEST_IN_MEMORY + 1)
        if len(head) <= self.MANIFEST_IN_MEMORY:
            return head
        import tempfile
        folder = os.path.dirname(self.staging_path(".manifest.get"))
        f = tempfile.TemporaryFile(dir=folder)      # 0600, unlinked: gone with the fd
        found = self.backend.stat(self._manifest_rel(server_id, run_id))
        if found is None:
            raise RunNotFoundError(f"{self.url}: no run {run_id!r} of server {server_id!r}")
        try:
            f.write(head)
            for offset in range(len(head), found.size, self.MANIFEST_PIECE):
                f.write(self.get_manifest_bytes(server_id, run_id, offset,
                                                min(self.MANIFEST_PIECE, found.size - offset)))
            f.flush()
            return os.dup(f.fileno())
        except OSError as e:
            raise StoreError(f"{folder}: cannot stage manifest {server_id}/{run_id}: "
                             f"{e.strerror}") from None
        finally:
            f.close()

    def latest_run_id(self, server_id: str) -> str | None:
        ids = self.list_run_ids(check_server_id(server_id))
        return ids[-1] if ids else None

    def runs(self, server_id: str) -> list[RunInfo]:
        """The server's completed runs, oldest first."""
        out = []
        for run_id in self.list_run_ids(check_server_id(server_id)):
            with self.open_manifest(server_id, run_id) as m:   # its meta: never the table
                meta = m.meta
            user = meta.get("user")
            out.append(RunInfo(server_id, run_id, meta.get("created", ""),
                               dict(meta.get("summary", {})),
                               dict(user) if isinstance(user, dict) else {}))
        return out

    def run_disk(self, server_id: str, run_id: str | None = None):
        """A :class:`~smsblock.disk.Disk` reading the run's blocks straight from the packs.

        It holds the store lock shared until it is closed (use it in a ``with``), so
        prune cannot delete or rewrite the packs it reads: prune fails with
        StoreLockedError meanwhile, as while a run goes on.
        """
        from .rundisk import RunDisk     # RunDisk reads through this class
        held = contextlib.ExitStack()
        held.enter_context(self.lock(exclusive=False, purpose="read a run"))
        try:    # the manifest and the pack indexes are read under the lock
            manifest = self.open_manifest(server_id, run_id)
            held.callback(manifest.close)
            return RunDisk(self, manifest, hold=held)
        except BaseException:
            held.close()
            raise

    def restore_source(self, manifest: Manifest):
        """The Disk a restore of this run reads (the caller holds the lock): the run's
        blocks in the packs here; a store that keeps runs elsewhere (EBS snapshots)
        reads them from there.  It has ``manifest`` and ``block(i)`` like RunDisk."""
        from .rundisk import RunDisk     # RunDisk reads through this class
        return RunDisk(self, manifest)

    def iter_manifests(self) -> Iterator[tuple[str, str]]:
        """Every ``(server_id, run_id)`` in the store."""
        for server_id in self.list_servers():
            for run_id in self.list_run_ids(server_id):
                yield server_id, run_id


@contextlib.contextmanager
def _folder_at(fd: int, name: str, create: bool = False):
    """The folder ``name`` in the open folder ``fd`` (never a link), as a context manager."""
    sub = open_dir(name, dir_fd=fd, create=create)
    try:
        yield sub
    finally:
        os.close(sub)
