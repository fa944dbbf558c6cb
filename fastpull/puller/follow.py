"""One pull's account, kept in the pull's thread: what it downloaded and when, and the events that
tell it (:mod:`fastpull.events`); how the pull waits for its work, and is stopped."""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastpull.engine import FetchEngine, FetchGroup, FetchStats
from fastpull.events import Blob, Event, LayerDone, Progress
from fastpull.events import Resolved as ResolvedEvent
from fastpull.oci.manifest import Descriptor
from fastpull.puller.result import PullResult
from fastpull.puller.unpacks import Unpacks, succeeded
from fastpull.registry.client import Resolved

log = logging.getLogger("fastpull.puller")  # one logger for the pull and its parts

if TYPE_CHECKING:  # unpacking pulls in the tar applier and decompressors: imported when used
    from fastpull.unpack.workers import UnpackProgress

_PROGRESS_INTERVAL_S = 0.5
"""How often ``Puller.pull`` reports progress: as often as the engine counts running transfers."""
_RATE_WINDOW = 5
"""Progress reports over which the download rate is measured (2 s)."""


def emitter(events: Callable[[Event], None] | None,
            progress: Callable[[int, int], None] | None) -> Callable[[Event], None] | None:
    """One callable for both of ``Puller.pull``'s callbacks (``progress`` hears the Progress events)."""
    if progress is None:
        return events

    def emit(event: Event) -> None:
        if isinstance(event, Progress):
            progress(event.done, event.total)
        if events is not None:
            events(event)

    return emit


class Stopped(KeyboardInterrupt):
    """The pull was stopped (:meth:`Puller.stop`): raised in its thread from the wait it was in."""


