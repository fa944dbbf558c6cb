"""The write-path core, compiled (cy) and pure-Python reference (py), held to the same behaviour."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest

from fastpull import _core, _pycore

BACKENDS = [pytest.param(_core, id="cy"), pytest.param(_pycore, id="py")]


@pytest.fixture(params=BACKENDS)
def core(request):
    return request.param


@pytest.fixture
def data_fd(tmp_path):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o644)
    yield fd
    os.close(fd)


def test_core_backend_names():
    assert (_core.BACKEND, _pycore.BACKEND) == ("cy", "py")


def test_core_preallocate_reserves_blocks(core, data_fd):
    core.preallocate(data_fd, 3 << 20)
    st = os.fstat(data_fd)
    assert st.st_size == 3 << 20
    assert st.st_blocks * 512 >= 3 << 20  # really allocated, not a sparse file


def test_core_pwrite_all_places_bytes_at_offsets(core, data_fd):
    core.preallocate(data_fd, 100)
    assert core.pwrite_all(data_fd, b"tail", 96) == 4
    assert core.pwrite_all(data_fd, bytearray(b"head"), 0) == 4
    assert core.pwrite_all(data_fd, memoryview(b"xxmidxx")[2:5], 50) == 3
    content = os.pread(data_fd, 100, 0)
    assert content[:4] == b"head" and content[50:53] == b"mid" and content[96:] == b"tail"
    assert content[4:50] == bytes(46)


def test_core_bitmap_set_test_watermark(core, tmp_path):
    bm = core.ChunkBitmap(tmp_path / "bm", size=1000, chunk_size=100, create=True)
    assert (bm.size, bm.chunk_size, bm.nchunks) == (1000, 100, 10)
    assert bm.watermark() == 0 and bm.missing() == list(range(10))
    assert bm.set(1) is True
    assert bm.set(1) is False
    assert bm.watermark() == 0 and bm.watermark_bytes() == 0
    bm.set(0)
    assert bm.watermark() == 2 and bm.watermark_bytes() == 200
    for i in range(2, 10):
        bm.set(i)
    assert bm.complete() and bm.count() == 10 and bm.watermark_bytes() == 1000
    assert bm.chunk_span(9) == (900, 1000)
    with pytest.raises(IndexError):
        bm.set(10)
    bm.close()


def test_core_bitmap_last_chunk_is_short(core, tmp_path):
    bm = core.ChunkBitmap(tmp_path / "bm", size=250, chunk_size=100, create=True)
    assert bm.nchunks == 3 and bm.chunk_span(2) == (200, 250)
    for i in range(3):
        bm.set(i)
    assert bm.watermark_bytes() == 250
    bm.close()


def test_core_bitmap_reopen_keeps_bits_and_rejects_garbage(core, tmp_path):
    bm = core.ChunkBitmap(tmp_path / "bm", size=1 << 30, chunk_size=1 << 20, create=True)
    bm.set(3)
    bm.set(1000)
    bm.close()
    again = core.ChunkBitmap(tmp_path / "bm")
    assert again.nchunks == 1024 and again.count() == 2 and again.test(1000)
    again.close()
    (tmp_path / "junk").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="not a chunk bitmap"):
        core.ChunkBitmap(tmp_path / "junk")


def _set_chunks_in_child(backend_name, path, indices, delay):
    backend = _core if backend_name == "cy" else _pycore
    bm = backend.ChunkBitmap(path)
    for i in indices:
        time.sleep(delay)
        bm.set(i)
    bm.close()


@pytest.mark.parametrize("writer_backend", ["cy", "py"])
def test_core_bitmap_seen_and_woken_across_processes(core, tmp_path, writer_backend):
    """Another process's set() is visible here, and wakes a wait() without polling."""
    path = tmp_path / "bm"
    bm = core.ChunkBitmap(path, size=400, chunk_size=100, create=True)
    seq = bm.sequence
    child = mp.get_context("fork").Process(target=_set_chunks_in_child, args=(writer_backend, str(path), [0, 1], 0.3))
    child.start()
    started = time.monotonic()
    seq2 = bm.wait(seq, 10.0)
    woke_after = time.monotonic() - started
    assert seq2 != seq and bm.test(0)
    assert woke_after < 5.0  # woken by the child, not by the 10 s timeout
    child.join(10)
    assert child.exitcode == 0
    assert bm.watermark() == 2 and bm.missing() == [2, 3]
    bm.close()


def test_core_bitmap_wait_times_out(core, tmp_path):
    bm = core.ChunkBitmap(tmp_path / "bm", size=100, chunk_size=10, create=True)
    started = time.monotonic()
    assert bm.wait(bm.sequence, 0.1) == bm.sequence
    assert 0.05 < time.monotonic() - started < 5
    bm.close()


