"""Shared fixtures: paths to ../shared, qemu-img as the disk-format oracle, hypothesis profiles."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SMSBLOCK_SHARED", ROOT.parent / "shared"))
VMDK_SAMPLES = SHARED / "vmdk-samples" / "vmware-workstation"
AWS_MODELS = SHARED / "aws-models"

settings.register_profile(
    "default", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large])
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run qemu-img (the oracle); raise with its stderr on failure."""
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
    return proc


def qemu_raw_bytes(path, tmp_path: Path, fmt: str | None = None) -> bytes:
    """The raw content of an image as qemu-img sees it."""
    out = tmp_path / f"oracle-{os.getpid()}-{abs(hash(str(path)))}.raw"
    args = ["convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", str(path), str(out)]
    qemu_img(*args)
    data = out.read_bytes()
    out.unlink()
    return data


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="session")
def vmdk_samples() -> Path:
    if not VMDK_SAMPLES.is_dir():
        pytest.fail(f"VMware sample disks not found at {VMDK_SAMPLES} (../shared missing?)")
    return VMDK_SAMPLES


@pytest.fixture(scope="session")
def aws_models() -> Path:
    if not AWS_MODELS.is_dir():
        pytest.fail(f"AWS service models not found at {AWS_MODELS}")
    return AWS_MODELS


@pytest.fixture(scope="session", autouse=True)
def _tools_present():
    missing = [t for t in ("qemu-img",) if shutil.which(t) is None]
    if missing:
        pytest.fail(f"required tools missing: {missing}; run scripts/setup.sh")


# --- the control plane's state on SQLite and on PostgreSQL ------------------------------
#
# The service test modules below run each test twice: on a SQLite state directory and on
# a PostgreSQL database (a real server, tests/postgres_server.py, one schema per state
# directory a test opens).  `--state-backend sqlite|postgresql|both` (default both, or
# SMSBLOCK_TEST_STATE) picks.  Tests that read the SQLite file itself, or run a
# subprocess on a state directory, are marked sqlite_only (or give the subprocess
# postgres_server.state_target(svc.state)).  tests/test_service_postgres.py has the
# multi-process tests (two `serve`, two schedulers) on PostgreSQL.
STATE_MODULES = {
    "test_service_jobs", "test_service_scheduler", "test_service_catalog_import",
    "test_service_executor", "test_service_review_jobs", "test_service_review_api",
    "test_service_server", "test_service_cli",
}


def pytest_addoption(parser):
    parser.addoption("--state-backend", choices=("sqlite", "postgresql", "both"),
                     default=os.environ.get("SMSBLOCK_TEST_STATE", "both"),
                     help="the state databases the service tests run on (default: both)")


def pytest_generate_tests(metafunc):
    if "state_backend" not in metafunc.fixturenames:
        return
    if metafunc.module.__name__.rpartition(".")[2] not in STATE_MODULES:
        return
    choice = metafunc.config.getoption("--state-backend")
    backends = ["sqlite", "postgresql"] if choice == "both" else [choice]
    if metafunc.definition.get_closest_marker("sqlite_only"):
        backends = ["sqlite"]
    metafunc.parametrize("state_backend", backends, indirect=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the session (FAILS in CI when the binaries are missing)."""
    from postgres_server import PostgresServer, postgres_binaries
    server = PostgresServer(postgres_binaries())
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def state_backend(request, monkeypatch):
    """"sqlite", or "postgresql": then every SmsService opened on a directory keeps its
    state in a fresh PostgreSQL schema (the directory keeps the local files)."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgresql":
        from smsblock.service import api, state as state_mod
        server = request.getfixturevalue("postgres_server")
        databases: dict[Path, str] = {}

        def pg_state(state_dir=None):
            local = Path(state_dir if state_dir is not None
                         else state_mod.default_state_dir()).absolute()
            if local not in databases:
                databases[local] = server.new_schema()
            return state_mod.State(databases[local], local_dir=local)
        monkeypatch.setattr(api, "State", pg_state)
    return backend
