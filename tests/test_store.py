"""Content store: per-digest locking, resume, verified commit, nothing unverified committed."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import threading
import time

import pytest
from conftest import blocked_on, wait_until

from fastpull.content.store import ContentStore
from fastpull.digests import digest_hex
from fastpull.errors import DigestMismatch, StoreError


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _land(writer, data: bytes, start: int, end: int) -> None:
    """Bytes [start, end) of ``data`` arrive, as one ranged response (from ``start`` on)."""
    sink = writer.sink(start, end, start)
    sink.arm()
    for i in range(start, end, 64 * 1024):
        sink(data[i : min(i + 64 * 1024, end)])


def _write_all(writer, data: bytes) -> None:
    _land(writer, data, 0, len(data))


def test_store_commit_verifies_and_renames(tmp_path):
    store = ContentStore(tmp_path)
    data = os.urandom(300_000)
    d = _digest(data)
    writer = store.open_writer(d, len(data), chunk_size=64 * 1024)
    _write_all(writer, data)
    path = writer.commit(d)
    assert path == store.blob_path(d) and path.read_bytes() == data
    assert store.has(d, len(data)) and store.ingests() == []
    assert not (store.ingest_dir / f"{digest_hex(d)}.lock").exists()
    assert store.open_writer(d, len(data), 64 * 1024) is None  # already there


def test_store_digest_mismatch_commits_nothing(tmp_path):
    store = ContentStore(tmp_path)
    data = os.urandom(200_000)
    claimed = _digest(b"something else")
    writer = store.open_writer(claimed, len(data), chunk_size=64 * 1024)
    _write_all(writer, data)
    with pytest.raises(DigestMismatch) as err:
        writer.commit()
    assert claimed in str(err.value) and _digest(data) in str(err.value)
    assert not store.has(claimed) and list(store.blobs.iterdir()) == []
    assert store.ingests() == []  # discarded: a retry starts clean


def test_store_commit_refuses_incomplete_blob(tmp_path):
    store = ContentStore(tmp_path)
    data = os.urandom(200_000)
    d = _digest(data)
    writer = store.open_writer(d, len(data), chunk_size=64 * 1024)
    _land(writer, data, 0, 100_000)
    with pytest.raises(StoreError, match="before all chunks arrived"):
        writer.commit(d)
    assert not store.has(d)


def test_store_resume_keeps_finished_chunks(tmp_path):
    store = ContentStore(tmp_path)
    data = os.urandom(1_000_000)
    d = _digest(data)
    writer = store.open_writer(d, len(data), chunk_size=100_000)
    _land(writer, data, 0, 450_000)
    writer.close()  # killed here

    again = store.open_writer(d, len(data), chunk_size=4096)  # chunk size of the ingest wins
    assert again.chunk_size == 100_000
    assert again.missing_chunks() == list(range(4, 10))
    assert again.resumed_bytes == 400_000
    _land(again, data, 400_000, 1_000_000)
    assert again.commit(d).read_bytes() == data


def test_store_advance_digest_follows_watermark(tmp_path):
    store = ContentStore(tmp_path)
    data = os.urandom(500_000)
    d = _digest(data)
    writer = store.open_writer(d, len(data), chunk_size=100_000)
    _land(writer, data, 300_000, 500_000)
    assert writer.advance_digest() == 0  # chunk 0 missing: nothing contiguous yet
    _land(writer, data, 0, 300_000)
    assert writer.advance_digest() == 500_000
    assert writer.commit(d).exists()


def test_store_put_bytes_verifies(tmp_path):
    store = ContentStore(tmp_path)
    with pytest.raises(DigestMismatch):
        store.put_bytes(_digest(b"a"), b"b")
    assert store.put_bytes(_digest(b"a"), b"a").read_bytes() == b"a"


def test_store_lock_excludes_threads_and_wakes_waiter_on_commit(tmp_path):
    """A second writer of the same digest blocks in flock and finds the blob committed."""
    store = ContentStore(tmp_path)
    data = os.urandom(100_000)
    d = _digest(data)
    first = store.open_writer(d, len(data), 65536)
    assert store.open_writer(d, len(data), 65536, block=False) is None
    result = {}
    t = threading.Thread(target=lambda: result.update(writer=store.open_writer(d, len(data), 65536, block=True)))
    t.start()
    wait_until(lambda: blocked_on(store.ingest_dir) == 1, "the second writer blocks in flock")
    assert t.is_alive()
    _write_all(first, data)
    first.commit(d)
    t.join(5)
    assert result == {"writer": None}


def _hold_lock_then_die(root, digest, size, ready, die):
    store = ContentStore(root)
    writer = store.open_writer(digest, size, 65536)
    sink = writer.sink(0, 65536, 0)
    sink.arm()
    sink(b"\0" * 65536)
    ready.set()
    die.wait(10)
    os._exit(1)  # killed: no commit, no close


def test_store_lock_released_when_writer_process_dies(tmp_path):
    data = bytes(200_000)
    d = _digest(data)
    ready, die = mp.get_context("fork").Event(), mp.get_context("fork").Event()
    child = mp.get_context("fork").Process(target=_hold_lock_then_die, args=(str(tmp_path), d, len(data), ready, die))
    child.start()
    assert ready.wait(10)
    store = ContentStore(tmp_path)
    # The child dies once we block on its lock; we are woken by its death.
    killer = threading.Thread(target=lambda: (wait_until(lambda: blocked_on(store.ingest_dir) == 1, "we block"), die.set()))
    killer.start()
    writer = store.open_writer(d, len(data), 65536, block=True)
    killer.join()
    child.join(5)
    assert writer is not None and writer.missing_chunks() == [1, 2, 3]
    writer.close()


def test_store_reader_follows_a_download_in_progress(tmp_path):
    from fastpull.content.store import BlobReader

    store = ContentStore(tmp_path)
    data = os.urandom(1_000_000)
    d = _digest(data)
    writer = store.open_writer(d, len(data), chunk_size=100_000)

    def download():
        for start in range(0, len(data), 100_000):  # in order, slowly, then commit
            time.sleep(0.02)
            _land(writer, data, start, start + 100_000)
        writer.commit(d)

    t = threading.Thread(target=download)
    t.start()
    with BlobReader(store, d, len(data)) as reader:
        got = reader.read()
    t.join()
    assert got == data


def test_store_reader_stops_when_download_is_abandoned(tmp_path):
    from fastpull.content.store import BlobReader

    store = ContentStore(tmp_path)
    data = os.urandom(300_000)
    d = _digest(data)
    writer = store.open_writer(d, len(data), chunk_size=100_000)
    _land(writer, data, 0, 100_000)
    reader = BlobReader(store, d, len(data), liveness_check=60)
    assert reader.read(100_000) == data[:100_000]
    threading.Timer(0.2, writer.close).start()  # the download gives up
    started = time.monotonic()
    with pytest.raises(StoreError, match="stopped at 100000 bytes"):
        reader.read(1)
    assert time.monotonic() - started < 30  # woken by the writer, not by the 60 s liveness check
    reader.close()


def test_store_reader_of_a_download_that_commits_while_it_looks(tmp_path, monkeypatch):
    """The reader finds no bytes, then no lock: the writer finished and committed in between
    (a small blob, the reader's thread descheduled). That is the end of the download, not its death."""
    from fastpull.content.store import BlobReader

    store = ContentStore(tmp_path)
    data = os.urandom(300_000)
    d = _digest(data)
    writer = store.open_writer(d, len(data), chunk_size=100_000)
    reader = BlobReader(store, d, len(data))
    looked = BlobReader._writer_alive

    def finish_first(self):
        _land(writer, data, 0, len(data))
        writer.commit(d)
        return looked(self)

    monkeypatch.setattr(BlobReader, "_writer_alive", finish_first)
    with reader:
        assert reader.read() == data


def test_store_reader_of_committed_blob_and_of_nothing(tmp_path):
    from fastpull.content.store import BlobReader

    store = ContentStore(tmp_path)
    d = _digest(b"hello")
    store.put_bytes(d, b"hello")
    with BlobReader(store, d, 5) as reader:
        assert reader.read() == b"hello"
    with pytest.raises(StoreError, match="neither stored nor being downloaded"):
        BlobReader(store, _digest(b"nope"), 4)
