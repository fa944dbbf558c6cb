"""The node harness itself (tests/cri.py, tests/clients.py's ``Containerd`` with ``cri``), with
containerd's own overlayfs snapshotter: a kubelet's CRI ``PullImage`` reaches the test registry
through ``hosts.toml``, ``ImageStatus`` finds the image and ``RemoveImage`` collects it at once, a
restart or a kill -9 keeps it, the registry's log tells which blobs containerd fetched, containers
run on it, and a proxy snapshotter gets CRI's remote-snapshot labels. What the tests of
``fastpull serve --snapshotter`` rely on, proven without it."""

from __future__ import annotations

import base64
import threading
import tomllib
from concurrent import futures

import grpc
import pytest
from clients import (
    CRI_NAMESPACE,
    NO_SANDBOX_IMAGE,
    ClientError,
    Containerd,
    busybox_missing,
    check_containerd_image,
    client_image,
    container_tree,
    host_tree,
    runnable_image,
    write_hosts_toml,
)
from cri import CriError, CriImages, CriRuntime, node_daemons, skip_unless_containers_run

from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from fastpull.testbed import BuiltImage, LocalRegistry, push_image
from fastpull.testbed.reference import reference_rootfs
from fastpull.unpack.snapshots import chain_ids

REPO = "cri/app"


@pytest.fixture(scope="module")
def image(registry, image_cache) -> BuiltImage:
    built = client_image(image_cache / "cri")
    push_image(registry.url, REPO, "v1", built)
    return built


@pytest.fixture(scope="module")
def ref(registry, image) -> str:
    return f"{registry.host}/{REPO}:v1"


@pytest.fixture
def start_cri_containerd(tmp_path):
    with node_daemons(tmp_path) as start:
        yield start


@pytest.fixture
def node(start_cri_containerd, registry) -> Containerd:
    """A node's containerd (CRI, overlayfs) that reaches ``registry`` over plain HTTP by ``hosts.toml``."""
    daemon = start_cri_containerd()
    write_hosts_toml(daemon.hosts_dir, registry.host)
    return daemon


def _blob_gets(reg: LocalRegistry) -> list[str]:
    """Digests of the blobs ``reg`` served with GET, in order, repeats kept."""
    return [r.path.rsplit("/", 1)[1] for r in reg.served() if r.method == "GET" and "/blobs/" in r.path]


def _assert_collected(daemon: Containerd, image: BuiltImage) -> None:
    """No image, snapshot or blob of ``image`` is left in the CRI namespace or the content store."""
    assert daemon.images(namespace=CRI_NAMESPACE) == {}
    assert daemon.snapshots(namespace=CRI_NAMESPACE) == []
    for digest in (image.manifest_digest, *(blob.digest for blob in image.blobs)):
        assert not daemon.content_path(digest).exists(), digest


def test_cri_starts_without_a_cni_config(node):
    assert '"io.containerd.grpc.v1.cri"' not in node.config_text().split("\n[")[0]
    with CriImages(node.address) as images:
        assert images.list() == []
        (fs,) = images.fs_info()
        assert fs.fs_id.mountpoint == str(node.root / "io.containerd.snapshotter.v1.overlayfs")
    with CriRuntime(node.address) as runtime:
        version = runtime.version()
        assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1")
        conditions, info = runtime.status()
    assert conditions["RuntimeReady"][0] is True
    assert conditions["NetworkReady"][0] is False, conditions  # no CNI config: only pods would need one
    config = info["config"]
    assert config["containerd"]["snapshotter"] == "overlayfs"
    assert config["containerd"]["disableSnapshotAnnotations"] is True
    assert config["registry"]["configPath"] == str(node.hosts_dir)
    assert config["sandboxImage"] == NO_SANDBOX_IMAGE
    assert (config["cni"]["binDir"], config["cni"]["confDir"]) == (str(node.cni_dir / "bin"), str(node.cni_dir / "conf"))
    assert config["rootDir"] == str(node.root / "io.containerd.grpc.v1.cri")
    assert config["stateDir"] == str(node.state / "io.containerd.grpc.v1.cri")


def test_cri_pulls_through_hosts_toml_finds_and_removes_the_image(node, registry, ref, image, tmp_path):
    registry.clear_served()
    with node.cri_images() as images:
        image_id = images.pull(ref)
        assert image_id == image.config.digest  # containerd's image ID: the config's digest
        # Every blob exactly once, straight from the registry the hosts.toml names.
        assert sorted(_blob_gets(registry)) == sorted(blob.digest for blob in image.blobs)

        digest_ref = f"{registry.host}/{REPO}@{image.manifest_digest}"
        for name in (ref, digest_ref, image_id):
            status = images.status(name)
            assert status is not None, name
            assert (status.id, list(status.repo_tags), list(status.repo_digests)) == (image_id, [ref], [digest_ref])
        assert [listed.id for listed in images.list()] == [image_id]
        assert images.status(f"{registry.host}/{REPO}:other") is None

        manifest = image.manifest_digest
        assert node.images(namespace=CRI_NAMESPACE) == {ref: manifest, digest_ref: manifest, image_id: manifest}
        assert node.images() == {}  # the default namespace is not CRI's
        chain = chain_ids([layer.diff_id for layer in image.layers])
        assert sorted(node.snapshots(namespace=CRI_NAMESPACE)) == sorted(
            (key, parent, "Committed") for key, parent in zip(chain, ["", *chain[:-1]]))
        check_containerd_image(node, ref, image, tmp_path / "check", namespace=CRI_NAMESPACE, snapshotter="overlayfs")

        # RemoveImage deletes the last name with containerd's synchronous GC: all is gone on return.
        images.remove(ref)
        assert images.status(ref) is None
        assert images.list() == []
        _assert_collected(node, image)
        images.remove(ref)  # CRI: removing an image that is not there succeeds


