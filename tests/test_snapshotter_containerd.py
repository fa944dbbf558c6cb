"""``fastpull serve --snapshotter`` as containerd's proxy snapshotter, with Debian's containerd as the
real client and kubelet's CRI calls: CRI pulls whose layers fastpull fetches and unpacks itself
(the registry's log shows containerd fetched none), containers that run on them, restarts of
both daemons, containerd's GC then ``fastpull gc``, pulls that send no labels, and a snapshotter
killed in the middle of a pull."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from clients import (
    CRI_NAMESPACE,
    ClientError,
    blob_bytes_sent,
    busybox_layer,
    busybox_missing,
    check_containerd_image,
    container_tree,
    host_tree,
    write_hosts_toml,
)
from conftest import wait_until
from cri import node_daemons, skip_unless_containers_run
from faultserver import FaultRegistry

from fastpull.oci.manifest import chain_ids
from fastpull.testbed import push_image
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import BuiltImage, LayerSpec, build_image
from fastpull.testbed.reference import reference_rootfs

REPO = "snapshotter/app"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ROOTS = ["etc", "data", "bin"]
"""The image's own directories, compared between containers."""


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "",
            mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname, info.mtime = kind, mode, len(data), link, 1_700_000_000
    return info, data


def _entries(*members: tuple[tarfile.TarInfo, bytes]):
    def add(tar: tarfile.TarFile) -> None:
        import io

        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return add


def _layers() -> list[LayerSpec]:
    """22 layers: a base tree, hard links, then whiteouts, an opaque directory, a directory replacing
    a file and a file replacing a directory (each after a whiteout of the old one, as image builders
    write them), small layers in between, and busybox on top."""
    base = _entries(
        _member("etc/", tarfile.DIRTYPE, mode=0o755), _member("etc/keep", data=b"kept\n"),
        _member("etc/gone", data=b"deleted by a whiteout\n"), _member("data/", tarfile.DIRTYPE, mode=0o755),
        _member("data/opaque/", tarfile.DIRTYPE, mode=0o700), _member("data/opaque/old", data=b"hidden\n"),
        _member("data/becomes-dir", data=b"a file first\n"), _member("data/becomes-file/", tarfile.DIRTYPE),
        _member("data/becomes-file/inner", data=b"inner\n"),
    )
    links = _entries(_member("data/original", data=b"linked content\n"),
                     _member("data/hardlink", tarfile.LNKTYPE, link="data/original"),
                     _member("data/symlink", tarfile.SYMTYPE, link="original"))
    changes = _entries(
        _member("etc/.wh.gone"), _member("data/opaque/", tarfile.DIRTYPE, mode=0o750),
        _member("data/opaque/.wh..wh..opq"), _member("data/opaque/new", data=b"only this one\n"),
        _member("data/.wh.becomes-dir"), _member("data/becomes-dir/", tarfile.DIRTYPE),
        _member("data/becomes-dir/x", data=b"x\n"), _member("data/.wh.becomes-file"),
        _member("data/becomes-file", data=b"a file now\n"),
    )
    small = [LayerSpec(20_000, "text", "gzip" if i % 2 else "zstd", files=2) for i in range(17)]
    return [LayerSpec(0, files=0, entries=base), LayerSpec(200_000, files=3), LayerSpec(0, files=0, entries=links),
            *small, LayerSpec(0, files=0, entries=changes), busybox_layer()]


@pytest.fixture(scope="module")
def image(registry, image_cache) -> BuiltImage:
    if why := busybox_missing():
        pytest.skip(why)
    built = build_image(_layers(), image_cache / "snapshotter-image", media="oci")
    push_image(registry.url, REPO, "v1", built)
    return built


@pytest.fixture
def ref(registry, image) -> str:
    return f"{registry.host}/{REPO}:v1"


