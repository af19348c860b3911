"""Hostile operator input to the service and vCenter commands: one line, never a traceback."""

import subprocess
import sys

import pytest


def smsblock(*args, env=None):
    import os
    return subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def one_line_error(p):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("args", [
    ["serve", "--port", "99999"],
    ["serve", "--port", "http"],
])
def test_serve_port_out_of_range(tmp_path, args):
    p = smsblock(*args, "--state", tmp_path / "st")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "port" in p.stderr


def test_vcenter_password_file_and_address_and_ca_bundle(tmp_path):
    binary = tmp_path / "pw.bin"
    binary.write_bytes(b"\xc1\xff\xfe\n")
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    good = tmp_path / "pw"
    good.write_text("secret\n")
    cases = [
        (["--vcenter", "vc.example", "--password-file", binary], "not UTF-8"),
        (["--vcenter", "vc.example", "--password-file", "/dev/zero"], "not a regular file"),
        (["--vcenter", "http://[::1", "--password-file", good], "--vcenter"),
        (["--vcenter", "127.0.0.1:9", "--password-file", good, "--ca-bundle", garbage], "--ca-bundle"),
    ]
    for extra, needle in cases:
        p = smsblock("connector", "register", "--state", tmp_path / "st", "--username", "u", *extra)
        one_line_error(p)
        assert needle in p.stderr, (extra, p.stderr)
        assert "secret" not in p.stderr + p.stdout


def test_huge_number_of_amis_to_keep_is_invalid_parameter(tmp_path):
    from smsblock.errors import ServiceError
    from smsblock.service.jobs import check_amis_to_keep
    assert check_amis_to_keep(2**31 - 1) == 2**31 - 1
    for bad in (2**31, 10**23, -1, True, 1.5):
        with pytest.raises(ServiceError) as e:
            check_amis_to_keep(bad)
        assert e.value.code == "InvalidParameterException"


@pytest.mark.parametrize("region", ["US EAST", "eu-west-1\n", "-x", "a" * 80])
def test_serve_region_must_be_a_region_name(tmp_path, region):
    p = smsblock("serve", "--state", tmp_path / "st", "--region", region, "--port", "0",
                 env={"SMSBLOCK_ACCESS_KEY_ID": "A", "SMSBLOCK_SECRET_ACCESS_KEY": "B"})
    assert p.returncode == 2 and "Traceback" not in p.stderr and "region" in p.stderr


def test_undecodable_bytes_on_the_command_line_are_a_service_error(tmp_path):
    """argv bytes that are not UTF-8 reach the service as lone surrogates."""
    import os
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"smsblock", b"sms",
                        b"update-replication-job", b"--state", os.fsencode(tmp_path / "st"),
                        b"--replication-job-id", b"sms-job-0123abcd", b"--description", b"caf\xe9"],
                       capture_output=True, timeout=60)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 255 and "Traceback" not in err, err
    assert "(InvalidParameterException)" in err and "description" in err


# --- hostile values through HTTP: the model's client errors, never a 500 ------------------

import base64
import json
import threading

from test_service_server import CREDS, REGION, send, signed


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from smsblock.service import SmsService
    from smsblock.service.server import make_server
    from test_service_sources import make_datastore
    tmp = tmp_path_factory.mktemp("badinput")
    svc = SmsService(tmp / "state")
    svc.register_connector("datastore", {"path": str(make_datastore(tmp / "ds", 2))})
    svc.import_server_catalog()
    servers = [s["serverId"] for s in svc.get_servers()["serverList"]]
    job = svc.create_replication_job(serverId=servers[0], seedReplicationTime=svc.clock(),
                                     frequency=12)["replicationJobId"]
    srv = make_server(svc, "127.0.0.1", 0, CREDS, region=REGION)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield srv, svc, {"JOB": job, "SERVER": servers[1]}
    srv.shutdown()
    srv.server_close()
    svc.close()


