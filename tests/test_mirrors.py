"""Pulls through mirrors configured as containerd, containers and Docker configure them, against the
real registry (a second one as the mirror, plain or a pull-through proxy), and mirrors that refuse,
err, lack a blob or die in the middle of one (tests/faultserver.py)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import blob_storage_path, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from faultserver import FaultRegistry

from fastpull import FetchOptions, Puller
from fastpull.cli.main import main
from fastpull.content.layout import REF_NAME
from fastpull.content.store import ContentStore
from fastpull.engine import FetchEngine
from fastpull.errors import RegistryBlocked, TransferError
from fastpull.puller import RepositorySource
from fastpull.registry import mirrors
from fastpull.registry.client import RegistryClient
from fastpull.registry.hosts import RegistryHost, RegistryHosts
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.testbed.registry import LocalRegistry
from fastpull.testbed.tls import self_signed, server_certificate

MiB = 1 << 20
OPTS = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4, backoff_base=0.02, backoff_max=0.2)


@pytest.fixture(autouse=True)
def _mirrors_in_this_process(monkeypatch):
    """The fault-injecting mirrors listen in this process, which a Puller skips as its own sockets
    (fastpull serve listed in the files it reads): let it use them."""
    monkeypatch.setattr(mirrors, "_this_process", lambda host: False)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_image([LayerSpec(3 * MiB), LayerSpec(MiB, content="text")], tmp_path_factory.mktemp("img"), seed=21)


@pytest.fixture
def upstream(tmp_path, image) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path / "upstream") as reg:
        push_image(reg.url, "team/app", "v1", image)
        yield reg


@pytest.fixture
def proxy(tmp_path, upstream) -> Iterator[LocalRegistry]:
    """distribution's pull-through cache of ``upstream``: a mirror that has what it has served."""
    with LocalRegistry(tmp_path / "proxy", extra_config={"proxy": {"remoteurl": upstream.url}}) as reg:
        yield reg


def _config(tmp_path: Path, **files: str) -> RegistryHosts:
    """A configuration of these files only (no file of the machine's is read)."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "certs.d").mkdir(exist_ok=True)
    (tmp_path / "registries.conf").touch()
    return RegistryHosts.load(tmp_path / "certs.d", tmp_path / "registries.conf", daemon_json=tmp_path / "daemon.json",
                              certs_dirs=[])


def _hosts_toml(registry: str, mirror: str) -> dict[str, str]:
    return {f"certs.d/{registry}/hosts.toml": f'server = "http://{registry}"\n\n'
                                              f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'}


def _registries_conf(registry: str, mirror: str) -> dict[str, str]:
    return {"registries.conf": f'[[registry]]\nlocation = "{registry}"\n\n'
                               f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'}


FORMS = {"hosts.toml": _hosts_toml, "registries.conf": _registries_conf}


def _tagged(layout: Path) -> dict[str, str]:
    index = json.loads((layout / "index.json").read_text())
    return {m["annotations"][REF_NAME]: m["digest"] for m in index["manifests"]}


def _assert_pulled(layout: Path, image) -> None:
    for desc in image.blobs:
        stored = layout / "blobs" / "sha256" / desc.digest.split(":")[1]
        assert stored.read_bytes() == image.blob_path(desc.digest).read_bytes()


@pytest.mark.parametrize("form", FORMS)
def test_pull_through_a_mirror_then_with_the_upstream_dead(tmp_path, upstream, proxy, image, form):
    """Through the pull-through mirror: its cache fills; with the upstream stopped, a new pull gets
    everything from the mirror and the layout names the image as asked."""
    hosts = _config(tmp_path, **FORMS[form](upstream.host, proxy.host))
    ref = f"{upstream.host}/team/app:v1"
    with Puller(OPTS, hosts=hosts) as puller:
        puller.pull(ref, tmp_path / "warm")
    mirrored = [r for r in proxy.served() if r.method == "GET" and "/blobs/" in r.path and r.status in (200, 206)]
    assert {r.path.rsplit("/", 1)[1] for r in mirrored} == {d.digest for d in image.blobs}
    access = proxy.access_log.read_text()
    assert (f"?ns={upstream.host}" in access) == (form == "hosts.toml")  # containerd names the registry

    # The proxy stores a blob with a GET of its own after it served it: let those land first.
    wait_until(lambda: all(blob_storage_path(proxy, d.digest).exists() for d in image.blobs), "the proxy stored the blobs")
    upstream.stop()
    with Puller(OPTS, hosts=hosts) as puller:
        result = puller.pull(ref, tmp_path / "cold")
    assert result.descriptor.digest == image.manifest_digest
    assert _tagged(tmp_path / "cold") == {ref: image.manifest_digest}
    _assert_pulled(tmp_path / "cold", image)


def test_docker_registry_mirrors_serve_docker_hub(tmp_path, image):
    """daemon.json's registry-mirrors stand in for Docker Hub (unreachable here): the pull never needs it."""
    with LocalRegistry(tmp_path / "hub-mirror") as mirror:
        push_image(mirror.url, "library/fpmirror", "v1", image)
        hosts = _config(tmp_path, **{"daemon.json": json.dumps({"registry-mirrors": [mirror.url]})})
        with Puller(OPTS, hosts=hosts) as puller:
            result = puller.pull("fpmirror:v1", tmp_path / "layout")
    assert str(result.reference) == "docker.io/library/fpmirror:v1"
    assert _tagged(tmp_path / "layout") == {"docker.io/library/fpmirror:v1": image.manifest_digest}
    _assert_pulled(tmp_path / "layout", image)


