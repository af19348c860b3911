"""Replication job rules (the SMS user guide's), applied inside one state transaction.

Every function here takes the open transaction ``db``, the time ``now`` (epoch seconds,
from the injected clock) and the :class:`~.state.ServiceConfig`; it either makes its
whole change or raises :class:`~smsblock.errors.ServiceError` with the SMS error name
and changes nothing (the caller's transaction rolls back).
"""

from __future__ import annotations

import json
import sqlite3

from ..errors import ServiceError
from .models import (BUSY_RUN_STATES, LIVE_JOB_STATES, JOB_ID, ROLE_NAME, SERVER_ID,
                     LicenseType, ReplicationJobState, ReplicationRunState, ReplicationRunType,
                     echo, guest_os_family, new_job_id, new_run_id)
from .state import ServiceConfig

HOUR = 3600.0
DAY = 86400.0

MAX_DESCRIPTION = 255

# the state values of live jobs and of busy runs, as SQL parameters (``IN {sql_in(LIVE)}``)
LIVE = tuple(s.value for s in LIVE_JOB_STATES)
BUSY = tuple(s.value for s in BUSY_RUN_STATES)


def invalid(message: str) -> ServiceError:
    return ServiceError(message, "InvalidParameterException")


def not_permitted(message: str) -> ServiceError:
    return ServiceError(message, "OperationNotPermittedException")


def sql_in(values: tuple[str, ...]) -> str:
    """``(?,?,...)``: the placeholders of an SQL ``IN`` list of ``values``."""
    return "(" + ",".join("?" * len(values)) + ")"


# --- parameter checks -------------------------------------------------------------

TIME_SLACK = 1e-3          # seconds: far more than a microsecond's rounding


def check_start_time(when: float, now: float, config: ServiceConfig, name: str) -> float:
    """A seed/next run time: now (a little in the past counts as now) up to N days ahead."""
    if when < now - config.seed_grace_seconds:
        raise invalid(f"{name} is in the past; give a time from now up to "
                      f"{config.max_seed_days_ahead} days ahead")
    latest = now + config.max_seed_days_ahead * DAY
    # a time on the wire has whole microseconds: the limit itself, given as a float epoch,
    # may come back a fraction of one over it (and is then the limit)
    if when > latest + TIME_SLACK:
        raise invalid(f"{name} is more than {config.max_seed_days_ahead} days ahead")
    return min(max(when, now), latest)


def check_frequency(frequency, config: ServiceConfig) -> int:
    if isinstance(frequency, bool) or not isinstance(frequency, int):
        raise invalid(f"frequency must be a whole number of hours, got {echo(frequency)}")
    lo, hi = config.min_frequency_hours, config.max_frequency_hours
    if not lo <= frequency <= hi:
        raise invalid(f"frequency must be between {lo} and {hi} hours, got {frequency}")
    return frequency


def server_guest_os(server: sqlite3.Row) -> str | None:
    """The guest OS id the source reported for a catalogued server (.vmx ``guestOS``,
    vCenter's ``guestId``), or None."""
    try:
        record = json.loads(server["vm_record"] or "{}")
    except ValueError:
        return None
    guest = ((record.get("identity") or {}) if isinstance(record, dict) else {}).get("guestOS")
    return guest if isinstance(guest, str) else None


def check_license(value, server: sqlite3.Row | None = None) -> str:
    """AWS or BYOL; with no value, the license SMS's "Auto" picks: AWS for a Windows
    guest, BYOL for any other.  A Linux guest can only be BYOL (the SMS guide: Linux
    images bring their own license)."""
    guest = server_guest_os(server) if server is not None else None
    family = guest_os_family(guest)
    if value is None:
        return (LicenseType.AWS if family == "windows" else LicenseType.BYOL).value
    try:
        value = LicenseType(value).value
    except ValueError:
        raise invalid(f"licenseType must be AWS or BYOL, got {echo(value)}") from None
    if value == LicenseType.AWS.value and family == "linux":
        raise invalid(f"licenseType AWS is not available for server {server['server_id']}: its "
                      f"guest OS ({guest}) is Linux, which is BYOL only; use BYOL")
    return value


def check_role(value) -> str:
    # fullmatch over ASCII: "\w" would take any Unicode letter and "$" a trailing newline
    if not isinstance(value, str) or not ROLE_NAME.fullmatch(value):
        raise invalid(f"roleName {echo(value)} is not a valid IAM role name "
                      "(1-64 ASCII letters, digits and +=,.@_-)")
    return value


def check_description(value) -> str:
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
        raise invalid(f"description must be text of at most {MAX_DESCRIPTION} characters")
    if "\x00" in value:        # PostgreSQL's text cannot hold it: refused on both backends
        raise invalid("description may not contain NUL characters")
    return value


