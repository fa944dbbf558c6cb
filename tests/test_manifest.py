"""parse_manifest, Descriptor, Platform and select_platform."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from fastpull.errors import ManifestError, PlatformNotFound
from fastpull.oci import manifest as m
from fastpull.oci.manifest import Descriptor, ImageIndex, ImageManifest, Platform, parse_manifest, select_platform


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


def desc(n: int, media_type: str = m.OCI_LAYER_GZIP, size: Any = 10, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": dg(n), "size": size, **extra}


def manifest_doc(media_type: str | None = m.OCI_MANIFEST, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemaVersion": 2, "config": desc(1, m.OCI_CONFIG), "layers": [desc(2), desc(3)]}
    if media_type:
        doc["mediaType"] = media_type
    return doc | extra


def index_doc(*platforms: dict[str, Any] | None, media_type: str = m.OCI_INDEX) -> ImageIndex:
    manifests = [desc(i, m.OCI_MANIFEST, platform=p) if p else desc(i, m.OCI_MANIFEST) for i, p in enumerate(platforms)]
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}
    index = parse_manifest(json.dumps(doc).encode(), None, "test index")
    assert isinstance(index, ImageIndex)
    return index


def plat(spec: str) -> dict[str, Any]:
    os, arch, *variant = spec.split("/")
    return {"os": os, "architecture": arch, **({"variant": variant[0]} if variant else {})}


def parse(doc: dict[str, Any], content_type: str | None = None) -> ImageManifest | ImageIndex:
    return parse_manifest(json.dumps(doc).encode(), content_type, "test")


def test_manifest_parses_oci_manifest() -> None:
    layer = desc(2, urls=["https://example.com/l"], annotations={"a": "b"})
    got = parse(manifest_doc(layers=[layer, desc(3, m.OCI_LAYER_ZSTD)], annotations={"x": "y"}))
    assert got == ImageManifest(
        m.OCI_MANIFEST,
        Descriptor(m.OCI_CONFIG, dg(1), 10),
        (
            Descriptor(m.OCI_LAYER_GZIP, dg(2), 10, ("https://example.com/l",), {"a": "b"}),
            Descriptor(m.OCI_LAYER_ZSTD, dg(3), 10),
        ),
        {"x": "y"},
    )


def test_manifest_parses_docker_manifest_and_list() -> None:
    doc = manifest_doc(m.DOCKER_MANIFEST, config=desc(1, m.DOCKER_CONFIG), layers=[desc(2, m.DOCKER_LAYER)])
    got = parse(doc, m.DOCKER_MANIFEST)
    assert isinstance(got, ImageManifest) and got.media_type == m.DOCKER_MANIFEST
    assert m.LAYER_COMPRESSION[got.layers[0].media_type] == "gzip"
    listing = index_doc(plat("linux/amd64"), media_type=m.DOCKER_MANIFEST_LIST)
    assert listing.media_type == m.DOCKER_MANIFEST_LIST
    assert listing.manifests[0].platform == Platform("linux", "amd64")


@pytest.mark.parametrize(
    ("doc", "content_type", "expected"),
    [
        (manifest_doc(None), m.OCI_MANIFEST, m.OCI_MANIFEST),
        (manifest_doc(None), f"{m.DOCKER_MANIFEST}; charset=utf-8", m.DOCKER_MANIFEST),
        (manifest_doc(None), "application/json", m.OCI_MANIFEST),
        (manifest_doc(None), None, m.OCI_MANIFEST),
        ({"schemaVersion": 2, "manifests": []}, None, m.OCI_INDEX),
        ({"schemaVersion": 2, "manifests": []}, m.DOCKER_MANIFEST_LIST, m.DOCKER_MANIFEST_LIST),
        (manifest_doc(m.OCI_MANIFEST), "text/plain", m.OCI_MANIFEST),
    ],
)
def test_manifest_type_from_body_content_type_or_shape(
    doc: dict[str, Any], content_type: str | None, expected: str
) -> None:
    assert parse(doc, content_type).media_type == expected


@pytest.mark.parametrize(
    ("body", "content_type", "why"),
    [
        (json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}), None, "schema 1"),
        (json.dumps(manifest_doc(None)), m.DOCKER_SCHEMA1_SIGNED_MANIFEST, "schema 1"),
        (json.dumps(manifest_doc(m.DOCKER_SCHEMA1_MANIFEST)), None, "schema 1"),
        (json.dumps(manifest_doc(schemaVersion=3)), None, "schemaVersion must be 2"),
        (json.dumps(manifest_doc(m.OCI_MANIFEST)), m.DOCKER_MANIFEST, "differs from Content-Type"),
        (json.dumps(manifest_doc("application/vnd.oci.artifact.manifest.v1+json")), None, "unsupported media type"),
        (json.dumps({"schemaVersion": 2}), None, r"unsupported media type \(none given\)"),
        (json.dumps(manifest_doc(mediaType=7)), None, "mediaType must be a string"),
        ("{nope", None, "not JSON"),
        (b"\xff\xfe", None, "not JSON"),
        ("[1]", None, "not a JSON object"),
        (json.dumps(manifest_doc(config=None) | {"config": None}), None, "descriptor must be an object"),
        (json.dumps({k: v for k, v in manifest_doc().items() if k != "config"}), None, "has no config"),
        (json.dumps(manifest_doc(layers={})), None, "must be a list"),
        (json.dumps(manifest_doc(layers=[desc(2, size=-1)])), None, "size must be an integer >= 0"),
        (json.dumps(manifest_doc(layers=[desc(2, size=True)])), None, "size must be an integer >= 0"),
        (json.dumps(manifest_doc(layers=[desc(2, size=1.5)])), None, "size must be an integer >= 0"),
        (json.dumps(manifest_doc(layers=[desc(2) | {"digest": "sha256:12"}])), None, "64 lowercase hex"),
        (json.dumps(manifest_doc(layers=[desc(2) | {"digest": "md5:" + "0" * 32}])), None, "unsupported digest"),
        (json.dumps(manifest_doc(layers=[desc(2) | {"mediaType": ""}])), None, "string mediaType"),
        (json.dumps(manifest_doc(layers=[desc(2, urls="http://x")])), None, "urls must be a list"),
        (json.dumps(manifest_doc(layers=[desc(2, annotations={"a": 1})])), None, "annotations must map"),
        (json.dumps(manifest_doc(annotations=[])), None, "annotations must map"),
        (
            json.dumps({"schemaVersion": 2, "manifests": [desc(1, platform={"os": "linux"})]}),
            None,
            "os and architecture",
        ),
    ],
)
def test_manifest_rejects(body: str | bytes, content_type: str | None, why: str) -> None:
    data = body.encode() if isinstance(body, str) else body
    with pytest.raises(ManifestError, match=why) as e:
        parse_manifest(data, content_type, "reg/img:tag")
    assert e.value.where.startswith("reg/img:tag")


def test_manifest_size_limit() -> None:
    doc = manifest_doc(annotations={"pad": "x" * m.MAX_MANIFEST_BYTES})
    with pytest.raises(ManifestError, match="limit"):
        parse(doc)


def test_descriptor_round_trips() -> None:
    d = desc(
        5,
        m.OCI_MANIFEST,
        urls=["https://a/b"],
        annotations={"k": "v"},
        platform={"architecture": "amd64", "os": "windows", "os.version": "10.0.17763", "os.features": ["win32k"]},
    )
    descriptor = Descriptor.from_dict(d, "x")
    assert descriptor.platform == Platform("windows", "amd64", None, "10.0.17763", ("win32k",))
    assert descriptor.to_dict() == d
    assert Descriptor.from_dict(desc(1), "x").to_dict() == desc(1)
    assert hash(descriptor) == hash(Descriptor.from_dict(d, "y"))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/amd64/v1", Platform("linux", "amd64")),
        ("linux/amd64/v3", Platform("linux", "amd64", "v3")),
        ("linux/arm64", Platform("linux", "arm64", "v8")),
        ("linux/aarch64", Platform("linux", "arm64", "v8")),
        ("linux/arm64/8", Platform("linux", "arm64", "v8")),
        ("linux/arm64/v9.0", Platform("linux", "arm64", "v9")),
        ("linux/arm", Platform("linux", "arm", "v7")),
        ("linux/arm/6", Platform("linux", "arm", "v6")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("linux/armel", Platform("linux", "arm", "v6")),
        ("linux/i386", Platform("linux", "386")),
        ("Linux/PPC64LE", Platform("linux", "ppc64le")),
        ("macos/arm64", Platform("darwin", "arm64", "v8")),
    ],
)
def test_platform_parse_normalizes(spec: str, expected: Platform) -> None:
    assert Platform.parse(spec) == expected
    assert Platform.parse(str(expected)) == expected


@pytest.mark.parametrize("spec", ["linux", "linux/", "/amd64", "linux/arm/v7/x", ""])
def test_platform_parse_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="os/architecture"):
        Platform.parse(spec)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64/v8"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
        ("i686", "linux/386"),
        ("s390x", "linux/s390x"),
    ],
)
def test_platform_host(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "host", "6.1", "#1", machine)))
    assert str(Platform.host()) == expected


@pytest.mark.parametrize(
    ("entries", "wanted", "chosen"),
    [
        (["linux/amd64", "linux/arm64/v8"], "linux/arm64", 1),
        (["linux/amd64", "linux/arm64"], "linux/arm64/v8", 1),  # arm64's variant defaults to v8
        (["linux/arm/v6", "linux/arm/v7", "linux/arm64"], "linux/arm/v7", 1),
        (["linux/arm/v5", "linux/arm/v6"], "linux/arm/v7", 1),  # the newest variant v7 can run
        (["linux/arm"], "linux/arm/v7", 0),  # arm's variant defaults to v7
        (["linux/amd64", "linux/amd64/v3"], "linux/amd64/v3", 1),
        (["linux/amd64/v2", "linux/amd64"], "linux/amd64/v3", 0),
        (["linux/ppc64le", "linux/ppc64le"], "linux/ppc64le", 0),  # the first of equals
        (["windows/amd64", "linux/amd64"], "linux/amd64", 1),
    ],
)
def test_select_platform(entries: list[str], wanted: str, chosen: int) -> None:
    index = index_doc(*(plat(e) for e in entries))
    assert select_platform(index, Platform.parse(wanted)) == index.manifests[chosen]


@pytest.mark.parametrize(
    ("entries", "wanted"),
    [
        (["linux/amd64/v3"], "linux/amd64"),  # a newer variant than the machine
        (["linux/arm/v7"], "linux/arm/v6"),
        (["linux/arm/v7"], "linux/arm64"),
        (["linux/amd64"], "windows/amd64"),
    ],
)
def test_select_platform_refuses_what_cannot_run(entries: list[str], wanted: str) -> None:
    with pytest.raises(PlatformNotFound):
        select_platform(index_doc(*(plat(e) for e in entries)), Platform.parse(wanted))


def test_select_platform_missing_lists_available() -> None:
    index = parse(
        {
            "schemaVersion": 2,
            "manifests": [
                desc(1, m.OCI_MANIFEST, platform=plat("linux/amd64")),
                desc(2, m.OCI_MANIFEST, platform=plat("linux/arm/v7")),
                desc(3, m.OCI_MANIFEST),
                desc(
                    4,
                    m.OCI_MANIFEST,
                    platform=plat("unknown/unknown"),
                    annotations={"vnd.docker.reference.type": "attestation-manifest"},
                ),
            ],
        }
    )
    assert isinstance(index, ImageIndex)
    with pytest.raises(PlatformNotFound) as e:
        select_platform(index, Platform.parse("linux/s390x"), "docker.io/library/x:1")
    assert e.value.available == ["linux/amd64", "linux/arm/v7"]
    assert str(e.value) == (
        "no manifest for platform linux/s390x in docker.io/library/x:1; available: linux/amd64, linux/arm/v7"
    )
    assert isinstance(e.value, ManifestError)
