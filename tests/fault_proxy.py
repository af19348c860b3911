"""A fault-injecting HTTP proxy on 127.0.0.1 between boto3 and moto.

Used two ways: as a reverse proxy (boto3's endpoint URL points at it; it forwards to the
upstream) and as a forward proxy (boto3's ``proxy`` setting / HTTPS_PROXY; requests carry
absolute URIs, and ``Proxy-Authorization`` is recorded and optionally required).  With an
``ssl_context`` it terminates TLS, like a corporate proxy that re-signs TLS.

Per test, :class:`Rule` s pick requests (method, path regex, skip the first k, apply n
times) and do something to them: ``reset`` (RST before answering), ``status`` (an S3 XML
or EBS JSON error such as 503 SlowDown), ``stall`` (say nothing for a while, then close:
past the client's read timeout), ``cut`` (forward, then RST after half the answer),
``drop`` (forward, then RST before any answer: the request took effect, its answer is
lost), ``hang`` (forward, then say nothing for ``stall`` seconds, then RST) and ``delay``
(wait ``stall`` seconds, then forward and answer normally: a slow request, to order races)
and ``truncate`` (forward, then send the answer without its Content-Length, only the first
half of its body, and close cleanly: an answer that just ends early).
Every request is logged (:class:`Record`), bodies too with ``capture_bodies``.
"""

from __future__ import annotations

import base64
import re
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Rule:
    action: str                      # reset | status | stall | cut | drop | hang | delay | truncate
    method: str | None = None
    path: str | None = None          # regex searched in the request path (with query)
    skip: int = 0                    # let this many matching requests through first
    times: int = 1                   # then fault this many (-1: forever)
    status: int = 503
    code: str = "SlowDown"
    stall: float = 5.0
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method != method:
            return False
        if self.path and not re.search(self.path, path):
            return False
        return True


