"""The fetch engine's planner, without curl or threads: the tuner fed synthetic throughput curves,
request spans, queues and stragglers, and the :class:`Planner`'s decisions over blobs and transfers
built by hand (a real chunk bitmap, a stand-in for the sink)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fastpull.content.core import ChunkBitmap
from fastpull.engine.options import FetchOptions
from fastpull.engine.planner import (
    MiB,
    Planner,
    Span,
    Tuner,
    is_straggler,
    next_request,
    put_back,
    request_chunks,
    tail_request_bytes,
)
from fastpull.engine.transfers import BlobFetch, Transfer


def _drive(tuner: Tuner, throughput, seconds: float = 60.0, step: float = 0.5) -> list[int]:
    """Run the tuner against ``throughput(transfers) -> bytes/s``; returns the target over time."""
    now, total, targets = 0.0, 0.0, []
    while now < seconds:
        total += throughput(tuner.target) * step
        now += step
        tuner.observe(now, int(total), tuner.target)
        targets.append(tuner.target)
    return targets


def test_tuner_climbs_until_the_link_is_full():
    # Each stream gets 25 MB/s until 16 streams fill a 400 MB/s link.
    tuner = Tuner(initial=4, cap=64, request_bytes=None)
    targets = _drive(tuner, lambda n: min(n * 25e6, 400e6))
    assert 16 <= max(targets[-20:]) <= 36  # reached the knee, did not run to the cap
    assert min(targets[-20:]) >= 12


def test_tuner_stays_low_when_more_streams_do_not_help():
    tuner = Tuner(initial=8, cap=64, request_bytes=None)
    targets = _drive(tuner, lambda n: 300e6)  # CPU-bound: flat whatever the streams
    assert max(targets) <= 12 and targets[-1] == 8


def test_tuner_halves_on_throttling_and_holds():
    tuner = Tuner(initial=32, cap=64, request_bytes=None)
    tuner.throttled(now=0.0)
    assert tuner.target == 16
    tuner.observe(0.5, 0, 16)
    tuner.observe(2.0, int(1e9), 16)  # plenty of throughput, but still within the hold
    assert tuner.target == 16


def test_tuner_request_size_follows_per_stream_rate():
    tuner = Tuner(initial=4, cap=4, request_bytes=None)
    _drive(tuner, lambda n: n * 20 * MiB, seconds=5)
    assert tuner.request_bytes == 20 * MiB
    slow = Tuner(initial=4, cap=4, request_bytes=None)
    _drive(slow, lambda n: n * 1 * MiB, seconds=5)
    assert slow.request_bytes == 4 * MiB  # never below 4 MiB


def test_tuner_fixed_settings_never_move():
    tuner = Tuner(initial=4, cap=48, request_bytes=None, adaptive=False)
    assert (tuner.target, tuner.request_bytes) == (48, 16 * MiB)
    _drive(tuner, lambda n: n * 1e6, seconds=10)
    tuner.throttled(now=11.0)
    assert (tuner.target, tuner.request_bytes) == (48, 16 * MiB)
    pinned = Tuner(initial=4, cap=48, request_bytes=2 * MiB)
    _drive(pinned, lambda n: n * 50e6, seconds=10)
    assert pinned.request_bytes == 2 * MiB


def _drive_connections(tuner: Tuner, per_connection: float, link: float, seconds: float = 120.0) -> list[int]:
    """Run the tuner where each TCP connection gets at most ``per_connection`` bytes/s and all of
    them ``link``: HTTP/2 streams of one connection share its cap. Returns streams per connection."""
    now, total, sharing = 0.0, 0.0, []
    while now < seconds:
        connections = -(-tuner.target // tuner.streams_per_connection)
        total += min(connections * per_connection, link) * 0.5
        now += 0.5
        tuner.observe(now, int(total), tuner.target)
        sharing.append(tuner.streams_per_connection)
    return sharing


def test_tuner_shares_connections_only_while_the_link_stays_full():
    # 25 MB/s per connection, 125 MB/s link: 5 connections fill it.
    tuner = Tuner(initial=16, cap=64, request_bytes=None)
    tuner.multiplexed = True
    sharing = _drive_connections(tuner, 25e6, 125e6)
    connections = -(-tuner.target // tuner.streams_per_connection)
    assert max(sharing) > 1  # it tried fewer connections
    assert connections >= 5  # and kept enough of them to fill the link
    assert sharing[-1] <= tuner.target // 5


def test_tuner_keeps_one_stream_per_connection_when_each_connection_is_capped():
    # The link is never full: every connection given up costs throughput.
    tuner = Tuner(initial=8, cap=8, request_bytes=None)
    tuner.multiplexed = True
    sharing = _drive_connections(tuner, 25e6, 10e9)
    # Tried now and then (once per hold), each time undone after one window.
    assert sharing[-1] == 1 and 0 < sharing.count(2) <= len(sharing) * 0.05


def test_tuner_never_shares_without_http2_or_when_pinned():
    plain = Tuner(initial=16, cap=64, request_bytes=None)
    assert set(_drive_connections(plain, 25e6, 125e6)) == {1}
    pinned = Tuner(initial=16, cap=64, request_bytes=None, streams_per_connection=4)
    pinned.multiplexed = True
    assert set(_drive_connections(pinned, 25e6, 125e6)) == {4}


def test_requests_cover_consecutive_chunks_and_stop_at_a_resume_point():
    pending = [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert next_request(pending, 3, {}) == range(0, 3)
    assert next_request(pending, 3, {}) == range(3, 4)  # chunk 4 is not pending
    assert next_request(pending, 3, {6: 6 * MiB + 100}) == range(5, 6)  # 6 resumes mid-way: own request
    assert next_request(pending, 8, {6: 6 * MiB + 100}) == range(6, 10)
    assert pending == []
    put_back(pending, [7, 3, 7])
    assert pending == [3, 7]


def test_streamed_blobs_get_short_requests_unless_the_size_is_fixed():
    assert request_chunks(16 * MiB, MiB, 1000, streamed=False, adapt_size=True) == 16
    assert request_chunks(16 * MiB, MiB, 64, streamed=True, adapt_size=True) == 2  # 1/8 of it
    assert request_chunks(16 * MiB, MiB, 64 * 8, streamed=True, adapt_size=True) == 8  # >= 1/64 of the blob
    assert request_chunks(16 * MiB, MiB, 1000, streamed=True, adapt_size=False) == 16


def test_a_straggler_is_far_slower_than_its_peers_and_far_from_done():
    peers = [10e6, 12e6, 11e6]
    assert is_straggler(1e6, 50 * MiB, 5.0, peers, ratio=8, min_age=3)
    assert not is_straggler(1e6, 50 * MiB, 2.0, peers, ratio=8, min_age=3)  # too young to judge
    assert not is_straggler(2e6, 50 * MiB, 5.0, peers, ratio=8, min_age=3)  # not 8x slower
    assert not is_straggler(1e6, MiB, 5.0, peers, ratio=8, min_age=3)  # nearly done: let it finish
    assert not is_straggler(1e6, 50 * MiB, 5.0, peers[:1], ratio=8, min_age=3)  # no peers to compare


# ---- the Planner over blobs and transfers ---------------------------------------------------------


@pytest.fixture
def bitmap(tmp_path):
    """A 10 MiB blob's bitmap of 1 MiB chunks."""
    bm = ChunkBitmap(tmp_path / "bitmap", size=10 * MiB, chunk_size=MiB, create=True)
    yield bm
    bm.close()


