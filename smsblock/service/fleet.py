"""The connector-facing side of the control plane: credentials, claims, leases, fencing.

A fleet is one control plane (``smsblock serve``) and many connectors that reach it over
HTTP(S) (:mod:`smsblock.service.controlplane`).  This module holds what those connectors
may do, and the state it keeps for them; the local connector (``connector run --state``)
goes through the same functions, in its own process.

**Credentials.**  The operator creates one per connector (:meth:`Fleet.create_credential`):
a SigV4 key pair bound to a new connector id and to the block store the control plane
names for that connector.  The secret is shown once and kept in the state (owner-only:
the SigV4 check needs it).  A connector credential may call only the operations of
:data:`OPERATIONS`, and only for its own connector id; the operator's credential may call
none of them (a connector acting under the operator's key could not be told apart in the
log nor revoked alone: give it its own).  A revoked credential is refused from the next
request on (every request looks its key up).

**Claims.**  A run is executed by the connector that claims it: one conditional UPDATE
(``WHERE run_id = ? AND (state = PENDING and due, or ACTIVE with its lease run out)``)
whose row count says who won, so no two connectors ever hold one run.  Each claim
increments the run's ``fence``; every report, completion or failure names the fence it
holds and is refused (:data:`STALE_CLAIM`) once the run was claimed again.  A holder
renews its lease with each heartbeat and report; a connector killed mid-run stops doing
so, and after ``heartbeat_timeout_seconds`` any connector serving the same vm manager
claims the run again and resumes it (the engine stores only blocks the store does not
hold yet, so what the dead one sealed is not sent again).

**Sharing.**  A connector serves the runs of every server of its vm manager (vCenter or
datastore folder): several connectors registered with one vCenter share its runs.  A run
goes to the store of the connector that catalogued its server, so connectors sharing a
vm manager should be given the same store.

**Catalog.**  A remote connector lists its own source and uploads the list
(:meth:`Fleet.upload_catalog`); ImportServerCatalog then reads that upload through the
``uploaded`` source kind (:class:`UploadedCatalog`) instead of reaching the vCenter.

SQL here is portable (qmark placeholders, no SQLite-only syntax), for SQLite and
PostgreSQL alike.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
from typing import Any, Callable

from .. import __version__
from ..errors import ServiceError
from ..source import VmRecord
from .jobs import record_run_failure
from .models import (CONNECTOR_ID, JOB_ID, RUN_ID, ConnectorCapability, LIVE_JOB_STATES, MAX_FAILURE_REASON,
                     ReplicationJobState, ReplicationRunState, VmManagerType, bounded_message,
                     new_connector_id)
from .records import connector_from_row
from .state import ServiceConfig, State

log = logging.getLogger(__name__)

#: X-Amz-Target prefix of the connector operations (SMS's own is AWSServerMigrationService_...)
TARGET_PREFIX = "SmsBlockFleet_20261201."
#: the error of a report, completion or failure whose claim was taken over
STALE_CLAIM = "StaleClaimException"
ACCESS_KEY_ID = re.compile(r"SBKC[A-Z2-7]{16}")
UPLOADED_KIND = "uploaded"
MAX_CATALOG_VMS = 2000           # per upload (an upload is one request body: Limits.max_body)
MAX_PROBLEMS = 1000
MAX_SUMMARY = 256 * 1024         # characters of a run's JSON record
AMI_ID = re.compile(r"ami-[0-9a-f]{8,17}")

_PENDING = ReplicationRunState.PENDING.value
_ACTIVE = ReplicationRunState.ACTIVE.value
_GONE = (ReplicationJobState.DELETING.value, ReplicationJobState.DELETED.value)
DELETED_MESSAGE = "replication job deleted"
DELETED_CANCEL = "the replication job was deleted"


def not_permitted(message: str) -> ServiceError:
    return ServiceError(message, "AccessDeniedException")


def stale(message: str) -> ServiceError:
    return ServiceError(message, STALE_CLAIM)


def job_deleted(db, job_id: str) -> bool:
    """Whether the job is being deleted or is deleted (its runs end DELETED)."""
    row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return row is None or row["state"] in _GONE


def end_deleted(db, run_id: str, now: float, detail: str = "") -> None:
    db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ?, lease_until = NULL "
               "WHERE run_id = ?",
               (ReplicationRunState.DELETED.value,
                f"{DELETED_MESSAGE} during the run{detail}"[:1000], now, run_id))


def _row(row) -> dict | None:
    return None if row is None else {k: row[k] for k in row.keys()}


class Fleet:
    """The connector operations over one :class:`State`; each is one transaction."""

    def __init__(self, state: State, clock: Callable[[], float],
                 config: ServiceConfig | None = None):
        self.state = state
        self.clock = clock
        self.config = config if config is not None else ServiceConfig.load(state.dir)

    @property
    def lease_seconds(self) -> float:
        return float(self.config.heartbeat_timeout_seconds)

    # --- credentials (operator side) ------------------------------------------------

    def create_credential(self, store: str, description: str | None = None) -> dict:
        """A new connector id with its own key pair; the secret is in this answer only."""
        if not isinstance(store, str) or not store or len(store) > 1024 or "\n" in store:
            raise ServiceError("a connector credential needs the store URL or path its "
                               "connector replicates into (--store)", "InvalidParameterException")
        key = "SBKC" + base64.b32encode(secrets.token_bytes(10)).decode()
        secret = secrets.token_urlsafe(30)
        connector_id = new_connector_id()
        with self.state.transaction() as db:
            db.execute("INSERT INTO connector_credentials (access_key_id, secret_access_key, "
                       "connector_id, store, description, created) VALUES (?,?,?,?,?,?)",
                       (key, secret, connector_id, store, description, self.clock()))
        return {"connectorId": connector_id, "accessKeyId": key, "secretAccessKey": secret,
                "store": store}

    def list_credentials(self) -> list[dict]:
        rows = self.state.query("SELECT access_key_id, connector_id, store, description, created, "
                                "revoked FROM connector_credentials ORDER BY created, access_key_id")
        return [{"accessKeyId": r["access_key_id"], "connectorId": r["connector_id"],
                 "store": r["store"], "description": r["description"], "created": r["created"],
                 "revoked": r["revoked"]} for r in rows]

    def revoke_credential(self, access_key_id: str) -> dict:
        if not isinstance(access_key_id, str) or not ACCESS_KEY_ID.fullmatch(access_key_id):
            raise ServiceError(f"{access_key_id[:40]!r} is not a connector access key id "
                               "(SBKC and 16 characters)", "InvalidParameterException")
        with self.state.transaction() as db:
            row = db.execute("SELECT connector_id, revoked FROM connector_credentials WHERE "
                             "access_key_id = ?", (access_key_id,)).fetchone()
            if row is None:
                raise ServiceError(f"no connector credential {access_key_id}",
                                   "InvalidParameterException")
            if row["revoked"] is None:
                db.execute("UPDATE connector_credentials SET revoked = ? WHERE access_key_id = ?",
                           (self.clock(), access_key_id))
        return {"accessKeyId": access_key_id, "connectorId": row["connector_id"], "revoked": True}

    def lookup(self, access_key_id: str) -> tuple[str, str] | None:
        """``(secret, connector_id)`` of a valid (not revoked) connector credential."""
        if not ACCESS_KEY_ID.fullmatch(access_key_id):
            return None
        rows = self.state.query("SELECT secret_access_key, connector_id FROM connector_credentials "
                                "WHERE access_key_id = ? AND revoked IS NULL", (access_key_id,))
        return (rows[0]["secret_access_key"], rows[0]["connector_id"]) if rows else None

    # --- the wire entry point ---------------------------------------------------------

    def call(self, operation: str, params: dict, principal: str | None) -> dict:
        """One connector operation for the connector ``principal`` (its credential's id;
        None: the operator, who may not call these)."""
        spec = OPERATIONS.get(operation)
        if spec is None:
            raise ServiceError(f"operation {operation[:80]!r} is not served",
                               "UnknownOperationException")
        if principal is None:
            raise not_permitted(f"{operation} is a connector operation: call it with the "
                                "connector's own credential (smsblock connector credential "
                                "create), not the operator's")
        if operation == "RegisterConnector" and params.get("connectorId") is None:
            params = {**params, "connectorId": principal}   # the credential's own id
        unknown = sorted(set(params) - set(spec))
        if unknown:
            raise ServiceError(f"{operation}: unknown parameters {unknown}"[:300],
                               "InvalidParameterException")
        for name, kind in spec.items():
            if name not in params or params[name] is None:
                if name in _OPTIONAL:
                    continue
                raise ServiceError(f"{operation}: {name} is required",
                                   "MissingRequiredParameterException")
            _check(operation, name, kind, params[name])
        if params["connectorId"] != principal:
            raise not_permitted(f"{operation}: this credential belongs to connector {principal}, "
                                f"not {params['connectorId']}")
        method, convert = _METHODS[operation]
        try:
            return convert(getattr(self, method)(**{_PY.get(k, k): v for k, v in params.items()}))
        except ValueError as e:     # e.g. an unknown vmManagerType
            raise ServiceError(f"{operation}: {str(e)[:200]}", "InvalidParameterException") from None

    # --- registration, heartbeat, catalog -----------------------------------------------

    def register_connector(self, connector_id: str, source_kind: str, vm_manager_name: str,
                           vm_manager_type: str, vm_manager_id: str, ip_address: str | None = None,
                           mac_address: str | None = None, version: str | None = None) -> dict:
        """Associate the connector of a credential (a remote one: its source is listed by
        itself and uploaded); again for an associated one updates it."""
        VmManagerType(vm_manager_type)      # ValueError → InvalidParameterException
        now = self.clock()
        with self.state.transaction() as db:
            cred = db.execute("SELECT store FROM connector_credentials WHERE connector_id = ? "
                              "AND revoked IS NULL", (connector_id,)).fetchone()
            if cred is None:
                raise not_permitted(f"connector {connector_id} has no valid credential")
            row = db.execute("SELECT disassociated_on FROM connectors WHERE connector_id = ?",
                             (connector_id,)).fetchone()
            config = json.dumps({"kind": source_kind, "managerName": vm_manager_name,
                                 "managerType": vm_manager_type, "managerId": vm_manager_id,
                                 "uploadedOn": None, "vms": [], "problems": []})
            caps = json.dumps([ConnectorCapability.VSPHERE.value,
                               ConnectorCapability.SMS_OPTIMIZED.value])
            if row is None:
                db.execute(
                    "INSERT INTO connectors (connector_id, version, capabilities, vm_manager_name, "
                    "vm_manager_type, vm_manager_id, ip_address, mac_address, associated_on, "
                    "last_heartbeat, source_kind, source_config, store) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (connector_id, version or __version__, caps, vm_manager_name, vm_manager_type,
                     vm_manager_id, ip_address, mac_address, now, now, UPLOADED_KIND, config,
                     cred["store"]))
            elif row["disassociated_on"] is not None:
                raise not_permitted(f"connector {connector_id} was disassociated; create a new "
                                    "credential to register a new connector")
            else:
                old = db.execute("SELECT vm_manager_id FROM connectors WHERE connector_id = ?",
                                 (connector_id,)).fetchone()
                if old["vm_manager_id"] != vm_manager_id:
                    # the vm manager decides which runs the connector may claim: it is
                    # fixed at the first registration
                    raise not_permitted(f"connector {connector_id} is registered with vm "
                                        f"manager {old['vm_manager_id']}, not {vm_manager_id[:80]}; "
                                        "create a new credential for another one")
                db.execute("UPDATE connectors SET version = ?, vm_manager_name = ?, "
                           "vm_manager_type = ?, vm_manager_id = ?, ip_address = ?, "
                           "mac_address = ?, last_heartbeat = ? WHERE connector_id = ?",
                           (version or __version__, vm_manager_name, vm_manager_type,
                            vm_manager_id, ip_address, mac_address, now, connector_id))
            full = db.execute("SELECT * FROM connectors WHERE connector_id = ?",
                              (connector_id,)).fetchone()
        return {"connector": connector_from_row(full, now, self.lease_seconds).to_api(),
                "store": full["store"], "heartbeatTimeoutSeconds": self.lease_seconds}

    def describe(self, connector_id: str) -> dict:
        rows = self.state.query("SELECT connector_id, store, disassociated_on, source_kind FROM "
                                "connectors WHERE connector_id = ?", (connector_id,))
        if not rows:
            return {"connectorId": connector_id, "associated": False}
        r = rows[0]
        return {"connectorId": connector_id, "associated": r["disassociated_on"] is None,
                "store": r["store"], "heartbeatTimeoutSeconds": self.lease_seconds}

    def heartbeat(self, connector_id: str, runs: dict[str, int] | None = None) -> dict:
        """The connector is alive; renew the leases of the runs it holds (``{runId:
        fence}``).  Answers the runs it no longer holds (``lost``: reassigned or ended)
        and whether it is still associated."""
        now = self.clock()
        lost = []
        with self.state.transaction() as db:
            cur = db.execute("UPDATE connectors SET last_heartbeat = ? WHERE connector_id = ? "
                             "AND disassociated_on IS NULL", (now, connector_id))
            associated = cur.rowcount == 1
            for run_id, fence in (runs or {}).items():
                cur = db.execute("UPDATE runs SET lease_until = ? WHERE run_id = ? AND fence = ? "
                                 "AND claimed_by = ? AND state = ?",
                                 (now + self.lease_seconds, run_id, fence, connector_id, _ACTIVE))
                if cur.rowcount != 1:
                    lost.append(run_id)
        return {"associated": associated, "lost": lost}

    def tick(self, connector_id: str | None = None) -> list[str]:
        """Let the scheduler create the runs due now (idempotent: any connector may)."""
        from . import scheduler
        return scheduler.tick(self.state, self.clock(), self.config)

    def upload_catalog(self, connector_id: str, vms: list[dict],
                       problems: list[dict] | None = None) -> dict:
        """The VMs the connector's source lists, for the next ImportServerCatalog."""
        if len(vms) > MAX_CATALOG_VMS:
            raise ServiceError(f"a catalog upload holds at most {MAX_CATALOG_VMS} VMs, got "
                               f"{len(vms)}", "InvalidParameterException")
        checked = [_vm_record(v).to_dict() for v in vms]
        with self.state.transaction() as db:
            row = db.execute("SELECT source_kind, source_config, vm_manager_id FROM connectors "
                             "WHERE connector_id = ? AND disassociated_on IS NULL",
                             (connector_id,)).fetchone()
            if row is None or row["source_kind"] != UPLOADED_KIND:
                raise not_permitted(f"connector {connector_id} is not an associated remote "
                                    "connector; register it first")
            foreign = [v["vmId"] for v in checked if v["vmManagerId"] != row["vm_manager_id"]]
            if foreign:
                raise ServiceError(f"the catalog upload lists VMs of another vm manager than "
                                   f"the connector's ({foreign[0][:80]})", "InvalidParameterException")
            config = json.loads(row["source_config"])
            kept = []
            for p in (problems or [])[:MAX_PROBLEMS]:
                if not isinstance(p, dict) or len(p) > 8:
                    raise ServiceError("UploadCatalog: problems must be objects like "
                                       "{location, reason}", "InvalidParameterException")
                kept.append({str(k)[:64]: str(v)[:1000] for k, v in p.items()})
            config.update(uploadedOn=self.clock(), vms=checked, problems=kept)
            db.execute("UPDATE connectors SET source_config = ? WHERE connector_id = ?",
                       (json.dumps(config), connector_id))
        return {"vms": len(checked)}

    # --- runs ---------------------------------------------------------------------------

    def due_runs(self, connector_id: str) -> list[str]:
        """Runs this connector may claim now, oldest first: PENDING and due, or ACTIVE
        with an expired lease, of servers of the vm manager(s) it serves."""
        now = self.clock()
        rows = self.state.query(
            "SELECT r.run_id FROM runs r JOIN jobs j ON j.job_id = r.job_id "
            "JOIN servers s ON s.server_id = j.server_id "
            "WHERE s.vm_manager_id IN (SELECT vm_manager_id FROM connectors WHERE "
            "connector_id = ? AND disassociated_on IS NULL) "
            "AND ((r.state = ? AND r.scheduled_start <= ?) OR "
            "(r.state = ? AND r.lease_until IS NOT NULL AND r.lease_until < ?)) "
            "ORDER BY r.scheduled_start, r.created, r.run_id",
            (connector_id, _PENDING, now, _ACTIVE, now))
        return [r["run_id"] for r in rows]

    def claim(self, connector_id: str | None, run_id: str, *,
              with_source: bool = False) -> dict | None:
        """Claim ``run_id`` for ``connector_id`` (None: the connector of its server, for a
        run executed in the control plane's own process); None when someone else has it
        or it is not claimable (ended, deleted, not due).  The answer is what executing it
        takes: the run, job and server records, the store, the fence, the job's last
        completed run's record."""
        now = self.clock()
        with self.state.transaction() as db:
            row = db.execute("SELECT s.connector_id, s.vm_manager_id FROM runs r "
                             "JOIN jobs j ON j.job_id = r.job_id "
                             "JOIN servers s ON s.server_id = j.server_id WHERE r.run_id = ?",
                             (run_id,)).fetchone()
            if row is None:
                return None
            due = ""
            params: tuple = ()
            if connector_id is None:
                connector_id = row["connector_id"]
            else:
                serves = db.execute("SELECT 1 FROM connectors WHERE connector_id = ? AND "
                                    "vm_manager_id = ? AND disassociated_on IS NULL",
                                    (connector_id, row["vm_manager_id"])).fetchone()
                if serves is None:
                    raise not_permitted(f"run {run_id} is of a server of vm manager "
                                        f"{row['vm_manager_id']}, which connector "
                                        f"{connector_id} does not serve")
                due, params = " AND scheduled_start <= ?", (now,)
            # the claim itself: one conditional UPDATE; its row count says who won
            cur = db.execute(
                "UPDATE runs SET state = ?, claimed_by = ?, lease_until = ?, fence = fence + 1, "
                "started = COALESCE(started, ?), stage = ?, stage_progress = ?, "
                "status_message = ? WHERE run_id = ? AND ((state = ?" + due + ") OR "
                "(state = ? AND lease_until IS NOT NULL AND lease_until < ?))",
                (_ACTIVE, connector_id, now + self.lease_seconds, now, "preparing", "0%",
                 "taking a snapshot of the VM's disks", run_id, _PENDING, *params, _ACTIVE, now))
            if cur.rowcount != 1:
                return None
            run = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if run["fence"] > 1:     # an earlier holder stopped heartbeating: say so
                db.execute("UPDATE runs SET status_message = ? WHERE run_id = ?",
                           (f"resumed by connector {connector_id} (claim {run['fence']}): the "
                            "connector that held the run stopped heartbeating", run_id))
            job = db.execute("SELECT * FROM jobs WHERE job_id = ?", (run["job_id"],)).fetchone()
            server = db.execute("SELECT * FROM servers WHERE server_id = ?",
                                (job["server_id"],)).fetchone()
            owner = db.execute("SELECT connector_id, store, source_kind, source_config FROM "
                               "connectors WHERE connector_id = ?",
                               (server["connector_id"],)).fetchone()
            if job["state"] == ReplicationJobState.PENDING.value:
                db.execute("UPDATE jobs SET state = ? WHERE job_id = ?",
                           (ReplicationJobState.ACTIVE.value, job["job_id"]))
            if server["first_run_time"] is None:   # the replication window starts now
                db.execute("UPDATE servers SET first_run_time = ? WHERE server_id = ?",
                           (now, server["server_id"]))
            prev = db.execute("SELECT summary FROM runs WHERE job_id = ? AND state = ? "
                              "ORDER BY completed DESC LIMIT 1",
                              (job["job_id"], ReplicationRunState.COMPLETED.value)).fetchone()
        run = _row(run)
        claim = {"run": {k: run[k] for k in _RUN_FIELDS}, "job": {k: job[k] for k in _JOB_FIELDS},
                 "server": {k: server[k] for k in _SERVER_FIELDS},
                 "store": owner["store"], "fence": run["fence"], "claimedBy": connector_id,
                 "resumed": run["fence"] > 1,
                 "previous": json.loads(prev["summary"]) if prev and prev["summary"] else None}
        if with_source:
            claim["sourceKind"] = owner["source_kind"]
            claim["sourceConfig"] = json.loads(owner["source_config"])
        return claim

    def _held(self, db, connector_id: str, run_id: str, fence: int, *,
              ended_as: str | None = None):
        """The run's row, if ``connector_id`` still holds it with ``fence``; else the
        claim is stale and nothing it says is recorded.  With ``ended_as``: None when
        this very claim already ended the run so (a completion or failure sent again
        because its answer was lost)."""
        row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise ServiceError(f"run {run_id} does not exist", "InvalidParameterException")
        if ended_as is not None and (row["state"], row["fence"], row["claimed_by"]) == \
                (ended_as, fence, connector_id):
            return None
        if row["fence"] != fence or row["claimed_by"] != connector_id or row["state"] != _ACTIVE:
            raise stale(f"run {run_id}: claim {fence} of connector {connector_id} is stale "
                        f"(the run is {row['state']}, claim {row['fence']} of connector "
                        f"{row['claimed_by']}): it was reassigned after its lease ran out; "
                        "this connector's result is discarded")
        return row

    def report(self, connector_id: str, run_id: str, fence: int, *, stage: str | None = None,
               stage_progress: str | None = None, status_message: str | None = None,
               store_run_id: str | None = None, summary: dict | None = None,
               moved_to: dict | None = None) -> dict:
        """Progress of a held run (and a lease renewal); answers ``cancel`` with the
        reason when the run should stop (its job is being deleted)."""
        cols: dict[str, Any] = {"stage": stage, "stage_progress": stage_progress,
                                "status_message": status_message, "store_run_id": store_run_id,
                                "summary": json.dumps(summary) if summary is not None else None}
        cols = {k: v for k, v in cols.items() if v is not None}
        now = self.clock()
        with self.state.transaction() as db:
            row = self._held(db, connector_id, run_id, fence)
            cols["lease_until"] = now + self.lease_seconds
            sets = ", ".join(f"{k} = ?" for k in cols)
            db.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", (*cols.values(), run_id))
            if moved_to:
                self._adopt_move(db, row["job_id"], moved_to)
            gone = job_deleted(db, row["job_id"])
        return {"cancel": DELETED_CANCEL if gone else None}

    def _adopt_move(self, db, job_id: str, moved_to: dict) -> None:
        """The source found the VM at a new place (vMotion, re-registration): the catalog
        follows it, so the next import and run look for it there."""
        vm = _vm_record(moved_to).to_dict()
        server_id = db.execute("SELECT server_id FROM jobs WHERE job_id = ?",
                               (job_id,)).fetchone()["server_id"]
        taken = db.execute("SELECT server_id FROM servers WHERE vm_manager_id = ? AND "
                           "vm_id = ? AND server_id != ?",
                           (vm["vmManagerId"], vm["vmId"], server_id)).fetchone()
        if taken is not None:    # a re-import already catalogued it under another id
            log.warning("%s: VM moved to %s, which the catalog knows as %s; not adopted",
                        server_id, vm["vmId"], taken["server_id"])
            return
        db.execute("UPDATE servers SET vm_id = ?, vm_manager_id = ?, vm_name = ?, "
                   "vm_path = ?, vm_record = ? WHERE server_id = ?",
                   (vm["vmId"], vm["vmManagerId"], vm["vmName"], vm["vmPath"],
                    json.dumps(moved_to), server_id))
        log.info("%s: the catalog follows the VM to %s (%s)", server_id, vm["vmId"], vm["vmPath"])

    def fail(self, connector_id: str, run_id: str, fence: int, reason: str,
             cancelled_by_deletion: bool = False) -> dict:
        """The run ends FAILED with ``reason``, or DELETED when its job was deleted."""
        reason = bounded_message(reason, MAX_FAILURE_REASON)
        now = self.clock()
        with self.state.transaction() as db:
            row = self._held(db, connector_id, run_id, fence,
                             ended_as=ReplicationRunState.FAILED.value)
            if row is None:
                return {"state": ReplicationRunState.FAILED.value}
            if job_deleted(db, row["job_id"]):
                end_deleted(db, run_id, now, "" if cancelled_by_deletion
                            else f" (the run had stopped: {reason})")
                return {"state": ReplicationRunState.DELETED.value}
            db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ?, "
                       "lease_until = NULL WHERE run_id = ?",
                       (ReplicationRunState.FAILED.value, f"FAILED: {reason}", now, run_id))
            record_run_failure(db, row["job_id"], run_id, reason, self.config)
        return {"state": ReplicationRunState.FAILED.value}

    def complete(self, connector_id: str, run_id: str, fence: int, summary: dict,
                 message: str, ami_id: str | None = None) -> dict:
        """Record the run COMPLETED with its image (the image's registration with the
        control plane), moving the job on; answers the job's older images to deregister
        (numberOfRecentAmisToKeep).  When the job was deleted meanwhile the run stays
        ACTIVE and the answer is ``orphan``: the connector deregisters that image, then
        calls :meth:`end_deleted`."""
        disks = summary.get("disks")
        if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks) or \
                not all(isinstance(d.get("run_id"), (str, type(None))) for d in disks):
            raise ServiceError("CompleteRun: summary.disks must be a list of the disks' "
                               "engine summaries", "InvalidParameterException")
        now = self.clock()
        doomed: list[str] = []
        with self.state.transaction() as db:
            row = self._held(db, connector_id, run_id, fence,
                             ended_as=ReplicationRunState.COMPLETED.value)
            if row is None:
                return {"state": ReplicationRunState.COMPLETED.value, "deregister": []}
            job_id = row["job_id"]
            if job_deleted(db, job_id):
                if ami_id is None:
                    end_deleted(db, run_id, now)
                    return {"state": ReplicationRunState.DELETED.value, "deregister": []}
                return {"state": _ACTIVE, "orphan": ami_id, "deregister": []}
            db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ?, ami_id = ?, "
                       "stage = NULL, stage_progress = NULL, store_run_id = ?, summary = ?, "
                       "lease_until = NULL WHERE run_id = ?",
                       (ReplicationRunState.COMPLETED.value, message, now, ami_id,
                        (summary.get("disks") or [{}])[0].get("run_id"), json.dumps(summary),
                        run_id))
            job = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            sets: dict[str, Any] = {"status_message": f"run {run_id} completed"
                                    + (f": image {ami_id}" if ami_id else "")}
            if ami_id:
                sets["latest_ami_id"] = ami_id
                db.execute("INSERT INTO images (ami_id, job_id, run_id, created) VALUES (?,?,?,?)",
                           (ami_id, job_id, run_id, now))
                keep = job["amis_to_keep"]
                if keep > 0:
                    live = db.execute("SELECT ami_id FROM images WHERE job_id = ? AND "
                                      "deregistered IS NULL ORDER BY created DESC, ami_id DESC",
                                      (job_id,)).fetchall()
                    # this run's image first whatever the clock says (same created time)
                    order = [ami_id] + [r["ami_id"] for r in live if r["ami_id"] != ami_id]
                    doomed = order[keep:]
            if ReplicationJobState(job["state"]) in LIVE_JOB_STATES:
                # a completed run ends FAILING / PAUSED_ON_FAILURE; run-once jobs are done
                if job["run_once"]:
                    sets["state"] = ReplicationJobState.COMPLETED.value
                    sets["next_run_time"] = None
                else:
                    sets["state"] = ReplicationJobState.ACTIVE.value
            cols = ", ".join(f"{k} = ?" for k in sets)
            db.execute(f"UPDATE jobs SET {cols} WHERE job_id = ?", (*sets.values(), job_id))
        return {"state": ReplicationRunState.COMPLETED.value, "deregister": doomed}

    def end_deleted(self, connector_id: str, run_id: str, fence: int, detail: str = "") -> dict:
        with self.state.transaction() as db:
            self._held(db, connector_id, run_id, fence)
            end_deleted(db, run_id, self.clock(), detail[:500])
        return {"state": ReplicationRunState.DELETED.value}

    def images_deregistered(self, connector_id: str, ami_ids: list[str]) -> dict:
        """Images the connector deregistered (older than the job keeps)."""
        with self.state.transaction() as db:
            for ami in ami_ids:
                db.execute("UPDATE images SET deregistered = ? WHERE ami_id = ? AND job_id IN "
                           "(SELECT j.job_id FROM jobs j JOIN servers s ON s.server_id = j.server_id "
                           "WHERE s.vm_manager_id IN (SELECT vm_manager_id FROM connectors WHERE "
                           "connector_id = ?))", (self.clock(), ami, connector_id))
        return {}

    # --- deleted jobs ---------------------------------------------------------------------

    def deleting_jobs(self, connector_id: str) -> list[dict]:
        """DELETING jobs of servers this connector catalogued, with no ACTIVE run: their
        blocks are to be removed from the store."""
        rows = self.state.query(
            "SELECT j.job_id, j.server_id, c.store FROM jobs j "
            "JOIN servers s ON s.server_id = j.server_id "
            "JOIN connectors c ON c.connector_id = s.connector_id "
            "WHERE s.connector_id = ? AND j.state = ? AND NOT EXISTS "
            "(SELECT 1 FROM runs r WHERE r.job_id = j.job_id AND r.state = ?)",
            (connector_id, ReplicationJobState.DELETING.value, _ACTIVE))
        return [{"jobId": r["job_id"], "serverId": r["server_id"], "store": r["store"]}
                for r in rows]

    def finish_job_deletion(self, connector_id: str, job_id: str) -> dict:
        with self.state.transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, status_message = ? WHERE job_id = ? AND state = ? "
                "AND server_id IN (SELECT server_id FROM servers WHERE connector_id = ?)",
                (ReplicationJobState.DELETED.value,
                 "deleted; its replicated blocks were removed, its images kept",
                 job_id, ReplicationJobState.DELETING.value, connector_id))
        return {"deleted": cur.rowcount == 1}


