"""Launch and boot test: real Linux disks (tests/boot_disks.py) replicated through a store,
registered as images, launched under QEMU and boot-tested; EC2 launches against moto.

The tests that run QEMU are in the ``boot`` group (``-m boot``, CI runs it); under software
emulation those that boot a kernel take tens of seconds each, and the group stays under
5 minutes on 2 cores.  ``-m "not boot"`` leaves the watcher, input and EC2 tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boot_disks import boot_disk
from conftest import sha256_file
from smsblock.engine import replicate
from smsblock.errors import ImageError, ImageNotFoundError, UsageError
from smsblock.image import boot_test, create_image, launch_image
from smsblock.image.boottest import ConsoleWatcher, expected_stages
from smsblock.image.catalog import Catalog
from smsblock.image.launch import Launches, qemu_command

# without QEMU the tests skip on a workstation; with CI=true they fail instead, so CI
# cannot pass with the boot tests silently left out
pytestmark = pytest.mark.skipif(not Path("/usr/bin/qemu-system-x86_64").exists()
                                and os.environ.get("CI", "").lower() not in ("1", "true"),
                                reason="needs qemu-system-x86 (scripts/setup.sh --debug)")


def cli(*args, env=None, timeout=400):
    proc = subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def qemu_pids(marker: str) -> list[int]:
    """Live QEMU processes whose command line holds ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"qemu-system" in cmdline and marker.encode() in cmdline and state != b"Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Disks built once, a store holding one run of each, a catalog to register them in."""
    work = tmp_path_factory.mktemp("boot")
    catalog = work / "catalog"
    store = work / "store"
    yield {"work": work, "catalog": catalog, "store": store, "images": {}}
    leftovers = qemu_pids(str(catalog))
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"QEMU processes left running: {leftovers}"


def image_of(lab, variant: str) -> str:
    """Replicate the variant's disk into the store and register it (once per module)."""
    if variant not in lab["images"]:
        disk = boot_disk(lab["work"] / "disks", variant)
        run_id = replicate(disk, str(lab["store"]), f"srv-{variant}").run_id
        rec = create_image(str(lab["store"]), f"srv-{variant}", run_id,
                           catalog=Catalog(lab["catalog"]), allow_unsupported=True,
                           force=variant == "no-boot-code")
        lab["images"][variant] = rec["image_id"]
    return lab["images"][variant]


# --- the console watcher (no QEMU) -------------------------------------------------------

def feed(watcher, text, source="console", now=1.0):
    watcher.feed(text, source, now)


def test_watcher_stage_order_and_implied_stages():
    w = ConsoleWatcher(expected_stages("linux", None), None)
    # an initramfs's own /init and a filesystem before the kernel banner do not count
    feed(w, "EXT4-fs (sda1): mounted filesystem with ordered data mode.\n")
    feed(w, "Run /init as init process\n")
    assert not any(s.reached for s in w.stages)
    feed(w, "\x1b[H\x1b[J\x1b[1;1H  Booting `Debian GNU/Linux'\r\n", now=2.0)
    feed(w, "[    0.000000] Linux version 6.1.0-57-amd64 (gcc-12)\r\n", now=3.0)
    feed(w, "Run /init as init process\n", now=3.5)
    assert [s.name for s in w.stages if s.reached] == ["bootloader", "kernel"]
    assert w.stages[0].line == "Booting `Debian GNU/Linux'" and w.stages[1].at == 3.0
    # a login prompt has no newline; it implies init even when init said nothing known
    feed(w, "[ 12.0] EXT4-fs (nvme0n1p1): mounted filesystem with ordered data mode.\n", now=4.0)
    feed(w, "\r\nsmsboot login: ", now=5.0)
    assert w.done and w.stopped_at is None
    assert [s.at for s in w.stages] == [2.0, 3.0, 4.0, 5.0, 5.0]


