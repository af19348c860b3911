"""The README's first command runs `smsblock demo`: it must replicate, restore and inspect."""

import json
import subprocess
import sys


def test_demo_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "smsblock", "demo", "--json", "--dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    first, second = out["runs"]
    assert first["blocks_stored"] == first["blocks_changed"] > 0
    # the second run ships only what the guest changed: a few blocks, not the disk
    assert 0 < second["blocks_changed"] < first["blocks_changed"] // 3
    assert second["blocks_stored"] <= second["blocks_changed"]
    assert all(r["byte_exact"] for r in out["restores"]) and len(out["restores"]) == 2
    assert out["verify"]["ok"] is True
    inspect = out["inspect"]
    assert inspect["partition_table"] == "mbr" and inspect["ok"] is True
    assert inspect["partitions"][0]["filesystem"] == "ext4"
    assert inspect["os"]["distribution"] == "ubuntu" and inspect["os"]["version"] == "16.04"


def _demo(*args):
    return subprocess.run([sys.executable, "-m", "smsblock", "demo", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    """`demo --dir X` used to delete X first, whatever it held."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / "sub").mkdir()
    proc = _demo("--dir", home)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "earlier demo" in proc.stderr and "Traceback" not in proc.stderr
    assert (home / "thesis.tex").read_text() == "years of work" and (home / "sub").is_dir()
    # a file and a link are refused too, and left alone
    (tmp_path / "f").write_text("x")
    assert _demo("--dir", tmp_path / "f").returncode == 2 and (tmp_path / "f").read_text() == "x"
    (tmp_path / "link").symlink_to(home)
    assert _demo("--dir", tmp_path / "link").returncode == 2
    assert (home / "thesis.tex").exists()


def test_a_planted_marker_does_not_make_a_folder_deletable(tmp_path):
    """The marker must be the demo's own: a regular file (not a link to one) in a private
    folder; a folder someone else could write stays as it is."""
    import stat
    from smsblock.cli.demo import DEMO_MARKER
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "keep.txt").write_text("mine")
    (shared / DEMO_MARKER).write_text("planted")
    real = tmp_path / "marker"
    real.write_text("x")
    linked = tmp_path / "linked"
    linked.mkdir(mode=0o700)
    (linked / "keep.txt").write_text("mine")
    (linked / DEMO_MARKER).symlink_to(real)
    for folder in (shared, linked):
        proc = subprocess.run([sys.executable, "-m", "smsblock", "demo", "--json", "--dir", str(folder)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "not an earlier demo's folder" in proc.stderr, proc.stderr
        assert (folder / "keep.txt").read_text() == "mine"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
