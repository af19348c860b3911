"""The console's pages, named as in the SMS guide: Connectors, Servers, the Create
replication jobs wizard, Replication jobs, Images and the connector page.

Each handler takes a :class:`~smsblock.console.Request` and returns a
:class:`~smsblock.console.Response`.  State changes are POSTs answered with a redirect
(so a reload never repeats them); what they did, or the API's refusal, is shown once
on the next page.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time

from .. import __version__
from ..errors import SmsBlockError
from . import (LOGIN_COOKIE, LOGIN_FORM_SECONDS, SESSION_COOKIE, HttpError, Request, Response,
               _NEXT, redirect, service_error_text)
from .bundle import log_bundle
from .render import Markup, badge, field_error, html, invalid_attr, join, table, when

NAV = [("/connectors", "Connectors"), ("/servers", "Servers"),
       ("/jobs", "Replication jobs"), ("/images", "Images")]
_JOB = re.compile(r"sms-job-[0-9a-f]{8}")
_CONNECTOR = re.compile(r"c-[0-9a-f]{17}")
_SERVER = re.compile(r"s-[0-9a-f]{8}")
MAX_WIZARD_SERVERS = 50
DAY = 86400.0


# --- layout ------------------------------------------------------------------------------

def layout(req: Request, title: str, body: Markup, *, nav: bool = True,
           live: bool = False) -> str:
    """The page around ``body``: navigation, messages, sign-out, one CSS and one JS file."""
    session = req.session
    menu = Markup("")
    if nav and session is not None:
        links = join(html('<li><a href="{}"{}>{}</a></li>', href,
                          Markup(' aria-current="page"') if req.path.startswith(href) else "",
                          label) for href, label in NAV)
        menu = html('<nav aria-label="Main"><ul>{}</ul><form method="post" action="/logout">'
                    '{}<button type="submit" class="link">Sign out</button></form></nav>',
                    links, csrf_field(req))
    flashes = Markup("")
    if session is not None and session.flash:
        flashes = join(html('<p class="flash flash-{}" role="status">{}</p>', kind, message)
                       for kind, message in session.flash)
        session.flash.clear()
    fp = html(' data-live="{}"', live_fingerprint(req.console)) if live else Markup("")
    return html(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>{} - smsblock console</title><link rel="stylesheet" href="/static/console.css">'
        '{}</head><body><a class="skip" href="#main">Skip to content</a>'
        '<header><a class="brand" href="/">smsblock</a>{}</header>'
        '<main id="main"{}>{}{}</main><footer>smsblock {}</footer></body></html>',
        title, Markup('<script src="/static/console.js" defer></script>') if session else "",
        menu, fp, flashes, body, __version__)


def csrf_field(req: Request) -> Markup:
    return html('<input type="hidden" name="csrf" value="{}">', req.session.csrf)


def page(req: Request, title: str, body: Markup, *, live: bool = False, status: int = 200) -> Response:
    return Response(status, layout(req, title, body, live=live))


def flash(req: Request, kind: str, message: str) -> None:
    req.session.flash.append((kind, message))


def call(req: Request, method: str, **params):
    return req.console.call(method, **params)


def all_pages(req: Request, method: str, key: str, **params) -> tuple[dict, list]:
    """Every item of a paginated SMS list (the last response, the items)."""
    items, token = [], None
    while True:
        out = call(req, method, maxResults=1000, **params, **({"nextToken": token} if token else {}))
        items.extend(out.get(key, []))
        token = out.get("nextToken")
        if not token:
            return out, items


# --- routing -------------------------------------------------------------------------------

def route(req: Request) -> Response:
    p, m = req.path, req.method
    parts = [x for x in p.split("/") if x]
    if p == "/" and m == "GET":
        return redirect("/connectors")
    if p == "/logout" and m == "POST":
        return logout(req)
    if p == "/live" and m == "GET":
        return live(req)
    if parts[:1] == ["connectors"]:
        if len(parts) == 1 and m == "GET":
            return connectors(req)
        if len(parts) >= 2 and _CONNECTOR.fullmatch(parts[1]):
            cid = parts[1]
            if len(parts) == 2 and m == "GET":
                return connector_page(req, cid)
            if parts[2:] == ["disassociate"]:
                return disassociate(req, cid)
            if parts[2:] == ["settings"] and m == "POST":
                return connector_settings(req, cid)
            if parts[2:] == ["log-bundle.zip"] and m == "GET":
                return Response(200, log_bundle(req.console.server, req.console.logs),
                                "application/zip", headers=[(
                                    "Content-Disposition",
                                    f'attachment; filename="smsblock-logs-{cid}.zip"')])
    if parts[:1] == ["servers"]:
        if len(parts) == 1 and m == "GET":
            return servers(req)
        if parts[1:] == ["import"] and m == "POST":
            return import_catalog(req)
        if parts[1:] == ["clear"]:
            return clear_catalog(req)
    if parts[:1] == ["jobs"]:
        if len(parts) == 1 and m == "GET":
            return jobs_page(req)
        if parts[1:] == ["new"]:
            return wizard(req)
        if len(parts) >= 2 and _JOB.fullmatch(parts[1]):
            jid = parts[1]
            if len(parts) == 2 and m == "GET":
                return job_page(req, jid)
            if parts[2:] == ["edit"]:
                return edit_job(req, jid)
            if parts[2:] == ["run"] and m == "POST":
                return start_run(req, jid)
            if parts[2:] == ["delete"]:
                return delete_job(req, jid)
    if p == "/images" and m == "GET":
        return images(req)
    raise HttpError(404 if m == "GET" else 405, f"no page {p!r} for {m}")


# --- sign-in -------------------------------------------------------------------------------

def login(req: Request) -> Response:
    console = req.console
    error = None
    if req.method == "POST":
        pre = req.cookies.get(LOGIN_COOKIE, "")
        token = req.field("login_token")
        if not pre or not token or not hmac.compare_digest(pre.encode(), token.encode()):
            raise HttpError(403, "the sign-in form expired or came from elsewhere; "
                                 "open the sign-in page again")
        if console.check_credentials(req.field("access_key_id"), req.field("secret_access_key")):
            session = console.sessions.create(req.field("access_key_id"))
            target = req.field("next")
            target = target if _NEXT.fullmatch(target) and not target.startswith("//") else "/"
            resp = redirect(target)
            resp.headers.append(console.cookie(req, SESSION_COOKIE, session.token,
                                               int(console.sessions.lifetime)))
            resp.headers.append(console.cookie(req, LOGIN_COOKIE, "", 0))
            return resp
        error = "The access key ID or the secret access key is wrong."
    if req.session is not None and req.method == "GET":
        return redirect("/")
    # one pre-session token per browser: the page's own requests (favicon) that come
    # back here must not replace the one in the form the person is filling in
    token = req.cookies.get(LOGIN_COOKIE, "")
    if not re.fullmatch(r"[A-Za-z0-9_\-]{32}", token):
        token = secrets.token_urlsafe(24)
    body = html(
        '<section class="login"><h1>Sign in</h1>'
        '<p>Use the access key ID and secret access key the SMS API checks signatures against '
        '(<code>SMSBLOCK_ACCESS_KEY_ID</code>, <code>SMSBLOCK_SECRET_ACCESS_KEY</code>).</p>'
        '{}<form method="post" action="/login">'
        '<input type="hidden" name="login_token" value="{}"><input type="hidden" name="next" value="{}">'
        '<label for="access_key_id">Access key ID</label>'
        '<input id="access_key_id" name="access_key_id" autocomplete="username" required autofocus>'
        '<label for="secret_access_key">Secret access key</label>'
        '<input id="secret_access_key" name="secret_access_key" type="password" '
        'autocomplete="current-password" required>'
        '<button type="submit">Sign in</button></form></section>',
        html('<p class="error" role="alert">{}</p>', error) if error else "",
        token, req.field("next") or req.arg("next"))
    resp = Response(401 if error else 200, layout(req, "Sign in", body, nav=False))
    resp.headers.append(console.cookie(req, LOGIN_COOKIE, token, LOGIN_FORM_SECONDS))
    return resp


def logout(req: Request) -> Response:
    req.console.sessions.drop(req.session.token)
    resp = redirect("/login")
    resp.headers.append(req.console.cookie(req, SESSION_COOKIE, "", 0))
    return resp


# --- live progress ----------------------------------------------------------------------

def _live_state(console) -> dict:
    with console.lock:
        svc = console.service
        jobs, token = [], None
        while True:
            out = svc.get_replication_jobs(maxResults=1000, **({"nextToken": token} if token else {}))
            jobs.extend(out["replicationJobList"])
            token = out.get("nextToken")
            if not token:
                break
        catalog = svc.get_servers(maxResults=1)["serverCatalogStatus"]
    runs = {}
    for j in jobs:
        for r in j.get("replicationRunList", []):
            details = r.get("stageDetails") or {}
            runs[r["replicationRunId"]] = {
                "state": r["state"], "stage": details.get("stage") or "",
                "progress": details.get("stageProgress") or "",
                "message": r.get("statusMessage") or "", "ami": r.get("amiId") or ""}
    job_view = {j["replicationJobId"]: {"state": j["state"], "message": j.get("statusMessage") or "",
                                        "ami": j.get("latestAmiId") or ""} for j in jobs}
    # what changes the shape of a page (not the progress figures, which update in place)
    shape = json.dumps([catalog, sorted((k, v["state"], v["ami"]) for k, v in job_view.items()),
                        sorted((k, v["state"]) for k, v in runs.items())])
    return {"fingerprint": hashlib.sha256(shape.encode()).hexdigest()[:16],
            "catalog": catalog, "jobs": job_view, "runs": runs}


def live_fingerprint(console) -> str:
    return _live_state(console)["fingerprint"]


def live(req: Request) -> Response:
    return Response(200, json.dumps(_live_state(req.console)), "application/json")


def progress_cell(run_id: str, stage: str | None, progress: str | None) -> Markup:
    if not stage:       # not running: nothing to show (a run that starts reloads the page)
        return Markup('<span class="muted">-</span>')
    pct = _percent(progress)
    return html('<span data-run="{}" data-f="stage">{}</span> '
                '<progress data-run="{}" data-f="bar" max="100" value="{}" aria-label="progress">'
                '</progress> <span data-run="{}" data-f="progress">{}</span>',
                run_id, stage or "", run_id, pct, run_id, progress or "")


def _percent(progress: str | None) -> int:
    m = re.fullmatch(r"(\d{1,3})(?:\.\d+)?%", progress or "")
    return min(100, int(m.group(1))) if m else 0


# --- connectors ------------------------------------------------------------------------

def _connector_rows(req: Request) -> dict[str, dict]:
    """Connector id -> what the state knows beyond GetConnectors (heartbeat, source)."""
    rows = req.console.service.state.query(
        "SELECT connector_id, last_heartbeat, source_kind, source_config, store FROM connectors "
        "WHERE disassociated_on IS NULL")
    out = {}
    for r in rows:
        try:
            config = json.loads(r["source_config"])
        except ValueError:
            config = {}
        out[r["connector_id"]] = {"heartbeat": r["last_heartbeat"], "kind": r["source_kind"],
                                  "config": config if isinstance(config, dict) else {},
                                  "store": r["store"]}
    return out


def _source_text(extra: dict) -> str:
    c = extra.get("config", {})
    if extra.get("kind") == "datastore":
        return f"datastore {c.get('path', '?')}"
    if extra.get("kind") == "vsphere":
        return f"vCenter {c.get('address', '?')}"
    return str(extra.get("kind"))


def connectors(req: Request) -> Response:
    _, items = all_pages(req, "get_connectors", "connectorList")
    extra = _connector_rows(req)
    rows = []
    for c in items:
        cid = c["connectorId"]
        e = extra.get(cid, {})
        rows.append([html('<a href="/connectors/{}">{}</a>', cid, cid), c["version"],
                     badge(c["status"]), when(e.get("heartbeat")),
                     ", ".join(c.get("capabilityList", [])),
                     html("{}<br><span class=\"muted\">{}</span>", _source_text(e),
                          c.get("vmManagerName")),
                     html('<a class="button danger" href="/connectors/{}/disassociate">'
                          'Disassociate</a>', cid)])
    body = html('<h1>Connectors</h1><p>Register a connector with <code>smsblock connector '
                'register</code>; it shows up here.</p>{}',
                table(["Connector ID", "Version", "Status", "Last heartbeat", "Capabilities",
                       "vCenter or datastore", "Actions"], rows,
                      empty="No connector is associated."))
    return page(req, "Connectors", body, live=True)


def disassociate(req: Request, cid: str) -> Response:
    if req.method == "POST":
        try:
            call(req, "disassociate_connector", connectorId=cid)
        except SmsBlockError as e:
            flash(req, "error", f"Disassociate {cid} refused: {service_error_text(e)}")
            return redirect("/connectors")
        flash(req, "ok", f"Connector {cid} is disassociated.")
        return redirect("/connectors")
    body = html('<h1>Disassociate connector</h1><p>Disassociate connector <strong>{}</strong>? '
                'Its servers leave the catalog; it cannot be associated again (register a new one).'
                '</p><form method="post" action="/connectors/{}/disassociate">{}'
                '<button type="submit" class="danger">Disassociate</button> '
                '<a class="button" href="/connectors">Cancel</a></form>', cid, cid,
                csrf_field(req))
    return page(req, "Disassociate connector", body)


def connector_page(req: Request, cid: str) -> Response:
    _, items = all_pages(req, "get_connectors", "connectorList")
    c = next((x for x in items if x["connectorId"] == cid), None)
    if c is None:
        raise HttpError(404, f"connector {cid} is not associated")
    e = _connector_rows(req).get(cid, {})
    cfg = e.get("config", {})
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or \
        os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy")
    info = _dl([("Connector ID", cid), ("Health", badge(c["status"])),
                ("Last heartbeat", when(e.get("heartbeat"))), ("Version", c["version"]),
                ("Capabilities", ", ".join(c.get("capabilityList", []))),
                ("vCenter or datastore", _source_text(e)),
                ("Manager", f"{c.get('vmManagerName')} ({c.get('vmManagerType')})"),
                ("IP address", c.get("ipAddress")), ("Associated on", when(c.get("associatedOn"))),
                ("Block store", e.get("store"))])
    errors = {}
    if e.get("kind") == "vsphere":
        settings = html(
            '<form method="post" action="/connectors/{}/settings" class="settings">{}'
            '<label for="ca_bundle">CA bundle (PEM file on the connector machine)</label>'
            '<input id="ca_bundle" name="ca_bundle" value="{}"{}>{}'
            '<label class="check"><input type="checkbox" name="insecure" value="1"{}> Ignore '
            'hostname mismatch and expiration errors of vCenter and ESXi certificates (the chain '
            'is still verified)</label><button type="submit">Save settings</button></form>',
            cid, csrf_field(req), cfg.get("caBundle") or "", invalid_attr(errors, "ca_bundle"),
            field_error(errors, "ca_bundle"), Markup(" checked") if cfg.get("insecure") else "")
    else:
        settings = html('<p>A datastore connector reads VM folders from <code>{}</code> directly: '
                        'it has no vCenter certificates to check.</p>', cfg.get("path"))
    body = html(
        '<h1>Connector {}</h1>{}<h2>Settings</h2>{}'
        '<h3>Proxy</h3><p>{}</p>'
        '<h2>Log bundle</h2><p>The recent logs of this server and the settings of every '
        'connector, with every secret removed.</p>'
        '<p><a class="button" href="/connectors/{}/log-bundle.zip" download>Download log bundle'
        '</a></p>', cid, info, settings,
        html("Outbound connections use the proxy <code>{}</code> (from the environment).", proxy)
        if proxy else Markup("No proxy: set <code>HTTPS_PROXY</code> (and <code>NO_PROXY</code>) "
                             "in the environment of <code>smsblock serve</code> and "
                             "<code>smsblock connector run</code> to use one."),
        cid)
    return page(req, f"Connector {cid}", body, live=True)


def connector_settings(req: Request, cid: str) -> Response:
    from .settings import update_vcenter_settings
    try:
        with req.console.lock:
            update_vcenter_settings(req.console.service, cid, req.field("ca_bundle").strip() or None,
                                    req.field("insecure") == "1")
    except SmsBlockError as e:
        flash(req, "error", f"Settings not saved: {service_error_text(e)}")
    else:
        flash(req, "ok", "Settings saved; the connector uses them from its next connection.")
    return redirect(f"/connectors/{cid}")


def _dl(items) -> Markup:
    return html('<dl class="details">{}</dl>',
                join(html("<div><dt>{}</dt><dd>{}</dd></div>", k, v) for k, v in items))


# --- servers ---------------------------------------------------------------------------

def _matches(q: str, *values) -> bool:
    q = q.casefold()
    return not q or any(q in str(v or "").casefold() for v in values)


def servers(req: Request) -> Response:
    out, items = all_pages(req, "get_servers", "serverList")
    status = out["serverCatalogStatus"]
    q = req.arg("q")[:200]
    shown = [s for s in items if _matches(q, s["serverId"], s["vmServer"]["vmName"],
                                          s["vmServer"]["vmPath"], s["vmServer"]["vmManagerName"],
                                          s.get("replicationJobId"))]
    rows = []
    for s in shown:
        vm = s["vmServer"]
        sid = s["serverId"]
        has_job = s.get("replicationJobId") and not s.get("replicationJobTerminated")
        check = html('<input type="checkbox" name="server" value="{}" id="pick-{}" '
                     'aria-label="select {}"{}>', sid, sid, vm["vmName"],
                     Markup(" disabled") if has_job else "")
        if s.get("replicationJobId"):
            job = html('<a href="/jobs/{}">{}</a>{}', s["replicationJobId"], s["replicationJobId"],
                       "" if has_job else Markup(' <span class="muted">(ended)</span>'))
        else:
            job = Markup('<span class="muted">none</span>')
        rows.append([check, html('<label for="pick-{}">{}</label>', sid, vm["vmName"]),
                     vm["vmPath"], vm["vmManagerName"], sid, job])
    verb = "Re-import server catalog" if status in ("AVAILABLE", "IMPORTING") else \
        "Import server catalog"
    body = html(
        '<h1>Servers</h1><p id="catalog-status">Server catalog: {} {}</p>'
        '<div class="actions"><form method="post" action="/servers/import">{}'
        '<button type="submit">{}</button></form>'
        '<a class="button danger" href="/servers/clear">Clear server catalog</a></div>'
        '<form method="get" action="/servers" role="search" class="search">'
        '<label for="q">Search servers</label><input id="q" name="q" type="search" value="{}">'
        '<button type="submit">Search</button></form>'
        '<form method="get" action="/jobs/new"><p>{} of {} servers. Select servers, then '
        '<button type="submit">Create replication job</button></p>{}</form>',
        badge(status), when(out.get("lastModifiedOn")), csrf_field(req), verb, q,
        len(shown), len(items),
        table(["Select", "VM name", "VM path", "VM manager", "Server ID", "Replication job"],
              rows, empty="No servers: import the server catalog." if not items
              else "No server matches the search."))
    return page(req, "Servers", body, live=True)


def import_catalog(req: Request) -> Response:
    try:
        call(req, "import_server_catalog")
    except SmsBlockError as e:
        flash(req, "error", f"Import refused: {service_error_text(e)}")
    else:
        flash(req, "ok", "Server catalog import started.")
    return redirect("/servers")


def clear_catalog(req: Request) -> Response:
    if req.method == "POST":
        try:
            call(req, "delete_server_catalog")
        except SmsBlockError as e:
            flash(req, "error", f"Clear server catalog refused: {service_error_text(e)}")
        else:
            flash(req, "ok", "The server catalog is cleared.")
        return redirect("/servers")
    body = html('<h1>Clear server catalog</h1><p>Remove every server from the catalog? '
                'Replication jobs must be deleted first; import the catalog again to get the '
                'servers back.</p><form method="post" action="/servers/clear">{}'
                '<button type="submit" class="danger">Clear server catalog</button> '
                '<a class="button" href="/servers">Cancel</a></form>', csrf_field(req))
    return page(req, "Clear server catalog", body)


# --- the Create replication jobs wizard --------------------------------------------------

#: the SMS member a refusal names -> the wizard field it belongs next to
_FIELD_OF = [("seedReplicationTime", "start"), ("nextReplicationRunStartTime", "start"),
             ("frequency", "frequency"), ("runOnce", "frequency"), ("licenseType", "license"),
             ("roleName", "role"), ("description", "description"),
             ("numberOfRecentAmisToKeep", "keep")]


def _field_for(message: str, default: str) -> str:
    for member, name in _FIELD_OF:
        if member in message:
            return name
    return default


class _Rollback(Exception):
    pass


def _job_params(req: Request, *, create: bool) -> tuple[dict, dict]:
    """The SMS request members from the form (as the API would get them) and form errors."""
    errors: dict[str, str] = {}
    params: dict = {}
    start = req.field("start", "now")
    if start in ("now", "keep"):     # keep: the edit form leaves the schedule as it is
        if create:
            params["seedReplicationTime"] = time.time()
    else:
        when_ = req.field("start_utc") or req.field("start_local")
        if not when_:
            errors["start"] = "give a date and time to start, or start now"
        else:
            params["seedReplicationTime" if create else "nextReplicationRunStartTime"] = \
                _time_field(when_, bool(req.field("start_utc")))
    if req.field("run_once") == "1":
        params["runOnce"] = True
    else:
        params["frequency"] = _int_field(req.field("frequency"))
    for name, member in (("role", "roleName"), ("description", "description")):
        value = req.field(name).strip() if name == "role" else req.field(name)
        if value:
            params[member] = value
    keep = req.field("keep").strip()
    if keep:
        params["numberOfRecentAmisToKeep"] = _int_field(keep)
    return params, errors


def _time_field(text: str, is_utc: bool):
    """The browser's UTC ISO time (console.js fills it from the local-time field), or the
    local-time field itself read as UTC when script is off."""
    text = text.strip()
    if not is_utc and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?", text):
        return text + "Z"
    return text


def _int_field(text: str):
    """A whole number as int; anything else as given, so the API's rule names it."""
    text = (text or "").strip()
    return int(text) if re.fullmatch(r"-?\d{1,12}", text) else text


