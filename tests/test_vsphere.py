"""The vSphere source against vcsim (VMware's vCenter simulator, built by scripts/build-vcsim.sh).

vcsim's VPX model has one datacenter DC0 with four powered-on VMs whose disks are empty
placeholder files; the tests put qemu-img-made VMDKs in their place in the datastore folder
and check what the source reads through the datastore HTTP file service against qemu-img.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import ROOT, qemu_img, qemu_raw_bytes
from smsblock.disk.raw import RawDisk
from smsblock.errors import Cancelled, UsageError, VSphereError
from smsblock.progress import CancelToken
from smsblock.source.datastore_http import AreaOverlayDisk
from smsblock.source.vsphere import (PASSWORD_ENV, SNAPSHOT_PREFIX, VCenterSettings,
                                     VSphereSource, _translate, parse_address)

pyVmomi = pytest.importorskip("pyVmomi")
from pyVmomi import vim  # noqa: E402

VCSIM = ROOT / "build" / "vcsim" / "vcsim"
USER, PASSWORD = "svc-sms", "s3cret-Pa55"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vcsim:
    """One running vcsim: its URL, datastore folders and (with TLS) certificate file."""

    def __init__(self, root: Path, tls: tuple[Path, Path] | None = None):
        if not VCSIM.exists():
            if os.environ.get("CI") == "true":
                pytest.fail(f"{VCSIM} is missing: scripts/build-vcsim.sh must run in CI")
            pytest.skip(f"{VCSIM} is missing: run scripts/build-vcsim.sh (Go + Debian's govmomi)")
        for _ in range(3):      # a free port can be taken between the probe and the listen
            self.port = _free_port()
            args = [str(VCSIM), "-listen", f"127.0.0.1:{self.port}", "-datastore-root", str(root),
                    "-username", USER, "-password", PASSWORD, "-stdin-lifeline"]
            if tls:
                args += ["-tls", "-cert", str(tls[0]), "-key", str(tls[1])]
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
            line = self.proc.stdout.readline()
            if line:
                break
            self.proc.wait()
        else:
            pytest.fail("vcsim did not start")
        ready = json.loads(line)
        self.url = ready["url"]
        self.datastore = Path(ready["datastores"]["LocalDS_0"])
        self.cert = ready["cert"] or None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory):
    sim = Vcsim(tmp_path_factory.mktemp("vcsim"))
    yield sim
    sim.stop()


def _make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate it signed for 127.0.0.1, and an expired one."""
    import datetime as dt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smsblock test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - dt.timedelta(days=30))
          .not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": folder / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for label, start, end in (("valid", now - dt.timedelta(days=1), now + dt.timedelta(days=10)),
                              ("expired", now - dt.timedelta(days=10), now - dt.timedelta(days=1))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vcsim")]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[label] = folder / f"{label}.pem"
        out[label].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[label + "-key"] = folder / f"{label}-key.pem"
        out[label + "-key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return out


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return _make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def vcsim_tls(tmp_path_factory, certs):
    sim = Vcsim(tmp_path_factory.mktemp("vcsim-tls"), tls=(certs["valid"], certs["valid-key"]))
    yield sim
    sim.stop()


@pytest.fixture
def env_password(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


@pytest.fixture
def source(vcsim, env_password):
    with VSphereSource(VCenterSettings.from_options(vcsim.url, USER)) as src:
        yield src


def _vm(source, name):
    return next(v for v in source.list_vms() if v.vmName == name)


def _snapshots(source, vm_id):
    snap = source.get(vim.VirtualMachine(vm_id, source._si._stub), "snapshot").get("snapshot")
    names, stack = [], list(snap.rootSnapshotList) if snap else []
    while stack:
        node = stack.pop()
        names.append(node.name)
        stack.extend(node.childSnapshotList or [])
    return names


def _put_flat_vmdk(vcsim, vm_name, tmp_path, size=3 << 20, seed=1, image=None) -> Path:
    """Replace the VM's placeholder disk with a monolithicFlat VMDK (descriptor + -flat file,
    the layout ESXi uses) holding random data with holes (or the raw ``image``); returns
    the descriptor path."""
    raw = image
    if raw is None:
        rng = np.random.default_rng(seed)
        raw = tmp_path / f"{vm_name}-{seed}.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
            for off in (0, 65536 * 3, size // 2 + 4096, size - 1000):
                f.seek(off)
                f.write(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()[:size - off])
    folder = vcsim.datastore / vm_name
    for name in ("disk1.vmdk", "disk1-flat.vmdk"):
        (folder / name).unlink(missing_ok=True)
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
             raw, folder / "disk1.vmdk")
    return folder / "disk1.vmdk"


# --- settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("address,expected", [
    ("vc.example.com", ("https", "vc.example.com", 443, "/sdk")),
    ("vc.example.com:8443", ("https", "vc.example.com", 8443, "/sdk")),
    ("https://vc.example.com:9443/sdk", ("https", "vc.example.com", 9443, "/sdk")),
    ("http://127.0.0.1:8989", ("http", "127.0.0.1", 8989, "/sdk")),
    ("[::1]:8443", ("https", "::1", 8443, "/sdk")),
])
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", "ftp://vc", "vc:99999", "https://user:pw@vc"])
def test_parse_address_refuses(address):
    with pytest.raises(UsageError):
        parse_address(address)


def test_password_sources_and_secrecy(tmp_path, monkeypatch):
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    s = VCenterSettings.from_options("vc:8443", "u", password_file=str(pw))
    assert s.password == "from-file"
    assert "from-file" not in repr(s) and "from-file" not in json.dumps(s.to_config())
    assert s.to_config()["passwordFile"] == str(pw)
    s2 = VCenterSettings.from_options("vc", "u")
    assert s2.password == "from-env" and s2.to_config()["passwordEnv"] == PASSWORD_ENV
    assert "from-env" not in repr(s2) and "from-env" not in json.dumps(s2.to_config())
    assert VCenterSettings.from_config(s.to_config()).password == "from-file"
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(UsageError, match=PASSWORD_ENV):
        VCenterSettings.from_options("vc", "u")
    with pytest.raises(UsageError, match="--username"):
        VCenterSettings.from_options("vc", "", password_file=str(pw))


