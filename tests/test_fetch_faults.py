"""Fetch engine under faults a real registry cannot produce (tests/faultserver.py), beyond the
fault matrix (tests/test_fault_matrix.py): redirects, refusals, a missing blob, an engine closed mid-blob."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import wait_until
from faultserver import FaultRegistry

from fastpull import FastpullError, FetchOptions, RegistryError, pull
from fastpull.content.core import ChunkBitmap
from fastpull.content.store import ContentStore
from fastpull.testbed.images import LayerSpec, build_image

MiB = 1 << 20
CHUNK = 256 * 1024
FAST_RETRIES = dict(chunk_size=CHUNK, chunks_per_blob=4, backoff_base=0.05, backoff_max=0.5)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_image([LayerSpec(4 * MiB), LayerSpec(MiB, content="text")], tmp_path_factory.mktemp("img"), seed=11)


@pytest.fixture
def server(image):
    with FaultRegistry() as srv:
        srv.add_image("faulty/app", "v1", image)
        yield srv


def _ref(srv: FaultRegistry) -> str:
    return f"{srv.host}/faulty/app:v1"


def _stored(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _assert_pulled(layout: Path, image) -> None:
    for desc in image.blobs:
        assert _stored(layout, desc.digest).read_bytes() == image.blob_path(desc.digest).read_bytes()


def test_fetch_redirect_is_resolved_once_and_drops_authorization(server, image, layout, caplog):
    big = image.layers[0]
    server.require_bearer("secret-token")
    with FaultRegistry(host="127.0.0.2") as cdn:
        server.redirect_to(big.digest, cdn)
        with caplog.at_level("INFO", logger="fastpull.engine.loop"):
            pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
        _assert_pulled(layout, image)
        assert caplog.text.count(f"{big.digest} is redirected to {cdn.host}") == 1  # what -v says
        assert len([r for r in server.requests_for(big.digest) if r.method == "GET"]) == 1
        cdn_gets = [r for r in cdn.requests_for(big.digest) if r.method == "GET"]
        assert len(cdn_gets) == -(-big.size // CHUNK)
        assert not any(r.authorization for r in cdn_gets)
    assert all(r.authorization for r in server.log if r.path.startswith("/v2/faulty") and r.status != 401)


def test_fetch_redirect_that_never_works_fails_with_the_cdn_status(server, image, layout):
    big = image.layers[0]
    with FaultRegistry(host="127.0.0.2") as cdn:
        server.redirect_to(big.digest, cdn, signed_uses=1)
        cdn.fail_first(big.digest, 1000, status=403)
        with pytest.raises(RegistryError, match="127.0.0.2.* -> HTTP 403") as e:
            pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
        assert e.value.status == 403
        assert not _stored(layout, big.digest).exists()


def test_fetch_missing_blob_is_a_registry_error(server, image, layout):
    server.clear_faults()
    with FaultRegistry() as other:
        other.add_manifest("faulty/app", "v1", image.manifest, image.media_type)  # blobs unknown there
        with pytest.raises(RegistryError) as err:
            pull(f"{other.host}/faulty/app:v1", layout, options=FetchOptions(**FAST_RETRIES))
    assert err.value.status == 404 and "BLOB_UNKNOWN" in str(err.value) and other.host in str(err.value)


def test_fetch_engine_closed_mid_download_fails_fast_and_keeps_partial_data(server, image, layout):
    from fastpull.engine import FetchEngine
    from fastpull.puller import RepositorySource
    from fastpull.registry.client import RegistryClient

    big = image.layers[0]
    server.slow(big.digest, 256 * 1024)  # every range crawls: the download is mid-way when we close
    store = ContentStore(layout)
    source = RepositorySource(RegistryClient(server.host), "faulty/app")
    engine = FetchEngine(FetchOptions(chunk_size=CHUNK, chunks_per_blob=4))
    future = engine.fetch(store, source, big.digest, big.size)
    bitmap_path = store.ingest_dir / big.digest.split(":")[1] / "bitmap"
    wait_until(bitmap_path.exists, "the blob is being fetched")
    bitmap = ChunkBitmap(bitmap_path)
    seen = bitmap.sequence
    while bitmap.count() == 0:  # woken as chunks land
        seen = bitmap.wait(seen, 5.0)
    bitmap.close()
    engine.close()
    with pytest.raises(FastpullError, match="closed"):
        future.result(timeout=5)
    assert store.ingests() == [big.digest] and not store.has(big.digest)  # kept for a resume
    late = engine.fetch(store, source, big.digest, big.size)
    with pytest.raises(FastpullError, match="closed"):
        late.result(timeout=1)
