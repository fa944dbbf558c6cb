"""The daemon's HTTP surface: the read-only OCI distribution API, prefetch, status and metrics.

One handler per route, as the distribution registry's handlers are; errors are the spec's JSON
(``{"errors": [{"code", "message", "detail"}]}``) with their statuses, never a traceback; ``HEAD``
shares ``GET``'s headers; ``Range`` is handled in one place, for blobs at rest and in flight,
and every body is sent with ``sendfile``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from aiohttp import web

from fastpull.content.defaults import LAYER_CACHE
from fastpull.digests import check_digest
from fastpull.errors import (
    AuthError,
    DigestMismatch,
    FastpullError,
    InvalidReference,
    ManifestError,
    RegistryError,
    StoreError,
    TransferError,
    quote,
)
from fastpull.oci.reference import parse_reference
from fastpull.serve.follow import Follower
from fastpull.serve.imports import ContainerdImports
from fastpull.serve.layers import ImageLayers
from fastpull.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fastpull.serve.mirror import InflightBlob, Mirror, NotFound, route
from fastpull.unpack.rootfs import tree_usage

log = logging.getLogger(__name__)

MIRROR = web.AppKey("mirror", Mirror)
PREFETCHES = web.AppKey("prefetches", set)
IMAGE_LAYERS = web.AppKey("image_layers", ImageLayers)
"""The snapshotter's image pulls, if it is served (set by the daemon)."""
CONTAINERD_IMPORTS: web.AppKey[dict[tuple[Path, str], ContainerdImports]] = web.AppKey("containerd_imports")
"""The imports into containerd's own stores, by socket and namespace (set by the daemon)."""
STORE_SIZE: web.AppKey[StoreSize] = web.AppKey("store_size")
_NAME = r"{name:.+}"  # checked by route(); may begin with a registry host and port
_MAX_PREFETCH_BODY = 1 << 20


class ApiError(Exception):
    """An error response: the status, the spec's code and a message naming the thing."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}

    def response(self) -> web.Response:
        body = {"errors": [{"code": self.code, "message": str(self), "detail": None}]}
        return web.json_response(body, status=self.status, headers=self.headers)


def make_app(mirror: Mirror) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=_MAX_PREFETCH_BODY)
    app[MIRROR] = mirror
    app[PREFETCHES] = set()
    app[STORE_SIZE] = StoreSize(mirror.layout.root)
    app.router.add_get("/v2/", _base)
    app.router.add_get(f"/v2/{_NAME}/manifests/{{reference}}", _manifest)  # GET routes answer HEAD too
    app.router.add_get(f"/v2/{_NAME}/blobs/{{digest}}", _blob)
    app.router.add_post("/_fastpull/v1/prefetch", _prefetch)
    app.router.add_get("/_fastpull/v1/status", _status)
    app.router.add_get("/metrics", _metrics)
    return app


@web.middleware
async def _errors(request: web.Request, handler):
    mirror = request.app[MIRROR]
    mirror.metrics.active_clients += 1
    try:
        return await handler(request)
    except web.HTTPException as e:  # no such route or method: the spec's error body too
        if e.status < 400:
            raise
        return ApiError(e.status, "UNSUPPORTED", f"{request.method} {request.path}: {e.reason}").response()
    except ApiError as e:
        if e.status >= 500:
            log.error("%s %s: %s", request.method, quote(request.path_qs), e)
        return e.response()
    except FastpullError as e:
        mirror.metrics.error(e, request.path)
        api_error = _api_error(e, request.match_info.get("digest") is not None)
        log.error("%s %s: %s", request.method, quote(request.path_qs), e)
        return api_error.response()
    finally:
        mirror.metrics.active_clients -= 1


def _api_error(e: FastpullError, blob: bool) -> ApiError:
    """The spec's status and code for what went wrong upstream or here."""
    unknown = "BLOB_UNKNOWN" if blob else "MANIFEST_UNKNOWN"
    if isinstance(e, NotFound):
        return ApiError(404, unknown, str(e))
    if isinstance(e, AuthError):
        return ApiError(401, "UNAUTHORIZED", str(e)) if e.status == 401 else ApiError(403, "DENIED", str(e))
    if isinstance(e, RegistryError):
        if e.status == 404:
            return ApiError(404, "NAME_UNKNOWN" if "NAME_UNKNOWN" in e.body else unknown, str(e))
        if e.status == 429:
            return ApiError(429, "TOOMANYREQUESTS", str(e), {"Retry-After": e.retry_after or "10"})
        return ApiError(503, "UNAVAILABLE", str(e), {"Retry-After": e.retry_after} if e.retry_after else None)
    if isinstance(e, TransferError):
        return ApiError(503, "UNAVAILABLE", str(e))
    if isinstance(e, (DigestMismatch, ManifestError)):
        return ApiError(502, "UNKNOWN", f"upstream sent bad content: {e}")
    if isinstance(e, StoreError):
        return ApiError(500, "UNKNOWN", f"store: {e}")
    return ApiError(500, "UNKNOWN", str(e))


