"""Datastore folder source: .vmx parsing, disks and CD-ROMs, vmPath, snapshots of disks.

Also holds the helpers the other service tests import (``make_vm``, ``make_datastore``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import qemu_img
from smsblock.errors import ConnectorError
from smsblock.service.sources import (DatastoreSource, open_source, parse_vmx,
                                      register_source_kind, vmx_disks)


def make_vm(root: Path, rel_folder: str, name: str, *, disks=(("scsi0:0", 1 << 20),),
            fmt: str = "vmdk", extra: str = "", data: bytes | None = None,
            image: Path | None = None) -> Path:
    """A VM folder with a .vmx and real disks made by qemu-img (``data`` written at 0, or
    the first disk converted from the raw ``image``)."""
    folder = root / rel_folder
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['.encoding = "UTF-8"', f'displayName = "{name}"', 'guestOS = "ubuntu-64"',
             'uuid.bios = "56 4d 00 11 22 33 44 55-66 77 88 99 aa bb cc dd"']
    for i, (dev, size) in enumerate(disks):
        fname = f"{folder.name}{'' if i == 0 else f'_{i}'}.{'vmdk' if fmt == 'vmdk' else 'img'}"
        path = folder / fname
        if image is not None and i == 0:
            qemu_img("convert", "-f", "raw", "-O", fmt, image, path)
        elif data is not None and i == 0:
            raw = folder / f".{fname}.raw"
            raw.write_bytes(data + b"\0" * (size - len(data)))
            qemu_img("convert", "-f", "raw", "-O", fmt, raw, path)
            raw.unlink()
        else:
            qemu_img("create", "-q", "-f", fmt, path, str(size))
        lines += [f'{dev}.present = "TRUE"', f'{dev}.fileName = "{fname}"']
    vmx = folder / f"{folder.name}.vmx"
    vmx.write_text("\n".join(lines) + "\n" + extra)
    return vmx


def bootable_image(base: Path) -> Path:
    """A 12 MiB raw disk the image step accepts: MBR, GRUB boot code, ext4 with Ubuntu 14.04."""
    from image_builders import (GRUB2_BOOT_IMG, MiB, fake_root, mkfs_ext, partition_disk,
                                place, write_boot_code)
    disk = base / "bootable.img"
    if disk.exists():
        return disk
    base.mkdir(parents=True, exist_ok=True)
    partition_disk(disk, 12 * MiB, "label: dos\nstart=2048, size=20480, type=83, bootable\n")
    place(disk, 2048 * 512, mkfs_ext(base / "root.img", "ext4", 10 * MiB, label="root",
                                     root=fake_root(base, "ubuntu-14.04")))
    write_boot_code(disk, GRUB2_BOOT_IMG.read_bytes())
    (base / "root.img").unlink()
    return disk


def make_datastore(root: Path, n: int = 2) -> Path:
    """``n`` small VMs under DC1/prod (and one at the datastore root when n > 2)."""
    for i in range(n):
        folder = f"DC1/prod/vm{i}" if i < 2 else f"vm{i}"
        make_vm(root, folder, f"vm {i}")
    return root


def test_vmx_parsing_lowercases_keys_and_decodes_escapes(tmp_path):
    p = tmp_path / "a.vmx"
    p.write_text('.encoding = "UTF-8"\n# comment\nDisplayName = "a|22b|7Cc"\n\nguestOS = "windows9-64"\n')
    assert parse_vmx(p) == {"displayname": 'a"b|c', "guestos": "windows9-64"}


@pytest.mark.parametrize("text,where", [("garbage line\n", "line 1"),
                                        ('ok = "1"\nkey = unquoted\n', "line 2")])
def test_vmx_malformed_lines_name_the_line(tmp_path, text, where):
    p = tmp_path / "bad.vmx"
    p.write_text(text)
    with pytest.raises(ConnectorError, match=where):
        parse_vmx(p)


def test_vmx_binary_or_huge_file_refused(tmp_path):
    p = tmp_path / "bin.vmx"
    p.write_bytes(b"a\0b")
    with pytest.raises(ConnectorError, match="binary"):
        parse_vmx(p)
    p.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConnectorError, match="larger than"):
        parse_vmx(p)


def test_vmx_disks_order_skip_absent_and_warn_about_connected_cdroms():
    vmx = {
        "ide0:0.filename": "ide.vmdk",
        "scsi1:0.filename": "s10.vmdk",
        "scsi0:1.filename": "s01.vmdk",
        "scsi0:0.filename": "s00.vmdk",
        "nvme0:0.filename": "nv.vmdk",
        "sata0:2.filename": "sata.vmdk",
        "scsi0:3.filename": "gone.vmdk", "scsi0:3.present": "FALSE",
        "ide1:0.filename": "/isos/ubuntu.iso", "ide1:0.devicetype": "cdrom-image",
        "sata0:1.filename": "auto detect", "sata0:1.devicetype": "cdrom-raw",
        "ide1:1.filename": "x.iso", "ide1:1.devicetype": "cdrom-image",
        "ide1:1.startconnected": "FALSE",
    }
    disks, warnings = vmx_disks(vmx)
    assert [f for _, f in disks] == ["s00.vmdk", "s01.vmdk", "s10.vmdk", "sata.vmdk", "nv.vmdk",
                                     "ide.vmdk"]
    assert disks[0][0] == "scsi0:0"
    assert len(warnings) == 1 and "ide1:0" in warnings[0] and "disconnect" in warnings[0]


def test_datastore_lists_vms_with_vmpath_from_folders(tmp_path):
    make_vm(tmp_path, "DC1/prod/web/web", "web 01", extra='ide1:0.deviceType = "cdrom-image"\n'
                                                         'ide1:0.fileName = "/iso/a.iso"\n')
    make_vm(tmp_path, "DC2/db", "db")
    make_vm(tmp_path, "standalone", "lonely")
    src = DatastoreSource(tmp_path)
    assert all(hasattr(src, a) for a in ("manager_type", "manager_name", "manager_id",
                                            "list_vms", "open_run", "close"))
    vms = {v.vmName: v for v in src.list_vms()}
    assert set(vms) == {"web 01", "db", "lonely"}
    assert vms["web 01"].vmPath == "/Datacenters/DC1/vm/prod/web/web 01"
    assert vms["web 01"].vmId == "DC1/prod/web/web/web.vmx"
    assert vms["db"].vmPath == "/Datacenters/DC2/vm/db"
    assert vms["lonely"].vmPath == "/Datacenters/ha-datacenter/vm/lonely"
    assert vms["web 01"].identity["guestOS"] == "ubuntu-64"
    assert vms["web 01"].identity["biosUuid"].startswith("56 4d")
    assert any("CD-ROM" in w for w in vms["web 01"].warnings)
    assert vms["db"].vmManagerType == "VSPHERE" and vms["db"].vmManagerId == src.manager_id
    # the id of the datastore is stable
    assert DatastoreSource(tmp_path).manager_id == src.manager_id


def test_open_run_gives_the_disks_boot_first_and_closes_them(tmp_path):
    data = b"boot sector!" * 100
    make_vm(tmp_path, "DC1/a", "a", disks=(("scsi0:1", 2 << 20), ("scsi0:0", 1 << 20)), data=data)
    src = open_source("datastore", {"path": str(tmp_path)})
    (vm,) = src.list_vms()
    with src.open_run(vm.to_dict()) as run:
        assert [d.key for d in run.disks] == ["scsi0:0", "scsi0:1"]
        # the boot disk is scsi0:0 (the second file made, 1 MiB); data went to the first
        assert run.disks[0].disk.size == 1 << 20
        assert run.disks[1].disk.read(0, len(data)) == data
        assert run.disks[0].disk.info.format == "vmdk"
        rec = run.record()
        assert rec["disks"][0]["changeMethod"] == "hash"
    assert run.disks == []


def test_open_run_refuses_disks_outside_the_datastore_and_missing_files(tmp_path):
    ds = tmp_path / "ds"
    vmx = make_vm(ds, "DC1/a", "a")
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"\0" * 4096)
    vmx.write_text(vmx.read_text().replace('fileName = "a.vmdk"', f'fileName = "{outside}"'))
    src = DatastoreSource(ds)
    with pytest.raises(ConnectorError, match="outside the datastore"):
        with src.open_run({"vmId": "DC1/a/a.vmx"}):
            pass
    vmx.write_text(vmx.read_text().replace(str(outside), "missing.vmdk"))
    with pytest.raises(ConnectorError, match="does not exist"):
        with src.open_run({"vmId": "DC1/a/a.vmx"}):
            pass
    with pytest.raises(ConnectorError, match="not a .vmx"):
        src.open_run({"vmId": "../../etc/passwd"})
    with pytest.raises(ConnectorError, match="gone"):
        src.open_run({"vmId": "DC1/b/b.vmx"})


def test_unknown_source_kind_and_bad_folder(tmp_path):
    with pytest.raises(ConnectorError, match="unknown connector source kind"):
        open_source("hyperv", {})
    with pytest.raises(ConnectorError, match="does not exist"):
        open_source("datastore", {"path": str(tmp_path / "nope")})
    with pytest.raises(ConnectorError, match="no path"):
        open_source("datastore", {})


def test_other_source_kinds_plug_in(tmp_path):
    calls = []

    def factory(config):
        calls.append(config)
        return DatastoreSource(config["root"])

    register_source_kind("test-kind", factory)
    src = open_source("test-kind", {"root": str(tmp_path)})
    assert calls == [{"root": str(tmp_path)}] and src.list_vms() == []


def test_reimport_follows_a_vm_moved_to_a_new_id_by_its_instance_uuid(tmp_path):
    """After a vMotion the manager lists the VM under a new id: it keeps its serverId (and
    so its job and replication window); a clone with a UUID of its own is a new server."""
    from smsblock.service import FakeClock, SmsService
    from smsblock.source import VmRecord

    listing: list[VmRecord] = []

    class Listed:
        manager_type, manager_name, manager_id = "VSPHERE", "vc", "vc-uuid"

        def __init__(self, config):
            pass

        def list_vms(self):
            return list(listing)

        def close(self):
            pass

    def vm(vm_id, path, uuid):
        return VmRecord(vmId=vm_id, vmName="web", vmPath=path, vmManagerName="vc",
                        vmManagerId="vc-uuid", vmManagerType="VSPHERE",
                        identity={"instanceUuid": uuid})
    register_source_kind("test-listed", Listed)
    svc = SmsService(tmp_path / "state", clock=FakeClock(1_800_000_000.0))
    svc.register_connector("test-listed", {})
    listing[:] = [vm("vm-10", "/Datacenters/DC/vm/web", "u-1")]
    svc.import_server_catalog()
    [before] = svc.get_servers()["serverList"]
    listing[:] = [vm("vm-77", "/Datacenters/DC2/vm/web", "u-1"),
                  vm("vm-78", "/Datacenters/DC2/vm/web", "u-2")]
    svc.import_server_catalog()
    after = {s["vmServer"]["vmServerAddress"]["vmId"]: s for s in svc.get_servers()["serverList"]}
    assert after["vm-77"]["serverId"] == before["serverId"]
    assert after["vm-77"]["vmServer"]["vmPath"] == "/Datacenters/DC2/vm/web"
    assert after["vm-78"]["serverId"] != before["serverId"]


# --- the datastore is untrusted: only regular files beneath the root, never blocking -----

def _within(seconds, fn, *args):
    """fn(*args) in a thread; fails (instead of hanging the suite) if it takes longer."""
    import threading
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:   # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} hangs"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _unblock(fifo: Path) -> None:
    import os
    try:   # a reader stuck in open() (old code) gets EOF and lets the thread go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_vmx_is_refused_without_hanging(tmp_path):
    import os
    make_vm(tmp_path, "DC1/good", "good")
    fifo = tmp_path / "DC1/pipe/pipe.vmx"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    try:
        with pytest.raises(ConnectorError, match="FIFO, not a regular file"):
            _within(5, parse_vmx, fifo)
        src = DatastoreSource(tmp_path)
        vms = _within(5, src.list_vms)
        assert [v.vmName for v in vms] == ["good"]
        assert [p["location"] for p in src.list_problems] == ["DC1/pipe/pipe.vmx"]
        assert "FIFO" in src.list_problems[0]["reason"]
    finally:
        _unblock(fifo)


def test_a_vmx_linked_to_a_secret_is_refused_without_quoting_it(tmp_path):
    ds = tmp_path / "ds"
    make_vm(ds, "DC1/good", "good")
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$TOPSECRETHASH:19000:0:99999:7:::\n")
    link = ds / "DC1/evil/evil.vmx"
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    with pytest.raises(ConnectorError) as e:
        parse_vmx(link)
    assert "symbolic link" in str(e.value) and "TOPSECRET" not in str(e.value)
    src = DatastoreSource(ds)
    assert [v.vmName for v in src.list_vms()] == ["good"]
    (problem,) = src.list_problems
    assert "symbolic link" in problem["reason"] and "TOPSECRET" not in problem["reason"]
    with pytest.raises(ConnectorError) as e:
        src.open_run({"vmId": "DC1/evil/evil.vmx"})
    assert "TOPSECRET" not in str(e.value)
    # the same content in a regular file (a hard link, a copy): the line is named, not quoted
    link.unlink()
    link.write_bytes(secret.read_bytes())
    with pytest.raises(ConnectorError, match="line 1") as e:
        parse_vmx(link)
    assert "TOPSECRET" not in str(e.value)


def test_a_vm_folder_behind_a_link_is_neither_listed_nor_opened(tmp_path):
    ds, outside = tmp_path / "ds", tmp_path / "outside"
    make_vm(outside, "DC1/hidden", "hidden")
    make_vm(ds, "DC1/good", "good")
    (ds / "DC2").symlink_to(outside / "DC1")
    src = DatastoreSource(ds)
    assert [v.vmName for v in src.list_vms()] == ["good"]
    with pytest.raises(ConnectorError, match="symbolic link"):
        src.open_run({"vmId": "DC2/hidden/hidden.vmx"})


def test_an_oversized_vmx_is_refused_without_reading_it(tmp_path):
    make_vm(tmp_path, "DC1/good", "good")
    huge = make_vm(tmp_path, "DC1/huge", "huge")
    with open(huge, "ab") as f:
        f.truncate(1 << 40)       # sparse: reading it whole would take long and all memory
    with pytest.raises(ConnectorError, match="larger than"):
        _within(5, parse_vmx, huge)
    src = DatastoreSource(tmp_path)
    assert [v.vmName for v in _within(5, src.list_vms)] == ["good"]
    assert "larger than" in src.list_problems[0]["reason"]


def test_disk_files_that_are_fifos_or_links_are_refused_without_hanging(tmp_path):
    import os
    ds = tmp_path / "ds"
    vmx = make_vm(ds, "DC1/a", "a")
    disk = vmx.parent / "a.vmdk"
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"SECRETDISK" * 100)
    src = DatastoreSource(ds)

    def open_run():
        with src.open_run({"vmId": "DC1/a/a.vmx"}):
            pass
    # the disk named in the .vmx is a FIFO
    disk.unlink()
    os.mkfifo(disk)
    try:
        with pytest.raises(ConnectorError, match="FIFO"):
            _within(5, open_run)
    finally:
        _unblock(disk)
    # ... a link to a file outside, or inside, the datastore
    disk.unlink()
    disk.symlink_to(secret)
    with pytest.raises(ConnectorError, match="symbolic link"):
        open_run()
    disk.unlink()
    qemu_img("create", "-q", "-f", "raw", vmx.parent / "real.img", "65536")
    disk.symlink_to("real.img")
    with pytest.raises(ConnectorError, match="symbolic link"):
        open_run()
    disk.unlink()
    (vmx.parent / "real.img").rename(disk)       # a raw disk: read through its checked file
    (vmx.parent / "a.vmdk").write_bytes(b"RAWDATA!" + bytes(65536 - 8))
    with src.open_run({"vmId": "DC1/a/a.vmx"}) as run:
        d = run.disks[0].disk
        assert d.info.format == "raw" and d.read(0, 8) == b"RAWDATA!" and d.size == 65536
        assert d.path == str(disk)
    # a flat VMDK whose extent (named by its descriptor) is a FIFO, then a link
    disk.unlink()
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", disk, "65536")
    flat = vmx.parent / "a-flat.vmdk"
    assert flat.is_file()
    with src.open_run({"vmId": "DC1/a/a.vmx"}) as run:     # as made: fine
        assert run.disks[0].disk.size == 65536
    flat.unlink()
    os.mkfifo(flat)
    try:
        with pytest.raises(ConnectorError, match="FIFO"):
            _within(5, open_run)
    finally:
        _unblock(flat)
    flat.unlink()
    flat.symlink_to(secret)
    with pytest.raises(ConnectorError, match="symbolic link") as e:
        open_run()
    assert "SECRETDISK" not in str(e.value)


def test_listing_stops_when_cancelled(tmp_path):
    from smsblock.errors import Cancelled
    from smsblock.progress import CancelToken
    make_datastore(tmp_path, 3)
    token = CancelToken()
    token.cancel("the server catalog was deleted")
    with pytest.raises(Cancelled, match="deleted"):
        DatastoreSource(tmp_path).list_vms(cancel=token)


def test_a_flat_extent_read_through_the_datastore_keeps_its_holes(tmp_path):
    """Files opened beneath the root still report their holes (SEEK_DATA): a sparse copy
    of a flat disk is read where it holds data only."""
    from smsblock.service.sources import open_datastore_disk

    vm = tmp_path / "vm"
    vm.mkdir()
    with open(vm / "d-flat.vmdk", "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 4096)
    (vm / "d.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                               'createType="vmfs"\n\nRW 131072 VMFS "d-flat.vmdk"\n\n'
                               'ddb.adapterType = "lsilogic"\n')
    with open_datastore_disk(tmp_path, "vm/d.vmdk") as disk:
        extents = list(disk.extents(0, disk.size))
        assert sum(e.length for e in extents) < 1 << 20, extents
        assert disk.read(1 << 20, 4096) == b"x" * 4096
