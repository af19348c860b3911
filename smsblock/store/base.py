"""The Store protocol: where runs (manifests) and blocks (packs) live.

A store holds three kinds of objects, all immutable once visible and all under
deterministic names, so the same protocol fits a local folder, S3 and the like:

* ``config``: one small JSON object written when the store is created (content-address
  algorithm, compression, pack size);
* packs: ``pack_id`` -> bytes (see :mod:`smsblock.pack`); the id is the SHA-256 of the
  pack's index, so writing a pack twice writes the same object;
* manifests: ``(server_id, run_id)`` -> bytes; a run exists exactly when its manifest
  does, and the manifest is put last, in one atomic put;
* damage records: ``pack_id`` -> a small JSON object naming what ``verify`` (or a read
  that hit a bad block) found damaged in that pack.  A new run never dedups against a
  recorded block, so it stores the block again; readers prefer undamaged copies; prune
  drops damaged copies.  Rewritten when verify finds otherwise, removed with the pack.

A backend implements the primitives marked abstract below (put/get/list/delete of those
objects, a staging area for packs being built, and a lock).  Everything else, the dedup
index, run listing, reading blocks back, lives here, on top of the primitives.
"""

from __future__ import annotations

import abc
import contextlib
import json
from datetime import datetime, timezone
import logging
import os
import re
import threading
from dataclasses import dataclass, field, asdict
from typing import Iterator

import numpy as np

from ..errors import RunNotFoundError, StoreCorruptError, StoreError, UsageError
from ..manifest import Manifest
from ..pack import ALGORITHMS, BlockIndex, BlockLocation, decompress_block, read_index, sealed_size

STORE_FORMAT = "smsblock-store"
STORE_VERSION = 1
DEFAULT_PACK_SIZE = 64 << 20
log = logging.getLogger(__name__)
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
        return np.isin(rows, named)

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


