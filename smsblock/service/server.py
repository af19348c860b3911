"""``smsblock serve``: the SMS API over HTTP, in the SMS JSON 1.1 protocol.

Requests are ``POST /`` with ``X-Amz-Target: AWSServerMigrationService_V2016_10_24.<Op>``
and a JSON body; answers are JSON, errors ``{"__type": "<Code>", "message": "..."}``
with HTTP 400 (500 for a fault of the server itself).  So the unmodified AWS CLI and
boto3, given the official SMS model, talk to it with ``--endpoint-url``.

Every request must carry a valid AWS Signature Version 4 made with the configured
credentials (``SMSBLOCK_ACCESS_KEY_ID`` / ``SMSBLOCK_SECRET_ACCESS_KEY``).  The expected
signature is computed with botocore's own signer over the request as received (the
headers the client listed in SignedHeaders, the path, the query, the body) and compared
in constant time; requests older or newer than 15 minutes are refused.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import ServiceError, SmsBlockError, UsageError
from .api import SmsService

log = logging.getLogger(__name__)

TARGET_PREFIX = "AWSServerMigrationService_V2016_10_24."
CONTENT_TYPE = "application/x-amz-json-1.1"
MAX_BODY = 1 << 20
MAX_SKEW_SECONDS = 15 * 60
ACCESS_KEY_ENV = "SMSBLOCK_ACCESS_KEY_ID"
SECRET_KEY_ENV = "SMSBLOCK_SECRET_ACCESS_KEY"

_AUTH = re.compile(r"^AWS4-HMAC-SHA256\s+Credential=([^/\s,]+)/(\d{8})/([^/\s,]+)/([^/\s,]+)/"
                   r"aws4_request,\s*SignedHeaders=([a-z0-9;\-]+),\s*Signature=([0-9a-f]{64})$")


@dataclass(frozen=True)
class ServerCredentials:
    access_key_id: str
    secret_access_key: str

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


def _auth_error(message: str, code: str = "InvalidSignatureException") -> ServiceError:
    return ServiceError(message, code)


def verify_sigv4(method: str, path: str, headers, body: bytes, creds: ServerCredentials,
                 now: datetime | None = None) -> None:
    """Raise ServiceError unless the request is signed with ``creds`` (SigV4, header form)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    header = headers.get("Authorization")
    if not header:
        raise _auth_error("Missing Authentication Token", "MissingAuthenticationTokenException")
    m = _AUTH.match(header.strip())
    if m is None:
        raise _auth_error("the Authorization header is not an AWS4-HMAC-SHA256 signature",
                          "IncompleteSignatureException")
    akid, date, region, service, signed, signature = m.groups()
    if not hmac.compare_digest(akid.encode(), creds.access_key_id.encode()):
        raise _auth_error("The security token included in the request is invalid.",
                          "UnrecognizedClientException")
    amz_date = headers.get("X-Amz-Date")
    if not amz_date:
        raise _auth_error("the request has no X-Amz-Date header", "IncompleteSignatureException")
    try:
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise _auth_error(f"X-Amz-Date {amz_date!r} is not YYYYMMDDTHHMMSSZ",
                          "IncompleteSignatureException") from None
    if amz_date[:8] != date:
        raise _auth_error("the credential scope date does not match X-Amz-Date")
    now = now or datetime.now(timezone.utc)
    if abs((now - when).total_seconds()) > MAX_SKEW_SECONDS:
        raise _auth_error(f"Signature expired: {amz_date} is more than 15 minutes from the "
                          f"server time {now.strftime('%Y%m%dT%H%M%SZ')}")
    signed_names = signed.split(";")
    if "host" not in signed_names:
        raise _auth_error("the signature does not cover the host header")
    picked = {}
    for name in signed_names:
        value = headers.get(name)
        if value is None:
            raise _auth_error(f"signed header {name!r} is missing from the request")
        picked[name] = value
    request = AWSRequest(method=method, url=f"http://{picked['host']}{path}", data=body,
                         headers=picked)
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(creds.access_key_id, creds.secret_access_key), service, region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)),
                                request)
    if not hmac.compare_digest(expected, signature):
        raise _auth_error("The request signature we calculated does not match the signature "
                          "you provided. Check your AWS Secret Access Key and signing method.")


class SmsRequestHandler(BaseHTTPRequestHandler):
    server_version = "smsblock-sms"
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes; with Nagle on, keep-alive clients wait for
    # a delayed ACK (~40 ms) on every request
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):   # through logging, not stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", os.urandom(16).hex())
        self.end_headers()
        self.wfile.write(body)

    def _error(self, e: ServiceError, status: int | None = None) -> None:
        self._send(status or e.http_status, {"__type": e.code, "message": str(e)})

    def do_GET(self):
        if self.server.console is not None:   # the web console (smsblock.console)
            return self.server.console.handle(self, "GET")
        self._error(ServiceError("the SMS API takes POST requests", "UnknownOperationException"))

    def do_POST(self):
        console = self.server.console   # its forms: any POST but an SMS API call
        if console is not None and console.wants(self, "POST"):
            return console.handle(self, "POST")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            return self._error(ServiceError(f"request body must be 0..{MAX_BODY} bytes",
                                            "SerializationException"))
        body = self.rfile.read(length)
        srv: SmsHttpServer = self.server  # type: ignore[assignment]
        try:
            verify_sigv4("POST", self.path, self.headers, body, srv.credentials)
            target = self.headers.get("X-Amz-Target", "")
            if not target.startswith(TARGET_PREFIX):
                raise ServiceError(f"X-Amz-Target {target!r} is not an SMS operation",
                                   "UnknownOperationException")
            operation = target[len(TARGET_PREFIX):]
            try:
                params = json.loads(body) if body.strip() else {}
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise ServiceError("the request body is not JSON (or nests too deeply)",
                                   "SerializationException") from None
            with srv.call_lock:
                result = srv.service.call(operation, params)
            self._send(200, result)
        except ServiceError as e:
            self._error(e)
        except SmsBlockError as e:
            self._error(ServiceError(str(e), "InvalidParameterException"))
        except Exception:
            log.exception("internal error")
            self._error(ServiceError("internal error; see the server log", "InternalError"), 500)


class SmsHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: SmsService,
                 credentials: ServerCredentials, console: bool = True):
        super().__init__(address, SmsRequestHandler)
        self.service = service
        self.credentials = credentials
        # one operation at a time: each is a short transaction, and the import reads
        # the datastore between two of them
        self.call_lock = threading.Lock()
        self.console = None
        if console:
            from ..console import Console
            self.console = Console(self)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(service: SmsService, host: str = "127.0.0.1", port: int = 8080,
                credentials: ServerCredentials | None = None, console: bool = True) -> SmsHttpServer:
    """A ready (not yet serving) HTTP server; ``port=0`` picks a free port; ``console``
    serves the web console (:mod:`smsblock.console`) on the same port."""
    credentials = credentials or ServerCredentials.from_environment()
    try:
        return SmsHttpServer((host, port), service, credentials, console)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
