"""Streaming unpack: worker processes decompress and untar layers while they download.

A worker opens the layer with :class:`fastpull.store.BlobReader`, which follows the blob's
chunk watermark (sleeping on the bitmap's futex), so unpacking starts with the first chunk
and runs alongside the download. The diffID (sha256 of the uncompressed tar) is computed on
the way and checked; the caller makes the result visible only after both the blob's digest
(checked by the fetch engine) and the diffID match.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard
from isal import igzip_threaded

from fastpull.archive import DEVICE_NODE, apply_layer
from fastpull.errors import DigestMismatch, ManifestError
from fastpull.manifest import LAYER_COMPRESSION
from fastpull.store import BlobReader, ContentStore

_READ_SIZE = 1 << 20


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


class _DigestingReader(io.RawIOBase):
    """Passes reads through, hashing every byte (the layer's diffID) and counting them."""

    def __init__(self, inner):
        super().__init__()
        self._inner = inner
        self._hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._inner.readinto(buffer)
        self._hash.update(memoryview(buffer)[:n])
        self.count += n
        return n

    def hexdigest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def open_layer(raw, media_type: str, where: str):
    """A reader of the uncompressed tar inside a layer blob of ``media_type``."""
    if media_type not in LAYER_COMPRESSION:
        raise ManifestError(where, f"unsupported layer media type {media_type}")
    compression = LAYER_COMPRESSION[media_type]
    if compression == "gzip":
        # ISA-L inflates in its own thread (the GIL is released) while this one untars.
        return igzip_threaded.open(raw, "rb", threads=1, block_size=_READ_SIZE)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=_READ_SIZE, read_across_frames=True)
    return raw


def unpack_layer(job: LayerJob) -> LayerResult:
    """Unpack one layer (runs in a worker process); raises DigestMismatch on a wrong diffID."""
    started = time.monotonic()
    where = f"layer {job.digest}"
    with BlobReader(ContentStore(job.store_root), job.digest, job.size) as raw:
        stream = open_layer(io.BufferedReader(raw, _READ_SIZE), job.media_type, where)
        try:
            tar = _DigestingReader(stream)
            stats = apply_layer(io.BufferedReader(tar, _READ_SIZE), Path(job.target), layer=job.digest,
                                whiteouts=job.whiteouts)
        finally:
            stream.close()
    if tar.hexdigest() != job.diff_id:
        raise DigestMismatch(f"{where} uncompressed content (diffID)", job.diff_id, tar.hexdigest())
    return LayerResult(job.digest, stats.entries, tar.count, time.monotonic() - started,
                       frozenset(stats.implied_dirs), stats.skipped[DEVICE_NODE])


class Unpacker:
    """A bounded pool of worker processes unpacking layers; ``submit`` from any thread."""

    def __init__(self, workers: int | None = None):
        workers = workers or os.cpu_count() or 1
        if workers <= 0:
            raise ValueError("workers must be greater than zero")
        context = multiprocessing.get_context("forkserver")  # the parent runs threads: no plain fork
        context.set_forkserver_preload(["fastpull.unpack"])
        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        # Start every worker now, so that process start-up overlaps resolving the image.
        for _ in range(workers):
            self._pool.submit(os.getpid)

    def submit(self, job: LayerJob) -> Future:
        return self._pool.submit(unpack_layer, job)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Unpacker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
