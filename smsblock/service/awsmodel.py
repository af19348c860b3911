"""The SMS service model for the AWS CLI and boto3, which current botocore no longer ships.

AWS retired Server Migration Service and botocore dropped its model (``data/sms``) after
1.40.30.  The AWS CLI and boto3 look for extra models in ``~/.aws/models`` (botocore's
customer data path) and in ``AWS_DATA_PATH``; :func:`install_sms_model` takes the model
from the botocore 1.40.30 wheel on the package index (or from a wheel file the user
already has) and writes it there, so that ``aws sms ... --endpoint-url`` runs against
``smsblock serve`` out of the box.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import SmsBlockError, UsageError
from ..fsutil import replace_file

__all__ = ["BOTOCORE_WITH_SMS", "API_VERSION", "default_models_dir", "install_sms_model"]

BOTOCORE_WITH_SMS = "1.40.30"          # a botocore release that still ships data/sms
API_VERSION = "2016-10-24"
MODEL_PREFIX = f"botocore/data/sms/{API_VERSION}/"
MODEL_FILES = ("service-2.json", "paginators-1.json", "endpoint-rule-set-1.json", "examples-1.json")
MAX_MODEL_FILE = 8 << 20               # the largest is about 90 KB; a bigger one is not a model


def default_models_dir() -> Path:
    """Where botocore looks for customer models without any setting: ``~/.aws/models``."""
    return Path.home() / ".aws" / "models"


def install_sms_model(dest: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None,
                      botocore_version: str = BOTOCORE_WITH_SMS) -> Path:
    """Write the SMS model under ``dest`` (default ``~/.aws/models``) as
    ``DEST/sms/2016-10-24/*.json``; return that folder.

    The model comes from ``wheel`` (a botocore wheel file) or, by default, from the botocore
    ``botocore_version`` wheel downloaded from the package index with pip.
    """
    dest = Path(dest) if dest is not None else default_models_dir()
    with tempfile.TemporaryDirectory(prefix="smsblock-botocore-") as tmp:
        source = Path(wheel) if wheel is not None else _download_botocore(botocore_version, Path(tmp))
        files = _model_files(source)
        folder = dest / "sms" / API_VERSION
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, data in files.items():
            replace_file(folder / name, data)
    return folder


def _download_botocore(version: str, into: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--only-binary", ":all:", "--dest", str(into), f"botocore=={version}"],
        capture_output=True, text=True, timeout=600)
    wheels = sorted(into.glob("botocore-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise SmsBlockError(f"could not download botocore {version} from the package index: {last} "
                            f"(download a botocore {version} wheel elsewhere and pass it with --wheel)")
    return wheels[0]


def _model_files(wheel: Path) -> dict[str, bytes]:
    """The SMS model's JSON files from a botocore wheel, decompressed and checked."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise UsageError(f"{wheel}: not a botocore wheel ({e})") from None
    files = {}
    with archive:
        members = {info.filename: info for info in archive.infolist() if info.filename.startswith(MODEL_PREFIX)}
        for name in MODEL_FILES:
            info = members.get(MODEL_PREFIX + name) or members.get(MODEL_PREFIX + name + ".gz")
            if info is None:
                if name == "examples-1.json":
                    continue
                raise UsageError(f"{wheel}: has no {MODEL_PREFIX}{name} (botocore after "
                                 f"{BOTOCORE_WITH_SMS} no longer ships the SMS model)")
            if info.file_size > MAX_MODEL_FILE:
                raise UsageError(f"{wheel}: {info.filename} is {info.file_size} bytes, not a model file")
            data = archive.read(info)
            if info.filename.endswith(".gz"):
                with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
                    data = g.read(MAX_MODEL_FILE + 1)
                if len(data) > MAX_MODEL_FILE:
                    raise UsageError(f"{wheel}: {info.filename} inflates past {MAX_MODEL_FILE} bytes")
            try:
                json.loads(data)
            except ValueError as e:
                raise UsageError(f"{wheel}: {info.filename} is not JSON ({e})") from None
            files[name] = data
    service = json.loads(files["service-2.json"])
    meta = service.get("metadata", {}) if isinstance(service, dict) else {}
    if meta.get("endpointPrefix") != "sms" or meta.get("apiVersion") != API_VERSION:
        raise UsageError(f"{wheel}: {MODEL_PREFIX}service-2.json is not the SMS {API_VERSION} model")
    return files
