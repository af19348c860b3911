"""Embedding smsblock: a Disk and a snapshot source of one's own (the worked example of
docs/api.md, taken from the page so it cannot drift), run metadata, the source registry
and ``connector register --source-kind``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import smsblock
from smsblock.errors import (ConnectorError, DiskFormatError, DiskIOError, SmsBlockError,
                             UsageError)

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "api.md"


def doc_example(name: str) -> str:
    """The fenced code block that follows ``<!-- example: NAME -->`` in docs/api.md."""
    text = API_MD.read_text()
    m = re.search(r"<!-- example: " + re.escape(name) + r" -->\n```[a-z]*\n(.*?)\n```\n", text,
                  re.S)
    assert m is not None, f"docs/api.md has no example {name!r}"
    return m.group(1) + "\n"


@pytest.fixture
def chunks(tmp_path, monkeypatch):
    """The example module ``smsblock_chunks``, written from docs/api.md and imported."""
    mod_dir = tmp_path / "mod"
    mod_dir.mkdir()
    (mod_dir / "smsblock_chunks.py").write_text(doc_example("smsblock_chunks.py"))
    monkeypatch.syspath_prepend(str(mod_dir))
    sys.modules.pop("smsblock_chunks", None)
    import smsblock_chunks
    yield smsblock_chunks
    sys.modules.pop("smsblock_chunks", None)


def write_chunk_disk(folder: Path, size: int, chunks: dict[int, bytes]) -> bytes:
    """A chunk disk in ``folder``; returns the bytes it reads as."""
    folder.mkdir(parents=True)
    (folder / "disk.json").write_text(json.dumps({"size": size}))
    image = bytearray(size)
    chunk = 1 << 20
    for i, data in chunks.items():
        (folder / f"{i}.chunk").write_bytes(data)
        end = min(i * chunk + len(data), size)
        image[i * chunk:end] = data[:end - i * chunk]
    return bytes(image)


# --- the worked example is a correct Disk ----------------------------------------------

def test_example_disk_reads_its_bytes_from_many_threads(chunks, tmp_path):
    MiB = chunks.CHUNK
    rnd = random.Random(7)
    size = 6 * MiB + 12345
    expected = write_chunk_disk(tmp_path / "d", size, {
        0: rnd.randbytes(MiB), 2: rnd.randbytes(MiB // 3),      # a short chunk ends in zeros
        3: rnd.randbytes(MiB), 6: rnd.randbytes(MiB)})          # the last one is cut at size
    with chunks.ChunkDisk(tmp_path / "d") as disk:
        assert disk.size == size and disk.info.format == "chunks"
        assert [(e.offset, e.length, e.kind.value) for e in disk.extents()] == [
            (0, MiB, "data"), (2 * MiB, 2 * MiB, "data"), (6 * MiB, 12345, "data")]
        assert [(e.offset, e.length) for e in disk.extents(MiB // 2, 2 * MiB + 10)] == [
            (MiB // 2, MiB // 2), (2 * MiB, 10)]
        assert disk.read(0, size + 100) == expected
        assert disk.read(size, 10) == b"" and disk.read(size - 5, 10) == expected[-5:]
        with pytest.raises(UsageError):
            disk.read(-1, 10)

        errors: list[BaseException] = []

        def reader(seed):
            r = random.Random(seed)
            buf = bytearray(3 * MiB)
            try:
                for _ in range(40):
                    off, n = r.randrange(size), r.randrange(1, 3 * MiB)
                    view = memoryview(buf)[:n]
                    got = disk.readinto(off, view)
                    assert got == min(n, size - off)
                    assert view[:got] == expected[off:off + got]
            except BaseException as e:   # noqa: BLE001 - reported by the main thread
                errors.append(e)
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []

        # what smsblock does with it: convert (writer) and scan (native, threaded)
        smsblock.convert(disk, tmp_path / "out.raw")
        assert (tmp_path / "out.raw").read_bytes() == expected
        m = smsblock.scan(disk, block_size=1 << 16, threads=2)
        assert m.count(smsblock.BlockState.DATA) > 0


def test_example_disk_errors_are_smsblock_errors_naming_disk_and_offset(chunks, tmp_path):
    MiB = chunks.CHUNK
    write_chunk_disk(tmp_path / "d", 3 * MiB, {0: b"x" * MiB})
    (tmp_path / "d" / "1.chunk").mkdir()           # a chunk the storage cannot read
    with chunks.ChunkDisk(tmp_path / "d") as disk:
        with pytest.raises(DiskIOError, match=rf"{tmp_path}/d, offset {MiB + 5}: chunk 1"):
            disk.read(MiB + 5, 10)
        with pytest.raises(DiskIOError) as e:
            smsblock.replicate(disk, tmp_path / "store", "s-bad")
        assert e.value.offset == MiB
    for bad in ("not json", json.dumps({"size": -1}), json.dumps({})):
        folder = tmp_path / f"bad{abs(hash(bad))}"
        folder.mkdir()
        (folder / "disk.json").write_text(bad)
        with pytest.raises(DiskFormatError, match="not a chunk disk"):
            chunks.ChunkDisk(folder)
    os.symlink(tmp_path / "d" / "disk.json", tmp_path / "linked")
    (tmp_path / "l").mkdir()
    os.symlink(tmp_path / "d" / "disk.json", tmp_path / "l" / "disk.json")
    with pytest.raises(DiskFormatError):            # no link followed
        chunks.ChunkDisk(tmp_path / "l")
    with pytest.raises(DiskIOError, match="cannot open the chunk folder"):
        chunks.ChunkDisk(tmp_path / "missing")


# --- the page's examples run as written -------------------------------------------------

def _run_example(name: str, cwd: Path) -> str:
    out = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(doc_example(name), f"docs/api.md:{name}", "exec"), {"__name__": name})
    finally:
        os.chdir(old)
    return out.getvalue()


def test_doc_examples_replicate_and_serve_the_chunk_source(chunks, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    printed = _run_example("chunks-replicate", work)
    MiB = chunks.CHUNK
    assert (work / "web01.raw").read_bytes() == b"\1" * MiB + bytes(MiB) + b"\3" * MiB
    run_id, meta = printed.split(" ", 1)
    assert meta.strip() == str({"snapshot": "nightly-2026-12-01", "ticket": 4711})

    # `smsblock runs --json` shows the run's metadata
    proc = subprocess.run([sys.executable, "-m", "smsblock", "runs", "--store", work / "store",
                           "--server", "s-web01", "--json"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(proc.stdout)["runs"]
    assert run["run_id"] == run_id
    assert run["meta"] == {"snapshot": "nightly-2026-12-01", "ticket": 4711}

    printed = _run_example("chunks-service", work)
    assert printed.strip() == "['web01']"


def test_doc_example_source_runs_under_the_connector(chunks, tmp_path):
    """The example source through a whole connector run (in process, no image step):
    the snapshot is entered and left, the restored run is the disk."""
    from smsblock.service import FakeClock, SmsService, register_source_kind
    from smsblock.service.connector import ConnectorLoop
    from smsblock.service.executor import RunExecutor

    MiB = chunks.CHUNK
    disk0 = write_chunk_disk(tmp_path / "vms" / "db" / "disk0", 2 * MiB, {1: b"\7" * MiB})
    disk1 = write_chunk_disk(tmp_path / "vms" / "db" / "disk1", MiB, {0: b"\5" * 100})
    exits = []

    class CountingRun(chunks.ChunkRun):
        def __exit__(self, *exc):
            exits.append(self.vm_id)
            super().__exit__(*exc)

    class Counting(chunks.ChunkSource):
        def open_run(self, vm, **kw):
            run = super().open_run(vm, **kw)
            run.__class__ = CountingRun
            return run

    register_source_kind("test-chunks-counting", Counting.from_config)
    clock = FakeClock(1_800_000_000.0)
    with SmsService(tmp_path / "state", clock=clock) as svc:
        conn = svc.register_connector("test-chunks-counting", {"root": str(tmp_path / "vms")})
        assert conn["vmManagerName"] == str((tmp_path / "vms").resolve())
        svc.import_server_catalog()
        (server,) = svc.get_servers()["serverList"]
        job = svc.create_replication_job(serverId=server["serverId"],
                                         seedReplicationTime=clock() + 3600, frequency=12)
        run = svc.start_on_demand_replication_run(replicationJobId=job["replicationJobId"])
        ex = RunExecutor(svc.state, svc.clock, use_default_image_step=False)
        with ConnectorLoop(svc, executor=ex) as loop:
            did = loop.run_once()
        assert did["completed"] == [run["replicationRunId"]], did
        assert exits == ["db"]
        sid = server["serverId"]
        for key, expected in ((sid, disk0), (f"{sid}-disk1", disk1)):
            out = tmp_path / f"{key}.raw"
            smsblock.restore(tmp_path / "state" / "store", key, out)
            assert out.read_bytes() == expected


def test_example_source_refuses_what_it_cannot_use(chunks, tmp_path):
    with pytest.raises(ConnectorError, match="root"):
        chunks.ChunkSource.from_config({})
    with pytest.raises(ConnectorError, match="not a folder"):
        chunks.ChunkSource.from_config({"root": str(tmp_path / "none")})
    src = chunks.ChunkSource(tmp_path)
    with pytest.raises(ConnectorError, match="not in the chunk source"):
        src.open_run({"vmId": "../etc"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConnectorError, match="no disk folders"):
        with src.open_run({"vmId": "empty"}):
            pass


# --- replicate(meta=...) ------------------------------------------------------------------

def _raw(tmp_path, data=b"\x42" * 70000) -> Path:
    p = tmp_path / "d.raw"
    p.write_bytes(data)
    return p


def test_run_meta_is_kept_under_its_own_key(tmp_path):
    meta = {"snapshot": "s1", "run_id": "mine", "server_id": "x", "summary": None,
            "nested": {"a": [1, 2.5, True, None, "é"]}}
    s = smsblock.replicate(_raw(tmp_path), tmp_path / "store", "s-one", meta=meta)
    meta["snapshot"] = "changed after the call"
    store = smsblock.open_store(tmp_path / "store")
    (run,) = store.runs("s-one")
    assert run.meta["snapshot"] == "s1" and run.meta["run_id"] == "mine"
    assert run.meta["nested"] == {"a": [1, 2.5, True, None, "é"]}
    m = store.load_manifest("s-one")
    assert m.meta["run_id"] == s.run_id and m.meta["server_id"] == "s-one"   # not clobbered
    assert m.meta["summary"]["run_id"] == s.run_id
    smsblock.replicate(_raw(tmp_path), store, "s-one")
    assert [r.meta for r in store.runs("s-one")][1] == {}


@pytest.mark.parametrize("meta,why", [
    (["a"], "must be a dict"),
    ({1: "int key"}, "string keys"),
    ({"a": {2: "nested int key"}}, "string keys"),
    ({"a": ("tuple",)}, "string keys"),
    ({"a": float("nan")}, "not JSON"),
    ({"a": object()}, "not JSON"),
    ({"a": b"bytes"}, "not JSON"),
    ({"a": "x" * (17 << 10)}, "more than 16384"),
])
def test_bad_run_meta_is_refused_before_anything_is_written(tmp_path, meta, why):
    with pytest.raises(UsageError, match=why):
        smsblock.replicate(_raw(tmp_path), tmp_path / "store", "s-one", meta=meta)
    assert not (tmp_path / "store").exists()


def test_deeply_nested_run_meta_is_a_usage_error(tmp_path):
    meta: dict = {}
    inner = meta
    for _ in range(100_000):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(UsageError, match="not JSON"):
        smsblock.replicate(_raw(tmp_path), tmp_path / "store", "s-one", meta=meta)


# --- the registry -----------------------------------------------------------------------

def test_source_kind_names_are_checked():
    from smsblock.service.sources import register_source_kind
    for bad in ("", "Upper", "a b", "x" * 65, "-lead", "a/b", "a\n"):
        with pytest.raises(UsageError, match="not a kind name"):
            register_source_kind(bad, dict)
    with pytest.raises(UsageError, match="not callable"):
        register_source_kind("test-not-callable", 42)


def test_a_factory_bug_or_a_malformed_source_is_one_connector_error():
    from smsblock.service.sources import open_source, register_source_kind

    def broken(config):
        raise KeyError("root\nsecond line")

    class NoIds:
        manager_type = "VSPHERE"
        closed = False

        def __init__(self, config):
            pass

        def close(self):
            NoIds.closed = True

    register_source_kind("test-broken-factory", broken)
    register_source_kind("test-no-ids", NoIds)
    with pytest.raises(ConnectorError) as e:
        open_source("test-broken-factory", {})
    assert "'test-broken-factory': opening the source failed: KeyError" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConnectorError, match="no manager_name string"):
        open_source("test-no-ids", {})
    assert NoIds.closed
    with pytest.raises(ConnectorError, match=r"unknown connector source kind 'nope-kind'.*"
                                             r"'datastore'.*smsblock\.sources"):
        open_source("nope-kind", {})


# --- connector register --source-kind --------------------------------------------------

def cli(capsys, *args):
    from smsblock.cli import main
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_register_a_custom_kind_from_the_cli(chunks, tmp_path, capsys):
    from smsblock.service.sources import register_source_kind
    register_source_kind("test-chunks-cli", chunks.ChunkSource.from_config)
    (tmp_path / "vms" / "a").mkdir(parents=True)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"root": str(tmp_path / "vms")}))
    st = tmp_path / "state"
    status, out, err = cli(capsys, "connector", "register", "--state", st,
                           "--source-kind", "test-chunks-cli", "--source-config", f"@{cfg}")
    assert status == 0, err
    assert json.loads(out)["vmManagerName"] == str((tmp_path / "vms").resolve())
    status, out, err = cli(capsys, "connector", "register", "--state", st,
                           "--source-kind", "test-chunks-cli",
                           "--source-config", json.dumps({"root": str(tmp_path / "vms")}))
    assert status == 0, err
    status, out, err = cli(capsys, "sms", "import-server-catalog", "--state", st)
    assert status == 0, err
    status, out, err = cli(capsys, "sms", "get-servers", "--state", st)
    assert [s["vmServer"]["vmName"] for s in json.loads(out)["serverList"]] == ["a"]


@pytest.mark.parametrize("args,status,why", [
    (["--source-kind", "test-x", "--datastore", "."], 2, "exactly one of"),
    (["--source-config", "{}"], 2, "exactly one of"),
    (["--datastore", ".", "--source-config", "{}"], 2, "only valid with --source-kind"),
    (["--source-kind", "test-x", "--source-config", "{bad"], 2, "--source-config: bad JSON"),
    (["--source-kind", "test-x", "--source-config", "[1]"], 2, "must be a JSON object"),
    (["--source-kind", "test-x", "--source-config", "@/nonexistent/c.json"], 2, "No such file"),
    (["--source-kind", "test-x", "--source-config", "@/"], 2, "not a regular file"),
    (["--source-kind", "Bad Kind"], 2, "not a kind name"),
    (["--source-kind", "no-such-kind"], 1, "unknown connector source kind 'no-such-kind'"),
    (["--source-kind", "test-x", "--username", "u"], 2, "--username is only valid"),
])
def test_register_source_kind_errors_are_one_line(tmp_path, capsys, args, status, why):
    got, out, err = cli(capsys, "connector", "register", "--state", tmp_path / "state", *args)
    assert got == status and why in err and err.count("\n") == 1, err
    assert out == ""


def test_source_config_from_a_fifo_or_a_huge_file_does_not_hang(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    huge.write_text('{"a": "' + "x" * (1 << 20) + '"}')
    for path, why in ((fifo, "not a regular file"), (huge, "larger than 1048576 bytes")):
        got, _, err = cli(capsys, "connector", "register", "--state", tmp_path / "state",
                          "--source-kind", "test-x", "--source-config", f"@{path}")
        assert got == 2 and why in err, err



def test_a_source_needing_a_missing_extra_says_which(tmp_path, capsys):
    """A factory's ModuleNotFoundError is not wrapped: the CLI names the package and extra
    (as for the vsphere kind without pyVmomi)."""
    from smsblock.service.sources import register_source_kind

    def needs(config):
        raise ModuleNotFoundError("No module named 'pyVmomi'", name="pyVmomi")

    register_source_kind("test-needs-extra", needs)
    got, _, err = cli(capsys, "connector", "register", "--state", tmp_path / "state",
                      "--source-kind", "test-needs-extra")
    assert got == 1 and "needs the Python package 'pyVmomi' (pip install 'smsblock[vsphere]')" \
        in err, err
