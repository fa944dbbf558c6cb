"""bench/bed.py: the throttled namespace caps one connection at per_flow and many at the link, and
leaves nothing behind (namespace, qdiscs, processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs

pytestmark = [
    pytest.mark.skipif(not all(shutil.which(t) for t in ("ip", "tc", "curl", "docker-registry")),
                       reason="needs iproute2 (ip, tc), curl and docker-registry"),
    needs("netns-tc"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bed import BedError, ThrottledBed

from fastpull.testbed.images import LayerSpec, build_image, push_image

PER_FLOW = 100  # Mbit/s
LINK = 400
BLOB = 16_000_000
NAME = f"fpt{os.getpid() % 100000}"


@pytest.fixture(autouse=True, scope="module")
def _netns_allowed():
    """Skip where root may not create network namespaces (e.g. an unprivileged container)."""
    probe = f"{NAME}p"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], check=True)


def _mbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6


def _streams(bed: ThrottledBed, url: str, size: int, n: int) -> tuple[float, list[float]]:
    """``n`` curl downloads of ``url`` at once inside the bed: aggregate Mbit/s and each one's Mbit/s."""
    run = bed.curl_streams(url, n)
    assert all(got == size for got in run.sizes)
    return _mbit(n * size, run.wall), run.mbit


def _out(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_bed_caps_one_flow_and_the_link_then_cleans_up(tmp_path):
    host_lo = _out(["tc", "qdisc", "show", "dev", "lo"])
    image = build_image([LayerSpec(BLOB, compression="none")], tmp_path / "image")
    blob = image.layers[0]  # an uncompressed tar: BLOB bytes and a few headers
    with ThrottledBed(PER_FLOW, LINK, name=NAME) as bed:
        assert "htb 1: root" in bed.qdiscs()
        with bed.registry(tmp_path / "storage") as registry:
            bed.call(push_image, registry.url, "bed/test", "latest", image)
            url = f"{registry.url}/v2/bed/test/blobs/{blob.digest}"
            registry_pid = registry.pid
            one, _ = _streams(bed, url, blob.size, 1)
            many, each = _streams(bed, url, blob.size, 8)
        assert 0.5 * PER_FLOW < one < 1.5 * PER_FLOW, f"one stream got {one:.0f} Mbit/s, cap {PER_FLOW}"
        assert 0.5 * LINK < many < 1.5 * LINK, f"8 streams got {many:.0f} Mbit/s together, link {LINK}"
        assert max(each) < 1.5 * PER_FLOW, f"a stream got {max(each):.0f} Mbit/s, cap {PER_FLOW}"
        assert sum(bed.class_bytes().values()) >= 9 * blob.size  # the blobs went through the shaped leaves

    assert NAME not in _out(["ip", "netns", "list"]).split()
    assert not os.path.exists(f"/run/netns/{NAME}")
    assert registry_pid is not None and not os.path.exists(f"/proc/{registry_pid}")
    assert _out(["tc", "qdisc", "show", "dev", "lo"]) == host_lo


def test_bed_refuses_a_taken_name_and_other_devices():
    with pytest.raises(BedError, match="only its own namespace's lo"):
        ThrottledBed(PER_FLOW, LINK, name=NAME, device="eth0")
    with ThrottledBed(PER_FLOW, LINK, name=NAME) as bed:
        with pytest.raises(BedError, match="exists already"), ThrottledBed(PER_FLOW, LINK, name=NAME):
            pass  # pragma: no cover
        assert "htb" in bed.qdiscs()  # the refused bed did not tear down the one that owns the name
    assert not os.path.exists(f"/run/netns/{NAME}")


def test_bed_hash_buckets_follow_linux_port_steps():
    # Ephemeral ports to one destination advance in steps of 2: bits 1..8 keep 256 of them apart.
    assert ThrottledBed.collisions(list(range(40000, 40512, 2))) == 0
    assert ThrottledBed.bucket(40000) == ThrottledBed.bucket(40512)


def test_bed_serves_tls_and_redirects_blobs_to_the_registry(tmp_path, monkeypatch):
    image = build_image([LayerSpec(1_000_000)], tmp_path / "image")
    blob = image.layers[0]
    with ThrottledBed(PER_FLOW, LINK, name=NAME) as bed:
        with bed.registry(tmp_path / "storage", tls=True) as registry, bed.redirector(registry) as front:
            assert registry.url.startswith("https://") and front.ca_file
            monkeypatch.setenv("SSL_CERT_FILE", registry.ca_file)  # the pusher verifies the registry
            bed.call(push_image, registry.url, "bed/tls", "latest", image)
            got = bed.run(["curl", "-sf", "--cacert", front.ca_file, "-L", "-o", str(tmp_path / "blob"),
                           "-w", "%{num_redirects} %{url_effective} %{http_version}",
                           f"https://{front.host}/v2/bed/tls/blobs/{blob.digest}"],
                          capture_output=True, text=True, check=True).stdout.split()
            assert got[0] == "1" and got[1].startswith(registry.url + "/") and "X-Amz-Signature=" in got[1]
            assert got[2] == "2"  # the registry negotiated HTTP/2, and its access log says so
            assert [r.protocol for r in registry.served() if r.method == "GET"] == ["HTTP/2.0"]
            assert (tmp_path / "blob").read_bytes() == image.blob_path(blob.digest).read_bytes()
            manifest = bed.run(["curl", "-sf", "--cacert", front.ca_file, "-H",
                                f"Accept: {image.media_type}", f"https://{front.host}/v2/bed/tls/manifests/latest"],
                               capture_output=True, check=True).stdout
            assert manifest == image.manifest  # everything but blobs is passed through

