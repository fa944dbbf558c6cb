"""``fastpull serve`` as real clients use it: containerd through a ``hosts.toml`` mirror and skopeo
through a ``registries.conf`` mirror pull a generated image from the real registry behind it, get
it right (blobs, manifest, containerd's unpacked snapshots), and a second pull by a fresh client
fetches nothing upstream."""

from __future__ import annotations

import shutil
import urllib.request

import pytest
from clients import (
    blob_bytes_sent,
    check_containerd_image,
    check_skopeo_dir,
    client_image,
    skopeo_copy,
    write_hosts_toml,
    write_registries_conf,
)

from fastpull.testbed import push_image
from fastpull.testbed.daemon import ServeProcess

REPO = "serve-clients/app"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module", params=["oci", "docker"])
def image(request, registry, image_cache):
    built = client_image(image_cache / f"serve-clients-{request.param}", request.param)
    push_image(registry.url, f"{REPO}-{request.param}", "v1", built)
    return built


@pytest.fixture
def ref(registry, image) -> str:
    media = "oci" if "oci" in image.media_type else "docker"
    return f"{registry.host}/{REPO}-{media}:v1"


@pytest.fixture
def serve(registry, tmp_path):
    """``fastpull serve`` with an empty store in front of ``registry`` (also its ``--upstream``); it
    must stop with exit status 0."""
    daemon = ServeProcess(tmp_path / "store", registry.host).start()
    yield daemon
    assert daemon.stop() == 0, daemon.log[-2000:]


def upstream_bytes(daemon: ServeProcess) -> float:
    """The daemon's ``fastpull_upstream_bytes_total``."""
    with _OPENER.open(f"{daemon.url}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return next(float(line.split()[1]) for line in lines if line.startswith("fastpull_upstream_bytes_total "))




def test_containerd_pulls_through_serve_and_a_fresh_one_fetches_nothing_upstream(
    start_containerd, registry, serve, ref, image, tmp_path
):
    hosts = write_hosts_toml(tmp_path / "hosts", registry.host, serve.host)
    registry.clear_served()
    first = start_containerd()
    first.pull(ref, hosts_dir=hosts)
    check_containerd_image(first, ref, image, tmp_path / "check-1")
    assert blob_bytes_sent(registry) == {blob.digest: blob.size for blob in image.blobs}  # each once, by the daemon
    assert all((tmp_path / "store" / "blobs" / "sha256" / blob.digest[7:]).exists() for blob in image.blobs)
    fetched = upstream_bytes(serve)

    registry.clear_served()
    second = start_containerd()
    second.pull(ref, hosts_dir=hosts)
    check_containerd_image(second, ref, image, tmp_path / "check-2")
    assert blob_bytes_sent(registry) == {}
    assert upstream_bytes(serve) == fetched


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed: run scripts/install.sh")
def test_skopeo_copies_through_serve_twice_and_the_second_fetches_nothing_upstream(
    registry, serve, ref, image, tmp_path
):
    # registries.conf cannot add containerd's ?ns=: the registry is the daemon's --upstream. (The
    # other form, the registry as the mirror location's first path component, is no reference
    # containers/image accepts when the registry has a port, as every test registry has.)
    conf = write_registries_conf(tmp_path / "registries.conf", registry.host, serve.host)
    registry.clear_served()
    skopeo_copy(ref, tmp_path / "first", conf)
    check_skopeo_dir(tmp_path / "first", image)
    assert blob_bytes_sent(registry) == {blob.digest: blob.size for blob in image.blobs}
    fetched = upstream_bytes(serve)

    registry.clear_served()
    skopeo_copy(ref, tmp_path / "second", conf)
    check_skopeo_dir(tmp_path / "second", image)
    assert blob_bytes_sent(registry) == {}
    assert upstream_bytes(serve) == fetched
