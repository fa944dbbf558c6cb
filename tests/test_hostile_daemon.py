"""Hostile registries and clients: documents no runtime could use (10,000 layers, a 1 GiB manifest
or config) are refused by name under bounded memory, by ``fastpull pull`` and by ``fastpull serve``;
a thousand connections that send nothing hold up neither the HTTP listener nor the snapshotter's
socket; what a client sent is cut in the log; the listener is on loopback unless told otherwise."""

from __future__ import annotations

import hashlib
import http.client
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import wait_until
from faultserver import FaultRegistry

from fastpull.oci.manifest import (
    MAX_CONFIG_BYTES,
    MAX_DESCRIPTORS,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from fastpull.protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from fastpull.snapshotter.remote import CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, SNAPSHOT_REF
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.images import LayerSpec, build_image

GiB = 1 << 30
MiB = 1 << 20
BOUND = 256 * MiB
"""Peak RSS a process may reach facing a 1 GiB document: a quarter of it (a failed pull peaks at about 35 MiB)."""
LONGEST_LOG_LINE = 500


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(config: dict, layers: list[dict]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}).encode()


def _serve_file_as_manifest(registry: FaultRegistry, repo: str, tag: str, path: Path) -> str:
    """``path`` as ``repo:tag``'s manifest, streamed from disk (``add_manifest`` keeps a body in memory)."""
    digest = registry.add_blob(path)
    with registry._lock:
        registry._tags[repo, tag] = digest
        registry._manifests.setdefault(repo, set()).add(digest)
    return digest


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A registry serving ``hostile/layers:v1`` (10,000 layers), ``hostile/config:v1`` (a 1 GiB
    config) and ``hostile/big:v1`` (a 1 GiB manifest); the GiB is a sparse file."""
    gib = tmp_path_factory.mktemp("hostile") / "gib"
    with open(gib, "wb") as f:
        f.truncate(GiB)
    layers = [{"mediaType": OCI_LAYER_GZIP, "digest": f"sha256:{i:064x}", "size": 1} for i in range(10_000)]
    small_config = {"mediaType": OCI_CONFIG, "digest": _sha256(b"{}"), "size": 2}
    with FaultRegistry() as registry:
        registry.add_blob(b"{}")
        big = _serve_file_as_manifest(registry, "hostile/big", "v1", gib)
        registry.add_manifest("hostile/layers", "v1", _manifest(small_config, layers), OCI_MANIFEST)
        registry.add_manifest("hostile/config", "v1",
                              _manifest({"mediaType": OCI_CONFIG, "digest": big, "size": GiB}, []), OCI_MANIFEST)
        yield registry


_MEASURED = """import resource, subprocess, sys
status = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(status)"""
"""Runs a command and prints its peak RSS: started from a small process, as a child of this one would
count this one's pages, which it shares until its exec."""


def _pull(ref: str, layout: Path) -> tuple[int, str, int]:
    """``fastpull pull ref`` as a child: (exit status, stderr, peak RSS in bytes)."""
    done = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-m", "fastpull", "pull", ref,
                           "--layout", str(layout)], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr, int(done.stdout)


@pytest.mark.parametrize(("repo", "why"), [
    ("hostile/layers", f"layers: 10000 descriptors is over the limit of {MAX_DESCRIPTORS}"),
    ("hostile/config", f"{GiB} bytes is over the {MAX_CONFIG_BYTES}-byte limit of an image config"),
    ("hostile/big", f"more than {MAX_MANIFEST_BYTES} bytes, the limit of a manifest"),
])
def test_a_pull_refuses_documents_no_runtime_could_use_in_bounded_memory(hostile, tmp_path, repo, why):
    hostile.clear()
    ref = f"{hostile.host}/{repo}:v1"
    status, stderr, peak = _pull(ref, tmp_path / "layout")
    assert status == 1 and len(stderr.splitlines()) == 1, stderr
    assert f"bad manifest {ref}" in stderr and why in stderr
    assert peak < BOUND, f"peak RSS {peak >> 20} MiB"
    assert sum(r.bytes_sent for r in hostile.log) < 64 * MiB  # it stopped reading at the cap, fetched no blob