# ---- the distribution API -------------------------------------------------------------


async def _base(request: web.Request) -> web.Response:
    return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})


def _upstream(request: web.Request):
    mirror = request.app[MIRROR]
    try:
        return route(request.match_info["name"], request.query.get("ns"), mirror.default_registry)
    except InvalidReference as e:  # the client's mistake: answered, not logged (it may be any length)
        raise ApiError(400, "NAME_INVALID", str(e)) from None


async def _manifest(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    upstream = _upstream(request)
    reference = request.match_info["reference"]
    if ":" in reference and (why := check_digest(reference)):
        raise ApiError(400, "DIGEST_INVALID", f"{upstream}@{reference}: {why}")
    if ":" not in reference:
        try:
            parse_reference(f"{upstream}:{reference}")
        except InvalidReference as e:
            raise ApiError(400, "TAG_INVALID", str(e)) from None
    manifest = await mirror.manifest(upstream, reference)
    headers = {"Content-Type": manifest.media_type, "Docker-Content-Digest": manifest.digest,
               "ETag": f'"{manifest.digest}"', "Docker-Distribution-API-Version": "registry/2.0"}
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(manifest.body))
        return web.Response(headers=headers)
    mirror.metrics.served_bytes.inc(len(manifest.body))
    mirror.fetch_ahead(upstream, manifest)
    return web.Response(body=manifest.body, headers=headers)


async def _blob(request: web.Request) -> web.StreamResponse:
    mirror = request.app[MIRROR]
    upstream = _upstream(request)
    digest = request.match_info["digest"]
    if why := check_digest(digest):
        raise ApiError(400, "DIGEST_INVALID", f"{upstream}@{digest}: {why}")
    blob = await mirror.blob(upstream, digest)
    what = f"{upstream}@{digest}"
    follower = None  # for a committed blob: all of it is there
    if isinstance(blob, InflightBlob):
        try:
            follower = await asyncio.shield(blob.opened)
            start, end = _range(request.headers.get("Range"), blob.size, what)
            # Headers go out with the first bytes: a fetch that fails before them still gets its status.
            await follower.beyond(start)
            size, fd = blob.size, follower.open()
        finally:
            blob.release()
    else:
        fd, size = blob, os.fstat(blob).st_size
    with open(fd, "rb") as body:
        if follower is None:
            start, end = _range(request.headers.get("Range"), size, what)
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest,
                   "ETag": f'"{digest}"', "Accept-Ranges": "bytes", "Content-Length": str(end - start),
                   "Docker-Distribution-API-Version": "registry/2.0"}
        status = 200
        if (start, end) != (0, size):
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        try:
            await _send(request, body, start, end, follower, mirror)
            await response.write_eof()
        except ConnectionError as e:  # the fetch goes on for the blob's other clients and the store
            log.info("%s %s: %s", request.method, quote(request.path), e)
        except FastpullError as e:  # too late for a status: cut the body short, the client retries
            mirror.metrics.error(e, request.path)
            log.error("%s %s: %s", request.method, quote(request.path), e)
            if request.transport is not None:
                request.transport.abort()
        return response


async def _send(request: web.Request, body, start: int, end: int, follower: Follower | None,
                mirror: Mirror) -> None:
    """Send ``body[start:end]`` as it lands. A client that goes away stops only its own sending."""
    loop = asyncio.get_running_loop()
    position = start
    while position < end:
        landed = end if follower is None else min(end, await follower.beyond(position))
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError(f"the client went away after {position - start} bytes")
        await loop.sendfile(transport, body, position, landed - position)
        mirror.metrics.served_bytes.inc(landed - position)
        position = landed