class Store(abc.ABC):
    """A block store; see the module docstring.  Thread-safe for reads."""

    url: str

    def __init__(self) -> None:
        self._config: StoreConfig | None = None
        self._index_cache: dict[str, np.ndarray] = {}
        self._cache_lock = threading.Lock()

    # == primitives a backend implements ==================================

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the store has been created (its config object is there)."""

    @abc.abstractmethod
    def _read_config(self) -> bytes:
        """The config object's bytes (StoreError when missing)."""

    @abc.abstractmethod
    def _create(self, config_bytes: bytes) -> None:
        """Create the store with this config (no-op when it exists already)."""

    @abc.abstractmethod
    def lock(self, exclusive: bool, purpose: str) -> contextlib.AbstractContextManager:
        """Hold the store lock: shared for runs and reads, exclusive for prune.

        Raises :class:`~smsblock.errors.StoreLockedError` at once when it cannot be had.
        """

    @abc.abstractmethod
    def staging_path(self, suffix: str) -> str:
        """A fresh local file path to build a pack in (left-overs are found by prune)."""

    @abc.abstractmethod
    def put_pack(self, pack_id: str, staged_path: str) -> None:
        """Make the sealed, fsynced file at ``staged_path`` visible as pack ``pack_id``
        (consuming the staged file).  Idempotent: the same id always has the same bytes."""

    def replace_pack(self, pack_id: str, staged_path: str) -> None:
        """Like :meth:`put_pack`, but a pack already stored under this id is overwritten:
        it is damaged (a damage record names it) and this is a sound copy."""
        self.put_pack(pack_id, staged_path)

    @abc.abstractmethod
    def list_packs(self) -> dict[str, int]:
        """Every visible pack: ``{pack_id: size in bytes}``."""

    @abc.abstractmethod
    def read_pack(self, pack_id: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a pack (short only at its end)."""

    @abc.abstractmethod
    def delete_pack(self, pack_id: str) -> None:
        """Remove a pack (missing is fine)."""

    @abc.abstractmethod
    def list_servers(self) -> list[str]:
        """Server ids with at least one run."""

    @abc.abstractmethod
    def list_run_ids(self, server_id: str) -> list[str]:
        """Run ids of a server, sorted (= oldest first)."""

    @abc.abstractmethod
    def get_manifest_bytes(self, server_id: str, run_id: str) -> bytes:
        """A run's manifest (RunNotFoundError when missing)."""

    @abc.abstractmethod
    def put_manifest_bytes(self, server_id: str, run_id: str, data: bytes) -> None:
        """Publish a run's manifest in one atomic, durable step."""

    def put_manifest_file(self, server_id: str, run_id: str, staged_path: str) -> None:
        """Publish a run's manifest from a file made at :meth:`staging_path` (consumed),
        as :meth:`put_manifest_bytes` does; a backend that can send a file without
        reading it whole overrides this."""
        try:
            with open(staged_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise StoreError(f"{staged_path}: cannot read the staged manifest: {e.strerror}") from None
        self.put_manifest_bytes(server_id, run_id, data)
        with contextlib.suppress(OSError):
            os.unlink(staged_path)

    def _manifest_source(self, server_id: str, run_id: str):
        """What :meth:`open_manifest` reads: the manifest's bytes, or a backend's
        read-only file descriptor of it."""
        return self.get_manifest_bytes(server_id, run_id)

    @abc.abstractmethod
    def delete_manifest(self, server_id: str, run_id: str) -> None:
        """Remove a run (missing is fine)."""

    @abc.abstractmethod
    def put_damage_record(self, pack_id: str, data: bytes) -> None:
        """Write (or replace) a pack's damage record in one atomic step."""

    @abc.abstractmethod
    def list_damage_records(self) -> dict[str, bytes]:
        """Every damage record: ``{pack_id: bytes}``."""

    @abc.abstractmethod
    def delete_damage_record(self, pack_id: str) -> None:
        """Remove a pack's damage record (missing is fine)."""

    @abc.abstractmethod
    def list_leftovers(self) -> list[str]:
        """Names of unfinished objects killed runs left behind (temp files, uploads)."""

    @abc.abstractmethod
    def remove_leftover(self, name: str) -> int:
        """Remove one leftover; return the bytes freed."""

    def holds_path(self, path) -> bool:
        """Whether a local file path lies inside the store (writing there would damage it)."""
        return False

    def pack_name(self, pack_id: str) -> str:
        """How a pack is named in messages (a path or a URL)."""
        return pack_id

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # == shared logic ====================================================

    @property
    def config(self) -> StoreConfig:
        if self._config is None:
            self._config = StoreConfig.from_bytes(self._read_config(), self.url)
        return self._config

    def initialise(self, config: StoreConfig | None = None) -> StoreConfig:
        """Create the store if it does not exist yet; return its config."""
        if not self.exists():
            self._create((config or StoreConfig()).to_bytes())
        self._config = None
        return self.config

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
        _, index = read_index(lambda o, n: self.read_pack(pack_id, o, n), size,
                              self.pack_name(pack_id))
        with self._cache_lock:
            self._index_cache[pack_id] = index
        return index

    def forget_pack(self, pack_id: str) -> None:
        with self._cache_lock:
            self._index_cache.pop(pack_id, None)

    def block_index(self, *, for_new_runs: bool = False) -> BlockIndex:
        """The global block index, built from every sealed pack's index.

        A pack whose index is damaged is left out with a warning (``verify`` reports it):
        its blocks count as absent, so a run stores them again instead of failing.
        Blocks a damage record names are left out too; the other blocks of a pack whose
        record marks it damaged as a whole come after every other copy (a reader finds
        an undamaged copy first).  ``for_new_runs`` (a run's dedup index) leaves such
        packs out entirely: a run never builds on a damaged pack.
        """
        damage = self.damage()
        clean, suspect = {}, {}
        for pid, size in sorted(self.list_packs().items()):
            try:
                index = self.pack_index(pid, size)
            except StoreCorruptError as e:
                log.warning("%s (left out of the block index; run verify)", e)
                continue
            record = damage.get(pid)
            if record is None:
                clean[pid] = index
                continue
            if record.addresses:
                index = index[~record.holds(index["address"])]
            if not record.pack:
                clean[pid] = index
            elif not for_new_runs:
                suspect[pid] = index
        return BlockIndex({**clean, **suspect})

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
    def load_manifest(self, server_id: str, run_id: str | None = None) -> Manifest:
        """A run's manifest; ``run_id=None`` is the server's latest run."""
        check_server_id(server_id)
        if run_id is None:
            ids = self.list_run_ids(server_id)
            if not ids:
                raise RunNotFoundError(f"{self.url}: no runs of server {server_id!r}")
            run_id = ids[-1]
        check_run_id(run_id)
        data = self.get_manifest_bytes(server_id, run_id)
        return Manifest.from_bytes(bytearray(data), f"{self.url}: {server_id}/{run_id}")

    def open_manifest(self, server_id: str, run_id: str | None = None):
        """A run's manifest as a :class:`~smsblock.manifest.ManifestReader` (checked whole
        when opened, then read in windows: memory does not follow the disk's size);
        ``run_id=None`` is the server's latest run.  Close it when done."""
        from ..manifest import ManifestReader
        check_server_id(server_id)
        if run_id is None:
            ids = self.list_run_ids(server_id)
            if not ids:
                raise RunNotFoundError(f"{self.url}: no runs of server {server_id!r}")
            run_id = ids[-1]
        check_run_id(run_id)
        return ManifestReader(self._manifest_source(server_id, run_id),
                              f"{self.url}: {server_id}/{run_id}")

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
        from ..repository.rundisk import RunDisk
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
        from ..repository.rundisk import RunDisk
        return RunDisk(self, manifest)

    def iter_manifests(self) -> Iterator[tuple[str, str]]:
        """Every ``(server_id, run_id)`` in the store."""
        for server_id in self.list_servers():
            for run_id in self.list_run_ids(server_id):
                yield server_id, run_id
