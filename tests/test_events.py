"""What a pull tells as it runs (fastpull.events through ``Puller.pull(..., events=)``), against the
real registry: the order of the events, their numbers, and the error a failed pull names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import blob_storage_path

from fastpull import DigestMismatch, FetchOptions, RegistryError, pull
from fastpull.content.store import ContentStore
from fastpull.events import Blob, Failed, LayerDone, Progress, Pulled, Resolved
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.unpack.workers import LayerJob, UnpackProgress, unpack_layer

MiB = 1 << 20
SMALL_CHUNKS = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4, blobs_in_flight=3)


def _push(registry, image_cache: Path, repo: str, specs, seed: int = 0):
    image = build_image(specs, image_cache / f"events-{repo.replace('/', '_')}-{seed}", seed=seed)
    push_image(registry.url, repo, "v1", image)
    return image, f"{registry.host}/{repo}:v1"


def _layer_states(events) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for e in events:
        if isinstance(e, LayerDone):
            states.setdefault(e.digest, []).append(e.state)
    return states


def test_a_pull_tells_resolved_then_layers_and_progress_then_pulled(registry, image_cache, tmp_path):
    image, ref = _push(registry, image_cache, "events/rootfs", [LayerSpec(3 * MiB), LayerSpec(MiB, files=3)], seed=1)
    events = []
    result = pull(ref, tmp_path / "layout", options=SMALL_CHUNKS, rootfs=tmp_path / "rootfs", events=events.append)

    first, *middle, last = events
    assert first == Resolved(ref, image.manifest_digest, None, tuple(Blob(d.digest, d.size) for d in image.layers))
    assert {type(e) for e in middle} <= {Progress, LayerDone}
    assert _layer_states(events) == {d.digest: ["fetched", "unpacked"] for d in image.layers}

    progress = [e for e in middle if isinstance(e, Progress)]
    layers_bytes = sum(d.size for d in image.layers)
    assert progress[-1] == Progress(image.total_size, image.total_size, progress[-1].rate, layers_bytes, layers_bytes)
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert all(p.total == image.total_size and p.unpack_total == layers_bytes for p in progress)

    assert isinstance(last, Pulled)
    assert (last.reference, last.digest, last.layers, last.rootfs) == (ref, image.manifest_digest, 2,
                                                                        str(tmp_path / "rootfs"))
    assert last.bytes == result.total_bytes and last.fetched == result.fetched_bytes == result.total_bytes
    assert 0 < last.download_seconds <= last.seconds and 0 < last.unpack_seconds <= last.seconds
    json.dumps([e.to_dict() for e in events])  # every event is JSON as it is

    # Pulled again into another rootfs: every layer is there already, and is unpacked again.
    events.clear()
    again = pull(ref, tmp_path / "layout", rootfs=tmp_path / "rootfs2", events=events.append)
    assert _layer_states(events) == {d.digest: ["present", "unpacked"] for d in image.layers}
    assert events[-2] == Progress(0, 0, 0, layers_bytes, layers_bytes)
    assert again.fetched_bytes == 0 and again.download_seconds < again.seconds


def test_progress_still_reaches_the_callback_of_two_numbers_beside_the_events(registry, image_cache, tmp_path):
    image, ref = _push(registry, image_cache, "events/both", [LayerSpec(2 * MiB)], seed=2)
    calls, events = [], []
    pull(ref, tmp_path / "layout", options=SMALL_CHUNKS, events=events.append,
         progress=lambda done, total: calls.append((done, total)))
    assert calls == [(p.done, p.total) for p in events if isinstance(p, Progress)]
    assert calls[-1] == (image.total_size, image.total_size)
    assert _layer_states(events) == {image.layers[0].digest: ["fetched"]}  # not unpacked


def test_a_failed_pull_tells_the_error_with_what_it_names(registry, tmp_path):
    ref = f"{registry.host}/events/missing:v1"
    events = []
    with pytest.raises(RegistryError):
        pull(ref, tmp_path / "layout", events=events.append)
    (failed,) = events
    assert isinstance(failed, Failed) and failed.kind == "RegistryError" and failed.reference == ref
    as_json = failed.to_dict()
    assert as_json["event"] == "error" and as_json["status"] == 404
    assert as_json["url"].endswith("/v2/events/missing/manifests/v1") and as_json["message"] == failed.message


def test_a_layer_that_fails_its_digest_is_named_in_the_error(registry, image_cache, tmp_path):
    image, ref = _push(registry, image_cache, "events/corrupt", [LayerSpec(MiB), LayerSpec(MiB)], seed=3)
    bad = image.layers[1]
    stored = blob_storage_path(registry, bad.digest)
    original = stored.read_bytes()
    events = []
    try:
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0xFF
        stored.write_bytes(bytes(tampered))
        with pytest.raises(DigestMismatch):
            pull(ref, tmp_path / "layout", options=SMALL_CHUNKS, events=events.append)
    finally:
        stored.write_bytes(original)
    assert isinstance(events[0], Resolved) and not any(isinstance(e, Pulled) for e in events)
    assert _layer_states(events) == {image.layers[0].digest: ["fetched"]}
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "DigestMismatch" and failed.digest == bad.digest
    assert failed.to_dict()["expected"] == bad.digest


def test_an_unpack_worker_counts_the_bytes_it_read_in_its_slot(image_cache, tmp_path):
    image = build_image([LayerSpec(2 * MiB, files=4)], image_cache / "events-slot")
    (layer,) = image.layers
    store = ContentStore(tmp_path / "store")
    store.put_bytes(layer.digest, image.blob_path(layer.digest).read_bytes())
    (tmp_path / "root").mkdir()
    slots = UnpackProgress(3)
    try:
        assert [slots[i] for i in range(3)] == [0, 0, 0]
        unpack_layer(LayerJob(str(store.root), layer.digest, layer.size, layer.media_type, layer.diff_id,
                              str(tmp_path / "root"), progress=(slots.path, 1)))
        assert [slots[i] for i in range(3)] == [0, layer.size, 0]
    finally:
        slots.close()