def _blob(bitmap=None, mode="ranged", pending=(), **fields) -> BlobFetch:
    blob = BlobFetch(None, None, "sha256:" + "ab" * 32, 10 * MiB, mode=mode, pending=list(pending), **fields)
    blob.writer = SimpleNamespace(bitmap=bitmap) if bitmap is not None else None
    return blob


def _transfer(blob: BlobFetch, chunks: range | None, *, received=0, offset=None, started=0.0, armed=True) -> Transfer:
    start = chunks[0] * MiB if chunks else 0
    end = chunks[-1] * MiB + MiB if chunks else blob.size
    sink = SimpleNamespace(received=received, offset=start + received if offset is None else offset, armed=armed)
    t = Transfer(blob, chunks, start, end, sink, started, "http://registry/blob")
    blob.transfers.add(t)
    return t


def _take_slots(planner: Planner, blobs: list[BlobFetch], in_flight: int) -> list[int]:
    """The blobs (as indices) given each slot, starting a transfer on each as the loop does."""
    order = []
    for blob in planner.slots(blobs, in_flight):
        order.append(blobs.index(blob))
        _transfer(blob, planner.next_span(blob).chunks)
    return order


def test_slots_go_to_blobs_in_the_order_asked_each_up_to_its_limit(bitmap):
    planner = Planner(FetchOptions(chunk_size=MiB, chunks_per_blob=2, blobs_in_flight=8, max_transfers=6,
                                   adaptive=False))
    assert planner.tuner.target == 6
    blobs = [
        _blob(bitmap, pending=range(10)),             # ranged: up to chunks_per_blob
        _blob(bitmap, mode="probe", pending=range(10)),  # one transfer until Range support is known
        _blob(bitmap, pending=range(10), committing=True),
        _blob(bitmap, pending=()),                     # nothing left to ask for
        _blob(None, pending=range(10)),                # its ingest is not open (waiting for a lock)
        _blob(bitmap, pending=[0]),                    # one request left
        _blob(bitmap, pending=range(10)),
    ]
    assert _take_slots(planner, blobs, in_flight=0) == [0, 0, 1, 5, 6, 6]
    assert _take_slots(planner, blobs, in_flight=0) == []  # every blob at its limit


