"""Faults of the node daemon, ``fastpull serve --snapshotter`` under containerd 1.6's CRI: each test
is a row of docs/faults.md (tests/faultmatrix.py ``write_daemon_rows``, written when every row ran
and passed). Deterministic: the fault-injecting registry holds chosen layers back, and the moment
of a fault is chosen by watching the store, never by sleeping."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from clients import CRI_NAMESPACE, ClientError, check_containerd_image, write_hosts_toml
from conftest import wait_until
from cri import node_daemons
from faultmatrix import write_daemon_rows
from faultserver import FaultRegistry

from fastpull.snapshotter.metadata import MetaStore
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import LayerSpec, build_image

REPO = "daemon/app"
ROWS: dict[str, tuple[str, str]] = {}
EXPECTED = {"kill-manifest", "kill-1-of-3", "kill-2-of-3", "corrupt-layer", "metadata-truncated",
            "metadata-garbage"}
TITLES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _doc_rows():
    yield
    if set(ROWS) == EXPECTED:
        write_daemon_rows({TITLES[k]: ROWS[k] for k in sorted(EXPECTED, key=list(TITLES).index)})


def row(key: str, title: str, outcome: str, promise: str) -> None:
    TITLES[key] = title
    ROWS[key] = (outcome, promise)


@pytest.fixture
def socket_dir(tmp_path_factory):
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="fpdf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node(tmp_path, socket_dir, image_cache):
    """(registry, image, ref, start_serve, containerd): three layers of 1 MB, 2 MB and 1 MB."""
    with FaultRegistry() as registry, node_daemons(tmp_path) as start_containerd:
        image = build_image([LayerSpec(1_000_000, files=3), LayerSpec(2_000_000, files=2),
                             LayerSpec(1_000_000, "text", files=3)], image_cache / "daemon-faults", media="oci")
        registry.add_image(REPO, "v1", image)
        sock = socket_dir / "fastpull.sock"
        serves: list[ServeProcess] = []

        def start_serve() -> ServeProcess:
            serves.append(ServeProcess(tmp_path / "store", registry.host, "--snapshotter", str(sock)).start())
            return serves[-1]

        start_serve.serves = serves
        start_serve()
        containerd = start_containerd(cri_snapshotter="fastpull", proxy_plugins={"fastpull": sock})
        write_hosts_toml(containerd.hosts_dir, registry.host)
        try:
            yield registry, image, f"{registry.host}/{REPO}:v1", start_serve, containerd
        finally:
            for s in serves:
                s.stop()


def check_integrity(store: Path, *, tmp: bool = True) -> None:
    """Every metadata row has its directory; no directory lacks its row; nothing half made or half removed."""
    db = sqlite3.connect(f"file:{store / 'snapshotter' / 'metadata.db'}?mode=ro", uri=True)
    try:
        ids = {str(i) for (i,) in db.execute("SELECT id FROM snapshots")}
    finally:
        db.close()
    dirs = set(p.name for p in (store / "snapshotter" / "snapshots").iterdir())
    assert ids == dirs, f"rows without a directory: {ids - dirs}; directories without a row: {dirs - ids}"
    trees = store / "snapshots" / ".tmp"  # a killed unpack's trees: the next pull of the layer removes them
    assert not tmp or not trees.exists() or list(trees.iterdir()) == []


def reconnect(containerd) -> None:
    """containerd redials the proxy on its own schedule: wait until a call reaches the snapshotter,
    then let its GC drop the failed pull's records (and the snapshotter's cleanup run)."""
    wait_until(lambda: containerd.ctr("snapshots", "--snapshotter", "fastpull", "prepare", "probe", check=False,
                                      namespace="default").returncode == 0, "containerd reaching fastpull", 60)
    containerd.ctr("snapshots", "--snapshotter", "fastpull", "rm", "probe", namespace="default")
    containerd.gc()


KILL_MOMENTS = {
    # key: (title, layers held back by the registry, layers whose blobs are committed when the kill comes)
    "kill-manifest": ("`fastpull serve` killed (-9) after the manifest, before any layer", (0, 1, 2), ()),
    "kill-1-of-3": ("`fastpull serve` killed (-9) with 1 of 3 layers committed", (1, 2), (0,)),
    "kill-2-of-3": ("`fastpull serve` killed (-9) with 2 of 3 layers committed", (1,), (0, 2)),
}


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_daemon_killed_mid_pull(node, tmp_path, moment):
    registry, image, ref, start_serve, containerd = node
    title, held, landed = KILL_MOMENTS[moment]
    digests = [layer.digest for layer in image.layers]
    for i in held:
        registry.stall_after(digests[i], 0)
    blobs = tmp_path / "store" / "blobs" / "sha256"
    with containerd.cri_images() as cri, ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(cri.pull, ref)
        wait_until(lambda: all((blobs / digests[i][7:]).exists() for i in landed)
                   and all(registry.requests_for(digests[i]) for i in held), "the moment of the kill", 60)
        start_serve.serves[-1].stop(signal.SIGKILL)
        with pytest.raises(ClientError) as failed:
            pulling.result(timeout=120)
    assert "fastpull" in str(failed.value) or "snapshot" in str(failed.value) or "rpc" in str(failed.value)
    registry.clear_faults()
    registry.clear()
    start_serve()
    reconnect(containerd)
    check_integrity(tmp_path / "store", tmp=False)
    with containerd.cri_images() as cri:
        cri.pull(ref)
    for i, layer in enumerate(image.layers):
        assert registry.bytes_served(layer.digest) == (0 if i in landed else layer.size), i
    check_containerd_image(containerd, ref, image, tmp_path / "check", namespace=CRI_NAMESPACE,
                           snapshotter="fastpull", layers=False)
    check_integrity(tmp_path / "store")
    error = str(failed.value).replace(registry.host, "REGISTRY").splitlines()[0][:80].replace("|", "/")
    row(moment, title, f"containerd: `{error}...`; integrity; resumed ({len(landed)} of 3 layers not fetched again)",
        "The pull fails at once with a gRPC error from the proxy; after a restart containerd reconnects, its GC "
        "and the snapshotter's cleanup leave every row with its directory and no half-made snapshot, and the "
        "next pull removes the killed unpack's temporary trees and fetches only the layers whose blobs had not been committed.")


def test_corrupt_layer(node, tmp_path):
    registry, image, ref, start_serve, containerd = node
    bad = image.layers[1].digest
    registry.corrupt(bad)
    with containerd.cri_images() as cri:
        with pytest.raises(ClientError) as failed:
            cri.pull(ref)
        assert bad in str(failed.value) and "digest" in str(failed.value), failed.value
        containerd.gc()
        check_integrity(tmp_path / "store")
        registry.clear_faults()
        registry.clear()
        cri.pull(ref)
    assert registry.bytes_served(image.layers[0].digest) == 0 and registry.bytes_served(image.layers[2].digest) == 0
    check_integrity(tmp_path / "store")
    row("corrupt-layer", "a corrupt layer (every fetch of it fails its digest)",
        "containerd: the snapshotter's `DigestMismatch` naming the layer; integrity; resumed",
        "The layer is fetched once more, fails again, and the pull fails naming the layer and its digest; "
        "nothing of it is committed, the other layers are, and the next pull fetches only the bad one.")


METADATA_FAULTS = {
    "metadata-truncated": ("the snapshotter's metadata file truncated", lambda p: p.write_bytes(p.read_bytes()[:8192])),
    "metadata-garbage": ("the snapshotter's metadata file overwritten with garbage",
                         lambda p: p.write_bytes(bytes(range(256)) * 20)),
}


@pytest.mark.parametrize("fault", list(METADATA_FAULTS))
def test_corrupt_metadata_refuses_to_start_with_one_line(tmp_path, fault):
    db = tmp_path / "store" / "snapshotter" / "metadata.db"
    db.parent.mkdir(parents=True)
    meta = MetaStore(db)
    with meta.write() as tx:
        for i in range(200):
            tx.conn.execute("INSERT INTO snapshots (name, kind, created, updated) VALUES (?, 3, 0, 0)",
                            (f"snapshot-{i}-" + "x" * 200,))
    meta.close()
    title, corrupt = METADATA_FAULTS[fault]
    corrupt(db)
    done = subprocess.run([sys.executable, "-m", "fastpull", "serve", "--store", str(tmp_path / "store"), "--listen",
                           "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--snapshotter", str(tmp_path / "s.sock")],
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert str(db) in lines[0] and "corrupt" in lines[0] and f"mv {db} {db}.corrupt" in lines[0], lines[0]
    db.rename(f"{db}.corrupt")
    with ServeProcess(tmp_path / "store", "127.0.0.1:9", "--snapshotter", str(tmp_path / "s.sock")):
        pass
    row(fault, title, "refuses to start (status 1) with one line: `snapshot metadata PATH is corrupt (...): to "
        "recover, move it aside (mv PATH PATH.corrupt) and start again; ...`",
        "Checked at start (SQLite's `quick_check`): never a traceback, never a half-read table. Moved aside, the "
        "daemon starts with empty metadata; the snapshots containerd held in it are lost (the line says so): "
        "remove those images and pull them again.")
