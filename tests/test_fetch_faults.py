"""Fetch engine under faults a real registry cannot produce (tests/faultserver.py)."""

from __future__ import annotations

import email.utils
import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from faultserver import FaultRegistry

from fastpull import DigestMismatch, FastpullError, FetchOptions, RegistryError, StoreError, pull
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


def _range_starts(srv: FaultRegistry, digest: str) -> list[int]:
    return [int(r.range.split("=")[1].split("-")[0]) for r in srv.requests_for(digest) if r.range]


def _assert_pulled(layout: Path, image) -> None:
    for desc in image.blobs:
        assert _stored(layout, desc.digest).read_bytes() == image.blob_path(desc.digest).read_bytes()


def test_fetch_server_ignoring_range_falls_back_to_one_stream(server, image, layout, caplog):
    big = image.layers[0]
    server.ignore_range(big.digest)
    with caplog.at_level("INFO", logger="fastpull.engine.loop"):
        pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
    _assert_pulled(layout, image)
    gets = [r for r in server.requests_for(big.digest) if r.method == "GET"]
    assert len(gets) == 1 and gets[0].status == 200  # the probe became the single stream
    assert server.bytes_served(big.digest) == big.size
    assert sum("ignores Range" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("as_date", [False, True], ids=["seconds", "http-date"])
def test_fetch_retries_503_honouring_retry_after(server, image, layout, as_date):
    big = image.layers[0]
    # An HTTP date has whole seconds: 2 s ahead is at least 1 s ahead.
    retry_after = email.utils.formatdate(time.time() + 2, usegmt=True) if as_date else 1
    server.fail_first(big.digest, 2, status=503, retry_after=retry_after)
    started = time.monotonic()
    pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
    assert time.monotonic() - started >= 1.0  # waited as told, although backoff_max is 0.5 s
    _assert_pulled(layout, image)


def test_fetch_reset_mid_body_resumes_from_bytes_written(server, image, layout):
    big = image.layers[0]
    server.reset_first(big.digest, 3, after=100_000)
    pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
    _assert_pulled(layout, image)
    # Three broken transfers delivered 100 kB each; their chunks resumed from there.
    assert server.bytes_served(big.digest) <= big.size + 3 * 100_000
    assert any(start % CHUNK == 100_000 for start in _range_starts(server, big.digest))


def test_fetch_gives_up_after_retries_naming_the_url(server, image, layout):
    big = image.layers[0]
    server.fail_first(big.digest, 100, status=500)
    with pytest.raises(RegistryError) as err:  # as a manifest's 500 would: one HTTP policy
        pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES, retries=2))
    assert err.value.status == 500 and big.digest in str(err.value) and server.host in str(err.value)
    assert not _stored(layout, big.digest).exists()


def test_fetch_stalled_transfer_is_cut_and_reissued(server, image, layout):
    big = image.layers[0]
    server.stall_after(big.digest, 50_000, first=1)
    started = time.monotonic()
    pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES, stall_timeout=1.0))
    assert time.monotonic() - started < 30
    _assert_pulled(layout, image)


def test_fetch_straggler_range_is_reissued(server, image, layout):
    big = image.layers[0]
    # Chunk 4's first request crawls at 16 kB/s; the rest are unthrottled.
    server.slow(big.digest, 16_000, ranges={4 * CHUNK})
    opts = FetchOptions(chunk_size=CHUNK, chunks_per_blob=4, straggler_min_age=0.5, straggler_ratio=4)
    started = time.monotonic()
    pull(_ref(server), layout, options=opts)
    elapsed = time.monotonic() - started
    _assert_pulled(layout, image)
    assert elapsed < CHUNK / 16_000 / 2  # did not wait for the slow copy
    starts = _range_starts(server, big.digest)
    assert len([s for s in starts if 4 * CHUNK <= s < 5 * CHUNK]) >= 2