def _call(live, op, params):
    from smsblock.service.api import COMMON_ERRORS, DECLARED_ERRORS
    from test_service_jobs import dump
    srv, svc, ids = live
    if isinstance(params, bytes):
        body = params
    else:
        params = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in params.items()}
        body = json.dumps(params).encode()
    before = dump(svc)
    status, doc = send(signed(srv.url, op, body))
    assert status == 400, (op, params, status, doc)
    assert doc["__type"] in DECLARED_ERRORS[op] | COMMON_ERRORS, (op, doc)
    assert doc["message"] and "\n" not in doc["message"]
    assert dump(svc) == before
    return doc


def _nested_token(depth):
    return base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).decode()


@pytest.mark.parametrize("op", ["GetConnectors", "GetServers", "GetReplicationJobs",
                                "GetReplicationRuns"])
@pytest.mark.parametrize("token", [
    _nested_token(100000), _nested_token(300),
    base64.urlsafe_b64encode(b'{"op": "GetServers", "offset": true}').decode(),
    base64.urlsafe_b64encode(b'{"op": "GetServers", "offset": 1e3}').decode(),
    base64.urlsafe_b64encode(b'"text"').decode(), "\u00e9t\u00e9"],
    ids=["nested 100000", "nested 300", "bool offset", "float offset", "string", "non-ASCII"])
def test_hostile_next_tokens_are_client_errors(live, op, token):
    params = {"nextToken": token}
    if op == "GetReplicationRuns":
        params["replicationJobId"] = "JOB"
    _call(live, op, params)


@pytest.mark.parametrize("when", [
    "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59.999999Z",
    "0001-01-01T00:00:00Z", 1e20, -1e20, "1e400", "nan", "-inf", 253402300800,
])
@pytest.mark.parametrize("op,member,base", [
    ("CreateReplicationJob", "seedReplicationTime", {"serverId": "SERVER", "frequency": 12}),
    ("UpdateReplicationJob", "nextReplicationRunStartTime", {"replicationJobId": "JOB"}),
])
def test_timestamps_at_the_edges_of_the_calendar_are_client_errors(live, op, member, base, when):
    _call(live, op, {**base, member: when})


_STRINGS = {
    "GetConnectors": {"nextToken": {}},
    "DisassociateConnector": {"connectorId": {}},
    "GetServers": {"nextToken": {}},
    "CreateReplicationJob": {m: {"serverId": "SERVER", "seedReplicationTime": 0, "frequency": 12}
                             for m in ("serverId", "licenseType", "roleName", "description",
                                       "kmsKeyId", "seedReplicationTime")},
    "GetReplicationJobs": {"replicationJobId": {}, "nextToken": {}},
    "GetReplicationRuns": {"replicationJobId": {}, "nextToken": {"replicationJobId": "JOB"}},
    "UpdateReplicationJob": {m: {"replicationJobId": "JOB"}
                             for m in ("replicationJobId", "licenseType", "roleName",
                                       "description", "kmsKeyId", "nextReplicationRunStartTime")},
    "StartOnDemandReplicationRun": {m: {"replicationJobId": "JOB"}
                                    for m in ("replicationJobId", "description")},
    "DeleteReplicationJob": {"replicationJobId": {}},
}


@pytest.mark.parametrize("op,member,base", [(op, m, b) for op, members in _STRINGS.items()
                                            for m, b in members.items()])
@pytest.mark.parametrize("bad", ["\ud800", "ok\udfff", "\udcff\udcfe", "a\ud83d",
                                 "\x00", "ok\x00"])      # NUL: PostgreSQL's text refuses it
def test_lone_surrogates_and_nul_in_every_string_are_client_errors(live, op, member, base, bad):
    doc = _call(live, op, {**base, member: bad})
    assert member in doc["message"] or "nextToken" in doc["message"], doc


def test_lone_surrogates_in_address_lists_and_member_names(live):
    _call(live, "GetServers", {"vmServerAddressList": [{"vmId": "\ud800"}]})
    _call(live, "GetServers", {"\ud800": 1})


@pytest.mark.parametrize("op", ["GetServers", "CreateReplicationJob", "UpdateReplicationJob"])
@pytest.mark.parametrize("body", [b'{"description": "caf\xe9"}', b'{"x": "\xed\xa0\x80"}',
                                  b"\xc0\xaf", b'{"description": "\xff\xfe"}'])
