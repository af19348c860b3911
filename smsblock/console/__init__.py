"""The web console: the SMS guide's console workflow, served by ``smsblock serve`` at ``/``.

Server-rendered HTML (every value escaped through :mod:`.render`), one CSS and one JS
file from package data (``static/``), no build step and nothing fetched from elsewhere.
The pages call the same :class:`~smsblock.service.api.SmsService` methods as the SMS API
(one console operation at a time, under ``Console.lock``; API calls never wait on it), so
the same rules and error messages apply.

Security:

* Sign-in with the access key id and secret the API checks SigV4 against.  A session is
  a random token held server-side (:class:`Sessions`) with an absolute expiry, sent as an
  ``HttpOnly; SameSite=Strict`` cookie (``Secure`` when the request came over TLS).
* Every POST carries a synchronizer token bound to its session (the sign-in form one
  bound to a short-lived pre-session cookie), and is refused when the browser says it
  comes from another origin (``Origin`` / ``Sec-Fetch-Site``).
* Every response has a content security policy without inline script or foreign
  origins, ``nosniff``, no framing, no caching.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from urllib.parse import parse_qs, quote, urlsplit

from ..errors import ServiceError, SmsBlockError
from .bundle import LogBuffer
from .render import Markup, esc, html

log = logging.getLogger(__name__)

SESSION_COOKIE = "smsblock_console"
LOGIN_COOKIE = "smsblock_login"
SESSION_SECONDS = 8 * 3600
LOGIN_FORM_SECONDS = 600
MAX_SESSIONS = 1000
MAX_FORM_BODY = 256 * 1024
SIGNED_OUT_FORM_BODY = 4096     # the sign-in form, the only one a signed-out client may send
#: failed sign-ins allowed per minute (all clients together) before answering 429
MAX_FAILED_LOGINS_PER_MINUTE = 20

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC = {"console.css": "text/css; charset=utf-8",
          "console.js": "text/javascript; charset=utf-8"}
#: a local path a sign-in may go back to
_NEXT = re.compile(r"/[A-Za-z0-9/_\-.?=&%+]{0,300}")


def _status_phrase(status: int) -> str:
    """The reason phrase of an HTTP status code, "Error" for a code HTTPStatus lacks."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    token: str
    csrf: str
    user: str
    expires: float
    flash: list[tuple[str, str]] = field(default_factory=list)   # (kind, message)


class Sessions:
    """Server-side sessions: random tokens, absolute expiry, bounded in number."""

    def __init__(self, lifetime: float = SESSION_SECONDS, limit: int = MAX_SESSIONS):
        self.lifetime = lifetime
        self.limit = limit
        self._lock = threading.Lock()
        self._by_token: dict[str, Session] = {}

    def create(self, user: str) -> Session:
        now = time.time()
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), user,
                    now + self.lifetime)
        with self._lock:
            self._expire(now)
            while len(self._by_token) >= self.limit:   # the oldest session goes first
                oldest = min(self._by_token.values(), key=lambda x: x.expires)
                del self._by_token[oldest.token]
            self._by_token[s.token] = s
        return s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            s = self._by_token.get(token)
            if s is not None and s.expires <= time.time():
                del self._by_token[token]
                return None
            return s

    def drop(self, token: str) -> None:
        with self._lock:
            self._by_token.pop(token, None)

    def _expire(self, now: float) -> None:
        for token in [t for t, s in self._by_token.items() if s.expires <= now]:
            del self._by_token[token]


class Request:
    """What a page handler needs of one HTTP request."""

    def __init__(self, handler, method: str, console: "Console"):
        self.handler = handler
        self.method = method
        parts = urlsplit(handler.path)
        self.path = parts.path
        self.query = {k: v for k, v in parse_qs(parts.query, max_num_fields=200).items()}
        self.headers = handler.headers
        self.form: dict[str, list[str]] = {}
        self.session: Session | None = None
        self.cookies = _cookies(handler.headers.get("Cookie", ""))
        self.secure = isinstance(getattr(handler, "connection", None), ssl.SSLSocket) or \
            handler.headers.get("X-Forwarded-Proto", "").lower() == "https"
        self.console = console

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    def field(self, name: str, default: str = "") -> str:
        values = self.form.get(name)
        return values[0] if values else default

    def fields(self, name: str) -> list[str]:
        return self.form.get(name, [])


