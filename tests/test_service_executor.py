"""Run execution: the engine into the connector's store, stages and progress, the image
step and image retention, failures, deletion during a run, connector death (kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import qemu_raw_bytes
from postgres_server import state_target
from smsblock.errors import ConnectorError, StoreError
from smsblock.progress import check_cancel
from smsblock.service import FakeClock, SmsService
from smsblock.service import executor as executor_mod
from smsblock.service.connector import ConnectorLoop
from smsblock.service.executor import RunExecutor
from test_service_sources import make_vm

H = 3600.0
T0 = 1_800_000_000.0


class FakeImageStep:
    def __init__(self):
        self.registered: list[tuple] = []
        self.deregistered: list[str] = []
        self.seen_stage = None
        self.state = None
        self.gone: set[str] = set()

    def register(self, store, server_id, run_id, *, name, description, license_type,
                 progress=None, cancel=None):
        progress(1, 2)
        if self.state is not None:
            self.seen_stage = tuple(self.state.query(
                "SELECT stage, stage_progress FROM runs WHERE state = 'ACTIVE'")[0])
        ami = f"ami-{len(self.registered):017x}"
        self.registered.append((server_id, run_id, license_type, description, ami))
        return ami

    def deregister(self, ami_id):
        self.deregistered.append(ami_id)
        if ami_id in self.gone:
            from smsblock.errors import ImageNotFoundError
            raise ImageNotFoundError(f"no image {ami_id}")


def setup(tmp_path, *, disks=(("scsi0:0", 1 << 20),), data=None, image=None, clock=None):
    ds = tmp_path / "ds"
    vmx = make_vm(ds, "DC1/web", "web", disks=disks, data=data, image=image)
    svc = SmsService(tmp_path / "state", clock=clock or FakeClock(T0))
    svc.register_connector("datastore", {"path": str(ds)})
    svc.import_server_catalog()
    server = svc.get_servers()["serverList"][0]["serverId"]
    return svc, server, vmx


def job_for(svc, server, **kw):
    params = dict(serverId=server, seedReplicationTime=svc.clock() + 10 * 86400, frequency=12)
    params.update(kw)
    return svc.create_replication_job(**params)["replicationJobId"]


def run_now(svc, job, executor):
    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    with ConnectorLoop(svc, executor=executor) as loop:
        loop.run_once()
    return next(r for r in svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
                if r["replicationRunId"] == run)


def test_runs_replicate_every_disk_into_the_store_by_server_id(tmp_path):
    data = os.urandom(200_000)
    svc, server, vmx = setup(tmp_path, disks=(("scsi0:0", 1 << 20), ("scsi0:1", 2 << 20)),
                             data=data)
    job = job_for(svc, server)
    ex = RunExecutor(svc.state, svc.clock, use_default_image_step=False)
    run = run_now(svc, job, ex)
    assert run["state"] == "COMPLETED", run
    assert "amiId" not in run and "no image step" in run["statusMessage"]
    assert run["completedTime"] == T0
    from smsblock.engine import restore
    from smsblock.store import open_store
    store = open_store(svc.state.dir / "store")
    assert len(store.list_run_ids(server)) == 1
    assert len(store.list_run_ids(f"{server}-disk1")) == 1
    out = tmp_path / "boot.raw"
    restore(store, server, out)
    assert out.read_bytes() == qemu_raw_bytes(vmx.parent / "web.vmdk", tmp_path)
    summary = json.loads(svc.state.query("SELECT summary FROM runs WHERE run_id = ?",
                                         (run["replicationRunId"],))[0][0])
    assert [d["storeServerId"] for d in summary["disks"]] == [server, f"{server}-disk1"]
    assert summary["source"]["disks"][0]["changeMethod"] == "hash"
    # a second run finds nothing changed
    svc.clock.advance(25 * H)
    run2 = run_now(svc, job, ex)
    assert run2["state"] == "COMPLETED" and "0 blocks changed" in run2["statusMessage"]
    assert len(store.list_run_ids(server)) == 2


def test_stages_progress_and_image_retention(tmp_path, monkeypatch):
    monkeypatch.setattr(executor_mod, "PROGRESS_INTERVAL", 0.0)
    svc, server, _ = setup(tmp_path)
    job = job_for(svc, server, numberOfRecentAmisToKeep=2, licenseType="BYOL")
    seen = []
    from smsblock.engine import replicate as real_replicate

    def replicate(disk, store, server_id, *, progress, cancel, source):
        progress(disk.size // 2, disk.size)
        seen.append(tuple(svc.state.query(
            "SELECT stage, stage_progress, status_message FROM runs WHERE state = 'ACTIVE'")[0]))
        return real_replicate(disk, store, server_id, progress=progress, cancel=cancel,
                              source=source)

    images = FakeImageStep()
    images.state = svc.state
    ex = RunExecutor(svc.state, svc.clock, replicate=replicate, image_step=images)
    amis = []
    for i in range(4):
        if i == 3:   # the oldest kept image was deleted by hand meanwhile
            images.gone.add(amis[1])
        run = run_now(svc, job, ex)
        assert run["state"] == "COMPLETED", run
        amis.append(run["amiId"])
        svc.clock.advance(25 * H)
    assert seen[0][:2] == ("uploading", "50%") and "1 disk" in seen[0][2]
    assert images.seen_stage == ("converting", "50%")
    assert [r[2] for r in images.registered] == ["BYOL"] * 4
    # keep 2: older images are deregistered (one already gone counts), the job points at
    # the newest
    assert images.deregistered == [amis[0], amis[1]]
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert j["latestAmiId"] == amis[3] and j["state"] == "ACTIVE"
    rows = svc.state.query("SELECT ami_id, deregistered FROM images ORDER BY created")
    assert [(r[0], r[1] is not None) for r in rows] == [(amis[0], True), (amis[1], True),
                                                         (amis[2], False), (amis[3], False)]


def test_the_real_image_step_registers_a_bootable_disk_and_refuses_a_blank_one(tmp_path):
    from test_service_sources import bootable_image
    svc, server, _ = setup(tmp_path, image=bootable_image(tmp_path / "img"))
    job = job_for(svc, server, runOnce=True, frequency=None)   # Linux: BYOL by default
    ex = RunExecutor(svc.state, svc.clock)
    run = run_now(svc, job, ex)
    assert run["state"] == "COMPLETED" and run["amiId"].startswith("ami-"), run
    record = json.loads((svc.state.dir / "images" / run["amiId"] / "image.json").read_text())
    assert record["source"]["server_id"] == server and record["license_type"] == "BYOL"
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert j["state"] == "COMPLETED"   # run once: done after its run

    svc2, server2, _ = setup(tmp_path / "blank")
    job2 = job_for(svc2, server2)
    run = run_now(svc2, job2, RunExecutor(svc2.state, svc2.clock))
    assert run["state"] == "FAILED" and "validation" in run["statusMessage"], run
    (j,) = svc2.get_replication_jobs()["replicationJobList"]
    assert run["replicationRunId"] in j["statusMessage"] and j["state"] == "FAILING"


def test_engine_failure_fails_the_run_with_the_reason(tmp_path):
    svc, server, _ = setup(tmp_path)
    job = job_for(svc, server)

    def replicate(*a, **kw):
        raise StoreError("store /x: no space left on device")

    run = run_now(svc, job, RunExecutor(svc.state, svc.clock, replicate=replicate,
                                        image_step=FakeImageStep()))
    assert run["state"] == "FAILED"
    assert run["statusMessage"] == "FAILED: store /x: no space left on device"
    assert run["stageDetails"]["stage"] == "uploading"
    # the job takes further runs
    svc.start_on_demand_replication_run(replicationJobId=job)


def test_consecutive_failures_pause_the_job_until_an_on_demand_run_completes(tmp_path):
    svc, server, _ = setup(tmp_path)
    job = svc.create_replication_job(serverId=server, seedReplicationTime=svc.clock(),
                                     frequency=12)["replicationJobId"]
    failing = {"on": True}
    from smsblock.engine import replicate as real_replicate

    def replicate(*a, **kw):
        if failing["on"]:
            raise StoreError("store unreachable")
        return real_replicate(*a, **kw)

    ex = RunExecutor(svc.state, svc.clock, replicate=replicate, use_default_image_step=False)
    states = []
    with ConnectorLoop(svc, executor=ex) as loop:
        for _ in range(3):                      # seed slot, then two more slots: 3 failures
            loop.run_once()
            states.append(svc.get_replication_jobs()["replicationJobList"][0]["state"])
            svc.clock.advance(12 * H)
        assert states == ["FAILING", "FAILING", "PAUSED_ON_FAILURE"]
        j = svc.get_replication_jobs()["replicationJobList"][0]
        assert "3 failed runs in a row" in j["statusMessage"]
        loop.run_once()                         # paused: the slot makes no run ...
        runs = svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
        assert len(runs) == 3
        nxt = svc.get_replication_jobs()["replicationJobList"][0]["nextReplicationRunStartTime"]
        assert nxt > svc.clock()                # ... but the schedule moves on
        failing["on"] = False
        svc.start_on_demand_replication_run(replicationJobId=job)
        loop.run_once()
    j = svc.get_replication_jobs()["replicationJobList"][0]
    assert j["state"] == "ACTIVE" and "completed" in j["statusMessage"]


def test_a_vanished_vm_fails_the_run(tmp_path):
    svc, server, vmx = setup(tmp_path)
    job = job_for(svc, server)
    (vmx.parent / "web.vmdk").unlink()
    run = run_now(svc, job, RunExecutor(svc.state, svc.clock, image_step=FakeImageStep()))
    assert run["state"] == "FAILED" and "does not exist" in run["statusMessage"]


def test_deleting_the_job_cancels_its_active_run_then_removes_its_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(executor_mod, "PROGRESS_INTERVAL", 0.0)
    svc, server, _ = setup(tmp_path, data=b"x" * 100_000)
    job = job_for(svc, server)
    ex0 = RunExecutor(svc.state, svc.clock, use_default_image_step=False)
    assert run_now(svc, job, ex0)["state"] == "COMPLETED"   # blocks in the store
    svc.clock.advance(25 * H)

    def replicate(disk, store, server_id, *, progress, cancel, source):
        svc.delete_replication_job(replicationJobId=job)    # arrives mid-run
        for _ in range(100):
            progress(1, 2)
            check_cancel(cancel)
            time.sleep(0.01)
        raise AssertionError("the run was not cancelled")

    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    with ConnectorLoop(svc, executor=RunExecutor(svc.state, svc.clock, replicate=replicate,
                                                 use_default_image_step=False)) as loop:
        done = loop.run_once()
    assert done["deleted_runs"] == [run] and done["failed"] == []
    assert done["deleted_jobs"] == [job]
    row = svc.state.query("SELECT state, status_message FROM runs WHERE run_id = ?", (run,))[0]
    assert row[0] == "DELETED" and "deleted" in row[1]    # DELETED, not FAILED
    from smsblock.store import open_store
    assert open_store(svc.state.dir / "store").list_run_ids(server) == []
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert j["state"] == "DELETED"
    assert [r["state"] for r in j["replicationRunList"]] == ["DELETED", "COMPLETED"]


class _DeletingImageStep:
    """The real local image step; the job's deletion arrives right after the image is
    registered, before the run is recorded (the last moment of the race)."""

    def __init__(self, inner, delete):
        self.inner, self.delete = inner, delete
        self.made: list[str] = []

    def register(self, *args, **kwargs):
        ami = self.inner.register(*args, **kwargs)
        self.made.append(ami)
        assert (self.inner.catalog.root / ami).is_dir()    # registered for real
        self.delete()
        return ami

    def deregister(self, ami_id):
        self.inner.deregister(ami_id)

    def find(self, server_id, run_id):
        return self.inner.find(server_id, run_id)


def test_a_job_deleted_while_its_run_converts_gets_no_image(tmp_path):
    """The race for real: the image step (the real one) has written and registered the
    image when the deletion arrives.  The run ends DELETED, the image is deregistered,
    and nothing records it: no amiId, no latestAmiId, no images row, no catalog entry."""
    from test_service_sources import bootable_image
    svc, server, _ = setup(tmp_path, image=bootable_image(tmp_path / "img"))
    job = job_for(svc, server)
    step = _DeletingImageStep(executor_mod.default_image_step(svc.state.dir),
                              lambda: svc.delete_replication_job(replicationJobId=job))
    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    with ConnectorLoop(svc, executor=RunExecutor(svc.state, svc.clock, image_step=step)) as loop:
        done = loop.run_once()
    assert len(step.made) == 1                       # the image was made ...
    assert done["deleted_runs"] == [run] and done["completed"] == []
    assert done["deleted_jobs"] == [job]
    r = svc.get_replication_runs(replicationJobId=job)["replicationRunList"][0]
    assert r["state"] == "DELETED" and "amiId" not in r, r
    assert step.made[0] in r["statusMessage"] and "deregistered" in r["statusMessage"]
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert j["state"] == "DELETED" and "latestAmiId" not in j
    assert svc.state.query("SELECT * FROM images") == []
    assert step.inner.catalog.list() == []           # ... and is gone again
    assert not any(p.name.startswith("ami-") for p in (svc.state.dir / "images").iterdir())


def test_a_run_left_active_of_a_deleted_job_ends_deleted(tmp_path):
    svc, server, _ = setup(tmp_path)
    job = job_for(svc, server)
    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    RunExecutor(svc.state, svc.clock)._claim(run)   # ACTIVE, then the process "dies"
    svc.delete_replication_job(replicationJobId=job)
    with ConnectorLoop(svc) as loop:
        done = loop.run_once()
    assert done["recovered"] == [run] and done["deleted_jobs"] == [job]
    r = svc.get_replication_runs(replicationJobId=job)["replicationRunList"][0]
    assert r["state"] == "DELETED" and "connector had stopped" in r["statusMessage"]
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert j["state"] == "DELETED"


def test_a_run_left_active_fails_when_the_connector_comes_back(tmp_path):
    svc, server, _ = setup(tmp_path)
    job = job_for(svc, server)
    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    RunExecutor(svc.state, svc.clock)._claim(run)   # ACTIVE, then the process "dies"
    with ConnectorLoop(svc) as loop:
        done = loop.run_once()
    assert done["recovered"] == [run]
    r = svc.get_replication_runs(replicationJobId=job)["replicationRunList"][0]
    assert r["state"] == "FAILED" and "connector stopped" in r["statusMessage"]


def test_one_process_per_connector(tmp_path):
    svc, _, _ = setup(tmp_path)
    with ConnectorLoop(svc):
        with pytest.raises(ConnectorError, match="already running"):
            with ConnectorLoop(svc):
                pass
    with ConnectorLoop(svc):   # released
        pass


def test_connector_heartbeat_keeps_it_healthy(tmp_path):
    svc, _, _ = setup(tmp_path)
    svc.clock.advance(3600)
    assert svc.get_connectors()["connectorList"][0]["status"] == "UNHEALTHY"
    with ConnectorLoop(svc) as loop:
        loop.run_once()
    assert svc.get_connectors()["connectorList"][0]["status"] == "HEALTHY"


SLOW_CONNECTOR = textwrap.dedent("""
    import sys, time
    from smsblock.service import SmsService
    from smsblock.service.connector import ConnectorLoop
    from smsblock.service.executor import RunExecutor

    def slow_replicate(disk, store, server_id, *, progress, cancel, source):
        while True:           # a run that takes long: killed in here
            progress(1, 2)
            time.sleep(0.05)

    svc = SmsService(sys.argv[1])
    with ConnectorLoop(svc, executor=RunExecutor(svc.state, svc.clock, replicate=slow_replicate,
                                                 use_default_image_step=False)) as loop:
        loop.run_once()
