"""The catalog import in the background: IMPORTING while it lists, the API answering
meanwhile, a second import refused, a delete winning over it, a killed importer recovered,
one bad VM left out with its reason, and EXPIRED after the connectors' absence.

The slow source is a real one: its VM list comes through a FIFO (``fifo_source``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import fifo_source
from postgres_server import state_target
from smsblock.errors import ServiceError
from smsblock.service import FakeClock, ServiceConfig, SmsService
from smsblock.service.server import make_server
from test_service_server import CREDS, REGION, signed
from test_service_sources import make_datastore, make_vm

TESTS = Path(__file__).parent
# a regression here is a hang (an import blocking on the slow source): fail it instead
pytestmark = pytest.mark.timeout(30)


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def fifo_svc(tmp_path):
    fifo = tmp_path / "vms.fifo"
    os.mkfifo(fifo)
    svc = SmsService(tmp_path / "state")
    svc.register_connector(fifo_source.KIND, {"fifo": str(fifo)})
    svc.import_wait_seconds = 0.2
    yield svc, fifo
    fifo_source.feed(fifo, [], timeout=0)      # unblock a reader a failed test left waiting
    svc.close()


def status(svc) -> str:
    return svc.get_servers()["serverCatalogStatus"]


def timed_send(req, timeout=10.0):
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        out = e.code, json.loads(e.read())
    return (*out, time.monotonic() - start)


def test_the_api_answers_while_an_import_lists_a_slow_source(fifo_svc):
    svc, fifo = fifo_svc
    srv = make_server(svc, "127.0.0.1", 0, CREDS, region=REGION)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        code, doc, took = timed_send(signed(srv.url, "ImportServerCatalog", b"{}"))
        assert (code, doc) == (200, {}) and took < 5
        # the source has not answered: the import is under way, and visible
        for op in ("GetServers", "GetConnectors", "GetReplicationJobs"):
            code, doc, took = timed_send(signed(srv.url, op, b"{}"), timeout=5)
            assert code == 200 and took < 2, (op, took)
        code, doc, _ = timed_send(signed(srv.url, "GetServers", b"{}"))
        assert doc["serverCatalogStatus"] == "IMPORTING" and doc["serverList"] == []
        code, doc, took = timed_send(signed(srv.url, "ImportServerCatalog", b"{}"))
        assert code == 400 and doc["__type"] == "OperationNotPermittedException"
        assert "under way" in doc["message"] and took < 2
        # the source answers: the import completes in the background
        assert fifo_source.feed(fifo, ["web", "db"])
        wait_for(lambda: timed_send(signed(srv.url, "GetServers", b"{}"))[1][
            "serverCatalogStatus"] == "AVAILABLE", what="AVAILABLE")
        doc = timed_send(signed(srv.url, "GetServers", b"{}"))[1]
        assert sorted(s["vmServer"]["vmName"] for s in doc["serverList"]) == ["db", "web"]
        assert svc.last_catalog_import()["servers"] == 2
    finally:
        srv.shutdown()
        srv.server_close()


def test_delete_during_an_import_wins_and_the_import_result_is_dropped(fifo_svc):
    svc, fifo = fifo_svc
    assert svc.import_server_catalog() == {}
    assert status(svc) == "IMPORTING"
    assert svc.delete_server_catalog() == {}
    assert status(svc) == "DELETED"
    assert fifo_source.feed(fifo, ["web"])
    wait_for(lambda: (svc.last_catalog_import() or {}).get("dropped"), what="the dropped import")
    out = svc.get_servers()
    assert out["serverCatalogStatus"] == "DELETED" and out["serverList"] == []
    # a new import after it works
    svc.import_server_catalog()
    assert fifo_source.feed(fifo, ["web"])
    wait_for(lambda: status(svc) == "AVAILABLE", what="AVAILABLE")
    assert [s["vmServer"]["vmName"] for s in svc.get_servers()["serverList"]] == ["web"]
    # the import's lock goes just after its result is committed (a read may come between)
    wait_for(lambda: not list(svc.state.dir.glob("catalog-import-*")), what="the lock removed")


def test_an_import_whose_process_is_killed_does_not_stay_importing(fifo_svc, tmp_path):
    svc, fifo = fifo_svc
    svc.import_server_catalog()
    assert fifo_source.feed(fifo, ["web"])
    wait_for(lambda: status(svc) == "AVAILABLE", what="AVAILABLE")
    before = svc.get_servers()
    # another process imports from the slow source and is killed -9 midway
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
         "import fifo_source; from smsblock.service import SmsService; "
         "svc = SmsService(sys.argv[2]); svc.import_wait_seconds = 0.1; "
         "svc.import_server_catalog(); print('importing', flush=True); time.sleep(600)",
         str(TESTS), state_target(svc.state)[0]], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, **state_target(svc.state)[1]))
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(child.stdout.readline()), daemon=True)
        reader.start()
        reader.join(20)
        assert line == ["importing\n"], "the import call did not return while the source was slow"
        # alive: the other process holds its import's lock, so IMPORTING stands
        assert status(svc) == "IMPORTING"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
    if svc.state.dialect == "postgresql":   # the lock goes when the server sees the session end
        wait_for(lambda: status(svc) != "IMPORTING", what="the dead import's session to end")
    after = svc.get_servers()
    assert after == before          # back to AVAILABLE, same servers, same lastModifiedOn
    assert "stopped before it finished" in svc.last_catalog_import()["error"]
    assert not list(svc.state.dir.glob("catalog-import-*"))
    svc.import_server_catalog()     # and importing works again
    assert fifo_source.feed(fifo, ["web", "db"])
    wait_for(lambda: status(svc) == "AVAILABLE" and len(svc.get_servers()["serverList"]) == 2,
             what="the new import")


def test_a_killed_import_with_no_catalog_before_returns_to_not_imported(tmp_path):
    svc = SmsService(tmp_path / "state")
    svc.register_connector("datastore", {"path": str(make_datastore(tmp_path / "ds", 1))})
    # what a process killed after writing IMPORTING leaves: its lock file, no holder
    job = __import__("smsblock.service.catalog", fromlist=["x"]).begin_import(svc.state, 1.0)
    if svc.state.dialect == "sqlite":
        os.close(job.lock_fd)
        assert (svc.state.dir / f"catalog-import-{job.import_id}.lock").exists()
    else:                   # PostgreSQL: the lock's connection ends, as with the process
        job.lock_fd.release()
    assert status(svc) == "NOT_IMPORTED"
    assert not list(svc.state.dir.glob("catalog-import-*"))
    svc.close()


def test_one_bad_vmx_is_left_out_with_its_reason_and_the_rest_imports(tmp_path, caplog):
    ds = make_datastore(tmp_path / "ds", 3)
    secret = tmp_path / "secret.txt"
    secret.write_text('root = "$6$SECRET-HASH"\n')
    bad = ds / "DC1/prod/vm1/vm1.vmx"
    bad.unlink()
    bad.symlink_to(secret)
    (ds / "vm2/vm2.vmx").unlink()
    os.mkfifo(ds / "vm2/vm2.vmx")
    make_vm(ds, "DC2/big", "big")
    with open(ds / "DC2/big/big.vmx", "ab") as f:
        f.truncate(3 << 20)
    svc = SmsService(tmp_path / "state")
    svc.register_connector("datastore", {"path": str(ds)})
    done = threading.Thread(target=svc.import_server_catalog, daemon=True)
    done.start()
    done.join(20)
    assert not done.is_alive(), "the import hangs on a FIFO .vmx"
    out = svc.get_servers()
    assert out["serverCatalogStatus"] == "AVAILABLE"
    assert [s["vmServer"]["vmName"] for s in out["serverList"]] == ["vm 0"]
    problems = {p["location"]: p["reason"] for p in svc.last_catalog_import()["problems"]}
    assert set(problems) == {"DC1/prod/vm1/vm1.vmx", "vm2/vm2.vmx", "DC2/big/big.vmx"}
    assert "symbolic link" in problems["DC1/prod/vm1/vm1.vmx"]
    assert "FIFO" in problems["vm2/vm2.vmx"]
    assert "larger than" in problems["DC2/big/big.vmx"]
    assert "SECRET" not in json.dumps(problems) and "SECRET" not in caplog.text
    assert "left out" in caplog.text
    svc.close()


def test_expired_after_the_connectors_absence_past_the_age(tmp_path):
    assert ServiceConfig().catalog_expiry_seconds == 7 * 86400
    clock = FakeClock(1_800_000_000.0)
    svc = SmsService(tmp_path / "state", clock=clock,
                     config=ServiceConfig(catalog_expiry_seconds=3600))
    conn = svc.register_connector("datastore", {"path": str(make_datastore(tmp_path / "ds", 1))})
    svc.import_server_catalog()
    imported = clock()
    clock.advance(3000)
    assert status(svc) == "AVAILABLE"       # the import itself counts as a sign of life
    svc.heartbeat(conn["connectorId"])
    beat = clock()
    clock.advance(3000)
    assert status(svc) == "AVAILABLE"       # 3000 s after the heartbeat
    clock.advance(601)
    out = svc.get_servers()
    assert out["serverCatalogStatus"] == "EXPIRED" and len(out["serverList"]) == 1
    assert out["lastModifiedOn"] == beat + 3600 and beat > imported
    svc.heartbeat(conn["connectorId"])      # the connector is back: still EXPIRED ...
    assert status(svc) == "EXPIRED"
    svc.import_server_catalog()             # ... until imported again
    assert status(svc) == "AVAILABLE"
    # a disassociated connector is gone from the moment it was disassociated
    svc.disassociate_connector(connectorId=conn["connectorId"])
    clock.advance(3599)
    assert status(svc) == "AVAILABLE"
    clock.advance(2)
    assert status(svc) == "EXPIRED"
    svc.close()
    # catalog_expiry_seconds = 0 (config.toml): never expires
    (tmp_path / "state" / "config.toml").write_text("catalog_expiry_seconds = 0\n")
    svc = SmsService(tmp_path / "state", clock=clock)
    conn = svc.register_connector("datastore", {"path": str(tmp_path / "ds")})
    svc.import_server_catalog()
    clock.advance(365 * 86400)
    assert status(svc) == "AVAILABLE"
    svc.close()


def test_a_failed_background_import_is_kept_in_the_outcome(fifo_svc):
    svc, fifo = fifo_svc
    svc.import_server_catalog()
    fifo_source.feed(fifo, [])          # prime: a good import first
    wait_for(lambda: status(svc) == "AVAILABLE", what="AVAILABLE")
    svc.import_server_catalog()
    assert status(svc) == "IMPORTING"
    # the source answers garbage after the wait: the failure goes to the outcome
    fd = wait_for(lambda: _open_writer(fifo), what="a reader")
    os.write(fd, b"not json")
    os.close(fd)
    wait_for(lambda: status(svc) == "AVAILABLE", what="the catalog back to AVAILABLE")
    error = svc.last_catalog_import()["error"]
    assert "importing failed" in error and "JSONDecodeError" in error


def _open_writer(fifo):
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


def test_second_import_refused_in_process_too(fifo_svc):
    svc, fifo = fifo_svc
    svc.import_server_catalog()
    with pytest.raises(ServiceError) as e:
        svc.import_server_catalog()
    assert e.value.code == "OperationNotPermittedException"
    assert fifo_source.feed(fifo, ["a"])
    wait_for(lambda: status(svc) == "AVAILABLE", what="AVAILABLE")
