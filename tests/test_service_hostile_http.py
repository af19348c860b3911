"""Hostile HTTP clients against `serve`'s HTTP layer, over raw sockets on 127.0.0.1:
slowloris, huge heads, connection floods, request smuggling, malformed framing, and the
memory an unauthenticated client can make the server hold."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc

import pytest

from smsblock.service.server import Limits
from test_service_server import serving, signed

# short deadlines so the tests take seconds; the defaults are in docs/service.md
LIMITS = Limits(max_connections=6, head_timeout=1.0, body_timeout=1.0, send_timeout=2.0)


@pytest.fixture
def server(tmp_path):
    with serving(tmp_path, limits=LIMITS) as srv:
        yield srv


def connect(srv, timeout=5.0) -> socket.socket:
    s = socket.create_connection(srv.server_address[:2], timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def raw(srv, operation: str, body: bytes = b"{}", **kw) -> bytes:
    """The bytes of a correctly signed request (HTTP/1.1, keep-alive)."""
    req = signed(srv.url, operation, body, **kw)
    host = srv.url.split("//")[1]
    lines = [f"POST / HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in req.header_items() if k.lower() != "host"]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_responses(s: socket.socket, timeout=5.0) -> tuple[list[tuple[int, dict, dict]], bool]:
    """Every response until the server closes (or ``timeout``), and whether it closed."""
    s.settimeout(timeout)
    data = b""
    closed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((status, headers, json.loads(rest[:n]) if n else {}))
        data = rest[n:]
    return out, closed


def one_refusal(srv, payload: bytes, status: int, timeout=5.0):
    s = connect(srv)
    try:
        s.sendall(payload)
        responses, closed = read_responses(s, timeout)
    finally:
        s.close()
    assert [r[0] for r in responses] == [status], responses
    assert closed, "the connection stayed open after an HTTP-level refusal"
    assert responses[0][1].get("connection") == "close"
    assert responses[0][2]["__type"] and responses[0][2]["message"]
    return responses[0]


def catalog_status(srv) -> str:
    return srv.service.get_servers()["serverCatalogStatus"]


# --- framing: smuggling and malformed requests ----------------------------------------------

def test_a_chunked_body_after_a_content_length_is_not_run_as_a_second_request(server):
    """The old server took Content-Length and ran the "chunk" as the next request."""
    smuggled = raw(server, "ImportServerCatalog")
    first = raw(server, "GetServers").replace(
        b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n", 1)
    one_refusal(server, first + smuggled, 400)
    time.sleep(0.2)
    assert catalog_status(server) == "NOT_IMPORTED"


def test_chunked_without_content_length_is_refused(server):
    head = raw(server, "ImportServerCatalog", b"").split(b"\r\nContent-Length")[0]
    one_refusal(server, head + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411)
    assert catalog_status(server) == "NOT_IMPORTED"


def test_bytes_past_the_content_length_are_not_part_of_the_body(server):
    """The signed request is served from exactly Content-Length bytes; what follows is a
    new request, here a malformed one: refused, then the connection closes."""
    s = connect(server)
    try:
        s.sendall(raw(server, "GetServers", b'{"maxResults": 1}') + b'00, "extra": 1}\r\n\r\n')
        responses, closed = read_responses(s)
    finally:
        s.close()
    assert [r[0] for r in responses] == [200, 400], responses
    assert len(responses[0][2]["serverList"]) <= 1 and closed


def test_keep_alive_serves_several_requests_on_one_connection(server):
    s = connect(server)
    try:
        s.sendall(raw(server, "GetConnectors") + raw(server, "GetServers"))
        s.sendall(raw(server, "GetConnectors", headers={"Connection": "close"}))
        responses, closed = read_responses(s)
    finally:
        s.close()
    assert [r[0] for r in responses] == [200, 200, 200] and closed
    assert "connectorList" in responses[2][2]


@pytest.mark.parametrize("mangle", [
    lambda r: r.replace(b"Content-Length: 2", b"Content-Length: +2"),
    lambda r: r.replace(b"Content-Length: 2", b"Content-Length: 2, 2"),
    lambda r: r.replace(b"Content-Length: 2", b"Content-Length: 2\r\nContent-Length: 2"),
    lambda r: r.replace(b"Content-Length: 2", b"Content-Length : 2"),
    lambda r: r.replace(b"Content-Length: 2", b"Content-Length:\r\n 2"),   # folded
    lambda r: r.replace(b"Content-Length: 2", b"X: y\nContent-Length: 2"),  # bare LF
    lambda r: r.replace(b"Content-Length: 2", b"Content-Length: 2\rX: y"),
    lambda r: r.replace(b"HTTP/1.1", b"HTTP/1.1 junk", 1),
    lambda r: r.replace(b"Content-Length: 2", b"Content-Length: 2\r\nX-Name: caf\xc3\xa9"),
    lambda r: b"\r\n".join(line for line in r.split(b"\r\n") if not line.startswith(b"Host:")),
])
def test_malformed_framing_is_refused_with_400_and_closed(server, mangle):
    one_refusal(server, mangle(raw(server, "ImportServerCatalog")), 400)
    assert catalog_status(server) == "NOT_IMPORTED"


def test_other_versions_methods_and_paths(server):
    req = raw(server, "GetConnectors")
    one_refusal(server, req.replace(b"HTTP/1.1", b"HTTP/2.0", 1), 505)
    one_refusal(server, req.replace(b"POST /", b"POST /x", 1), 400)
    one_refusal(server, req.replace(b"POST /", b"POST http://evil/", 1), 400)
    one_refusal(server, req.replace(b"POST", b"PUT", 1), 405)
    one_refusal(server, req.replace(b"Content-Length: 2", b"Content-Length: 2\r\nExpect: x"), 417)
    one_refusal(server, req.replace(b"Content-Length: 2", f"Content-Length: {(1 << 20) + 1}"
                                    .encode()), 413)


def test_expect_100_continue_is_honoured(server):
    s = connect(server)
    try:
        req = raw(server, "GetConnectors", headers={"Expect": "100-continue"})
        head, body = req.split(b"\r\n\r\n")
        s.sendall(head + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        s.close()


# --- time --------------------------------------------------------------------------------

def test_slowloris_headers_are_cut_off_at_the_head_deadline(server):
    """One header byte every 0.1 s: each read is quick, the head never completes."""
    s = connect(server)
    start = time.monotonic()
    got = b""
    try:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(0.1)
        while time.monotonic() - start < 5:
            try:
                s.sendall(b"X")
            except OSError:
                break
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    elapsed = time.monotonic() - start
    assert elapsed < LIMITS.head_timeout + 1.5, f"the trickle was served for {elapsed:.1f} s"
    assert got.startswith(b"HTTP/1.1 408 "), got


def trickle_body(server, s, ticks: int):
    """Send a GetConnectors whose 100-byte body comes a byte every 0.1 s (``ticks`` at
    most, until the server closes); the responses read and whether it closed."""
    req = raw(server, "GetConnectors", b"{" + b" " * 98 + b"}")
    try:
        s.sendall(req[:-90])
        for _ in range(ticks):
            time.sleep(0.1)
            try:
                s.sendall(b" ")
            except OSError:
                break
        return read_responses(s, 2)
    finally:
        s.close()


def test_a_slow_body_is_cut_off_at_the_body_deadline(server):
    s = connect(server)
    start = time.monotonic()
    responses, closed = trickle_body(server, s, 40)
    assert [r[0] for r in responses] == [408] and closed
    assert time.monotonic() - start < LIMITS.body_timeout + 3


def test_an_idle_connection_is_closed(server):
    s = connect(server)
    try:
        start = time.monotonic()
        s.settimeout(5)
        assert s.recv(10) == b""          # closed without a word (nothing was asked)
        assert time.monotonic() - start < LIMITS.head_timeout + 1
    finally:
        s.close()


# --- size and numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\n" + b"X-Many: a\r\n" * 100 + b"\r\n",
    b"POST /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
], ids=["one 1 MiB header", "100 headers", "20 KB request line"])
def test_oversized_heads_get_431_and_are_not_read_to_the_end(server, head):
    s = connect(server)
    sent, failed = 0, False
    s.settimeout(3)
    try:
        view = memoryview(head)
        while sent < len(view):
            try:
                sent += s.send(view[sent:sent + 65536])
            except OSError:
                failed = True
                break
        responses, closed = read_responses(s, 3)
    finally:
        s.close()
    assert closed
    assert [r[0] for r in responses] in ([431], []), responses
    if len(head) > 100_000:
        # the server stopped reading: the rest could not be delivered (or was thrown away)
        assert failed or responses


def test_connections_beyond_the_limit_get_503_and_the_server_recovers(server):
    base = threading.active_count()
    idle = [connect(server) for _ in range(LIMITS.max_connections)]
    time.sleep(0.2)
    try:
        assert threading.active_count() - base <= LIMITS.max_connections
        extra = [connect(server) for _ in range(20)]
        for s in extra:
            responses, closed = read_responses(s, 2)
            assert [r[0] for r in responses] in ([503], []) and closed
            s.close()
        assert threading.active_count() - base <= LIMITS.max_connections
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    s = connect(server)
    try:
        s.sendall(raw(server, "GetConnectors", headers={"Connection": "close"}))
        responses, _ = read_responses(s)
    finally:
        s.close()
    assert [r[0] for r in responses] == [200]


def test_idle_connections_time_out_and_free_their_slots(server):
    idle = [connect(server) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(LIMITS.head_timeout + 0.5)
        s = connect(server)
        s.sendall(raw(server, "GetConnectors", headers={"Connection": "close"}))
        responses, _ = read_responses(s)
        s.close()
        assert [r[0] for r in responses] == [200]
    finally:
        for s in idle:
            s.close()


def test_unauthenticated_requests_hold_only_a_few_kib_each(server):
    """Bodies announced at 1 MiB and half sent, and heads of 60 KiB, on every
    connection: the server's traced memory grows by a few KiB per connection, not by
    what the clients announce or send."""
    n = LIMITS.max_connections
    half = b"x" * (512 * 1024)
    headers = b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: a\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n"
    big_body = headers + f"Content-Length: {1 << 20}\r\n\r\n".encode() + half
    big_head = headers * 60

    def attack(count):
        conns = [connect(server) for _ in range(count)]
        for i, s in enumerate(conns):
            s.settimeout(0.5)
            try:
                s.sendall(big_body if i % 2 else big_head)
            except OSError:
                pass
        time.sleep(0.3)
        return conns

    for s in attack(2):    # first use: imports, the spool file's first rollover
        s.close()
    time.sleep(0.3)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conns = attack(n)
        held = tracemalloc.get_traced_memory()[0] - before
        for s in conns:
            s.close()
    finally:
        tracemalloc.stop()
    assert held < n * 32 * 1024, f"{held} bytes held for {n} unauthenticated connections"
