"""containerd's snapshots gRPC API (``containerd.services.snapshots.v1.Snapshots``) over the overlay
snapshotter, on a unix socket: what containerd's proxy plugin named ``fastpull`` calls.

The remote path: a ``Prepare`` whose labels name a layer containerd has not got yet
(``containerd.io/snapshot.ref`` and the CRI image labels) gets that layer from the cache, or from
the :class:`LayerSource` (which fetches and unpacks the whole image at once, in parallel); the
call waits for its own layer only, commits it under its ChainID and answers ALREADY_EXISTS, so
containerd skips the layer's download and unpack. Everything else is a plain overlay snapshotter,
used for containers and for pulls that send no labels.

The event loop only waits: every snapshotter operation (SQLite, directories, disk usage) runs on
a small thread pool, so one slow call holds no other.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from fastpull.errors import (
    AuthError,
    DigestMismatch,
    FastpullError,
    RegistryError,
    SnapshotExists,
    SnapshotInvalid,
    SnapshotNotFound,
    SnapshotPrecondition,
    StoreError,
    TransferError,
    UnpackError,
    quote,
)
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from fastpull.protos.containerd.types import mount_pb2
from fastpull.snapshotter.metadata import check_labels
from fastpull.snapshotter.overlay import Info, Kind, Mount, OverlaySnapshotter
from fastpull.snapshotter.remote import SNAPSHOT_REF, LayerSource, chain_id_of, layer_request
from fastpull.sockets import start_unix_server

log = logging.getLogger(__name__)

T = TypeVar("T")

PLUGIN_NAME = "fastpull"
"""The proxy plugin's name in containerd's configuration (``[proxy_plugins.fastpull]``)."""
_DETAILS_BYTES = 4096
"""Most of an error message a call sends back."""
THREADS = 8
"""Snapshotter operations at once; calls waiting for a remote layer hold none."""

_CODES: list[tuple[type[FastpullError], grpc.StatusCode]] = [
    (SnapshotNotFound, grpc.StatusCode.NOT_FOUND),
    (SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
    (SnapshotPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (SnapshotInvalid, grpc.StatusCode.INVALID_ARGUMENT),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (DigestMismatch, grpc.StatusCode.DATA_LOSS),
    (TransferError, grpc.StatusCode.UNAVAILABLE),
]


def status_code(error: FastpullError) -> grpc.StatusCode:
    """The gRPC code containerd's errdefs reads the error as."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    if isinstance(error, RegistryError):
        return {404: grpc.StatusCode.NOT_FOUND, 403: grpc.StatusCode.PERMISSION_DENIED,
                429: grpc.StatusCode.RESOURCE_EXHAUSTED}.get(error.status, grpc.StatusCode.UNAVAILABLE)
    if isinstance(error, (StoreError, UnpackError)) and _no_space(error):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNKNOWN


async def _abort(context: grpc.aio.ServicerContext, error: FastpullError, prefix: str = "") -> None:
    """End the call with ``error``'s code and message (after ``prefix``), cut to fit: gRPC sends the
    message in a header, which clients refuse past 8 KiB, and client strings may be 4 KiB each."""
    text = f"{prefix}{error}".encode()[:_DETAILS_BYTES].decode(errors="ignore")
    await context.abort(status_code(error), text)


