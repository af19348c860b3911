"""Files smsblock creates are private and never written, truncated or deleted through a
planted link; identifiers match whole; a --vcenter password is never echoed."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smsblock.cli import main
from smsblock.disk.writer import convert
from smsblock.engine import prune, replicate, restore, verify
from smsblock.errors import (ImageError, SmsBlockError, StoreError, UsageError)
from smsblock.fsutil import create_file, open_lock_file, open_subdir, remove_file
from smsblock.image.catalog import Catalog, check_image_id
from smsblock.manifest import Manifest
from smsblock.store import LocalStore, check_run_id, check_server_id, open_store

ROOT = Path(__file__).resolve().parent.parent
BS = 64 * 1024
VICTIM_BYTES = b"precious data that is not smsblock's\n"


@pytest.fixture(autouse=True)
def loose_umask():
    """A permissive umask: private modes must come from smsblock, not from the umask."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def make_disk(path, seed: int, blocks: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 16, blocks * BS, dtype=np.uint8).tobytes()
    Path(path).write_bytes(data)
    return Path(path)


def victim_dir(tmp_path, names=("a.manifest", "b.pack", "c.tmp", "0123-x.pack.tmp"),
               folder="victim") -> Path:
    """A folder that is not smsblock's, with files named like smsblock's."""
    d = tmp_path / folder
    d.mkdir()
    for n in names:
        (d / n).write_bytes(VICTIM_BYTES)
    return d


def snapshot(d: Path) -> dict:
    """Every file under d with its bytes and mode (to prove nothing changed)."""
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(d))] = (stat.S_IMODE(st.st_mode),
                                      p.read_bytes() if p.is_file() and not p.is_symlink() else None)
    return out


