"""The SMS operations as a Python API: :class:`SmsService`.

Methods are named after the SMS operations in snake case and take the SMS request
members as keyword arguments with their API names (``serverId``, ``seedReplicationTime``
...); they return the SMS response as a dict in wire form (timestamps as epoch seconds),
exactly what ``smsblock sms`` prints and ``smsblock serve`` sends.  :meth:`SmsService.call`
takes an operation name and a decoded JSON request, checks the member names and types
against the SMS model, and dispatches; the CLI and the HTTP server both go through it.

Refusals raise :class:`~smsblock.errors.ServiceError` whose ``code`` is the SMS error
name; nothing is changed when one is raised.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import socket
import threading
import uuid

from .. import __version__
from ..errors import ServiceError
from . import catalog, jobs, scheduler
from .models import (CONNECTOR_ID, ConnectorCapability, ReplicationJobState,
                     ServerCatalogStatus, bounded_message, echo, new_connector_id,
                     parse_timestamp, to_epoch)
from .records import connector_from_row, job_from_row, run_from_row, server_from_row, ts
from .sources import open_source
from .state import ServiceConfig, State

DEFAULT_MAX_RESULTS = 50
MAX_MAX_RESULTS = 1000
MAX_ADDRESSES = 1000     # entries of GetServers' vmServerAddressList
MAX_ADDRESS_TEXT = 1024  # characters of one vmManagerId or vmId in it
JOB_RUNS_SHOWN = 10  # runs embedded in each GetReplicationJobs entry (GetReplicationRuns pages all)

# Request members of each operation and their types, from the SMS model (2016-10-24).
OPERATIONS: dict[str, dict[str, str]] = {
    "GetConnectors": {"nextToken": "string", "maxResults": "integer"},
    "DisassociateConnector": {"connectorId": "string"},
    "ImportServerCatalog": {},
    "DeleteServerCatalog": {},
    "GetServers": {"nextToken": "string", "maxResults": "integer",
                   "vmServerAddressList": "addresses"},
    "CreateReplicationJob": {"serverId": "string", "seedReplicationTime": "timestamp",
                             "frequency": "integer", "runOnce": "boolean",
                             "licenseType": "string", "roleName": "string",
                             "description": "string", "numberOfRecentAmisToKeep": "integer",
                             "encrypted": "boolean", "kmsKeyId": "string",
                             "bootTest": "boolean"},     # smsblock's own: boot-test each image
    "GetReplicationJobs": {"replicationJobId": "string", "nextToken": "string",
                           "maxResults": "integer"},
    "GetReplicationRuns": {"replicationJobId": "string", "nextToken": "string",
                           "maxResults": "integer"},
    "UpdateReplicationJob": {"replicationJobId": "string", "frequency": "integer",
                             "nextReplicationRunStartTime": "timestamp",
                             "licenseType": "string", "roleName": "string",
                             "description": "string", "numberOfRecentAmisToKeep": "integer",
                             "encrypted": "boolean", "kmsKeyId": "string",
                             "bootTest": "boolean"},
    "StartOnDemandReplicationRun": {"replicationJobId": "string", "description": "string"},
    "DeleteReplicationJob": {"replicationJobId": "string"},
}


def snake(operation: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


INT32 = (-(1 << 31), (1 << 31) - 1)   # the model's integer shapes are 32-bit
MAX_TOKEN = 1024                       # a nextToken this service gives is ~40 characters

# The errors the SMS model (service-2.json) declares for each served operation; a test
# checks this table against the model.
DECLARED_ERRORS: dict[str, frozenset[str]] = {op: frozenset(codes) for op, codes in {
    "GetConnectors": ["UnauthorizedOperationException"],
    "DisassociateConnector": ["MissingRequiredParameterException",
                              "UnauthorizedOperationException",
                              "OperationNotPermittedException", "InvalidParameterException"],
    "ImportServerCatalog": ["UnauthorizedOperationException", "OperationNotPermittedException",
                            "InvalidParameterException", "MissingRequiredParameterException",
                            "NoConnectorsAvailableException"],
    "DeleteServerCatalog": ["UnauthorizedOperationException", "OperationNotPermittedException",
                            "InvalidParameterException", "MissingRequiredParameterException"],
    "GetServers": ["UnauthorizedOperationException", "InvalidParameterException",
                   "MissingRequiredParameterException", "InternalError"],
    "CreateReplicationJob": ["InvalidParameterException", "MissingRequiredParameterException",
                             "UnauthorizedOperationException", "OperationNotPermittedException",
                             "ServerCannotBeReplicatedException",
                             "ReplicationJobAlreadyExistsException",
                             "NoConnectorsAvailableException", "InternalError",
                             "TemporarilyUnavailableException"],
    "GetReplicationJobs": ["InvalidParameterException", "MissingRequiredParameterException",
                           "UnauthorizedOperationException"],
    "GetReplicationRuns": ["InvalidParameterException", "MissingRequiredParameterException",
                           "UnauthorizedOperationException"],
    "UpdateReplicationJob": ["InvalidParameterException", "MissingRequiredParameterException",
                             "OperationNotPermittedException", "UnauthorizedOperationException",
                             "ServerCannotBeReplicatedException",
                             "ReplicationJobNotFoundException", "InternalError",
                             "TemporarilyUnavailableException"],
    "StartOnDemandReplicationRun": ["InvalidParameterException",
                                    "MissingRequiredParameterException",
                                    "UnauthorizedOperationException",
                                    "OperationNotPermittedException",
                                    "ReplicationRunLimitExceededException",
                                    "DryRunOperationException"],
    "DeleteReplicationJob": ["InvalidParameterException", "MissingRequiredParameterException",
                             "UnauthorizedOperationException", "OperationNotPermittedException",
                             "ReplicationJobNotFoundException"],
}.items()}

# Errors any AWS JSON 1.1 operation may answer, declared or not: the protocol's own and
# the API reference's "common errors".
COMMON_ERRORS = frozenset({
    "UnknownOperationException", "SerializationException", "MissingAuthenticationTokenException",
    "IncompleteSignatureException", "InvalidSignatureException", "UnrecognizedClientException",
    "AccessDeniedException", "ThrottlingException", "ServiceUnavailable", "InternalFailure",
    "InvalidParameterValue", "MissingParameter", "ValidationException"})

# An error an operation does not declare becomes the first of these it declares (or the
# common error of the same meaning); the message keeps saying what was wrong.
_SAME_MEANING: dict[str, tuple[str, ...]] = {
    "ReplicationJobNotFoundException": ("InvalidParameterException", "InvalidParameterValue"),
    "MissingRequiredParameterException": ("InvalidParameterException", "MissingParameter"),
    "InvalidParameterException": ("InvalidParameterValue",),
    "ServerCannotBeReplicatedException": ("OperationNotPermittedException",),
    "NoConnectorsAvailableException": ("OperationNotPermittedException",),
    "ReplicationRunLimitExceededException": ("OperationNotPermittedException",),
    "ReplicationJobAlreadyExistsException": ("OperationNotPermittedException",),
    "TemporarilyUnavailableException": ("ServiceUnavailable",),
    "InternalError": ("InternalFailure",),
}


def declared_error(operation: str, code: str) -> str:
    """The error code to answer ``operation`` with for an error ``code``: itself when the
    model declares it for the operation (or it is a common error), else the declared
    error of the same meaning; unchanged when there is none."""
    declared = DECLARED_ERRORS.get(operation)
    if declared is None or code in declared or code in COMMON_ERRORS:
        return code
    for other in _SAME_MEANING.get(code, ()):
        if other in declared or other in COMMON_ERRORS:
            return other
    return code


def _check_text(op: str, name: str, value: str) -> str:
    # JSON may carry lone surrogates (\ud800), the CLI's argv undecodable bytes as
    # surrogates; neither can be stored or sent back as UTF-8
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ServiceError(f"{op}: {name} is not valid Unicode text (character "
                           f"{e.start} is a lone surrogate or an undecodable byte)",
                           "InvalidParameterException") from None
    if "\x00" in value:    # a PostgreSQL text cannot hold it: refused whatever the backend
        raise ServiceError(f"{op}: {name} may not contain NUL characters (character "
                           f"{value.index(chr(0))})", "InvalidParameterException")
    return value


def _timestamp(value, name: str):
    """``parse_timestamp`` with every out-of-calendar value as InvalidParameterException."""
    try:
        return parse_timestamp(value, name)
    except (OverflowError, ValueError, OSError):
        # e.g. 9999-12-31T23:59:59-23:59, whose UTC time is past year 9999
        raise ServiceError(f"{name}: {str(value)[:60]!r} is outside the calendar",
                           "InvalidParameterException") from None


def _check_type(op: str, name: str, kind: str, value):
    bad = ServiceError(f"{op}: {name} must be {kind}, got {echo(value)}",
                       "InvalidParameterException")
    if kind == "string":
        if not isinstance(value, str):
            raise bad
        _check_text(op, name, value)
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if not INT32[0] <= value <= INT32[1]:
            raise ServiceError(f"{op}: {name} must be a 32-bit integer, got "
                               f"{str(value)[:40]}", "InvalidParameterException")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise bad
    elif kind == "timestamp":
        if isinstance(value, str):
            _check_text(op, name, value)
        return _timestamp(value, name)
    elif kind == "addresses":
        if not isinstance(value, list) or not all(
                isinstance(a, dict) and set(a) <= {"vmManagerId", "vmId"}
                and all(isinstance(v, str) for v in a.values()) for a in value):
            raise ServiceError(f"{op}: {name} must be a list of {{vmManagerId, vmId}}",
                               "InvalidParameterException")
        if len(value) > MAX_ADDRESSES:
            raise ServiceError(f"{op}: {name} may hold at most {MAX_ADDRESSES} addresses, "
                               f"got {len(value)}", "InvalidParameterException")
        for a in value:
            for k, v in a.items():
                if len(v) > MAX_ADDRESS_TEXT:
                    raise ServiceError(f"{op}: {name}.{k} may be at most {MAX_ADDRESS_TEXT} "
                                       f"characters, got {len(v)}", "InvalidParameterException")
                _check_text(op, f"{name}.{k}", v)
    return value


class SmsService:
    """The SMS control plane over one state directory.

    ``clock`` returns epoch seconds (inject a :class:`~.scheduler.FakeClock` in tests);
    ``config`` defaults to ``STATE/config.toml`` or the SMS limits.
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, *,
                 clock: scheduler.Clock = scheduler.system_clock,
                 config: ServiceConfig | None = None, state: State | None = None):
        self.state = state if state is not None else State(state_dir)
        self.clock = clock
        self.config = config if config is not None else ServiceConfig.load(self.state.dir)
        #: how long ImportServerCatalog waits for the import (None: until it is done;
        #: `smsblock serve` sets a few seconds, the import then goes on in the background)
        self.import_wait_seconds: float | None = None
        self._imports: list[catalog.CatalogImport] = []
        self._imports_lock = threading.Lock()

    def close(self) -> None:
        with self._imports_lock:       # background imports stop; a killed one is recovered
            for job in self._imports:
                job.cancel.cancel("the service is closing")
            running = list(self._imports)
        for job in running:
            job.done.wait(5)
        self.state.close()

    def __enter__(self) -> "SmsService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- wire entry point --------------------------------------------------------

    def call(self, operation: str, params: dict | None) -> dict:
        """Run one SMS operation from a decoded JSON request."""
        spec = OPERATIONS.get(operation)
        if spec is None:   # what JSON 1.1 services answer for an operation they do not serve
            raise ServiceError(f"operation {str(operation)[:80]!r} is not served",
                               "UnknownOperationException")
        try:
            return self._call(operation, spec, params)
        except ServiceError as e:
            # whatever raised it, no message quotes more than MAX_MESSAGE characters
            code, message = declared_error(operation, e.code), str(e)
            if code != e.code or len(message) != len(bounded_message(message)):
                raise ServiceError(bounded_message(message), code) from None
            raise

    def _call(self, operation: str, spec: dict[str, str], params) -> dict:
        if params is None:      # no body at all; [], 0, "" or false are not "no parameters"
            params = {}
        if not isinstance(params, dict):
            raise ServiceError(f"{operation}: the request body must be a JSON object",
                               "SerializationException")
        unknown = sorted(set(params) - set(spec))
        if unknown:
            raise ServiceError(f"{operation}: unknown parameters {unknown}"[:300],
                               "InvalidParameterException")
        checked = {k: _check_type(operation, k, spec[k], v)
                   for k, v in params.items() if v is not None}
        return getattr(self, snake(operation))(**checked)

    # --- connectors (registration is not an SMS operation) ---------------------------

    def register_connector(self, kind: str, config: dict, *, store: str | None = None) -> dict:
        """Associate a new connector with the source ``kind`` opened with ``config``
        (``"datastore"``, ``{"path": ...}``); its blocks go to ``store`` (default
        ``STATE/store``).  Returns the connector as GetConnectors shows it."""
        source = open_source(kind, config)   # refuses an unreachable or malformed source
        try:
            names = (source.manager_name, source.manager_type, source.manager_id)
            # the source's own (normalised, secret-free) config when it offers one
            config = source.config() if callable(getattr(source, "config", None)) else config
        finally:
            source.close()
        now = self.clock()
        connector_id = new_connector_id()
        store = store or str(self.state.dir / "store")
        # registration is the explicit creation of the connector's store: runs then
        # replicate into an existing store only (a mistyped --store fails here, not later)
        from ..store import open_store
        open_store(store).initialise()
        caps = [ConnectorCapability.VSPHERE.value, ConnectorCapability.SMS_OPTIMIZED.value]
        with self.state.transaction() as db:
            db.execute(
                "INSERT INTO connectors (connector_id, version, capabilities, vm_manager_name, "
                "vm_manager_type, vm_manager_id, ip_address, mac_address, associated_on, "
                "last_heartbeat, source_kind, source_config, store) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (connector_id, __version__, json.dumps(caps), *names, _local_ip(), _local_mac(),
                 now, now, kind, json.dumps(config), store))
            row = db.execute("SELECT * FROM connectors WHERE connector_id = ?",
                             (connector_id,)).fetchone()
        return connector_from_row(row, now, self.config.heartbeat_timeout_seconds).to_api()

    def heartbeat(self, connector_id: str) -> None:
        with self.state.transaction() as db:
            db.execute("UPDATE connectors SET last_heartbeat = ? WHERE connector_id = ?",
                       (self.clock(), connector_id))

    def get_connectors(self, nextToken: str | None = None, maxResults: int | None = None) -> dict:
        now = self.clock()
        page, token = _paged_query(self.state.query, "GetConnectors",
                                   "SELECT * FROM connectors WHERE disassociated_on IS NULL "
                                   "ORDER BY associated_on, rowid", (), nextToken, maxResults)
        out = {"connectorList": [connector_from_row(r, now, self.config.heartbeat_timeout_seconds)
                                 .to_api() for r in page]}
        if token:
            out["nextToken"] = token
        return out

    def disassociate_connector(self, connectorId: str | None = None) -> dict:
        if connectorId is None:
            raise ServiceError("connectorId is required", "MissingRequiredParameterException")
        if not CONNECTOR_ID.fullmatch(connectorId):
            raise jobs.invalid(f"connectorId {echo(connectorId)} is not a connector id "
                               "(c- and 17 hex digits)")
        with self.state.transaction() as db:
            row = db.execute("SELECT * FROM connectors WHERE connector_id = ? AND "
                             "disassociated_on IS NULL", (connectorId,)).fetchone()
            if row is None:
                raise jobs.invalid(f"connector {connectorId} is not associated")
            needed = (*jobs.LIVE, ReplicationJobState.DELETING.value)
            job = db.execute(
                f"SELECT j.job_id, j.state FROM jobs j JOIN servers s ON s.server_id = j.server_id "
                f"WHERE s.connector_id = ? AND j.state IN {jobs.sql_in(needed)} LIMIT 1",
                (connectorId, *needed)).fetchone()
            if job is not None:
                raise jobs.not_permitted(
                    f"connector {connectorId} is still needed by replication job "
                    f"{job['job_id']} ({job['state']}); delete the job first")
            db.execute("UPDATE connectors SET disassociated_on = ? WHERE connector_id = ?",
                       (self.clock(), connectorId))
            db.execute("UPDATE servers SET in_catalog = 0 WHERE connector_id = ?", (connectorId,))
        return {}

    # --- catalog ----------------------------------------------------------------------

    def import_server_catalog(self) -> dict:
        """Start an import; with ``import_wait_seconds`` None (the default) return when it
        is done, else after at most that long (it goes on in a background thread, the
        catalog IMPORTING meanwhile).  Errors of an import that ends within the wait are
        raised; later ones are logged and kept in :meth:`last_catalog_import`."""
        job = catalog.begin_import(self.state, self.clock(), self.config)
        if self.import_wait_seconds is None:
            catalog.run_import(self.state, job, self.clock)
        else:
            thread = threading.Thread(target=catalog.run_import, name="catalog-import",
                                      args=(self.state, job, self.clock), daemon=True)
            with self._imports_lock:
                self._imports = [j for j in self._imports if not j.done.is_set()] + [job]
            thread.start()
            if not job.done.wait(self.import_wait_seconds):
                return {}
        if job.error is not None:
            raise job.error
        return {}

    def delete_server_catalog(self) -> dict:
        overtaken = catalog.delete_catalog(self.state, self.clock(), self.config)
        # the import the delete overtook (if it runs in this process) stops listing early;
        # one started after the delete committed is not the delete's business
        with self._imports_lock:
            for job in self._imports:
                if overtaken is not None and job.import_id == overtaken:
                    job.cancel.cancel("the server catalog was deleted")
        return {}

    def last_catalog_import(self) -> dict | None:
        """What the last finished catalog import did (not an SMS operation): servers,
        problems (VMs left out, with the reason), error; see :func:`catalog.last_import`."""
        return catalog.last_import_of(self.state)

    def get_servers(self, nextToken: str | None = None, maxResults: int | None = None,
                    vmServerAddressList: list[dict] | None = None) -> dict:
        wanted = _address_filter(vmServerAddressList) if vmServerAddressList else ("", ())
        now = self.clock()

        def page(db):
            cat = catalog.refresh_status(db, self.state.dir, now, self.config)
            # the filter too is the database's: a page reads a page of rows
            where, params = wanted
            shown, token = _paged_query(
                lambda q, p: db.execute(q, p).fetchall(), "GetServers",
                f"SELECT * FROM servers WHERE in_catalog = 1{where} ORDER BY vm_path, server_id",
                params, nextToken, maxResults)
            job_of = _jobs_of_servers(db, [r["server_id"] for r in shown])
            return cat, [server_from_row(r, job_of.get(r["server_id"])).to_api()
                         for r in shown], token
        # a read in one snapshot, unless the catalog's status is due to change there (an
        # import's process died, or its connectors are gone past the expiry): then the
        # write transaction does it
        with self.state.snapshot() as db:
            answer = None if catalog.status_may_change(db, now, self.config) else page(db)
        if answer is None:
            with self.state.transaction() as db:
                answer = page(db)
        cat, servers, token = answer
        out = {"serverCatalogStatus": ServerCatalogStatus(cat["status"]).value,
               "serverList": servers}
        if cat["last_modified_on"] is not None:
            out["lastModifiedOn"] = to_epoch(ts(cat["last_modified_on"]))
        if token:
            out["nextToken"] = token
        return out

    # --- replication jobs ---------------------------------------------------------------

    def create_replication_job(self, **params) -> dict:
        params = self._times(params, "seedReplicationTime")
        with self.state.transaction() as db:
            job_id = jobs.create_job(db, params, self.clock(), self.config)
        return {"replicationJobId": job_id}

    def update_replication_job(self, **params) -> dict:
        params = self._times(params, "nextReplicationRunStartTime")
        with self.state.transaction() as db:
            jobs.update_job(db, params, self.clock(), self.config)
        return {}

    def delete_replication_job(self, replicationJobId: str | None = None) -> dict:
        with self.state.transaction() as db:
            jobs.delete_job(db, replicationJobId, self.clock())
        return {}

    def start_on_demand_replication_run(self, replicationJobId: str | None = None,
                                        description: str | None = None) -> dict:
        now = self.clock()
        with self.state.transaction() as db:
            if isinstance(replicationJobId, str):
                # a slot that came before this request gets its run first (and so refuses
                # the request as busy); rolled back with the rest if the request is refused
                scheduler.settle_due_slot(db, replicationJobId, now, self.config)
            run_id = jobs.start_on_demand(db, replicationJobId, description, now, self.config)
        return {"replicationRunId": run_id}

    def get_replication_jobs(self, replicationJobId: str | None = None,
                             nextToken: str | None = None, maxResults: int | None = None) -> dict:
        with self.state.snapshot() as db:      # a read: waits for no writer
            # deleted jobs stay listed, in state DELETED (as SMS lists them)
            if replicationJobId is not None:
                rows = [jobs.get_job(db, replicationJobId, deleted=True)]
                page, token = _paginate("GetReplicationJobs", rows, nextToken, maxResults)
            else:
                page, token = _paged_query(lambda q, p: db.execute(q, p).fetchall(),
                                           "GetReplicationJobs",
                                           "SELECT * FROM jobs ORDER BY created, rowid", (),
                                           nextToken, maxResults)
            out = {"replicationJobList": self._jobs(db, page, JOB_RUNS_SHOWN)}
        if token:
            out["nextToken"] = token
        return out

    def get_replication_runs(self, replicationJobId: str | None = None,
                             nextToken: str | None = None, maxResults: int | None = None) -> dict:
        if replicationJobId is None:
            raise ServiceError("replicationJobId is required", "MissingRequiredParameterException")
        with self.state.snapshot() as db:      # a read: waits for no writer
            job = jobs.get_job(db, replicationJobId, deleted=True)
            page, token = _paged_query(lambda q, p: db.execute(q, p).fetchall(),
                                       "GetReplicationRuns",
                                       "SELECT * FROM runs WHERE job_id = ? "
                                       "ORDER BY created DESC, rowid DESC", (replicationJobId,),
                                       nextToken, maxResults)
            out = {"replicationJob": self._job(db, job, 0),
                   "replicationRunList": [run_from_row(r).to_api() for r in page]}
        if token:
            out["nextToken"] = token
        return out

    # --- helpers ------------------------------------------------------------------------

    def _times(self, params: dict, *names: str) -> dict:
        params = dict(params)
        for n in names:
            if params.get(n) is not None:
                params[n] = _timestamp(params[n], n).timestamp()
        return params

    def _job(self, db, row, n_runs: int) -> dict:
        server = db.execute("SELECT * FROM servers WHERE server_id = ?", (row["server_id"],)).fetchone()
        runs = db.execute("SELECT * FROM runs WHERE job_id = ? ORDER BY created DESC, rowid DESC "
                          "LIMIT ?", (row["job_id"], n_runs)).fetchall() if n_runs else []
        out = job_from_row(row, server, runs).to_api()
        if not n_runs:
            out.pop("replicationRunList", None)
        return out

    def _jobs(self, db, rows, n_runs: int) -> list[dict]:
        """:meth:`_job` of each of ``rows`` in two queries whatever their number (not two
        per job: on PostgreSQL each is a round trip, and a page is up to 100 jobs)."""
        if not rows:
            return []
        ids = sorted({r["server_id"] for r in rows})
        servers = {s["server_id"]: s for s in db.execute(
            f"SELECT * FROM servers WHERE server_id IN ({', '.join('?' * len(ids))})",
            ids).fetchall()}
        runs: dict[str, list] = {}
        if n_runs:
            job_ids = [r["job_id"] for r in rows]
            # the n latest runs of each job, as _job orders them
            for run in db.execute(
                    "SELECT * FROM (SELECT runs.*, ROW_NUMBER() OVER (PARTITION BY job_id "
                    "ORDER BY created DESC, rowid DESC) AS latest FROM runs WHERE job_id IN "
                    f"({', '.join('?' * len(job_ids))})) ranked WHERE latest <= ? "
                    "ORDER BY job_id, latest", (*job_ids, n_runs)).fetchall():
                runs.setdefault(run["job_id"], []).append(run)
        out = []
        for row in rows:
            job = job_from_row(row, servers.get(row["server_id"]), runs.get(row["job_id"], []))
            job = job.to_api()
            if not n_runs:
                job.pop("replicationRunList", None)
            out.append(job)
        return out

    def tick(self) -> list[str]:
        """Let the scheduler create the runs due now (the connector loop calls this)."""
        return scheduler.tick(self.state, self.clock(), self.config)