def check_amis_to_keep(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
        raise invalid(f"numberOfRecentAmisToKeep must be a whole number from 0 to {2**31 - 1}, "
                      f"got {echo(value)}")
    return value


def check_boot_test(value) -> bool:
    """bootTest (smsblock's own job field, no SMS client sends it): boot-test each image."""
    if not isinstance(value, bool):
        raise invalid(f"bootTest must be true or false, got {echo(value)}")
    return value


def check_encryption(encrypted, kms_key_id) -> None:
    if encrypted:
        raise invalid("encrypted images are not supported by this service's image catalog; "
                      "leave encrypted false")
    if kms_key_id is not None:
        raise invalid("kmsKeyId needs encrypted images, which this service does not make")


# --- lookups -------------------------------------------------------------------------

def get_job(db: sqlite3.Connection, job_id, *, deleted: bool = False) -> sqlite3.Row:
    """The job ``job_id``; a DELETED one only for ``deleted=True`` (the Get* operations
    still show deleted jobs, nothing else acts on them)."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise invalid(f"replicationJobId {echo(job_id)} is not a replication job id "
                      "(sms-job-xxxxxxxx)")
    row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        raise ServiceError(f"replication job {job_id} does not exist",
                           "ReplicationJobNotFoundException")
    if row["state"] == ReplicationJobState.DELETED.value and not deleted:
        raise ServiceError(f"replication job {job_id} was deleted",
                           "ReplicationJobNotFoundException")
    return row


def live_job_for_server(db: sqlite3.Connection, server_id: str) -> sqlite3.Row | None:
    return db.execute(
        "SELECT * FROM jobs WHERE server_id = ? AND state NOT IN ('DELETED') "
        "ORDER BY created DESC, rowid DESC LIMIT 1", (server_id,)).fetchone()


def busy_runs(db: sqlite3.Connection, job_id: str) -> list[sqlite3.Row]:
    return db.execute(f"SELECT * FROM runs WHERE job_id = ? AND state IN {sql_in(BUSY)} "
                      "ORDER BY created", (job_id, *BUSY)).fetchall()


def window_end(server: sqlite3.Row, config: ServiceConfig) -> float | None:
    """When the server's replication window closes (None before its first run)."""
    first = server["first_run_time"]
    return None if first is None else first + config.server_replication_days * DAY


def window_closed(server: sqlite3.Row, now: float, config: ServiceConfig) -> bool:
    end = window_end(server, config)
    return end is not None and now >= end


# --- operations ------------------------------------------------------------------------

def create_job(db: sqlite3.Connection, params: dict, now: float, config: ServiceConfig) -> str:
    """CreateReplicationJob: validate everything, then insert the job in state PENDING."""
    server_id = params.get("serverId")
    if server_id is None:
        raise ServiceError("serverId is required", "MissingRequiredParameterException")
    if "seedReplicationTime" not in params or params["seedReplicationTime"] is None:
        raise ServiceError("seedReplicationTime is required", "MissingRequiredParameterException")
    if not isinstance(server_id, str) or not SERVER_ID.fullmatch(server_id):
        raise invalid(f"serverId {echo(server_id)} is not a server id (s-xxxxxxxx)")
    server = db.execute("SELECT * FROM servers WHERE server_id = ?", (server_id,)).fetchone()
    if server is None or not server["in_catalog"]:
        raise invalid(f"server {server_id} is not in the server catalog")

    seed = check_start_time(params["seedReplicationTime"], now, config, "seedReplicationTime")
    run_once = params.get("runOnce", False)
    if not isinstance(run_once, bool):
        raise invalid(f"runOnce must be true or false, got {echo(run_once)}")
    frequency = params.get("frequency")
    if frequency is None:
        if not run_once:
            raise ServiceError("frequency is required unless runOnce is true",
                               "MissingRequiredParameterException")
    else:
        frequency = check_frequency(frequency, config)
    license_type = check_license(params.get("licenseType"), server)
    role = check_role(params["roleName"]) if params.get("roleName") is not None else None
    description = (check_description(params["description"])
                   if params.get("description") is not None else None)
    keep = check_amis_to_keep(params.get("numberOfRecentAmisToKeep", 0))
    check_encryption(params.get("encrypted", False), params.get("kmsKeyId"))

    existing = live_job_for_server(db, server_id)
    if existing is not None:
        what = ("is still being deleted" if existing["state"] == ReplicationJobState.DELETING.value
                else "already exists")
        raise ServiceError(f"replication job {existing['job_id']} for server {server_id} {what}",
                           "ReplicationJobAlreadyExistsException")
    connector = db.execute("SELECT * FROM connectors WHERE connector_id = ?",
                           (server["connector_id"],)).fetchone()
    if connector is None or connector["disassociated_on"] is not None:
        raise ServiceError(f"no connector is associated for server {server_id}; register one",
                           "NoConnectorsAvailableException")
    if window_closed(server, now, config):
        raise ServiceError(
            f"server {server_id} reached its {config.server_replication_days}-day replication "
            "limit (raise server_replication_days in config.toml to continue)",
            "ServerCannotBeReplicatedException")
    active = db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN {sql_in(LIVE)}", LIVE).fetchone()[0]
    if active >= config.max_active_jobs:
        raise not_permitted(f"the limit of {config.max_active_jobs} active replication jobs is "
                            "reached (max_active_jobs in config.toml)")

    job_id = new_job_id()
    db.execute(
        "INSERT INTO jobs (job_id, server_id, seed_time, frequency, run_once, next_run_time, "
        "license_type, role_name, state, status_message, description, amis_to_keep, "
        "encrypted, kms_key_id, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (job_id, server_id, seed, frequency, int(run_once), seed, license_type, role,
         ReplicationJobState.PENDING.value, "waiting for the seed replication time",
         description, keep, 0, None, now))
    if check_boot_test(params.get("bootTest", False)):
        db.execute("UPDATE jobs SET boot_test = 1 WHERE job_id = ?", (job_id,))
    return job_id