def test_core_sink_writes_range_and_marks_chunks(core, tmp_path, data_fd):
    core.preallocate(data_fd, 1000)
    bm = core.ChunkBitmap(tmp_path / "bm", size=1000, chunk_size=100, create=True)
    sink = core.RangeSink(data_fd, bm, 200, 500, 200)
    sink.arm()
    assert sink(b"a" * 150) is None
    assert bm.missing() == [0, 1, 3, 4, 5, 6, 7, 8, 9]  # chunk 2 done, 3 half written
    assert sink(b"b" * 150) is None
    assert (sink.offset, sink.received, sink.finished_chunks) == (500, 300, 3)
    assert os.pread(data_fd, 300, 200) == b"a" * 150 + b"b" * 150
    assert sink(b"!") == 0  # beyond the range: abort the transfer
    bm.close()


def test_core_sink_gathers_small_pieces_until_a_chunk_or_128k(core, tmp_path, data_fd):
    """TLS records (~16 KiB) are written 128 KiB at a time, and always before a chunk's bit is set;
    reading ``offset`` writes what is held, so a transfer cut short resumes from every byte received."""
    size, chunk, piece, start = 3 << 20, 1 << 20, 16 << 10, 5000
    body = os.urandom(size)
    core.preallocate(data_fd, size)
    bm = core.ChunkBitmap(tmp_path / "bm", size=size, chunk_size=chunk, create=True)
    sink = core.RangeSink(data_fd, bm, start, size, 0)
    sink.arm()

    def in_file() -> int:  # bytes of the range written so far (always whole pieces)
        n = 0
        while n < size - start and os.pread(data_fd, piece, start + n) == body[start + n : start + n + piece]:
            n += piece
        return min(n, size - start)

    for at in range(start, start + 10 * piece, piece):
        assert sink(body[at : at + piece]) is None
        assert in_file() == (8 * piece if at >= start + 7 * piece else 0)  # the 8th piece fills 128 KiB
    assert sink.received == 10 * piece and sink.offset == start + 10 * piece and in_file() == 10 * piece
    for at in range(start + 10 * piece, size, piece):
        assert sink(body[at : at + piece]) is None
        written = in_file()
        assert sink.received - written < 128 << 10
        assert not bm.test(0) or written >= chunk - start  # a bit only once its bytes are in the file
        if at < chunk <= at + piece:  # the piece that completes chunk 0 is written with all before it
            assert written == at + piece - start and bm.test(0)
    assert (sink.offset, sink.received, sink.finished_chunks) == (size, size - start, 3)
    assert bm.complete() and in_file() == size - start
    bm.close()


def test_core_sink_rebase_drops_held_bytes(core, tmp_path, data_fd):
    core.preallocate(data_fd, 1 << 20)
    bm = core.ChunkBitmap(tmp_path / "bm", size=1 << 20, chunk_size=1 << 20, create=True)
    sink = core.RangeSink(data_fd, bm, 500_000, 1 << 20, 0)
    sink.arm()
    sink(b"a" * 1000)
    sink.rebase(0, 1 << 20, 0)
    sink.arm()
    assert (sink.offset, sink.received) == (0, 0)
    assert os.pread(data_fd, 1 << 20, 0) == bytes(1 << 20)  # the a's are not written, here or there
    assert sink(b"b" * 1000) is None and sink(b"c" * ((1 << 20) - 1000)) is None
    assert sink.offset == 1 << 20 and bm.complete()
    assert os.pread(data_fd, 1 << 20, 0) == b"b" * 1000 + b"c" * ((1 << 20) - 1000)
    bm.close()


def test_core_sink_resumed_mid_chunk_marks_that_chunk(core, tmp_path, data_fd):
    """A chunk resumed from its already-written bytes is complete once the rest lands."""
    core.preallocate(data_fd, 300)
    bm = core.ChunkBitmap(tmp_path / "bm", size=300, chunk_size=100, create=True)
    sink = core.RangeSink(data_fd, bm, 140, 200, 100)
    sink.arm()
    sink(b"z" * 60)
    assert bm.test(1) and not bm.test(0)
    # Without the earlier bytes (valid_from == start) a partial chunk is never marked.
    sink2 = core.RangeSink(data_fd, bm, 250, 300, 250)
    sink2.arm()
    sink2(b"y" * 50)
    assert not bm.test(2)
    bm.close()


