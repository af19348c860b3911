"""``smsblock serve``: the SMS API over HTTP, in the SMS JSON 1.1 protocol.

Requests are ``POST /`` with ``X-Amz-Target: AWSServerMigrationService_V2016_10_24.<Op>``
and a JSON body; answers are JSON, errors ``{"__type": "<Code>", "message": "..."}``
with HTTP 400 (500 for a fault of the server itself).  So the unmodified AWS CLI and
boto3, given the official SMS model, talk to it with ``--endpoint-url``.

Every request must carry an AWS Signature Version 4 made with the configured
credentials (``SMSBLOCK_ACCESS_KEY_ID`` / ``SMSBLOCK_SECRET_ACCESS_KEY``) that binds the
whole request: the method and path, the headers ``host``, ``content-type``,
``x-amz-date`` and ``x-amz-target`` (all must be in SignedHeaders, as botocore signs
them), and the SHA-256 of the body bytes actually received (an ``X-Amz-Content-SHA256``
header must equal it; ``UNSIGNED-PAYLOAD`` is refused).  The credential scope must name
the service ``sms`` and the region ``serve`` runs as; requests whose X-Amz-Date is more
than 15 minutes before or after the server clock are refused (a signed request can be
replayed within that window).  All that can be checked without the body (the
Authorization format, key id, scope, date and signed header list) and the Content-Type
(``application/x-amz-json-1.1``) are checked before any of the body is read; a request
that fails authentication is answered and its connection closed.

A connector's own credential (:mod:`smsblock.service.fleet`, looked up on every request
so a revoked one is refused at once) signs the same way; it may call only the connector
operations (``X-Amz-Target: SmsBlockFleet_20261201.<Op>``, for its own connector id),
and the operator's credential may call none of them.  With ``tls_cert``/``tls_key``
(``serve --tls-cert --tls-key``) every connection is TLS 1.2 or later, its handshake done
in the connection's own thread under the head deadline.

The HTTP/1.1 layer is written here rather than taken from :mod:`http.server`, because
that one has no total deadline per request, keeps up to 100 header lines of 64 KiB,
reads the whole body into memory before anything is authenticated, and ignores
``Transfer-Encoding``.  Here (limits in :class:`Limits`): at most ``max_connections``
connections are served at once, ``max_connections_per_client`` of them from one client
address (more get 503 at once); a fresh or kept-alive connection must start a request
within ``idle_timeout``, its line and headers must arrive within ``head_timeout`` and
fit ``max_head`` bytes (header lines are parsed in linear time); the body must arrive
within ``idle_timeout + length / min_body_rate``, and never more than ``body_timeout``;
at most ``max_body`` bytes of it, of which only
``body_in_memory`` are held in memory before the signature is checked (the rest waits in
an unlinked file in the state directory); ``Transfer-Encoding`` is refused (411, or 400
with a Content-Length), as are duplicate headers, bare CR/LF, line folding and malformed
Content-Length.  Every HTTP-level refusal closes the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from http import HTTPStatus

from ..errors import ServiceError, SmsBlockError, UsageError
from . import fleet
from .api import SmsService, declared_error
# no answer echoes more than MAX_MESSAGE characters of what a request sent
from .models import bounded_message as bounded
from .sources import one_line

log = logging.getLogger(__name__)

TARGET_PREFIX = "AWSServerMigrationService_V2016_10_24."
CONTENT_TYPE = "application/x-amz-json-1.1"
SERVICE_NAME = "sms"             # the model's signingName (endpointPrefix)
DEFAULT_REGION = "us-east-1"
MAX_SKEW_SECONDS = 15 * 60
IMPORT_WAIT_SECONDS = 2.0     # ImportServerCatalog answers by then; the import goes on
ACCESS_KEY_ENV = "SMSBLOCK_ACCESS_KEY_ID"
SECRET_KEY_ENV = "SMSBLOCK_SECRET_ACCESS_KEY"
# what botocore signs for a JSON 1.1 request, and what decides what the request does
REQUIRED_SIGNED_HEADERS = ("content-type", "host", "x-amz-date", "x-amz-target")
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
REGION = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")


@dataclass(frozen=True)
class Limits:
    """What one client may make the server spend (defaults documented in docs/service.md)."""

    max_connections: int = 64       # served at once; more are answered 503 and closed
    max_connections_per_client: int = 16   # of those, from one client address
    idle_timeout: float = 5.0       # first byte of a request (fresh or kept-alive connection), s
    head_timeout: float = 10.0      # request line + headers deadline, s
    body_timeout: float = 30.0      # whole body deadline, s (at most; see min_body_rate)
    min_body_rate: int = 64 * 1024  # bytes/s: a body has idle_timeout + length/rate seconds
    send_timeout: float = 30.0      # whole response deadline, s
    max_head: int = 8192            # request line + headers, bytes
    max_headers: int = 48
    max_body: int = 1 << 20
    body_in_memory: int = 8192      # body bytes held in memory before the signature is checked


MAX_BODY = Limits.max_body
_CHUNK = 4096                       # one recv
_LINGER_BYTES = 64 * 1024           # drained after a refusal so the client sees the answer
_LINGER_SECONDS = 1.0

_AUTH = re.compile(r"AWS4-HMAC-SHA256 +Credential=([^/\s,]+)/(\d{8})/([^/\s,]+)/([^/\s,]+)/"
                   r"aws4_request, *SignedHeaders=([a-z0-9;\-]+), *Signature=([0-9a-f]{64})")
_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_FIELD_NAME = re.compile(_TOKEN)
# what a field value may hold (visible ASCII, space, tab): checked by deleting these bytes,
# in linear time (a regex with a repeated class between two anchored ends is quadratic)
_FIELD_VALUE_BYTES = bytes(range(0x20, 0x7f)) + b"\t"
_CONTENT_LENGTH = re.compile(r"[0-9]{1,16}")


@dataclass(frozen=True)
class ServerCredentials:
    access_key_id: str
    secret_access_key: str
    #: set for a connector's own credential (smsblock.service.fleet): who it acts for
    connector_id: str | None = None

    def __repr__(self) -> str:   # never print the secret
        return f"ServerCredentials(access_key_id={self.access_key_id!r})"

    @classmethod
    def from_environment(cls, environ=None) -> "ServerCredentials":
        environ = os.environ if environ is None else environ
        akid, secret = environ.get(ACCESS_KEY_ENV), environ.get(SECRET_KEY_ENV)
        if not akid or not secret:
            raise UsageError(f"set {ACCESS_KEY_ENV} and {SECRET_KEY_ENV}: the server checks "
                             "every request's SigV4 signature against them")
        return cls(akid, secret)


class AuthError(ServiceError):
    """The request is not authenticated: answered, then the connection is closed."""


def _auth_error(message: str, code: str = "InvalidSignatureException") -> ServiceError:
    return AuthError(message, code)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def check_auth_header(headers, creds, *, region: str = DEFAULT_REGION,
                      service: str = SERVICE_NAME, now: datetime | None = None):
    """What can be checked of a SigV4 signature before the body is read: the
    Authorization format, the key id, the credential scope, X-Amz-Date within
    ±MAX_SKEW_SECONDS of ``now``, and the signed header list.  ``creds`` is one
    :class:`ServerCredentials` or a lookup ``f(access_key_id) -> ServerCredentials |
    None``.  Raises AuthError; returns ``(date, amz_date, names, signed, signature)``."""
    return _check_head(headers, creds, region=region, service=service, now=now)[1:]


def _check_head(headers, creds, *, region: str, service: str, now: datetime | None):
    """:func:`check_auth_header`, with the credentials the key id named first."""
    header = headers.get("authorization")
    if not header:
        raise _auth_error("Missing Authentication Token", "MissingAuthenticationTokenException")
    m = _AUTH.fullmatch(header.strip())
    if m is None:
        raise _auth_error("the Authorization header is not an AWS4-HMAC-SHA256 signature",
                          "IncompleteSignatureException")
    akid, date, scope_region, scope_service, signed, signature = m.groups()
    if callable(creds):     # the operator's key, or a connector's (looked up each request:
        creds = creds(akid)  # a revoked one is refused at once)
    if creds is None or not hmac.compare_digest(akid.encode(), creds.access_key_id.encode()):
        raise _auth_error("The security token included in the request is invalid.",
                          "UnrecognizedClientException")
    if scope_service != service:
        raise _auth_error(f"Credential should be scoped to correct service: '{service}'.")
    if scope_region != region:
        raise _auth_error(f"Credential should be scoped to a valid region, not "
                          f"'{scope_region[:64]}' (this server is {region}: serve --region).")
    amz_date = headers.get("x-amz-date")
    if not amz_date:
        raise _auth_error("the request has no X-Amz-Date header", "IncompleteSignatureException")
    try:
        if not _AMZ_DATE.fullmatch(amz_date):
            raise ValueError
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise _auth_error(f"X-Amz-Date {amz_date[:40]!r} is not YYYYMMDDTHHMMSSZ",
                          "IncompleteSignatureException") from None
    if amz_date[:8] != date:
        raise _auth_error("the credential scope date does not match X-Amz-Date")
    now = now or datetime.now(timezone.utc)
    if abs((now - when).total_seconds()) > MAX_SKEW_SECONDS:
        raise _auth_error(f"Signature expired: {amz_date} is more than 15 minutes before or "
                          f"after the server time {now.strftime('%Y%m%dT%H%M%SZ')}")
    names = signed.split(";")
    if names != sorted(set(names)) or "" in names:
        raise _auth_error("SignedHeaders must be sorted, distinct header names",
                          "IncompleteSignatureException")
    missing = [n for n in REQUIRED_SIGNED_HEADERS if n not in names]
    if missing:
        raise _auth_error(f"the signature must cover the headers {', '.join(missing)} "
                          f"(it covers {', '.join(names)[:200]})", "IncompleteSignatureException")
    return creds, date, amz_date, names, signed, signature


def verify_sigv4(method: str, path: str, headers, payload_sha256: str, creds,
                 *, region: str = DEFAULT_REGION, service: str = SERVICE_NAME,
                 now: datetime | None = None) -> ServerCredentials:
    """Raise AuthError unless the request is signed with ``creds`` (SigV4, header form;
    ``creds`` may be a lookup, as for :func:`check_auth_header`); returns the credentials
    that signed it.

    ``headers`` maps lower-case names to values (one value each); ``path`` is the request
    target, which must be canonical already (no query, no escapes: ``/``);
    ``payload_sha256`` is the hex SHA-256 of the body as received.
    """
    creds, date, amz_date, names, signed, signature = _check_head(
        headers, creds, region=region, service=service, now=now)
    claimed = headers.get("x-amz-content-sha256")
    if claimed is not None and claimed != payload_sha256:
        if claimed == UNSIGNED_PAYLOAD or claimed.startswith("STREAMING-"):
            raise _auth_error(f"X-Amz-Content-SHA256 {claimed[:40]!r}: the body must be signed")
        raise _auth_error("X-Amz-Content-SHA256 does not match the SHA-256 of the body received")
    canonical = [method, path, ""]
    for name in names:
        value = headers.get(name)
        if value is None:
            raise _auth_error(f"signed header {name[:40]!r} is missing from the request")
        canonical.append(f"{name}:{' '.join(value.split())}")
    canonical += ["", signed, payload_sha256]
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256("\n".join(canonical).encode()).hexdigest()])
    key = ("AWS4" + creds.secret_access_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = _hmac(key, part)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise _auth_error("The request signature we calculated does not match the signature "
                          "you provided. Check your AWS Secret Access Key and signing method.")
    return creds


def decode_json_body(body: bytes):
    """The request body as a JSON object: UTF-8, no NaN/Infinity, no duplicate keys,
    bounded depth.  Only an empty body means ``{}``; any other JSON value is refused."""
    if not body:
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServiceError(f"the request body is not UTF-8 (byte {e.start})",
                           "SerializationException") from None

    def pairs(items):
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key")
        return out

    def constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError) as e:
        reason = "nests too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise ServiceError(f"the request body is not JSON: {reason}",
                           "SerializationException") from None
    if not isinstance(value, dict):
        raise ServiceError(f"the request body must be a JSON object, not "
                           f"{'null' if value is None else type(value).__name__}", "SerializationException")
    return value


# --- the HTTP/1.1 layer --------------------------------------------------------------------

class _HttpError(Exception):
    """A request refused at the HTTP level: answered, then the connection is closed."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: dict[str, str]


