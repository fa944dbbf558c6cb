"""A small CRI client, as the kubelet calls a container runtime: the image service (``PullImage``,
``ImageStatus``, ``RemoveImage``, ``ListImages``, ``ImageFsInfo``) and the runtime service's
``Version`` and ``Status``, over gRPC on the runtime's unix socket, with the stubs generated from cri-api
(``runtime.v1``, which containerd serves from 1.6 on). A gRPC error becomes a
:class:`clients.ClientError` that quotes its code and details.

Also what tests of a node's containerd share: :func:`node_daemons`, which starts and ends them, and
:func:`runc_lacking`, which learns by trying whether containers run here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import pytest
from clients import BUSYBOX, ClientError, Containerd, busybox_missing

from fastpull.protos.cri.runtime.v1 import api_pb2 as cri
from fastpull.protos.cri.runtime.v1 import api_pb2_grpc as cri_grpc

_Reply = TypeVar("_Reply")

CALL_TIMEOUT = 30.0
"""Seconds any call but a pull may take."""
PULL_TIMEOUT = 300.0
"""Seconds a pull may take (the kubelet's image pull progress deadline is 1 min without progress)."""


class CriError(ClientError):
    """A CRI call failed: ``code`` is the gRPC status code, ``details`` the runtime's message."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        super().__init__(f"CRI {method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class _CriClient:
    """One gRPC channel to ``unix://SOCKET``; a context manager that closes it."""

    def __init__(self, socket_path: str | Path):
        self.socket_path = Path(socket_path)
        # No proxy applies to a unix socket; the option only keeps grpc from reading the proxy variables.
        self._channel = grpc.insecure_channel(f"unix://{self.socket_path.absolute()}",
                                              options=[("grpc.enable_http_proxy", 0)])

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def _call(method: str, rpc: Callable[..., _Reply], request: object, timeout: float) -> _Reply:
        try:
            return rpc(request, timeout=timeout)
        except grpc.RpcError as e:
            # A failed unary call raises a grpc.Call as well: code() and details() are there.
            raise CriError(method, e.code(), e.details() or "") from None  # type: ignore[attr-defined]


def _pull_request(ref: str, auth: Mapping[str, str] | None) -> cri.PullImageRequest:
    return cri.PullImageRequest(image=cri.ImageSpec(image=ref), auth=cri.AuthConfig(**auth) if auth is not None else None)


class CriImages(_CriClient):
    """CRI's ``ImageService`` on ``socket_path`` (containerd's ``--address``)."""

    def __init__(self, socket_path: str | Path):
        super().__init__(socket_path)
        self._stub = cri_grpc.ImageServiceStub(self._channel)

    def pull(self, ref: str, *, auth: Mapping[str, str] | None = None, timeout: float = PULL_TIMEOUT) -> str:
        """``PullImage`` as the kubelet sends it; returns the image reference the runtime answers
        (containerd: the image ID, ``sha256:`` of the config). ``auth`` holds fields of
        ``AuthConfig`` (``username``, ``password``, ``auth``, ``identity_token``, ``registry_token``,
        ``server_address``), as the kubelet fills it from a pull secret."""
        return self._call("PullImage", self._stub.PullImage, _pull_request(ref, auth), timeout).image_ref

    def pull_started(self, ref: str, *, timeout: float = PULL_TIMEOUT) -> grpc.Future:
        """``PullImage`` under way: its future, which the caller may ``cancel()`` (a client giving up,
        as containerd sees a kubelet's deadline pass: its context cancelled)."""
        return self._stub.PullImage.future(_pull_request(ref, None), timeout=timeout)

    def status(self, ref: str, *, timeout: float = CALL_TIMEOUT) -> cri.Image | None:
        """``ImageStatus``: the image ``ref`` names (a tag, a digest reference or an image ID), or
        None when the runtime has no such image (CRI answers that with an empty reply, not an error)."""
        reply = self._call("ImageStatus", self._stub.ImageStatus,
                           cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout)
        return reply.image if reply.HasField("image") else None

    def remove(self, ref: str, *, timeout: float = CALL_TIMEOUT) -> None:
        """``RemoveImage``: removes the image and every reference to it; removing an image that is
        not there succeeds, as CRI specifies."""
        self._call("RemoveImage", self._stub.RemoveImage, cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)),
                   timeout)

    def list(self, *, timeout: float = CALL_TIMEOUT) -> list[cri.Image]:
        """``ListImages`` without a filter."""
        return list(self._call("ListImages", self._stub.ListImages, cri.ListImagesRequest(), timeout).images)

    def fs_info(self, *, timeout: float = CALL_TIMEOUT) -> list[cri.FilesystemUsage]:
        """``ImageFsInfo``: the image filesystems (for containerd, its snapshotter's directory) and
        their usage as the runtime last sampled it."""
        return list(self._call("ImageFsInfo", self._stub.ImageFsInfo, cri.ImageFsInfoRequest(), timeout)
                    .image_filesystems)