def test_bodies_that_are_not_utf8_are_serialization_errors(live, op, body):
    assert _call(live, op, body)["__type"] == "SerializationException"


@pytest.mark.parametrize("member", ["maxResults", "frequency", "numberOfRecentAmisToKeep"])
@pytest.mark.parametrize("value", [2**31, -2**31 - 1, 2**63, 10**30])
def test_integers_beyond_32_bits_are_client_errors(live, member, value):
    op = "GetServers" if member == "maxResults" else "UpdateReplicationJob"
    params = {member: value} if op == "GetServers" else {"replicationJobId": "JOB", member: value}
    _call(live, op, params)


# --- any JSON value, any member: a ServiceError, never another exception --------------------

from hypothesis import given, settings, strategies as st

_surrogates = st.text(st.characters(min_codepoint=0xd7f0, max_codepoint=0xe010,
                                    exclude_categories=()), min_size=1, max_size=3)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(st.characters(), max_size=30) | _surrogates
    | st.sampled_from(["JOB", "SERVER", "NOW", "9999-12-31T23:59:59-23:59",
                       "0001-01-01T00:00:00+01:00", _nested_token(100000), "AWS", "BYOL"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=8)


@pytest.mark.parametrize("op", ["GetConnectors", "DisassociateConnector", "GetServers",
                                "CreateReplicationJob", "GetReplicationJobs",
                                "GetReplicationRuns", "UpdateReplicationJob",
                                "StartOnDemandReplicationRun", "DeleteReplicationJob"])
@settings(max_examples=60)
@given(data=st.data())
def test_any_values_give_a_service_error_or_an_answer(tmp_path_factory, op, data):
    from smsblock.errors import ServiceError
    from smsblock.service.api import COMMON_ERRORS, DECLARED_ERRORS, OPERATIONS
    svc, ids = _fuzz_service(tmp_path_factory)
    members = st.sampled_from(sorted(OPERATIONS[op]) + ["bogus"])
    # a valid request with one or two members replaced, so the values reach the depths
    value = st.sampled_from(_HOSTILE) | _json
    params = {**_VALID.get(op, {}), **data.draw(st.dictionaries(members, value, max_size=2))}
    params = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in params.items()}
    try:
        out = svc.call(op, params)
    except ServiceError as e:
        assert e.code in DECLARED_ERRORS[op] | COMMON_ERRORS, (op, params, e.code, e)
        str(e).encode("utf-8", "backslashreplace")
    else:
        json.dumps(out).encode("utf-8")   # what the server sends: must be encodable


_FUZZ = {}
_HOSTILE = ["\ud800", "a\udfff", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00",
            _nested_token(100000), 2**63, -2**31 - 1, 1e308, float("nan"), float("-inf"), "",
            "x" * 300, [], {}, [{"vmId": "\ud800"}], "NOW", "JOB"]
_VALID = {
    "DisassociateConnector": {"connectorId": "c-00000000000000000"},
    "CreateReplicationJob": {"serverId": "SERVER", "seedReplicationTime": "NOW", "frequency": 12},
    "GetReplicationRuns": {"replicationJobId": "JOB"},
    "UpdateReplicationJob": {"replicationJobId": "JOB", "frequency": 13},
    "StartOnDemandReplicationRun": {"replicationJobId": "JOB"},
    "DeleteReplicationJob": {"replicationJobId": "sms-job-00000000"},
}


def _fuzz_service(tmp_path_factory):
    if not _FUZZ:
        from smsblock.service import SmsService
        from test_service_sources import make_datastore
        tmp = tmp_path_factory.mktemp("fuzz")
        svc = SmsService(tmp / "state")
        svc.register_connector("datastore", {"path": str(make_datastore(tmp / "ds", 2))})
        svc.import_server_catalog()
        servers = [s["serverId"] for s in svc.get_servers()["serverList"]]
        job = svc.create_replication_job(serverId=servers[0], seedReplicationTime=svc.clock(),
                                         frequency=12)["replicationJobId"]
        _FUZZ.update(svc=svc, ids={"JOB": job, "SERVER": servers[1], "NOW": svc.clock()})
    return _FUZZ["svc"], _FUZZ["ids"]
