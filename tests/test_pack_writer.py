"""PackWriter's write path: O_DIRECT from one reused buffer where the filesystem allows it
(a pack is not copied into the page cache), the page cache elsewhere; the bytes are the
same either way, wherever the writes' chunk boundaries fall."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import struct
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from smsblock import pack
from smsblock.pack import (FOOTER, FOOTER_MAGIC, HEADER, INDEX_DTYPE, PACK_MAGIC, PACK_VERSION,
                           WRITE_CHUNK, PackWriter, read_index)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def cached_pages(path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages of the file), by mincore(2)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del addr
        return sum(v & 1 for v in vec), pages


def expected_pack(frames: list[bytes], ulen: int | list[int] = 1 << 20) -> bytes:
    """The pack file docs/formats.md describes, built independently of PackWriter."""
    import xxhash
    header = HEADER.pack(PACK_MAGIC, PACK_VERSION, 2, 0)
    index = np.zeros(len(frames), INDEX_DTYPE)
    offset = HEADER.size
    ulens = ulen if isinstance(ulen, list) else [ulen] * len(frames)
    for i, f in enumerate(frames):
        index[i] = (np.frombuffer(hashlib.sha256(f).digest(), np.uint8), offset, len(f), ulens[i])
        offset += len(f)
    body = header + b"".join(frames)
    ib = index.tobytes()
    return body + ib + FOOTER.pack(FOOTER_MAGIC, PACK_VERSION, 2, len(frames), len(body),
                                   hashlib.sha256(ib).digest(), xxhash.xxh3_64(body).digest())


def write(path, frames: list[bytes], ulen: int = 1 << 20) -> PackWriter:
    w = PackWriter(path, "blake3")
    for f in frames:
        w.add(hashlib.sha256(f).digest(), f, ulen)
    w.seal()
    return w


def frame_sets():
    rng = np.random.default_rng(5)
    fixed = HEADER.size + FOOTER.size
    yield "one small", [rng.bytes(100)]
    yield "no frames", []
    yield "crossing chunks", [rng.bytes(int(n)) for n in rng.integers(1, 3 << 20, 7)]
    # the whole file exactly two chunks: no tail to pad
    yield "chunk multiple", [rng.bytes(WRITE_CHUNK), rng.bytes(WRITE_CHUNK - fixed - 2 * 48)]
    # a frame ending exactly where a chunk does, then more
    yield "frame ends a chunk", [rng.bytes(WRITE_CHUNK - HEADER.size), rng.bytes(5000)]


@pytest.mark.parametrize("name,frames", list(frame_sets()), ids=[n for n, _ in frame_sets()])
def test_pack_bytes_wherever_chunks_end(tmp_path, name, frames):
    path = tmp_path / "p.pack"
    w = write(path, frames)
    data = path.read_bytes()
    assert data == expected_pack(frames)
    assert w.sealed_size == len(data)
    footer, index = read_index(lambda o, n: data[o:o + n], len(data), "p", check_id=False)
    assert footer.count == len(frames)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_pack_is_written_around_the_page_cache(tmp_path):
    """Where the filesystem takes O_DIRECT (tmp_path here), a sealed pack leaves (almost)
    nothing in the page cache: its bytes were not copied into fresh cache pages."""
    rng = np.random.default_rng(1)
    frames = [rng.bytes(512 << 10) for _ in range(24)]       # 12 MiB
    path = tmp_path / "p.pack"
    w = write(path, frames)
    if not getattr(w, "direct", True):
        pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
    cached, pages = cached_pages(path)
    assert pages > 3000
    assert cached <= 2, f"{cached} of {pages} pages of the pack are in the page cache"
    assert path.read_bytes() == expected_pack(frames)


def test_a_device_refusing_the_alignment_gets_the_page_cache(tmp_path, monkeypatch):
    """EINVAL from an O_DIRECT write (an alignment the device does not take) turns
    O_DIRECT off for that pack and writes the same bytes through the page cache."""
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl_flags(fd) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(pack.os, "pwrite", pwrite)
    rng = np.random.default_rng(2)
    frames = [rng.bytes(int(n)) for n in rng.integers(1, 2 << 20, 5)]
    path = tmp_path / "p.pack"
    w = write(path, frames)
    assert not w.direct
    assert path.read_bytes() == expected_pack(frames)


def fcntl_flags(fd: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


# --- raw frames: blocks that do not compress --------------------------------------------

RAW_SIZES = [1, 4095, pack.RAW_BLOCK_MAX - 1, pack.RAW_BLOCK_MAX, pack.RAW_BLOCK_MAX + 1,
             512 << 10, 3 * pack.RAW_BLOCK_MAX + 7, pack.MAX_BLOCK]


def raw_frame(data: bytes) -> bytes:
    out = bytearray(pack.raw_frame_size(len(data)) + 5)      # room to spare: length returned
    n = pack.write_raw_frame(out, data)
    assert n == pack.raw_frame_size(len(data))
    return bytes(out[:n])


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=300_000))
def test_a_raw_frame_is_zstd_that_zstandard_reads(data):
    import zstandard
    frame = raw_frame(data)
    assert zstandard.get_frame_parameters(frame).content_size == len(data)
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    assert pack.decompress_block(frame, len(data)) == data


def raw_frame_by_hand(data: bytes) -> bytes:
    """The frame format written out in Python (RFC 8878): what the native writer means."""
    out = struct.pack("<IBI", 0xFD2FB528, 0xA0, len(data))
    pieces = [data[i:i + pack.RAW_BLOCK_MAX] for i in range(0, len(data), pack.RAW_BLOCK_MAX)] or [b""]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out += ((len(piece) << 3) | last).to_bytes(3, "little") + piece
    return out


@settings(max_examples=100, deadline=None)
@given(size=st.sampled_from([0, 1, 7, *RAW_SIZES[:-1]]) | st.integers(0, 600_000),
       spare=st.integers(0, 9))
def test_the_native_frame_writer_writes_the_format_byte_for_byte(size, spare):
    data = np.random.default_rng(size).bytes(size)
    out = bytearray(b"\xee" * (pack.raw_frame_size(size) + spare))
    n = pack.write_raw_frame(out, data)
    assert bytes(out[:n]) == raw_frame_by_hand(data) and n == pack.raw_frame_size(size)
    assert out[n:] == b"\xee" * spare                        # nothing written past it
    with pytest.raises(ValueError):
        pack.write_raw_frame(bytearray(pack.raw_frame_size(size) - 1), data)


def test_copy_into_copies_there_and_refuses_what_does_not_fit():
    from smsblock._frames import copy_into
    dst = bytearray(10)
    copy_into(dst, 3, b"abcd")
    assert dst == b"\0\0\0abcd\0\0\0"
    copy_into(dst, 10, b"")
    for at, src in ((7, b"abcd"), (-1, b"a"), (11, b""), (2**63 - 2, b"abc")):
        with pytest.raises(ValueError):
            copy_into(dst, at, src)
    with pytest.raises((TypeError, ValueError, BufferError)):
        copy_into(b"read-only", 0, b"a")


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=3000) | st.integers(0, 700_000).map(
           lambda n: np.random.default_rng(n).bytes(n)),
       cuts=st.lists(st.integers(0, 700_000), max_size=5), head=st.binary(max_size=40))
def test_the_native_frames_checksum_is_xxh3_64_fed_in_any_pieces(data, cuts, head):
    """The pack's running frames checksum (hashed without the GIL) against python-xxhash
    over the same bytes, fed whole: pieces of any size, bytes, bytearray views, empty."""
    import xxhash
    from smsblock._frames import Xxh3Stream
    h = Xxh3Stream(head) if head else Xxh3Stream()
    at = 0
    for i, cut in enumerate(sorted(min(c, len(data)) for c in cuts) + [len(data)]):
        piece = data[at:cut]
        h.update(piece if i % 2 else memoryview(bytearray(piece)))
        at = cut
    assert h.digest() == xxhash.xxh3_64(head + data).digest()
    with pytest.raises(TypeError):
        h.update(None)


def test_copy_hashed_into_copies_there_and_feeds_the_checksum():
    """The fused copy + frames checksum means copy_into, then Xxh3Stream.update."""
    import xxhash
    from smsblock._frames import Xxh3Stream, copy_hashed_into
    rng = np.random.default_rng(3)
    for size in (0, 1, (16 << 10) - 1, 16 << 10, (16 << 10) + 1, 700_001):
        src, at = rng.bytes(size), int(rng.integers(0, 50))
        dst, h = bytearray(b"\xee" * (at + size + 7)), Xxh3Stream(b"head")
        copy_hashed_into(dst, at, src, h)
        assert dst == b"\xee" * at + src + b"\xee" * 7
        assert h.digest() == xxhash.xxh3_64(b"head" + src).digest()
    h = Xxh3Stream()
    for at, src in ((7, b"abcd"), (-1, b"a"), (11, b""), (2**63 - 2, b"abc")):
        with pytest.raises(ValueError):
            copy_hashed_into(bytearray(10), at, src, h)
    assert h.digest() == xxhash.xxh3_64(b"").digest()       # nothing hashed on refusal


@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from([0, 1, 7, *RAW_SIZES[:-1]]) | st.integers(0, 600_000),
       at=st.integers(0, 9), spare=st.integers(0, 9), head=st.binary(max_size=20))
def test_the_hashed_frame_writer_is_the_frame_writer_and_the_checksum(size, at, spare, head):
    """write_raw_frame_hashed(out, at, data, h) means write_raw_frame(out[at:], data),
    then h.update(the frame)."""
    import xxhash
    from smsblock._frames import Xxh3Stream, write_raw_frame_hashed
    data = np.random.default_rng(size).bytes(size)
    frame = raw_frame_by_hand(data)
    out, h = bytearray(b"\xee" * (at + len(frame) + spare)), Xxh3Stream(head)
    assert write_raw_frame_hashed(out, at, data, h) == len(frame)
    assert out == b"\xee" * at + frame + b"\xee" * spare     # nothing written around it
    assert h.digest() == xxhash.xxh3_64(head + frame).digest()
    with pytest.raises(ValueError):
        write_raw_frame_hashed(bytearray(at + len(frame) - 1), at, data, h)


@pytest.mark.parametrize("handed_out", [False, True])
def test_raw_and_compressed_frames_make_the_same_pack_wherever_buffers_end(tmp_path, handed_out):
    """add_raw (a raw frame written straight into the write buffer) makes the pack that
    add of the same frame does, buffers written here or handed to ``flush`` (as a pack
    sink's writer thread does, in order, before the seal)."""
    rng = np.random.default_rng(8)
    sizes = [int(n) for n in rng.integers(1, 1 << 20, 12)] + [WRITE_CHUNK - 40, 5, 512 << 10]
    blocks = [rng.bytes(n) for n in sizes]
    frames = [raw_frame_by_hand(b) for b in blocks]
    handed: list = []
    w = PackWriter(tmp_path / "p.pack", "blake3",
                   flush=(lambda *a: handed.append(a)) if handed_out else None)
    for i, (b, f) in enumerate(zip(blocks, frames)):
        address = hashlib.sha256(f).digest()
        if i % 3 == 2:      # a compressed frame among the raw ones
            w.add(address, f, len(b))
        else:
            assert w.add_raw(address, b) == len(f)
    assert len(handed) == (sum(map(len, frames)) + HEADER.size) // WRITE_CHUNK if handed_out else not handed
    for writer, buf, offset, length in handed:
        writer.write_at(buf, offset, length)
        pack.give_buffer(buf)
    w.seal()
    assert (tmp_path / "p.pack").read_bytes() == expected_pack(frames, [len(b) for b in blocks])


@pytest.mark.parametrize("size", RAW_SIZES)
def test_a_raw_frame_is_zstd_that_the_zstd_cli_reads(tmp_path, size):
    data = np.random.default_rng(size).bytes(size)
    path = tmp_path / "b.zst"
    path.write_bytes(raw_frame(data))
    subprocess.run(["zstd", "-q", "-t", str(path)], check=True)
    out = subprocess.run(["zstd", "-q", "-d", "-c", str(path)], check=True, capture_output=True)
    assert out.stdout == data
    listed = subprocess.run(["zstd", "-l", "-v", str(path)], check=True, capture_output=True,
                            text=True).stdout
    assert f"({size} B)" in listed.replace(",", "") or f"{size} B" in listed.replace(",", "")


def test_only_what_does_not_compress_is_judged_incompressible():
    import zstandard
    c = zstandard.ZstdCompressor(level=1)
    rng = np.random.default_rng(3)
    bs = 512 << 10
    words = [b"kernel ", b"the ", b"config ", b"0x7f3a ", b"/usr/lib ", b"\n"]
    text = b"".join(rng.choice(words, bs // 4).tolist())[:bs]
    assert pack.looks_incompressible(rng.bytes(bs), c)
    assert pack.looks_incompressible(rng.bytes(pack.SAMPLE_MIN), c)
    compressible = {
        "text": rng.bytes(16) + text[16:],
        "small alphabet": rng.choice(np.array([0, 1, 2, 0xFF, 0x40], np.uint8), bs).tobytes(),
        "zeros": bytes(bs),
        "half random, half zeros": rng.bytes(bs // 2) + bytes(bs // 2),
        "random, zeros every other 64 KiB": b"".join(
            rng.bytes(64 << 10) + bytes(64 << 10) for _ in range(bs // (128 << 10))),
        "zeros, random every other 64 KiB": b"".join(
            bytes(64 << 10) + rng.bytes(64 << 10) for _ in range(bs // (128 << 10))),
        "random, zeros every other 4 KiB": b"".join(
            rng.bytes(4096) + bytes(4096) for _ in range(bs // 8192)),
        "random first half": rng.bytes(bs // 2) + text[:bs // 2],
        "random last half": text[:bs // 2] + rng.bytes(bs // 2),
    }
    for name, block in compressible.items():
        assert len(c.compress(block)) < 0.9 * len(block), name
        assert not pack.looks_incompressible(block, c), name
    # small blocks are always given to zstd
    assert not pack.looks_incompressible(rng.bytes(pack.SAMPLE_MIN - 1), c)