class CriRuntime(_CriClient):
    """CRI's ``RuntimeService`` on ``socket_path``; only ``Version`` and ``Status`` so far."""

    def __init__(self, socket_path: str | Path):
        super().__init__(socket_path)
        self._stub = cri_grpc.RuntimeServiceStub(self._channel)

    def version(self, *, timeout: float = CALL_TIMEOUT) -> cri.VersionResponse:
        """``Version``: the runtime's name and version and the CRI version it speaks (``v1``)."""
        return self._call("Version", self._stub.Version, cri.VersionRequest(version="v1"), timeout)

    def status(self, *, timeout: float = CALL_TIMEOUT) -> tuple[dict[str, tuple[bool, str]], dict[str, Any]]:
        """Verbose ``Status``: the runtime's conditions (``RuntimeReady``, ``NetworkReady``: type ->
        ``(status, reason + message)``), and its info, each value parsed as JSON where it is JSON
        (containerd's ``config`` is the CRI plugin's configuration as it runs; ``lastCNILoadStatus``,
        text, says why it has no network)."""
        reply = self._call("Status", self._stub.Status, cri.StatusRequest(verbose=True), timeout)
        conditions = {c.type: (c.status, f"{c.reason}: {c.message}".strip(": ")) for c in reply.status.conditions}
        return conditions, {key: _json_or_text(value) for key, value in reply.info.items()}


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


# ---- fixtures and probes for tests of a node's containerd ---------------------------------------


@contextlib.contextmanager
def node_daemons(directory: Path) -> Iterator[Callable[..., Containerd]]:
    """Starts private containerd daemons as a node runs them: ``start(**options)`` takes
    :class:`clients.Containerd`'s options, ``cri=True`` unless told otherwise, each in a new
    ``directory/node-N``; ends them by PID on exit. Skips the test, quoting containerd, where one
    cannot start (not root, no containerd), and where CRI would pull into overlayfs that containerd
    cannot load here. A test module makes it a fixture::

        @pytest.fixture
        def start_cri_containerd(tmp_path):
            with node_daemons(tmp_path) as start:
                yield start
    """
    started: list[Containerd] = []

    def start(**options: Any) -> Containerd:
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            pytest.skip("containerd is not installed: run scripts/install.sh")
        if os.geteuid() != 0:
            pytest.skip("containerd needs root (it mounts snapshots and owns its root directory)")
        options.setdefault("cri", True)
        daemon = Containerd(directory / f"node-{len(started)}", **options)
        try:
            daemon.start()
        except ClientError as e:
            pytest.skip(f"cannot start containerd: {e}")
        started.append(daemon)
        if daemon.cri and daemon.cri_snapshotter == "overlayfs" and daemon.snapshotter != "overlayfs":
            pytest.skip("containerd cannot load its overlayfs snapshotter here (CRI pulls into it)")
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


@functools.cache
def runc_lacking() -> str | None:
    """Why containers cannot run on this machine, None if they can: found by running ``busybox true``
    with runc directly (its default spec: new pid, mount, network, ipc and uts namespaces, cgroups),
    so a containerd or snapshotter fault is never mistaken for the machine's."""
    if shutil.which("runc") is None:
        return "runc is not installed: run scripts/install.sh"
    if (missing := busybox_missing()) is not None:
        return missing
    if os.geteuid() != 0:
        return "runc needs root here (the tests run rootful containers)"
    with tempfile.TemporaryDirectory(prefix="fastpull-runc-probe-") as scratch:
        bundle = Path(scratch, "bundle")
        (bundle / "rootfs").mkdir(parents=True)
        shutil.copy2(BUSYBOX, bundle / "rootfs" / "busybox")
        done = subprocess.run(["runc", "spec", "--bundle", str(bundle)], capture_output=True, text=True)
        if done.returncode != 0:
            return f"runc spec failed: {done.stderr.strip()}"
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"].update(args=["/busybox", "true"], terminal=False)
        (bundle / "config.json").write_text(json.dumps(spec))
        probe = f"fastpull-probe-{os.getpid()}"
        state = Path(scratch, "state")
        done = subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(bundle), probe],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            subprocess.run(["runc", "--root", str(state), "delete", "--force", probe], capture_output=True)
            return f"runc cannot run a container here: {done.stderr.strip() or f'exit status {done.returncode}'}"
    return None


def skip_unless_containers_run() -> None:
    """Skip the test, saying why, where :func:`runc_lacking` finds that containers cannot run."""
    if (reason := runc_lacking()) is not None:
        pytest.skip(reason)
