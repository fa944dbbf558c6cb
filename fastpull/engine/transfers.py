"""The loop thread's state of a blob being fetched and of each request in flight, and how a
response's headers decide whether its body is the bytes asked for."""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pycurl

from fastpull.content.store import BlobWriter, ContentStore
from fastpull.engine.options import BlobSource, FetchGroup
from fastpull.http.policy import RetryPolicy

log = logging.getLogger("fastpull.engine.loop")  # one logger for the loop and its transfers


@dataclass(eq=False)
class BlobFetch:
    """One blob being fetched: its requests' shared state, owned by the loop thread."""

    store: ContentStore
    source: BlobSource
    digest: str
    size: int
    futures: dict[Future, FetchGroup | None] = field(default_factory=dict)  # the requests, and their groups
    openers: list = field(default_factory=list)  # on_open callbacks not yet called
    streamed: bool = False  # someone reads it while it downloads (on_open): favour its head
    on_downloaded: Callable[[], None] | None = None  # of the request that created it
    writer: BlobWriter | None = None
    url: str = ""
    registry_netloc: str = ""
    auth: str | None = None
    mode: str = "probe"  # probe: first transfer tells Range support; then "ranged" or "single"
    pending: list = field(default_factory=list)  # chunk indices to fetch, sorted
    resume_at: dict = field(default_factory=dict)  # chunk index -> first byte not yet written
    tries: dict = field(default_factory=dict)  # first chunk of a request -> failed tries
    transfers: set = field(default_factory=set)
    redirects: int = 0
    reauthentications: int = 0
    resolutions: int = 0  # fresh redirects in a row since the redirect target last worked
    hashed_watermark: int = 0
    committing: bool = False
    refetched: bool = False  # failed its digest once and was fetched again from scratch
    switching: bool = False  # its source failed it: asking the source where to fetch it next
    finished_rates: deque = field(default_factory=lambda: deque(maxlen=16))  # B/s of finished chunks

    def at_origin(self, url: str) -> bool:
        """Whether ``url`` is on the registry's host (not a redirect target: a CDN, S3)."""
        return urlsplit(url).netloc == self.registry_netloc

    def headers(self, extra: list[str]) -> list[str]:
        # The registry's credentials and headers never go to a redirect target on another host.
        if not self.at_origin(self.url):
            return extra
        own = [f"{name}: {value}" for name, value in self.source.origin.headers]
        return extra + own + ([f"Authorization: {self.auth}"] if self.auth else [])

    def retry(self, default: RetryPolicy) -> RetryPolicy:
        """The retry limits of a request to the blob's source: ``default`` but for its ``attempts``."""
        attempts = self.source.attempts
        return default if attempts is None else dataclasses.replace(default, attempts=attempts)

    def switch(self, source: BlobSource, url: str, auth: str | None) -> None:
        """Fetch the rest of the blob from ``source`` at ``url``: its own counters start afresh."""
        self.source, self.url, self.auth = source, url, auth
        self.registry_netloc = urlsplit(url).netloc
        self.tries, self.redirects, self.reauthentications, self.resolutions = {}, 0, 0, 0


@dataclass(eq=False)
class Transfer:
    """One request in flight: a byte range of a blob, its curl handle and what came back."""

    blob: BlobFetch
    chunks: range | None  # bitmap chunks this request covers; None: the whole blob in one stream
    start: int
    end: int
    sink: object
    started: float
    url: str
    auth: str | None = None  # the Authorization value it was sent with
    curl: pycurl.Curl | None = None  # given by Multi.start
    status: int = 0
    headers: dict = field(default_factory=dict)
    window_bytes: int = 0
    rate: float = 0.0
    http2: bool = False

    def on_header(self, line: bytes) -> None:
        text = line.decode("latin-1").strip()
        if text.startswith("HTTP/"):
            self.http2 = text.startswith("HTTP/2")
            parts = text.split()
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.headers = {}
        elif ":" in text:
            name, _, value = text.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        elif not text:
            self._arm_if_body_is_ours()

    def _arm_if_body_is_ours(self) -> None:
        """At the end of the headers: decide whether the body is blob bytes for our range."""
        blob = self.blob
        if self.status == 206 and self.chunks is not None:
            if _content_range_start(self.headers.get("content-range")) == self.start:
                self.sink.arm()
                if blob.mode == "probe":  # Range works: the other requests start now, not after this one
                    blob.mode = "ranged"
        elif self.status == 200 and (self.chunks is None or blob.mode == "probe"):
            # Whole body from offset 0: asked so, or the server ignored our Range.
            if self.chunks is not None:
                log.info("%s ignores Range requests: fetching %s in one stream", blob.url, blob.digest)
                blob.mode = "single"
                self.chunks = None
            self.start, self.end = 0, blob.size
            self.sink.rebase(0, blob.size, 0)
            self.sink.arm()


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/1000"
    if not value or not value.startswith("bytes "):
        return None
    first = value[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None
