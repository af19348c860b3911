"""Fixtures of the cloud-store tests (import them into a test module with
``from cloud_fixtures import *``): a moto server per test session and worker, a fresh
bucket per test, a fault proxy in front of moto, and the environment that points boto3
(in this process and in CLI subprocesses) at them."""

from __future__ import annotations

import os
import uuid

import pytest

from fault_proxy import FaultProxy
from moto_server import MotoServer

__all__ = ["moto", "aws_env", "bucket", "fault_proxy", "s3_url", "fast_settings", "FAST", "make_tls_cert"]

#: settings that keep tests quick: small parts, short timeouts, short backoff budget
FAST = {"part_size": 64 << 10, "multipart_threshold": 192 << 10, "parallel": 3,
        "connect_timeout": 2, "read_timeout": 2, "retry_attempts": 6, "retry_seconds": 30}


@pytest.fixture(scope="session")
def moto():
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(moto, monkeypatch, tmp_path):
    """Standard AWS variables naming moto, plus an empty smsblock config and staging area
    private to the test."""
    for k in list(os.environ):
        if k.startswith(("AWS_", "SMSBLOCK_S3_", "SMSBLOCK_EBS_")) or k.lower() in ("https_proxy", "http_proxy"):
            monkeypatch.delenv(k)
    cfg = tmp_path / "smsblock-config.toml"
    cfg.write_text("")
    env = {**moto.client_env(), "SMSBLOCK_CONFIG": str(cfg),
           "SMSBLOCK_S3_STAGING_DIR": str(tmp_path / "staging"),
           "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
           "NO_PROXY": "", "no_proxy": ""}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def bucket(moto, aws_env) -> str:
    name = f"smsblock-{uuid.uuid4().hex[:12]}"
    moto.boto3_client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_url(bucket) -> str:
    return f"s3://{bucket}/stores/one"


@pytest.fixture
def fault_proxy(moto):
    proxy = FaultProxy(("127.0.0.1", moto.port)).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fast_settings():
    return dict(FAST)


def make_tls_cert(folder) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (and its key) in PEM files: the CA of a
    TLS-re-signing proxy, made with the ``cryptography`` package."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smsblock test proxy CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, "proxy-ca.pem"), os.path.join(folder, "proxy-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path
