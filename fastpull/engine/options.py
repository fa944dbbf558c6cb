"""What the fetch engine may do (limits, timing) and what it reports (counters), the source of a
blob it fetches, and the requests that fail together: the engine's small interfaces to its callers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from fastpull.errors import FastpullError
from fastpull.http.policy import RetryPolicy
from fastpull.http.transport import Origin

MiB = 1 << 20
BITMAP_CHUNK = MiB
"""Granularity of the chunk bitmap (resume, watermark) unless a smaller request size is fixed."""


class BlobSource(Protocol):
    """Where the blobs of one repository live, and how to authenticate to it; it may name another
    place to fetch a blob from when it fails one (a mirror, then the registry)."""

    def blob_url(self, digest: str) -> str:
        """The registry URL of a blob (it may redirect elsewhere)."""

    def authorization(self) -> str | None:
        """Authorization header value for the registry, or None for anonymous."""

    def reauthorize(self, challenge: str, failed: str | None) -> str | None:
        """A fresh Authorization value after the registry refused ``failed`` with 401 ``challenge``."""

    @property
    def origin(self) -> Origin:
        """How the registry's host is reached: its certificate checked or not, the CA bundle, a client
        certificate, extra headers. A redirect target on another host is always checked, against the
        CA bundle, and gets no client certificate and no headers."""

    @property
    def attempts(self) -> int | None:
        """Tries a request gets here before the blob has failed at this source (None: the engine's
        ``retries``); a source that another backs up may give few, to move on quickly."""

    def fallback(self, digest: str, error: FastpullError | None) -> BlobSource | None:
        """Where to fetch ``digest`` instead of here. After this source failed it for good with
        ``error``: the next place (the bytes already written are kept), or None if there is none; it
        may block (the engine asks from another thread). With ``error`` None, when the download
        starts: a place to use instead of this one, which has failed other downloads lately, or None
        to start here; then it must not block."""


class FetchGroup:
    """Requests that stand or fall together, such as the blobs of one pull (``FetchEngine.fetch(group=)``):
    once a blob of the group fails, or the group is cancelled, its other requests fail at once with that
    error, their transfers stopped (what they wrote is kept for a resume), and so do requests made later."""

    def __init__(self) -> None:
        self.failed: tuple[str | None, BaseException] | None = None
        """What ended the group: the digest of the blob that failed and its error, or None and the error of
        a cancel. Set by the engine's thread before any of the group's futures settles with it."""


@dataclass(frozen=True)
class FetchOptions:
    """Limits and timing of the fetch engine; validated when built.

    Defaults come from bench/ sweeps (see bench/README.md).
    """

    chunk_size: int | None = None
    """Bytes per Range request; None: adapted to ~1 s per request, 4-64 MiB."""
    chunks_per_blob: int = 32
    """Ranged transfers in flight per blob, at most."""
    blobs_in_flight: int = 16
    max_transfers: int = 64
    """Transfers in flight in all, at most."""
    adaptive: bool = True
    """Tune transfers in flight (and the request size, unless chunk_size is set) from the
    throughput measured during the pull; False runs at the caps."""
    initial_transfers: int = 16
    max_host_connections: int = 64
    http2: bool = True
    """Offer HTTP/2 over TLS (ALPN); transfers then may share connections as streams."""
    streams_per_connection: int | None = 1
    """HTTP/2 streams one connection carries at most; None: tuned, starting from one. One by
    default: on the far-registry bed (TLS, HTTP/2, 20 ms RTT) tuning cost 7% of the wall time in
    its probes and saved no CPU (bench/README.md)."""
    retries: int = 6
    backoff_base: float = 0.25
    backoff_max: float = 15.0
    connect_timeout: float = 10.0
    stall_timeout: float = 20.0
    straggler_ratio: float = 8.0
    straggler_min_age: float = 3.0
    buffer_size: int = 256 * 1024
    hasher_threads: int = 2
    transfer_rate_limit: int = 0  # bytes/s per transfer; 0 = unlimited

    def __post_init__(self) -> None:
        for name in ("chunks_per_blob", "blobs_in_flight", "max_transfers", "initial_transfers",
                     "max_host_connections", "buffer_size", "hasher_threads", "streams_per_connection"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if self.retries < 0 or self.transfer_rate_limit < 0:
            raise ValueError("retries and transfer_rate_limit must not be negative")
        if self.chunk_size is not None and self.chunk_size < 64 * 1024:
            raise ValueError("chunk_size must be at least 64 KiB")

    @cached_property
    def retry(self) -> RetryPolicy:
        """The HTTP policy's retry limits for one request of a blob."""
        return RetryPolicy(self.retries + 1, self.backoff_base, self.backoff_max)

    @property
    def bitmap_chunk(self) -> int:
        """Granularity of the chunk bitmap (resume, watermark): requests span whole chunks."""
        return min(self.chunk_size or BITMAP_CHUNK, BITMAP_CHUNK)


@dataclass
class FetchStats:
    """Counters over the engine's life (read them from any thread; they only grow)."""

    bytes_received: int = 0
    requests: int = 0
    retries: int = 0
    stragglers_reissued: int = 0
    blobs_fetched: int = 0
    blobs_skipped: int = 0
    bytes_resumed: int = 0
    connections: int = 0
    """Connections opened (TCP, with TLS where used); the rest of the requests reused one."""