def _address_filter(addresses: list[dict]) -> tuple[str, tuple]:
    """The SQL condition (`` AND (...)``, or nothing) and its parameters that keep the
    servers matching one of ``addresses``: each matches the servers equal in the members
    it gives (one that gives none matches every server).  Equal addresses are asked
    once; the database looks the sets up, so the cost is not servers x addresses."""
    both, managers, vms = set(), set(), set()
    for addr in addresses:
        m, v = addr.get("vmManagerId"), addr.get("vmId")
        if m is not None and v is not None:
            both.add((m, v))
        elif m is not None:
            managers.add(m)
        elif v is not None:
            vms.add(v)
        else:
            return "", ()
    terms, params = [], []
    if managers:
        terms.append(f"vm_manager_id IN ({', '.join('?' * len(managers))})")
        params += sorted(managers)
    if vms:
        terms.append(f"vm_id IN ({', '.join('?' * len(vms))})")
        params += sorted(vms)
    if both:
        terms.append(f"(vm_manager_id, vm_id) IN (VALUES {', '.join(['(?, ?)'] * len(both))})")
        params += [x for pair in sorted(both) for x in pair]
    return f" AND ({' OR '.join(terms)})", tuple(params)


def _jobs_of_servers(db, server_ids: list[str]) -> dict:
    """The job each server shows (its live job, else its latest), for a page of servers
    in one statement (not one or two per server: a round trip each on PostgreSQL)."""
    if not server_ids:
        return {}
    live: dict = {}
    latest: dict = {}
    for job in db.execute(
            f"SELECT * FROM jobs WHERE server_id IN ({', '.join('?' * len(server_ids))}) "
            "ORDER BY created DESC, rowid DESC", server_ids).fetchall():
        latest.setdefault(job["server_id"], job)
        if job["state"] != "DELETED":
            live.setdefault(job["server_id"], job)
    return {**latest, **live}


