"""A pack changed behind the store's back (written in place, truncated, replaced by
another file, overwritten in S3) is never built upon, though nothing read it since:
each run compares every listed pack's fingerprint (local: inode, size, mtime, ctime; S3:
ETag, size, LastModified) with what this client recorded when it sealed or verified the
pack, and reads only the changed or unknown packs.  A run on an unchanged store reads no
pack data."""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

from cloud_fixtures import *  # noqa: F401,F403  (fixtures)
from cloud_fixtures import FAST

from smsblock.engine import replicate, restore, verify
from smsblock.pack import FOOTER, HEADER, INDEX_DTYPE
from smsblock.repository.fingerprints import RECORDS
from smsblock.store import LocalStore, StoreConfig, open_store
from smsblock.store.s3 import S3Store

BS = 64 * 1024
N_BLOCKS = 12

pytestmark = pytest.mark.timeout(120)


def make_disk(path, seed: int = 1) -> bytes:
    """Random 4-bit data: frames hold about half a block each."""
    data = np.random.default_rng(seed).integers(0, 16, N_BLOCKS * BS, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def new_store(path, pack_size=100 << 10) -> LocalStore:
    store = open_store(path)
    store.initialise(StoreConfig(pack_size=pack_size, address="sha256"))
    return store


def pack_paths(store_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(store_dir, "packs", "*", "*.pack")))


def restores_exactly(store, content: bytes, tmp_path) -> None:
    out = tmp_path / "out.raw"
    if out.exists():
        out.unlink()
    restore(store, "x", out)
    assert out.read_bytes() == content


class CountingReads:
    """Records every ``read_pack`` of a store object: (pack id, offset, length)."""

    def __init__(self, store):
        self.reads: list[tuple[str, int, int]] = []
        inner = store.read_pack

        def read_pack(pack_id, offset, length):
            self.reads.append((pack_id, offset, length))
            return inner(pack_id, offset, length)
        store.read_pack = read_pack

    def frame_reads(self, store) -> list[tuple[str, int, int]]:
        """Reads that touch a pack's header or frames (not only its index and footer)."""
        sizes = store.list_packs()
        out = []
        for pid, offset, length in self.reads:
            n = len(store.pack_index(pid, sizes[pid]))
            index_start = sizes[pid] - FOOTER.size - n * INDEX_DTYPE.itemsize
            if offset < index_start:
                out.append((pid, offset, length))
        return out


def first_run(tmp_path):
    disk = tmp_path / "d.raw"
    content = make_disk(disk)
    store_dir = tmp_path / "s"
    new_store(store_dir)
    replicate(disk, store_dir, "x", block_size=BS)
    assert len(pack_paths(store_dir)) >= 3
    return disk, content, store_dir


def blocks_in(path) -> int:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(size - FOOTER.size)
        return FOOTER.unpack(f.read(FOOTER.size))[3]


def test_a_frame_written_in_place_is_stored_again_by_the_next_run_without_verify(tmp_path):
    """The reviewer's trial: one byte of a frame changed by opening the pack and writing
    it in place; the next run (no verify, no restore before it) stores the block again."""
    disk, content, store_dir = first_run(tmp_path)
    victim = pack_paths(store_dir)[1]
    with open(victim, "r+b") as f:
        f.seek(HEADER.size + 40)
        b = f.read(1)
        f.seek(HEADER.size + 40)
        f.write(bytes([b[0] ^ 0xFF]))
    s = replicate(disk, store_dir, "x")
    assert s.blocks_changed == 0 and s.blocks_stored == 1, "the damaged block was built upon"
    pid = os.path.basename(victim)[:-5]
    assert pid in open_store(store_dir).damage()
    restores_exactly(store_dir, content, tmp_path)


def test_a_truncated_pack_is_stored_again_by_the_next_run(tmp_path):
    disk, content, store_dir = first_run(tmp_path)
    victim = pack_paths(store_dir)[0]
    n = blocks_in(victim)
    os.truncate(victim, os.path.getsize(victim) - 100)
    s = replicate(disk, store_dir, "x")
    assert s.blocks_stored == n
    restores_exactly(store_dir, content, tmp_path)


def test_a_pack_replaced_by_another_file_is_stored_again_by_the_next_run(tmp_path):
    """A damaged copy renamed over the pack (as an editor saves): same size, same index."""
    disk, content, store_dir = first_run(tmp_path)
    victim = pack_paths(store_dir)[2]
    raw = bytearray(open(victim, "rb").read())
    raw[HEADER.size + 7] ^= 0x21
    with open(victim + ".new", "wb") as f:
        f.write(raw)
    os.replace(victim + ".new", victim)
    s = replicate(disk, store_dir, "x")
    assert s.blocks_stored == 1
    restores_exactly(store_dir, content, tmp_path)


def test_a_deleted_pack_is_stored_again_by_the_next_run(tmp_path):
    disk, content, store_dir = first_run(tmp_path)
    victim = pack_paths(store_dir)[1]
    n = blocks_in(victim)
    os.unlink(victim)
    s = replicate(disk, store_dir, "x")
    assert s.blocks_stored == n and s.blocks_changed == 0
    restores_exactly(store_dir, content, tmp_path)
    assert verify(store_dir).ok


def test_a_run_on_an_unchanged_store_reads_no_pack_data(tmp_path):
    disk, content, store_dir = first_run(tmp_path)
    store = open_store(store_dir)
    counter = CountingReads(store)
    s = replicate(disk, store, "x")
    assert s.blocks_stored == 0
    # not even the packs' indexes: the run that sealed them put them in the block index
    assert counter.reads == []
    # without that index, the packs' indexes are read again, and still no frame
    shutil.rmtree(store_dir / "index")
    store = open_store(store_dir)
    counter = CountingReads(store)
    assert replicate(disk, store, "x").blocks_stored == 0
    assert counter.reads, "the block index reads the packs' indexes"
    assert counter.frame_reads(store) == []


