"""Content store: verified blobs by digest, and resumable in-flight ingests.

Layout under ``root`` (an OCI image layout directory can be the root)::

    blobs/sha256/<hex>               committed, verified content
    .fastpull/ingest/<hex>.lock      per-digest lock (flock) held by the one writer
    .fastpull/ingest/<hex>/data      the blob, preallocated, written at offsets
    .fastpull/ingest/<hex>/bitmap    shared chunk bitmap (see fastpull.content.core.ChunkBitmap)
    .fastpull/gc.lock                held exclusively by a garbage collection (fastpull.content.gc),
                                     shared by whatever must not interleave with one
    .fastpull/format.json            ``{"format": N}``: the store's format (``FORMAT``)

The store knows nothing of HTTP. A writer is obtained under an exclusive per-digest
``flock`` (per open file, so it excludes threads of one process as well as other
processes); another puller of the same digest blocks in ``flock`` and is woken by the
kernel when the writer commits or dies: no polling.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastpull.content.core import ChunkBitmap, RangeSink, preallocate, start_writeback
from fastpull.digests import digest_hex
from fastpull.errors import DigestMismatch, StoreError

_HASH_BLOCK = 1 << 20
FORMAT = 1
"""The format of the store and what lives in it (the layout, leases, the daemon's ledger and layer
cache). A store without ``format.json`` was written by a release from before formats were recorded:
format 1, read as it is, and marked so when opened here. A newer format is refused, never misread."""
PUT_SUFFIX = ".put"
"""``put_bytes`` writes ``<hex>.put<pid>.<thread>`` in the ingest directory, then renames it into ``blobs/``."""


_thread_buffers = threading.local()


def _hash_buffer() -> memoryview:
    """A per-thread read buffer for hashing: memory stays flat however many blobs are hashed."""
    buf = getattr(_thread_buffers, "buf", None)
    if buf is None:
        buf = _thread_buffers.buf = memoryview(bytearray(_HASH_BLOCK))
    return buf


def acquire_key_lock(lock_path: Path, *, block: bool, done: Callable[[], bool]) -> int | None:
    """Take the exclusive ``flock`` on ``lock_path`` unless ``done()`` says the work is finished.

    Returns the locked descriptor (close it to release), or None when ``done()`` holds (perhaps
    after waiting for the holder) or, with ``block=False``, when another holder has it. The
    holder may unlink the lock file when it finishes: a waiter that then wakes on the dead
    inode sees ``done()`` and returns None, or retries on a fresh lock file.
    """
    while True:
        if done():
            return None
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(str(lock_path), e.strerror or str(e)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            fresh = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            fresh = False
        if fresh and not done():
            return fd
        os.close(fd)
        if fresh:
            return None


class ContentStore:
    """Blobs addressed by digest under ``root``; nothing unverified is ever placed in ``blobs/``."""

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = False):
        """``durable``: fdatasync each blob before its commit rename (writeback starts as it is hashed),
        as containerd does; off by default because it ties pull speed to disk writeback speed."""
        self.root = Path(root)
        self.durable = durable
        self.blobs = self.root / "blobs" / "sha256"
        self.ingest_dir = self.root / ".fastpull" / "ingest"
        self.gc_lock_path = self.root / ".fastpull" / "gc.lock"
        self.format_path = self.root / ".fastpull" / "format.json"
        marked = self._check_format()
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.ingest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(str(self.root), e.strerror or str(e)) from e
        if not marked:
            self._mark_format()

    def _check_format(self) -> bool:
        """Whether the store records its format; StoreError if it is one this code does not know."""
        try:
            found = json.loads(self.format_path.read_bytes())["format"]
            if type(found) is not int or found < 1:
                raise ValueError(f"format {found!r}")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(str(self.format_path), f"unreadable store format marker: {e}") from e
        if found > FORMAT:
            raise StoreError(str(self.root), f"the store has format {found}, newer than the {FORMAT} this fastpull "
                                             "knows: upgrade fastpull to use it")
        return True

    def _mark_format(self) -> None:
        tmp = self.format_path.with_name(f".format.json.{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps({"format": FORMAT}) + "\n")
            os.replace(tmp, self.format_path)
        except OSError:  # a store this user may only read: the next writer marks it
            tmp.unlink(missing_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    def has(self, digest: str, size: int | None = None) -> bool:
        """True if the blob is committed (and has ``size`` bytes, when given)."""
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    @contextmanager
    def gc_excluded(self) -> Iterator[None]:
        """No garbage collection runs in this block (it waits for one that is running to finish):
        for taking and extending leases, and for writes through temporary names a collection
        would take for leftovers."""
        try:
            fd = os.open(self.gc_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(str(self.gc_lock_path), e.strerror or str(e)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def put_bytes(self, digest: str, data: bytes) -> Path:
        """Verify and commit a small blob held in memory (manifests, indexes)."""
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatch(digest, digest, actual)
        path = self.blob_path(digest)
        if not self.has(digest, len(data)):
            tmp = self.ingest_dir / f"{digest_hex(digest)}{PUT_SUFFIX}{os.getpid()}.{threading.get_ident()}"
            with self.gc_excluded():  # a collection removes the temporary files it finds
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, path)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise StoreError(str(path), e.strerror or str(e)) from e
        return path

    def open_writer(self, digest: str, size: int, chunk_size: int, *, block: bool = True) -> BlobWriter | None:
        """Take the per-digest lock and open (or resume) the ingest of a blob.

        Returns None if the blob is already committed (possibly by the writer we waited
        for) or, with ``block=False``, if another writer holds the lock.
        """
        lock_path = self.ingest_dir / f"{digest_hex(digest)}.lock"
        lock_fd = acquire_key_lock(lock_path, block=block, done=lambda: self.has(digest, size))
        if lock_fd is None:
            return None
        try:
            return BlobWriter(self, digest, size, chunk_size, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def ingests(self) -> list[str]:
        """Digests with an in-flight or interrupted ingest."""
        return sorted("sha256:" + p.name for p in self.ingest_dir.iterdir() if p.is_dir())


class BlobWriter:
    """The single writer of one blob: preallocated data file, chunk bitmap, running sha256.

    ``sink()`` hands out pycurl write callbacks; ``advance_digest()`` hashes forward to the
    contiguous-finished watermark while later chunks still arrive; ``commit()`` verifies
    size and digest and renames into ``blobs/``. ``close()`` always releases the lock and
    keeps partial data for a later resume.
    """

    def __init__(self, store: ContentStore, digest: str, size: int, chunk_size: int, lock_fd: int):
        self.store = store
        self.digest = digest
        self.size = size
        self._lock_fd = lock_fd
        hexd = digest_hex(digest)
        self.dir = store.ingest_dir / hexd
        self.data_path = self.dir / "data"
        self.bitmap_path = self.dir / "bitmap"
        self._hash = hashlib.sha256()
        self.hashed = 0
        self._hash_lock = threading.Lock()
        self._closed = False
        self.bitmap: ChunkBitmap | None = None
        self.fd = -1
        try:
            self.dir.mkdir(exist_ok=True)
            self.bitmap = self._open_bitmap(chunk_size)
            self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if os.fstat(self.fd).st_size != size or self.bitmap.count() == 0:
                preallocate(self.fd, size)
                os.ftruncate(self.fd, size)
        except OSError as e:  # e.g. ENOSPC preallocating: release what was opened (the caller closes the lock)
            if self.fd >= 0:
                os.close(self.fd)
            if self.bitmap is not None:
                self.bitmap.close()
            raise StoreError(str(self.dir), e.strerror or str(e)) from e
        self.resumed_bytes = self._finished_bytes()
        self.bitmap.set_abandoned(False)  # followers of an earlier, dead writer carry on with us

    def _open_bitmap(self, chunk_size: int) -> ChunkBitmap:
        """Resume the existing bitmap if it describes this blob, else start a fresh one."""
        if self.bitmap_path.exists():
            try:
                bitmap = ChunkBitmap(self.bitmap_path)
                if bitmap.size == self.size and self.data_path.exists():
                    return bitmap
                bitmap.close()
            except ValueError:
                pass
            self.data_path.unlink(missing_ok=True)
        return ChunkBitmap(self.bitmap_path, self.size, chunk_size, create=True)

    def _finished_bytes(self) -> int:
        spans = (self.bitmap.chunk_span(i) for i in range(self.bitmap.nchunks) if self.bitmap.test(i))
        return sum(end - start for start, end in spans)

    @property
    def chunk_size(self) -> int:
        return self.bitmap.chunk_size

    def missing_chunks(self) -> list[int]:
        return self.bitmap.missing()

    def sink(self, start: int, end: int, valid_from: int) -> RangeSink:
        """A pycurl WRITEFUNCTION writing bytes [start, end) (bytes from ``valid_from`` are already here)."""
        return RangeSink(self.fd, self.bitmap, start, end, valid_from)

    def advance_digest(self) -> int:
        """Hash forward to the contiguous-finished watermark; returns bytes hashed so far."""
        with self._hash_lock:
            if self._closed:
                return self.hashed
            target = self.bitmap.watermark_bytes()
            view = _hash_buffer()
            begin = self.hashed
            while self.hashed < target:
                n = os.preadv(self.fd, [view[: min(target - self.hashed, _HASH_BLOCK)]], self.hashed)
                if n <= 0:
                    raise StoreError(str(self.data_path), f"short read at offset {self.hashed}")
                self._hash.update(view[:n])
                self.hashed += n
            if self.store.durable and self.hashed > begin:
                start_writeback(self.fd, begin, self.hashed - begin)
            return self.hashed

    def commit(self, expected_digest: str | None = None) -> Path:
        """Verify size and digest, then atomically rename into the store. Always closes the writer.

        On a mismatch the ingest is discarded (a retry starts clean) and DigestMismatch
        names the blob; nothing is committed.
        """
        expected = expected_digest or self.digest
        try:
            if not self.bitmap.complete():
                raise StoreError(str(self.data_path), f"commit of {self.digest} before all chunks arrived")
            self.advance_digest()
            actual = "sha256:" + self._hash.hexdigest()
            if self.hashed != self.size or actual != expected:
                self.bitmap.set_abandoned(True)  # followers must not trust these bytes
                self._discard()
                raise DigestMismatch(f"blob {self.digest} ({self.size} bytes)", expected, actual)
            target = self.store.blob_path(expected)
            try:
                if self.store.durable:
                    os.fdatasync(self.fd)
                os.rename(self.data_path, target)
            except OSError as e:
                raise StoreError(str(target), e.strerror or str(e)) from e
            self._discard()
            return target
        finally:
            self.close()

    def _discard(self) -> None:
        """Remove the ingest files and the lock path (we still hold the lock)."""
        for path in (self.data_path, self.bitmap_path):
            path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise
        (self.store.ingest_dir / f"{digest_hex(self.digest)}.lock").unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock; partial data and the bitmap stay for a resume."""
        with self._hash_lock:  # never unmap or close under a running advance_digest()
            if self._closed:
                return
            self._closed = True
            if not self.bitmap.complete():
                self.bitmap.set_abandoned(True)
            self.bitmap.close()
            os.close(self.fd)
            os.close(self._lock_fd)


