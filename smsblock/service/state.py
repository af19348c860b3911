"""The control plane's persistent state: SQLite under a state directory, or PostgreSQL.

Why a transactional database: every change the service makes (a job created, a run moved
to ACTIVE, a catalog imported) is one transaction, so a ``kill -9`` of the server or the
connector at any moment leaves either the old or the new state, never half of one.

**SQLite** (the default: ``State(DIR)``): ``DIR/state.db`` in WAL mode with
``synchronous=FULL``; every write goes through :meth:`State.transaction` (``BEGIN
IMMEDIATE`` ... ``COMMIT``), so writers take turns.

**PostgreSQL** (``State("postgresql://USER@HOST:PORT/DB")``, through psycopg 3): several
processes (two ``smsblock serve``, connectors) share one database.  Each write
transaction first takes one transaction-scoped advisory lock
(``pg_advisory_xact_lock``), so writers take turns exactly as on SQLite and every rule
that reads then writes (the 50-job limit, the on-demand quota, the scheduler's slots)
holds across processes: under READ COMMITTED each statement after the lock sees every
transaction committed before it.  (SERIALIZABLE would need every transaction body to be
retried, and bodies have effects outside the database: lock files, stores.)  The files
that are not state (``config.toml``, lock files, the default block store, logs) stay in a
local directory: ``local_dir``, or ``$SMSBLOCK_HOME`` / ``~/.smsblock``.

One SQL dialect for both: the service's statements use ``?`` placeholders (translated to
``$1, $2 ...`` for PostgreSQL), rows are read by column name or index
(:class:`sqlite3.Row` or :class:`Row`), and ``rowid`` orders rows by insertion on both
(on PostgreSQL every table gets a ``rowid BIGSERIAL`` column).  :data:`MIGRATIONS` is
written in that common SQL; its DDL is translated for PostgreSQL by :func:`pg_ddl`
(``REAL`` is ``DOUBLE PRECISION``, ``INTEGER`` is ``BIGINT``).

The schema is versioned (SQLite: ``PRAGMA user_version``; PostgreSQL: the table
``smsblock_schema_version``); :data:`MIGRATIONS` lists the steps from an empty database
to the current version, each applied in its own (write-locked) transaction.  A database
written by a newer smsblock (a higher version) is refused, not guessed at.

The state directory also holds ``config.toml`` (limits, see :class:`ServiceConfig`) and,
by default, each connector's block store under ``store/``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import threading
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from ..errors import ServiceError, UsageError
from ..fsutil import create_file, is_link, link_error, make_root, subdir
from .sources import one_line

DB_NAME = "state.db"
CONFIG_NAME = "config.toml"

# Each entry moves the schema one version up; never edit a released entry, append one.
# Write them in the SQL both SQLite and PostgreSQL take: TEXT, INTEGER, REAL, BLOB columns
# (pg_ddl() translates the types and adds a rowid to each new table), CREATE [UNIQUE]
# INDEX (partial ones too), ALTER TABLE ... ADD COLUMN, INSERT/UPDATE with ON CONFLICT
# (not INSERT OR ...), no PRAGMA, no AUTOINCREMENT; the statements of an entry must not
# take parameters.  The same holds for the service's statements, with ``?`` parameters;
# ``rowcount`` and ``RETURNING`` work on both, ``lastrowid`` only on SQLite.
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
    # 4: one live scheduled run per slot of a job, whatever process ticks (the write
    # lock already serialises the schedulers; this is the second line of defence).  Only
    # PENDING and ACTIVE runs count: a MISSED record, or a run that ended, may share its
    # slot with a run made after UpdateReplicationJob put the next slot on that instant.
    ["CREATE UNIQUE INDEX runs_slot ON runs(job_id, scheduled_start) "
     "WHERE type = 'AUTOMATIC' AND state IN ('PENDING', 'ACTIVE')"],
    # 5: fleets (smsblock/service/fleet.py): connectors' own credentials (a SigV4 key bound
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


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
#: the advisory lock every PostgreSQL write transaction takes first: ("smsb", the schema),
#: so control planes in two schemas of one database do not wait for each other
WRITE_LOCK_KEY = 0x736D7362
WRITE_LOCK = f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY}, hashtext(current_schema()))"
VERSION_TABLE = "smsblock_schema_version"
#: the advisory locks of SessionLock ("smsc"; keyed by schema and name as well)
SESSION_LOCK_KEY = 0x736D7363
LOCK_TIMEOUT_SECONDS = 30          # as SQLite's busy timeout: a writer waits this long
IDLE_IN_TRANSACTION_SECONDS = 120  # a stalled process cannot hold the write lock forever
CONNECT_TIMEOUT_SECONDS = 10


def is_database_url(target) -> bool:
    """Does ``--state`` name a PostgreSQL database rather than a directory?"""
    return isinstance(target, str) and target.lower().startswith(POSTGRES_SCHEMES)


_URL_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:@/\s]*):[^@\s]*@", re.IGNORECASE)


def redact(text: str, secret: str | None = None) -> str:
    """``text`` with the password of every connection URL in it (and ``secret``) hidden."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    if secret and len(secret) >= 3:
        text = text.replace(secret, "***")
    return text


