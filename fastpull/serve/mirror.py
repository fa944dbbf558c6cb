"""The mirror's decisions, apart from HTTP: where a manifest or blob comes from, and who may have it.

Manifests by digest and blobs come from the store when the ledger says the repository has them;
tags are resolved upstream (cached for ``tag_ttl`` seconds, and the last known digest is served,
with a warning, when the upstream cannot be reached). A blob the store lacks is fetched by the
multipart engine, once for every client and every puller of the node, and can be read while its
ranges land (:class:`fastpull.serve.follow.Follower`). Registry calls block, so they run on a
small thread pool; the ledger and the table of blobs in flight belong to the event loop's thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fastpull.content.layout import ImageLayout
from fastpull.content.leases import Lease
from fastpull.content.store import BlobReader
from fastpull.digests import check_digest
from fastpull.errors import FastpullError, ManifestError, RegistryError, TransferError
from fastpull.oci.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    NON_DISTRIBUTABLE,
    ImageIndex,
    digest_of,
    parse_manifest,
)
from fastpull.oci.reference import parse_reference
from fastpull.puller import Puller, RepositorySource
from fastpull.serve import DEFAULT_TAG_TTL
from fastpull.serve.follow import Follower
from fastpull.serve.imports import ContainerdImports
from fastpull.serve.ledger import Ledger
from fastpull.serve.metrics import Metrics
from fastpull.unpack.snapshots import Snapshotter as LayerCache

log = logging.getLogger(__name__)

T = TypeVar("T")

UPSTREAM_THREADS = 16
"""Registry calls (manifests, HEADs, token requests) at once; blob bytes go through the engine."""


class NotFound(FastpullError):
    """The upstream says the repository has no such blob."""

    def __init__(self, what: str):
        super().__init__(f"{what}: not found upstream")


@dataclass(frozen=True)
class Upstream:
    """Where a request's content comes from."""

    registry: str
    repository: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


def route(name: str, ns: str | None, default_registry: str) -> Upstream:
    """The upstream of a request for repository ``name``: the registry is ``ns`` (containerd's
    ``?ns=``), else a leading host component of the name (``/v2/quay.io/org/app/...``, for
    clients that cannot add ``ns``, as Docker splits names), else ``default_registry``.
    Raises InvalidReference."""
    if ns is None:
        first, slash, rest = name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            ns, name = first, rest
        else:
            ns = default_registry
    ref = parse_reference(f"{ns}/{name}")
    return Upstream(ref.registry, ref.repository)


@dataclass(frozen=True)
class StoredManifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(eq=False)
class InflightBlob:
    """A blob the engine is fetching for the mirror's clients."""

    upstream: Upstream
    digest: str
    size: int
    opened: asyncio.Future[Follower]
    """Settled when its bytes can be followed (or the fetch failed first)."""
    lease: Lease | None = None
    """Keeps ``fastpull gc`` off the blob while it is fetched (a follower's descriptor keeps it after)."""
    started: float = field(default_factory=time.monotonic)
    clients: int = 0
    """Requests that have asked for it."""
    holders: int = 0
    """Requests that may still open the blob through its follower (see ``release``)."""
    over: bool = False
    """The fetch has ended: the follower is closed as soon as no request holds it."""

    def release(self) -> None:
        """A request that :meth:`Mirror.blob` returned this blob to has opened its own descriptor
        (or given up): the follower's may be closed once the fetch is over."""
        self.holders -= 1
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self.over and self.holders == 0 and self.opened.done() and not self.opened.exception():
            self.opened.result().close()