class BlobReader(io.RawIOBase):
    """Reads a blob from its start while it may still be downloading, in this or another process.

    Follows the chunk bitmap's contiguous watermark and sleeps on its futex until more bytes
    land: no polling. A committed blob is read plainly; an ingest renamed into the store while
    being read goes on through the same descriptor. Raises StoreError if the download is
    abandoned (or its writer died) before the bytes needed arrive.
    """

    def __init__(self, store: ContentStore, digest: str, size: int, *, liveness_check: float = 2.0):
        super().__init__()
        self.digest = digest
        self.size = size
        self.pos = 0
        self._liveness_check = liveness_check
        self._bitmap: ChunkBitmap | None = None
        self._lock_path = store.ingest_dir / f"{digest_hex(digest)}.lock"
        ingest = store.ingest_dir / digest_hex(digest)
        for _ in range(2):  # the ingest may be committed between our two looks
            try:
                self._fd = os.open(store.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
                return
            except FileNotFoundError:
                pass
            try:
                bitmap = ChunkBitmap(ingest / "bitmap")
            except (FileNotFoundError, ValueError):
                continue
            try:
                self._fd = os.open(ingest / "data", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                bitmap.close()
                continue
            self._bitmap = bitmap
            return
        raise StoreError(str(ingest), f"blob {digest} is neither stored nor being downloaded")

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def wait_beyond(self, offset: int) -> int:
        """Block until more than ``offset`` bytes (or all of them) can be read; return how many can."""
        if self._bitmap is None:
            return self.size
        while True:
            seen = self._bitmap.sequence  # read before the watermark: no lost wake-up
            available = self._bitmap.watermark_bytes()
            if available > offset or available >= self.size:
                return available
            if self._bitmap.abandoned or not self._writer_alive():
                # Read once more: the writer may have finished, committed and removed its lock since.
                available = self._bitmap.watermark_bytes()
                if available > offset or available >= self.size:
                    return available
                raise StoreError(str(self._lock_path.parent), f"download of {self.digest} stopped at {available} bytes")
            self._bitmap.wait(seen, self._liveness_check)

    def _writer_alive(self) -> bool:
        """True while some process holds the blob's ingest lock (its path is removed at commit)."""
        try:
            fd = os.open(self._lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def readinto(self, buffer) -> int:
        if self.pos >= self.size:
            return 0
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.wait_beyond(self.pos) - self.pos)
        n = os.preadv(self._fd, [view[:want]], self.pos)
        if n <= 0:
            raise StoreError(self.digest, f"short read at offset {self.pos}")
        self.pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            if self._bitmap is not None:
                self._bitmap.close()
        super().close()