class Row(tuple):
    """A PostgreSQL result row read as :class:`sqlite3.Row` is: by index or column name."""

    def __new__(cls, values, index: dict[str, int]):
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                key = self._index[key.lower()]
            except KeyError:
                raise IndexError(f"no such column: {key}") from None
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor):
    index: dict[str, int] = {}
    for i, column in enumerate(cursor.description or ()):
        index.setdefault(column.name.lower(), i)     # the first of equal names, as sqlite3
    return lambda values: Row(values, index)


_QMARK = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|\?""")


@functools.lru_cache(maxsize=2048)
def pg_sql(sql: str) -> str:
    """A statement with ``?`` placeholders as PostgreSQL takes it (``$1``, ``$2`` ...);
    quoted text and comments are left alone."""
    n = 0

    def number(m: re.Match) -> str:
        nonlocal n
        if m.group() != "?":
            return m.group()
        n += 1
        return f"${n}"
    return _QMARK.sub(number, sql)


_CREATE_TABLE = re.compile(r"\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?\w+\s*\(",
                           re.IGNORECASE)


def pg_ddl(statement: str) -> str:
    """A migration statement for PostgreSQL: REAL is DOUBLE PRECISION (SQLite's REAL is
    8 bytes, PostgreSQL's 4), INTEGER is BIGINT (SQLite's are 64-bit), BLOB is BYTEA, and
    every new table gets a ``rowid BIGSERIAL`` so ``ORDER BY rowid`` means insertion
    order on both.  (An ``INTEGER PRIMARY KEY`` is no automatic id on PostgreSQL: give
    ids yourself, or use the ``rowid``.)"""
    if not re.match(r"\s*(CREATE|ALTER)\b", statement, re.IGNORECASE):
        return statement
    statement = re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)
    statement = re.sub(r"\bINTEGER\b", "BIGINT", statement)
    statement = re.sub(r"\bBLOB\b", "BYTEA", statement)
    m = _CREATE_TABLE.match(statement)
    if m:
        statement = f"{statement[:m.end()]}rowid BIGSERIAL NOT NULL, {statement[m.end():]}"
    return statement


class PgCursor:
    """A statement's result, read as a :class:`sqlite3.Cursor` is (no rows: None / [])."""

    def __init__(self, cursor):
        self._cursor = cursor

    def fetchone(self):
        return self._cursor.fetchone() if self._cursor.description is not None else None

    def fetchall(self) -> list:
        return self._cursor.fetchall() if self._cursor.description is not None else []

    def __iter__(self):
        return iter(self.fetchall())

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def description(self):
        return self._cursor.description


class PgConnection:
    """What :meth:`State.transaction` yields on PostgreSQL: ``execute`` as sqlite3's;
    ``state`` is the :class:`State` it belongs to."""

    def __init__(self, state: "State"):
        self._state = state

    @property
    def state(self) -> "State":
        return self._state

    def execute(self, sql: str, params=()) -> PgCursor:
        return self._state.pg_execute(sql, params)

    def executemany(self, sql: str, seq) -> None:
        for params in seq:
            self._state.pg_execute(sql, params)


def _bad_name(name: str):
    raise ValueError(f"lock names are letters, digits and _.- (at most 200), got {name[:80]!r}")


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise UsageError("a PostgreSQL state needs psycopg 3: pip install 'psycopg[binary]' "
                         "(the smsblock[postgresql] extra)") from None
    return psycopg


