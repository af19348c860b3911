"""The HTTP server in process: SigV4 checks (hand-made requests signed by botocore),
what the signature must bind, protocol errors, and that refused requests change nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from smsblock.errors import UsageError
from smsblock.service import SmsService
from hypothesis import given, strategies as st

from smsblock.errors import ServiceError
from smsblock.service.api import COMMON_ERRORS, DECLARED_ERRORS
from smsblock.service.server import (TARGET_PREFIX, ServerCredentials, make_server,
                                     verify_sigv4)
from test_service_sources import make_datastore

CREDS = ServerCredentials("AKIDTEST", "secret/key+1")
REGION = "us-west-2"


@contextlib.contextmanager
def serving(tmp_path, **make_server_options):
    """`smsblock serve` in a thread on a free port, over a state with one datastore
    connector; the server (its ``url``, ``service``)."""
    svc = SmsService(tmp_path / "state")
    svc.register_connector("datastore", {"path": str(make_datastore(tmp_path / "ds", 1))})
    srv = make_server(svc, "127.0.0.1", 0, CREDS, region=REGION, **make_server_options)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        svc.close()


@pytest.fixture
def server(tmp_path):
    with serving(tmp_path) as srv:
        yield srv


def signed(url, operation, body: bytes, *, creds=CREDS, when=None, region=REGION,
           service="sms", headers=None, drop=(), sign_only=None):
    """A urllib request signed by botocore; ``sign_only``: the headers it signs (the
    others are added after signing)."""
    headers = {"X-Amz-Target": TARGET_PREFIX + operation,
               "Content-Type": "application/x-amz-json-1.1", **(headers or {})}
    later = {}
    if sign_only is not None:
        later = {k: v for k, v in headers.items() if k.lower() not in sign_only}
        headers = {k: v for k, v in headers.items() if k.lower() in sign_only}
    req = AWSRequest(method="POST", url=url + "/", data=body, headers=headers)
    auth = SigV4Auth(Credentials(creds.access_key_id, creds.secret_access_key), service, region)
    if when is None:
        auth.add_auth(req)
    else:   # sign as of another time
        req.context["timestamp"] = when.strftime("%Y%m%dT%H%M%SZ")
        req.headers["X-Amz-Date"] = req.context["timestamp"]
        sig = auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req)
        names = ";".join(sorted(auth.headers_to_sign(req)))
        req.headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={creds.access_key_id}/{auth.credential_scope(req)}, "
            f"SignedHeaders={names}, Signature={sig}")
    out = {k: v for k, v in {**req.headers, **later}.items() if k not in drop}
    return urllib.request.Request(url + "/", data=body, method="POST", headers=out)


def send(req):
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_signed_request_is_served(server):
    status, doc = send(signed(server.url, "GetConnectors", b"{}"))
    assert status == 200 and len(doc["connectorList"]) == 1


@pytest.mark.parametrize("case,code", [
    ("wrong secret", "InvalidSignatureException"),
    ("unknown key", "UnrecognizedClientException"),
    ("too old", "InvalidSignatureException"),
    ("from the future", "InvalidSignatureException"),
    ("unsigned", "MissingAuthenticationTokenException"),
    ("signed header removed", "InvalidSignatureException"),
    ("target changed", "InvalidSignatureException"),
    ("garbage authorization", "IncompleteSignatureException"),
    # the credential scope must be this server's region and the sms service
    ("other region", "InvalidSignatureException"),
    ("other service", "InvalidSignatureException"),
    # SignedHeaders must cover what decides what the request does
    ("target not signed", "IncompleteSignatureException"),
    ("content-type not signed", "IncompleteSignatureException"),
    ("host not signed", "IncompleteSignatureException"),
    # the body hash is the body's, never a header's word for it
    ("unsigned payload", "InvalidSignatureException"),
    ("content hash of another body", "InvalidSignatureException"),
])
def test_bad_signatures(server, case, code):
    body = b"{}"
    kw = {}
    if case == "wrong secret":
        kw["creds"] = ServerCredentials(CREDS.access_key_id, "other")
    elif case == "unknown key":
        kw["creds"] = ServerCredentials("AKIDOTHER", CREDS.secret_access_key)
    elif case == "too old":
        kw["when"] = datetime.now(timezone.utc) - timedelta(minutes=16)
    elif case == "from the future":
        kw["when"] = datetime.now(timezone.utc) + timedelta(minutes=16)
    elif case == "unsigned":
        kw["drop"] = ("Authorization",)
    elif case == "signed header removed":
        kw["drop"] = ("X-Amz-Target",)
    elif case == "other region":
        kw["region"] = "eu-central-1"
    elif case == "other service":
        kw["service"] = "ec2"
    elif case == "target not signed":
        kw["sign_only"] = ("host", "x-amz-date", "content-type")
    elif case == "content-type not signed":
        kw["sign_only"] = ("host", "x-amz-date", "x-amz-target")
    elif case == "host not signed":   # botocore adds host whatever it is given: hand-made
        kw["sign_only"] = ("x-amz-date", "x-amz-target", "content-type")
    elif case == "unsigned payload":
        kw["headers"] = {"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
    elif case == "content hash of another body":
        kw["headers"] = {"X-Amz-Content-SHA256": hashlib.sha256(b'{"x": 1}').hexdigest()}
    req = signed(server.url, "ImportServerCatalog", body, **kw)
    if case == "host not signed":
        auth = req.headers["Authorization"]
        req.headers["Authorization"] = auth.replace("host;", "")
    if case == "target changed":
        req.headers["X-amz-target"] = TARGET_PREFIX + "DeleteServerCatalog"
    if case == "garbage authorization":
        req.headers["Authorization"] = "Basic dXNlcjpwYXNz"
    status, doc = send(req)
    assert status == 400 and doc["__type"] == code, doc
    assert doc["message"]
    # nothing was imported
    status, doc = send(signed(server.url, "GetServers", b"{}"))
    assert doc["serverCatalogStatus"] == "NOT_IMPORTED"


def test_signature_within_15_minutes_is_accepted(server):
    when = datetime.now(timezone.utc) - timedelta(minutes=10)
    status, _ = send(signed(server.url, "GetConnectors", b"{}", when=when))
    assert status == 200


@pytest.mark.parametrize("op,body,code", [
    ("GetServers", b"{not json", "SerializationException"),
    ("GetServers", b"[1, 2]", "SerializationException"),
    ("GetServers", b'{"maxResults": "ten"}', "InvalidParameterException"),
    ("GetServers", b'{"bogus": 1}', "InvalidParameterException"),
    ("CreateReplicationJob", b'{"serverId": "s-12345678"}', "MissingRequiredParameterException"),
    ("CreateReplicationJob", b'{"serverId": "s-12345678", "seedReplicationTime": "later"}',
     "InvalidParameterException"),
    ("ListApps", b"{}", "UnknownOperationException"),
    ("GetServers", b"\xff{}", "SerializationException"),
    ("GetServers", '{"maxResults": 5}'.encode("utf-16"), "SerializationException"),
    ("GetServers", b'{"maxResults": 5, "maxResults": 6}', "SerializationException"),
    ("GetServers", b'{"maxResults": NaN}', "SerializationException"),
    ("GetServers", b"[" * 100000, "SerializationException"),
])
def test_protocol_errors(server, op, body, code):
    status, doc = send(signed(server.url, op, body))
    assert status == 400 and doc == {"__type": code, "message": doc["message"]}, doc


def test_target_outside_sms_and_get(server):
    req = signed(server.url, "x", b"{}", headers={"X-Amz-Target": "DynamoDB_20120810.ListTables"})
    status, doc = send(req)
    assert status == 400 and doc["__type"] == "UnknownOperationException"
    # GET is the web console's (tests/test_console.py): signed out, its sign-in page
    req = urllib.request.Request(server.url + "/", method="GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.url.endswith("/login") and b"Sign in" in r.read()


def test_verify_needs_host_signed():
    now = datetime.now(timezone.utc)
    amz = now.strftime("%Y%m%dT%H%M%SZ")
    headers = {"authorization": f"AWS4-HMAC-SHA256 Credential=AKIDTEST/{amz[:8]}/us-east-1/sms/"
                                f"aws4_request, SignedHeaders=x-amz-date, Signature={'0' * 64}",
               "x-amz-date": amz}
    with pytest.raises(ServiceError, match="host"):
        verify_sigv4("POST", "/", headers, hashlib.sha256(b"").hexdigest(), CREDS, now=now)


def _botocore_headers(body: bytes, headers: dict, region="us-east-1") -> dict:
    req = AWSRequest(method="POST", url="http://sms.example:8080/", data=body, headers=headers)
    SigV4Auth(Credentials(CREDS.access_key_id, CREDS.secret_access_key), "sms",
              region).add_auth(req)
    out = {k.lower(): v for k, v in req.headers.items()}
    out["host"] = "sms.example:8080"
    return out


_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40).map(
    lambda v: v.strip() or "x")


@given(body=st.binary(max_size=300), target=_value, ctype=_value, extra=_value)
def test_botocore_signatures_verify_and_bind_every_part(body, target, ctype, extra):
    """Whatever botocore signs verifies; changing the method, the path, any signed header
    or one byte of the body breaks it."""
    headers = _botocore_headers(body, {"X-Amz-Target": target, "Content-Type": ctype,
                                       "X-Extra": f"a  {extra}  b"})
    digest = hashlib.sha256(body).hexdigest()
    verify_sigv4("POST", "/", headers, digest, CREDS)
    tampered = [("PUT", "/", headers, digest), ("POST", "/x", headers, digest),
                ("POST", "/", headers, hashlib.sha256(body + b" ").hexdigest())]
    for name in ("x-amz-target", "content-type", "host", "x-extra", "x-amz-date"):
        tampered.append(("POST", "/", {**headers, name: headers[name] + "0"}, digest))
    for method, path, hdrs, dig in tampered:
        with pytest.raises(ServiceError) as e:
            verify_sigv4(method, path, hdrs, dig, CREDS)
        assert e.value.code in ("InvalidSignatureException", "IncompleteSignatureException")


def test_a_signed_read_cannot_be_replayed_as_another_operation(server):
    """Signed with only host;x-amz-date (as a careless client might), a GetServers must
    not be usable as a DeleteServerCatalog."""
    svc = server.service
    svc.import_server_catalog()
    req = signed(server.url, "GetServers", b"{}", sign_only=("host", "x-amz-date"))
    req.headers["X-amz-target"] = TARGET_PREFIX + "DeleteServerCatalog"
    status, doc = send(req)
    assert status == 400 and doc["__type"] == "IncompleteSignatureException", doc
    assert "x-amz-target" in doc["message"]
    assert svc.get_servers()["serverCatalogStatus"] == "AVAILABLE"


def test_a_body_cannot_be_swapped_under_a_signed_content_hash(server):
    svc = server.service
    svc.import_server_catalog()
    server_id = svc.get_servers()["serverList"][0]["serverId"]
    job = svc.create_replication_job(serverId=server_id, seedReplicationTime=svc.clock(),
                                     frequency=12)["replicationJobId"]
    signed_body = json.dumps({"replicationJobId": job, "frequency": 12}).encode()
    swapped = json.dumps({"replicationJobId": job, "frequency": 24}).encode()
    req = signed(server.url, "UpdateReplicationJob", signed_body,
                 headers={"X-Amz-Content-SHA256": hashlib.sha256(signed_body).hexdigest()})
    req.data = swapped
    status, doc = send(req)
    assert status == 400 and doc["__type"] == "InvalidSignatureException", doc
    assert svc.get_replication_jobs()["replicationJobList"][0]["frequency"] == 12
    # the same request with its own body is served
    req.data = signed_body
    assert send(req)[0] == 200


def test_credentials_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("SMSBLOCK_ACCESS_KEY_ID", raising=False)
    with pytest.raises(UsageError, match="SMSBLOCK_ACCESS_KEY_ID"):
        ServerCredentials.from_environment()
    monkeypatch.setenv("SMSBLOCK_ACCESS_KEY_ID", "A")
    monkeypatch.setenv("SMSBLOCK_SECRET_ACCESS_KEY", "zz-secret-zz")
    c = ServerCredentials.from_environment()
    assert (c.access_key_id, c.secret_access_key) == ("A", "zz-secret-zz")
    assert "zz-secret-zz" not in repr(c)


@pytest.mark.parametrize("op,code", [("GetServers", "InternalError"),
                                     ("GetConnectors", "InternalFailure")])
def test_a_bug_is_an_internal_error_not_a_dropped_connection(server, monkeypatch, op, code):
    """500 with the model's InternalError where the operation declares it, else the
    common InternalFailure."""
    def boom(operation, params):
        raise RuntimeError("bug")
    monkeypatch.setattr(server.service, "call", boom)
    status, doc = send(signed(server.url, op, b"{}"))
    assert status == 500 and doc["__type"] == code and "bug" not in doc["message"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server whose state has a catalog, a job with a pending on-demand run (shared by
    the refusal tests: each one checks it changed nothing)."""
    tmp_path = tmp_path_factory.mktemp("live")
    svc = SmsService(tmp_path / "state")
    conn = svc.register_connector("datastore", {"path": str(make_datastore(tmp_path / "ds", 2))})
    svc.import_server_catalog()
    servers = [s["serverId"] for s in svc.get_servers()["serverList"]]
    job = svc.create_replication_job(serverId=servers[0], seedReplicationTime=svc.clock() + 3600,
                                     frequency=12)["replicationJobId"]
    svc.start_on_demand_replication_run(replicationJobId=job)
    srv = make_server(svc, "127.0.0.1", 0, CREDS, region=REGION)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv, svc, {"job": job, "server": servers[0], "free": servers[1],
                     "connector": conn["connectorId"]}
    srv.shutdown()
    srv.server_close()
    svc.close()