def _no_space(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__
    return "No space left on device" in str(error)


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """The RPCs, each an :class:`OverlaySnapshotter` call on the thread pool (errors as gRPC codes)."""

    def __init__(self, snapshotter: OverlaySnapshotter, layers: LayerSource | None = None,
                 observe: Callable[[str, str, float], None] | None = None):
        """``layers``: where missing layers come from (None: only layers already in the cache are
        prepared remotely). ``observe(rpc, outcome, seconds)`` hears each Prepare's outcome
        (``cache``, ``remote``, ``local``, or an error code's name)."""
        self.snapshotter = snapshotter
        self.layers = layers
        self._observe = observe
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="snapshotter")

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except FastpullError as e:
            await _abort(context, e)

    async def Prepare(self, request, context):
        labels = dict(request.labels)
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = "local"
        try:
            if (chain_id := chain_id_of(labels)) is not None:
                outcome = await self._prepare_remote(context, request.key, request.parent, chain_id, labels)
            if outcome == "local":
                mounts = await self._run(context, self.snapshotter.prepare, request.key, request.parent, labels)
                return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except grpc.aio.AbortError:
            outcome = context.code().name.lower() if context.code() else "error"
            raise
        finally:
            if self._observe is not None:
                self._observe("prepare", outcome, loop.time() - started)
        await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                            f"target snapshot {chain_id} ({outcome}): committed by the fastpull snapshotter")

    async def _prepare_remote(self, context, key: str, parent: str, chain_id: str, labels: dict[str, str]) -> str:
        """Commit ``chain_id`` from the cache, fetching it first if the labels say how: ``cache`` or
        ``remote`` once it is committed, ``local`` if containerd must apply the layer itself."""
        await self._run(context, check_labels, key, labels)  # as a local Prepare's: they reach logs and errors
        cache = self.snapshotter.layers
        outcome = "cache"
        for attempt in range(2):
            if not cache.has(chain_id):
                request = layer_request(labels)
                if request is None or self.layers is None:
                    return "local"
                outcome = "remote"
                log.info("prepare %s: fetching %s", quote(key), quote(str(request)))
                try:
                    await asyncio.wrap_future(self.layers.ensure(request))
                except FastpullError as e:  # its message may hold the labels' image reference whole
                    log.error("prepare %s: %s", quote(key), quote(str(e)))
                    await _abort(context, e, f"{request}: ")
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._pool, self.snapshotter.commit_layer, chain_id, parent, chain_id, {SNAPSHOT_REF: chain_id})
                return outcome
            except SnapshotNotFound as e:
                # `fastpull gc` freed the layer between its unpack and this commit: once more.
                if attempt or cache.has(chain_id):
                    await _abort(context, e)
            except FastpullError as e:
                await _abort(context, e)
        raise AssertionError("unreachable")

    async def View(self, request, context):
        mounts = await self._run(context, self.snapshotter.view, request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    async def Mounts(self, request, context):
        return pb.MountsResponse(mounts=_mounts(await self._run(context, self.snapshotter.mounts, request.key)))

    async def Commit(self, request, context):
        if request.parent:
            info = await self._run(context, self.snapshotter.stat, request.key)
            if info.parent != request.parent:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"commit {quote(request.key)}: rebasing onto another parent is not supported")
        await self._run(context, self.snapshotter.commit, request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    async def Remove(self, request, context):
        await self._run(context, self.snapshotter.remove, request.key)
        return empty_pb2.Empty()

    async def Stat(self, request, context):
        return pb.StatSnapshotResponse(info=_info(await self._run(context, self.snapshotter.stat, request.key)))

    async def Update(self, request, context):
        given = request.info
        info = Info(name=given.name, parent=given.parent, kind=Kind(given.kind), labels=dict(given.labels),
                    created=0.0, updated=0.0)
        updated = await self._run(context, self.snapshotter.update, info, list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=_info(updated))

    async def List(self, request, context):
        infos = await self._run(context, lambda: list(self.snapshotter.walk(list(request.filters))))
        for start in range(0, len(infos), 100):  # containerd sends batches of 100 too
            yield pb.ListSnapshotsResponse(info=[_info(i) for i in infos[start:start + 100]])

    async def Usage(self, request, context):
        usage = await self._run(context, self.snapshotter.usage, request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(self, request, context):
        await self._run(context, self.snapshotter.cleanup)
        return empty_pb2.Empty()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]


def _info(info: Info) -> pb.Info:
    def stamp(seconds: float) -> timestamp_pb2.Timestamp:
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(round(seconds * 1e9))
        return ts

    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind), labels=info.labels,
                   created_at=stamp(info.created), updated_at=stamp(info.updated))


async def start_server(service: SnapshotsService, socket_path: Path) -> grpc.aio.Server:
    """Serve ``service`` on the unix socket ``socket_path`` (see :func:`start_unix_server`)."""
    return await start_unix_server(lambda server: pb_grpc.add_SnapshotsServicer_to_server(service, server),
                                   socket_path, f"snapshotter {PLUGIN_NAME!r}")
