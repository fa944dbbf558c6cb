"""What to fetch next, decided without curl or threads: how many transfers and connections
(:class:`Tuner`), which bytes a request covers (:func:`next_request`), which transfer is a
straggler (:func:`stragglers`). The loop (:mod:`fastpull.engine.loop`) asks; nothing here does I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

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
