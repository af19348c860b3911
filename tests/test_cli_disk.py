"""``smsblock info`` and ``smsblock convert``: run as a process (``python3 -m smsblock``) and
in-process (``smsblock.cli.main``); qemu-img is the oracle for what they report and write."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from smsblock.cli import main

from conftest import ROOT, qemu_img
from vmdk_images import write_raw

MIB = 1 << 20


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture
def raw_disk(tmp_path) -> Path:
    rnd = random.Random(42)
    return write_raw(tmp_path / "disk.raw", 5 * MIB + 512,
                    [(0, rnd.randbytes(70_000)), (3 * MIB, b"smsblock" * 1000)])


def qemu_info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def assert_one_line_error(stderr: str) -> None:
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, f"stderr is not one line: {stderr!r}"
    assert lines[0].startswith("smsblock: error: ") and "Traceback" not in stderr


# --- info ---------------------------------------------------------------------------

def test_info_json_on_a_raw_disk(raw_disk):
    proc = run_cli("info", raw_disk, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "raw" and doc["create_type"] is None
    assert doc["disk_size"] == 5 * MIB + 512 == qemu_info(raw_disk)["virtual-size"]
    # 70 000 bytes + 8 000 bytes of data, in file-system blocks
    assert 78_000 <= doc["allocated_bytes"] <= 78_000 + 4 * 65536
    assert doc["parent_chain"] == [] and doc["extents"][0]["type"] == "FLAT"


def test_info_on_our_stream_optimized_output_matches_qemu(tmp_path, raw_disk):
    out = tmp_path / "export.vmdk"
    assert run_cli("convert", raw_disk, out).returncode == 0
    doc = json.loads(run_cli("info", "--json", out).stdout)
    q = qemu_info(out)
    assert doc["format"] == "vmdk" and doc["create_type"] == "streamOptimized"
    assert doc["disk_size"] == q["virtual-size"]
    assert int(doc["cid"], 16) == q["format-specific"]["data"]["cid"]
    assert doc["parent_cid"] == "ffffffff"
    assert doc["adapter_type"] == "lsilogic" and doc["compressed"] is True
    assert [e["type"] for e in doc["extents"]] == ["SPARSE"]
    # the non-zero grains: 70 000 bytes → 2 grains, 8 000 bytes → 1 grain
    assert doc["allocated_bytes"] == 3 * 65536

    text = run_cli("info", out)
    assert text.returncode == 0 and text.stderr == ""
    assert "create type:  streamOptimized" in text.stdout
    assert f"virtual size: 5.0 MiB ({5 * MIB + 512} bytes)" in text.stdout
    assert f"allocated:    192 KiB ({3 * 65536} bytes)" in text.stdout
    assert f"CID:          {doc['cid']}" in text.stdout
    assert "parent chain: none" in text.stdout


def test_info_shows_the_parent_chain_and_cids(tmp_path):
    base, mid, top = tmp_path / "base.vmdk", tmp_path / "mid.vmdk", tmp_path / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "4M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", mid)
    qemu_img("create", "-q", "-f", "vmdk", "-b", mid.name, "-F", "vmdk", top)
    proc = run_cli("info", "--json", top)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [os.path.basename(p) for p in doc["parent_chain"]] == ["mid.vmdk", "base.vmdk"]
    assert doc["parent_cid"] == doc["parent"]["cid"]
    assert int(doc["parent"]["cid"], 16) == qemu_info(mid)["format-specific"]["data"]["cid"]
    assert doc["create_type"] == "monolithicSparse"
    text = run_cli("info", top).stdout
    assert "parent chain:\n  1. " in text and "mid.vmdk (CID " in text and "  2. " in text


def test_info_lists_descriptor_extent_files(vmdk_samples):
    proc = run_cli("info", "--json", vmdk_samples / "twoGbMaxExtentSparse.vmdk")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["create_type"] == "twoGbMaxExtentSparse"
    assert [os.path.basename(e["path"]) for e in doc["extents"]] == ["twoGbMaxExtentSparse-s001.vmdk"]
    assert doc["disk_size"] == 10485760
    text = run_cli("info", vmdk_samples / "vmfs_thick.vmdk").stdout
    assert "vmfs_thick-flat.vmdk" in text and "create type:" in text


# --- convert --------------------------------------------------------------------------------

def test_convert_raw_to_vmdk_and_back_in_a_subprocess(tmp_path, raw_disk):
    vmdk, back = tmp_path / "out.vmdk", tmp_path / "back.img"
    proc = run_cli("convert", raw_disk, vmdk)               # .vmdk → vmdk
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "streamOptimized VMDK" in proc.stdout
    assert qemu_info(vmdk)["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert "Images are identical" in qemu_img("compare", raw_disk, vmdk).stdout
    assert "No errors" in qemu_img("check", vmdk).stdout
    proc = run_cli("convert", vmdk, back)                  # anything else → raw
    assert proc.returncode == 0, proc.stderr
    assert back.read_bytes() == raw_disk.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.img", "disk.raw", "out.vmdk"]


def test_convert_in_process_with_explicit_format_and_json(tmp_path, raw_disk, capsys):
    out = tmp_path / "named.out"
    assert main(["convert", "-O", "raw", str(raw_disk), str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "raw" and doc["disk_size"] == raw_disk.stat().st_size
    assert out.read_bytes() == raw_disk.read_bytes()       # -O raw, whatever the name
    assert qemu_info(out)["format"] == "raw"

    vm = tmp_path / "disk.bin"
    assert main(["convert", "-O", "vmdk", "--adapter-type", "ide", str(raw_disk), str(vm)]) == 0
    assert "Images are identical" in qemu_img("compare", raw_disk, vm).stdout
    capsys.readouterr()
    assert main(["info", "--json", str(vm)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapter_type"] == "ide"


def test_convert_a_qemu_made_vmdk(tmp_path, raw_disk):
    src = tmp_path / "sparse.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=monolithicSparse", raw_disk, src)
    out = tmp_path / "stream.vmdk"
    proc = run_cli("convert", src, out, "-O", "vmdk")
    assert proc.returncode == 0, proc.stderr
    assert "Images are identical" in qemu_img("compare", src, out).stdout


def test_progress_bar_only_on_a_terminal(tmp_path):
    src = write_raw(tmp_path / "big.raw", 32 * MIB,
                   [(i * MIB, random.Random(i).randbytes(MIB)) for i in range(0, 32, 2)])
    # not a terminal: stderr stays empty
    proc = run_cli("convert", src, tmp_path / "a.vmdk")
    assert proc.returncode == 0 and proc.stderr == ""
    # a terminal: the bar is drawn on stderr
    master, slave = pty.openpty()
    # a new pty is 0x0: give it a window as a real terminal has (the status line is drawn for a terminal)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "smsblock", "convert", str(src),
                          str(tmp_path / "b.vmdk")], stdout=subprocess.PIPE, stderr=slave,
                         env=env)
    os.close(slave)
    drawn = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:         # EIO: the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert p.wait(60) == 0
    p.stdout.close()
    assert b"convert big.raw to vmdk" in drawn and b"\r" in drawn
    assert b"Traceback" not in drawn
    # binary units, named as such (the tqdm bar said MB/s for MiB/s)
    assert b"32 MiB" in drawn and b"MiB/s" in drawn and b"100%" in drawn
    assert b"MB" not in drawn and b"kB" not in drawn


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_convert_feeds_the_progress_bar_to_the_end(tmp_path, raw_disk, monkeypatch, capsys, fmt):
    """The bar the terminal shows is driven by the copy: monotonic, up to the disk's size."""
    import contextlib
    from smsblock.cli import disk_cmds
    calls, descriptions = [], []

    @contextlib.contextmanager
    def recording_bar(description, enabled=None):
        descriptions.append(description)
        yield lambda done, total: calls.append((done, total))
    monkeypatch.setattr(disk_cmds, "terminal_progress", recording_bar)
    assert main(["convert", "-O", fmt, str(raw_disk), str(tmp_path / "o.img")]) == 0
    size = raw_disk.stat().st_size
    assert descriptions == [f"convert disk.raw to {fmt}"]     # the phase: what is written
    assert calls[-1] == (size, size) and len(calls) > 1
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# --- bad input: one line, non-zero, no traceback --------------------------------------------------

