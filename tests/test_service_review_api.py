"""Findings of the attack review of the SMS operations (in process, real state
directory and datastore): GetServers' address filter, bodies that are not objects,
bounded error messages, and timestamp text."""

from __future__ import annotations

import time

import pytest

from smsblock.errors import ServiceError
from smsblock.service import SmsService
from smsblock.service.api import MAX_ADDRESSES
from smsblock.service.models import MAX_MESSAGE, parse_timestamp
from smsblock.service.server import decode_json_body
from test_service_sources import make_datastore


@pytest.fixture
def svc(tmp_path):
    s = SmsService(tmp_path / "state")
    s.register_connector("datastore", {"path": str(make_datastore(tmp_path / "ds", 3))})
    s.import_server_catalog()
    yield s
    s.close()


# --- finding 3: GetServers' vmServerAddressList ------------------------------------------

def test_the_address_filter_is_linear_and_keeps_its_meaning(svc):
    servers = svc.get_servers()["serverList"]
    refs = [s["vmServer"]["vmServerAddress"] for s in servers]
    assert len(refs) == 3
    many = [{"vmManagerId": "nobody", "vmId": f"vm-{i}"} for i in range(MAX_ADDRESSES - 2)]
    start = time.process_time()
    for _ in range(50):
        got = svc.call("GetServers", {"vmServerAddressList": many + [refs[1], {"vmId": refs[2]["vmId"]}]})
    assert time.process_time() - start < 2.0
    assert sorted(s["serverId"] for s in got["serverList"]) == \
        sorted(s["serverId"] for s in servers[1:])
    only_manager = svc.call("GetServers", {"vmServerAddressList": [
        {"vmManagerId": refs[0]["vmManagerId"]}]})
    assert len(only_manager["serverList"]) == 3
    assert len(svc.call("GetServers", {"vmServerAddressList": [{}]})["serverList"]) == 3
    assert svc.call("GetServers", {"vmServerAddressList": [
        {"vmManagerId": "other", "vmId": refs[0]["vmId"]}]})["serverList"] == []


def test_too_many_or_too_long_addresses_are_invalid_parameters(svc):
    too_many = [{"vmId": f"vm-{i}"} for i in range(MAX_ADDRESSES + 1)]
    with pytest.raises(ServiceError, match=f"at most {MAX_ADDRESSES}") as e:
        svc.call("GetServers", {"vmServerAddressList": too_many})
    assert e.value.code == "InvalidParameterException"
    with pytest.raises(ServiceError, match="at most") as e:
        svc.call("GetServers", {"vmServerAddressList": [{"vmId": "x" * 100_000}]})
    assert e.value.code == "InvalidParameterException"


# --- finding 5: only an empty body is {} -------------------------------------------------

@pytest.mark.parametrize("body", [b"[]", b"null", b"0", b"false", b'""', b"  ", b"[{}]"])
def test_a_body_that_is_not_a_json_object_is_a_serialization_error(body):
    with pytest.raises(ServiceError) as e:
        decode_json_body(body)
    assert e.value.code == "SerializationException"


@pytest.mark.parametrize("params", [[], 0, False, "", [{}]])
def test_parameters_that_are_not_an_object_are_refused(svc, params):
    with pytest.raises(ServiceError) as e:
        svc.call("GetConnectors", params)
    assert e.value.code == "SerializationException"


def test_an_empty_body_is_no_parameters(svc):
    assert decode_json_body(b"") == {}
    assert "connectorList" in svc.call("GetConnectors", None)


# --- finding 7: bounded echoes ---------------------------------------------------------------

HUGE = "x" * 1_000_000


@pytest.mark.parametrize("op,params", [
    ("DisassociateConnector", {"connectorId": HUGE}),
    ("CreateReplicationJob", {"serverId": HUGE, "seedReplicationTime": 2e9}),
    ("CreateReplicationJob", {"serverId": "s-12345678", "seedReplicationTime": HUGE}),
    ("GetReplicationJobs", {"replicationJobId": HUGE}),
    ("GetReplicationRuns", {"replicationJobId": HUGE}),
    ("DeleteReplicationJob", {"replicationJobId": HUGE}),
    ("StartOnDemandReplicationRun", {"replicationJobId": HUGE}),
    ("UpdateReplicationJob", {"replicationJobId": HUGE}),
    ("GetServers", {"nextToken": HUGE}),
    ("GetConnectors", {HUGE: 1}),
    ("GetServers", {"maxResults": HUGE}),
])
def test_no_error_message_echoes_a_huge_value(svc, op, params):
    with pytest.raises(ServiceError) as e:
        svc.call(op, params)
    assert len(str(e.value)) <= 400, (op, len(str(e.value)))


def test_every_message_is_bounded_at_the_entry_point(svc, monkeypatch):
    def boom(**kw):
        raise ServiceError("y" * 100_000, "InvalidParameterException")
    monkeypatch.setattr(svc, "get_connectors", boom)
    with pytest.raises(ServiceError) as e:
        svc.call("GetConnectors", {})
    assert len(str(e.value)) <= MAX_MESSAGE


# --- finding 8: timestamp text -----------------------------------------------------------------

@pytest.mark.parametrize("text", ["1_796_280_000", "１７９６２８００００", "١٧٩٦٢٨٠٠٠٠",
                                  " 1796280000", "1796280000\n", "+1796280000e0", "1e9",
                                  "nan", "inf", "0x10", " 2026-12-03T00:00:00Z",
                                  "2026-12-03T00:00:00Z ", "２０２６-12-03"])
def test_timestamp_text_must_be_plain_ascii(text):
    with pytest.raises(ServiceError) as e:
        parse_timestamp(text, "seedReplicationTime")
    assert e.value.code == "InvalidParameterException"


@pytest.mark.parametrize("text,epoch", [("1796280000", 1796280000), ("1796280000.25", 1796280000.25),
                                        ("2026-12-03T06:40:00Z", 1796280000),
                                        ("2026-12-03T07:40:00+01:00", 1796280000),
                                        ("2026-12-03", 1796256000)])
def test_plain_timestamp_text_is_accepted(text, epoch):
    assert parse_timestamp(text).timestamp() == epoch
