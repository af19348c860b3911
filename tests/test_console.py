"""The web console over HTTP (in process): sign-in and sessions, nothing reachable signed
out, CSRF refusals that change nothing, the content security policy, escaping of every
value, the wizard's validation (the API's own rule, next to the field), the log bundle
without secrets, vCenter certificate settings; the SMS API unchanged beside it.

The browser walkthrough is in test_console_browser.py; it reuses :class:`Client`."""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from http.cookies import SimpleCookie

import pytest

from smsblock.service import SmsService
from smsblock.service.server import ServerCredentials, make_server
from test_service_sources import make_vm

AKID = "AKIDCONSOLETEST"
SECRET = "console-secret/with+chars=="
XSS = "<img src=x onerror=alert(1)>"


# --- a browser-like HTTP client ----------------------------------------------------------


class Reply:
    def __init__(self, resp: http.client.HTTPResponse):
        self.status = resp.status
        self.headers = resp.headers
        self.raw = resp.read()

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    def flashes(self) -> list[str]:
        return [re.sub(r"<[^>]+>", "", m) for m in
                re.findall(r'<p class="flash[^"]*"[^>]*>(.*?)</p>', self.text)]

    def field_errors(self) -> dict[str, str]:
        return dict(re.findall(r'<p class="field-error" id="err-([^"]+)"[^>]*>(.*?)</p>',
                               self.text))


