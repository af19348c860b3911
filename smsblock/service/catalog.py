"""The server catalog: import from the connectors' sources, delete, list, expire.

**Import** (ImportServerCatalog "returns immediately, but might take additional time"):
:func:`begin_import` checks and, in one transaction, moves the catalog to IMPORTING under
a new import id; :func:`run_import` then lists every associated connector's source with
no lock held (so the API answers meanwhile), and in a second transaction writes the
servers and makes the catalog AVAILABLE - unless the catalog was deleted (or the import
taken over) in between, in which case its result is dropped.  ``SmsService`` runs it in a
background thread.

While an import lives, its process holds an exclusive ``flock`` on
``STATE/catalog-import-<id>.lock``, taken in the same transaction that writes IMPORTING.
Anyone reading the catalog (:func:`refresh_status`, in a transaction) who finds IMPORTING
while that lock is free knows the importing process died (``kill -9``): the catalog goes
back to the status it had before.  A second import while one lives is refused
(OperationNotPermittedException); DeleteServerCatalog during one wins (the import's result
is dropped).  On PostgreSQL the lock is a session advisory lock instead
(:meth:`State.try_session_lock`), held on a connection of the importing process: `serve`
processes on other hosts see it too, and the process's death frees it.

A VM already known (same vmManagerId and vmId, or a new vmId with the instance UUID of a
known VM that is not listed any more: a VM moved by vMotion) keeps its serverId; a new one
gets a new id; one that is gone from its source leaves the catalog (its row, and so its id
and replication window, is kept in case it comes back).  A VM a source cannot read (a bad
.vmx) is a *problem*: left out, logged, and kept in the import's outcome
(:func:`last_import`).  If a whole source cannot be listed, the catalog returns to its
previous status and the import fails with NoConnectorsAvailableException.

**Expiry**: an AVAILABLE catalog whose connectors (those of its last import) have all been
gone for longer than ``catalog_expiry_seconds`` - disassociated that long ago, or no
heartbeat since the later of their last heartbeat and the import - becomes EXPIRED.
"""

from __future__ import annotations

import errno
import fcntl
import inspect
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import Cancelled, ConnectorError, ServiceError, SmsBlockError
from ..progress import CancelToken
from .jobs import LIVE, sql_in
from .models import ServerCatalogStatus, new_server_id
from ..source import VmRecord
from .sources import open_source
from .state import ServiceConfig, State

log = logging.getLogger(__name__)

IMPORTING = ServerCatalogStatus.IMPORTING.value
LOCK_PREFIX = "catalog-import-"
_IMPORT_ID = re.compile(r"[0-9a-f]{16}")
MAX_PROBLEMS = 1000        # per import, kept in the state (the log has them all)


def associated_connectors(db: sqlite3.Connection) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM connectors WHERE disassociated_on IS NULL "
                      "ORDER BY associated_on").fetchall()


# --- the import's lock file -----------------------------------------------------------

def _lock_path(state_dir: Path, import_id: str) -> Path:
    return Path(state_dir) / f"{LOCK_PREFIX}{import_id}.lock"


def _pg_state(db) -> State | None:
    """The PostgreSQL state a transaction's connection belongs to (None on SQLite): there
    the import's lock is a SessionLock, which processes on other hosts see too."""
    state = getattr(db, "state", None)
    return state if isinstance(state, State) and state.dialect == "postgresql" else None


def _take_lock(state_dir: Path, import_id: str, db=None):
    pg = _pg_state(db)
    if pg is not None:
        lock = pg.try_session_lock(LOCK_PREFIX + import_id)
        if lock is None:     # (a fresh random id: nobody else holds it)
            raise OSError(errno.EAGAIN, "the import's lock is held by another session")
        return lock
    path = _lock_path(state_dir, import_id)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                 getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, str(os.getpid()).encode())
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def _release_lock(state_dir: Path, import_id: str, fd) -> None:
    if not isinstance(fd, int):      # a SessionLock (PostgreSQL)
        fd.release()
        return
    try:
        os.unlink(_lock_path(state_dir, import_id))   # while still held: nobody takes it over
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _import_alive(state_dir: Path, import_id: str | None, db=None) -> bool:
    """Does a process still hold the lock of ``import_id``?  (A free lock is removed.)"""
    if not import_id or not _IMPORT_ID.fullmatch(import_id):
        return False
    pg = _pg_state(db)
    if pg is not None:
        return pg.session_lock_held(LOCK_PREFIX + import_id)
    path = _lock_path(state_dir, import_id)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
    return False


