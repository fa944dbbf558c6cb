"""Pulling an image: resolve the reference, fetch every blob through the engine, tag the layout."""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import functools
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastpull.content.layout import ImageLayout
from fastpull.content.leases import Lease
from fastpull.content.store import ContentStore
from fastpull.digests import check_digest
from fastpull.engine import FetchEngine, FetchOptions, FetchStats
from fastpull.errors import FastpullError, ManifestError, PlatformNotFound, RegistryError, UnpackError
from fastpull.events import Blob, Event, Failed, LayerDone, Progress, Pulled
from fastpull.events import Resolved as ResolvedEvent
from fastpull.oci.manifest import (
    DOCKER_FOREIGN_LAYER,
    OCI_LAYER_NONDIST,
    OCI_LAYER_NONDIST_GZIP,
    OCI_LAYER_NONDIST_ZSTD,
    Descriptor,
    ImageManifest,
    Platform,
)
from fastpull.oci.reference import Reference, is_short_name, parse_reference
from fastpull.registry.client import RegistryClient, Resolved
from fastpull.registry.hosts import RegistryHost, RegistryHosts
from fastpull.registry.mirrors import Breaker, MirroredRegistry
from fastpull.unpack.rootfs import assemble, inherit_implied, remove_tree
from fastpull.unpack.snapshots import Snapshotter, SnapshotWriter, chain_ids

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # unpacking pulls in the tar applier and decompressors: imported when used
    from fastpull.unpack.workers import LayerJob, Unpacker, UnpackProgress


MIRROR_ATTEMPTS = 2
"""Tries of one blob request at a mirror before the blob moves to the next endpoint."""


class RepositorySource:
    """The fetch engine's view of one repository at one endpoint (a mirror or the registry): blob
    URLs, Authorization values, how its host is reached; :meth:`fallback` names the next endpoint."""

    def __init__(self, client: RegistryClient | MirroredRegistry, repository: str):
        if isinstance(client, MirroredRegistry):
            self._registry: MirroredRegistry | None = client
            self._chain = tuple(client.endpoints(repository))
        else:
            self._registry, self._chain = None, ((client, repository),)
        self._at(self._usable(0) or 0)

    def _at(self, position: int) -> RepositorySource:
        self._position = position
        self.client, self.repository = self._chain[position]
        self.origin = self.client.origin
        self.attempts = MIRROR_ATTEMPTS if position < len(self._chain) - 1 else None
        return self

    def blob_url(self, digest: str) -> str:
        return self.client.blob_url(self.repository, digest)

    def authorization(self) -> str | None:
        return self.client.authorization(self.repository)

    def reauthorize(self, challenge: str, failed: str | None) -> str | None:
        return self.client.reauthorize(self.repository, challenge, failed)

    def fallback(self, digest: str, error: FastpullError | None) -> RepositorySource | None:
        """The next endpoint whose breaker has not tripped (the last one always counts); with no
        ``error``, this one if its breaker has not tripped."""
        if self._registry is None:
            return None
        if error is not None:
            self._registry.breaker.failed(self.client.host, error)
        position = self._usable(self._position + (error is not None))
        return None if position is None or position == self._position else copy.copy(self)._at(position)

    def _usable(self, start: int) -> int | None:
        """The first endpoint from ``start`` on whose breaker has not tripped (the last one always counts)."""
        last = len(self._chain) - 1
        for position in range(start, last + 1):
            if position == last or not self._registry.breaker.tripped(self._chain[position][0].host):
                return position
        return None


_PROGRESS_INTERVAL_S = 0.5
"""How often ``Puller.pull`` reports progress: as often as the engine counts running transfers."""
_RATE_WINDOW = 5
"""Progress reports over which the download rate is measured (2 s)."""

NON_DISTRIBUTABLE = frozenset({OCI_LAYER_NONDIST, OCI_LAYER_NONDIST_GZIP, OCI_LAYER_NONDIST_ZSTD, DOCKER_FOREIGN_LAYER})