@pytest.fixture
def socket_dir():
    """A short directory for the snapshotter's socket (unix socket paths are limited to ~104 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fpsnap-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_node(tmp_path, registry, socket_dir):
    """``start()`` -> (containerd, fastpull serve): the snapshotter on a socket in ``socket_dir``,
    containerd's CRI pulling into it, both reaching ``registry`` directly (plain HTTP)."""
    serves: list[ServeProcess] = []

    def start_serve(store: Path) -> ServeProcess:
        daemon = ServeProcess(store, registry.host, "--snapshotter", str(socket_dir / "fastpull.sock")).start()
        serves.append(daemon)
        return daemon

    with node_daemons(tmp_path) as start_containerd:
        def start(store: Path | None = None) -> tuple:
            serve = start_serve(store or tmp_path / "store")
            node = start_containerd(cri_snapshotter="fastpull", proxy_plugins={"fastpull": socket_dir / "fastpull.sock"})
            write_hosts_toml(node.hosts_dir, registry.host)
            return node, serve

        start.serve = start_serve
        try:
            yield start
        finally:
            for daemon in serves:
                daemon.stop()




def _layer_digests(image: BuiltImage) -> list[str]:
    return [layer.digest for layer in image.layers]


def test_cri_pull_is_fetched_and_unpacked_by_fastpull_and_a_container_sees_the_image(
        start_node, registry, image, ref, tmp_path):
    node, serve = start_node()
    registry.clear_served()
    with node.cri_images() as cri:
        cri.pull(ref)
    sent = blob_bytes_sent(registry)
    for digest, layer in zip(_layer_digests(image), image.layers):
        assert sent.get(digest) == layer.size, f"{digest}: fetched once, by fastpull alone"
        assert not node.content_path(digest).exists(), f"{digest}: containerd has the layer's blob"
    check_containerd_image(node, ref, image, tmp_path / "check", namespace=CRI_NAMESPACE, snapshotter="fastpull",
                           layers=False)
    snapshots = node.snapshots(snapshotter="fastpull", namespace=CRI_NAMESPACE)
    assert sum(kind == "Committed" for _, _, kind in snapshots) == len(image.layers)

    skip_unless_containers_run()
    expected = tmp_path / "expected"
    reference_rootfs(image, expected, tmp_path)
    assert container_tree(node, ref, ROOTS, snapshotter="fastpull", namespace=CRI_NAMESPACE) == \
        host_tree(expected, ROOTS)


def test_a_container_on_fastpull_sees_what_one_on_containerds_overlayfs_sees(start_node, image, ref, tmp_path):
    skip_unless_containers_run()
    node, _ = start_node()
    with node.cri_images() as cri:
        cri.pull(ref)
    node.pull(ref, snapshotter="overlayfs", namespace="default", hosts_dir=node.hosts_dir)
    ours = container_tree(node, ref, ROOTS, snapshotter="fastpull", namespace=CRI_NAMESPACE)
    theirs = container_tree(node, ref, ROOTS, snapshotter="overlayfs", namespace="default")
    assert ours == theirs


def test_both_daemons_restarted_the_image_still_runs(start_node, registry, image, ref, tmp_path):
    skip_unless_containers_run()
    node, serve = start_node()
    with node.cri_images() as cri:
        cri.pull(ref)
    assert serve.stop() == 0, serve.log[-2000:]
    node.stop()
    serve = start_node.serve(tmp_path / "store")
    node.restart()
    registry.clear_served()
    with node.cri_images() as cri:
        assert cri.status(ref) is not None
        cri.pull(ref)  # present: nothing fetched
    assert not any(d in blob_bytes_sent(registry) for d in _layer_digests(image))
    assert "busybox" in node.run(ref, ["/bin/busybox", "ls", "/bin"], snapshotter="fastpull",
                                 namespace=CRI_NAMESPACE)