def _check_jobs(req: Request, server_ids: list[str], params: dict, licenses: dict,
                *, commit: bool) -> tuple[dict, list[str]]:
    """Run CreateReplicationJob for every server in one transaction: committed when
    ``commit`` and nothing was refused, else rolled back (the review's dry run).  The
    same rules as the API apply because it is the API's own method."""
    console = req.console
    errors: dict[str, str] = {}
    created: list[str] = []
    with console.lock:
        try:
            with console.service.state.transaction():
                for sid in server_ids:
                    p = dict(params, serverId=sid)
                    if licenses.get(sid) in ("AWS", "BYOL"):
                        p["licenseType"] = licenses[sid]
                    elif licenses.get(sid) not in (None, "", "AUTO"):
                        p["licenseType"] = licenses[sid]
                    try:
                        # through the wire entry point: the same type checks as the API
                        created.append(console.service.call("CreateReplicationJob", p)[
                            "replicationJobId"])
                    except SmsBlockError as e:
                        text = service_error_text(e)
                        name = _field_for(str(e), f"server-{sid}")
                        if name == "license":
                            name = f"license-{sid}"
                        errors.setdefault(name, text)
                if errors or not commit:
                    raise _Rollback
        except _Rollback:
            created = []
    return errors, created


def wizard(req: Request) -> Response:
    ids = req.fields("server") if req.method == "POST" else req.query.get("server", [])
    ids = list(dict.fromkeys(ids))
    if not ids:
        flash(req, "error", "Select at least one server first.")
        return redirect("/servers")
    if len(ids) > MAX_WIZARD_SERVERS or not all(_SERVER.fullmatch(s) for s in ids):
        raise HttpError(400, f"select 1 to {MAX_WIZARD_SERVERS} servers by their ids")
    _, items = all_pages(req, "get_servers", "serverList")
    by_id = {s["serverId"]: s for s in items}
    missing = [s for s in ids if s not in by_id]
    if missing:
        flash(req, "error", f"Not in the server catalog: {', '.join(missing)}")
        return redirect("/servers")
    servers_ = [by_id[s] for s in ids]
    licenses = {s: req.field(f"license-{s}", "AUTO") for s in ids}
    step = req.field("step") if req.method == "POST" else "settings"
    errors: dict = {}
    if step in ("review", "create"):
        params, errors = _job_params(req, create=True)
        if not errors:
            errs, created = _check_jobs(req, ids, params, licenses, commit=step == "create")
            errors.update(errs)
            if not errors and step == "create":
                flash(req, "ok", "Created replication job(s) " + ", ".join(created) + ".")
                return redirect("/jobs")
        if not errors and step == "review":
            return page(req, "Review", _review(req, servers_, licenses, params))
        step = "settings"
    return page(req, "Create replication jobs", _settings_form(req, servers_, licenses, errors),
                status=400 if errors else 200)


