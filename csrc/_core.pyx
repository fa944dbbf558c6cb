# cython: language_level=3
"""fastpull's compiled core: positioned writes into preallocated files and the
shared chunk bitmap.

Kept deliberately small; ``fastpull/_pycore.py`` is the pure-Python reference
with the same behaviour, and ``fastpull.core`` picks one of the two.
"""

from libc.errno cimport errno, EINTR, EAGAIN, ETIMEDOUT
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.types cimport off_t

cdef extern from "fcntl.h" nogil:
    int posix_fallocate(int fd, off_t offset, off_t length)

cdef extern from "unistd.h" nogil:
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
    long syscall(long number, ...)

cdef extern from "fcntl.h" nogil:
    int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WRITE

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "sys/syscall.h" nogil:
    long SYS_futex

cdef extern from "linux/futex.h" nogil:
    int FUTEX_WAIT, FUTEX_WAKE

cdef extern from "time.h" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec

cdef extern from *:
    """
    static inline uint32_t fp_load32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint32_t fp_add32(uint32_t *p, uint32_t v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
    static inline uint8_t fp_or8(uint8_t *p, uint8_t v) { return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }
    static inline uint8_t fp_load8(uint8_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    """
    uint32_t fp_load32(uint32_t *p) nogil
    uint32_t fp_add32(uint32_t *p, uint32_t v) nogil
    uint8_t fp_or8(uint8_t *p, uint8_t v) nogil
    uint8_t fp_load8(uint8_t *p) nogil

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
        cdef uint8_t bit = 1 << (index & 7)
        cdef uint8_t old = fp_or8(self._bits() + (index >> 3), bit)
        if old & bit:
            return False
        self._bump_and_wake()
        return True

    cdef void _bump_and_wake(self):
        cdef uint32_t *seq = <uint32_t *> (self._map + _SEQ_OFFSET)
        fp_add32(seq, 1)
        with nogil:
            syscall(SYS_futex, seq, FUTEX_WAKE, 0x7FFFFFFF, NULL, NULL, 0)

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


cdef class RangeSink:
    """pycurl WRITEFUNCTION that pwrites a response body at its place in the blob file.

    Until :meth:`arm` is called (on a 2xx status) the body is an error page:
    the first few KiB are kept for the error message and nothing touches the file.
    Chunks whose bytes are all written since ``valid_from`` are marked in the bitmap.
    A failed write aborts the transfer and is kept in ``error``.
    """

    cdef int fd
    cdef ChunkBitmap bitmap
    cdef readonly uint64_t offset
    cdef readonly uint64_t end
    cdef readonly uint64_t valid_from
    cdef readonly uint64_t received
    cdef readonly bint armed
    cdef readonly int finished_chunks
    cdef readonly object error
    cdef bytearray _error_body

    def __init__(self, int fd, ChunkBitmap bitmap, uint64_t start, uint64_t end, uint64_t valid_from):
        self.fd = fd
        self.bitmap = bitmap
        self.rebase(start, end, valid_from)

    def rebase(self, uint64_t start, uint64_t end, uint64_t valid_from):
        """Point the sink at a new byte range (e.g. a server that ignored Range sends from 0)."""
        if valid_from > start or start > end:
            raise ValueError("need valid_from <= start <= end")
        self.offset = start
        self.end = end
        self.valid_from = valid_from
        self.armed = False
        self.received = 0
        self.finished_chunks = 0
        self.error = None
        self._error_body = bytearray()

    def arm(self):
        self.armed = True

    @property
    def error_body(self):
        return bytes(self._error_body)

    def __call__(self, data):
        cdef const uint8_t[::1] view = data
        cdef uint64_t n = view.shape[0]
        if not self.armed:
            if len(self._error_body) < 4096:
                self._error_body += data[: 4096 - len(self._error_body)]
            return None
        if n == 0:
            return None
        if self.offset + n > self.end:
            return 0  # more than was asked for: abort the transfer (CURLE_WRITE_ERROR)
        try:
            _pwrite_all(self.fd, &view[0], n, self.offset)
        except OSError as exc:  # e.g. ENOSPC: kept for the engine, the transfer aborts
            self.error = exc
            return 0
        cdef uint64_t before = self.offset
        self.offset += n
        self.received += n
        cdef uint64_t cs = self.bitmap.chunk_size
        cdef uint64_t first = (self.valid_from + cs - 1) // cs  # first chunk wholly inside [valid_from, ...)
        cdef uint64_t lo = before // cs
        cdef uint64_t hi
        if lo < first:
            lo = first
        if self.offset == self.bitmap.size:
            hi = self.bitmap.nchunks
        else:
            hi = self.offset // cs  # chunks below hi end at or before offset
        while lo < hi:
            if self.bitmap.set(lo):
                self.finished_chunks += 1
            lo += 1
        return None
