"""Streaming unpack: worker processes decompress and untar layers while they download.

A worker opens the layer with :class:`fastpull.content.store.BlobReader`, which follows the blob's
chunk watermark (sleeping on the bitmap's futex), so unpacking starts with the first chunk
and runs alongside the download. The diffID (sha256 of the uncompressed tar) is computed on
the way and checked; the caller makes the result visible only after both the blob's digest
(checked by the fetch engine) and the diffID match.

The path is lean on CPU and memory (``bench/bench_cpu.py`` measures it): one thread per worker reads
each compressed byte once into a reused buffer, ISA-L inflates it into blocks of at most 1 MiB,
and the tar applier writes file contents straight from those blocks; nothing else is buffered.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from isal.igzip_lib import DECOMP_GZIP, IgzipDecompressor, IsalError

from fastpull.content.store import BlobReader, ContentStore
from fastpull.errors import DigestMismatch, FastpullError, MalformedArchive, ManifestError
from fastpull.oci.manifest import LAYER_COMPRESSION
from fastpull.unpack.archive import DEVICE_NODE, apply_layer

_READ_SIZE = 256 << 10
"""Compressed bytes per read of the blob, into one reused buffer."""
_BLOCK = 1 << 20
"""Uncompressed bytes per block handed to the tar applier, at most."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters


@dataclass(frozen=True)
class LayerJob:
    """One layer to unpack into ``target`` (an existing, empty directory)."""

    store_root: str
    digest: str
    size: int
    media_type: str
    diff_id: str
    target: str
    whiteouts: str = "overlay"
    """``apply_layer``'s whiteout mode: "overlay" for a snapshot, "keep" for a rootfs layer."""
    progress: tuple[str, int] | None = None
    """An :class:`UnpackProgress`'s path and this layer's slot in it."""


@dataclass(frozen=True)
class LayerResult:
    digest: str
    entries: int
    uncompressed_bytes: int
    seconds: float
    implied_dirs: frozenset[str]
    """Directories the layer used without listing them: they keep the lower layers' metadata."""
    devices_skipped: int = 0
    """Device nodes not created (no CAP_MKNOD)."""


class _TarStream:
    """A layer's uncompressed tar, made of the blocks of an iterator: ``read(n)`` hands out parts of
    a block without copying them (memoryviews); each block is hashed once (the diffID) and counted."""

    def __init__(self, blocks: Iterator[bytes], on_block: Callable[[], None] = lambda: None):
        self._blocks = blocks
        self._on_block = on_block
        self._view = memoryview(b"")
        self._at = 0
        self._hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int) -> memoryview:
        if self._at == len(self._view):
            block = next(self._blocks, b"")
            self._on_block()
            self._hash.update(block)
            self.count += len(block)
            self._view, self._at = memoryview(block), 0
        out = self._view[self._at : self._at + n]
        self._at += len(out)
        return out

    def hexdigest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def layer_blocks(raw: BlobReader, media_type: str, digest: str) -> Iterator[bytes]:
    """The uncompressed tar inside the layer blob ``digest`` of ``media_type``, as non-empty blocks."""
    if media_type not in LAYER_COMPRESSION:
        raise ManifestError(f"layer {digest}", f"unsupported layer media type {media_type}")
    compression = LAYER_COMPRESSION[media_type]
    if compression == "gzip":
        return _gunzip(raw, digest)
    if compression == "zstd":
        return _unzstd(raw)
    return iter(lambda: raw.read(_BLOCK), b"")


def _gunzip(raw: BlobReader, digest: str) -> Iterator[bytes]:
    """Inflate (ISA-L) the gzip members of ``raw``, one after another; zero bytes after a member are
    skipped, as gzip does. Each compressed byte is read once, into one reused buffer."""
    buf = memoryview(bytearray(_READ_SIZE))
    inflater = None
    produced = 0
    try:
        while True:
            if inflater is None or inflater.eof:
                rest = b"" if inflater is None else inflater.unused_data.lstrip(b"\0")
                while not rest:
                    n = raw.readinto(buf)
                    if not n:
                        return
                    rest = bytes(buf[:n]) if inflater is None else bytes(buf[:n]).lstrip(b"\0")
                inflater = IgzipDecompressor(flag=DECOMP_GZIP)
                data: bytes | memoryview = rest
            elif inflater.needs_input:
                n = raw.readinto(buf)
                if not n:
                    raise EOFError("the gzip stream ends inside a member")
                data = buf[:n]
            else:
                data = b""  # more output is pending from the input already given
            block = inflater.decompress(data, _BLOCK)
            if block:
                produced += len(block)
                yield block
    except IsalError as e:  # named at the tar offset it reached
        raise MalformedArchive(digest, produced, f"malformed gzip: {e}") from None


def _unzstd(raw: BlobReader) -> Iterator[bytes]:
    import zstandard  # here: gzip layers are the rule, and workers stay smaller without it

    with zstandard.ZstdDecompressor().stream_reader(raw, read_size=_READ_SIZE, read_across_frames=True,
                                                    closefd=False) as reader:
        yield from iter(lambda: reader.read(_BLOCK), b"")


