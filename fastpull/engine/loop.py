"""The fetch engine's loop: one pycurl ``CurlMulti`` drives every ranged transfer of every pull.

Each blob larger than a chunk is fetched as bounded ``Range: bytes=a-b`` requests spread over
many kept-alive connections (HTTP/2 streams share a connection only as far as the tuner finds
that costs no throughput). Bytes go straight from libcurl's buffer to their offset in the
preallocated ingest file (``RangeSink``); nothing chunk-sized is held in memory. Hasher threads
follow each blob's contiguous-finished watermark with sha256 while later chunks still arrive,
then commit.

The loop thread owns the curl handles and sockets (:mod:`fastpull.engine.multi`); other threads
talk to it with typed commands (:mod:`fastpull.engine.commands`). Here it starts the transfers and
does what the HTTP policy (:mod:`fastpull.http.policy`) says each finished one means; what to fetch
next is the planner's (:mod:`fastpull.engine.planner`), a blob from request to commit is the blob
table's (:mod:`fastpull.engine.blobs`). The engine knows HTTP and the content store, not OCI: a
:class:`BlobSource` says where a blob lives and which Authorization header to send.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from urllib.parse import urljoin, urlsplit

from fastpull.content.store import ContentStore
from fastpull.engine.blobs import Blobs
from fastpull.engine.commands import Cancel, Committed, Fetch, Locked, Mailbox, Stop, Switched
from fastpull.engine.multi import Multi
from fastpull.engine.options import BlobSource, FetchGroup, FetchOptions, FetchStats
from fastpull.engine.planner import Planner
from fastpull.engine.transfers import BlobFetch, Transfer
from fastpull.errors import FastpullError, RegistryError, StoreError, TransferError
from fastpull.http.policy import THROTTLE_STATUSES, Action, Counters, Exchange, judge
from fastpull.http.transport import Origin

log = logging.getLogger(__name__)

_HOUSEKEEPING_S = 0.5
_HASH_TICK_S = 0.02
"""How often sha256 is moved along the watermarks of the blobs landing: a blob's digest is then
mostly done when its last byte comes, instead of hashed whole after it."""


class FetchEngine:
    """Fetch blobs into content stores over one CurlMulti loop running in its own thread.

    ``fetch()`` may be called from any thread and returns a Future resolving to the
    committed blob's path. Requests for a digest already being fetched by this engine
    share one download; other processes are excluded by the store's per-digest lock.
    """

    def __init__(self, options: FetchOptions | None = None):
        self.options = options or FetchOptions()
        self.stats = FetchStats()
        self._mailbox = Mailbox()
        self._closed = False
        self._received_so_far = 0  # published by the loop for received_bytes()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._blobs: Blobs | None = None

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
        group: FetchGroup | None = None,
    ) -> Future:
        """Fetch one blob into ``store`` unless it is there; the Future gives its path.

        ``on_open`` is called (from the engine's thread; keep it short) as soon as the blob can
        be followed with :class:`fastpull.content.store.BlobReader`: when its ingest is opened here, or
        when it is found committed. It is not called if the fetch fails first.

        ``on_downloaded`` is called (from the engine's thread, before the Future is settled) if
        this request is the one that downloaded the blob and it was committed: not when the blob
        was already there, another process committed it, or an earlier request shares it.

        A request in a ``group`` fails as soon as another of the group does (:class:`FetchGroup`).
        Futures settle on a thread of their own: the loop never waits on a lock a caller may hold.
        """
        future: Future = Future()
        if self._closed:
            future.set_exception(FastpullError("fetch engine is closed"))
            return future
        self._ensure_started()
        self._mailbox.post(Fetch(store, source, digest, size, future, on_open, on_downloaded, group))
        return future

    def cancel(self, group: FetchGroup) -> None:
        """Withdraw the requests of ``group`` that have not settled: they fail, and a blob no other
        request wants is no longer fetched (what it wrote stays for a resume). Safe from any thread."""
        if not self._closed:
            self._mailbox.post(Cancel(group))

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
            self._mailbox.post(Stop())
            self._thread.join()
            assert self._blobs is not None
            self._blobs.close()
        self._mailbox.close()

    def __enter__(self) -> FetchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._blobs = Blobs(self.options, self.stats, self._mailbox, self._cancel)
                self._thread = threading.Thread(target=self._run, name="fastpull-fetch", daemon=True)
                self._thread.start()

    # ---- the loop (runs in the fetch thread only) ------------------------------------------

    def _run(self) -> None:
        self._multi = Multi(self.options, self._mailbox.fd)
        self._planner = Planner(self.options)
        self._running = True
        self._next_housekeeping = time.monotonic() + _HOUSEKEEPING_S
        self._next_hash = 0.0
        self._multi.share_connections(self._planner.tuner.streams_per_connection)
        try:
            while self._running:
                self._run_once()
        except BaseException as exc:  # a broken loop must not leave callers waiting forever
            log.exception("fetch loop failed")
            self._fail_everything(FastpullError(f"fetch loop failed: {exc}"))
        finally:
            self._fail_everything(FastpullError("fetch engine closed"))
            self._await_commits()
            self._multi.close()

    def _run_once(self) -> None:
        due = self._planner.next_due
        self._multi.wait(self._next_housekeeping if due is None else min(self._next_housekeeping, due),
                         self._drain_commands)
        for t, curl_code, message in self._multi.finished():
            self._on_done(t, curl_code, message)
        now = time.monotonic()
        self._planner.release_due(now)
        if now >= self._next_hash:
            self._next_hash = now + _HASH_TICK_S
            self._blobs.hash_along()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_S
            self._reissue_stragglers(now)
            self._tune(now)
        self._blobs.activate()
        for blob in self._planner.slots(self._blobs.active, len(self._multi.transfers)):
            self._start_transfer(blob)

    def _drain_commands(self) -> None:
        for command in self._mailbox.drain():
            match command:
                case Fetch():
                    self._blobs.request(command)
                case Locked():
                    self._blobs.locked(command)
                case Committed():
                    self._blobs.committed(command)
                case Switched():
                    self._blobs.switched(command)
                case Cancel():
                    self._blobs.end_group(command.group, None, FastpullError("fetch cancelled"))
                case Stop():
                    self._running = False
                    self._blobs.stopping = True

    def _fail_everything(self, exc: FastpullError) -> None:
        self._running = False
        self._blobs.fail_all(exc)

    def _await_commits(self) -> None:
        """On shutdown, let commits already handed to the hashers settle their futures, and fail
        requests that arrived too late."""
        while (command := self._mailbox.get(block=self._blobs.committing)) is not None:
            match command:
                case Committed():
                    self._blobs.committed(command)
                case Fetch():
                    self._blobs.settler.settle([command.future], FastpullError("fetch engine closed"))
                case Locked() if command.writer is not None:
                    command.writer.close()

    # ---- transfers ------------------------------------------------------------------

    def _tune(self, now: float) -> None:
        received = self.stats.bytes_received + sum(t.sink.received for t in self._multi.transfers)
        self._received_so_far = received
        tuner = self._planner.tuner
        before = (tuner.target, tuner.streams_per_connection)
        tuner.observe(now, received, len(self._multi.transfers))
        if (tuner.target, tuner.streams_per_connection) != before:
            log.info("tuner: transfers %d -> %d, streams per connection %d -> %d",
                     before[0], tuner.target, before[1], tuner.streams_per_connection)
        self._multi.share_connections(tuner.streams_per_connection)

    def _start_transfer(self, blob: BlobFetch) -> None:
        outstanding = self._blobs.backlog + sum(t.end - t.sink.offset for t in self._multi.transfers)
        span = self._planner.next_span(blob, outstanding)
        sink = blob.writer.sink(span.start, span.end, span.valid_from)
        t = Transfer(blob, span.chunks, span.start, span.end, sink, time.monotonic(), blob.url, blob.auth)
        extra = [f"Range: bytes={span.start}-{span.end - 1}"] if span.chunks is not None else []
        origin = blob.source.origin
        self._multi.start(t, blob.headers(extra), origin if blob.at_origin(blob.url) else Origin(ca_file=origin.ca_file))
        blob.transfers.add(t)
        self.stats.requests += 1

    def _release(self, t: Transfer) -> None:
        self.stats.connections += self._multi.remove(t)
        t.blob.transfers.discard(t)
        self.stats.bytes_received += t.sink.received

    def _cancel(self, t: Transfer) -> None:
        """Drop a transfer; its chunks go back to the queue, resuming from the bytes written."""
        self._release(t)
        if t.blob.writer is not None:
            self._planner.requeue(t)

    def _on_done(self, t: Transfer, curl_code: int, message: str) -> None:
        """Do what the HTTP policy says a finished transfer means."""
        blob = t.blob
        self._release(t)
        tuner = self._planner.tuner
        tuner.multiplexed |= t.http2
        if blob.writer is None:
            return
        if t.sink.error is not None:
            self._blobs.finish(blob, StoreError(str(blob.writer.data_path), str(t.sink.error)))
            return
        if curl_code == 0 and t.status == 401 and t.auth != blob.auth:
            self._planner.requeue(t)  # sent before another transfer of the blob renewed the token
            return
        key = t.chunks[0] if t.chunks is not None else "single"
        exchange = Exchange(t.status, t.headers, curl_code, message,
                            complete=t.sink.armed and t.sink.offset == t.end, elsewhere=not blob.at_origin(t.url))
        counters = Counters(blob.tries.get(key, 0) + 1, blob.redirects, blob.reauthentications, blob.resolutions)
        verdict = judge(exchange, counters, blob.retry(self.options.retry))
        if t.status in THROTTLE_STATUSES:
            tuner.throttled(time.monotonic())
        match verdict.action:
            case Action.DONE:
                blob.finished_rates.append(t.sink.received / max(time.monotonic() - t.started, 1e-3))
                blob.resolutions = 0  # its redirect target works
                blob.reauthentications = 0  # and its token: a later expiry may be renewed again
                self._blobs.chunk_done(blob)
            case Action.FOLLOW:
                blob.redirects += 1
                target = urljoin(blob.url, verdict.location)  # reused for all its chunks
                if urlsplit(target).netloc != urlsplit(blob.url).netloc:
                    log.info("%s is redirected to %s", blob.digest, urlsplit(target).netloc)
                blob.url = target
                self._planner.requeue(t)
            case Action.RESOLVE_AGAIN:
                # A signed redirect target (CDN, S3) expired or refuses us: ask the registry for a
                # fresh one; the chunks already written stay.
                if t.url == blob.url:  # else another transfer of the blob resolved it again already
                    log.info("%s answered HTTP %d for %s: resolving its redirect again",
                             urlsplit(t.url).netloc, t.status, blob.digest)
                    blob.redirects, blob.resolutions = 0, blob.resolutions + 1
                    blob.url = blob.source.blob_url(blob.digest)
                self._planner.requeue(t)
            case Action.REAUTHENTICATE:
                blob.reauthentications += 1
                try:
                    blob.auth = blob.source.reauthorize(t.headers["www-authenticate"], blob.auth)
                except FastpullError as exc:
                    self._fail(t, exc)
                    return
                self._planner.requeue(t)
            case Action.RETRY:
                blob.tries[key] = counters.tries
                self.stats.retries += 1
                log.debug("retrying %s chunks %s in %.2fs: %s", blob.digest, t.chunks, verdict.delay, verdict.why)
                self._planner.requeue(t, verdict.delay, time.monotonic())
            case Action.FAIL if curl_code or t.status < 400:
                self._fail(t, TransferError(t.url, verdict.why, curl_code or None))
            case Action.FAIL:
                self._fail(t, RegistryError(t.status, "GET", t.url, t.sink.error_body,
                                            retry_after=t.headers.get("retry-after")))

    def _fail(self, t: Transfer, error: FastpullError) -> None:
        """``t``'s blob failed at its source: its chunks wait for the next place the source names."""
        self._planner.requeue(t)
        self._blobs.fail_over(t.blob, error)

    def _reissue_stragglers(self, now: float) -> None:
        """Cut the ranged transfers far slower than their blob's others; their remaining bytes
        go out again on fresh requests."""
        for t in self._planner.stragglers(self._blobs.active, self._multi.transfers, now, _HOUSEKEEPING_S):
            log.info("re-issuing slow range %d-%d of %s (%.0f B/s)", t.sink.offset, t.end, t.blob.digest, t.rate)
            self.stats.stragglers_reissued += 1
            self._cancel(t)