def test_watcher_failure_waits_for_progress_and_panic_is_final():
    w = ConsoleWatcher(expected_stages("linux", None), None)
    feed(w, "Booting from 0000:7c00\n", "firmware", now=0.5)
    feed(w, "error: no such device: 1234-abcd.\n", now=1.0)
    assert w.failed(1.5) is None                          # within the grace period
    feed(w, "Linux version 5.10.0 (x)\n", now=2.0)        # GRUB went on: not a failure
    assert w.failed(100.0) is None
    feed(w, "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n",
         now=3.0)
    feed(w, "Run /sbin/init as init process\n", now=3.2)  # nothing after a panic rescues it
    assert w.failed(3.5) is None and w.failed(4.0).startswith("Kernel panic")
    assert w.stopped_at == "root"


def test_watcher_boot_loader_needs_the_boot_code_to_read_on():
    from smsblock.image.boottest import BOOT_CODE_WAIT

    w = ConsoleWatcher(expected_stages("linux", None), None)
    feed(w, "Booting from Hard Disk...\nBooting from 0000:7c00\n", "firmware", now=1.0)
    feed(w, "blk_co_preadv blk 0x1 bs 0x2 offset 0 bytes 512 flags 0x0\n", "disk", now=1.0)
    assert not w.stages[0].reached and w.failed(1.0 + BOOT_CODE_WAIT - 0.1) is None
    assert "read nothing more" in w.failed(1.0 + BOOT_CODE_WAIT)
    feed(w, "blk_co_preadv blk 0x1 bs 0x2 offset 512 bytes 512 flags 0x0\n", "disk", now=2.0)
    assert w.stages[0].reached and w.failed(100.0) is None
    assert w.stages[0].line == "Booting from 0000:7c00; the boot code read the disk at offset 512"


def test_watcher_marker_windows_and_bounds():
    assert expected_stages("windows", None) == ["bootloader"]
    assert expected_stages("windows", "SAC started") == ["bootloader", "marker"]
    w = ConsoleWatcher(expected_stages("linux", "READY-42"), "READY-42")
    feed(w, "Linux version 6.1\n" + "x" * 100_000 + "\n")  # a huge line is cut, not kept
    assert max(len(line) for line in w.tail) <= 1024
    feed(w, "cloud-init: READY-42")                         # the marker, without a newline
    assert w.done and [s.name for s in w.stages][-1] == "marker"


def test_boot_test_and_launch_refuse_bad_input(tmp_path):
    catalog = tmp_path / "c"
    for bad in ("ami-123", "i-0123", "../ami-00000000000000000", "ami-0123456789abcdef0\n"):
        with pytest.raises(UsageError):
            launch_image(bad, catalog=catalog)
    with pytest.raises(ImageNotFoundError):
        launch_image("ami-0123456789abcdef0", catalog=catalog)
    for kwargs in ({"timeout": 0}, {"timeout": -5}, {"timeout": 10**6}, {"marker": ""},
                   {"marker": "a\nb"}, {"marker": "x" * 500}):
        with pytest.raises(UsageError):
            boot_test("ami-0123456789abcdef0", catalog=catalog, **kwargs)
    with pytest.raises(UsageError):
        Launches(catalog).terminate("i-../../etc")
    with pytest.raises(ImageNotFoundError):
        Launches(catalog).terminate("i-0123456789abcdef0")
    status, out, err = cli("image", "terminate", "i-0123456789abcdef0", "--catalog", catalog)
    assert status != 0 and out == "" and len(err.strip().splitlines()) == 1
    assert "no launched instance i-0123456789abcdef0" in err
    status, _, err = cli("image", "boot-test", "ami-zz", "--catalog", catalog)
    assert status != 0 and "is not an image id" in err and "Traceback" not in err


