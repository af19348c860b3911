"""Packs, the dedup index, open_store and LocalStore primitives."""

from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np
import pytest
import zstandard
from hypothesis import given, strategies as st

from smsblock.errors import (RunNotFoundError, StoreCorruptError, StoreError, StoreLockedError,
                             UsageError)
from smsblock.pack import (FOOTER, HEADER, INDEX_DTYPE, BlockIndex, PackWriter, address_function,
                           decompress_block, read_index, verify_pack)
from smsblock.store import LocalStore, StoreConfig, open_store


def frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(data)


def write_pack(path, blocks: list[bytes], algorithm="sha256"):
    addr = address_function(algorithm)
    w = PackWriter(path, algorithm)
    for b in blocks:
        w.add(addr(b), frame(b), len(b))
    return w.seal()


def reader(path):
    data = open(path, "rb").read()
    return (lambda o, n: data[o:o + n]), len(data)


@given(blocks=st.lists(st.binary(min_size=0, max_size=3000), max_size=12),
       algorithm=st.sampled_from(["sha256", "blake3"]))
def test_pack_roundtrip(tmp_path_factory, blocks, algorithm):
    path = tmp_path_factory.mktemp("pack") / "p"
    pack_id, index = write_pack(path, blocks, algorithm)
    final = path.parent / f"{pack_id}.pack"
    os.rename(path, final)
    rr, size = reader(final)
    footer, got = read_index(rr, size, str(final))
    assert footer.count == len(blocks) and footer.algorithm == algorithm
    assert got.tobytes() == index.tobytes()
    addr = address_function(algorithm)
    for e, b in zip(got, blocks):
        assert e["address"].tobytes() == addr(b)
        assert decompress_block(rr(int(e["offset"]), int(e["clen"])), int(e["ulen"])) == b
    idx, good, problems = verify_pack(rr, size, str(final), algorithm)
    assert problems == [] and good.all()
    # the id is the hash of the index: same blocks, same id
    again, _ = write_pack(path.parent / "q", blocks, algorithm)
    assert again == pack_id


def test_pack_corruption_is_located(tmp_path):
    blocks = [os.urandom(1000), b"a" * 5000, b""]
    pid, index = write_pack(tmp_path / "p", blocks)
    good = (tmp_path / "p").read_bytes()
    name = str(tmp_path / f"{pid}.pack")

    def check(data, match):
        rr = lambda o, n: data[o:o + n]
        with pytest.raises(StoreCorruptError, match=match) as e:
            footer, _ = read_index(rr, len(data), name)
        assert name in str(e.value)
        idx, ok, problems = verify_pack(rr, len(data), name, "sha256")
        assert problems and name in problems[0]

    check(good[:-1], "magic|index")                 # truncated
    check(good[:10], "too small")
    bad = bytearray(good); bad[-10] ^= 1
    check(bytes(bad), "footer|index")
    bad = bytearray(good); bad[len(good) - FOOTER.size - 1] ^= 1
    check(bytes(bad), "checksum")                     # index bytes changed
    with pytest.raises(StoreCorruptError, match="name"):
        rr, size = reader(tmp_path / "p")
        read_index(rr, size, str(tmp_path / ("0" * 64 + ".pack")))
    # a damaged frame: the index is fine, verify names the block's offset
    bad = bytearray(good); bad[HEADER.size + 20] ^= 0xFF
    rr = lambda o, n: bytes(bad[o:o + n])
    idx, ok, problems = verify_pack(rr, len(bad), name, "sha256")
    assert list(ok) == [False, True, True] and f"offset {HEADER.size}" in problems[0]
    # the wrong algorithm for the store
    idx, ok, problems = verify_pack(lambda o, n: good[o:o + n], len(good), name, "blake3")
    assert problems and "sha256" in problems[0]


def test_index_entries_out_of_range_are_refused(tmp_path):
    pid, index = write_pack(tmp_path / "p", [b"x" * 100, b"y" * 100])
    data = bytearray((tmp_path / "p").read_bytes())
    off = len(data) - FOOTER.size - 2 * INDEX_DTYPE.itemsize
    index = np.frombuffer(bytes(data[off:off + 2 * 48]), INDEX_DTYPE).copy()
    index[1]["offset"] = index[0]["offset"]            # overlapping frames
    raw = index.tobytes()
    data[off:off + len(raw)] = raw
    foot = list(FOOTER.unpack(bytes(data[-FOOTER.size:])))
    foot[5] = hashlib.sha256(raw).digest()
    data[-FOOTER.size:] = FOOTER.pack(*foot)
    name = hashlib.sha256(raw).hexdigest() + ".pack"
    with pytest.raises(StoreCorruptError, match="overlapping"):
        read_index(lambda o, n: bytes(data[o:o + n]), len(data), name)


@given(groups=st.lists(st.lists(st.binary(min_size=1, max_size=8), max_size=20), max_size=5),
       probes=st.lists(st.binary(min_size=1, max_size=8), max_size=20),
       prefix_clash=st.booleans())
