"""The CLI's safety rails and its one shape (issue 12): stores are created only on purpose,
prune says what it deletes and refuses to delete everything by accident, a block-size
change is refused, mistakes give one line, JSON has one style, lists say when empty."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from smsblock.cli import main

ROOT = Path(__file__).resolve().parent.parent
BS = 64 * 1024


def run(*args, env=None):
    """The CLI in process (fast), as a CompletedProcess: status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([str(a) for a in args])
            except SystemExit as e:          # argparse
                status = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def one_line_error(p, status=None):
    assert p.returncode != 0 and (status is None or p.returncode == status), (p.returncode, p.stderr)
    lines = p.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("smsblock: error: "), p.stderr
    assert "Traceback" not in p.stderr and "usage:" not in p.stderr
    return lines[0]


def write_disk(path: Path, blocks: list[int | None]) -> bytes:
    """One block per entry: a fill byte, or None for a hole."""
    with open(path, "wb") as f:
        f.truncate(len(blocks) * BS)
        for i, b in enumerate(blocks):
            if b is not None:
                f.seek(i * BS)
                f.write(bytes([b]) * BS)
    return path.read_bytes()


@pytest.fixture
def disk(tmp_path):
    write_disk(tmp_path / "d.raw", [1, 2, None, 3])
    return tmp_path / "d.raw"


# --- stores are created on purpose only ---------------------------------------------------

def test_replicate_into_a_missing_store_is_refused_and_creates_nothing(tmp_path, disk):
    typo = tmp_path / "stroe"
    line = one_line_error(run("replicate", disk, "--store", typo, "--server", "a"), 1)
    assert "no smsblock store" in line and "smsblock init" in line and str(typo) in line
    assert not typo.exists()
    # every other command on a path without a store says so, and creates nothing either
    for args in (["runs", "--server", "a"], ["servers"], ["verify"],
                 ["restore", "--server", "a", "-o", tmp_path / "o.raw"],
                 ["prune", "--server", "a", "--keep", "1"], ["inspect", "--server", "a"],
                 ["image", "create", "--server", "a", "--catalog", tmp_path / "cat"]):
        cut = 2 if args[0] == "image" else 1
        line = one_line_error(run(*args[:cut], "--store", typo, *args[cut:]))
        assert "no smsblock store" in line, args
    assert not typo.exists() and not (tmp_path / "o.raw").exists()
    assert not (tmp_path / "cat").exists()


