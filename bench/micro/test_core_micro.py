"""pytest-benchmark microbenchmarks of the write-path core, compiled (cy) beside its
pure-Python reference (py), in one run:

    .venv/bin/python -m pytest bench/micro --benchmark-enable --benchmark-group-by=func

The py rows are the baseline each cy row is read against.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from fastpull import _core, _pycore
from fastpull.content.store import ContentStore

BACKENDS = [pytest.param(_core, id="cy"), pytest.param(_pycore, id="py")]
BLOB = 64 << 20
CHUNK = 1 << 20
PIECE = 16 << 10  # what libcurl hands a write callback at a time


@pytest.fixture(params=BACKENDS)
def core(request):
    return request.param


@pytest.fixture
def target(tmp_path, core):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o644)
    core.preallocate(fd, BLOB)
    yield fd
    os.close(fd)


def test_micro_sink_write_path(benchmark, core, target, tmp_path):
    """64 MiB through a RangeSink in 16 KiB pieces, as libcurl delivers them (bitmap marked)."""
    piece = os.urandom(PIECE)

    def run():
        bitmap = core.ChunkBitmap(tmp_path / "bm", BLOB, CHUNK, create=True)
        sink = core.RangeSink(target, bitmap, 0, BLOB, 0)
        sink.arm()
        for _ in range(BLOB // PIECE):
            sink(piece)
        assert bitmap.complete()
        bitmap.close()

    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info["MB"] = BLOB / 1e6


def test_micro_bitmap_set_and_watermark(benchmark, core, tmp_path):
    """Mark 65536 chunks out of order, asking for the watermark after each."""
    n = 1 << 16
    order = list(range(1, n, 2)) + list(range(0, n, 2))

    def run():
        bitmap = core.ChunkBitmap(tmp_path / "bm", n * 4096, 4096, create=True)
        for index in order:
            bitmap.set(index)
            bitmap.watermark()
        assert bitmap.complete()
        bitmap.close()

    benchmark.pedantic(run, rounds=5, iterations=1)


def test_micro_watermark_hashing(benchmark, tmp_path):
    """BlobWriter.advance_digest over 64 MiB already in the page cache (sha256 + preadv)."""
    store = ContentStore(tmp_path / "store")
    data = os.urandom(BLOB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def setup():
        writer = store.open_writer(digest, BLOB, CHUNK)
        sink = writer.sink(0, BLOB, 0)
        sink.arm()
        for i in range(0, BLOB, 1 << 20):
            sink(data[i : i + (1 << 20)])
        return (writer,), {}

    def run(writer):
        assert writer.advance_digest() == BLOB
        writer.close()

    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    benchmark.extra_info["MB"] = BLOB / 1e6
