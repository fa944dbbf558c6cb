"""A registry (API v2, read side) that injects the faults the real test registry cannot.

``FaultRegistry`` serves manifests and blobs held in memory or on disk over HTTP/1.1 keep-alive
on 127.0.0.x, and lets a test make any single digest misbehave: ignore Range, corrupt bytes, fail,
reset or close mid-body, lie about Content-Length, trickle, stall, redirect to another host, or
demand a bearer token (and let it expire mid-blob). Every request is logged so a test can check
what a client asked for and what it got.

Blobs are served under every repository name. Faults are set per digest (a manifest's digest
works too), apply to requests that start after they are set, and stay until cleared;
the ``*_first`` knobs count down and then stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from fastpull.testbed.images import BuiltImage

CHUNK = 64 * 1024
"""Largest piece read from a blob and written to a socket at once."""

CORRUPT_STRIDE = 4096
"""``corrupt`` inverts every byte whose blob offset is a multiple of this."""

TOKEN_PATH = "/token"
SERVICE = "faultregistry"

_ROUTE = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN", 416: "RANGE_INVALID", 429: "TOOMANYREQUESTS"}


@dataclass(slots=True)
class Served:
    """One request as the server answered it; ``bytes_sent`` grows while the body is written."""

    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int
    authorization: bool
    client_port: int
    digest: str | None
    arrived: float = 0.0
    """``time.monotonic()`` when the request was answered."""


@dataclass(frozen=True, slots=True)
class _Content:
    """Immutable bytes of one blob or manifest, in memory or in a file."""

    digest: str
    size: int
    media_type: str
    data: bytes | None = None
    path: Path | None = None

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` in pieces of at most ``CHUNK`` bytes."""
        if self.data is not None:
            for pos in range(start, end, CHUNK):
                yield self.data[pos : min(pos + CHUNK, end)]
            return
        assert self.path is not None
        if start >= end:
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            pos = start
            while True:
                piece = f.read(min(CHUNK, end - pos))
                if not piece:
                    raise OSError(f"{self.path} shrank below {end} bytes while served")
                pos += len(piece)
                if pos >= end:
                    break
                yield piece
        # The last piece leaves after the file is closed: a client holding every byte (a test's
        # descriptor-leak check) never sees the file still open here.
        yield piece


