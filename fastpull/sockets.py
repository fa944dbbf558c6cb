"""gRPC servers on unix sockets, mode 0600: the snapshotter's and the CRI proxy's."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc

from fastpull.errors import FastpullError

log = logging.getLogger(__name__)

_SUN_PATH_MAX = 107
"""Bytes of a unix socket's path (``sun_path`` holds 108 with the terminating NUL)."""


async def start_unix_server(add: Callable[[grpc.aio.Server], None], socket_path: Path, what: str) -> grpc.aio.Server:
    """A gRPC server, its services added by ``add(server)``, on the unix socket ``socket_path``, mode
    0600 (the caller's user: root on a node). A stale socket is replaced; one another process still
    answers on is refused. ``what`` names the server in errors and in the log."""
    socket_path = Path(os.path.abspath(socket_path))
    # Bound inside a private directory (``.fpXXXXXXXX/s`` beside it) and moved into place once its
    # mode is 0600, so no one can connect while it is briefly open to all.
    if len(os.fsencode(socket_path.parent)) + len("/.fpXXXXXXXX/s") > _SUN_PATH_MAX:
        raise _cannot_listen(what, socket_path, f"too long for a unix socket (its directory may take at most "
                                                f"{_SUN_PATH_MAX - len('/.fpXXXXXXXX/s')} bytes)")
    if _answers(socket_path):
        raise _cannot_listen(what, socket_path, "another process is serving on it")
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
    add(server)
    private = None
    try:
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=".fp", dir=socket_path.parent))
        bound = private / "s"
        try:
            server.add_insecure_port(f"unix:{bound}")
        except RuntimeError:  # grpc says only that binding failed
            raise _cannot_listen(what, socket_path, "gRPC could not bind it") from None
        await server.start()
        os.chmod(bound, 0o600)
        os.replace(bound, socket_path)
    except OSError as e:
        await server.stop(None)
        raise _cannot_listen(what, socket_path, e.strerror or str(e)) from None
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)  # empty once the socket moved
    log.info("%s serving on unix:%s", what, socket_path)
    return server


def _cannot_listen(what: str, socket_path: Path, why: str) -> FastpullError:
    return FastpullError(f"cannot serve the {what} on unix:{socket_path}: {why}")


def _answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True