class _Wire:
    """One connection's reads, each under a deadline, into buffers of bounded size."""

    def __init__(self, sock: socket.socket, limits: Limits):
        self.sock, self.limits = sock, limits
        self.buf = bytearray()          # never more than max_head + 4 bytes
        self.chunk = bytearray(_CHUNK)

    def _recv(self, deadline: float, room: int) -> memoryview:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        n = self.sock.recv_into(self.chunk, min(room, _CHUNK))
        return memoryview(self.chunk)[:n]

    def read_head(self) -> bytes | None:
        """The request line and headers (without the blank line); None at a clean EOF or
        when an idle connection's time is up."""
        limits = self.limits
        start = time.monotonic()
        deadline = start + limits.head_timeout
        # a fresh or kept-alive connection gets a shorter time to start a request
        first_byte = start + min(limits.idle_timeout, limits.head_timeout)
        while True:
            while self.buf[:2] == b"\r\n":      # empty lines before a request are allowed
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return head
            if len(self.buf) >= limits.max_head:
                raise _HttpError(431, "RequestHeaderFieldsTooLarge",
                                 f"the request line and headers exceed {limits.max_head} bytes")
            try:
                data = self._recv(deadline if self.buf else first_byte,
                                  limits.max_head + 4 - len(self.buf))
            except TimeoutError:
                if not self.buf:
                    return None
                raise _HttpError(408, "RequestTimeout", f"the request headers did not arrive "
                                 f"within {limits.head_timeout:g} s") from None
            if not data:
                if self.buf:
                    raise ConnectionAbortedError("closed inside the request headers")
                return None
            self.buf += data

    def read_body(self, length: int, sink) -> None:
        """``length`` bytes into ``sink(view)``, from what is buffered, then the socket."""
        limits = self.limits
        # a body must keep up a minimum rate: a small one gets a few seconds, not body_timeout
        allowed = min(limits.body_timeout, limits.idle_timeout + length / limits.min_body_rate)
        deadline = time.monotonic() + allowed
        take = min(length, len(self.buf))
        if take:
            sink(bytes(self.buf[:take]))    # a copy: the buffer cannot shrink while viewed
            del self.buf[:take]
            length -= take
        while length:
            try:
                data = self._recv(deadline, length)
            except TimeoutError:
                raise _HttpError(408, "RequestTimeout", f"the request body did not arrive "
                                 f"within {allowed:.3g} s") from None
            if not data:
                raise ConnectionAbortedError("closed inside the request body")
            sink(data)
            length -= len(data)


