"""Pulls from real registries that need credentials, or speak HTTPS (and HTTP/2)."""

from __future__ import annotations

import base64
import json

import pytest

from fastpull import AuthError, FetchOptions, Puller, pull
from fastpull.manifest import Platform
from fastpull.registry import RegistryClient
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


def test_pull_over_https_multiplexes_http2(tmp_path, image_cache, monkeypatch):
    cert, key = server_certificate(tmp_path)
    image = build_image([LayerSpec(4 * MiB), LayerSpec(2 * MiB)], image_cache / "tls", seed=33)
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    with LocalRegistry(tmp_path / "storage", extra_config=tls) as registry:
        monkeypatch.setenv("CURL_CA_BUNDLE", str(cert))
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        https_url = registry.url.replace("http://", "https://")
        push_image(https_url, "team/tls", "v1", image)
        ref = f"{registry.host}/team/tls:v1"
        # A loopback registry is plain HTTP unless its client says otherwise.
        with Puller(OPTS, clients=[RegistryClient(registry.host, insecure=False)]) as puller:
            puller.pull(ref, tmp_path / "layout")
        _blobs_ok(tmp_path / "layout", image)
        gets = [line for line in registry.access_log.read_text().splitlines() if '"GET /v2/team/tls/blobs/' in line]
        assert len(gets) > len(image.blobs) and all('HTTP/2.0"' in line for line in gets)


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