_RUN_FIELDS = ("run_id", "job_id", "type", "state", "description", "scheduled_start",
               "store_run_id", "summary", "fence", "claimed_by")
_JOB_FIELDS = ("job_id", "server_id", "license_type", "description", "boot_test",
               "amis_to_keep", "run_once", "state")
_SERVER_FIELDS = ("server_id", "connector_id", "vm_manager_id", "vm_id", "vm_name", "vm_path",
                  "vm_record")


def _vm_record(value) -> VmRecord:
    """A VmRecord from its JSON form, each field checked (bounded text)."""
    bad = ServiceError(f"a VM record must be an object with vmId, vmName, vmPath, "
                       f"vmManagerName, vmManagerId, vmManagerType: {str(value)[:120]}",
                       "InvalidParameterException")
    if not isinstance(value, dict):
        raise bad
    names = ("vmId", "vmName", "vmPath", "vmManagerName", "vmManagerId", "vmManagerType")
    if not all(isinstance(value.get(n), str) and 0 < len(value[n]) <= 1024 for n in names):
        raise bad
    identity = value.get("identity") or {}
    warnings = value.get("warnings") or []
    if not (isinstance(identity, dict) and len(identity) <= 16 and all(
            isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= 512
            for k, v in identity.items())):
        raise bad
    if not (isinstance(warnings, list) and len(warnings) <= 16
            and all(isinstance(w, str) for w in warnings)):
        raise bad
    try:
        VmManagerType(value["vmManagerType"])
    except ValueError:
        raise bad from None
    return VmRecord(**{n: value[n] for n in names}, identity=dict(identity),
                    warnings=[w[:1000] for w in warnings])