def test_packs_no_record_names_are_read_once_then_trusted(tmp_path):
    """Packs another writer sealed (here: the records are gone) are verified by the next
    run, once: the run after reads no pack data again."""
    disk, content, store_dir = first_run(tmp_path)
    os.unlink(store_dir / "cache" / RECORDS)
    store = open_store(store_dir)
    counter = CountingReads(store)
    replicate(disk, store, "x")
    read = {pid for pid, _, _ in counter.frame_reads(store)}
    assert read == set(store.list_packs())
    store = open_store(store_dir)
    counter = CountingReads(store)
    replicate(disk, store, "x")
    assert counter.frame_reads(store) == []
    assert oct(os.stat(store_dir / "cache" / RECORDS).st_mode & 0o777) == "0o600"
    assert oct(os.stat(store_dir / "cache").st_mode & 0o777) == "0o700"


def test_verify_records_what_it_read(tmp_path):
    disk, content, store_dir = first_run(tmp_path)
    os.unlink(store_dir / "cache" / RECORDS)
    assert verify(store_dir).ok
    store = open_store(store_dir)
    counter = CountingReads(store)
    replicate(disk, store, "x")
    assert counter.frame_reads(store) == []


def test_a_link_at_the_records_is_refused_and_costs_only_reads(tmp_path):
    disk, content, store_dir = first_run(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    records = store_dir / "cache" / RECORDS
    records.unlink()
    records.symlink_to(victim)
    s = replicate(disk, store_dir, "x")
    assert s.blocks_stored == 0
    assert victim.read_bytes() == b"keep"
    restores_exactly(store_dir, content, tmp_path)


# --- S3 ------------------------------------------------------------------------------------

def s3_run(tmp_path, bucket: str, prefix: str, seed: int):
    """An S3 store with one run of a disk: ``(url, store, disk path, disk bytes)``."""
    url = f"s3://{bucket}/{prefix}"
    store = S3Store(url, **FAST)
    store.initialise(StoreConfig(pack_size=100 << 10))
    disk = tmp_path / "d.raw"
    content = make_disk(disk, seed)
    replicate(disk, store, "x", block_size=BS)
    return url, store, disk, content


def test_a_pack_overwritten_in_s3_is_stored_again_by_the_next_run(tmp_path, moto, bucket):
    """The index cache on this machine still matches the pack's id and size: only the
    changed ETag/LastModified tells the object is not what was sealed."""
    url, store, disk, content = s3_run(tmp_path, bucket, "fp", 5)
    s3 = moto.boto3_client("s3")
    victim = sorted(store.list_packs())[1]
    key = f"fp/packs/{victim[:2]}/{victim}.pack"
    raw = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    raw[HEADER.size + 50] ^= 0x5A
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    s = replicate(disk, S3Store(url, **FAST), "x")
    assert s.blocks_changed == 0 and s.blocks_stored == 1, "the damaged block was built upon"
    restores_exactly(S3Store(url, **FAST), content, tmp_path)
    # and the run after reads no pack data
    again = S3Store(url, **FAST)
    counter = CountingReads(again)
    assert replicate(disk, again, "x").blocks_stored == 0
    assert counter.frame_reads(again) == []


def test_a_pack_deleted_in_s3_is_stored_again_by_the_next_run(tmp_path, moto, bucket):
    url, store, disk, content = s3_run(tmp_path, bucket, "gone", 6)
    victim = sorted(store.list_packs())[0]
    n = len(store.pack_index(victim, store.list_packs()[victim]))
    moto.boto3_client("s3").delete_object(Bucket=bucket, Key=f"gone/packs/{victim[:2]}/{victim}.pack")
    s = replicate(disk, S3Store(url, **FAST), "x")
    assert s.blocks_stored == n
    restores_exactly(S3Store(url, **FAST), content, tmp_path)


def test_an_s3_pack_whose_index_no_longer_reads_is_put_again_over_the_bad_copy(tmp_path, moto,
                                                                              bucket):
    """A pack damaged in its index and a frame, at the same size: no damage record can
    name its blocks, so the run leaves it out and stores them again; packed in the same
    order they make the same pack id, and the put must overwrite the bad object (an S3
    put skips an object of that name and size as already there).  Found in review: the
    bad object stayed, and the runs after named blocks in it."""
    url = f"s3://{bucket}/unreadable"
    store = S3Store(url, **FAST)
    store.initialise(StoreConfig(pack_size=64 << 20))
    disk = tmp_path / "d.raw"
    content = make_disk(disk, 8)
    replicate(disk, store, "x", block_size=BS)
    (pid, size), = store.list_packs().items()
    s3 = moto.boto3_client("s3")
    key = f"unreadable/packs/{pid[:2]}/{pid}.pack"
    raw = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    raw[HEADER.size + 50] ^= 0x5A
    raw[len(raw) - FOOTER.size - 10] ^= 0x5A            # inside the pack's index
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    s = replicate(disk, S3Store(url, **FAST), "x")
    assert s.blocks_stored == len(content) // BS
    assert S3Store(url, **FAST).list_packs() == {pid: size}, "the same pack again"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() != bytes(raw), \
        "the damaged object was left in place"
    restores_exactly(S3Store(url, **FAST), content, tmp_path)
    again = S3Store(url, **FAST)
    counter = CountingReads(again)
    assert replicate(disk, again, "x").blocks_stored == 0
    assert counter.frame_reads(again) == []
    assert verify(again).ok