def _parse_head(head: bytes, limits: Limits) -> _Request:
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise _HttpError(400, "SerializationException", "bare CR or LF in the request head")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise _HttpError(400, "SerializationException", "malformed request line")
    method, target, major, minor = m.groups()
    version = (int(major), int(minor))
    if version not in ((1, 0), (1, 1)):
        raise _HttpError(505, "SerializationException", "only HTTP/1.0 and HTTP/1.1 are served")
    if len(lines) - 1 > limits.max_headers:
        raise _HttpError(431, "RequestHeaderFieldsTooLarge",
                         f"more than {limits.max_headers} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        # field-name ":" OWS field-value OWS, parsed in one linear pass
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not _FIELD_NAME.fullmatch(name) or value.translate(None, _FIELD_VALUE_BYTES):
            raise _HttpError(400, "SerializationException",
                             f"malformed header field {line[:40]!r} (folded, non-ASCII, or "
                             "space before the colon)")
        name = name.decode().lower()
        if name in headers:
            raise _HttpError(400, "SerializationException", f"header {name[:40]} appears twice")
        headers[name] = value.decode()
    return _Request(method.decode(), target.decode(), version, headers)


def _body_length(req: _Request, limits: Limits) -> int:
    headers = req.headers
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise _HttpError(400, "SerializationException",
                             "a request may not have both Transfer-Encoding and Content-Length")
        raise _HttpError(411, "SerializationException",
                         "Transfer-Encoding is not accepted; send a Content-Length")
    if req.version >= (1, 1) and "host" not in headers:
        raise _HttpError(400, "SerializationException", "an HTTP/1.1 request needs a Host header")
    text = headers.get("content-length")
    if text is None:
        return 0
    if not _CONTENT_LENGTH.fullmatch(text):
        raise _HttpError(400, "SerializationException", f"Content-Length {text[:40]!r} is not a number")
    length = int(text)
    if length > limits.max_body:
        raise _HttpError(413, "SerializationException",
                         f"request body must be 0..{limits.max_body} bytes")
    return length


class _HeaderView:
    """Case-insensitive ``get`` over the parsed (lower-case) header fields."""

    def __init__(self, fields: dict[str, str]):
        self._fields = fields

    def get(self, name: str, default=None):
        return self._fields.get(name.lower(), default)


class _ConsoleExchange:
    """What the web console uses of an http.server handler (``path``, ``headers``,
    ``rfile``, ``send_response``/``send_header``/``end_headers``, ``wfile.write``,
    ``close_connection``), over this module's HTTP layer."""

    def __init__(self, req: _Request, body, sock: socket.socket):
        self.path = req.target
        self.headers = _HeaderView(req.headers)
        self.rfile = body
        self.connection = sock
        self.close_connection = False
        self.status = 500
        self.response_headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.wfile = self

    def send_response(self, status: int) -> None:
        self.status = status

    def send_header(self, name: str, value: str) -> None:
        if "\r" in value or "\n" in value:      # never split a header
            raise ValueError(f"header {name} holds a line break")
        self.response_headers.append((name, value))

    def end_headers(self) -> None:
        pass

    def write(self, data) -> None:
        self.chunks.append(bytes(data))


class SmsRequestHandler(socketserver.BaseRequestHandler):
    server: "SmsHttpServer"

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        try:
            # the answer goes out in one write; without this a keep-alive client waits for
            # a delayed ACK on small writes
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def _handshake(self) -> bool:
        """TLS (serve --tls-cert): the handshake, in this connection's thread (never in
        the accept loop) and under the head deadline; False when it fails."""
        ctx = self.server.ssl_context
        if ctx is None:
            return True
        try:
            self.sock.settimeout(self.server.limits.head_timeout)
            self.sock = ctx.wrap_socket(self.sock, server_side=True)
            self.request = self.sock
            return True
        except (OSError, ssl.SSLError) as e:
            log.info("%s: TLS handshake failed: %s", self.client_address[0], e)
            return False

    def handle(self) -> None:
        if not self._handshake():
            return
        limits = self.server.limits
        wire = _Wire(self.sock, limits)
        while True:
            try:
                head = wire.read_head()
                if head is None:
                    return
                req = _parse_head(head, limits)
                if not self._serve(wire, req):
                    return
            except _HttpError as e:
                log.info("%s refused: %s %s", self.client_address[0], e.status, e.message)
                try:
                    self._send(e.status, {"__type": e.code, "message": bounded(e.message)},
                               close=True)
                except OSError:
                    return
                self._linger(wire.chunk)
                return
            except OSError:   # reset, closed mid-request, timed out while sending
                return

    def _serve(self, wire: _Wire, req: _Request) -> bool:
        """Answer one request; whether the connection stays open."""
        limits = self.server.limits
        length = _body_length(req, limits)
        keep = req.version == (1, 1) and req.headers.get("connection", "").lower() != "close"
        console = self.server.console
        if console is not None and console.wants(req.method, req.target, _HeaderView(req.headers)):
            return self._serve_console(console, wire, req, length, keep)
        if req.method != "POST" or req.target != "/":
            # nothing of the body is read: answer and close
            raise _HttpError(400 if req.method == "POST" else 405, "UnknownOperationException",
                             "the SMS API takes POST / requests")
        srv = self.server
        try:
            # nothing of an unauthenticated body is read: what can be checked of the
            # signature without the body is checked first, and a refusal closes
            check_auth_header(req.headers, srv.lookup, region=srv.region)
        except AuthError as e:
            raise _HttpError(e.http_status, e.code, str(e)) from None
        ctype = req.headers.get("content-type", "")
        if ctype.lower() != CONTENT_TYPE:
            raise _HttpError(400, "SerializationException",
                             f"Content-Type {ctype[:60]!r}: the SMS API takes {CONTENT_TYPE}")
        expect = req.headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue" or req.version < (1, 1):
                raise _HttpError(417, "SerializationException", f"Expect {expect[:40]!r}")
            self.sock.settimeout(limits.send_timeout)
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        digest = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(max_size=limits.body_in_memory,
                                           dir=self.server.spool_dir) as spool:
            def sink(view):
                digest.update(view)
                spool.write(view)
            wire.read_body(length, sink)
            status, payload, authenticated = self._dispatch(req, digest.hexdigest(), spool)
        keep = keep and authenticated       # a failed signature closes the connection
        self._send(status, payload, close=not keep)
        return keep

    def _serve_console(self, console, wire: _Wire, req: _Request, length: int, keep: bool) -> bool:
        """A web console request (smsblock.console): its body is spooled like the API's
        (a few KiB in memory at most, whoever sends it), the console answers through an
        exchange that looks like http.server's handler, and the answer goes out in one write."""
        limits = self.server.limits
        # refused before a byte of it is read: a page takes no body, a signed-out client
        # sends the sign-in form only, a signed-in one a form of at most MAX_FORM_BODY
        if req.method != "POST" and length:
            raise _HttpError(400, "SerializationException", f"a {req.method} request has no body")
        limit = console.form_limit(_HeaderView(req.headers))
        if length > limit:
            raise _HttpError(413, "SerializationException", f"a console form must be 0..{limit} "
                             "bytes (signed out: the sign-in form only)")
        with tempfile.SpooledTemporaryFile(max_size=limits.body_in_memory,
                                           dir=self.server.spool_dir) as spool:
            wire.read_body(length, spool.write)
            spool.seek(0)
            exchange = _ConsoleExchange(req, spool, self.sock)
            console.handle(exchange, req.method)
        keep = keep and not exchange.close_connection
        head = [f"HTTP/1.1 {exchange.status} {HTTPStatus(exchange.status).phrase}",
                f"Date: {formatdate(usegmt=True)}", "Server: smsblock-sms"]
        head += [f"{name}: {value}" for name, value in exchange.response_headers]
        if not keep:
            head.append("Connection: close")
        self.sock.settimeout(limits.send_timeout)
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + b"".join(exchange.chunks))
        return keep

    def _dispatch(self, req: _Request, payload_sha256: str, spool) -> tuple[int, dict, bool]:
        """The answer's status and payload, and whether the request was authenticated."""
        srv = self.server
        operation = None
        try:
            principal = verify_sigv4("POST", "/", req.headers, payload_sha256, srv.lookup,
                                     region=srv.region)
            target = req.headers["x-amz-target"]
            fleet_op = target.startswith(fleet.TARGET_PREFIX)
            if not fleet_op and not target.startswith(TARGET_PREFIX):
                raise ServiceError(f"X-Amz-Target {target[:80]!r} is not an SMS operation",
                                   "UnknownOperationException")
            operation = target[len(fleet.TARGET_PREFIX if fleet_op else TARGET_PREFIX):]
            if not fleet_op and principal.connector_id is not None:
                raise ServiceError(f"{operation[:80]}: a connector's credential may call only "
                                   "the connector operations", "AccessDeniedException")
            spool.seek(0)
            params = decode_json_body(spool.read())   # authenticated: may be max_body bytes
            if fleet_op:    # smsblock's own connector operations (smsblock.service.fleet)
                result = srv.fleet.call(operation, params, principal.connector_id)
            else:
                result = srv.service.call(operation, params)
            log.info("%s %s 200", self.client_address[0], operation)
            return 200, result, True
        except AuthError as e:
            log.info("%s refused: %s", self.client_address[0], e.code)
            return e.http_status, {"__type": e.code, "message": bounded(str(e))}, False
        except ServiceError as e:
            code = declared_error(operation, e.code) if operation else e.code
            status = 500 if code in ("InternalError", "InternalFailure") else e.http_status
            log.info("%s %s %s %s", self.client_address[0], operation, status, code)
            return status, {"__type": code, "message": bounded(str(e))}, True
        except SmsBlockError as e:
            code = declared_error(operation, "InvalidParameterException") if operation \
                else "InvalidParameterException"
            return 400, {"__type": code, "message": bounded(str(e))}, True
        except Exception:
            log.exception("internal error")
            code = declared_error(operation, "InternalError") if operation else "InternalError"
            return 500, {"__type": code, "message": "internal error; see the server log"}, True

    def _send(self, status: int, payload: dict, close: bool) -> None:
        body = json.dumps(payload).encode()
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                 f"Content-Type: {CONTENT_TYPE}",
                 f"Content-Length: {len(body)}",
                 f"x-amzn-RequestId: {os.urandom(16).hex()}",
                 f"Date: {formatdate(usegmt=True)}",
                 "Server: smsblock-sms"]
        if close:
            lines.append("Connection: close")
        self.sock.settimeout(self.server.limits.send_timeout)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def _linger(self, chunk: bytearray) -> None:
        """Stop sending, then read and drop a little of what the client still sends, so a
        close with unread data (a reset) does not destroy the answer before it is read."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            drained = 0
            while drained < _LINGER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.sock.settimeout(remaining)
                n = self.sock.recv_into(chunk)
                if not n:
                    return
                drained += n
        except OSError:
            return


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: " + CONTENT_TYPE.encode() +
         b"\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: ")


class SmsHttpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: SmsService,
                 credentials: ServerCredentials, *, region: str = DEFAULT_REGION,
                 limits: Limits | None = None, console: bool = True,
                 ssl_context: ssl.SSLContext | None = None):
        self.limits = limits or Limits()
        self.service = service
        self.fleet = fleet.Fleet(service.state, service.clock, service.config)
        self.ssl_context = ssl_context
        self.console = None
        if console:     # the web console on the same port (smsblock.console)
            from ..console import Console
            self.console = Console(self)
        self.credentials = credentials
        self.region = region
        self.spool_dir = str(service.state.dir)
        # one thread per connection, at most max_connections of them
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        # and at most max_connections_per_client of them from one address
        self._per_client: dict[str, int] = {}
        self._per_client_lock = threading.Lock()
        self._holding: set[int] = set()     # id() of the connections holding a slot
        # No lock around the calls: each operation is one transaction of the state (which
        # serialises them), and ImportServerCatalog reads the sources in a background
        # thread outside any lock, answering after at most IMPORT_WAIT_SECONDS.
        if service.import_wait_seconds is None:
            service.import_wait_seconds = IMPORT_WAIT_SECONDS
        super().__init__(address, SmsRequestHandler)

    def lookup(self, access_key_id: str) -> ServerCredentials | None:
        """The credentials of a key id: the operator's, or a connector's valid one."""
        if hmac.compare_digest(access_key_id.encode(), self.credentials.access_key_id.encode()):
            return self.credentials
        found = self.fleet.lookup(access_key_id)
        if found is None:
            return None
        return ServerCredentials(access_key_id, found[0], connector_id=found[1])

    def _claim(self, request, host: str) -> bool:
        with self._per_client_lock:
            held = self._per_client.get(host, 0)
            if held >= self.limits.max_connections_per_client:
                return False
            if not self._slots.acquire(blocking=False):
                return False
            self._per_client[host] = held + 1
            self._holding.add(id(request))
            return True

    def _release(self, request, host: str) -> None:
        # once per connection: both the connection's thread and process_request (when
        # Thread.start() is interrupted, e.g. by SIGTERM, after the thread began) may try
        with self._per_client_lock:
            if id(request) not in self._holding:
                return
            self._holding.discard(id(request))
            held = self._per_client.pop(host, 1) - 1
            if held > 0:
                self._per_client[host] = held
            self._slots.release()

    def process_request(self, request, client_address):
        host = client_address[0]
        if not self._claim(request, host):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request, host)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request, client_address[0])

    def _refuse_busy(self, request) -> None:
        limits = self.limits
        body = json.dumps({"__type": "ServiceUnavailable", "message":
                           f"the server is serving {limits.max_connections} connections, or "
                           f"{limits.max_connections_per_client} from this address; "
                           "retry later"}).encode()
        try:
            request.setblocking(False)   # never wait on this client in the accept loop
            request.send(_BUSY + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):   # through logging, not stderr
        log.exception("error while serving %s", client_address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}"


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server side of ``serve --tls-cert FILE --tls-key FILE``: TLS 1.2 or later."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise UsageError(f"--tls-cert/--tls-key: {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}: not a certificate chain and "
                         f"its private key in PEM ({one_line(e)})") from None
    return ctx


def make_server(service: SmsService, host: str = "127.0.0.1", port: int = 8080,
                credentials: ServerCredentials | None = None, *, region: str = DEFAULT_REGION,
                limits: Limits | None = None, console: bool = True,
                tls_cert: str | None = None, tls_key: str | None = None) -> SmsHttpServer:
    """A ready (not yet serving) HTTP server; ``port=0`` picks a free port.  Requests
    must be signed for ``region`` and the service ``sms``; ``console`` serves the web
    console (:mod:`smsblock.console`) on the same port; ``tls_cert``/``tls_key`` (PEM)
    make it HTTPS."""
    credentials = credentials or ServerCredentials.from_environment()
    if not REGION.fullmatch(region):
        raise UsageError(f"--region {region[:64]!r} is not a region name (like us-east-1)")
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    context = tls_context(tls_cert, tls_key) if tls_cert else None
    try:
        return SmsHttpServer((host, port), service, credentials, region=region, limits=limits,
                             console=console, ssl_context=context)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
