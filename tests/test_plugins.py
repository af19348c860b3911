"""Source kinds from plugins: a package that declares an entry point of the group
``smsblock.sources`` is usable from the CLI, the connector and the API with no change to
smsblock.  The plugin is the worked example of docs/api.md (module and pyproject.toml
taken from the page), really built and installed by pip - into a folder of its own put on
PYTHONPATH, never into the interpreter's site-packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from smsblock.errors import ConnectorError
from test_embedding import doc_example
from test_service_sources import bootable_image

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

BROKEN = {   # module name: source; entry point name: object
    "smsblock_broken_import": 'raise RuntimeError("plugin exploded\\nsecond line")\n',
    "smsblock_not_callable": "VALUE = 42\n",
}
BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "smsblock-broken-plugins"
version = "0.1"

[project.entry-points."smsblock.sources"]
broken-import = "smsblock_broken_import:Source"
not-callable = "smsblock_not_callable:VALUE"

[tool.setuptools]
py-modules = ["smsblock_broken_import", "smsblock_not_callable"]
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the installed plugins (the docs' chunk source and broken ones)."""
    base = tmp_path_factory.mktemp("plugins")
    good, bad = base / "smsblock-chunks", base / "smsblock-broken"
    good.mkdir()
    (good / "smsblock_chunks.py").write_text(doc_example("smsblock_chunks.py"))
    (good / "pyproject.toml").write_text(doc_example("pyproject.toml"))
    bad.mkdir()
    (bad / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    for name, text in BROKEN.items():
        (bad / f"{name}.py").write_text(text)
    target = base / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", target, good, bad],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PIP_ROOT_USER_ACTION="ignore"))
    assert proc.returncode == 0, proc.stderr
    assert (target / "smsblock_chunks.py").is_file()
    return target


def smsblock(site: Path | None, *args, check=True) -> subprocess.CompletedProcess:
    path = [str(ROOT)] + ([str(site)] if site is not None else [])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(env, PYTHONPATH=os.pathsep.join(path)))
    if check:
        assert proc.returncode == 0, f"smsblock {args}: {proc.stderr}"
    return proc


def chunk_vm(root: Path, vm: str, disks: list[bytes]) -> None:
    """A VM of the chunk source: its disks split into 1 MiB chunk files (zero ones left
    out: they read as zeros)."""
    for n, data in enumerate(disks):
        folder = root / vm / f"disk{n}"
        folder.mkdir(parents=True)
        (folder / "disk.json").write_text(json.dumps({"size": len(data)}))
        for i in range(0, len(data), MiB):
            piece = data[i:i + MiB]
            if piece.count(0) != len(piece):
                (folder / f"{i // MiB}.chunk").write_bytes(piece)


def test_a_plugin_source_kind_drives_the_cli_and_a_connector_run(site, tmp_path):
    boot = bootable_image(tmp_path / "img").read_bytes()
    data = os.urandom(300_000) + bytes(MiB) + b"end"
    vms = tmp_path / "vms"
    chunk_vm(vms, "web01", [boot, data])
    cfg = tmp_path / "source.json"
    cfg.write_text(json.dumps({"root": str(vms)}))
    state = tmp_path / "state"

    # without the plugin on the path, the kind is unknown: smsblock itself knows no "chunks"
    proc = smsblock(None, "connector", "register", "--state", state, "--source-kind", "chunks",
                    "--source-config", f"@{cfg}", check=False)
    assert proc.returncode == 1 and "unknown connector source kind 'chunks'" in proc.stderr

    conn = json.loads(smsblock(site, "connector", "register", "--state", state,
                               "--source-kind", "chunks", "--source-config", f"@{cfg}").stdout)
    assert conn["vmManagerName"] == str(vms.resolve()) and conn["status"] == "HEALTHY"
    assert smsblock(site, "sms", "import-server-catalog", "--state", state).stdout == ""
    (server,) = json.loads(smsblock(site, "sms", "get-servers", "--state", state).stdout)[
        "serverList"]
    assert server["vmServer"]["vmPath"] == "/Datacenters/chunks/vm/web01"
    sid = server["serverId"]
    seed = datetime.fromtimestamp(time.time() + 3600, tz=timezone.utc).isoformat()
    job = json.loads(smsblock(site, "sms", "create-replication-job", "--state", state,
                              "--server-id", sid, "--seed-replication-time", seed,
                              "--frequency", 12).stdout)["replicationJobId"]
    run = json.loads(smsblock(site, "sms", "start-on-demand-replication-run", "--state", state,
                              "--replication-job-id", job).stdout)["replicationRunId"]
    did = json.loads(smsblock(site, "connector", "run", "--state", state, "--once").stdout)
    runs = json.loads(smsblock(site, "sms", "get-replication-runs", "--state", state,
                               "--replication-job-id", job).stdout)
    assert did["completed"] == [run], runs
    (r,) = runs["replicationRunList"]
    assert r["state"] == "COMPLETED" and r["amiId"].startswith("ami-")

    for key, expected in ((sid, boot), (f"{sid}-disk1", data)):
        out = tmp_path / f"{key}.raw"
        smsblock(None, "restore", "--store", state / "store", "--server", key, "-o", out)
        assert out.read_bytes() == expected


