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