def _sweep_locks(state_dir: Path, keep: str | None) -> None:
    """Remove lock files no process holds (left by a process killed before it wrote
    IMPORTING).  Called inside a transaction, as every lock is taken inside one."""
    for p in Path(state_dir).glob(f"{LOCK_PREFIX}*.lock"):
        import_id = p.name[len(LOCK_PREFIX):-len(".lock")]
        if import_id != keep:
            _import_alive(state_dir, import_id)


# --- status -----------------------------------------------------------------------------

def refresh_status(db: sqlite3.Connection, state_dir: Path, now: float,
                   config: ServiceConfig) -> sqlite3.Row:
    """The catalog row, after recovering an import whose process died and expiring a
    catalog whose connectors are gone; call inside a transaction."""
    cat = db.execute("SELECT * FROM catalog WHERE id = 1").fetchone()
    if cat["status"] == IMPORTING and not _import_alive(state_dir, cat["import_id"], db):
        _restore(db, cat, "the process importing the server catalog stopped before it "
                          "finished (killed?)")
        cat = db.execute("SELECT * FROM catalog WHERE id = 1").fetchone()
    expired_at = _expired_at(db, cat, now, config)
    if expired_at is not None:
        log.warning("the server catalog has expired: its connectors have been gone for "
                    "more than %s seconds; import it again", config.catalog_expiry_seconds)
        db.execute("UPDATE catalog SET status = ?, last_modified_on = ? WHERE id = 1",
                   (ServerCatalogStatus.EXPIRED.value, expired_at))
        cat = db.execute("SELECT * FROM catalog WHERE id = 1").fetchone()
    return cat


def status_may_change(db, now: float, config: ServiceConfig) -> bool:
    """Whether :func:`refresh_status` might write: an import is under way (its process
    may have died) or the catalog is past its expiry.  Read-only, so a caller can
    read the catalog in a snapshot when it is False."""
    cat = db.execute("SELECT * FROM catalog WHERE id = 1").fetchone()
    return cat["status"] == IMPORTING or _expired_at(db, cat, now, config) is not None


def _expired_at(db, cat, now: float, config: ServiceConfig) -> float | None:
    """When an AVAILABLE catalog expired, if it has by ``now`` (None otherwise, and
    when catalogs do not expire)."""
    if cat["status"] != ServerCatalogStatus.AVAILABLE.value or config.catalog_expiry_seconds <= 0:
        return None
    expired_at = _expiry(db, cat, config.catalog_expiry_seconds)
    return expired_at if expired_at is not None and now > expired_at else None


def _expiry(db: sqlite3.Connection, cat: sqlite3.Row, age: float) -> float | None:
    """When the catalog expires: ``age`` after its last connector was last seen."""
    outcome = json.loads(cat["import_outcome"] or "{}")
    ids = outcome.get("connectors")
    if not ids:       # imported before the outcome was recorded: its servers' connectors
        ids = [r[0] for r in db.execute(
            "SELECT DISTINCT connector_id FROM servers WHERE in_catalog = 1")]
    if not ids:
        return None
    imported = outcome.get("finishedOn") or cat["last_modified_on"] or 0
    seen = []
    for cid in ids:
        row = db.execute("SELECT last_heartbeat, disassociated_on FROM connectors "
                         "WHERE connector_id = ?", (cid,)).fetchone()
        if row is None:
            continue
        if row["disassociated_on"] is not None:
            seen.append(row["disassociated_on"])
        else:
            seen.append(max(row["last_heartbeat"], imported))
    return max(seen) + age if seen else None


