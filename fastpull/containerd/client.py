"""A client of containerd's own gRPC API on its unix socket: snapshots, content, images and leases.

Every call names its namespace (the ``containerd-namespace`` metadata header); inside
:meth:`Containerd.lease` it also names the lease (``containerd-lease``), which keeps whatever the
calls make (snapshots, content) from containerd's garbage collector until the lease goes. A gRPC
failure becomes one :class:`~fastpull.errors.ContainerdError` line naming the socket, the call and
its object.
"""

from __future__ import annotations

import datetime
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import grpc
from google.protobuf import field_mask_pb2

from fastpull.errors import ContainerdError
from fastpull.protos.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from fastpull.protos.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from fastpull.protos.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from fastpull.protos.containerd.types import descriptor_pb2, mount_pb2

CRI_NAMESPACE = "k8s.io"
"""The namespace of the images, snapshots and containers of containerd's CRI plugin (kubelet's)."""
LEASE_EXPIRES = datetime.timedelta(hours=24)
"""How long a lease outlives a client killed before it deleted the lease (containerd's own pulls take 24 h)."""
CALL_TIMEOUT = 120.0
"""Seconds a unary call may take (a snapshot's removal deletes its directory)."""


class Containerd:
    """containerd's API on ``socket`` in ``namespace``, the snapshots of its ``snapshotter``.

    Keys and names are containerd's: a snapshot is found by key (active, view) or name (committed,
    its ChainID by convention), content by digest, an image by name. A context manager that closes
    the channel."""

    def __init__(self, socket: str | os.PathLike[str], namespace: str = CRI_NAMESPACE, *,
                 snapshotter: str = "overlayfs"):
        self.socket = os.path.abspath(socket)
        self.namespace = namespace
        self.snapshotter = snapshotter
        try:
            if not stat.S_ISSOCK(os.stat(self.socket).st_mode):
                raise ContainerdError(self.socket, "not a unix socket")
        except OSError as e:
            raise ContainerdError(self.socket, e.strerror or str(e)) from None
        # No proxy applies to a unix socket; the option keeps grpc from reading the proxy variables.
        self._channel = grpc.insecure_channel(f"unix:{self.socket}", options=[
            ("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 16 << 20)])
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (("containerd-namespace", namespace),)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, rpc, request, *, timeout: float | None = CALL_TIMEOUT, missing_ok: bool = False,
              exists_ok: bool = False):
        """``rpc(request)``; None where NOT_FOUND is ``missing_ok`` or ALREADY_EXISTS ``exists_ok``."""
        try:
            return rpc(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if (missing_ok and code == grpc.StatusCode.NOT_FOUND) or (
                    exists_ok and code == grpc.StatusCode.ALREADY_EXISTS):
                return None
            raise self._error(what, code, e.details() or "") from None  # type: ignore[attr-defined]

    def _error(self, what: str, code: grpc.StatusCode, details: str) -> ContainerdError:
        details = " ".join(details.split())
        if code == grpc.StatusCode.UNAVAILABLE:
            return ContainerdError(self.socket, f"cannot reach containerd (is it running?): {details}")
        if "snapshotter not loaded" in details:
            return ContainerdError(self.socket, f"it has no {self.snapshotter} snapshotter ({details})")
        return ContainerdError(self.socket, f"{what}: {code.name}: {details}")

    @contextmanager
    def lease(self) -> Iterator[str]:
        """A new lease that every call in the block names; deleted on the way out, so what the block
        made and no image references is collected by containerd's next GC. One this process could not
        delete (killed) expires after :data:`LEASE_EXPIRES`."""
        expires = datetime.datetime.now(datetime.timezone.utc) + LEASE_EXPIRES
        lease_id = f"fastpull-{os.getpid()}-{secrets.token_hex(6)}"
        self._call(f"create lease {lease_id}", self._leases.Create, leases_pb2.CreateRequest(
            id=lease_id, labels={"containerd.io/gc.expire": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        outer = self._metadata
        self._metadata = (*outer, ("containerd-lease", lease_id))
        try:
            yield lease_id
        finally:
            self._metadata = outer
            self._call(f"delete lease {lease_id}", self._leases.Delete, leases_pb2.DeleteRequest(id=lease_id),
                       missing_ok=True)

    # ---- snapshots ----------------------------------------------------------------------------

    def has_snapshot(self, key: str) -> bool:
        return self._call(f"stat snapshot {key}", self._snapshots.Stat, snapshots_pb2.StatSnapshotRequest(
            snapshotter=self.snapshotter, key=key), missing_ok=True) is not None

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[mount_pb2.Mount]:
        """A new active snapshot ``key`` on ``parent`` (empty: none); its mounts."""
        return list(self._call(f"prepare snapshot {key!r} on {parent or 'nothing'}", self._snapshots.Prepare,
                               snapshots_pb2.PrepareSnapshotRequest(snapshotter=self.snapshotter, key=key,
                                                                    parent=parent, labels=labels)).mounts)

    def view(self, key: str, parent: str) -> list[mount_pb2.Mount]:
        """A new read-only view ``key`` of the committed ``parent``; its mounts."""
        return list(self._call(f"view snapshot {parent}", self._snapshots.View, snapshots_pb2.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent)).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> bool:
        """Commit the active ``key`` as ``name``; False if ``name`` exists already (``key`` stays)."""
        return self._call(f"commit snapshot {name}", self._snapshots.Commit, snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=labels), exists_ok=True) is not None

    def remove_snapshot(self, key: str) -> None:
        self._call(f"remove snapshot {key!r}", self._snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(
            snapshotter=self.snapshotter, key=key), missing_ok=True)

    # ---- content -----------------------------------------------------------------------------

    def put_content(self, digest: str, data: bytes, labels: Mapping[str, str]) -> None:
        """Store the blob ``digest`` (a document: at most a few MiB) with ``labels``; containerd checks
        the digest. A blob it has already only gets the labels."""
        if self._call(f"content {digest}", self._content.Info, content_pb2.InfoRequest(digest=digest),
                      missing_ok=True) is not None:
            self._label_content(digest, labels)
            return
        commit = content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=f"fastpull-{secrets.token_hex(6)}",
                                                 total=len(data), expected=digest, data=data, labels=labels)
        try:
            for _ in self._content.Write(iter([commit]), metadata=self._metadata, timeout=CALL_TIMEOUT):
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
                raise self._error(f"write content {digest}", e.code(), e.details() or "") from None  # type: ignore[attr-defined]
            self._label_content(digest, labels)  # written meanwhile by another client

    def _label_content(self, digest: str, labels: Mapping[str, str]) -> None:
        self._call(f"label content {digest}", self._content.Update, content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])))

    # ---- images ------------------------------------------------------------------------------

    def put_image(self, name: str, media_type: str, digest: str, size: int, labels: Mapping[str, str]) -> None:
        """Create the image ``name`` pointing at the descriptor, or point the existing one there (and
        set ``labels`` on it)."""
        image = images_pb2.Image(name=name, labels=labels, target=descriptor_pb2.Descriptor(
            media_type=media_type, digest=digest, size=size))
        if self._call(f"create image {name}", self._images.Create, images_pb2.CreateImageRequest(image=image),
                      exists_ok=True) is None:
            self._call(f"update image {name}", self._images.Update, images_pb2.UpdateImageRequest(
                image=image, update_mask=field_mask_pb2.FieldMask(paths=["target", *(f"labels.{k}" for k in labels)])))