@dataclass(frozen=True)
class PullResult:
    """What a pull resolved and stored."""

    reference: Reference
    descriptor: Descriptor
    """The platform manifest, as tagged in the layout's index.json."""
    manifest: ImageManifest
    layout: Path
    total_bytes: int
    """Size of every blob of the image (config, layers, manifest documents)."""
    fetched_bytes: int
    """Bytes of the blobs this pull downloaded (a resumed blob counts whole); not those that were
    already in the layout, that another process committed while this pull waited, or that a
    concurrent pull over the same engine was already fetching."""
    seconds: float
    """From start to finish, resolving the reference included."""
    rootfs: Path | None = None
    snapshots: tuple[Path, ...] = ()
    """Snapshot directories by layer, base first (overlayfs lower dirs)."""
    unpacked_layers: int = 0
    """Layers this pull unpacked (snapshots that already existed are not counted)."""
    download_seconds: float = 0.0
    """From the first blob request until every blob was committed."""
    unpack_seconds: float = 0.0
    """From the first layer handed to an unpack worker until the rootfs or snapshots were in place
    (layers unpack as they download, so this overlaps ``download_seconds``)."""

    @property
    def throughput(self) -> float:
        """Bytes per second of the download: the fetched bytes over ``download_seconds``."""
        return self.fetched_bytes / self.download_seconds if self.download_seconds > 0 else 0.0


@dataclass(eq=False)
class _LayerUnpack:
    """One layer's unpack: where it goes, and the worker's future once its bytes can be read."""

    job: LayerJob
    snapshot: SnapshotWriter | None = None
    future: Future | None = None