def swap_for_link(path: Path, target: Path) -> None:
    """Replace the folder or file at ``path`` by a link to ``target``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)     # removes links inside, never what they point to
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def store_with_runs(tmp_path, runs: int = 2) -> tuple[Path, Path]:
    store = tmp_path / "store"
    disk = tmp_path / "disk.raw"
    for i in range(runs):
        make_disk(disk, i + 1)
        replicate(disk, store, "web", block_size=BS)
    return store, disk


def assert_modes_private(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert not p.is_symlink(), p
        want = 0o700 if p.is_dir() else 0o600
        assert mode == want, f"{p}: mode {oct(mode)}, want {oct(want)}"


# --- private modes -----------------------------------------------------------------

def test_store_files_and_folders_are_owner_only(tmp_path):
    store, disk = store_with_runs(tmp_path)
    leftover = LocalStore(store).staging_path(".pack.tmp")
    os.close(create_file(leftover))         # what a killed run leaves
    assert_modes_private(store)
    assert prune(store, "web", keep=1).leftovers_removed == 1
    assert_modes_private(store)


def test_outputs_are_private_unless_a_mode_is_asked(tmp_path):
    store, disk = store_with_runs(tmp_path, runs=1)
    restore(store, "web", tmp_path / "r.raw")
    restore(store, "web", tmp_path / "r.vmdk", format="vmdk")
    convert(disk, tmp_path / "c.vmdk")
    convert(disk, tmp_path / "c.raw")
    Manifest(BS, BS).save(tmp_path / "m.manifest")
    for name in ("r.raw", "r.vmdk", "c.vmdk", "c.raw", "m.manifest"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    # the user asks: exactly those bits, whatever the umask
    os.umask(0o077)
    restore(store, "web", tmp_path / "r.raw", mode=0o644)
    convert(disk, tmp_path / "c.raw", mode=0o640)
    assert stat.S_IMODE((tmp_path / "r.raw").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c.raw").stat().st_mode) == 0o640
    assert main(["restore", "--store", str(store), "--server", "web", "-o",
                 str(tmp_path / "cli.raw"), "--mode", "604"]) == 0
    assert stat.S_IMODE((tmp_path / "cli.raw").stat().st_mode) == 0o604
    assert main(["convert", str(disk), str(tmp_path / "cli.vmdk"), "--mode", "640"]) == 0
    assert stat.S_IMODE((tmp_path / "cli.vmdk").stat().st_mode) == 0o640
    with pytest.raises(UsageError, match="permission bits"):
        restore(store, "web", tmp_path / "bad.raw", mode=0o4755)
    with pytest.raises(SystemExit):
        main(["convert", str(disk), str(tmp_path / "x.raw"), "--mode", "rw-r--r--"])
    assert not (tmp_path / "bad.raw").exists() and not (tmp_path / "x.raw").exists()


def test_state_catalog_and_connector_lock_are_owner_only(tmp_path):
    from smsblock.service import SmsService
    from smsblock.service.connector import ConnectorLoop
    state = tmp_path / "state"
    folder = tmp_path / "datastore"
    folder.mkdir()
    with SmsService(state) as svc:
        svc.register_connector("datastore", {"path": str(folder)})
        with ConnectorLoop(svc):
            pass
        names = {p.name for p in state.iterdir()}      # while SQLite has its -wal, -shm
        assert {"state.db", "state.db-wal", "state.db-shm"} <= names
        assert any(n.startswith("connector-") for n in names)
        assert_modes_private(state)
    assert_modes_private(state)

    cat = Catalog(tmp_path / "images")
    rec = cat.add(lambda path: convert(make_disk(tmp_path / "d.raw", 3), path, format="vmdk"),
                  {"name": "x"})
    assert_modes_private(tmp_path / "images")
    cat.delete(rec["image_id"])


# --- no write or delete through a planted link ------------------------------------

def test_prune_never_deletes_through_a_link_at_store_tmp(tmp_path):
    store, disk = store_with_runs(tmp_path)
    victim = victim_dir(tmp_path)
    before = snapshot(victim)
    swap_for_link(store / "tmp", victim)
    with pytest.raises(StoreError, match="tmp.*symbolic link"):
        prune(store, "web", keep=1)
    with pytest.raises(StoreError, match="tmp.*symbolic link"):
        replicate(make_disk(disk, 9), store, "web", block_size=BS)
    with pytest.raises(StoreError, match="symbolic link"):
        verify(store)
    assert snapshot(victim) == before
    # in the CLI: one line, exit 1
    assert main(["prune", "--store", str(store), "--server", "web", "--keep", "0",
                 "--delete-all"]) == 1
    assert snapshot(victim) == before


def test_no_run_written_or_deleted_through_a_link_at_runs_server(tmp_path):
    store, disk = store_with_runs(tmp_path)
    real = store / "runs" / "web"
    victim = victim_dir(tmp_path, names=[p.name for p in real.iterdir()] + ["other.txt"])
    before = snapshot(victim)
    swap_for_link(real, victim)
    with pytest.raises(StoreError, match="runs/web.*symbolic link"):
        prune(store, "web", keep=0)
    with pytest.raises(StoreError, match="runs/web.*symbolic link"):
        replicate(make_disk(disk, 9), store, "web", block_size=BS)
    s = LocalStore(store)
    with pytest.raises(StoreError, match="symbolic link"):
        s.delete_manifest("web", min(n for n in before if n.endswith(".manifest"))[:-9])
    assert s.list_servers() == []           # a linked server folder is left out of listings
    assert snapshot(victim) == before


def test_no_pack_written_or_deleted_through_a_link_at_packs(tmp_path):
    store, disk = store_with_runs(tmp_path)
    s = LocalStore(store)
    packs = sorted(s.list_packs())
    sub = store / "packs" / packs[0][:2]
    victim = victim_dir(tmp_path, names=[p.name for p in sub.iterdir()])
    before = snapshot(victim)
    swap_for_link(sub, victim)
    assert packs[0] not in s.list_packs()   # not this store's any more
    with pytest.raises(StoreError, match="symbolic link"):
        s.delete_pack(packs[0])
    prune(store, "web", keep=0)             # deletes the store's own packs only
    assert snapshot(victim) == before

    victim2 = victim_dir(tmp_path, folder="victim2")
    before2 = snapshot(victim2)
    swap_for_link(store / "packs", victim2)
    with pytest.raises(StoreError, match="packs.*symbolic link"):
        replicate(make_disk(disk, 11), store, "web", block_size=BS)
    with pytest.raises(StoreError, match="packs.*symbolic link"):
        prune(store, "web", keep=0)
    assert snapshot(victim2) == before2


def test_lock_and_config_never_through_links(tmp_path):
    store, disk = store_with_runs(tmp_path, runs=1)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    os.chmod(victim, 0o644)
    swap_for_link(store / "lock", victim)
    for action in (lambda: replicate(disk, store, "web", block_size=BS),
                   lambda: prune(store, "web", keep=0),
                   lambda: restore(store, "web", tmp_path / "out.raw")):
        with pytest.raises(StoreError, match="lock.*symbolic link"):
            action()
    assert victim.read_bytes() == VICTIM_BYTES and stat.S_IMODE(victim.stat().st_mode) == 0o644
    # a hard link (a second name of another file) is not used as a lock either
    (store / "lock").unlink()
    os.link(victim, store / "lock")
    with pytest.raises(StoreError, match="lock"):
        prune(store, "web", keep=0)
    assert victim.read_bytes() == VICTIM_BYTES
    # a new store's folder never has its config written through a link in tmp
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    victim2 = victim_dir(tmp_path, folder="victim2")
    before = snapshot(victim2)
    (fresh / "tmp").symlink_to(victim2)
    with pytest.raises(StoreError, match="symbolic link"):
        replicate(disk, fresh, "web", block_size=BS)
    assert snapshot(victim2) == before


@pytest.mark.parametrize("how", ["restore", "restore-vmdk", "convert", "convert-cli"])
def test_a_link_at_out_part_is_never_written(tmp_path, how):
    store, disk = store_with_runs(tmp_path, runs=1)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    out = tmp_path / "out.img"
    (tmp_path / "out.img.part").symlink_to(victim)
    # and a dangling link: O_CREAT through it would create the target
    (tmp_path / "out2.img.part").symlink_to(tmp_path / "created-through-link")
    for dst in (out, tmp_path / "out2.img"):
        if how == "convert-cli":
            assert main(["convert", str(disk), str(dst)]) == 1
            continue
        with pytest.raises(SmsBlockError, match="symbolic link"):
            if how == "restore":
                restore(store, "web", dst)
            elif how == "restore-vmdk":
                restore(store, "web", dst, format="vmdk")
            else:
                convert(disk, dst)
    assert victim.read_bytes() == VICTIM_BYTES
    assert not (tmp_path / "created-through-link").exists()
    assert not out.exists() and (tmp_path / "out.img.part").is_symlink()
    # a regular leftover .part (a killed run's) is replaced, not refused
    (tmp_path / "out.img.part").unlink()
    (tmp_path / "out.img.part").write_bytes(b"half")
    restore(store, "web", out) if how.startswith("restore") else convert(disk, out, format="raw")
    assert out.stat().st_size == 8 * BS and not (tmp_path / "out.img.part").exists()


@pytest.mark.parametrize("name", ["state.db", "state.db-wal", "state.db-shm", "state.db-journal"])
def test_state_database_never_through_a_link(tmp_path, name):
    from smsblock.service.state import State
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim.db"
    victim.write_bytes(VICTIM_BYTES)
    (state / name).symlink_to(victim)
    with pytest.raises(UsageError, match=f"{name} is a symbolic link"):
        State(state)
    assert victim.read_bytes() == VICTIM_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "victim.db"]


def test_connector_lock_never_through_a_link(tmp_path):
    from smsblock.errors import ConnectorError
    from smsblock.service import SmsService
    from smsblock.service.connector import ConnectorLoop
    state = tmp_path / "state"
    folder = tmp_path / "datastore"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    with SmsService(state) as svc:
        cid = svc.register_connector("datastore", {"path": str(folder)})["connectorId"]
        (state / f"connector-{cid}.lock").symlink_to(victim)
        with pytest.raises(ConnectorError, match="symbolic link"):
            with ConnectorLoop(svc):
                pass
    assert victim.read_bytes() == VICTIM_BYTES


def test_catalog_never_deletes_through_a_link(tmp_path):
    cat = Catalog(tmp_path / "images")
    rec = cat.add(lambda path: convert(make_disk(tmp_path / "d.raw", 3), path, format="vmdk"),
                  {"name": "x"})
    image = tmp_path / "images" / rec["image_id"]
    victim = victim_dir(tmp_path, names=["image.json", "disk.vmdk"])
    before = snapshot(victim)
    os.rename(image, tmp_path / "moved")
    image.symlink_to(victim)
    with pytest.raises(ImageError, match="symbolic link"):
        cat.delete(rec["image_id"])
    assert snapshot(victim) == before


def test_fsutil_toolkit_refuses_links(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    (tmp_path / "l").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        create_file(tmp_path / "l")
    with pytest.raises(OSError, match="symbolic link"):
        create_file(tmp_path / "l", replace_stale=True)
    with pytest.raises(OSError, match="symbolic link"):
        open_lock_file(tmp_path / "l")
    (tmp_path / "d").mkdir()
    (tmp_path / "dl").symlink_to(tmp_path / "d")
    with pytest.raises(OSError, match="symbolic link"):
        open_subdir(tmp_path, "dl")
    with pytest.raises(OSError, match="symbolic link"):
        open_subdir(tmp_path, "dl", "x", create=True)
    assert not (tmp_path / "d" / "x").exists()
    assert remove_file(tmp_path / "l") == 0      # the link itself, never its target
    assert victim.read_bytes() == VICTIM_BYTES
    with pytest.raises(IsADirectoryError):
        remove_file(tmp_path / "d")


# --- identifiers match whole -------------------------------------------------------

BAD_SERVER_IDS = ["web\n", "web\r", "web\x00", "\nweb", "web/..", "..", "", "a" * 129, "wéb"]


@pytest.mark.parametrize("bad", BAD_SERVER_IDS)
def test_server_ids_match_whole(tmp_path, bad):
    with pytest.raises(UsageError):
        check_server_id(bad)
    with pytest.raises(UsageError):
        replicate(make_disk(tmp_path / "d.raw", 1), tmp_path / "store", bad, block_size=BS)
    runs = tmp_path / "store" / "runs"
    assert not runs.exists() or os.listdir(runs) == []


def test_run_and_image_ids_match_whole(tmp_path):
    good = "r-20261203T010203.123456Z-0123abcd"
    assert check_run_id(good) == good
    for bad in (good + "\n", good + "\r", "\n" + good,
                "r-２０261203T010203.123456Z-0123abcd",     # fullwidth digits are \d too
                "r-20261203T010203.123456Z-0123abc\u0661"):
        with pytest.raises(UsageError):
            check_run_id(bad)
    assert check_image_id("ami-0123456789abcdef0") == "ami-0123456789abcdef0"
    for bad in ("ami-0123456789abcdef0\n", "ami-0123456789abcdef"):
        with pytest.raises(UsageError):
            check_image_id(bad)
    store, _ = store_with_runs(tmp_path, runs=1)
    (store / "runs" / "web" / (good + "\n.manifest")).write_bytes(b"x")
    (store / "runs" / "web\n").mkdir()
    s = open_store(store)
    assert good + "\n" not in s.list_run_ids("web") and s.list_servers() == ["web"]
    with pytest.raises(UsageError):
        restore(store, "web", tmp_path / "o.raw", run_id=good + "\n")
    assert main(["runs", "--store", str(store), "--server", "web\n"]) == 2


# --- a --vcenter password is never echoed --------------------------------------------

SECRET = "s3cr3t-P4ss"
ADDRESSES = [f"https://u:{SECRET}@[::1", f"ftp://u:{SECRET}@vc", f"https://u:{SECRET}@vc:99x",
             f"u:{SECRET}@vc", f"https://{SECRET}@[x]:1", f"https://u:{SECRET}@vc/sdk",
             f"https://u:{SECRET}/x@vc", f"https://u:{SECRET}#@vc", f"https://u:{SECRET}?@vc",
             f"https://u:{SECRET}@@vc:0", f"http://u:{SECRET}@vc:65536"]


@pytest.mark.parametrize("address", ADDRESSES)
def test_vcenter_password_in_the_address_is_never_echoed(tmp_path, address, capsys):
    from smsblock.source.vsphere import VCenterSettings, parse_address
    with pytest.raises(UsageError) as e:
        parse_address(address)
    assert SECRET not in str(e.value) and "***" in str(e.value)
    with pytest.raises(UsageError) as e:
        VCenterSettings(address, "u", "pw")
    assert SECRET not in str(e.value)
    (tmp_path / "pw").write_text("pw\n")
    status = main(["connector", "register", "--state", str(tmp_path / "state"),
                   "--vcenter", address, "--username", "u", "--password-file", str(tmp_path / "pw")])
    out, err = capsys.readouterr()
    assert status == 2 and SECRET not in out + err
    assert err.startswith("smsblock: error: --vcenter ") and err.count("\n") == 1


def test_vcenter_password_not_echoed_by_the_command(tmp_path):
    address = f"https://administrator:{SECRET}@[vc.example"
    proc = subprocess.run([sys.executable, "-m", "smsblock", "connector", "register", "--state",
                           str(tmp_path / "state"), "--vcenter", address, "--username", "u"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=60)
    assert proc.returncode == 2 and SECRET not in proc.stdout + proc.stderr, proc.stderr
    assert proc.stderr.startswith("smsblock: error: ")


# --- prune on a full disk --------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 6 MiB tmpfs (needs root: mount); skipped where mounting is not allowed."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write a file until the filesystem is full (ENOSPC)."""
    chunk = os.urandom(64 * 1024)
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    with open(path, "ab", buffering=0) as f, contextlib.suppress(OSError):
        for _ in range(64):                 # the last partial pages
            f.write(b"x" * 512)
    with pytest.raises(OSError):
        Path(path.parent / "probe").write_bytes(b"y" * 8192)