@pytest.mark.parametrize("op,params,code", [
    # unknown ids
    ("DeleteReplicationJob", {"replicationJobId": "sms-job-00000000"},
     "ReplicationJobNotFoundException"),
    ("UpdateReplicationJob", {"replicationJobId": "sms-job-00000000", "frequency": 24},
     "ReplicationJobNotFoundException"),
    ("StartOnDemandReplicationRun", {"replicationJobId": "sms-job-00000000"},
     "InvalidParameterException"),     # nor here
    ("GetReplicationRuns", {"replicationJobId": "sms-job-00000000"},
     "InvalidParameterException"),     # ReplicationJobNotFound is not declared here
    ("DisassociateConnector", {"connectorId": "c-00000000000000000"},
     "InvalidParameterException"),
    ("CreateReplicationJob", {"serverId": "s-00000000", "seedReplicationTime": "NOW",
                              "frequency": 12}, "InvalidParameterException"),
    # missing and malformed parameters
    ("DeleteReplicationJob", {}, "MissingRequiredParameterException"),
    ("DisassociateConnector", {}, "MissingRequiredParameterException"),
    ("UpdateReplicationJob", {"replicationJobId": "JOB", "frequency": "24"},
     "InvalidParameterException"),
    ("UpdateReplicationJob", {"replicationJobId": "JOB", "frequency": 6},
     "InvalidParameterException"),
    ("CreateReplicationJob", {"serverId": "FREE", "seedReplicationTime": "NOW"},
     "MissingRequiredParameterException"),
    ("CreateReplicationJob", {"serverId": "FREE", "seedReplicationTime": "NOW", "frequency": 12,
                              "licenseType": "GPL"}, "InvalidParameterException"),
    ("GetReplicationJobs", {"nextToken": "not-a-token"}, "InvalidParameterException"),
    # wrong states
    ("CreateReplicationJob", {"serverId": "SERVER", "seedReplicationTime": "NOW",
                              "frequency": 12}, "ReplicationJobAlreadyExistsException"),
    ("StartOnDemandReplicationRun", {"replicationJobId": "JOB"},
     "OperationNotPermittedException"),
    ("DeleteServerCatalog", {}, "OperationNotPermittedException"),
    ("DisassociateConnector", {"connectorId": "CONNECTOR"}, "OperationNotPermittedException"),
])
def test_refused_requests_get_the_sms_error_and_change_nothing(live, op, params, code):
    from test_service_jobs import dump
    srv, svc, ids = live
    names = {"JOB": ids["job"], "SERVER": ids["server"], "FREE": ids["free"],
             "CONNECTOR": ids["connector"], "NOW": svc.clock()}
    body = json.dumps({k: names.get(v, v) if isinstance(v, str) else v
                       for k, v in params.items()}).encode()
    before = dump(svc)
    status, doc = send(signed(srv.url, op, body))
    assert status == 400 and doc["__type"] == code, doc
    assert code in DECLARED_ERRORS[op] | COMMON_ERRORS
    assert doc["message"] and "\n" not in doc["message"]
    assert dump(svc) == before, "a refused request changed the state"


