"""Findings of the attack review of the catalog and the schedule (in process, a fake
clock, a real state directory and datastore): DeleteServerCatalog cancels only the
import it overtook; a run-once job whose one slot was MISSED can be given a new one."""

from __future__ import annotations

import pytest

from smsblock.errors import ServiceError
from smsblock.service import FakeClock, SmsService, catalog
from test_service_sources import make_datastore


@pytest.fixture
def svc(tmp_path):
    clock = FakeClock(1_900_000_000)
    s = SmsService(tmp_path / "state", clock=clock)
    s.register_connector("datastore", {"path": str(make_datastore(tmp_path / "ds", 2))})
    yield s
    s.close()


# --- finding 9 -------------------------------------------------------------------------------

def test_delete_cancels_only_the_import_it_overtook(svc, monkeypatch):
    overtaken = catalog.begin_import(svc.state, svc.clock(), svc.config)
    svc._imports.append(overtaken)
    real_delete = catalog.delete_catalog
    later = []

    def delete_then_another_connection_imports(*args, **kwargs):
        out = real_delete(*args, **kwargs)
        # the gap between the delete's commit and its cancelling: another request starts
        # an import (as import_server_catalog does with a wait)
        job = catalog.begin_import(svc.state, svc.clock(), svc.config)
        svc._imports.append(job)
        later.append(job)
        return out

    monkeypatch.setattr(catalog, "delete_catalog", delete_then_another_connection_imports)
    svc.delete_server_catalog()
    monkeypatch.undo()
    assert overtaken.cancel.cancelled
    assert not later[0].cancel.cancelled, "the import started after the delete was cancelled"
    for job in (overtaken, later[0]):
        catalog.run_import(svc.state, job, svc.clock)
    assert later[0].error is None and later[0].servers == 2
    assert svc.get_servers()["serverCatalogStatus"] == "AVAILABLE"


def test_delete_with_no_import_under_way_cancels_nothing(svc):
    svc.import_server_catalog()
    assert catalog.delete_catalog(svc.state, svc.clock(), svc.config) is None


# --- finding 10 ------------------------------------------------------------------------------

def _set_run(svc, run_id, state):
    with svc.state.transaction() as db:
        db.execute("UPDATE runs SET state = ? WHERE run_id = ?", (state, run_id))


def _runs(svc, job_id):
    return svc.get_replication_runs(replicationJobId=job_id)["replicationRunList"]


def test_a_run_once_job_whose_slot_was_missed_can_be_rescheduled(svc):
    svc.import_server_catalog()
    server = svc.get_servers()["serverList"][0]["serverId"]
    clock = svc.clock
    job = svc.create_replication_job(serverId=server, seedReplicationTime=clock.now + 3600,
                                     runOnce=True)["replicationJobId"]
    busy = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    _set_run(svc, busy, "ACTIVE")
    clock.advance(7200)
    svc.tick()
    missed = [r for r in _runs(svc, job) if r["type"] == "AUTOMATIC"]
    assert [r["state"] for r in missed] == ["MISSED"]
    assert "nextReplicationRunStartTime" in missed[0]["statusMessage"]
    _set_run(svc, busy, "FAILED")
    svc.update_replication_job(replicationJobId=job, nextReplicationRunStartTime=clock.now + 600)
    clock.advance(700)
    svc.tick()
    auto = [r["state"] for r in _runs(svc, job) if r["type"] == "AUTOMATIC"]
    assert sorted(auto) == ["MISSED", "PENDING"]


def test_a_run_once_job_that_ran_cannot_be_rescheduled(svc):
    svc.import_server_catalog()
    server = svc.get_servers()["serverList"][0]["serverId"]
    clock = svc.clock
    job = svc.create_replication_job(serverId=server, seedReplicationTime=clock.now + 60,
                                     runOnce=True)["replicationJobId"]
    clock.advance(120)
    svc.tick()
    (run,) = _runs(svc, job)
    _set_run(svc, run["replicationRunId"], "FAILED")
    with pytest.raises(ServiceError, match="runs once and has already run") as e:
        svc.update_replication_job(replicationJobId=job,
                                   nextReplicationRunStartTime=clock.now + 600)
    assert e.value.code == "OperationNotPermittedException"