def test_fetch_redirect_is_resolved_once_and_drops_authorization(server, image, layout):
    big = image.layers[0]
    server.require_bearer("secret-token")
    with FaultRegistry(host="127.0.0.2") as cdn:
        server.redirect_to(big.digest, cdn)
        pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
        _assert_pulled(layout, image)
        assert len([r for r in server.requests_for(big.digest) if r.method == "GET"]) == 1
        cdn_gets = [r for r in cdn.requests_for(big.digest) if r.method == "GET"]
        assert len(cdn_gets) == -(-big.size // CHUNK)
        assert not any(r.authorization for r in cdn_gets)
    assert all(r.authorization for r in server.log if r.path.startswith("/v2/faulty") and r.status != 401)


def test_fetch_expired_signed_redirect_is_resolved_again_mid_blob(server, image, layout):
    big = image.layers[0]
    with FaultRegistry(host="127.0.0.2") as cdn:
        # Each signed URL serves 5 requests, then answers 403 "Request has expired" (as S3 does).
        server.redirect_to(big.digest, cdn, signed_uses=5)
        pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
        _assert_pulled(layout, image)
        chunks = -(-big.size // CHUNK)
        expired = [r for r in cdn.requests_for(big.digest) if r.status == 403]
        assert expired, "the signed URL never expired: the test proves nothing"
        resolved = [r for r in server.requests_for(big.digest) if r.method == "GET"]
        assert len(resolved) >= -(-chunks // 5)  # a fresh redirect for every 5 requests
        # The chunks written before an expiry were kept: every byte came from the CDN once.
        assert cdn.bytes_served(big.digest) == big.size


def test_fetch_redirect_that_never_works_fails_with_the_cdn_status(server, image, layout):
    big = image.layers[0]
    with FaultRegistry(host="127.0.0.2") as cdn:
        server.redirect_to(big.digest, cdn, signed_uses=1)
        cdn.fail_first(big.digest, 1000, status=403)
        with pytest.raises(RegistryError, match="127.0.0.2.* -> HTTP 403") as e:
            pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
        assert e.value.status == 403
        assert not _stored(layout, big.digest).exists()


def test_fetch_expired_token_is_refreshed(server, image, layout):
    server.require_bearer("t0")
    big = image.layers[0]
    server.slow(big.digest, 2 * MiB)
    from fastpull import Puller

    with Puller(FetchOptions(**FAST_RETRIES)) as puller:
        puller.pull(_ref(server), layout / "a")
        before = server.token_requests
        server.expire_token()
        puller.pull(_ref(server), layout / "b")
    assert server.token_requests > before
    _assert_pulled(layout / "b", image)


def test_fetch_missing_blob_is_a_registry_error(server, image, layout):
    server.clear_faults()
    with FaultRegistry() as other:
        other.add_manifest("faulty/app", "v1", image.manifest, image.media_type)  # blobs unknown there
        with pytest.raises(RegistryError) as err:
            pull(f"{other.host}/faulty/app:v1", layout, options=FetchOptions(**FAST_RETRIES))
    assert err.value.status == 404 and "BLOB_UNKNOWN" in str(err.value) and other.host in str(err.value)


def test_fetch_corrupt_bytes_never_committed(server, image, layout):
    big = image.layers[0]
    server.corrupt(big.digest)
    with pytest.raises(DigestMismatch) as err:
        pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
    actual = hashlib.sha256(image.blob_path(big.digest).read_bytes()).hexdigest()
    assert big.digest in str(err.value) and actual not in str(err.value).split("got")[1]
    assert not _stored(layout, big.digest).exists()
    assert not (layout / "index.json").exists() or '"manifests": []' in (layout / "index.json").read_text()


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_fetch_full_disk_is_a_clear_error_and_keeps_stored_blobs(server, image, tiny_disk):
    layout = tiny_disk / "layout"
    small = image.layers[1]
    ContentStore(layout).put_bytes(small.digest, image.blob_path(small.digest).read_bytes())
    with pytest.raises(StoreError) as err:
        pull(_ref(server), layout, options=FetchOptions(**FAST_RETRIES))
    assert str(layout) in str(err.value) and "space" in str(err.value).lower()
    assert _stored(layout, small.digest).read_bytes() == image.blob_path(small.digest).read_bytes()
    assert not _stored(layout, image.layers[0].digest).exists()


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
    deadline = time.monotonic() + 10
    while not store.ingests():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    engine.close()
    with pytest.raises(FastpullError, match="closed"):
        future.result(timeout=5)
    assert store.ingests() == [big.digest] and not store.has(big.digest)  # kept for a resume
    late = engine.fetch(store, source, big.digest, big.size)
    with pytest.raises(FastpullError, match="closed"):
        late.result(timeout=1)