def test_prune_reclaims_space_on_a_full_disk(tmp_path, small_fs):
    from smsblock.store import StoreConfig
    store = LocalStore(small_fs / "store")
    store.initialise(StoreConfig(pack_size=256 * 1024))
    disk = tmp_path / "disk.raw"
    rng = np.random.default_rng(7)
    base = bytearray(rng.integers(0, 256, 24 * BS, dtype=np.uint8).tobytes())   # incompressible
    disk.write_bytes(base)
    replicate(disk, store, "web", block_size=BS)
    for i in range(0, 24, 3):               # every third block changes: packs become part-dead
        base[i * BS:(i + 1) * BS] = rng.integers(0, 256, BS, dtype=np.uint8).tobytes()
    disk.write_bytes(base)
    replicate(disk, store, "web", block_size=BS)
    leftover = store.staging_path(".pack.tmp")
    with open(leftover, "wb", opener=lambda p, _f: create_file(p)) as f:
        f.write(os.urandom(200 * 1024))     # a killed run's half-written pack
    fill(small_fs / "filler")

    report = prune(store, "web", keep=1)
    assert report.leftovers_removed == 1 and report.bytes_freed > 200 * 1024
    assert report.packs_deleted + report.packs_rewritten > 0
    assert verify(store).ok
    restore(store, "web", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == bytes(base)
    # the space is really back: a new run of fresh blocks fits now
    assert os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize > 200 * 1024


def test_prune_keeps_a_pack_whole_when_its_rewrite_finds_no_space(tmp_path, small_fs):
    from smsblock.store import StoreConfig
    store = LocalStore(small_fs / "store")
    store.initialise(StoreConfig(pack_size=64 << 20))       # one pack per run
    disk = tmp_path / "disk.raw"
    rng = np.random.default_rng(8)
    base = bytearray(rng.integers(0, 256, 24 * BS, dtype=np.uint8).tobytes())
    disk.write_bytes(base)
    replicate(disk, store, "web", block_size=BS)
    for i in range(0, 24, 3):
        base[i * BS:(i + 1) * BS] = rng.integers(0, 256, BS, dtype=np.uint8).tobytes()
    disk.write_bytes(base)
    replicate(disk, store, "web", block_size=BS)
    fill(small_fs / "filler")
    report = prune(store, "web", keep=1)    # the old pack still holds 16 live blocks
    assert (report.packs_left, report.packs_rewritten, len(report.runs_deleted)) == (1, 0, 1)
    assert verify(store).ok and LocalStore(store.root).list_leftovers() == []
    restore(store, "web", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == bytes(base)
    (small_fs / "filler").unlink()
    report = prune(store, "web", keep=1)    # room again: now it is rewritten
    assert (report.packs_left, report.packs_rewritten) == (0, 1) and report.bytes_freed >= 8 * BS
    assert verify(store).ok


@pytest.mark.parametrize("url", ["s3://bucket\n/prefix", "s3://bu\tcket/p", "s3://b/p\r",
                                 "s3://bad bucket/p", "s3://u:pw@bucket/p", "s3://b:99/p",
                                 "ebs://..", "ebs://Eu_West"])
def test_store_names_match_whole(tmp_path, url, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(UsageError):
        open_store(url)
    assert os.listdir(tmp_path) == []       # no staging folder made from a bad name


def test_s3_staging_folder_never_through_a_link(tmp_path, monkeypatch):
    pytest.importorskip("boto3")
    from smsblock.store.s3 import S3Store
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s = S3Store("s3://bucket/p", staging_dir=str(tmp_path / "staging"))
    staged = s.staging_path(".pack.tmp")     # no request: the local folder only
    with open(staged, "wb", opener=lambda p, _f: create_file(p)) as f:
        f.write(b"x")
    assert_modes_private(tmp_path / "staging")
    victim = victim_dir(tmp_path, names=["123-a.pack.tmp", "9-b.pack.tmp"])
    before = snapshot(victim)
    swap_for_link(Path(s.staging_dir), victim)
    with pytest.raises(StoreError, match="symbolic link"):
        s.staging_path(".pack.tmp")
    with pytest.raises(StoreError, match="symbolic link"):
        s.remove_leftover("staging:123-a.pack.tmp")
    assert s.resume_staged_packs() == []
    assert snapshot(victim) == before


def test_demo_never_wipes_a_folder_it_did_not_make(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_bytes(VICTIM_BYTES)
    assert main(["demo", "--json", "--dir", str(home)]) == 2
    assert "not an earlier demo's folder" in capsys.readouterr().err
    assert (home / "thesis.tex").read_bytes() == VICTIM_BYTES


def test_damage_records_are_private_and_never_through_a_link(tmp_path):
    """verify writes damage records into STORE/damaged: 0700/0600, and a link planted
    there is refused, never written through."""
    store, disk = store_with_runs(tmp_path, runs=1)
    [pack] = [p for p in (store / "packs").rglob("*.pack")][:1]
    with open(pack, "r+b") as f:                 # damage a frame
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify(store)
    assert not report.ok and report.damaged_packs == 1
    assert_modes_private(store)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    swap_for_link(store / "damaged", elsewhere)
    (elsewhere / ("1" * 64 + ".json")).write_text("{}")     # planted: never read or deleted
    with pytest.raises(StoreError):
        LocalStore(store).put_damage_record("0" * 64, b"{}")
    with pytest.raises(StoreError):
        LocalStore(store).list_damage_records()
    with pytest.raises(StoreError):
        LocalStore(store).delete_damage_record("1" * 64)
    assert [p.name for p in elsewhere.iterdir()] == ["1" * 64 + ".json"]