""")


def test_kill9_of_the_connector_mid_run(tmp_path):
    svc, server, _ = setup(tmp_path, clock=time.time)
    job = job_for(svc, server)
    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    script = tmp_path / "slow_connector.py"
    script.write_text(SLOW_CONNECTOR)
    target, env = state_target(svc.state)
    proc = subprocess.Popen([sys.executable, str(script), target],
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent),
                                     **env))
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = svc.state.query("SELECT state, stage FROM runs WHERE run_id = ?", (run,))[0]
            if state[0] == "ACTIVE" and state[1] == "uploading":
                break
            assert proc.poll() is None, "the connector exited early"
            time.sleep(0.05)
        else:
            raise AssertionError("the run never became ACTIVE")
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert svc.state.check() == "ok"
    assert svc.state.query("SELECT state FROM runs WHERE run_id = ?", (run,))[0][0] == "ACTIVE"
    # the connector comes back (the real command)
    target, env = state_target(svc.state)
    out = subprocess.run([sys.executable, "-m", "smsblock", "connector", "run", "--state",
                          target, "--once"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["recovered"] == [run]
    r = svc.get_replication_runs(replicationJobId=job)["replicationRunList"][0]
    assert r["state"] == "FAILED" and "connector stopped" in r["statusMessage"]
    # and the job goes on
    svc.start_on_demand_replication_run(replicationJobId=job)


KILLED_AFTER_REGISTERING = textwrap.dedent("""
    import os, signal, sys
    from smsblock.service import SmsService, executor
    from smsblock.service.connector import ConnectorLoop

    real = executor.LocalImageStep.register

    def register_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)       # the image is in the catalog now ...
        os.kill(os.getpid(), signal.SIGKILL)   # ... and the run never hears of it
    executor.LocalImageStep.register = register_then_die
    svc = SmsService(sys.argv[1])
    with ConnectorLoop(svc) as loop:
        loop.run_once()