def test_init_then_replicate_and_create_flag(tmp_path, disk):
    store = tmp_path / "st"
    p = run("init", store, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["schema"] == 1 and doc["created"] is True and doc["config"]["address"] == "blake3"
    assert json.loads(run("init", store, "--json").stdout)["created"] is False   # idempotent
    assert run("replicate", disk, "--store", store, "--server", "a").returncode == 0
    # --create makes the store in one step
    p = run("replicate", disk, "--store", tmp_path / "st2", "--server", "a", "--create", "--json",
            "--block-size", "64K")
    assert p.returncode == 0 and json.loads(p.stdout)["blocks_stored"] == 3


def test_python_replicate_create_keyword(tmp_path, disk):
    from smsblock import replicate
    from smsblock.errors import StoreError
    with pytest.raises(StoreError, match="no smsblock store"):
        replicate(disk, tmp_path / "x", "a", create=False)
    assert not (tmp_path / "x").exists()
    assert replicate(disk, tmp_path / "x", "a", block_size=BS).blocks_stored == 3  # default: create


def test_smsblock_store_environment_variable(tmp_path, disk):
    store = tmp_path / "envstore"
    env = {"SMSBLOCK_STORE": str(store)}
    assert run("init", store).returncode == 0
    p = run("replicate", disk, "--server", "a", "--json", env=env)
    assert p.returncode == 0, p.stderr
    p = run("runs", "--server", "a", "--json", env=env)
    assert json.loads(p.stdout)["store"] == str(store)
    # --store wins over the variable
    other = tmp_path / "other"
    line = one_line_error(run("runs", "--server", "a", "--store", other, env=env))
    assert str(other) in line
    # without either, the option is required: one line
    env_without = {k: v for k, v in os.environ.items() if k != "SMSBLOCK_STORE"}
    p = subprocess.run([sys.executable, "-m", "smsblock", "runs", "--server", "a"],
                       capture_output=True, text=True, env=dict(env_without, PYTHONPATH=str(ROOT)))
    assert "--store" in one_line_error(p, 2)


def test_connector_register_creates_its_store(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_service_sources import make_datastore
    ds = make_datastore(tmp_path / "ds", 1)
    assert main(["connector", "register", "--state", str(tmp_path / "state"),
                 "--datastore", str(ds)]) == 0
    from smsblock.store import open_store
    assert open_store(tmp_path / "state" / "store").exists()


# --- block size -----------------------------------------------------------------------------

def test_a_changed_block_size_is_refused_unless_asked_for(tmp_path, disk):
    store = tmp_path / "st"
    assert run("replicate", disk, "--store", store, "--server", "a", "--create",
               "--block-size", "64K").returncode == 0
    line = one_line_error(run("replicate", disk, "--store", store, "--server", "a",
                              "--block-size", "128K"), 1)
    assert "65536" in line and "131072" in line and "whole disk again" in line
    assert "--change-block-size" in line
    from smsblock.store import open_store
    assert len(open_store(store).list_run_ids("a")) == 1            # nothing was stored
    p = run("replicate", disk, "--store", store, "--server", "a", "--block-size", "128K",
            "--change-block-size", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["block_size"] == 128 * 1024
    # the same size as before, said explicitly, is fine; another server picks its own
    assert run("replicate", disk, "--store", store, "--server", "a", "--block-size", "128K").returncode == 0
    assert run("replicate", disk, "--store", store, "--server", "b", "--block-size", "256K").returncode == 0


# --- prune -----------------------------------------------------------------------------------

@pytest.fixture
def three_runs(tmp_path):
    store = tmp_path / "st"
    assert run("init", store).returncode == 0
    ids = []
    for fill in (1, 2, 3):
        write_disk(tmp_path / "d.raw", [fill, 9, None, fill + 10])
        p = run("replicate", tmp_path / "d.raw", "--store", store, "--server", "web", "--json",
                "--block-size", "64K")
        assert p.returncode == 0, p.stderr
        ids.append(json.loads(p.stdout)["run_id"])
    return store, ids


def test_prune_keep_zero_needs_delete_all(three_runs):
    store, ids = three_runs
    line = one_line_error(run("prune", "--store", store, "--server", "web", "--keep", "0"), 2)
    assert "--delete-all" in line and "every run" in line
    from smsblock.store import open_store
    assert open_store(store).list_run_ids("web") == ids
    one_line_error(run("prune", "--store", store, "--server", "web", "--keep", "1", "--delete-all"), 2)
    p = run("prune", "--store", store, "--server", "web", "--keep", "0", "--delete-all", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["runs_deleted"] == ids
    assert open_store(store).list_run_ids("web") == []


def test_prune_dry_run_says_what_it_would_delete_and_changes_nothing(three_runs):
    store, ids = three_runs
    from smsblock.store import open_store

    def snapshot():
        return sorted((str(p.relative_to(store)), p.stat().st_size)
                      for p in Path(store).rglob("*") if p.is_file() and "locks" not in p.parts)
    before = snapshot()
    p = run("prune", "--store", store, "--server", "web", "--keep", "1", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[:2] == [f"would delete run {ids[0]}", f"would delete run {ids[1]}"]
    assert "dry run" in p.stdout and "nothing was changed" in p.stdout
    dry = json.loads(run("prune", "--store", store, "--server", "web", "--keep", "1",
                         "--dry-run", "--json").stdout)
    assert snapshot() == before and open_store(store).list_run_ids("web") == ids
    assert dry["dry_run"] is True and dry["schema"] == 1
    real = json.loads(run("prune", "--store", store, "--server", "web", "--keep", "1", "--json").stdout)
    assert real["dry_run"] is False
    # the dry run announced exactly what the real one then did
    for key in ("runs_deleted", "runs_kept", "packs_deleted", "packs_rewritten", "blocks_deleted"):
        assert dry[key] == real[key], key
    assert real["runs_deleted"] == ids[:2] and real["blocks_deleted"] == 4


def test_prune_of_an_unknown_server_is_an_error(three_runs):
    store, ids = three_runs
    line = one_line_error(run("prune", "--store", store, "--server", "wbe", "--keep", "1"), 1)
    assert "'wbe'" in line and "smsblock servers" in line


# --- servers, empty lists ---------------------------------------------------------------------

def test_servers_lists_run_count_latest_run_and_size(three_runs, tmp_path):
    store, ids = three_runs
    write_disk(tmp_path / "e.raw", [5, None])
    assert run("replicate", tmp_path / "e.raw", "--store", store, "--server", "db").returncode == 0
    doc = json.loads(run("servers", "--store", store, "--json").stdout)
    assert doc["schema"] == 1 and doc["store"] == str(store)
    by_id = {s["server_id"]: s for s in doc["servers"]}
    assert sorted(by_id) == ["db", "web"]
    web = by_id["web"]
    assert web["run_count"] == 3 and web["latest_run_id"] == ids[-1] and web["disk_size"] == 4 * BS
    assert web["latest_run_created"].startswith(str(datetime.now(timezone.utc).year))
    assert by_id["db"]["run_count"] == 1 and by_id["db"]["disk_size"] == 2 * BS
    text = run("servers", "--store", store).stdout.splitlines()
    assert text[0].split()[:3] == ["SERVER", "RUNS", "LATEST"]
    assert any(line.split()[:3] == ["web", "3", ids[-1]] for line in text)


def test_empty_lists_say_they_are_empty(tmp_path):
    store = tmp_path / "st"
    assert run("init", store).returncode == 0
    p = run("servers", "--store", store)
    assert p.returncode == 0 and p.stdout == f"{store}: no servers (the store holds no runs)\n"
    assert json.loads(run("servers", "--store", store, "--json").stdout)["servers"] == []
    p = run("runs", "--store", store, "--server", "a")
    assert p.returncode == 0 and p.stdout == f"no runs of server a in {store}\n"
    p = run("image", "list", "--catalog", tmp_path / "cat")
    assert p.returncode == 0 and p.stdout == f"no images in the catalog {tmp_path / 'cat'}\n"
    doc = json.loads(run("image", "list", "--catalog", tmp_path / "cat", "--json").stdout)
    assert doc == {"schema": 1, "catalog": str(tmp_path / "cat"), "images": []}


# --- mistakes give one line ------------------------------------------------------------------

def test_unknown_formats_and_wrong_suffixes_give_one_line(tmp_path, disk):
    store = tmp_path / "st"
    assert run("replicate", disk, "--store", store, "--server", "a", "--create").returncode == 0
    cases = [
        (["restore", "--store", store, "--server", "a", "-o", tmp_path / "o.raw", "-O", "qcow2"], "qcow2"),
        (["restore", "--store", store, "--server", "a", "-o", tmp_path / "o.qcow2"], "qcow2"),
        (["restore", "--store", store, "--server", "a", "-o", tmp_path / "o.vmdk", "-O", "raw"], "vmdk"),
        (["convert", disk, tmp_path / "o.qcow2"], "qcow2"),
        (["convert", disk, tmp_path / "o.vhdx"], "vhdx"),
        (["convert", disk, tmp_path / "o.raw", "-O", "vmdk"], "raw"),
        (["convert", disk, tmp_path / "o.raw", "-O", "qcow2"], "qcow2"),
        # argparse's own mistakes: one line too, no usage block
        (["restore", "--store", store, "--server", "a"], "--output"),
        (["prune", "--store", store, "--server", "a", "--keep", "many"], "many"),
        (["replicat", disk], "replicat"),
        (["image", "lisst"], "lisst"),
        (["sms", "get-server"], "get-server"),
        (["scan", disk, "-o", tmp_path / "m", "-f", "qcow2"], "qcow2"),
    ]
    for args, word in cases:
        line = one_line_error(run(*args), 2)
        assert word in line, (args, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.raw", "st"]   # nothing written
    # a right name with the matching -O, and a neutral name, are fine
    assert run("convert", disk, tmp_path / "o.vmdk", "-O", "vmdk").returncode == 0
    assert run("restore", "--store", store, "--server", "a", "-o", tmp_path / "o.img").returncode == 0
    assert (tmp_path / "o.img").read_bytes() == disk.read_bytes()
    p = run("restore", "--store", store, "--server", "a", "-o", tmp_path / "r.vmdk", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["format"] == "vmdk"   # from the name


# --- one JSON style -----------------------------------------------------------------------------

def test_every_json_output_has_one_style_and_a_schema(tmp_path, disk):
    store = tmp_path / "st"
    outputs = {}

    def js(name, *args):
        p = run(*args, "--json")
        assert p.returncode in (0, 1), (name, p.stderr)
        outputs[name] = p.stdout
        return json.loads(p.stdout)
    js("init", "init", store)
    rep = js("replicate", "replicate", disk, "--store", store, "--server", "a")
    js("servers", "servers", "--store", store)
    js("runs", "runs", "--store", store, "--server", "a")
    js("restore", "restore", "--store", store, "--server", "a", "-o", tmp_path / "r.raw")
    js("verify", "verify", "--store", store)
    js("prune", "prune", "--store", store, "--server", "a", "--keep", "1")
    info = js("info", "info", disk)
    conv = js("convert", "convert", disk, tmp_path / "c.vmdk")
    scan = js("scan", "scan", disk, "-o", tmp_path / "m1")
    js("diff", "diff", tmp_path / "m1", tmp_path / "m1")
    img = js("image create", "image", "create", "--store", store, "--server", "a", "--force",
             "--catalog", tmp_path / "cat")
    js("image show", "image", "show", img["image_id"], "--catalog", tmp_path / "cat")
    js("image list", "image", "list", "--catalog", tmp_path / "cat")
    for name, text in outputs.items():
        doc = json.loads(text)
        assert isinstance(doc, dict) and doc["schema"] == 1, name
        # one style: indented by two, keys sorted
        assert text == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n", name
    # one name per concept
    size = disk.stat().st_size
    assert info["disk_size"] == conv["disk_size"] == scan["disk_size"] == rep["disk_size"] == size
    assert conv["source"] == scan["source"] == str(disk)
    assert img["disk"]["disk_size"] == size
    for name, text in outputs.items():
        assert "virtual_size" not in text, name
        assert not isinstance(json.loads(text).get("disk"), str), name   # "source" names a disk


def test_sms_verbs_print_the_aws_shape_in_the_same_style(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_service_sources import make_datastore
    st = tmp_path / "state"
    assert main(["connector", "register", "--state", str(st), "--datastore",
                 str(make_datastore(tmp_path / "ds", 1))]) == 0
    capsys.readouterr()
    assert main(["sms", "get-connectors", "--state", str(st)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert "schema" not in doc and set(doc) == {"connectorList"}      # AWS's shape, untouched
    assert out == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --- connector run says what it does ----------------------------------------------------------

def test_connector_run_logs_each_step(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_service_sources import make_datastore
    st = str(tmp_path / "state")
    assert main(["connector", "register", "--state", st, "--datastore",
                 str(make_datastore(tmp_path / "ds", 1))]) == 0
    assert main(["connector", "run", "--state", st, "--once"]) == 0
    err = capsys.readouterr().err
    assert "server catalog NOT_IMPORTED, 0 servers" in err and "import-server-catalog" in err
    assert "nothing due" in err
    main(["sms", "import-server-catalog", "--state", st])
    capsys.readouterr()
    assert main(["sms", "get-servers", "--state", st]) == 0
    server = json.loads(capsys.readouterr().out)["serverList"][0]["serverId"]
    assert main(["sms", "create-replication-job", "--state", st, "--server-id", server,
                 "--seed-replication-time", datetime.now(timezone.utc).isoformat(),
                 "--frequency", "12"]) == 0
    job = json.loads(capsys.readouterr().out)["replicationJobId"]
    assert main(["connector", "run", "--state", st, "--once"]) == 0
    out, err = capsys.readouterr()
    (run_id,) = json.loads(out)["failed"]          # a blank disk: the image step refuses it
    lines = [l for l in err.splitlines() if " connector c-" in l]
    assert "server catalog AVAILABLE, 1 servers" in lines[0]
    assert f"run {run_id} scheduled (job {job}, AUTOMATIC)" in lines[1]
    assert f"run {run_id} started (job {job}, server {server}, AUTOMATIC)" in lines[2]
    assert f"run {run_id} failed: " in lines[3] and "validation" in lines[3]


# --- progress ------------------------------------------------------------------------------------

def test_progress_line_shows_the_phase_in_binary_units():
    from smsblock.progress import _Bar
    stream = io.StringIO()
    bar = _Bar("replicate web: scan and store", stream, interval=0)
    bar.started -= 2.0                  # two seconds in
    bar.update(3 << 20, 12 << 20)
    bar.update(12 << 20, 12 << 20)
    bar.close()
    text = stream.getvalue()
    assert "replicate web: scan and store   25%  3 MiB / 12 MiB  1.5 MiB/s  ETA 0:00:06" in text
    assert " 100%  12 MiB / 12 MiB" in text and "MB" not in text
    assert text.endswith("\r")          # the line is cleared for the command's result
