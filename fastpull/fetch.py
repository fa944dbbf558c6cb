"""The fetch engine: one pycurl ``CurlMulti`` loop drives every ranged transfer of every pull.

Each blob larger than a chunk is fetched as bounded ``Range: bytes=a-b`` requests spread over
many kept-alive connections (HTTP/2 streams share a connection only as far as the tuner finds
that costs no throughput). Bytes go straight from libcurl's buffer
to their offset in the preallocated ingest file (``RangeSink``); nothing chunk-sized is
held in memory. A pool of hasher threads follows each blob's contiguous-finished
watermark with sha256 while later chunks still arrive, then commits.

The engine knows HTTP and the content store, not OCI: a :class:`BlobSource` tells it
where a blob lives and which Authorization header to send.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import os
import queue
import random
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import pycurl

from fastpull.errors import FastpullError, RegistryError, StoreError, TransferError
from fastpull.store import BlobWriter, ContentStore
from fastpull.transport import (
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    RETRY_STATUSES,
    THROTTLE_STATUSES,
    USER_AGENT,
    configure_tls,
    retry_after,
)

log = logging.getLogger("fastpull.fetch")

MiB = 1 << 20
_HOUSEKEEPING_S = 0.5
_BITMAP_CHUNK = MiB
_FIXED_REQUEST = 16 * MiB  # request size when not adaptive and no chunk_size is given


class BlobSource(Protocol):
    """Where the blobs of one repository live, and how to authenticate to it."""

    def blob_url(self, digest: str) -> str:
        """The registry URL of a blob (it may redirect elsewhere)."""

    def authorization(self) -> str | None:
        """Authorization header value for the registry, or None for anonymous."""

    def reauthorize(self, challenge: str, failed: str | None) -> str | None:
        """A fresh Authorization value after the registry refused ``failed`` with 401 ``challenge``."""

    @property
    def ca_file(self) -> str | None:
        """CA bundle to verify HTTPS servers with (None: libcurl's default)."""

    @property
    def tls_verify(self) -> bool:
        """Whether the registry's certificate is checked (False: an insecure registry). A redirect
        target on another host is always checked."""


@dataclass(frozen=True)
class FetchOptions:
    """Limits and timing of the fetch engine; validated when built.

    Defaults come from bench/ sweeps (see bench/README.md).
    """

    chunk_size: int | None = None
    """Bytes per Range request; None: adapted to ~1 s per request, 4-64 MiB."""
    chunks_per_blob: int = 32
    """Ranged transfers in flight per blob, at most."""
    blobs_in_flight: int = 16
    max_transfers: int = 64
    """Transfers in flight in all, at most."""
    adaptive: bool = True
    """Tune transfers in flight (and the request size, unless chunk_size is set) from the
    throughput measured during the pull; False runs at the caps."""
    initial_transfers: int = 16
    max_host_connections: int = 64
    http2: bool = True
    """Offer HTTP/2 over TLS (ALPN); transfers then may share connections as streams."""
    streams_per_connection: int | None = None
    """HTTP/2 streams one connection carries at most; None: tuned, starting from one."""
    retries: int = 6
    backoff_base: float = 0.25
    backoff_max: float = 15.0
    connect_timeout: float = 10.0
    stall_timeout: float = 20.0
    straggler_ratio: float = 8.0
    straggler_min_age: float = 3.0
    buffer_size: int = 256 * 1024
    hasher_threads: int = 2
    transfer_rate_limit: int = 0  # bytes/s per transfer; 0 = unlimited

    def __post_init__(self) -> None:
        for name in ("chunks_per_blob", "blobs_in_flight", "max_transfers", "initial_transfers",
                     "max_host_connections", "buffer_size", "hasher_threads", "streams_per_connection"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if self.retries < 0 or self.transfer_rate_limit < 0:
            raise ValueError("retries and transfer_rate_limit must not be negative")
        if self.chunk_size is not None and self.chunk_size < 64 * 1024:
            raise ValueError("chunk_size must be at least 64 KiB")

    @property
    def bitmap_chunk(self) -> int:
        """Granularity of the chunk bitmap (resume, watermark): requests span whole chunks."""
        return min(self.chunk_size or _BITMAP_CHUNK, _BITMAP_CHUNK)


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
        self.request_bytes = request_bytes or (8 * MiB if adaptive else _FIXED_REQUEST)
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


@dataclass
class FetchStats:
    """Counters over the engine's life (read them from any thread; they only grow)."""

    bytes_received: int = 0
    requests: int = 0
    retries: int = 0
    stragglers_reissued: int = 0
    blobs_fetched: int = 0
    blobs_skipped: int = 0
    bytes_resumed: int = 0
    connections: int = 0
    """Connections opened (TCP, with TLS where used); the rest of the requests reused one."""


@dataclass(eq=False)
class _Blob:
    store: ContentStore
    source: BlobSource
    digest: str
    size: int
    futures: list[Future] = field(default_factory=list)
    openers: list = field(default_factory=list)  # on_open callbacks not yet called
    streamed: bool = False  # someone reads it while it downloads (on_open): favour its head
    on_downloaded: Callable[[], None] | None = None  # of the request that created it
    writer: BlobWriter | None = None
    url: str = ""
    registry_netloc: str = ""
    auth: str | None = None
    mode: str = "probe"  # probe: first transfer tells Range support; then "ranged" or "single"
    pending: list = field(default_factory=list)  # chunk indices to fetch, sorted
    resume_at: dict = field(default_factory=dict)  # chunk index -> first byte not yet written
    attempts: dict = field(default_factory=dict)  # first chunk of a request -> failed tries
    transfers: set = field(default_factory=set)
    redirects: int = 0
    hashed_watermark: int = 0
    committing: bool = False
    finished_rates: deque = field(default_factory=lambda: deque(maxlen=16))  # B/s of finished chunks

    def headers(self, extra: list[str]) -> list[str]:
        # The registry's credentials never go to a redirect target on another host.
        if self.auth and urlsplit(self.url).netloc == self.registry_netloc:
            return extra + [f"Authorization: {self.auth}"]
        return extra


@dataclass(eq=False)
class _Transfer:
    blob: _Blob
    chunks: range | None  # bitmap chunks this request covers; None: the whole blob in one stream
    start: int
    end: int
    curl: pycurl.Curl
    sink: object
    started: float
    url: str
    status: int = 0
    headers: dict = field(default_factory=dict)
    window_bytes: int = 0
    rate: float = 0.0
    http2: bool = False

    def on_header(self, line: bytes) -> None:
        text = line.decode("latin-1").strip()
        if text.startswith("HTTP/"):
            self.http2 = text.startswith("HTTP/2")
            parts = text.split()
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.headers = {}
        elif ":" in text:
            name, _, value = text.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        elif not text:
            self._arm_if_body_is_ours()

    def _arm_if_body_is_ours(self) -> None:
        """At the end of the headers: decide whether the body is blob bytes for our range."""
        blob = self.blob
        if self.status == 206 and self.chunks is not None:
            if _content_range_start(self.headers.get("content-range")) == self.start:
                self.sink.arm()
                if blob.mode == "probe":  # Range works: the other requests start now, not after this one
                    blob.mode = "ranged"
        elif self.status == 200 and (self.chunks is None or blob.mode == "probe"):
            # Whole body from offset 0: asked so, or the server ignored our Range.
            if self.chunks is not None:
                log.info("%s ignores Range requests: fetching %s in one stream", blob.url, blob.digest)
                blob.mode = "single"
                self.chunks = None
            self.start, self.end = 0, blob.size
            self.sink.rebase(0, blob.size, 0)
            self.sink.arm()


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/1000"
    if not value or not value.startswith("bytes "):
        return None
    first = value[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


def _put_back(blob: _Blob, chunks: list[int]) -> None:
    """Return chunks to a blob's sorted queue (they are fetched before later ones)."""
    for chunk in chunks:
        i = bisect.bisect_left(blob.pending, chunk)
        if i == len(blob.pending) or blob.pending[i] != chunk:
            blob.pending.insert(i, chunk)


def _call_safely(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # a caller's bug must not stop the loop
        log.exception("fetch callback failed")


class FetchEngine:
    """Fetch blobs into content stores over one CurlMulti loop running in its own thread.

    ``fetch()`` may be called from any thread and returns a Future resolving to the
    committed blob's path. Requests for a digest already being fetched by this engine
    share one download; other processes are excluded by the store's per-digest lock.
    """

    def __init__(self, options: FetchOptions | None = None):
        self.options = options or FetchOptions()
        self.stats = FetchStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._hash_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._received_so_far = 0  # published by the loop for received_bytes()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._hashers: list[threading.Thread] = []

    # ---- public API -------------------------------------------------------------------

    def fetch(
        self,
        store: ContentStore,
        source: BlobSource,
        digest: str,
        size: int,
        *,
        on_open: Callable[[], None] | None = None,
        on_downloaded: Callable[[], None] | None = None,
    ) -> Future:
        """Fetch one blob into ``store`` unless it is there; the Future gives its path.

        ``on_open`` is called (from the engine's thread; keep it short) as soon as the blob can
        be followed with :class:`fastpull.store.BlobReader`: when its ingest is opened here, or
        when it is found committed. It is not called if the fetch fails first.

        ``on_downloaded`` is called (from the engine's thread, before the Future is settled) if
        this request is the one that downloaded the blob and it was committed: not when the blob
        was already there, another process committed it, or an earlier request shares it.
        """
        future: Future = Future()
        if self._closed:
            future.set_exception(FastpullError("fetch engine is closed"))
            return future
        self._ensure_started()
        self._post(("fetch", store, source, digest, size, future, on_open, on_downloaded))
        return future

    def received_bytes(self) -> int:
        """Bytes received over the engine's life, transfers still running included (those are
        counted twice a second, by the loop). Safe from any thread; it only grows."""
        return max(self._received_so_far, self.stats.bytes_received)

    def close(self) -> None:
        """Stop the loop; unfinished fetches fail, partial data stays for a resume."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._post(("stop",))
            self._thread.join()
            for _ in self._hashers:
                self._hash_queue.put(None)
            for t in self._hashers:
                t.join()
        os.close(self._wake_fd)

    def __enter__(self) -> FetchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- cross-thread plumbing -----------------------------------------------------------

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fastpull-fetch", daemon=True)
                self._thread.start()
                for i in range(self.options.hasher_threads):
                    t = threading.Thread(target=self._hasher, name=f"fastpull-hash-{i}", daemon=True)
                    t.start()
                    self._hashers.append(t)

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        os.eventfd_write(self._wake_fd, 1)

    # ---- the loop (runs in the fetch thread only) ------------------------------------------

    def _run(self) -> None:
        opts = self.options
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self._fds: dict[int, int] = {}
        self._deadline: float | None = None
        self._blobs: dict[tuple[str, str], _Blob] = {}
        self._active: list[_Blob] = []
        self._queued: deque[_Blob] = deque()
        self._transfers: dict[pycurl.Curl, _Transfer] = {}
        self._free_curls: list[pycurl.Curl] = []
        self._retry_heap: list = []
        self._seq = itertools.count()
        self._running = True
        self._next_housekeeping = time.monotonic() + _HOUSEKEEPING_S
        cap = min(opts.max_transfers, opts.chunks_per_blob * opts.blobs_in_flight)
        self._tuner = Tuner(opts.initial_transfers, cap, opts.chunk_size, adaptive=opts.adaptive,
                            streams_per_connection=opts.streams_per_connection)
        self._streams_per_connection = 0  # as set on the multi handle

        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, opts.max_host_connections)
        self._multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, opts.max_transfers)
        self._multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX if opts.http2 else 0)
        self._apply_sharing()
        try:
            while self._running:
                self._run_once()
        except BaseException as exc:  # a broken loop must not leave callers waiting forever
            log.exception("fetch loop failed")
            self._fail_everything(FastpullError(f"fetch loop failed: {exc}"))
        finally:
            self._fail_everything(FastpullError("fetch engine closed"))
            self._await_commits()
            for c in list(self._transfers) + self._free_curls:
                c.close()
            self._multi.close()
            self._sel.close()

    def _run_once(self) -> None:
        now = time.monotonic()
        wait = self._next_housekeeping - now
        if self._deadline is not None:
            wait = min(wait, self._deadline - now)
        if self._retry_heap:
            wait = min(wait, self._retry_heap[0][0] - now)
        for key, mask in self._sel.select(max(wait, 0)):
            if key.fd == self._wake_fd:
                self._drain_commands()
                continue
            action = (pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0) | (
                pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0
            )
            self._multi.socket_action(key.fd, action)
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._deadline = None
            self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        self._reap()
        now = time.monotonic()
        while self._retry_heap and self._retry_heap[0][0] <= now:
            _, _, blob, chunks = heapq.heappop(self._retry_heap)
            if blob.writer is not None:
                _put_back(blob, chunks)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_S
            self._reissue_stragglers(now)
            self._tune(now)
        self._schedule()

    def _on_socket(self, what: int, fd: int, multi, socketp) -> None:
        if what == pycurl.POLL_REMOVE:
            if self._fds.pop(fd, None) is not None:
                try:
                    self._sel.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            return
        events = (selectors.EVENT_READ if what & pycurl.POLL_IN else 0) | (
            selectors.EVENT_WRITE if what & pycurl.POLL_OUT else 0
        )
        if fd in self._fds:
            self._sel.modify(fd, events)
        else:
            self._sel.register(fd, events)
        self._fds[fd] = events

    def _on_timer(self, timeout_ms: int) -> None:
        self._deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000

    def _drain_commands(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "fetch":
                self._on_fetch(*command[1:])
            elif kind == "locked":
                self._on_locked(*command[1:])
            elif kind == "hashed":
                self._on_hashed(*command[1:])
            elif kind == "stop":
                self._running = False

    # ---- blob life cycle --------------------------------------------------------------

    def _on_fetch(
        self, store: ContentStore, source: BlobSource, digest: str, size: int, future: Future, on_open,
        on_downloaded,
    ) -> None:
        key = (str(store.root), digest)
        blob = self._blobs.get(key)
        if blob is not None:
            blob.futures.append(future)
            if on_open is not None:
                blob.streamed = True
                blob.openers.append(on_open)
                if blob.writer is not None:
                    self._call_openers(blob)
            return
        if store.has(digest, size):
            self.stats.blobs_skipped += 1
            if on_open is not None:
                _call_safely(on_open)
            future.set_result(store.blob_path(digest))
            return
        url = source.blob_url(digest)
        blob = _Blob(store, source, digest, size, [future], url=url, registry_netloc=urlsplit(url).netloc,
                     streamed=on_open is not None, on_downloaded=on_downloaded)
        if on_open is not None:
            blob.openers.append(on_open)
        self._blobs[key] = blob
        self._queued.append(blob)

    def _activate(self) -> None:
        while self._queued and len(self._active) < self.options.blobs_in_flight:
            blob = self._queued.popleft()
            try:
                writer = blob.store.open_writer(blob.digest, blob.size, self.options.bitmap_chunk, block=False)
            except FastpullError as exc:
                self._finish(blob, exc)
                continue
            if writer is None and blob.store.has(blob.digest, blob.size):
                self.stats.blobs_skipped += 1
                self._finish(blob, blob.store.blob_path(blob.digest))
            elif writer is None:
                # Another process or engine is fetching it: block in flock on a side
                # thread (woken by the kernel when it commits or dies), never poll.
                threading.Thread(target=self._wait_for_lock, args=(blob,), daemon=True).start()
            else:
                self._start_blob(blob, writer)

    def _wait_for_lock(self, blob: _Blob) -> None:
        try:
            writer = blob.store.open_writer(blob.digest, blob.size, self.options.bitmap_chunk, block=True)
        except BaseException as exc:
            self._post(("locked", blob, None, exc))
        else:
            self._post(("locked", blob, writer, None))

    def _on_locked(self, blob: _Blob, writer: BlobWriter | None, exc: BaseException | None) -> None:
        if exc is not None:
            self._finish(blob, exc)
        elif writer is None:
            self.stats.blobs_skipped += 1
            self._finish(blob, blob.store.blob_path(blob.digest))
        elif not self._running:
            writer.close()
        else:
            # The other writer died: resume its partial download (front of the queue).
            self._start_blob(blob, writer)

    def _call_openers(self, blob: _Blob) -> None:
        openers, blob.openers = blob.openers, []
        for on_open in openers:
            _call_safely(on_open)

    def _start_blob(self, blob: _Blob, writer: BlobWriter) -> None:
        blob.writer = writer
        self._call_openers(blob)
        blob.auth = blob.source.authorization()
        blob.pending = writer.missing_chunks()
        self.stats.bytes_resumed += writer.resumed_bytes
        self._active.append(blob)
        if not blob.pending:
            self._maybe_commit(blob)

    def _finish(self, blob: _Blob, result: Path | BaseException) -> None:
        """Settle every future of a blob and forget it; releases the writer unless committed."""
        for t in list(blob.transfers):
            self._cancel(t)
        if blob.writer is not None and not blob.committing:
            blob.writer.close()
        blob.writer = None
        self._blobs.pop((str(blob.store.root), blob.digest), None)
        if blob in self._active:
            self._active.remove(blob)
        if isinstance(result, BaseException):
            blob.openers.clear()
        else:
            self._call_openers(blob)  # committed by another process while we waited
        for future in blob.futures:
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _fail_everything(self, exc: FastpullError) -> None:
        self._running = False
        for blob in list(self._blobs.values()):
            if not blob.committing:
                self._finish(blob, exc)

    def _await_commits(self) -> None:
        """On shutdown, let commits already handed to the hashers settle their futures, and fail
        requests that arrived too late."""
        while True:
            committing = any(blob.committing for blob in self._blobs.values())
            try:
                command = self._commands.get(block=committing)
            except queue.Empty:
                return
            if command[0] == "hashed":
                self._on_hashed(*command[1:])
            elif command[0] == "fetch":
                command[5].set_exception(FastpullError("fetch engine closed"))
            elif command[0] == "locked" and command[2] is not None:
                command[2].close()

    # ---- transfers ------------------------------------------------------------------

    def _tune(self, now: float) -> None:
        received = self.stats.bytes_received + sum(t.sink.received for t in self._transfers.values())
        self._received_so_far = received
        self._tuner.observe(now, received, len(self._transfers))
        self._apply_sharing()

    def _apply_sharing(self) -> None:
        """Hand the tuner's streams per connection to libcurl: a new transfer joins an HTTP/2
        connection that carries fewer streams, else libcurl opens another connection."""
        streams = self._tuner.streams_per_connection
        if streams != self._streams_per_connection:
            self._multi.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, streams)
            self._streams_per_connection = streams

    def _schedule(self) -> None:
        """Hand free transfer slots to blobs in the order they were asked for.

        Earlier blobs (lower layers) get the bandwidth first and finish first, so an unpacker
        following them runs at network speed instead of every layer crawling at once; the link
        stays as full as with an even share.
        """
        self._activate()
        budget = self._tuner.target - len(self._transfers)
        for blob in self._active:
            while budget > 0 and blob.writer is not None and blob.pending and not blob.committing:
                limit = 1 if blob.mode in ("probe", "single") else self.options.chunks_per_blob
                if len(blob.transfers) >= limit:
                    break
                self._start_transfer(blob)
                budget -= 1
            if budget <= 0:
                return

    def _take_run(self, blob: _Blob) -> range:
        """The next request of a blob: consecutive pending chunks adding up to the request size.

        A streamed blob (one an unpacker reads as it lands) gets shorter requests: about 1/8 s
        of one stream, but no fewer than 1/64 of the blob (each request costs CPU on both
        ends). Its reader follows the contiguous watermark, which trails the requests in
        flight by (transfers x request size); and with slots going to blobs in order, the blob
        takes the link and lands front to back instead of every layer crawling at once.
        A request size the user fixed is kept.
        """
        bitmap = blob.writer.bitmap
        tuner = self._tuner
        span = max(1, -(-tuner.request_bytes // bitmap.chunk_size))
        if blob.streamed and tuner.adapt_size:
            span = min(span, max(span // 8, -(-bitmap.nchunks // 64), 1))
        first = blob.pending.pop(0)
        last = first
        while (last - first + 1 < span and blob.pending and blob.pending[0] == last + 1
               and blob.pending[0] not in blob.resume_at):
            last = blob.pending.pop(0)
        return range(first, last + 1)

    def _start_transfer(self, blob: _Blob) -> None:
        opts = self.options
        writer = blob.writer
        if blob.mode == "single":
            start, end, valid_from = 0, blob.size, 0
            blob.pending.clear()
            chunks = None
        else:
            chunks = self._take_run(blob)
            valid_from = writer.bitmap.chunk_span(chunks[0])[0]
            end = writer.bitmap.chunk_span(chunks[-1])[1]
            start = blob.resume_at.pop(chunks[0], valid_from)
        sink = writer.sink(start, end, valid_from)
        c = self._free_curls.pop() if self._free_curls else pycurl.Curl()
        transfer = _Transfer(blob, chunks, start, end, c, sink, time.monotonic(), blob.url)
        ranged = chunks is not None
        extra = [f"Range: bytes={start}-{end - 1}"] if ranged else []
        c.setopt(pycurl.URL, blob.url)
        c.setopt(pycurl.HTTPHEADER, blob.headers(extra))
        if not sink.attach(c):
            c.setopt(pycurl.WRITEFUNCTION, sink)
        c.setopt(pycurl.HEADERFUNCTION, transfer.on_header)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(opts.connect_timeout * 1000))
        c.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, int(opts.stall_timeout)))
        c.setopt(pycurl.BUFFERSIZE, opts.buffer_size)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS if opts.http2 else pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.PIPEWAIT, 1)
        if opts.transfer_rate_limit:
            c.setopt(pycurl.MAX_RECV_SPEED_LARGE, opts.transfer_rate_limit)
        c.setopt(pycurl.USERAGENT, USER_AGENT)
        configure_tls(c, blob.source.ca_file, blob.source.tls_verify or urlsplit(blob.url).netloc != blob.registry_netloc)
        self._transfers[c] = transfer
        blob.transfers.add(transfer)
        self.stats.requests += 1
        self._multi.add_handle(c)

    def _release(self, transfer: _Transfer) -> None:
        c = transfer.curl
        self._multi.remove_handle(c)
        self._transfers.pop(c, None)
        transfer.blob.transfers.discard(transfer)
        self.stats.bytes_received += transfer.sink.received
        self.stats.connections += c.getinfo(pycurl.NUM_CONNECTS)
        c.reset()
        self._free_curls.append(c)

    def _cancel(self, transfer: _Transfer) -> None:
        """Drop a transfer; its chunks go back to the queue, resuming from the bytes written."""
        self._release(transfer)
        if transfer.blob.writer is not None:
            _put_back(transfer.blob, self._unfinished(transfer))

    def _unfinished(self, t: _Transfer) -> list[int]:
        """Chunks of ``t`` not finished; the first resumes from the bytes ``t`` wrote."""
        if t.chunks is None:
            return [0]  # one stream restarts from 0: a server that ignores Range cannot resume
        bitmap = t.blob.writer.bitmap
        left = [c for c in t.chunks if not bitmap.test(c)]
        if left and t.sink.armed and t.sink.offset > bitmap.chunk_span(left[0])[0]:
            t.blob.resume_at[left[0]] = t.sink.offset
        return left

    def _reap(self) -> None:
        while True:
            queued, ok, failed = self._multi.info_read()
            for c in ok:
                self._on_done(self._transfers[c], 0, "")
            for c, code, message in failed:
                self._on_done(self._transfers[c], code, message)
            if not queued:
                return

    def _on_done(self, t: _Transfer, curl_code: int, message: str) -> None:
        blob = t.blob
        status = t.status
        self._release(t)
        self._tuner.multiplexed |= t.http2
        if blob.writer is None:
            return
        if t.sink.error is not None:
            self._finish(blob, StoreError(str(blob.writer.data_path), str(t.sink.error)))
            return
        if curl_code == 0 and status in (200, 206) and t.sink.armed and t.sink.offset == t.end:
            blob.finished_rates.append(t.sink.received / max(time.monotonic() - t.started, 1e-3))
            blob.attempts.pop("resolve", None)  # its redirect works
            self._on_chunk_done(blob)
            return
        if status in THROTTLE_STATUSES:
            self._tuner.throttled(time.monotonic())
        if curl_code == 0 and status in REDIRECT_STATUSES and "location" in t.headers:
            blob.redirects += 1
            if blob.redirects > MAX_REDIRECTS:
                self._finish(blob, TransferError(blob.url, f"more than {MAX_REDIRECTS} redirects"))
                return
            blob.url = urljoin(blob.url, t.headers["location"])  # reused for all its chunks
            self._requeue(t, delay=0)
            return
        elsewhere = urlsplit(t.url).netloc != blob.registry_netloc
        if curl_code == 0 and elsewhere and status in (400, 401, 403):
            # A signed redirect target (CDN, S3) that expired or refuses us: ask the registry for a
            # fresh one; the chunks already written stay. Bounded: resolutions in a row that
            # bring no chunk home.
            if t.url != blob.url:  # another transfer of the blob has resolved it again already
                self._requeue(t, delay=0)
                return
            blob.redirects = 0
            blob.attempts["resolve"] = tries = blob.attempts.get("resolve", 0) + 1
            if tries > self.options.retries:
                self._finish(blob, RegistryError(status, "GET", blob.url, t.sink.error_body))
                return
            log.info("%s answered HTTP %d for %s: resolving its redirect again", urlsplit(blob.url).netloc,
                     status, blob.digest)
            blob.url = blob.source.blob_url(blob.digest)
            self._requeue(t, delay=0)
            return
        if curl_code == 0 and status in (401, 403):
            if status == 401 and t.headers.get("www-authenticate") and blob.attempts.get("auth", 0) < 2:
                blob.attempts["auth"] = blob.attempts.get("auth", 0) + 1
                try:
                    blob.auth = blob.source.reauthorize(t.headers["www-authenticate"], blob.auth)
                except FastpullError as exc:
                    self._finish(blob, exc)
                    return
            else:
                self._finish(blob, RegistryError(status, "GET", blob.url, t.sink.error_body))
                return
            self._requeue(t, delay=0)
            return
        if curl_code == 0 and status and status not in RETRY_STATUSES and not (200 <= status < 300):
            self._finish(blob, RegistryError(status, "GET", blob.url, t.sink.error_body))
            return
        # Transient: connection reset, stall, timeout, 408/429/5xx, short or mismatched body.
        key = t.chunks[0] if t.chunks is not None else "single"
        tries = blob.attempts.get(key, 0) + 1
        blob.attempts[key] = tries
        if tries > self.options.retries:
            why = message or (f"HTTP {status}" if status else "no response")
            self._finish(blob, TransferError(blob.url, f"{why} after {tries} tries", curl_code or None))
            return
        self.stats.retries += 1
        delay = min(self.options.backoff_max, self.options.backoff_base * 2 ** (tries - 1))
        delay *= random.uniform(0.5, 1.0)
        delay = max(delay, min(retry_after(t.headers.get("retry-after")), self.options.backoff_max * 4))
        log.debug("retrying %s chunks %s in %.2fs: %s", blob.digest, t.chunks, delay, message or status)
        self._requeue(t, delay)

    def _requeue(self, t: _Transfer, delay: float) -> None:
        chunks = self._unfinished(t)
        if delay <= 0:
            _put_back(t.blob, chunks)
        else:
            heapq.heappush(self._retry_heap, (time.monotonic() + delay, next(self._seq), t.blob, chunks))

    def _on_chunk_done(self, blob: _Blob) -> None:
        watermark = blob.writer.bitmap.watermark()
        if blob.writer.bitmap.complete():
            self._maybe_commit(blob)
        elif watermark > blob.hashed_watermark:
            blob.hashed_watermark = watermark
            self._hash_queue.put(("advance", blob, blob.writer))

    def _maybe_commit(self, blob: _Blob) -> None:
        if blob.committing or blob.transfers or not blob.writer.bitmap.complete():
            return
        blob.committing = True
        self._hash_queue.put(("commit", blob, blob.writer))

    def _on_hashed(self, blob: _Blob, result: Path | BaseException) -> None:
        blob.committing = False
        blob.writer = None  # commit() closed it, whatever the outcome
        if not isinstance(result, BaseException):
            self.stats.blobs_fetched += 1
            if blob.on_downloaded is not None:
                _call_safely(blob.on_downloaded)
        self._finish(blob, result)

    def _reissue_stragglers(self, now: float) -> None:
        """Cut a ranged transfer far slower than its blob's other transfers, running or finished,
        and re-issue its remaining bytes on a fresh request."""
        import statistics  # here, not at the top: keeps every pull's start-up short

        opts = self.options
        for t in self._transfers.values():
            received = t.sink.received
            t.rate = (received - t.window_bytes) / _HOUSEKEEPING_S
            t.window_bytes = received
        for blob in self._active:
            if blob.mode != "ranged":
                continue
            for t in list(blob.transfers):
                peers = [p.rate for p in blob.transfers if p is not t] + list(blob.finished_rates)
                if len(peers) < 2 or now - t.started < opts.straggler_min_age:
                    continue
                typical = statistics.median(peers)
                remaining = t.end - t.sink.offset
                if t.rate * opts.straggler_ratio < typical and remaining > t.rate * opts.straggler_min_age:
                    log.info("re-issuing slow range %d-%d of %s (%.0f B/s, typical %.0f B/s)",
                             t.sink.offset, t.end, blob.digest, t.rate, typical)
                    self.stats.stragglers_reissued += 1
                    self._cancel(t)

    # ---- hashing (hasher threads) ---------------------------------------------------------

    def _hasher(self) -> None:
        while True:
            job = self._hash_queue.get()
            if job is None:
                return
            kind, blob, writer = job
            if kind == "advance":
                try:
                    writer.advance_digest()
                except (FastpullError, OSError, ValueError):
                    pass  # the writer was closed under us (blob failed); commit reports real errors
                continue
            try:
                result: Path | BaseException = writer.commit(blob.digest)
            except BaseException as exc:
                result = exc
            self._post(("hashed", blob, result))
