"""Scheduling rules under hypothesis: random interleavings of time passing, scheduler
ticks, on-demand requests, runs starting and finishing, with an injected clock.

The rules checked after every step:
* a due tick makes one AUTOMATIC run at the latest passed slot of the grid
  ``next + k * frequency`` (MISSED exactly when another run of the job was in progress
  at the slot's time - made at or before it, not ended then - whatever happened between
  the slot and the tick), and the next slot is one step later; runs are in increasing
  order and never in the future;
* updates of frequency and next run time are accepted exactly within the rules and move
  the grid;
* a job never has two busy (PENDING/ACTIVE) runs;
* no 24-hour window holds more than 2 on-demand runs, and an on-demand request is
  refused exactly when the model says so (busy run, or the quota); a slot that came
  before the request is settled first, as a tick would (so the request is refused when
  the slot's run is PENDING), and a refused request changes nothing;
* after a tick, the next run time is in the future.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from smsblock.errors import ServiceError
from smsblock.service import FakeClock, SmsService
from smsblock.service.scheduler import next_slot
from test_service_sources import make_datastore

H = 3600.0
DAY = 86400.0


@pytest.fixture(scope="module")
def datastore(tmp_path_factory):
    return make_datastore(tmp_path_factory.mktemp("ds"), 1)


def test_next_slot_is_the_first_grid_point_after_now():
    assert next_slot(0, 12, 0) == 12 * H
    assert next_slot(0, 12, 12 * H - 1) == 12 * H
    assert next_slot(0, 12, 12 * H) == 24 * H
    assert next_slot(100, 24, 100 + 5 * DAY + 7) == 100 + 6 * DAY


class Scheduling(RuleBasedStateMachine):
    datastore: Path = None

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="smsblock-sched-"))
        self.clock = FakeClock(1_800_000_000.0)
        self.svc = SmsService(self.dir / "state", clock=self.clock)
        self.svc.register_connector("datastore", {"path": str(self.datastore)})
        self.svc.import_server_catalog()
        self.server = self.svc.get_servers()["serverList"][0]["serverId"]
        self.on_demand_created: list[float] = []
        self.slots: list[float] = []
        # the model's runs that occupy the job: [made at, ended at (None: still busy)]
        self.occupancy: list[list] = []

    def teardown(self):
        self.svc.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(seed_hours=st.floats(0, 72), frequency=st.integers(12, 24))
    def create_job(self, seed_hours, frequency):
        self.seed = self.clock() + seed_hours * H
        self.frequency = frequency
        self.job = self.svc.create_replication_job(
            serverId=self.server, seedReplicationTime=self.seed,
            frequency=frequency)["replicationJobId"]

    # --- helpers ---------------------------------------------------------------------

    def runs(self):
        return self.svc.state.query("SELECT * FROM runs WHERE job_id = ? ORDER BY created, rowid",
                                    (self.job,))

    def busy(self):
        return [r for r in self.runs() if r["state"] in ("PENDING", "ACTIVE")]

    def next_time(self):
        return self.svc.state.query("SELECT next_run_time FROM jobs WHERE job_id = ?",
                                    (self.job,))[0][0]

    def expected_slot(self):
        """What settling the schedule now must make: None (no slot has come), or the
        latest slot of the grid next + k * frequency that has come and its run's state."""
        nxt, now = self.next_time(), self.clock()
        if nxt > now:
            return None
        step = self.frequency * H
        slot = nxt + math.floor((now - nxt) / step) * step
        occupied = any(made <= slot and (ended is None or ended > slot)
                       for made, ended in self.occupancy)
        return slot, "MISSED" if occupied else "PENDING"

    def check_settled(self, expect, before: set[str]):
        new = [r for r in self.runs() if r["run_id"] not in before and r["type"] == "AUTOMATIC"]
        if expect is None:
            assert new == []
        else:
            slot, state = expect
            (run,) = new
            assert run["state"] == state, (dict(run), self.occupancy)
            assert run["scheduled_start"] == pytest.approx(slot)
            assert self.next_time() == pytest.approx(slot + self.frequency * H)
            self.slots.append(run["scheduled_start"])
            if state == "PENDING":
                self.occupancy.append([self.clock(), None])
        assert self.next_time() > self.clock()

    # --- rules -----------------------------------------------------------------------

    @rule(hours=st.floats(0, 40))
    def time_passes(self, hours):
        self.clock.advance(hours * H)

    @rule()
    def tick(self):
        expect = self.expected_slot()
        before = {r["run_id"] for r in self.runs()}
        self.svc.tick()
        self.check_settled(expect, before)

    @rule(frequency=st.none() | st.integers(6, 30), days_ahead=st.none() | st.floats(-1, 32))
    def update_schedule(self, frequency, days_ahead):
        now = self.clock()
        params = {"replicationJobId": self.job}
        if frequency is not None:
            params["frequency"] = frequency
        if days_ahead is not None:
            params["nextReplicationRunStartTime"] = now + days_ahead * DAY
        bad_freq = frequency is not None and not 12 <= frequency <= 24
        bad_time = days_ahead is not None and not (-900 <= days_ahead * DAY <= 30 * DAY)
        try:
            self.svc.update_replication_job(**params)
        except ServiceError as e:
            assert (bad_freq or bad_time) and e.code == "InvalidParameterException", str(e)
            return
        assert not (bad_freq or bad_time)
        if frequency is not None:
            self.frequency = frequency
        if days_ahead is not None:
            assert self.next_time() == pytest.approx(max(now, now + days_ahead * DAY))

    @rule(description=st.none() | st.text(max_size=20))
    def on_demand(self, description):
        now = self.clock()
        recent = [t for t in self.on_demand_created if t > now - DAY]
        slot = self.expected_slot()        # a slot that came first is settled first
        before = {r["run_id"]: tuple(r) for r in self.runs()}
        next_before = self.next_time()
        if description is not None and "\x00" in description:
            expect = "InvalidParameterException"        # on SQLite and PostgreSQL alike
        elif self.busy() or (slot is not None and slot[1] == "PENDING"):
            expect = "OperationNotPermittedException"
        elif len(recent) >= 2:
            expect = "ReplicationRunLimitExceededException"
        else:
            expect = None
        try:
            self.svc.start_on_demand_replication_run(replicationJobId=self.job,
                                                     description=description)
        except ServiceError as e:
            assert e.code == expect, str(e)
            # refused: nothing changed, not even the settled slot
            assert {r["run_id"]: tuple(r) for r in self.runs()} == before
            assert self.next_time() == next_before
            return
        assert expect is None
        self.check_settled(slot, set(before))
        self.on_demand_created.append(now)
        self.occupancy.append([now, None])

    @rule()
    def a_run_starts(self):
        with self.svc.state.transaction() as db:
            db.execute("UPDATE runs SET state = 'ACTIVE', started = ? WHERE job_id = ? AND "
                       "state = 'PENDING'", (self.clock(), self.job))

    @rule(ok=st.booleans())
    def runs_finish(self, ok):
        for entry in self.occupancy:
            if entry[1] is None:
                entry[1] = self.clock()
        with self.svc.state.transaction() as db:
            db.execute("UPDATE runs SET state = ?, completed = ? WHERE job_id = ? AND "
                       "state IN ('PENDING', 'ACTIVE')",
                       ("COMPLETED" if ok else "FAILED", self.clock(), self.job))

    # --- invariants ------------------------------------------------------------------

    @invariant()
    def at_most_one_busy_run(self):
        assert len(self.busy()) <= 1

    @invariant()
    def automatic_runs_in_order_and_never_ahead(self):
        slots = [r["scheduled_start"] for r in self.runs() if r["type"] == "AUTOMATIC"]
        assert slots == self.slots == sorted(slots)
        assert all(s <= self.clock() for s in slots)

    @invariant()
    def on_demand_quota(self):
        times = sorted(r["created"] for r in self.runs() if r["type"] == "ON_DEMAND")
        for a, c in zip(times, times[2:]):
            assert c - a >= DAY


