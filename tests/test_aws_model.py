"""`smsblock aws-model`: the SMS model for the AWS CLI, taken from a botocore release on the
package index, and the unmodified AWS CLI driving `smsblock serve` with nothing else set up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from test_service_e2e import AKID, SECRET, Server, smsblock

pytestmark = pytest.mark.xdist_group("sms-e2e")


@pytest.fixture(scope="module")
def botocore_wheel(tmp_path_factory):
    """The botocore release the command takes the model from, downloaded once (pip's cache)."""
    from smsblock.service.awsmodel import BOTOCORE_WITH_SMS

    into = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    "-d", str(into), f"botocore=={BOTOCORE_WITH_SMS}"], check=True, timeout=600)
    return next(into.glob("botocore-*.whl"))


def test_the_model_from_the_package_index_is_the_official_one(tmp_path, aws_models):
    out = smsblock("aws-model", "--dest", tmp_path / "models", "--json")
    result = json.loads(out.stdout)
    folder = tmp_path / "models" / "sms" / "2016-10-24"
    assert result["model_dir"] == str(folder) and result["needs_aws_data_path"] is True
    for name in ("service-2.json", "paginators-1.json", "endpoint-rule-set-1.json"):
        assert json.loads((folder / name).read_text()) == \
            json.loads((aws_models / "sms" / "2016-10-24" / name).read_text()), name
        assert (folder / name).stat().st_mode & 0o077 == 0


def test_the_aws_cli_drives_serve_with_the_installed_model(tmp_path, botocore_wheel):
    home = tmp_path / "home"
    home.mkdir()
    # default destination: ~/.aws/models, where the AWS CLI looks with no AWS_DATA_PATH at all
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(home), AWS_ACCESS_KEY_ID=AKID, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1", AWS_PAGER="")
    proc = subprocess.run([sys.executable, "-m", "smsblock", "aws-model", "--wheel", str(botocore_wheel)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (home / ".aws" / "models" / "sms" / "2016-10-24" / "service-2.json").is_file()
    assert "AWS_DATA_PATH" not in proc.stdout
    server = Server(tmp_path / "state")
    try:
        aws = subprocess.run(["aws", "sms", "get-connectors", "--endpoint-url", server.url, "--output", "json"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert aws.returncode == 0, aws.stderr
        assert json.loads(aws.stdout)["connectorList"] == []
    finally:
        server.stop()


def test_a_wheel_without_the_model_is_one_line(tmp_path):
    fake = tmp_path / "botocore-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("botocore/__init__.py", "")
    proc = smsblock("aws-model", "--dest", tmp_path / "m", "--wheel", fake, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "no longer ships the SMS model" in proc.stderr
    not_a_zip = tmp_path / "x.whl"
    not_a_zip.write_bytes(b"nope")
    proc = smsblock("aws-model", "--dest", tmp_path / "m", "--wheel", not_a_zip, check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "not a botocore wheel" in proc.stderr