def bad_inputs(tmp_path: Path, raw_disk: Path) -> list[list[str]]:
    corrupt = tmp_path / "corrupt.vmdk"
    corrupt.write_bytes(b"KDMV" + os.urandom(2000))
    truncated = tmp_path / "truncated.vmdk"
    qemu_img("convert", "-O", "vmdk", raw_disk, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(700)
    # a damaged grain in the middle of the copy: the error comes from a worker thread
    bad_grain = tmp_path / "bad-grain.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw_disk, bad_grain)
    data = bytearray(bad_grain.read_bytes())
    first_grain = struct.unpack_from("<Q", data, 64)[0] * 512       # the header's overhead
    data[first_grain + 100:first_grain + 300] = bytes(200)
    bad_grain.write_bytes(bytes(data))
    return [
        ["info", str(tmp_path / "missing.vmdk")],
        ["info", str(tmp_path)],
        ["info", str(corrupt)],
        ["info", "-f", "qcow2", str(raw_disk)],
        ["convert", str(tmp_path / "missing.raw"), str(tmp_path / "o.raw")],
        ["convert", str(raw_disk), str(tmp_path / "o.img"), "-O", "qcow2"],
        ["convert", str(tmp_path), str(tmp_path / "o.raw")],
        ["convert", str(raw_disk), str(tmp_path)],
        ["convert", str(raw_disk), str(raw_disk), "-O", "vmdk"],
        ["convert", str(raw_disk), str(tmp_path / "nofolder" / "o.raw")],
        ["convert", str(corrupt), str(tmp_path / "o.raw")],
        ["convert", str(truncated), str(tmp_path / "o.vmdk")],
        ["convert", str(bad_grain), str(tmp_path / "o.raw")],
        ["convert", str(bad_grain), str(tmp_path / "o.vmdk")],
        ["convert", "--adapter-type", "nvme", str(raw_disk), str(tmp_path / "o.vmdk")],
    ]


def test_bad_input_in_a_subprocess(tmp_path, raw_disk):
    for args in bad_inputs(tmp_path, raw_disk):
        proc = run_cli(*args)
        assert proc.returncode != 0, args
        assert_one_line_error(proc.stderr)
        assert proc.stdout == ""
    leftovers = {p.name for p in tmp_path.iterdir()}
    assert leftovers == {"disk.raw", "corrupt.vmdk", "truncated.vmdk", "bad-grain.vmdk"}


def test_bad_input_in_process(tmp_path, raw_disk, capsys):
    for args in bad_inputs(tmp_path, raw_disk):
        status = main(args)
        out, err = capsys.readouterr()
        assert status != 0, args
        assert_one_line_error(err)
        assert out == ""
    assert main(["convert", str(raw_disk), str(tmp_path / "o.vmdk"), "-O", "nope"]) == 2
    assert "unknown output format 'nope'" in capsys.readouterr().err
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_ctrl_c_removes_the_partial_output(tmp_path):
    block = random.Random(1).randbytes(MIB)        # incompressible: slow enough to interrupt
    src = write_raw(tmp_path / "big.raw", 64 * MIB, [(i * MIB, block) for i in range(64)])
    out = tmp_path / "out.vmdk"
    part = tmp_path / "out.vmdk.part"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "smsblock", "convert", str(src), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not part.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert part.exists(), "convert never started writing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert err.strip() == "smsblock: interrupted"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["big.raw"]