def test_slots_are_what_the_tuner_allows_beyond_the_transfers_in_flight(bitmap):
    planner = Planner(FetchOptions(chunk_size=MiB, chunks_per_blob=4, max_transfers=4, adaptive=False))
    blobs = [_blob(bitmap, pending=range(10)), _blob(bitmap, mode="single", pending=[0])]
    assert _take_slots(planner, blobs, in_flight=1) == [0, 0, 0]
    assert _take_slots(planner, blobs, in_flight=4) == []


def test_next_span_covers_the_request_size_and_resumes_mid_chunk(bitmap):
    planner = Planner(FetchOptions(chunk_size=2 * MiB))  # a fixed request size: 2 chunks of 1 MiB
    blob = _blob(bitmap, pending=range(10), resume_at={4: 4 * MiB + 100})
    assert planner.next_span(blob) == Span(range(0, 2), 0, 2 * MiB, 0)
    assert planner.next_span(blob) == Span(range(2, 4), 2 * MiB, 4 * MiB, 2 * MiB)
    assert planner.next_span(blob) == Span(range(4, 6), 4 * MiB + 100, 6 * MiB, 4 * MiB)
    assert blob.resume_at == {} and blob.pending == [6, 7, 8, 9]


def test_next_span_of_a_streamed_blob_is_short_and_of_a_single_stream_whole(bitmap):
    planner = Planner(FetchOptions())  # adaptive: 8 MiB requests to start with
    assert planner.next_span(_blob(bitmap, pending=range(10))).chunks == range(0, 8)
    assert planner.next_span(_blob(bitmap, pending=range(10), streamed=True)).chunks == range(0, 1)
    single = _blob(bitmap, mode="single", pending=[0])
    assert planner.next_span(single) == Span(None, 0, 10 * MiB, 0) and single.pending == []


def test_requests_shrink_near_the_end_so_that_the_transfers_finish_together():
    # Plenty to come: the tuned size. 40 MiB over 16 transfers: 2.5 MiB each. Never under a chunk.
    assert tail_request_bytes(8 * MiB, 1000 * MiB, 16, MiB) == 8 * MiB
    assert tail_request_bytes(8 * MiB, 40 * MiB, 16, MiB) == 40 * MiB // 16
    assert tail_request_bytes(8 * MiB, 3 * MiB, 16, MiB) == MiB


