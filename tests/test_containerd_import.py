"""``fastpull pull --containerd``: fastpull pulls and unpacks, then hands the image to a private Debian
containerd (its default overlayfs snapshotter, CRI on) through containerd's own API. The image is then
containerd's as if it had pulled it: the same tree as its own pull, a CRI pull that fetches nothing,
containers that run, GC that keeps it while tagged and frees it once removed; layers containerd has
are neither fetched nor imported again, and an import that fails half-way leaves nothing once GC runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
from clients import (
    CRI_NAMESPACE,
    blob_bytes_sent,
    busybox_missing,
    check_containerd_image,
    write_hosts_toml,
)
from conftest import tmpfs, wait_until
from cri import node_daemons, skip_unless_containers_run
from test_snapshotter_containerd import _entries, _member
from test_snapshotter_containerd import _layers as snapshotter_layers

from fastpull.containerd import Containerd, importer, pull_into
from fastpull.content.layout import ImageLayout
from fastpull.content.store import ContentStore
from fastpull.errors import ContainerdError, UnpackError
from fastpull.oci.manifest import Platform, chain_ids
from fastpull.puller import Puller
from fastpull.testbed import build_index, push_image, push_index
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import BuiltImage, LayerSpec, build_image
from fastpull.testbed.reference import describe

REPO = "import/app"


def _layers() -> list[LayerSpec]:
    """A directory of odd mode and owner; the snapshotter tests' image (a base tree, hard links,
    whiteouts, an opaque directory, a directory replacing a file and a file replacing a directory,
    small layers between); a device node and a file under that directory whose tar names no parent
    (implied directories take the metadata of the layers below); busybox on top."""
    *layers, busybox = snapshotter_layers()
    odd = _entries(_with(_member("srv/", tarfile.DIRTYPE, mode=0o711), uid=1000, gid=1000))
    extra = _entries(_with(_member("data/null", tarfile.CHRTYPE, mode=0o666), devmajor=1, devminor=3),
                     _member("srv/implied/file", data=b"under an implied directory\n"))
    return [LayerSpec(0, files=0, entries=odd), *layers, LayerSpec(0, files=0, entries=extra), busybox]


def _with(member: tuple[tarfile.TarInfo, bytes], **fields: int) -> tuple[tarfile.TarInfo, bytes]:
    for name, value in fields.items():
        setattr(member[0], name, value)
    return member


BASE_LAYERS = 3
"""The layers of the base image that containerd pulls itself before an import of the whole image."""


@pytest.fixture(scope="module")
def images(registry, image_cache) -> dict[str, BuiltImage]:
    """``app``, pushed as REPO:v1, and ``base`` (its first BASE_LAYERS layers), as REPO-base:v1."""
    if why := busybox_missing():
        pytest.skip(why)
    layers = _layers()
    built = {"app": build_image(layers, image_cache / "import-app", media="oci"),
             "base": build_image(layers[:BASE_LAYERS], image_cache / "import-base", media="oci")}
    assert [d.digest for d in built["base"].layers] == [d.digest for d in built["app"].layers[:BASE_LAYERS]]
    push_image(registry.url, REPO, "v1", built["app"])
    push_image(registry.url, REPO + "-base", "v1", built["base"])
    return built


@pytest.fixture
def ref(registry, images) -> str:
    return f"{registry.host}/{REPO}:v1"


@pytest.fixture
def node(tmp_path, registry):
    """A private containerd as Debian runs it (overlayfs, CRI on), reaching ``registry`` directly."""
    with node_daemons(tmp_path) as start:
        daemon = start()
        write_hosts_toml(daemon.hosts_dir, registry.host)
        yield daemon


def _fastpull(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastpull", *args], capture_output=True, text=True, timeout=300)


def _import(node, ref: str, layout: Path) -> str:
    """``fastpull pull REF --containerd`` into CRI's namespace of ``node``; its report."""
    done = _fastpull("pull", ref, "--containerd", str(node.address), "--layout", str(layout))
    assert done.returncode == 0, done.stderr
    return done.stdout


def _leftovers(node) -> dict[str, list[str]]:
    """What containerd holds in CRI's namespace: snapshot keys, leases, content digests, image names."""
    def rows(*args: str) -> list[str]:
        return [line.split()[0] for line in node.ctr(*args, namespace=CRI_NAMESPACE).stdout.splitlines()[1:] if line]
    return {"snapshots": [key for key, _, _ in node.snapshots(namespace=CRI_NAMESPACE)],
            "leases": rows("leases", "ls"), "content": rows("content", "ls"), "images": rows("image", "ls")}