@functools.cache
def _bool_dumper():
    """Python booleans go in as 0/1, as sqlite3 stores them (the columns are integers)."""
    psycopg = _psycopg()
    from psycopg.adapt import Dumper

    class BoolAsInt(Dumper):
        oid = psycopg.postgres.types["int8"].oid

        def dump(self, obj):
            return b"1" if obj else b"0"
    return BoolAsInt


class SessionLock:
    """A PostgreSQL advisory lock held by a connection of its own, so that it lives as
    long as its holder: :meth:`release` it, or the process's death (its connection
    closes) frees it.  What a lock file with ``flock`` is on one machine, for all."""

    def __init__(self, conn):
        self._conn = conn

    def release(self) -> None:
        with contextlib.suppress(Exception):
            # unlocked before the close returns (the server ends a closed session a
            # moment later), so the next look at the lock finds it free
            self._conn.execute("SELECT pg_advisory_unlock_all()")
        with contextlib.suppress(Exception):
            self._conn.close()

    close = release


class State:
    """The state of the control plane: a SQLite state directory (the default) or a
    PostgreSQL database named by a ``postgresql://`` URL; thread-safe, one writer at a time
    (across processes too).

    ``local_dir`` (PostgreSQL only) holds the files beside the database (``config.toml``,
    lock files, the default block store); default ``$SMSBLOCK_HOME`` or ``~/.smsblock``.
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, *,
                 local_dir: str | os.PathLike | None = None):
        self.dialect = "postgresql" if is_database_url(state_dir) else "sqlite"
        if self.dialect == "postgresql":
            directory = local_dir if local_dir is not None else default_state_dir()
        else:
            if local_dir is not None:
                raise UsageError("local_dir goes with a PostgreSQL state; a SQLite state "
                                 "keeps its files in its own directory")
            directory = state_dir if state_dir is not None else default_state_dir()
        # absolute: connectors store paths under it (STATE/store) that other cwds must find
        self.dir = Path(directory).absolute()
        self.path: Path | None = self.dir / DB_NAME if self.dialect == "sqlite" else None
        #: where the state is, fit to show (a URL without its password)
        self.location = str(self.dir)
        self._make_dir()
        self._lock = threading.RLock()
        self._depth = 0
        if self.dialect == "postgresql":
            self._pg_open(str(state_dir))
            return
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

    def _make_dir(self) -> None:
        try:
            make_root(self.dir)                 # 0700
            if self.dialect != "sqlite":
                return
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

    # --- PostgreSQL ----------------------------------------------------------------------

    def _pg_open(self, url: str) -> None:
        psycopg = _psycopg()
        from psycopg.conninfo import conninfo_to_dict
        try:
            info = conninfo_to_dict(url)
        except psycopg.Error as e:
            raise UsageError(f"state database {redact(url)}: not a valid connection URL: "
                             f"{redact(one_line(e))}") from None
        self._password = info.get("password")
        user = info.get("user") or ""
        host = info.get("host") or info.get("hostaddr") or "localhost"
        self.location = (f"postgresql://{user + '@' if user else ''}{host}:"
                         f"{info.get('port') or 5432}/{info.get('dbname') or user}")
        self._url = url
        self._connect_kw = {} if "connect_timeout" in info else {
            "connect_timeout": CONNECT_TIMEOUT_SECONDS}
        self._db = None
        self._conn = PgConnection(self)
        self._pg_connect()
        self._migrate()

    def _pg_error(self, e: BaseException, doing: str = "") -> ServiceError:
        text = redact(one_line(e, 500), self._password)
        return ServiceError(f"state database {self.location}: {doing}{text}", "InternalError")

    def _pg_connect(self) -> None:
        psycopg = _psycopg()
        try:
            db = psycopg.connect(self._url, autocommit=True, cursor_factory=psycopg.RawCursor,
                                 row_factory=_row_factory, **self._connect_kw)
        except psycopg.Error as e:
            raise self._pg_error(e, "cannot connect: ") from None
        try:
            db.adapters.register_dumper(bool, _bool_dumper())
            db.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'")
            db.execute(f"SET idle_in_transaction_session_timeout = "
                       f"'{IDLE_IN_TRANSACTION_SECONDS}s'")
        except psycopg.Error as e:
            db.close()
            raise self._pg_error(e, "cannot connect: ") from None
        self._db = db

    def _pg_usable(self) -> None:
        """Outside a transaction: reconnect if the connection was lost (server restart)."""
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    self._db.close()
            self._db = None
            self._pg_connect()

    def pg_execute(self, sql: str, params=(), *, retry: bool = False) -> PgCursor:
        """Run one statement; ``retry``: once more on a new connection if the old one
        turns out to be lost (only for statements that change nothing when repeated)."""
        psycopg = _psycopg()
        with self._lock:
            try:
                return PgCursor(self._db.execute(pg_sql(sql), tuple(params) or None))
            except psycopg.Error as e:
                if not (retry and self._db.broken):
                    raise self._pg_error(e) from None
            self._pg_usable()        # the server restarted or ended the session: reconnect
            try:
                return PgCursor(self._db.execute(pg_sql(sql), tuple(params) or None))
            except psycopg.Error as e:
                raise self._pg_error(e) from None

    def _session_key(self, name: str) -> str:
        if not re.fullmatch(r"[\w.-]{1,200}", name, re.ASCII):   # quoted in the SQL below
            _bad_name(name)
        return f"{SESSION_LOCK_KEY}, hashtext(current_schema() || ':' || '{name}')"

    def try_session_lock(self, name: str) -> SessionLock | None:
        """PostgreSQL: take the lock ``name`` (letters, digits, ``_.-``) on a new
        connection, held until released or until this process dies; None when another
        session holds it."""
        psycopg = _psycopg()
        try:
            conn = psycopg.connect(self._url, autocommit=True, **self._connect_kw)
        except psycopg.Error as e:
            raise self._pg_error(e, "cannot connect: ") from None
        try:
            # a holder on a host that vanished (no FIN) is found dead in about a minute,
            # not after the kernel's two-hour keepalive default
            conn.execute("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; "
                         "SET tcp_keepalives_count = 3")
            got = conn.execute(f"SELECT pg_try_advisory_lock({self._session_key(name)})"
                               ).fetchone()[0]
        except psycopg.Error as e:
            conn.close()
            raise self._pg_error(e) from None
        if not got:
            conn.close()
            return None
        return SessionLock(conn)

    def session_lock_held(self, name: str) -> bool:
        """PostgreSQL: does a live session (of any process, on any host) hold ``name``?"""
        with self._lock:
            key = self._session_key(name)
            if not self.pg_execute(f"SELECT pg_try_advisory_lock({key})").fetchone()[0]:
                return True
            self.pg_execute(f"SELECT pg_advisory_unlock({key})")
            return False

    # --- both ------------------------------------------------------------------------------

    def _execute(self, sql: str, params=()):
        if self.dialect == "sqlite":
            return self._db.execute(sql, params)
        return self.pg_execute(sql, params)

    def _begin(self) -> None:
        # every PostgreSQL writer takes the write lock first: writers take turns, as BEGIN
        # IMMEDIATE makes them (one round trip: a statement without parameters goes as a
        # simple query)
        self._begin_with("BEGIN IMMEDIATE", f"BEGIN; {WRITE_LOCK}")

    def _begin_with(self, sqlite_sql: str, pg_sql: str) -> None:
        if self.dialect == "sqlite":
            self._db.execute(sqlite_sql)
            return
        self._pg_usable()
        try:
            self.pg_execute(pg_sql, retry=True)
        except BaseException:
            self._rollback()
            raise

    def _commit(self) -> None:
        self._execute("COMMIT")

    def _rollback(self) -> None:
        if self.dialect == "sqlite":
            self._db.execute("ROLLBACK")
            return
        if self._db.closed or self._db.broken:
            return     # the server ended the transaction with the connection
        with contextlib.suppress(ServiceError):
            self.pg_execute("ROLLBACK")

    def _read_version(self) -> int:
        if self.dialect == "sqlite":
            return self._db.execute("PRAGMA user_version").fetchone()[0]
        row = self.pg_execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()
        return row[0] if row is not None else 0

    @property
    def version(self) -> int:
        with self._lock:
            if self.dialect == "postgresql":
                self._pg_usable()
            return self._read_version()

    def _migrate(self) -> None:
        with self._lock:
            while True:
                # Read the version inside the write lock: two processes opening a fresh
                # database at once must not both apply migration 1.
                self._begin()
                try:
                    if self.dialect == "postgresql":
                        self.pg_execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} "
                                         "(version BIGINT NOT NULL)")
                    version = self._read_version()
                    if version > SCHEMA_VERSION:
                        raise ServiceError(
                            f"state database {self.path or self.location} has schema version "
                            f"{version}, newer than this smsblock ({SCHEMA_VERSION}); "
                            "upgrade smsblock", "InternalError")
                    if version == SCHEMA_VERSION:
                        self._commit()
                        return
                    if self.dialect == "sqlite":
                        for statement in MIGRATIONS[version]:
                            self._db.execute(statement)
                        self._db.execute(f"PRAGMA user_version = {version + 1}")
                    else:       # the step in one round trip (no parameters: a simple query)
                        self.pg_execute("\n;\n".join(
                            [*map(pg_ddl, MIGRATIONS[version]),
                             f"DELETE FROM {VERSION_TABLE}",
                             f"INSERT INTO {VERSION_TABLE} (version) VALUES ({version + 1})"]))
                    self._commit()
                except BaseException:
                    self._rollback()
                    raise

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """One atomic unit of change; nested uses join the outer transaction.  Yields the
        connection: ``execute(sql, params)`` with ``?`` placeholders, rows by name."""
        return self._unit(self._begin, keep=True)

    def snapshot(self) -> contextlib.AbstractContextManager[Any]:
        """A consistent read of several statements that waits for no writer and makes none
        wait: SQLite's deferred transaction (a WAL snapshot), PostgreSQL's REPEATABLE READ
        READ ONLY transaction without the write lock.  Only reads may run in it; inside a
        :meth:`transaction` it joins that one."""
        return self._unit(self._begin_read, keep=False)

    def _begin_read(self) -> None:
        self._begin_with("BEGIN", "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    @contextlib.contextmanager
    def _unit(self, begin, keep: bool) -> Iterator[Any]:
        """A transaction begun by ``begin``, committed at the end if ``keep`` (else rolled
        back: a read), rolled back on error; a nested one joins the outer."""
        with self._lock:
            conn = self._db if self.dialect == "sqlite" else self._conn
            if self._depth:
                self._depth += 1
                try:
                    yield conn
                finally:
                    self._depth -= 1
                return
            begin()
            self._depth = 1
            try:
                yield conn
            except BaseException:
                self._depth = 0
                self._rollback()
                raise
            self._depth = 0
            if keep:
                self._commit()
            else:
                self._rollback()

    def query(self, sql: str, params=()) -> list:
        """The rows of one statement (its own transaction unless inside one)."""
        with self._lock:
            if self.dialect == "sqlite":
                return self._db.execute(sql, params).fetchall()
            if self._depth:
                return self.pg_execute(sql, params).fetchall()
            self._pg_usable()
            # a read is repeated on a new connection when the old one was lost
            reads = re.match(r"\s*SELECT\b", sql, re.IGNORECASE) is not None
            return self.pg_execute(sql, params, retry=reads).fetchall()

    def tables(self) -> list[str]:
        """The names of the state's tables (not the schema's own bookkeeping), sorted."""
        if self.dialect == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        else:
            sql = ("SELECT table_name AS name FROM information_schema.tables WHERE "
                   "table_schema = current_schema() AND table_type = 'BASE TABLE' AND "
                   f"table_name != '{VERSION_TABLE}' ORDER BY table_name")
        return [r["name"] for r in self.query(sql)]

    def check(self) -> str:
        """The database's own check ("ok" when sound): SQLite's integrity check; on
        PostgreSQL, that the server answers."""
        with self._lock:
            if self.dialect == "sqlite":
                return self._db.execute("PRAGMA integrity_check").fetchone()[0]
            self._pg_usable()
            return "ok" if self.pg_execute("SELECT 1").fetchone()[0] == 1 else "not ok"

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()

    def __repr__(self) -> str:
        return f"State({self.location!r})"

    def __enter__(self) -> "State":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