def _restore(db: sqlite3.Connection, cat: sqlite3.Row, error: str) -> None:
    """Put the catalog back to where it was before the import ``cat`` shows."""
    prev = json.loads(cat["import_previous"] or "null")
    if prev is None:   # an IMPORTING left by a smsblock that did not record it
        known = db.execute("SELECT 1 FROM servers WHERE in_catalog = 1 LIMIT 1").fetchone()
        prev = {"status": (ServerCatalogStatus.AVAILABLE if known
                           else ServerCatalogStatus.NOT_IMPORTED).value,
                "lastModifiedOn": cat["last_modified_on"]}
    log.warning("server catalog import %s: %s; the catalog is %s again",
                cat["import_id"] or "", error, prev["status"])
    outcome = {"importId": cat["import_id"], "startedOn": cat["import_started"],
               "error": error}
    db.execute("UPDATE catalog SET status = ?, last_modified_on = ?, import_id = NULL, "
               "import_outcome = ? WHERE id = 1",
               (prev["status"], prev["lastModifiedOn"], json.dumps(outcome)))


def last_import(db: sqlite3.Connection) -> dict | None:
    """What the last finished import did: ``importId``, ``startedOn``, ``finishedOn``,
    ``servers`` (count), ``connectors``, ``problems`` (``[{connectorId, location,
    reason}]``: VMs left out), ``error`` (why it failed), ``dropped`` (its result was
    dropped: the catalog was deleted meanwhile)."""
    cat = db.execute("SELECT import_outcome FROM catalog WHERE id = 1").fetchone()
    return json.loads(cat["import_outcome"]) if cat["import_outcome"] else None


# --- import -------------------------------------------------------------------------------

@dataclass
class CatalogImport:
    """One import under way; :func:`run_import` fills ``servers`` / ``error``."""

    import_id: str
    state_dir: Path
    connectors: list[sqlite3.Row]
    lock_fd: object         # the lock file's descriptor, or a SessionLock (PostgreSQL)
    started: float
    cancel: CancelToken = field(default_factory=CancelToken)
    done: threading.Event = field(default_factory=threading.Event)
    servers: int | None = None
    error: BaseException | None = None


def begin_import(state: State, now: float, config: ServiceConfig | None = None) -> CatalogImport:
    """Check that an import may start and move the catalog to IMPORTING (one transaction)."""
    config = config or ServiceConfig()
    import_id = secrets.token_hex(8)
    with state.transaction() as db:
        connectors = associated_connectors(db)
        if not connectors:
            raise ServiceError("no connector is associated; register one with "
                               "`smsblock connector register`", "NoConnectorsAvailableException")
        cat = refresh_status(db, state.dir, now, config)
        if cat["status"] == IMPORTING:
            raise ServiceError(f"a server catalog import (started at {cat['import_started']}) "
                               "is still under way; GetServers shows AVAILABLE when it is done",
                               "OperationNotPermittedException")
        if _pg_state(db) is None:
            _sweep_locks(state.dir, None)
        try:
            fd = _take_lock(state.dir, import_id, db)
        except OSError as e:
            raise ServiceError(f"cannot create the import's lock file in {state.dir}: "
                               f"{e.strerror}", "InternalError") from None
        try:
            db.execute("UPDATE catalog SET status = ?, last_modified_on = ?, import_id = ?, "
                       "import_started = ?, import_previous = ? WHERE id = 1",
                       (IMPORTING, now, import_id, now,
                        json.dumps({"status": cat["status"],
                                    "lastModifiedOn": cat["last_modified_on"]})))
        except BaseException:
            _release_lock(state.dir, import_id, fd)
            raise
    return CatalogImport(import_id, state.dir, connectors, fd, now)


def run_import(state: State, job: CatalogImport, clock: Callable[[], float]) -> None:
    """List the sources (no lock held), then write the catalog; sets ``job.servers`` or
    ``job.error`` and ``job.done``, and releases the import's lock, whatever happens."""
    try:
        job.servers = _run(state, job, clock)
    except BaseException as e:     # reported to the waiting caller, or logged
        job.error = e
        if not isinstance(e, (SmsBlockError, sqlite3.Error)):
            log.exception("server catalog import %s failed", job.import_id)
    finally:
        _release_lock(job.state_dir, job.import_id, job.lock_fd)
        job.done.set()


