"""The fetch engine's loop: one pycurl ``CurlMulti`` drives every ranged transfer of every pull.

Each blob larger than a chunk is fetched as bounded ``Range: bytes=a-b`` requests spread over
many kept-alive connections (HTTP/2 streams share a connection only as far as the tuner finds
that costs no throughput). Bytes go straight from libcurl's buffer to their offset in the
preallocated ingest file (``RangeSink``); nothing chunk-sized is held in memory. Hasher threads
follow each blob's contiguous-finished watermark with sha256 while later chunks still arrive,
then commit.

The loop thread owns the curl handles and sockets (:mod:`fastpull.engine.multi`); other threads
talk to it with typed commands (:mod:`fastpull.engine.commands`). What to fetch next is the planner's
(:mod:`fastpull.engine.planner`), what an answer means is the HTTP policy's
(:mod:`fastpull.http.policy`). The engine knows HTTP and the content store, not OCI: a
:class:`BlobSource` says where a blob lives and which Authorization header to send.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from fastpull.content.store import BlobWriter, ContentStore
from fastpull.engine.commands import Committed, Fetch, Locked, Mailbox, Stop
from fastpull.engine.hashing import Hashers
from fastpull.engine.multi import Multi
from fastpull.engine.options import BlobSource, FetchOptions, FetchStats
from fastpull.engine.planner import Planner
from fastpull.engine.transfers import BlobFetch, Transfer
from fastpull.errors import DigestMismatch, FastpullError, RegistryError, StoreError, TransferError
from fastpull.http.policy import THROTTLE_STATUSES, Action, Counters, Exchange, judge

log = logging.getLogger(__name__)

_HOUSEKEEPING_S = 0.5


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
        self._mailbox = Mailbox()
        self._closed = False
        self._received_so_far = 0  # published by the loop for received_bytes()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._hashers: Hashers | None = None

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
        be followed with :class:`fastpull.content.store.BlobReader`: when its ingest is opened here, or
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
        self._mailbox.post(Fetch(store, source, digest, size, future, on_open, on_downloaded))
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
            self._mailbox.post(Stop())
            self._thread.join()
            assert self._hashers is not None
            self._hashers.stop()
        self._mailbox.close()

    def __enter__(self) -> FetchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._hashers = Hashers(self.options.hasher_threads,
                                        lambda blob, result: self._mailbox.post(Committed(blob, result)))
                self._thread = threading.Thread(target=self._run, name="fastpull-fetch", daemon=True)
                self._thread.start()

    # ---- the loop (runs in the fetch thread only) ------------------------------------------

    def _run(self) -> None:
        opts = self.options
        self._multi = Multi(opts, self._mailbox.fd)
        self._blobs: dict[tuple[str, str], BlobFetch] = {}
        self._active: list[BlobFetch] = []
        self._queued: deque[BlobFetch] = deque()
        self._planner = Planner(opts)
        self._running = True
        self._next_housekeeping = time.monotonic() + _HOUSEKEEPING_S
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
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_S
            self._reissue_stragglers(now)
            self._tune(now)
        self._activate()
        for blob in self._planner.slots(self._active, len(self._multi.transfers)):
            self._start_transfer(blob)

    def _drain_commands(self) -> None:
        for command in self._mailbox.drain():
            match command:
                case Fetch():
                    self._on_fetch(command)
                case Locked():
                    self._on_locked(command.blob, command.writer, command.error)
                case Committed():
                    self._on_committed(command.blob, command.result)
                case Stop():
                    self._running = False

    # ---- blob life cycle --------------------------------------------------------------

    def _on_fetch(self, command: Fetch) -> None:
        store, source, digest, size = command.store, command.source, command.digest, command.size
        future, on_open, on_downloaded = command.future, command.on_open, command.on_downloaded
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
        blob = BlobFetch(store, source, digest, size, [future], url=url, registry_netloc=urlsplit(url).netloc,
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

    def _wait_for_lock(self, blob: BlobFetch) -> None:
        try:
            writer = blob.store.open_writer(blob.digest, blob.size, self.options.bitmap_chunk, block=True)
        except BaseException as exc:
            self._mailbox.post(Locked(blob, None, exc))
        else:
            self._mailbox.post(Locked(blob, writer, None))

    def _on_locked(self, blob: BlobFetch, writer: BlobWriter | None, exc: BaseException | None) -> None:
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

    def _call_openers(self, blob: BlobFetch) -> None:
        openers, blob.openers = blob.openers, []
        for on_open in openers:
            _call_safely(on_open)

    def _start_blob(self, blob: BlobFetch, writer: BlobWriter) -> None:
        blob.writer = writer
        self._call_openers(blob)
        blob.auth = blob.source.authorization()
        blob.pending = writer.missing_chunks()
        self.stats.bytes_resumed += writer.resumed_bytes
        self._active.append(blob)
        if not blob.pending:
            self._maybe_commit(blob)

    def _finish(self, blob: BlobFetch, result: Path | BaseException) -> None:
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
            command = self._mailbox.get(block=committing)
            match command:
                case None:
                    return
                case Committed():
                    self._on_committed(command.blob, command.result)
                case Fetch():
                    command.future.set_exception(FastpullError("fetch engine closed"))
                case Locked() if command.writer is not None:
                    command.writer.close()

    # ---- transfers ------------------------------------------------------------------

    def _tune(self, now: float) -> None:
        received = self.stats.bytes_received + sum(t.sink.received for t in self._multi.transfers)
        self._received_so_far = received
        tuner = self._planner.tuner
        tuner.observe(now, received, len(self._multi.transfers))
        self._multi.share_connections(tuner.streams_per_connection)

    def _start_transfer(self, blob: BlobFetch) -> None:
        span = self._planner.next_span(blob)
        sink = blob.writer.sink(span.start, span.end, span.valid_from)
        t = Transfer(blob, span.chunks, span.start, span.end, sink, time.monotonic(), blob.url, blob.auth)
        extra = [f"Range: bytes={span.start}-{span.end - 1}"] if span.chunks is not None else []
        self._multi.start(t, blob.headers(extra), blob.source.ca_file,
                          blob.source.tls_verify or not blob.at_origin(blob.url))
        blob.transfers.add(t)
        self.stats.requests += 1

    def _release(self, transfer: Transfer) -> None:
        self.stats.connections += self._multi.remove(transfer)
        transfer.blob.transfers.discard(transfer)
        self.stats.bytes_received += transfer.sink.received

    def _cancel(self, transfer: Transfer) -> None:
        """Drop a transfer; its chunks go back to the queue, resuming from the bytes written."""
        self._release(transfer)
        if transfer.blob.writer is not None:
            self._planner.requeue(transfer)

    def _on_done(self, t: Transfer, curl_code: int, message: str) -> None:
        blob = t.blob
        self._release(t)
        tuner = self._planner.tuner
        tuner.multiplexed |= t.http2
        if blob.writer is None:
            return
        if t.sink.error is not None:
            self._finish(blob, StoreError(str(blob.writer.data_path), str(t.sink.error)))
            return
        if curl_code == 0 and t.status == 401 and t.auth != blob.auth:
            self._planner.requeue(t)  # sent before another transfer of the blob renewed the token
            return
        key = t.chunks[0] if t.chunks is not None else "single"
        exchange = Exchange(t.status, t.headers, curl_code, message,
                            complete=t.sink.armed and t.sink.offset == t.end, elsewhere=not blob.at_origin(t.url))
        counters = Counters(blob.tries.get(key, 0) + 1, blob.redirects, blob.reauthentications, blob.resolutions)
        verdict = judge(exchange, counters, self.options.retry)
        if t.status in THROTTLE_STATUSES:
            tuner.throttled(time.monotonic())
        match verdict.action:
            case Action.DONE:
                blob.finished_rates.append(t.sink.received / max(time.monotonic() - t.started, 1e-3))
                blob.resolutions = 0  # its redirect target works
                blob.reauthentications = 0  # and its token: a later expiry may be renewed again
                self._on_chunk_done(blob)
            case Action.FOLLOW:
                blob.redirects += 1
                blob.url = urljoin(blob.url, verdict.location)  # reused for all its chunks
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
                    self._finish(blob, exc)
                    return
                self._planner.requeue(t)
            case Action.RETRY:
                blob.tries[key] = counters.tries
                self.stats.retries += 1
                log.debug("retrying %s chunks %s in %.2fs: %s", blob.digest, t.chunks, verdict.delay, verdict.why)
                self._planner.requeue(t, verdict.delay, time.monotonic())
            case Action.FAIL if curl_code or t.status < 400:
                self._finish(blob, TransferError(t.url, verdict.why, curl_code or None))
            case Action.FAIL:
                self._finish(blob, RegistryError(t.status, "GET", t.url, t.sink.error_body,
                                                 retry_after=t.headers.get("retry-after")))

    def _on_chunk_done(self, blob: BlobFetch) -> None:
        watermark = blob.writer.bitmap.watermark()
        if blob.writer.bitmap.complete():
            self._maybe_commit(blob)
        elif watermark > blob.hashed_watermark:
            blob.hashed_watermark = watermark
            self._hashers.advance(blob.writer)

    def _maybe_commit(self, blob: BlobFetch) -> None:
        if blob.committing or blob.transfers or not blob.writer.bitmap.complete():
            return
        blob.committing = True
        self._hashers.commit(blob, blob.digest, blob.writer)

    def _on_committed(self, blob: BlobFetch, result: Path | BaseException) -> None:
        blob.committing = False
        blob.writer = None  # commit() closed it, whatever the outcome
        if isinstance(result, DigestMismatch) and not blob.refetched and not blob.streamed and self._running:
            # A byte flipped on the way (a proxy, a NIC) costs one more download, not the pull; the
            # same mismatch twice is the registry's copy. commit() discarded the ingest. A blob read
            # as it landed is not fetched again: its reader has consumed the bad bytes.
            log.warning("%s failed its digest check: fetching it once more from scratch", blob.digest)
            blob.refetched, blob.hashed_watermark = True, 0
            self._active.remove(blob)
            self._queued.appendleft(blob)
            return
        if not isinstance(result, BaseException):
            self.stats.blobs_fetched += 1
            if blob.on_downloaded is not None:
                _call_safely(blob.on_downloaded)
        self._finish(blob, result)

    def _reissue_stragglers(self, now: float) -> None:
        """Cut the ranged transfers far slower than their blob's others; their remaining bytes
        go out again on fresh requests."""
        for t in self._planner.stragglers(self._active, self._multi.transfers, now, _HOUSEKEEPING_S):
            log.info("re-issuing slow range %d-%d of %s (%.0f B/s)", t.sink.offset, t.end, t.blob.digest, t.rate)
            self.stats.stragglers_reissued += 1
            self._cancel(t)
