"""fastpull.content.gc and leases: marked from the images, live leases and held ingest locks, the rest
swept; never a blob that a running pull or ``fastpull serve`` uses."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import wait_until
from faultserver import FaultRegistry

from fastpull import pull
from fastpull.content.gc import collect
from fastpull.content.layout import ImageLayout
from fastpull.content.leases import Lease, lease_dir
from fastpull.errors import ManifestError
from fastpull.oci.manifest import OCI_MANIFEST, Descriptor
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.unpack.rootfs import remove_tree

MiB = 1 << 20


def _gc(layout: ImageLayout):
    return collect(layout, remove_tree=remove_tree)


def _push(registry, image_cache: Path, repo: str, specs, seed: int, tag: str = "v1"):
    image = build_image(specs, image_cache / f"gc-{repo.replace('/', '_')}-{seed}", seed=seed)
    push_image(registry.url, repo, tag, image)
    return image, f"{registry.host}/{repo}:{tag}"


def _blobs(image) -> list[str]:
    return [image.manifest_digest, image.config.digest, *(d.digest for d in image.layers)]


def _stored(layout: ImageLayout) -> set[str]:
    return {"sha256:" + p.name for p in layout.store.blobs.iterdir()}


def _assert_whole(layout: ImageLayout, image) -> None:
    for digest in _blobs(image):
        data = layout.store.blob_path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


def _stray(layout: ImageLayout, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    layout.store.put_bytes(digest, data)
    return digest


def test_gc_keeps_what_images_name_and_removes_the_rest(registry, image_cache, tmp_path):
    one, ref_one = _push(registry, image_cache, "gc/one", [LayerSpec(300_000), LayerSpec(50_000)], seed=1)
    two, ref_two = _push(registry, image_cache, "gc/two", [LayerSpec(200_000)], seed=2)
    push_image(registry.url, "gc/two", "again", two)  # one image, two names
    layout = ImageLayout(tmp_path / "layout")
    for ref in (ref_one, ref_two, f"{registry.host}/gc/two:again"):
        pull(ref, layout.root)
    stray = _stray(layout, b"nothing names this")
    (layout.store.blobs / "not-a-digest").write_text("left alone")

    done = _gc(layout)
    assert [d for d, _ in done.blobs] == [stray] and done.freed_bytes == len(b"nothing names this")
    assert _stored(layout) == set(_blobs(one)) | set(_blobs(two)) | {"sha256:not-a-digest"}

    assert layout.untag(ref_two) and _gc(layout).blobs == []  # still named "again"
    assert layout.untag(ref_one)
    done = _gc(layout)
    assert sorted(d for d, _ in done.blobs) == sorted(_blobs(one))
    assert done.freed_bytes == len(one.manifest) + one.config.size + sum(d.size for d in one.layers)
    _assert_whole(layout, two)
    assert layout.resolve(f"{registry.host}/gc/two:again").digest == two.manifest_digest


def test_a_live_lease_keeps_its_blobs_and_all_that_a_leased_manifest_names(registry, image_cache, tmp_path):
    image, ref = _push(registry, image_cache, "gc/leased", [LayerSpec(100_000), LayerSpec(20_000)], seed=3)
    layout = ImageLayout(tmp_path / "layout")
    pull(ref, layout.root)
    layout.untag(ref)
    with Lease(layout.store, [image.manifest_digest]) as lease:
        assert _gc(layout).blobs == []
        assert (lease_dir(layout.store) / lease.path.name).read_text() == image.manifest_digest + "\n"
    assert not any(lease_dir(layout.store).iterdir())  # released: its file is gone
    assert sorted(d for d, _ in _gc(layout).blobs) == sorted(_blobs(image))


DIE_HOLDING_A_LEASE = textwrap.dedent("""
    import os, signal, sys
    from fastpull.content.store import ContentStore
    from fastpull.content.leases import Lease
    Lease(ContentStore(sys.argv[1]), sys.argv[2:3], trees=sys.argv[3:])
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_the_lease_of_a_dead_process_goes_with_its_temporary_trees(tmp_path):
    layout = ImageLayout(tmp_path / "layout")
    digest = _stray(layout, b"leased by a process that died")
    tree = tmp_path / ".rootfs.fastpull-abc123"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    unmarked = tmp_path / "not-a-temporary-tree"  # a lease names only fastpull's trees: anything else stays
    unmarked.mkdir()
    died = subprocess.run([sys.executable, "-c", DIE_HOLDING_A_LEASE, str(layout.root), digest, str(tree),
                           str(unmarked)], capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    (lease,) = lease_dir(layout.store).iterdir()

    live_tree = tmp_path / ".live.fastpull-def456"
    live_tree.mkdir()
    with Lease(layout.store, trees=[live_tree]):
        done = _gc(layout)
    assert (done.leases, done.trees, [d for d, _ in done.blobs]) == (1, [tree], [digest])
    assert not lease.exists() and not tree.exists() and unmarked.is_dir() and live_tree.is_dir()


def test_ingests_a_writer_holds_stay_abandoned_ones_of_unused_blobs_go(tmp_path):
    layout = ImageLayout(tmp_path / "layout")
    store = layout.store
    blobs = {name: os.urandom(300_000) for name in ("held", "abandoned", "leased")}
    digest = {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in blobs.items()}

    def partial(name: str):
        writer = store.open_writer(digest[name], len(blobs[name]), 64 * 1024)
        sink = writer.sink(0, 64 * 1024, 0)  # the first chunk lands
        sink.arm()
        sink(blobs[name][:64 * 1024])
        return writer

    held = partial("held")
    partial("abandoned").close()
    partial("leased").close()
    (store.ingest_dir / (digest["abandoned"][7:] + ".put123.456")).write_bytes(b"a dead put_bytes' leftover")
    with Lease(store, [digest["leased"]]):
        done = _gc(layout)
    assert [d for d, _ in done.ingests] == [digest["abandoned"]] and done.temp_files == 1
    assert sorted(store.ingests()) == sorted([digest["held"], digest["leased"]])
    assert not (store.ingest_dir / (digest["abandoned"][7:] + ".lock")).exists()
    held.close()

    resumed = store.open_writer(digest["leased"], len(blobs["leased"]), 64 * 1024)  # kept: it resumes
    assert resumed.resumed_bytes == 64 * 1024
    resumed.close()
    again = store.open_writer(digest["abandoned"], len(blobs["abandoned"]), 64 * 1024)  # starts afresh
    assert again.resumed_bytes == 0
    again.close()


def test_a_malformed_manifest_of_an_image_stops_gc_before_it_removes_anything(tmp_path):
    layout = ImageLayout(tmp_path / "layout")
    stray = _stray(layout, b"unreferenced")
    broken = _stray(layout, b'{"schemaVersion": 2, "config": "not a descriptor"}')
    layout.tag("example.com/broken:v1", Descriptor(OCI_MANIFEST, broken, 50))
    with pytest.raises(ManifestError, match=broken):
        _gc(layout)
    assert _stored(layout) == {stray, broken}


PULL = textwrap.dedent("""
    import sys
    from fastpull import FetchOptions, pull
    if __name__ == "__main__":
        options = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=2, blobs_in_flight=2,
                               transfer_rate_limit=2 << 20)
        pull(sys.argv[1], sys.argv[2], rootfs=sys.argv[3], options=options)
""")


def test_gc_in_a_loop_never_harms_a_running_pull(registry, image_cache, tmp_path):
    """The store already has (unnamed) the manifest, the config and the first layer, which the pull
    therefore does not fetch: a collection that did not honour its lease would take them under it."""
    specs = [LayerSpec(2 * MiB, files=4), LayerSpec(6 * MiB, files=2), LayerSpec(4 * MiB, files=3)]
    image, ref = _push(registry, image_cache, "gc/running", specs, seed=4)
    layout = ImageLayout(tmp_path / "layout")
    for desc in (image.config, image.layers[0]):
        layout.store.put_bytes(desc.digest, image.blob_path(desc.digest).read_bytes())
    layout.store.put_bytes(image.manifest_digest, image.manifest)
    stray = _stray(layout, b"collected while the pull runs")

    script = tmp_path / "pull.py"
    script.write_text(PULL)
    puller = subprocess.Popen([sys.executable, str(script), ref, str(layout.root), str(tmp_path / "rootfs")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(layout.store.ingests()) > 0 or puller.poll() is not None, "a layer downloads")
        collections = 0
        removed: list[str] = []
        while puller.poll() is None:
            removed += [d for d, _ in _gc(layout).blobs]
            collections += 1
        out, err = puller.communicate()
    finally:
        if puller.poll() is None:
            puller.kill()
            puller.communicate()
    assert puller.returncode == 0, err
    assert collections > 1 and removed == [stray]
    assert layout.resolve(ref).digest == image.manifest_digest
    _assert_whole(layout, image)
    assert (tmp_path / "rootfs").is_dir()
    assert not any(lease_dir(layout.store).iterdir()) and _gc(layout).blobs == []


# ---- fastpull serve ------------------------------------------------------------------------------

def _get(daemon: ServeProcess, path: str) -> bytes:
    conn = http.client.HTTPConnection(daemon.host, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        return response.read()
    finally:
        conn.close()


def _leased(layout: ImageLayout, digest: str) -> bool:
    for path in lease_dir(layout.store).iterdir():
        try:
            if digest in path.read_text().split():
                return True
        except FileNotFoundError:
            pass  # released meanwhile
    return False


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    return build_image([LayerSpec(24 * MiB)], tmp_path_factory.mktemp("gc-serve"), seed=40)


def test_serve_a_blob_in_flight_is_leased_and_gc_running_meanwhile_harms_no_client(tmp_path, big_image):
    digest = big_image.layers[0].digest
    blob = big_image.blob_path(digest).read_bytes()
    layout = ImageLayout(tmp_path / "store")
    with FaultRegistry() as upstream, ServeProcess(layout.root, upstream.host) as daemon:
        upstream.add_image("team/big", "v1", big_image)
        upstream.slow(digest, 12 * MiB)  # two seconds
        _get(daemon, "/v2/team/big/manifests/v1")
        bodies: list[bytes] = []
        client = threading.Thread(target=lambda: bodies.append(_get(daemon, f"/v2/team/big/blobs/{digest}")))
        client.start()
        wait_until(lambda: digest in layout.store.ingests(), "the fetch is under way")
        leased_runs = 0
        while client.is_alive():
            done = _gc(layout)
            if _leased(layout, digest):  # still leased after the run, so leased all through it
                assert digest not in [d for d, _ in done.blobs + done.ingests]
                leased_runs += 1
        client.join()
        assert bodies == [blob] and leased_runs > 0
        assert sum(s.bytes_sent for s in upstream.log if s.digest == digest and s.method == "GET") == len(blob)
    assert "Traceback" not in daemon.log, daemon.log


def test_serve_a_cached_blob_gc_takes_while_a_client_reads_it_arrives_whole(tmp_path, big_image):
    """Nothing names a blob the mirror only cached, so gc takes it; a client already being sent it
    reads on from the daemon's open descriptor (the inode lives while a descriptor does)."""
    digest = big_image.layers[0].digest
    blob = big_image.blob_path(digest).read_bytes()
    layout = ImageLayout(tmp_path / "store")
    with FaultRegistry() as upstream, ServeProcess(layout.root, upstream.host) as daemon:
        upstream.add_image("team/big", "v1", big_image)
        _get(daemon, "/v2/team/big/manifests/v1")
        assert _get(daemon, f"/v2/team/big/blobs/{digest}") == blob  # now cached
        wait_until(lambda: not any(lease_dir(layout.store).iterdir()), "the fetch's lease is released")

        host, port = daemon.host.rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # most of the blob waits in the file
        sock.connect((host, int(port)))
        sock.sendall(f"GET /v2/team/big/blobs/{digest} HTTP/1.1\r\nHost: {daemon.host}\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(64 * 1024)
        head, body = received.split(b"\r\n\r\n", 1)
        done = _gc(layout)
        assert digest in [d for d, _ in done.blobs] and not layout.store.has(digest)
        while len(body) < len(blob) and (chunk := sock.recv(1 << 20)):
            body += chunk
        sock.close()
        assert head.startswith(b"HTTP/1.1 200") and body == blob
    assert "Traceback" not in daemon.log, daemon.log


def _gc_command(root: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "fastpull", "gc", "--layout", str(root)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_unpacked_layers_stay_while_an_image_or_a_snapshot_uses_them(registry, image_cache, tmp_path):
    """The store's layer cache: `fastpull gc` keeps the layers of tagged images and of the
    snapshotter's committed snapshots, and frees the rest."""
    from fastpull.content.defaults import LAYER_CACHE, SNAPSHOTTER_STATE
    from fastpull.oci.manifest import chain_ids
    from fastpull.snapshotter import OverlaySnapshotter
    from fastpull.unpack.snapshots import Snapshotter

    image, ref = _push(registry, image_cache, "gc/layers", [LayerSpec(100_000), LayerSpec(50_000, files=2)], 41)
    root = tmp_path / "store"
    cache = root / LAYER_CACHE
    pull(ref, root, snapshots=cache)
    chains = chain_ids([layer.diff_id for layer in image.layers])
    cached = {p.name for p in (cache / "sha256").iterdir()}
    assert cached == {c[7:] for c in chains}
    assert "0 layers" in _gc_command(root)  # the image is tagged: its layers stay
    with OverlaySnapshotter(root / SNAPSHOTTER_STATE, Snapshotter(cache)) as snapshotter:
        snapshotter.commit_layer(chains[0], "", chains[0], {})  # as a CRI pull's first layer
    subprocess.run([sys.executable, "-m", "fastpull", "rm", "--layout", str(root), ref], check=True,
                   capture_output=True)
    out = _gc_command(root)
    assert f"removed unpacked layer {chains[1]}" in out and "1 layers" in out
    assert {p.name for p in (cache / "sha256").iterdir()} == {chains[0][7:]}  # a snapshot still uses it
    with OverlaySnapshotter(root / SNAPSHOTTER_STATE, Snapshotter(cache)) as snapshotter:
        snapshotter.remove(chains[0])  # containerd's GC
    assert f"removed unpacked layer {chains[0]}" in _gc_command(root)
    assert list((cache / "sha256").iterdir()) == [] and list((cache / ".tmp").iterdir()) == []
