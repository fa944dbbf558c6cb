"""Pulls through an HTTP proxy named by the environment: a real ``tinyproxy`` on loopback for
plain HTTP and CONNECT, ``NO_PROXY``, and a recording tunnel that shows what a proxy is told."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from fastpull import FetchOptions, Puller
from fastpull.errors import TransferError
from fastpull.http.transport import Transport
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.testbed.registry import LocalRegistry
from fastpull.testbed.tls import server_certificate
from fastpull.testbed.tokenserver import TokenServer

MiB = 1 << 20
OPTS = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4)
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                   "no_proxy", "NO_PROXY")


class TinyProxy:
    """``tinyproxy`` in the foreground on a free 127.0.0.1 port, logging each request line."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("tinyproxy") is None:
            pytest.fail("tinyproxy is not installed: run scripts/install.sh")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = workdir / "tinyproxy.log"
        config = workdir / "tinyproxy.conf"
        # No ConnectPort line: CONNECT is allowed to any port (the registries' are random).
        config.write_text(f'Port {self.port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 60\nMaxClients 200\n'
                          f'LogFile "{self.log}"\nLogLevel Connect\nDisableViaHeader Yes\n')
        self._proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        wait_until(self._listening, f"tinyproxy listens on 127.0.0.1:{self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """``METHOD TARGET`` of every request the proxy received, in order."""
        text = self.log.read_text() if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): (\S+ \S+)", text)

    def _listening(self) -> bool:
        assert self._proc.poll() is None, "tinyproxy exited"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


@pytest.fixture
def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TinyProxy]:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    server = TinyProxy(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _pull(ref: str, layout: Path) -> None:
    with Puller(OPTS) as puller:
        puller.pull(ref, layout)


def test_plain_http_pull_goes_through_the_proxy_unless_no_proxy_says_otherwise(
    proxy, registry, image_cache, tmp_path, monkeypatch
):
    image = build_image([LayerSpec(2 * MiB), LayerSpec(MiB)], image_cache / "proxy-plain", seed=51)
    push_image(registry.url, "proxied/plain", "v1", image)
    monkeypatch.setenv("http_proxy", proxy.url)
    _pull(f"{registry.host}/proxied/plain:v1", tmp_path / "layout")
    seen = proxy.requests()
    base = f"GET http://{registry.host}/v2/proxied/plain"
    assert f"GET http://{registry.host}/v2/" in seen and f"{base}/manifests/v1" in seen  # the registry client
    for layer in image.layers:  # and the engine's ranged GETs
        assert seen.count(f"{base}/blobs/{layer.digest}") >= layer.size // OPTS.chunk_size

    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.0/8")
    _pull(f"{registry.host}/proxied/plain:v1", tmp_path / "direct")
    assert proxy.requests() == seen
    assert (tmp_path / "direct" / "index.json").exists()


def test_tls_pull_tunnels_through_the_proxy(proxy, image_cache, tmp_path, monkeypatch):
    cert, key = server_certificate(tmp_path)
    image = build_image([LayerSpec(2 * MiB)], image_cache / "proxy-tls", seed=52)
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(cert))
    with LocalRegistry(tmp_path / "storage", extra_config=tls) as registry:
        push_image(registry.url, "proxied/tls", "v1", image)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        _pull(f"{registry.host}/proxied/tls:v1", tmp_path / "layout")
    connects = proxy.requests()
    assert connects and set(connects) == {f"CONNECT {registry.host}"}
    # One tunnel for the registry client, more for the engine's parallel ranges.
    assert len(connects) >= 2


def test_upper_case_http_proxy_is_honoured_as_docker_does(proxy, registry, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # libcurl reads only http_proxy
    assert Transport().request("GET", f"{registry.url}/v2/", max_body=1 << 16, timeout=10).status == 200
    assert proxy.requests() == [f"GET {registry.url}/v2/"]
    monkeypatch.setenv("REQUEST_METHOD", "GET")  # as a CGI program: a client's "Proxy:" header may have set it
    assert Transport().request("GET", f"{registry.url}/v2/", max_body=1 << 16, timeout=10).status == 200
    assert len(proxy.requests()) == 1


def test_upper_case_http_proxy_carries_the_engines_ranges_too(proxy, registry, image_cache, tmp_path, monkeypatch):
    image = build_image([LayerSpec(2 * MiB)], image_cache / "proxy-upper", seed=52)
    push_image(registry.url, "proxied/upper", "v1", image)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    _pull(f"{registry.host}/proxied/upper:v1", tmp_path / "layout")
    blob = f"GET http://{registry.host}/v2/proxied/upper/blobs/{image.layers[0].digest}"
    assert proxy.requests().count(blob) >= image.layers[0].size // OPTS.chunk_size


class RecordingTunnel:
    """A CONNECT proxy on 127.0.0.1 that records the head of every request it is sent."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            head = b""
            while b"\r\n\r\n" not in head and (data := client.recv(4096)):
                head += data
            self.heads.append(head.decode("latin-1"))
            host, _, port = head.split()[1].decode().rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)))
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                client.close()
                continue
            self._sockets += (client, upstream)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            for a, b in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=_pump, args=(a, b), daemon=True)
                thread.start()
                self._threads.append(thread)

    def close(self) -> None:
        self._server.close()
        for s in self._sockets:
            s.close()
        for thread in self._threads:
            thread.join(timeout=10)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the tunnel is closing


def test_a_proxy_never_sees_the_registry_authorization(image_cache, tmp_path, monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cert, key = server_certificate(tmp_path)
    image = build_image([LayerSpec(2 * MiB)], image_cache / "proxy-auth", seed=53)
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(cert))
    tunnel = RecordingTunnel()
    try:
        with (
            TokenServer(tmp_path, {"alice": "wonderland"}) as tokens,
            LocalRegistry(tmp_path / "storage", auth=tokens.auth_config(), extra_config=tls) as registry,
        ):
            push_image(registry.url, "team/secret", "v1", image,
                       token_getter=lambda scope: tokens.issue([scope], "alice"))
            config = tmp_path / "docker"
            config.mkdir()
            alice = base64.b64encode(b"alice:wonderland").decode()
            (config / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": alice}}}))
            monkeypatch.setenv("DOCKER_CONFIG", str(config))
            monkeypatch.setenv("https_proxy", tunnel.url)
            _pull(f"{registry.host}/team/secret:v1", tmp_path / "layout")
            with pytest.raises(TransferError):  # and for a host the proxy refuses, nothing either
                Transport().request("GET", "https://registry.invalid/v2/", {"Authorization": "Bearer secret"},
                                    max_body=1024, timeout=10, attempts=1)
    finally:
        tunnel.close()
    assert len(tunnel.heads) >= 3 and all(h.startswith("CONNECT ") for h in tunnel.heads)
    assert not [h for h in tunnel.heads if "authorization" in h.lower()], tunnel.heads
