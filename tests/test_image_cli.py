"""``smsblock inspect`` and ``smsblock image create|list|show|delete`` end to end."""

from __future__ import annotations

import json
import re

import pytest

from conftest import qemu_img
from image_builders import GRUB2_BOOT_IMG, MiB, fake_root, mkfs_ext, partition_disk, place, write_boot_code
from smsblock import open_disk
from smsblock.cli import main
from test_image_inspect import linux_disk  # noqa: F401  (the shared module fixture)

REPORT_KEYS = {"source", "disk_size", "partition_table", "disk_id", "partitions", "boot_code",
               "boot_code_detail", "os", "findings", "ok"}
PARTITION_KEYS = {"number", "start", "size", "type", "bootable", "filesystem", "label", "uuid",
                  "kind", "type_name", "fs_variant", "name"}


def run_cli(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def store_with_runs(tmp_path_factory, linux_disk):  # noqa: F811
    """A store with the Linux disk (srv-ok) and a GPT disk (srv-gpt) replicated."""
    from smsblock.engine import replicate
    d = tmp_path_factory.mktemp("store")
    gpt = d / "gpt.img"
    partition_disk(gpt, 16 * MiB, "label: gpt\nstart=2048, size=16384, type=L\n")
    place(gpt, 2048 * 512, mkfs_ext(d / "r.img", "ext4", 8 * MiB, label="r",
                                    root=fake_root(d, "ubuntu-14.04")))
    write_boot_code(gpt, GRUB2_BOOT_IMG.read_bytes())
    store = d / "store"
    with open_disk(linux_disk[0]) as disk:
        run_ok = replicate(disk, str(store), "srv-ok").run_id
    with open_disk(gpt) as disk:
        replicate(disk, str(store), "srv-gpt")
    return store, run_ok


def test_inspect_json_shape(capsys, linux_disk):  # noqa: F811
    status, out, _ = run_cli(capsys, "inspect", linux_disk[0], "--json")
    doc = json.loads(out)
    assert status == 0 and set(doc) == REPORT_KEYS | {"schema"} and doc["schema"] == 1
    assert doc["partition_table"] == "mbr" and doc["ok"] is True and doc["boot_code"] == "grub2"
    assert all(set(p) == PARTITION_KEYS for p in doc["partitions"])
    assert [p["filesystem"] for p in doc["partitions"]] == ["ext4", "swap", None, "vfat", "jfs"]
    assert {k: doc["os"][k] for k in ("family", "distribution", "version", "architecture")} == \
        {"family": "linux", "distribution": "centos", "version": "7.2.1511", "architecture": "x86_64"}
    assert all(set(f) == {"severity", "code", "message"} for f in doc["findings"])


def test_inspect_text(capsys, linux_disk):  # noqa: F811
    status, out, _ = run_cli(capsys, "inspect", linux_disk[0])
    assert status == 0
    assert "partition table: mbr" in out and "boot code: grub2" in out
    assert "os: linux centos 7.2.1511 (x86_64) on partition 1" in out
    assert out.rstrip().endswith("OK: the disk can be imported")


def test_inspect_stored_run_equals_file(capsys, linux_disk, store_with_runs):  # noqa: F811
    store, run_ok = store_with_runs
    _, file_out, _ = run_cli(capsys, "inspect", linux_disk[0], "--json")
    status, run_out, _ = run_cli(capsys, "inspect", "--store", store, "--server", "srv-ok",
                                 "--run", run_ok, "--json")
    a, b = json.loads(file_out), json.loads(run_out)
    assert status == 0 and b["source"].endswith(f"#srv-ok/{run_ok}")
    a.pop("source"), b.pop("source")
    assert a == b


def test_inspect_gpt_run_fails_and_allow_unsupported_keeps_layout_errors(capsys, store_with_runs):
    store, _ = store_with_runs
    status, out, _ = run_cli(capsys, "inspect", "--store", store, "--server", "srv-gpt", "--json",
                             "--allow-unsupported")
    doc = json.loads(out)
    assert status == 1 and doc["ok"] is False and doc["partition_table"] == "gpt"
    assert [f["code"] for f in doc["findings"] if f["severity"] == "error"] == ["gpt-not-supported"]


def test_inspect_usage_errors(capsys, tmp_path, linux_disk):  # noqa: F811
    assert run_cli(capsys, "inspect")[0] == 2
    assert run_cli(capsys, "inspect", linux_disk[0], "--store", tmp_path)[0] == 2
    status, _, err = run_cli(capsys, "inspect", tmp_path / "missing.img")
    assert status == 1 and "missing.img" in err
    status, _, err = run_cli(capsys, "inspect", "--store", tmp_path / "nostore", "--server", "x")
    assert status != 0 and err.startswith("smsblock: error:")


def test_image_create_list_show_delete(capsys, tmp_path, linux_disk, store_with_runs):  # noqa: F811
    store, run_ok = store_with_runs
    catalog = tmp_path / "catalog"
    status, out, _ = run_cli(capsys, "image", "create", "--store", store, "--server", "srv-ok",
                             "--catalog", catalog, "--json")
    rec = json.loads(out)
    assert status == 0 and re.fullmatch(r"ami-[0-9a-f]{17}", rec["image_id"])
    assert rec["source"] == {"store": rec["source"]["store"], "server_id": "srv-ok", "run_id": run_ok}
    assert (rec["license_type"], rec["license_type_requested"]) == ("BYOL", "Auto")
    assert (rec["architecture"], rec["boot_mode"], rec["root_device_name"]) == \
        ("x86_64", "legacy-bios", "/dev/sda1")
    assert rec["os"]["version"] == "7.2.1511" and rec["ok"] and not rec["forced"]
    assert rec["disk"]["create_type"] == "streamOptimized"
    vmdk = catalog / rec["image_id"] / "disk.vmdk"
    assert "streamOptimized" in qemu_img("info", vmdk).stdout
    qemu_img("compare", "-f", "vmdk", "-F", "raw", vmdk, linux_disk[0])

    status, out, _ = run_cli(capsys, "image", "list", "--catalog", catalog, "--json")
    listed = json.loads(out)
    assert status == 0 and [r["image_id"] for r in listed["images"]] == [rec["image_id"]]
    assert listed["schema"] == 1 and listed["catalog"] == str(catalog)
    status, out, _ = run_cli(capsys, "image", "show", rec["image_id"], "--catalog", catalog, "--json")
    shown = json.loads(out)
    assert shown["disk_path"] == str(vmdk)
    shown.pop("disk_path")
    assert shown == rec
    status, out, _ = run_cli(capsys, "image", "list", "--catalog", catalog)
    assert rec["image_id"] in out and "centos 7.2.1511" in out
    assert run_cli(capsys, "image", "delete", rec["image_id"], "--catalog", catalog)[0] == 0
    assert not (catalog / rec["image_id"]).exists()
    status, out, _ = run_cli(capsys, "image", "list", "--catalog", catalog)
    assert status == 0 and out == f"no images in the catalog {catalog}\n"   # empty says so
    status, _, err = run_cli(capsys, "image", "show", rec["image_id"], "--catalog", catalog)
    assert status == 1 and "no image" in err
    assert run_cli(capsys, "image", "show", "ami-123", "--catalog", catalog)[0] == 2


def test_image_create_refuses_then_force(capsys, tmp_path, store_with_runs):
    store, _ = store_with_runs
    catalog = tmp_path / "catalog"
    status, _, err = run_cli(capsys, "image", "create", "--store", store, "--server", "srv-gpt",
                             "--catalog", catalog)
    assert status == 1 and "gpt-not-supported" in err and "--force" in err
    assert not catalog.exists() or not any(catalog.iterdir())
    status, out, _ = run_cli(capsys, "image", "create", "--store", store, "--server", "srv-gpt",
                             "--catalog", catalog, "--force", "--license-type", "AWS", "--json")
    rec = json.loads(out)
    assert status == 0 and rec["forced"] is True and rec["ok"] is False
    assert rec["license_type"] == "AWS"
    assert "gpt-not-supported" in [f["code"] for f in rec["findings"]]
    assert [p.name for p in catalog.iterdir()] == [rec["image_id"]]


@pytest.fixture(scope="module")
def moto_endpoint(monkeypatch_module):
    """moto's server (in this process, on a free loopback port) standing in for EC2 + EBS."""
    import socket
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch_module.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.xdist_group("moto-image")
def test_image_create_ec2(capsys, tmp_path, linux_disk, store_with_runs, moto_endpoint,  # noqa: F811
                          monkeypatch):
    import boto3
    from smsblock.image import ec2 as ec2_target

    # moto keeps only Name and Description of RegisterImage: record what was sent
    sent = {}
    real_clients = ec2_target._clients

    def recording_clients(endpoint_url, region):
        ebs_c, ec2_c = real_clients(endpoint_url, region)
        ec2_c.meta.events.register("provide-client-params.ec2.RegisterImage",
                                   lambda params, **kw: sent.update(params))
        return ebs_c, ec2_c
    monkeypatch.setattr(ec2_target, "_clients", recording_clients)
    store, run_ok = store_with_runs
    status, out, err = run_cli(capsys, "image", "create", "--store", store, "--server", "srv-ok",
                               "--target", "ec2", "--endpoint-url", moto_endpoint, "--json",
                               "--catalog", tmp_path / "c")
    assert status == 0, err
    rec = json.loads(out)
    assert not (tmp_path / "c").exists()          # nothing local for the ec2 target
    ec2 = boto3.client("ec2", endpoint_url=moto_endpoint, region_name="us-east-1")
    ebs = boto3.client("ebs", endpoint_url=moto_endpoint, region_name="us-east-1")
    image = ec2.describe_images(ImageIds=[rec["image_id"]])["Images"][0]
    assert image["Name"] == f"srv-ok-{run_ok}"
    snap_id = rec["ec2"]["snapshot_id"]
    assert ec2.describe_snapshots(SnapshotIds=[snap_id])["Snapshots"][0]["State"] == "completed"
    assert (sent["RootDeviceName"], sent["Architecture"], sent["BootMode"]) == \
        ("/dev/sda1", "x86_64", "legacy-bios")
    assert sent["BlockDeviceMappings"] == [{"DeviceName": "/dev/sda1",
                                            "Ebs": {"SnapshotId": snap_id, "DeleteOnTermination": True}}]
    # the snapshot holds exactly the disk's non-zero 512 KiB blocks
    data = linux_disk[0].read_bytes()
    want = {i for i in range(len(data) // (512 << 10)) if any(data[i * (512 << 10):(i + 1) * (512 << 10)])}
    listed = ebs.list_snapshot_blocks(SnapshotId=snap_id, MaxResults=10000)["Blocks"]
    assert {b["BlockIndex"] for b in listed} == want and rec["ec2"]["blocks_sent"] == len(want)
    b0 = next(b for b in listed if b["BlockIndex"] == 0)
    got = ebs.get_snapshot_block(SnapshotId=snap_id, BlockIndex=0, BlockToken=b0["BlockToken"])
    assert got["BlockData"].read() == data[:512 << 10]
    assert rec["license_type"] == "BYOL" and rec["ok"]


@pytest.mark.xdist_group("moto-image")
def test_image_create_ec2_cancelled_midway_deletes_its_snapshot(store_with_runs, moto_endpoint):
    """Cancelled after the first block: Cancelled is raised, the snapshot is gone, no image."""
    import boto3
    from smsblock.errors import Cancelled
    from smsblock.image import create_image
    from smsblock.progress import CancelToken

    store, _ = store_with_runs
    ec2 = boto3.client("ec2", endpoint_url=moto_endpoint, region_name="us-east-1")

    def snapshots():
        return {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}

    def images():
        return {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}
    before_snaps, before_images = snapshots(), images()
    token, calls = CancelToken(), []

    def progress(done, total):
        calls.append((done, total))
        token.cancel()
    with pytest.raises(Cancelled):
        create_image(str(store), "srv-ok", target="ec2", endpoint_url=moto_endpoint,
                     progress=progress, cancel=token)
    assert len(calls) == 1 and calls[0][0] <= calls[0][1]
    assert snapshots() == before_snaps and images() == before_images


def test_image_create_ec2_unreachable_endpoint(capsys, store_with_runs, monkeypatch):
    store, _ = store_with_runs
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, _, err = run_cli(capsys, "image", "create", "--store", store, "--server", "srv-ok",
                             "--target", "ec2", "--endpoint-url", f"http://127.0.0.1:{port}",
                             "--region", "us-east-1")
    assert status == 1 and "EC2 registration failed" in err


def test_inspect_vmdk_equals_raw(capsys, tmp_path, linux_disk):  # noqa: F811
    vmdk = tmp_path / "linux.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", linux_disk[0], vmdk)
    _, raw_out, _ = run_cli(capsys, "inspect", linux_disk[0], "--json")
    status, vmdk_out, _ = run_cli(capsys, "inspect", vmdk, "--json")
    a, b = json.loads(raw_out), json.loads(vmdk_out)
    assert status == 0 and b["source"] == str(vmdk)
    a.pop("source"), b.pop("source")
    assert a == b
