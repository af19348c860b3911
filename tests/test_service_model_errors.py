"""The SMS model's errors: the declared-error table matches the official model, unserved
operations answer UnknownOperationException, undeclared errors are mapped to declared
ones; and real clients (boto3, the AWS CLI) see that, and sign what `serve` requires."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from smsblock.service import SmsService
from smsblock.service.api import COMMON_ERRORS, DECLARED_ERRORS, OPERATIONS, declared_error
from smsblock.service.server import make_server
from test_service_server import CREDS
from test_service_sources import make_datastore

MODEL = "sms/2016-10-24/service-2.json"


@pytest.fixture(scope="module")
def model(aws_models):
    with open(aws_models / MODEL) as f:
        return json.load(f)


def test_the_declared_error_table_is_the_models(model):
    for op in OPERATIONS:
        declared = {e["shape"] for e in model["operations"][op].get("errors", [])}
        assert DECLARED_ERRORS[op] == declared, op
    # every served operation's members and types come from the model too
    kinds = {"string": "string", "integer": "integer", "boolean": "boolean",
             "timestamp": "timestamp", "list": "addresses"}
    shapes = model["shapes"]
    for op, members in OPERATIONS.items():
        shape = model["operations"][op].get("input")
        spec = shapes[shape["shape"]]["members"] if shape else {}
        assert {m: kinds[shapes[s["shape"]]["type"]] for m, s in spec.items()} == members, op


def test_undeclared_errors_map_to_declared_ones():
    assert declared_error("GetReplicationRuns", "ReplicationJobNotFoundException") == \
        "InvalidParameterException"
    assert declared_error("StartOnDemandReplicationRun", "ReplicationJobNotFoundException") == \
        "InvalidParameterException"
    assert declared_error("StartOnDemandReplicationRun", "ServerCannotBeReplicatedException") \
        == "OperationNotPermittedException"
    assert declared_error("UpdateReplicationJob", "ReplicationJobNotFoundException") == \
        "ReplicationJobNotFoundException"
    assert declared_error("GetConnectors", "InvalidParameterException") == "InvalidParameterValue"
    assert declared_error("GetConnectors", "InternalError") == "InternalFailure"
    assert declared_error("GetServers", "InternalError") == "InternalError"
    assert declared_error("GetServers", "SerializationException") == "SerializationException"
    # every code the service raises ends declared or common (the state refusals have no
    # equivalent on the read operations, which never raise them; the fuzz in
    # test_service_badinput checks what is actually raised)
    raised = {"InvalidParameterException", "MissingRequiredParameterException",
              "OperationNotPermittedException", "ReplicationJobNotFoundException",
              "ReplicationJobAlreadyExistsException", "NoConnectorsAvailableException",
              "ServerCannotBeReplicatedException", "ReplicationRunLimitExceededException",
              "InternalError", "SerializationException", "UnknownOperationException"}
    for op in OPERATIONS:
        state = {"OperationNotPermittedException", "NoConnectorsAvailableException",
                 "ServerCannotBeReplicatedException", "ReplicationRunLimitExceededException",
                 "ReplicationJobAlreadyExistsException"}
        for code in raised - (state if op.startswith("Get") else set()):
            assert declared_error(op, code) in DECLARED_ERRORS[op] | COMMON_ERRORS, (op, code)


@pytest.fixture(scope="module")
def served(tmp_path_factory, aws_models):
    tmp = tmp_path_factory.mktemp("model-errors")
    svc = SmsService(tmp / "state")
    svc.register_connector("datastore", {"path": str(make_datastore(tmp / "ds", 1))})
    srv = make_server(svc, "127.0.0.1", 0, CREDS, region="eu-west-1")
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    env = dict(os.environ, AWS_DATA_PATH=str(aws_models), AWS_ACCESS_KEY_ID=CREDS.access_key_id,
               AWS_SECRET_ACCESS_KEY=CREDS.secret_access_key, AWS_DEFAULT_REGION="eu-west-1",
               AWS_CONFIG_FILE=str(tmp / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp / "none"),
               AWS_PAGER="")
    yield srv, env
    srv.shutdown()
    srv.server_close()
    svc.close()


def _client(served, region="eu-west-1"):
    import boto3
    from botocore.config import Config
    srv, env = served
    os.environ["AWS_DATA_PATH"] = env["AWS_DATA_PATH"]
    return boto3.session.Session(
        aws_access_key_id=CREDS.access_key_id, aws_secret_access_key=CREDS.secret_access_key,
        region_name=region).client("sms", endpoint_url=srv.url,
                                   config=Config(retries={"max_attempts": 1}))


def test_boto3_sees_declared_errors_and_unknown_operations(served):
    from botocore.exceptions import ClientError
    sms = _client(served)
    assert len(sms.get_connectors()["connectorList"]) == 1
    with pytest.raises(sms.exceptions.InvalidParameterException):
        sms.get_replication_runs(replicationJobId="sms-job-00000000")
    with pytest.raises(ClientError) as e:
        sms.list_apps()          # in the model, not served
    assert e.value.response["Error"]["Code"] == "UnknownOperationException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as e:
        _client(served, region="us-east-1").get_connectors()
    assert e.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert "eu-west-1" in e.value.response["Error"]["Message"]


def test_the_aws_cli_signs_what_serve_requires(served):
    srv, env = served

    def aws(*args, **kw):
        return subprocess.run(["aws", "sms", *args, "--endpoint-url", srv.url, "--output",
                               "json"], capture_output=True, text=True, timeout=120,
                              env=dict(env, **kw))
    p = aws("get-connectors")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["connectorList"]) == 1
    p = aws("get-connectors", AWS_DEFAULT_REGION="us-west-2")
    assert p.returncode != 0 and "(InvalidSignatureException)" in p.stderr
    p = aws("list-apps")
    assert p.returncode != 0 and "(UnknownOperationException)" in p.stderr


def test_serve_region_option(tmp_path):
    """`smsblock serve --region` is the region requests must be signed for."""
    import sys
    from test_service_server import send, signed
    env = dict(os.environ, SMSBLOCK_ACCESS_KEY_ID=CREDS.access_key_id,
               SMSBLOCK_SECRET_ACCESS_KEY=CREDS.secret_access_key)
    proc = subprocess.Popen([sys.executable, "-m", "smsblock", "serve", "--state",
                             str(tmp_path / "st"), "--port", "0", "--region", "ap-south-2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "region ap-south-2" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split("listening on ")[1].split()[0]
        assert send(signed(url, "GetConnectors", b"{}", region="ap-south-2"))[0] == 200
        status, doc = send(signed(url, "GetConnectors", b"{}", region="us-east-1"))
        assert status == 400 and doc["__type"] == "InvalidSignatureException"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_boto3_reuses_or_replaces_connections_the_server_closed_when_idle(tmp_path, aws_models):
    """The idle deadline closes kept-alive connections; boto3's next call (no retries
    allowed) notices and opens a new one."""
    import time
    from smsblock.service.server import Limits
    svc = SmsService(tmp_path / "state")
    srv = make_server(svc, "127.0.0.1", 0, CREDS, region="eu-west-1",
                      limits=Limits(head_timeout=0.3))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        sms = _client((srv, {"AWS_DATA_PATH": str(aws_models)}))
        for _ in range(3):
            assert sms.get_connectors()["connectorList"] == []
            assert sms.get_servers()["serverCatalogStatus"] == "NOT_IMPORTED"  # kept alive
            time.sleep(0.6)
    finally:
        srv.shutdown()
        srv.server_close()
        svc.close()
