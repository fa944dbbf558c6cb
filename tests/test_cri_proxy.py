"""``fastpull serve --cri-proxy``: kubelet's image service in front of Debian's containerd, whose CRI
pulls go through fastpull's snapshotter. A ``PullImage``'s ``AuthConfig`` lets the snapshotter fetch
a private image's layers on a node that has no credentials of its own, and is never written or logged;
every other call passes through. Also the credentials hook itself, on a registry client."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import CRI_NAMESPACE, Containerd, blob_bytes_sent, write_hosts_toml
from cri import CriError, CriImages, node_daemons

from fastpull import AuthError
from fastpull.registry.auth import Credentials
from fastpull.registry.client import RegistryClient
from fastpull.testbed import push_image
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import LayerSpec, build_image
from fastpull.testbed.registry import LocalRegistry
from fastpull.testbed.tokenserver import TokenServer

REPO = "team/private"
USER, PASSWORD = "alice", "s3cret-pw-7f3a91"
IDENTITY_TOKEN = "refresh-tok-5c2e77"


@pytest.fixture
def private(tmp_path, image_cache):
    """(registry, tokens, image): a registry behind a token server, holding ``REPO:v1``."""
    image = build_image([LayerSpec(300_000, files=3), LayerSpec(100_000, "text", "zstd", files=2)],
                        image_cache / "cri-proxy", seed=91)
    with (
        TokenServer(tmp_path, {USER: PASSWORD}, identity_tokens={IDENTITY_TOKEN: USER}) as tokens,
        LocalRegistry(tmp_path / "storage", auth=tokens.auth_config()) as registry,
    ):
        push_image(registry.url, REPO, "v1", image, token_getter=lambda scope: tokens.issue([scope], USER))
        yield registry, tokens, image


@pytest.fixture
def socket_dir():
    path = Path(tempfile.mkdtemp(prefix="fpcri-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def proxied(tmp_path: Path, registry: LocalRegistry, socket_dir: Path, *, snapshotter: bool
            ) -> Iterator[tuple[ServeProcess, Containerd, CriImages, CriImages]]:
    """(serve, node, through, direct): ``fastpull serve --cri-proxy`` (and ``--snapshotter`` if asked,
    containerd's CRI snapshotter then) on a node with no credentials of its own; CRI clients through
    the proxy and straight to containerd. After the block: no credential in the log or the store."""
    proxy, upstream = socket_dir / "cri.sock", socket_dir / "containerd.sock"
    (tmp_path / "docker").mkdir()
    no_credentials = {"DOCKER_CONFIG": str(tmp_path / "docker"), "REGISTRY_AUTH_FILE": str(tmp_path / "none.json")}
    store, plugin = tmp_path / "store", socket_dir / "fastpull.sock"
    with node_daemons(tmp_path) as start_containerd:
        serve = ServeProcess(store, registry.host, *(("--snapshotter", str(plugin)) if snapshotter else ()),
                             "--cri-proxy", str(proxy), "--cri-upstream", str(upstream), env=no_credentials).start()
        try:
            node = start_containerd(**({"cri_snapshotter": "fastpull", "proxy_plugins": {"fastpull": plugin}}
                                       if snapshotter else {}))
            write_hosts_toml(node.hosts_dir, registry.host)
            upstream.symlink_to(node.address)  # known once containerd is made; the proxy connects on the first call
            assert stat.S_IMODE(proxy.stat().st_mode) == 0o600
            with CriImages(proxy) as through, CriImages(node.address) as direct:
                yield serve, node, through, direct
        finally:
            serve.stop()
    secrets = [PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode())]
    assert not [s for s in secrets if s.decode() in serve.log]
    leaks = [p for p in store.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in secrets)]
    assert leaks == []


def refused_alike(through: CriImages, direct: CriImages, ref: str) -> str:
    """A pull without credentials, through the proxy and straight: the same error; its details."""
    with pytest.raises(CriError) as refused:
        through.pull(ref)
    with pytest.raises(CriError) as refused_directly:
        direct.pull(ref)
    assert (refused.value.code, refused.value.details) == (refused_directly.value.code, refused_directly.value.details)
    return refused.value.details


def test_cri_pull_through_the_proxy_lends_its_credentials_to_the_snapshotter(tmp_path, private, socket_dir):
    registry, tokens, image = private
    ref = f"{registry.host}/{REPO}:v1"
    with proxied(tmp_path, registry, socket_dir, snapshotter=True) as (serve, node, through, direct):
        assert "may require authorization" in refused_alike(through, direct, ref)

        registry.clear_served()
        image_id = through.pull(ref, auth={"username": USER, "password": PASSWORD})
        sent = blob_bytes_sent(registry)
        for layer in image.layers:  # the snapshotter fetched them, with the pull's credentials
            assert sent.get(layer.digest) == layer.size
            assert not node.content_path(layer.digest).exists()
        assert len(node.snapshots(snapshotter="fastpull", namespace=CRI_NAMESPACE)) == len(image.layers)

        assert through.status(ref) == direct.status(ref) is not None
        assert through.status(ref).id == image_id
        assert through.list() == direct.list()
        assert [f.fs_id for f in through.fs_info()] == [f.fs_id for f in direct.fs_info()]
        through.remove(ref)
        assert direct.status(ref) is None


@pytest.mark.parametrize("kind", ["identity_token", "registry_token"])
def test_provided_credentials_come_first_and_their_tokens_serve_them_alone(private, kind):
    registry, tokens, image = private
    lent: dict[tuple[str, str], Credentials] = {}
    client = RegistryClient(registry.host, credentials=None,
                            credentials_provider=lambda host, repository: lent.get((host, repository or "")))
    digest = image.manifest_digest
    with pytest.raises(AuthError):
        client.manifest(REPO, digest)
    token = tokens.issue([f"repository:{REPO}:pull"], USER)
    lent[registry.host, REPO] = Credentials("", "", **{kind: IDENTITY_TOKEN if kind == "identity_token" else token})
    tokens.requests.clear()
    client.manifest(REPO, digest)
    assert [r.method for r in tokens.requests] == (["POST"] if kind == "identity_token" else [])
    del lent[registry.host, REPO]
    with pytest.raises(AuthError):  # the token got with them is not the anonymous one
        client.manifest(REPO, digest)


def test_without_the_snapshotter_the_proxy_imports_the_pulled_image_with_its_credentials(
        tmp_path, private, socket_dir):
    """No containerd configuration changed: kubelet's image service alone points at fastpull, which
    imports each pulled image into containerd's own stores (with the pull's credentials) before
    containerd sees the call; containerd then finds it present. Without credentials the import fails
    and containerd's own pull says what it says without fastpull."""
    registry, tokens, image = private
    ref = f"{registry.host}/{REPO}:v1"
    with proxied(tmp_path, registry, socket_dir, snapshotter=False) as (serve, node, through, direct):
        refused_alike(through, direct, ref)
        assert "not imported by fastpull" in serve.log

        registry.clear_served()
        image_id = through.pull(ref, auth={"username": USER, "password": PASSWORD})
        assert image_id == json.loads(image.manifest)["config"]["digest"]
        sent = blob_bytes_sent(registry)
        for layer in image.layers:  # fetched once, by fastpull: containerd's own pull keeps layer blobs
            assert sent.get(layer.digest) == layer.size
            assert not node.content_path(layer.digest).exists()
        assert len(node.snapshots(namespace=CRI_NAMESPACE)) == len(image.layers)
        assert through.status(ref).id == image_id