def test_containerd_gc_removes_the_snapshots_and_fastpull_gc_then_frees_the_layers(start_node, image, ref, tmp_path):
    node, serve = start_node()
    store = tmp_path / "store"
    with node.cri_images() as cri:
        cri.pull(ref)
        cached = sorted(p.name for p in (store / "snapshots" / "sha256").iterdir())
        assert len(cached) == len(image.layers)
        cri.remove(ref)
    assert node.snapshots(snapshotter="fastpull", namespace=CRI_NAMESPACE) == []
    done = subprocess.run([sys.executable, "-m", "fastpull", "gc", "--layout", str(store)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (store / "snapshots" / "sha256").iterdir()) == []
    assert f"{len(image.layers)} layers" in done.stdout


def test_a_pull_without_labels_is_applied_by_containerd_through_plain_mounts(start_node, registry, image, ref,
                                                                             tmp_path):
    node, serve = start_node()
    registry.clear_served()
    node.pull(ref, snapshotter="fastpull", namespace="default", hosts_dir=node.hosts_dir)  # ctr 1.6: no labels
    sent = blob_bytes_sent(registry)
    assert all(sent.get(d) == layer.size for d, layer in zip(_layer_digests(image), image.layers))
    check_containerd_image(node, ref, image, tmp_path / "check", namespace="default", snapshotter="fastpull")
    assert not (tmp_path / "store" / "snapshots" / "sha256").exists() or \
        not any((tmp_path / "store" / "snapshots" / "sha256").iterdir())


def test_concurrent_cri_pulls_of_one_image_fetch_each_layer_once(start_node, registry, image, ref):
    node, _ = start_node()
    registry.clear_served()

    def pull(_: int) -> str:
        with node.cri_images() as cri:
            return cri.pull(ref)

    with ThreadPoolExecutor(8) as pool:
        assert len(set(pool.map(pull, range(8)))) == 1
    sent = blob_bytes_sent(registry)
    for digest, layer in zip(_layer_digests(image), image.layers):
        assert sent.get(digest) == layer.size, digest


def test_a_snapshotter_killed_mid_pull_fails_the_pull_clearly_and_the_next_fetches_only_what_is_missing(
        tmp_path, socket_dir, image_cache):
    """The registry holds one layer back (it sends none of its bytes) while the others land; the
    snapshotter is killed (-9) then, so the state it leaves is always the same: the other layers'
    blobs committed, the lowest layer unpacked. After a restart, only the held layer is fetched."""
    with FaultRegistry() as registry, node_daemons(tmp_path) as start_containerd:
        image = build_image([LayerSpec(1_000_000, files=4), LayerSpec(4_000_000, files=2),
                             LayerSpec(1_000_000, "text", files=3)], image_cache / "snapshotter-kill", media="oci")
        registry.add_image(REPO, "v1", image)
        ref = f"{registry.host}/{REPO}:v1"
        low, held, high = (layer.digest for layer in image.layers)
        registry.stall_after(held, 0)
        store, sock = tmp_path / "store", socket_dir / "fastpull.sock"
        serve = ServeProcess(store, registry.host, "--snapshotter", str(sock)).start()
        node = start_containerd(cri_snapshotter="fastpull", proxy_plugins={"fastpull": sock})
        write_hosts_toml(node.hosts_dir, registry.host)
        blobs = store / "blobs" / "sha256"
        with node.cri_images() as cri, ThreadPoolExecutor(1) as pool:
            pulling = pool.submit(cri.pull, ref)
            wait_until(lambda: (blobs / low[7:]).exists() and (blobs / high[7:]).exists()
                       and registry.requests_for(held), "the other layers committed, the held one asked for", 60)
            serve.stop(signal.SIGKILL)
            with pytest.raises(ClientError) as failed:
                pulling.result(timeout=120)
        assert "fastpull" in str(failed.value) or "snapshot" in str(failed.value), failed.value
        assert registry.bytes_served(held) == 0

        registry.clear_faults()
        registry.clear()
        serve = ServeProcess(store, registry.host, "--snapshotter", str(sock)).start()
        try:
            # containerd reconnects to the proxy on its own schedule (its first call may still meet
            # the dead connection): wait until a call that reaches the snapshotter goes through.
            wait_until(lambda: node.ctr("snapshots", "--snapshotter", "fastpull", "prepare", "probe", check=False,
                                        namespace="default").returncode == 0, "containerd reaching fastpull", 60)
            node.ctr("snapshots", "--snapshotter", "fastpull", "rm", "probe", namespace="default")
            node.gc()  # the failed pull's records, before the next pull can race containerd's GC for them
            with node.cri_images() as cri:
                cri.pull(ref)
            assert registry.bytes_served(low) == 0 and registry.bytes_served(high) == 0
            assert registry.bytes_served(held) == image.layers[1].size
            check_containerd_image(node, ref, image, tmp_path / "check", namespace=CRI_NAMESPACE,
                                   snapshotter="fastpull", layers=False)
        finally:
            assert serve.stop() == 0, serve.log[-2000:]


def test_a_corrupt_layer_fails_the_pull_naming_it_and_the_next_pull_succeeds(tmp_path, socket_dir, image_cache):
    """The registry corrupts one layer: containerd's pull fails with fastpull's error naming that
    layer and the digest it failed; nothing of it is committed, and once the registry serves it
    right the same pull succeeds."""
    with FaultRegistry() as registry, node_daemons(tmp_path) as start_containerd:
        image = build_image([LayerSpec(300_000, files=2), LayerSpec(300_000, "text", files=2)],
                            image_cache / "snapshotter-corrupt", media="oci")
        registry.add_image(REPO, "v1", image)
        ref = f"{registry.host}/{REPO}:v1"
        bad = image.layers[1].digest
        registry.corrupt(bad)
        sock = socket_dir / "fastpull.sock"
        with ServeProcess(tmp_path / "store", registry.host, "--snapshotter", str(sock)) as serve:
            node = start_containerd(cri_snapshotter="fastpull", proxy_plugins={"fastpull": sock})
            write_hosts_toml(node.hosts_dir, registry.host)
            with node.cri_images() as cri:
                with pytest.raises(ClientError) as failed:
                    cri.pull(ref)
                assert bad in str(failed.value) and "digest" in str(failed.value), failed.value
                cache = tmp_path / "store" / "snapshots"
                # The good layer is committed if it was unpacked before the bad one failed for good
                # (the failure ends the pull's other work at once, as containerd's does): never the bad one.
                good = chain_ids([image.layers[0].diff_id])[0][7:]
                assert {p.name for p in (cache / "sha256").iterdir()} <= {good}
                assert list((cache / ".tmp").iterdir()) == []
                # containerd's GC drops the failed pull's records of the good layer when it gets to it:
                # let it finish, or the next pull may race it ("parent snapshot ... does not exist").
                node.gc()
                registry.clear_faults()
                cri.pull(ref)
            check_containerd_image(node, ref, image, tmp_path / "check", namespace=CRI_NAMESPACE,
                                   snapshotter="fastpull", layers=False)
            assert "DigestMismatch" in serve.log or "digest" in serve.log


def test_an_image_prefetched_by_the_daemon_costs_the_pull_no_layer(start_node, registry, image, ref, tmp_path):
    node, serve = start_node()
    request = urllib.request.Request(f"{serve.url}/_fastpull/v1/prefetch", data=json.dumps({"refs": [ref]}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with _OPENER.open(request, timeout=30):
        pass
    cache = tmp_path / "store" / "snapshots" / "sha256"
    top = chain_ids([layer.diff_id for layer in image.layers])[-1]
    wait_until(lambda: (cache / top[7:]).is_dir(), "the prefetch unpacked the image", 120)
    registry.clear_served()
    with node.cri_images() as cri:
        cri.pull(ref)
    assert not any(d in blob_bytes_sent(registry) for d in _layer_digests(image))
    check_containerd_image(node, ref, image, tmp_path / "check", namespace=CRI_NAMESPACE, snapshotter="fastpull",
                           layers=False)