UPDATABLE = ("frequency", "nextReplicationRunStartTime", "licenseType", "roleName",
             "description", "numberOfRecentAmisToKeep", "encrypted", "kmsKeyId", "bootTest")


def update_job(db: sqlite3.Connection, params: dict, now: float, config: ServiceConfig) -> None:
    """UpdateReplicationJob: change the schedule or the image settings of a live job."""
    if params.get("replicationJobId") is None:
        raise ServiceError("replicationJobId is required", "MissingRequiredParameterException")
    job = get_job(db, params["replicationJobId"])
    if ReplicationJobState(job["state"]) not in LIVE_JOB_STATES:
        raise not_permitted(f"replication job {job['job_id']} is {job['state']} and cannot be updated")
    changes: dict[str, object] = {}
    if params.get("frequency") is not None:
        changes["frequency"] = check_frequency(params["frequency"], config)
    if params.get("nextReplicationRunStartTime") is not None:
        # a run-once job whose one slot was MISSED never ran: it may be given a new slot
        if job["run_once"] and job["next_run_time"] is None and db.execute(
                "SELECT 1 FROM runs WHERE job_id = ? AND type = ? AND state != ? LIMIT 1",
                (job["job_id"], ReplicationRunType.AUTOMATIC.value,
                 ReplicationRunState.MISSED.value)).fetchone() is not None:
            raise not_permitted(f"replication job {job['job_id']} runs once and has already run")
        changes["next_run_time"] = check_start_time(
            params["nextReplicationRunStartTime"], now, config, "nextReplicationRunStartTime")
    if params.get("licenseType") is not None:
        server = db.execute("SELECT * FROM servers WHERE server_id = ?",
                            (job["server_id"],)).fetchone()
        changes["license_type"] = check_license(params["licenseType"], server)
    if params.get("roleName") is not None:
        changes["role_name"] = check_role(params["roleName"])
    if params.get("description") is not None:
        changes["description"] = check_description(params["description"])
    if params.get("numberOfRecentAmisToKeep") is not None:
        changes["amis_to_keep"] = check_amis_to_keep(params["numberOfRecentAmisToKeep"])
    check_encryption(params.get("encrypted", False), params.get("kmsKeyId"))
    if params.get("bootTest") is not None:
        changes["boot_test"] = int(check_boot_test(params["bootTest"]))
    if changes:
        sets = ", ".join(f"{k} = ?" for k in changes)
        db.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?", (*changes.values(), job["job_id"]))


def delete_job(db: sqlite3.Connection, job_id, now: float) -> str:
    """DeleteReplicationJob: no further runs; the connector removes the store artifacts.

    Pending runs are dropped at once.  A job that never ran is DELETED at once; one that
    did goes DELETING until its connector has cancelled any active run and removed the
    server's blocks from the store (images are kept).  Returns the new state.
    """
    if job_id is None:
        raise ServiceError("replicationJobId is required", "MissingRequiredParameterException")
    job = get_job(db, job_id)
    if job["state"] == ReplicationJobState.DELETING.value:
        raise not_permitted(f"replication job {job_id} is already being deleted")
    db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ? "
               "WHERE job_id = ? AND state = ?",
               (ReplicationRunState.DELETED.value, "replication job deleted", now, job_id,
                ReplicationRunState.PENDING.value))
    ran = db.execute("SELECT COUNT(*) FROM runs WHERE job_id = ? AND started IS NOT NULL",
                     (job_id,)).fetchone()[0]
    state = ReplicationJobState.DELETING if ran else ReplicationJobState.DELETED
    db.execute("UPDATE jobs SET state = ?, status_message = ?, next_run_time = NULL "
               "WHERE job_id = ?",
               (state.value, "deleting: removing replicated blocks from the store" if ran
                else "deleted", job_id))
    return state.value