def test_core_sink_unarmed_keeps_error_body_and_never_writes(core, tmp_path, data_fd):
    core.preallocate(data_fd, 100)
    bm = core.ChunkBitmap(tmp_path / "bm", size=100, chunk_size=10, create=True)
    sink = core.RangeSink(data_fd, bm, 0, 100, 0)
    sink(b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
    sink(b"x" * 10000)
    assert sink.error_body.startswith(b'{"errors"') and len(sink.error_body) == 4096
    assert os.pread(data_fd, 100, 0) == bytes(100) and bm.count() == 0 and sink.offset == 0
    bm.close()


def test_core_sink_rebase_for_whole_body(core, tmp_path, data_fd):
    core.preallocate(data_fd, 100)
    bm = core.ChunkBitmap(tmp_path / "bm", size=100, chunk_size=30, create=True)
    sink = core.RangeSink(data_fd, bm, 60, 90, 60)
    sink.rebase(0, 100, 0)
    sink.arm()
    sink(b"q" * 100)
    assert bm.complete() and sink.offset == 100
    with pytest.raises(ValueError):
        sink.rebase(50, 40, 0)
    bm.close()


def test_core_sink_write_error_is_kept_not_raised(core, tmp_path):
    bm = core.ChunkBitmap(tmp_path / "bm", size=100, chunk_size=10, create=True)
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        sink = core.RangeSink(fd, bm, 0, 100, 0)
        sink.arm()
        assert sink(b"x" * 10) == 0
        assert isinstance(sink.error, OSError)
        assert bm.count() == 0
    finally:
        os.close(fd)
        bm.close()


def test_core_start_writeback(core, data_fd):
    core.preallocate(data_fd, 1 << 20)
    core.pwrite_all(data_fd, b"x" * (1 << 20), 0)
    core.start_writeback(data_fd, 0, 1 << 20)
    with pytest.raises(OSError):
        core.start_writeback(-1, 0, 10)


def test_core_bitmap_abandoned_wakes_waiters(core, tmp_path):
    bm = core.ChunkBitmap(tmp_path / "bm", size=100, chunk_size=10, create=True)
    follower = core.ChunkBitmap(tmp_path / "bm")
    assert not follower.abandoned
    seq = follower.sequence
    bm.set_abandoned(True)
    assert follower.wait(seq, 5.0) != seq and follower.abandoned
    bm.set_abandoned(False)
    assert not follower.abandoned
    bm.close()
    follower.close()


def test_core_sink_as_libcurl_write_callback(core, tmp_path, data_fd):
    """The compiled sink attaches to libcurl as a C callback; the reference declines."""
    import pycurl
    from faultserver import FaultRegistry

    body = os.urandom(300_000)
    core.preallocate(data_fd, len(body))
    bm = core.ChunkBitmap(tmp_path / "bm", size=len(body), chunk_size=65536, create=True)
    sink = core.RangeSink(data_fd, bm, 100_000, len(body), 65536)
    with FaultRegistry() as server:
        digest = server.add_blob(body)
        c = pycurl.Curl()
        try:
            c.setopt(pycurl.URL, f"{server.url}/v2/any/blobs/{digest}")
            c.setopt(pycurl.HTTPHEADER, [f"Range: bytes=100000-{len(body) - 1}"])
            attached = sink.attach(c)
            assert attached == (core is _core)  # the libcurl that pycurl loaded was found
            if not attached:
                c.setopt(pycurl.WRITEFUNCTION, sink)
            sink.arm()
            c.perform()
        finally:
            c.close()
    assert sink.offset == len(body) and sink.received == len(body) - 100_000
    assert os.pread(data_fd, len(body) - 100_000, 100_000) == body[100_000:]
    assert bm.missing() == [0]  # chunk 0 ends before the range; 1 was completed from valid_from
    bm.close()


@pytest.mark.skipif(bool(os.environ.get("FASTPULL_NO_EXTENSIONS")), reason="FASTPULL_NO_EXTENSIONS selects the reference")
def test_core_engine_writes_through_the_c_callback_in_a_normal_build(tmp_path, monkeypatch):
    """A normal build binds libcurl and every transfer of the engine writes through the C callback:
    none silently falls back to pycurl calling the sink for each buffer."""
    import pycurl
    from faultserver import FaultRegistry

    from fastpull.content import core
    from fastpull.content.store import ContentStore
    from fastpull.engine import FetchEngine, FetchOptions
    from fastpull.http.transport import Origin

    assert core.BACKEND == "cy"
    handles, fallbacks = [], []

    class SpyCurl(pycurl.Curl):
        def __init__(self):
            super().__init__()
            handles.append(self)

        def setopt(self, option, value):
            if option == pycurl.WRITEFUNCTION and isinstance(value, core.RangeSink):
                fallbacks.append(value)
            return super().setopt(option, value)

    monkeypatch.setattr(pycurl, "Curl", SpyCurl)

    class Source:
        origin, attempts = Origin(), None

        def blob_url(self, digest):
            return f"{server.url}/v2/any/blobs/{digest}"

        def authorization(self):
            return None

        def fallback(self, digest, error):
            return None

    body = os.urandom(1 << 20)
    with FaultRegistry() as server, FetchEngine(FetchOptions(chunk_size=128 * 1024, chunks_per_blob=4)) as engine:
        digest = server.add_blob(body)
        path = engine.fetch(ContentStore(tmp_path), Source(), digest, len(body)).result(timeout=30)
        assert path.read_bytes() == body
    assert handles and not fallbacks


def test_core_import_leaves_libcurl_unloaded(tmp_path):
    """Unpack workers import the store and the core but never fetch: no pycurl, libcurl or OpenSSL."""
    code = (
        "import sys, fastpull.unpack.workers\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('pycurl' in sys.modules, '/libcurl' in maps, '/libssl' in maps)\n"
    )
    for env in ({}, {"FASTPULL_NO_EXTENSIONS": "1"}):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True,
                             capture_output=True, text=True).stdout
        assert out.split() == ["False", "False", "False"], env