class UploadedCatalog:
    """The ``uploaded`` source kind: what a remote connector listed and uploaded, for
    ImportServerCatalog in the control plane (which does not reach the vCenter)."""

    kind = UPLOADED_KIND

    def __init__(self, config: dict):
        self.manager_type = config.get("managerType") or "VSPHERE"
        self.manager_name = config.get("managerName") or ""
        self.manager_id = config.get("managerId") or ""
        self._vms = [_vm_record(v) for v in config.get("vms") or []]
        self.list_problems = list(config.get("problems") or [])
        if config.get("uploadedOn") is None:
            # not an error of the whole import: the other connectors' VMs still count
            self.list_problems.append({"location": self.manager_name, "reason":
                                       "this remote connector has not uploaded its VM list "
                                       "yet (it does when `smsblock connector run` starts)"})

    def list_vms(self) -> list[VmRecord]:
        return list(self._vms)

    def open_run(self, *a, **k):
        raise ServiceError("the VMs of a remote connector are read by the connector itself",
                           "InternalError")

    def close(self) -> None:
        pass


# --- the wire form of the operations ------------------------------------------------------

def _check(op: str, name: str, kind: str, value) -> None:
    bad = ServiceError(f"{op}: {name} must be {kind}", "InvalidParameterException")
    if kind == "connector":
        if not isinstance(value, str) or not CONNECTOR_ID.fullmatch(value):
            raise bad
    elif kind == "run":
        if not isinstance(value, str) or not RUN_ID.fullmatch(value):
            raise bad
    elif kind == "job":
        if not isinstance(value, str) or not JOB_ID.fullmatch(value):
            raise bad
    elif kind == "fence":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 62:
            raise bad
    elif kind == "text":
        if not isinstance(value, str) or len(value) > 4096:
            raise bad
    elif kind == "object":
        if not isinstance(value, dict) or len(json.dumps(value)) > MAX_SUMMARY:
            raise bad
    elif kind == "list":
        if not isinstance(value, list):
            raise bad
    elif kind == "fences":
        if not (isinstance(value, dict) and len(value) <= 1000 and all(
                isinstance(k, str) and RUN_ID.fullmatch(k) and isinstance(v, int)
                and not isinstance(v, bool) for k, v in value.items())):
            raise bad
    elif kind == "amis":
        if not (isinstance(value, list) and len(value) <= 1000 and all(
                isinstance(a, str) and AMI_ID.fullmatch(a) for a in value)):
            raise bad
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "ami":
        if not isinstance(value, str) or not AMI_ID.fullmatch(value):
            raise bad


