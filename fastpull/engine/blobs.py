"""The blobs the fetch loop is fetching, from request to settled futures: one download per
(store, digest) however many ask for it, another writer's per-digest lock waited on off the
loop's thread, a finished blob verified and committed by the hashers, a group's requests ended
together, and the futures settled off the loop's thread. Which bytes of an active blob go next is
the planner's (:mod:`fastpull.engine.planner`); its transfers are the loop's.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from urllib.parse import urlsplit

from fastpull.content.store import BlobWriter
from fastpull.engine.commands import Committed, Fetch, Locked, Mailbox, Switched
from fastpull.engine.hashing import Hashers
from fastpull.engine.options import FetchGroup, FetchOptions, FetchStats
from fastpull.engine.transfers import BlobFetch, Transfer
from fastpull.errors import DigestMismatch, FastpullError

log = logging.getLogger("fastpull.engine.loop")  # one logger for the loop and its parts


def _call_safely(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # a caller's bug must not stop the loop
        log.exception("fetch callback failed")


class Settler:
    """Settles futures on a thread of its own, in the order given: the loop never waits on a future's
    lock, which the thread of a caller interrupted inside ``concurrent.futures.wait`` (a
    KeyboardInterrupt) may hold for good."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[Future], Path | BaseException] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="fastpull-settle", daemon=True).start()

    def settle(self, futures: Iterable[Future], result: Path | BaseException) -> None:
        self._jobs.put((list(futures), result))

    def close(self) -> None:
        """End the thread once it has settled what it was given; not joined, for the reason above."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            futures, result = job
            for future in futures:
                try:
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                except InvalidStateError:  # its caller cancelled it
                    pass


class Blobs:
    """The loop thread's table of blobs being fetched, keyed by (store, digest).

    A blob is queued, then active (its ingest open: at most ``blobs_in_flight``, in the order they
    were asked for), then committing; :meth:`finish` settles every request's future, through the
    settler. Side threads (lock waits, hashers) answer through the mailbox; ``cancel`` drops one of a
    blob's transfers.
    """

    def __init__(self, options: FetchOptions, stats: FetchStats, mailbox: Mailbox,
                 cancel: Callable[[Transfer], None]):
        self._options = options
        self._stats = stats
        self._mailbox = mailbox
        self._cancel = cancel
        self._hashers = Hashers(options.hasher_threads, lambda blob, result: mailbox.post(Committed(blob, result)))
        self.settler = Settler()
        self._table: dict[tuple[str, str], BlobFetch] = {}
        self._queued: deque[BlobFetch] = deque()
        self.active: list[BlobFetch] = []
        """Blobs with an open ingest, in the order they were asked for."""
        self.stopping = False
        """Set when the engine closes: no blob is started or fetched again from then on."""

    @property
    def committing(self) -> bool:
        """Whether a blob is with the hashers."""
        return any(blob.committing for blob in self._table.values())

    def request(self, command: Fetch) -> None:
        """A caller asks for a blob: share a download in progress, answer at once if the store
        has it, else queue a new one."""
        store, digest, on_open, group = command.store, command.digest, command.on_open, command.group
        if group is not None and group.failed is not None:
            self.settler.settle([command.future], group.failed[1])
            return
        key = (str(store.root), digest)
        blob = self._table.get(key)
        if blob is not None:
            blob.futures[command.future] = group
            if on_open is not None:
                blob.streamed = True
                blob.openers.append(on_open)
                if blob.writer is not None:
                    self._call_openers(blob)
            return
        if store.has(digest, command.size):
            self._stats.blobs_skipped += 1
            if on_open is not None:
                _call_safely(on_open)
            self.settler.settle([command.future], store.blob_path(digest))
            return
        blob = BlobFetch(store, command.source, digest, command.size, {command.future: group},
                         streamed=on_open is not None, on_downloaded=command.on_downloaded)
        if on_open is not None:
            blob.openers.append(on_open)
        self._table[key] = blob
        self._queued.append(blob)

    @property
    def backlog(self) -> int:
        """Bytes not yet asked for: the pending chunks of the active blobs and the queued blobs."""
        return (sum(len(b.pending) * b.writer.bitmap.chunk_size for b in self.active if b.writer is not None)
                + sum(b.size for b in self._queued))

    def activate(self) -> None:
        """Open the ingests of queued blobs while fewer than ``blobs_in_flight`` are active."""
        while self._queued and len(self.active) < self._options.blobs_in_flight:
            blob = self._queued.popleft()
            if not blob.futures:  # its requests were withdrawn meanwhile
                continue
            try:
                writer = blob.store.open_writer(blob.digest, blob.size, self._options.bitmap_chunk, block=False)
            except FastpullError as exc:
                self.finish(blob, exc)
                continue
            if writer is None and blob.store.has(blob.digest, blob.size):
                self._stats.blobs_skipped += 1
                self.finish(blob, blob.store.blob_path(blob.digest))
            elif writer is None:
                # Another process or engine is fetching it: block in flock on a side
                # thread (woken by the kernel when it commits or dies), never poll.
                threading.Thread(target=self._wait_for_lock, args=(blob,), daemon=True).start()
            else:
                self._start(blob, writer)

    def _wait_for_lock(self, blob: BlobFetch) -> None:
        try:
            writer = blob.store.open_writer(blob.digest, blob.size, self._options.bitmap_chunk, block=True)
        except BaseException as exc:
            self._mailbox.post(Locked(blob, None, exc))
        else:
            self._mailbox.post(Locked(blob, writer, None))

    def locked(self, command: Locked) -> None:
        """The other writer is gone: it committed the blob, or died and left its partial download
        to resume."""
        blob, writer = command.blob, command.writer
        if not blob.futures:  # its requests were withdrawn meanwhile
            if writer is not None:
                writer.close()
        elif command.error is not None:
            self.finish(blob, command.error)
        elif writer is None:
            self._stats.blobs_skipped += 1
            self.finish(blob, blob.store.blob_path(blob.digest))
        elif self.stopping:
            writer.close()
        else:
            self._start(blob, writer)

    def _call_openers(self, blob: BlobFetch) -> None:
        openers, blob.openers = blob.openers, []
        for on_open in openers:
            _call_safely(on_open)

    def _start(self, blob: BlobFetch, writer: BlobWriter) -> None:
        blob.writer = writer
        self._call_openers(blob)
        blob.pending = writer.missing_chunks()
        self._stats.bytes_resumed += writer.resumed_bytes
        self.active.append(blob)
        if not blob.pending:
            self._maybe_commit(blob)
            return
        try:
            if (instead := blob.source.fallback(blob.digest, None)) is not None:
                blob.source = instead
            blob.switch(blob.source, blob.source.blob_url(blob.digest), blob.source.authorization())
        except FastpullError as exc:  # its host is unreachable: the source may name another
            self.fail_over(blob, exc)

    def fail_over(self, blob: BlobFetch, error: FastpullError) -> None:
        """The blob failed at its source: fetch the rest from the next place the source names,
        resuming from the chunks written, or end it with ``error`` if there is none. The source is
        asked on a side thread (it may reach the next place first); meanwhile the blob has no
        transfers."""
        for t in list(blob.transfers):
            self._cancel(t)  # their chunks go back to the queue, resuming from the bytes written
        blob.switching = True
        threading.Thread(target=self._ask_fallback, args=(blob, error), daemon=True).start()

    def _ask_fallback(self, blob: BlobFetch, error: FastpullError) -> None:
        try:
            source = blob.source.fallback(blob.digest, error)
            if source is None:
                self._mailbox.post(Switched(blob, None, "", None, error))
            else:
                self._mailbox.post(Switched(blob, source, source.blob_url(blob.digest), source.authorization(), error))
        except FastpullError as exc:
            self._mailbox.post(Switched(blob, None, "", None, exc))
        except BaseException as exc:  # a source's bug must not leave the blob waiting forever
            log.exception("asking where to fetch %s next failed", blob.digest)
            self._mailbox.post(Switched(blob, None, "", None, FastpullError(f"{blob.digest}: {exc}")))

    def switched(self, command: Switched) -> None:
        """The source answered where to fetch the blob next."""
        blob = command.blob
        blob.switching = False
        if blob.writer is None or blob.committing:
            return  # it ended meanwhile (the engine stopped)
        if command.source is None:
            self.finish(blob, command.error)
            return
        log.warning("%s: %s; fetching the rest (%d of %d chunks) from %s", blob.digest, command.error,
                    len(blob.pending), blob.writer.bitmap.nchunks, urlsplit(command.url).netloc)
        blob.switch(command.source, command.url, command.auth)

    def chunk_done(self, blob: BlobFetch) -> None:
        """A request of ``blob`` finished: hash along the watermark, or commit a complete blob."""
        if blob.writer.bitmap.complete():
            self._maybe_commit(blob)
        else:
            self._hash_along(blob)

    def hash_along(self) -> None:
        """Hash every active blob up to its watermark (chunks land in the middle of requests too)."""
        for blob in self.active:
            if blob.writer is not None and not blob.committing:
                self._hash_along(blob)

    def _hash_along(self, blob: BlobFetch) -> None:
        watermark = blob.writer.bitmap.watermark()
        if watermark > blob.hashed_watermark:
            blob.hashed_watermark = watermark
            self._hashers.advance(blob.writer)

    def _maybe_commit(self, blob: BlobFetch) -> None:
        if blob.committing or blob.transfers or not blob.writer.bitmap.complete():
            return
        blob.committing = True
        self._hashers.commit(blob, blob.digest, blob.writer)

    def committed(self, command: Committed) -> None:
        """The hashers verified and committed a blob, or it failed its digest check."""
        blob, result = command.blob, command.result
        blob.committing = False
        blob.writer = None  # commit() closed it, whatever the outcome
        if (isinstance(result, DigestMismatch) and not blob.refetched and not blob.streamed and not self.stopping
                and blob.futures):
            # A byte flipped on the way (a proxy, a NIC) costs one more download, not the pull; the
            # same mismatch twice is the registry's copy. commit() discarded the ingest. A blob read
            # as it landed is not fetched again: its reader has consumed the bad bytes.
            log.warning("%s failed its digest check: fetching it once more from scratch", blob.digest)
            blob.refetched, blob.hashed_watermark = True, 0
            self.active.remove(blob)
            self._queued.appendleft(blob)
            return
        if not isinstance(result, BaseException):
            self._stats.blobs_fetched += 1
            if blob.on_downloaded is not None:
                _call_safely(blob.on_downloaded)
        self.finish(blob, result)

    def finish(self, blob: BlobFetch, result: Path | BaseException) -> None:
        """Settle every future of a blob and forget it; releases the writer unless committed. A
        blob that failed (the engine running) ends its requests' groups first."""
        self._forget(blob)
        if isinstance(result, BaseException):
            blob.openers.clear()
            if not self.stopping:
                for group in {g for g in blob.futures.values() if g is not None}:
                    self.end_group(group, blob.digest, result)
        else:
            self._call_openers(blob)  # committed by another process while we waited
        self.settler.settle(blob.futures, result)

    def _forget(self, blob: BlobFetch) -> None:
        """Stop fetching ``blob``: its transfers end, its writer is released unless committing (the
        data written stays for a resume)."""
        for t in list(blob.transfers):
            self._cancel(t)
        if blob.writer is not None and not blob.committing:
            blob.writer.close()
        blob.writer = None
        key = (str(blob.store.root), blob.digest)
        if self._table.get(key) is blob:
            del self._table[key]
        if blob in self.active:
            self.active.remove(blob)

    def end_group(self, group: FetchGroup, digest: str | None, error: BaseException) -> None:
        """Fail the requests of ``group`` still waiting, and those made later, with ``error`` (``digest``:
        the blob that failed, None for a cancel); a blob no one else wants is no longer fetched. A blob
        being committed is left to settle its requests: it is all in."""
        if group.failed is not None:
            return  # ended already: none of its requests is left
        group.failed = (digest, error)
        for blob in list(self._table.values()):
            ours = [f for f, g in blob.futures.items() if g is group]
            if not ours or blob.committing:
                continue
            for future in ours:
                del blob.futures[future]
            if not blob.futures:
                self._forget(blob)
            self.settler.settle(ours, error)

    def fail_all(self, exc: FastpullError) -> None:
        """Stop: fail every blob but those the hashers are committing."""
        self.stopping = True
        for blob in list(self._table.values()):
            if not blob.committing:
                self.finish(blob, exc)

    def close(self) -> None:
        """End the hasher threads after the jobs already queued, then the settler."""
        self._hashers.stop()
        self.settler.close()