def test_an_imported_image_is_containerds_own_a_cri_pull_fetches_nothing_and_it_runs(
        node, registry, images, ref, tmp_path):
    image = images["app"]
    assert _import(node, ref, tmp_path / "store").startswith(f"pulled {ref} -> {image.manifest_digest}\n")
    check_containerd_image(node, ref, image, tmp_path / "check", namespace=CRI_NAMESPACE, layers=False)
    assert not list((tmp_path / "store").glob(".fastpull-containerd-*")), "the staging directory is removed"
    manifest = json.loads(image.manifest)
    names = node.images(namespace=CRI_NAMESPACE)
    assert names == {ref: image.manifest_digest, f"{ref.rsplit(':', 1)[0]}@{image.manifest_digest}":
                     image.manifest_digest, manifest["config"]["digest"]: image.manifest_digest}

    registry.clear_served()
    with node.cri_images() as cri:
        assert cri.pull(ref) == manifest["config"]["digest"]
    assert blob_bytes_sent(registry) == {}, "CRI's pull fetched blobs"

    node.pull(ref, namespace="default", hosts_dir=node.hosts_dir)  # containerd's own pull and unpack
    with node.mounted(ref, tmp_path / "ours", namespace=CRI_NAMESPACE) as ours, \
            node.mounted(ref, tmp_path / "theirs", namespace="default") as theirs:
        assert describe(ours) == describe(theirs)
        root = [(st.st_mode, st.st_uid, st.st_gid) for st in (ours.stat(), theirs.stat())]
        assert root[0] == root[1], "the root directory"

    skip_unless_containers_run()
    assert "only this one" in node.run(ref, ["/bin/busybox", "cat", "/data/opaque/new"], namespace=CRI_NAMESPACE)


def test_an_index_is_imported_with_its_platform_manifest_and_a_cri_pull_fetches_nothing(
        node, registry, images, tmp_path):
    host = Platform.host()
    other = ("linux", "s390x" if host.architecture != "s390x" else "amd64", None)
    index = build_index([(images["app"], (host.os, host.architecture, host.variant)), (images["base"], other)])
    index_digest = push_index(registry.url, REPO, "multi", index, [images["app"], images["base"]])
    ref = f"{registry.host}/{REPO}:multi"
    _import(node, ref, tmp_path / "store")
    assert node.image_digest(ref, namespace=CRI_NAMESPACE) == index_digest
    registry.clear_served()
    with node.cri_images() as cri:
        cri.pull(ref)
    assert blob_bytes_sent(registry) == {}, "CRI's pull fetched blobs"
    node.gc()
    config = json.loads(images["app"].manifest)["config"]["digest"]
    assert set(_leftovers(node)["content"]) == {index_digest, images["app"].manifest_digest, config}


def test_gc_keeps_an_imported_image_while_it_is_tagged_and_frees_it_once_removed(node, images, ref, tmp_path):
    image = images["app"]
    _import(node, ref, tmp_path / "store")
    node.gc()
    held = _leftovers(node)
    assert len(held["snapshots"]) == len(image.layers) and held["leases"] == []
    assert {image.manifest_digest, json.loads(image.manifest)["config"]["digest"]} == set(held["content"])
    with node.cri_images() as cri:
        cri.remove(ref)
    node.gc()
    assert _leftovers(node) == {"snapshots": [], "leases": [], "content": [], "images": []}


def test_layers_containerd_has_are_neither_fetched_nor_imported_again(node, registry, images, ref, tmp_path):
    base = f"{registry.host}/{REPO}-base:v1"
    node.pull(base, namespace=CRI_NAMESPACE, hosts_dir=node.hosts_dir)
    before = node.snapshots(namespace=CRI_NAMESPACE)
    image = images["app"]
    registry.clear_served()
    _import(node, ref, tmp_path / "store")
    sent = blob_bytes_sent(registry)
    assert not set(sent) & {d.digest for d in image.layers[:BASE_LAYERS]}
    assert set(sent) >= {d.digest for d in image.layers[BASE_LAYERS:]}
    after = node.snapshots(namespace=CRI_NAMESPACE)
    assert set(before) <= set(after) and len(after) == len(image.layers)
    check_containerd_image(node, ref, image, tmp_path / "check", namespace=CRI_NAMESPACE, layers=False)


def test_a_store_on_another_filesystem_is_copied_with_whiteouts_links_and_devices(node, images, ref, tmp_path):
    with tmpfs(tmp_path / "tmpfs", "256m"):
        _import(node, ref, tmp_path / "tmpfs" / "store")
    check_containerd_image(node, ref, images["app"], tmp_path / "check", namespace=CRI_NAMESPACE, layers=False)


def test_an_import_that_fails_half_way_leaves_nothing_once_gc_runs(node, images, ref, tmp_path, monkeypatch):
    moved = []
    move = importer._move_tree
    half_made = {}

    def fail_the_fourth(tree: Path, upper: Path) -> None:
        if len(moved) == 3:
            half_made.update(_leftovers(node))
            raise UnpackError(str(upper), "injected failure")
        moved.append(upper)
        move(tree, upper)

    monkeypatch.setattr(importer, "_move_tree", fail_the_fourth)
    with Containerd(node.address) as containerd, Puller() as puller, pytest.raises(UnpackError, match="injected"):
        pull_into(puller, ref, tmp_path / "store", containerd)
    assert not list((tmp_path / "store").glob(".fastpull-containerd-*"))
    assert len([key for key in half_made["snapshots"] if key.startswith("sha256:")]) == 3
    assert len(half_made["leases"]) == 1 and half_made["images"] == []
    node.gc()
    assert _leftovers(node) == {"snapshots": [], "leases": [], "content": [], "images": []}