def test_block_index_matches_a_dict(groups, probes, prefix_clash):
    """BlockIndex (sorted arrays + binary search) against a plain dict."""
    def addr(b):
        h = hashlib.sha256(b).digest()
        return (b"\xff" * 8 + h[8:]) if prefix_clash else h   # same 8-byte key, big value
    packs, oracle = {}, {}
    for n, group in enumerate(groups):
        idx = np.zeros(len(group), INDEX_DTYPE)
        for i, b in enumerate(group):
            idx[i] = (np.frombuffer(addr(b), np.uint8), 16 + i, len(b), len(b))
            oracle.setdefault(addr(b), (f"{n:064x}", 16 + i))
        packs[f"{n:064x}"] = idx
    bi = BlockIndex(packs)
    extra = np.zeros(1, INDEX_DTYPE)
    extra[0] = (np.frombuffer(addr(b"extra!"), np.uint8), 99, 1, 1)
    bi.add("e" * 64, extra)
    oracle.setdefault(addr(b"extra!"), ("e" * 64, 99))
    for b in [x for g in groups for x in g] + probes + [b"extra!"]:
        loc = bi.get(addr(b))
        want = oracle.get(addr(b))
        assert (loc is None) == (want is None)
        if loc is not None:
            # any copy is a right answer when an address repeats: the entry must hold it
            where = packs.get(loc.pack_id, extra)
            hit = where[where["offset"] == loc.offset]
            assert len(hit) == 1 and hit[0]["address"].tobytes() == addr(b)
    arr = np.array([np.frombuffer(addr(b), np.uint8) for b in probes + [b"extra!"]], np.uint8)
    assert list(bi.contains_all(arr.reshape(-1, 32))) == [addr(b) in oracle for b in probes + [b"extra!"]]


def test_open_store_urls(tmp_path):
    s = open_store(tmp_path / "a")
    assert isinstance(s, LocalStore) and s.root == str(tmp_path / "a")
    assert open_store(f"file://{tmp_path}/b%20c").root == str(tmp_path / "b c")
    assert open_store(s) is s
    # until the cloud stores (issue 4) exist, their URLs are refused with a clear message
    for url, module in (("s3://bucket/prefix", "s3"), ("ebs://us-east-1", "ebs"), ("ebs://", "ebs")):
        if importlib.util.find_spec(f"smsblock.store.{module}") is None:
            with pytest.raises(UsageError, match="not available yet"):
                open_store(url)
    with pytest.raises(UsageError, match="scheme"):
        open_store("ftp://x/y")
    with pytest.raises(UsageError):
        open_store("file://otherhost/x")


def test_store_creation_config_and_refusals(tmp_path):
    s = open_store(tmp_path / "st")
    assert not s.exists()
    with pytest.raises(StoreError, match="no smsblock store"):
        s.require()
    with pytest.raises(StoreError, match="no smsblock store"):
        s.config
    cfg = s.initialise(StoreConfig(address="blake3", pack_size=1 << 20))
    assert cfg.address == "blake3" and cfg.pack_size == 1 << 20
    # a second initialise keeps the first config
    assert open_store(tmp_path / "st").initialise(StoreConfig()).address == "blake3"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises(StoreError, match="not empty"):
        open_store(tmp_path / "junk").initialise()
    (tmp_path / "st" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(StoreCorruptError, match="not a smsblock store"):
        open_store(tmp_path / "st").config
    with pytest.raises(UsageError):
        StoreConfig(address="md5")
    with pytest.raises(UsageError):
        StoreConfig(pack_size=10)


def test_lock_is_shared_for_runs_and_exclusive_for_prune(tmp_path):
    s = open_store(tmp_path / "st")
    s.initialise()
    with s.lock(False, "replicate"), s.lock(False, "verify"):
        with pytest.raises(StoreLockedError, match="prune"):
            with s.lock(True, "prune"):
                pass
    with s.lock(True, "prune"):
        with pytest.raises(StoreLockedError, match="cannot replicate"):
            with s.lock(False, "replicate"):
                pass
    with s.lock(True, "prune"):
        pass


def test_manifest_and_pack_primitives(tmp_path):
    s = open_store(tmp_path / "st")
    s.initialise()
    rid = "r-20260101T000000.000000Z-0123abcd"
    with pytest.raises(RunNotFoundError):
        s.get_manifest_bytes("srv", rid)
    s.put_manifest_bytes("srv", rid, b"bytes")
    assert s.get_manifest_bytes("srv", rid) == b"bytes"
    assert s.list_servers() == ["srv"] and s.list_run_ids("srv") == [rid]
    assert s.list_leftovers() == []            # the temp file became the manifest
    s.delete_manifest("srv", rid)
    s.delete_manifest("srv", rid)              # missing is fine
    assert s.list_servers() == []
    for bad in ("../x", "", "a/b", ".hidden"):
        with pytest.raises(UsageError):
            s.list_run_ids(bad)
    with pytest.raises(UsageError):
        s.get_manifest_bytes("srv", "../../config")
    staged = s.staging_path(".pack.tmp")
    pid, _ = write_pack(staged, [b"one", b"two"])
    assert s.list_leftovers() == [os.path.basename(staged)]
    s.put_pack(pid, staged)
    assert s.list_leftovers() == [] and list(s.list_packs()) == [pid]
    idx = s.block_index()
    loc = idx.get(hashlib.sha256(b"two").digest())
    assert s.read_block(loc) == b"two"
    s.delete_pack(pid)
    assert s.list_packs() == {}
    with pytest.raises(StoreError, match="missing"):
        s.read_pack(pid, 0, 10)


def test_stray_names_under_runs_are_not_servers_or_runs(tmp_path):
    # a file manager's or fsck's droppings must not stop verify and prune
    s = open_store(tmp_path / "st")
    s.initialise()
    rid = "r-20260101T000000.000000Z-0123abcd"
    s.put_manifest_bytes("srv", rid, b"bytes")
    runs = tmp_path / "st" / "runs"
    (runs / ".DS_Store").write_bytes(b"")
    (runs / "lost+found").mkdir()
    (runs / "srv" / "r-junk.manifest").write_bytes(b"")
    (runs / "srv" / "notes.txt").write_bytes(b"")
    assert s.list_servers() == ["srv"] and s.list_run_ids("srv") == [rid]
    assert list(s.iter_manifests()) == [("srv", rid)]