def _license_select(name: str, value: str, errors: dict) -> Markup:
    options = join(html('<option value="{}"{}>{}</option>', v, Markup(" selected") if v == value
                        else "", label)
                   for v, label in (("AUTO", "Auto"), ("AWS", "AWS"), ("BYOL", "BYOL")))
    return html('<select id="{}" name="{}"{}>{}</select>{}', name, name,
                invalid_attr(errors, name), options, field_error(errors, name))


def _settings_form(req: Request, servers_: list, licenses: dict, errors: dict) -> Markup:
    rows = []
    for s in servers_:
        sid = s["serverId"]
        rows.append([s["vmServer"]["vmName"], s["vmServer"]["vmPath"], sid,
                     html('<label class="sr" for="license-{}">License type of {}</label>{}{}',
                          sid, s["vmServer"]["vmName"],
                          _license_select(f"license-{sid}", licenses.get(sid, "AUTO"), errors),
                          field_error(errors, f"server-{sid}"))])
    f = req.field
    start_now = f("start", "now") == "now"
    run_once = f("run_once") == "1"
    freq = f("frequency", "12")
    freq_options = join(html('<option value="{}"{}>{} hours</option>', h,
                             Markup(" selected") if str(h) == freq else "", h)
                        for h in range(12, 25))
    return html(
        '<h1>Create replication jobs</h1>'
        '<form method="post" action="/jobs/new" class="wizard" novalidate>{}'
        '<h2>1. Server-specific settings</h2>'
        '<p class="hint">License type: Auto lets the service choose (Linux servers get BYOL '
        'only, as the guide says); AWS licenses Windows through AWS; BYOL brings your own.</p>{}'
        '<h2>2. Replication job settings</h2>'
        '<fieldset><legend>Replication job start</legend>'
        '<label class="check"><input type="radio" name="start" value="now"{}> Start replication '
        'job immediately</label>'
        '<label class="check"><input type="radio" name="start" value="later"{}> Start at '
        '(your local time, up to 30 days ahead)</label>'
        '<label for="start_local" class="sr">Start date and time</label>'
        '<input type="datetime-local" id="start_local" name="start_local" value="{}" '
        'data-utc="start_utc"{}><input type="hidden" id="start_utc" name="start_utc" value="">{}'
        '</fieldset>'
        '<fieldset><legend>Frequency</legend>'
        '<label for="frequency">Replicate every</label><select id="frequency" name="frequency"{}>'
        '{}</select><label class="check"><input type="checkbox" name="run_once" value="1"{}> '
        'Run once (one replication, then the job completes)</label>{}</fieldset>'
        '<label for="role">IAM role name (optional)</label>'
        '<input id="role" name="role" value="{}"{}>{}'
        '<label for="description">Description (optional, up to 255 characters)</label>'
        '<input id="description" name="description" value="{}"{}>{}'
        '<label for="keep">Number of recent AMIs to keep (0 keeps all)</label>'
        '<input id="keep" name="keep" inputmode="numeric" value="{}"{}>{}'
        '<input type="hidden" name="step" value="review">'
        '<p><button type="submit">Next: review</button> <a class="button" href="/servers">Cancel'
        '</a></p></form>',
        join(html('<input type="hidden" name="server" value="{}">', s["serverId"])
             for s in servers_) + csrf_field(req),
        table(["VM name", "VM path", "Server ID", "License type"], rows),
        Markup(" checked") if start_now else "", "" if start_now else Markup(" checked"),
        f("start_local"), invalid_attr(errors, "start"), field_error(errors, "start"),
        invalid_attr(errors, "frequency"), freq_options,
        Markup(" checked") if run_once else "", field_error(errors, "frequency"),
        f("role"), invalid_attr(errors, "role"), field_error(errors, "role"),
        f("description"), invalid_attr(errors, "description"), field_error(errors, "description"),
        f("keep", "0"), invalid_attr(errors, "keep"), field_error(errors, "keep"))