def test_cri_image_survives_a_restart_and_a_kill(node, registry, ref, image, tmp_path):
    with node.cri_images() as images:
        image_id = images.pull(ref)
    root, pid = node.root, node.pid
    node.restart()
    assert node.pid != pid and node.root == root
    registry.clear_served()
    with node.cri_images() as images:
        assert images.status(ref).id == image_id
        assert images.pull(ref) == image_id
    assert _blob_gets(registry) == []  # resolved the tag again, had every blob
    check_containerd_image(node, ref, image, tmp_path / "restarted", namespace=CRI_NAMESPACE)

    node.kill()
    assert node.pid is None
    node.restart()
    with node.cri_images() as images:
        assert images.status(ref).id == image_id
    check_containerd_image(node, ref, image, tmp_path / "killed", namespace=CRI_NAMESPACE)


def test_cri_errors_are_client_errors_with_code_and_details(node, registry):
    missing = f"{registry.host}/{REPO}:missing"
    with node.cri_images() as images, pytest.raises(CriError) as caught:
        images.pull(missing)
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.details.endswith(f'failed to resolve reference "{missing}": {missing}: not found')
    assert str(caught.value).startswith("CRI PullImage: NOT_FOUND: failed to pull and unpack image")
    assert isinstance(caught.value, ClientError)


def test_cri_pull_sends_the_kubelets_credentials(start_cri_containerd, image, tmp_path):
    with LocalRegistry(tmp_path / "storage", htpasswd={"bob": "builder"}) as private:
        push_image(private.url, REPO, "v1", image, username="bob", password="builder")
        daemon = start_cri_containerd()
        write_hosts_toml(daemon.hosts_dir, private.host)
        ref = f"{private.host}/{REPO}:v1"
        with daemon.cri_images() as images:
            with pytest.raises(CriError, match="401 Unauthorized"):
                images.pull(ref)
            assert images.pull(ref, auth={"username": "bob", "password": "builder"}) == image.config.digest
            images.remove(ref)
            # A pull secret's "auth" field: base64 of user:password.
            assert images.pull(ref, auth={"auth": base64.b64encode(b"bob:builder").decode()}) == image.config.digest


def test_gc_runs_synchronously(start_cri_containerd, registry, ref, image):
    daemon = start_cri_containerd(cri=False)  # ctr alone, in the default namespace
    daemon.pull(ref, plain_http=True)
    assert len(daemon.snapshots()) == len(image.layers)
    daemon.remove_image(ref, sync=False)
    daemon.gc()  # a collection that started after the removal has finished
    assert daemon.snapshots() == []
    assert not any(daemon.content_path(blob.digest).exists() for blob in image.blobs)

    daemon.pull(ref, plain_http=True)
    daemon.remove_image(ref)  # --sync: the removal itself waits for the collection
    assert daemon.snapshots() == []
    assert not any(daemon.content_path(blob.digest).exists() for blob in image.blobs)


@pytest.fixture(scope="module")
def runnable(registry, image_cache) -> tuple[str, BuiltImage]:
    if (reason := busybox_missing()) is not None:
        pytest.skip(reason)
    built = runnable_image(image_cache / "cri-runnable")
    push_image(registry.url, "cri/runnable", "v1", built)
    return f"{registry.host}/cri/runnable:v1", built


def test_a_container_runs_on_a_cri_pulled_image_and_sees_its_tree(node, runnable, tmp_path):
    skip_unless_containers_run()
    ref, image = runnable
    with node.cri_images() as images:
        images.pull(ref)
    assert node.run(ref, ["/bin/busybox", "echo", "hello"], namespace=CRI_NAMESPACE) == "hello\n"
    reference_rootfs(image, tmp_path / "expected", tmp_path)
    roots = ["layer-0", "layer-1", "bin"]
    seen = container_tree(node, ref, roots, namespace=CRI_NAMESPACE)
    assert seen == host_tree(tmp_path / "expected", roots)
    assert "layer-0/file-00001" not in seen["tree"]  # the third layer's whiteout
    assert seen["tree"]["bin/sh"][5] == "busybox"
    assert seen["hardlinks"] == [["bin/busybox", "bin/ls"]]
    # ctr run --rm removed its container's active snapshot; the image's layers stay.
    assert {kind for _, _, kind in node.snapshots(namespace=CRI_NAMESPACE)} == {"Committed"}
    with pytest.raises(ClientError, match="-> 3"):
        node.run(ref, ["/bin/busybox", "sh", "-c", "exit 3"], namespace=CRI_NAMESPACE)
    assert node.ctr("container", "ls", "-q", namespace=CRI_NAMESPACE).stdout == ""


