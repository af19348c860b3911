"""The web console in a real browser: headless Chromium (Debian's chromium and
chromium-driver, through Selenium) drives the SMS guide's console workflow against a real
`smsblock serve` and `smsblock connector run` on a datastore connector: sign-in, the
connector, catalog import, the Create replication jobs wizard (local time in another
time zone, a refusal next to its field, review), a run that completes with an AMI shown
live without a reload, the on-demand limit, images with findings, edit, the XSS VM name,
a phone-width window, a cross-site form refused, deletion, clear catalog, disassociate,
sign-out; the keyboard.

Set SMSBLOCK_CONSOLE_SCREENSHOTS=DIR to save the screenshots docs/console.md shows.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from test_console import AKID, SECRET, XSS, Client
from test_service_sources import bootable_image, make_vm

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

pytestmark = [pytest.mark.xdist_group("console-browser"), pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BROWSER_TZ = "Asia/Kolkata"      # +05:30, so local time and UTC differ by a non-whole hour
SHOTS = os.environ.get("SMSBLOCK_CONSOLE_SCREENSHOTS")


def smsblock(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromium-driver are needed (scripts/setup.sh installs them)")
    tmp = tmp_path_factory.mktemp("console-browser")
    ds, state = tmp / "ds", tmp / "state"
    make_vm(ds, "DC1/prod/web01", "web01", image=bootable_image(tmp / "img"))
    make_vm(ds, "DC1/prod/evil", XSS)
    make_vm(ds, "DC1/test/db01", "db01")
    conn = json.loads(smsblock("connector", "register", "--state", state, "--datastore", ds))
    env = dict(os.environ, SMSBLOCK_ACCESS_KEY_ID=AKID, SMSBLOCK_SECRET_ACCESS_KEY=SECRET)
    serve = subprocess.Popen([sys.executable, "-m", "smsblock", "serve", "--state", state,
                              "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    line = serve.stdout.readline()
    assert "listening on" in line, serve.stderr.read()
    url = line.split("listening on ")[1].split()[0]
    connector = subprocess.Popen(
        [sys.executable, "-m", "smsblock", "connector", "run", "--state", state,
         "--poll-interval", "0.3", "--heartbeat-interval", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
              "--window-size=1280,860", "--lang=en-US"):
        opts.add_argument(a)
    service = webdriver.ChromeService(CHROMEDRIVER, env=dict(os.environ, TZ=BROWSER_TZ))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.implicitly_wait(0)
    try:
        yield {"driver": driver, "url": url, "state": state, "connector": conn["connectorId"],
               "tmp": tmp}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        for p in (connector, serve):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        serve.stdout.close()
        serve.stderr.close()
        connector.stderr.close()


# --- helpers ------------------------------------------------------------------------------

def _replaced(e) -> bool:
    """Chrome's words for an element the page replaced between finding and reading it:
    a stale reference, or (Chrome 156, seen in CI) an inspector error about the node."""
    from selenium.common.exceptions import (NoSuchElementException,
                                            StaleElementReferenceException, WebDriverException)
    if isinstance(e, (StaleElementReferenceException, NoSuchElementException)):
        return True
    return isinstance(e, WebDriverException) and "does not belong to the document" in str(e)


def wait_for(fn, timeout=60.0, what="condition"):
    from selenium.common.exceptions import WebDriverException
    deadline = time.time() + timeout
    while True:
        try:
            value = fn()
        except WebDriverException as e:
            if not _replaced(e):
                raise
            value = None      # the page is being replaced by its live reload
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def css(d, selector):
    return d.find_element(By.CSS_SELECTOR, selector)


def csss(d, selector):
    return d.find_elements(By.CSS_SELECTOR, selector)


def flashes(d) -> list[str]:
    """The messages the page shows after an action (waiting for the page that has them)."""
    def found():
        try:
            return [e.text for e in csss(d, "p.flash")]
        except Exception:     # the old page went away meanwhile
            return None
    return wait_for(found, 10, "the page after the action")


def no_alert(d) -> None:
    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.text


def shot(d, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(Path(SHOTS) / f"{name}.png"))


def service(state):
    from smsblock.service import SmsService
    return SmsService(state)


def go(d, find) -> None:
    """Click what ``find()`` returns, which loads a new page, and wait until the old page
    is gone.  A live reload of the page in between makes the element stale: find again."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait
    for attempt in range(5):
        try:
            old = css(d, "html")
            find().click()
            break
        except WebDriverException:
            if attempt == 4:
                raise
            time.sleep(0.2)

    def gone(_):
        try:
            old.tag_name
            return False
        except WebDriverException:     # stale, or no longer in any document
            return True
    WebDriverWait(d, 30).until(gone)
    wait_for(lambda: d.execute_script("return document.readyState") == "complete", 30, "load")


