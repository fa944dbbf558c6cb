"""RegistryClient against a real distribution registry (anonymous, htpasswd, token auth), and the
pycurl transport under it (redirects, retries, limits, TLS verification)."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import ssl
import tarfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from fastpull.errors import AuthError, DigestMismatch, ManifestError, PlatformNotFound, RegistryError, TransferError
from fastpull.http.policy import SSL_CONNECT_ERROR, RetryPolicy
from fastpull.http.transport import Transport
from fastpull.oci import manifest as m
from fastpull.oci.manifest import Platform, digest_of
from fastpull.oci.reference import Reference, parse_reference
from fastpull.registry.auth import Credentials
from fastpull.registry.client import RegistryClient
from fastpull.testbed.registry import LocalRegistry
from fastpull.testbed.tls import server_certificate
from fastpull.testbed.tokenserver import TokenServer

AMD64 = Platform.parse("linux/amd64")
Reply = tuple[int, dict[str, str] | list[tuple[str, str]], bytes]
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=2.0)


# --- transport ------------------------------------------------------------------------------------


@dataclass
class Scripted:
    """An HTTP server on 127.0.0.1 whose handler is a function of the request; records requests."""

    respond: Callable[[BaseHTTPRequestHandler], Reply]
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                scripted.seen.append((self.path, self.headers.get("Authorization")))
                status, headers, body = scripted.respond(self)
                self.send_response(status)
                items = list(headers.items() if isinstance(headers, dict) else headers)
                for k, v in items:
                    self.send_header(k, v)
                if "Transfer-Encoding" not in dict(items):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                scripted.seen.append((f"<unparsed request: {code}>", None))  # e.g. a TLS hello on plain HTTP
                super().send_error(code, message, explain)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def process_request(self, request, client_address) -> None:  # in serve_forever's thread
                with scripted._lock:
                    scripted._open += 1
                super().process_request(request, client_address)

            def shutdown_request(self, request) -> None:  # in the handler's thread, once it is done
                super().shutdown_request(request)
                with scripted._lock:
                    scripted._open -= 1

        self._lock = threading.Lock()
        self._open = 0
        self.httpd = Server(("127.0.0.1", 0), Handler)
        if self.tls:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def idle(self) -> bool:
        """Whether every connection accepted so far has been handled and closed: ``seen`` is complete
        for what a client did before (a client hears nothing of a connection before it is accepted)."""
        with self._lock:
            return self._open == 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(respond: Callable[[BaseHTTPRequestHandler], Reply], **kw: Any) -> Scripted:
        servers.append(Scripted(respond, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def ok(body: bytes = b"ok", **headers: str) -> Callable[[BaseHTTPRequestHandler], Reply]:
    return lambda _: (200, headers, body)


def test_transport_authorization_stays_on_its_host(serve: Callable[..., Scripted]) -> None:
    """libcurl sends a custom Authorization header to the original host and port only."""
    target = serve(ok())
    origin = serve(lambda h: (307, {"Location": h.path[6:]}, b"") if h.path.startswith("/r?to=") else (200, {}, b"ok"))
    transport = Transport()
    cases = [
        (origin.url("/same-host"), "Bearer secret"),
        (origin.url("/other-host", host="localhost"), None),
        (target.url("/other-port"), None),
    ]
    for to, expected in cases:
        origin.seen.clear()
        target.seen.clear()
        r = transport.request(
            "GET", origin.url(f"/r?to={to}"), {"Authorization": "Bearer secret"}, max_body=10, timeout=5
        )
        assert (r.status, r.body, r.url) == (200, b"ok", to)
        assert origin.seen[0] == (f"/r?to={to}", "Bearer secret")
        assert [a for _, a in origin.seen[1:] + target.seen] == [expected]


def test_transport_headers_and_no_redirect_following(serve: Callable[..., Scripted]) -> None:
    server = serve(lambda h: (302, [("Location", "/elsewhere"), ("X-Multi", "one"), ("x-multi", "two")], b""))
    r = Transport().request("GET", server.url("/start"), max_body=10, timeout=5, follow_redirects=False)
    assert (r.status, r.headers["location"], r.url) == (302, "/elsewhere", server.url("/start"))
    assert (r.headers["X-MULTI"], r.headers.get_all("x-multi")) == ("one", ["one", "two"])
    assert "LOCATION" in r.headers and "nope" not in r.headers and r.headers.get("nope") is None
    assert server.seen == [("/start", None)]


def test_transport_retries_transient_statuses(serve: Callable[..., Scripted]) -> None:
    statuses = iter([503, 429, 200])
    server = serve(lambda _: (next(statuses), {}, b"done"))
    r = Transport(retry=FAST_RETRY).request("GET", server.url("/x"), max_body=10, timeout=5)
    assert (r.status, r.body, len(server.seen)) == (200, b"done", 3)

    server = serve(lambda _: (502, {}, b"bad gateway"))
    r = Transport(retry=FAST_RETRY).request("GET", server.url("/x"), max_body=100, timeout=5)
    assert (r.status, len(server.seen)) == (502, 3)

    server = serve(lambda _: (404, {}, b"missing"))
    assert Transport(retry=FAST_RETRY).request("GET", server.url("/x"), max_body=100, timeout=5).status == 404
    assert len(server.seen) == 1


def test_transport_honours_retry_after(serve: Callable[..., Scripted]) -> None:
    statuses = iter([429, 200])
    server = serve(lambda _: (next(statuses), {"Retry-After": "1"}, b""))
    start = time.monotonic()
    assert Transport(retry=FAST_RETRY).request("GET", server.url("/x"), max_body=10, timeout=5).status == 200
    assert time.monotonic() - start >= 1.0

    # A wait beyond four times max_delay is not made: the 429 comes back at once.
    http_date = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    server = serve(lambda _: (429, {"Retry-After": http_date}, b""))
    start = time.monotonic()
    assert Transport(retry=FAST_RETRY).request("GET", server.url("/x"), max_body=10, timeout=5).status == 429
    assert time.monotonic() - start < 0.5 and len(server.seen) == 1


def test_transport_connection_failure_names_url() -> None:
    url = "http://127.0.0.1:9/v2/"  # discard port: nothing listens
    with pytest.raises(TransferError, match="127.0.0.1:9/v2/") as e:
        Transport(retry=FAST_RETRY).request("GET", url, max_body=10, timeout=5)
    assert e.value.curl_code == 7 and e.value.url == url


def test_transport_timeout(serve: Callable[..., Scripted]) -> None:
    def slow(_: BaseHTTPRequestHandler) -> Reply:
        time.sleep(1)
        return 200, {}, b"late"

    server = serve(slow)
    with pytest.raises(TransferError) as e:
        Transport(retry=RetryPolicy(attempts=1)).request("GET", server.url("/slow"), max_body=10, timeout=0.2)
    assert e.value.curl_code == 28


@pytest.mark.parametrize("chunked", [False, True])
def test_transport_body_limit(serve: Callable[..., Scripted], chunked: bool) -> None:
    body = b"x" * 5000
    if chunked:
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:2000], body[2000:])) + b"0\r\n\r\n"
    server = serve(ok(body, **({"Transfer-Encoding": "chunked"} if chunked else {})))
    transport = Transport()
    with pytest.raises(RegistryError, match="exceeds 1000 bytes") as e:
        transport.request("GET", server.url("/big"), max_body=1000, timeout=5)
    assert e.value.url == server.url("/big") and e.value.status == 200
    assert len(transport.request("GET", server.url("/big"), max_body=5000, timeout=5).body) == 5000


def test_registry_client_relearns_a_scheme_the_server_changed(serve: Callable[..., Scripted], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived process (``fastpull serve``) outlives a registry that moves between plain HTTP and
    TLS on one host and port: the learned scheme is tried, then forgotten."""
    from fastpull.registry import client as client_module

    context, cert = _tls_server_context(tmp_path)
    secure = serve(ok(b"{}"), tls=context)
    host = f"127.0.0.1:{secure.httpd.server_address[1]}"
    monkeypatch.setitem(client_module._SCHEMES, (host, True), "http")  # learned while it spoke plain HTTP
    client = RegistryClient(host, credentials=None, transport=Transport(ca_file=str(cert)))
    assert client.base_url == f"https://{host}"
    assert client_module._SCHEMES[(host, True)] == "https"

    plain = serve(ok(b"{}"))
    host = f"127.0.0.1:{plain.httpd.server_address[1]}"
    monkeypatch.setitem(client_module._SCHEMES, (host, True), "https")  # learned while it spoke TLS
    assert RegistryClient(host, credentials=None).base_url == f"http://{host}"


