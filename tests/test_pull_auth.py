"""Pulls from real registries that need credentials, or speak HTTPS (and HTTP/2)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from fastpull import AuthError, FetchOptions, Puller, pull
from fastpull.http.transport import Transport
from fastpull.oci.manifest import Platform
from fastpull.registry.client import RegistryClient
from fastpull.testbed.images import LayerSpec, build_image, build_index, push_image, push_index
from fastpull.testbed.registry import LocalRegistry
from fastpull.testbed.tls import server_certificate
from fastpull.testbed.tokenserver import TokenServer

MiB = 1 << 20
OPTS = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4)


def _docker_config(tmp_path, monkeypatch, host: str, user: str, password: str) -> None:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def _blobs_ok(layout, image) -> None:
    for desc in image.blobs:
        assert (layout / "blobs" / "sha256" / desc.digest.split(":")[1]).read_bytes() == \
            image.blob_path(desc.digest).read_bytes()


def test_pull_with_token_auth_from_docker_config(tmp_path, image_cache, monkeypatch):
    image = build_image([LayerSpec(2 * MiB), LayerSpec(MiB)], image_cache / "token", seed=31)
    with (
        TokenServer(tmp_path, {"alice": "wonderland"}) as tokens,
        LocalRegistry(tmp_path / "storage", auth=tokens.auth_config()) as registry,
    ):
        push_image(registry.url, "team/app", "v1", image,
                   token_getter=lambda scope: tokens.issue([scope], "alice"))
        tokens.requests.clear()
        ref = f"{registry.host}/team/app:v1"
        with pytest.raises(AuthError) as err:  # anonymous: refused, and the error says where
            pull(ref, tmp_path / "anon", options=OPTS)
        assert registry.host in str(err.value) or tokens.realm in str(err.value)

        _docker_config(tmp_path, monkeypatch, registry.host, "alice", "wonderland")
        tokens.requests.clear()
        pull(ref, tmp_path / "layout", options=OPTS)
        _blobs_ok(tmp_path / "layout", image)
        # One token for the repository's pull scope served the manifest and every ranged GET.
        assert [r.user for r in tokens.requests] == ["alice"]


def test_pull_with_basic_auth(tmp_path, image_cache, monkeypatch):
    image = build_image([LayerSpec(MiB)], image_cache / "basic", seed=32)
    with LocalRegistry(tmp_path / "storage", htpasswd={"bob": "builder"}) as registry:
        push_image(registry.url, "team/basic", "v1", image, username="bob", password="builder")
        _docker_config(tmp_path, monkeypatch, registry.host, "bob", "builder")
        pull(f"{registry.host}/team/basic:v1", tmp_path / "layout", options=OPTS)
        _blobs_ok(tmp_path / "layout", image)


def test_pull_over_https_spreads_http2_ranges_over_connections(tmp_path, image_cache, monkeypatch):
    cert, key = server_certificate(tmp_path)
    image = build_image([LayerSpec(4 * MiB), LayerSpec(2 * MiB)], image_cache / "tls", seed=33)
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    with LocalRegistry(tmp_path / "storage", extra_config=tls) as registry:
        monkeypatch.setenv("CURL_CA_BUNDLE", str(cert))
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        push_image(registry.url, "team/tls", "v1", image)
        ref = f"{registry.host}/team/tls:v1"
        # A loopback registry: HTTPS is tried first, with no flag or client of the caller's. Each
        # transfer is slowed so that the ranges of a blob are in flight together (on loopback they
        # would finish before the next one starts, and could take turns on one connection).
        with Puller(FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4, transfer_rate_limit=2 << 20)) as puller:
            puller.pull(ref, tmp_path / "layout")
            stats = puller.engine.stats
        _blobs_ok(tmp_path / "layout", image)
        gets = [line for line in registry.access_log.read_text().splitlines() if '"GET /v2/team/tls/blobs/' in line]
        assert len(gets) > len(image.blobs) and all('HTTP/2.0"' in line for line in gets)
        # Ranges in flight at once went over connections of their own, not as streams of one.
        assert stats.connections >= OPTS.chunks_per_blob


def test_cli_pulls_from_https_and_plain_loopback_registries_without_flags(tmp_path, image_cache, registry,
                                                                            monkeypatch):
    cert, key = server_certificate(tmp_path)
    image = build_image([LayerSpec(MiB)], image_cache / "cli-tls", seed=36)
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the CA, as a user of curl or Docker gives it
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    push_image(registry.url, "team/plain", "v1", image)
    with LocalRegistry(tmp_path / "storage", extra_config=tls) as secure:
        push_image(secure.url, "team/tls", "v1", image)
        for host, name in ((secure.host, "tls"), (registry.host, "plain")):
            done = subprocess.run([sys.executable, "-m", "fastpull", "pull", f"{host}/team/{name}:v1",
                                   "--layout", str(tmp_path / name)], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            _blobs_ok(tmp_path / name, image)


def test_pull_index_selects_platform(registry, image_cache, tmp_path):
    amd = build_image([LayerSpec(MiB)], image_cache / "idx-amd", seed=34)
    arm = build_image([LayerSpec(MiB)], image_cache / "idx-arm", seed=35, platform=("linux", "arm64", "v8"))
    index = build_index([(amd, ("linux", "amd64", None)), (arm, ("linux", "arm64", "v8"))])
    push_index(registry.url, "multi/app", "v1", index, [amd, arm])
    ref = f"{registry.host}/multi/app:v1"
    result = pull(ref, tmp_path / "layout", platform=Platform.parse("linux/arm64"), options=OPTS)
    assert result.descriptor.digest == arm.manifest_digest
    _blobs_ok(tmp_path / "layout", arm)
    assert not (tmp_path / "layout" / "blobs" / "sha256" / amd.layers[0].digest.split(":")[1]).exists()


def test_pull_blobs_use_the_ca_of_their_registry_client(tmp_path, image_cache, monkeypatch):
    """A CA given through the API verifies the blob downloads too, not only the manifests."""
    cert, key = server_certificate(tmp_path)
    image = build_image([LayerSpec(2 * MiB)], image_cache / "tls-ca", seed=37)
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    with LocalRegistry(tmp_path / "storage", extra_config=tls) as registry:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        push_image(registry.url, "team/ca", "v1", image)
        for var in ("SSL_CERT_FILE", "CURL_CA_BUNDLE"):  # the process default does not know the CA
            monkeypatch.delenv(var, raising=False)
        client = RegistryClient(registry.host, transport=Transport(ca_file=str(cert)))
        with Puller(OPTS, clients=[client]) as puller:
            puller.pull(f"{registry.host}/team/ca:v1", tmp_path / "layout")
        _blobs_ok(tmp_path / "layout", image)
