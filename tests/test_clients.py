"""tests/clients.py against the CNCF distribution registry: containerd pulls directly, from HTTPS
with the ``hosts.toml``'s CA, and through a ``hosts.toml`` mirror, skopeo copies through a
``registries.conf`` mirror; the mirror is a second ``docker-registry`` in pull-through ``proxy``
mode, and a second pull through it fetches no blob from the registry behind it. What the tests of
``fastpull serve`` rely on, proven without it."""

from __future__ import annotations

import shutil

import pytest
from clients import (
    ClientError,
    check_containerd_image,
    check_skopeo_dir,
    client_image,
    skopeo_copy,
    write_hosts_toml,
    write_registries_conf,
)
from conftest import blob_storage_path, wait_until

from fastpull.testbed import LocalRegistry, push_image
from fastpull.testbed.tls import server_certificate

REPO = "clients/app"


@pytest.fixture(scope="module")
def image(registry, image_cache):
    built = client_image(image_cache / "clients")
    push_image(registry.url, REPO, "v1", built)
    return built


@pytest.fixture(scope="module")
def ref(registry, image) -> str:
    return f"{registry.host}/{REPO}:v1"


@pytest.fixture
def proxy(registry, tmp_path):
    """A ``docker-registry`` in pull-through proxy mode in front of ``registry``, with an empty cache."""
    with LocalRegistry(tmp_path / "proxy", extra_config={"proxy": {"remoteurl": registry.url}}) as mirror:
        yield mirror


def _blob_gets(reg: LocalRegistry) -> set[str]:
    return {r.path.rsplit("/", 1)[1] for r in reg.served() if r.method == "GET" and "/blobs/" in r.path}


def _wait_cached(proxy: LocalRegistry, image) -> None:
    """Distribution's proxy stores a blob in a goroutine of its own after serving it."""
    for blob in image.blobs:
        wait_until(blob_storage_path(proxy, blob.digest).exists, f"the proxy has stored {blob.digest}")


def test_containerd_pulls_from_the_registry(containerd, ref, image, tmp_path):
    containerd.pull(ref, plain_http=True)
    check_containerd_image(containerd, ref, image, tmp_path / "check")


def test_containerd_pulls_through_a_hosts_toml_mirror_and_a_fresh_one_again(
    start_containerd, registry, proxy, ref, image, tmp_path
):
    hosts = write_hosts_toml(tmp_path / "hosts", registry.host, proxy.host)
    registry.clear_served()
    first = start_containerd()
    first.pull(ref, hosts_dir=hosts)
    check_containerd_image(first, ref, image, tmp_path / "check-1")
    every_blob = {blob.digest for blob in image.blobs}
    assert _blob_gets(proxy) == every_blob  # the client went through the mirror for all of them
    _wait_cached(proxy, image)

    registry.clear_served()
    second = start_containerd()
    second.pull(ref, hosts_dir=hosts)
    check_containerd_image(second, ref, image, tmp_path / "check-2")
    assert _blob_gets(registry) == set()


def test_containerd_verifies_an_https_registry_with_the_hosts_toml_ca(
    start_containerd, image, tmp_path, monkeypatch
):
    cert, key = server_certificate(tmp_path)
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    with LocalRegistry(tmp_path / "storage", extra_config=tls) as registry:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        push_image(registry.url, REPO, "v1", image)
        monkeypatch.delenv("SSL_CERT_FILE")  # containerd and ctr trust the CA from the hosts.toml alone
        ref = f"{registry.host}/{REPO}:v1"
        direct = start_containerd()
        direct.pull(ref, hosts_dir=write_hosts_toml(tmp_path / "direct", registry.host, ca_file=str(cert)))
        check_containerd_image(direct, ref, image, tmp_path / "check-direct")
        # A mirror that refuses connections: the registry behind it, verified with the CA too.
        fallback = start_containerd()
        fallback.pull(ref, hosts_dir=write_hosts_toml(tmp_path / "fallback", registry.host, "127.0.0.1:1", str(cert)))
        check_containerd_image(fallback, ref, image, tmp_path / "check-fallback")
        (tmp_path / "other").mkdir()
        other, _ = server_certificate(tmp_path / "other")
        wrong_ca = write_hosts_toml(tmp_path / "other", registry.host, ca_file=str(other))
        with pytest.raises(ClientError, match="certificate"):
            start_containerd().pull(ref, hosts_dir=wrong_ca)


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed: run scripts/install.sh")
def test_skopeo_copies_through_a_registries_conf_mirror_twice(registry, proxy, ref, image, tmp_path):
    conf = write_registries_conf(tmp_path / "registries.conf", registry.host, proxy.host)
    registry.clear_served()
    skopeo_copy(ref, tmp_path / "first", conf)
    check_skopeo_dir(tmp_path / "first", image)
    assert _blob_gets(proxy) == {blob.digest for blob in image.blobs}
    _wait_cached(proxy, image)

    registry.clear_served()
    skopeo_copy(ref, tmp_path / "second", conf)
    check_skopeo_dir(tmp_path / "second", image)
    assert _blob_gets(registry) == set()