#: the connector operations and their members (all need connectorId)
OPERATIONS: dict[str, dict[str, str]] = {
    "RegisterConnector": {"connectorId": "connector", "sourceKind": "text",
                          "vmManagerName": "text", "vmManagerType": "text",
                          "vmManagerId": "text", "ipAddress": "text", "macAddress": "text",
                          "version": "text"},
    "DescribeConnector": {"connectorId": "connector"},
    "Heartbeat": {"connectorId": "connector", "runs": "fences"},
    "Tick": {"connectorId": "connector"},
    "UploadCatalog": {"connectorId": "connector", "vms": "list", "problems": "list"},
    "GetDueRuns": {"connectorId": "connector"},
    "ClaimRun": {"connectorId": "connector", "runId": "run"},
    "ReportRun": {"connectorId": "connector", "runId": "run", "fence": "fence",
                  "stage": "text", "stageProgress": "text", "statusMessage": "text",
                  "storeRunId": "text", "summary": "object", "movedTo": "object"},
    "CompleteRun": {"connectorId": "connector", "runId": "run", "fence": "fence",
                    "summary": "object", "message": "text", "amiId": "ami"},
    "FailRun": {"connectorId": "connector", "runId": "run", "fence": "fence", "reason": "text",
                "cancelledByDeletion": "bool"},
    "EndRunDeleted": {"connectorId": "connector", "runId": "run", "fence": "fence",
                      "detail": "text"},
    "ImagesDeregistered": {"connectorId": "connector", "amiIds": "amis"},
    "GetDeletingJobs": {"connectorId": "connector"},
    "FinishJobDeletion": {"connectorId": "connector", "jobId": "job"},
}
_OPTIONAL = {"ipAddress", "macAddress", "version", "runs", "problems", "stage", "stageProgress",
             "statusMessage", "storeRunId", "summary", "movedTo", "amiId", "detail",
             "cancelledByDeletion"}
