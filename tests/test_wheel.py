"""The wheel: built from the sdist, installed into a clean virtual environment, and run there.

`scripts/build-wheel.sh` (what `make wheel` runs) builds the sdist, then a wheel from that sdist,
repaired by auditwheel (the native libraries copied into smsblock.libs/, a manylinux tag). Here
the wheel goes into a fresh venv (no system site-packages, binary packages only, no compiler
on the PATH) and must read a VMware sample byte-exact and replicate and restore it; `ldd` of
its installed native modules may name only what every Debian has (libc and the dynamic
loader) and the libraries the wheel itself carries.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]

# what a bare Debian has: the C library and its loader (linux-vdso is the kernel's)
BASE_LIBRARIES = re.compile(r"(linux-vdso|libc|libm|libpthread|libdl|ld-linux-x86-64|ld-linux-aarch64)\.so")
SAMPLE_SHA256 = "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build-wheel.sh"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("smsblock-*.whl"))
    sdists = list(out.glob("smsblock-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_the_wheel_is_manylinux_and_carries_its_native_libraries(built, tmp_path):
    wheel = built["wheel"]
    assert re.search(r"[-.]manylinux_\d+_\d+_(x86_64|aarch64)\.whl$", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as z:
        modules = [n for n in z.namelist() if n.endswith(".so")]
        assert {Path(m).name.split(".")[0] for m in modules} >= {"_vmdk", "_scan", "_deflate"}
        assert not any(n.endswith((".pyx", ".c")) for n in z.namelist())
        z.extractall(tmp_path)
    carried = Path(os.path.realpath(tmp_path / "smsblock.libs"))
    for module in modules:
        ldd = subprocess.run(["ldd", str(tmp_path / module)], capture_output=True, text=True, check=True)
        assert "not found" not in ldd.stdout, ldd.stdout
        for line in filter(str.strip, ldd.stdout.splitlines()):
            name, _, rest = line.strip().partition(" => ")
            where = Path(os.path.realpath(rest.split(" (")[0])) if rest else None
            if BASE_LIBRARIES.match(Path(name).name):
                continue
            # anything else must be a library the wheel carries, found through the module's RPATH
            assert where is not None and where.parent == carried, f"{module} needs {line.strip()}"


def test_the_sdist_holds_the_native_sources(built):
    with tarfile.open(built["sdist"]) as t:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in t.getnames() if "/" in n}
    for pyx in ROOT.glob("smsblock/*.pyx"):
        assert f"smsblock/{pyx.name}" in names
    for header in ROOT.glob("csrc/*.h"):
        assert f"csrc/{header.name}" in names
    assert "setup.py" in names and "pyproject.toml" in names


def test_the_wheel_installs_and_runs_in_a_clean_venv(built, tmp_path, vmdk_samples, aws_models, monkeypatch):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # no compiler reachable: a wheel install must not need one
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", CC="/bin/false", CXX="/bin/false")
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", "--only-binary", ":all:", str(built["wheel"])],
                         capture_output=True, text=True, env=env, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]

    def smsblock(*args):
        proc = subprocess.run([str(venv / "bin" / "smsblock"), *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import smsblock._vmdk as m; print(m.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout, where.stdout   # the wheel's module, not the checkout's

    sample = vmdk_samples / "monolithicSparse.vmdk"
    smsblock("convert", sample, tmp_path / "out.raw")
    assert hashlib.sha256((tmp_path / "out.raw").read_bytes()).hexdigest() == SAMPLE_SHA256
    smsblock("replicate", sample, "--store", tmp_path / "store", "--server", "web-01", "--create")
    smsblock("restore", "--store", tmp_path / "store", "--server", "web-01", "-o", tmp_path / "back.raw")
    assert hashlib.sha256((tmp_path / "back.raw").read_bytes()).hexdigest() == SAMPLE_SHA256

    # `serve` needs nothing beyond the core packages (no botocore in this venv): boto3 from
    # the test's own environment drives it
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import botocore"], env=env, capture_output=True)
    assert check.returncode != 0
    serve_env = dict(env, SMSBLOCK_ACCESS_KEY_ID="AKIDWHEEL", SMSBLOCK_SECRET_ACCESS_KEY="wheel-secret")
    serve = subprocess.Popen([str(venv / "bin" / "smsblock"), "serve", "--state", str(tmp_path / "state"),
                              "--host", "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=serve_env, cwd=tmp_path)
    try:
        line = serve.stdout.readline()
        assert "listening on" in line, (line, serve.stderr.read() if serve.poll() is not None else "")
        url = line.split("listening on ")[1].split()[0]
        import boto3
        monkeypatch.setenv("AWS_DATA_PATH", str(aws_models))
        # a new session: boto3's default one may predate AWS_DATA_PATH (its loader caches)
        client = boto3.session.Session().client(
            "sms", endpoint_url=url, region_name="us-east-1",
            aws_access_key_id="AKIDWHEEL", aws_secret_access_key="wheel-secret")
        assert client.get_connectors()["connectorList"] == []
    finally:
        serve.terminate()
        serve.wait(10)
        serve.stdout.close()
        serve.stderr.close()