def _vm_hwm(pid: int) -> int:
    """Peak RSS of a live process, in bytes."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _get(daemon: ServeProcess, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(daemon.host, timeout=30)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_the_mirror_refuses_a_huge_manifest_and_fetches_nothing_ahead_for_no_runtime(hostile, tmp_path):
    with ServeProcess(tmp_path / "store", hostile.host) as daemon:
        status, body = _get(daemon, "/v2/hostile/big/manifests/v1")
        assert status == 502 and f"more than {MAX_MANIFEST_BYTES} bytes" in json.loads(body)["errors"][0]["message"]
        # Not the mirror's to judge (the runtime is): served as they are, but nothing is fetched ahead.
        assert _get(daemon, "/v2/hostile/layers/manifests/v1")[0] == 200
        assert _get(daemon, "/v2/hostile/config/manifests/v1")[0] == 200
        assert 'result="ahead"' not in _get(daemon, "/metrics")[1].decode()
        assert _vm_hwm(daemon.proc.pid) < BOUND


def test_a_layer_asked_for_as_a_manifest_is_never_read_whole(tmp_path, image_cache):
    image = build_image([LayerSpec(6 * MiB)], image_cache / "hostile-layer", seed=5)
    assert image.layers[0].size > MAX_MANIFEST_BYTES
    with FaultRegistry() as upstream, ServeProcess(tmp_path / "store", upstream.host) as daemon:
        upstream.add_image("team/app", "v1", image)
        assert _get(daemon, "/v2/team/app/manifests/v1")[0] == 200  # records the layer, fetches it ahead
        layer = tmp_path / "store" / "blobs" / "sha256" / image.layers[0].digest[7:]
        wait_until(layer.exists, "the layer is fetched ahead", timeout=60)
        status, body = _get(daemon, f"/v2/team/app/manifests/{image.layers[0].digest}")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


# ---- a daemon with the snapshotter's socket, for the tests of connections and logs --------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-daemon")
    with FaultRegistry() as upstream, ServeProcess(root / "store", upstream.host,
                                                   "--snapshotter", str(root / "snap.sock")) as d:
        d.socket = root / "snap.sock"
        yield d
    assert "Traceback" not in d.log, d.log[-3000:]


@pytest.fixture
def many_fds():
    """Room for two thousand sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if soft >= want:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the hard limit of open files is {hard}, under the {want} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _stub(daemon: ServeProcess) -> tuple[grpc.Channel, pb_grpc.SnapshotsStub]:
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    return channel, pb_grpc.SnapshotsStub(channel)


def test_a_thousand_silent_connections_stop_no_one(daemon, many_fds):
    host, port = daemon.host.rsplit(":", 1)
    opened: list[socket.socket] = []
    try:
        for i in range(1000):  # half say nothing, half leave a request (or the HTTP/2 preface) unfinished
            tcp = socket.create_connection((host, int(port)))
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            opened += [tcp, unix]
            unix.connect(str(daemon.socket))
            if i % 2:
                tcp.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
                unix.sendall(b"PRI * HTTP/2.0\r\n")
        started = time.monotonic()
        assert _get(daemon, "/v2/")[0] == 200
        channel, stub = _stub(daemon)
        with channel, pytest.raises(grpc.RpcError) as refused:
            stub.Stat(pb.StatSnapshotRequest(snapshotter="fastpull", key="missing"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert time.monotonic() - started < 10
    finally:
        for s in opened:
            s.close()
    assert _get(daemon, "/_fastpull/v1/status")[0] == 200


def test_the_log_cuts_what_a_client_sent(daemon):
    name = "a" * 6000
    for path in (f"/v2/{name}/manifests/latest", f"/v2/team/app/manifests/latest?ns={name}",
                 f"/v2/team/app/manifests/{name}", f"/v2/team/app/blobs/sha256:{name}",
                 f"/v2/team/app/manifests/missing?pad={name}"):
        assert _get(daemon, path)[0] in (400, 404)
    assert _get(daemon, "/_fastpull/v1/prefetch", "POST", json.dumps({"refs": [name]}).encode())[0] == 400
    digest = "sha256:" + "ab" * 32
    labels = {SNAPSHOT_REF: digest, CRI_MANIFEST_DIGEST: digest, CRI_LAYER_DIGEST: digest}
    channel, stub = _stub(daemon)
    with channel:
        for image_ref, code in ((f"example.com/{name}:v1", grpc.StatusCode.INVALID_ARGUMENT),  # over 4 KiB
                                (f"example.com/{name[:4000]}:v1", grpc.StatusCode.UNKNOWN)):  # an invalid name
            with pytest.raises(grpc.RpcError) as refused:
                stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="fastpull", key=name,
                                                       labels={**labels, CRI_IMAGE_REF: image_ref}), timeout=30)
            assert refused.value.code() == code
    wait_until(lambda: "invalid image reference" in daemon.log and "pad=" in daemon.log,
               "the daemon logs both failures")
    lines = daemon.log.splitlines()
    assert max(len(line) for line in lines) <= LONGEST_LOG_LINE, max(lines, key=len)
    assert any(f'"{name[:200]}…"' in line for line in lines)


# ---- the listener ---------------------------------------------------------------------------------

def test_the_default_listener_is_on_loopback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastpull", "serve", "--print-config", "docker"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "http://127.0.0.1:5050" in done.stdout, done.stderr
    # The daemon itself, in a network namespace of its own (port 5050 is free there).
    command = ["unshare", "--net", "--", sys.executable, "-m", "fastpull", "serve", "--store", str(tmp_path / "store")]
    if subprocess.run(["unshare", "--net", "--", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a network namespace of its own (unshare --net)")
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert any("serving on http://127.0.0.1:5050 " in line for line in proc.stderr)
            assert _listening(proc.pid) == ["0100007F:13BA"]  # 127.0.0.1:5050, and nothing else
        finally:
            proc.terminate()
            proc.wait(30)


def _listening(pid: int) -> list[str]:
    """The local addresses of the TCP sockets listening in ``pid``'s network namespace (hex, as /proc has them)."""
    found = []
    for table in (Path(f"/proc/{pid}/net/tcp"), Path(f"/proc/{pid}/net/tcp6")):
        if table.exists():
            found += [fields[1] for fields in map(str.split, table.read_text().splitlines()[1:]) if fields[3] == "0A"]
    return found
