"""Manifests: binary round trip (format versions 1 and 2), self-checking against corruption
and truncation, digest, diff.  Format 2's own shapes (sizes, frames, records, fuzzing under
a memory limit) are in tests/test_manifest_v2.py."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

from smsblock.cli import main
from smsblock.errors import ManifestError, UsageError
from smsblock.manifest import (HEADER_SIZE, BlockState, Manifest, check_block_size, diff)

#: the writers: the current one (version 3) and versions 2 and 1's, kept for old files
WRITERS = {"v3": Manifest.to_bytes, "v2": Manifest._to_bytes_v2, "v1": Manifest._to_bytes_v1}
writers = pytest.mark.parametrize("write", WRITERS.values(), ids=WRITERS.keys())

KIB = 1024
block_sizes = st.sampled_from([64 * KIB, 128 * KIB, 512 * KIB, 4096 * KIB])


@st.composite
def manifests(draw, block_size=None, disk_size=None):
    bs = draw(block_sizes) if block_size is None else block_size
    size = draw(st.integers(0, 40 * bs)) if disk_size is None else disk_size
    m = Manifest(size, bs, address_algorithm=draw(st.sampled_from(["sha256", "blake3", "none"])))
    n = m.n_blocks
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    m.states[:] = rng.integers(0, 3, n, dtype=np.uint8)
    data = m.states == BlockState.DATA
    # few distinct hashes so that equal hashes across manifests happen too
    m.hashes[data] = rng.integers(0, 2, (int(data.sum()), 16), dtype=np.uint8)
    m.addresses[data] = rng.integers(0, 256, (int(data.sum()), 32), dtype=np.uint8)
    m.meta = draw(st.dictionaries(st.text(max_size=8), st.one_of(
        st.integers(-2**53, 2**53), st.text(max_size=20), st.booleans(), st.none()), max_size=4))
    return m


def reference_digest(m: Manifest) -> bytes:
    """The version 3 digest as docs/formats.md defines it, block by block: maximal runs
    of equal (state, carries entries), each its entries then state, carries, count."""
    h = hashlib.sha256(b"smsblock manifest digest v3\0")
    h.update(struct.pack("<QI", m.disk_size, m.block_size))
    key, count = None, 0
    for i in range(m.n_blocks):
        carries = m.states[i] == BlockState.DATA or m.hashes[i].any() or m.addresses[i].any()
        k = (int(m.states[i]), bool(carries))
        if k != key:
            if key is not None:
                h.update(struct.pack("<BBQ", key[0], key[1], count))
            key, count = k, 0
        count += 1
        if carries:
            h.update(m.hashes[i].tobytes() + m.addresses[i].tobytes())
    if key is not None:
        h.update(struct.pack("<BBQ", key[0], key[1], count))
    return h.digest()


def reference_digest_v1(m: Manifest) -> bytes:
    """The digest versions 1 and 2 store, block by block."""
    h = hashlib.sha256(b"smsblock manifest digest v1\0")
    h.update(struct.pack("<QI", m.disk_size, m.block_size))
    for i in range(m.n_blocks):
        h.update(bytes([m.states[i]]) + m.hashes[i].tobytes() + m.addresses[i].tobytes())
    return h.digest()


def reference_diff(old: Manifest, new: Manifest) -> list[int]:
    out = []
    for i in range(max(old.n_blocks, new.n_blocks)):
        if i >= old.n_blocks or i >= new.n_blocks:
            out.append(i)
        elif old.states[i] != new.states[i]:
            out.append(i)
        elif old.states[i] == BlockState.DATA and bytes(old.hashes[i]) != bytes(new.hashes[i]):
            out.append(i)
    return out


# -- format ------------------------------------------------------------------

@given(manifests())
def test_round_trip(m):
    data = m.to_bytes()
    assert data[8:12] == struct.pack("<I", 3)
    back = Manifest.from_bytes(data)
    assert back == m
    old = Manifest.from_bytes(m._to_bytes_v1())       # version 1 files still load
    assert old == m and old.digest == back.digest
    assert back.digest == m.digest == reference_digest(m)
    assert m._digest_v1() == reference_digest_v1(m)
    assert Manifest.from_bytes(m._to_bytes_v2()) == m
    assert back.n_blocks == m.n_blocks == -(-m.disk_size // m.block_size)
    assert back.states.dtype == np.uint8 and back.hashes.shape == (m.n_blocks, 16)
    assert back.addresses.shape == (m.n_blocks, 32)


def test_save_load_is_atomic_and_writable(tmp_path):
    m = Manifest(5 * 64 * KIB + 17, 64 * KIB, meta={"run_id": "r1"}, address_algorithm="sha256")
    m.states[:] = [2, 1, 0, 2, 2, 1]
    m.hashes[0] = 1
    path = tmp_path / "run.manifest"
    m.save(path)
    assert path.read_bytes() == m.to_bytes()            # save writes version 3
    m.meta["run_id"] = "r2"
    m.save(path)        # replaces
    assert sorted(os.listdir(tmp_path)) == ["run.manifest"]      # no temp file left
    back = Manifest.load(path)
    assert back == m and back.meta["run_id"] == "r2"
    back.addresses[0] = 7       # loaded arrays are writable (the store fills addresses)
    assert back != m


def test_copy_is_deep():
    m = Manifest(3 * 64 * KIB, 64 * KIB, meta={"a": [1]})
    c = m.copy()
    c.states[0] = 2
    c.meta["a"].append(2)
    assert m.states[0] == 0 and m.meta == {"a": [1]}


@writers
@given(m=manifests(), data=st.data())
def test_any_flipped_byte_is_detected(write, m, data):
    raw = bytearray(write(m))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ManifestError) as e:
        Manifest.from_bytes(bytes(raw), "some/file.manifest")
    assert "some/file.manifest" in str(e.value) and "offset" in str(e.value)
    assert e.value.offset is not None


@writers
@given(m=manifests(), data=st.data())
def test_any_truncation_or_extension_is_detected(write, m, data):
    raw = write(m)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ManifestError, match=r"m\.manifest, offset \d+"):
        Manifest.from_bytes(raw[:cut], "m.manifest")
    with pytest.raises(ManifestError, match="unexpected bytes|truncated, extended"):
        Manifest.from_bytes(raw + b"\0", "m.manifest")


def _resealed(raw: bytes, offset: int, value: bytes) -> bytes:
    """Patch a header field and fix the trailer checksum, to reach the field checks."""
    b = bytearray(raw)
    b[offset:offset + len(value)] = value
    body = bytes(b[:-32])
    return body + hashlib.sha256(body[:-8]).digest()


@pytest.mark.parametrize("offset, value, message", [
    (0, b"NOTMANIF", "bad magic"),
    (8, struct.pack("<I", 4), "unsupported manifest version 4"),
    (8, struct.pack("<I", 0), "unsupported manifest version 0"),
    (24, struct.pack("<I", 3 * 64 * KIB), "not a power of two"),
    (28, struct.pack("<Q", 99), "block count 99"),
    (60, struct.pack("<I", 1), "unknown flags"),
    (64, bytes(32), "digest does not match"),
    (HEADER_SIZE + 1, b"\x07", "invalid state 7"),
])
def test_bad_v1_fields_name_their_offset(tmp_path, offset, value, message):
    m = Manifest(4 * 64 * KIB, 64 * KIB)
    m.states[:] = [2, 2, 1, 0]
    raw = _resealed(m._to_bytes_v1(), offset, value)
    path = tmp_path / "bad.manifest"
    path.write_bytes(raw)
    with pytest.raises(ManifestError, match=message) as e:
        Manifest.load(path)
    assert str(path) in str(e.value)
    assert e.value.offset == offset


@writers
def test_bad_meta_json(write):
    m = Manifest(64 * KIB, 64 * KIB, meta={"k": "v"})
    raw = write(m)
    pos = raw.index(b'{"k":"v"}')
    with pytest.raises(ManifestError, match="not valid JSON") as e:
        Manifest.from_bytes(_resealed(raw, pos, b"["), "x")
    assert e.value.offset == pos


def test_load_refuses_a_wrong_file_before_reading_it_whole(tmp_path, monkeypatch):
    big = tmp_path / "disk.raw"
    with open(big, "wb") as f:
        f.truncate(1 << 40)                 # 1 TiB sparse: reading it whole would not end
    with pytest.raises(ManifestError, match="bad magic") as e:
        Manifest.load(big)
    assert e.value.offset == 0
    m = Manifest(64 * KIB, 64 * KIB)
    for write, message in ((Manifest._to_bytes_v1, "unexpected bytes after the trailer"),
                           (Manifest.to_bytes, "bad footer magic")):
        (tmp_path / "long").write_bytes(write(m))
        with open(tmp_path / "long", "r+b") as f:
            f.truncate(1 << 40)
        with pytest.raises(ManifestError, match=message):
            Manifest.load(tmp_path / "long")
    (tmp_path / "short").write_bytes(m._to_bytes_v1()[:100])
    with pytest.raises(ManifestError, match="truncated") as e:
        Manifest.load(tmp_path / "short")
    assert e.value.offset == 100
    (tmp_path / "short").write_bytes(m.to_bytes()[:100])
    with pytest.raises(ManifestError, match="truncated") as e:
        Manifest.load(tmp_path / "short")


def test_unreadable_file(tmp_path):
    with pytest.raises(ManifestError, match="cannot read"):
        Manifest.load(tmp_path / "missing")


@writers
def test_loading_a_big_manifest_is_linear_and_fast(write):
    # 2 TiB at 64 KiB = 32 Mi blocks is the largest realistic table; 1 Mi blocks here
    m = Manifest((1 << 20) * 64 * KIB, 64 * KIB)
    m.states[::3] = BlockState.DATA
    raw = write(m)
    back = Manifest.from_bytes(raw)
    assert back == m


# -- digest ------------------------------------------------------------------

@given(manifests(), st.data())
def test_digest_changes_with_any_block(m, data):
    if m.n_blocks == 0:
        return
    i = data.draw(st.integers(0, m.n_blocks - 1))
    field = data.draw(st.sampled_from(["states", "hashes", "addresses"]))
    before = m.digest
    other = m.copy()
    arr = getattr(other, field)
    if field == "states":
        arr[i] = (int(arr[i]) + 1) % 3
    else:
        arr[i, data.draw(st.integers(0, arr.shape[1] - 1))] ^= 1
    assert other.digest != before
    assert other.copy().digest == other.digest == reference_digest(other)


# -- block sizes -------------------------------------------------------------

@pytest.mark.parametrize("size", [64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1024 * KIB,
                                  2048 * KIB, 4096 * KIB])
def test_block_sizes_accepted(size):
    assert check_block_size(size) == size


@pytest.mark.parametrize("size", [0, -1, 32 * KIB, 8192 * KIB, 3 * 64 * KIB, 100000, True, 1.5,
                                  "65536"])
def test_block_sizes_refused(size):
    with pytest.raises(UsageError):
        check_block_size(size)
    with pytest.raises(UsageError):
        Manifest(10, size)


# -- diff --------------------------------------------------------------------

@st.composite
def manifest_pairs(draw):
    bs = draw(block_sizes)
    old = draw(manifests(block_size=bs))
    if draw(st.booleans()):
        new = draw(manifests(block_size=bs, disk_size=old.disk_size))
    else:
        new = draw(manifests(block_size=bs))
    return old, new


@given(manifest_pairs())
def test_diff_matches_reference(pair):
    old, new = pair
    d = diff(old, new)
    assert d.dtype == np.int64
    assert d.tolist() == reference_diff(old, new)
    assert diff(new, old).tolist() == d.tolist()        # symmetric
    assert len(diff(old, old)) == 0 and len(diff(new, new.copy())) == 0


def test_diff_ignores_hashes_of_non_data_and_addresses():
    a = Manifest(4 * 64 * KIB, 64 * KIB)
    a.states[:] = [2, 1, 0, 2]
    b = a.copy()
    b.hashes[1] = 5          # ZERO block: hash is meaningless
    b.addresses[0] = 9       # same content, another address algorithm/store
    assert diff(a, b).tolist() == []
    b.hashes[3, 0] = 1
    b.states[2] = BlockState.ZERO
    assert diff(a, b).tolist() == [2, 3]


def test_diff_of_different_sizes_and_block_sizes():
    a = Manifest(3 * 64 * KIB, 64 * KIB)
    b = Manifest(5 * 64 * KIB + 1, 64 * KIB)
    assert diff(a, b).tolist() == [3, 4, 5]
    with pytest.raises(UsageError, match="block sizes"):
        diff(a, Manifest(3 * 64 * KIB, 128 * KIB))


def test_cli_diff_json_and_text(tmp_path, capsys):
    a = Manifest(6 * 64 * KIB, 64 * KIB)
    a.states[:] = [2, 2, 1, 0, 2, 2]
    b = a.copy()
    b.hashes[1, 0] = 1                      # modified
    b.states[3] = BlockState.DATA           # became data
    b.states[4] = BlockState.ZERO           # became zero
    b.states[5] = BlockState.UNALLOCATED    # became unallocated
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] == [1, 3, 4, 5] and out["changed_count"] == 4
    assert out["blocks_total"] == 6
    assert (out["data_modified"], out["became_data"], out["became_zero"],
            out["became_unallocated"], out["size_changed"]) == (1, 1, 1, 1, 0)
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "4 of 6 blocks changed" in text and "changed: 1,3-5" in text


def test_cli_diff_refuses_corrupt_manifest(tmp_path, capsys):
    a = Manifest(64 * KIB, 64 * KIB)
    a.save(tmp_path / "a")
    (tmp_path / "b").write_bytes(a.to_bytes()[:-3])
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path / "b") in err and "truncated" in err


def test_cli_diff_refuses_different_block_sizes(tmp_path, capsys):
    Manifest(4 * 64 * KIB, 64 * KIB).save(tmp_path / "a")
    Manifest(4 * 64 * KIB, 128 * KIB).save(tmp_path / "b")
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "block sizes 65536 and 131072" in captured.err
