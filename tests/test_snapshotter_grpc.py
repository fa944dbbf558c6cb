"""The snapshotter through its gRPC socket, as containerd's proxy plugin calls it: the error table of
``test_snapshotter_overlay`` read back from status codes, the socket's mode, List with containerd's
own filter, and the remote path (Prepare of a layer by its ``snapshot.ref`` label answered
ALREADY_EXISTS once the layer is committed, waiting for its own layer only, failures as codes that
name the layer)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
from test_snapshotter_overlay import CASES, cache_layer, drive

from fastpull.errors import (
    DigestMismatch,
    SnapshotError,
    SnapshotExists,
    SnapshotInvalid,
    SnapshotNotFound,
    SnapshotPrecondition,
)
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from fastpull.snapshotter import Info, Kind, Mount, OverlaySnapshotter, Usage
from fastpull.snapshotter.remote import (
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    SNAPSHOT_REF,
    LayerRequest,
)
from fastpull.snapshotter.service import SnapshotsService, start_server
from fastpull.unpack.snapshots import Snapshotter as LayerCache
from fastpull.unpack.snapshots import chain_ids

CHAINS = chain_ids([f"sha256:{i:064x}" for i in range(1, 4)])
LAYER = "sha256:" + "ab" * 32
MANIFEST = "sha256:" + "cd" * 32
ERRORS = {grpc.StatusCode.NOT_FOUND: SnapshotNotFound, grpc.StatusCode.ALREADY_EXISTS: SnapshotExists,
          grpc.StatusCode.FAILED_PRECONDITION: SnapshotPrecondition, grpc.StatusCode.INVALID_ARGUMENT: SnapshotInvalid}


class HeldLayers:
    """A LayerSource the test drives: each ensure() is recorded, and its future left for the test to settle."""

    def __init__(self, cache: LayerCache):
        self.cache = cache
        self.requests: list[tuple[LayerRequest, Future]] = []
        self.asked = threading.Semaphore(0)

    def ensure(self, request: LayerRequest) -> Future:
        future: Future = Future()
        self.requests.append((request, future))
        self.asked.release()
        return future


class Served:
    """The service on a socket, its event loop in a thread of its own."""

    def __init__(self, root: Path, socket_path: Path):
        self.cache = LayerCache(root / "layers")
        self.snapshotter = OverlaySnapshotter(root / "state", self.cache)
        self.layers = HeldLayers(self.cache)
        self.service = SnapshotsService(self.snapshotter, self.layers)
        self.socket_path = socket_path
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(start_server(self.service, socket_path), self.loop).result(30)
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
        self.service.close()
        self.snapshotter.close()


@pytest.fixture
def served(tmp_path):
    sockets = Path(tempfile.mkdtemp(prefix="fpgrpc-", dir="/tmp"))
    s = Served(tmp_path, sockets / "snapshotter.sock")
    yield s
    s.close()
    shutil.rmtree(sockets)


class GrpcSnapshotter:
    """The snapshotter's methods, each one RPC; status codes become the snapshot errors again."""

    def __init__(self, served: Served):
        self.stub = served.stub
        self.layers = served.cache

    def _call(self, rpc, request):
        try:
            return getattr(self.stub, rpc)(request, metadata=[("containerd-namespace", "default")], timeout=30)
        except grpc.RpcError as e:
            raise ERRORS.get(e.code(), SnapshotError)(None, e.details()) from None

    def prepare(self, key, parent, labels):
        return _mounts(self._call("Prepare", pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)).mounts)

    def view(self, key, parent, labels):
        return _mounts(self._call("View", pb.ViewSnapshotRequest(key=key, parent=parent, labels=labels)).mounts)

    def mounts(self, key):
        return _mounts(self._call("Mounts", pb.MountsRequest(key=key)).mounts)

    def commit(self, name, key, labels):
        self._call("Commit", pb.CommitSnapshotRequest(name=name, key=key, labels=labels))

    def remove(self, key):
        self._call("Remove", pb.RemoveSnapshotRequest(key=key))

    def stat(self, key):
        return _info(self._call("Stat", pb.StatSnapshotRequest(key=key)).info)

    def update(self, info, fieldpaths):
        request = pb.UpdateSnapshotRequest(info=pb.Info(name=info.name, labels=info.labels))
        request.update_mask.paths.extend(fieldpaths)
        return _info(self._call("Update", request).info)

    def usage(self, key):
        answer = self._call("Usage", pb.UsageRequest(key=key))
        return Usage(answer.size, answer.inodes)

    def walk(self, filters=()):
        try:
            return [_info(i) for batch in self.stub.List(pb.ListSnapshotsRequest(filters=filters), timeout=30)
                    for i in batch.info]
        except grpc.RpcError as e:
            raise ERRORS.get(e.code(), SnapshotError)(None, e.details()) from None


def _mounts(mounts) -> list[Mount]:
    return [Mount(m.type, m.source, m.target, tuple(m.options)) for m in mounts]