# --- catalog -----------------------------------------------------------------------------

def test_catalog_fields(source):
    vms = source.list_vms()
    about = source.content.about
    names = {v.vmName for v in vms}
    # DC0_C0_RP0_VM1 becomes a template in another test of this session
    assert names - {"DC0_C0_RP0_VM1"} == {"DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0"}
    for v in vms:
        assert v.vmId.startswith("vm-")
        # (another test of this session moves DC0_H0_VM1 into a folder)
        assert v.vmPath.startswith("/Datacenters/DC0/vm/") and v.vmPath.endswith("/" + v.vmName)
        assert v.vmManagerName == "127.0.0.1"
        assert v.vmManagerId == about.instanceUuid
        assert v.vmManagerType == "VSPHERE"
        obj = vim.VirtualMachine(v.vmId, source._si._stub)
        assert obj.name == v.vmName
        assert v.identity["instanceUuid"] == obj.config.instanceUuid
    d = vms[0].to_dict()
    assert set(d) >= {"vmId", "vmName", "vmPath", "vmManagerName", "vmManagerId", "vmManagerType"}


def test_catalog_warns_about_connected_cdroms_and_skips_templates(source):
    vm = _vm(source, "DC0_H0_VM1")
    assert any("connected" in w and "CD-ROM" in w for w in vm.warnings)
    obj = vim.VirtualMachine(vm.vmId, source._si._stub)
    cd = next(d for d in obj.config.hardware.device if isinstance(d, vim.vm.device.VirtualCdrom))
    cd.connectable.connected = cd.connectable.startConnected = False
    spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit",
                                                                           device=cd)])
    _wait_task(obj.ReconfigVM_Task(spec))
    assert _vm(source, "DC0_H0_VM1").warnings == []

    tmpl = _vm(source, "DC0_C0_RP0_VM1")
    tobj = vim.VirtualMachine(tmpl.vmId, source._si._stub)
    _wait_task(tobj.PowerOffVM_Task())
    tobj.MarkAsTemplate()
    assert tmpl.vmId not in {v.vmId for v in source.list_vms()}


def _wait_task(task):
    for _ in range(200):
        if task.info.state in ("success", "error"):
            assert task.info.state == "success", task.info.error
            return task.info.result
        time.sleep(0.05)
    raise AssertionError("task did not finish")


# --- runs ----------------------------------------------------------------------------------

def test_snapshot_read_equals_qemu_and_snapshot_removed(source, vcsim, tmp_path):
    desc = _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path)
    expected = qemu_raw_bytes(desc, tmp_path)
    vm = _vm(source, "DC0_H0_VM0")
    with source.open_run(vm, run_id="t1") as run:
        assert _snapshots(source, vm.vmId) == [f"{SNAPSHOT_PREFIX}t1"]
        [sd] = run.disks
        assert sd.location == "[LocalDS_0] DC0_H0_VM0/disk1.vmdk"
        assert sd.disk.size == len(expected)
        assert sd.disk.read(0, sd.disk.size) == expected
        # random ranges through Range requests, as the scan's threads read them
        for off, n in ((0, 1), (65536 * 3 - 7, 9000), (len(expected) - 100, 500)):
            assert sd.disk.read(off, n) == expected[off:off + n]
        record = run.record()
    assert _snapshots(source, vm.vmId) == []
    assert record["changeTracking"] == "hash"
    assert record["disks"][0]["changeReason"] == "changed block tracking is off for this VM"
    assert record["snapshotName"] == f"{SNAPSHOT_PREFIX}t1"


def test_run_feeds_the_scan(source, vcsim, tmp_path):
    from smsblock import scanner as scan_mod
    desc = _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path, seed=5)
    with source.open_run(_vm(source, "DC0_H0_VM0")) as run:
        manifest = scan_mod.scan(run.disks[0].disk, block_size=65536)
    with RawDisk(desc.parent / "disk1-flat.vmdk") as local:
        oracle = scan_mod.scan(local, block_size=65536)
    # same content block by block; over HTTP holes are not visible, so the local file's
    # UNALLOCATED blocks are ZERO blocks there
    from smsblock.manifest import BlockState
    local_states = np.where(oracle.states == BlockState.UNALLOCATED, BlockState.ZERO,
                            oracle.states)
    assert (manifest.states == local_states).all()
    assert (manifest.hashes == oracle.hashes).all()
    assert (manifest.states == BlockState.DATA).sum() == 4


def test_snapshot_removed_when_run_fails_or_is_cancelled(source, vcsim, tmp_path):
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path)
    vm = _vm(source, "DC0_H0_VM0")
    with pytest.raises(RuntimeError):
        with source.open_run(vm):
            assert len(_snapshots(source, vm.vmId)) == 1
            raise RuntimeError("engine failed")
    assert _snapshots(source, vm.vmId) == []

    token = CancelToken()
    with pytest.raises(Cancelled):
        with source.open_run(vm, cancel=token) as run:
            token.cancel("stopped by the operator")
            run.disks[0].disk.read(0, 10)
            token.check()
    assert _snapshots(source, vm.vmId) == []


def test_missing_disk_file_fails_clearly_and_removes_snapshot(source, vcsim, tmp_path):
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path)
    (vcsim.datastore / "DC0_H0_VM0" / "disk1-flat.vmdk").unlink()
    vm = _vm(source, "DC0_H0_VM0")
    with pytest.raises(VSphereError, match=r"disk1-flat.vmdk: file not found .*HTTP 404"):
        with source.open_run(vm):
            pass
    assert _snapshots(source, vm.vmId) == []


