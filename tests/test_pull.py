"""End-to-end pulls against the real CNCF distribution registry."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import blob_storage_path, blocked_on, wait_until

from fastpull import DigestMismatch, FetchOptions, Puller, pull
from fastpull.content.layout import REF_NAME
from fastpull.content.store import ContentStore
from fastpull.engine import FetchEngine
from fastpull.puller import RepositorySource
from fastpull.registry.client import RegistryClient
from fastpull.testbed.images import LayerSpec, build_image, push_image

MiB = 1 << 20
# Small chunks so that even test-sized blobs are fetched as many ranged transfers.
SMALL_CHUNKS = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4, blobs_in_flight=3)


def _push(registry, image_cache: Path, repo: str, specs, *, media="oci", seed=0, tag="v1"):
    name = f"{repo.replace('/', '_')}-{media}-{seed}"
    image = build_image(specs, image_cache / name, media=media, seed=seed)
    push_image(registry.url, repo, tag, image)
    return image, f"{registry.host}/{repo}:{tag}"


def _blob_gets(registry, digest: str):
    return [r for r in registry.served() if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")]


def _assert_valid_layout(layout: Path, ref: str, image) -> None:
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (entry,) = [m for m in index["manifests"] if m["annotations"][REF_NAME] == ref]
    assert entry["digest"] == image.manifest_digest and entry["size"] == len(image.manifest)
    for path in (layout / "blobs" / "sha256").iterdir():  # every stored blob is what its name says
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    manifest = json.loads((layout / "blobs" / "sha256" / image.manifest_digest.split(":")[1]).read_bytes())
    for desc in [manifest["config"], *manifest["layers"]]:
        blob = layout / "blobs" / "sha256" / desc["digest"].split(":")[1]
        assert blob.stat().st_size == desc["size"]
        assert blob.read_bytes() == image.blob_path(desc["digest"]).read_bytes()


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_pull_multi_layer_image_into_valid_layout(registry, image_cache, layout, media):
    specs = [LayerSpec(3 * MiB), LayerSpec(1 * MiB, content="text"), LayerSpec(100_000), LayerSpec(2 * MiB, files=5)]
    image, ref = _push(registry, image_cache, f"pull/{media}", specs, media=media)
    registry.clear_served()
    result = pull(ref, layout, options=SMALL_CHUNKS)
    assert result.descriptor.digest == image.manifest_digest
    assert [d.digest for d in result.manifest.layers] == [d.digest for d in image.layers]
    _assert_valid_layout(layout, ref, image)
    biggest = image.layers[0]
    ranged = [r for r in _blob_gets(registry, biggest.digest) if r.status == 206]
    assert len(ranged) == -(-biggest.size // SMALL_CHUNKS.chunk_size)  # one request per chunk
    assert sum(r.bytes_written for r in ranged) == biggest.size
    assert not list((layout / ".fastpull" / "ingest").iterdir())  # no ingest left behind


def test_progress_counts_up_to_the_missing_blobs(registry, image_cache, layout):
    image, ref = _push(registry, image_cache, "pull/progress", [LayerSpec(3 * MiB), LayerSpec(MiB)], seed=5)
    calls: list[tuple[int, int]] = []
    pull(ref, layout, options=SMALL_CHUNKS, progress=lambda done, total: calls.append((done, total)))
    missing = image.total_size  # config and layers: every blob the engine fetches
    assert calls[-1] == (missing, missing)
    assert all(total == missing and 0 <= done <= missing for done, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)

    calls.clear()
    pull(ref, layout, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 0)]  # nothing was missing


def test_a_blob_another_writer_commits_is_not_counted_as_fetched(registry, image_cache, layout):
    image, ref = _push(registry, image_cache, "pull/counted", [LayerSpec(2 * MiB), LayerSpec(MiB)], seed=9)
    theirs = image.layers[0]
    store = ContentStore(layout)
    writer = store.open_writer(theirs.digest, theirs.size, SMALL_CHUNKS.chunk_size)  # another writer's lock
    results = []
    puller = threading.Thread(target=lambda: results.append(pull(ref, layout, options=SMALL_CHUNKS)))
    try:
        puller.start()
        wait_until(lambda: blocked_on(store.ingest_dir) == 1, "the pull waits for the other writer")
        store.put_bytes(theirs.digest, image.blob_path(theirs.digest).read_bytes())
    finally:
        writer.close()
        puller.join(30)
    (result,) = results
    assert result.fetched_bytes == image.total_size - theirs.size + len(image.manifest)
    _assert_valid_layout(layout, ref, image)


def test_pull_again_fetches_nothing_and_layouts_share_blobs(registry, image_cache, layout):
    shared = LayerSpec(2 * MiB)
    image_a, ref_a = _push(registry, image_cache, "pull/share-a", [shared, LayerSpec(MiB)], seed=1)
    pull(ref_a, layout, options=SMALL_CHUNKS)
    registry.clear_served()
    again = pull(ref_a, layout, options=SMALL_CHUNKS)
    assert again.fetched_bytes == 0
    assert not [r for r in registry.served() if "/blobs/" in r.path]

    # A second image sharing the first layer: only its own blobs are fetched.
    image_b = build_image([shared, LayerSpec(MiB, content="text")], image_cache / "share-b", seed=1)
    assert image_b.layers[0].digest == image_a.layers[0].digest
    push_image(registry.url, "pull/share-b", "v1", image_b)
    registry.clear_served()
    ref_b = f"{registry.host}/pull/share-b:v1"
    pull(ref_b, layout, options=SMALL_CHUNKS)
    assert not _blob_gets(registry, image_a.layers[0].digest)
    assert _blob_gets(registry, image_b.layers[1].digest)
    index = json.loads((layout / "index.json").read_text())
    assert {m["annotations"][REF_NAME] for m in index["manifests"]} == {ref_a, ref_b}


def test_pull_by_digest(registry, image_cache, layout):
    image, _ = _push(registry, image_cache, "pull/bydigest", [LayerSpec(MiB)], seed=2)
    ref = f"{registry.host}/pull/bydigest@{image.manifest_digest}"
    result = pull(ref, layout)
    assert result.descriptor.digest == image.manifest_digest
    _assert_valid_layout(layout, ref, image)


def test_pull_corrupt_blob_in_registry_is_never_committed(registry, image_cache, layout):
    image, ref = _push(registry, image_cache, "pull/corrupt", [LayerSpec(MiB), LayerSpec(2 * MiB)], seed=3)
    bad = image.layers[1]
    stored = blob_storage_path(registry, bad.digest)
    original = stored.read_bytes()
    try:
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0xFF
        stored.write_bytes(bytes(tampered))
        with pytest.raises(DigestMismatch) as err:
            pull(ref, layout, options=SMALL_CHUNKS)
        assert bad.digest in str(err.value)
        assert not (layout / "blobs" / "sha256" / bad.digest.split(":")[1]).exists()
        assert (layout / "blobs" / "sha256" / image.layers[0].digest.split(":")[1]).exists()  # good ones kept
        index = json.loads((layout / "index.json").read_text()) if (layout / "index.json").exists() else {}
        assert not index.get("manifests")  # the image was not tagged
    finally:
        stored.write_bytes(original)
    pull(ref, layout, options=SMALL_CHUNKS)  # and a retry with good bytes succeeds
    _assert_valid_layout(layout, ref, image)


def test_pull_threads_share_one_download(registry, image_cache, layout):
    image, ref = _push(registry, image_cache, "pull/threads", [LayerSpec(4 * MiB), LayerSpec(2 * MiB)], seed=4)
    registry.clear_served()
    errors = []
    with Puller(SMALL_CHUNKS) as puller:
        def run():
            try:
                puller.pull(ref, layout)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    for desc in image.layers:
        assert sum(r.bytes_written for r in _blob_gets(registry, desc.digest)) == desc.size


PULL_SCRIPT = """
import sys
from fastpull import FetchOptions, pull
opts = FetchOptions(chunk_size=int(sys.argv[3]), chunks_per_blob=int(sys.argv[4]),
                    transfer_rate_limit=int(sys.argv[5]))