def _review(req: Request, servers_: list, licenses: dict, params: dict) -> Markup:
    f = req.field
    keep = ("start", "start_local", "start_utc", "frequency", "run_once", "role",
            "description", "keep")
    hidden = join(html('<input type="hidden" name="{}" value="{}">', k, f(k)) for k in keep)
    hidden += join(html('<input type="hidden" name="server" value="{}">'
                        '<input type="hidden" name="license-{}" value="{}">',
                        s["serverId"], s["serverId"], licenses.get(s["serverId"], "AUTO"))
                   for s in servers_)
    seed = params.get("seedReplicationTime")
    start = ("immediately" if f("start", "now") == "now"
             else when(_epoch(seed)) if _epoch(seed) is not None else seed)
    rows = [[s["vmServer"]["vmName"], s["serverId"],
             {"AUTO": "Auto"}.get(licenses.get(s["serverId"]), licenses.get(s["serverId"]))]
            for s in servers_]
    details = _dl([("Start", start),
                   ("Frequency", "run once" if params.get("runOnce") else
                    f"every {params.get('frequency')} hours"),
                   ("IAM role name", params.get("roleName") or "-"),
                   ("Description", params.get("description") or "-"),
                   ("Recent AMIs to keep", params.get("numberOfRecentAmisToKeep", 0))])
    return html(
        '<h1>Review</h1><h2>Servers</h2>{}<h2>Replication job settings</h2>{}'
        '<form method="post" action="/jobs/new">{}{}'
        '<button type="submit" name="step" value="create">Create</button> '
        '<button type="submit" name="step" value="settings" class="secondary">Back</button>'
        '</form>', table(["VM name", "Server ID", "License type"], rows), details,
        csrf_field(req), hidden)


