# cython: language_level=3
"""Native core of the block scan: zero test, xxh3-128 and change test for a batch of blocks.

The Python side (smsblock/scanner.py) reads a run of consecutive blocks into one buffer
(the read releases the GIL); :func:`scan_batch` then classifies and hashes every block
of the buffer with the GIL released, so two worker threads keep both cores busy.
"""

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcmp, memset, memcpy

cdef extern from "zero.h" nogil:
    int smsblock_is_zero(const void *data, size_t len)

cdef extern from "xxhash.h" nogil:
    ctypedef struct XXH128_hash_t:
        uint64_t low64
        uint64_t high64
    ctypedef struct XXH128_canonical_t:
        unsigned char digest[16]
    void XXH128_canonicalFromHash(XXH128_canonical_t *dst, XXH128_hash_t h)

# On x86, Debian's libxxhash exports runtime-dispatched entry points that pick the
# AVX2/AVX-512 kernels when the CPU has them (2-3x the baseline SSE2 speed, as xxhsum).
cdef extern from *:
    """
    #include <xxhash.h>
    #if defined(__x86_64__) || defined(__i386__)
    #include <xxh_x86dispatch.h>
    #define smsblock_xxh3_128(p, n) XXH3_128bits_dispatch((p), (n))
    #else
    #define smsblock_xxh3_128(p, n) XXH3_128bits((p), (n))
    #endif
    """
    XXH128_hash_t smsblock_xxh3_128(const void *data, size_t length) nogil

# Mirrors smsblock.manifest.BlockState (kept literal: no Python lookups in the loop).
cdef enum:
    ZERO = 1
    DATA = 2


def scan_batch(const uint8_t[::1] buf, Py_ssize_t nbytes, Py_ssize_t block_size,
               Py_ssize_t first, uint8_t[::1] states, uint8_t[:, ::1] hashes,
               const uint8_t[::1] prev_states, const uint8_t[:, ::1] prev_hashes,
               uint8_t[::1] changed):
    """Classify and hash the blocks ``first, first+1, ...`` held in ``buf[:nbytes]``.

    Block ``first + k`` is ``buf[k*block_size : min((k+1)*block_size, nbytes)]``.  For
    each: all zeros → ``states = ZERO``, hash left zero (not hashed); otherwise
    ``states = DATA`` and ``hashes`` gets the canonical (big-endian) xxh3-128.
    ``changed[i]`` becomes 1 for DATA blocks whose hash or state differs from
    ``prev_states``/``prev_hashes`` (every DATA block when those are None), else 0.
    Returns the number of changed DATA blocks.  The GIL is released throughout.
    """
    if block_size <= 0 or nbytes < 0 or nbytes > buf.shape[0]:
        raise ValueError("bad batch geometry")
    cdef Py_ssize_t count = (nbytes + block_size - 1) // block_size
    if first < 0 or first + count > states.shape[0] or hashes.shape[0] != states.shape[0] \
            or hashes.shape[1] != 16 or changed.shape[0] != states.shape[0]:
        raise ValueError("batch outside the block arrays")
    cdef bint have_prev = prev_states is not None and prev_hashes is not None
    if have_prev and (prev_states.shape[0] != states.shape[0]
                      or prev_hashes.shape[0] != states.shape[0] or prev_hashes.shape[1] != 16):
        raise ValueError("previous arrays do not match the block arrays")

    cdef const uint8_t *base = &buf[0] if buf.shape[0] else NULL
    cdef Py_ssize_t k, i, off, length
    cdef Py_ssize_t n_changed = 0
    cdef XXH128_canonical_t canon
    cdef bint is_changed
    with nogil:
        for k in range(count):
            i = first + k
            off = k * block_size
            length = nbytes - off
            if length > block_size:
                length = block_size
            if smsblock_is_zero(base + off, <size_t>length):
                states[i] = ZERO
                memset(&hashes[i, 0], 0, 16)
                changed[i] = 0
                continue
            XXH128_canonicalFromHash(&canon, smsblock_xxh3_128(base + off, <size_t>length))
            memcpy(&hashes[i, 0], canon.digest, 16)
            states[i] = DATA
            if have_prev:
                is_changed = prev_states[i] != DATA or memcmp(&prev_hashes[i, 0], canon.digest, 16) != 0
            else:
                is_changed = True
            changed[i] = is_changed
            n_changed += is_changed
    return n_changed