def _tls_server_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    cert_path, key_path = server_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


def test_a_host_that_drops_connects_fails_at_the_connect_timeout_not_the_request_timeout() -> None:
    """A blackholed mirror: its accept queue is full, so the kernel drops the client's SYNs."""
    import re
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    queued = [socket.socket() for _ in range(3)]
    for s in queued:
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
    try:
        transport = Transport(retry=RetryPolicy(attempts=1), connect_timeout=0.3)
        with pytest.raises(TransferError) as e:
            transport.request("GET", f"http://127.0.0.1:{port}/v2/", max_body=10, timeout=60)
        assert e.value.curl_code == 28  # CURLE_OPERATION_TIMEDOUT, in the connect phase, as libcurl says:
        assert int(re.search(r"Connection timed out after (\d+) milliseconds", str(e.value))[1]) < 60_000
    finally:
        for s in (server, *queued):
            s.close()


def test_transport_verifies_https(serve: Callable[..., Scripted], tmp_path: Path) -> None:
    context, cert = _tls_server_context(tmp_path)
    server = serve(ok(b"secure"), tls=context)
    with pytest.raises(TransferError) as e:
        Transport(retry=RetryPolicy(attempts=1)).request("GET", server.url("/"), max_body=10, timeout=5)
    assert e.value.curl_code == 60  # CURLE_PEER_FAILED_VERIFICATION
    assert Transport(ca_file=str(cert)).request("GET", server.url("/"), max_body=10, timeout=5).body == b"secure"


