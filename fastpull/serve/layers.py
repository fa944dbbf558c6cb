"""Where the snapshotter's missing layers come from: whole-image pulls into the ChainID cache.

containerd prepares an image's layers one at a time; the first ``Prepare`` of a layer the cache
lacks starts one pull of the image by its manifest digest, with every missing layer fetched and
unpacked in parallel by the daemon's engine; each ``Prepare`` then waits for its own layer, which
becomes visible as soon as it and the layers under it are unpacked. Prepares of every layer of one
image (20 pods pulling it at once, or several containerd namespaces) share that pull, and images
that share layers unpack each shared layer once (the cache's per-ChainID lock).

These pulls do not tag the image in the store: containerd owns the image, the snapshots own the
layers, and `fastpull gc` frees what neither uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from pathlib import Path

from fastpull.errors import FastpullError, SnapshotNotFound
from fastpull.events import Event, LayerDone
from fastpull.oci.reference import parse_reference
from fastpull.puller import Puller
from fastpull.serve.pulls import PullAccount
from fastpull.snapshotter.remote import LayerRequest
from fastpull.unpack.snapshots import Snapshotter as LayerCache

log = logging.getLogger(__name__)

IMAGES_AT_ONCE = 8
"""Images pulled for the snapshotter at once (their blobs share the one engine's connections)."""


class _ImagePull(PullAccount):
    """One image being pulled into the cache, and the Prepares waiting on its layers."""

    def __init__(self, reference: str, image: str):
        super().__init__(reference, image, "snapshotter")
        self.waiters: list[tuple[str, Future[None]]] = []


def _settle(future: Future[None], error: FastpullError | None = None) -> None:
    """Tell a Prepare its layer is there (or why not); a Prepare that gave up (its call cancelled by
    a client's deadline or a restart, which cancels its future) hears nothing, and the pull goes on."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


class ImageLayers:
    """The daemon's :class:`fastpull.snapshotter.remote.LayerSource`: layers come from pulls of
    their images by ``puller`` into ``layout``'s store, unpacked into ``cache``. ``unpacked_bytes(n)``
    hears the compressed layer bytes the pulls unpack, as they do."""

    def __init__(self, puller: Puller, layout: Path, cache: LayerCache,
                 unpacked_bytes: Callable[[int], None] | None = None):
        self.puller = puller
        self.layout = layout
        self.cache = cache
        self._unpacked_bytes = unpacked_bytes
        self._pulls: dict[str, _ImagePull] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(IMAGES_AT_ONCE, thread_name_prefix="layers")

    def ensure(self, request: LayerRequest) -> Future[None]:
        future: Future[None] = Future()
        try:
            ref = parse_reference(request.image_ref)
        except FastpullError as e:
            future.set_exception(e)
            return future
        by_digest = f"{ref.registry}/{ref.repository}@{request.manifest_digest}"
        with self._lock:
            if self.cache.has(request.chain_id):
                future.set_result(None)
                return future
            pull = self._pulls.get(by_digest)
            if pull is None:
                pull = self._pulls[by_digest] = _ImagePull(by_digest, request.image_ref)
                self._pool.submit(self._pull, pull)
            pull.waiters.append((request.chain_id, future))
        return future

    def _pull(self, pull: _ImagePull) -> None:
        error: FastpullError | None = None
        try:
            self.puller.pull(pull.reference, self.layout, snapshots=self.cache.root,
                             events=lambda event: self._heard(pull, event), tag=False)
        except FastpullError as e:
            error = e
        except Exception as e:  # a bug: every waiter must still hear that the pull is over
            log.exception("pull of %s for the snapshotter", pull.reference)
            error = FastpullError(f"{pull.reference}: {type(e).__name__}: {e}")
        with self._lock:
            del self._pulls[pull.reference]
            waiters, pull.waiters = pull.waiters, []
        for chain_id, future in waiters:
            _settle(future, None if self.cache.has(chain_id) else error or SnapshotNotFound(
                chain_id, f"the image {pull.reference} has no layer with this ChainID"))

    def _heard(self, pull: _ImagePull, event: Event) -> None:
        """Keep the pull's account, and wake the Prepares whose layers are in the cache now (called
        in the pull's thread)."""
        if not (isinstance(event, LayerDone) and event.state == "unpacked"):
            grown = pull.heard(event)
            if self._unpacked_bytes is not None and grown > 0:
                self._unpacked_bytes(grown)
            return
        with self._lock:
            pull.heard(event)
            ready, waiting = [], []
            for waiter in pull.waiters:
                (ready if self.cache.has(waiter[0]) else waiting).append(waiter)
            pull.waiters = waiting
        for _, future in ready:
            _settle(future)

    def pulls(self) -> list[dict]:
        """The pulls in flight, as the status API shows them (:meth:`PullAccount.status`), ``waiting``
        the Prepares waiting."""
        now = time.monotonic()
        with self._lock:
            pulls = [(pull, sum(not f.cancelled() for _, f in pull.waiters)) for pull in self._pulls.values()]
        return [pull.status(now, waiting) for pull, waiting in pulls]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