""")


def test_kill9_after_the_image_is_registered_completes_the_run_on_restart(tmp_path):
    """A real kill -9 of the connector between the image step's registration and the
    run's record: the restarted connector finds the image and completes the run with
    it, so no image is left that nothing points to."""
    from test_service_sources import bootable_image
    svc, server, _ = setup(tmp_path, image=bootable_image(tmp_path / "img"), clock=time.time)
    job = job_for(svc, server)
    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    script = tmp_path / "killed_connector.py"
    script.write_text(KILLED_AFTER_REGISTERING)
    target, env = state_target(svc.state)
    proc = subprocess.run([sys.executable, str(script), target], timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent),
                                   **env))
    assert proc.returncode == -signal.SIGKILL
    [image] = [d.name for d in (svc.state.dir / "images").iterdir() if d.name.startswith("ami-")]
    assert svc.state.query("SELECT state FROM runs WHERE run_id = ?", (run,))[0][0] == "ACTIVE"
    target, env = state_target(svc.state)
    out = subprocess.run([sys.executable, "-m", "smsblock", "connector", "run", "--state",
                          target, "--once"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["recovered"] == [run]
    r = svc.get_replication_runs(replicationJobId=job)["replicationRunList"][0]
    assert (r["state"], r.get("amiId")) == ("COMPLETED", image), r
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert j["latestAmiId"] == image and j["state"] == "ACTIVE"


def test_kill9_after_the_image_is_registered_of_a_deleted_job_leaves_no_image(tmp_path):
    """kill -9 between registering the image and recording the run, then the job is
    deleted before the connector comes back: the restarted connector finds the image,
    deregisters it and ends the run DELETED."""
    from test_service_sources import bootable_image
    svc, server, _ = setup(tmp_path, image=bootable_image(tmp_path / "img"), clock=time.time)
    job = job_for(svc, server)
    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    script = tmp_path / "killed_connector.py"
    script.write_text(KILLED_AFTER_REGISTERING)
    target, env = state_target(svc.state)
    proc = subprocess.run([sys.executable, str(script), target], timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent),
                                   **env))
    assert proc.returncode == -signal.SIGKILL
    [image] = [d.name for d in (svc.state.dir / "images").iterdir() if d.name.startswith("ami-")]
    svc.delete_replication_job(replicationJobId=job)
    target, env = state_target(svc.state)
    out = subprocess.run([sys.executable, "-m", "smsblock", "connector", "run", "--state",
                          target, "--once"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr
    did = json.loads(out.stdout)
    assert did["recovered"] == [run] and did["deleted_jobs"] == [job]
    r = svc.get_replication_runs(replicationJobId=job)["replicationRunList"][0]
    assert r["state"] == "DELETED" and "amiId" not in r and image in r["statusMessage"], r
    assert not any(p.name.startswith("ami-") for p in (svc.state.dir / "images").iterdir())
    assert svc.state.query("SELECT * FROM images") == []
    (j,) = svc.get_replication_jobs()["replicationJobList"]
    assert j["state"] == "DELETED" and "latestAmiId" not in j


def test_a_disassociated_connector_stops(tmp_path):
    svc, _, _ = setup(tmp_path)
    cid = svc.get_connectors()["connectorList"][0]["connectorId"]
    with ConnectorLoop(svc) as loop:
        loop.run_once()
        svc.disassociate_connector(connectorId=cid)
        with pytest.raises(ConnectorError, match="disassociated"):
            loop.run_forever(0.01)
        assert loop.stop.cancelled


def test_relative_state_dir_gives_absolute_store_paths(tmp_path, monkeypatch):
    make_vm(tmp_path / "ds", "DC1/a", "a")
    monkeypatch.chdir(tmp_path)
    with SmsService("rel-state") as svc:
        assert svc.state.dir == tmp_path / "rel-state"
        svc.register_connector("datastore", {"path": "ds"})
        (row,) = svc.state.query("SELECT store, source_config FROM connectors")
        assert row[0] == str(tmp_path / "rel-state" / "store")
        assert json.loads(row[1]) == {"path": str(tmp_path / "ds"), "pinned": True}


class _CbtSource:
    """A datastore folder with changed block tracking played by the test: each run reports
    ``changed`` as the areas changed since the last change id.  Records what the executor
    handed it."""

    changed: list = []
    calls: list = []
    moved_to: dict | None = None

    def __init__(self, config):
        from smsblock.service.sources import DatastoreSource
        self.inner = DatastoreSource.from_config(config)
        self.manager_type, self.manager_name = self.inner.manager_type, self.inner.manager_name
        self.manager_id = self.inner.manager_id

    def list_vms(self):
        return self.inner.list_vms()

    def close(self):
        pass

    def open_run(self, vm, *, previous=None, previous_disks=None, cancel=None):
        calls, changed, moved_to = self.calls, self.changed, self.moved_to
        run = self.inner.open_run(vm, cancel=cancel)
        calls.append((previous, dict(previous_disks or {})))

        class Run:
            warnings, disks = [], []
            def __enter__(s):
                run.__enter__()
                s.disks, s.moved_to = run.disks, moved_to
                for d in s.disks:
                    if (previous_disks or {}).get(d.key) is not None:
                        d.changed_extents = changed     # the engine reads only these
                    d.change_method, d.change_id = "cbt", f"52 cc/{len(calls)}"
                return s

            def __exit__(s, *exc):
                run.__exit__(*exc)

            def record(s):
                return dict(run.record(), changeTracking="cbt")
        return Run()


def test_cbt_runs_read_changed_areas_and_take_the_rest_from_the_previous_run(tmp_path):
    """The executor hands the source the previous run's record and its disks from the
    store; a CBT source then reads only the changed areas.  The proof: a change outside
    the reported areas does not reach the store, one inside does."""
    from smsblock.engine import restore
    from smsblock.service.sources import register_source_kind
    from smsblock.store import open_store
    register_source_kind("test-cbt", _CbtSource)
    _CbtSource.calls, _CbtSource.changed, _CbtSource.moved_to = [], [(65536, 4096)], None
    data = os.urandom(300_000)
    ds = tmp_path / "ds"
    vmx = make_vm(ds, "DC1/web", "web", fmt="raw", data=data)
    svc = SmsService(tmp_path / "state", clock=FakeClock(T0))
    svc.register_connector("test-cbt", {"path": str(ds)})
    svc.import_server_catalog()
    server = svc.get_servers()["serverList"][0]["serverId"]
    job = job_for(svc, server)
    ex = RunExecutor(svc.state, svc.clock, use_default_image_step=False)
    first = run_now(svc, job, ex)
    assert first["state"] == "COMPLETED", first
    assert "changed block tracking" in first["statusMessage"]
    assert _CbtSource.calls[0] == (None, {})
    # change the disk inside and outside the area CBT will report
    img = vmx.parent / "web.img"
    with open(img, "r+b") as f:
        f.seek(65536)
        f.write(b"\xaa" * 4096)
        f.seek(600_000)     # another 512 KiB block than the reported change
        f.write(b"\xbb" * 4096)
    svc.clock.advance(25 * H)
    second = run_now(svc, job, ex)
    assert second["state"] == "COMPLETED", second
    previous, previous_disks = _CbtSource.calls[1]
    assert previous["disks"][0]["changeId"] == "52 cc/1"
    assert list(previous_disks) == ["scsi0:0"]
    expected = bytearray(data + bytes((1 << 20) - len(data)))
    expected[65536:69632] = b"\xaa" * 4096
    out = tmp_path / "boot.raw"
    restore(open_store(svc.state.dir / "store"), server, out)
    assert out.read_bytes() == bytes(expected)
    summary = json.loads(svc.state.query("SELECT summary FROM runs WHERE run_id = ?",
                                         (second["replicationRunId"],))[0][0])
    assert summary["changeMethod"] == "cbt" and summary["disks"][0]["changeMethod"] == "cbt"


def test_a_moved_vm_is_followed_in_the_catalog(tmp_path):
    from smsblock.service.sources import register_source_kind
    register_source_kind("test-cbt", _CbtSource)
    ds = tmp_path / "ds"
    make_vm(ds, "DC1/web", "web", fmt="raw", data=b"x" * 1000)
    svc = SmsService(tmp_path / "state", clock=FakeClock(T0))
    svc.register_connector("test-cbt", {"path": str(ds)})
    svc.import_server_catalog()
    server = svc.get_servers()["serverList"][0]
    old = server["vmServer"]
    new_place = dict(vmId="DC1/web/web.vmx", vmName="web", vmPath="/Datacenters/DC2/vm/web",
                     vmManagerName=old["vmManagerName"],
                     vmManagerId=old["vmServerAddress"]["vmManagerId"],
                     vmManagerType="VSPHERE", identity={}, warnings=[])
    _CbtSource.calls, _CbtSource.changed, _CbtSource.moved_to = [], [], new_place
    job = job_for(svc, server["serverId"])
    try:
        run = run_now(svc, job, RunExecutor(svc.state, svc.clock, use_default_image_step=False))
    finally:
        _CbtSource.moved_to = None
    assert run["state"] == "COMPLETED", run
    [now] = svc.get_servers()["serverList"]
    assert now["serverId"] == server["serverId"]
    assert now["vmServer"]["vmPath"] == "/Datacenters/DC2/vm/web"
    assert json.loads(svc.state.query("SELECT vm_record FROM servers")[0][0]) == new_place


def test_a_kill_between_registering_the_image_and_recording_the_run_is_recovered(
        tmp_path, monkeypatch):
    class FindingImageStep(FakeImageStep):
        def find(self, server_id, run_id):
            return [ami for s, r, *_, ami in self.registered
                    if (s, r) == (server_id, run_id) and ami not in self.deregistered]

    svc, server, _ = setup(tmp_path)
    job = job_for(svc, server)
    images = FindingImageStep()
    run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]

    def killed(*a, **k):     # the process dies right after the image step returned
        raise SystemExit("kill -9")
    monkeypatch.setattr(RunExecutor, "_complete", killed)
    with pytest.raises(SystemExit):
        with ConnectorLoop(svc, executor=RunExecutor(svc.state, svc.clock,
                                                     image_step=images)) as loop:
            loop.run_once()
    [(_, store_run, *_, ami)] = images.registered
    assert svc.state.query("SELECT state, store_run_id FROM runs")[0][:] == ("ACTIVE", store_run)
    monkeypatch.undo()
    with ConnectorLoop(svc, executor=RunExecutor(svc.state, svc.clock,
                                                 image_step=images)) as loop:
        assert loop.run_once()["recovered"] == [run]
    r = svc.get_replication_runs(replicationJobId=job)["replicationRunList"][0]
    assert (r["state"], r["amiId"]) == ("COMPLETED", ami), r
    assert svc.get_replication_jobs(replicationJobId=job)["replicationJobList"][0][
        "latestAmiId"] == ami
    assert images.deregistered == []


def test_the_local_image_step_finds_images_by_stored_run(tmp_path):
    from smsblock.image.catalog import Catalog
    step = executor_mod.LocalImageStep(Catalog(tmp_path / "images"), None)
    made = step.catalog.add(lambda p: p.write_bytes(b"vmdk"),
                            {"source": {"store": "x", "server_id": "s-1", "run_id": "r1"}})
    step.catalog.add(lambda p: p.write_bytes(b"vmdk"),
                     {"source": {"store": "x", "server_id": "s-1", "run_id": "r2"}})
    assert step.find("s-1", "r1") == [made["image_id"]]
    assert step.find("s-2", "r1") == []


def test_a_connector_store_gone_missing_fails_the_run_instead_of_making_a_new_one(tmp_path):
    """`connector register` created the store; a run never creates one (an unmounted mount
    point must not quietly fill up with a full copy)."""
    import shutil
    svc, server, _ = setup(tmp_path)
    job = job_for(svc, server)
    (connector,) = svc.state.query("SELECT store FROM connectors")
    store = connector[0]
    shutil.rmtree(store)
    run = run_now(svc, job, RunExecutor(svc.state, svc.clock, image_step=FakeImageStep()))
    assert run["state"] == "FAILED" and "no smsblock store" in run["statusMessage"], run
    assert not os.path.exists(store)