def test_leftover_snapshot_of_a_killed_run_is_removed(source, vcsim, tmp_path):
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path)
    vm = _vm(source, "DC0_H0_VM0")
    obj = vim.VirtualMachine(vm.vmId, source._si._stub)
    _wait_task(obj.CreateSnapshot_Task(name=f"{SNAPSHOT_PREFIX}dead", memory=False, quiesce=False))
    with source.open_run(vm, run_id="next") as run:
        assert _snapshots(source, vm.vmId) == [f"{SNAPSHOT_PREFIX}next"]
        assert any("left by an earlier run" in w for w in run.warnings)
    assert _snapshots(source, vm.vmId) == []


def test_cbt_unavailable_falls_back_to_hashing(source, vcsim, tmp_path):
    _put_flat_vmdk(vcsim, "DC0_C0_RP0_VM0", tmp_path)
    vm = _vm(source, "DC0_C0_RP0_VM0")
    obj = vim.VirtualMachine(vm.vmId, source._si._stub)
    _wait_task(obj.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    with source.open_run(vm) as run:
        record = run.record()
    assert record["changeTracking"] == "hash"
    assert "does not offer QueryChangedDiskAreas" in record["disks"][0]["changeReason"]


def _replace_disk(vcsim, vm_name) -> Path:
    folder = vcsim.datastore / vm_name
    for f in folder.glob("*.vmdk"):
        f.unlink()
    return folder


def test_sparse_disk_is_read_through_http(source, vcsim, tmp_path):
    raw = tmp_path / "s.raw"
    raw.write_bytes(os.urandom(70000) + bytes(1 << 20) + os.urandom(3000))
    folder = _replace_disk(vcsim, "DC0_H0_VM0")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", raw, folder / "disk1.vmdk")   # monolithicSparse
    vm = _vm(source, "DC0_H0_VM0")
    with source.open_run(vm) as run:
        d = run.disks[0].disk
        assert d.info.create_type == "monolithicSparse"
        assert d.read(0, d.size) == qemu_raw_bytes(folder / "disk1.vmdk", tmp_path)
    assert _snapshots(source, vm.vmId) == []


def test_delta_chain_is_read_through_http(source, vcsim, tmp_path):
    """A snapshot child (delta) over a sparse base, as the VM's disk: every file of the
    chain comes through the datastore file service, byte-exact against qemu-img."""
    folder = _replace_disk(vcsim, "DC0_H0_VM0")
    base_raw = tmp_path / "base.raw"
    base_raw.write_bytes(os.urandom(200_000) + bytes(900_000))
    qemu_img("convert", "-f", "raw", "-O", "vmdk", base_raw, folder / "disk1-base.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "disk1-base.vmdk", "-F", "vmdk",
             folder / "disk1.vmdk")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 131072 65536",
                    str(folder / "disk1.vmdk")], check=True, capture_output=True)
    vm = _vm(source, "DC0_H0_VM0")
    with source.open_run(vm) as run:
        d = run.disks[0].disk
        got = d.read(0, d.size)
    expected = qemu_raw_bytes(folder / "disk1.vmdk", tmp_path)
    assert got == expected
    assert expected[131072:196608] == b"\x5a" * 65536          # the child's write
    assert expected[:131072] == base_raw.read_bytes()[:131072]   # the base below it
    assert _snapshots(source, vm.vmId) == []


def test_vm_moved_is_followed_by_uuid_or_fails_with_reason(source, vcsim, tmp_path):
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path)
    vm = _vm(source, "DC0_H0_VM0").to_dict()
    moved = dict(vm, vmId="vm-424242")          # the id it had before a cross-vCenter vMotion
    with source.open_run(moved) as run:
        assert run.vm._moId == vm["vmId"]
        assert any("was moved" in w and vm["vmId"] in w for w in run.warnings)
        # where it is now, for the catalog to follow
        assert run.moved_to == _vm(source, "DC0_H0_VM0").to_dict()
        assert run.record()["movedTo"]["vmId"] == vm["vmId"]
    with source.open_run(vm) as run:
        assert run.moved_to is None
    gone = dict(vm, vmId="vm-424242",
                identity={"instanceUuid": "00000000-0000-0000-0000-0000000000aa",
                          "biosUuid": "00000000-0000-0000-0000-0000000000bb"})
    with pytest.raises(VSphereError, match="no longer visible.*vMotion"):
        source.open_run(gone).__enter__()


