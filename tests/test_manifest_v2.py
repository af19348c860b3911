"""Manifest format version 2: ranges instead of per-block entries, zstd frames, sizes.

* a reader written from docs/formats.md alone (struct by struct) agrees with the library's
  writer, and crafted files built from the same page hit every check with its offset;
* round trips of run-heavy tables over several frames, and the streaming reader;
* size: a 16 TiB disk holding 1 GiB of data has a manifest of at most 256 KiB;
* fuzzing (flips, truncations, absurd counts, all resealed so that the parser sees them)
  in a subprocess under RLIMIT_AS: only ManifestError, in bounded memory and time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from smsblock.errors import ManifestError
from smsblock.manifest import (FRAME_RAW_MAX, BlockState, Manifest, _encode_v2, _runs_v2)

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
ROOT = Path(__file__).resolve().parent.parent

# -- the layout of docs/formats.md, written out independently of smsblock/manifest.py ----
HEADER = struct.Struct("<8sIIQIQ16sI8s")      # 64 bytes
FOOTER = struct.Struct("<8sQQQ32s")           # 64 bytes
TRAILER = struct.Struct("<8s32s")             # 40 bytes
FRAME = struct.Struct("<IIB3sIQQ")            # 32 bytes
RECORD = struct.Struct("<BB6sQQ")             # 24 bytes


def doc_read(raw: bytes) -> dict:
    """Parse a version 2 or 3 file as docs/formats.md describes it, block by block."""
    magic, version, hsize, disk_size, block_size, n, algo, flags, res = HEADER.unpack_from(raw)
    assert (magic, hsize, flags, res) == (b"SMSBMANI", 64, 0, bytes(8)) and version in (2, 3)
    tmagic, checksum = TRAILER.unpack_from(raw, len(raw) - 40)
    assert tmagic == b"SMSBEND\0" and checksum == hashlib.sha256(raw[:-40]).digest()
    fmagic, frame_count, body_len, meta_len, digest = FOOTER.unpack_from(raw, len(raw) - 104)
    assert fmagic == b"SMSBMFTR" and len(raw) == 64 + body_len + meta_len + 104
    states = bytearray(n)
    entries = [bytes(48)] * n
    pos, block = 64, 0
    for _ in range(frame_count):
        stored, raw_len, enc, fres, k, first, count = FRAME.unpack_from(raw, pos)
        assert fres == bytes(3) and first == block and raw_len <= 1 << 20
        data = raw[pos + 32:pos + 32 + stored]
        if enc == 1:
            data = zstandard.ZstdDecompressor().decompress(data)
        else:
            assert enc == 0
        assert len(data) == raw_len
        recs = [RECORD.unpack_from(data, 24 * i) for i in range(k)]
        carried = [b for st_, fl, _r, s, c in recs if fl & 1 for b in range(s, s + c)]
        m = len(carried)
        assert raw_len == 24 * k + 48 * m
        hashes, addrs = data[24 * k:24 * k + 16 * m], data[24 * k + 16 * m:]
        for state, fl, rres, s, c in recs:
            assert s == block and rres == bytes(6) and state <= 2
            states[s:s + c] = bytes([state]) * c
            block += c
        for j, b in enumerate(carried):
            entries[b] = hashes[16 * j:16 * j + 16] + addrs[32 * j:32 * j + 32]
        assert block == first + count
        pos += 32 + stored
    assert pos == 64 + body_len and block == n
    return {"disk_size": disk_size, "block_size": block_size, "states": bytes(states),
            "entries": entries, "algorithm": algo.rstrip(b"\0").decode(), "digest": digest,
            "meta": json.loads(raw[pos:pos + meta_len]), "frames": frame_count,
            "version": version}


def doc_build(frames, *, n: int, block_size: int = 64 * KIB, disk_size: int | None = None,
              meta: bytes = b"{}", digest: bytes = bytes(32), frame_count: int | None = None,
              body_length: int | None = None, header: dict | None = None,
              pad: bytes = b"") -> bytes:
    """A version 2 file from the docs' layout: ``frames`` are lists of records
    ``(state, flags, start, count)``, each record with flag 1 carrying its blocks' entries
    (hash ``i % 256`` repeated, address ``255 - i``), frames stored uncompressed.  Fields
    can be forced to wrong values; the trailer checksum is always right."""
    h = dict(magic=b"SMSBMANI", version=2, hsize=64, disk_size=n * block_size if disk_size is None
             else disk_size, block_size=block_size, n=n, algo=b"sha256", flags=0, res=bytes(8))
    h.update(header or {})
    body = b""
    for recs in frames:
        hashes = addrs = b""
        for state, flags, start, count in recs:
            if flags & 1:
                for b in range(start, start + count):
                    hashes += bytes([b % 256]) * 16
                    addrs += bytes([255 - b % 256]) * 32
        raw = (b"".join(RECORD.pack(s, f, bytes(6), a, c) for s, f, a, c in recs) + hashes
               + addrs + pad)
        first = recs[0][2] if recs else 0
        count = sum(r[3] for r in recs)
        body += FRAME.pack(len(raw), len(raw), 0, bytes(3), len(recs), first, count) + raw
    out = HEADER.pack(*h.values()) + body + meta
    out += FOOTER.pack(b"SMSBMFTR", len(frames) if frame_count is None else frame_count,
                       len(body) if body_length is None else body_length, len(meta), digest)
    return out + TRAILER.pack(b"SMSBEND\0", hashlib.sha256(out).digest())


def digest_of(raw: bytes) -> bytes:
    """The digest a well-formed crafted file must carry (docs: "Digest"): version 2 per
    block, version 3 per maximal run of equal (state, carries entries)."""
    d = doc_read(raw)
    size = struct.pack("<QI", d["disk_size"], d["block_size"])
    if d["version"] == 2:
        h = hashlib.sha256(b"smsblock manifest digest v1\0" + size)
        for s, e in zip(d["states"], d["entries"]):
            h.update(bytes([s]) + e)
        return h.digest()
    h = hashlib.sha256(b"smsblock manifest digest v3\0" + size)
    key, count = None, 0
    for s, e in zip(d["states"], d["entries"]):
        k = (s, s == 2 or e != bytes(48))
        if k != key:
            if key is not None:
                h.update(struct.pack("<BBQ", key[0], key[1], count))
            key, count = k, 0
        count += 1
        if k[1]:
            h.update(e)
    if key is not None:
        h.update(struct.pack("<BBQ", key[0], key[1], count))
    return h.digest()


# -- strategies ----------------------------------------------------------------------

@st.composite
def run_manifests(draw, max_runs: int = 40):
    """Manifests made of runs: long ranges, DATA runs, now and then a non-DATA block with
    a hash or address left in it (the format keeps those too)."""
    bs = draw(st.sampled_from([64 * KIB, 512 * KIB, 4 * MIB]))
    runs = draw(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3000)), max_size=max_runs))
    n = sum(c for _, c in runs)
    tail = draw(st.integers(0, bs - 1)) if n else 0
    m = Manifest(max(0, n * bs - tail), bs, meta={"run": draw(st.text(max_size=5))},
                 address_algorithm=draw(st.sampled_from(["sha256", "blake3", "none"])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    at = 0
    for state, count in runs:
        m.states[at:at + count] = state
        at += count
    data = m.states == BlockState.DATA
    m.hashes[data] = rng.integers(0, 256, (int(data.sum()), 16), dtype=np.uint8)
    m.addresses[data] = rng.integers(0, 256, (int(data.sum()), 32), dtype=np.uint8)
    if n and draw(st.booleans()):
        stray = rng.integers(0, n, 3)
        m.hashes[stray, 0] |= 1
    return m


@settings(max_examples=60, deadline=None)
@given(run_manifests())
def test_v2_round_trip_matches_the_documented_layout(m):
    raw = m.to_bytes()
    back = Manifest.from_bytes(raw, "x")
    assert back == m and back.digest == m.digest
    assert Manifest.from_bytes(m._to_bytes_v1()).digest == m.digest     # same run, same digest
    d = doc_read(raw)
    assert d["states"] == m.states.tobytes()
    assert d["entries"] == [m.hashes[i].tobytes() + m.addresses[i].tobytes()
                            for i in range(m.n_blocks)]
    assert (d["disk_size"], d["block_size"], d["algorithm"], d["meta"], d["digest"]) == \
        (m.disk_size, m.block_size, m.address_algorithm, m.meta, m.digest)
    assert d["version"] == 3 and digest_of(raw) == m.digest
    v2 = m._to_bytes_v2()           # version 2 files (per-block digest) still load
    assert doc_read(v2)["version"] == 2 and digest_of(v2) == doc_read(v2)["digest"]
    assert Manifest.from_bytes(v2) == m
    # the streaming reader yields the same table, run by run
    at = 0
    for state, start, count, hashes, addresses in _runs_v2(memoryview(raw), "x"):
        assert start == at and (m.states[start:start + count] == state).all()
        if hashes is None:
            assert not m.hashes[start:start + count].any()
            assert not m.addresses[start:start + count].any()
        else:
            assert (m.hashes[start:start + count] == hashes).all()
            assert (m.addresses[start:start + count] == addresses).all()
        at += count
    assert at == m.n_blocks


def test_many_frames_and_fragmented_tables():
    """Runs longer than a frame, more records than a frame holds, frame edges inside a
    DATA run: all round trip, no decoded frame exceeds FRAME_RAW_MAX."""
    n = 250_000             # ends with 130k unallocated blocks: a range longer than a cut run
    m = Manifest(n * 64 * KIB, 64 * KIB, address_algorithm="blake3")
    rng = np.random.default_rng(7)
    m.states[:50_000] = rng.integers(0, 3, 50_000, dtype=np.uint8)     # ~33k short records
    m.states[60_000:110_000] = BlockState.DATA                          # 2.4 MB of entries
    data = m.states == BlockState.DATA
    m.hashes[data] = rng.integers(0, 256, (int(data.sum()), 16), dtype=np.uint8)
    m.addresses[data] = rng.integers(0, 256, (int(data.sum()), 32), dtype=np.uint8)
    raw = m.to_bytes()
    d = doc_read(raw)
    assert d["frames"] >= 4
    assert Manifest.from_bytes(raw) == m
    pos = 64
    for _ in range(d["frames"]):
        stored, raw_len = FRAME.unpack_from(raw, pos)[:2]
        assert raw_len <= FRAME_RAW_MAX
        pos += 32 + stored


def normalized(runs):
    """Runs ``(state, start, count, entries bytes or None)`` with neighbours of the same
    state and carrying merged: what a table says, whatever the cuts."""
    out = []
    for state, start, count, entries in runs:
        if out and out[-1][0] == state and (out[-1][3] is None) == (entries is None):
            p = out[-1]
            out[-1] = (state, p[1], p[2] + count, None if entries is None else p[3] + entries)
        else:
            out.append((state, start, count, entries))
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.integers(1, 60_000)),
                min_size=1, max_size=12),
       st.lists(st.integers(1, 2**38), max_size=4), st.data())
def test_sparse_encoder_round_trips_any_runs(runs, big, data):
    """_encode_v2 on runs of any length (ranges up to 2**38 blocks, four of them at most so
    the table stays within the format's 2**40 blocks; carrying runs longer than a frame)
    reads back, through the streaming reader, as the same table."""
    rng = np.random.default_rng(len(runs))
    states, starts, counts, carries, want = [], [], [], [], []
    at = 0
    for i, (state, carry, count) in enumerate(runs):
        carry = carry or state == 2
        if not carry and big:
            count = big.pop()
        entries = rng.integers(0, 256, (count, 48), dtype=np.uint8) if carry else None
        states.append(state), starts.append(at), counts.append(count), carries.append(carry)
        want.append((state, at, count, None if entries is None else entries.tobytes()))
        at += count
    e = [w[3] for w in want if w[3] is not None]
    entries = np.frombuffer(b"".join(e), np.uint8).reshape(-1, 48)
    bs = data.draw(st.sampled_from([64 * KIB, 4 * MIB]))
    raw = _encode_v2(at * bs, bs, "sha256", bytes(32), states, starts, counts, carries,
                     entries[:, :16], entries[:, 16:], b"{}")
    got = [(s_, a, c, None if h is None else np.concatenate([h, ad], axis=1).tobytes())
           for s_, a, c, h, ad in _runs_v2(memoryview(raw), "r")]
    assert normalized(got) == normalized(want)


# -- size ----------------------------------------------------------------------------

def clusters(n: int, data_blocks: int, n_clusters: int, seed: int = 1):
    """Runs of a disk of ``n`` blocks whose ``data_blocks`` DATA blocks sit in clusters,
    the rest unallocated except a ZERO block before each cluster: the sparse description
    _encode_v2 takes, and the random entries."""
    rng = np.random.default_rng(seed)
    per = data_blocks // n_clusters
    where = np.sort(rng.choice(n // (per + 2), n_clusters, replace=False)) * (per + 2)
    states, starts, counts, carries = [], [], [], []
    at = 0
    for w in where.tolist():
        if w > at:
            states += [0]; starts += [at]; counts += [w - at]; carries += [False]
        states += [1, 2]; starts += [w, w + 1]; counts += [1, per]; carries += [False, True]
        at = w + 1 + per
    if at < n:
        states += [0]; starts += [at]; counts += [n - at]; carries += [False]
    hashes = rng.integers(0, 256, (per * n_clusters, 16), dtype=np.uint8)
    addresses = rng.integers(0, 256, (per * n_clusters, 32), dtype=np.uint8)
    return states, starts, counts, carries, hashes, addresses


def test_16_tib_disk_with_1_gib_of_data_fits_in_256_kib():
    bs = 512 * KIB
    n = 16 * TIB // bs                      # 33.5 M blocks: 1.6 GB as v1 or in memory
    runs = clusters(n, GIB // bs, 8)
    raw = _encode_v2(16 * TIB, bs, "blake3", bytes(32), *runs, b'{"server_id":"big"}')
    assert len(raw) <= 256 * KIB, len(raw)
    assert len(raw) < 2048 * 48 * 1.05     # proportional to the DATA entries it lists
    # the streaming reader goes through it in bounded memory: never the 1.6 GB table
    states, starts, counts, carries, hashes, addresses = runs
    tracemalloc.start()
    try:
        got = []
        for state, start, count, h, a in _runs_v2(memoryview(raw), "big"):
            got.append((state, start, count, None if h is None else (h.tobytes(), a.tobytes())))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, peak
    at = 0
    want = []
    for s, a, c, carry in zip(states, starts, counts, carries):
        want.append((s, a, c, (hashes[at:at + c].tobytes(), addresses[at:at + c].tobytes())
                     if carry else None))
        at += c if carry else 0
    assert got == want
    # an empty 16 TiB disk is a few hundred bytes
    empty = _encode_v2(16 * TIB, bs, "none", bytes(32), [0], [0], [n], [False],
                       np.zeros((0, 16), np.uint8), np.zeros((0, 32), np.uint8), b"{}")
    assert len(empty) < 400


def test_manifest_size_is_proportional_to_its_data(tmp_path):
    """Through Manifest.save: 256 GiB at 512 KiB with 1 GiB of data (v1: 25 MB)."""
    bs = 512 * KIB
    n = 256 * GIB // bs
    m = Manifest(n * bs, bs, address_algorithm="sha256", meta={"server_id": "s"})
    states, starts, counts, carries, hashes, addresses = clusters(n, GIB // bs, 8)
    for s, a, c in zip(states, starts, counts):
        m.states[a:a + c] = s
    data = m.states == BlockState.DATA
    m.hashes[data], m.addresses[data] = hashes, addresses
    m.save(tmp_path / "m")
    size = os.path.getsize(tmp_path / "m")
    assert size <= 2048 * 48 + 4 * KIB, size
    assert len(m._to_bytes_v1()) > 100 * size
    assert Manifest.load(tmp_path / "m") == m


# -- every check, with its offset ------------------------------------------------------

def good_frames():
    return [[(2, 1, 0, 3), (1, 0, 3, 2)], [(0, 0, 5, 10), (2, 1, 15, 1)]]


def test_crafted_file_from_the_docs_loads():
    raw = doc_build(good_frames(), n=16)
    raw = doc_build(good_frames(), n=16, digest=digest_of(raw))
    m = Manifest.from_bytes(raw)
    assert m.states.tolist() == [2, 2, 2, 1, 1] + [0] * 10 + [2]
    assert m.hashes[15].tolist() == [15] * 16 and m.addresses[1].tolist() == [254] * 32


END = -104     # the footer's offset from the end


@pytest.mark.parametrize("kwargs, message, offset", [
    (dict(header=dict(hsize=128)), "header size 128", 12),
    (dict(header=dict(block_size=3 * 64 * KIB)), "not a power of two", 24),
    (dict(header=dict(n=17)), "block count 17 does not cover", 28),
    (dict(header=dict(algo=b"\xff")), "bad address algorithm", 36),
    (dict(header=dict(flags=4)), "unknown flags", 52),
    (dict(header=dict(res=b"\1" + bytes(7))), "reserved header bytes", 56),
    (dict(frame_count=17), "frame count 17 exceeds", END + 8),
    (dict(frame_count=3), "frame header truncated", None),
    (dict(frame_count=1), "bytes after the last frame", None),
    (dict(body_length=10**9), "frames length", END + 16),
    (dict(frames=[[(2, 1, 0, 3), (1, 0, 3, 2)]]), "the frames cover 5 of 16 blocks", None),
    (dict(frames=[[(2, 1, 0, 3)], [(0, 0, 4, 12)]]), "frame starts at block 4, expected 3",
     None),
    (dict(frames=[[(3, 0, 0, 16)]]), "record 0 of the frame: invalid state 3", 64),
    (dict(frames=[[(0, 2, 0, 16)]]), "unknown flags or reserved", 64),
    (dict(frames=[[(2, 0, 0, 16)]]), "DATA record without hashes", 64),
    (dict(frames=[[(0, 0, 0, 6), (1, 0, 7, 10)]]), "record 1 of the frame: starts at block 7",
     64),
    (dict(frames=[[(0, 0, 0, 0), (0, 0, 0, 16)]]), "record 0 of the frame: block count 0", 64),
    (dict(frames=[[(0, 0, 0, 2**64 - 1)]]), "frame block count", 88),
    (dict(frames=[[]]), "frame block count 0", 88),
    (dict(frames=[[(0, 0, 0, 16)]], pad=bytes(48)), "1 records carrying 0 entries do not fill",
     64),
])
def test_crafted_bad_fields_name_file_and_offset(kwargs, message, offset):
    args = dict(frames=good_frames(), n=16)
    args.update(kwargs)
    raw = doc_build(args.pop("frames"), **args)
    with pytest.raises(ManifestError, match=message) as e:
        Manifest.from_bytes(raw, "crafted.manifest")
    assert "crafted.manifest, offset" in str(e.value)
    if offset is not None:
        assert e.value.offset == (offset if offset >= 0 else len(raw) + offset)


def test_frame_field_checks():
    """Fields only a patched frame header reaches (resealed so the checksum passes)."""
    base = doc_build(good_frames(), n=16)

    def patched(at: int, fmt: str, value) -> bytes:
        b = bytearray(base)
        struct.pack_into(fmt, b, at, value)
        b[-32:] = hashlib.sha256(bytes(b[:-40])).digest()
        return bytes(b)

    for at, fmt, value, message in [
            (64, "<I", 10**6, "runs past the frames"),
            (64, "<I", 3, "stored frame length 3 is not its raw length"),
            (68, "<I", FRAME_RAW_MAX + 1, "exceeds"),
            (72, "<B", 9, "unknown frame encoding 9"),
            (72, "<B", 1, "does not decompress"),
            (73, "<B", 1, "reserved frame header"),
            (76, "<I", 0, "record count 0"),
            (76, "<I", 10**6, "record count 1000000 is impossible"),
            (76, "<I", 1, "the records cover 3 of the frame's 5 blocks"),
    ]:
        with pytest.raises(ManifestError, match=message) as e:
            Manifest.from_bytes(patched(at, fmt, value), "f")
        assert e.value.offset is not None and e.value.path == "f"


def test_zstd_frame_lies_about_its_size():
    """A frame whose zstd content declares more than the frame header: refused before
    the decoder allocates what it declares."""
    n = 1 << 20
    recs = RECORD.pack(0, 0, bytes(6), 0, n)
    for payload, message in [(zstandard.ZstdCompressor().compress(recs + bytes(64 << 20)),
                              "declares"),
                             (zstandard.ZstdCompressor().compress(recs) + b"junk",
                              "not exactly one zstd frame"),
                             (zstandard.ZstdCompressor(write_content_size=False).compress(recs),
                              "declares")]:
        body = FRAME.pack(len(payload), 24, 1, bytes(3), 1, 0, n) + payload
        out = HEADER.pack(b"SMSBMANI", 2, 64, n * 64 * KIB, 64 * KIB, n, b"none", 0, bytes(8))
        out += body + b"{}" + FOOTER.pack(b"SMSBMFTR", 1, len(body), 2, bytes(32))
        out += TRAILER.pack(b"SMSBEND\0", hashlib.sha256(out).digest())
        with pytest.raises(ManifestError, match=message):
            Manifest.from_bytes(out, "z")


# -- fuzzing under a memory limit --------------------------------------------------------

FUZZ_WORKER = r"""
import hashlib, json, random, resource, struct, sys, time
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np
from smsblock.errors import ManifestError
from smsblock.manifest import Manifest, BlockState

rng = np.random.default_rng(5)
bases = []
m = Manifest(3000 * 65536 + 5, 65536, address_algorithm="sha256", meta={"k": "v"})
m.states[:] = rng.integers(0, 3, 3001, dtype=np.uint8)
m.states[1000:2500] = 2                                    # stored (random) entries
d = m.states == 2
m.hashes[d] = rng.integers(0, 256, (int(d.sum()), 16), dtype=np.uint8)
m.addresses[d] = rng.integers(0, 256, (int(d.sum()), 32), dtype=np.uint8)
bases.append(m.to_bytes())
z = Manifest(4000 * 65536, 65536)
z.states[::7] = 1                                          # compressed record frames
bases.append(z.to_bytes())
bases.append(Manifest(10, 65536).to_bytes())

def reseal(b):
    b[-32:] = hashlib.sha256(bytes(b[:-40])).digest()
    return bytes(b)

HUGE = [0, 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**48, 2**63, 2**64 - 1]
r = random.Random(int(sys.argv[2]))
out = {"ok": 0, "refused": 0, "other": [], "slowest": 0.0}
start = time.monotonic()
for i in range(int(sys.argv[3])):
    raw = bytearray(r.choice(bases))
    kind = i % 5
    if kind == 0:                                          # flip bytes, reseal
        for _ in range(r.randint(1, 4)):
            raw[r.randrange(len(raw) - 40)] ^= r.randint(1, 255)
        data = reseal(raw)
    elif kind == 1:                                        # an absurd u64/u32, resealed
        at = r.randrange(len(raw) - 48)
        if r.random() < 0.5:
            struct.pack_into("<Q", raw, at, r.choice(HUGE))
        else:
            struct.pack_into("<I", raw, at, r.choice(HUGE) & 0xFFFFFFFF)
        data = reseal(raw)
    elif kind == 2:                                        # a header or footer field
        at = r.choice([16, 24, 28, 36, 52, len(raw) - 96, len(raw) - 88, len(raw) - 80,
                       64, 68, 76, 80, 88])
        struct.pack_into("<Q", raw, at, r.choice(HUGE))
        data = reseal(raw)
    elif kind == 3:                                        # truncated or extended
        cut = r.randrange(len(raw) + 50)
        data = bytes(raw[:cut]) if cut < len(raw) else bytes(raw) + bytes(cut - len(raw))
    else:                                                  # plain flips (checksum fails)
        raw[r.randrange(len(raw))] ^= 0x40
        data = bytes(raw)
    t = time.monotonic()
    try:
        Manifest.from_bytes(data, "fuzz.manifest")
        out["ok"] += 1
    except ManifestError as e:
        if e.path != "fuzz.manifest" or e.offset is None:
            out["other"].append("unlocated: " + str(e))
        out["refused"] += 1
    except BaseException as e:
        out["other"].append(f"{i} {kind}: {type(e).__name__}: {e}"[:300])
    out["slowest"] = max(out["slowest"], time.monotonic() - t)
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def test_fuzzed_v2_files_give_only_manifest_errors_in_bounded_memory():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    proc = subprocess.run([sys.executable, "-c", FUZZ_WORKER, str(512 * MIB), "11", "3000"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["other"] == [], out["other"][:10]
    assert out["refused"] > 2900, out
    assert out["slowest"] < 2, out


def test_a_file_claiming_a_huge_disk_is_refused_not_fatal():
    """A well-formed file of a 2**36-block disk (its ranges cost 24 bytes) cannot be held
    by the in-memory table: a ManifestError, under a memory limit, not a MemoryError."""
    n = 2**36
    raw = doc_build([[(0, 0, 0, n)]], n=n)
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({512 * MIB}, {512 * MIB}))\n"
        "from smsblock.manifest import Manifest\n"
        "from smsblock.errors import ManifestError\n"
        "try:\n"
        "    Manifest.from_bytes(sys.stdin.buffer.read(), 'huge.manifest')\n"
        "except ManifestError as e:\n"
        "    print(e)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], input=raw, capture_output=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"huge.manifest, offset 28: 68719476736 blocks do not fit in memory" in proc.stdout