def test_scheduling_rules(datastore):
    Scheduling.datastore = datastore
    run = Scheduling.TestCase()
    run.settings = settings(stateful_step_count=25, deadline=None)  # examples: the profile
    run.runTest()


def _service(datastore, tmp_path):
    """A service with the datastore's catalog imported: (service, clock, first serverId)."""
    clock = FakeClock(1_800_000_000.0)
    svc = SmsService(tmp_path / "s", clock=clock)
    svc.register_connector("datastore", {"path": str(datastore)})
    svc.import_server_catalog()
    return svc, clock, svc.get_servers()["serverList"][0]["serverId"]


def test_missed_run_when_on_demand_is_active_then_next_slot(datastore, tmp_path):
    svc, clock, server = _service(datastore, tmp_path)
    job = svc.create_replication_job(serverId=server, seedReplicationTime=clock() + H,
                                     frequency=12)["replicationJobId"]
    od = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    clock.advance(H)
    svc.tick()
    runs = svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
    assert [(r["type"], r["state"]) for r in runs] == [("AUTOMATIC", "MISSED"), ("ON_DEMAND", "PENDING")]
    assert od in runs[0]["statusMessage"] and "on-demand" in runs[0]["statusMessage"]
    j = svc.get_replication_jobs(replicationJobId=job)["replicationJobList"][0]
    assert j["nextReplicationRunStartTime"] == clock() + 12 * H
    with svc.state.transaction() as db:
        db.execute("UPDATE runs SET state = 'COMPLETED' WHERE run_id = ?", (od,))
    clock.advance(12 * H)
    svc.tick()
    runs = svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
    assert (runs[0]["type"], runs[0]["state"]) == ("AUTOMATIC", "PENDING")
    svc.close()