def test_connector_follows_a_moved_vm_or_fails_the_run(vcsim, env_password, tmp_path):
    """Through the connector: a server whose VM is now under another id (a vMotion between
    runs) is found by its UUID, the run completes and the catalog adopts the new id; with
    no VM of that UUID visible the run fails with the reason."""
    from smsblock.service import FakeClock, SmsService
    from smsblock.service.connector import ConnectorLoop
    from smsblock.service.executor import RunExecutor
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path, size=1 << 20)
    svc = SmsService(tmp_path / "state", clock=FakeClock(time.time()))
    svc.register_connector("vsphere", VCenterSettings.from_options(vcsim.url, USER).to_config())
    svc.import_server_catalog()
    server = next(s for s in svc.get_servers()["serverList"]
                  if s["vmServer"]["vmName"] == "DC0_H0_VM0")
    real_id = server["vmServer"]["vmServerAddress"]["vmId"]
    job = svc.create_replication_job(serverId=server["serverId"],
                                     seedReplicationTime=svc.clock() + 10 * 86400,
                                     frequency=12)["replicationJobId"]
    ex = RunExecutor(svc.state, svc.clock, use_default_image_step=False)

    def run_with_record(**changes):
        with svc.state.transaction() as db:     # the catalog as it was before the move
            record = json.loads(db.execute("SELECT vm_record FROM servers WHERE server_id = ?",
                                           (server["serverId"],)).fetchone()[0])
            db.execute("UPDATE servers SET vm_id = ?, vm_record = ? WHERE server_id = ?",
                       ("vm-424242", json.dumps(dict(record, vmId="vm-424242", **changes)),
                        server["serverId"]))
        run = svc.start_on_demand_replication_run(replicationJobId=job)["replicationRunId"]
        with ConnectorLoop(svc, executor=ex) as loop:
            loop.run_once()
        svc.clock.advance(86400)
        return next(r for r in svc.get_replication_runs(replicationJobId=job)[
            "replicationRunList"] if r["replicationRunId"] == run)

    done = run_with_record()
    assert done["state"] == "COMPLETED", done
    [now] = [s for s in svc.get_servers()["serverList"] if s["serverId"] == server["serverId"]]
    assert now["vmServer"]["vmServerAddress"]["vmId"] == real_id
    assert now["vmServer"]["vmPath"] == "/Datacenters/DC0/vm/DC0_H0_VM0"
    failed = run_with_record(identity={"instanceUuid": "00000000-0000-0000-0000-0000000000aa"})
    assert failed["state"] == "FAILED"
    assert "no longer visible" in failed["statusMessage"] and "vMotion" in failed["statusMessage"]


def test_missing_privilege_is_named_before_snapshotting(source, vcsim, tmp_path, monkeypatch):
    """vcsim grants every privilege; a stand-in AuthorizationManager denies one."""
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path)
    vm = _vm(source, "DC0_H0_VM0")

    class Deny:
        def HasPrivilegeOnEntity(self, entity, session, privs):
            return [p != "VirtualMachine.State.RemoveSnapshot" for p in privs]
    content = source.content
    real = content.authorizationManager
    monkeypatch.setattr(type(content), "authorizationManager", property(lambda self: Deny()),
                        raising=False)
    try:
        with pytest.raises(VSphereError, match=r"lacks the privilege "
                                               r"VirtualMachine\.State\.RemoveSnapshot on vm-"):
            with source.open_run(vm):
                pass
    finally:
        monkeypatch.undo()
    assert source.content.authorizationManager == real
    assert _snapshots(source, vm.vmId) == []


def test_no_permission_fault_names_the_privilege():
    s = VCenterSettings("vc:443", "u", "pw")
    fault = vim.fault.NoPermission(privilegeId="Datastore.FileManagement")
    err = _translate(fault, s, "delete file")
    assert str(err) == ("vCenter https://vc:443: delete file: the account 'u' lacks the "
                        "privilege Datastore.FileManagement")
    assert "\n" not in str(err)


# --- connection errors ----------------------------------------------------------------------

def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and PASSWORD not in text
    return text


def test_wrong_password(vcsim, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    with pytest.raises(VSphereError) as err:
        VSphereSource(VCenterSettings.from_options(vcsim.url, USER))
    assert "wrong username or password" in _one_line(err)


def test_unreachable_port(env_password):
    port = _free_port()
    with pytest.raises(VSphereError) as err:
        VSphereSource(VCenterSettings.from_options(f"http://127.0.0.1:{port}", USER))
    assert f"127.0.0.1:{port}: unreachable" in _one_line(err)


def test_unresolvable_host(env_password):
    with pytest.raises(VSphereError) as err:
        VSphereSource(VCenterSettings.from_options("vc.invalid", USER, timeout=5))
    assert "does not resolve" in _one_line(err) or "unreachable" in _one_line(err)


def test_tls_certificate_checks(vcsim_tls, certs, env_password):
    port = vcsim_tls.port
    # a certificate from a CA the system does not know: refused, with the way out named
    with pytest.raises(VSphereError) as err:
        VSphereSource(VCenterSettings.from_options(f"127.0.0.1:{port}", USER))
    assert "certificate verification failed" in _one_line(err)
    assert "--ca-bundle" in str(err.value)
    # the CA bundle makes it trusted
    with VSphereSource(VCenterSettings.from_options(f"127.0.0.1:{port}", USER,
                                                    ca_bundle=str(certs["ca"]))) as src:
        assert src.list_vms()
    # a name the certificate does not carry: a hostname mismatch, which --insecure accepts
    with pytest.raises(VSphereError) as err:
        VSphereSource(VCenterSettings.from_options(f"localhost:{port}", USER,
                                                   ca_bundle=str(certs["ca"])))
    assert "certificate verification failed" in _one_line(err)
    assert "--insecure ignores hostname mismatches" in str(err.value)
    with VSphereSource(VCenterSettings.from_options(f"localhost:{port}", USER,
                                                    ca_bundle=str(certs["ca"]),
                                                    insecure=True)) as src:
        assert src.list_vms()
    # --insecure still checks the chain: an unknown CA stays refused
    with pytest.raises(VSphereError) as err:
        VSphereSource(VCenterSettings.from_options(f"localhost:{port}", USER, insecure=True))
    assert "certificate verification failed" in _one_line(err)
    # http spoken to a TLS port
    with pytest.raises(VSphereError) as err:
        VSphereSource(VCenterSettings.from_options(f"http://127.0.0.1:{port}", USER, timeout=5))
    assert "does not answer as a vSphere API endpoint" in _one_line(err)


def test_tls_to_http_port(vcsim, env_password):
    with pytest.raises(VSphereError) as err:
        VSphereSource(VCenterSettings.from_options(f"https://127.0.0.1:{vcsim.port}", USER,
                                                   timeout=5))
    assert "TLS handshake failed" in _one_line(err)


def test_expired_certificate_needs_insecure(tmp_path, certs, env_password):
    sim = Vcsim(tmp_path / "ds", tls=(certs["expired"], certs["expired-key"]))
    try:
        with pytest.raises(VSphereError) as err:
            VSphereSource(VCenterSettings.from_options(f"127.0.0.1:{sim.port}", USER,
                                                       ca_bundle=str(certs["ca"])))
        assert "expired" in _one_line(err)
        with VSphereSource(VCenterSettings.from_options(f"127.0.0.1:{sim.port}", USER,
                                                        ca_bundle=str(certs["ca"]),
                                                        insecure=True)) as src:
            assert src.list_vms()
    finally:
        sim.stop()


def test_tls_run_reads_disk_over_https(vcsim_tls, certs, env_password, tmp_path):
    desc = _put_flat_vmdk(vcsim_tls, "DC0_H0_VM1", tmp_path, size=1 << 20, seed=9)
    expected = qemu_raw_bytes(desc, tmp_path)
    with VSphereSource(VCenterSettings.from_options(f"localhost:{vcsim_tls.port}", USER,
                                                    ca_bundle=str(certs["ca"]),
                                                    insecure=True)) as src:
        with src.open_run(_vm(src, "DC0_H0_VM1")) as run:
            assert run.disks[0].disk.read(0, 1 << 20) == expected


# --- the CBT overlay, against its plain meaning ------------------------------------------------

@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), max_size=6),
       st.integers(0, 47), st.integers(0, 48))
