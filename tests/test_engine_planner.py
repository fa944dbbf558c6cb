"""The fetch engine's planner, without curl or threads: the tuner fed synthetic throughput curves,
request spans, queues and stragglers."""

from __future__ import annotations

from fastpull.engine.planner import MiB, Tuner, is_straggler, next_request, put_back, request_chunks


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
