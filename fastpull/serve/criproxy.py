"""A CRI image-service proxy in front of containerd: what kubelet's ``--image-service-endpoint`` names.

Every ``runtime.v1.ImageService`` call goes to containerd as its bytes came, and containerd's answer
(or its status code and details) goes back. While containerd serves a ``PullImage``, the request's
``AuthConfig`` is held in memory for its image's registry and repository, so that the snapshotter's
layer pulls (which that very pull asks for) use it before the node's own credentials; it is dropped
when the pull returns, and never logged nor written.

On a node without fastpull's snapshotter, the proxy may first import the image into containerd's
own stores itself (:class:`~fastpull.serve.imports.ContainerdImports`, with those credentials): the
``PullImage`` forwarded then finds it present. A failed import is logged, and containerd pulls the
image itself.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from fastpull.errors import FastpullError, quote
from fastpull.oci.reference import parse_reference
from fastpull.protos.cri.runtime.v1 import api_pb2 as cri
from fastpull.registry.auth import Credentials
from fastpull.serve.imports import ContainerdImports
from fastpull.sockets import start_unix_server

log = logging.getLogger(__name__)

SERVICE = cri.DESCRIPTOR.services_by_name["ImageService"]
MAX_MESSAGE = 16 << 20
"""Bytes of a message either way, as the kubelet allows."""


def credentials_of(auth: cri.AuthConfig) -> Credentials | None:
    """The credentials in a CRI ``AuthConfig`` (``auth`` is base64 ``user:password``, as containerd
    reads it), None if it holds none or a malformed ``auth`` (containerd then refuses the pull)."""
    username, password = auth.username, auth.password
    if auth.auth:
        try:
            username, sep, password = base64.b64decode(auth.auth).decode().partition(":")
        except ValueError:
            return None
        if not sep:
            return None
    if not (username or password or auth.identity_token or auth.registry_token):
        return None
    return Credentials(username, password, auth.identity_token, auth.registry_token)


class PullCredentials:
    """The credentials of the CRI pulls in flight, by (registry, repository): a
    :data:`~fastpull.registry.auth.CredentialsProvider`. Thread-safe."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], list[Credentials]] = {}
        self._lock = threading.Lock()

    def __call__(self, registry: str, repository: str | None) -> Credentials | None:
        with self._lock:
            held = self._held.get((registry, repository or ""))
            return held[-1] if held else None

    @contextlib.contextmanager
    def holding(self, request: cri.PullImageRequest) -> Iterator[None]:
        """Hold the request's credentials while the block runs (nothing if it has none, or names no
        image that parses: containerd will say what is wrong)."""
        credentials = credentials_of(request.auth)
        try:
            ref = parse_reference(request.image.image)
        except FastpullError:
            credentials = None
        if credentials is None:
            yield
            return
        key = (ref.registry, ref.repository)
        with self._lock:
            self._held.setdefault(key, []).append(credentials)
        try:
            yield
        finally:
            with self._lock:
                held = self._held[key]
                held.remove(credentials)
                if not held:
                    del self._held[key]


class CriProxy:
    """``runtime.v1.ImageService`` on the unix socket ``socket_path``, forwarded to containerd's socket
    ``upstream``; with ``imports``, each pulled image is imported there first."""

    def __init__(self, socket_path: Path, upstream: Path, credentials: PullCredentials,
                 imports: ContainerdImports | None = None):
        self.socket_path = socket_path
        self.upstream = upstream
        self.credentials = credentials
        self.imports = imports
        self._server: grpc.aio.Server | None = None
        # No proxy applies to a unix socket; the option only keeps grpc from reading the proxy variables.
        self._channel = grpc.aio.insecure_channel(
            f"unix:{upstream}", options=[("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", MAX_MESSAGE)])

    def handler(self) -> grpc.GenericRpcHandler:
        """Every method of the service, its messages as bytes (no deserializers: forwarded unchanged)."""
        handlers = {}
        for method in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{method.name}"
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(self._streaming(path))
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(self._unary(path, method.name))
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    def _unary(self, path: str, name: str):
        call = self._channel.unary_unary(path)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            pull = _pull_request(request) if name == "PullImage" else None
            try:
                with contextlib.nullcontext() if pull is None else self.credentials.holding(pull):
                    if pull is not None and self.imports is not None:
                        await self._import(pull.image.image)
                    return await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return forward

    async def _import(self, image: str) -> None:
        """Import ``image`` into containerd; a failure leaves the pull to containerd (which says
        what is wrong if it fails too). A caller that gives up leaves the import going."""
        try:
            await self.imports.ensure(image)
        except FastpullError as e:
            log.warning("PullImage %s: not imported by fastpull (%s): containerd pulls it itself", quote(image), e)

    def _streaming(self, path: str):
        call = self._channel.unary_stream(path)

        async def forward(request: bytes, context: grpc.aio.ServicerContext):
            try:
                async for reply in call(request, timeout=context.time_remaining()):
                    yield reply
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return forward

    @classmethod
    async def start(cls, socket_path: Path, upstream: Path, credentials: PullCredentials,
                    imports: ContainerdImports | None = None) -> CriProxy:
        """Serve the proxy on the unix socket ``socket_path`` (mode 0600), forwarding to ``upstream``."""
        proxy = cls(socket_path, upstream, credentials, imports)
        try:
            proxy._server = await start_unix_server(lambda server: server.add_generic_rpc_handlers((proxy.handler(),)),
                                                    socket_path, f"CRI image-service proxy (to unix:{upstream})")
        except BaseException:
            await proxy.stop(None)
            raise
        return proxy

    async def stop(self, grace: float | None) -> None:
        """Stop taking calls; calls in progress get ``grace`` seconds."""
        if self._server is not None:
            await self._server.stop(grace)
            self.socket_path.unlink(missing_ok=True)
        await self._channel.close()


def _pull_request(request: bytes) -> cri.PullImageRequest | None:
    """A ``PullImage``'s request, None if it does not parse (containerd will refuse it)."""
    try:
        return cri.PullImageRequest.FromString(request)
    except DecodeError:
        return None