class _RecordingSnapshotter(snapshots_pb2_grpc.SnapshotsServicer):
    """A proxy snapshotter that records each ``Prepare`` and refuses it; every other call is
    UNIMPLEMENTED (containerd only logs those it makes in the background)."""

    REFUSAL = "a recording snapshotter: it makes no snapshots"

    def __init__(self) -> None:
        self.prepared: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def Prepare(self, request, context):  # noqa: N802 (gRPC's method name)
        with self._lock:
            self.prepared.append((request.key, request.parent, dict(request.labels)))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.REFUSAL)


@pytest.fixture
def recording_snapshotter(tmp_path):
    """A :class:`_RecordingSnapshotter` serving on ``tmp_path/snapshotter.sock``: yields (socket, it)."""
    recorder = _RecordingSnapshotter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(recorder, server)
    socket = tmp_path / "snapshotter.sock"
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    try:
        yield socket, recorder
    finally:
        server.stop(None).wait()


@pytest.mark.parametrize("annotations", [True, False], ids=["labels", "no-labels"])
def test_cri_pulls_into_a_proxy_snapshotter_with_the_remote_snapshot_labels(
    start_cri_containerd, recording_snapshotter, registry, ref, image, annotations
):
    socket, recorder = recording_snapshotter
    daemon = start_cri_containerd(cri_snapshotter="fastpull", proxy_plugins={"fastpull": socket},
                                  **({} if annotations else {"snapshot_annotations": False}))
    assert daemon.snapshot_annotations is annotations
    write_hosts_toml(daemon.hosts_dir, registry.host)
    assert "\n[proxy_plugins.fastpull]\n" in daemon.config_text()
    plugins = daemon.ctr("plugins", "ls").stdout.splitlines()
    assert any(line.split()[:2] == ["io.containerd.snapshotter.v1", "fastpull"] for line in plugins), plugins
    with CriRuntime(daemon.address) as runtime:
        config = runtime.status()[1]["config"]["containerd"]
    assert (config["snapshotter"], config["disableSnapshotAnnotations"]) == ("fastpull", not annotations)

    registry.clear_served()
    with daemon.cri_images() as images, pytest.raises(CriError, match=recorder.REFUSAL):
        images.pull(ref)
    # containerd asks the snapshotter for the base layer before it fetches any layer.
    assert _blob_gets(registry) == [image.config.digest]
    (key, parent, labels), = recorder.prepared
    assert key.startswith(f"{CRI_NAMESPACE}/") and "extract-" in key and parent == ""
    base = image.layers[0]
    expected = {"containerd.io/snapshot.ref": base.diff_id}  # the base layer's ChainID
    if annotations:
        expected |= {
            "containerd.io/snapshot/cri.image-ref": ref,
            "containerd.io/snapshot/cri.manifest-digest": image.manifest_digest,
            "containerd.io/snapshot/cri.layer-digest": base.digest,
            "containerd.io/snapshot/cri.image-layers": ",".join(layer.digest for layer in image.layers),
        }
    assert labels == expected


def test_the_default_config_is_unchanged(tmp_path):
    """Existing tests (tests/test_clients.py) and the bench get the daemon they always had."""
    daemon = Containerd(tmp_path / "d")
    config = tomllib.loads(daemon.config_text())
    assert config == {
        "version": 2, "root": str(daemon.root), "state": str(daemon.state),
        "disabled_plugins": ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                             "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                             "io.containerd.snapshotter.v1.zfs", "io.containerd.internal.v1.tracing"],
        "grpc": {"address": str(daemon.state / "containerd.sock")},
        "ttrpc": {"address": str(daemon.state / "containerd.sock.ttrpc")},
        "plugins": {"io.containerd.internal.v1.opt": {"path": str(daemon.root / "opt")}},
    }


def test_a_deep_workdir_gets_its_sockets_elsewhere(tmp_path):
    """containerd refuses socket paths over 104 bytes: a long test name must not keep it from starting."""
    deep = tmp_path / ("deep-" * 12)
    with node_daemons(deep) as start:
        daemon = start(cri=False)
        assert not daemon.address.is_relative_to(tmp_path) and daemon.address.is_socket()
        assert tomllib.loads(daemon.config_text())["grpc"]["address"] == str(daemon.address)
        daemon.kill()
        assert not daemon.address.parent.exists()
        daemon.restart()
        assert daemon.ctr("version").returncode == 0
        daemon.stop()
        assert not daemon.address.parent.exists()