def _run(state: State, job: CatalogImport, clock: Callable[[], float]) -> int:
    listed: list[tuple[sqlite3.Row, list[VmRecord]]] = []
    problems: list[dict] = []
    try:
        for c in job.connectors:
            job.cancel.check()
            source = open_source(c["source_kind"], json.loads(c["source_config"]))
            try:
                # sources that can stop early (datastore) take the import's token
                takes_cancel = "cancel" in inspect.signature(source.list_vms).parameters
                listed.append((c, source.list_vms(cancel=job.cancel) if takes_cancel
                               else source.list_vms()))
                problems += [dict(p, connectorId=c["connector_id"])
                             for p in getattr(source, "list_problems", None) or []]
            finally:
                source.close()
    except Exception as e:         # noqa: BLE001 - a source's bug must not leave IMPORTING
        if not isinstance(e, (SmsBlockError, OSError)):
            log.exception("server catalog import %s: listing a source failed", job.import_id)
            e = ConnectorError(f"the source failed: {type(e).__name__}: {e}"[:500])
        reason = str(e)
        with state.transaction() as db:
            cat = db.execute("SELECT * FROM catalog WHERE id = 1").fetchone()
            if cat["import_id"] == job.import_id:
                _restore(db, cat, f"importing failed: {reason}")
        if isinstance(e, Cancelled):
            raise
        # SMS's name for "the connector cannot serve this": its source is unreachable
        raise ServiceError(f"importing the server catalog failed: {e}",
                           "NoConnectorsAvailableException") from None
    with state.transaction() as db:
        cat = db.execute("SELECT * FROM catalog WHERE id = 1").fetchone()
        now = clock()
        outcome = {"importId": job.import_id, "startedOn": job.started,
                   "finishedOn": now, "connectors": [c["connector_id"] for c in job.connectors],
                   "problems": problems[:MAX_PROBLEMS], "error": None}
        if cat["import_id"] != job.import_id or cat["status"] != IMPORTING:
            log.info("server catalog import %s: the catalog was deleted meanwhile; its "
                     "result is dropped", job.import_id)
            outcome.update(dropped=True, servers=0)
            last = json.loads(cat["import_outcome"] or "{}")
            if (last.get("startedOn") or 0) <= job.started:   # no later import to hide
                db.execute("UPDATE catalog SET import_outcome = ? WHERE id = 1",
                           (json.dumps(outcome),))
            return 0
        # a connector disassociated while its source was listed takes its VMs with it
        still = {r["connector_id"] for r in associated_connectors(db)}
        listed = [(c, vms) for c, vms in listed if c["connector_id"] in still]
        moved = _moved_servers(db, [vm for _, vms in listed for vm in vms])
        seen = {_upsert_server(db, connector, vm, moved, now)
                for connector, vms in listed for vm in vms}
        for row in db.execute("SELECT server_id FROM servers WHERE in_catalog = 1").fetchall():
            if row["server_id"] not in seen:
                db.execute("UPDATE servers SET in_catalog = 0 WHERE server_id = ?", (row["server_id"],))
        outcome["servers"] = len(seen)
        db.execute("UPDATE catalog SET status = ?, last_modified_on = ?, import_id = NULL, "
                   "import_outcome = ? WHERE id = 1",
                   (ServerCatalogStatus.AVAILABLE.value, now, json.dumps(outcome)))
    if problems:
        log.warning("server catalog import %s: %d VM(s) left out (see the import's outcome)",
                    job.import_id, len(problems))
    return len(seen)


def import_catalog(state: State, clock: Callable[[], float],
                   config: ServiceConfig | None = None) -> int:
    """ImportServerCatalog in the calling thread; returns the number of servers in the
    catalog, raises what the import raised."""
    job = begin_import(state, clock(), config)
    run_import(state, job, clock)
    if job.error is not None:
        raise job.error
    return job.servers or 0


