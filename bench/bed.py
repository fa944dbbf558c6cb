"""A far-registry bench bed: a network namespace whose loopback is shaped like an S3/ECR-backed registry.

One TCP connection from the server gets at most ``per_flow_mbit``; all of them together get at most
``link_mbit``. Everything runs inside a namespace this module creates, so the host's interfaces are
never touched::

    with ThrottledBed(per_flow_mbit=200, link_mbit=2000) as bed:
        with bed.registry(tmp / "storage") as registry:     # docker-registry on 127.0.0.1:5000 inside
            bed.call(push_image, registry.url, "bench/app", "latest", image)
            bed.run(["curl", "-so", "/dev/null", registry.url + "/v2/"])

How the shaping works (the kernel here has ``htb``, ``tbf`` and ``u32``, but no ``netem``/``fq``/``sfq``)::

    lo root qdisc  htb 1:  (default 0: unclassified packets -- requests, ACKs -- go unshaped)
      class 1:1    rate = ceil = link                                   the link
        class 1:100 .. 1:1ff   rate = link/B, ceil = per_flow            one leaf per hash bucket
    filter u32 (prio 1): TCP with sport == a server port -> hash table 2: (B = 256 buckets)
                         keyed on bits 1..8 of the dport (the client's port); bucket i -> 1:(0x100+i)

A packet from the server to a client lands in the leaf of its client port, so each connection is capped
at ``per_flow`` (its ceil) and the leaves together at ``link`` (they borrow from 1:1 beyond their tiny
``rate``; a leaf's own rate is link/B so that the rates sum to the link and HTB never lends past it).
Linux hands out the ephemeral ports of connections to one destination in steps of 2 from a random
start, so bits 1..8 give up to 256 concurrent connections distinct buckets; two connections whose ports
collide share one leaf's cap (``collisions()`` tells).

Latency: ``rtt_ms > 0`` puts a small userspace TCP proxy (``python bench/bed.py proxy``) in front of
the registry inside the namespace: it forwards each direction's bytes
``rtt_ms / 2`` after reading them. That delays every request/response turn (time to first byte) by the
RTT, but TCP itself still runs at loopback RTT, so slow start and loss recovery over a long path are
NOT emulated. See bench/README.md.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fastpull") is None:  # not installed: use this tree
    sys.path.insert(0, str(REPO))

from fastpull.testbed.registry import LocalRegistry

T = TypeVar("T")

REGISTRY_PORT = 5000
"""Where clients reach the registry inside the bed (the proxy's port when ``rtt_ms`` > 0)."""
BACKEND_PORT = 5001
"""The registry's own port behind the delay proxy (unshaped: only the proxy's replies are)."""
REDIRECTOR_HOST = "127.0.0.2"
"""Where the redirecting front listens (port ``REGISTRY_PORT``: its replies are shaped too)."""
BUCKETS = 256
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def compile_package(root: Path = REPO) -> None:
    """Byte-compile the ``fastpull`` package under ``root``, as ``pip install`` does: with
    ``PYTHONDONTWRITEBYTECODE`` set (or an editable install never run before), every measured
    process would otherwise compile the package again, ~30 ms of start-up each."""
    import compileall

    if not compileall.compile_dir(str(root / "fastpull"), quiet=1):
        raise BedError(f"cannot byte-compile {root / 'fastpull'}")


class BedError(RuntimeError):
    """The bed could not be set up, or refused to (name taken, not root, not lo)."""


@dataclass(frozen=True)
class CurlStreams:
    """What :meth:`ThrottledBed.curl_streams` measured: the wall of the slowest and, per stream,
    bytes, Mbit/s and local port."""

    wall: float
    sizes: list[int]
    mbit: list[float]
    ports: list[int]


class ThrottledBed:
    """A network namespace with a shaped loopback; a context manager that removes all it made.

    ``per_flow_mbit`` caps each server->client TCP connection, ``link_mbit`` all of them together
    (megabits per second, 10^6). ``server_ports`` are the ports whose replies are shaped (the registry's,
    or the delay proxy's). ``device`` exists only to refuse anything but the namespace's ``lo``.
    """

    def __init__(
        self,
        per_flow_mbit: float,
        link_mbit: float,
        rtt_ms: float = 0,
        name: str = "fpbench",
        *,
        server_ports: Sequence[int] = (REGISTRY_PORT,),
        device: str = "lo",
    ):
        if device != "lo":
            raise BedError(f"the bed shapes only its own namespace's lo, not {device!r}")
        if not _NAME.match(name):
            raise BedError(f"namespace name must match {_NAME.pattern}, got {name!r}")
        if per_flow_mbit <= 0 or link_mbit <= 0:
            raise ValueError("per_flow_mbit and link_mbit must be greater than zero")
        if per_flow_mbit > link_mbit:
            raise ValueError(f"per_flow_mbit ({per_flow_mbit}) must not exceed link_mbit ({link_mbit})")
        if rtt_ms < 0:
            raise ValueError("rtt_ms must not be negative")
        if not server_ports or not all(0 < p < 65536 for p in server_ports):
            raise ValueError(f"server_ports must be TCP ports, got {server_ports!r}")
        self.per_flow_mbit = per_flow_mbit
        self.link_mbit = link_mbit
        self.rtt_ms = rtt_ms
        self.name = name
        self.server_ports = tuple(server_ports)
        self._procs: list[subprocess.Popen[Any]] = []
        self._created = False

    # ---- life cycle -------------------------------------------------------------------------

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def __enter__(self) -> Self:
        if os.geteuid() != 0:
            raise BedError("the bed needs root (network namespaces and tc)")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise BedError(f"the bed needs {tool!r} (iproute2)")
        if os.path.exists(f"/run/netns/{self.name}") or self.name in _netns_names():
            raise BedError(f"network namespace {self.name!r} exists already; refusing to touch it")
        _check(["ip", "netns", "add", self.name])
        self._created = True
        try:
            _check(["ip", "-n", self.name, "link", "set", "lo", "up"])
            self._shape()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """End the processes started through the bed (by PID), then delete the namespace with its qdiscs."""
        for proc in reversed(self._procs):
            _end(proc)
        self._procs.clear()
        if not self._created:
            return
        # Anything still in the namespace was started by us (the namespace is ours and new): end it by PID.
        for pid in self.pids():
            if pid != os.getpid():
                print(f"bed {self.name}: ending leftover process {pid}", file=sys.stderr)
                _kill_pid(pid)
        subprocess.run(["ip", "netns", "del", self.name], check=False)
        self._created = False

    def pids(self) -> list[int]:
        """Processes inside the namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]

    # ---- shaping ------------------------------------------------------------------------------

    def _shape(self) -> None:
        link = _bits(self.link_mbit)
        per_flow = _bits(self.per_flow_mbit)
        leaf_rate = max(link // BUCKETS, 8000)
        # Loopback sends GSO packets of up to 64 KiB: bursts and quanta must hold a few of them.
        lines = [
            "qdisc add dev lo root handle 1: htb default 0 r2q 1000",
            (f"class add dev lo parent 1: classid 1:1 htb rate {link}bit ceil {link}bit "
             f"burst {_burst(link)} cburst {_burst(link)}"),
        ]
        for i in range(BUCKETS):
            lines.append(
                f"class add dev lo parent 1:1 classid 1:{0x100 + i:x} htb rate {leaf_rate}bit "
                f"ceil {per_flow}bit burst {_burst(leaf_rate)} cburst {_burst(per_flow)} quantum 131072"
            )
        lines.append("filter add dev lo parent 1: prio 1 handle 2: protocol ip u32 divisor 256")
        for i in range(BUCKETS):
            lines.append(
                f"filter add dev lo parent 1: prio 1 protocol ip u32 ht 2:{i:x}: match u32 0 0 flowid 1:{0x100 + i:x}"
            )
        for port in self.server_ports:
            # The word at offset 20 of an option-less IPv4 header is TCP sport<<16 | dport.
            lines.append(
                "filter add dev lo parent 1: prio 1 protocol ip u32 ht 800:: "
                f"match ip protocol 6 0xff match ip sport {port} 0xffff "
                "hashkey mask 0x000001fe at 20 link 2:"
            )
        subprocess.run(["tc", "-n", self.name, "-batch", "-"], input="\n".join(lines) + "\n",
                       text=True, check=True, capture_output=True)

    def class_bytes(self) -> dict[int, int]:
        """Bytes sent per leaf (bucket index -> bytes) since the bed came up."""
        out = _check(["tc", "-n", self.name, "-s", "class", "show", "dev", "lo"])
        sent: dict[int, int] = {}
        for m in re.finditer(r"class htb 1:([0-9a-f]+) parent 1:1 .*?\n\s*Sent (\d+) bytes", out, re.DOTALL):
            minor = int(m[1], 16)
            if minor >= 0x100:
                sent[minor - 0x100] = int(m[2])
        return sent

    def qdiscs(self) -> str:
        """``tc qdisc show dev lo`` inside the namespace."""
        return _check(["tc", "-n", self.name, "qdisc", "show", "dev", "lo"])

    @staticmethod
    def bucket(client_port: int) -> int:
        """The leaf (hash bucket) a client port's replies are shaped in."""
        return (client_port >> 1) & (BUCKETS - 1)

    @classmethod
    def collisions(cls, client_ports: Sequence[int]) -> int:
        """How many of these client ports share a leaf with an earlier one."""
        return len(client_ports) - len({cls.bucket(p) for p in client_ports})

    # ---- running things inside ----------------------------------------------------------------

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` of ``cmd`` inside the namespace."""
        return subprocess.run([*self.prefix, *cmd], check=kwargs.pop("check", False), **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` of ``cmd`` inside the namespace; ended by PID when the bed closes.

        ``ip netns exec`` execs the command, so the Popen's PID is the command's own.
        """
        proc = subprocess.Popen([*self.prefix, *cmd], **kwargs)
        self._procs.append(proc)
        return proc

    def curl_streams(self, url: str, n: int) -> CurlStreams:
        """``n`` curl downloads of ``url`` at once inside the namespace (to /dev/null)."""
        started = time.perf_counter()
        fmt = "%{size_download} %{speed_download} %{local_port}"
        procs = [self.popen(["curl", "-sf", "-o", "/dev/null", "-w", fmt, url], stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        outs = [p.communicate()[0].split() for p in procs]
        wall = time.perf_counter() - started
        for p in procs:
            self.forget(p)
            if p.returncode != 0:
                raise RuntimeError(f"curl failed ({p.returncode}) on {url}")
        return CurlStreams(
            wall=wall,
            sizes=[int(o[0]) for o in outs],
            mbit=[float(o[1]) * 8 / 1e6 for o in outs],
            ports=[int(o[2]) for o in outs],
        )

    def forget(self, proc: subprocess.Popen[Any]) -> None:
        """Stop tracking a process that was waited for."""
        if proc in self._procs:
            self._procs.remove(proc)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a thread that has entered the namespace; return its result.

        Sockets opened by ``fn`` live in the namespace, and so do processes it starts.
        """
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                box["value"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e

        thread = threading.Thread(target=target, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    @contextmanager
    def registry(self, storage_dir: Path, *, tls: bool = False, **kwargs: Any) -> Iterator[BedRegistry]:
        """A ``docker-registry`` serving ``storage_dir`` inside the bed, started and probed from inside.

        ``LocalRegistry`` probes readiness from the calling process, so ``start()`` runs through
        :meth:`call`. With ``rtt_ms`` the registry listens on ``BACKEND_PORT`` behind the delay proxy,
        and the yielded ``.url`` / ``.host`` name the proxy. With ``tls`` it serves HTTPS (HTTP/2 by
        ALPN, as distribution does) with a self-signed certificate for 127.0.0.1: the yielded
        ``.ca_file`` verifies it (the proxy passes TLS through untouched).
        """
        port = BACKEND_PORT if self.rtt_ms else REGISTRY_PORT
        ca_file = None
        if tls:
            ca_file, kwargs["extra_config"] = tls_config(Path(storage_dir).resolve().parent / "tls", "127.0.0.1",
                                                         kwargs.pop("extra_config", None))
        reg = LocalRegistry(storage_dir, host="127.0.0.1", port=port, command_prefix=self.prefix, **kwargs)
        self.call(reg.start)
        proxy = None
        try:
            if self.rtt_ms:
                proxy = self.popen(
                    [sys.executable, str(Path(__file__).resolve()), "proxy",
                     "--listen", f"127.0.0.1:{REGISTRY_PORT}", "--target", f"127.0.0.1:{port}",
                     "--delay-ms", str(self.rtt_ms / 2)],
                    stdout=subprocess.PIPE, text=True,
                )
                assert proxy.stdout is not None
                if proxy.stdout.readline().strip() != "ready":
                    raise BedError("delay proxy did not start")
            yield BedRegistry(self, reg, f"127.0.0.1:{REGISTRY_PORT}", ca_file)
        finally:
            if proxy is not None:
                _end(proxy)
                self.forget(proxy)
            reg.stop()


    @contextmanager
    def redirector(self, registry: BedRegistry, host: str = REDIRECTOR_HOST) -> Iterator[BedRedirector]:
        """A registry front on ``host``:5000 that answers every blob GET/HEAD with a 307 to
        ``registry`` (as Docker Hub, GHCR and ECR send blobs to a CDN or S3 on another host, with a
        signed URL) and passes everything else to it. Speaks TLS when ``registry`` does; its replies
        are shaped like the registry's and wait ``rtt_ms`` each (the delay proxy is not in front)."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "redirect", "--listen", f"{host}:{REGISTRY_PORT}",
               "--origin", registry.url, "--delay-ms", str(self.rtt_ms)]
        ca_file = None
        if registry.ca_file:
            from fastpull.testbed.tls import server_certificate

            cert_dir = Path(registry.ca_file).parent / "redirector"
            cert_dir.mkdir(exist_ok=True)
            cert, key = server_certificate(cert_dir, host)
            bundle = cert_dir / "ca-bundle.pem"
            bundle.write_bytes(Path(registry.ca_file).read_bytes() + cert.read_bytes())
            ca_file = str(bundle)
            cmd += ["--cert", str(cert), "--key", str(key)]
        proc = self.popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise BedError("redirector did not start")
            yield BedRedirector(f"{host}:{REGISTRY_PORT}", registry, ca_file)
        finally:
            _end(proc)
            self.forget(proc)


@dataclass(frozen=True)
class BedRedirector:
    """A redirecting registry front: clients pull ``host``; ``ca_file`` verifies it and its target."""

    host: str
    target: BedRegistry
    ca_file: str | None


class BedRegistry:
    """A registry inside a bed: ``host``/``url`` as clients inside reach it; ``local`` is the process."""

    def __init__(self, bed: ThrottledBed, local: LocalRegistry, host: str, ca_file: str | None = None):
        self.bed = bed
        self.local = local
        self.host = host
        self.ca_file = ca_file
        """The CA bundle that verifies an HTTPS registry; None when it speaks plain HTTP."""
        self.url = f"{'https' if ca_file else 'http'}://{host}"

    @property
    def pid(self) -> int | None:
        return self.local.pid

    def served(self) -> list[Any]:
        """``LocalRegistry.served()``, asked from inside the namespace."""
        return self.bed.call(self.local.served)

    def clear_served(self) -> None:
        self.bed.call(self.local.clear_served)


def tls_config(cert_dir: Path, host: str, extra_config: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """A self-signed certificate for ``host`` written to ``cert_dir``: (the CA file that verifies it,
    ``extra_config`` for a ``LocalRegistry`` with distribution's ``http.tls`` serving it)."""
    from fastpull.testbed.tls import server_certificate

    cert_dir.mkdir(parents=True, exist_ok=True)
    cert, key = server_certificate(cert_dir, host)
    extra = extra_config or {}
    return str(cert), {**extra, "http": {**extra.get("http", {}), "tls": {"certificate": str(cert), "key": str(key)}}}


def trust(ca_file: str | None) -> None:
    """Make this process and the tools it starts (fastpull, curl, the pusher) verify with ``ca_file``,
    the bed's self-signed certificates; nothing for a plain-HTTP registry (None)."""
    if ca_file:
        os.environ["SSL_CERT_FILE"] = os.environ["CURL_CA_BUNDLE"] = ca_file


def _bits(mbit: float) -> int:
    return int(mbit * 1_000_000)


def _burst(rate_bits: int) -> int:
    """Bucket depth in bytes: 1 ms at the rate, and at least four 64 KiB GSO packets."""
    return max(rate_bits // 8 // 1000, 4 * 65536)


def _check(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BedError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _end(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            time.sleep(0.05)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- the delay proxy (``python bench/bed.py proxy ...``, run inside the namespace) -----------------

_PROXY_READ = 256 * 1024
_PROXY_QUEUE = 16 << 20
"""Bytes one direction may hold back; must exceed per_flow x delay, or the proxy caps throughput."""


def _serve_proxy(listen: str, target: str, delay_s: float) -> None:
    """Accept on ``listen``, connect each client to ``target``, forward each direction ``delay_s`` late."""
    import asyncio
    import collections

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        held = 0
        more = asyncio.Event()
        room = asyncio.Event()
        room.set()
        done = False

        async def drain_out() -> None:
            nonlocal held
            while True:
                while not queue:
                    if done:
                        return
                    more.clear()
                    await more.wait()
                due, data = queue.popleft()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                held -= len(data)
                if held < _PROXY_QUEUE:
                    room.set()

        sender = asyncio.create_task(drain_out())
        try:
            while True:
                data = await reader.read(_PROXY_READ)
                if not data:
                    break
                queue.append((loop.time() + delay_s, data))
                held += len(data)
                more.set()
                if held >= _PROXY_QUEUE:
                    room.clear()
                    await room.wait()
        except ConnectionError:
            pass
        finally:
            done = True
            more.set()
            try:
                await sender
                if writer.can_write_eof():
                    writer.write_eof()
            except (ConnectionError, OSError):
                sender.cancel()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = target.rsplit(":", 1)
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
        finally:
            client_w.close()
            server_w.close()

    async def main() -> None:
        host, port = listen.rsplit(":", 1)
        server = await asyncio.start_server(handle, host, int(port), limit=_PROXY_READ)
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


# ---- the redirecting front (``python bench/bed.py redirect ...``, run inside the namespace) ---------


def _serve_redirector(listen: str, origin: str, delay_s: float, cert: str | None, key: str | None) -> None:
    """Answer blob GET/HEAD with 307 to ``origin`` (a fresh signature in the query each time, which
    the distribution registry ignores); forward every other request to ``origin`` and relay its answer."""
    import http.client
    import itertools
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    target = urlsplit(origin)
    signatures = itertools.count(1)
    forwarded = ("Accept", "Authorization", "Range")
    relayed = ("Content-Type", "Docker-Content-Digest", "Docker-Distribution-Api-Version", "Www-Authenticate",
               "Location")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else a delayed ACK holds each small answer ~40 ms

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(delay_s)
            if re.match(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$", self.path):
                self.send_response(307)
                self.send_header("Location", f"{origin}{self.path}?X-Amz-Signature={next(signatures)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if target.scheme == "https":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    target.netloc, context=ssl._create_unverified_context(), timeout=30)
            else:
                conn = http.client.HTTPConnection(target.netloc, timeout=30)
            headers = {k: v for k in forwarded if (v := self.headers.get(k))}
            conn.request(self.command, self.path, headers=headers)
            reply = conn.getresponse()
            body = reply.read()
            conn.close()
            self.send_response(reply.status)
            for name in relayed:
                for value in reply.headers.get_all(name) or ():
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else
                                                   reply.headers.get("Content-Length", "0")))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_GET

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # the default 5 drops SYNs of a burst of connections: 1 s retransmits

    host, port = listen.rsplit(":", 1)
    server = Server((host, int(port)), Handler)
    if cert and key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="bench bed helpers")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("proxy", help="TCP proxy that delays each direction (run inside the namespace)")
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to each direction")
    r = sub.add_parser("redirect", help="registry front that redirects blobs (run inside the namespace)")
    r.add_argument("--listen", required=True)
    r.add_argument("--origin", required=True, help="URL of the registry behind it (and the redirects' target)")
    r.add_argument("--delay-ms", type=float, default=0, help="wait before each answer (a round trip)")
    r.add_argument("--cert")
    r.add_argument("--key")
    args = ap.parse_args()
    if args.command == "proxy":
        _serve_proxy(args.listen, args.target, args.delay_ms / 1000)
    else:
        _serve_redirector(args.listen, args.origin, args.delay_ms / 1000, args.cert, args.key)
