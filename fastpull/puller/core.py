"""``Puller``: registry clients kept warm, references resolved, and the pull itself: the blobs
fetched through the engine, the layers unpacked as they land, the layout tagged."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from fastpull.content.layout import ImageLayout
from fastpull.content.leases import Lease
from fastpull.engine import FetchEngine, FetchOptions
from fastpull.errors import FastpullError, ManifestError, RegistryError
from fastpull.events import Event, Failed, Pulled
from fastpull.oci.manifest import Descriptor, Platform
from fastpull.oci.reference import Reference, is_short_name, parse_reference
from fastpull.puller.follow import Follow, emitter
from fastpull.puller.image import check_platform
from fastpull.puller.result import PullResult
from fastpull.puller.source import RepositorySource
from fastpull.puller.unpacks import Openers, Unpacks
from fastpull.registry.auth import CredentialsProvider
from fastpull.registry.client import RegistryClient, Resolved
from fastpull.registry.hosts import RegistryHost, RegistryHosts
from fastpull.registry.mirrors import Breaker, MirroredRegistry

log = logging.getLogger("fastpull.puller")  # one logger for the pull and its parts

MAX_LAYERS = 500
"""Most layers an image may have: overlayfs stacks at most 500 lower directories (the kernel's
``OVL_MAX_STACK``), so no runtime that mounts images with it (containerd, CRI-O, Podman, Docker) could
run one with more. Such an image is refused before any blob is fetched."""

if TYPE_CHECKING:  # unpacking pulls in the tar applier, decompressors and tree tools: imported when used
    from fastpull.unpack.snapshots import Snapshotter
    from fastpull.unpack.workers import Unpacker


class Puller:
    """Pulls many images in one process over one fetch engine; safe to use from many threads.

    One :class:`RegistryClient` per registry host (and per mirror) keeps tokens and connections warm;
    each registry is reached through the endpoints that ``hosts`` configures (mirrors first;
    default: the node's files, :meth:`RegistryHosts.load`, read at the first pull); unpacking
    (``rootfs=`` or ``snapshots=``) runs in a pool of worker processes started on first use. A pull
    interrupted while layers unpack (KeyboardInterrupt, or :meth:`stop`) kills that pool, so that its
    temporary trees can be removed; the next pull starts a new one.
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
        credentials: CredentialsProvider | None = None,
    ):
        """``clients`` are registry clients configured by the caller (credentials, TLS on a
        loopback host...), used as they are, without mirrors; other registries get clients on first use,
        asking ``credentials`` before the node's auth files."""
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
        self._credentials = credentials
        self.breaker = Breaker()
        """Mirrors that failed lately, skipped by every pull of this Puller."""
        self._lock = threading.Lock()
        self._pulls: set[Follow] = set()
        """The pulls in flight (not under the lock: :meth:`stop` may run in a signal handler)."""

    def stop(self) -> None:
        """Stop the pulls in flight: each raises :class:`~fastpull.puller.follow.Stopped` (a
        KeyboardInterrupt) from its next wait for its work, at once if it waits, its fetches and unpack
        workers stopped and its temporary trees removed; one still resolving its image stops once it
        has. Safe from a signal handler or any thread: it sets a flag and wakes the pulls, nothing more."""
        for follow in list(self._pulls):
            follow.stop()

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
                client = self._servers[server, last] = RegistryClient(
                    server.host, insecure=insecure, server=server, attempts=None if last else 1,
                    credentials_provider=self._credentials)
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
        snapshots: str | os.PathLike[str] | Snapshotter | None = None,
        events: Callable[[Event], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        tag: bool = True,
    ) -> PullResult:
        """Pull ``ref`` into the OCI layout at ``layout`` and tag it there by its full name. A short
        name (no registry) is looked up in the configuration's ``unqualified-search-registries`` in
        order, if it names any, else on Docker Hub. The pull raises its first failure for good, its
        other fetches stopped at once; an image of more than MAX_LAYERS layers is refused
        (ManifestError) before any blob is fetched.

        With ``tag=False`` the layout is not tagged (the image's blobs are then kept only while the
        pull runs, for another owner of the image: containerd, for the snapshotter), and a layer
        whose snapshot is already there is not fetched.

        With ``rootfs``, also unpack the image into that (absent or empty) directory; with
        ``snapshots``, into one directory per layer keyed by ChainID under that root (or into that
        :class:`Snapshotter`, which may say it has layers it keeps elsewhere). Layers
        unpack while they download; nothing is made visible before its digests are checked. A
        snapshot is committed as soon as it and the layers under it are unpacked, and stays
        committed if the pull fails later; one that another pull (thread or process) is unpacking
        is waited for, not unpacked twice, while the rest of this pull goes on.

        An image that is not an index names its platform in its config only: if that is not the
        ``platform`` asked for (here or to the Puller), the pull fails with PlatformNotFound; if
        none was asked for and it is not this host's, a warning is logged.

        ``events(event)`` is called in this thread with what happens (:mod:`fastpull.events`):
        ``Resolved``, ``Progress`` about twice a second, ``LayerDone`` per layer, and last ``Pulled``
        or, before a FastpullError is raised, ``Failed``. With ``snapshots``, a layer's
        ``LayerDone(digest, "unpacked")`` comes once its snapshot is committed (by this pull or
        another, or already there), base first: several pulls of one image, each told of every layer
        as soon as it is in place, can serve waiters of single layers. ``progress(done, total)``
        gets each ``Progress``'s download bytes: ``total`` is the bytes of the blobs missing from the
        layout, ``done`` the bytes the engine received since (all of the engine's pulls count).
        """
        if rootfs is not None and snapshots is not None:
            raise ValueError("give rootfs or snapshots, not both")
        follow = Follow(self.engine, emitter(events, progress))
        self._pulls.add(follow)
        try:
            result = self._pull(ref, layout, platform, rootfs, snapshots, follow, tag)
        except FastpullError as exc:
            follow.emit(Failed.of(exc, str(ref), follow.failed))
            raise
        finally:
            self._pulls.discard(follow)
        follow.emit(Pulled(
            reference=str(result.reference), digest=result.descriptor.digest, layers=len(result.manifest.layers),
            bytes=result.total_bytes, fetched=result.fetched_bytes, seconds=round(result.seconds, 3),
            download_seconds=round(result.download_seconds, 3), unpack_seconds=round(result.unpack_seconds, 3),
            layout=str(result.layout), rootfs=None if result.rootfs is None else str(result.rootfs),
            snapshots=tuple(str(p) for p in result.snapshots)))
        return result

    def _pull(self, ref, layout, platform, rootfs, snapshots, follow: Follow, tag: bool) -> PullResult:
        started = time.monotonic()
        wanted = platform or self.platform
        reference, client, resolved = self._resolve(ref, wanted)
        if len(resolved.manifest.layers) > MAX_LAYERS:
            raise ManifestError(str(reference), f"{len(resolved.manifest.layers)} layers, more than the "
                                                f"{MAX_LAYERS} overlayfs can stack")
        platform_given = platform is not None or self._platform_given
        image_layout = ImageLayout(layout, durable=self.durable)
        store = image_layout.store
        source = RepositorySource(client, reference.repository)
        try:
            source.authorization()  # learn the auth challenge once, before the loop needs it
        except FastpullError as e:
            log.debug("%s: %s (the fetch moves on to the next endpoint)", source.client.host, e)

        manifest = resolved.manifest
        layers = manifest.fetched_layers()
        blobs = [manifest.config, *layers]
        # `fastpull gc` keeps what the lease names until the image is tagged: taken before the store is looked at.
        lease = Lease(store, [d.digest for d, _ in resolved.documents] + [d.digest for d in blobs])
        unpacks = Unpacks(layers)
        futures: list[Future] = []

        def fetch(desc: Descriptor, on_open: Callable[[], None] | None = None) -> Future:
            return self.engine.fetch(store, source, desc.digest, desc.size, on_open=on_open,
                                     on_downloaded=follow.on_downloaded(desc), group=follow.group)

        try:
            missing = [d for d in blobs if not store.has(d.digest, d.size)]
            follow.resolved(resolved, layers, missing, source.blob_url(manifest.config.digest))
            for desc, body in resolved.documents:
                if not store.has(desc.digest, desc.size):
                    follow.downloaded[desc.digest] = desc.size
                    store.put_bytes(desc.digest, body)
            # A pull that tags its image fetches every layer: ask for them with the config (whose
            # diffIDs say how they unpack), and start the unpack workers meanwhile.
            openers = Openers() if tag and (rootfs is not None or snapshots is not None) else None
            if openers is not None:
                futures = [fetch(manifest.config)] + [fetch(d, openers.on_open(i)) for i, d in enumerate(layers)]
                self.unpacker()
            if rootfs is not None or snapshots is not None:
                config_path = follow.result(futures[0] if futures else fetch(manifest.config))
                check_platform(config_path, resolved, wanted, platform_given)
                diff_ids = manifest.diff_ids(config_path.read_bytes())
                if rootfs is not None:
                    from fastpull.puller.rootfs import RootfsUnpacks

                    unpacks = RootfsUnpacks(store, layers, diff_ids, Path(rootfs), lease)
                else:
                    from fastpull.puller.snapshots import SnapshotUnpacks
                    from fastpull.unpack.snapshots import Snapshotter

                    unpacks = SnapshotUnpacks(store, layers, diff_ids, snapshots if isinstance(snapshots, Snapshotter)
                                               else Snapshotter(snapshots))
            if unpacks.unpacking:
                unpacks.unpacker = self.unpacker()
                follow.unpacking(unpacks)
            if openers is not None:
                openers.ready(unpacks)
            else:
                futures = [fetch(manifest.config)] + [fetch(d, unpacks.on_open(i)) if tag or unpacks.needs_blob(i)
                                                      else _done() for i, d in enumerate(layers)]
            # The config is small and first: refuse the wrong platform early.
            if rootfs is None and snapshots is None and follow.settled(futures[0]).exception() is None:
                check_platform(futures[0].result(), resolved, wanted, platform_given)
            follow.settle(blobs, futures, unpacks)
            if skipped := sum(r.devices_skipped for r in unpacks.results()):
                log.warning("%d device node(s) of %s not created: that needs CAP_MKNOD", skipped, reference)
            unpacks.finish()
            if tag:
                image_layout.tag(str(reference), resolved.manifest_descriptor)
        except BaseException:
            # Stopped (or an events callback raised) while layers may still download, unpack, or be
            # handed to a worker as they open: stop the fetches, and the workers before their targets go.
            self.engine.cancel(follow.group)
            running = not all(f.done() for f in futures) or unpacks.running()
            if unpacks.unpacker is not None and running:
                self._stop_unpacker(unpacks.unpacker)
            unpacks.abort()
            raise
        finally:
            follow.close()
            unpacks.close()
            lease.release()
        finished = time.monotonic()
        total = sum(d.size for d in blobs) + sum(d.size for d, _ in resolved.documents)
        result = PullResult(
            reference=reference,
            descriptor=resolved.manifest_descriptor,
            documents=resolved.documents,
            manifest=manifest,
            layout=image_layout.root,
            total_bytes=total,
            fetched_bytes=sum(follow.downloaded.values()),
            seconds=finished - started,
            rootfs=Path(rootfs) if rootfs is not None else None,
            snapshots=unpacks.snapshots,
            unpacked_layers=unpacks.unpacked_layers,
            download_seconds=follow.download_seconds or 0.0,
            unpack_seconds=finished - unpacks.started if unpacks.started is not None else 0.0,
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


def _done() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future


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
