"""The replication schedule: AUTOMATIC runs at the seed time and every ``frequency`` hours.

:func:`tick` is called by the connector loop (and by tests with an injected clock).  For
each live job whose ``nextReplicationRunStartTime`` has come it either creates a PENDING
AUTOMATIC run for that slot, or - when another run of the job (an on-demand one, or a
previous run still going) was in progress at the slot's time - records the slot as a
MISSED run.  What counts is the slot's time, not the tick's: a run requested after the
slot came did not occupy it.  So that such a request cannot overtake the slot,
StartOnDemandReplicationRun first settles a due slot (:func:`settle_due_slot`), in
the same transaction.  Then the next
slot is the first ``seed + k * frequency`` after ``now`` (a run-once job has none; if
its one slot was MISSED, UpdateReplicationJob may give it a new one).
Slots that passed while no connector ticked at all are not replayed one by one: one run
is made for the latest of them, as SMS does after a connector outage.

A job PAUSED_ON_FAILURE gets no runs; its next slot moves on so that it resumes on
the grid once an on-demand run completes.  It also closes the replication window: a job whose server's first run was more than
``server_replication_days`` ago is COMPLETED with a message saying so.
"""

from __future__ import annotations

import math
import sqlite3
import time
from datetime import datetime, timezone
from typing import Callable

from .jobs import HOUR, BUSY, LIVE, sql_in, insert_run, window_closed
from .models import ReplicationJobState, ReplicationRunState, ReplicationRunType
from .state import ServiceConfig, State

#: a clock returns "now" as epoch seconds; tests inject a fake one
Clock = Callable[[], float]


def system_clock() -> float:
    return time.time()


class FakeClock:
    """A clock that stands still until moved; for tests and simulations."""

    def __init__(self, start: float | datetime = 1_800_000_000.0):
        self.now = start.timestamp() if isinstance(start, datetime) else float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, tz=timezone.utc)


def next_slot(slot: float, frequency_hours: int, now: float) -> float:
    """The first ``slot + k * frequency`` (k >= 1) strictly after ``now``."""
    step = frequency_hours * HOUR
    k = max(1, math.floor((now - slot) / step) + 1)
    return slot + k * step


def tick(state: State, now: float, config: ServiceConfig) -> list[str]:
    """Create the runs that are due at ``now``; return the ids of the runs made (PENDING or MISSED)."""
    made: list[str] = []
    with state.transaction() as db:
        jobs = db.execute(
            f"SELECT * FROM jobs WHERE state IN {sql_in(LIVE)} AND next_run_time IS NOT NULL "
            "AND next_run_time <= ? ORDER BY next_run_time", (*LIVE, now)).fetchall()
        for job in jobs:
            made.extend(_tick_job(db, job, now, config))
    return made


def settle_due_slot(db: sqlite3.Connection, job_id: str, now: float,
                    config: ServiceConfig) -> list[str]:
    """Make the run of ``job_id``'s slot if it has come and no tick made it yet (inside the
    caller's transaction); the runs made, as :func:`tick` would make them."""
    job = db.execute(f"SELECT * FROM jobs WHERE job_id = ? AND state IN {sql_in(LIVE)} AND "
                     "next_run_time IS NOT NULL AND next_run_time <= ?",
                     (job_id, *LIVE, now)).fetchone()
    return [] if job is None else _tick_job(db, job, now, config)


def occupant_at(db: sqlite3.Connection, job_id: str, when: float) -> sqlite3.Row | None:
    """The run of the job that was in progress (PENDING or ACTIVE) at time ``when``: made
    at or before it, and not yet ended then.  MISSED runs never occupy a job."""
    return db.execute(
        f"SELECT * FROM runs WHERE job_id = ? AND state != ? AND created <= ? "
        f"AND (state IN {sql_in(BUSY)} OR completed > ?) ORDER BY created, rowid LIMIT 1",
        (job_id, ReplicationRunState.MISSED.value, when, *BUSY, when)).fetchone()


def _tick_job(db: sqlite3.Connection, job: sqlite3.Row, now: float, config: ServiceConfig) -> list[str]:
    server = db.execute("SELECT * FROM servers WHERE server_id = ?", (job["server_id"],)).fetchone()
    if window_closed(server, now, config):
        db.execute("UPDATE jobs SET state = ?, status_message = ?, next_run_time = NULL "
                   "WHERE job_id = ?",
                   (ReplicationJobState.COMPLETED.value,
                    f"replication stopped: the server's {config.server_replication_days}-day "
                    "replication limit was reached", job["job_id"]))
        return []
    slot = job["next_run_time"]
    if job["state"] == ReplicationJobState.PAUSED_ON_FAILURE.value:
        # paused: no runs, but the next slot keeps moving so a resume starts on the grid
        if job["frequency"] is not None and not job["run_once"]:
            db.execute("UPDATE jobs SET next_run_time = ? WHERE job_id = ?",
                       (next_slot(slot, job["frequency"], now), job["job_id"]))
        return []
    if job["frequency"] is not None and not job["run_once"]:
        # only the latest passed slot gets a run
        step = job["frequency"] * HOUR
        slot += math.floor((now - slot) / step) * step
    occupant = occupant_at(db, job["job_id"], slot)
    if occupant is not None:
        kind = "on-demand " if occupant["type"] == ReplicationRunType.ON_DEMAND.value else ""
        run_id = insert_run(db, job, ReplicationRunType.AUTOMATIC, ReplicationRunState.MISSED,
                            slot, now, message=f"skipped: {kind}run {occupant['run_id']} was "
                            "in progress at the scheduled time" + (
                                "; give the job a new nextReplicationRunStartTime to run it"
                                if job["run_once"] else ""))
    else:
        run_id = insert_run(db, job, ReplicationRunType.AUTOMATIC, ReplicationRunState.PENDING,
                            slot, now)
    if job["run_once"] or job["frequency"] is None:
        following = None
    else:
        following = next_slot(slot, job["frequency"], now)
    db.execute("UPDATE jobs SET next_run_time = ? WHERE job_id = ?", (following, job["job_id"]))
    return [run_id]