def _info(i) -> Info:
    return Info(i.name, i.parent, Kind(i.kind), dict(i.labels), i.created_at.ToNanoseconds() / 1e9,
                i.updated_at.ToNanoseconds() / 1e9)


# Committing from the cache is no RPC of its own: the remote path (below) drives it through Prepare.
GRPC_CASES = [c for c in CASES if c.step[0] != "commit_layer" and all(s[0] != "commit_layer" for s in c.setup)]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c.name for c in GRPC_CASES])
def test_error_codes_through_the_socket(served, case):
    sn = GrpcSnapshotter(served)
    for step in case.setup:
        drive(sn, step)
    if case.raises is None:
        drive(sn, case.step)
        return
    with pytest.raises(case.raises):
        drive(sn, case.step)


def test_the_socket_is_for_its_owner_alone(served):
    st = os.stat(served.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert [p.name for p in served.socket_path.parent.iterdir()] == ["snapshotter.sock"]  # no bind directory left


def test_a_second_server_on_a_live_socket_is_refused(served):
    with pytest.raises(Exception, match="another process is serving on it"):
        asyncio.run_coroutine_threadsafe(start_server(served.service, served.socket_path), served.loop).result(30)


def _prepare(served, key, parent, labels):
    return served.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels), timeout=30)


def _remote_labels(chain: str) -> dict[str, str]:
    return {SNAPSHOT_REF: chain, CRI_IMAGE_REF: "registry.test/app:v1", CRI_MANIFEST_DIGEST: MANIFEST,
            CRI_LAYER_DIGEST: LAYER, "containerd.io/snapshot/cri.image-layers": LAYER}


def test_a_cached_layer_is_committed_under_its_chain_id_and_found_as_containerd_looks(served):
    cache_layer(served.cache, CHAINS[0])
    with pytest.raises(grpc.RpcError) as answered:
        _prepare(served, "default/1/extract-1 " + CHAINS[0], "", {SNAPSHOT_REF: CHAINS[0]})
    assert answered.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert served.layers.requests == []  # nothing fetched
    containerd_filter = f'labels."{SNAPSHOT_REF}"=={CHAINS[0]},parent==""'
    found = GrpcSnapshotter(served).walk([containerd_filter])
    assert [(i.name, i.kind, i.labels[SNAPSHOT_REF]) for i in found] == [(CHAINS[0], Kind.COMMITTED, CHAINS[0])]
    assert GrpcSnapshotter(served).walk([f'labels."{SNAPSHOT_REF}"=={CHAINS[0]},parent=="other"']) == []


def test_a_missing_layer_waits_for_its_own_layer_then_is_committed(served):
    with grpc.insecure_channel(f"unix:{served.socket_path}") as channel:
        stub = pb_grpc.SnapshotsStub(channel)
        call = stub.Prepare.future(pb.PrepareSnapshotRequest(key="k8s.io/1/extract-1", parent="",
                                                             labels=_remote_labels(CHAINS[0])), timeout=30)
        assert served.layers.asked.acquire(timeout=30)
        request, future = served.layers.requests[0]
        assert request == LayerRequest(CHAINS[0], "registry.test/app:v1", MANIFEST, LAYER)
        assert not call.done()  # waiting for the layer
        cache_layer(served.cache, CHAINS[0])
        future.set_result(None)
        with pytest.raises(grpc.RpcError) as answered:
            call.result()
        assert answered.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert GrpcSnapshotter(served).stat(CHAINS[0]).kind == Kind.COMMITTED


def test_a_failed_layer_reaches_containerd_as_a_code_naming_the_layer(served):
    call = served.stub.Prepare.future(pb.PrepareSnapshotRequest(key="k8s.io/1/extract-1", parent="",
                                                                labels=_remote_labels(CHAINS[0])), timeout=30)
    assert served.layers.asked.acquire(timeout=30)
    served.layers.requests[0][1].set_exception(DigestMismatch(f"blob {LAYER}", LAYER, "sha256:" + "00" * 32))
    with pytest.raises(grpc.RpcError) as answered:
        call.result()
    assert answered.value.code() == grpc.StatusCode.DATA_LOSS
    assert LAYER in answered.value.details() and CHAINS[0] in answered.value.details()
    assert GrpcSnapshotter(served).walk() == []  # nothing half-made


def test_a_layer_without_image_labels_is_left_to_containerd(served):
    mounts = _prepare(served, "default/1/extract-1 " + CHAINS[0], "", {SNAPSHOT_REF: CHAINS[0]}).mounts
    assert [m.type for m in mounts] == ["bind"] and served.layers.requests == []


def test_a_socket_path_too_long_for_unix_is_refused_naming_it(served, tmp_path):
    too_long = Path("/tmp") / ("d" * 100) / "snapshotter.sock"
    with pytest.raises(Exception, match="too long for a unix socket") as refused:
        asyncio.run_coroutine_threadsafe(start_server(served.service, too_long), served.loop).result(30)
    assert str(too_long) in str(refused.value) and not too_long.parent.exists()
