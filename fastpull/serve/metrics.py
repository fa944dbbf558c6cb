"""The daemon's Prometheus metrics (``GET /metrics``) and the recent errors ``/status`` lists.

Names in base units with ``_total`` for counters; labels have a few bounded values (a request's
kind and outcome, an error's class), never a digest or a reference.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT_ERRORS = 20


class Metrics:
    """Counters of one daemon, in a registry of its own (several daemons may share a process)."""

    def __init__(self, engine_bytes: Callable[[], int]):
        disable_created_metrics()  # no *_created series: they double what a scrape carries
        self.registry = CollectorRegistry()
        self.upstream_manifest_bytes = 0
        self._engine_bytes = engine_bytes
        self.registry.register(_UpstreamBytes(self))
        self.served_bytes = Counter("fastpull_served_bytes", "Bytes of blobs and manifests sent to clients",
                                    registry=self.registry)
        self.requests = Counter("fastpull_requests", "Manifest and blob requests by outcome (hit: from the store; "
                                "miss: fetched upstream; joined: shared a fetch in flight)",
                                ["kind", "result"], registry=self.registry)
        self.errors = Counter("fastpull_errors", "Failed requests and fetches by kind of error", ["kind"],
                              registry=self.registry)
        self.fetch_seconds = Histogram("fastpull_fetch_duration_seconds", "Upstream blob fetches, start to commit",
                                       buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250),
                                       registry=self.registry)
        self.inflight_fetches = Gauge("fastpull_inflight_fetches", "Blobs being fetched upstream",
                                      registry=self.registry)
        self.active_clients = 0
        self.clients = Gauge("fastpull_clients", "Requests being answered", registry=self.registry)
        self.clients.set_function(lambda: self.active_clients)
        self.recent_errors: collections.deque[dict] = collections.deque(maxlen=RECENT_ERRORS)
        # Its _count by outcome is the layers prepared from the cache and from the network: no counter repeats it.
        self.prepare_seconds = Histogram(
            "fastpull_snapshotter_prepare_duration_seconds", "containerd's Prepare calls by outcome (cache: the "
            "layer was unpacked already; remote: fetched and unpacked for it; local: containerd applies it)",
            ["outcome"], buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250), registry=self.registry)
        self.unpacked_bytes = Counter("fastpull_snapshotter_unpacked_compressed_bytes",
                                      "Compressed bytes of the layers the snapshotter's pulls unpacked",
                                      registry=self.registry)

    def upstream_bytes(self) -> int:
        return self._engine_bytes() + self.upstream_manifest_bytes

    def request(self, kind: str, result: str) -> None:
        self.requests.labels(kind, result).inc()

    def error(self, error: BaseException, where: str = "") -> None:
        kind = type(error).__name__
        self.errors.labels(kind).inc()
        self.recent_errors.append({"time": time.time(), "kind": kind, "where": where, "message": str(error)})

    def prepare(self, rpc: str, outcome: str, seconds: float) -> None:
        self.prepare_seconds.labels(outcome).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _UpstreamBytes:
    """``fastpull_upstream_bytes_total``, read from the engine when scraped."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self):
        family = CounterMetricFamily("fastpull_upstream_bytes", "Bytes received from upstream registries")
        family.add_metric([], self._metrics.upstream_bytes())
        yield family