class Follow:
    """One pull's account: what it downloaded and when, and the events that tell it (each layer
    fetched and unpacked, in order; progress twice a second).

    The pull waits here, for its futures or a :meth:`stop`, never inside ``concurrent.futures.wait``
    (an interruption there leaves the futures' locks taken, and the threads that settle them stuck).
    """

    def __init__(self, engine: FetchEngine, emit: Callable[[Event], None] | None):
        self._engine = engine
        self._emit = emit
        self.downloaded: dict[str, int] = {}
        """Sizes of the blobs this pull's requests downloaded, by digest (set from the engine's thread)."""
        self.failed: str | None = None
        """The blob whose fetch or unpack failed the pull."""
        self.download_seconds: float | None = None
        """Set once every blob is committed."""
        self._unpack_progress: UnpackProgress | None = None
        self._stats = dataclasses.replace(engine.stats)
        self._started = time.monotonic()
        self._received_before = self._received()
        self._missing = 0
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=_RATE_WINDOW)
        self.group = FetchGroup()
        """The pull's fetches: the first to fail ends the others."""
        self._stopped = False
        self._woken: queue.SimpleQueue[object] = queue.SimpleQueue()  # put() is safe in a signal handler
        self._watched: set[Future] = set()

    def stop(self) -> None:
        """Make the pull raise Stopped from its wait (at once if it waits); safe from a signal handler."""
        self._stopped = True
        self._woken.put(None)

    def _wait(self, futures: list[Future], timeout: float | None) -> None:
        """Until one of ``futures`` settles or ``timeout`` s pass (at once if there are none); raise
        Stopped if the pull was stopped."""
        for future in futures:
            if future not in self._watched:
                self._watched.add(future)
                future.add_done_callback(self._woken.put)
        try:
            if futures:
                self._woken.get(timeout=timeout)
            while True:  # one pass for everything that settled meanwhile
                self._woken.get_nowait()
        except queue.Empty:
            pass
        if self._stopped:
            raise Stopped

    def settled(self, future: Future) -> Future:
        """``future``, once it has settled (Stopped if the pull is stopped first)."""
        while not future.done():
            self._wait([future], None)
        return future

    def result(self, future: Future):
        """``future``'s result once it has settled, or its error raised; an error that a failed blob of
        the pull's group brought makes that blob the pull's failure."""
        if self.settled(future).exception() is not None and self.group.failed is not None:
            self.failed = self.group.failed[0] or self.failed
        return future.result()

    def emit(self, event: Event) -> None:
        if self._emit is not None:
            self._emit(event)

    def _received(self) -> int:
        return self._engine.received_bytes() + self._engine.stats.bytes_resumed

    def on_downloaded(self, desc: Descriptor) -> Callable[[], None]:
        return functools.partial(self.downloaded.__setitem__, desc.digest, desc.size)

    def resolved(self, resolved: Resolved, layers: list[Descriptor], missing: list[Descriptor], url: str) -> None:
        self._missing = sum(d.size for d in missing)
        self._started = time.monotonic()
        self._received_before = self._received()
        self._rate_window.append((self._started, 0))
        platform = resolved.manifest_descriptor.platform
        log.info("%s is %s (%s, %d layers, %.1f MB); %d blobs, %.1f MB, to fetch from %s",
                 resolved.reference, resolved.manifest_descriptor.digest, platform or "single-platform",
                 len(layers), sum(d.size for d in layers) / 1e6, len(missing), self._missing / 1e6,
                 urlsplit(url)._replace(path="", query="").geturl())
        self.emit(ResolvedEvent(str(resolved.reference), resolved.manifest_descriptor.digest,
                                None if platform is None else str(platform),
                                tuple(Blob(d.digest, d.size) for d in layers)))

    def unpacking(self, unpacks: Unpacks) -> None:
        """Give the layers to unpack slots where their workers count the bytes they read (if anyone listens)."""
        if self._emit is None:
            return
        from fastpull.unpack.workers import UnpackProgress

        self._unpack_progress = UnpackProgress(len(unpacks.layers))
        unpacks.progress = self._unpack_progress.path

    def settle(self, blobs: list[Descriptor], fetches: list[Future], unpacks: Unpacks) -> None:
        """Wait until every fetch (config, then layers, in :attr:`group`) and unpack has settled and
        every layer is in place, telling what happens and letting ``unpacks`` act on it as it does;
        then raise the first failure, if any.

        The first failure ends the pull's other fetches at once; the unpacks under way end (a
        snapshot committed stays), and what other pulls do is no longer waited for. A layer's unpack
        fails the pull once its blob has settled: a corrupt blob is named as the cause.
        """
        layers, layer_fetches = blobs[1:], fetches[1:]
        fetch_of = dict(zip((d.digest for d in layers), layer_fetches))
        said: list[str | None] = [None] * len(layers)
        next_tick = time.monotonic() + _PROGRESS_INTERVAL_S
        cancelled = False
        while True:
            failed = (any(f.done() and f.exception() is not None for f in fetches)
                      or any(fetch_of[digest].done() for digest, _ in unpacks.failures()))
            if failed and not cancelled:
                self._engine.cancel(self.group)
                cancelled = True
            waited = [*fetches, *unpacks.futures(), *([] if failed else unpacks.waits())]
            pending = [f for f in waited if not f.done()]
            started = unpacks.advance(layer_fetches)  # on all that had settled when ``pending`` was taken
            if self._emit is not None:
                self._tell_layers(layers, layer_fetches, unpacks, said)
            if self.download_seconds is None and all(f.done() for f in fetches):
                self.download_seconds = time.monotonic() - self._started
            if not pending and not started:
                break
            if self._emit is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _PROGRESS_INTERVAL_S
                self._tell_progress(layers, unpacks)
            timeout = None if self._emit is None else max(0.0, next_tick - time.monotonic())
            self._wait(pending, timeout)
        ended = self.group.failed
        if ended is not None and ended[0] is not None:
            self.failed, error = ended
            raise error
        failures = unpacks.failures()
        # An unpack whose blob landed failed on its own; one whose download the failure cut short
        # only followed it: name the first of the former.
        causes = [(d, e) for d, e in failures if d not in fetch_of or succeeded(fetch_of[d])]
        for digest, error in causes or failures:
            self.failed = digest
            raise error
        for desc, future in zip(blobs, fetches):  # failed without ending the group: the engine closed
            if future.exception() is not None:
                self.failed = desc.digest
                raise future.exception()
        self._tell_progress(layers, unpacks, final=True)

    def _tell_layers(self, layers: list[Descriptor], fetches: list[Future], unpacks: Unpacks,
                     said: list[str | None]) -> None:
        for i, (desc, fetch) in enumerate(zip(layers, fetches)):
            if said[i] is None and fetch.done() and fetch.exception() is None:
                said[i] = "fetched" if desc.digest in self.downloaded else "present"
                self.emit(LayerDone(desc.digest, said[i]))
            if said[i] not in (None, "unpacked") and unpacks.unpacked(i):
                said[i] = "unpacked"
                self.emit(LayerDone(desc.digest, said[i]))

    def _tell_progress(self, layers: list[Descriptor], unpacks: Unpacks, final=False) -> None:
        """``final``: every blob is in (some may have been committed by another process meanwhile)."""
        now = time.monotonic()
        done = self._missing if final else min(self._received() - self._received_before, self._missing)
        self._rate_window.append((now, done))
        then, before = self._rate_window[0]
        unpacked = unpack_total = 0
        for i, desc in enumerate(layers):
            if not unpacks.counted(i):
                continue
            unpack_total += desc.size
            if final or unpacks.unpacked(i):
                unpacked += desc.size
            elif self._unpack_progress is not None:
                unpacked += min(self._unpack_progress[i], desc.size)
        rate = (done - before) / (now - then) if now > then else 0.0
        self.emit(Progress(done, self._missing, round(rate), unpacked, unpack_total))

    def pulled(self, result: PullResult, stats: FetchStats) -> None:
        """Log what the pull cost the engine (its counters move for every pull of the engine)."""
        log.info("pulled %s: %.1f MB fetched in %.2f s, %d requests on %d new connections, %d retries, "
                 "%d slow ranges re-issued%s", result.reference, result.fetched_bytes / 1e6, result.download_seconds,
                 stats.requests - self._stats.requests, stats.connections - self._stats.connections,
                 stats.retries - self._stats.retries, stats.stragglers_reissued - self._stats.stragglers_reissued,
                 f"; {result.unpacked_layers} layers unpacked in {result.unpack_seconds:.2f} s"
                 if result.unpacked_layers else "")

    def close(self) -> None:
        if self._unpack_progress is not None:
            self._unpack_progress.close()
            self._unpack_progress = None
