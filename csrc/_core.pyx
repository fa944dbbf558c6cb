# cython: language_level=3
"""fastpull's compiled core: positioned writes into preallocated files and the
shared chunk bitmap.

Kept deliberately small; ``fastpull/_pycore.py`` is the pure-Python reference
with the same behaviour, and ``fastpull.content.core`` picks one of the two.
"""

from libc.errno cimport errno, EINTR, EAGAIN, ETIMEDOUT
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.types cimport off_t

cdef extern from "fcntl.h" nogil:
    int posix_fallocate(int fd, off_t offset, off_t length)

cdef extern from "unistd.h" nogil:
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)

cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset)
    long syscall(long number, ...)

cdef extern from "fcntl.h" nogil:
    int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WRITE

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "dlfcn.h" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_LAZY, RTLD_NOLOAD

cdef extern from "sys/syscall.h" nogil:
    long SYS_futex

cdef extern from "linux/futex.h" nogil:
    int FUTEX_WAIT, FUTEX_WAKE

cdef extern from "time.h" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec

from cpython.object cimport PyObject

cdef extern from *:
    """
    static inline uint32_t fp_load32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint32_t fp_add32(uint32_t *p, uint32_t v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
    static inline uint8_t fp_or8(uint8_t *p, uint8_t v) { return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }
    static inline uint8_t fp_load8(uint8_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    /* pycurl's CurlObject: PyObject_HEAD, dict, weakreflist, then the CURL * handle. */
    static inline void *fp_pycurl_handle(PyObject *o) {
        return *(void **)((char *)o + sizeof(PyObject) + 2 * sizeof(void *));
    }
    """
    uint32_t fp_load32(uint32_t *p) nogil
    uint32_t fp_add32(uint32_t *p, uint32_t v) nogil
    uint8_t fp_or8(uint8_t *p, uint8_t v) nogil
    uint8_t fp_load8(uint8_t *p) nogil
    void *fp_pycurl_handle(PyObject *o)

import os

BACKEND = "cy"

# Bitmap file layout (little endian), shared with _pycore.py:
#   0  8s  magic b"FPCHUNKS"
#   8  u32 version
#   12 u32 sequence: bumped (and futex-woken) on every newly finished chunk
#   16 u64 blob size
#   24 u64 chunk size
#   32 u64 number of chunks
#   40 u32 abandoned: 1 when the writer stopped without committing (waiters are woken)
#   44 ... reserved up to HEADER_SIZE, then one bit per chunk (LSB first)
MAGIC = b"FPCHUNKS"
VERSION = 1
cdef enum:
    _HEADER_SIZE = 64
    _SEQ_OFFSET = 12
    _ABANDONED_OFFSET = 40
HEADER_SIZE = _HEADER_SIZE


def preallocate(int fd, off_t size):
    """Reserve ``size`` bytes of disk for ``fd`` so later pwrites cannot hit ENOSPC."""
    if size <= 0:
        return
    cdef int rc
    with nogil:
        rc = posix_fallocate(fd, 0, size)
    if rc != 0:
        raise OSError(rc, os.strerror(rc))


def start_writeback(int fd, off_t offset, off_t nbytes):
    """Ask the kernel to start writing a range to disk now, so a later fdatasync finds little left."""
    cdef int rc
    with nogil:
        rc = sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)
    if rc != 0:
        raise OSError(errno, os.strerror(errno))


def pwrite_all(int fd, const uint8_t[::1] data, off_t offset):
    """Write all of ``data`` at ``offset``; returns the number of bytes written."""
    _pwrite_all(fd, &data[0] if data.shape[0] else NULL, data.shape[0], offset)
    return data.shape[0]


cdef int _pwrite_all(int fd, const uint8_t *buf, size_t n, off_t offset) except -1:
    cdef ssize_t w
    while n > 0:
        with nogil:
            w = pwrite(fd, buf, n, offset)
        if w < 0:
            if errno == EINTR:
                continue
            raise OSError(errno, os.strerror(errno))
        buf += w
        n -= w
        offset += w
    return 0