def test_run_once_job_gets_one_automatic_run(datastore, tmp_path):
    svc, clock, server = _service(datastore, tmp_path)
    job = svc.create_replication_job(serverId=server, seedReplicationTime=clock(),
                                     runOnce=True)["replicationJobId"]
    svc.tick()
    clock.advance(5 * DAY)
    svc.tick()
    runs = svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
    assert len(runs) == 1 and runs[0]["type"] == "AUTOMATIC"
    assert "nextReplicationRunStartTime" not in svc.get_replication_jobs(
        replicationJobId=job)["replicationJobList"][0]
    svc.close()


def _runs(svc, job):
    return [(r["type"], r["state"]) for r in
            svc.get_replication_runs(replicationJobId=job)["replicationRunList"]]


def test_a_request_after_the_slot_does_not_make_it_missed(datastore, tmp_path):
    """The slot came (no tick yet), then an on-demand request: the slot was free at its
    time, so it gets its PENDING run and the request is refused as busy - in one
    transaction, so a refused request leaves the slot for the next tick."""
    svc, clock, server = _service(datastore, tmp_path)
    job = svc.create_replication_job(serverId=server, seedReplicationTime=clock() + H,
                                     frequency=12)["replicationJobId"]
    clock.advance(2 * H)                       # the seed slot passed; no connector ticked
    with pytest.raises(ServiceError) as e:
        svc.start_on_demand_replication_run(replicationJobId=job)
    assert e.value.code == "OperationNotPermittedException" and "PENDING" in str(e.value)
    assert _runs(svc, job) == []               # refused: nothing changed
    svc.tick()                                 # the late tick makes the same run
    runs = svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
    assert _runs(svc, job) == [("AUTOMATIC", "PENDING")]
    assert runs[0]["scheduledStartTime"] == 1_800_000_000.0 + H
    svc.close()


def test_a_run_that_ended_before_the_slot_leaves_it_free(datastore, tmp_path):
    svc, clock, server = _service(datastore, tmp_path)
    job = svc.create_replication_job(serverId=server, seedReplicationTime=clock() + 2 * H,
                                     frequency=12)["replicationJobId"]
    od = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    clock.advance(H)
    with svc.state.transaction() as db:        # done an hour before the slot
        db.execute("UPDATE runs SET state = 'COMPLETED', completed = ? WHERE run_id = ?",
                   (clock(), od))
    clock.advance(5 * H)                       # the tick comes late
    svc.tick()
    assert _runs(svc, job) == [("AUTOMATIC", "PENDING"), ("ON_DEMAND", "COMPLETED")]
    svc.close()


def test_a_run_in_progress_at_the_slot_makes_it_missed_even_if_done_by_the_tick(
        datastore, tmp_path):
    svc, clock, server = _service(datastore, tmp_path)
    job = svc.create_replication_job(serverId=server, seedReplicationTime=clock() + H,
                                     frequency=12)["replicationJobId"]
    od = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    clock.advance(2 * H)                       # the slot passed while the run went on
    with svc.state.transaction() as db:
        db.execute("UPDATE runs SET state = 'COMPLETED', completed = ? WHERE run_id = ?",
                   (clock(), od))
    clock.advance(H)
    svc.tick()
    runs = svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
    assert _runs(svc, job) == [("AUTOMATIC", "MISSED"), ("ON_DEMAND", "COMPLETED")]
    assert od in runs[0]["statusMessage"] and "in progress at the scheduled time" in \
        runs[0]["statusMessage"]
    # nothing busy now: an on-demand request is taken
    svc.start_on_demand_replication_run(replicationJobId=job)
    svc.close()