def button(d, text):
    return next(b for b in csss(d, "button, a.button") if b.text == text)


# --- the walkthrough ------------------------------------------------------------------------

def test_the_guides_console_workflow_in_a_browser(setup):
    d, url, state, cid = setup["driver"], setup["url"], setup["state"], setup["connector"]

    # signed out: every page leads to the sign-in page; a wrong secret is refused
    d.get(url + "/servers")
    assert d.current_url.startswith(url + "/login") and css(d, "h1").text == "Sign in"
    shot(d, "sign-in")
    css(d, "#access_key_id").send_keys(AKID)
    css(d, "#secret_access_key").send_keys("not-the-secret" + Keys.ENTER)
    assert "wrong" in css(d, "p.error").text
    css(d, "#access_key_id").clear()
    css(d, "#access_key_id").send_keys(AKID)
    css(d, "#secret_access_key").send_keys(SECRET + Keys.ENTER)
    wait_for(lambda: d.current_url == url + "/servers", what="sign-in")
    (cookie,) = [c for c in d.get_cookies() if c["name"] == "smsblock_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expiry"] > time.time()

    # Connectors: the datastore connector, HEALTHY (the connector process heartbeats)
    d.get(url + "/connectors")
    row = css(d, "tbody tr")
    assert cid in row.text and "HEALTHY" in row.text and "datastore" in row.text
    assert "VSPHERE" in row.text
    shot(d, "connectors")

    # Servers: import the catalog, the XSS name as text, search
    d.get(url + "/servers")
    assert "NOT_IMPORTED" in css(d, "main").text
    go(d, lambda: button(d, "Import server catalog"))
    wait_for(lambda: len(csss(d, "input[name=server]")) == 3, what="the imported catalog")
    wait_for(lambda: "AVAILABLE" in css(d, "#catalog-status").text, what="AVAILABLE")
    labels = [e.text for e in csss(d, "tbody label")]
    assert XSS in labels                      # shown as text ...
    assert csss(d, "main img") == []          # ... never as an element
    no_alert(d)
    assert "Re-import server catalog" in [b.text for b in csss(d, "button")]
    shot(d, "servers")
    box = css(d, "#q")
    box.send_keys("prod" + Keys.ENTER)        # the search filter, by keyboard
    wait_for(lambda: "2 of 3 servers" in css(d, "main").text, what="search")
    d.get(url + "/servers")

    # Create replication jobs wizard: web01 and the XSS VM
    ids = {e.text: e.get_attribute("for")[len("pick-"):] for e in csss(d, "tbody label")}
    for name in ("web01", XSS):
        css(d, f"#pick-{ids[name]}").send_keys(Keys.SPACE)   # checkboxes by keyboard
    go(d, lambda: button(d, "Create replication job"))
    assert css(d, "h1").text == "Create replication jobs"
    css(d, f"#license-{ids['web01']}").send_keys("BYOL")
    css(d, "input[name=start][value=later]").click()
    tomorrow = (datetime.now(ZoneInfo(BROWSER_TZ)) + timedelta(days=1)).replace(
        hour=10, minute=30, second=0, microsecond=0)
    d.execute_script("arguments[0].value = arguments[1]", css(d, "#start_local"),
                     tomorrow.strftime("%Y-%m-%dT%H:%M"))
    css(d, "#role").send_keys("not a role!")
    css(d, "#description").send_keys("<script>alert(1)</script>")
    css(d, "#keep").clear()
    css(d, "#keep").send_keys("2")
    go(d, lambda: button(d, "Next: review"))
    # the API's rule, next to the field; the rest of the form kept
    err = css(d, "#err-role")
    assert "InvalidParameterException" in err.text and "not a valid IAM role name" in err.text
    assert css(d, "#role").get_attribute("aria-invalid") == "true"
    assert css(d, "#description").get_attribute("value") == "<script>alert(1)</script>"
    shot(d, "wizard-error")
    css(d, "#role").clear()
    css(d, "#role").send_keys("sms-role")
    d.execute_script("arguments[0].value = arguments[1]", css(d, "#start_local"),
                     tomorrow.strftime("%Y-%m-%dT%H:%M"))
    go(d, lambda: button(d, "Next: review"))
    assert css(d, "h1").text == "Review"
    main = css(d, "main").text
    assert tomorrow.strftime("%Y-%m-%d 10:30") in main     # shown back in local time
    assert "BYOL" in main and "Auto" in main and "<script>alert(1)</script>" in main
    no_alert(d)
    shot(d, "wizard-review")
    go(d, lambda: button(d, "Create"))
    assert d.current_url == url + "/jobs"
    assert flashes(d)[0].startswith("Created replication job(s)")
    with service(state) as svc:
        jobs = {j["serverId"]: j for j in svc.get_replication_jobs()["replicationJobList"]}
    web = jobs[ids["web01"]]
    assert web["seedReplicationTime"] == tomorrow.timestamp()       # the browser's local time
    assert web["licenseType"] == "BYOL" and web["roleName"] == "sms-role"
    assert web["numberOfRecentAmisToKeep"] == 2
    job, evil_job = web["replicationJobId"], jobs[ids[XSS]]["replicationJobId"]

    # Replication jobs: table and search
    assert len(csss(d, "tbody tr")) == 2
    css(d, "#q").send_keys("web01" + Keys.ENTER)
    wait_for(lambda: "1 of 2 jobs" in css(d, "main").text, what="job search")
    shot(d, "jobs")
    go(d, lambda: css(d, f"a[href='/jobs/{job}']"))

    # a job's details; Start replication run; progress live, without a reload
    assert css(d, "#on-demand-left").text == "2 of 2 on-demand runs left in the current 24 hours."
    go(d, lambda: button(d, "Start replication run"))
    assert flashes(d)[0].startswith("Replication run sms-run-")
    run_id = flashes(d)[0].split()[2]
    seen = set()

    def completed():
        try:
            row = css(d, f"#run-{run_id}")
            state_ = row.find_element(By.CSS_SELECTOR, "[data-f=state]").text
            if state_ == "ACTIVE" and "ACTIVE" not in seen:
                shot(d, "job-run-active")
            seen.add(state_)
            ami = row.find_element(By.CSS_SELECTOR, "[data-f=ami]").text
            return ami if ami.startswith("ami-") else None
        except Exception:   # the page is being replaced by its live reload
            return None

    ami = wait_for(completed, 120, "the run to complete with an AMI")
    assert "COMPLETED" in seen and ("PENDING" in seen or "ACTIVE" in seen), seen
    wait_for(lambda: css(d, "#on-demand-left").text.startswith("1 of 2"), what="count")
    assert ami in css(d, "dl.details").text                    # the job's latest AMI
    row = css(d, f"#run-{run_id}").text
    assert "ON_DEMAND" in row and "COMPLETED" in row and "image " + ami in row
    shot(d, "job-details")

    # the on-demand limit: a second run, then the third is refused with the API's reason
    go(d, lambda: button(d, "Start replication run"))
    second = flashes(d)[0].split()[2]
    wait_for(lambda: (css(d, f"#run-{second} [data-f=ami]").text or "").startswith("ami-")
             if csss(d, f"#run-{second}") else None, 120, "the second run")
    wait_for(lambda: css(d, "#on-demand-left").text.startswith("0 of 2"), what="0 left")
    assert not button(d, "Start replication run").is_enabled()

    def enabled_start():        # as a page from before the limit would send it
        start = button(d, "Start replication run")
        d.execute_script("arguments[0].disabled = false", start)
        return start
    go(d, enabled_start)
    assert "ReplicationRunLimitExceededException" in flashes(d)[0]

    # readable in a phone-width window: no sideways scrolling of the page (wide tables
    # scroll in their own box)
    d.set_window_size(390, 844)
    try:
        for path in ("/connectors", "/servers", "/jobs", f"/jobs/{job}", "/images",
                     f"/connectors/{cid}", f"/jobs/{job}/edit",
                     f"/jobs/new?server={ids['db01']}"):
            d.get(url + path)
            overflow = d.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (path, overflow)
            if path in ("/servers", f"/jobs/{job}"):
                shot(d, "servers-phone" if path == "/servers" else "job-phone")
    finally:
        d.set_window_size(1280, 860)

    # Images: registered from the runs, with their validation findings
    d.get(url + "/images")
    section = css(d, f"#image-{ami}")
    assert job in section.text and run_id in section.text and "Validation findings" in section.text
    assert "Ubuntu" in section.text
    shot(d, "images")

    # Edit
    d.get(url + f"/jobs/{job}")
    go(d, lambda: button(d, "Edit"))
    css(d, "#frequency").send_keys("24")
    css(d, "#description").clear()
    css(d, "#description").send_keys("edited in the browser")
    go(d, lambda: button(d, "Save"))
    assert flashes(d) == [f"Replication job {job} updated."]
    assert "every 24 hours" in css(d, "dl.details").text
    assert "edited in the browser" in css(d, "dl.details").text

    # the connector page: health, version, settings, log bundle
    d.get(url + f"/connectors/{cid}")
    text = css(d, "main").text
    assert "HEALTHY" in text and "0.1.0" in text and "datastore" in text
    assert "Download log bundle" in text
    shot(d, "connector")
    client = Client(url)
    client.cookies = {"smsblock_console": cookie["value"]}
    bundle = client.get(f"/connectors/{cid}/log-bundle.zip")
    assert bundle.status == 200 and bundle.raw[:2] == b"PK" and SECRET.encode() not in bundle.raw

    # Disassociate: confirmation, then refused with the reason while a job needs it
    d.get(url + "/connectors")
    go(d, lambda: button(d, "Disassociate"))
    assert css(d, "h1").text == "Disassociate connector"
    go(d, lambda: button(d, "Disassociate"))
    assert "OperationNotPermittedException" in flashes(d)[0] and "still needed" in flashes(d)[0]

    # a cross-site form (another origin, even with the right token) is refused
    d.get(url + f"/jobs/{job}")
    token = css(d, "input[name=csrf]").get_attribute("value")
    attacker = _attacker_page(url + f"/jobs/{job}/delete", token)
    try:
        d.get(attacker.url)
        go(d, lambda: css(d, "button"))
        wait_for(lambda: "cross-" in css(d, "body").text, what="the refusal")
        assert "Forbidden" in d.title or "Forbidden" in css(d, "h1").text
    finally:
        attacker.stop()
    with service(state) as svc:
        assert svc.get_replication_jobs(replicationJobId=job)["replicationJobList"][0][
            "state"] == "ACTIVE"

    # Delete (confirmation) both jobs; then clear the catalog and disassociate
    for j in (evil_job, job):
        d.get(url + f"/jobs/{j}")
        go(d, lambda: button(d, "Delete"))
        assert css(d, "h1").text == "Delete replication job"
        go(d, lambda: button(d, "Delete"))
        assert flashes(d) == [f"Replication job {j} is being deleted."]
    with service(state) as svc:
        wait_for(lambda: all(j["state"] == "DELETED" for j in svc.get_replication_jobs()[
            "replicationJobList"]), 60, "the connector to finish the deletions")
    d.get(url + "/servers")
    go(d, lambda: button(d, "Clear server catalog"))
    go(d, lambda: button(d, "Clear server catalog"))
    assert flashes(d) == ["The server catalog is cleared."]
    assert "DELETED" in css(d, "#catalog-status").text
    d.get(url + "/connectors")
    go(d, lambda: button(d, "Disassociate"))
    go(d, lambda: button(d, "Disassociate"))
    assert flashes(d) == [f"Connector {cid} is disassociated."]

    # sign out: nothing is reachable any more
    go(d, lambda: button(d, "Sign out"))
    d.get(url + "/jobs")
    assert css(d, "h1").text == "Sign in"