class Response:
    def __init__(self, status: int = 200, body: bytes | str = b"",
                 content_type: str = "text/html; charset=utf-8", headers=None):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers: list[tuple[str, str]] = list(headers or [])


def redirect(location: str) -> Response:
    return Response(303, b"", headers=[("Location", location)])


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";")[:50]:
        name, sep, value = part.strip().partition("=")
        if sep and name not in out:
            out[name] = value
    return out


class Console:
    """The console of one :class:`~smsblock.service.server.SmsHttpServer`."""

    def __init__(self, server):
        self.server = server
        self.service = server.service
        self.sessions = Sessions()
        self.logs = LogBuffer.install()
        self._failures: list[float] = []
        self._failures_lock = threading.Lock()
        # the console's own operations one at a time (a page's several reads see one
        # state; the wizard's review is one transaction); API calls do not wait on it
        self.lock = threading.Lock()
        from . import pages
        self.pages = pages

    # --- entry points from the HTTP handler ----------------------------------------------

    def form_limit(self, headers) -> int:
        """The largest form body this request may send: a signed-out client (no live
        session cookie) only the sign-in form's few bytes."""
        session = self.sessions.get(_cookies(headers.get("Cookie", "")).get(SESSION_COOKIE))
        return MAX_FORM_BODY if session is not None else SIGNED_OUT_FORM_BODY

    def wants(self, method: str, target: str, headers) -> bool:
        """True for the requests the console serves: every GET, and POSTs that are not SMS
        API calls (those are ``POST /`` with an ``X-Amz-Target``)."""
        return method == "GET" or (method == "POST" and headers.get("X-Amz-Target") is None
                                   and urlsplit(target).path != "/")

    def handle(self, handler, method: str) -> None:
        try:
            req = Request(handler, method, self)
        except ValueError:       # more query fields than parse_qs allows
            req = Request.__new__(Request)
            req.path, req.session, req.console = "/", None, self
            return self._send(handler, req, self._error_page(req, 400, "bad query string"))
        try:
            resp = self._dispatch(req)
        except HttpError as e:
            resp = self._error_page(req, e.status, str(e))
        except Exception:
            log.exception("console: internal error on %s %s", method, req.path)
            resp = self._error_page(req, 500, "internal error; see the server log")
        self._send(handler, req, resp)

    def call(self, operation_method: str, **params):
        """A SmsService method under the console's lock (one console operation at a time)."""
        with self.lock:
            return getattr(self.service, operation_method)(**params)

    # --- dispatch ---------------------------------------------------------------------

    def _dispatch(self, req: Request) -> Response:
        if req.method == "GET" and req.path.startswith("/static/"):
            return self._static(req)
        if req.path == "/favicon.ico":     # browsers ask for it on every page; there is none
            raise HttpError(404, "no icon")
        if req.method == "POST":
            self._read_form(req)
            self._check_origin(req)
        req.session = self.sessions.get(req.cookies.get(SESSION_COOKIE))
        if req.path == "/login":
            return self.pages.login(req)
        if req.session is None:
            if req.method == "POST":
                raise HttpError(403, "your session has expired or you are signed out; sign in again")
            target = req.handler.path if _NEXT.fullmatch(req.handler.path) else "/"
            return redirect("/login" + ("" if target == "/" else "?next=" + quote(target, safe="")))
        if req.method == "POST":
            token = req.field("csrf")
            if not token or not hmac.compare_digest(token.encode(), req.session.csrf.encode()):
                raise HttpError(403, "the form's security token is missing or wrong "
                                     "(cross-site request refused); reload the page and try again")
        return self.pages.route(req)

    def _read_form(self, req: Request) -> None:
        h = req.headers
        if h.get("Transfer-Encoding"):
            req.handler.close_connection = True
            raise HttpError(411, "send the form with a Content-Length")
        try:
            length = int(h.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_FORM_BODY:
            req.handler.close_connection = True
            raise HttpError(413, f"the form must be 0..{MAX_FORM_BODY} bytes")
        body = req.handler.rfile.read(length)
        ctype = h.get("Content-Type", "application/x-www-form-urlencoded").split(";")[0].strip()
        if body and ctype != "application/x-www-form-urlencoded":
            raise HttpError(415, "forms are sent as application/x-www-form-urlencoded")
        try:
            req.form = parse_qs(body.decode("utf-8"), keep_blank_values=True,
                                max_num_fields=2000, strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "the form is not valid UTF-8 form data") from None

    def _check_origin(self, req: Request) -> None:
        """A state change must come from a page of this console: refused when the browser
        says the request comes from another origin or another site."""
        site = req.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise HttpError(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = req.headers.get("Origin")
        if origin is not None:
            host = req.headers.get("Host", "")
            allowed = {f"http://{host}", f"https://{host}"}
            if origin not in allowed:
                raise HttpError(403, "cross-origin request refused (Origin does not match Host)")

    def _static(self, req: Request) -> Response:
        name = req.path[len("/static/"):]
        if name not in STATIC:
            raise HttpError(404, "no such file")
        if req.session is None and name != "console.css":
            req.session = self.sessions.get(req.cookies.get(SESSION_COOKIE))
            if req.session is None:
                raise HttpError(403, "sign in first")
        data = resources.files(__package__).joinpath("static", name).read_bytes()
        return Response(200, data, STATIC[name])

    # --- sign-in bookkeeping ----------------------------------------------------------

    def check_credentials(self, access_key_id: str, secret: str) -> bool:
        now = time.time()
        with self._failures_lock:
            self._failures = [t for t in self._failures if t > now - 60]
            if len(self._failures) >= MAX_FAILED_LOGINS_PER_MINUTE:
                raise HttpError(429, "too many failed sign-ins; wait a minute")
        creds = self.server.credentials
        ok = hmac.compare_digest(access_key_id.encode(), creds.access_key_id.encode())
        ok &= hmac.compare_digest(secret.encode(), creds.secret_access_key.encode())
        if not ok:
            with self._failures_lock:
                self._failures.append(now)
            log.warning("console: failed sign-in for access key %r", access_key_id[:40])
        return bool(ok)

    # --- responses ----------------------------------------------------------------------

    def _error_page(self, req: Request, status: int, message: str) -> Response:
        title = _status_phrase(status)
        body = html('<h1>{}</h1><p class="error" role="alert">{}</p><p><a href="/">Back to the '
                    'console</a></p>', title, message)
        return Response(status, self.pages.layout(req, title, body, nav=req.session is not None))

    def _send(self, handler, req: Request, resp: Response) -> None:
        handler.send_response(resp.status)
        handler.send_header("Content-Type", resp.content_type)
        handler.send_header("Content-Length", str(len(resp.body)))
        handler.send_header("Content-Security-Policy", CSP)
        handler.send_header("X-Content-Type-Options", "nosniff")
        handler.send_header("X-Frame-Options", "DENY")
        handler.send_header("Referrer-Policy", "same-origin")
        handler.send_header("Cross-Origin-Opener-Policy", "same-origin")
        handler.send_header("Cross-Origin-Resource-Policy", "same-origin")
        handler.send_header("Cache-Control", "no-store")
        for name, value in resp.headers:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(resp.body)

    def cookie(self, req: Request, name: str, value: str, max_age: int) -> tuple[str, str]:
        secure = "; Secure" if req.secure else ""
        return ("Set-Cookie", f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; "
                              f"SameSite=Strict{secure}")


def service_error_text(e: SmsBlockError) -> str:
    """What a refusal looks like in a page: the SMS error name and the API's message."""
    if isinstance(e, ServiceError):
        return f"{e.code}: {e}"
    return str(e)


__all__ = ["Console", "Markup", "esc", "html"]
