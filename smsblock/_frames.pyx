# cython: language_level=3
"""Native copies of a changed block on its way into a pack, and the pack's running
checksum of its frames, with the GIL released.

A run's changed blocks are copied twice on their way to disk: into a zstd frame (raw
blocks, when the block does not compress) by a scan worker, then into the pack's write
buffer by the pack writer.  Done by Python slice assignment, each 512 KiB copy held the
GIL (15-80 us, more while the scan loads memory), stalling the scan workers' own Python
between their batches.  The pack's frames checksum (XXH3-64) was python-xxhash's, which
holds the GIL while it hashes: 20-75 us a block in the pack writer thread, during which
neither scan worker could run its Python; at 8 GiB with 2 % changed, a run spent ~65 ms
longer in its scan for it (in-process A/B).  smsblock/pack.py is the Python API; tests check these against
zstandard and the frame format written out by hand.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "xxhash.h" nogil:
    ctypedef struct XXH3_state_t:
        pass
    ctypedef struct XXH64_canonical_t:
        unsigned char digest[8]
    XXH3_state_t *XXH3_createState()
    int XXH3_freeState(XXH3_state_t *state)
    int XXH3_64bits_reset(XXH3_state_t *state)
    uint64_t XXH3_64bits_digest(const XXH3_state_t *state)
    void XXH64_canonicalFromHash(XXH64_canonical_t *dst, uint64_t h)

# Debian's libxxhash exports runtime-dispatched entry points (AVX2/AVX-512) on x86
cdef extern from *:
    """
    #include <xxhash.h>
    #if defined(__x86_64__) || defined(__i386__)
    #include <xxh_x86dispatch.h>
    #define smsblock_xxh3_64_update(s, p, n) XXH3_64bits_update_dispatch((s), (p), (n))
    #else
    #define smsblock_xxh3_64_update(s, p, n) XXH3_64bits_update((s), (p), (n))
    #endif
    """
    int smsblock_xxh3_64_update(XXH3_state_t *state, const void *data, size_t length) nogil

cdef enum:
    RAW_BLOCK_MAX = 128 * 1024          # zstd's largest block
    HEADER_SIZE = 9                     # magic, descriptor, 4-byte content size
    HASH_CHUNK = 16 * 1024              # copied, then hashed while still in L1


BLOCK_MAX = RAW_BLOCK_MAX       # for Python: pack.RAW_BLOCK_MAX


cdef inline void put_le24(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF


def raw_frame_size(Py_ssize_t n):
    """Bytes of the raw zstd frame of ``n`` bytes."""
    cdef Py_ssize_t blocks = (n + RAW_BLOCK_MAX - 1) // RAW_BLOCK_MAX
    if blocks < 1:
        blocks = 1
    return HEADER_SIZE + 3 * blocks + n


cdef Py_ssize_t put_raw_frame(uint8_t *dst, const uint8_t *src, Py_ssize_t n,
                              XXH3_state_t *state) noexcept nogil:
    """The raw frame of ``src[:n]`` at ``dst`` (the caller checked it fits); returns its
    length.  With ``state``, the frame is fed to it as it is written: each piece of at
    most HASH_CHUNK bytes hashed from ``dst`` just after it is copied there."""
    cdef Py_ssize_t pos = HEADER_SIZE, start = 0, k, piece, hashed = 0
    cdef Py_ssize_t chunk = HASH_CHUNK if state != NULL else RAW_BLOCK_MAX
    cdef bint last
    dst[0] = 0x28; dst[1] = 0xB5; dst[2] = 0x2F; dst[3] = 0xFD      # 0xFD2FB528, LE
    dst[4] = 0xA0
    dst[5] = n & 0xFF; dst[6] = (n >> 8) & 0xFF
    dst[7] = (n >> 16) & 0xFF; dst[8] = (n >> 24) & 0xFF
    while True:
        k = n - start
        if k > RAW_BLOCK_MAX:
            k = RAW_BLOCK_MAX
        last = start + k >= n
        put_le24(dst + pos, <uint32_t>((k << 3) | last))
        pos += 3
        while k:
            piece = k if k < chunk else chunk
            memcpy(dst + pos, src + start, <size_t>piece)
            pos += piece
            start += piece
            k -= piece
            if state != NULL:
                smsblock_xxh3_64_update(state, dst + hashed, <size_t>(pos - hashed))
                hashed = pos
        if last:
            break
    if state != NULL and hashed < pos:
        smsblock_xxh3_64_update(state, dst + hashed, <size_t>(pos - hashed))
    return pos


cdef Py_ssize_t checked_frame_size(Py_ssize_t n, Py_ssize_t at, Py_ssize_t room) except -1:
    """The raw frame's size of ``n`` bytes, checked to fit ``room`` bytes from ``at``."""
    if n >= (<Py_ssize_t>1 << 32):
        raise ValueError(f"a block of {n} bytes is too large for a frame")
    cdef Py_ssize_t need = raw_frame_size(n)
    if at < 0 or at > room or need > room - at:
        raise ValueError(f"a frame of {need} bytes at {at} does not fit {room}")
    return need