def _attacker_page(action: str, token: str):
    """A page on another origin (another port) with a form that posts to the console."""
    page = (f'<!DOCTYPE html><title>prize</title><form method="post" action="{action}">'
            f'<input type="hidden" name="csrf" value="{token}"><button>Win</button></form>').encode()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *a):
            pass

    srv = socketserver.TCPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    class A:
        url = f"http://127.0.0.1:{srv.server_address[1]}/"

        @staticmethod
        def stop():
            srv.shutdown()
            srv.server_close()
    return A


def test_keyboard(setup):
    """Usable by keyboard: the skip link comes first and shows its focus, the navigation
    is reached and followed with Tab and Enter."""
    d, url = setup["driver"], setup["url"]
    _sign_in(d, url)
    d.get(url + "/servers")
    css(d, "body").send_keys(Keys.TAB)
    first = d.switch_to.active_element
    assert first.text == "Skip to content"
    outline = d.execute_script("return getComputedStyle(arguments[0]).outlineStyle", first)
    assert outline != "none"
    first.send_keys(Keys.ENTER)
    assert d.current_url.endswith("#main")
    d.get(url + "/servers")
    for _ in range(30):
        el = d.switch_to.active_element
        if el.text == "Replication jobs":
            el.send_keys(Keys.ENTER)
            break
        el.send_keys(Keys.TAB)
    wait_for(lambda: d.current_url == url + "/jobs", what="keyboard navigation")


