"""What to fetch next, decided without curl or threads: how many transfers and connections
(:class:`Tuner`), which blob gets a free transfer slot, which bytes its request covers, when a
failed request's chunks come back, which transfer is a straggler (:class:`Planner`). The loop
(:mod:`fastpull.engine.loop`) asks and does what it is told; nothing here does I/O.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from fastpull.engine.options import FetchOptions

if TYPE_CHECKING:
    from fastpull.engine.transfers import BlobFetch, Transfer

MiB = 1 << 20
FIXED_REQUEST = 16 * MiB
"""Request size when not adaptive and none is given."""


class Tuner:
    """Chooses transfers in flight, streams per connection and request size from the throughput
    measured while pulling.

    Hill-climbing, one step per window: while every allowed transfer is busy, step the number of
    transfers up by half; keep a step that raised throughput by 10% or more, undo one that did not
    and hold for a while. Once the transfers have settled and the transfers share HTTP/2
    connections, try twice the streams per connection (half the connections: fewer handshakes,
    less CPU): keep it while throughput stays within 5% of the best seen, else undo and hold.
    Connections matter more than streams: registries and CDNs cap each TCP connection, and
    every stream of one connection shares its congestion window, so sharing starts at one stream
    per connection. A 429/503 from the registry halves the transfers. The request size follows the
    throughput of one stream, so that a request lasts about a second (4-64 MiB).
    """

    WINDOW_S = 1.0
    HOLD_S = 5.0
    THROTTLE_HOLD_S = 10.0
    SHARING_HOLD_S = 30.0
    MAX_STREAMS_PER_CONNECTION = 8

    def __init__(self, initial: int, cap: int, request_bytes: int | None, *, adaptive: bool = True,
                 streams_per_connection: int | None = None):
        """``request_bytes`` or ``streams_per_connection`` None adapt them; ``adaptive=False`` pins all
        (one stream per connection unless given)."""
        self.cap = cap
        self.adaptive = adaptive
        self.target = min(initial, cap) if adaptive else cap
        self.adapt_size = adaptive and request_bytes is None
        self.request_bytes = request_bytes or (8 * MiB if adaptive else FIXED_REQUEST)
        self.adapt_sharing = adaptive and streams_per_connection is None
        self.streams_per_connection = streams_per_connection or 1
        self.multiplexed = False
        """Set by the engine once a transfer ran over HTTP/2: only then can connections be shared."""
        self._window_start: float | None = None
        self._window_bytes = 0
        self._base_rate = 0.0
        self._peak_rate = 0.0
        self._step: tuple[str, int] | None = None  # ("transfers" | "sharing", the value before the step)
        self._hold_until = 0.0
        self._sharing_hold_until = 0.0

    def observe(self, now: float, total_bytes: int, in_flight: int) -> None:
        """Feed the engine's byte counter; call it often (it decides once per window)."""
        if not self.adaptive:
            return
        if self._window_start is None:
            self._window_start, self._window_bytes = now, total_bytes
            return
        elapsed = now - self._window_start
        if elapsed < self.WINDOW_S:
            return
        rate = (total_bytes - self._window_bytes) / elapsed
        self._window_start, self._window_bytes = now, total_bytes
        if self.adapt_size and in_flight:
            per_stream = int(rate / in_flight)
            self.request_bytes = min(64 * MiB, max(4 * MiB, per_stream // MiB * MiB))
        if self._step is not None and not self._judge(now, rate):
            return
        self._base_rate = rate
        self._peak_rate = max(self._peak_rate, rate)
        if in_flight >= self.target and now >= self._hold_until and self.target < self.cap:
            self._step = ("transfers", self.target)
            self.target = min(self.cap, self.target + max(1, self.target // 2))
        elif (self.adapt_sharing and self.multiplexed and now >= self._sharing_hold_until
              and self.streams_per_connection < self.MAX_STREAMS_PER_CONNECTION):
            self._step = ("sharing", self.streams_per_connection)
            self.streams_per_connection *= 2

    def _judge(self, now: float, rate: float) -> bool:
        """Keep or undo the last step after a window of it; False if it was undone."""
        assert self._step is not None
        (kind, before), self._step = self._step, None
        if kind == "transfers" and rate < self._base_rate * 1.10:
            self.target, self._hold_until = before, now + self.HOLD_S
            return False
        if kind == "sharing" and rate < self._peak_rate * 0.95:
            self.streams_per_connection, self._sharing_hold_until = before, now + self.SHARING_HOLD_S
            return False
        return True

    def throttled(self, now: float) -> None:
        """The registry asked us to slow down (429/503): halve, and hold."""
        if not self.adaptive:
            return
        self.target = max(1, self.target // 2)
        if self._step is not None and self._step[0] == "sharing":
            self.streams_per_connection = self._step[1]
        self._step = None
        self._peak_rate = 0.0
        self._hold_until = now + self.THROTTLE_HOLD_S


def request_chunks(request_bytes: int, chunk_size: int, nchunks: int, *, streamed: bool, adapt_size: bool) -> int:
    """How many bitmap chunks the next request of a blob covers.

    A streamed blob (one an unpacker reads as it lands) gets shorter requests: about 1/8 s of
    one stream, but no fewer than 1/64 of the blob (each request costs CPU on both ends). Its
    reader follows the contiguous watermark, which trails the requests in flight by (transfers x
    request size); and with slots going to blobs in order, the blob takes the link and lands front
    to back instead of every layer crawling at once. A request size the user fixed is kept.
    """
    span = max(1, -(-request_bytes // chunk_size))
    if streamed and adapt_size:
        span = min(span, max(span // 8, -(-nchunks // 64), 1))
    return span


def tail_request_bytes(request_bytes: int, outstanding: int, transfers: int, chunk_size: int) -> int:
    """The size of the next request when ``outstanding`` bytes are still to come (asked or not, of every
    blob being fetched) over ``transfers`` transfers: ``request_bytes`` while there is plenty, less near the
    end, so that the transfers finish together instead of one long request trailing alone on a link that
    would carry ten (a request of 8 MiB at one connection's 30 MB/s is 0.28 s). Never under one chunk."""
    return min(request_bytes, max(chunk_size, -(-outstanding // max(transfers, 1))))


def next_request(pending: list[int], span: int, resume_at: dict[int, int]) -> range:
    """Take the next request off a blob's sorted ``pending`` chunks: the first, and the ones
    right after it, up to ``span`` chunks; a chunk that resumes mid-way starts a request of its own."""
    first = pending.pop(0)
    last = first
    while last - first + 1 < span and pending and pending[0] == last + 1 and pending[0] not in resume_at:
        last = pending.pop(0)
    return range(first, last + 1)


def put_back(pending: list[int], chunks: Sequence[int]) -> None:
    """Return chunks to a blob's sorted queue (they are fetched before later ones)."""
    for chunk in chunks:
        i = bisect.bisect_left(pending, chunk)
        if i == len(pending) or pending[i] != chunk:
            pending.insert(i, chunk)


def is_straggler(rate: float, remaining: int, age: float, peer_rates: Sequence[float], *, ratio: float,
                 min_age: float) -> bool:
    """Whether a ranged transfer receiving ``rate`` B/s is so much slower than its blob's other
    transfers (running or finished: ``peer_rates``) that its ``remaining`` bytes are better
    re-issued on a fresh request."""
    if len(peer_rates) < 2 or age < min_age:
        return False
    import statistics  # here, not at the top: keeps every pull's start-up short

    return rate * ratio < statistics.median(peer_rates) and remaining > rate * min_age


class Span(NamedTuple):
    """The bytes one request asks for: ``[start, end)``, of bitmap ``chunks`` (None: the whole blob
    in one stream); bytes before ``valid_from`` are not the chunks' (the request resumes mid-chunk
    when ``start`` is past it)."""

    chunks: range | None
    start: int
    end: int
    valid_from: int


class Planner:
    """The loop's decisions of what to fetch next, over the blobs' planning state (``pending``
    chunks, ``resume_at``, ``mode``, ``transfers``); it changes only that state and does no I/O.

    Owns the :class:`Tuner` and the chunks of failed requests waiting for their retry.
    """

    def __init__(self, options: FetchOptions):
        self._options = options
        cap = min(options.max_transfers, options.chunks_per_blob * options.blobs_in_flight)
        self.tuner = Tuner(options.initial_transfers, cap, options.chunk_size, adaptive=options.adaptive,
                           streams_per_connection=options.streams_per_connection)
        self._delayed: list[tuple[float, int, BlobFetch, list[int]]] = []  # a heap by due time
        self._seq = itertools.count()

    def slots(self, blobs: Iterable[BlobFetch], in_flight: int) -> Iterator[BlobFetch]:
        """The blob that gets each free transfer slot (of the tuner's target, ``in_flight`` taken).

        Slots go to blobs in the order they were asked for, each up to its limit (one transfer
        while a blob probes Range support or is fetched in one stream, else ``chunks_per_blob``).
        Earlier blobs (lower layers) get the bandwidth first and finish first, so an unpacker
        following them runs at network speed instead of every layer crawling at once; the link
        stays as full as with an even share. Start each transfer before asking for the next slot.
        """
        budget = self.tuner.target - in_flight
        for blob in blobs:
            while budget > 0 and blob.writer is not None and blob.pending and not blob.committing and not blob.switching:
                limit = 1 if blob.mode in ("probe", "single") else self._options.chunks_per_blob
                if len(blob.transfers) >= limit:
                    break
                yield blob
                budget -= 1
            if budget <= 0:
                return

    def next_span(self, blob: BlobFetch, outstanding: int | None = None) -> Span:
        """Take the next request of ``blob`` off its pending chunks. ``outstanding``: the bytes still
        to come of every blob being fetched (None: plenty); while the request size adapts, requests
        shrink near the end so that the transfers finish together (:func:`tail_request_bytes`)."""
        if blob.mode == "single":
            blob.pending.clear()
            return Span(None, 0, blob.size, 0)
        bitmap = blob.writer.bitmap
        request_bytes = self.tuner.request_bytes
        if outstanding is not None and self.tuner.adapt_size:
            request_bytes = tail_request_bytes(request_bytes, outstanding, self.tuner.target, bitmap.chunk_size)
        span = request_chunks(request_bytes, bitmap.chunk_size, bitmap.nchunks,
                              streamed=blob.streamed, adapt_size=self.tuner.adapt_size)
        chunks = next_request(blob.pending, span, blob.resume_at)
        valid_from = bitmap.chunk_span(chunks[0])[0]
        end = bitmap.chunk_span(chunks[-1])[1]
        return Span(chunks, blob.resume_at.pop(chunks[0], valid_from), end, valid_from)

    def requeue(self, t: Transfer, delay: float = 0.0, now: float = 0.0) -> None:
        """Give the chunks ``t`` did not finish back to its blob, at once or ``delay`` seconds
        after ``now``; the first resumes from the bytes ``t`` wrote."""
        chunks = self._unfinished(t)
        if delay <= 0:
            put_back(t.blob.pending, chunks)
        else:
            heapq.heappush(self._delayed, (now + delay, next(self._seq), t.blob, chunks))

    @property
    def next_due(self) -> float | None:
        """When the first delayed retry is due (None: there is none)."""
        return self._delayed[0][0] if self._delayed else None

    def release_due(self, now: float) -> None:
        """Give the chunks whose retry is due back to their blobs (unless the blob has ended)."""
        while self._delayed and self._delayed[0][0] <= now:
            _, _, blob, chunks = heapq.heappop(self._delayed)
            if blob.writer is not None:
                put_back(blob.pending, chunks)

    def stragglers(self, blobs: Iterable[BlobFetch], in_flight: Collection[Transfer], now: float,
                   interval: float) -> list[Transfer]:
        """The ranged transfers to cut: far slower than their blob's other transfers, running or
        finished (:func:`is_straggler`). Called every ``interval`` seconds: it measures the rate of
        each transfer ``in_flight`` over the last interval."""
        for t in in_flight:
            received = t.sink.received
            t.rate = (received - t.window_bytes) / interval
            t.window_bytes = received
        cut: list[Transfer] = []
        for blob in blobs:
            if blob.mode != "ranged":
                continue
            for t in blob.transfers:
                peers = [p.rate for p in blob.transfers if p is not t and p not in cut] + list(blob.finished_rates)
                if is_straggler(t.rate, t.end - t.sink.offset, now - t.started, peers,
                                ratio=self._options.straggler_ratio, min_age=self._options.straggler_min_age):
                    cut.append(t)
        return cut

    @staticmethod
    def _unfinished(t: Transfer) -> list[int]:
        """Chunks of ``t`` not finished; the first resumes from the bytes ``t`` wrote (or from where
        ``t`` was to resume, if it was refused before writing any)."""
        if t.chunks is None:
            return [0]  # one stream restarts from 0: a server that ignores Range cannot resume
        bitmap = t.blob.writer.bitmap
        left = [c for c in t.chunks if not bitmap.test(c)]
        if left and t.sink.offset > bitmap.chunk_span(left[0])[0]:
            t.blob.resume_at[left[0]] = t.sink.offset
        return left
