"""Pulls of hundreds of tiny layers (tests/faultserver.py): a blob that fails for good ends the pull at
once, its other fetches stopped (containerd stops at the first error); an image of more layers than
overlayfs stacks is refused before any blob is fetched; a library pull interrupted (Ctrl-C) at any moment
unwinds, and closing the engine never waits on a future's lock its caller holds.

Moments are picked by what can be observed (requests served or started), never by sleeping; a bound
on how long something may take is only the detector of a hang.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import signal
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass

import pytest
from conftest import wait_until
from faultserver import FaultRegistry

from fastpull import DigestMismatch, FetchOptions, ManifestError, RegistryError, pull
from fastpull.content.store import ContentStore
from fastpull.engine import FetchEngine
from fastpull.events import Failed
from fastpull.oci.manifest import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Platform
from fastpull.puller import RepositorySource
from fastpull.puller.core import MAX_LAYERS
from fastpull.registry.client import RegistryClient

REPO = "many/app"
BOUND_S = 60
"""How long a step may take before it counts as hung (a detector, never a pace)."""


@dataclass(frozen=True)
class TinyImage:
    manifest: bytes
    config: bytes
    layers: list[bytes]
    """Each a gzip'd tar of one small file, base first."""

    @property
    def digests(self) -> list[str]:
        return [_digest(layer) for layer in self.layers]


def tiny_image(layers: int) -> TinyImage:
    """An image for this host of ``layers`` tiny layers, each of its own file."""
    blobs, diff_ids = [], []
    for i in range(layers):
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as t:
            data = f"layer {i}\n".encode()
            info = tarfile.TarInfo(f"file-{i:04d}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        diff_ids.append(_digest(tar.getvalue()))
        blobs.append(gzip.compress(tar.getvalue(), mtime=0))
    config = json.dumps({**Platform.host().to_dict(), "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": _digest(b), "size": len(b)} for b in blobs],
    }).encode()
    return TinyImage(manifest, config, blobs)


def serve(srv: FaultRegistry, image: TinyImage, missing: str | None = None) -> str:
    """Serve ``image`` (but the blob ``missing``) as REPO:v1; its reference."""
    for blob in [image.config, *image.layers]:
        if _digest(blob) != missing:
            srv.add_blob(blob)
    srv.add_manifest(REPO, "v1", image.manifest, OCI_MANIFEST)
    return f"{srv.host}/{REPO}:v1"


def blob_gets(srv: FaultRegistry) -> list:
    return [r for r in srv.log if r.method == "GET" and "/blobs/" in r.path]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def image() -> TinyImage:
    return tiny_image(MAX_LAYERS)


IN_FLIGHT = 4
SECONDS_PER_LAYER = 0.5
"""Each layer's body trickles for this long: the pull is under way when the first blob fails."""


@pytest.mark.parametrize("fault", ["digest", "missing", "denied"])
def test_a_blob_that_fails_for_good_ends_the_pull_at_once(image, tmp_path, fault):
    """Every layer corrupt (each fails its digest twice: for good), or layer 8 missing (404) or refused
    (403): the pull raises that first failure, naming its blob, and the registry sees no request after
    it but those already on their way (the transfers in flight, at most)."""
    bad = image.digests[8]
    with FaultRegistry() as srv:
        ref = serve(srv, image, missing=bad if fault == "missing" else None)
        for digest, layer in zip(image.digests, image.layers):
            if digest == bad and fault == "missing":
                continue
            srv.slow(digest, len(layer) / SECONDS_PER_LAYER)
            if fault == "digest":
                srv.corrupt(digest)
        if fault == "denied":
            srv.fail_first(bad, 10**6, status=403)
        events = []
        with pytest.raises(DigestMismatch if fault == "digest" else RegistryError) as err:
            pull(ref, tmp_path / "layout", options=FetchOptions(blobs_in_flight=IN_FLIGHT, max_transfers=IN_FLIGHT),
                 events=events.append)
        gets = blob_gets(srv)
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.message == str(err.value)
    culprit = [r for r in gets if r.path.endswith(failed.digest)]
    if fault == "digest":
        assert err.value.expected == failed.digest and len(culprit) == 2  # fetched once more, then for good
    else:
        assert failed.digest == bad and err.value.status == (404 if fault == "missing" else 403)
    # The failure was known once the culprit's last answer was all sent (a corrupt body trickles).
    known = culprit[-1].arrived + (SECONDS_PER_LAYER if fault == "digest" else 0)
    late = [r for r in gets if r.arrived > known]
    assert len(late) <= 2 * IN_FLIGHT, late  # in flight then, or started before the engine heard of it
    assert len(gets) < 4 * IN_FLIGHT + 8  # not the ~500 layers, let alone twice each