class Client:
    """One browser-like client of the console: keeps cookies, follows nothing by itself."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.cookies: dict[str, str] = {}
        self.csrf: str | None = None

    def request(self, method: str, path: str, form=None, headers=None,
                follow: bool = True) -> Reply:
        body = urllib.parse.urlencode(form, doseq=True).encode() if form is not None else None
        h = {"Host": f"{self.host}:{self.port}"}
        if body is not None:
            h["Content-Type"] = "application/x-www-form-urlencoded"
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        h.update(headers or {})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=h)
            reply = Reply(conn.getresponse())
        finally:
            conn.close()
        for header in reply.headers.get_all("Set-Cookie") or []:
            c = SimpleCookie()
            c.load(header)
            for name, morsel in c.items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        m = re.search(r'name="csrf" value="([^"]+)"', reply.text)
        if m:
            self.csrf = m.group(1)
        if follow and reply.status == 303:
            return self.request("GET", reply.headers["Location"])
        return reply

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, form: dict | None = None, *, csrf: bool = True, **kw) -> Reply:
        form = dict(form or {})
        if csrf and "csrf" not in form:
            form["csrf"] = self.csrf
        return self.request("POST", path, form=form, **kw)

    def sign_in(self, akid: str, secret: str) -> Reply:
        page = self.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
        return self.post("/login", {"login_token": token, "access_key_id": akid,
                                    "secret_access_key": secret}, csrf=False)


# --- fixtures ---------------------------------------------------------------------------

class Live:
    def __init__(self, tmp_path):
        self.ds = tmp_path / "ds"
        make_vm(self.ds, "DC1/prod/web01", "web01")
        make_vm(self.ds, "DC1/prod/evil", XSS)
        self.svc = SmsService(tmp_path / "state")
        self.connector = self.svc.register_connector("datastore", {"path": str(self.ds)})[
            "connectorId"]
        self.srv = make_server(self.svc, "127.0.0.1", 0, ServerCredentials(AKID, SECRET))
        self.thread = threading.Thread(target=self.srv.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = self.srv.url

    def client(self, signed_in: bool = True) -> Client:
        c = Client(self.url)
        if signed_in:
            assert c.sign_in(AKID, SECRET).status == 200
        return c

    def catalog_status(self) -> str:
        return self.svc.get_servers()["serverCatalogStatus"]

    def import_catalog(self) -> dict[str, str]:
        """vmName -> serverId, waiting for a background import to finish."""
        self.svc.import_server_catalog()
        deadline = time.time() + 30
        while self.catalog_status() == "IMPORTING" and time.time() < deadline:
            time.sleep(0.05)
        return {s["vmServer"]["vmName"]: s["serverId"]
                for s in self.svc.get_servers()["serverList"]}

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()
        self.svc.close()


@pytest.fixture
def live(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.close()


# --- sign-in, sessions, nothing reachable signed out ------------------------------------

PAGES = ["/", "/connectors", "/servers", "/servers?q=web", "/jobs", "/jobs/new?server=s-00000000",
         "/jobs/sms-job-00000000", "/jobs/sms-job-00000000/edit", "/images", "/live",
         "/servers/clear", "/connectors/c-0123456789abcdef0",
         "/connectors/c-0123456789abcdef0/log-bundle.zip", "/nowhere"]
FORMS = ["/servers/import", "/servers/clear", "/jobs/new", "/jobs/sms-job-00000000/run",
         "/jobs/sms-job-00000000/delete", "/jobs/sms-job-00000000/edit", "/logout",
         "/connectors/c-0123456789abcdef0/disassociate", "/connectors/c-0123456789abcdef0/settings"]


def test_nothing_is_reachable_signed_out(live):
    c = live.client(signed_in=False)
    for path in PAGES:
        r = c.get(path, follow=False)
        assert r.status == 303 and r.headers["Location"].startswith("/login"), path
        assert b"web01" not in r.raw
    # the script needs a session; the stylesheet is what the sign-in page itself uses
    assert c.get("/static/console.js").status == 403
    assert c.get("/static/console.css").status == 200
    assert c.get("/static/../server.py").status in (403, 404)
    for path in FORMS:
        r = c.post(path, {"csrf": "x", "server": "s-00000000"})
        assert r.status == 403, path
    assert live.catalog_status() == "NOT_IMPORTED"
    # the sign-in page comes back to where the person wanted to go
    r = c.get("/jobs?q=a", follow=False)
    assert r.headers["Location"] == "/login?next=%2Fjobs%3Fq%3Da"


def test_sign_in_session_cookie_and_sign_out(live):
    c = live.client(signed_in=False)
    page = c.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    # wrong secret, wrong key: refused, no session
    for akid, secret in ((AKID, "not-the-secret"), ("AKIDOTHER", SECRET), ("", "")):
        r = c.post("/login", {"login_token": token, "access_key_id": akid,
                              "secret_access_key": secret}, csrf=False)
        assert r.status == 401 and "wrong" in r.text
        assert "smsblock_console" not in c.cookies
        token = re.search(r'name="login_token" value="([^"]+)"', r.text).group(1)   # a new one
    # a sign-in form not from this page (no pre-session token) is refused
    other = Client(live.url)
    r = other.post("/login", {"access_key_id": AKID, "secret_access_key": SECRET}, csrf=False)
    assert r.status == 403 and "smsblock_console" not in other.cookies
    page = c.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", {"login_token": token, "access_key_id": AKID,
                          "secret_access_key": SECRET, "next": "/servers"}, csrf=False,
               follow=False)
    assert r.status == 303 and r.headers["Location"] == "/servers"
    (cookie,) = [h for h in r.headers.get_all("Set-Cookie") if h.startswith("smsblock_console=")]
    attrs = [a.strip() for a in cookie.split(";")]
    assert "HttpOnly" in attrs and "SameSite=Strict" in attrs and "Path=/" in attrs
    assert f"Max-Age={8 * 3600}" in attrs and "Secure" not in attrs   # plain http here
    assert len(attrs[0].split("=", 1)[1]) >= 40                        # 32 random bytes
    assert c.get("/servers").status == 200
    # an open redirect through next= is not possible
    c2 = live.client(signed_in=False)
    page = c2.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    r = c2.post("/login", {"login_token": token, "access_key_id": AKID,
                           "secret_access_key": SECRET, "next": "//evil.example/x"},
                csrf=False, follow=False)
    assert r.headers["Location"] == "/"
    # sign out: the old cookie is worth nothing any more
    old = dict(c.cookies)
    assert c.post("/logout").status == 200
    c.cookies = old
    assert c.get("/servers", follow=False).status == 303


def test_secure_cookie_behind_tls_proxy(live):
    c = Client(live.url)
    page = c.get("/login", headers={"X-Forwarded-Proto": "https"})
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", {"login_token": token, "access_key_id": AKID, "secret_access_key": SECRET},
               csrf=False, follow=False, headers={"X-Forwarded-Proto": "https"})
    (cookie,) = [h for h in r.headers.get_all("Set-Cookie") if h.startswith("smsblock_console=")]
    assert "Secure" in [a.strip() for a in cookie.split(";")]


def test_sessions_expire(live):
    live.srv.console.sessions.lifetime = 1.5
    c = live.client()
    assert c.get("/servers", follow=False).status == 200
    time.sleep(1.7)
    assert c.get("/servers", follow=False).status == 303
    assert c.post("/servers/import").status == 403
    assert live.catalog_status() == "NOT_IMPORTED"


def test_failed_sign_ins_are_throttled(live):
    c = live.client(signed_in=False)
    statuses = [c.sign_in(AKID, "wrong").status for _ in range(22)]
    assert statuses[:20] == [401] * 20 and statuses[-1] == 429


# --- CSRF -----------------------------------------------------------------------------------

@pytest.mark.parametrize("form,headers", [
    ({"csrf": ""}, {}),
    ({"csrf": "forged-token"}, {}),
    (None, {"Origin": "http://evil.example"}),                  # the right token, wrong origin
    (None, {"Origin": "null"}),
    (None, {"Sec-Fetch-Site": "cross-site"}),
    (None, {"Sec-Fetch-Site": "same-site"}),                    # another port of the same host
], ids=["no-token", "forged-token", "foreign-origin", "null-origin", "cross-site", "same-site"])
def test_cross_site_requests_are_refused_and_change_nothing(live, form, headers):
    c = live.client()
    c.get("/servers")
    r = c.post("/servers/import", form, headers=headers)
    assert r.status == 403 and ("cross-" in r.text or "security token" in r.text)
    assert live.catalog_status() == "NOT_IMPORTED"
    # the same request from the console's own page goes through
    r = c.post("/servers/import", headers={"Origin": live.url, "Sec-Fetch-Site": "same-origin"})
    assert r.status == 200 and r.flashes() == ["Server catalog import started."]


def test_a_token_is_bound_to_its_session(live):
    a, b = live.client(), live.client()
    a.get("/servers")
    b.get("/servers")
    assert a.csrf != b.csrf
    assert a.post("/servers/import", {"csrf": b.csrf}).status == 403
    assert live.catalog_status() == "NOT_IMPORTED"


def test_form_bodies_are_bounded(live):
    c = live.client()
    assert c.get("/servers?" + "&".join(f"q{i}=1" for i in range(300))).status == 400
    c.get("/servers")
    r = c.post("/servers/import", {"csrf": c.csrf, "pad": "x" * (300 * 1024)})
    assert r.status == 413
    conn = http.client.HTTPConnection(c.host, c.port, timeout=10)
    conn.putrequest("POST", "/servers/import")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.putheader("Cookie", "; ".join(f"{k}={v}" for k, v in c.cookies.items()))
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 411
    conn.close()
    assert live.catalog_status() == "NOT_IMPORTED"


# --- CSP and escaping --------------------------------------------------------------------------

def _make_job(live, names, description=None) -> str:
    params = {"serverId": names["web01"], "seedReplicationTime": time.time() + 3600,
              "frequency": 12}
    if description:
        params["description"] = description
    return live.svc.create_replication_job(**params)["replicationJobId"]


def _event_attributes(text: str) -> list[str]:
    """Attributes named on... of every element, as a browser parses the page."""
    from html.parser import HTMLParser
    found = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(f"{tag} {k}" for k, _ in attrs if k.startswith("on"))

    P().feed(text)
    return found


def test_every_page_has_the_csp_and_escapes_every_value(live):
    names = live.import_catalog()
    job = _make_job(live, names, description='<script>alert("d")</script>')
    evil_job = live.svc.create_replication_job(
        serverId=names[XSS], seedReplicationTime=time.time() + 3600, frequency=12)["replicationJobId"]
    live.svc.start_on_demand_replication_run(replicationJobId=evil_job,
                                             description="<b onmouseover=alert(2)>")
    c = live.client()
    pages = ["/connectors", f"/connectors/{live.connector}", "/servers", "/servers?q=" + urllib.parse.quote(XSS),
             "/jobs", f"/jobs?q=%3Cscript", f"/jobs/{job}", f"/jobs/{evil_job}",
             f"/jobs/{job}/edit", f"/jobs/{job}/delete", "/servers/clear", "/images",
             f"/jobs/new?server={names[XSS]}&server={names['web01']}",
             f"/connectors/{live.connector}/disassociate", "/nowhere"]
    seen_escaped = 0
    for path in pages:
        r = c.get(path)
        assert r.status in (200, 404), path
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
        assert "unsafe-inline" not in csp and "http" not in csp and "*" not in csp
        assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Cache-Control"] == "no-store"
        # no inline script, no event handler attribute, no markup from the data
        assert re.findall(r"<script(?![^>]*\bsrc=\"/static/console\.js\")", r.text) == [], path
        assert _event_attributes(r.text) == [], path
        assert XSS not in r.text and "<script>alert" not in r.text and "<b onmouse" not in r.text
        seen_escaped += r.text.count("&lt;img src=x onerror=alert(1)&gt;")
    assert seen_escaped >= 5     # the VM name shows, as text, on several pages
    for name in ("console.js", "console.css"):
        r = c.get(f"/static/{name}")
        assert r.status == 200 and "Content-Security-Policy" in r.headers
        assert r.headers["Content-Type"].startswith("text/" + ("javascript" if name.endswith("js")
                                                               else "css"))
        assert b"http://" not in r.raw and b"https://" not in r.raw   # nothing from elsewhere


def test_live_progress_endpoint_reports_runs(live):
    names = live.import_catalog()
    job = _make_job(live, names)
    run = live.svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
    c = live.client()
    doc = json.loads(c.get("/live").raw)
    assert doc["runs"][run]["state"] == "PENDING" and doc["jobs"][job]["state"] == "PENDING"
    before = doc["fingerprint"]
    with live.svc.state.transaction() as db:     # what the executor writes while a run uploads
        db.execute("UPDATE runs SET state='ACTIVE', stage='uploading', stage_progress='42%' "
                   "WHERE run_id = ?", (run,))
    doc = json.loads(c.get("/live").raw)
    assert doc["runs"][run] == {"state": "ACTIVE", "stage": "uploading", "progress": "42%",
                                "message": "", "ami": ""}
    assert doc["fingerprint"] != before
    page = c.get(f"/jobs/{job}").text
    assert f'data-live="{doc["fingerprint"]}"' in page
    assert f'<progress data-run="{run}" data-f="bar" max="100" value="42"' in page


# --- the wizard's validation is the API's ------------------------------------------------------

@pytest.mark.parametrize("form,field,api", [
    ({"frequency": "30"}, "frequency", {"frequency": 30}),
    ({"frequency": "11"}, "frequency", {"frequency": 11}),
    ({"frequency": "twelve"}, "frequency", {"frequency": "twelve"}),
    ({"keep": "-1"}, "keep", {"numberOfRecentAmisToKeep": -1}),
    ({"role": "no spaces allowed"}, "role", {"roleName": "no spaces allowed"}),
    ({"description": "d" * 256}, "description", {"description": "d" * 256}),
    ({"start": "later", "start_utc": "2001-01-01T00:00:00.000Z"}, "start",
     {"seedReplicationTime": "2001-01-01T00:00:00.000Z"}),
    ({"start": "later", "start_utc": "<b>soon</b>"}, "start",
     {"seedReplicationTime": "<b>soon</b>"}),
    ({"start": "later", "start_local": "", "start_utc": ""}, "start", None),
])
def test_wizard_shows_the_api_refusal_next_to_the_field(live, form, field, api):
    names = live.import_catalog()
    sid = names["web01"]
    if form.get("start") == "later" and "start_utc" in form and form["start_utc"].startswith("2001"):
        pass
    elif form.get("start") != "later":
        form = dict(form, start="later",
                    start_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200)))
    c = live.client()
    c.get(f"/jobs/new?server={sid}")
    full = {"server": sid, f"license-{sid}": "AUTO", "step": "review", "frequency": "12",
            "keep": "0", **form}
    r = c.post("/jobs/new", full)
    assert r.status == 400
    errors = r.field_errors()
    assert list(errors) == [field], errors
    assert f'id="{ "start_local" if field == "start" else field }"' in r.text
    if api is not None:
        from smsblock.errors import ServiceError
        base = {"serverId": sid, "seedReplicationTime": time.time() + 7200, "frequency": 12}
        with pytest.raises(ServiceError) as e:
            live.svc.call("CreateReplicationJob", {**base, **api})
        assert errors[field] == re.sub(r"[&<>\"']", lambda m: {"&": "&amp;", "<": "&lt;",
                                                                 ">": "&gt;", '"': "&quot;",
                                                                 "'": "&#x27;"}[m.group()],
                                       f"{e.value.code}: {e.value}")
    # neither the review nor the refusal created anything
    assert live.svc.get_replication_jobs()["replicationJobList"] == []
    # the form keeps what was typed
    if "role" in form:
        assert 'value="no spaces allowed"' in r.text


def test_wizard_review_then_create_several_servers(live):
    names = live.import_catalog()
    ids = [names["web01"], names[XSS]]
    c = live.client()
    page = c.get(f"/jobs/new?server={ids[0]}&server={ids[1]}").text
    # the selected servers travel in the form (as elements, not as escaped text)
    assert re.findall(r'<input type="hidden" name="server" value="(s-[0-9a-f]{8})">', page) == ids
    assert re.search(r'<select id="license-s-[0-9a-f]{8}" name="license-s-[0-9a-f]{8}">', page)
    form = {"server": ids, f"license-{ids[0]}": "BYOL", f"license-{ids[1]}": "AUTO",
            "start": "later", "start_utc": time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                                         time.gmtime(time.time() + 86400)),
            "frequency": "24", "role": "sms-role", "description": "from the console",
            "keep": "3", "step": "review"}
    r = c.post("/jobs/new", form)
    assert r.status == 200 and "<h1>Review</h1>" in r.text
    assert live.svc.get_replication_jobs()["replicationJobList"] == []   # a dry run
    r = c.post("/jobs/new", dict(form, step="create"))
    assert r.flashes()[0].startswith("Created replication job(s) sms-job-")
    jobs = {j["serverId"]: j for j in live.svc.get_replication_jobs()["replicationJobList"]}
    assert set(jobs) == set(ids)
    j = jobs[ids[0]]
    assert j["licenseType"] == "BYOL" and j["frequency"] == 24 and j["roleName"] == "sms-role"
    assert j["description"] == "from the console" and j["numberOfRecentAmisToKeep"] == 3
    assert abs(j["seedReplicationTime"] - (time.time() + 86400)) < 60
    # a second time: the API's one-job-per-server rule, shown next to each server
    r = c.post("/jobs/new", dict(form, step="create"))
    assert r.status == 400
    errors = r.field_errors()
    assert set(errors) == {f"server-{i}" for i in ids}
    assert all("ReplicationJobAlreadyExistsException" in e for e in errors.values())


def test_edit_and_delete_through_the_console(live):
    names = live.import_catalog()
    job = _make_job(live, names)
    c = live.client()
    c.get(f"/jobs/{job}/edit")
    r = c.post(f"/jobs/{job}/edit", {"start": "keep", "frequency": "18", "license": "BYOL",
                                      "role": "r1", "description": "edited", "keep": "2"})
    assert r.flashes() == [f"Replication job {job} updated."]
    (j,) = live.svc.get_replication_jobs(replicationJobId=job)["replicationJobList"]
    assert (j["frequency"], j["licenseType"], j["roleName"], j["description"],
            j["numberOfRecentAmisToKeep"]) == (18, "BYOL", "r1", "edited", 2)
    r = c.post(f"/jobs/{job}/edit", {"start": "later", "start_utc": "2000-01-01T00:00:00Z",
                                      "frequency": "18", "license": "BYOL", "keep": "2"})
    assert r.status == 400 and "nextReplicationRunStartTime is in the past" in \
        r.field_errors()["start"]
    assert c.get(f"/jobs/{job}/delete").status == 200       # the confirmation page
    r = c.post(f"/jobs/{job}/delete")
    assert r.flashes() == [f"Replication job {job} is being deleted."]
    assert live.svc.get_replication_jobs()["replicationJobList"] == [] or \
        live.svc.get_replication_jobs()["replicationJobList"][0]["state"] == "DELETED"


def test_refusals_show_the_api_reason(live):
    names = live.import_catalog()
    job = _make_job(live, names)
    c = live.client()
    c.get("/connectors")
    r = c.post(f"/connectors/{live.connector}/disassociate")
    (msg,) = r.flashes()
    assert "OperationNotPermittedException" in msg and job in msg
    r = c.post("/servers/clear")
    assert "OperationNotPermittedException" in r.flashes()[0]
    assert live.catalog_status() == "AVAILABLE"


# --- the connector page: log bundle, settings ----------------------------------------------

def test_log_bundle_has_logs_and_settings_without_secrets(live, monkeypatch):
    monkeypatch.setenv("SMSBLOCK_VCENTER_PASSWORD", "vc-password-42")
    (live.svc.state.dir / "connector.log").write_text(
        f"started; secret={SECRET} and vc-password-42\nran\n")
    logging.getLogger("smsblock.test").warning(
        "a log line with the secret %s, vc-password-42 and Signature=%s", SECRET, "ab" * 32)
    c = live.client()
    cookie = c.cookies["smsblock_console"]
    c.get(f"/connectors/{live.connector}")
    r = c.get(f"/connectors/{live.connector}/log-bundle.zip")
    assert r.status == 200 and r.headers["Content-Type"] == "application/zip"
    assert "attachment" in r.headers["Content-Disposition"]
    z = zipfile.ZipFile(io.BytesIO(r.raw))
    assert {"settings.json", "logs/serve.log", "logs/connector.log"} <= set(z.namelist())
    everything = b"".join(z.read(n) for n in z.namelist())
    for secret in (SECRET, "vc-password-42", "ab" * 32, cookie):
        assert secret.encode() not in everything
    assert b"a log line with the secret <redacted>" in z.read("logs/serve.log")
    settings = json.loads(z.read("settings.json"))
    assert settings["connectors"][0]["connectorId"] == live.connector
    assert settings["connectors"][0]["sourceConfig"]["path"] == str(live.ds)
    assert settings["limits"]["on_demand_runs_per_day"] == 2


def test_vcenter_certificate_settings(tmp_path, monkeypatch):
    vsphere_tests = pytest.importorskip("test_vsphere")
    sim = vsphere_tests.Vcsim(tmp_path / "vcsim")
    try:
        monkeypatch.setenv("SMSBLOCK_VCENTER_PASSWORD", vsphere_tests.PASSWORD)
        svc = SmsService(tmp_path / "state")
        settings = vsphere_tests.VCenterSettings.from_options(sim.url, vsphere_tests.USER)
        cid = svc.register_connector("vsphere", settings.to_config())["connectorId"]
        srv = make_server(svc, "127.0.0.1", 0, ServerCredentials(AKID, SECRET))
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        c = Client(srv.url)
        c.sign_in(AKID, SECRET)
        page = c.get(f"/connectors/{cid}")
        assert "Ignore hostname mismatch and expiration errors" in page.text
        assert vsphere_tests.PASSWORD not in page.text

        def stored():
            return json.loads(svc.state.query("SELECT source_config FROM connectors")[0][0])

        bad = tmp_path / "not-a-cert.pem"
        bad.write_text("hello\n")
        for value, words in ((str(bad), "not a readable PEM"), ("relative.pem", "absolute path"),
                             (str(tmp_path / "missing.pem"), "no such file")):
            r = c.post(f"/connectors/{cid}/settings", {"ca_bundle": value, "insecure": "1"})
            assert words in r.flashes()[0]
            assert stored()["caBundle"] is None and stored()["insecure"] is False
        import ssl
        ca = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
        r = c.post(f"/connectors/{cid}/settings", {"ca_bundle": ca, "insecure": "1"})
        assert r.flashes()[0].startswith("Settings saved")
        assert stored()["caBundle"] == ca and stored()["insecure"] is True
        assert "checked" in c.get(f"/connectors/{cid}").text
        # the source reopens with them: the catalog still imports
        svc.import_server_catalog()
        deadline = time.time() + 60
        while svc.get_servers()["serverCatalogStatus"] == "IMPORTING" and time.time() < deadline:
            time.sleep(0.1)
        assert svc.get_servers()["serverCatalogStatus"] == "AVAILABLE"
        z = zipfile.ZipFile(io.BytesIO(c.get(f"/connectors/{cid}/log-bundle.zip").raw))
        assert all(vsphere_tests.PASSWORD.encode() not in z.read(n) for n in z.namelist())
        srv.shutdown()
        srv.server_close()
        svc.close()
    finally:
        sim.stop()


# --- the SMS API beside the console ------------------------------------------------------

def test_sms_api_is_unchanged_beside_the_console(live):
    from test_service_server import send, signed
    from smsblock.service.server import ServerCredentials as Creds
    creds = Creds(AKID, SECRET)
    status, doc = send(signed(live.url, "GetConnectors", b"{}", creds=creds, region="us-east-1"))
    assert status == 200 and doc["connectorList"][0]["connectorId"] == live.connector
    status, doc = send(signed(live.url, "ImportServerCatalog", b"{}", creds=creds,
                              drop=("Authorization",)))
    assert status == 400 and doc["__type"] == "MissingAuthenticationTokenException"
    # a console session is no API credential, and an API signature no console session
    c = live.client()
    status, doc = send(urllib.request.Request(
        live.url + "/", data=b"{}", method="POST", headers={
            "X-Amz-Target": "AWSServerMigrationService_V2016_10_24.ImportServerCatalog",
            "Cookie": "smsblock_console=" + c.cookies["smsblock_console"]}))
    assert status == 400 and doc["__type"] == "MissingAuthenticationTokenException"
    assert live.catalog_status() == "NOT_IMPORTED"
    # without the console, GET is the API's refusal as before
    srv = make_server(live.svc, "127.0.0.1", 0, creds, console=False)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        status, doc = send(urllib.request.Request(srv.url + "/", method="GET"))
        assert status == 405 and doc["__type"] == "UnknownOperationException"
    finally:
        srv.shutdown()
        srv.server_close()


def test_serve_output_stays_quiet_with_the_console(tmp_path):
    """The console's log buffer does not raise log levels: `smsblock serve` (no -v) prints
    no INFO line per request on stderr."""
    import subprocess
    import sys
    import os
    env = dict(os.environ, SMSBLOCK_ACCESS_KEY_ID=AKID,
               SMSBLOCK_SECRET_ACCESS_KEY=SECRET)
    proc = subprocess.Popen([sys.executable, "-m", "smsblock", "serve", "--state",
                             str(tmp_path / "state"), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().split("listening on ")[1].split()[0]
        assert Client(url).get("/login").status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "GET /login" not in err and "INFO" not in err, err


def _raw_post(url: str, path: str, length: int, cookie: str | None = None, method: str = "POST") -> bytes:
    """Send only the head of a request announcing ``length`` body bytes; the answer."""
    import socket
    from urllib.parse import urlsplit
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {length}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                + (f"Cookie: smsblock_console={cookie}\r\n" if cookie else "") + "\r\n")
        s.sendall(head.encode())
        return s.recv(4096)


def test_console_bodies_are_refused_before_they_are_read(live):
    """A signed-out client may send the sign-in form's few bytes only, a signed-in one a
    form of at most 256 KiB, and a page request no body: the answer comes at once, before
    any of the announced body was sent."""
    from smsblock.console import MAX_FORM_BODY, SIGNED_OUT_FORM_BODY
    assert _raw_post(live.url, "/login", SIGNED_OUT_FORM_BODY + 1).startswith(b"HTTP/1.1 413")
    assert _raw_post(live.url, "/servers", 10, method="GET").startswith(b"HTTP/1.1 400")
    cookie = live.client().cookies["smsblock_console"]
    assert _raw_post(live.url, "/catalog/import", MAX_FORM_BODY + 1, cookie).startswith(b"HTTP/1.1 413")
    # within its limit, the server waits for the body (nothing comes back at once)
    import socket
    with pytest.raises(socket.timeout):
        from urllib.parse import urlsplit
        u = urlsplit(live.url)
        with socket.create_connection((u.hostname, u.port), timeout=1) as s:
            s.sendall(f"POST /login HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: 100\r\n\r\n".encode())
            s.recv(4096)


def test_an_error_page_is_titled_with_the_status_phrase_or_error():
    from smsblock.console import _status_phrase
    assert _status_phrase(404) == "Not Found" and _status_phrase(413) == "Request Entity Too Large"
    assert _status_phrase(599) == "Error"