def _page_start(op: str, token: str | None, max_results: int | None) -> tuple[int, int]:
    """``(offset, page size)`` of the page ``token`` names (0 without one)."""
    if max_results is None:
        max_results = DEFAULT_MAX_RESULTS
    if not 1 <= max_results <= MAX_MAX_RESULTS:
        raise jobs.invalid(f"maxResults must be between 1 and {MAX_MAX_RESULTS}, got {max_results}")
    start = 0
    if token:
        try:
            if len(token) > MAX_TOKEN:
                raise ValueError("too long")
            data = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
            if not isinstance(data, dict) or data.get("op") != op:
                raise ValueError
            offset = data.get("offset")
            if type(offset) is not int or offset < 0:   # not a bool, not a float
                raise ValueError
            start = offset
        except (ValueError, UnicodeError, binascii.Error, RecursionError):
            # RecursionError: a token of deeply nested JSON
            raise jobs.invalid(f"nextToken {token[:40]!r} is not a token this operation "
                               "gave") from None
    return start, max_results


def _next_token(op: str, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"op": op, "offset": offset}).encode()).decode()


def _paginate(op: str, rows: list, token: str | None, max_results: int | None):
    """One page of ``rows`` (filtered in Python) and the token of the next (None at the end)."""
    start, n = _page_start(op, token, max_results)
    return rows[start:start + n], (_next_token(op, start + n) if start + n < len(rows) else None)


def _paged_query(run, op: str, sql: str, params: tuple, token: str | None,
                 max_results: int | None):
    """One page of a query's rows, cut by the database (``LIMIT``/``OFFSET``: a page
    costs a page whatever the table's size), and the token of the next.  ``run(sql,
    params)`` returns the rows."""
    start, n = _page_start(op, token, max_results)
    rows = run(f"{sql} LIMIT ? OFFSET ?", (*params, n + 1, start))
    return rows[:n], (_next_token(op, start + n) if len(rows) > n else None)


def _local_ip() -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def _local_mac() -> str:
    node = uuid.getnode()
    return ":".join(f"{(node >> s) & 0xff:02x}" for s in range(40, -1, -8))