def test_qemu_command_escapes_commas_in_paths(tmp_path):
    d = tmp_path / "a,b"
    cmd = qemu_command(d / "o.qcow2", d / "c.log", d / "f.log", accel="tcg", memory_mib=256,
                       name="x", disk_bus="nvme")
    drive = cmd[cmd.index("-drive") + 1]
    assert drive.startswith(f"file={tmp_path}/a,,b/o.qcow2,format=qcow2")


# --- local launches (QEMU) ------------------------------------------------------------------

@pytest.mark.boot
def test_launch_list_terminate_local(lab):
    image_id = image_of(lab, "good")
    vmdk = Path(Catalog(lab["catalog"]).show(image_id)["disk_path"])
    digest = sha256_file(vmdk)
    status, out, err = cli("image", "launch", image_id, "--catalog", lab["catalog"], "--json")
    assert status == 0, err
    rec = json.loads(out)
    iid = rec["instance_id"]
    assert re.fullmatch(r"i-[0-9a-f]{17}", iid) and rec["state"] == "running"
    d = Path(lab["catalog"]) / "launches" / iid
    assert d.stat().st_mode & 0o777 == 0o700
    for name in ("overlay.qcow2", "console.log", "firmware.log", "launch.json"):
        assert (d / name).stat().st_mode & 0o777 == 0o600, name
    # QEMU leads its own process group, and boots the overlay backed by the image's VMDK
    assert os.getpgid(rec["pid"]) == rec["pid"] and qemu_pids(str(d)) == [rec["pid"]]
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", d / "overlay.qcow2"],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == str(vmdk.resolve())
    deadline = time.monotonic() + 60
    while "Booting `Debian" not in (d / "console.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, "GRUB never spoke on the serial console"
        time.sleep(0.2)
    status, out, _ = cli("image", "launches", "--catalog", lab["catalog"], "--json")
    listed = {r["instance_id"]: r for r in json.loads(out)["launches"]}
    assert listed[iid]["state"] == "running" and listed[iid]["image_id"] == image_id
    status, out, err = cli("image", "terminate", iid, "--catalog", lab["catalog"])
    assert status == 0 and f"{iid}  terminated" in out, err
    assert qemu_pids(str(d)) == [] and not (d / "overlay.qcow2").exists()
    assert (d / "console.log").stat().st_size > 0              # the console log is kept
    _, out, _ = cli("image", "launches", "--catalog", lab["catalog"])
    assert f"{iid}  terminated  {image_id}  local" in out
    assert sha256_file(vmdk) == digest                          # the image was never written
    with pytest.raises(UsageError):
        launch_image(image_id, catalog=lab["catalog"], disk_bus="scsi")


@pytest.mark.boot
def test_qemu_that_ends_itself_is_stopped_and_terminate_still_cleans(lab, monkeypatch):
    image_id = image_of(lab, "no-boot-code")
    launches = Launches(Catalog(lab["catalog"]))
    rec = launches.launch(image_id)
    os.kill(rec["pid"], signal.SIGKILL)                       # QEMU dies on its own
    deadline = time.monotonic() + 10
    while launches.show(rec["instance_id"])["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert launches.show(rec["instance_id"])["state"] == "stopped"
    assert launches.terminate(rec["instance_id"])["state"] == "terminated"
    assert not Path(rec["overlay"]).exists()


@pytest.mark.boot
def test_killed_boot_test_leaves_no_qemu(lab):
    # the process running a boot test dies by SIGKILL: its QEMU dies with it
    image_id = image_of(lab, "good")
    code = ("import sys; from smsblock.image import boot_test; "
            "boot_test(sys.argv[1], catalog=sys.argv[2], timeout=120)")
    proc = subprocess.Popen([sys.executable, "-c", code, image_id, str(lab["catalog"])])
    launches = Launches(Catalog(lab["catalog"]))
    before = {r["instance_id"] for r in launches.list()}
    deadline = time.monotonic() + 60
    while True:
        new = [r for r in launches.list() if r["instance_id"] not in before
               and r["state"] == "running"]
        if new:
            break
        assert time.monotonic() < deadline and proc.poll() is None, "no instance started"
        time.sleep(0.1)
    (rec,) = new
    assert qemu_pids(rec["overlay"].rsplit("/", 1)[0]) == [rec["pid"]]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while qemu_pids(rec["overlay"].rsplit("/", 1)[0]):
        assert time.monotonic() < deadline, "QEMU outlived the boot test's process"
        time.sleep(0.1)
    assert launches.show(rec["instance_id"])["state"] == "stopped"
    assert launches.terminate(rec["instance_id"])["state"] == "terminated"
    assert not Path(rec["overlay"]).exists()


@pytest.mark.boot
def test_boot_test_timeout_kills_qemu(lab):
    image_id = image_of(lab, "good")
    result = boot_test(image_id, catalog=lab["catalog"], timeout=2)
    assert not result.ok and result.reason == "timed out after 2 s"
    assert result.stopped_at in ("bootloader", "kernel") and 2 <= result.elapsed < 15
    assert qemu_pids(str(Path(lab["catalog"]) / "launches" / result.instance_id)) == []
    assert Launches(Catalog(lab["catalog"])).show(result.instance_id)["state"] == "terminated"


# --- boot tests ---------------------------------------------------------------------------

def check_stopped(result, stage: str, reason: str, catalog):
    assert not result.ok and result.stopped_at == stage, result.to_dict()
    assert reason in result.reason, result.reason
    names = [s.name for s in result.stages]
    reached = [s.name for s in result.stages if s.reached]
    assert reached == names[:names.index(stage)]
    rec = Catalog(catalog).show(result.image_id)          # marked, not deleted
    assert rec["boot_test"]["ok"] is False and rec["boot_test"]["stopped_at"] == stage
    assert Path(rec["disk_path"]).is_file()


@pytest.mark.boot
def test_boot_test_no_boot_code_stops_at_the_boot_loader(lab):
    image_id = image_of(lab, "no-boot-code")
    result = boot_test(image_id, catalog=lab["catalog"], timeout=120)
    check_stopped(result, "bootloader", "the firmware ran the disk's boot code but it read "
                  "nothing more in 10 s (no boot loader in the MBR?)", lab["catalog"])
    # the zeroed boot code runs on into whatever follows, and the firmware may log a
    # screenful of that before the 10 s are up: the jump to it is in the firmware log
    assert "Booting from 0000:7c00" in Path(result.firmware_log).read_text(errors="replace") and result.last_lines
    assert result.elapsed < 40


@pytest.mark.boot
def test_boot_test_disk_without_boot_signature_fails_in_the_firmware(lab, tmp_path):
    # a disk whose MBR is all zeros (no signature): the firmware itself refuses it
    disk = tmp_path / "blank.raw"
    disk.write_bytes(bytes(boot_disk(lab["work"] / "disks", "good").read_bytes()[:1 << 20]))
    with open(disk, "r+b") as f:
        f.write(bytes(512))
    run_id = replicate(disk, str(lab["store"]), "srv-blank").run_id
    image_id = create_image(str(lab["store"]), "srv-blank", run_id, catalog=Catalog(lab["catalog"]),
                            force=True)["image_id"]
    result = boot_test(image_id, catalog=lab["catalog"], timeout=120)
    check_stopped(result, "bootloader", "Boot failed: not a bootable disk", lab["catalog"])
    assert result.elapsed < 30


@pytest.mark.boot
def test_boot_test_grub_with_a_missing_kernel_stops_before_the_kernel(lab):
    image_id = image_of(lab, "missing-kernel")
    status, out, err = cli("image", "boot-test", image_id, "--catalog", lab["catalog"],
                           "--timeout", "120")
    assert status == 1, err
    assert "FAILED at kernel started: the console shows: error: file `/boot/vmlinuz-" in out
    assert "not found" in out and "| Booting `Debian GNU/Linux'" in out
    rec = Catalog(lab["catalog"]).show(image_id)
    assert rec["boot_test"]["stopped_at"] == "kernel"
    _, out, _ = cli("image", "show", image_id, "--catalog", lab["catalog"])
    assert "boot test: FAILED at kernel" in out


@pytest.mark.boot
def test_boot_test_good_disk_reaches_the_login_prompt(lab):
    image_id = image_of(lab, "good")
    vmdk = Path(Catalog(lab["catalog"]).show(image_id)["disk_path"])
    digest = sha256_file(vmdk)
    status, out, err = cli("image", "boot-test", image_id, "--catalog", lab["catalog"],
                           "--timeout", "240", "--json")
    assert status == 0, err + out
    doc = json.loads(out)
    assert doc["ok"] is True and doc["stopped_at"] is None
    stages = doc["stages"]
    assert [s["name"] for s in stages] == ["bootloader", "kernel", "root", "init", "login"]
    assert all(s["reached"] for s in stages)
    times = [s["seconds"] for s in stages]
    assert times == sorted(times) and times[-1] <= doc["elapsed"]
    assert stages[1]["line"].startswith("[    0.000000] Linux version 6.1")
    assert "mounted filesystem" in stages[2]["line"] and stages[4]["line"] == "smsboot login:"
    assert "smsboot login:" in Path(doc["console_log"]).read_text(errors="replace")
    assert "\x1b" not in doc["console"] and "Booting `Debian GNU/Linux'" in doc["console"]
    assert doc["console"].rstrip().endswith("smsboot login:")
    assert Catalog(lab["catalog"]).show(image_id)["boot_test"]["ok"] is True
    assert sha256_file(vmdk) == digest
    assert qemu_pids(str(lab["catalog"])) == []


@pytest.mark.boot
def test_boot_test_unmountable_root_stops_at_the_root(lab):
    image_id = image_of(lab, "bad-root")
    status, out, err = cli("image", "boot-test", image_id, "--catalog", lab["catalog"],
                           "--timeout", "240")
    assert status == 1, err
    assert "FAILED at root filesystem mounted" in out
    assert "ALERT!  UUID=00000000-dead-beef-0000-000000000000 does not exist" in out
    assert "Kernel panic - not syncing" in out                    # among the last lines
    assert Catalog(lab["catalog"]).show(image_id)["boot_test"]["stopped_at"] == "root"


@pytest.mark.boot
def test_boot_test_missing_init_stops_at_init(lab):
    image_id = image_of(lab, "no-init")
    result = boot_test(image_id, catalog=lab["catalog"], timeout=240)
    check_stopped(result, "init", "Kernel panic - not syncing: Attempted to kill init!",
                  lab["catalog"])
    assert any("can't execute '/sbin/init'" in line for line in result.last_lines)


# --- EC2 (moto) -----------------------------------------------------------------------------

@pytest.fixture
def moto_ec2(monkeypatch):
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_launch_ec2_runs_and_terminates_the_registered_ami(lab, moto_ec2, tmp_path):
    import boto3

    disk = boot_disk(lab["work"] / "disks", "good")
    run_id = replicate(disk, str(tmp_path / "s"), "srv-ec2").run_id
    rec = create_image(str(tmp_path / "s"), "srv-ec2", run_id, target="ec2",
                       endpoint_url=moto_ec2, allow_unsupported=True)
    ami = rec["image_id"]
    catalog = tmp_path / "c"
    status, out, err = cli("image", "launch", ami, "--target", "ec2", "--endpoint-url", moto_ec2,
                           "--instance-type", "t3.small", "--catalog", catalog, "--json")
    assert status == 0, err
    launched = json.loads(out)
    iid = launched["instance_id"]
    assert re.fullmatch(r"i-[0-9a-f]{17}", iid) and launched["target"] == "ec2"
    ec2 = boto3.client("ec2", endpoint_url=moto_ec2, region_name="us-east-1")
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["ImageId"] == ami and inst["InstanceType"] == "t3.small"
    assert {"Key": "smsblock:image", "Value": ami} in inst["Tags"]
    _, out, _ = cli("image", "launches", "--catalog", catalog)
    assert f"{iid}  {launched['state']}  {ami}  ec2" in out
    status, out, err = cli("image", "terminate", iid, "--catalog", catalog, "--json")
    assert status == 0, err
    assert json.loads(out)["state"] in ("shutting-down", "terminated")
    state = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] in ("shutting-down", "terminated")
    # an endpoint that answers nothing: retried under the one retry policy (a warning
    # each), then one line naming the call, and no launch recorded
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    status, _, err = cli("image", "launch", ami, "--target", "ec2", "--endpoint-url", dead,
                         "--catalog", catalog,
                         env={**os.environ, "SMSBLOCK_S3_RETRY_ATTEMPTS": "2"})
    lines = err.strip().splitlines()
    assert status != 0 and f"RunInstances of {ami} failed at {dead}" in lines[-1]
    assert "gave up after 2 attempts" in lines[-1] and "Traceback" not in err
    assert len(lines) == 2 and "retry 1 of 1" in lines[0]
    assert [p.name for p in (catalog / "launches").iterdir()] == [iid]
    with pytest.raises(ImageError):
        boot_test(ami, catalog=catalog)    # not in the local catalog: nothing to boot here


# --- replication jobs with bootTest ---------------------------------------------------------

@pytest.mark.boot
def test_replication_job_boot_test_marks_the_image_and_reports_in_the_run(lab, tmp_path):
    from smsblock.errors import ServiceError
    from smsblock.service import FakeClock, SmsService
    from smsblock.service.connector import ConnectorLoop
    from smsblock.service.executor import RunExecutor
    from test_service_sources import make_vm

    disk = boot_disk(lab["work"] / "disks", "missing-kernel", release="debian-8")
    make_vm(tmp_path / "ds", "DC1/web", "web", disks=(("scsi0:0", disk.stat().st_size),),
            image=disk)
    svc = SmsService(tmp_path / "state", clock=FakeClock(1_800_000_000.0))
    svc.register_connector("datastore", {"path": str(tmp_path / "ds")})
    svc.import_server_catalog()
    server = svc.get_servers()["serverList"][0]["serverId"]
    with pytest.raises(ServiceError, match="bootTest must be true or false"):
        svc.create_replication_job(serverId=server, seedReplicationTime=svc.clock() + 864000,
                                   frequency=12, bootTest="yes")
    job = svc.create_replication_job(serverId=server, seedReplicationTime=svc.clock() + 864000,
                                     frequency=12)["replicationJobId"]

    def run_now():
        run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
        with ConnectorLoop(svc, executor=RunExecutor(svc.state, svc.clock)) as loop:
            loop.run_once()
        return next(r for r in svc.get_replication_runs(replicationJobId=job)["replicationRunList"]
                    if r["replicationRunId"] == run)

    run = run_now()                                     # no bootTest: no boot test
    assert run["state"] == "COMPLETED" and "boot test" not in run["statusMessage"], run
    catalog = Catalog(svc.state.dir / "images")
    assert "boot_test" not in catalog.show(run["amiId"])

    svc.update_replication_job(replicationJobId=job, bootTest=True)
    run = run_now()
    # the image is registered and kept; the run completes and says how the boot test went
    assert run["state"] == "COMPLETED" and run["amiId"].startswith("ami-"), run
    assert ("boot test failed at kernel started (kernel): the console shows: error: file "
            "`/boot/vmlinuz-") in run["statusMessage"], run["statusMessage"]
    rec = catalog.show(run["amiId"])
    assert rec["boot_test"]["ok"] is False and rec["boot_test"]["stopped_at"] == "kernel"
    assert Path(rec["disk_path"]).is_file()
    assert qemu_pids(str(svc.state.dir)) == []