# --- a small image pusher (plain HTTP) ------------------------------------------------------------


@dataclass
class Pusher:
    """Pushes blobs and manifests over the distribution API, with a fixed Authorization header."""

    base: str
    authorization: Callable[[str], str | None] = lambda _repo: None

    def _send(self, repo: str, method: str, url: str, data: bytes | None = None, ctype: str = "") -> Any:
        headers = {"Content-Type": ctype} if ctype else {}
        if auth := self.authorization(repo):
            headers["Authorization"] = auth
        return urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers))

    def blob(self, repo: str, data: bytes, media_type: str) -> dict[str, Any]:
        digest = digest_of(data)
        location = self._send(repo, "POST", f"{self.base}/v2/{repo}/blobs/uploads/").headers["Location"]
        location = location if location.startswith("http") else self.base + location
        sep = "&" if "?" in location else "?"
        self._send(repo, "PUT", f"{location}{sep}digest={digest}", data, "application/octet-stream")
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def manifest(self, repo: str, ref: str, doc: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        body = json.dumps(doc, indent=2).encode()
        self._send(repo, "PUT", f"{self.base}/v2/{repo}/manifests/{ref}", body, doc["mediaType"])
        return body, {"mediaType": doc["mediaType"], "digest": digest_of(body), "size": len(body)}

    def image(self, repo: str, ref: str, platform: str, *, docker: bool = False) -> tuple[bytes, dict[str, Any]]:
        os, arch, *variant = platform.split("/")
        config = {"os": os, "architecture": arch, "rootfs": {"type": "layers", "diff_ids": []}}
        if variant:
            config["variant"] = variant[0]
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as t:
            info = tarfile.TarInfo(f"{repo}-{platform}.txt")
            info.size = len(platform)
            t.addfile(info, io.BytesIO(platform.encode()))
        layer = gzip.compress(tar.getvalue(), mtime=0)
        doc = {
            "schemaVersion": 2,
            "mediaType": m.DOCKER_MANIFEST if docker else m.OCI_MANIFEST,
            "config": self.blob(repo, json.dumps(config).encode(), m.DOCKER_CONFIG if docker else m.OCI_CONFIG),
            "layers": [self.blob(repo, layer, m.DOCKER_LAYER if docker else m.OCI_LAYER_GZIP)],
        }
        return self.manifest(repo, ref, doc)

    def index(self, repo: str, ref: str, platforms: list[str]) -> tuple[bytes, dict[str, Any]]:
        entries = []
        for p in platforms:
            _, descriptor = self.image(repo, f"{ref}-{p.replace('/', '-')}", p)
            os, arch, *variant = p.split("/")
            entries.append(
                descriptor
                | {"platform": {"os": os, "architecture": arch, **({"variant": variant[0]} if variant else {})}}
            )
        return self.manifest(repo, ref, {"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": entries})


# --- anonymous registry -----------------------------------------------------------------------------


@dataclass
class Anonymous:
    registry: LocalRegistry
    pusher: Pusher
    docs: dict[str, tuple[bytes, dict[str, Any]]]


@pytest.fixture(scope="module")
def anonymous(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anonymous]:
    with LocalRegistry(tmp_path_factory.mktemp("anon") / "storage") as registry:
        pusher = Pusher(registry.url)
        docs = {
            "oci": pusher.image("test/oci", "v1", "linux/amd64"),
            "docker": pusher.image("test/docker", "v1", "linux/amd64", docker=True),
            "index": pusher.index("test/multi", "v1", ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"]),
        }
        yield Anonymous(registry, pusher, docs)


def test_registry_client_schemes_and_urls() -> None:
    """HTTPS first everywhere; plain HTTP as a fallback for loopback and insecure hosts only."""
    cases = {
        RegistryClient("localhost:5000", credentials=None): (("https", "http"), True),
        RegistryClient("127.0.0.2", credentials=None): (("https", "http"), True),
        RegistryClient("[::1]:5000", credentials=None): (("https", "http"), True),
        RegistryClient("ghcr.io", credentials=None): (("https",), True),
        RegistryClient("ghcr.io:8443", insecure=True, credentials=None): (("https", "http"), False),
        RegistryClient("127.0.0.1:5000", insecure=False, credentials=None): (("https",), True),
    }
    for client, (schemes, verify) in cases.items():
        assert (client.schemes, client.tls_verify) == (schemes, verify), client.host
    assert RegistryClient("docker.io", credentials=None).api_host == "registry-1.docker.io"


def test_registry_client_uses_https_on_loopback_when_served(serve: Callable[..., Scripted], tmp_path: Path) -> None:
    context, cert = _tls_server_context(tmp_path)
    server = serve(ok(b"{}"), tls=context)
    host = f"127.0.0.1:{server.httpd.server_address[1]}"
    client = RegistryClient(host, credentials=None, transport=Transport(ca_file=str(cert)))
    assert client.base_url == f"https://{host}"
    assert client.blob_url("a/b", "sha256:" + "0" * 64).startswith(f"https://{host}/v2/a/b/blobs/")
    # Unverifiable: an error (never a silent fall back to plain HTTP), unless the host is insecure.
    with pytest.raises(TransferError, match="certificate"):
        RegistryClient(host, credentials=None).authorization("a/b")
    assert RegistryClient(host, credentials=None, insecure=True).base_url == f"https://{host}"


def test_registry_client_falls_back_to_plain_http_once(serve: Callable[..., Scripted]) -> None:
    server = serve(ok(b"{}"))
    port = server.httpd.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert RegistryClient(host, credentials=None).base_url == f"http://{host}"
    # A TLS hello each, then HTTP; the server may record a hello after the request that followed it.
    wait_until(server.idle, "the server handled every connection")
    assert Counter(path for path, _ in server.seen) == {"<unparsed request: 400>": 2, "/v2/": 2}
    # Learned for the life of the process: the next client of the host goes straight to HTTP.
    assert RegistryClient(f"127.0.0.1:{port}", credentials=None).base_url == f"http://127.0.0.1:{port}"
    wait_until(server.idle, "the server handled every connection")
    assert Counter(path for path, _ in server.seen) == {"<unparsed request: 400>": 2, "/v2/": 3}
    with pytest.raises(TransferError) as e:
        RegistryClient(f"127.0.0.1:{port}", insecure=False, credentials=None).authorization("a/b")
    assert e.value.curl_code == SSL_CONNECT_ERROR


    with pytest.raises(ValueError, match="timeout"):
        RegistryClient("ghcr.io", timeout=0)


def test_a_plain_http_loopback_registry_is_found_without_reading_the_ca_bundle(serve: Callable[..., Scripted],
                                                                              tmp_path: Path) -> None:
    """Whether the host speaks TLS is asked unchecked: a CA bundle that cannot even be read (its loading
    is what a checked handshake costs first) does not stand in the way of plain HTTP."""
    server = serve(ok(b"{}"))
    host = f"127.0.0.1:{server.httpd.server_address[1]}"
    transport = Transport(ca_file=str(tmp_path / "no-such-ca.pem"))
    assert RegistryClient(host, credentials=None, transport=transport).base_url == f"http://{host}"


@pytest.mark.parametrize(
    ("name", "repo", "media_type"), [("oci", "test/oci", m.OCI_MANIFEST), ("docker", "test/docker", m.DOCKER_MANIFEST)]
)
def test_registry_resolves_manifest(anonymous: Anonymous, name: str, repo: str, media_type: str) -> None:
    body, descriptor = anonymous.docs[name]
    client = RegistryClient(anonymous.registry.host, credentials=None)
    for ref_text in (
        f"{anonymous.registry.host}/{repo}:v1",
        f"{anonymous.registry.host}/{repo}@{descriptor['digest']}",
    ):
        resolved = client.resolve(parse_reference(ref_text), AMD64)
        assert resolved.descriptor.to_dict() == descriptor
        assert resolved.documents == ((resolved.descriptor, body),)
        assert resolved.manifest_descriptor == resolved.descriptor
        assert resolved.manifest == m.parse_manifest(body, media_type, "x")
        layer = resolved.manifest.layers[0]
        assert client.authorization(repo) is None
        with urllib.request.urlopen(client.blob_url(repo, layer.digest)) as blob:
            assert digest_of(blob.read()) == layer.digest


@pytest.mark.parametrize("wanted", ["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v8"])
def test_registry_resolves_index_for_platform(anonymous: Anonymous, wanted: str) -> None:
    body, descriptor = anonymous.docs["index"]
    index = m.parse_manifest(body, None, "x")
    assert isinstance(index, m.ImageIndex)
    resolved = RegistryClient(anonymous.registry.host, credentials=None).resolve(
        parse_reference(f"{anonymous.registry.host}/test/multi:v1"), Platform.parse(wanted)
    )
    assert resolved.descriptor.to_dict() == descriptor
    (index_desc, index_body), (manifest_desc, manifest_body) = resolved.documents
    assert (index_desc, index_body) == (resolved.descriptor, body)
    assert manifest_desc == m.select_platform(index, Platform.parse(wanted))
    assert manifest_desc == resolved.manifest_descriptor and digest_of(manifest_body) == manifest_desc.digest
    assert resolved.manifest == m.parse_manifest(manifest_body, None, "x")


def test_registry_platform_missing(anonymous: Anonymous) -> None:
    client = RegistryClient(anonymous.registry.host, credentials=None)
    with pytest.raises(PlatformNotFound, match="linux/amd64, linux/arm64/v8, linux/arm/v7"):
        client.resolve(parse_reference(f"{anonymous.registry.host}/test/multi:v1"), Platform.parse("linux/s390x"))


def test_registry_unknown_manifest(anonymous: Anonymous) -> None:
    client = RegistryClient(anonymous.registry.host, credentials=None)
    with pytest.raises(RegistryError, match="MANIFEST_UNKNOWN") as e:
        client.resolve(parse_reference(f"{anonymous.registry.host}/test/oci:nope"), AMD64)
    assert e.value.status == 404 and e.value.url.endswith("/v2/test/oci/manifests/nope")


def test_registry_detects_different_bytes(anonymous: Anonymous) -> None:
    """A registry serving other bytes than the digest names is caught, by digest and by tag."""
    body, descriptor = anonymous.pusher.image("test/tampered", "v1", "linux/amd64/v2")
    hexdigest = descriptor["digest"].removeprefix("sha256:")
    data = anonymous.registry.storage_dir / f"docker/registry/v2/blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"
    assert data.read_bytes() == body
    data.write_bytes(body.replace(b'"schemaVersion": 2', b'"schemaVersion": 2, "annotations": {"evil": "yes"}'))
    client = RegistryClient(anonymous.registry.host, credentials=None)
    host = anonymous.registry.host
    with pytest.raises(DigestMismatch) as e:
        client.resolve(parse_reference(f"{host}/test/tampered@{descriptor['digest']}"), AMD64)
    assert e.value.expected == descriptor["digest"] and e.value.actual != descriptor["digest"]
    with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
        client.resolve(parse_reference(f"{host}/test/tampered:v1"), AMD64)


def test_registry_index_entry_mismatch(serve: Callable[..., Scripted]) -> None:
    """An index whose entry's bytes differ in size or digest, or that nests an index, is refused."""
    child = json.dumps({"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": []}).encode()
    entry: dict[str, Any] = {
        "mediaType": m.OCI_INDEX,
        "digest": digest_of(child),
        "size": len(child),
        "platform": {"os": "linux", "architecture": "amd64"},
    }
    documents: dict[str, bytes] = {}

    def respond(h: BaseHTTPRequestHandler) -> Reply:
        if h.path == "/v2/":
            return 200, {}, b"{}"
        body = documents.get(h.path.rpartition("/")[2])
        return (200, {}, body) if body is not None else (404, {}, b"")

    server = serve(respond)
    host = f"127.0.0.1:{server.httpd.server_address[1]}"
    client = RegistryClient(host, credentials=None)
    documents[entry["digest"]] = child
    for tag, bad_entry, error, why in [
        ("a", entry, ManifestError, "nested indexes"),
        ("b", entry | {"size": len(child) + 1}, DigestMismatch, "size"),
    ]:
        documents[tag] = json.dumps({"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": [bad_entry]}).encode()
        with pytest.raises(error, match=why):
            client.resolve(Reference(host, "x", tag, None), AMD64)


# --- htpasswd (Basic) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path_factory.mktemp("basic") / "storage", htpasswd={"bob": "builder"}) as registry:
        Pusher(registry.url, lambda _: Credentials("bob", "builder").basic()).image("private/img", "v1", "linux/amd64")
        yield registry


def test_registry_basic_auth(basic_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = parse_reference(f"{basic_registry.host}/private/img:v1")
    client = RegistryClient(basic_registry.host, credentials=Credentials("bob", "builder"))
    assert client.resolve(ref, AMD64).manifest.layers
    assert client.authorization("private/img") == Credentials("bob", "builder").basic()

    # Credentials from the Docker config, the default.
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    auths = {f"http://{basic_registry.host}": {"username": "bob", "password": "builder"}}
    (tmp_path / "config.json").write_text(json.dumps({"auths": auths}))
    assert RegistryClient(basic_registry.host).resolve(ref, AMD64).manifest.layers

    for credentials in (Credentials("bob", "wrong"), None):
        with pytest.raises(AuthError) as e:
            RegistryClient(basic_registry.host, credentials=credentials).resolve(ref, AMD64)
        assert e.value.status == 401


# --- token auth ----------------------------------------------------------------------------------


@dataclass
class TokenAuth:
    registry: LocalRegistry
    tokens: TokenServer


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenAuth]:
    workdir = tmp_path_factory.mktemp("token")
    with (
        TokenServer(workdir, {"alice": "wonderland"}) as tokens,
        LocalRegistry(workdir / "storage", auth=tokens.auth_config()) as registry,
    ):
        pusher = Pusher(registry.url, lambda repo: "Bearer " + tokens.issue([f"repository:{repo}:pull,push"], "alice"))
        for repo in ("team/a", "team/b"):
            pusher.index(repo, "v1", ["linux/amd64", "linux/arm64"])
        yield TokenAuth(registry, tokens)


def test_registry_token_auth_caches_per_scope(token_registry: TokenAuth) -> None:
    host, tokens = token_registry.registry.host, token_registry.tokens
    tokens.requests.clear()
    client = RegistryClient(host, credentials=Credentials("alice", "wonderland"))
    for _ in range(3):
        resolved = client.resolve(parse_reference(f"{host}/team/a:v1"), AMD64)
        assert len(resolved.documents) == 2
    client.resolve(parse_reference(f"{host}/team/b:v1"), Platform.parse("linux/arm64"))
    assert [(r.user, r.scopes) for r in tokens.requests] == [
        ("alice", ("repository:team/a:pull",)),
        ("alice", ("repository:team/b:pull",)),
    ]
    # The engine's use: the header opens the repository's blobs.
    layer = resolved.manifest.layers[0]
    request = urllib.request.Request(client.blob_url("team/a", layer.digest))
    request.add_header("Authorization", client.authorization("team/a") or "")
    with urllib.request.urlopen(request) as blob:
        assert digest_of(blob.read()) == layer.digest
    assert len(tokens.requests) == 2


def test_registry_reauthorize(token_registry: TokenAuth) -> None:
    host, tokens = token_registry.registry.host, token_registry.tokens
    client = RegistryClient(host, credentials=Credentials("alice", "wonderland"))
    old = client.authorization("team/a")
    tokens.requests.clear()
    challenge = (
        f'Bearer realm="{tokens.realm}",service="{tokens.service}",scope="repository:team/a:pull",error="invalid_token"'
    )
    new = client.reauthorize("team/a", challenge, failed=old)
    assert new not in (None, old) and len(tokens.requests) == 1
    assert client.reauthorize("team/a", challenge, failed=old) == new  # renewed already: no new request
    assert client.authorization("team/a") == new and len(tokens.requests) == 1
    assert client.resolve(parse_reference(f"{host}/team/a:v1"), AMD64).manifest.layers


def test_registry_token_auth_refused(token_registry: TokenAuth) -> None:
    host = token_registry.registry.host
    ref = parse_reference(f"{host}/team/a:v1")
    with pytest.raises(AuthError, match="401") as e:
        RegistryClient(host, credentials=None).resolve(ref, AMD64)  # anonymous: granted nothing
    assert e.value.url.endswith("/v2/team/a/manifests/v1")
    with pytest.raises(AuthError, match="invalid credentials"):
        RegistryClient(host, credentials=Credentials("alice", "nope")).resolve(ref, AMD64)