def test_cli_reads_hosts_dir_and_registries_conf(tmp_path, upstream, image, capsys):
    with FaultRegistry() as mirror:
        mirror.add_image("team/app", "v1", image)
        _config(tmp_path, **_hosts_toml(upstream.host, mirror.host))
        ref = f"{upstream.host}/team/app:v1"
        args = ["pull", ref, "--layout", str(tmp_path / "layout"), "--chunk-size", "0.25", "--no-join"]
        assert main([*args, "--hosts-dir", str(tmp_path / "certs.d"), "--registries-conf",
                     str(tmp_path / "registries.conf")]) == 0
        assert {r.digest for r in mirror.log if r.status in (200, 206)} >= {d.digest for d in image.blobs}
    assert _tagged(tmp_path / "layout") == {ref: image.manifest_digest}
    (tmp_path / "registries.conf").write_text("[[registry]\n")
    assert main([*args, "--registries-conf", str(tmp_path / "registries.conf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"configuration file {tmp_path / 'registries.conf'}: not valid TOML" in err


def test_a_blocked_registry_is_refused(tmp_path, upstream):
    hosts = _config(tmp_path, **{"registries.conf": f'[[registry]]\nlocation = "{upstream.host}"\nblocked = true\n'})
    upstream.clear_served()
    with Puller(OPTS, hosts=hosts) as puller, pytest.raises(RegistryBlocked, match="is blocked by"):
        puller.pull(f"{upstream.host}/team/app:v1", tmp_path / "layout")
    assert not upstream.served()


def test_short_names_use_the_search_registries_in_order(tmp_path, upstream, image):
    with FaultRegistry() as empty:
        hosts = _config(tmp_path, **{"registries.conf": f'unqualified-search-registries = ["{empty.host}", '
                                                        f'"{upstream.host}"]\n'})
        with Puller(OPTS, hosts=hosts) as puller:
            result = puller.pull("team/app:v1", tmp_path / "layout")
        assert [r.status for r in empty.log if "/manifests/" in r.path] == [404]
    assert _tagged(tmp_path / "layout") == {f"{upstream.host}/team/app:v1": image.manifest_digest}
    assert result.reference.registry == upstream.host


# ---- mirrors that fail -------------------------------------------------------------------------


@pytest.fixture
def origin(image) -> Iterator[FaultRegistry]:
    with FaultRegistry() as srv:
        srv.add_image("team/app", "v1", image)
        yield srv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_mirror_is_skipped_once_then_left_alone(tmp_path, origin, image):
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens: connections are refused
    hosts = _config(tmp_path, **_hosts_toml(origin.host, dead))
    with Puller(OPTS, hosts=hosts) as puller:
        puller.pull(f"{origin.host}/team/app:v1", tmp_path / "a")
        assert puller.breaker.tripped(dead)
    _assert_pulled(tmp_path / "a", image)


def test_a_mirror_that_errors_is_skipped_and_its_breaker_spares_the_blobs(tmp_path, origin, image):
    with FaultRegistry() as mirror:
        mirror.add_image("team/app", "v1", image)
        mirror.fail_first(image.manifest_digest, 1, status=503)
        hosts = _config(tmp_path, **_hosts_toml(origin.host, mirror.host))
        with Puller(OPTS, hosts=hosts) as puller:
            puller.pull(f"{origin.host}/team/app:v1", tmp_path / "layout")
        # One try of the tag at the mirror (no retries: the registry backs it up), no blob request.
        assert [r.status for r in mirror.log if "/v2/team" in r.path] == [503]
    _assert_pulled(tmp_path / "layout", image)


def test_a_blob_the_mirror_lacks_comes_from_the_registry_and_the_rest_from_the_mirror(tmp_path, origin, image):
    big, small = image.layers
    with FaultRegistry() as mirror:
        mirror.add_image("team/app", "v1", image)
        mirror.fail_first(big.digest, 100, status=404)
        hosts = _config(tmp_path, **_hosts_toml(origin.host, mirror.host))
        with Puller(OPTS, hosts=hosts) as puller:
            puller.pull(f"{origin.host}/team/app:v1", tmp_path / "layout")
            assert not puller.breaker.tripped(mirror.host)  # a 404 is about the blob, not the host
        assert origin.bytes_served(big.digest) == big.size and mirror.bytes_served(small.digest) == small.size
        assert origin.bytes_served(small.digest) == 0
    _assert_pulled(tmp_path / "layout", image)


@pytest.mark.parametrize("form", FORMS)
def test_a_mirror_that_dies_mid_blob_costs_none_of_the_bytes_written(tmp_path, tmp_path_factory, form):
    """The mirror is stopped (connections cut, port closed) once a quarter of the layer has landed:
    the rest comes from the registry, resumed from the chunks written."""
    image = build_image([LayerSpec(16 * MiB)], tmp_path_factory.mktemp("big"), seed=22)
    (layer,) = image.layers
    with FaultRegistry() as origin, FaultRegistry() as mirror:
        for srv in (origin, mirror):
            srv.add_image("team/app", "v1", image)
        mirror.slow(layer.digest, 2 * MiB)  # per response: 8 MiB/s with 4 ranges in flight
        hosts = _config(tmp_path, **FORMS[form](origin.host, mirror.host))

        def kill_at_a_quarter(done: int, total: int) -> None:
            if done >= total // 4:
                mirror.stop()

        options = FetchOptions(chunk_size=MiB, chunks_per_blob=4, backoff_base=0.02, backoff_max=0.2, adaptive=False)
        with Puller(options, hosts=hosts) as puller:
            puller.pull(f"{origin.host}/team/app:v1", tmp_path / "layout", progress=kill_at_a_quarter)
        from_mirror, from_origin = mirror.bytes_served(layer.digest), origin.bytes_served(layer.digest)
    _assert_pulled(tmp_path / "layout", image)
    assert from_mirror >= layer.size // 4 and from_origin > 0
    assert from_mirror + from_origin <= 1.1 * layer.size


def test_whether_a_repository_has_a_blob_is_the_registrys_word_while_it_answers(tmp_path, image):
    """fastpull serve serves a blob to a repository only if the registry says it has it: a mirror
    (which serves any digest it holds) is asked only when the registry is unreachable."""
    blob = image.layers[1]
    with FaultRegistry() as origin, FaultRegistry() as mirror:
        mirror.add_image("team/app", "v1", image)  # the origin has no such image
        with Puller(OPTS, hosts=_config(tmp_path, **_hosts_toml(origin.host, mirror.host))) as puller:
            registry = puller.client(origin.host)
            assert registry.blob_size("team/app", blob.digest) is None
            assert not [r for r in mirror.log if "/blobs/" in r.path]
            origin.stop()
            assert registry.blob_size("team/app", blob.digest) == blob.size


def test_a_mirror_that_is_this_process_is_skipped():
    """``fastpull serve`` listed in the hosts.toml it reads itself would ask itself, forever."""
    with socket.socket() as listening, socket.socket() as bound:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound.bind(("127.0.0.1", 0))
        assert mirrors._listens_here(f"127.0.0.1:{listening.getsockname()[1]}")
        assert mirrors._listens_here(f"localhost:{listening.getsockname()[1]}")
        assert not mirrors._listens_here(f"127.0.0.1:{bound.getsockname()[1]}")  # not listening
        assert not mirrors._listens_here(f"192.0.2.1:{listening.getsockname()[1]}")  # not loopback
        assert not mirrors._listens_here("127.0.0.1")


# ---- TLS: CAs, client certificates, headers ---------------------------------------------------


def _client_pair(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, key_path = directory / "client.cert", directory / "client.key"
    cert.write_bytes(self_signed(key, "fastpull client").public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key_path


def test_certs_dir_ca_client_certificate_and_headers_reach_the_server(tmp_path, image):
    """A mirror that demands a client certificate (``certs.d/<host>/client.cert``), trusted through
    the directory's ``ca.crt``, and checks a header from hosts.toml: the client and the engine
    send all three."""
    certs = tmp_path / "docker-certs.d"
    server_cert, server_key = server_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    seen: list[str | None] = []
    blob = image.layers[1]
    body = image.blob_path(blob.digest).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("X-Mirror-Key"))
            ok = self.path in ("/v2/", f"/v2/team/app/blobs/{blob.digest}")
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body) if ok and "blobs" in self.path else 0))
            self.end_headers()
            if ok and "blobs" in self.path:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host = f"127.0.0.1:{httpd.server_address[1]}"
    (certs / host).mkdir(parents=True)
    (certs / host / "ca.crt").write_bytes(server_cert.read_bytes())
    client_cert, _ = _client_pair(certs / host)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(client_cert)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        hosts = RegistryHosts(certs_dirs=(certs,))
        (endpoint,) = hosts.endpoints(host, "team/app")
        server = RegistryHost(endpoint.host.host, ("https",), headers=(("X-Mirror-Key", "k1"),),
                              ca_files=endpoint.host.ca_files, client_cert=endpoint.host.client_cert)
        client = RegistryClient(host, credentials=None, server=server)
        assert client.base_url == f"https://{host}"  # GET /v2/ went through
        with FetchEngine(OPTS) as engine:
            path = engine.fetch(ContentStore(tmp_path / "store"), RepositorySource(client, "team/app"),
                                blob.digest, blob.size).result(timeout=30)
        assert path.read_bytes() == body
        assert seen and all(v == "k1" for v in seen)
        bare = RegistryClient(host, credentials=None, server=RegistryHost(host, ("https",), ca_files=server.ca_files))
        with pytest.raises(TransferError):  # no client certificate: the handshake fails
            bare.authorization("team/app")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()