def write_raw_frame(uint8_t[::1] out not None, const uint8_t[::1] data not None):
    """Write into ``out`` one zstd frame holding ``data`` as raw blocks (RFC 8878: magic,
    a single-segment frame header with a 4-byte content size, then raw blocks of at
    most 128 KiB, each after a 3-byte header: last-block bit, type 0, size); return its
    length.  ValueError when ``out`` is too small or ``data`` 4 GiB or more."""
    cdef Py_ssize_t n = data.shape[0]
    checked_frame_size(n, 0, out.shape[0])
    cdef uint8_t *dst = &out[0]
    cdef const uint8_t *src = &data[0] if n else NULL
    cdef Py_ssize_t length
    with nogil:
        length = put_raw_frame(dst, src, n, NULL)
    return length


def copy_into(uint8_t[::1] dst not None, Py_ssize_t at, const uint8_t[::1] src not None):
    """``dst[at:at + len(src)] = src``; ValueError when it does not fit."""
    cdef Py_ssize_t n = src.shape[0]
    if at < 0 or at > dst.shape[0] or n > dst.shape[0] - at:     # no overflow in at + n
        raise ValueError(f"{n} bytes at {at} do not fit {dst.shape[0]}")
    if n:
        with nogil:
            memcpy(&dst[at], &src[0], <size_t>n)


def copy_hashed_into(uint8_t[::1] dst not None, Py_ssize_t at, const uint8_t[::1] src not None,
                     Xxh3Stream stream not None):
    """``dst[at:at + len(src)] = src`` and ``stream.update(src)``, in one section
    without the GIL: the copy goes in L1-sized pieces, each hashed from the copy while it
    is still in the cache.  ValueError when it does not fit."""
    cdef Py_ssize_t n = src.shape[0]
    if at < 0 or at > dst.shape[0] or n > dst.shape[0] - at:     # no overflow in at + n
        raise ValueError(f"{n} bytes at {at} do not fit {dst.shape[0]}")
    if n == 0:
        return
    cdef uint8_t *d = &dst[at]
    cdef const uint8_t *s = &src[0]
    cdef Py_ssize_t off = 0, k
    with nogil:
        while off < n:
            k = n - off
            if k > HASH_CHUNK:
                k = HASH_CHUNK
            memcpy(d + off, s + off, <size_t>k)
            smsblock_xxh3_64_update(stream.state, d + off, <size_t>k)
            off += k


def write_raw_frame_hashed(uint8_t[::1] out not None, Py_ssize_t at,
                           const uint8_t[::1] data not None, Xxh3Stream stream not None):
    """:func:`write_raw_frame` into ``out[at:]``, and ``stream.update(frame)``, in one
    section without the GIL: each L1-sized piece is hashed from ``out`` just after it is
    copied there.  Returns the frame's length; ValueError when it does not fit."""
    cdef Py_ssize_t n = data.shape[0]
    checked_frame_size(n, at, out.shape[0])
    cdef uint8_t *dst = &out[at]
    cdef const uint8_t *src = &data[0] if n else NULL
    cdef Py_ssize_t length
    with nogil:
        length = put_raw_frame(dst, src, n, stream.state)
    return length


cdef class Xxh3Stream:
    """XXH3-64 of bytes fed in pieces (what ``xxhash.xxh3_64`` computes), hashing without
    the GIL.  ``digest()`` is the canonical (big-endian) 8 bytes.  One thread at a time
    (a pack writer's, a verify's)."""

    cdef XXH3_state_t *state

    def __cinit__(self, const uint8_t[::1] data=None):
        self.state = XXH3_createState()
        if self.state == NULL:
            raise MemoryError("cannot allocate an XXH3 state")
        XXH3_64bits_reset(self.state)
        if data is not None:
            self.update(data)

    def __dealloc__(self):
        if self.state != NULL:
            XXH3_freeState(self.state)

    def update(self, const uint8_t[::1] data not None):
        cdef Py_ssize_t n = data.shape[0]
        if n == 0:
            return
        cdef const uint8_t *p = &data[0]
        with nogil:
            smsblock_xxh3_64_update(self.state, p, <size_t>n)

    def digest(self):
        cdef XXH64_canonical_t canon
        XXH64_canonicalFromHash(&canon, XXH3_64bits_digest(self.state))
        return bytes(canon.digest[:8])
