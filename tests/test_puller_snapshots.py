"""Pulls into ChainID snapshots (``Puller.pull(..., snapshots=)``) against the real registry: each
layer's snapshot is committed as soon as it and the layers under it are unpacked, and its
``LayerDone(digest, "unpacked")`` comes only then, base first; a layer that fails leaves those under it
committed; a pull whose layers another pull is building hears of each as that pull commits it.

Every step is driven by what the pull tells (its events) and by locks the test holds, never by timing:
a blob whose lock the test holds cannot land, a snapshot whose lock it holds cannot be built.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from pathlib import Path

import pytest
from conftest import blob_storage_path, flocks

from fastpull import DigestMismatch, FetchOptions, Puller, pull
from fastpull.content.store import ContentStore
from fastpull.events import Failed, LayerDone, Pulled, Resolved
from fastpull.testbed.images import BuiltImage, LayerSpec, build_image, push_image
from fastpull.unpack.snapshots import Snapshotter, chain_ids

MiB = 1 << 20
OPTS = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4)
SPECS = [LayerSpec(MiB, files=3), LayerSpec(MiB // 2, content="text", files=2), LayerSpec(MiB, files=4)]
WAIT_S = 60
"""How long a step may take before the test fails (a bound, never a pace)."""


def _push(registry, image_cache: Path, repo: str, seed: int, image: BuiltImage | None = None):
    image = image or build_image(SPECS, image_cache / f"puller-snapshots-{seed}", seed=seed)
    push_image(registry.url, repo, "v1", image)
    return image, f"{registry.host}/{repo}:v1"


def _snapshot(root: Path, diff_ids: list[str], i: int) -> Path:
    return Snapshotter(root).path(chain_ids(diff_ids)[i])


def _files(i: int) -> set[str]:
    """What layer ``i`` of SPECS holds (the testbed writes ``layer-<i>/file-<n>``)."""
    return {f"layer-{i}", *(f"layer-{i}/file-{n:05d}" for n in range(SPECS[i].files))}


def _tree(snapshot: Path) -> set[str]:
    return {str(p.relative_to(snapshot)) for p in snapshot.rglob("*")}


def _unpacked(events) -> list[str]:
    return [e.digest for e in events if isinstance(e, LayerDone) and e.state == "unpacked"]


def _states(events) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for e in events:
        if isinstance(e, LayerDone):
            states.setdefault(e.digest, []).append(e.state)
    return states


def _hold_blob(layout: Path, image: BuiltImage, i: int, commit: bool = True):
    """Hold layer ``i``'s blob lock in ``layout``'s store, as another writer would; the returned
    ``release()`` commits the blob (unless not ``commit``: the pull then fetches it) and lets go."""
    store = ContentStore(layout)
    layer = image.layers[i]
    writer = store.open_writer(layer.digest, layer.size, OPTS.chunk_size)
    held = [writer]

    def release() -> None:
        if held:
            if commit:
                store.put_bytes(layer.digest, image.blob_path(layer.digest).read_bytes())
            held.pop().close()

    return release


def test_each_snapshot_is_committed_and_told_once_it_and_those_below_are_unpacked(registry, image_cache, tmp_path):
    image, ref = _push(registry, image_cache, "snapshots/early", seed=41)
    diff_ids = [d.diff_id for d in image.layers]
    digests = [d.digest for d in image.layers]
    layout, root = tmp_path / "layout", tmp_path / "snapshots"
    release_top = _hold_blob(layout, image, 2)  # the top layer cannot land until layer 1 is told unpacked
    events = []

    def heard(event) -> None:
        events.append(event)
        if isinstance(event, LayerDone) and event.state == "unpacked":
            i = digests.index(event.digest)
            assert Snapshotter(root).has(chain_ids(diff_ids)[i])  # committed and visible when told
            assert _tree(_snapshot(root, diff_ids, i)) == _files(i)
            if i == 1:
                assert not _snapshot(root, diff_ids, 2).exists()  # its blob is still held
                release_top()

    try:
        result = pull(ref, layout, snapshots=root, options=OPTS, events=heard)
    finally:
        release_top()
    assert isinstance(events[0], Resolved) and isinstance(events[-1], Pulled)
    assert _states(events) == {digests[0]: ["fetched", "unpacked"], digests[1]: ["fetched", "unpacked"],
                               digests[2]: ["present", "unpacked"]}  # another writer committed the top blob
    assert _unpacked(events) == digests  # base first
    # Layers 0 and 1 were committed and told before the top layer's blob was even there.
    assert events.index(LayerDone(digests[1], "unpacked")) < events.index(LayerDone(digests[2], "present"))
    assert result.snapshots == tuple(_snapshot(root, diff_ids, i) for i in range(3))
    assert result.unpacked_layers == 3
    assert not any((root / ".tmp").iterdir()) and not flocks(root / ".locks")


def _with_diff_id(image: BuiltImage, i: int, diff_id: str, out: Path) -> BuiltImage:
    """A copy of ``image`` whose config names ``diff_id`` for layer ``i`` (the manifest rewritten to match)."""
    import dataclasses
    import os

    from fastpull.oci.manifest import Descriptor

    config = json.loads(image.blob_path(image.config.digest).read_bytes())
    config["rootfs"]["diff_ids"][i] = diff_id
    body = json.dumps(config).encode()
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for desc in image.layers:
        os.link(image.blob_path(desc.digest), blobs / desc.digest.split(":")[1])
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    (blobs / digest.split(":")[1]).write_bytes(body)
    manifest = json.loads(image.manifest)
    manifest["config"]["digest"], manifest["config"]["size"] = digest, len(body)
    manifest_body = json.dumps(manifest).encode()
    (blobs / hashlib.sha256(manifest_body).hexdigest()).write_bytes(manifest_body)
    return dataclasses.replace(image, out_dir=out, manifest=manifest_body,
                               manifest_digest="sha256:" + hashlib.sha256(manifest_body).hexdigest(),
                               config=Descriptor(image.config.media_type, digest, len(body)))


@pytest.mark.parametrize("fault", ["digest", "diffID"])
def test_a_layer_that_fails_leaves_the_snapshots_below_it_committed(registry, image_cache, tmp_path, fault):
    image = build_image(SPECS, image_cache / f"puller-snapshots-fail-{fault}", seed=42 if fault == "digest" else 43)
    bad = image.layers[2]
    diff_ids = [d.diff_id for d in image.layers]
    if fault == "diffID":
        diff_ids[2] = "sha256:" + "0" * 64
        image = _with_diff_id(image, 2, diff_ids[2], tmp_path / "forged")
    image, ref = _push(registry, image_cache, f"snapshots/fail-{fault.lower()}", 0, image)
    stored = blob_storage_path(registry, bad.digest)
    original = stored.read_bytes()
    layout, root = tmp_path / "layout", tmp_path / "snapshots"
    # The pull stops at its first failure: the bad layer is fetched only once those below are in.
    release_bad = _hold_blob(layout, image, 2, commit=False)
    events = []

    def heard(event) -> None:
        events.append(event)
        if event == LayerDone(image.layers[1].digest, "unpacked"):
            release_bad()

    try:
        if fault == "digest":
            tampered = bytearray(original)
            tampered[len(tampered) // 2] ^= 0xFF
            stored.write_bytes(bytes(tampered))
        with pytest.raises(DigestMismatch) as err:
            pull(ref, layout, snapshots=root, options=OPTS, events=heard)
    finally:
        release_bad()
        stored.write_bytes(original)
    assert bad.digest in str(err.value) and (fault == "digest" or "diffID" in str(err.value))
    for i in (0, 1):  # verified and complete: they stay, for the next pull
        assert _tree(_snapshot(root, diff_ids, i)) == _files(i)
    assert not _snapshot(root, diff_ids, 2).exists()
    assert sorted(p.name for p in (root / "sha256").iterdir()) == sorted(
        _snapshot(root, diff_ids, i).name for i in (0, 1))
    assert not any((root / ".tmp").iterdir()) and not flocks(root / ".locks")
    assert _unpacked(events) == [d.digest for d in image.layers[:2]]
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "DigestMismatch" and failed.digest == bad.digest


def _wait_for(told: queue.Queue, wanted) -> None:
    while told.get(timeout=WAIT_S) != wanted:
        pass


def test_a_second_pull_of_the_image_hears_of_each_layer_as_the_first_commits_it(registry, image_cache, tmp_path):
    """Two pulls of one image over one Puller (as a snapshotter serving several Prepares runs them):
    the second finds layer 0 committed, and layers 1 and 2 being built by the first; it does not
    build them again, and tells each as soon as the first commits it, not once the first is done."""
    image, ref = _push(registry, image_cache, "snapshots/second", seed=44)
    diff_ids = [d.diff_id for d in image.layers]
    digests = [d.digest for d in image.layers]
    layout, root = tmp_path / "layout", tmp_path / "snapshots"
    release_middle = _hold_blob(layout, image, 1)  # the first pull's layer 1 waits for the test
    second_events, second_told, second_outcome = [], queue.Queue(), []
    first_events = []

    with Puller(OPTS) as puller:
        def second_heard(event) -> None:
            second_events.append(event)
            second_told.put(event)

        def second_pull() -> None:
            try:
                second_outcome.append(puller.pull(ref, layout, snapshots=root, events=second_heard))
            except BaseException as e:  # noqa: B036 - reported below
                second_outcome.append(e)

        second = threading.Thread(target=second_pull)

        def first_heard(event) -> None:
            first_events.append(event)
            if event == LayerDone(digests[0], "unpacked"):
                second.start()
                _wait_for(second_told, LayerDone(digests[0], "unpacked"))  # layer 0 is there: told at once
                assert not _snapshot(root, diff_ids, 1).exists()  # while the first still builds layer 1
                release_middle()

        try:
            first = puller.pull(ref, layout, snapshots=root, events=first_heard)
        finally:
            release_middle()
            if second.ident is not None:
                second.join(WAIT_S)
    (second_result,) = second_outcome
    assert not isinstance(second_result, BaseException), second_result
    assert _unpacked(first_events) == _unpacked(second_events) == digests
    assert _states(second_events) == {d: ["present", "unpacked"] for d in digests}
    assert isinstance(second_events[-1], Pulled)
    assert first.unpacked_layers == 3 and second_result.unpacked_layers == 0  # each snapshot unpacked once
    assert second_result.snapshots == first.snapshots
    for i in range(3):
        assert _tree(first.snapshots[i]) == _files(i)
    assert not any((root / ".tmp").iterdir()) and not flocks(root / ".locks")


def test_a_snapshot_another_pull_gives_up_is_built_by_the_pull_waiting_for_it(registry, image_cache, tmp_path):
    """Layer 1's snapshot is held (as by another pull) when the pull starts: layer 0 is committed and
    told meanwhile; when the holder gives up, the pull builds layer 1 itself, then layer 2."""
    image, ref = _push(registry, image_cache, "snapshots/takeover", seed=45)
    diff_ids = [d.diff_id for d in image.layers]
    digests = [d.digest for d in image.layers]
    root = tmp_path / "snapshots"
    holder = Snapshotter(root).prepare(chain_ids(diff_ids)[1], block=False)
    events, told, outcome = [], queue.Queue(), []

    def heard(event) -> None:
        events.append(event)
        told.put(event)

    def run() -> None:
        try:
            outcome.append(pull(ref, tmp_path / "layout", snapshots=root, options=OPTS, events=heard))
        except BaseException as e:  # noqa: B036 - reported below
            outcome.append(e)

    puller = threading.Thread(target=run)
    puller.start()
    try:
        _wait_for(told, LayerDone(digests[0], "unpacked"))  # told while layer 1 is held
        assert not Snapshotter(root).has(chain_ids(diff_ids)[1])
    finally:
        holder.abort()
        puller.join(WAIT_S)
    (result,) = outcome
    assert not isinstance(result, BaseException), result
    assert _unpacked(events) == digests
    assert result.unpacked_layers == 3
    for i in range(3):
        assert _tree(result.snapshots[i]) == _files(i)
    assert not any((root / ".tmp").iterdir()) and not flocks(root / ".locks")