def test_a_containerd_that_cannot_be_reached_is_one_line_and_no_pull(tmp_path):
    ref = "127.0.0.1:9/never/asked:v1"  # the socket is tried first: no registry is asked
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # a socket nobody listens on
    for path, why in [(tmp_path / "missing.sock", "No such file or directory"), (dead, "cannot reach containerd"),
                      (tmp_path, "not a unix socket")]:
        done = _fastpull("pull", ref, "--containerd", str(path), "--layout", str(tmp_path / "store"))
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"fastpull: containerd at {path}: "), done.stderr
        assert why in done.stderr


def test_a_containerd_without_the_snapshotter_is_one_line(node, images):
    with Containerd(node.address, snapshotter="btrfs") as containerd, pytest.raises(ContainerdError) as failed:
        containerd.has_snapshot(chain_ids([images["app"].layers[0].digest])[0])
    assert "has no btrfs snapshotter" in str(failed.value) and "\n" not in str(failed.value)


def test_the_daemon_prefetches_into_containerd_and_a_cri_pull_fetches_nothing(node, registry, images, ref, tmp_path):
    """``fastpull serve --containerd SOCKET --prefetch FILE``: the node agent of a cluster whose
    containerd configuration cannot change lands the listed images in containerd's own stores."""
    listed = tmp_path / "prefetch.txt"
    listed.write_text(f"# warmed on every node\n{ref}\n")
    serve = ServeProcess(tmp_path / "store", registry.host, "--containerd", str(node.address),
                         "--prefetch", str(listed)).start()
    try:
        wait_until(lambda: "prefetched " in serve.log or "prefetch " in serve.log, "the prefetch ended", timeout=120)
        assert f"prefetched {ref}" in serve.log, serve.log[-3000:]
    finally:
        serve.stop()
    image = images["app"]
    assert node.images(namespace=CRI_NAMESPACE)[ref] == image.manifest_digest
    assert ImageLayout(tmp_path / "store").images() == [], "the store tags nothing: containerd owns the image"
    registry.clear_served()
    with node.cri_images() as cri:
        assert cri.pull(ref) == json.loads(image.manifest)["config"]["digest"]
    assert blob_bytes_sent(registry) == {}, "CRI's pull fetched blobs"


def test_status_shows_the_daemons_import_into_containerd_while_it_runs(node, registry, images, ref, tmp_path):
    """``fastpull status`` shows a prefetch into containerd in flight (here held at its top layer, whose
    blob another writer has), then nothing once it is in."""
    image = images["app"]
    store = tmp_path / "store"
    top = image.layers[-1]
    held = ContentStore(store).open_writer(top.digest, top.size, 256 * 1024)  # the pull waits for that writer
    listed = tmp_path / "prefetch.txt"
    listed.write_text(f"{ref}\n")
    serve = ServeProcess(store, registry.host, "--containerd", str(node.address), "--prefetch", str(listed)).start()
    try:
        def pulls() -> list[dict]:
            with urllib.request.urlopen(f"{serve.url}/_fastpull/v1/status", timeout=60) as answer:
                return json.load(answer)["pulls"]

        below_top = len(image.layers) - 1
        wait_until(lambda: [(p["image"], p["layers"], p["bytes_total"] > 0) for p in pulls()]
                   == [(ref, below_top, True)],
                   "the status shows the import, every layer but the held one unpacked, and its bytes", timeout=120)
        (pull,) = pulls()
        assert (pull["into"], pull["layers_total"], pull["waiting"]) == (f"containerd {CRI_NAMESPACE}",
                                                                          len(image.layers), 1)
        assert pull["bytes_total"] == image.total_size  # config and layers: none was in the store
        assert sum(layer.size for layer in image.layers[:-1]) <= pull["bytes"] < pull["bytes_total"]
        text = _fastpull("status", "--url", serve.url)
        assert text.returncode == 0 and "pulls in flight: 1" in text.stdout, text.stderr
        (row,) = [line for line in text.stdout.splitlines() if line.startswith(f"  {ref} ")]
        assert row.split()[1] == f"{below_top}/{len(image.layers)}"
        assert row.split()[-3:] == ["1", "containerd", CRI_NAMESPACE]  # WAITING, INTO

        held.close()  # the daemon's pull takes the blob over and fetches it
        wait_until(lambda: f"prefetched {ref}" in serve.log, "the prefetch ended", timeout=120)
        assert pulls() == []
    finally:
        held.close()
        serve.stop()
    assert node.images(namespace=CRI_NAMESPACE)[ref] == image.manifest_digest