def test_next_span_near_the_end_of_the_fetch_is_the_outstanding_bytes_shared_out(bitmap):
    planner = Planner(FetchOptions())  # adaptive: 8 MiB requests over 16 transfers to start with
    assert planner.next_span(_blob(bitmap, pending=range(10)), outstanding=1 << 40).chunks == range(0, 8)
    assert planner.next_span(_blob(bitmap, pending=range(10)), outstanding=64 * MiB).chunks == range(0, 4)
    assert planner.next_span(_blob(bitmap, pending=range(10)), outstanding=10 * MiB).chunks == range(0, 1)
    fixed = Planner(FetchOptions(chunk_size=2 * MiB))  # a request size the user set is kept
    assert fixed.next_span(_blob(bitmap, pending=range(10)), outstanding=MiB).chunks == range(0, 2)


def test_requeue_gives_back_unfinished_chunks_resuming_from_the_bytes_written(bitmap):
    planner = Planner(FetchOptions())
    blob = _blob(bitmap, pending=[8, 9])
    bitmap.set(2)
    t = _transfer(blob, range(2, 6), received=MiB + 10, offset=3 * MiB + 10)
    planner.requeue(t)
    assert blob.pending == [3, 4, 5, 8, 9] and blob.resume_at == {3: 3 * MiB + 10}
    single = _blob(bitmap, mode="single")
    planner.requeue(_transfer(single, None, received=5 * MiB))
    assert single.pending == [0]  # one stream starts again from 0


def test_a_retry_turned_away_before_any_byte_keeps_its_resume_point(bitmap):
    """A retry that resumed mid-chunk is refused (a 503, a reset before the response): it wrote
    nothing, and the next one resumes from the same byte, not from the chunk's start."""
    planner = Planner(FetchOptions())
    blob = _blob(bitmap, pending=[])
    planner.requeue(_transfer(blob, range(3, 6), offset=3 * MiB + 10, armed=False))
    assert blob.pending == [3, 4, 5] and blob.resume_at == {3: 3 * MiB + 10}


def test_a_delayed_retry_comes_back_when_due_unless_its_blob_ended(bitmap):
    planner = Planner(FetchOptions())
    blob, ended = _blob(bitmap), _blob(bitmap)
    planner.requeue(_transfer(blob, range(0, 2)), delay=2.0, now=10.0)
    planner.requeue(_transfer(ended, range(4, 6)), delay=1.0, now=10.0)
    assert planner.next_due == 11.0 and blob.pending == []
    ended.writer = None
    planner.release_due(11.5)
    assert planner.next_due == 12.0 and ended.pending == []
    planner.release_due(12.0)
    assert planner.next_due is None and blob.pending == [0, 1]


def test_stragglers_are_measured_each_interval_and_a_cut_one_is_no_ones_peer(bitmap):
    planner = Planner(FetchOptions(straggler_ratio=8, straggler_min_age=3))
    blob = _blob(bitmap)
    fast = _transfer(blob, range(0, 1), received=20 * MiB)
    slow = [_transfer(blob, range(i, i + 2), received=MiB // 8) for i in (2, 4)]
    young = _blob(bitmap)
    _transfer(young, range(0, 1), received=20 * MiB, started=4.5)
    _transfer(young, range(1, 2), received=20 * MiB, started=4.5)
    _transfer(young, range(2, 4), received=MiB // 8, started=4.5)
    probing = _blob(bitmap, mode="probe")
    _transfer(probing, range(0, 1), received=1)
    in_flight = [t for b in (blob, young, probing) for t in b.transfers]
    cut = planner.stragglers([blob, young, probing], in_flight, now=5.0, interval=0.5)
    assert fast.rate == 40 * MiB and fast.window_bytes == 20 * MiB
    # The first slow one is cut (its peers: the fast one and the other slow one); the second then
    # has one peer left, too few to judge by. Transfers too young to judge, or of a blob still
    # probing Range support, are not cut.
    assert len(cut) == 1 and cut[0] in slow
    fast.sink.received += 20 * MiB
    planner.stragglers([blob], in_flight, now=5.5, interval=0.5)
    assert fast.rate == 40 * MiB  # the rate of the last interval, not since the start