def test_area_overlay_matches_its_meaning(tmp_path, areas, off, n):
    unit = 512
    size = 48 * unit
    top_bytes = bytes(np.random.default_rng(1).integers(1, 256, size, dtype=np.uint8))
    (tmp_path / "top").write_bytes(top_bytes)
    byte_areas = [(s * unit, k * unit) for s, k in areas]
    expected = bytearray(size)
    inside = np.zeros(size, bool)
    for s, k in byte_areas:
        e = min(s + k, size)
        expected[s:e] = top_bytes[s:e]
        inside[s:e] = True
    with RawDisk(tmp_path / "top") as top:
        d = AreaOverlayDisk(top, byte_areas)
        off, n = off * unit, n * unit
        assert d.read(off, n) == bytes(expected[off:off + n])
        ext = list(d.extents())
        covered = np.zeros(size, bool)
        for e in ext:
            covered[e.offset:e.end] = True
        assert ext == sorted(ext, key=lambda e: e.offset)
        assert (covered == inside).all()


def test_two_disks_in_boot_order_from_stored_config(vcsim, env_password, tmp_path):
    """A second disk on a SATA controller comes after the SCSI boot disk; the source is
    reopened from its secret-free config, as a connector does."""
    settings = VCenterSettings.from_options(vcsim.url, USER)
    assert PASSWORD not in json.dumps(settings.to_config())
    with VSphereSource.from_config(settings.to_config()) as src:
        assert src.config() == settings.to_config()
        vm = _vm(src, "DC0_C0_RP0_VM0")
        obj = vim.VirtualMachine(vm.vmId, src._si._stub)
        sata = vim.vm.device.VirtualAHCIController(key=-10, busNumber=0)
        disk = vim.vm.device.VirtualDisk(
            key=-11, controllerKey=-10, unitNumber=0, capacityInKB=1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName="[LocalDS_0] DC0_C0_RP0_VM0/data.vmdk", diskMode="persistent"))
        spec = vim.vm.ConfigSpec(deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="add", device=sata),
            vim.vm.device.VirtualDeviceSpec(operation="add", device=disk, fileOperation="create")])
        _wait_task(obj.ReconfigVM_Task(spec))
        boot = _put_flat_vmdk(vcsim, "DC0_C0_RP0_VM0", tmp_path, size=1 << 20, seed=3)
        folder = boot.parent
        raw = tmp_path / "data.raw"
        raw.write_bytes(os.urandom(4096) + bytes(2 << 20))
        for name in ("data.vmdk", "data-flat.vmdk"):
            (folder / name).unlink(missing_ok=True)
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                 raw, folder / "data.vmdk")
        with src.open_run(vm) as run:
            assert [d.location for d in run.disks] == ["[LocalDS_0] DC0_C0_RP0_VM0/disk1.vmdk",
                                                       "[LocalDS_0] DC0_C0_RP0_VM0/data.vmdk"]
            assert run.disks[0].disk.read(0, 1 << 20) == qemu_raw_bytes(boot, tmp_path)
            assert run.disks[1].disk.read(0, raw.stat().st_size) == raw.read_bytes()


def test_boot_order_of_disks():
    from smsblock.source.vsphere import _boot_order
    dev = vim.vm.device
    scsi = dev.ParaVirtualSCSIController(key=1000, busNumber=0)
    ide = dev.VirtualIDEController(key=200, busNumber=0)
    sata = dev.VirtualAHCIController(key=15000, busNumber=0)
    ide_disk = dev.VirtualDisk(key=3000, controllerKey=200, unitNumber=0)
    scsi1 = dev.VirtualDisk(key=2001, controllerKey=1000, unitNumber=1)
    scsi0 = dev.VirtualDisk(key=2000, controllerKey=1000, unitNumber=0)
    sata0 = dev.VirtualDisk(key=16000, controllerKey=15000, unitNumber=0)
    devices = [ide, ide_disk, sata0, scsi, scsi1, sata, scsi0]
    assert [d.key for d in _boot_order(devices, None)] == [2000, 2001, 16000, 3000]
    boot = vim.vm.BootOptions(bootOrder=[vim.vm.BootOptions.BootableDiskDevice(deviceKey=3000)])
    assert [d.key for d in _boot_order(devices, boot)] == [3000, 2000, 2001, 16000]


