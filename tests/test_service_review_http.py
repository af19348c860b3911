"""Findings of the attack review of `serve`'s HTTP layer, over raw sockets on 127.0.0.1
(and 127.0.0.2 as a second client address): header parsing in linear time, the
per-address connection cap, the first-byte and body-rate deadlines, no body read before
the signature's header checks, connections closed after a failed signature, the
Content-Type, and error messages of bounded size."""

from __future__ import annotations

import socket
import time

import pytest

from smsblock.service.server import Limits, ServerCredentials, _parse_head
from test_service_hostile_http import raw, read_responses, trickle_body
from test_service_server import CREDS, REGION, serving

LIMITS = Limits(max_connections=8, max_connections_per_client=3, idle_timeout=0.5,
                head_timeout=10.0, body_timeout=30.0, min_body_rate=1000, send_timeout=2.0)


@pytest.fixture
def server(tmp_path):
    with serving(tmp_path, limits=LIMITS) as srv:
        yield srv


def connect(srv, source="127.0.0.1", timeout=5.0) -> socket.socket:
    s = socket.create_connection(srv.server_address[:2], timeout=timeout,
                                 source_address=(source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def exchange(srv, payload: bytes, source="127.0.0.1", timeout=3.0):
    s = connect(srv, source)
    try:
        s.sendall(payload)
        return read_responses(s, timeout)
    finally:
        s.close()


# --- finding 1: header lines in linear time -------------------------------------------------

WORST_HEADS = [
    b"POST / HTTP/1.1\r\nX:" + b" " * 8100 + b"\x01",
    b"POST / HTTP/1.1\r\nX: a" + b" " * 8100 + b"\x01",
    b"POST / HTTP/1.1\r\nX: " + b"a\t" * 4050 + b"\x01",
    b"POST / HTTP/1.1\r\nX:" + b"\t" * 8100 + b"\x7f",
    b"POST / HTTP/1.1\r\n" + b"X" * 8100 + b" :",
    b"POST " + b"/" * 8100 + b" HTTP/1.1\x01",
    b"POST " + b"a" * 8100 + b" HTTP/1.1\r\nX: 1",
]


@pytest.mark.parametrize("head", WORST_HEADS, ids=range(len(WORST_HEADS)))
def test_a_worst_case_8_kib_head_costs_linear_time(head):
    """The old header pattern took ~0.25 s of CPU on the first of these heads."""
    start = time.process_time()
    for _ in range(20):
        try:
            _parse_head(head, Limits())
        except Exception:
            pass
    spent = time.process_time() - start
    assert spent < 0.1, f"{spent:.3f} s of CPU for 20 parses of an 8 KiB head"


def test_header_values_keep_their_meaning():
    req = _parse_head(b"POST / HTTP/1.1\r\nHost: h\r\nX-A:\t a b \t\r\nX-B:\r\nX-C:v", Limits())
    assert req.headers == {"host": "h", "x-a": "a b", "x-b": "", "x-c": "v"}
    for bad in (b"X :v", b"X\x01:v", b": v", b"X: a\x00b", b"X: caf\xc3\xa9", b"X v"):
        with pytest.raises(Exception, match="malformed header"):
            _parse_head(b"POST / HTTP/1.1\r\n" + bad, Limits())


def test_a_worst_case_head_through_the_server_is_refused_at_once(server):
    start = time.monotonic()
    responses, closed = exchange(server, WORST_HEADS[0] + b"\r\n\r\n")
    assert [r[0] for r in responses] == [400] and closed
    assert time.monotonic() - start < 2


# --- finding 2: connections -------------------------------------------------------------

def test_one_address_at_its_cap_does_not_lock_out_another(server):
    held = [connect(server) for _ in range(LIMITS.max_connections_per_client)]
    try:
        time.sleep(0.1)
        responses, closed = exchange(server, raw(server, "GetConnectors"))
        assert [r[0] for r in responses] == [503] and closed
        assert "from this address" in responses[0][2]["message"]
        responses, _ = exchange(server, raw(server, "GetConnectors", headers={"Connection": "close"}),
                                source="127.0.0.2")
        assert [r[0] for r in responses] == [200]
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)     # the slots are given back
    responses, _ = exchange(server, raw(server, "GetConnectors", headers={"Connection": "close"}))
    assert [r[0] for r in responses] == [200]


def test_a_fresh_connection_must_start_a_request_within_the_idle_timeout(server):
    s = connect(server)
    try:
        start = time.monotonic()
        assert s.recv(10) == b""
        assert time.monotonic() - start < LIMITS.idle_timeout + 1
    finally:
        s.close()


def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(server):
    s = connect(server)
    try:
        s.sendall(raw(server, "GetConnectors"))
        s.settimeout(5)
        start = time.monotonic()
        responses, closed = read_responses(s, 5)
        assert [r[0] for r in responses] == [200] and closed
        assert time.monotonic() - start < LIMITS.idle_timeout + 1.5
    finally:
        s.close()


def test_a_slow_small_body_is_cut_off_by_the_minimum_rate(server):
    """A 100-byte body may take idle_timeout + 0.1 s here, not body_timeout (30 s)."""
    s = connect(server)
    start = time.monotonic()
    responses, closed = trickle_body(server, s, 50)
    assert [r[0] for r in responses] == [408] and closed
    assert time.monotonic() - start < 4


# --- finding 13 and 2: authentication before the body, close after a failure ----------------

def test_an_unauthenticated_body_is_not_waited_for(server):
    """A wrong key id with a 1000-byte body announced and none sent: refused at once."""
    bad = ServerCredentials("AKIDOTHER", CREDS.secret_access_key)
    req = raw(server, "GetConnectors", b"{}", creds=bad)
    head = req[:req.index(b"\r\n\r\n")].replace(b"Content-Length: 2", b"Content-Length: 1000")
    start = time.monotonic()
    responses, closed = exchange(server, head + b"\r\n\r\n", timeout=3)
    assert [r[2]["__type"] for r in responses] == ["UnrecognizedClientException"] and closed
    assert time.monotonic() - start < 2


def test_a_failed_signature_closes_the_connection(server):
    bad = ServerCredentials(CREDS.access_key_id, "not the secret")
    s = connect(server)
    try:
        # a good request keeps the connection, a bad one closes it, the rest is not served
        s.sendall(raw(server, "GetConnectors") + raw(server, "GetConnectors", creds=bad)
                  + raw(server, "GetConnectors"))
        responses, closed = read_responses(s, 3)
    finally:
        s.close()
    assert [r[0] for r in responses] == [200, 400] and closed
    assert responses[1][2]["__type"] == "InvalidSignatureException"
    assert responses[1][1].get("connection") == "close"


def test_the_skew_message_says_before_or_after():
    from datetime import datetime, timedelta, timezone
    from smsblock.errors import ServiceError
    from smsblock.service.server import check_auth_header
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    when = (now + timedelta(minutes=16)).strftime("%Y%m%dT%H%M%SZ")
    headers = {"authorization": f"AWS4-HMAC-SHA256 Credential={CREDS.access_key_id}/"
               f"{when[:8]}/{REGION}/sms/aws4_request, SignedHeaders=content-type;host;"
               f"x-amz-date;x-amz-target, Signature={'0' * 64}", "x-amz-date": when}
    with pytest.raises(ServiceError, match="before or after"):
        check_auth_header(headers, CREDS, region=REGION, now=now)


# --- finding 6: Content-Type ------------------------------------------------------------------

@pytest.mark.parametrize("ctype", ["text/plain", "application/json",
                                   "application/x-amz-json-1.0", "application/x-amz-json-1.1x"])
def test_a_signed_request_with_another_content_type_is_refused(server, ctype):
    responses, closed = exchange(server, raw(server, "GetConnectors",
                                             headers={"Content-Type": ctype}))
    assert [r[0] for r in responses] == [400] and closed
    assert responses[0][2]["__type"] == "SerializationException"
    assert "application/x-amz-json-1.1" in responses[0][2]["message"]


# --- finding 7: bounded error messages -------------------------------------------------------

def test_an_invalid_connector_id_is_not_echoed_in_full(server):
    body = b'{"connectorId": "' + b"x" * 500_000 + b'"}'
    responses, _ = exchange(server, raw(server, "DisassociateConnector", body,
                                        headers={"Connection": "close"}), timeout=10)
    assert [r[0] for r in responses] == [400]
    assert responses[0][2]["__type"] == "InvalidParameterException"
    assert len(responses[0][2]["message"]) < 400


AUTH_WORST = [
    "AWS4-HMAC-SHA256 " + " " * 8000 + "x",
    "AWS4-HMAC-SHA256 Credential=" + "a" * 8000,
    "AWS4-HMAC-SHA256 Credential=a/20260101/" + "r" * 8000 + "/",
    "AWS4-HMAC-SHA256 Credential=a/20260101/r/s/aws4_request, SignedHeaders=" + "a;" * 4000 + "!",
    "AWS4-HMAC-SHA256 Credential=a/20260101/r/s/aws4_request," + " " * 8000 + "x",
]


@pytest.mark.parametrize("auth", AUTH_WORST, ids=range(len(AUTH_WORST)))
def test_a_worst_case_authorization_header_costs_linear_time(auth):
    from smsblock.errors import ServiceError
    from smsblock.service.server import check_auth_header
    start = time.process_time()
    for _ in range(20):
        with pytest.raises(ServiceError):
            check_auth_header({"authorization": auth}, CREDS, region=REGION)
    assert time.process_time() - start < 0.1
