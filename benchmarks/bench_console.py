"""Web console render time (issue 13, outcome 6): every page under 200 ms with 500
servers in the catalog and 50 replication jobs (each with 10 runs in its history).

Each page is fetched over HTTP from an in-process ``smsblock serve`` (console on, signed
in): the time is the whole request - session, the SmsService calls, rendering, sending.

    python3 -m pytest benchmarks/bench_console.py --benchmark-only -p no:xdist
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_console import AKID, SECRET, Client  # noqa: E402

from smsblock.service import SmsService  # noqa: E402
from smsblock.service.server import ServerCredentials, make_server  # noqa: E402

SERVERS = 500
JOBS = 50
RUNS_PER_JOB = 10
LIMIT_SECONDS = 0.200


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-console")
    ds = tmp / "ds"
    for i in range(SERVERS):      # .vmx files only: listing the catalog does not open disks
        folder = ds / "DC1" / f"team{i % 10}" / f"vm{i:03d}"
        folder.mkdir(parents=True)
        (folder / f"vm{i:03d}.vmx").write_text(
            f'displayName = "vm-{i:03d} <b>&amp;</b>"\nguestOS = "ubuntu-64"\n'
            f'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "vm{i:03d}.vmdk"\n')
    svc = SmsService(tmp / "state")
    svc.register_connector("datastore", {"path": str(ds)})
    svc.import_server_catalog()
    while svc.get_servers(maxResults=1)["serverCatalogStatus"] == "IMPORTING":
        time.sleep(0.05)
    servers = [s["serverId"] for s in svc.get_servers(maxResults=1000)["serverList"]]
    assert len(servers) == SERVERS
    jobs = [svc.create_replication_job(serverId=sid, seedReplicationTime=time.time() + 3600,
                                       frequency=12, description=f"job {n} <i>x</i>")[
                "replicationJobId"] for n, sid in enumerate(servers[:JOBS])]
    # a run history for each job, as the executor leaves it
    now = time.time()
    with svc.state.transaction() as db:
        for j in jobs:
            for k in range(RUNS_PER_JOB):
                state = "ACTIVE" if k == RUNS_PER_JOB - 1 else "COMPLETED"
                db.execute(
                    "INSERT INTO runs (run_id, job_id, type, state, stage, stage_progress, "
                    "status_message, ami_id, scheduled_start, created, started, completed, "
                    "encrypted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0)",
                    (f"sms-run-{j[-6:]}{k:02x}", j, "AUTOMATIC", state,
                     "uploading" if state == "ACTIVE" else None,
                     "42%" if state == "ACTIVE" else None,
                     f"completed: 5 blocks changed, image ami-{k:017x}",
                     None if state == "ACTIVE" else f"ami-{k:017x}",
                     now - (RUNS_PER_JOB - k) * 43200, now - (RUNS_PER_JOB - k) * 43200,
                     now - (RUNS_PER_JOB - k) * 43200, None if state == "ACTIVE" else now))
                if state == "COMPLETED":   # the images table (their catalog records absent)
                    db.execute("INSERT INTO images (ami_id, job_id, run_id, created) "
                               "VALUES (?,?,?,?)", (f"ami-{j[-6:]}{k:011x}", j,
                                                    f"sms-run-{j[-6:]}{k:02x}", now))
    srv = make_server(svc, "127.0.0.1", 0, ServerCredentials(AKID, SECRET))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    client = Client(srv.url)
    client.sign_in(AKID, SECRET)
    cid = svc.get_connectors()["connectorList"][0]["connectorId"]
    yield {"client": client, "jobs": jobs, "servers": servers, "connector": cid}
    srv.shutdown()
    srv.server_close()
    svc.close()


PAGES = ["connectors", "connector", "servers", "servers-search", "jobs", "jobs-search",
         "job", "wizard", "images", "live"]


@pytest.mark.parametrize("page", PAGES)
def test_page_render_time(benchmark, console, page):
    c = console["client"]
    path = {"connectors": "/connectors", "connector": f"/connectors/{console['connector']}",
            "servers": "/servers", "servers-search": "/servers?q=team3",
            "jobs": "/jobs", "jobs-search": "/jobs?q=job+1", "job": f"/jobs/{console['jobs'][7]}",
            "wizard": "/jobs/new?" + "&".join(f"server={s}" for s in console["servers"][-20:]),
            "images": "/images", "live": "/live"}[page]

    def fetch():
        r = c.get(path, follow=False)
        assert r.status == 200, (path, r.status)
        return r

    r = benchmark.pedantic(fetch, rounds=15, warmup_rounds=2)
    if page == "servers":
        assert r.text.count('name="server"') == SERVERS
    if page == "jobs":
        assert r.text.count('<td><a href="/jobs/sms-job-') == JOBS
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["mean_ms"] = round(mean * 1000, 1)
    assert mean < LIMIT_SECONDS, f"{path}: {mean * 1000:.0f} ms"
