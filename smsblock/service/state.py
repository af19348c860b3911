"""The control plane's persistent state: one SQLite database under the state directory.

Why SQLite: every change the service makes (a job created, a run moved to ACTIVE, a
catalog imported) is one transaction, so a ``kill -9`` of the server or the connector at
any moment leaves either the old or the new state, never half of one.  The database runs
in WAL mode with ``synchronous=FULL`` and every write goes through
:meth:`State.transaction` (``BEGIN IMMEDIATE`` ... ``COMMIT``).

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` lists the steps
from an empty file to the current version, each applied in its own transaction.  A
database written by a newer smsblock (a higher version) is refused, not guessed at.

The state directory also holds ``config.toml`` (limits, see :class:`ServiceConfig`) and,
by default, each connector's block store under ``store/``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

from ..errors import ServiceError, UsageError
from ..fsutil import create_file, is_link, link_error, make_root, subdir

DB_NAME = "state.db"
CONFIG_NAME = "config.toml"

# Each entry moves the schema one version up; never edit a released entry, append one.
MIGRATIONS: list[list[str]] = [
    # 1: connectors, catalog, servers, jobs, runs, images
    [
        """CREATE TABLE connectors (
            connector_id TEXT PRIMARY KEY,
            version TEXT NOT NULL,
            capabilities TEXT NOT NULL,          -- JSON list of ConnectorCapability
            vm_manager_name TEXT NOT NULL,
            vm_manager_type TEXT NOT NULL,
            vm_manager_id TEXT NOT NULL,
            ip_address TEXT,
            mac_address TEXT,
            associated_on REAL NOT NULL,
            disassociated_on REAL,               -- NULL while associated
            last_heartbeat REAL NOT NULL,
            source_kind TEXT NOT NULL,           -- "datastore" (later "vsphere")
            source_config TEXT NOT NULL,         -- JSON, never secrets
            store TEXT NOT NULL                  -- block store path or URL
        )""",
        """CREATE TABLE catalog (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            status TEXT NOT NULL,
            last_modified_on REAL
        )""",
        "INSERT INTO catalog (id, status) VALUES (1, 'NOT_IMPORTED')",
        """CREATE TABLE servers (
            server_id TEXT PRIMARY KEY,
            connector_id TEXT NOT NULL REFERENCES connectors(connector_id),
            vm_manager_id TEXT NOT NULL,
            vm_id TEXT NOT NULL,
            vm_name TEXT NOT NULL,
            vm_manager_name TEXT NOT NULL,
            vm_manager_type TEXT NOT NULL,
            vm_path TEXT NOT NULL,
            vm_record TEXT NOT NULL,             -- JSON VmRecord from the source (identity, warnings)
            in_catalog INTEGER NOT NULL,         -- 0 after delete-server-catalog / vanished
            first_run_time REAL,                 -- start of the server's replication window
            imported_on REAL NOT NULL,
            UNIQUE (vm_manager_id, vm_id)
        )""",
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            server_id TEXT NOT NULL REFERENCES servers(server_id),
            seed_time REAL NOT NULL,
            frequency INTEGER,
            run_once INTEGER NOT NULL,
            next_run_time REAL,
            license_type TEXT NOT NULL,
            role_name TEXT,
            latest_ami_id TEXT,
            state TEXT NOT NULL,
            status_message TEXT,
            description TEXT,
            amis_to_keep INTEGER NOT NULL,
            encrypted INTEGER NOT NULL,
            kms_key_id TEXT,
            created REAL NOT NULL
        )""",
        "CREATE INDEX jobs_server ON jobs(server_id)",
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs(job_id),
            type TEXT NOT NULL,
            state TEXT NOT NULL,
            stage TEXT,
            stage_progress TEXT,
            status_message TEXT,
            ami_id TEXT,
            scheduled_start REAL NOT NULL,
            created REAL NOT NULL,
            started REAL,
            completed REAL,
            description TEXT,
            encrypted INTEGER NOT NULL,
            kms_key_id TEXT,
            store_run_id TEXT,
            summary TEXT                         -- JSON RunSummary of the engine
        )""",
        "CREATE INDEX runs_job ON runs(job_id, created)",
        """CREATE TABLE images (
            ami_id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            run_id TEXT NOT NULL,
            created REAL NOT NULL,
            deregistered REAL
        )""",
    ],
    # 2: the catalog import runs in the background: which import is under way (its lock
    # file STATE/catalog-import-<id>.lock is held while it lives), the status to return to
    # if it dies, and what the last import found (servers, problems, error, connectors)
    [
        "ALTER TABLE catalog ADD COLUMN import_id TEXT",
        "ALTER TABLE catalog ADD COLUMN import_started REAL",
        "ALTER TABLE catalog ADD COLUMN import_previous TEXT",   # JSON {status, lastModifiedOn}
        "ALTER TABLE catalog ADD COLUMN import_outcome TEXT",    # JSON of the last import
    ],
    # 3: a replication job can ask for a boot test of each new image (bootTest)
    ["ALTER TABLE jobs ADD COLUMN boot_test INTEGER NOT NULL DEFAULT 0"],
    # 4: fleets (smsblock/service/fleet.py): connectors' own credentials (a SigV4 key bound
    # to one connector id, revocable; the store the control plane names for it), and run
    # claims: who holds an ACTIVE run, until when (lease), and a fence token incremented
    # on every claim so a connector whose run was reassigned cannot commit a result
    [
        """CREATE TABLE connector_credentials (
            access_key_id TEXT PRIMARY KEY,
            secret_access_key TEXT NOT NULL,     -- the state is owner-only; SigV4 needs it
            connector_id TEXT NOT NULL,
            store TEXT NOT NULL,
            description TEXT,
            created REAL NOT NULL,
            revoked REAL                         -- NULL while valid
        )""",
        "CREATE INDEX connector_credentials_connector ON connector_credentials(connector_id)",
        "ALTER TABLE runs ADD COLUMN claimed_by TEXT",
        "ALTER TABLE runs ADD COLUMN lease_until REAL",
        "ALTER TABLE runs ADD COLUMN fence INTEGER NOT NULL DEFAULT 0",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class ServiceConfig:
    """Limits of the service; ``STATE/config.toml`` overrides the SMS defaults.

    ``max_active_jobs`` (50) and ``server_replication_days`` (90) are SMS's service
    limits; ``on_demand_runs_per_day`` (2) SMS's on-demand quota;
    ``heartbeat_timeout_seconds`` is how long a silent connector stays HEALTHY;
    ``seed_grace_seconds`` is how far in the past a seed time still counts as "now";
    ``max_consecutive_failures`` failed runs in a row pause a job (PAUSED_ON_FAILURE);
    ``catalog_expiry_seconds`` (7 days): a catalog whose connectors have all been gone
    (no heartbeat since the import, or disassociated) longer than this is EXPIRED (0: never).
    """

    max_active_jobs: int = 50
    server_replication_days: int = 90
    on_demand_runs_per_day: int = 2
    heartbeat_timeout_seconds: int = 300
    seed_grace_seconds: int = 900
    max_consecutive_failures: int = 3
    max_seed_days_ahead: int = 30
    min_frequency_hours: int = 12
    max_frequency_hours: int = 24
    catalog_expiry_seconds: int = 7 * 86400

    @classmethod
    def load(cls, state_dir: Path) -> "ServiceConfig":
        path = Path(state_dir) / CONFIG_NAME
        if not path.exists():
            return cls()
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: not valid TOML: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"{path}: unknown settings {unknown} (known: {sorted(known)})")
        for key, value in data.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"{path}: {key} must be a non-negative integer, got {value!r}")
        return cls(**data)


def default_state_dir() -> Path:
    """``$SMSBLOCK_HOME`` or ``~/.smsblock``."""
    env = os.environ.get("SMSBLOCK_HOME")
    return Path(env) if env else Path.home() / ".smsblock"


class State:
    """The state database of one state directory; thread-safe, one writer at a time."""

    def __init__(self, state_dir: str | os.PathLike | None = None):
        # absolute: connectors store paths under it (STATE/store) that other cwds must find
        self.dir = (Path(state_dir) if state_dir is not None else default_state_dir()).absolute()
        self.path = self.dir / DB_NAME
        try:
            make_root(self.dir)                 # 0700
            with subdir(self.dir) as dir_fd:
                # SQLite follows links and gives its -wal/-shm files the database's mode:
                # refuse links, and create the database 0600 (O_EXCL) so all three are private
                for name in (DB_NAME + suffix for suffix in ("", "-wal", "-shm", "-journal")):
                    if is_link(name, dir_fd=dir_fd):
                        raise link_error(self.dir / name)
                with contextlib.suppress(FileExistsError):
                    os.close(create_file(DB_NAME, dir_fd=dir_fd))
        except OSError as e:
            name = os.path.basename(e.filename) if e.filename else ""
            inside = f" {name}" if name and name != self.dir.name else ""
            raise UsageError(f"state directory {self.dir}:{inside} {e.strerror}") from None
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ServiceError(f"state database {self.path}: {e}", "InternalError") from None
        self._depth = 0

    @property
    def version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        with self._lock:
            while True:
                # Read the version inside the write lock: two processes opening a fresh
                # directory at once must not both apply migration 1.
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    version = self._db.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise ServiceError(
                            f"state database {self.path} has schema version {version}, newer "
                            f"than this smsblock ({SCHEMA_VERSION}); upgrade smsblock",
                            "InternalError")
                    if version == SCHEMA_VERSION:
                        self._db.execute("COMMIT")
                        return
                    for statement in MIGRATIONS[version]:
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {version + 1}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of change; nested uses join the outer transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
            except BaseException:
                self._depth = 0
                self._db.execute("ROLLBACK")
                raise
            self._depth = 0
            self._db.execute("COMMIT")

    def query(self, sql: str, params=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def check(self) -> str:
        """SQLite's own integrity check ("ok" when the file is sound)."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "State":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
