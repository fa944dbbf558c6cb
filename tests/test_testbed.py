"""The test bed: a real local registry, images built and pushed without Docker, exact served() counts."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
import zstandard

from fastpull.errors import AuthError
from fastpull.testbed import (
    BuiltImage,
    LayerSpec,
    LocalRegistry,
    LocalRegistryError,
    ServedRequest,
    build_image,
    build_index,
    push_image,
    push_index,
)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
_SPECS = [
    LayerSpec(1_500_000, files=3),
    LayerSpec(1_000_000, "text", "zstd"),
    LayerSpec(300_000, "zeros", "none"),
]


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _uncompressed(media_type: str, blob: bytes) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.decompress(blob)
    if media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    return blob


@pytest.fixture(scope="module")
def testbed_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path_factory.mktemp("registry") / "storage") as reg:
        yield reg


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltImage]:
    root = tmp_path_factory.mktemp("images")
    return {media: build_image(_SPECS, root / media, media=media) for media in ("oci", "docker")}


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_push_image_reads_back(testbed_registry: LocalRegistry, images: dict[str, BuiltImage], media: str) -> None:
    image = images[media]
    digest = push_image(testbed_registry.url, f"testbed/{media}", "v1", image)
    assert digest == image.manifest_digest == _sha256(image.manifest)

    status, headers, manifest = _get(f"{testbed_registry.url}/v2/testbed/{media}/manifests/v1", {"Accept": _ACCEPT})
    assert status == 200 and manifest == image.manifest
    assert headers["Docker-Content-Digest"] == digest
    assert json.loads(manifest)["mediaType"] == image.media_type

    blobs = {}
    for blob in image.blobs:
        status, _, data = _get(f"{testbed_registry.url}/v2/testbed/{media}/blobs/{blob.digest}")
        assert status == 200 and len(data) == blob.size and _sha256(data) == blob.digest
        assert image.blob_path(blob.digest).read_bytes() == data
        blobs[blob.digest] = data
    config = json.loads(blobs[image.config.digest])
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    for layer, spec in zip(image.layers, _SPECS):
        assert layer.media_type.endswith({"gzip": "gzip", "zstd": "zstd", "none": "tar"}[spec.compression])
        tar_bytes = _uncompressed(layer.media_type, blobs[layer.digest])
        assert _sha256(tar_bytes) == layer.diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
        assert len(files) == spec.files and sum(m.size for m in files) == spec.size


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_push_index_reads_back(testbed_registry: LocalRegistry, tmp_path: Path, media: str) -> None:
    platforms = [("linux", "amd64", None), ("linux", "arm64", "v8")]
    built = [
        build_image([LayerSpec(20_000)], tmp_path / p[1], media=media, platform=p, seed=1)  # type: ignore[arg-type]
        for p in platforms
    ]
    index = build_index(list(zip(built, platforms)), media=media)  # type: ignore[arg-type]
    digest = push_index(testbed_registry.url, "testbed/multi", media, index, built)
    assert digest == _sha256(index)

    status, headers, body = _get(f"{testbed_registry.url}/v2/testbed/multi/manifests/{media}", {"Accept": _ACCEPT})
    assert status == 200 and body == index and headers["Docker-Content-Digest"] == digest
    entries = json.loads(body)["manifests"]
    assert [e["platform"] for e in entries] == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
    ]
    for entry, image in zip(entries, built):
        url = f"{testbed_registry.url}/v2/testbed/multi/manifests/{entry['digest']}"
        status, _, manifest = _get(url, {"Accept": _ACCEPT})
        assert status == 200 and manifest == image.manifest and entry["size"] == len(manifest)


def test_served_counts_ranged_gets_exactly(testbed_registry: LocalRegistry, images: dict[str, BuiltImage]) -> None:
    image = images["oci"]
    push_image(testbed_registry.url, "testbed/ranged", "v1", image)
    layer = image.layers[0]
    path = f"/v2/testbed/ranged/blobs/{layer.digest}"
    testbed_registry.clear_served()
    assert testbed_registry.served() == []

    ranges = {"bytes=100-1099": 1000, f"bytes={layer.size - 4096}-": 4096, "bytes=0-0": 1}
    for header, length in ranges.items():
        status, _, body = _get(testbed_registry.url + path, {"Range": header})
        assert status == 206 and len(body) == length
    assert _get(testbed_registry.url + path)[0] == 200
    assert _get(testbed_registry.url + path, method="HEAD")[0] == 200

    # The log lists requests in the order the registry finished them, which need not be the order sent.
    assert Counter(testbed_registry.served()) == Counter(
        [
            *(ServedRequest("GET", path, 206, length, "HTTP/1.1") for length in ranges.values()),
            ServedRequest("GET", path, 200, layer.size, "HTTP/1.1"),
            ServedRequest("HEAD", path, 200, 0, "HTTP/1.1"),
        ]
    )
    testbed_registry.clear_served()
    assert testbed_registry.served() == []


def test_registry_restarts_on_same_port_and_storage(tmp_path: Path, images: dict[str, BuiltImage]) -> None:
    with LocalRegistry(tmp_path / "storage") as reg:
        assert reg.served() == []  # readiness probes are not listed
        url, pid = reg.url, reg.pid
        push_image(reg.url, "testbed/restart", "v1", images["docker"])
        pushed = len(reg.served())
        reg.stop()
        assert not reg.running and reg.pid is None
        reg.start()
        assert reg.url == url and reg.pid != pid
        status, _, _ = _get(f"{reg.url}/v2/testbed/restart/manifests/v1", {"Accept": _ACCEPT})
        assert status == 200
        assert len(reg.served()) == pushed + 1


def test_registry_start_failure_quotes_log(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "storage", extra_config={"storage": {"inmemory": {}}})
    with pytest.raises(LocalRegistryError, match="exactly one storage type"):
        reg.start()
    assert not reg.running


def test_htpasswd_registry_requires_credentials(tmp_path: Path, images: dict[str, BuiltImage]) -> None:
    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    with LocalRegistry(tmp_path / "storage", htpasswd={"alice": "s3cret"}) as reg:
        status, headers, _ = _get(f"{reg.url}/v2/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
        assert _get(f"{reg.url}/v2/", basic("alice", "wrong"))[0] == 401
        assert _get(f"{reg.url}/v2/", basic("alice", "s3cret"))[0] == 200

        with pytest.raises(AuthError, match="401"):
            push_image(reg.url, "testbed/private", "v1", images["oci"])
        with pytest.raises(AuthError, match="401"):
            push_image(reg.url, "testbed/private", "v1", images["oci"], username="alice", password="wrong")
        digest = push_image(reg.url, "testbed/private", "v1", images["oci"], username="alice", password="s3cret")
        path = f"/v2/testbed/private/manifests/{digest}"
        assert _get(reg.url + path, {"Accept": _ACCEPT})[0] == 401
        assert _get(reg.url + path, {"Accept": _ACCEPT, **basic("alice", "s3cret")})[0] == 200


def test_build_image_is_deterministic_and_cached(tmp_path: Path) -> None:
    specs = [LayerSpec(200_000, files=2), LayerSpec(50_000, "text", "zstd")]
    first = build_image(specs, tmp_path / "a", seed=7)
    layer_file = first.blob_path(first.layers[0].digest)
    mtime = layer_file.stat().st_mtime_ns

    assert build_image(specs, tmp_path / "a", seed=7) == first
    assert layer_file.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert build_image(specs, tmp_path / "b", seed=7).manifest_digest == first.manifest_digest
    assert build_image(specs, tmp_path / "b", seed=8).manifest_digest != first.manifest_digest
    assert not (tmp_path / "b" / "blobs" / "sha256" / first.layers[0].digest[7:]).exists()  # old build replaced
    # The same spec at another position gets other content.
    twins = build_image([specs[0], specs[0]], tmp_path / "c", seed=7)
    assert twins.layers[0].digest != twins.layers[1].digest


def test_layer_content_kinds_compress_as_described(tmp_path: Path) -> None:
    size = 1 << 20
    kinds = ("random", "text", "zeros")
    image = build_image([LayerSpec(size, kind) for kind in kinds], tmp_path)  # type: ignore[arg-type]
    ratios = dict(zip(kinds, (layer.size / size for layer in image.layers)))
    assert ratios["random"] > 0.99
    assert 0.2 < ratios["text"] < 0.6
    assert ratios["zeros"] < 0.01


def test_layer_entries_callback_adds_special_members(tmp_path: Path) -> None:
    def entries(tar: tarfile.TarFile) -> None:
        link = tarfile.TarInfo("layer-0/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        hard = tarfile.TarInfo("layer-0/hard")
        hard.type, hard.linkname = tarfile.LNKTYPE, "layer-0/file-00000"
        device = tarfile.TarInfo("dev/null")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        whiteout = tarfile.TarInfo("etc/.wh.gone")
        tagged = tarfile.TarInfo("tagged")
        tagged.pax_headers = {"SCHILY.xattr.user.note": "hi"}
        tagged.size = 2
        for member in (link, hard, device, whiteout):
            tar.addfile(member)
        tar.addfile(tagged, io.BytesIO(b"ok"))

    image = build_image([LayerSpec(1000, compression="none", entries=entries)], tmp_path)
    with tarfile.open(image.blob_path(image.layers[0].digest)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["layer-0/link"].issym() and members["layer-0/link"].linkname == "/etc/passwd"
    assert members["layer-0/hard"].islnk()
    assert members["dev/null"].ischr() and (members["dev/null"].devmajor, members["dev/null"].devminor) == (1, 3)
    assert "etc/.wh.gone" in members
    assert members["tagged"].pax_headers["SCHILY.xattr.user.note"] == "hi"


@pytest.mark.parametrize(
    "kwargs",
    [{"size": -1}, {"size": 10, "files": 0}, {"size": 1, "content": "noise"}, {"size": 1, "compression": "lz4"}],
)
def test_layer_spec_rejects_bad_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LayerSpec(**kwargs)  # type: ignore[arg-type]