@dataclass
class Record:
    method: str
    path: str
    headers: dict
    request_bytes: int
    status: int | None = None
    fault: str | None = None
    body: bytes | None = None
    response_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        self.server.owner._serve(self.request)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultProxy:
    """See the module docstring.  ``upstream`` is ``(host, port)`` for reverse proxying."""

    def __init__(self, upstream: tuple[str, int] | None = None, *, ssl_context=None,
                 require_auth: str | None = None, capture_bodies: bool = False):
        self.upstream = upstream
        self.ssl_context = ssl_context
        self.require_auth = require_auth        # "user:password"
        self.capture_bodies = capture_bodies
        self.rules: list[Rule] = []
        self.log: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def add(self, *rules: Rule) -> None:
        with self._lock:
            self.rules.extend(rules)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def faults(self) -> list[Record]:
        with self._lock:
            return [r for r in self.log if r.fault]

    def max_concurrency(self, method: str | None = None, path: str | None = None) -> int:
        """The most matching requests that were in flight at once."""
        events = []
        for r in self.requests(method, path):
            events += [(r.started, 1), (r.finished if r.finished is not None else r.started, -1)]
        most = now = 0
        for _, step in sorted(events, key=lambda e: (e[0], e[1])):
            now += step
            most = max(most, now)
        return most

    def requests(self, method: str | None = None, path: str | None = None) -> list[Record]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (path is None or re.search(path, r.path))]

    # -- one connection ---------------------------------------------------------------
    def _pick(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(method, path):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip:
                    continue
                if rule.times != -1 and rule.fired >= rule.times:
                    continue
                rule.fired += 1
                return rule
        return None

    def _serve(self, sock: socket.socket) -> None:
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            sock.settimeout(30)
            f = sock.makefile("rb")
            while not self._stop.is_set():
                if not self._one(sock, f):
                    return
        except (OSError, ValueError):
            return
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _one(self, sock, f) -> bool:
        line = f.readline(65537)
        if not line:
            return False
        method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            h = f.readline(65537).decode("latin-1").rstrip("\r\n")
            if not h:
                break
            k, _, v = h.partition(":")
            headers.append((k.strip(), v.strip()))
        hmap = {k.lower(): v for k, v in headers}
        if self.require_auth is not None:
            want = "Basic " + base64.b64encode(self.require_auth.encode()).decode()
            if hmap.get("proxy-authorization") != want:
                self._record(Record(method, target, hmap, 0, 407, "auth"))
                sock.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                return False
        if method == "CONNECT":
            self._record(Record(method, target, hmap, 0, 200))
            host, _, port = target.rpartition(":")
            self._tunnel(sock, f, (host, int(port)))
            return False
        if target.startswith("http://"):            # forward-proxy form
            u = urlsplit(target)
            upstream = (u.hostname, u.port or 80)
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        else:
            upstream, path = self.upstream, target
        if hmap.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in hmap.get("transfer-encoding", "").lower():
            body = self._read_chunked(f)
        else:
            body = f.read(int(hmap.get("content-length") or 0))
        record = Record(method, path, hmap, len(body), body=body if self.capture_bodies else None)
        rule = self._pick(method, path)
        if rule is not None:
            record.fault = rule.action
            self._record(record)
            return self._fault(sock, rule, upstream, method, path, headers, body, record)
        self._record(record)
        response = self._forward(upstream, method, path, headers, body)
        record.status = _status_of(response)
        record.response_bytes = len(response)
        # stamped before the client can have the answer: a slot's next request cannot
        # start before this one is counted finished (max_concurrency never overcounts)
        record.finished = time.monotonic()
        sock.sendall(response)
        return False                                  # one request per connection

    def _record(self, r: Record) -> None:
        with self._lock:
            self.log.append(r)

    @staticmethod
    def _read_chunked(f) -> bytes:
        out = bytearray()
        while True:
            size = int(f.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += f.read(size)
            f.readline()

    def _forward(self, upstream, method, path, headers, body) -> bytes:
        with socket.create_connection(upstream, timeout=60) as up:
            lines = [f"{method} {path} HTTP/1.1"]
            for k, v in headers:
                if k.lower() in ("connection", "proxy-authorization", "proxy-connection", "expect",
                                 "transfer-encoding", "content-length"):
                    continue
                lines.append(f"{k}: {v}")
            lines.append(f"Content-Length: {len(body)}")
            lines.append("Connection: close")
            up.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            chunks = []
            while True:
                data = up.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
        response = b"".join(chunks)
        head, sep, rest = response.partition(b"\r\n\r\n")
        # tell the client this connection ends here, whatever upstream said
        head = b"\r\n".join(h for h in head.split(b"\r\n") if not h.lower().startswith(b"connection:"))
        return head + b"\r\nConnection: close" + sep + rest

    def _fault(self, sock, rule, upstream, method, path, headers, body, record) -> bool:
        if rule.action == "reset":
            _reset(sock)
        elif rule.action == "status":
            record.status = rule.status
            if path.startswith("/snapshots"):          # EBS speaks JSON errors
                payload = ('{"message": "injected %s", "Reason": "%s"}' % (rule.code, rule.code)).encode()
                extra = f"x-amzn-ErrorType: {rule.code}\r\nContent-Type: application/json\r\n"
            else:
                payload = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{rule.code}</Code>"
                           f"<Message>injected {rule.code}</Message></Error>").encode()
                extra = "Content-Type: application/xml\r\n"
            sock.sendall(f"HTTP/1.1 {rule.status} Injected\r\n{extra}Content-Length: {len(payload)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + payload)
        elif rule.action == "stall":
            self._stop.wait(rule.stall)
            _reset(sock)
        elif rule.action == "delay":
            self._stop.wait(rule.stall)
            response = self._forward(upstream, method, path, headers, body)
            record.status = _status_of(response)
            sock.sendall(response)
        elif rule.action in ("drop", "hang"):
            response = self._forward(upstream, method, path, headers, body)
            record.status = _status_of(response)
            if rule.action == "hang":
                self._stop.wait(rule.stall)
            _reset(sock)
        elif rule.action == "truncate":
            response = self._forward(upstream, method, path, headers, body)
            record.status = _status_of(response)
            head, _, rest = response.partition(b"\r\n\r\n")
            head = b"\r\n".join(h for h in head.split(b"\r\n")
                                 if not h.lower().startswith(b"content-length:"))
            sock.sendall(head + b"\r\n\r\n" + rest[:len(rest) // 2])
            sock.shutdown(socket.SHUT_WR)
        elif rule.action == "cut":
            response = self._forward(upstream, method, path, headers, body)
            record.status = _status_of(response)
            head, _, rest = response.partition(b"\r\n\r\n")
            sock.sendall(head + b"\r\n\r\n" + rest[:max(1, len(rest) // 2)])
            time.sleep(0.05)
            _reset(sock)
        else:
            raise ValueError(f"unknown fault action {rule.action!r}")
        return False

    def _tunnel(self, sock, f, target) -> None:
        up = socket.create_connection(target, timeout=30)
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        buffered = f.peek(0) if hasattr(f, "peek") else b""
        if buffered:
            up.sendall(f.read(len(buffered)))

        def pump(a, b):
            try:
                while True:
                    data = a.recv(1 << 16)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        t = threading.Thread(target=pump, args=(up, sock), daemon=True)
        t.start()
        pump(sock, up)
        t.join()
        up.close()


def _status_of(response: bytes) -> int | None:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def _reset(sock) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