def test_more_layers_than_overlayfs_stacks_are_refused_before_any_blob_is_fetched(tmp_path):
    with FaultRegistry() as srv:
        ref = serve(srv, tiny_image(MAX_LAYERS + 1))
        with pytest.raises(ManifestError) as err:
            pull(ref, tmp_path / "layout")
        assert blob_gets(srv) == []
    assert ref in str(err.value) and f"{MAX_LAYERS + 1} layers" in str(err.value)


_INTERRUPTED_PULL = """
import faulthandler, os, signal, sys, threading, time
from fastpull import Puller

ref, layout, moment, hung = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
faulthandler.dump_traceback_later(hung, exit=True)  # a hang shows where every thread is
with Puller() as puller:
    def interrupt():
        while puller.engine.stats.requests < moment:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: KeyboardInterrupt wherever the main thread is

    threading.Thread(target=interrupt, daemon=True).start()
    try:
        puller.pull(ref, layout)
    except KeyboardInterrupt:
        print("interrupted")
"""


@pytest.mark.parametrize("moment", [1, 10, 50, 150, 300, MAX_LAYERS])
def test_a_library_pull_interrupted_at_any_moment_unwinds(image, tmp_path, moment):
    """``Puller.pull`` in a script, Ctrl-C once the engine has started ``moment`` requests: the
    KeyboardInterrupt unwinds the pull and the engine closes (the base layer never lands, so the pull
    is always under way)."""
    with FaultRegistry() as srv:
        ref = serve(srv, image)
        srv.stall_after(image.digests[0], 0)
        done = subprocess.run([sys.executable, "-c", _INTERRUPTED_PULL, ref, str(tmp_path / "layout"), str(moment),
                               str(BOUND_S)], capture_output=True, text=True, timeout=2 * BOUND_S)
    assert done.returncode == 0 and done.stdout == "interrupted\n", (
        f"status {done.returncode}, {len(srv.log)} requests served, SIGINT {signal.getsignal(signal.SIGINT)}; "
        f"stdout {done.stdout!r}; stderr:\n{done.stderr}")


def test_closing_the_engine_never_waits_on_a_futures_lock_its_caller_holds(image, tmp_path):
    """A KeyboardInterrupt inside ``concurrent.futures.wait`` leaves the futures' locks taken by the
    caller's thread: the engine still closes, and settles that future once the lock is free."""
    with FaultRegistry() as srv:
        serve(srv, image)
        srv.stall_after(image.digests[0], 0)  # in flight when the engine closes
        store = ContentStore(tmp_path / "layout")
        source = RepositorySource(RegistryClient(srv.host), REPO)
        engine = FetchEngine()
        fetches = [engine.fetch(store, source, d, len(layer)) for d, layer in zip(image.digests[:20], image.layers)]
        wait_until(lambda: srv.requests_for(image.digests[0]), "the base layer is asked", timeout=BOUND_S)
        held = fetches[0]._condition  # as concurrent.futures.wait leaves it when interrupted
        held.acquire()
        try:
            closing = threading.Thread(target=engine.close)
            closing.start()
            closing.join(BOUND_S)
            assert not closing.is_alive(), "the engine waited on the caller's lock"
        finally:
            held.release()
        assert "closed" in str(fetches[0].exception(timeout=BOUND_S))
