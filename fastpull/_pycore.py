"""Pure-Python reference of the compiled core (``csrc/_core.pyx``): same API, same file format.

Selected with ``FASTPULL_NO_EXTENSIONS=1``; the tests run against both.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

BACKEND = "py"
MAGIC = b"FPCHUNKS"
VERSION = 1
HEADER_SIZE = 64
_SEQ_OFFSET = 12
_ABANDONED_OFFSET = 40
_SYS_FUTEX = 202  # x86_64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_SYNC_FILE_RANGE_WRITE = 2
_COALESCE = 128 << 10  # bytes a sink gathers before writing (TLS hands it 8-16 KiB records)
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of disk for ``fd`` so later pwrites cannot hit ENOSPC."""
    if size > 0:
        os.posix_fallocate(fd, 0, size)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range to disk now, so a later fdatasync finds little left."""
    if _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pwrite_all(fd: int, data, offset: int) -> int:
    """Write all of ``data`` at ``offset``; returns the number of bytes written."""
    view = memoryview(data)
    total = len(view)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
    return total


def _create_bitmap_file(path: str, size: int, chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError("chunk size must be greater than zero")
    nchunks = (size + chunk_size - 1) // chunk_size
    header = bytearray(HEADER_SIZE)
    struct.pack_into("<8sIIQQQ", header, 0, MAGIC, VERSION, 0, size, chunk_size, nchunks)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(bytes((nchunks + 7) // 8))
    os.replace(tmp, path)


class ChunkBitmap:
    """One bit per finished chunk of a blob, in a small mmap'd file shared across processes."""

    def __init__(self, path, size: int = 0, chunk_size: int = 0, create: bool = False):
        self.path = os.fspath(path)
        if create:
            _create_bitmap_file(self.path, size, chunk_size)
        with open(self.path, "r+b") as f:
            if os.fstat(f.fileno()).st_size < HEADER_SIZE:
                raise ValueError(f"chunk bitmap {self.path} is truncated")
            self._map = mmap.mmap(f.fileno(), 0)
        magic, _version, _seq, self.size, self.chunk_size, self.nchunks = struct.unpack_from(
            "<8sIIQQQ", self._map, 0
        )
        if magic != MAGIC:
            self.close()
            raise ValueError(f"{self.path} is not a chunk bitmap")
        if HEADER_SIZE + (self.nchunks + 7) // 8 > len(self._map):
            self.close()
            raise ValueError(f"chunk bitmap {self.path} is truncated")
        self._seq = ctypes.c_uint32.from_buffer(self._map, _SEQ_OFFSET)
        self._low = 0

    def close(self) -> None:
        if self._map is not None:
            self._seq = None
            self._map.close()
            self._map = None

    def _open(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError("chunk bitmap is closed")
        return self._map

    def _check(self, index: int) -> None:
        self._open()
        if not 0 <= index < self.nchunks:
            raise IndexError(index)

    def set(self, index: int) -> bool:
        """Mark chunk ``index`` finished; returns True if it was not set before. Wakes waiters."""
        self._check(index)
        pos = HEADER_SIZE + (index >> 3)
        bit = 1 << (index & 7)
        old = self._map[pos]
        if old & bit:
            return False
        self._map[pos] = old | bit  # one writer per blob (it holds the ingest lock)
        self._bump_and_wake()
        return True

    def _bump_and_wake(self) -> None:
        self._seq.value = (self._seq.value + 1) & 0xFFFFFFFF
        _libc.syscall(_SYS_FUTEX, ctypes.byref(self._seq), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)

    @property
    def abandoned(self) -> bool:
        """True once the writer stopped without committing (set by :meth:`set_abandoned`)."""
        return struct.unpack_from("<I", self._open(), _ABANDONED_OFFSET)[0] != 0

    def set_abandoned(self, value: bool) -> None:
        """Mark the download stopped (True) or taken up again (False), waking every waiter."""
        struct.pack_into("<I", self._open(), _ABANDONED_OFFSET, int(value))
        self._bump_and_wake()

    def test(self, index: int) -> bool:
        self._check(index)
        return bool((self._map[HEADER_SIZE + (index >> 3)] >> (index & 7)) & 1)

    def count(self) -> int:
        """Number of finished chunks."""
        return sum(self.test(i) for i in range(self.nchunks))

    def missing(self) -> list[int]:
        """Indices of the chunks not finished yet, in order."""
        return [i for i in range(self.nchunks) if not self.test(i)]

    def watermark(self) -> int:
        """Number of contiguous finished chunks from the start."""
        i = self._low
        while i < self.nchunks and self.test(i):
            i += 1
        self._low = i
        return i

    def watermark_bytes(self) -> int:
        """Bytes from offset 0 that are known to be in the data file."""
        return min(self.watermark() * self.chunk_size, self.size)

    def complete(self) -> bool:
        return self.watermark() == self.nchunks

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(start, end) byte offsets of chunk ``index``."""
        if not 0 <= index < self.nchunks:
            raise IndexError(index)
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    @property
    def sequence(self) -> int:
        """Counter bumped on every newly finished chunk; pass it to :meth:`wait`."""
        self._open()
        return self._seq.value

    def wait(self, seen: int, timeout: float) -> int:
        """Block until :attr:`sequence` differs from ``seen`` or ``timeout`` seconds pass (no polling)."""
        self._open()
        ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
        _libc.syscall(
            _SYS_FUTEX, ctypes.byref(self._seq), _FUTEX_WAIT, ctypes.c_uint32(seen), ctypes.byref(ts), None, 0
        )
        return self._seq.value


class RangeSink:
    """pycurl WRITEFUNCTION that pwrites a response body at its place in the blob file.

    Until :meth:`arm` is called (on a 2xx status) the body is an error page:
    the first few KiB are kept for the error message and nothing touches the file.
    Received bytes are gathered (up to 128 KiB) and written together; a chunk is marked in the
    bitmap once all its bytes since ``valid_from`` are in the file. ``offset`` is where the bytes
    in the file end: reading it writes the bytes held first, so a transfer cut short resumes from
    every byte it received. ``received`` counts the bytes received.
    A failed write aborts the transfer and is kept in ``error``.
    """

    def __init__(self, fd: int, bitmap: ChunkBitmap, start: int, end: int, valid_from: int):
        self._fd = fd
        self._bitmap = bitmap
        self._held: bytearray | None = None  # received bytes not written yet; allocated when armed
        self.rebase(start, end, valid_from)

    def rebase(self, start: int, end: int, valid_from: int) -> None:
        """Point the sink at a new byte range (e.g. a server that ignored Range sends from 0)."""
        if not valid_from <= start <= end:
            raise ValueError("need valid_from <= start <= end")
        self._offset = start
        self.end = end
        self.valid_from = valid_from
        self.armed = False
        self.received = 0
        self.finished_chunks = 0
        self.error: OSError | None = None
        self._error_body = bytearray()
        if self._held is not None:
            self._held.clear()

    def arm(self) -> None:
        if self._held is None:
            self._held = bytearray()
        self.armed = True

    def attach(self, curl) -> bool:
        """The reference has no C callback: pass the sink itself as WRITEFUNCTION."""
        return False

    @property
    def offset(self) -> int:
        held = self._held
        if held and self.error is None:  # held bytes never complete a chunk: no bit to set
            try:
                pwrite_all(self._fd, held, self._offset)
            except OSError as exc:
                self.error = exc
            else:
                self._offset += len(held)
                held.clear()
        return self._offset

    @property
    def error_body(self) -> bytes:
        return bytes(self._error_body)

    def __call__(self, data: bytes):
        n = len(data)
        if not self.armed:
            if len(self._error_body) < 4096:
                self._error_body += data[: 4096 - len(self._error_body)]
            return None
        if n == 0:
            return None
        held = self._held
        upto = self._offset + len(held) + n
        if upto > self.end:
            return 0  # more than was asked for: abort the transfer (CURLE_WRITE_ERROR)
        cs = self._bitmap.chunk_size
        held += data
        if len(held) < _COALESCE and upto < self.end and upto // cs == self._offset // cs:
            self.received += n
            return None  # written when the buffer fills, a chunk or the range is complete
        try:
            pwrite_all(self._fd, held, self._offset)
        except OSError as exc:  # e.g. ENOSPC: kept for the engine, the transfer aborts
            self.error = exc
            return 0
        held.clear()
        self.received += n
        before = self._offset
        self._offset = upto
        lo = max(before // cs, -(-self.valid_from // cs))
        hi = self._bitmap.nchunks if upto == self._bitmap.size else upto // cs
        for index in range(lo, hi):
            if self._bitmap.set(index):
                self.finished_chunks += 1
        return None
