"""``fastpull status`` and the snapshotter's metrics, against a real ``fastpull serve --snapshotter`` in
front of the test registry: containerd's Prepares (through the gRPC socket) drive a pull that a blob
held by another writer keeps in flight, behind a dead mirror; the status shows the pull, the store's
size and the tripped mirror, and the metrics count the layers and the bytes unpacked."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from conftest import wait_until

from fastpull.cli.main import main
from fastpull.content.store import ContentStore
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from fastpull.snapshotter.remote import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    SNAPSHOT_REF,
)
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.unpack.snapshots import chain_ids

MiB = 1 << 20
UNPACKED = "fastpull_snapshotter_unpacked_compressed_bytes_total"
PREPARED = "fastpull_snapshotter_prepare_duration_seconds_count"


@pytest.fixture
def socket_dir():
    """A short directory for the snapshotter's socket (a unix socket's path takes 107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastpull", "status", *args], capture_output=True, text=True,
                          timeout=60)


def _metric(text: str, sample: str) -> float:
    return next((float(line.rpartition(" ")[2]) for line in text.splitlines()
                 if line.rpartition(" ")[0] == sample), 0.0)


def test_status_shows_a_pull_in_flight_and_the_metrics_count_it(registry, image_cache, tmp_path, socket_dir,
                                                                  monkeypatch, capsys):
    image = build_image([LayerSpec(MiB), LayerSpec(2 * MiB)], image_cache / "status", seed=19)
    push_image(registry.url, "status/app", "v1", image)
    ref = f"{registry.host}/status/app:v1"
    chains = chain_ids([layer.diff_id for layer in image.layers])
    dead = f"127.0.0.1:{_free_port()}"  # a mirror nothing listens on: its breaker trips
    (tmp_path / "certs.d" / registry.host).mkdir(parents=True)
    (tmp_path / "certs.d" / registry.host / "hosts.toml").write_text(
        f'server = "http://{registry.host}"\n\n[host."http://{dead}"]\n  capabilities = ["pull", "resolve"]\n')
    (tmp_path / "registries.conf").touch()
    store = tmp_path / "store"
    top = image.layers[1]
    held = ContentStore(store).open_writer(top.digest, top.size, 256 * 1024)  # another writer's: the pull waits

    def prepare(stub, key: str, parent: str, i: int):
        labels = {SNAPSHOT_REF: chains[i], CRI_IMAGE_REF: ref, CRI_MANIFEST_DIGEST: image.manifest_digest,
                  CRI_LAYER_DIGEST: image.layers[i].digest,
                  CRI_IMAGE_LAYERS: ",".join(d.digest for d in image.layers[i:])}
        return stub.Prepare.future(pb.PrepareSnapshotRequest(snapshotter="fastpull", key=key, parent=parent,
                                                             labels=labels), timeout=60)

    def already_exists(call) -> bool:
        with pytest.raises(grpc.RpcError) as answered:
            call.result()
        return answered.value.code() == grpc.StatusCode.ALREADY_EXISTS

    try:
        with ServeProcess(store, registry.host, "--snapshotter", str(socket_dir / "s.sock"),
                          "--hosts-dir", str(tmp_path / "certs.d"),
                          "--registries-conf", str(tmp_path / "registries.conf")) as daemon, \
                grpc.insecure_channel(f"unix:{socket_dir / 's.sock'}") as channel:
            def metrics() -> str:
                return _get(daemon, "/metrics")

            assert _metric(metrics(), UNPACKED) == 0
            stub = pb_grpc.SnapshotsStub(channel)
            assert already_exists(prepare(stub, "k8s.io/1/extract-1", "", 0))  # the base layer is in
            waiting = prepare(stub, "k8s.io/2/extract-2", chains[0], 1)  # the top one's blob is held

            def pulls() -> list[dict]:
                return json.loads(_get(daemon, "/_fastpull/v1/status"))["pulls"]

            wait_until(lambda: [(p["layers"], p["waiting"]) for p in pulls()] == [(1, 1)],
                       "the status shows the pull with one layer in and one Prepare waiting", timeout=30)
            wait_until(lambda: _metric(metrics(), UNPACKED) == image.layers[0].size,
                       "the base layer's bytes are counted unpacked")

            shown = _status("--json", "--url", daemon.url)
            assert shown.returncode == 0, shown.stderr
            status = json.loads(shown.stdout)
            (pull,) = status["pulls"]
            assert (pull["image"], pull["into"], pull["layers"], pull["layers_total"], pull["waiting"]) == (
                ref, "snapshotter", 1, 2, 1)
            assert pull["reference"] == f"{registry.host}/status/app@{image.manifest_digest}"
            assert pull["bytes_total"] == image.total_size  # config and layers: none was in the store
            assert image.layers[0].size <= pull["bytes"] < pull["bytes_total"]
            size = status["store_size"]
            assert size["blobs"] >= image.config.size + image.layers[0].size and size["layers"] > 0
            assert size["total"] == size["blobs"] + size["layers"]
            (tripped,) = status["tripped_hosts"]
            assert tripped["host"] == dead and 0 < tripped["retry_in"] <= 30 and dead in tripped["error"]
            assert status["inflight"] == [] and status["store"] == str(store)  # the fields the mirror had

            text = _status("--url", daemon.url)  # not a terminal: plain lines
            assert text.returncode == 0 and "pulls in flight: 1" in text.stdout, text.stderr
            (row,) = [line for line in text.stdout.splitlines() if line.startswith(f"  {ref} ")]
            assert row.split()[1:2] == ["1/2"] and row.split()[-2:] == ["1", "snapshotter"]
            assert f"  {dead}  " in text.stdout and "blobs in flight: none" in text.stdout

            monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: tables
            monkeypatch.setenv("COLUMNS", "200")
            assert main(["status", "--url", daemon.url]) == 0
            table = capsys.readouterr().out
            assert ref in table and "1/2" in table and "WAITING" in table and dead in table

            held.close()  # the daemon's pull takes the blob over and fetches it
            assert already_exists(waiting)
            wait_until(lambda: pulls() == [], "the pull is over")
            wait_until(lambda: _metric(metrics(), UNPACKED) == sum(layer.size for layer in image.layers),
                       "both layers' bytes are counted unpacked")
            assert already_exists(prepare(stub, "other/1/extract-1", "", 0))  # another namespace: from the cache
            counted = metrics()
            assert _metric(counted, f'{PREPARED}{{outcome="remote"}}') == 2
            assert _metric(counted, f'{PREPARED}{{outcome="cache"}}') == 1
    finally:
        held.close()
    assert "Traceback" not in daemon.log, daemon.log


def test_a_daemon_that_is_not_running_is_one_line_naming_its_url():
    url = f"http://127.0.0.1:{_free_port()}"
    for args in ([], ["--json"]):
        done = _status("--url", url, *args)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and url in done.stderr and "Traceback" not in done.stderr


def _get(daemon: ServeProcess, path: str) -> str:
    import http.client

    connection = http.client.HTTPConnection(daemon.host, timeout=60)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()
