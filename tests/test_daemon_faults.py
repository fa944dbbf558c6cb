"""Faults of the node daemon, ``fastpull serve --snapshotter`` under containerd 1.6's CRI: each test
is a row of docs/faults.md (tests/faultmatrix.py ``write_daemon_rows``, written when every row ran
and passed). Deterministic: the fault-injecting registry holds chosen blobs (or chunks of them) back,
and the moment of a fault is chosen by watching the store, the registry's log and the daemon's
status, never by sleeping."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from clients import CRI_NAMESPACE, ClientError, Containerd, check_containerd_image, write_hosts_toml
from conftest import tmpfs, wait_until
from cri import CriError, node_daemons
from faultmatrix import write_daemon_rows
from faultserver import FaultRegistry

from fastpull.content.core import ChunkBitmap
from fastpull.oci.manifest import chain_ids
from fastpull.snapshotter.metadata import MetaStore
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import BuiltImage, LayerSpec, build_image

REPO = "daemon/app"
ROWS: dict[str, tuple[str, str]] = {}
TITLES: dict[str, str] = {}
MiB = 1 << 20
HELD_RATE = 1.0
"""Bytes/s of a held chunk (``FaultRegistry.slow``): a byte a second keeps the engine's stall timeout
from cutting it, and its chunk never completes while a test looks."""


@pytest.fixture(scope="module", autouse=True)
def _doc_rows():
    yield
    if set(ROWS) == EXPECTED:
        write_daemon_rows({TITLES[k]: ROWS[k] for k in sorted(EXPECTED, key=list(TITLES).index)})


def row(key: str, title: str, outcome: str, promise: str) -> None:
    TITLES[key] = title
    ROWS[key] = (outcome, promise)


@pytest.fixture
def socket_dir():
    path = Path(tempfile.mkdtemp(prefix="fpdf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Node:
    """containerd 1.6 with CRI pulling through ``fastpull serve --snapshotter``. containerd resolves
    its images at a registry of its own (``front``); the daemon fetches from ``registry`` (its
    hosts.toml sends the front's host there), so a fault reaches the daemon's fetches alone."""

    registry: FaultRegistry
    front: FaultRegistry
    images: dict[str, BuiltImage]
    """``app``: layers of 1 MB, 2 MB and 1 MB; ``other``: the same two base layers and one of its own."""
    containerd: Containerd
    store: Path
    command: tuple[str, ...]
    serves: list[ServeProcess] = field(default_factory=list)

    def ref(self, name: str = "app") -> str:
        return f"{self.front.host}/{REPO}:{name}"

    @property
    def image(self) -> BuiltImage:
        return self.images["app"]

    @property
    def serve(self) -> ServeProcess:
        return self.serves[-1]

    def start_serve(self) -> ServeProcess:
        self.serves.append(ServeProcess(self.store, self.registry.host, *self.command).start())
        return self.serve

    def pulls(self) -> list[dict]:
        """The daemon's snapshotter pulls in flight (its status API)."""
        with urllib.request.urlopen(f"{self.serve.url}/_fastpull/v1/status", timeout=10) as reply:
            return json.load(reply)["pulls"]

    def scrub(self, error: BaseException) -> str:
        """The first line of a client's error, hosts written REGISTRY, cut for a table cell."""
        text = str(error).replace(self.front.host, "REGISTRY").replace(self.registry.host, "REGISTRY")
        return text.splitlines()[0][:80].replace("|", "/")


@pytest.fixture
def node(tmp_path, socket_dir, image_cache):
    with FaultRegistry() as registry, FaultRegistry() as front, node_daemons(tmp_path) as start_containerd:
        base = [LayerSpec(1_000_000, files=3), LayerSpec(2_000_000, files=2)]
        images = {"app": build_image([*base, LayerSpec(1_000_000, "text", files=3)], image_cache / "daemon-faults",
                                     media="oci"),
                  "other": build_image([*base, LayerSpec(500_000, "text", files=2)], image_cache / "daemon-faults-2",
                                       media="oci")}
        assert images["app"].layers[:2] == images["other"].layers[:2]
        for name, image in images.items():
            registry.add_image(REPO, name, image)
            front.add_image(REPO, name, image)
        hosts = tmp_path / "daemon-hosts"
        (hosts / front.host).mkdir(parents=True)
        (hosts / front.host / "hosts.toml").write_text(f'server = "http://{registry.host}"\n')
        sock = socket_dir / "fastpull.sock"
        node = Node(registry, front, images, None, tmp_path / "store",  # type: ignore[arg-type]
                    ("--snapshotter", str(sock), "--hosts-dir", str(hosts)))
        node.start_serve()
        try:
            node.containerd = start_containerd(cri_snapshotter="fastpull", proxy_plugins={"fastpull": sock})
            write_hosts_toml(node.containerd.hosts_dir, front.host)
            yield node
        finally:
            for s in node.serves:
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


# ---- what the store holds, read as the daemon leaves it -------------------------------------------


def _bitmap(store: Path, digest: str) -> ChunkBitmap | None:
    """The ingest's chunk bitmap of ``digest`` (close it), None if there is none (yet, or any more)."""
    try:
        return ChunkBitmap(store / ".fastpull" / "ingest" / digest.removeprefix("sha256:") / "bitmap")
    except (FileNotFoundError, ValueError):  # not there, or being created
        return None


def landed(store: Path, digest: str) -> bool:
    return (store / "blobs" / "sha256" / digest.removeprefix("sha256:")).exists()


def chunks_landed(store: Path, digest: str) -> int:
    if (bitmap := _bitmap(store, digest)) is None:
        return 0
    try:
        return bitmap.count()
    finally:
        bitmap.close()


def missing_bytes(store: Path, digest: str, size: int) -> int:
    """What a resumed fetch of the blob must get: nothing once it is in the store, else the chunks
    its ingest's bitmap lacks (all of it without one)."""
    if landed(store, digest):
        return 0
    if (bitmap := _bitmap(store, digest)) is None:
        return size
    try:
        return sum(end - start for start, end in map(bitmap.chunk_span, bitmap.missing()))
    finally:
        bitmap.close()


def unpacking(store: Path, diff_ids: list[str], i: int) -> bool:
    """Whether layer ``i``'s unpack into the layer cache has written anything yet."""
    hexd = chain_ids(diff_ids)[i].removeprefix("sha256:")
    return any(any(tree.iterdir()) for tree in (store / "snapshots" / ".tmp").glob(f"{hexd}.*"))


def in_cache(node: Node, name: str = "app") -> bool:
    """Every layer of the image is in the daemon's layer cache."""
    cache = node.store / "snapshots" / "sha256"
    return all((cache / c.removeprefix("sha256:")).is_dir()
               for c in chain_ids([layer.diff_id for layer in node.images[name].layers]))


def errors_logged(serve: ServeProcess) -> list[str]:
    """The daemon's lines at level ERROR, and its tracebacks."""
    return re.findall(r"^(?:ERROR|Traceback).*", serve.log, re.M)


def release(registry: FaultRegistry) -> None:
    """Lift every fault and cut every connection, the held ones too: the daemon's engine fetches
    again, from the bytes it has."""
    registry.clear_faults()
    with registry._lock:  # the registry has no public call that cuts connections and goes on serving
        connections = list(registry._connections)
    for sock in connections:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# ---- fastpull serve killed (-9) at ten moments ---------------------------------------------------


@dataclass(frozen=True)
class Moment:
    """A moment of CRI pulls to kill the daemon at: the faults held, and what must be true then."""

    title: str
    held: tuple = ()
    """Blobs the registry sends nothing of (``manifest``, ``config``, a layer of ``app`` by position,
    ``own``: the layer of ``other`` it does not share)."""
    head: int | None = None
    """A layer of 2 MB (two chunks) whose first chunk is held, its second not: it lands."""
    tail: int | None = None
    """A layer whose second chunk is held: the first lands, and its unpack follows it."""
    landed: tuple[int, ...] = ()
    """Layers whose blobs are in the store."""
    pulls: tuple[str, ...] = ("app",)
    """Images CRI pulls at once."""
    before: tuple[str, ...] = ()
    """Images pulled whole first."""
    waiting: tuple[int, ...] = ()
    """The Prepares waiting in each of the daemon's pulls."""
    resolved: int = 0
    """containerd's resolves of the image at its registry (one a CRI pull)."""


KILL_MOMENTS = {
    "kill-before-manifest": Moment("a Prepare in, the daemon's GET of the manifest held", held=("manifest",)),
    "kill-before-config": Moment("the manifest in, the config held", held=("config",)),
    "kill-before-layers": Moment("the config in, every layer held", held=(0, 1, 2)),
    "kill-mid-blob": Moment("mid-blob: one chunk of a layer landed, its first one and the other layers held",
                            held=(0, 2), head=1),
    "kill-mid-unpack": Moment("mid-unpack: a layer's first chunk unpacking, its second held, the others landed",
                              tail=1, landed=(0, 2)),
    "kill-1-of-3": Moment("1 of 3 layers landed", held=(1, 2), landed=(0,)),
    "kill-2-of-3": Moment("2 of 3 layers landed (the top one waiting for the layer under it)",
                          held=(1,), landed=(0, 2)),
    "kill-two-cri-pulls": Moment("two CRI pulls of the image at once, a Prepare waiting in the daemon's pull",
                                 held=(1, 2), landed=(0,), pulls=("app", "app"), waiting=(1,), resolved=2),
    "kill-second-image": Moment("the image pulled; an image sharing its two base layers mid-pull (its own layer held)",
                                held=("own",), pulls=("other",), before=("app",)),
    "kill-two-images": Moment("two images sharing their base layers pulled at once, the top layer of each held "
                              "(two pulls in the daemon)", held=(2, "own"), landed=(0, 1), pulls=("app", "other"),
                              waiting=(1, 1)),
}


def _blob(node: Node, name) -> str:
    app = node.image
    return {"manifest": app.manifest_digest, "config": app.config.digest,
            "own": node.images["other"].layers[2].digest}.get(name) or app.layers[name].digest


def _at_moment(node: Node, moment: Moment) -> bool:
    app = node.image
    return (all(node.registry.requests_for(_blob(node, name)) for name in moment.held)
            and all(landed(node.store, app.layers[i].digest) for i in moment.landed)
            and (moment.head is None or chunks_landed(node.store, app.layers[moment.head].digest) == 1)
            and (moment.tail is None or unpacking(node.store, [x.diff_id for x in app.layers], moment.tail))
            and (not moment.waiting or sorted(p["waiting"] for p in node.pulls()) == sorted(moment.waiting))
            and sum(r.method == "HEAD" for r in node.front.requests_for(app.manifest_digest)) >= moment.resolved)


@pytest.mark.parametrize("key", list(KILL_MOMENTS))
def test_daemon_killed_mid_pull(node, key):
    moment = KILL_MOMENTS[key]
    with node.containerd.cri_images() as cri:
        for name in moment.before:
            cri.pull(node.ref(name))
    for name in moment.held:
        node.registry.stall_after(_blob(node, name), 0)
    if moment.head is not None:
        node.registry.slow(node.image.layers[moment.head].digest, HELD_RATE, ranges=[0])
    if moment.tail is not None:
        node.registry.slow(node.image.layers[moment.tail].digest, HELD_RATE, ranges=[MiB])
    with node.containerd.cri_images() as cri, ThreadPoolExecutor(len(moment.pulls)) as pool:
        pulling = [pool.submit(cri.pull, node.ref(name)) for name in moment.pulls]
        try:
            wait_until(lambda: _at_moment(node, moment), f"the moment of the kill: {moment.title}", 60)
        finally:
            node.serve.stop(signal.SIGKILL)
        errors = []
        for future in pulling:
            with pytest.raises(ClientError) as failed:
                future.result(timeout=120)
            errors.append(failed.value)
    pulled = dict.fromkeys(moment.before + moment.pulls)
    blobs = {layer.digest: layer.size for name in pulled for layer in node.images[name].layers}
    missing = {digest: missing_bytes(node.store, digest, size) for digest, size in blobs.items()}
    node.registry.clear_faults()
    node.registry.clear()
    node.start_serve()
    reconnect(node.containerd)
    check_integrity(node.store, tmp=False)
    with node.containerd.cri_images() as cri:
        for name in pulled:
            cri.pull(node.ref(name))
    assert {d: node.registry.bytes_served(d) for d in blobs} == missing
    for name in pulled:
        check_containerd_image(node.containerd, node.ref(name), node.images[name], node.store.parent / f"check-{name}",
                               namespace=CRI_NAMESPACE, snapshotter="fastpull", layers=False)
    check_integrity(node.store)
    row(key, f"`fastpull serve` killed (-9): {moment.title}",
        f"containerd: `{node.scrub(errors[0])}...`; integrity; resumed ({sum(missing.values()):,} of "
        f"{sum(blobs.values()):,} layer bytes fetched again)",
        "Each CRI pull fails at once with a gRPC error from the proxy; after a restart containerd reconnects, "
        "its GC and the snapshotter's cleanup leave every row with its directory and no half-made snapshot, and "
        "the next pull removes the killed unpack's temporary trees and fetches exactly what the store lacked: "
        "the layers whose blobs had not landed, less the chunks of them that had.")


# ---- containerd, the registry, the disk and the client ------------------------------------------


def _prepare_waiting(node: Node) -> bool:
    """The daemon's one pull has layer 1 in the cache and a Prepare waiting (for layer 2, held)."""
    return [(p["layers"], p["waiting"]) for p in node.pulls()] == [(1, 1)]


def test_containerd_restarted_mid_pull(node):
    registry, app = node.registry, node.image
    registry.stall_after(app.layers[1].digest, 0)
    with node.containerd.cri_images() as cri, ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(cri.pull, node.ref())
        try:
            wait_until(lambda: _prepare_waiting(node), "a Prepare waiting for the held layer", 60)
        finally:
            node.containerd.kill()
        with pytest.raises(CriError) as failed:
            pulling.result(timeout=120)
    assert failed.value.code.name == "UNAVAILABLE", failed.value
    # The daemon lives on, and so does its pull: the Prepare it served went with containerd.
    wait_until(lambda: [(p["layers"], p["waiting"]) for p in node.pulls()] == [(1, 0)], "the Prepare gone", 30)
    node.containerd.restart()
    with node.containerd.cri_images() as cri, ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(cri.pull, node.ref())
        try:
            wait_until(lambda: _prepare_waiting(node), "the restarted containerd's Prepare joining the pull", 60)
        finally:
            release(registry)
        pulling.result(timeout=120)
    assert node.serve.proc.poll() is None and not errors_logged(node.serve), node.serve.log
    assert len(registry.requests_for(app.manifest_digest)) == 1  # one pull of the image, never started again
    assert [registry.bytes_served(layer.digest) for layer in app.layers] == [layer.size for layer in app.layers]
    node.containerd.gc()
    check_integrity(node.store)
    check_containerd_image(node.containerd, node.ref(), app, node.store.parent / "check", namespace=CRI_NAMESPACE,
                           snapshotter="fastpull", layers=False)
    row("containerd-restart", "containerd killed (-9) and started again while a CRI pull waits in Prepare",
        "the kubelet's call: `UNAVAILABLE` (containerd gone); the daemon lives on, its pull too; integrity; "
        "resumed (the next pull's Prepare joins it: every layer fetched once)",
        "The Prepare that containerd took with it is dropped (its call was cancelled: the pull no longer "
        "counts it as waiting, and never answers it); the image's pull in the daemon goes on for the store. "
        "The restarted containerd's pull joins it, and nothing is fetched twice.")


def test_registry_restarted_mid_pull(node):
    registry, app = node.registry, node.image
    cut = app.layers[1]
    registry.slow(cut.digest, HELD_RATE, ranges=[MiB])
    with node.containerd.cri_images() as cri, ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(cri.pull, node.ref())
        try:
            wait_until(lambda: landed(node.store, app.layers[0].digest) and landed(node.store, app.layers[2].digest)
                       and chunks_landed(node.store, cut.digest) == 1, "the registry mid-blob", 60)
        finally:
            registry.stop()  # every connection cut
        port = int(registry.host.rpartition(":")[2])
        with socket.create_server(("127.0.0.1", port)) as down:  # while it is down, the daemon is turned away
            down.settimeout(60)
            turned_away = _request_range(down.accept()[0])
        with FaultRegistry(port=port) as again:
            for name, image in node.images.items():
                again.add_image(REPO, name, image)
            pulling.result(timeout=120)
            served = [again.bytes_served(layer.digest) for layer in app.layers]
            ranges = [r.range for r in again.requests_for(cut.digest) if r.status == 206]
    # Once back, it sends the rest of the cut chunk alone, from the byte the cut transfer had reached:
    # the retry turned away asked for the same.
    start = int(turned_away.removeprefix("bytes=").partition("-")[0])
    assert ranges == [turned_away] and MiB <= start < cut.size, (turned_away, ranges)
    assert served == [0, cut.size - start, 0], served
    node.containerd.gc()
    check_integrity(node.store)
    check_containerd_image(node.containerd, node.ref(), app, node.store.parent / "check", namespace=CRI_NAMESPACE,
                           snapshotter="fastpull", layers=False)
    row("registry-restart", "the registry restarted mid-blob (its connections cut, the next one turned away at once, "
        "then it is back)",
        "the CRI pull completes; integrity; once back, the registry sends only the chunk that was cut",
        "The engine retries the cut transfer, and again after it is turned away, until the registry is back; "
        "the chunks that landed are not fetched again, and the cut one resumes from the byte the cut transfer "
        "had reached (a retry turned away keeps that point). The Prepare waiting on the layer never hears of it.")


def _request_range(connection: socket.socket) -> str:
    """The ``Range`` of the one request read from ``connection``, which is then closed unanswered."""
    with connection:
        connection.settimeout(60)
        head = b""
        while b"\r\n\r\n" not in head:
            data = connection.recv(65536)
            if not data:
                break
            head += data
    fields = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
    return fields.get("Range", "")


def test_store_full_during_unpack(node, tmp_path):
    app = node.image
    node.serve.stop()
    cache = node.store / "snapshots"
    shutil.rmtree(cache)
    with tmpfs(cache, "512k") as resize:  # the layer cache: the layers' blobs (elsewhere in the store) have room
        node.start_serve()
        try:
            reconnect(node.containerd)
            with node.containerd.cri_images() as cri:
                with pytest.raises(ClientError) as failed:
                    cri.pull(node.ref())
            missing = {layer.digest: missing_bytes(node.store, layer.digest, layer.size) for layer in app.layers}
            # The daemon answers RESOURCE_EXHAUSTED; containerd 1.6's errdefs knows no such code (unknown).
            assert f"unpack error at {cache}/" in str(failed.value), failed.value
            assert "No space left on device" in str(failed.value), failed.value
            node.containerd.gc()
            check_integrity(node.store)  # the failed unpack's tree is gone
            resize("64m")
            node.registry.clear()
            with node.containerd.cri_images() as cri:
                cri.pull(node.ref())
            # What the store lacked, at most (a fetch the failure stopped may have landed since).
            assert all(node.registry.bytes_served(d) <= m for d, m in missing.items()), missing
            check_containerd_image(node.containerd, node.ref(), app, tmp_path / "check", namespace=CRI_NAMESPACE,
                                   snapshotter="fastpull", layers=False)
            check_integrity(node.store)
        finally:
            node.serve.stop()
    row("enospc", "ENOSPC in the layer cache during unpack (a small tmpfs)",
        "containerd: the snapshotter's `unpack error at STORE/snapshots/.tmp/CHAINID.XXXX/PATH: No space left on "
        "device`; integrity; with space again, resumed",
        "The unpack that runs out of space fails the image's pull with the layer's path and `No space left on "
        "device`; its partial tree is removed, the blobs that landed stay, and once there is room the next pull "
        "unpacks them without fetching them again.")


def test_client_gives_up(node):
    """A kubelet's PullImage deadline passes while a layer is held: containerd's context is cancelled,
    and so is its Prepare's call. The test cancels the call itself once the Prepare waits (the same
    cancellation to containerd, at a moment chosen, not raced against a deadline)."""
    registry, app = node.registry, node.image
    registry.stall_after(app.layers[1].digest, 0)
    with node.containerd.cri_images() as cri:
        pulling = cri.pull_started(node.ref())
        wait_until(lambda: [(p["layers"], p["waiting"]) for p in node.pulls()] == [(1, 1)],
                   "a Prepare waiting for the held layer", 60)
        pulling.cancel()
        assert pulling.cancelled()
    # Decided: the fetch goes on for the store. The pull is the image's, shared by every Prepare of it;
    # the kubelet pulls again after a deadline, and finds the layers there.
    wait_until(lambda: [(p["layers"], p["waiting"]) for p in node.pulls()] == [(1, 0)],
               "the pull going on with no Prepare waiting", 30)
    release(registry)
    wait_until(lambda: not node.pulls() and in_cache(node), "the layers in the cache", 60)
    assert not errors_logged(node.serve), node.serve.log
    registry.clear()
    with node.containerd.cri_images() as cri:
        cri.pull(node.ref())
    assert registry.log == []  # nothing fetched: every layer was in the cache
    node.containerd.gc()
    check_integrity(node.store)
    row("client-deadline", "a client giving up (a PullImage deadline passing, a layer held)",
        "the client's call cancelled; the fetch goes on for the store; integrity; the next `PullImage` "
        "fetches nothing",
        "Decided: the fetch goes on. The daemon's pull is the image's, shared by every Prepare of it, and a "
        "kubelet whose deadline passed pulls again: the Prepare that gave up is dropped (never answered, no "
        "longer counted as waiting), the layers land in the cache, and the next `PullImage` finds them all there "
        "(no request reaches the registry).")


def test_corrupt_layer(node):
    registry, image, ref = node.registry, node.image, node.ref()
    bad = image.layers[1].digest
    registry.corrupt(bad)
    with node.containerd.cri_images() as cri:
        with pytest.raises(ClientError) as failed:
            cri.pull(ref)
        assert bad in str(failed.value) and "digest" in str(failed.value), failed.value
        node.containerd.gc()
        check_integrity(node.store)
        # The failure ends the pull's other fetches at once: the good layers landed (all but always,
        # as the bad one is fetched twice) or stay resumable from the chunks that did.
        good = [layer for layer in image.layers if layer.digest != bad]
        lacking = [missing_bytes(node.store, layer.digest, layer.size) for layer in good]
        registry.clear_faults()
        registry.clear()
        cri.pull(ref)
    assert [registry.bytes_served(layer.digest) for layer in good] == lacking
    assert registry.bytes_served(bad) == image.layers[1].size
    check_integrity(node.store)
    row("corrupt-layer", "a corrupt layer (every fetch of it fails its digest)",
        "containerd: the snapshotter's `DigestMismatch` naming the layer; integrity; resumed",
        "The layer is fetched once more, fails again, and the pull fails naming the layer and its digest, its "
        "other fetches ended at once; nothing of it is committed, and the next pull fetches the bad one and "
        "only what the other layers lacked.")


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




EXPECTED = {*KILL_MOMENTS, "containerd-restart", "registry-restart", "enospc", "client-deadline",
            "corrupt-layer", *METADATA_FAULTS}
