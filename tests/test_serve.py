"""``fastpull serve`` as a registry mirror: the distribution API as clients see it, one upstream
fetch per blob however many clients ask, streaming while ranges land, provenance, upstream
failures as the spec's errors, stale tags, prefetch, status, metrics and a clean stop.

The daemon runs as a child process (``fastpull serve``) in front of a real registry, or of the
fault-injecting one where a test needs a slow, failing or dead upstream."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until
from faultserver import FaultRegistry

from fastpull.oci.manifest import OCI_MANIFEST
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import LayerSpec, build_image, push_image

MiB = 1 << 20


def request(daemon: ServeProcess, path: str, method: str = "GET", headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(daemon.host, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def upstream_bytes(upstream: FaultRegistry, digest: str) -> int:
    return sum(s.bytes_sent for s in upstream.log if s.digest == digest and s.method == "GET")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_image([LayerSpec(6 * MiB), LayerSpec(200_000, files=4)],
                       tmp_path_factory.mktemp("serve-image"), seed=12)


@pytest.fixture
def upstream(image):
    with FaultRegistry() as registry:
        registry.add_image("team/app", "v1", image)
        yield registry


@pytest.fixture
def daemon(tmp_path, upstream):
    with ServeProcess(tmp_path / "store", upstream.host) as d:
        yield d
    assert "Traceback" not in d.log, d.log


def layer(image, i: int = 0):
    return image.layers[i]


def test_the_distribution_api_as_clients_use_it(daemon, image):
    status, headers, _ = request(daemon, "/v2/")
    assert status == 200 and headers["Docker-Distribution-API-Version"] == "registry/2.0"

    status, headers, body = request(daemon, "/v2/team/app/manifests/v1", "HEAD")
    assert (status, body) == (200, b"")
    digest = headers["Docker-Content-Digest"]
    assert headers["Content-Type"] == OCI_MANIFEST and int(headers["Content-Length"]) == len(image.manifest)
    status, headers, body = request(daemon, f"/v2/team/app/manifests/{digest}")
    assert status == 200 and body == image.manifest and sha256(body) == digest

    blob = image.blob_path(layer(image).digest).read_bytes()
    path = f"/v2/team/app/blobs/{layer(image).digest}"
    status, headers, body = request(daemon, path)
    assert status == 200 and body == blob
    assert headers["Docker-Content-Digest"] == layer(image).digest and headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "application/octet-stream"

    status, headers, body = request(daemon, path, "HEAD")
    assert (status, body, int(headers["Content-Length"])) == (200, b"", len(blob))
    status, headers, body = request(daemon, path, headers={"Range": "bytes=100-199"})
    assert (status, body, headers["Content-Range"]) == (206, blob[100:200], f"bytes 100-199/{len(blob)}")
    status, headers, body = request(daemon, path, headers={"Range": "bytes=-10"})
    assert (status, body) == (206, blob[-10:])
    status, headers, body = request(daemon, path, headers={"Range": f"bytes={len(blob)}-"})
    assert (status, error_code(body), headers["Content-Range"]) == (416, "RANGE_INVALID", f"bytes */{len(blob)}")


def test_bad_requests_get_the_spec_errors(daemon):
    status, _, body = request(daemon, "/v2/team/app/blobs/sha256:abc")
    assert (status, error_code(body)) == (400, "DIGEST_INVALID")
    status, _, body = request(daemon, "/v2/team/app/manifests/bad!tag")
    assert (status, error_code(body)) == (400, "TAG_INVALID")
    status, _, body = request(daemon, "/v2/team/app/manifests/missing")
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    status, _, body = request(daemon, "/v2/team/app/blobs/sha256:" + "0" * 64)
    assert (status, error_code(body)) == (404, "BLOB_UNKNOWN")
    status, _, body = request(daemon, "/v2/Team/app/manifests/v1")
    assert (status, error_code(body)) == (400, "NAME_INVALID")


def test_ns_or_a_host_in_the_path_names_the_upstream(tmp_path, upstream, image):
    with ServeProcess(tmp_path / "store", "127.0.0.1:9") as daemon:  # the default upstream is dead
        status, _, body = request(daemon, "/v2/team/app/manifests/v1")
        assert (status, error_code(body)) == (503, "UNAVAILABLE")
        status, _, body = request(daemon, f"/v2/team/app/manifests/v1?ns={upstream.host}")
        assert (status, body) == (200, image.manifest)
        status, _, body = request(daemon, f"/v2/{upstream.host}/team/app/manifests/v1")
        assert (status, body) == (200, image.manifest)


def test_twenty_clients_of_a_cold_blob_share_one_upstream_fetch(daemon, upstream, image):
    digest = layer(image).digest
    blob = image.blob_path(digest).read_bytes()
    upstream.slow(digest, 12 * MiB)  # half a second: the clients arrive while it is in flight
    request(daemon, "/v2/team/app/manifests/v1")
    bodies: list[bytes] = []

    def client() -> None:
        bodies.append(request(daemon, f"/v2/team/app/blobs/{digest}")[2])

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(bodies) == 20 and all(b == blob for b in bodies)
    assert upstream_bytes(upstream, digest) == len(blob)


def test_the_body_streams_while_ranges_land_and_a_client_leaving_harms_no_one(daemon, upstream, image, tmp_path):
    digest = layer(image).digest
    blob = image.blob_path(digest).read_bytes()
    # The first MiB (a bitmap chunk) comes at once, every later range takes two seconds.
    upstream.slow(digest, MiB // 2, ranges=range(MiB, len(blob), MiB))
    request(daemon, "/v2/team/app/manifests/v1")

    leaver = http.client.HTTPConnection(daemon.host, timeout=60)
    leaver.request("GET", f"/v2/team/app/blobs/{digest}")
    first = leaver.getresponse().read(1)
    status = json.loads(request(daemon, "/_fastpull/v1/status")[2])
    (inflight,) = [b for b in status["inflight"] if b["digest"] == digest]
    assert inflight["bytes"] < len(blob)  # the first byte came before the last
    assert first == blob[:1]
    stayer: list[bytes] = []
    thread = threading.Thread(target=lambda: stayer.append(request(daemon, f"/v2/team/app/blobs/{digest}")[2]))
    thread.start()
    leaver.close()  # mid-body
    thread.join()
    assert stayer == [blob]
    committed = tmp_path / "store" / "blobs" / "sha256" / digest[7:]
    wait_until(committed.exists, "the blob is committed")  # the last client can be done before the hash
    assert committed.read_bytes() == blob
    assert upstream_bytes(upstream, digest) == len(blob)


def test_a_manifest_get_fetches_its_layers_ahead_and_a_head_does_not(tmp_path, upstream, image):
    store = tmp_path / "store"
    with ServeProcess(store, upstream.host) as daemon:
        assert request(daemon, "/v2/team/app/manifests/v1", "HEAD")[0] == 200
        assert request(daemon, "/v2/team/app/manifests/v1")[0] == 200

        def stored() -> bool:
            return all((store / "blobs" / "sha256" / d.digest[7:]).exists() for d in image.blobs)

        wait_until(stored, "the image's blobs are in the store, asked for by no client")
        assert all(upstream_bytes(upstream, d.digest) == d.size for d in image.blobs)
        status, _, body = request(daemon, f"/v2/team/app/blobs/{layer(image).digest}")
        assert status == 200 and body == image.blob_path(layer(image).digest).read_bytes()
        assert upstream_bytes(upstream, layer(image).digest) == layer(image).size

    with ServeProcess(tmp_path / "store2", upstream.host, "--no-fetch-ahead") as daemon:
        assert request(daemon, "/v2/team/app/manifests/v1")[0] == 200
        time.sleep(1)  # nothing should happen: give a wrong fetch the time to show
        assert not list((tmp_path / "store2" / "blobs" / "sha256").glob("*")) or all(
            not (tmp_path / "store2" / "blobs" / "sha256" / d.digest[7:]).exists() for d in image.blobs)


def test_a_blob_is_served_only_for_a_repository_that_has_it(tmp_path, registry, image_cache):
    image = build_image([LayerSpec(300_000)], image_cache / "serve-provenance", seed=31)
    push_image(registry.url, "private/app", "v1", image)
    digest = layer(image).digest
    with ServeProcess(tmp_path / "store", registry.host) as daemon:
        assert request(daemon, "/v2/private/app/manifests/v1")[0] == 200
        assert request(daemon, f"/v2/private/app/blobs/{digest}")[0] == 200  # now in the store
        status, _, body = request(daemon, f"/v2/public/app/blobs/{digest}")
        assert (status, error_code(body)) == (404, "BLOB_UNKNOWN")

        push_image(registry.url, "public/app", "v1", image)  # the layer is mounted into a second repository
        registry.clear_served()
        status, _, body = request(daemon, f"/v2/public/app/blobs/{digest}")
        assert status == 200 and body == image.blob_path(digest).read_bytes()
        served = [(s.method, s.path) for s in registry.served() if s.path.endswith(digest)]
        assert served == [("HEAD", f"/v2/public/app/blobs/{digest}")]  # confirmed upstream, sent from the store


def test_upstream_refusals_keep_their_meaning(tmp_path, upstream, image, registry_with_auth):
    digest = layer(image).digest
    with ServeProcess(tmp_path / "store", upstream.host, "--no-fetch-ahead") as daemon:
        upstream.fail_first(image.manifest_digest, 100, 429, retry_after=600)
        status, headers, body = request(daemon, "/v2/team/app/manifests/v1")
        assert (status, error_code(body), headers["Retry-After"]) == (429, "TOOMANYREQUESTS", "600")
        upstream.clear_faults()
        assert request(daemon, "/v2/team/app/manifests/v1")[0] == 200
        upstream.fail_first(digest, 100, 429, retry_after=600)
        status, headers, body = request(daemon, f"/v2/team/app/blobs/{digest}")
        assert (status, error_code(body), headers["Retry-After"]) == (429, "TOOMANYREQUESTS", "600")
    assert "Traceback" not in daemon.log

    with ServeProcess(tmp_path / "store2", registry_with_auth.host, env={"DOCKER_CONFIG": str(tmp_path)}) as daemon:
        status, _, body = request(daemon, "/v2/team/app/manifests/v1")
        assert (status, error_code(body)) == (401, "UNAUTHORIZED")
    assert "Traceback" not in daemon.log


@pytest.fixture
def registry_with_auth(tmp_path):
    from fastpull.testbed.registry import LocalRegistry

    with LocalRegistry(tmp_path / "auth-registry", htpasswd={"alice": "secret"}) as reg:
        yield reg


def test_a_known_tag_is_served_while_the_upstream_is_down(tmp_path, image):
    with FaultRegistry() as upstream:
        upstream.add_image("team/app", "v1", image)
        with ServeProcess(tmp_path / "store", upstream.host, "--tag-ttl", "0") as daemon:
            status, headers, _ = request(daemon, "/v2/team/app/manifests/v1")
            assert status == 200
            upstream.stop()
            status, again, body = request(daemon, "/v2/team/app/manifests/v1")
            assert (status, body) == (200, image.manifest)
            assert again["Docker-Content-Digest"] == headers["Docker-Content-Digest"]
            wait_until(lambda: "serving the last known" in daemon.log, "the daemon logs the stale answer")


def test_sigterm_stops_the_daemon_and_leaves_a_fetch_resumable(tmp_path, upstream, image):
    digest = layer(image).digest
    upstream.slow(digest, 64 << 10, ranges=range(MiB, layer(image).size, MiB))  # the first MiB only, at once
    daemon = ServeProcess(tmp_path / "store", upstream.host).start()
    try:
        request(daemon, "/v2/team/app/manifests/v1")
        conn = http.client.HTTPConnection(daemon.host, timeout=60)
        conn.request("GET", f"/v2/team/app/blobs/{digest}")
        conn.getresponse().read(1)
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 20
        conn.close()
    finally:
        daemon.stop(signal.SIGKILL)
    assert (tmp_path / "store" / ".fastpull" / "ingest" / digest[7:] / "bitmap").exists()
    assert "stopping" in daemon.log and "Traceback" not in daemon.log


def test_a_daemon_started_with_sigint_ignored_keeps_it_ignored(tmp_path, upstream):
    """Started as a script's background job (SIGINT ignored), it is not stopped by its terminal's Ctrl-C;
    SIGTERM stops it."""
    daemon = ServeProcess(tmp_path / "store", upstream.host)
    daemon.command = ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *daemon.command]
    with daemon:
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
        ignored = int(re.search(r"^SigIgn:\s*(\w+)", status, re.M)[1], 16)
        assert ignored >> (signal.SIGINT - 1) & 1, status
        daemon.proc.send_signal(signal.SIGINT)
        assert request(daemon, "/v2/team/app/manifests/v1")[0] == 200
        assert daemon.stop(signal.SIGTERM) == 0
    assert "stopping" in daemon.log and "Traceback" not in daemon.log


def test_prefetch_file_endpoint_status_and_metrics(tmp_path, upstream, image, image_cache):
    other = build_image([LayerSpec(100_000)], image_cache / "serve-prefetch-other", seed=32)
    upstream.add_image("team/other", "v2", other)
    refs = tmp_path / "prefetch.txt"
    refs.write_text(f"# warmed at start\n{upstream.host}/team/app:v1\n")
    store = tmp_path / "store"
    with ServeProcess(store, upstream.host, "--prefetch", str(refs)) as daemon:
        def stored(img) -> bool:
            return all((store / "blobs" / "sha256" / d.digest[7:]).exists() for d in img.blobs)

        wait_until(lambda: stored(image), "the image in the prefetch file is in the store", timeout=30)
        refs.write_text(refs.read_text() + f"{upstream.host}/team/other:v2\n")
        wait_until(lambda: stored(other), "the image added to the prefetch file is in the store", timeout=30)

        status, _, body = request(daemon, "/_fastpull/v1/prefetch", "POST", body=b'{"refs": ["Bad Ref"]}')
        assert (status, error_code(body)) == (400, "NAME_INVALID")
        status, _, body = request(daemon, "/_fastpull/v1/prefetch", "POST", body=b"not json")
        assert status == 400
        upstream_before = upstream_bytes(upstream, layer(image).digest)
        status, _, body = request(daemon, "/_fastpull/v1/prefetch", "POST",
                                  body=json.dumps({"refs": [f"{upstream.host}/team/app:v1"]}).encode())
        assert (status, json.loads(body)) == (202, {"accepted": [f"{upstream.host}/team/app:v1"]})

        status, _, body = request(daemon, f"/v2/team/app/blobs/{layer(image).digest}")
        assert status == 200  # from the store: prefetched images are served by their repository
        assert upstream_bytes(upstream, layer(image).digest) == upstream_before

        status, headers, body = request(daemon, "/metrics")
        metrics = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        served = next(float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith("fastpull_served_bytes_total"))
        assert served >= layer(image).size
        assert 'fastpull_requests_total{kind="blob",result="hit"}' in metrics
        assert "fastpull_upstream_bytes_total" in metrics
        status = json.loads(request(daemon, "/_fastpull/v1/status")[2])
        assert status["inflight"] == [] and status["store"] == str(store)
    assert "Traceback" not in daemon.log


def test_command_line_errors_are_one_line(tmp_path, daemon):
    import subprocess
    import sys

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fastpull", "serve", "--store", str(tmp_path / "s2"), *args],
                              capture_output=True, text=True, timeout=60)

    taken = serve("--listen", daemon.host)
    assert taken.returncode == 1 and taken.stderr.strip().splitlines()[-1].startswith(
        f"fastpull: cannot listen on {daemon.host}")
    assert "Traceback" not in taken.stderr
    bad = serve("--listen", "nowhere")
    assert bad.returncode == 2 and "expected HOST:PORT" in bad.stderr
    docker = serve("--print-config", "docker", "quay.io")
    assert docker.returncode == 2 and "docker.io only" in docker.stderr
    printed = serve("--print-config", "containerd", "--listen", "127.0.0.1:6000", "ghcr.io")
    assert printed.returncode == 0 and '[host."http://127.0.0.1:6000"]' in printed.stdout


def test_the_daemon_reaches_its_upstream_through_the_mirrors_of_a_hosts_dir(tmp_path, upstream, image):
    dead = "127.0.0.1:9"
    hosts = tmp_path / "certs.d" / dead
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'server = "http://{dead}"\n\n[host."http://{upstream.host}"]\n'
                                      '  capabilities = ["pull", "resolve"]\n')
    with ServeProcess(tmp_path / "store", dead, "--hosts-dir", str(tmp_path / "certs.d")) as daemon:
        status, _, body = request(daemon, "/v2/team/app/manifests/v1")
        assert (status, body) == (200, image.manifest)
        status, _, body = request(daemon, f"/v2/team/app/blobs/{layer(image).digest}")
        assert status == 200 and body == image.blob_path(layer(image).digest).read_bytes()
    bad = tmp_path / "bad.conf"
    bad.write_text("[[registry]\n")
    with pytest.raises(RuntimeError, match="bad.conf"):
        ServeProcess(tmp_path / "store2", dead, "--registries-conf", str(bad)).start()