pull(sys.argv[1], sys.argv[2], options=opts)
"""


def _spawn_pull(ref: str, layout: Path, chunk_size: int, per_blob: int, rate: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PULL_SCRIPT, ref, str(layout), str(chunk_size), str(per_blob), str(rate)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_pull_processes_fetch_each_blob_once(registry, image_cache, layout):
    image, ref = _push(registry, image_cache, "pull/procs", [LayerSpec(6 * MiB), LayerSpec(3 * MiB)], seed=5)
    registry.clear_served()
    procs = [_spawn_pull(ref, layout, 512 * 1024, 4, 8 * MiB) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    for desc in [image.config, *image.layers]:
        assert sum(r.bytes_written for r in _blob_gets(registry, desc.digest)) == desc.size
    _assert_valid_layout(layout, ref, image)


def test_pull_cli_reports_throughput(registry, image_cache, layout):
    image, ref = _push(registry, image_cache, "pull/cli", [LayerSpec(MiB)], seed=7)
    done = subprocess.run(
        [sys.executable, "-m", "fastpull", "pull", ref, "--layout", str(layout), "--chunk-size", "0.25"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert image.manifest_digest in done.stdout and "MB/s" in done.stdout
    assert done.stderr == ""  # no progress bar unless stderr is a terminal
    bad = subprocess.run(
        [sys.executable, "-m", "fastpull", "pull", f"{registry.host}/pull/nope:v1", "--layout", str(layout)],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 1 and "pull/nope" in bad.stderr and "Traceback" not in bad.stderr
    assert os.path.exists(layout / "index.json")


def test_streamed_layers_are_fetched_in_short_requests(registry, image_cache, tmp_path):
    """A layer an unpacker follows (``on_open``) is fetched in short ranges, so that the watermark
    its reader follows moves as bytes land; other blobs keep requests of the tuned size (here with one
    transfer allowed: more would share the last bytes out among them)."""
    image, _ = _push(registry, image_cache, "pull/streamed", [LayerSpec(4 * MiB, files=1)] * 2, seed=3)
    followed, plain = image.layers
    store = ContentStore(tmp_path / "store")
    source = RepositorySource(RegistryClient(registry.host), "pull/streamed")
    registry.clear_served()
    with FetchEngine(FetchOptions(initial_transfers=1)) as engine:
        engine.fetch(store, source, followed.digest, followed.size, on_open=lambda: None).result()
        engine.fetch(store, source, plain.digest, plain.size).result()
    followed_bodies = [r.bytes_written for r in _blob_gets(registry, followed.digest)]
    assert len(followed_bodies) >= 4 and max(followed_bodies) <= MiB
    assert sum(followed_bodies) == followed.size
    assert [r.bytes_written for r in _blob_gets(registry, plain.digest)] == [plain.size]