@dataclass(slots=True)
class _Faults:
    """Knobs of one digest; counters are consumed under the registry lock."""

    ignore_range: bool = False
    corrupt: bool = False
    corrupt_at: int | None = None
    corrupt_left: int | None = None
    fail_left: int = 0
    fail_status: int = 503
    retry_after: int | str | None = None
    cut_left: int = 0
    cut_after: int | None = None
    cut_reset: bool = True
    length_delta: int = 0
    length_left: int | None = None
    expire_token_in: int | None = None
    slow_rate: float | None = None
    slow_starts: frozenset[int] | None = None
    stall_bytes: int | None = None
    stall_left: int | None = None
    redirect: FaultRegistry | None = None


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one request for one digest gets, decided atomically when it arrives."""

    redirect: str | None = None
    signature: int | None = None
    fail: tuple[int, int | str | None] | None = None
    ignore_range: bool = False
    corrupt: bool = False
    cut_after: int | None = None
    cut: Literal["reset", "close"] | None = None
    length_delta: int = 0
    stall_after: int | None = None
    slow_rate: float | None = None
    slow_starts: frozenset[int] | None = None


def _corrupted(piece: bytes, pos: int) -> bytes:
    """``piece`` (at blob offset ``pos``) with every byte at a multiple of ``CORRUPT_STRIDE`` inverted."""
    buf = bytearray(piece)
    for i in range(-pos % CORRUPT_STRIDE, len(buf), CORRUPT_STRIDE):
        buf[i] ^= 0xFF
    return bytes(buf)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | Literal[False] | None:
    """``(start, end_exclusive)`` for one satisfiable byte range, ``None`` to ignore it, ``False`` if unsatisfiable."""
    m = _RANGE.match(header or "")
    if m is None or m.group(1) == m.group(2) == "":
        return None  # absent, multi-range or malformed: RFC 9110 lets a server ignore it
    first, last = m.group(1), m.group(2)
    if first == "":
        suffix = int(last)
        return (max(0, size - suffix), size) if suffix and size else False
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return False
    return start, size if last == "" else min(int(last) + 1, size)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], registry: FaultRegistry):
        self.registry = registry
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS lookup of the address."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet; the registry keeps its own log."""

    def setup(self) -> None:
        super().setup()
        self.server.registry._register(self.connection)

    def finish(self) -> None:
        self.server.registry._unregister(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        reg = self.server.registry
        try:
            path = urlsplit(self.path).path
            if path == TOKEN_PATH:
                self._serve_token()
                return
            route = _ROUTE.match(path)
            scope = f"repository:{route['repo']}:pull" if route else None
            if not reg._authorized(self.headers.get("Authorization")):
                challenge = f'Bearer realm="{reg.url}{TOKEN_PATH}",service="{SERVICE}"'
                self._send_error(401, "authentication required", {"WWW-Authenticate": challenge + (f',scope="{scope}"' if scope else "")})
            elif path in ("/v2", "/v2/"):
                self._send_json(200, {}, {"Docker-Distribution-API-Version": "registry/2.0"}, None)
            elif route is None:
                self._send_error(404, f"no route for {path}", code="NOT_FOUND")
            else:
                self._serve_content(route["kind"], route["repo"], route["ref"])
        except OSError:  # the peer went away or the registry is stopping
            self.close_connection = True
        if reg._stopping.is_set():
            self.close_connection = True

    def _serve_token(self) -> None:
        token = self.server.registry._issue_token()
        if token is None:
            self._send_error(404, "this registry does not require a token", code="NOT_FOUND")
        else:
            self._send_json(200, {"token": token, "access_token": token, "expires_in": 300}, {}, None)

    def _serve_content(self, kind: str, repo: str, ref: str) -> None:
        reg = self.server.registry
        content = reg._lookup(kind, repo, ref)
        if content is None:
            code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
            self._send_error(404, f"{kind[:-1]} {ref} unknown to repository {repo}", code=code)
            return
        if kind == "blobs" and not reg._take_signature(urlsplit(self.path).query):
            # As S3 answers a presigned URL past its expiry.
            body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            record = self._begin(403, {"Content-Type": "application/xml"}, len(body), content.digest)
            self._write(record, body)
            return
        plan = reg._take_plan(content.digest, kind == "blobs", self.command == "GET")
        if plan.redirect is not None:
            signed = "" if plan.signature is None else f"?X-Amz-Signature={plan.signature}"
            headers = {"Location": f"{plan.redirect}/v2/{repo}/blobs/{content.digest}{signed}"}
            self._send_json(307, {}, headers, content.digest)
            return
        if plan.fail is not None:
            status, retry_after = plan.fail
            headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
            self._send_error(status, f"injected failure for {content.digest}", headers, content.digest)
            return
        headers = {
            "Content-Type": content.media_type,
            "Docker-Content-Digest": content.digest,
            "Accept-Ranges": "bytes",
        }
        span = None if plan.ignore_range or self.command == "HEAD" else _parse_range(self.headers.get("Range"), content.size)
        if span is False:
            unsatisfiable = {"Content-Range": f"bytes */{content.size}"}
            self._send_error(416, f"range not satisfiable for {content.digest}", unsatisfiable, content.digest)
            return
        if isinstance(span, tuple):
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{content.size}"
            status = 206
        else:
            start, end, status = 0, content.size, 200
        record = self._begin(status, headers, max(0, end - start + plan.length_delta), content.digest)
        if self.command == "HEAD":
            return
        cut = end
        if plan.cut is not None:
            cut = start + (plan.cut_after if plan.cut_after is not None else (end - start) // 2)
        elif plan.stall_after is not None:
            cut = start + plan.stall_after
        cut = min(cut, end)
        slowed = plan.slow_starts is None or start in plan.slow_starts
        flip = reg._take_corruption(content.digest, start, cut)
        self._stream(record, content, start, cut, plan.corrupt, flip, plan.slow_rate if slowed else None)
        if plan.cut == "reset":
            self._reset()
        elif plan.stall_after is not None:
            self._hang()
        elif plan.cut is not None or plan.length_delta:
            self.close_connection = True  # an orderly close (FIN) where the client expects more, or after extra bytes

    def _stream(
        self, record: Served, content: _Content, start: int, end: int, corrupt: bool, flip: int | None, rate: float | None
    ) -> None:
        """Write ``[start, end)`` of ``content`` (the byte at blob offset ``flip`` inverted), paced to ``rate`` bytes/s if given."""
        stopping = self.server.registry._stopping
        step = CHUNK if rate is None else max(1, min(CHUNK, int(rate / 50)))
        began = time.monotonic()
        pos = start
        for piece in content.read(start, end):
            if corrupt:
                piece = _corrupted(piece, pos)
            if flip is not None and pos <= flip < pos + len(piece):
                piece = piece[: flip - pos] + bytes([piece[flip - pos] ^ 0xFF]) + piece[flip - pos + 1 :]
            for i in range(0, len(piece), step):
                if rate is not None and stopping.wait(max(0.0, began + record.bytes_sent / rate - time.monotonic())):
                    raise ConnectionAbortedError("registry stopping")
                self._write(record, piece[i : i + step])
            pos += len(piece)

    def _begin(self, status: int, headers: dict[str, str], length: int, digest: str | None) -> Served:
        """Log the request, then send the status line and headers for a body of ``length`` bytes."""
        record = Served(
            method=self.command,
            path=self.path,
            range=self.headers.get("Range"),
            status=status,
            bytes_sent=0,
            authorization="Authorization" in self.headers,
            client_port=self.client_address[1],
            digest=digest,
            arrived=time.monotonic(),
        )
        self.server.registry._log_request(record)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        return record

    def _write(self, record: Served, data: bytes) -> None:
        """Send ``data``; counted first so a client never sees more than ``bytes_sent`` says."""
        record.bytes_sent += len(data)
        try:
            self.wfile.write(data)
        except OSError:
            record.bytes_sent -= len(data)
            raise

    def _send_json(self, status: int, body: object, headers: dict[str, str], digest: str | None) -> None:
        data = json.dumps(body).encode()
        record = self._begin(status, {"Content-Type": "application/json", **headers}, len(data), digest)
        if self.command != "HEAD":
            self._write(record, data)

    def _send_error(
        self, status: int, message: str, headers: dict[str, str] | None = None, digest: str | None = None, *, code: str | None = None
    ) -> None:
        code = code or _ERROR_CODES.get(status, "UNAVAILABLE" if status >= 500 else "UNKNOWN")
        self._send_json(status, {"errors": [{"code": code, "message": message}]}, headers or {}, digest)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0) instead of the orderly FIN socketserver would send."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(self.connection.detach())
        self.close_connection = True

    def _hang(self) -> None:
        """Send nothing more until the peer closes the connection or the registry stops, then close it."""
        stopping = self.server.registry._stopping
        while not stopping.wait(0.05):
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                break
        self.close_connection = True


class FaultRegistry:
    """A fault-injecting registry on ``host`` (a free port unless ``port`` is given).

    Serves from construction until ``stop()``; use it as a context manager. All methods are thread-safe.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._contents: dict[str, _Content] = {}
        self._tags: dict[tuple[str, str], str] = {}
        self._manifests: dict[str, set[str]] = {}
        self._faults: dict[str, _Faults] = {}
        self._log: list[Served] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._token_base: str | None = None
        self._token_generation = 0
        self._token_requests = 0
        self._signatures_issued = 0
        self._signed_uses: int | None = None  # blob requests only with a signature, honoured this often
        self._signature_uses: dict[str, int] = {}
        self._httpd = _Server((host, port), self)
        self.host = f"{host}:{self._httpd.server_address[1]}"
        """``host:port`` as it appears in image references."""
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name=f"faultregistry {self.host}", daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, close every connection (stalled ones included) and join handlers for at most ``timeout`` s."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            connections = list(self._connections.items())
        self._httpd.shutdown()
        self._httpd.server_close()
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in [self._thread, *(t for _, t in connections)]:
            thread.join(max(0.0, deadline - time.monotonic()))

    # content

    def add_blob(self, data_or_path: bytes | str | os.PathLike[str]) -> str:
        """Serve bytes, or a file streamed from disk (which must not change), as a blob; return its digest."""
        if isinstance(data_or_path, bytes):
            data = data_or_path
            content = _Content("sha256:" + hashlib.sha256(data).hexdigest(), len(data), "application/octet-stream", data=data)
        else:
            path = Path(data_or_path)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while piece := f.read(1 << 20):
                    h.update(piece)
            content = _Content("sha256:" + h.hexdigest(), path.stat().st_size, "application/octet-stream", path=path)
        with self._lock:
            self._contents.setdefault(content.digest, content)
        return content.digest

    def add_manifest(self, repo: str, tag: str, body: bytes, media_type: str) -> str:
        """Serve ``body`` as ``repo:tag`` and ``repo@digest`` with ``media_type``; return its digest."""
        content = _Content("sha256:" + hashlib.sha256(body).hexdigest(), len(body), media_type, data=body)
        with self._lock:
            self._contents[content.digest] = content
            self._tags[repo, tag] = content.digest
            self._manifests.setdefault(repo, set()).add(content.digest)
        return content.digest

    def add_image(self, repo: str, tag: str, image: BuiltImage) -> None:
        """Serve a testbed image: its blobs from their files, its manifest as ``repo:tag``."""
        for desc in image.blobs:
            self.add_blob(image.blob_path(desc.digest))
        self.add_manifest(repo, tag, image.manifest, image.media_type)

    # fault knobs

    def ignore_range(self, digest: str, on: bool = True) -> None:
        """Answer 200 with the whole body even when a Range was asked."""
        with self._lock:
            self._knobs(digest).ignore_range = on

    def corrupt(self, digest: str, on: bool = True, *, offset: int | None = None, first: int | None = None) -> None:
        """Serve the digest's bytes with every byte at an offset multiple of ``CORRUPT_STRIDE`` inverted.

        With ``offset``, only the byte at that blob offset is inverted, in every response that
        carries it or in the next ``first`` of them.
        """
        if (offset is not None and offset < 0) or (first is not None and (first < 0 or offset is None)):
            raise ValueError(f"corrupt needs offset >= 0 and first >= 0 (with an offset), got {offset}, {first}")
        with self._lock:
            knobs = self._knobs(digest)
            if offset is None:
                knobs.corrupt = on
            else:
                knobs.corrupt_at, knobs.corrupt_left = (offset, first) if on else (None, None)

    def fail_first(self, digest: str, n: int, status: int = 503, retry_after: int | str | None = None) -> None:
        """Answer the next ``n`` requests (GET or HEAD) with ``status``, a JSON error and ``Retry-After`` if given."""
        if n < 0 or not 400 <= status <= 599:
            raise ValueError(f"fail_first needs n >= 0 and an error status, got n={n}, status={status}")
        with self._lock:
            knobs = self._knobs(digest)
            knobs.fail_left, knobs.fail_status, knobs.retry_after = n, status, retry_after

    def reset_first(self, digest: str, n: int, after: int | None = None) -> None:
        """Make the next ``n`` GETs send ``after`` body bytes (default half) and then reset the connection (RST)."""
        self._cut_first(digest, n, after, reset=True)

    def truncate_first(self, digest: str, n: int, after: int | None = None) -> None:
        """Make the next ``n`` GETs send ``after`` body bytes (default half) and then close the
        connection in order (FIN): a body shorter than its Content-Length."""
        self._cut_first(digest, n, after, reset=False)

    def _cut_first(self, digest: str, n: int, after: int | None, *, reset: bool) -> None:
        if n < 0 or (after is not None and after < 0):
            raise ValueError(f"cutting a body needs n >= 0 and after >= 0, got n={n}, after={after}")
        with self._lock:
            knobs = self._knobs(digest)
            knobs.cut_left, knobs.cut_after, knobs.cut_reset = n, after, reset

    def wrong_length(self, digest: str, delta: int, first: int | None = None) -> None:
        """Send ``Content-Length`` off by ``delta`` with the true body, on every GET or the next
        ``first``: the connection then closes (too long: the client waits for bytes that never come;
        too short: the bytes past it are garbage to a keep-alive client). ``delta=0`` lifts it."""
        if first is not None and first < 0:
            raise ValueError(f"wrong_length needs first >= 0, got {first}")
        with self._lock:
            knobs = self._knobs(digest)
            knobs.length_delta, knobs.length_left = delta, first

    def slow(self, digest: str, rate_bytes_per_s: float | None, ranges: Iterable[int] | None = None) -> None:
        """Pace GET bodies to ``rate_bytes_per_s`` (``None`` lifts it), only for responses starting at offsets in ``ranges`` if given."""
        if rate_bytes_per_s is not None and rate_bytes_per_s <= 0:
            raise ValueError(f"slow needs a positive rate, got {rate_bytes_per_s}")
        with self._lock:
            knobs = self._knobs(digest)
            knobs.slow_rate = rate_bytes_per_s
            knobs.slow_starts = None if ranges is None else frozenset(ranges)

    def stall_after(self, digest: str, nbytes: int | None, first: int | None = None) -> None:
        """Make GETs send ``nbytes`` of the body, then hang open until the client closes or the registry stops.

        Applies to every GET, or to the next ``first`` ones; ``nbytes=None`` lifts it.
        """
        if (nbytes is not None and nbytes < 0) or (first is not None and first < 0):
            raise ValueError(f"stall_after needs nbytes >= 0 and first >= 0, got {nbytes}, {first}")
        with self._lock:
            knobs = self._knobs(digest)
            knobs.stall_bytes, knobs.stall_left = nbytes, first

    def redirect_to(self, digest: str, other: FaultRegistry | None, signed_uses: int | None = None) -> None:
        """Answer blob GET and HEAD with 307 to the same path on ``other``, which then serves the blob (``None`` lifts it).

        With ``signed_uses``, each redirect carries a fresh signature (``?X-Amz-Signature=N``) that
        ``other`` honours for that many blob requests, then answers 403 "Request has expired", as
        a presigned S3/CDN URL does once it expires.
        """
        if other is self:
            raise ValueError("a registry cannot redirect to itself")
        if signed_uses is not None and signed_uses < 1:
            raise ValueError(f"signed_uses must be at least 1, got {signed_uses}")
        if other is not None:
            with self._lock:
                content = self._content(digest)
            with other._lock:
                other._contents.setdefault(digest, content)
                other._signed_uses = signed_uses
        with self._lock:
            self._knobs(digest).redirect = other

    def clear_faults(self, digest: str | None = None) -> None:
        """Lift every knob of ``digest``, or of all digests."""
        with self._lock:
            if digest is None:
                self._faults.clear()
            else:
                self._faults.pop(digest, None)

    def require_bearer(self, token: str | None) -> None:
        """Answer every ``/v2/`` request 401 with a Bearer challenge unless it carries ``token``; ``None`` lifts it.

        The challenge's realm is ``GET /token`` on this server, which issues the currently valid token.
        """
        with self._lock:
            self._token_base, self._token_generation = token, 0

    def expire_token(self) -> None:
        """Invalidate the current token; the token endpoint issues a fresh one from now on."""
        with self._lock:
            if self._token_base is None:
                raise ValueError("expire_token needs require_bearer first")
            self._token_generation += 1

    def expire_token_after(self, digest: str, n: int) -> None:
        """Invalidate the current token as the ``n``-th GET of ``digest`` from now is answered
        (that GET is served; the requests after it are refused until a fresh token is fetched)."""
        if n < 1:
            raise ValueError(f"expire_token_after needs n >= 1, got {n}")
        with self._lock:
            if self._token_base is None:
                raise ValueError("expire_token_after needs require_bearer first")
            self._knobs(digest).expire_token_in = n

    @property
    def token(self) -> str | None:
        """The token requests must carry now, or ``None`` if none is required."""
        with self._lock:
            return self._current_token()

    @property
    def token_requests(self) -> int:
        """How many times the token endpoint was asked for a token."""
        with self._lock:
            return self._token_requests

    # accounting

    @property
    def log(self) -> list[Served]:
        """Requests served so far, in arrival order (a copy; records in flight still update ``bytes_sent``)."""
        with self._lock:
            return list(self._log)

    def requests_for(self, digest: str) -> list[Served]:
        """Requests that resolved to ``digest`` (manifests by tag included)."""
        with self._lock:
            return [r for r in self._log if r.digest == digest]

    def bytes_served(self, digest: str) -> int:
        """Body bytes of ``digest`` written in 200 and 206 responses."""
        with self._lock:
            return sum(r.bytes_sent for r in self._log if r.digest == digest and r.status in (200, 206))

    def clear(self) -> None:
        """Forget the request log and the token request count."""
        with self._lock:
            self._log.clear()
            self._token_requests = 0

    # used by the handler threads

    def _content(self, digest: str) -> _Content:
        try:
            return self._contents[digest]
        except KeyError:
            raise ValueError(f"no blob or manifest {digest} in {self.url}") from None

    def _knobs(self, digest: str) -> _Faults:
        self._content(digest)
        return self._faults.setdefault(digest, _Faults())

    def _current_token(self) -> str | None:
        if self._token_base is None or self._token_generation == 0:
            return self._token_base
        return f"{self._token_base}.{self._token_generation}"

    def _authorized(self, authorization: str | None) -> bool:
        with self._lock:
            token = self._current_token()
        return token is None or authorization == f"Bearer {token}"

    def _issue_token(self) -> str | None:
        with self._lock:
            self._token_requests += 1
            return self._current_token()

    def _lookup(self, kind: str, repo: str, ref: str) -> _Content | None:
        with self._lock:
            if kind == "blobs":
                return self._contents.get(ref)
            digest = self._tags.get((repo, ref), ref)
            return self._contents[digest] if digest in self._manifests.get(repo, ()) else None

    def _take_plan(self, digest: str, blob: bool, get: bool) -> _Plan:
        """Decide one request's faults, consuming counters."""
        with self._lock:
            k = self._faults.get(digest)
            if k is None:
                return _Plan()
            if blob and k.redirect is not None:
                self._signatures_issued += 1
                signed = k.redirect._signed_uses is not None
                return _Plan(redirect=k.redirect.url, signature=self._signatures_issued if signed else None)
            if k.fail_left:
                k.fail_left -= 1
                return _Plan(fail=(k.fail_status, k.retry_after))
            if get and k.expire_token_in is not None:
                k.expire_token_in -= 1
                if k.expire_token_in == 0:
                    k.expire_token_in = None
                    self._token_generation += 1
            cut = get and k.cut_left > 0
            if cut:
                k.cut_left -= 1
            stall = None
            if get and not cut and k.stall_bytes is not None and k.stall_left != 0:
                stall = k.stall_bytes
                if k.stall_left is not None:
                    k.stall_left -= 1
            delta = k.length_delta if get and k.length_left != 0 else 0
            if delta and k.length_left is not None:
                k.length_left -= 1
            return _Plan(
                ignore_range=k.ignore_range,
                corrupt=k.corrupt,
                cut=("reset" if k.cut_reset else "close") if cut else None,
                cut_after=k.cut_after,
                length_delta=delta,
                stall_after=stall,
                slow_rate=k.slow_rate,
                slow_starts=k.slow_starts,
            )

    def _take_corruption(self, digest: str, start: int, end: int) -> int | None:
        """The blob offset to invert in a response carrying ``[start, end)``, consuming a use."""
        with self._lock:
            k = self._faults.get(digest)
            if k is None or k.corrupt_at is None or not start <= k.corrupt_at < end or k.corrupt_left == 0:
                return None
            if k.corrupt_left is not None:
                k.corrupt_left -= 1
            return k.corrupt_at

    def _take_signature(self, query: str) -> bool:
        """Whether a blob request with ``query`` may be served: always, unless signatures are
        required; then its signature must be present and not used up (each use counts)."""
        with self._lock:
            if self._signed_uses is None:
                return True
            signature = dict(p.partition("=")[::2] for p in query.split("&")).get("X-Amz-Signature")
            if signature is None or self._signature_uses.get(signature, 0) >= self._signed_uses:
                return False
            self._signature_uses[signature] = self._signature_uses.get(signature, 0) + 1
            return True

    def _log_request(self, record: Served) -> None:
        with self._lock:
            self._log.append(record)

    def _register(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections[sock] = threading.current_thread()
            stopping = self._stopping.is_set()
        if stopping:  # accepted just as stop() ran: let the handler see EOF at once
            sock.shutdown(socket.SHUT_RDWR)

    def _unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.pop(sock, None)
