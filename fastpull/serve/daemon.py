"""Running the mirror: listen, prefetch, stop cleanly.

In the foreground, as systemd expects: one log line per event on stderr, no forking, ``SIGTERM``
or ``SIGINT`` stop it (no new connections; answers in progress get a few seconds; blobs still
downloading stay in the store as resumable ingests), ``GET /_fastpull/v1/status`` shows it is up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from fastpull.containerd.client import CRI_NAMESPACE
from fastpull.content.defaults import LAYER_CACHE, SNAPSHOTTER_STATE
from fastpull.engine import FetchOptions
from fastpull.errors import FastpullError, StoreError
from fastpull.puller import Puller
from fastpull.registry.hosts import RegistryHosts
from fastpull.serve import DEFAULT_CRI_UPSTREAM, DEFAULT_LISTEN, DEFAULT_TAG_TTL
from fastpull.serve.api import CONTAINERD_IMPORTS, IMAGE_LAYERS, make_app, start_prefetch
from fastpull.serve.criproxy import CriProxy, PullCredentials
from fastpull.serve.imports import ContainerdImports
from fastpull.serve.layers import ImageLayers
from fastpull.serve.metrics import Metrics
from fastpull.serve.mirror import Mirror
from fastpull.snapshotter.overlay import OverlaySnapshotter
from fastpull.snapshotter.service import SnapshotsService, start_server
from fastpull.unpack.snapshots import Snapshotter as LayerCache

log = logging.getLogger(__name__)

PREFETCH_CHECK_SECONDS = 2.0
"""How often the prefetch file is looked at (a stat) for a change."""
SHUTDOWN_SECONDS = 5.0
"""How long answers in progress may go on after a stop signal."""


@dataclass
class ServeOptions:
    store: Path
    host: str = DEFAULT_LISTEN[0]
    port: int = DEFAULT_LISTEN[1]
    upstream: str = "docker.io"
    insecure_registries: tuple[str, ...] = ()
    prefetch: Path | None = None
    tag_ttl: float = DEFAULT_TAG_TTL
    fetch_ahead: bool = True
    hosts_dir: str | None = None
    """containerd hosts.toml directories for the upstreams (None: the node's, as ``fastpull pull`` reads them)."""
    registries_conf: str | None = None
    snapshotter: Path | None = None
    """The unix socket of containerd's snapshots API (None: the mirror only)."""
    cri_proxy: Path | None = None
    """The unix socket of the CRI image-service proxy (None: no proxy)."""
    cri_upstream: Path = Path(DEFAULT_CRI_UPSTREAM)
    """containerd's socket, where the proxy forwards (and, without the snapshotter, imports each pulled image)."""
    containerd: Path | None = None
    """The socket of the containerd prefetched images are imported into (None: they are tagged in the store)."""
    namespace: str = CRI_NAMESPACE
    """The containerd namespace of ``containerd``."""
    fetch: FetchOptions = field(default_factory=FetchOptions)


def read_refs(path: Path) -> list[str]:
    """Image references in a prefetch file: one per line; blank lines and ``#`` comments skipped."""
    try:
        text = path.read_text()
    except OSError as e:
        raise StoreError(str(path), f"cannot read the prefetch file: {e.strerror or e}") from e
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def serve(options: ServeOptions) -> None:
    """Run the daemon until SIGTERM or SIGINT. Raises FastpullError if it cannot start."""
    asyncio.run(_serve(options))


async def _serve(options: ServeOptions) -> None:
    refs = read_refs(options.prefetch) if options.prefetch else []
    _raise_file_limit()
    hosts = RegistryHosts.load(options.hosts_dir, options.registries_conf, insecure=options.insecure_registries)
    pull_credentials = PullCredentials() if options.cri_proxy is not None else None
    puller = Puller(options.fetch, insecure_registries=options.insecure_registries, hosts=hosts,
                    credentials=pull_credentials)
    metrics = Metrics(puller.engine.received_bytes)
    layers = LayerCache(options.store / LAYER_CACHE) if options.snapshotter is not None else None
    imports: dict[tuple[Path, str], ContainerdImports] = {}

    def imports_into(socket: Path, namespace: str) -> ContainerdImports:
        if (socket, namespace) not in imports:
            imports[socket, namespace] = ContainerdImports(puller, options.store, socket, namespace)
        return imports[socket, namespace]

    mirror = Mirror(options.store, puller, metrics, default_registry=options.upstream, tag_ttl=options.tag_ttl,
                    fetch_ahead=options.fetch_ahead, unpack_into=layers,
                    import_into=None if options.containerd is None else imports_into(options.containerd,
                                                                                     options.namespace))
    metrics.inflight_fetches.set_function(lambda: len(mirror.inflight))
    app = make_app(mirror)
    app[CONTAINERD_IMPORTS] = imports  # filled as imports start: the CRI proxy's are made below
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    snapshots: Snapshots | None = None
    cri: CriProxy | None = None
    try:
        if layers is not None:
            snapshots = await Snapshots.start(options.snapshotter, options.store, puller, layers, metrics)
            app[IMAGE_LAYERS] = snapshots.layers
        if pull_credentials is not None:
            # Without the snapshotter, containerd would unpack the image itself: import it first.
            cri = await CriProxy.start(options.cri_proxy, options.cri_upstream, pull_credentials,
                                       imports_into(options.cri_upstream, CRI_NAMESPACE) if layers is None else None)
        await runner.setup()
        site = web.TCPSite(runner, options.host, options.port, backlog=1024)
        try:
            await site.start()
        except OSError as e:
            raise FastpullError(f"cannot listen on {options.host}:{options.port}: {e.strerror or e}") from None
        host, port = runner.addresses[0][:2]  # the port chosen, if 0 was asked for
        log.info("serving on http://%s:%d (store %s, upstream %s)", host, port, options.store, options.upstream)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored by whoever started us: stays so
                loop.add_signal_handler(signum, stopping.set)
        watch = asyncio.ensure_future(_watch_prefetch(app, options.prefetch, refs)) if options.prefetch else None
        await stopping.wait()
        log.info("stopping: %d blob(s) in flight stay resumable in the store", len(mirror.inflight))
        if watch is not None:
            watch.cancel()
    finally:
        if cri is not None:  # first: kubelet's pulls in progress end before the snapshotter's Prepares
            await cri.stop(SHUTDOWN_SECONDS)
        if snapshots is not None:
            await snapshots.stop(SHUTDOWN_SECONDS)
        await runner.cleanup()
        for each in imports.values():
            each.close()
        mirror.close()
        puller.close()


class Snapshots:
    """containerd's snapshotter, served beside the mirror: one engine, one store for both."""

    def __init__(self, socket_path: Path, snapshotter: OverlaySnapshotter, layers: ImageLayers,
                 service: SnapshotsService, server):
        self.socket_path = socket_path
        self.snapshotter = snapshotter
        self.layers = layers
        self.service = service
        self.server = server

    @classmethod
    async def start(cls, socket_path: Path, store: Path, puller: Puller, cache: LayerCache,
                    metrics: Metrics) -> Snapshots:
        snapshotter = OverlaySnapshotter(store / SNAPSHOTTER_STATE, cache)
        layers = ImageLayers(puller, store, cache, unpacked_bytes=metrics.unpacked_bytes.inc)
        service = SnapshotsService(snapshotter, layers, observe=metrics.prepare)
        try:
            server = await start_server(service, socket_path)
        except BaseException:
            service.close()
            layers.close()
            snapshotter.close()
            raise
        return cls(socket_path, snapshotter, layers, service, server)

    async def stop(self, grace: float) -> None:
        """Stop taking calls; calls in progress get ``grace`` seconds (Prepares waiting for a layer
        are cut: its download stays resumable in the store)."""
        self.layers.close()
        await self.server.stop(grace)
        self.socket_path.unlink(missing_ok=True)
        self.service.close()
        self.snapshotter.close()


async def _watch_prefetch(app: web.Application, path: Path, refs: list[str]) -> None:
    """Prefetch ``refs`` now, and the file's references again whenever it changes."""
    start_prefetch(app, refs)
    seen = _stamp(path)
    while True:
        await asyncio.sleep(PREFETCH_CHECK_SECONDS)
        if (stamp := _stamp(path)) != seen:
            seen = stamp
            try:
                refs = read_refs(path)
            except FastpullError as e:
                log.error("%s", e)
                continue
            log.info("%s changed: prefetching %d image(s)", path, len(refs))
            start_prefetch(app, refs)


def _raise_file_limit() -> None:
    """Each client holds a socket and a file: lift the soft descriptor limit (often 1024) to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