def _range(header: str | None, size: int, what: str) -> tuple[int, int]:
    """The byte range ``[start, end)`` a ``Range`` header asks of ``size`` bytes: the whole body
    without one (or for forms other than a single ``bytes=`` range, which may be ignored)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return 0, size
    first, dash, last = header[6:].strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) \
            or (last and not last.isdigit()):
        return 0, size
    if not first:  # the last N bytes
        start, end = max(0, size - int(last)), size
        if int(last) == 0:
            start = size
    else:
        start, end = int(first), min(size, int(last) + 1) if last else size
    if start >= end or start >= size:
        raise ApiError(416, "RANGE_INVALID", f"{what}: range {header!r} outside its {size} bytes",
                       {"Content-Range": f"bytes */{size}"})
    return start, end


# ---- fastpull's own routes ------------------------------------------------------------


async def _prefetch(request: web.Request) -> web.Response:
    """``{"refs": [...]}``: pull these images into the store in the background (202)."""
    try:
        refs = (await request.json())["refs"]
        if not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "UNSUPPORTED", 'expected a JSON body {"refs": ["image reference", ...]}') from None
    for ref in refs:
        try:
            parse_reference(ref)
        except InvalidReference as e:
            raise ApiError(400, "NAME_INVALID", str(e)) from None
    start_prefetch(request.app, refs)
    return web.json_response({"accepted": refs}, status=202)


def start_prefetch(app: web.Application, refs: list[str]) -> None:
    """Pull ``refs`` in the background; a failure is logged and counted, not raised."""
    mirror = app[MIRROR]

    async def one(ref: str) -> None:
        try:
            await mirror.prefetch(ref)
        except FastpullError as e:
            mirror.metrics.error(e, ref)
            log.error("prefetch %s: %s", quote(ref), e)

    for ref in refs:
        task = asyncio.ensure_future(one(ref))
        app[PREFETCHES].add(task)
        task.add_done_callback(app[PREFETCHES].discard)


class StoreSize:
    """The store's bytes on disk, blobs and unpacked layers, measured on a worker thread at most every
    ``max_age`` seconds; each layer (immutable once committed) is walked once."""

    def __init__(self, root: Path, max_age: float = 5.0):
        self._blobs = root / "blobs"
        self._layers = root / LAYER_CACHE / "sha256"
        self._max_age = max_age
        self._layer_bytes: dict[str, int] = {}
        self._measured = 0.0
        self._measuring: asyncio.Future[dict[str, int]] | None = None

    async def get(self) -> dict[str, int]:
        if self._measuring is None or (self._measuring.done() and time.monotonic() - self._measured > self._max_age):
            self._measured = time.monotonic()
            self._measuring = asyncio.get_running_loop().run_in_executor(None, self._measure)
        return await asyncio.shield(self._measuring)  # a status request that goes away cancels no measure

    def _measure(self) -> dict[str, int]:
        try:
            names = os.listdir(self._layers)
        except FileNotFoundError:
            names = []
        self._layer_bytes = {name: self._layer_bytes.get(name) or _usage(self._layers / name) for name in names}
        blobs, layers = _usage(self._blobs), sum(self._layer_bytes.values())
        return {"blobs": blobs, "layers": layers, "total": blobs + layers}


def _usage(path: Path) -> int:
    """Bytes on disk of the tree at ``path``; 0 if it is gone."""
    try:
        return tree_usage(path)[0]
    except FileNotFoundError:
        return 0


async def _status(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    layers = request.app.get(IMAGE_LAYERS)
    now = time.monotonic()
    inflight = []
    for blob in list(mirror.inflight.values()):
        landed = blob.opened.result().available if blob.opened.done() and not blob.opened.exception() else 0
        seconds = now - blob.started
        inflight.append({"registry": blob.upstream.registry, "repository": blob.upstream.repository,
                         "digest": blob.digest, "size": blob.size, "bytes": landed, "clients": blob.clients,
                         "seconds": round(seconds, 3), "bytes_per_second": round(landed / max(seconds, 1e-3))})
    return web.json_response({
        "store": str(mirror.layout.root),
        "inflight": inflight,
        "prefetching": len(request.app[PREFETCHES]),
        "clients": mirror.metrics.active_clients - 1,  # less this request
        "upstream_bytes": mirror.metrics.upstream_bytes(),
        "errors": list(mirror.metrics.recent_errors),
        "pulls": ([] if layers is None else layers.pulls())
                 + [pull for imports in request.app.get(CONTAINERD_IMPORTS, {}).values() for pull in imports.pulls()],
        "store_size": await request.app[STORE_SIZE].get(),
        "tripped_hosts": [{"host": host, "retry_in": round(seconds, 1), "error": error}
                          for host, seconds, error in mirror.puller.breaker.tripped_hosts()],
    })


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[MIRROR].metrics.exposition(),
                        headers={"Content-Type": METRICS_CONTENT_TYPE})