class Puller:
    """Pulls many images in one process over one fetch engine; safe to use from many threads.

    One :class:`RegistryClient` per registry host (and per mirror) keeps tokens and connections warm;
    each registry is reached through the endpoints that ``hosts`` configures (mirrors first;
    default: the node's files, :meth:`RegistryHosts.load`, read at the first pull); unpacking
    (``rootfs=`` or ``snapshots=``) runs in a pool of worker processes started on first use. A pull
    interrupted while layers unpack (KeyboardInterrupt, or the CLI's SIGTERM) kills that pool, so
    that its temporary trees can be removed; the next pull starts a new one.
    """

    def __init__(
        self,
        options: FetchOptions | None = None,
        *,
        insecure_registries: Iterable[str] = (),
        platform: Platform | None = None,
        durable: bool = False,
        unpack_workers: int | None = None,
        clients: Iterable[RegistryClient] = (),
        hosts: RegistryHosts | None = None,
    ):
        """``clients`` are registry clients configured by the caller (credentials, TLS on a
        loopback host...), used as they are, without mirrors; other registries get clients on first use."""
        self.engine = FetchEngine(options)
        self.platform = platform or Platform.host()
        self._platform_given = platform is not None
        self.insecure_registries = frozenset(insecure_registries)
        self.durable = durable
        self.unpack_workers = unpack_workers
        self._unpacker: Unpacker | None = None
        self._clients: dict[str, RegistryClient | MirroredRegistry] = {c.host: c for c in clients}
        self._servers: dict[tuple[RegistryHost, bool], RegistryClient] = {}
        self._hosts = hosts
        self.breaker = Breaker()
        """Mirrors that failed lately, skipped by every pull of this Puller."""
        self._lock = threading.Lock()

    @property
    def hosts(self) -> RegistryHosts:
        """Where each registry is reached: mirrors, certificates (raises ConfigError on a bad file)."""
        with self._lock:
            if self._hosts is None:
                self._hosts = RegistryHosts.load(insecure=self.insecure_registries)
            return self._hosts

    def client(self, registry: str) -> RegistryClient | MirroredRegistry:
        """The client of ``registry``: its configured endpoints, or the caller's client."""
        hosts = self.hosts
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                client = self._clients[registry] = MirroredRegistry(registry, hosts, self._server, self.breaker)
            return client

    def _server(self, server: RegistryHost, last: bool) -> RegistryClient:
        """The client of one endpoint's server (one try per request unless it is the ``last`` endpoint)."""
        with self._lock:
            client = self._servers.get((server, last))
            if client is None:
                insecure = True if server.host in self.insecure_registries else None
                client = self._servers[server, last] = RegistryClient(server.host, insecure=insecure, server=server,
                                                                      attempts=None if last else 1)
            return client

    def _resolve(self, ref: str | Reference, platform: Platform
                 ) -> tuple[Reference, RegistryClient | MirroredRegistry, Resolved]:
        search = self.hosts.search_registries if isinstance(ref, str) and is_short_name(ref) else None
        if isinstance(ref, Reference):
            candidates = [ref]
        else:
            candidates = [parse_reference(ref, registry) for registry in search] if search else [parse_reference(ref)]
        for candidate in candidates[:-1]:
            client = self.client(candidate.registry)
            try:
                return candidate, client, client.resolve(candidate, platform)
            except RegistryError as e:
                if e.status not in (401, 403, 404):  # not "no such image here" (Docker Hub says 401)
                    raise
                log.info("%s: %s; trying the next search registry", candidate, e)
        client = self.client(candidates[-1].registry)
        return candidates[-1], client, client.resolve(candidates[-1], platform)

    def unpacker(self) -> Unpacker:
        from fastpull.unpack.workers import Unpacker

        with self._lock:
            if self._unpacker is None:
                self._unpacker = Unpacker(self.unpack_workers)
            return self._unpacker

    def _stop_unpacker(self, unpacker: Unpacker) -> None:
        with self._lock:
            if self._unpacker is unpacker:
                self._unpacker = None
        unpacker.terminate()

    def pull(
        self,
        ref: str | Reference,
        layout: str | os.PathLike[str],
        *,
        platform: Platform | None = None,
        rootfs: str | os.PathLike[str] | None = None,
        snapshots: str | os.PathLike[str] | None = None,
        events: Callable[[Event], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> PullResult:
        """Pull ``ref`` into the OCI layout at ``layout`` and tag it there by its full name. A short
        name (no registry) is looked up in the configuration's ``unqualified-search-registries`` in
        order, if it names any, else on Docker Hub.

        With ``rootfs``, also unpack the image into that (absent or empty) directory; with
        ``snapshots``, into one directory per layer keyed by ChainID under that root. Layers
        unpack while they download; nothing is made visible before its digests are checked.

        An image that is not an index names its platform in its config only: if that is not the
        ``platform`` asked for (here or to the Puller), the pull fails with PlatformNotFound; if
        none was asked for and it is not this host's, a warning is logged.

        ``events(event)`` is called in this thread with what happens (:mod:`fastpull.events`):
        ``Resolved``, ``Progress`` about twice a second, ``LayerDone`` per layer, and last ``Pulled``
        or, before a FastpullError is raised, ``Failed``. ``progress(done, total)`` gets each
        ``Progress``'s download bytes: ``total`` is the bytes of the blobs missing from the layout,
        ``done`` the bytes the engine received since (all of the engine's pulls count).
        """
        if rootfs is not None and snapshots is not None:
            raise ValueError("give rootfs or snapshots, not both")
        follow = _Follow(self.engine, _emitter(events, progress))
        try:
            result = self._pull(ref, layout, platform, rootfs, snapshots, follow)
        except FastpullError as exc:
            follow.emit(Failed.of(exc, str(ref), follow.failed))
            raise
        follow.emit(Pulled(
            reference=str(result.reference), digest=result.descriptor.digest, layers=len(result.manifest.layers),
            bytes=result.total_bytes, fetched=result.fetched_bytes, seconds=round(result.seconds, 3),
            download_seconds=round(result.download_seconds, 3), unpack_seconds=round(result.unpack_seconds, 3),
            layout=str(result.layout), rootfs=None if result.rootfs is None else str(result.rootfs),
            snapshots=tuple(str(p) for p in result.snapshots)))
        return result

    def _pull(self, ref, layout, platform, rootfs, snapshots, follow: _Follow) -> PullResult:
        started = time.monotonic()
        wanted = platform or self.platform
        reference, client, resolved = self._resolve(ref, wanted)
        platform_given = platform is not None or self._platform_given
        image_layout = ImageLayout(layout, durable=self.durable)
        store = image_layout.store
        source = RepositorySource(client, reference.repository)
        try:
            source.authorization()  # learn the auth challenge once, before the loop needs it
        except FastpullError as e:
            log.debug("%s: %s (the fetch moves on to the next endpoint)", source.client.host, e)

        manifest = resolved.manifest
        layers = [d for d in manifest.layers if d.media_type not in NON_DISTRIBUTABLE]
        blobs = [manifest.config, *layers]
        # `fastpull gc` keeps what the lease names until the image is tagged: taken before the store is looked at.
        lease = Lease(store, [d.digest for d, _ in resolved.documents] + [d.digest for d in blobs])
        unpacks: list[_LayerUnpack | None] = [None] * len(layers)  # by position in ``layers``
        work: _WorkDir | None = None
        snapshot_paths: tuple[Path, ...] = ()
        unpacker: Unpacker | None = None
        futures: list[Future] = []
        try:
            missing = [d for d in blobs if not store.has(d.digest, d.size)]
            follow.resolved(resolved, layers, missing, source.blob_url(manifest.config.digest))
            for desc, body in resolved.documents:
                if not store.has(desc.digest, desc.size):
                    follow.downloaded[desc.digest] = desc.size
                    store.put_bytes(desc.digest, body)
            if rootfs is not None or snapshots is not None:
                config_path = self.engine.fetch(store, source, manifest.config.digest, manifest.config.size,
                                                on_downloaded=follow.on_downloaded(manifest.config)).result()
                _check_config_platform(config_path, resolved, wanted, platform_given)
                diff_ids = [i for d, i in zip(manifest.layers, _diff_ids(config_path, manifest))
                            if d.media_type not in NON_DISTRIBUTABLE]
                if rootfs is not None:
                    work = _WorkDir(Path(rootfs))
                    lease.add(trees=[work.path])  # removed by `fastpull gc` if this process dies
                    unpacks = _rootfs_plan(store, layers, diff_ids, work.path)
                else:
                    snapshotter = Snapshotter(snapshots)
                    chains = chain_ids(diff_ids)
                    unpacks = _snapshot_plan(store, layers, diff_ids, chains, snapshotter)
                    snapshot_paths = tuple(snapshotter.path(c) for c in chains)
            if any(unpacks):
                unpacker = self.unpacker()
                follow.unpacking(unpacks)

            def fetch(desc: Descriptor, unpack: _LayerUnpack | None) -> Future:
                def on_open() -> None:  # in the engine's thread, as soon as the layer can be read
                    follow.unpack_started = follow.unpack_started or time.monotonic()
                    unpack.future = unpacker.submit(unpack.job)
                return self.engine.fetch(store, source, desc.digest, desc.size,
                                         on_open=on_open if unpack is not None else None,
                                         on_downloaded=follow.on_downloaded(desc))

            futures = [fetch(manifest.config, None)] + [fetch(d, u) for d, u in zip(layers, unpacks)]
            if rootfs is None and snapshots is None:
                wait(futures[:1])  # the config is small and first: refuse the wrong platform early
                if futures[0].exception() is None:
                    _check_config_platform(futures[0].result(), resolved, wanted, platform_given)
            follow.settle(blobs, futures, unpacks)
            layer_results = [u.future.result() for u in unpacks if u is not None]
            if skipped := sum(r.devices_skipped for r in layer_results):
                log.warning("%d device node(s) of %s not created: that needs CAP_MKNOD", skipped, reference)
            if snapshots is not None:
                _commit_snapshots(unpacks, snapshot_paths)
            if work is not None:
                layers_done = [(Path(u.job.target), u.future.result().implied_dirs) for u in unpacks]
                _assemble_rootfs(work.path, layers_done, Path(rootfs))
            image_layout.tag(str(reference), resolved.manifest_descriptor)
        except BaseException:
            # Interrupted (or an events callback raised) while layers may still unpack, or be
            # handed to a worker as they open: stop the workers before their targets go.
            running = not all(f.done() for f in futures) or any(
                u is not None and u.future is not None and not u.future.done() for u in unpacks)
            if unpacker is not None and running:
                self._stop_unpacker(unpacker)
            for u in unpacks:
                if u is not None and u.snapshot is not None:
                    u.snapshot.abort()
            raise
        finally:
            follow.close()
            if work is not None:
                work.remove()
            lease.release()
        finished = time.monotonic()
        total = sum(d.size for d in blobs) + sum(d.size for d, _ in resolved.documents)
        result = PullResult(
            reference=reference,
            descriptor=resolved.manifest_descriptor,
            manifest=manifest,
            layout=image_layout.root,
            total_bytes=total,
            fetched_bytes=sum(follow.downloaded.values()),
            seconds=finished - started,
            rootfs=Path(rootfs) if rootfs is not None else None,
            snapshots=snapshot_paths,
            unpacked_layers=sum(u is not None for u in unpacks),
            download_seconds=follow.download_seconds or 0.0,
            unpack_seconds=finished - follow.unpack_started if follow.unpack_started is not None else 0.0,
        )
        follow.pulled(result, self.engine.stats)
        return result

    def close(self) -> None:
        self.engine.close()
        if self._unpacker is not None:
            self._unpacker.close()

    def __enter__(self) -> Puller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _emitter(events: Callable[[Event], None] | None,
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


class _Follow:
    """One pull's account, kept in the pull's thread: what it downloaded and when, and the events
    that tell it (each layer fetched and unpacked, in order; progress twice a second)."""

    def __init__(self, engine: FetchEngine, emit: Callable[[Event], None] | None):
        self._engine = engine
        self._emit = emit
        self.downloaded: dict[str, int] = {}
        """Sizes of the blobs this pull's requests downloaded, by digest (set from the engine's thread)."""
        self.failed: str | None = None
        """The blob whose fetch or unpack failed the pull."""
        self.download_seconds: float | None = None
        """Set once every blob is committed."""
        self.unpack_started: float | None = None
        """When the first layer went to an unpack worker (set from the engine's thread)."""
        self._unpack_progress: UnpackProgress | None = None
        self._stats = dataclasses.replace(engine.stats)
        self._started = time.monotonic()
        self._received_before = self._received()
        self._missing = 0
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=_RATE_WINDOW)

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

    def unpacking(self, unpacks: list[_LayerUnpack | None]) -> None:
        """Give each layer to unpack a slot where its worker counts the bytes it read (if anyone listens)."""
        if self._emit is None:
            return
        from fastpull.unpack.workers import UnpackProgress

        self._unpack_progress = UnpackProgress(len(unpacks))
        for i, u in enumerate(unpacks):
            if u is not None:
                u.job = dataclasses.replace(u.job, progress=(self._unpack_progress.path, i))

    def settle(self, blobs: list[Descriptor], fetches: list[Future], unpacks: list[_LayerUnpack | None]) -> None:
        """Wait until every fetch (config, then layers) and unpack has settled, telling what happens;
        then raise the first failure, if any."""
        said: list[str | None] = [None] * len(unpacks)
        next_tick = time.monotonic() + _PROGRESS_INTERVAL_S
        while True:
            if self._emit is not None:
                self._tell_layers(blobs[1:], fetches[1:], unpacks, said)
            unpacking = [u.future for u in unpacks if u is not None and u.future is not None]
            if self.download_seconds is None and all(f.done() for f in fetches):
                self.download_seconds = time.monotonic() - self._started
            pending = [f for f in fetches + unpacking if not f.done()]
            if not pending:
                break
            if self._emit is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _PROGRESS_INTERVAL_S
                self._tell_progress(blobs[1:], unpacks)
            timeout = None if self._emit is None else max(0.0, next_tick - time.monotonic())
            wait(pending, timeout, return_when=FIRST_COMPLETED)
        for desc, future in [*zip(blobs, fetches), *((u.job.digest, u.future) for u in unpacks if u is not None)]:
            if future.exception() is not None:
                self.failed = desc if isinstance(desc, str) else desc.digest
                raise future.exception()
        self._tell_progress(blobs[1:], unpacks, final=True)

    def _tell_layers(self, layers: list[Descriptor], fetches: list[Future], unpacks: list[_LayerUnpack | None],
                     said: list[str | None]) -> None:
        for i, (desc, fetch, unpack) in enumerate(zip(layers, fetches, unpacks)):
            if said[i] is None and fetch.done() and fetch.exception() is None:
                said[i] = "fetched" if desc.digest in self.downloaded else "present"
                self.emit(LayerDone(desc.digest, said[i]))
            if said[i] not in (None, "unpacked") and unpack is not None and unpack.future is not None \
                    and unpack.future.done() and unpack.future.exception() is None:
                said[i] = "unpacked"
                self.emit(LayerDone(desc.digest, said[i]))

    def _tell_progress(self, layers: list[Descriptor], unpacks: list[_LayerUnpack | None], final=False) -> None:
        """``final``: every blob is in (some may have been committed by another process meanwhile)."""
        now = time.monotonic()
        done = self._missing if final else min(self._received() - self._received_before, self._missing)
        self._rate_window.append((now, done))
        then, before = self._rate_window[0]
        unpacked = unpack_total = 0
        for i, (desc, unpack) in enumerate(zip(layers, unpacks)):
            if unpack is None:
                continue
            unpack_total += desc.size
            if final or unpack.future is not None and unpack.future.done():
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


def _diff_ids(config_path: Path, manifest: ImageManifest) -> list[str]:
    """The config's ``rootfs.diff_ids``, one per layer of the manifest."""
    where = f"image config {manifest.config.digest}"
    try:
        diff_ids = json.loads(config_path.read_bytes())["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(where, f"no rootfs.diff_ids: {e}") from e
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
        raise ManifestError(where, f"{len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
    for d in diff_ids:
        if not isinstance(d, str) or check_digest(d):
            raise ManifestError(where, f"bad diff_id {d!r}")
    return diff_ids


def _job(store: ContentStore, layer: Descriptor, diff_id: str, target: Path, whiteouts="overlay") -> LayerJob:
    from fastpull.unpack.workers import LayerJob

    return LayerJob(str(store.root), layer.digest, layer.size, layer.media_type, diff_id, str(target), whiteouts)


class _WorkDir:
    """Where a rootfs is built, beside it: ``.<name>.fastpull-<random>``, locked (flock) while in use.

    A pull killed outright leaves its work directory behind, unlocked: the next pull into the same
    rootfs removes it.
    """

    def __init__(self, rootfs: Path):
        try:
            if rootfs.exists() and (not rootfs.is_dir() or any(rootfs.iterdir())):
                raise UnpackError(str(rootfs), "it exists and is not an empty directory")
            rootfs.parent.mkdir(parents=True, exist_ok=True)
            prefix = f".{rootfs.name}.fastpull-"
            for entry in os.scandir(rootfs.parent):
                if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                    _remove_if_abandoned(Path(entry.path))
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=rootfs.parent))
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            why = e.strerror or str(e)
            if e.filename is not None and os.fspath(e.filename) != os.fspath(rootfs):
                why = f"{os.fspath(e.filename)}: {why}"
            raise UnpackError(str(rootfs), why) from e
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def remove(self) -> None:
        remove_tree(self.path, ignore_errors=True)
        os.close(self._fd)


def _remove_if_abandoned(work: Path) -> None:
    """Remove another pull's work directory if no process holds its lock any more."""
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # a pull is building there
    else:
        remove_tree(work, ignore_errors=True)
    finally:
        os.close(fd)


def _check_config_platform(config_path: Path, resolved: Resolved, wanted: Platform, given: bool) -> None:
    """Refuse (``given``) or warn about a single-platform image (no index: its platform is in its
    config) that ``wanted`` cannot run, as containerd does."""
    if len(resolved.documents) > 1:
        return  # an index chose the manifest by platform
    try:
        config = json.loads(config_path.read_bytes())
        actual = Platform.from_dict(config, f"image config {resolved.manifest.config.digest}").normalized()
    except (ValueError, ManifestError):
        return  # no usable os and architecture: nothing to compare (the unpack reads what it needs)
    if wanted.can_run(actual):
        return
    if given:
        raise PlatformNotFound(f"{resolved.reference} (a single-platform image)", str(wanted), [str(actual)])
    log.warning("%s is an image for %s, not for this host (%s)", resolved.reference, actual, wanted)


def _rootfs_plan(store, layers, diff_ids, work: Path) -> list[_LayerUnpack | None]:
    plan: list[_LayerUnpack | None] = []
    for i, (layer, diff_id) in enumerate(zip(layers, diff_ids)):
        target = work / f"layer-{i}"
        target.mkdir()
        plan.append(_LayerUnpack(_job(store, layer, diff_id, target, "keep")))  # assemble() applies the whiteouts
    return plan


def _snapshot_plan(store, layers, diff_ids, chains, snapshotter: Snapshotter) -> list[_LayerUnpack | None]:
    plan: list[_LayerUnpack | None] = []
    try:
        for layer, diff_id, chain_id in zip(layers, diff_ids, chains):
            # Blocks while another process unpacks this ChainID (layers are locked in order, so
            # two pulls cannot wait on each other); None once it exists.
            writer = snapshotter.prepare(chain_id, block=True)
            plan.append(None if writer is None else _LayerUnpack(_job(store, layer, diff_id, writer.path), writer))
    except BaseException:
        for unpack in plan:
            if unpack is not None:
                unpack.snapshot.abort()
        raise
    return plan


def _commit_snapshots(unpacks: list[_LayerUnpack | None], committed: tuple[Path, ...]) -> None:
    """Fix up implied directories from the layers below, then make each snapshot visible."""
    for i, unpack in enumerate(unpacks):
        if unpack is None:
            continue
        lowers = [Path(u.job.target) if u is not None else committed[j] for j, u in enumerate(unpacks[:i])]
        inherit_implied(Path(unpack.job.target), unpack.future.result().implied_dirs, lowers[::-1])
    for unpack in unpacks:
        if unpack is not None:
            unpack.snapshot.commit()


def _assemble_rootfs(work: Path, layers: list[tuple[Path, frozenset[str]]], rootfs: Path) -> None:
    root = work / "root"
    root.mkdir()
    assemble(layers, root)
    if rootfs.exists():
        rootfs.rmdir()
    os.rename(root, rootfs)


def pull(
    ref: str | Reference,
    layout: str | os.PathLike[str],
    *,
    platform: Platform | None = None,
    options: FetchOptions | None = None,
    insecure_registries: Iterable[str] = (),
    rootfs: str | os.PathLike[str] | None = None,
    snapshots: str | os.PathLike[str] | None = None,
    unpack_workers: int | None = None,
    events: Callable[[Event], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PullResult:
    """Pull one image into an OCI layout directory (and unpack it); see :class:`Puller` for many pulls."""
    with Puller(options, insecure_registries=insecure_registries, platform=platform,
                unpack_workers=unpack_workers) as puller:
        return puller.pull(ref, layout, rootfs=rootfs, snapshots=snapshots, events=events, progress=progress)