cdef class ChunkBitmap:
    """One bit per finished chunk of a blob, in a small mmap'd file shared across processes.

    Invariant: a set bit means every byte of that chunk is in the data file.
    """

    cdef uint8_t *_map
    cdef size_t _maplen
    cdef readonly uint64_t size
    cdef readonly uint64_t chunk_size
    cdef readonly uint64_t nchunks
    cdef uint64_t _low  # every chunk below this index is known to be set
    cdef readonly object path

    def __cinit__(self):
        self._map = NULL

    def __init__(self, path, uint64_t size=0, uint64_t chunk_size=0, bint create=False):
        """Open the bitmap at ``path``; with ``create`` make a fresh one for ``size``/``chunk_size``."""
        self.path = os.fspath(path)
        if create:
            _create_bitmap_file(self.path, size, chunk_size)
        fd = os.open(self.path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            if st.st_size < HEADER_SIZE:
                raise ValueError(f"chunk bitmap {self.path} is truncated")
            self._maplen = st.st_size
            self._map = <uint8_t *> mmap(NULL, self._maplen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if <void *> self._map == MAP_FAILED:
                self._map = NULL
                raise OSError(errno, os.strerror(errno), self.path)
        finally:
            os.close(fd)
        header = bytes(self._map[:HEADER_SIZE])
        if header[:8] != MAGIC:
            self.close()
            raise ValueError(f"{self.path} is not a chunk bitmap")
        self.size = int.from_bytes(header[16:24], "little")
        self.chunk_size = int.from_bytes(header[24:32], "little")
        self.nchunks = int.from_bytes(header[32:40], "little")
        if HEADER_SIZE + (self.nchunks + 7) // 8 > self._maplen:
            self.close()
            raise ValueError(f"chunk bitmap {self.path} is truncated")
        self._low = 0

    def close(self):
        if self._map != NULL:
            munmap(self._map, self._maplen)
            self._map = NULL

    def __dealloc__(self):
        self.close()

    cdef inline uint8_t *_bits(self) except NULL:
        if self._map == NULL:
            raise ValueError("chunk bitmap is closed")
        return self._map + _HEADER_SIZE

    cpdef bint set(self, uint64_t index) except -1:
        """Mark chunk ``index`` finished; returns True if it was not set before. Wakes waiters."""
        if index >= self.nchunks:
            raise IndexError(index)
        self._bits()
        return _bitmap_set(self._map, index)

    cdef void _bump_and_wake(self):
        _bump_and_wake(self._map)

    @property
    def abandoned(self):
        """True once the writer stopped without committing (set by :meth:`set_abandoned`)."""
        self._bits()
        return fp_load32(<uint32_t *> (self._map + _ABANDONED_OFFSET)) != 0

    def set_abandoned(self, bint value):
        """Mark the download stopped (True) or taken up again (False), waking every waiter."""
        self._bits()
        (<uint32_t *> (self._map + _ABANDONED_OFFSET))[0] = value
        self._bump_and_wake()

    cpdef bint test(self, uint64_t index) except -1:
        if index >= self.nchunks:
            raise IndexError(index)
        return (fp_load8(self._bits() + (index >> 3)) >> (index & 7)) & 1

    def count(self):
        """Number of finished chunks."""
        cdef uint64_t i, n = 0
        for i in range(self.nchunks):
            n += self.test(i)
        return n

    def missing(self):
        """Indices of the chunks not finished yet, in order."""
        return [i for i in range(self.nchunks) if not self.test(i)]

    cpdef uint64_t watermark(self) except? 0:
        """Number of contiguous finished chunks from the start."""
        cdef uint64_t i = self._low
        while i < self.nchunks and self.test(i):
            i += 1
        self._low = i
        return i

    def watermark_bytes(self):
        """Bytes from offset 0 that are known to be in the data file."""
        return min(self.watermark() * self.chunk_size, self.size)

    def complete(self):
        return self.watermark() == self.nchunks

    def chunk_span(self, uint64_t index):
        """(start, end) byte offsets of chunk ``index``."""
        if index >= self.nchunks:
            raise IndexError(index)
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    @property
    def sequence(self):
        """Counter bumped on every newly finished chunk; pass it to :meth:`wait`."""
        self._bits()
        return fp_load32(<uint32_t *> (self._map + _SEQ_OFFSET))

    def wait(self, uint32_t seen, double timeout):
        """Block until :attr:`sequence` differs from ``seen`` or ``timeout`` seconds pass (no polling)."""
        if self._map == NULL:
            raise ValueError("chunk bitmap is closed")
        cdef timespec ts
        ts.tv_sec = <long> timeout
        ts.tv_nsec = <long> ((timeout - ts.tv_sec) * 1e9)
        cdef uint32_t *seq = <uint32_t *> (self._map + _SEQ_OFFSET)
        with nogil:
            syscall(SYS_futex, seq, FUTEX_WAIT, seen, &ts, NULL, 0)
        return fp_load32(seq)


cdef inline void _bump_and_wake(uint8_t *bitmap) noexcept nogil:
    cdef uint32_t *seq = <uint32_t *> (bitmap + _SEQ_OFFSET)
    fp_add32(seq, 1)
    syscall(SYS_futex, seq, FUTEX_WAKE, 0x7FFFFFFF, NULL, NULL, 0)


cdef inline bint _bitmap_set(uint8_t *bitmap, uint64_t index) noexcept nogil:
    """Set a chunk's bit; True if it was clear (then waiters are woken)."""
    cdef uint8_t bit = 1 << (index & 7)
    if fp_or8(bitmap + _HEADER_SIZE + (index >> 3), bit) & bit:
        return False
    _bump_and_wake(bitmap)
    return True


def _create_bitmap_file(path, uint64_t size, uint64_t chunk_size):
    if chunk_size == 0:
        raise ValueError("chunk size must be greater than zero")
    nchunks = (size + chunk_size - 1) // chunk_size
    header = bytearray(HEADER_SIZE)
    header[:8] = MAGIC
    header[8:12] = VERSION.to_bytes(4, "little")
    header[16:24] = size.to_bytes(8, "little")
    header[24:32] = chunk_size.to_bytes(8, "little")
    header[32:40] = nchunks.to_bytes(8, "little")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(bytes((nchunks + 7) // 8))
    os.replace(tmp, path)


cdef enum:
    _COALESCE = 128 << 10  # bytes a sink gathers before writing (TLS hands it 8-16 KiB records)


cdef struct SinkState:
    int fd
    uint8_t *bitmap          # the blob's mmap'd chunk bitmap (header included)
    uint64_t chunk_size
    uint64_t nchunks
    uint64_t size
    uint64_t offset          # bytes from the range's start that are in the file
    uint64_t end
    uint64_t valid_from
    uint64_t received        # bytes received: in the file, or held in buf
    char *buf                # received bytes not written yet (after offset); allocated when armed
    size_t held
    int armed
    int finished_chunks
    int write_errno
    size_t error_len
    char error_body[4096]


cdef size_t _sink_write(SinkState *st, const char *data, size_t n) noexcept nogil:
    """The write path, free of Python: returns n, or 0 to abort the transfer.

    Small pieces are gathered and written together: when the buffer would fill, when a chunk (or
    the range) is complete, so that a bit is set only once its bytes are in the file.
    """
    cdef size_t keep
    if not st.armed:  # an error page: keep its start for the message
        keep = n if n < sizeof(st.error_body) - st.error_len else sizeof(st.error_body) - st.error_len
        memcpy(st.error_body + st.error_len, data, keep)
        st.error_len += keep
        return n
    if n == 0:
        return 0
    cdef uint64_t upto = st.offset + st.held + n
    if upto > st.end:
        return 0  # more than was asked for
    cdef uint64_t cs = st.chunk_size
    if st.held + n < _COALESCE and upto < st.end and upto // cs == st.offset // cs:
        memcpy(st.buf + st.held, data, n)
        st.held += n
        st.received += n
        return n
    cdef iovec iov[2]
    iov[0].iov_base = st.buf
    iov[0].iov_len = st.held
    iov[1].iov_base = <void *> data
    iov[1].iov_len = n
    if _pwritev_all(st.fd, iov, 2, st.offset) < 0:
        st.write_errno = errno  # e.g. ENOSPC: the engine reports it
        return 0
    cdef uint64_t before = st.offset
    st.offset = upto
    st.held = 0
    st.received += n
    cdef uint64_t lo = before // cs
    cdef uint64_t first = (st.valid_from + cs - 1) // cs  # first chunk wholly inside [valid_from, ...)
    cdef uint64_t hi = st.nchunks if st.offset == st.size else st.offset // cs
    if lo < first:
        lo = first
    while lo < hi:
        if _bitmap_set(st.bitmap, lo):
            st.finished_chunks += 1
        lo += 1
    return n


cdef int _pwritev_all(int fd, iovec *iov, int count, uint64_t at) noexcept nogil:
    """Write the ``count`` buffers of ``iov`` (empty ones allowed) at ``at``; -1 with errno on failure."""
    cdef ssize_t w
    while count > 0:
        if iov[0].iov_len == 0:
            iov += 1
            count -= 1
            continue
        w = pwritev(fd, iov, count, at)
        if w < 0:
            if errno == EINTR:
                continue
            return -1
        at += w
        while count > 0 and <size_t> w >= iov[0].iov_len:
            w -= iov[0].iov_len
            iov += 1
            count -= 1
        if count > 0:
            iov[0].iov_base = <char *> iov[0].iov_base + w
            iov[0].iov_len -= w
    return 0


cdef size_t _curl_write(char *ptr, size_t size, size_t nmemb, void *userdata) noexcept nogil:
    return _sink_write(<SinkState *> userdata, ptr, size * nmemb)


# libcurl entry points, found in the copy of libcurl that pycurl loaded (see bind_libcurl).
ctypedef int (*easy_setopt_t)(void *, int, ...) noexcept nogil
ctypedef int (*easy_getinfo_t)(void *, int, ...) noexcept nogil
cdef easy_setopt_t _easy_setopt = NULL
cdef easy_getinfo_t _easy_getinfo = NULL
cdef int _bound = -1  # -1: not tried yet; then 0 or 1
cdef enum:
    _CURLOPT_WRITEDATA = 10001
    _CURLOPT_WRITEFUNCTION = 20011
    _CURLINFO_PRIVATE = 0x100015  # CURLINFO_STRING + 21


def bind_libcurl():
    """Find curl_easy_setopt/getinfo in the libcurl that pycurl loaded; True if found.

    With them, :meth:`RangeSink.attach` hands libcurl a C write callback: no Python runs per
    received buffer. Tried once, on the first ``attach`` (pycurl is loaded by then): importing the
    core does not load libcurl, so processes that never fetch (unpack workers) never map it.
    """
    global _easy_setopt, _easy_getinfo, _bound
    cdef bytes path
    cdef void *lib
    if _bound < 0:
        found = _loaded_libcurl()
        if found is None:  # pycurl not imported yet: try again later
            return False
        _bound = 0
        path = os.fsencode(found)
        lib = dlopen(path, RTLD_LAZY | RTLD_NOLOAD)
        if lib == NULL:
            return False
        _easy_setopt = <easy_setopt_t> dlsym(lib, b"curl_easy_setopt")
        _easy_getinfo = <easy_getinfo_t> dlsym(lib, b"curl_easy_getinfo")
        if _easy_setopt == NULL or _easy_getinfo == NULL:
            _easy_setopt = NULL
            _easy_getinfo = NULL
            return False
        _bound = 1
    return _bound == 1


def _loaded_libcurl():
    """Path of the libcurl this process runs on (a pycurl wheel bundles its own copy), or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip().rpartition(" ")[2]  # (the core is built without wraparound)
            if "/libcurl" in path and ".so" in path:
                return path
    return None


cdef class RangeSink:
    """Writes a response body at its place in the blob file: a libcurl write callback.

    Until :meth:`arm` is called (on a 2xx status) the body is an error page:
    the first few KiB are kept for the error message and nothing touches the file.
    Received bytes are gathered (up to 128 KiB) and written together; a chunk is marked in the
    bitmap once all its bytes since ``valid_from`` are in the file. ``offset`` is where the bytes
    in the file end: reading it writes the bytes held first, so a transfer cut short resumes from
    every byte it received. ``received`` counts the bytes received.
    A failed write aborts the transfer and is kept in ``error``.
    """

    cdef SinkState st
    cdef ChunkBitmap bitmap  # keeps the mapping alive while libcurl writes through st

    def __cinit__(self):
        self.st.buf = NULL

    def __dealloc__(self):
        free(self.st.buf)

    def __init__(self, int fd, ChunkBitmap bitmap, uint64_t start, uint64_t end, uint64_t valid_from):
        bitmap._bits()
        self.bitmap = bitmap
        self.st.fd = fd
        self.st.bitmap = bitmap._map
        self.st.chunk_size = bitmap.chunk_size
        self.st.nchunks = bitmap.nchunks
        self.st.size = bitmap.size
        self.rebase(start, end, valid_from)

    def rebase(self, uint64_t start, uint64_t end, uint64_t valid_from):
        """Point the sink at a new byte range (e.g. a server that ignored Range sends from 0)."""
        if valid_from > start or start > end:
            raise ValueError("need valid_from <= start <= end")
        self.st.offset = start
        self.st.end = end
        self.st.valid_from = valid_from
        self.st.armed = 0
        self.st.received = 0
        self.st.held = 0
        self.st.finished_chunks = 0
        self.st.write_errno = 0
        self.st.error_len = 0

    def arm(self):
        if self.st.buf == NULL:
            self.st.buf = <char *> malloc(_COALESCE)
            if self.st.buf == NULL:
                raise MemoryError()
        self.st.armed = 1

    def attach(self, curl):
        """Make this sink the C write callback of a pycurl handle; False if that cannot be done
        safely (then pass the sink itself as WRITEFUNCTION)."""
        if not bind_libcurl():
            return False
        cdef void *handle = fp_pycurl_handle(<PyObject *> curl)
        cdef void *owner = NULL
        # pycurl stores its object as the handle's CURLOPT_PRIVATE: proof that we found the handle.
        if handle == NULL or _easy_getinfo(handle, _CURLINFO_PRIVATE, &owner) != 0 or owner != <void *> curl:
            return False
        if _easy_setopt(handle, _CURLOPT_WRITEFUNCTION, _curl_write) != 0:
            return False
        return _easy_setopt(handle, _CURLOPT_WRITEDATA, &self.st) == 0

    @property
    def offset(self):
        cdef iovec held
        if self.st.held and not self.st.write_errno:  # held bytes never complete a chunk: no bit to set
            held.iov_base = self.st.buf
            held.iov_len = self.st.held
            if _pwritev_all(self.st.fd, &held, 1, self.st.offset) < 0:
                self.st.write_errno = errno
            else:
                self.st.offset += self.st.held
                self.st.held = 0
        return self.st.offset

    @property
    def end(self):
        return self.st.end

    @property
    def valid_from(self):
        return self.st.valid_from

    @property
    def received(self):
        return self.st.received

    @property
    def armed(self):
        return bool(self.st.armed)

    @property
    def finished_chunks(self):
        return self.st.finished_chunks

    @property
    def error(self):
        if self.st.write_errno == 0:
            return None
        return OSError(self.st.write_errno, os.strerror(self.st.write_errno))

    @property
    def error_body(self):
        return self.st.error_body[: self.st.error_len]

    def __call__(self, data):
        cdef const uint8_t[::1] view = data
        cdef size_t n = view.shape[0]
        if n == 0:
            return None
        return None if _sink_write(&self.st, <const char *> &view[0], n) == n else 0