def test_cbt_changed_areas_become_the_change_list_for_the_engine(source, vcsim, tmp_path, monkeypatch):
    """vcsim has no QueryChangedDiskAreas: a stand-in answers it, the rest is the real path
    (snapshot, HTTP disk, allocated-area overlay, change list for the engine, record)."""
    from smsblock.source import vsphere as mod
    desc = _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path, size=1 << 20, seed=11)
    current = qemu_raw_bytes(desc, tmp_path)
    vm = _vm(source, "DC0_H0_VM0")
    obj = vim.VirtualMachine(vm.vmId, source._si._stub)
    _wait_task(obj.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    asked = []
    answers = {"*": [(0, 65536), (5000, 100)], "52 aa/7": [(131072, 4096)]}

    def fake_areas(self, key, since, size):
        asked.append(since)
        return answers[since]
    original = mod.VSphereRun._snapshot_disks

    def with_change_ids(self):      # vcsim's disk backings carry no changeId
        out = original(self)
        for b in out:
            b.change_id = "52 aa/8" if asked else "52 aa/7"
        return out
    monkeypatch.setattr(mod.VSphereRun, "_changed_areas", fake_areas)
    monkeypatch.setattr(mod.VSphereRun, "_snapshot_disks", with_change_ids)
    try:
        # first run: allocated areas only; outside them the disk reads as zeros
        with source.open_run(vm) as run:
            d = run.disks[0].disk
            assert [(e.offset, e.length) for e in d.extents()] == [(0, 65536)]
            assert d.read(0, 65536) == current[:65536]
            assert d.read(65536, 100) == bytes(100)
            assert run.disks[0].changed_extents is None     # nothing to carry over from
            first = run.record()
        assert first["changeTracking"] == "cbt" and first["disks"][0]["changeId"] == "52 aa/7"
        # second run: the changed areas go to the engine as a list; the disk is the
        # snapshot's whole disk (the engine reads only the listed areas of it)
        base_file = tmp_path / "previous.raw"
        base_bytes = bytes(np.random.default_rng(4).integers(0, 256, len(current), dtype=np.uint8))
        base_file.write_bytes(base_bytes)
        with RawDisk(base_file) as base:
            with source.open_run(vm, previous=first,
                                 previous_disks={first["disks"][0]["key"]: base}) as run:
                sd = run.disks[0]
                assert sd.changed_extents == [(131072, 4096)]
                assert not isinstance(sd.disk, AreaOverlayDisk)
                assert sd.disk.read(0, sd.disk.size) == current
                second = run.record()
        assert asked == ["*", "52 aa/7"]
        assert second["disks"][0]["changeReason"] == "changed areas since changeId 52 aa/7"
        assert second["disks"][0]["changeId"] == "52 aa/8"
        # a list of the wrong shape (unsorted, past the end, empty area) is refused
        # naming the disk and the change id, and the snapshot is removed
        for bad, why in (([(131072, 4096), (0, 512)], "sorted"),
                         ([(len(current) - 512, 1024)], "past the end"),
                         ([(0, 0)], "at least 1"), ([(0, "x")], "extent 0")):
            answers["52 aa/7"] = bad
            with RawDisk(base_file) as base:
                with pytest.raises(VSphereError) as ei:
                    with source.open_run(vm, previous=first,
                                         previous_disks={first["disks"][0]["key"]: base}):
                        pass
            msg = str(ei.value)
            assert "disk1.vmdk: QueryChangedDiskAreas since changeId '52 aa/7' gave an " \
                "unusable change list" in msg and why in msg and "\n" not in msg, msg
            assert not [n for n in _snapshots(source, vm.vmId) if n.startswith(SNAPSHOT_PREFIX)]
        answers["52 aa/7"] = [(131072, 4096)]
        # a disk grown since the previous run: its allocated areas, not a failed run
        base_file.write_bytes(base_bytes[:len(current) // 2])
        with RawDisk(base_file) as base:
            with source.open_run(vm, previous=second,
                                 previous_disks={first["disks"][0]["key"]: base}) as run:
                d = run.disks[0].disk
                assert d.read(0, 65536) == current[:65536]
                assert run.disks[0].changed_extents is None
                third = run.record()
        assert asked[-1] == "*" and third["changeTracking"] == "cbt"
        assert "size changed" in third["disks"][0]["changeReason"]
    finally:
        monkeypatch.undo()
        _wait_task(obj.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))


def test_cbt_incremental_run_through_the_connector(vcsim, env_password, tmp_path):
    """Runs of a job on a VM with CBT on, through the executor.  The second gets the first
    run's change id, hands replicate the changed areas, reads only the blocks they touch
    over HTTP (counted at the Range requests), and restores byte-exact to the disk a full
    read sees.  A change list of the wrong shape fails the run with a clear message and
    stores nothing.  QueryChangedDiskAreas is a stand-in (vcsim lacks it)."""
    from smsblock.engine import replicate as engine_replicate, restore
    from smsblock.manifest import DEFAULT_BLOCK_SIZE as BS
    from smsblock.service import FakeClock, SmsService
    from smsblock.service.connector import ConnectorLoop
    from smsblock.service.executor import RunExecutor
    from smsblock.source import datastore_http as dh, vsphere as mod
    from smsblock.store import open_store
    size = 8 * BS
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(size))
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path, image=raw)
    flat = vcsim.datastore / "DC0_H0_VM0" / "disk1-flat.vmdk"
    svc = SmsService(tmp_path / "state", clock=FakeClock(time.time()))
    svc.register_connector("vsphere", VCenterSettings.from_options(vcsim.url, USER).to_config())
    svc.import_server_catalog()
    server = next(s for s in svc.get_servers()["serverList"]
                  if s["vmServer"]["vmName"] == "DC0_H0_VM0")
    vm_id = server["vmServer"]["vmServerAddress"]["vmId"]
    with VSphereSource(VCenterSettings.from_options(vcsim.url, USER)) as admin:
        obj = vim.VirtualMachine(vm_id, admin._si._stub)
        _wait_task(obj.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    asked, reported, lists, ranged = [], [], [], []

    def fake_areas(self, key, since, size):
        asked.append((since, sorted(self.previous_disks)))
        return [(0, size)] if since == "*" else reported[-1]
    original = mod.VSphereRun._snapshot_disks

    def with_change_ids(self):      # vcsim's disk backings carry no changeId
        out = original(self)
        for b in out:
            b.change_id = f"52 bb/{len(asked)}"
        return out
    real_request = dh.DatastoreFile._request_once

    def counted(self, method, headers, stream):     # the bytes asked of the -flat file
        rng = (headers or {}).get("Range")
        if rng and self.path.endswith("-flat.vmdk"):
            first, last = map(int, rng.removeprefix("bytes=").split("-"))
            ranged.append(last - first + 1)
        return real_request(self, method, headers, stream)

    def spy(*args, **kw):
        lists.append(kw.get("changed_extents"))
        return engine_replicate(*args, **kw)
    job = svc.create_replication_job(serverId=server["serverId"],
                                     seedReplicationTime=svc.clock() + 10 * 86400,
                                     frequency=12)["replicationJobId"]
    ex = RunExecutor(svc.state, svc.clock, use_default_image_step=False, replicate=spy)
    store = svc.state.dir / "store"

    def one_run():
        svc.clock.advance(86400)
        ranged.clear()
        svc.start_on_demand_replication_run(replicationJobId=job)
        with ConnectorLoop(svc, executor=ex) as loop:
            loop.run_once()
        return svc.get_replication_runs(replicationJobId=job)["replicationRunList"][0]

    patch = pytest.MonkeyPatch()
    try:
        patch.setattr(mod.VSphereRun, "_changed_areas", fake_areas)
        patch.setattr(mod.VSphereRun, "_snapshot_disks", with_change_ids)
        patch.setattr(dh.DatastoreFile, "_request_once", counted)
        first = one_run()
        assert first["state"] == "COMPLETED" and sum(ranged) == size
        # two changes in blocks 0 and 5, both reported: only those two blocks are read
        with open(flat, "r+b") as f:
            f.seek(65536)
            f.write(b"\x11" * 4096)
            f.seek(5 * BS + 100)
            f.write(b"\x22" * 4096)
        reported.append([(65536, 4096), (5 * BS + 100, 4096)])
        second = one_run()
        assert second["state"] == "COMPLETED", second
        assert 8192 <= sum(ranged) <= 2 * BS
        # a list vCenter should never give (overlapping): refused before anything is read
        reported.append([(0, 8192), (4096, 100)])
        with open_store(store) as st_:
            latest = st_.latest_run_id(server["serverId"])
        third = one_run()
        assert sum(ranged) == 0
        with open_store(store) as st_:
            assert st_.latest_run_id(server["serverId"]) == latest
    finally:
        patch.undo()
        with VSphereSource(VCenterSettings.from_options(vcsim.url, USER)) as admin:
            obj = vim.VirtualMachine(vm_id, admin._si._stub)
            _wait_task(obj.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    # the second run asked since the first run's change id, with that run's disk at hand
    assert [a[0] for a in asked] == ["*", "52 bb/0", "52 bb/1"]
    assert asked[0][1] == [] and len(asked[1][1]) == 1
    assert lists == [None, [(65536, 4096), (5 * BS + 100, 4096)]]
    assert all("changed block tracking" in r["statusMessage"] for r in (first, second))
    assert third["state"] == "FAILED"
    msg = third["statusMessage"]
    assert "\n" not in msg and "QueryChangedDiskAreas since changeId '52 bb/1'" in msg, msg
    assert "unusable change list" in msg and "extent 1" in msg, msg
    # what the CBT run stored restores to exactly what a full read of the disk gives
    out = tmp_path / "restored.raw"
    restore(open_store(store), server["serverId"], out)
    assert out.read_bytes() == flat.read_bytes()


def test_datastore_endpoint_repr_hides_the_session_cookie():
    from smsblock.source.datastore_http import DatastoreEndpoint
    ep = DatastoreEndpoint("https://vc:443", "DC0", "ds1", "vmware_soap_session=SECRET")
    assert "SECRET" not in repr(ep) and "SECRET" not in str(ep)
    assert ep.url("vm 1/disk.vmdk") == \
        "https://vc:443/folder/vm%201/disk.vmdk?dcPath=DC0&dsName=ds1"


def test_failed_cleanup_does_not_hide_the_run_error(source, vcsim, tmp_path, monkeypatch):
    from smsblock.source import vsphere as mod
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path)
    vm = _vm(source, "DC0_H0_VM0")

    def refuse(self, snap):
        raise VSphereError("snapshot snapshot-1 is still there")
    original = mod.VSphereRun._remove_snapshot
    monkeypatch.setattr(mod.VSphereRun, "_remove_snapshot", refuse)
    with pytest.raises(RuntimeError, match="engine failed") as err:
        with source.open_run(vm) as run:
            raise RuntimeError("engine failed")
    assert "still there" in " ".join(getattr(err.value, "__notes__", []))
    # a leftover that cannot be removed fails the next run before it snapshots again
    with pytest.raises(VSphereError, match="still there"):
        with source.open_run(vm) as run:
            pass
    assert len(_snapshots(source, vm.vmId)) == 1
    monkeypatch.setattr(mod.VSphereRun, "_remove_snapshot", original)
    # once removal works, the next run cleans the leftover up before taking its own snapshot
    with source.open_run(vm) as run:
        assert sum("left by an earlier run" in w for w in run.warnings) == 1
        assert len(_snapshots(source, vm.vmId)) == 1
    assert _snapshots(source, vm.vmId) == []


def test_vm_path_follows_folders(source):
    vm = _vm(source, "DC0_H0_VM1")
    obj = vim.VirtualMachine(vm.vmId, source._si._stub)
    dc = source.content.rootFolder.childEntity[0]
    prod = dc.vmFolder.CreateFolder("Prod")
    web = prod.CreateFolder("Web tier")
    _wait_task(web.MoveIntoFolder_Task([obj]))
    moved = _vm(source, "DC0_H0_VM1")
    assert moved.vmId == vm.vmId
    assert moved.vmPath == "/Datacenters/DC0/vm/Prod/Web tier/DC0_H0_VM1"


def test_cli_options(tmp_path):
    from smsblock.cli import build_parser
    from smsblock.source.vsphere import settings_from_args

    def parse(*args):
        return build_parser().parse_args(["connector", "register", *args])
    pw = tmp_path / "pw"
    pw.write_text("pw-from-file\n")
    s = settings_from_args(parse("--vcenter", "vc:8443", "--username", "svc",
                                 "--password-file", str(pw), "--insecure"), environ={})
    assert (s.endpoint, s.username, s.password, s.insecure) == (
        ("https", "vc", 8443, "/sdk"), "svc", "pw-from-file", True)
    assert settings_from_args(parse(), environ={}) is None
    with pytest.raises(UsageError, match="--username is only valid with --vcenter"):
        settings_from_args(parse("--username", "svc"), environ={})
    s = settings_from_args(parse("--vcenter", "vc", "--username", "svc"),
                           environ={PASSWORD_ENV: "pw-from-env"})
    assert s.password == "pw-from-env"


def test_faults_become_one_line():
    s = VCenterSettings("vc:443", "u", "pw")
    err = _translate(vim.fault.InvalidPowerState(requestedState="poweredOff",
                                                 existingState="poweredOn"), s, "mark as template")
    assert str(err) == ("vCenter https://vc:443: mark as template failed: "
                        "vim.fault.InvalidPowerState: "
                        "no message")
    err = _translate(ValueError("a\nb  c"), s, "x")
    assert str(err) == "vCenter https://vc:443: x failed: ValueError: a b c"


# --- end to end through the control plane: tests/test_service_vsphere.py -------------------

def test_expired_session_is_renewed(vcsim, env_password, tmp_path):
    """A session that ends mid-run (vCenter's idle timeout) is renewed: the snapshot is
    still removed and the catalog still lists."""
    _put_flat_vmdk(vcsim, "DC0_H0_VM0", tmp_path)
    with VSphereSource(VCenterSettings.from_options(vcsim.url, USER)) as src:
        vm = _vm(src, "DC0_H0_VM0")
        with src.open_run(vm) as run:
            src.content.sessionManager.Logout()
            with pytest.raises(vim.fault.NotAuthenticated):
                src.content.sessionManager.currentSession.key
            assert run.disks[0].disk.read(0, 10)
        with VSphereSource(VCenterSettings.from_options(vcsim.url, USER)) as other:
            assert _snapshots(other, vm.vmId) == []
        src.content.sessionManager.Logout()
        assert _vm(src, "DC0_H0_VM0").vmId == vm.vmId


# --- the datastore file client against a scripted HTTP server ---------------------------------

class _Scripted:
    """A local HTTP server answering /folder requests as the test says (status per call)."""

    def __init__(self, data: bytes):
        import http.server
        import threading
        self.data, self.script, self.seen = data, [], []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, body: bool):
                outer.seen.append((self.command, self.headers.get("Range"),
                                   self.headers.get("Cookie")))
                status = outer.script.pop(0) if outer.script else "ok"
                if status == "ok" or status == "no-range":
                    rng = self.headers.get("Range")
                    if rng and status == "ok":
                        a, b = map(int, rng.split("=")[1].split("-"))
                        payload, code = outer.data[a:b + 1], 206
                    else:
                        payload, code = outer.data, 200
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if body:
                        self.wfile.write(payload)
                    return
                self.send_response(int(status))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    srv = _Scripted(bytes(range(256)) * 64)
    yield srv
    srv.close()