def _sign_in(d, url) -> str:
    d.get(url + "/login")
    d.delete_all_cookies()
    d.get(url + "/login")
    css(d, "#access_key_id").send_keys(AKID)
    css(d, "#secret_access_key").send_keys(SECRET + Keys.ENTER)
    wait_for(lambda: not d.current_url.startswith(url + "/login"), what="sign-in")
    return next(c["value"] for c in d.get_cookies() if c["name"] == "smsblock_console")


def test_progress_updates_in_place(setup, tmp_path):
    """While a run uploads, its stage and progress change on the job's page and on the jobs
    table without the page being reloaded (console.js polls /live); when it completes, the
    page shows the new state by itself."""
    from test_console import Live
    lv = Live(tmp_path)
    d = setup["driver"]
    try:
        names = lv.import_catalog()
        job = lv.svc.create_replication_job(serverId=names["web01"], frequency=12,
                                            seedReplicationTime=time.time() + 3600)[
            "replicationJobId"]
        run = lv.svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]

        def progress(stage, pct, message):       # what the executor writes while it works
            with lv.svc.state.transaction() as db:
                db.execute("UPDATE runs SET state = 'ACTIVE', stage = ?, stage_progress = ?, "
                           "status_message = ? WHERE run_id = ?", (stage, pct, message, run))

        progress("uploading", "5%", "replicating 1 disk(s)")
        _sign_in(d, lv.url)
        for path in (f"/jobs/{job}", "/jobs"):
            d.get(lv.url + path)
            d.execute_script("window.notReloaded = true")
            sel = f'[data-run="{run}"]'
            assert css(d, sel + '[data-f="progress"]').text == "5%"
            progress("uploading", "63%", "replicating 1 disk(s) <b>fast</b>")
            wait_for(lambda: css(d, sel + '[data-f="progress"]').text == "63%", 15, "63%")
            assert css(d, sel + '[data-f="bar"]').get_attribute("value") == "63"
            if path != "/jobs":
                assert css(d, sel + '[data-f="message"]').text == "replicating 1 disk(s) <b>fast</b>"
            assert d.execute_script("return window.notReloaded") is True
            progress("uploading", "5%", "replicating 1 disk(s)")
        d.get(lv.url + f"/jobs/{job}")
        with lv.svc.state.transaction() as db:
            db.execute("UPDATE runs SET state = 'COMPLETED', stage = NULL, stage_progress = NULL, "
                       "status_message = 'completed', ami_id = 'ami-0123456789abcdef0' "
                       "WHERE run_id = ?", (run,))
        wait_for(lambda: css(d, f'#run-{run} [data-f="state"]').text == "COMPLETED", 15,
                 "the completed run")
        assert css(d, f'#run-{run} [data-f="ami"]').text == "ami-0123456789abcdef0"
    finally:
        lv.close()
