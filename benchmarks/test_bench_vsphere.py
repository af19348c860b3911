"""Streaming a snapshot disk over the datastore HTTP file service, against vcsim.

Scans a ``SMSBLOCK_BENCH_VSPHERE_MIB`` MiB (default 256) flat VMDK of random data through a
vSphere run (snapshot, HTTP Range reads of 512 KiB blocks on 2 threads) and, as the peer,
the same scan of the local ``-flat.vmdk`` file; prints MiB/s of both (run with ``-s``).
vcsim serves files with Go's http.FileServer on 127.0.0.1, so this measures the client's
cost per request and byte, not a real vCenter's.  The machine is shared: figures are noisy.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import qemu_img  # noqa: E402
from test_vsphere import PASSWORD, USER, Vcsim  # noqa: E402

from smsblock.disk.raw import RawDisk
from smsblock.scanner import scan
from smsblock.source.vsphere import PASSWORD_ENV, VCenterSettings, VSphereSource

MIB = 1 << 20
SIZE = int(os.environ.get("SMSBLOCK_BENCH_VSPHERE_MIB", "256")) * MIB


@pytest.fixture(scope="module")
def sim_with_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcsim-bench")
    sim = Vcsim(root / "ds")
    raw = root / "disk.raw"
    rng = np.random.default_rng(0)
    with open(raw, "wb") as f:
        for _ in range(SIZE // (8 * MIB)):
            f.write(rng.integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes())
    folder = sim.datastore / "DC0_H0_VM0"
    for name in ("disk1.vmdk", "disk1-flat.vmdk"):
        (folder / name).unlink(missing_ok=True)
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
             raw, folder / "disk1.vmdk")
    raw.unlink()
    yield sim, folder / "disk1-flat.vmdk"
    sim.stop()


def test_scan_over_http_vs_local(benchmark, sim_with_disk, monkeypatch):
    sim, flat = sim_with_disk
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with VSphereSource(VCenterSettings.from_options(sim.url, USER)) as src:
        vm = next(v for v in src.list_vms() if v.vmName == "DC0_H0_VM0")

        def http_run():
            with src.open_run(vm) as run:
                return scan(run.disks[0].disk, threads=2)
        remote = benchmark.pedantic(http_run, rounds=3, iterations=1)
    t = time.perf_counter()
    with RawDisk(flat) as local:
        ref = scan(local, threads=2)
    local_s = time.perf_counter() - t
    assert remote.hashes.tobytes() == ref.hashes.tobytes()
    http_s = benchmark.stats.stats.min
    benchmark.extra_info.update(http_mib_s=SIZE / MIB / http_s, local_mib_s=SIZE / MIB / local_s)
    print(f"\nvSphere run scan over HTTP: {SIZE / MIB / http_s:.0f} MiB/s "
          f"(snapshot + remove included); local file: {SIZE / MIB / local_s:.0f} MiB/s")
