# cython: language_level=3
"""Native core of the on-disk block index (smsblock/blockindex.py): batch lookups in one
segment file with the GIL released.

Measured before writing this (2 M entries, batches of 4096): the same probe in numpy
(one ``preadv`` per fence block from a Python loop, then (m, 66) record arrays) ran at
~100 K lookups/s per segment, most of it Python overhead around the reads; a memory
map gathered with numpy was no faster and counts every touched page in the RSS.  Here a
lookup is one ``pread`` of a fence block (shared by the sorted queries that fall in it)
and a binary search in it.
"""

from libc.stdint cimport uint8_t, uint64_t, int64_t
from libc.string cimport memcmp, memcpy
from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EINTR
from posix.unistd cimport pread

cdef enum:
    REC = 52        # bytes of a record (blockindex.RECORD_DTYPE)
    ADDR = 32


cdef inline uint64_t load_be64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(8):
        v = (v << 8) | p[k]
    return v


cdef int probe_c(int fd, const uint64_t *fence, Py_ssize_t nf, int64_t n, int64_t every,
                 int64_t base, const uint8_t *queries, Py_ssize_t m, uint8_t *out,
                 uint8_t *flags, uint8_t *buf) noexcept nogil:
    """The loop of :func:`probe` on raw pointers (``buf``: (every + 2) * 52 bytes).
    Returns 0, an errno, or -1 for a file that ends early."""
    cdef Py_ssize_t i, lo, hi, mid
    cdef int64_t b, cur = -1, cnt = 0, want, got, r
    cdef uint64_t key
    cdef const uint8_t *rec
    cdef const uint8_t *q
    for i in range(m):
        flags[i] = 0
        q = queries + i * ADDR
        key = load_be64(q)
        # the last fence block whose first key is below ours (or the first)
        lo, hi = 0, nf
        while lo < hi:
            mid = (lo + hi) >> 1
            if fence[mid] < key:
                lo = mid + 1
            else:
                hi = mid
        b = lo - 1 if lo > 0 else 0
        if b != cur:
            # the block and two more: the first key >= ours is at most at position
            # `every`, and the one after it tells whether it repeats
            cnt = min(every + 2, n - b * every)
            want = cnt * REC
            got = 0
            while got < want:
                r = pread(fd, buf + got, want - got, base + (b * every) * REC + got)
                if r < 0:
                    if errno == EINTR:
                        continue
                    return errno
                if r == 0:
                    return -1
                got += r
            cur = b
        lo, hi = 0, cnt
        while lo < hi:
            mid = (lo + hi) >> 1
            if load_be64(buf + mid * REC) < key:
                lo = mid + 1
            else:
                hi = mid
        if lo >= cnt:
            continue
        rec = buf + lo * REC
        if load_be64(rec) != key:
            continue
        if lo + 1 < cnt:
            if load_be64(rec + REC) == key:
                flags[i] |= 2
        elif b * every + cnt < n:
            flags[i] |= 2           # the window ends here: more may follow
        if memcmp(rec, q, ADDR) == 0:
            flags[i] |= 1
            memcpy(out + i * REC, rec, REC)
    return 0


cdef raise_for(int err):
    if err > 0:
        raise OSError(err, "cannot read the block index file")
    if err < 0:
        raise OSError(5, "the block index file ends early (changed under us)")


def probe(int fd, const uint64_t[::1] fence, int64_t n, int64_t every, int64_t base,
          const uint8_t[:, ::1] queries, uint8_t[:, ::1] out, uint8_t[::1] flags):
    """Look up ``queries`` ((m, 32) addresses, sorted by their first 8 bytes) in the
    segment open as ``fd``: ``n`` records of 52 bytes from byte ``base``, ``fence[j]``
    the key of record ``j * every``.

    Per query ``flags[i]``: bit 0 the address is here (its record copied to ``out[i]``),
    bit 1 its key occurs more than once here (ask :meth:`Segment.matches`).  Raises
    OSError when a read fails or comes back short (the file changed under us).
    """
    cdef Py_ssize_t m = queries.shape[0]
    cdef int err = 0
    cdef uint8_t *buf
    if out.shape[0] < m or out.shape[1] != REC or flags.shape[0] < m or \
            (m and queries.shape[1] != ADDR):
        raise ValueError("bad array shapes")
    if m == 0:
        return
    if n == 0:
        for i in range(m):
            flags[i] = 0
        return
    buf = <uint8_t *> malloc((every + 2) * REC)
    if buf == NULL:
        raise MemoryError()
    try:
        with nogil:
            err = probe_c(fd, &fence[0], fence.shape[0], n, every, base, &queries[0, 0], m,
                          &out[0, 0], &flags[0], buf)
    finally:
        free(buf)
    raise_for(err)


def probe_one(int fd, const uint64_t[::1] fence, int64_t n, int64_t every, int64_t base,
              const uint8_t[::1] address):
    """:func:`probe` of one address without arrays around it (the per-block lookup of a
    run's scan threads): ``(record bytes or None, multi)``."""
    cdef uint8_t out[REC]
    cdef uint8_t flags = 0
    cdef int err = 0
    cdef uint8_t *buf
    if address.shape[0] != ADDR:
        raise ValueError("an address is 32 bytes")
    if n == 0:
        return None, False
    buf = <uint8_t *> malloc((every + 2) * REC)
    if buf == NULL:
        raise MemoryError()
    try:
        with nogil:
            err = probe_c(fd, &fence[0], fence.shape[0], n, every, base, &address[0], 1,
                          out, &flags, buf)
    finally:
        free(buf)
    raise_for(err)
    return ((<char *> out)[:REC] if flags & 1 else None), bool(flags & 2)
