# cython: language_level=3
"""Native core of the VMDK sparse-extent reader: grain-table walking and grain inflation.

One :class:`SparseCore` per sparse extent file (shared by every extent line and chain link
of an open disk that names the file), and one :class:`CacheBudget` per open disk: the
grain-table cache of all its cores together stays under that budget.  ``read`` fills a buffer from a range of
grains with the GIL released for the whole loop: it looks up each grain's GT entry (grain
tables are loaded lazily and published lock-free, so several threads can share one core),
preads uncompressed grains straight into the caller's buffer (coalescing grains that lie
back to back in the file), inflates compressed grains with libdeflate (zlib streams, raw
deflate as a fallback), zero-fills unallocated and zero grains, and reports per grain
whether it was unallocated (so the Python layer can read it from the parent), zero or data.

Every GT entry is checked before it is followed (inside the file, not over the metadata);
failures come back as ``(kind, file_offset, message)`` and become DiskFormatError
subclasses in ``smsblock.disk.sparse``.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset, memcpy, strerror
from libc.errno cimport errno, EINTR
from posix.types cimport off_t

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)

cdef extern from "<libdeflate.h>" nogil:
    cdef struct libdeflate_decompressor:
        pass
    cdef enum libdeflate_result:
        LIBDEFLATE_SUCCESS
        LIBDEFLATE_BAD_DATA
        LIBDEFLATE_SHORT_OUTPUT
        LIBDEFLATE_INSUFFICIENT_SPACE
    libdeflate_decompressor *libdeflate_alloc_decompressor()
    void libdeflate_free_decompressor(libdeflate_decompressor *d)
    libdeflate_result libdeflate_zlib_decompress_ex(
        libdeflate_decompressor *d, const void *src, size_t src_n, void *dst, size_t dst_n,
        size_t *actual_in, size_t *actual_out)
    libdeflate_result libdeflate_deflate_decompress_ex(
        libdeflate_decompressor *d, const void *src, size_t src_n, void *dst, size_t dst_n,
        size_t *actual_in, size_t *actual_out)

cdef extern from *:
    """
    #include <endian.h>
    /* Grain tables are published once with a compare-and-swap, so readers on several
       threads never lock: a loser of the race frees its copy and uses the winner's. */
    static inline uint32_t *smsb_gt_get(uint32_t **slot) {
        return __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    }
    static inline int smsb_gt_publish(uint32_t **slot, uint32_t *table) {
        uint32_t *expected = NULL;
        return __atomic_compare_exchange_n(slot, &expected, table, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    /* Reserve n bytes of the grain-table cache budget; 0 when it is spent. */
    static inline int smsb_reserve(uint64_t *used, uint64_t n, uint64_t budget) {
        uint64_t cur = __atomic_load_n(used, __ATOMIC_RELAXED);
        do {
            if (cur + n > budget) return 0;
        } while (!__atomic_compare_exchange_n(used, &cur, cur + n, 1,
                                              __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        return 1;
    }
    static inline void smsb_unreserve(uint64_t *used, uint64_t n) {
        __atomic_fetch_sub(used, n, __ATOMIC_RELAXED);
    }
    static inline void smsb_add(uint64_t *v, uint64_t n) {
        __atomic_fetch_add(v, n, __ATOMIC_RELAXED);
    }
    static inline uint64_t smsb_load(uint64_t *v) {
        return __atomic_load_n(v, __ATOMIC_RELAXED);
    }
    static inline uint32_t smsb_le32(const uint8_t *p) {
        uint32_t v; memcpy(&v, p, 4); return le32toh(v);
    }
    static inline uint64_t smsb_le64(const uint8_t *p) {
        uint64_t v; memcpy(&v, p, 8); return le64toh(v);
    }
    """
    uint32_t *smsb_gt_get(uint32_t **slot) nogil
    bint smsb_gt_publish(uint32_t **slot, uint32_t *table) nogil
    bint smsb_reserve(uint64_t *used, uint64_t n, uint64_t budget) nogil
    void smsb_unreserve(uint64_t *used, uint64_t n) nogil
    void smsb_add(uint64_t *v, uint64_t n) nogil
    uint64_t smsb_load(uint64_t *v) nogil
    uint32_t smsb_le32(const uint8_t *p) nogil
    uint64_t smsb_le64(const uint8_t *p) nogil
    uint32_t le32toh(uint32_t v) nogil
    uint64_t le64toh(uint64_t v) nogil


# error kinds (what the Python layer raises) and details (what the message says)
cdef enum:
    E_OK = 0
    E_IO = 1
    E_TRUNCATED = 2
    E_GT = 3
    E_GRAIN = 4
    E_NOMEM = 5
    E_SOURCE = 6

cdef enum:
    D_NONE = 0
    D_GT_PAST_EOF = 1
    D_GT_IN_HEADER = 2
    D_GTE_PAST_EOF = 3
    D_GTE_IN_META = 4
    D_GTE_IN_GD = 5
    D_MARKER_LBA = 6
    D_MARKER_SIZE = 7
    D_INFLATE_BAD = 8
    D_INFLATE_BIG = 9
    D_INFLATE_SHORT = 10
    D_SHORT_READ = 11
    D_READ_FAILED = 12
    D_NOMEM = 13
    D_SOURCE = 14
    D_SE_ENTRY = 15

cdef struct Err:
    int kind
    int detail
    int64_t offset
    uint64_t a
    uint64_t b
    int errnum

cdef struct Scratch:
    uint8_t *win           # read window over the file (compressed grains)
    size_t win_cap
    int64_t win_off
    size_t win_len
    uint8_t *grain         # one inflated grain, when the caller's buffer cannot take it whole
    libdeflate_decompressor *dec
    uint32_t *gt_tmp       # a grain table read for this thread once the cache budget is spent
    int64_t gt_tmp_index

cdef enum:
    SECTOR = 512
    MIN_WINDOW = 1 << 20
    GTE_UNALLOCATED = 0
    GTE_ZERO = 1

# per-grain status codes reported to Python
cdef enum:
    STATUS_UNALLOCATED = 0
    STATUS_ZERO = 1
    STATUS_DATA = 2


cdef inline void set_err(Err *err, int kind, int detail, int64_t offset,
                         uint64_t a, uint64_t b) noexcept nogil:
    if err.kind == E_OK:
        err.kind = kind
        err.detail = detail
        err.offset = offset
        err.a = a
        err.b = b


cdef ssize_t pread_full(int fd, uint8_t *buf, size_t n, int64_t off, Err *err) noexcept nogil:
    """Read up to n bytes (fewer only at end of file); -1 with err set on an OS error."""
    cdef size_t done = 0
    cdef ssize_t r
    while done < n:
        r = pread(fd, buf + done, n - done, <off_t>(off + <int64_t>done))
        if r < 0:
            if errno == EINTR:
                continue
            err.errnum = errno
            set_err(err, E_IO, D_READ_FAILED, off + <int64_t>done, 0, 0)
            return -1
        if r == 0:
            break
        done += <size_t>r
    return <ssize_t>done


cdef class _Scratch:
    """Per-thread buffers and decoder, kept in a pool so reads do not allocate each time.

    The read window stays valid between reads (the file is read-only), so a caller
    reading a stream file in small sequential pieces reuses what the last read fetched.
    """
    cdef Scratch s

    def __cinit__(self):
        memset(&self.s, 0, sizeof(Scratch))
        self.s.win_off = -1
        self.s.gt_tmp_index = -1

    def __dealloc__(self):
        if self.s.dec != NULL:
            libdeflate_free_decompressor(self.s.dec)
        free(self.s.win)
        free(self.s.grain)
        free(self.s.gt_tmp)


cdef class CacheBudget:
    """Bytes of grain tables the cores of one open disk may keep cached, all together."""
    cdef uint64_t used
    cdef readonly uint64_t limit

    def __cinit__(self, uint64_t limit):
        self.used = 0
        self.limit = limit

    @property
    def used_bytes(self):
        """Bytes of grain tables cached by all the cores sharing this budget."""
        return smsb_load(&self.used)


cdef class SparseCore:
    """The grain map and read loop of one sparse extent (see the module docstring)."""

    cdef int fd
    cdef uint64_t file_size, capacity, grain, meta_end, gd_at, gd_len, grain_sectors
    cdef uint64_t n_grains
    cdef uint32_t gtes_per_gt, n_gts
    cdef uint32_t *gd
    cdef uint32_t **gts
    cdef uint32_t *empty_gt
    cdef bint compressed, markers
    cdef bint se                # seSparse: 64-bit GT entries, translated when loaded
    cdef uint64_t se_grains     # seSparse: first sector of the grain area
    cdef size_t max_compressed
    cdef list pool
    cdef uint64_t cached          # bytes of tables this core holds (charged to budget)
    cdef CacheBudget budget
    cdef object source          # a file object read with the GIL when fd < 0
    cdef object failures        # per-thread exception raised by source.readinto

    def __cinit__(self, int fd, uint64_t file_size, uint64_t capacity, uint64_t grain,
                  uint32_t gtes_per_gt, const uint32_t[::1] gd, bint compressed,
                  bint markers, uint64_t meta_end, uint64_t gd_at, uint64_t gd_len,
                  source=None, CacheBudget budget=None,
                  bint sesparse=False, uint64_t sesparse_grains=0):
        cdef size_t i
        import threading
        self.fd = fd
        self.source = source
        self.failures = threading.local()
        if fd < 0 and source is None:
            raise ValueError("a file descriptor or a source file is needed")
        self.file_size = file_size
        self.capacity = capacity
        self.grain = grain
        self.grain_sectors = grain // SECTOR
        self.gtes_per_gt = gtes_per_gt
        self.n_grains = (capacity + grain - 1) // grain
        self.n_gts = <uint32_t>gd.shape[0]
        if <uint64_t>self.n_gts * gtes_per_gt < self.n_grains:
            raise ValueError("grain directory too short for the capacity")
        self.compressed = compressed
        self.markers = markers
        self.se = sesparse
        self.se_grains = sesparse_grains
        self.pool = []
        if budget is None:
            raise ValueError("a cache budget is needed")
        self.budget = budget
        self.cached = 0
        self.meta_end = meta_end
        self.gd_at = gd_at
        self.gd_len = gd_len
        # deflate never grows data by more than a few bytes per 16 KiB block
        self.max_compressed = 2 * grain + 4096
        self.gd = <uint32_t *>malloc(max(1, self.n_gts) * sizeof(uint32_t))
        self.gts = <uint32_t **>calloc(max(1, self.n_gts), sizeof(uint32_t *))
        self.empty_gt = <uint32_t *>calloc(gtes_per_gt, sizeof(uint32_t))
        if self.gd == NULL or self.gts == NULL or self.empty_gt == NULL:
            raise MemoryError()
        for i in range(self.n_gts):
            self.gd[i] = gd[i]

    def __dealloc__(self):
        cdef size_t i
        cdef uint32_t *t
        if self.gts != NULL:
            for i in range(self.n_gts):
                t = self.gts[i]
                if t != NULL and t != self.empty_gt:
                    free(t)
            free(self.gts)
        free(self.gd)
        free(self.empty_gt)
        if self.budget is not None and self.cached:
            smsb_unreserve(&self.budget.used, self.cached)

    # -- file access ----------------------------------------------------------
    cdef ssize_t fill(self, uint8_t *buf, size_t n, int64_t off, Err *err) noexcept nogil:
        """Read up to n bytes at off: pread on a descriptor, else the source (with the GIL)."""
        if self.fd >= 0:
            return pread_full(self.fd, buf, n, off, err)
        with gil:
            return self.fill_from_source(buf, n, off, err)

    cdef ssize_t fill_from_source(self, uint8_t *buf, size_t n, int64_t off,
                                  Err *err) noexcept:
        cdef unsigned char[::1] view
        cdef size_t done = 0
        if n == 0:
            return 0
        try:
            view = <unsigned char[:n]> buf
            mv = memoryview(view)
            while done < n:
                got = self.source.readinto(off + done, mv[done:])
                if not got:
                    break
                done += got
            return <ssize_t>done
        except BaseException as e:
            self.failures.exc = e
            set_err(err, E_SOURCE, D_SOURCE, off + <int64_t>done, 0, 0)
            return -1

    # -- grain tables ---------------------------------------------------------
    cdef uint32_t *table(self, uint32_t i, Scratch *sp, Err *err) noexcept nogil:
        """Grain table i, loaded and checked on first use; NULL with err set on failure.

        Tables are cached (published lock-free) until they fill the cache budget; after
        that a table is read into the calling thread's scratch, so memory stays bounded
        even when a hostile directory points thousands of entries at one table.
        """
        cdef uint32_t *t = smsb_gt_get(&self.gts[i])
        cdef uint64_t at, nbytes
        cdef uint64_t file_bytes
        cdef ssize_t r
        cdef uint32_t k
        cdef bint cached, ok
        if t != NULL:
            return t
        if self.gd[i] == 0:
            smsb_gt_publish(&self.gts[i], self.empty_gt)
            return self.empty_gt
        at = <uint64_t>self.gd[i] * SECTOR
        nbytes = <uint64_t>self.gtes_per_gt * 4
        file_bytes = nbytes * 2 if self.se else nbytes
        if at < SECTOR:
            set_err(err, E_GT, D_GT_IN_HEADER, self.gd_at + 4 * i, self.gd[i], 0)
            return NULL
        if at + file_bytes > self.file_size:
            set_err(err, E_GT, D_GT_PAST_EOF, self.gd_at + 4 * i, self.gd[i], 0)
            return NULL
        if sp.gt_tmp_index == <int64_t>i:
            return sp.gt_tmp
        cached = smsb_reserve(&self.budget.used, nbytes, self.budget.limit)
        if cached:
            smsb_add(&self.cached, nbytes)
            t = <uint32_t *>malloc(nbytes)
        else:
            if sp.gt_tmp == NULL:
                sp.gt_tmp = <uint32_t *>malloc(nbytes)
            sp.gt_tmp_index = -1
            t = sp.gt_tmp
        if t == NULL:
            if cached:
                smsb_unreserve(&self.budget.used, nbytes)
                smsb_unreserve(&self.cached, nbytes)
            set_err(err, E_NOMEM, D_NOMEM, <int64_t>at, nbytes, 0)
            return NULL
        if self.se:
            ok = self.load_se_table(t, at, err) == 0
        else:
            r = self.fill(<uint8_t *>t, nbytes, <int64_t>at, err)
            ok = r == <ssize_t>nbytes
            if r >= 0 and not ok:
                set_err(err, E_TRUNCATED, D_SHORT_READ, <int64_t>(at + <uint64_t>r), nbytes, 0)
            if ok:
                for k in range(self.gtes_per_gt):
                    t[k] = le32toh(t[k])
        if not ok:
            if cached:
                free(t)
                smsb_unreserve(&self.budget.used, nbytes)
                smsb_unreserve(&self.cached, nbytes)
            return NULL
        if not cached:
            sp.gt_tmp_index = i
        elif not smsb_gt_publish(&self.gts[i], t):
            free(t)
            smsb_unreserve(&self.budget.used, nbytes)
            smsb_unreserve(&self.cached, nbytes)
            t = smsb_gt_get(&self.gts[i])
        return t

    cdef int load_se_table(self, uint32_t *t, uint64_t at, Err *err) noexcept nogil:
        """Read a seSparse grain table (64-bit entries) at ``at`` into 32-bit GT entries.

        Entry types (top nibble): 0 unallocated (the rest must be 0), 1 unmapped and
        2 zero (both read as zeros), 3 allocated: a grain number split over bits 0-47
        (high part) and 48-59 (low 12 bits), counted in grains from the grain area.
        """
        cdef uint64_t nbytes = <uint64_t>self.gtes_per_gt * 8
        cdef uint64_t *raw = <uint64_t *>malloc(nbytes)
        cdef uint64_t e, grain_no, sector, kind
        cdef ssize_t r
        cdef uint32_t k
        if raw == NULL:
            set_err(err, E_NOMEM, D_NOMEM, <int64_t>at, nbytes, 0)
            return -1
        r = self.fill(<uint8_t *>raw, nbytes, <int64_t>at, err)
        if r < 0 or <uint64_t>r != nbytes:
            if r >= 0:
                set_err(err, E_TRUNCATED, D_SHORT_READ, <int64_t>(at + <uint64_t>r), nbytes, 0)
            free(raw)
            return -1
        for k in range(self.gtes_per_gt):
            e = le64toh(raw[k])
            kind = e >> 60
            if kind == 0 and e == 0:
                t[k] = GTE_UNALLOCATED
            elif kind == 1 or kind == 2:
                t[k] = GTE_ZERO
            elif kind == 3:
                grain_no = ((e & 0x0FFF000000000000ULL) >> 48) | ((e & 0x0000FFFFFFFFFFFFULL) << 12)
                sector = self.se_grains + grain_no * self.grain_sectors
                if grain_no > 0xFFFFFFFFULL or sector > 0xFFFFFFFFULL:
                    set_err(err, E_GT, D_SE_ENTRY, <int64_t>(at + 8 * k), e, 0)
                    free(raw)
                    return -1
                t[k] = <uint32_t>sector
            else:
                set_err(err, E_GT, D_SE_ENTRY, <int64_t>(at + 8 * k), e, 0)
                free(raw)
                return -1
        free(raw)
        return 0

    cdef int entry(self, uint64_t g, uint32_t *out, int64_t *where, Scratch *sp,
                   Err *err) noexcept nogil:
        """GT entry of grain g into *out (and its file offset into *where); -1 on error."""
        cdef uint32_t i = <uint32_t>(g // self.gtes_per_gt)
        cdef uint32_t k = <uint32_t>(g % self.gtes_per_gt)
        cdef uint32_t *t = self.table(i, sp, err)
        if t == NULL:
            return -1
        out[0] = t[k]
        where[0] = <int64_t>(<uint64_t>self.gd[i] * SECTOR + (8 if self.se else 4) * k)
        return 0

    cdef int check_grain(self, uint64_t g, uint32_t gte, int64_t where,
                         Err *err) noexcept nogil:
        """Is an allocated grain's place in the file plausible?  -1 with err set if not."""
        cdef uint64_t at = <uint64_t>gte * SECTOR
        cdef uint64_t need = self.capacity - g * self.grain
        if need > self.grain:
            need = self.grain
        if self.compressed:
            need = 12 if self.markers else 1
        if at < self.meta_end or at < SECTOR:
            set_err(err, E_GT, D_GTE_IN_META, where, gte, self.meta_end // SECTOR)
            return -1
        if at + need > self.file_size:
            set_err(err, E_GT, D_GTE_PAST_EOF, where, gte, self.file_size)
            return -1
        if self.gd_len and at < self.gd_at + self.gd_len and at + need > self.gd_at:
            set_err(err, E_GT, D_GTE_IN_GD, where, gte, self.gd_at // SECTOR)
            return -1
        return 0

    # -- compressed grains ------------------------------------------------------
    cdef const uint8_t *window(self, Scratch *s, int64_t lo, size_t n, size_t want,
                               Err *err) noexcept nogil:
        """Bytes [lo, lo+n) of the file through the read window (reading ahead up to want)."""
        cdef ssize_t r
        cdef size_t span
        if s.win_off >= 0 and lo >= s.win_off and \
                <uint64_t>(lo - s.win_off) + n <= s.win_len:
            return s.win + (lo - s.win_off)
        span = want if want > n else n
        if span > s.win_cap:
            span = s.win_cap
        r = self.fill(s.win, span, lo, err)
        if r < 0:
            s.win_off = -1
            return NULL
        s.win_off = lo
        s.win_len = <size_t>r
        if <size_t>r < n:
            set_err(err, E_TRUNCATED, D_SHORT_READ, lo + r, n, 0)
            return NULL
        return s.win

    cdef int inflate(self, uint64_t g, uint32_t gte, uint8_t *dst, size_t need,
                     Scratch *s, size_t readahead, Err *err) noexcept nogil:
        """Inflate grain g (at sector gte) into dst (room for a whole grain)."""
        cdef int64_t at = <int64_t>gte * SECTOR
        cdef int64_t data_at = at
        cdef size_t data_len
        cdef const uint8_t *p
        cdef uint64_t lba
        cdef uint32_t size
        cdef size_t used = 0, produced = 0
        cdef libdeflate_result r
        if self.markers:
            p = self.window(s, at, 12, readahead, err)
            if p == NULL:
                return -1
            lba = smsb_le64(p)
            size = smsb_le32(p + 8)
            if lba != g * self.grain_sectors:
                set_err(err, E_GRAIN, D_MARKER_LBA, at, lba, g * self.grain_sectors)
                return -1
            if size == 0 or size > self.max_compressed:
                set_err(err, E_GRAIN, D_MARKER_SIZE, at, size, self.max_compressed)
                return -1
            data_at = at + 12
            data_len = size
            if <uint64_t>data_at + data_len > self.file_size:
                set_err(err, E_TRUNCATED, D_SHORT_READ, <int64_t>self.file_size, data_len, 0)
                return -1
        else:
            # no marker: the stream ends where it ends; give the decoder what can hold it
            data_len = self.max_compressed
            if <uint64_t>data_at + data_len > self.file_size:
                data_len = <size_t>(self.file_size - <uint64_t>data_at)
        p = self.window(s, data_at, data_len, readahead, err)
        if p == NULL:
            return -1
        r = libdeflate_zlib_decompress_ex(s.dec, p, data_len, dst, self.grain, &used, &produced)
        if r == LIBDEFLATE_BAD_DATA and (data_len < 2 or (p[0] & 0x0F) != 8 or
                                         ((<uint32_t>p[0] << 8) | p[1]) % 31 != 0):
            # not a zlib header: some writers store bare deflate streams
            r = libdeflate_deflate_decompress_ex(s.dec, p, data_len, dst, self.grain,
                                                 &used, &produced)
        if r == LIBDEFLATE_INSUFFICIENT_SPACE:
            set_err(err, E_GRAIN, D_INFLATE_BIG, at, self.grain, 0)
            return -1
        if r != LIBDEFLATE_SUCCESS:
            set_err(err, E_GRAIN, D_INFLATE_BAD, at, <uint64_t>r, 0)
            return -1
        if produced < need:
            set_err(err, E_GRAIN, D_INFLATE_SHORT, at, produced, need)
            return -1
        return 0

    # -- the read loop --------------------------------------------------------
    cdef int read_range(self, uint64_t offset, uint8_t *out, size_t length, uint8_t *status,
                        Scratch *sp, Err *err) noexcept nogil:
        cdef uint64_t pos = offset, g, g0 = offset // self.grain, gg, in_off, need
        cdef size_t done = 0, n, run, more
        cdef uint32_t gte, e2
        cdef int64_t where, where2
        cdef int rc = 0
        cdef size_t ahead
        while done < length:
            g = pos // self.grain
            in_off = pos - g * self.grain
            n = <size_t>(self.grain - in_off)
            if n > length - done:
                n = length - done
            if self.entry(g, &gte, &where, sp, err) < 0:
                rc = -1
                break
            if gte == GTE_UNALLOCATED or gte == GTE_ZERO:
                memset(out + done, 0, n)
                if status != NULL:
                    status[g - g0] = STATUS_UNALLOCATED if gte == GTE_UNALLOCATED else STATUS_ZERO
            elif self.check_grain(g, gte, where, err) < 0:
                rc = -1
                break
            elif not self.compressed:
                if status != NULL:
                    status[g - g0] = STATUS_DATA
                # extend over following grains stored right after this one in the file
                run = n
                gg = g + 1
                while done + run < length:
                    if self.entry(gg, &e2, &where2, sp, err) < 0:
                        rc = -1
                        break
                    if <uint64_t>e2 != <uint64_t>gte + (gg - g) * self.grain_sectors:
                        break
                    if self.check_grain(gg, e2, where2, err) < 0:
                        rc = -1
                        break
                    if status != NULL:
                        status[gg - g0] = STATUS_DATA
                    more = length - done - run
                    run += self.grain if more > self.grain else more
                    gg += 1
                if rc < 0:
                    break
                n = run
                if self.read_plain(gte, in_off, out + done, n, err) < 0:
                    rc = -1
                    break
            else:
                if status != NULL:
                    status[g - g0] = STATUS_DATA
                need = self.capacity - g * self.grain
                if need > self.grain:
                    need = self.grain
                if sp.dec == NULL:
                    sp.dec = libdeflate_alloc_decompressor()
                    sp.win_cap = MIN_WINDOW
                    if sp.win_cap < self.max_compressed + 12:
                        sp.win_cap = self.max_compressed + 12
                    sp.win = <uint8_t *>malloc(sp.win_cap)
                    sp.grain = <uint8_t *>malloc(self.grain)
                    sp.win_off = -1
                    if sp.dec == NULL or sp.win == NULL or sp.grain == NULL:
                        set_err(err, E_NOMEM, D_NOMEM, 0, sp.win_cap, 0)
                        rc = -1
                        break
                # read ahead about what the rest of the range needs (random data grows a
                # little when deflated; markers and sector padding add a bit per grain)
                ahead = (length - done) + (length - done) // 32 + 1024
                if in_off == 0 and n == self.grain:
                    rc = self.inflate(g, gte, out + done, need, sp, ahead, err)
                else:
                    rc = self.inflate(g, gte, sp.grain, need, sp, ahead, err)
                    if rc == 0:
                        memcpy(out + done, sp.grain + in_off, n)
                if rc < 0:
                    break
            done += n
            pos += n
        return rc

    cdef int read_plain(self, uint32_t gte, uint64_t in_off, uint8_t *dst, size_t n,
                        Err *err) noexcept nogil:
        cdef int64_t at = <int64_t>(<uint64_t>gte * SECTOR + in_off)
        cdef ssize_t r = self.fill(dst, n, at, err)
        if r < 0:
            return -1
        if <size_t>r < n:
            set_err(err, E_TRUNCATED, D_SHORT_READ, at + r, n, 0)
            return -1
        return 0

    # -- Python entry points ----------------------------------------------------
    @property
    def cached_table_bytes(self):
        """Bytes of grain tables this core holds in the cache (at most the budget)."""
        return smsb_load(&self.cached)

    def read(self, uint64_t offset, unsigned char[::1] buf, status=None):
        """Fill buf with the extent's bytes at offset; None or (kind, offset, message).

        ``status`` (a uint8 array with one slot per grain the range touches) receives
        0 unallocated, 1 zero, 2 data.  The range must lie inside the capacity.
        """
        cdef Err err
        cdef size_t length = buf.shape[0]
        cdef uint8_t *st = NULL
        cdef unsigned char[::1] stview
        cdef uint64_t first, last
        memset(&err, 0, sizeof(Err))
        if length == 0:
            return None
        if offset + length > self.capacity or offset + length < offset:
            raise ValueError("read outside the extent's capacity")
        if status is not None:
            stview = status
            first = offset // self.grain
            last = (offset + length - 1) // self.grain
            if <uint64_t>stview.shape[0] < last - first + 1:
                raise ValueError("status array too short for the range")
            st = &stview[0]
        cdef _Scratch scratch = self.pool.pop() if self.pool else _Scratch()
        try:
            with nogil:
                self.read_range(offset, &buf[0], length, st, &scratch.s, &err)
        finally:
            self.pool.append(scratch)
        return self.describe(&err)

    def entries(self, uint64_t first, uint32_t[::1] out):
        """GT entries of grains first, first+1, ... into out; None or (kind, offset, message)."""
        cdef Err err
        cdef size_t i, n = out.shape[0]
        cdef int64_t where
        cdef uint32_t gte
        memset(&err, 0, sizeof(Err))
        if first + n > self.n_grains:
            raise ValueError("grain range outside the extent")
        cdef _Scratch scratch = self.pool.pop() if self.pool else _Scratch()
        try:
            with nogil:
                for i in range(n):
                    if self.entry(first + i, &gte, &where, &scratch.s, &err) < 0:
                        break
                    out[i] = gte
        finally:
            self.pool.append(scratch)
        return self.describe(&err)

    cdef object describe(self, Err *err):
        if err.kind == E_OK:
            return None
        if err.kind == E_SOURCE:
            exc = getattr(self.failures, "exc", None)
            self.failures.exc = None
            if exc is not None:
                raise exc
        kind = {E_IO: "io", E_TRUNCATED: "truncated", E_GT: "gt", E_GRAIN: "grain",
                E_NOMEM: "nomem", E_SOURCE: "io"}[err.kind]
        if err.detail == D_READ_FAILED:
            msg = f"read failed: {strerror(err.errnum).decode(errors='replace')}"
        else:
            msg = _MESSAGES.get(err.detail, "out of memory ({a} bytes)").format(a=err.a, b=err.b)
        return kind, err.offset, msg


# what each error detail says; {a} and {b} are Err.a and Err.b
_MESSAGES = {
    D_GT_PAST_EOF: "grain directory entry points at sector {a}, past the end of the file",
    D_GT_IN_HEADER: "grain directory entry points at sector {a}, inside the header",
    D_GTE_PAST_EOF: "grain table entry points at sector {a}, past the end of the file "
                    "({b} bytes)",
    D_GTE_IN_META: "grain table entry points at sector {a}, inside the metadata "
                   "(first {b} sectors)",
    D_GTE_IN_GD: "grain table entry points at sector {a}, over the grain directory at "
                 "sector {b}",
    D_MARKER_LBA: "grain marker says sector {a}, the grain table says sector {b}",
    D_MARKER_SIZE: "grain marker gives a compressed size of {a} bytes (1..{b} possible)",
    D_INFLATE_BAD: "compressed grain is not a valid zlib/deflate stream",
    D_INFLATE_BIG: "compressed grain inflates to more than a grain ({a} bytes)",
    D_INFLATE_SHORT: "compressed grain inflates to {a} bytes, fewer than the {b} it must hold",
    D_SHORT_READ: "file ends before the {a} bytes it should hold here",
    D_SE_ENTRY: "seSparse grain table entry {a:#018x} is of no known type (or too large)",
    D_SOURCE: "read failed",
}