@pytest.mark.parametrize("kind,why", [
    ("broken-import", "connector source kind 'broken-import': plugin smsblock-broken-plugins "
                      "0.1: smsblock_broken_import:Source failed to load: RuntimeError: "
                      "plugin exploded second line"),
    ("not-callable", "connector source kind 'not-callable': plugin smsblock-broken-plugins "
                     "0.1: smsblock_not_callable:VALUE is not a factory"),
])
def test_a_broken_plugin_is_one_line_naming_it(site, tmp_path, kind, why):
    proc = smsblock(site, "connector", "register", "--state", tmp_path / "state",
                    "--source-kind", kind, check=False)
    assert proc.returncode == 1 and why in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    # the built-ins and the other plugins are not affected
    (tmp_path / "ds").mkdir()
    smsblock(site, "connector", "register", "--state", tmp_path / "state",
             "--datastore", tmp_path / "ds")


# --- in process: lookup rules, with plugin metadata as pip writes it --------------------

def _dist_info(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[smsblock.sources]\n{entry_points}\n")


def test_lookup_rules(tmp_path, monkeypatch):
    from smsblock.service.sources import open_source, source_kinds
    site = tmp_path / "site"
    site.mkdir()
    (site / "plug_ok.py").write_text(
        "from smsblock.service.sources import DatastoreSource\n"
        "def make(config):\n    return DatastoreSource(config['path'])\n")
    _dist_info(site, "plug-a", "test-dup = plug_ok:make\ntest-lazy = plug_ok:make")
    _dist_info(site, "plug-b", "test-dup = plug_other:make\ndatastore = nowhere:Nothing")
    monkeypatch.syspath_prepend(str(site))
    assert {"test-dup", "test-lazy", "datastore", "vsphere"} <= set(source_kinds())

    with pytest.raises(ConnectorError, match=r"'test-dup' is declared by more than one plugin "
                                             r"\(plugin plug-a 1\.0: plug_ok:make; plugin "
                                             r"plug-b 1\.0: plug_other:make\)"):
        open_source("test-dup", {})
    # loaded on first use only; a plugin cannot replace a built-in kind
    assert "plug_ok" not in sys.modules
    assert open_source("test-lazy", {"path": str(tmp_path)}).list_vms() == []
    assert "plug_ok" in sys.modules
    assert open_source("datastore", {"path": str(tmp_path)}).list_vms() == []


def test_the_plugin_through_the_python_api(site, tmp_path, monkeypatch):
    """SmsService in process finds the installed plugin's kind as the CLI does."""
    from smsblock.service import SmsService, sources
    monkeypatch.setattr(sources, "_SOURCE_KINDS",
                        {k: v for k, v in sources._SOURCE_KINDS.items() if k != "chunks"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "smsblock_chunks", raising=False)
    chunk_vm(tmp_path / "vms", "app", [b"\1" * 1000])
    with SmsService(tmp_path / "state") as svc:
        svc.register_connector("chunks", {"root": str(tmp_path / "vms")})
        svc.import_server_catalog()
        assert [s["vmServer"]["vmName"] for s in svc.get_servers()["serverList"]] == ["app"]
    assert Path(sys.modules["smsblock_chunks"].__file__).parent == site
    sys.modules.pop("smsblock_chunks")