class Mirror:
    """Serves the content of the upstream registries from the store at ``root`` (an OCI layout)."""

    def __init__(self, root: Path, puller: Puller, metrics: Metrics, *, default_registry: str,
                 tag_ttl: float = DEFAULT_TAG_TTL, fetch_ahead: bool = True, unpack_into: LayerCache | None = None,
                 import_into: ContainerdImports | None = None):
        """``unpack_into``: the layer cache prefetched images are also unpacked into (for the snapshotter);
        ``import_into``: the containerd prefetched images go to instead of being tagged in the store."""
        self.layout = ImageLayout(root)
        self.unpack_into = unpack_into
        self.import_into = import_into
        self.store = self.layout.store
        self.ledger = Ledger(root / ".fastpull" / "serve" / "ledger.jsonl")
        self.puller = puller
        self.metrics = metrics
        self.default_registry = default_registry
        self.tag_ttl = tag_ttl
        self.fetch_ahead_enabled = fetch_ahead
        self.inflight: dict[str, InflightBlob] = {}
        self._ahead: set[asyncio.Task] = set()
        self._manifest_calls: dict[tuple[str, str, str], asyncio.Future[StoredManifest]] = {}
        self._executor = ThreadPoolExecutor(UPSTREAM_THREADS, thread_name_prefix="upstream")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.ledger.close()

    # ---- manifests --------------------------------------------------------------------

    async def manifest(self, upstream: Upstream, reference: str) -> StoredManifest:
        """The manifest or index ``reference`` (a tag or a digest) names in ``upstream``."""
        if check_digest(reference) is None:
            if self.ledger.size(upstream.registry, upstream.repository, reference) is not None:
                if (stored := self._stored_manifest(reference)) is not None:
                    self.metrics.request("manifest", "hit")
                    return stored
            return await self._singleflight(upstream, reference)
        known = self.ledger.tag(upstream.registry, upstream.repository, reference)
        if known is not None and time.time() - known.resolved_at < self.tag_ttl:
            if (stored := self._stored_manifest(known.digest)) is not None:
                self.metrics.request("manifest", "hit")
                return stored
        try:
            return await self._singleflight(upstream, reference)
        except (TransferError, RegistryError) as e:
            unreachable = isinstance(e, TransferError) or e.status >= 500 or e.status == 429
            if unreachable and known is not None and (stored := self._stored_manifest(known.digest)) is not None:
                log.warning("%s:%s: upstream unreachable (%s); serving the last known %s",
                            upstream, reference, e, known.digest)
                return stored
            raise

    def _stored_manifest(self, digest: str) -> StoredManifest | None:
        """The stored manifest ``digest``; None if the store lacks it or it is too big to be one (a
        client may name a layer as a manifest: it is never read whole)."""
        media_type = self.ledger.media_type(digest)
        try:
            with open(self.store.blob_path(digest), "rb") as f:
                body = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(body) > MAX_MANIFEST_BYTES:
            return None
        return StoredManifest(digest, media_type or _media_type(body, None, digest), body)

    def _singleflight(self, upstream: Upstream, reference: str) -> Awaitable[StoredManifest]:
        """One upstream GET for the concurrent requests of one manifest."""
        key = (upstream.registry, upstream.repository, reference)
        call = self._manifest_calls.get(key)
        if call is None:
            call = self._manifest_calls[key] = asyncio.ensure_future(self._fetch_manifest(upstream, reference))
            call.add_done_callback(lambda _: self._manifest_calls.pop(key, None))
        return asyncio.shield(call)

    async def _fetch_manifest(self, upstream: Upstream, reference: str) -> StoredManifest:
        self.metrics.request("manifest", "miss")
        client = self.puller.client(upstream.registry)
        body, content_type = await self._call(client.manifest, upstream.repository, reference)
        self.metrics.upstream_manifest_bytes += len(body)
        digest = digest_of(body)
        where = f"{upstream}@{digest}"
        media_type = _media_type(body, content_type, where)
        if not self.store.has(digest, len(body)):
            await self._call(self.store.put_bytes, digest, body)
        registry, repository = upstream.registry, upstream.repository
        self.ledger.record(registry, repository, digest, len(body), media_type)
        for child in _children(body, media_type, where):
            self.ledger.record(registry, repository, child.digest, child.size)
        if check_digest(reference) is not None:
            self.ledger.record_tag(registry, repository, reference, digest)
            log.info("resolved %s:%s to %s", upstream, reference, digest)
        return StoredManifest(digest, media_type, body)

    def fetch_ahead(self, upstream: Upstream, manifest: StoredManifest) -> None:
        """Start fetching an image manifest's config and layers that the store lacks: a client
        that GETs the manifest pulls them next, often a few at a time (containerd: 3); fetched
        ahead, all of them share the link from the start and land in manifest order."""
        if not self.fetch_ahead_enabled or manifest.media_type not in MANIFEST_TYPES:
            return
        for blob in _children(manifest.body, manifest.media_type, f"{upstream}@{manifest.digest}"):
            if blob.media_type in NON_DISTRIBUTABLE or self.store.has(blob.digest, blob.size):
                continue
            if blob.digest not in self.inflight:
                self.metrics.request("blob", "ahead")
                task = asyncio.ensure_future(self._start_fetch(upstream, blob.digest, blob.size))
                self._ahead.add(task)
                task.add_done_callback(self._ahead_done)

    def _ahead_done(self, task: asyncio.Task) -> None:
        self._ahead.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("fetching ahead: %s", error)  # the client's own request will say it again

    # ---- blobs ------------------------------------------------------------------------

    async def blob(self, upstream: Upstream, digest: str) -> int | InflightBlob:
        """A descriptor of the committed blob (the caller closes it; ``fastpull gc`` cannot take the
        bytes of an open file), or the blob in flight (await its ``opened`` to read it, and call its
        ``release`` once done with that). Raises NotFound if ``upstream`` does not have it."""
        size = self.ledger.size(upstream.registry, upstream.repository, digest)
        if size is None:  # the repository must show that it has the blob before the store serves it
            client = self.puller.client(upstream.registry)
            size = await self._call(client.blob_size, upstream.repository, digest)
            if size is None:
                raise NotFound(f"blob {upstream}@{digest}")
            self.ledger.record(upstream.registry, upstream.repository, digest, size)
        if (fd := self._open_stored(digest, size)) is not None:
            self.metrics.request("blob", "hit")
            return fd
        blob = self.inflight.get(digest)
        if blob is None:
            self.metrics.request("blob", "miss")
            blob = await self._start_fetch(upstream, digest, size)
        else:
            self.metrics.request("blob", "joined")
        blob.clients += 1
        blob.holders += 1  # no await between here and the caller: the follower cannot close first
        return blob

    def _open_stored(self, digest: str, size: int) -> int | None:
        try:
            fd = os.open(self.store.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size != size:
            os.close(fd)
            return None
        return fd

    async def _start_fetch(self, upstream: Upstream, digest: str, size: int) -> InflightBlob:
        loop = asyncio.get_running_loop()
        source = RepositorySource(self.puller.client(upstream.registry), upstream.repository)
        await self._call(source.authorization)  # learn the challenge off the loop's thread
        lease = await self._call(Lease, self.store, (digest,))  # waits while a `fastpull gc` runs
        if (blob := self.inflight.get(digest)) is not None:  # another request started it meanwhile
            lease.release()
            return blob
        blob = self.inflight[digest] = InflightBlob(upstream, digest, size, loop.create_future(), lease=lease)

        def opened() -> None:  # in the loop's thread
            if not blob.opened.done():
                try:
                    blob.opened.set_result(Follower(BlobReader(self.store, digest, size), loop))
                except FastpullError as e:
                    blob.opened.set_exception(e)

        fetched = self.puller.engine.fetch(self.store, source, digest, size,
                                           on_open=lambda: loop.call_soon_threadsafe(opened))
        asyncio.wrap_future(fetched).add_done_callback(lambda f: self._fetched(blob, f))
        return blob

    def _fetched(self, blob: InflightBlob, done: asyncio.Future) -> None:
        del self.inflight[blob.digest]
        blob.lease.release()
        seconds = time.monotonic() - blob.started
        error = done.exception()
        blob.over = True
        if not blob.opened.done():
            if error is not None:
                blob.opened.set_exception(error)
        elif not blob.opened.exception():
            blob.opened.result().end(error)
        blob._close_if_unused()
        if error is not None:
            self.metrics.error(error)
            log.error("fetching %s@%s failed: %s", blob.upstream, blob.digest, error)
            return
        self.metrics.fetch_seconds.observe(seconds)
        log.info("fetched %s@%s: %.1f MB in %.2f s (%.1f MB/s), %d client(s)", blob.upstream, blob.digest,
                 blob.size / 1e6, seconds, blob.size / 1e6 / max(seconds, 1e-6), blob.clients)

    # ---- prefetch ---------------------------------------------------------------------

    async def prefetch(self, reference: str) -> None:
        """Pull ``reference`` (this node's platform) into the store, tag it there, and record
        that its repository has its blobs; unpack it into the layer cache if there is one, or
        import it into containerd instead of tagging it."""
        if self.import_into is not None:
            result = await self.import_into.ensure(reference)
        else:
            snapshots = None if self.unpack_into is None else self.unpack_into.root
            result = await self._call(functools.partial(self.puller.pull, reference, self.layout.root,
                                                        snapshots=snapshots))
        ref = result.reference
        for digest, size in _image_blobs(result):
            self.ledger.record(ref.registry, ref.repository, digest, size)
        log.info("prefetched %s (%s, %.1f MB fetched)", ref, result.descriptor.digest, result.fetched_bytes / 1e6)

    # ---- helpers ----------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args) -> T:
        """Run a blocking registry or store call on the upstream pool."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _media_type(body: bytes, content_type: str | None, where: str) -> str:
    """The media type to serve a manifest with: the upstream's if it names a manifest, else the body's."""
    if content_type in MANIFEST_TYPES or content_type in INDEX_TYPES:
        return content_type
    try:
        return parse_manifest(body, None, where).media_type
    except ManifestError:
        return content_type or "application/vnd.oci.image.manifest.v1+json"


def _children(body: bytes, media_type: str, where: str):
    """The descriptors a manifest names (an index's manifests; a manifest's config and layers);
    none for a document fastpull cannot parse (it is still served, by digest)."""
    try:
        document = parse_manifest(body, media_type, where)
    except ManifestError as e:
        log.debug("%s", e)
        return ()
    if isinstance(document, ImageIndex):
        return document.manifests
    return (document.config, *document.layers)


def _image_blobs(result) -> list[tuple[str, int]]:
    manifest = result.manifest
    return [(d.digest, d.size) for d in (result.descriptor, manifest.config, *manifest.layers)]

