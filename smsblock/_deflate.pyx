"""Native grain compression for the streamOptimized VMDK writer, and zero detection.

``GrainCompressor`` wraps one libdeflate compressor.  A libdeflate compressor is not
safe to share between threads, so the writer keeps one per worker thread; each call
releases the GIL for the bulk work, so two workers compress on two cores.

``pack_grains`` turns a run of consecutive grains into the on-disk records of a
streamOptimized extent (grain marker = LBA + size, zlib data, zero padding to the next
sector) in one native call and leaves out all-zero grains; ``is_zero`` and
``nonzero_runs`` use csrc/zero.h; ``start_writeback`` lets the writers overlap the disk's
writing with their copying before the final fsync.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

cdef extern from "libdeflate.h" nogil:
    struct libdeflate_compressor:
        pass
    libdeflate_compressor *libdeflate_alloc_compressor(int compression_level)
    size_t libdeflate_zlib_compress(libdeflate_compressor *c, const void *src, size_t n,
                                    void *out, size_t avail)
    size_t libdeflate_zlib_compress_bound(libdeflate_compressor *c, size_t n)
    void libdeflate_free_compressor(libdeflate_compressor *c)

cdef extern from "zero.h" nogil:
    int smsblock_is_zero(const void *data, size_t length)

cdef extern from "<fcntl.h>" nogil:
    int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)
    enum: SYNC_FILE_RANGE_WRITE

cdef enum:
    SECTOR = 512
    # bytes in front of the compressed data in a grain marker: LBA (u64) + size (u32)
    GRAIN_MARKER_HEADER = 12

cdef inline bint all_zero(const uint8_t *p, size_t n) noexcept nogil:
    """smsblock_is_zero with a look at the first 16 bytes first: that scans whole 4 KiB
    strides before it looks, and a block of data nearly always starts non-zero."""
    cdef uint64_t a, b
    if n >= 16:
        memcpy(&a, p, 8)
        memcpy(&b, p + 8, 8)
        if a | b:
            return False
    return smsblock_is_zero(p, n)


cdef inline void put_le32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xff
    p[1] = (v >> 8) & 0xff
    p[2] = (v >> 16) & 0xff
    p[3] = (v >> 24) & 0xff

cdef inline void put_le64(uint8_t *p, uint64_t v) noexcept nogil:
    put_le32(p, <uint32_t>(v & 0xffffffffu))
    put_le32(p + 4, <uint32_t>(v >> 32))


cdef class GrainCompressor:
    """One libdeflate compressor (zlib format).  Use it from one thread at a time."""

    cdef libdeflate_compressor *_c
    cdef readonly int level
    cdef bint _busy

    def __cinit__(self, int level=6):
        if not 0 <= level <= 12:
            raise ValueError(f"deflate level must be 0..12, not {level}")
        self._c = libdeflate_alloc_compressor(level)
        if self._c == NULL:
            raise MemoryError("libdeflate_alloc_compressor failed")
        self.level = level
        self._busy = False

    def __dealloc__(self):
        if self._c != NULL:
            libdeflate_free_compressor(self._c)
            self._c = NULL

    cdef void _enter(self) except *:
        # Two threads in one compressor would corrupt its state: refuse, loudly.
        if self._busy:
            raise RuntimeError("GrainCompressor used from two threads at once")
        self._busy = True

    def record_bound(self, Py_ssize_t grain_size, Py_ssize_t n_grains):
        """Bytes ``pack_grains`` may need in ``out`` for ``n_grains`` grains."""
        cdef size_t one = GRAIN_MARKER_HEADER + libdeflate_zlib_compress_bound(self._c, grain_size)
        one = (one + SECTOR - 1) // SECTOR * SECTOR
        return one * n_grains

    def compress(self, const uint8_t[::1] data not None):
        """zlib-compress ``data`` (header, deflate stream, adler32) and return the bytes."""
        cdef size_t n = data.shape[0]
        cdef size_t bound = libdeflate_zlib_compress_bound(self._c, n)
        out = bytearray(bound)
        cdef uint8_t[::1] o = out
        cdef size_t got
        cdef const uint8_t *src = &data[0] if n else <const uint8_t *>NULL
        self._enter()
        try:
            with nogil:
                got = libdeflate_zlib_compress(self._c, src, n, &o[0], bound)
        finally:
            self._busy = False
        if got == 0:
            raise RuntimeError("libdeflate_zlib_compress: output bound too small")
        return bytes(out[:got])

    def pack_grains(self, const uint8_t[::1] data not None, Py_ssize_t grain_size,
                    uint64_t first_sector, uint8_t[::1] out not None,
                    int64_t[::1] sizes not None):
        """Compress consecutive grains into streamOptimized grain records.

        ``data`` holds grain after grain (the last one may be short; it is compressed
        at its own length), ``first_sector`` is the virtual sector of the first grain.
        Each non-zero grain becomes, at the current end of ``out``: LBA (u64 LE),
        compressed size (u32 LE), the zlib stream, zeros up to a multiple of 512.
        ``sizes[i]`` gets the record's length in bytes, or 0 for an all-zero grain
        (nothing written).  Returns the bytes used in ``out``.
        """
        if grain_size <= 0 or grain_size % SECTOR:
            raise ValueError(f"grain size must be a positive multiple of 512, not {grain_size}")
        cdef Py_ssize_t total = data.shape[0]
        cdef Py_ssize_t n = (total + grain_size - 1) // grain_size
        if sizes.shape[0] < n:
            raise ValueError(f"sizes has room for {sizes.shape[0]} grains, need {n}")
        if out.shape[0] < self.record_bound(grain_size, n):
            raise ValueError("output buffer smaller than record_bound()")
        cdef uint64_t sectors_per_grain = grain_size // SECTOR
        cdef Py_ssize_t i, used = 0, pos, length, rec
        cdef size_t got, avail
        cdef bint failed = False
        cdef const uint8_t *src
        cdef uint8_t *dst
        if n == 0:
            return 0
        self._enter()
        try:
            with nogil:
                for i in range(n):
                    pos = i * grain_size
                    length = total - pos
                    if length > grain_size:
                        length = grain_size
                    src = &data[pos]
                    if all_zero(src, length):
                        sizes[i] = 0
                        continue
                    dst = &out[used]
                    avail = out.shape[0] - used - GRAIN_MARKER_HEADER
                    got = libdeflate_zlib_compress(self._c, src, length,
                                                   dst + GRAIN_MARKER_HEADER, avail)
                    if got == 0:
                        failed = True
                        break
                    put_le64(dst, first_sector + <uint64_t>i * sectors_per_grain)
                    put_le32(dst + 8, <uint32_t>got)
                    rec = GRAIN_MARKER_HEADER + got
                    rec = (rec + SECTOR - 1) // SECTOR * SECTOR
                    memset(dst + GRAIN_MARKER_HEADER + got, 0, rec - GRAIN_MARKER_HEADER - got)
                    sizes[i] = rec
                    used += rec
        finally:
            self._busy = False
        if failed:
            raise RuntimeError("libdeflate_zlib_compress: output bound too small")
        return used


def is_zero(const uint8_t[::1] buf not None):
    """True when every byte of ``buf`` is zero (the empty buffer included)."""
    cdef size_t n = buf.shape[0]
    cdef int r
    if n == 0:
        return True
    with nogil:
        r = smsblock_is_zero(&buf[0], n)
    return bool(r)


def nonzero_runs(const uint8_t[::1] buf not None, Py_ssize_t block_size):
    """``[(start, end), ...]``: maximal runs of ``block_size`` blocks that are not all zero.

    The last block may be short.  Used by the raw writer to leave zero blocks as holes;
    the scan runs with the GIL released and a block of data costs one word read (the
    zero test stops at the first non-zero byte).
    """
    if block_size <= 0:
        raise ValueError(f"block size must be positive, not {block_size}")
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t pos = 0, start = -1, length, k = 0
    cdef Py_ssize_t max_runs = (n + block_size - 1) // block_size // 2 + 1
    cdef Py_ssize_t *edges = <Py_ssize_t *>malloc(2 * max_runs * sizeof(Py_ssize_t))
    cdef bint zero
    if edges == NULL:
        raise MemoryError()
    try:
        with nogil:
            while pos < n:
                length = min(block_size, n - pos)
                zero = all_zero(&buf[pos], length)
                if not zero and start < 0:
                    start = pos
                elif zero and start >= 0:
                    edges[k] = start
                    edges[k + 1] = pos
                    k += 2
                    start = -1
                pos += length
            if start >= 0:
                edges[k] = start
                edges[k + 1] = n
                k += 2
        return [(edges[i], edges[i + 1]) for i in range(0, k, 2)]
    finally:
        free(edges)


def start_writeback(int fd, int64_t offset, int64_t length):
    """Ask the kernel to start writing ``[offset, offset+length)`` of ``fd`` to disk now,
    without waiting (SYNC_FILE_RANGE_WRITE).  Only a hint: errors surface at fsync."""
    with nogil:
        sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