_PY = {"connectorId": "connector_id", "sourceKind": "source_kind", "vmManagerName":
       "vm_manager_name", "vmManagerType": "vm_manager_type", "vmManagerId": "vm_manager_id",
       "ipAddress": "ip_address", "macAddress": "mac_address", "runId": "run_id",
       "stageProgress": "stage_progress", "statusMessage": "status_message",
       "storeRunId": "store_run_id", "movedTo": "moved_to", "amiId": "ami_id",
       "amiIds": "ami_ids", "jobId": "job_id", "cancelledByDeletion": "cancelled_by_deletion"}
_same = lambda x: x                                             # noqa: E731
_METHODS: dict[str, tuple[str, Callable]] = {
    "RegisterConnector": ("register_connector", _same),
    "DescribeConnector": ("describe", _same),
    "Heartbeat": ("heartbeat", _same),
    "Tick": ("tick", lambda ids: {"scheduled": ids}),
    "UploadCatalog": ("upload_catalog", _same),
    "GetDueRuns": ("due_runs", lambda ids: {"runIds": ids}),
    "ClaimRun": ("claim", lambda c: {"claim": c} if c else {}),
    "ReportRun": ("report", _same),
    "CompleteRun": ("complete", _same),
    "FailRun": ("fail", _same),
    "EndRunDeleted": ("end_deleted", _same),
    "ImagesDeregistered": ("images_deregistered", _same),
    "GetDeletingJobs": ("deleting_jobs", lambda jobs: {"jobs": jobs}),
    "FinishJobDeletion": ("finish_job_deletion", _same),
}