def unpack_layer(job: LayerJob) -> LayerResult:
    """Unpack one layer (runs in a worker process); raises DigestMismatch on a wrong diffID."""
    started = time.monotonic()
    where = f"layer {job.digest}"
    with BlobReader(ContentStore(job.store_root), job.digest, job.size) as raw, _progress_slot(job) as slot:

        def read_so_far() -> None:
            slot[0] = raw.pos

        tar = _TarStream(layer_blocks(raw, job.media_type, job.digest), read_so_far)
        stats = apply_layer(tar, Path(job.target), layer=job.digest, whiteouts=job.whiteouts)
    if tar.hexdigest() != job.diff_id:
        raise DigestMismatch(f"{where} uncompressed content (diffID)", job.diff_id, tar.hexdigest())
    return LayerResult(job.digest, stats.entries, tar.count, time.monotonic() - started,
                       frozenset(stats.implied_dirs), stats.skipped[DEVICE_NODE])


class UnpackProgress:
    """How many compressed bytes of each layer the workers have read: one 8-byte slot per layer in
    a memory file of this process, which a worker maps through ``/proc/<pid>/fd`` (it is the fork
    server's child, not this process's, so it inherits nothing)."""

    def __init__(self, layers: int):
        self._fd = os.memfd_create("fastpull-unpack-progress", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, 8 * max(layers, 1))
        self._map = mmap.mmap(self._fd, 8 * max(layers, 1))
        self._slots = memoryview(self._map).cast("q")
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"

    def __getitem__(self, slot: int) -> int:
        return self._slots[slot]

    def close(self) -> None:
        self._slots.release()
        self._map.close()
        os.close(self._fd)


@contextlib.contextmanager
def _progress_slot(job: LayerJob) -> Iterator[memoryview | list[int]]:
    """The job's slot of its UnpackProgress, mapped (an aligned 8-byte store, read whole by the
    other side); a list that nobody reads if it has none or it cannot be opened: progress is advisory."""
    try:
        fd = os.open(job.progress[0], os.O_RDWR | os.O_CLOEXEC) if job.progress else -1
    except OSError:
        fd = -1
    if fd < 0:
        yield [0]
        return
    try:
        mapped = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    slots = memoryview(mapped).cast("q")
    slot = slots[job.progress[1] : job.progress[1] + 1]
    try:
        yield slot
    finally:
        slot.release()
        slots.release()
        mapped.close()


def _worker_init(parent: int, path: list[str]) -> None:
    """Set up a worker process: the parent's ``sys.path``; death with the parent; Ctrl-C left to it;
    freed memory kept for reuse (every block inflated is a fresh 1 MiB allocation, which glibc would
    map and unmap each time: a page fault per 4 KiB, ~0.4 CPU s per GB of tar)."""
    sys.path[:] = path
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers itself
    try:
        parent_fd = os.pidfd_open(parent)
    except ProcessLookupError:  # the parent is already gone
        os._exit(1)
    # The worker's parent is the fork server, not the process that uses it, so the kernel's
    # parent-death signal does not apply; a pidfd turns readable when that process exits.
    threading.Thread(target=_exit_with, args=(parent_fd,), name="fastpull-parent-watch", daemon=True).start()
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, 16 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 32 << 20)


class Unpacker:
    """A bounded pool of worker processes unpacking layers; ``submit`` from any thread.

    The workers import only what this process can import, never from the working directory
    (see :func:`_start_forkserver`), and exit when this process does, even if it is killed.
    """

    def __init__(self, workers: int | None = None):
        workers = workers or os.cpu_count() or 1
        if workers <= 0:
            raise ValueError("workers must be greater than zero")
        context = multiprocessing.get_context("forkserver")  # the parent runs threads: no plain fork
        context.set_forkserver_preload(["fastpull.unpack.workers"])
        _start_forkserver()
        self.workers = workers
        self._lock = threading.Lock()
        self._stopped = False
        # A worker's sys.path is this process's, but '' (the working directory) would be the
        # directory this process started in: leave it out.
        worker_path = [p for p in sys.path if p]
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                         initargs=(os.getpid(), worker_path))
        # Start every worker now, so that process start-up overlaps resolving the image.
        for _ in range(workers):
            self._pool.submit(os.getpid)

    def submit(self, job: LayerJob) -> Future:
        with self._lock:  # no new worker starts once terminate() has listed them
            if self._stopped:
                future: Future = Future()
                future.set_exception(FastpullError(f"unpack of layer {job.digest} cancelled: the workers were stopped"))
                return future
            return self._pool.submit(unpack_layer, job)

    def terminate(self) -> None:
        """Kill every worker now, abandoning the layers they were unpacking, and wait until they are
        gone (their targets can then be removed); later submits fail."""
        with self._lock:
            self._stopped = True
            # ProcessPoolExecutor has no public way to stop running work before Python 3.14's
            # kill_workers(); its process table is the one it would use.
            workers = list((self._pool._processes or {}).values())
        for process in workers:
            process.kill()
        for process in workers:
            process.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Unpacker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_forkserver_lock = threading.Lock()


def _start_forkserver() -> None:
    """Start multiprocessing's fork server (and its resource tracker), unless running, so that they
    import nothing from the working directory.

    Both run as ``python -c``, which puts the working directory first on ``sys.path``: an
    ``isal.py`` or a ``fastpull/`` there would be imported by the fork server (that preloads this
    module) and run in every worker. ``PYTHONSAFEPATH`` (Python 3.11+) leaves it out; it is set
    in this process's environment only while they start.
    """
    with _forkserver_lock:
        saved = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONSAFEPATH"]
            else:
                os.environ["PYTHONSAFEPATH"] = saved


def _exit_with(parent_fd: int) -> None:
    select.select([parent_fd], [], [])
    os._exit(1)