def start_on_demand(db: sqlite3.Connection, job_id, description, now: float,
                    config: ServiceConfig) -> str:
    """StartOnDemandReplicationRun: a run now, at most N per rolling 24 h, one at a time."""
    if job_id is None:
        raise ServiceError("replicationJobId is required", "MissingRequiredParameterException")
    job = get_job(db, job_id)
    if description is not None:
        check_description(description)
    server = db.execute("SELECT * FROM servers WHERE server_id = ?", (job["server_id"],)).fetchone()
    # (before the state: a job the closed window COMPLETED says why it takes no runs)
    if job["state"] != ReplicationJobState.DELETING.value and window_closed(server, now, config):
        raise ServiceError(f"server {job['server_id']} reached its "
                           f"{config.server_replication_days}-day replication limit",
                           "ServerCannotBeReplicatedException")
    if ReplicationJobState(job["state"]) not in LIVE_JOB_STATES:
        raise not_permitted(f"replication job {job_id} is {job['state']}; it takes no more runs")
    busy = busy_runs(db, job_id)
    if busy:
        raise not_permitted(f"run {busy[0]['run_id']} of replication job {job_id} is still "
                            f"{busy[0]['state']}; wait for it to finish")
    recent = db.execute(
        "SELECT COUNT(*) FROM runs WHERE job_id = ? AND type = ? AND created > ?",
        (job_id, ReplicationRunType.ON_DEMAND.value, now - DAY)).fetchone()[0]
    if recent >= config.on_demand_runs_per_day:
        raise ServiceError(
            f"replication job {job_id} already had {recent} on-demand runs in the last 24 hours "
            f"(limit {config.on_demand_runs_per_day})", "ReplicationRunLimitExceededException")
    return insert_run(db, job, ReplicationRunType.ON_DEMAND, ReplicationRunState.PENDING,
                      now, now, description=description)


def record_run_failure(db: sqlite3.Connection, job_id: str, run_id: str, reason: str,
                       config: ServiceConfig) -> str:
    """After a run of ``job_id`` failed: the job goes FAILING, or PAUSED_ON_FAILURE after
    ``max_consecutive_failures`` failed runs in a row (the scheduler then makes no more
    runs until an on-demand run completes).  Returns the job's new state."""
    job = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    message = f"run {run_id} failed: {reason}"[:1000]
    if job is None or ReplicationJobState(job["state"]) not in LIVE_JOB_STATES:
        db.execute("UPDATE jobs SET status_message = ? WHERE job_id = ? AND state != 'DELETED'",
                   (message, job_id))
        return job["state"] if job is not None else ReplicationJobState.DELETED.value
    recent = db.execute(
        "SELECT state FROM runs WHERE job_id = ? AND state IN ('COMPLETED', 'FAILED') "
        "ORDER BY completed DESC, rowid DESC LIMIT ?",
        (job_id, config.max_consecutive_failures)).fetchall()
    failures = len(recent) if all(r["state"] == "FAILED" for r in recent) else 0
    if failures >= config.max_consecutive_failures:
        state = ReplicationJobState.PAUSED_ON_FAILURE
        message += (f" ({failures} failed runs in a row: automatic runs are paused until an "
                    "on-demand run completes)")
    else:
        state = ReplicationJobState.FAILING
    db.execute("UPDATE jobs SET state = ?, status_message = ? WHERE job_id = ?",
               (state.value, message, job_id))
    return state.value


def insert_run(db: sqlite3.Connection, job: sqlite3.Row, run_type: ReplicationRunType,
               state: ReplicationRunState, scheduled: float, now: float, *,
               description: str | None = None, message: str | None = None) -> str:
    run_id = new_run_id()
    db.execute(
        "INSERT INTO runs (run_id, job_id, type, state, status_message, scheduled_start, "
        "created, completed, description, encrypted, kms_key_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (run_id, job["job_id"], run_type.value, state.value, message, scheduled, now,
         now if state == ReplicationRunState.MISSED else None, description,
         job["encrypted"], job["kms_key_id"]))
    return run_id