def _epoch(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        from ..service.models import parse_timestamp
        return parse_timestamp(value).timestamp()
    except SmsBlockError:
        return None


# --- replication jobs --------------------------------------------------------------------

def jobs_page(req: Request) -> Response:
    _, items = all_pages(req, "get_replication_jobs", "replicationJobList")
    q = req.arg("q")[:200]
    shown = [j for j in items if _matches(
        q, j["replicationJobId"], j["serverId"], (j.get("vmServer") or {}).get("vmName"),
        j.get("state"), j.get("description"), j.get("statusMessage"), j.get("latestAmiId"))]
    rows = []
    for j in shown:
        jid = j["replicationJobId"]
        active = next((r for r in j.get("replicationRunList", [])
                       if r["state"] in ("ACTIVE", "PENDING")), None)
        prog = (progress_cell(active["replicationRunId"], (active.get("stageDetails") or {}).get("stage"),
                              (active.get("stageDetails") or {}).get("stageProgress"))
                if active else Markup('<span class="muted">-</span>'))
        rows.append([html('<a href="/jobs/{}">{}</a>', jid, jid),
                     (j.get("vmServer") or {}).get("vmName"), j["serverId"],
                     html('<span data-job="{}" data-f="state">{}</span>', jid, badge(j["state"])),
                     html('<span data-job="{}" data-f="message">{}</span>', jid,
                          j.get("statusMessage")),
                     prog, when(j.get("nextReplicationRunStartTime")),
                     j.get("latestAmiId") or "-"])
    body = html(
        '<h1>Replication jobs</h1>'
        '<form method="get" action="/jobs" role="search" class="search">'
        '<label for="q">Search replication jobs</label><input id="q" name="q" type="search" '
        'value="{}"><button type="submit">Search</button></form><p>{} of {} jobs.</p>{}',
        q, len(shown), len(items),
        table(["Job ID", "VM name", "Server ID", "State", "Status message", "Active run",
               "Next run", "Latest AMI"], rows,
              empty="No replication jobs: create one from the Servers page." if not items
              else "No job matches the search."))
    return page(req, "Replication jobs", body, live=True)


def _on_demand_left(req: Request, runs: list) -> int:
    limit = req.console.service.config.on_demand_runs_per_day
    now = req.console.service.clock()
    used = sum(1 for r in runs if r["type"] == "ON_DEMAND"
               and (r.get("scheduledStartTime") or 0) > now - DAY)
    return max(0, limit - used)


def _get_job(req: Request, jid: str) -> tuple[dict, list]:
    try:
        out, runs = all_pages(req, "get_replication_runs", "replicationRunList",
                              replicationJobId=jid)
    except SmsBlockError as e:
        raise HttpError(404, service_error_text(e)) from None
    return out["replicationJob"], runs


def job_page(req: Request, jid: str) -> Response:
    job, runs = _get_job(req, jid)
    left = _on_demand_left(req, runs)
    limit = req.console.service.config.on_demand_runs_per_day
    vm = job.get("vmServer") or {}
    info = _dl([("State", html('<span data-job="{}" data-f="state">{}</span>', jid,
                               badge(job["state"]))),
                ("Status message", html('<span data-job="{}" data-f="message">{}</span>', jid,
                                        job.get("statusMessage"))),
                ("Server", f"{vm.get('vmName')} ({job['serverId']})"), ("VM path", vm.get("vmPath")),
                ("Next run", when(job.get("nextReplicationRunStartTime"))),
                ("Latest AMI", job.get("latestAmiId") or "-"),
                ("Frequency", "run once" if job.get("runOnce") else f"every {job.get('frequency')} hours"),
                ("Seed replication time", when(job.get("seedReplicationTime"))),
                ("License type", job.get("licenseType")), ("IAM role name", job.get("roleName") or "-"),
                ("Description", job.get("description") or "-"),
                ("Recent AMIs to keep", job.get("numberOfRecentAmisToKeep"))])
    rows = []
    for r in runs:
        d = r.get("stageDetails") or {}
        rid = r["replicationRunId"]
        rows.append([rid, r["type"], html('<span data-run="{}" data-f="state">{}</span>', rid,
                                          badge(r["state"])),
                     progress_cell(rid, d.get("stage"), d.get("stageProgress")),
                     html('<span data-run="{}" data-f="message">{}</span>', rid,
                          r.get("statusMessage")),
                     html('<span data-run="{}" data-f="ami">{}</span>', rid, r.get("amiId") or ""),
                     when(r.get("scheduledStartTime")), when(r.get("completedTime"))])
    body = html(
        '<h1>Replication job {}</h1>{}'
        '<div class="actions"><a class="button" href="/jobs/{}/edit">Edit</a>'
        '<form method="post" action="/jobs/{}/run">{}<label for="run-description" class="sr">'
        'Run description</label><input id="run-description" name="description" '
        'placeholder="description (optional)"> '
        '<button type="submit"{}>Start replication run</button></form>'
        '<a class="button danger" href="/jobs/{}/delete">Delete</a></div>'
        '<p id="on-demand-left">{} of {} on-demand runs left in the current 24 hours.</p>'
        '<h2>Run history</h2>{}',
        jid, info, jid, jid, csrf_field(req), Markup(" disabled") if left == 0 else "",
        jid, left, limit,
        table(["Run ID", "Type", "State", "Stage and progress", "Status message", "AMI ID",
               "Scheduled start", "Completed"], rows, row_ids=[f"run-{r['replicationRunId']}"
                                                                 for r in runs],
              empty="No runs yet."))
    return page(req, f"Replication job {jid}", body, live=True)


def start_run(req: Request, jid: str) -> Response:
    params = {"replicationJobId": jid}
    if req.field("description"):
        params["description"] = req.field("description")
    try:
        run = call(req, "call", operation="StartOnDemandReplicationRun", params=params)
    except SmsBlockError as e:
        flash(req, "error", f"Start replication run refused: {service_error_text(e)}")
    else:
        flash(req, "ok", f"Replication run {run['replicationRunId']} started.")
    return redirect(f"/jobs/{jid}")


def edit_job(req: Request, jid: str) -> Response:
    job, _ = _get_job(req, jid)
    errors: dict = {}
    if req.method == "POST":
        params, errors = _job_params(req, create=False)
        params.pop("runOnce", None)
        if job.get("runOnce"):
            params.pop("frequency", None)
        if req.field("license") in ("AWS", "BYOL"):
            params["licenseType"] = req.field("license")
        if not errors:
            try:
                call(req, "call", operation="UpdateReplicationJob",
                     params=dict(params, replicationJobId=jid))
            except SmsBlockError as e:
                errors[_field_for(str(e), "general")] = service_error_text(e)
            else:
                flash(req, "ok", f"Replication job {jid} updated.")
                return redirect(f"/jobs/{jid}")
    f = req.field if req.method == "POST" else (lambda k, d="": {
        "frequency": str(job.get("frequency") or 12), "role": job.get("roleName") or "",
        "description": job.get("description") or "", "start": "keep",
        "keep": str(job.get("numberOfRecentAmisToKeep", 0)),
        "license": job.get("licenseType")}.get(k, d))
    freq_options = join(html('<option value="{}"{}>{} hours</option>', h,
                             Markup(" selected") if str(h) == f("frequency") else "", h)
                        for h in range(12, 25))
    lic = join(html('<option value="{}"{}>{}</option>', v, Markup(" selected")
                    if v == f("license") else "", v) for v in ("AWS", "BYOL"))
    body = html(
        '<h1>Edit replication job {}</h1>{}'
        '<form method="post" action="/jobs/{}/edit" class="wizard" novalidate>{}'
        '<fieldset><legend>Next replication run</legend>'
        '<label class="check"><input type="radio" name="start" value="keep"{}> Keep the schedule '
        '({})</label><label class="check"><input type="radio" name="start" value="later"{}> Next '
        'run at (your local time, up to 30 days ahead)</label>'
        '<label for="start_local" class="sr">Next run date and time</label>'
        '<input type="datetime-local" id="start_local" name="start_local" value="{}" '
        'data-utc="start_utc"{}><input type="hidden" id="start_utc" name="start_utc" value="">{}'
        '</fieldset>{}'
        '<label for="license">License type</label><select id="license" name="license"{}>{}</select>{}'
        '<label for="role">IAM role name</label><input id="role" name="role" value="{}"{}>{}'
        '<label for="description">Description</label>'
        '<input id="description" name="description" value="{}"{}>{}'
        '<label for="keep">Number of recent AMIs to keep (0 keeps all)</label>'
        '<input id="keep" name="keep" inputmode="numeric" value="{}"{}>{}'
        '<p><button type="submit">Save</button> <a class="button" href="/jobs/{}">Cancel</a></p>'
        '</form>',
        jid, html('<p class="error" role="alert">{}</p>', errors["general"])
        if errors.get("general") else "", jid, csrf_field(req),
        Markup(" checked") if f("start", "keep") == "keep" else "",
        when(job.get("nextReplicationRunStartTime")),
        Markup(" checked") if f("start", "keep") == "later" else "",
        f("start_local"), invalid_attr(errors, "start"), field_error(errors, "start"),
        Markup("") if job.get("runOnce") else html(
            '<label for="frequency">Replicate every</label><select id="frequency" '
            'name="frequency"{}>{}</select>{}', invalid_attr(errors, "frequency"), freq_options,
            field_error(errors, "frequency")),
        invalid_attr(errors, "license"), lic, field_error(errors, "license"),
        f("role"), invalid_attr(errors, "role"), field_error(errors, "role"),
        f("description"), invalid_attr(errors, "description"), field_error(errors, "description"),
        f("keep"), invalid_attr(errors, "keep"), field_error(errors, "keep"), jid)
    return page(req, f"Edit {jid}", body, status=400 if errors else 200)


def delete_job(req: Request, jid: str) -> Response:
    if req.method == "POST":
        try:
            call(req, "delete_replication_job", replicationJobId=jid)
        except SmsBlockError as e:
            flash(req, "error", f"Delete refused: {service_error_text(e)}")
            return redirect(f"/jobs/{jid}")
        flash(req, "ok", f"Replication job {jid} is being deleted.")
        return redirect("/jobs")
    body = html('<h1>Delete replication job</h1><p>Delete replication job <strong>{}</strong>? '
                'No further runs are made; its replicated blocks are removed from the store, '
                'its images are kept.</p><form method="post" action="/jobs/{}/delete">{}'
                '<button type="submit" class="danger">Delete</button> '
                '<a class="button" href="/jobs/{}">Cancel</a></form>', jid, jid,
                csrf_field(req), jid)
    return page(req, "Delete replication job", body)


# --- images --------------------------------------------------------------------------------

def images(req: Request) -> Response:
    from ..errors import ImageError
    from ..image.catalog import Catalog
    svc = req.console.service
    catalog = Catalog(svc.state.dir / "images")
    rows = svc.state.query("SELECT i.ami_id, i.job_id, i.run_id, i.created, i.deregistered "
                           "FROM images i ORDER BY i.created DESC, i.rowid DESC LIMIT 1000")
    blocks = []
    for r in rows:
        try:
            record = catalog.show(r["ami_id"])
        except (ImageError, SmsBlockError):
            record = None
        findings = (record or {}).get("findings") or []
        items = join(html('<li>{} <code>{}</code> {}</li>', badge(fi.get("severity")),
                          fi.get("code"), fi.get("message")) for fi in findings)
        os_ = ((record or {}).get("os") or {})
        os_text = os_.get("pretty_name") or os_.get("name") or os_.get("family") if \
            isinstance(os_, dict) else os_
        blocks.append(html(
            '<section class="image" id="image-{}"><h2>{}</h2>{}<h3>Validation findings</h3>{}'
            '</section>', r["ami_id"], r["ami_id"],
            _dl([("Replication job", html('<a href="/jobs/{}">{}</a>', r["job_id"], r["job_id"])),
                 ("Run", r["run_id"]), ("Registered", when(r["created"])),
                 ("Name", (record or {}).get("name")), ("Operating system", os_text or "-"),
                 ("License type", (record or {}).get("license_type") or "-"),
                 ("State", "deregistered" if r["deregistered"] or record is None
                  else "available")]),
            html("<ul class=\"findings\">{}</ul>", items) if findings
            else Markup('<p class="muted">No findings.</p>')))
    body = html('<h1>Images</h1><p>The images registered from replication runs, with what '
                'validation found in each.</p>{}', join(blocks) if blocks else
                Markup('<p class="muted">No images yet.</p>'))
    return page(req, "Images", body, live=True)