def _upsert_server(db: sqlite3.Connection, connector, vm: VmRecord,
                   moved: dict[tuple[str, str], str], now: float) -> str:
    """Write one listed VM into the catalog; returns its serverId (kept when known)."""
    for w in vm.warnings:
        log.warning("%s (%s): %s", vm.vmName, vm.vmPath, w)
    row = db.execute("SELECT server_id FROM servers WHERE vm_manager_id = ? AND vm_id = ?",
                     (vm.vmManagerId, vm.vmId)).fetchone()
    server_id = row["server_id"] if row is not None else moved.get((vm.vmManagerId, vm.vmId))
    values = (connector["connector_id"], vm.vmName, vm.vmManagerName,
              vm.vmManagerType, vm.vmPath, json.dumps(vm.to_dict()), now)
    if server_id is None:
        server_id = new_server_id()
        db.execute(
            "INSERT INTO servers (server_id, vm_manager_id, vm_id, connector_id, "
            "vm_name, vm_manager_name, vm_manager_type, vm_path, vm_record, "
            "imported_on, in_catalog) VALUES (?,?,?,?,?,?,?,?,?,?,1)",
            (server_id, vm.vmManagerId, vm.vmId, *values))
        return server_id
    if row is None:
        log.info("%s: VM %s moved from its known place to %s (%s)",
                 server_id, vm.vmName, vm.vmId, vm.vmPath)
    db.execute(
        "UPDATE servers SET vm_id = ?, connector_id = ?, vm_name = ?, vm_manager_name = ?, "
        "vm_manager_type = ?, vm_path = ?, vm_record = ?, imported_on = ?, "
        "in_catalog = 1 WHERE server_id = ?",
        (vm.vmId, *values, server_id))
    return server_id


def _moved_servers(db: sqlite3.Connection, vms: list[VmRecord]) -> dict[tuple[str, str], str]:
    """{(vmManagerId, new vmId): serverId} for known servers whose VM is listed under a
    new id (vMotion, re-registration), recognised by its instance UUID.  Only servers
    whose old id is not listed any more move, so a clone keeps its own server."""
    listed_ids = {(vm.vmManagerId, vm.vmId) for vm in vms}
    by_uuid = {}
    for row in db.execute("SELECT server_id, vm_manager_id, vm_id, vm_record FROM servers"):
        uuid = (json.loads(row["vm_record"] or "{}").get("identity") or {}).get("instanceUuid")
        if uuid and (row["vm_manager_id"], row["vm_id"]) not in listed_ids:
            by_uuid[row["vm_manager_id"], uuid] = row["server_id"]
    out = {}
    for vm in vms:
        server_id = by_uuid.pop((vm.vmManagerId, vm.identity.get("instanceUuid")), None)
        if server_id is not None:      # popped: one listed VM per known server
            out[vm.vmManagerId, vm.vmId] = server_id
    return out


def delete_catalog(state: State, now: float, config: ServiceConfig | None = None) -> str | None:
    """DeleteServerCatalog; refused while a live replication job needs a server.  An
    import under way is overtaken: its result is dropped when it finishes.  Returns the
    id of that import (read in the delete's own transaction), or None."""
    overtaken = None
    with state.transaction() as db:
        cat = refresh_status(db, state.dir, now, config or ServiceConfig())
        live = db.execute(f"SELECT job_id FROM jobs WHERE state IN {sql_in(LIVE)} LIMIT 1",
                          LIVE).fetchone()
        if live is not None:
            raise ServiceError(f"replication job {live['job_id']} still uses the catalog; "
                               "delete it first", "OperationNotPermittedException")
        if cat["status"] == IMPORTING:
            log.info("server catalog deleted while import %s was under way; its result "
                     "will be dropped", cat["import_id"])
            overtaken = cat["import_id"]
        db.execute("UPDATE servers SET in_catalog = 0")
        db.execute("UPDATE catalog SET status = ?, last_modified_on = ?, import_id = NULL "
                   "WHERE id = 1", (ServerCatalogStatus.DELETED.value, now))
    return overtaken


def last_import_of(state: State) -> dict | None:
    with state.transaction() as db:
        return last_import(db)