def _file(srv, relogin=None):
    from smsblock.source import datastore_http as dh
    ep = dh.DatastoreEndpoint(srv.url, "DC0", "ds1", "vmware_soap_session=one", timeout=5)
    return dh.DatastoreFile(ep, "vm/disk-flat.vmdk", relogin=relogin)


def test_datastore_file_ranges_and_errors(scripted, monkeypatch):
    from smsblock.source import datastore_http as dh
    monkeypatch.setattr(dh, "RETRY_PAUSE", 0.01)
    f = _file(scripted)
    assert f.size == 16384 and f.pread(10, 250) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    assert scripted.seen[-1] == ("GET", "bytes=250-259", "vmware_soap_session=one")
    scripted.script = ["403"]
    with pytest.raises(VSphereError, match="privilege Datastore.Browse on datastore ds1"):
        f.pread(10, 0)
    scripted.script = ["no-range"]
    with pytest.raises(VSphereError, match="ignored the Range request"):
        f.pread(10, 0)
    scripted.script = ["503", "502"]          # transient: retried
    assert f.pread(4, 0) == bytes([0, 1, 2, 3])
    scripted.script = ["500"] * (dh.RETRIES + 1)
    with pytest.raises(VSphereError, match="HTTP 500"):
        f.pread(4, 0)
    scripted.script = ["401"]                 # no way to log in again: a clear error
    with pytest.raises(VSphereError, match="refused the session"):
        f.pread(4, 0)
    f.close()


def test_datastore_file_logs_in_again_after_401(scripted):
    calls = []

    def relogin():
        calls.append(1)
        return "vmware_soap_session=two"
    f = _file(scripted, relogin)
    scripted.script = ["401"]
    assert f.pread(3, 1) == bytes([1, 2, 3])
    assert calls == [1]
    assert [c for _, _, c in scripted.seen[-2:]] == ["vmware_soap_session=one",
                                                     "vmware_soap_session=two"]
    f.close()