def test_a_connection_slot_is_released_once_when_thread_start_is_interrupted(tmp_path, monkeypatch,
                                                                            caplog):
    """A signal (SIGTERM in `serve`) can interrupt Thread.start() after the connection's
    thread began: the slot is then released by that thread only, never twice (which
    raised 'Semaphore released too many times' and printed a traceback)."""
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    real_start = threading.Thread.start

    def start_then_interrupted(self):
        real_start(self)
        if getattr(self, "_target", None) is not None and \
                getattr(self._target, "__name__", "") == "process_request_thread":
            self.join(5)      # the connection's thread has run and released its slot
            raise RuntimeError("interrupted after the thread began")

    with serving(tmp_path) as srv:
        monkeypatch.setattr(threading.Thread, "start", start_then_interrupted)
        try:
            urllib.request.urlopen(srv.url + "/login", timeout=5).read()
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert urllib.request.urlopen(srv.url + "/login", timeout=5).status == 200
        import time
        deadline = time.monotonic() + 10      # the last connection's thread ends by itself
        while (srv._slots._value, srv._per_client) != (srv.limits.max_connections, {}) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv._slots._value == srv.limits.max_connections and not srv._per_client
    errors = [r.getMessage() + str(r.exc_info) for r in caplog.records if r.exc_info]
    assert not any("released too many times" in e for e in errors), errors
    assert not any("released too many times" in str(e) for e in seen), seen
