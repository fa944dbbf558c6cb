"""Pulling an image: resolve the reference, fetch every blob through the engine, tag the layout."""

from __future__ import annotations

import os
from concurrent.futures import wait
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastpull.fetch import FetchEngine, FetchOptions
from fastpull.layout import ImageLayout
from fastpull.manifest import Descriptor, ImageManifest, Platform
from fastpull.reference import Reference, parse_reference
from fastpull.registry import RegistryClient
from fastpull.transport import default_ca_file


class RepositorySource:
    """The fetch engine's view of one repository: blob URLs and Authorization values."""

    def __init__(self, client: RegistryClient, repository: str):
        self.client = client
        self.repository = repository
        self.ca_file = default_ca_file()

    def blob_url(self, digest: str) -> str:
        return self.client.blob_url(self.repository, digest)

    def authorization(self) -> str | None:
        return self.client.authorization(self.repository)

    def reauthorize(self, challenge: str, failed: str | None) -> str | None:
        return self.client.reauthorize(self.repository, challenge, failed)


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
    """Bytes that were not in the layout before this pull (includes resumed partial blobs)."""
    seconds: float

    @property
    def throughput(self) -> float:
        """Bytes per second over the fetched bytes."""
        return self.fetched_bytes / self.seconds if self.seconds > 0 else 0.0


class Puller:
    """Pulls many images in one process over one fetch engine; safe to use from many threads.

    One :class:`RegistryClient` per registry host keeps tokens and connections warm.
    """

    def __init__(
        self,
        options: FetchOptions | None = None,
        *,
        insecure_registries: Iterable[str] = (),
        platform: Platform | None = None,
        durable: bool = False,
    ):
        self.engine = FetchEngine(options)
        self.platform = platform or Platform.host()
        self.insecure_registries = frozenset(insecure_registries)
        self.durable = durable
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()

    def client(self, registry: str) -> RegistryClient:
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                insecure = True if registry in self.insecure_registries else None
                client = self._clients[registry] = RegistryClient(registry, insecure=insecure)
            return client

    def pull(self, ref: str | Reference, layout: str | os.PathLike[str], *, platform: Platform | None = None) -> PullResult:
        """Pull ``ref`` into the OCI layout at ``layout`` and tag it there by its full name."""
        started = time.monotonic()
        reference = parse_reference(ref) if isinstance(ref, str) else ref
        client = self.client(reference.registry)
        resolved = client.resolve(reference, platform or self.platform)
        image_layout = ImageLayout(layout, durable=self.durable)
        store = image_layout.store
        source = RepositorySource(client, reference.repository)
        source.authorization()  # learn the auth challenge once, before the loop needs it

        blobs = [resolved.manifest.config, *resolved.manifest.layers]
        missing = {d.digest: d.size for d in blobs if not store.has(d.digest, d.size)}
        fetched = sum(missing.values())
        futures = [self.engine.fetch(store, source, digest, size) for digest, size in missing.items()]
        for desc, body in resolved.documents:
            if not store.has(desc.digest, desc.size):
                fetched += desc.size
                store.put_bytes(desc.digest, body)
        # Let every fetch settle before reporting the first failure: no fetch outlives its pull.
        wait(futures)
        for future in futures:
            future.result()
        image_layout.tag(str(reference), resolved.manifest_descriptor)
        total = sum(d.size for d in blobs) + sum(d.size for d, _ in resolved.documents)
        return PullResult(
            reference=reference,
            descriptor=resolved.manifest_descriptor,
            manifest=resolved.manifest,
            layout=image_layout.root,
            total_bytes=total,
            fetched_bytes=fetched,
            seconds=time.monotonic() - started,
        )

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Puller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pull(
    ref: str | Reference,
    layout: str | os.PathLike[str],
    *,
    platform: Platform | None = None,
    options: FetchOptions | None = None,
    insecure_registries: Iterable[str] = (),
) -> PullResult:
    """Pull one image into an OCI layout directory; see :class:`Puller` for many pulls."""
    with Puller(options, insecure_registries=insecure_registries, platform=platform) as puller:
        return puller.pull(ref, layout)
