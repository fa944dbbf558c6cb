"""OCI and Docker schema 2 manifests, indexes, descriptors and platforms.

Pure data: parsing and selection only, nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastpull.digests import check_digest
from fastpull.errors import ManifestError, PlatformNotFound

MAX_MANIFEST_BYTES = 4 * 1048 * 1048
"""Largest manifest or index body read: containerd's ``MaxManifestSize`` as it spells it (a little over
distribution's 4 MiB), so that fastpull, as containerd's mirror or snapshotter, refuses none it takes."""
MAX_CONFIG_BYTES = 4 << 20
"""Largest image config a manifest may name: containers/image's ``MaxConfigBodySize`` (Podman, CRI-O,
skopeo; containerd has none). The store commits a blob only at its descriptor's size, so a config is
never read past it."""
MAX_DESCRIPTORS = 1000
"""Most layers a manifest, or manifests an index, may list. A sanity bound on a document, not a
runtime's (Docker stacks at most 125 layers, overlayfs about 500): twice the most any runtime uses,
far above real indexes, and it bounds the work one pull or mirror request gets from a registry."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
NON_DISTRIBUTABLE = frozenset({OCI_LAYER_NONDIST, OCI_LAYER_NONDIST_GZIP, OCI_LAYER_NONDIST_ZSTD, DOCKER_FOREIGN_LAYER})
"""Layers a registry need not serve (Windows base layers): never fetched, never unpacked."""
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ACCEPT = f"{OCI_INDEX}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {DOCKER_MANIFEST}"
"""``Accept`` header value for a manifest request: every type fastpull can parse."""

LAYER_COMPRESSION: Mapping[str, str | None] = {
    OCI_LAYER: None,
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDIST: None,
    OCI_LAYER_NONDIST_GZIP: "gzip",
    OCI_LAYER_NONDIST_ZSTD: "zstd",
    DOCKER_LAYER: "gzip",
    DOCKER_FOREIGN_LAYER: "gzip",
}
"""Compression (``"gzip"``, ``"zstd"`` or None for plain tar) of each known layer media type."""

_SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED_MANIFEST})
_ATTESTATION = ("vnd.docker.reference.type", "attestation-manifest")


def digest_of(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Platform:
    """An OCI platform; compare platforms through ``normalized()``, as containerd does."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Platform:
        """Parse ``os/arch[/variant]`` (e.g. ``linux/arm64/v8``) into a normalized platform.

        Raises ValueError on any other shape.
        """
        parts = spec.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ValueError(f"invalid platform {spec!r}: expected os/architecture[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None).normalized()

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine, normalized (x86_64 is amd64, aarch64 is arm64/v8, ...)."""
        host = os.uname()
        machine = host.machine.lower()
        arch, variant = _MACHINES.get(machine, (machine, None))
        return cls(host.sysname.lower(), arch, variant).normalized()

    def normalized(self) -> Platform:
        """Canonical names: ``x86_64`` -> ``amd64``, arm64 variant ``v8`` by default, arm ``v7``, ..."""
        arch, variant = self.architecture.lower(), (self.variant or "").lower()
        match arch:
            case "i386":
                arch, variant = "386", ""
            case "x86_64" | "x86-64" | "amd64":
                arch, variant = "amd64", "" if variant == "v1" else variant
            case "aarch64" | "arm64":
                arch = "arm64"
                variant = {"": "v8", "8": "v8", "v8.0": "v8", "9": "v9", "9.0": "v9", "v9.0": "v9"}.get(
                    variant, variant
                )
            case "armhf":
                arch, variant = "arm", "v7"
            case "armel":
                arch, variant = "arm", "v6"
            case "arm":
                variant = {"": "v7", "5": "v5", "6": "v6", "7": "v7", "8": "v8"}.get(variant, variant)
        os = self.os.lower()
        return Platform("darwin" if os == "macos" else os, arch, variant or None, self.os_version, self.os_features)

    def can_run(self, other: Platform) -> bool:
        """Whether a machine of this platform runs images built for ``other`` (same os and
        architecture, and a variant no newer than ours: arm/v7 runs arm/v6, amd64/v3 runs amd64)."""
        me, them = self.normalized(), other.normalized()
        if (me.os, me.architecture) != (them.os, them.architecture):
            return False
        if me.variant == them.variant:
            return True
        mine, theirs = _variant_level(me), _variant_level(them)
        return mine is not None and theirs is not None and theirs <= mine

    @classmethod
    def from_dict(cls, d: object, where: str) -> Platform:
        """Read an OCI ``platform`` object (``os``, ``architecture``, ``variant``, ``os.version``, ``os.features``)."""
        if not isinstance(d, dict):
            raise ManifestError(where, "platform must be an object")
        os, arch = d.get("os"), d.get("architecture")
        variant, version, features = d.get("variant"), d.get("os.version"), d.get("os.features", [])
        if not (isinstance(os, str) and os and isinstance(arch, str) and arch):
            raise ManifestError(where, "platform needs string os and architecture")
        if not (variant is None or isinstance(variant, str)) or not (version is None or isinstance(version, str)):
            raise ManifestError(where, "platform variant and os.version must be strings")
        if not (isinstance(features, list) and all(isinstance(f, str) for f in features)):
            raise ManifestError(where, "platform os.features must be a list of strings")
        return cls(os, arch, variant or None, version, tuple(features))

    def to_dict(self) -> dict[str, Any]:
        """The OCI ``platform`` object."""
        d: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version is not None:
            d["os.version"] = self.os_version
        if self.os_features:
            d["os.features"] = list(self.os_features)
        if self.variant is not None:
            d["variant"] = self.variant
        return d

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_MACHINES: dict[str, tuple[str, str | None]] = {
    # os.uname().machine names that normalized() does not already map
    "i686": ("386", None),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
}


def _variant_level(p: Platform) -> tuple[int, int] | None:
    """Order the variants of architectures whose newer variants run older ones."""
    if p.architecture == "amd64" and p.variant is None:
        return (1, 0)
    if p.architecture not in ("amd64", "arm64", "arm") or p.variant is None:
        return None
    m = re.fullmatch(r"v(\d+)(?:\.(\d+))?", p.variant)
    return (int(m[1]), int(m[2] or 0)) if m else None


@dataclass(frozen=True)
class Descriptor:
    """Points at content by media type, digest and size (OCI descriptor)."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    platform: Platform | None = None

    @classmethod
    def from_dict(cls, d: object, where: str) -> Descriptor:
        """Read and validate an OCI descriptor object; errors name ``where``."""
        if not isinstance(d, dict):
            raise ManifestError(where, "descriptor must be an object")
        media_type, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
        urls = [] if d.get("urls") is None else d["urls"]
        if not isinstance(media_type, str) or not media_type:
            raise ManifestError(where, "descriptor needs a string mediaType")
        if not isinstance(digest, str):
            raise ManifestError(where, "descriptor needs a string digest")
        if why := check_digest(digest):
            raise ManifestError(where, why)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(where, f"descriptor size must be an integer >= 0, got {size!r}")
        if not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
            raise ManifestError(where, "descriptor urls must be a list of strings")
        platform = None if d.get("platform") is None else Platform.from_dict(d["platform"], where)
        return cls(media_type, digest, size, tuple(urls), _annotations(d.get("annotations"), where), platform)

    def to_dict(self) -> dict[str, Any]:
        """The OCI JSON object (empty optional fields left out)."""
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform.to_dict()
        return d


@dataclass(frozen=True)
class ImageManifest:
    """One platform's image: a config blob and layers, base layer first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    def fetched_layers(self) -> list[Descriptor]:
        """The layers a pull fetches and unpacks, base first: all but the non-distributable ones."""
        return [d for d in self.layers if d.media_type not in NON_DISTRIBUTABLE]

    def diff_ids(self, config: bytes) -> list[str]:
        """The diffIDs of :meth:`fetched_layers`, from the config's ``rootfs.diff_ids`` (one per layer
        of the manifest, each checked); ManifestError naming the config if they are not that."""
        where = f"image config {self.config.digest}"
        try:
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(where, f"no rootfs.diff_ids: {e}") from e
        if not isinstance(diff_ids, list) or len(diff_ids) != len(self.layers):
            raise ManifestError(where, f"{len(diff_ids)} diff_ids for {len(self.layers)} layers")
        for d in diff_ids:
            if not isinstance(d, str) or check_digest(d):
                raise ManifestError(where, f"bad diff_id {d!r}")
        return [i for d, i in zip(self.layers, diff_ids) if d.media_type not in NON_DISTRIBUTABLE]


@dataclass(frozen=True)
class ImageIndex:
    """A list of manifests, typically one per platform (OCI index or Docker manifest list)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


def parse_manifest(body: bytes, content_type: str | None, where: str) -> ImageManifest | ImageIndex:
    """Parse a manifest or index body; its type comes from its ``mediaType`` field, else from
    ``content_type``, else from its shape. Raises ManifestError (naming ``where``) on anything
    malformed, on Docker schema 1 and on unknown types."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError(where, f"{len(body)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(where, f"not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ManifestError(where, "not a JSON object")

    declared = doc.get("mediaType")
    header = (content_type or "").split(";")[0].strip().lower()
    if doc.get("schemaVersion") == 1 or declared in _SCHEMA1_TYPES or header in _SCHEMA1_TYPES:
        raise ManifestError(
            where, "Docker schema 1 manifests are not supported; re-push the image with a current client"
        )
    if doc.get("schemaVersion") != 2:
        raise ManifestError(where, f"schemaVersion must be 2, got {doc.get('schemaVersion')!r}")
    if declared is not None and not isinstance(declared, str):
        raise ManifestError(where, "mediaType must be a string")
    known = MANIFEST_TYPES | INDEX_TYPES
    if declared and header in known and declared != header:
        raise ManifestError(where, f"body mediaType {declared} differs from Content-Type {header}")
    media_type = declared or (header if header in known else None)
    if media_type is None:
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "config" in doc else None
    if media_type not in known:
        raise ManifestError(where, f"unsupported media type {media_type or '(none given)'}")

    annotations = _annotations(doc.get("annotations"), where)
    if media_type in INDEX_TYPES:
        return ImageIndex(media_type, _descriptors(doc.get("manifests"), f"{where} manifests"), annotations)
    if "config" not in doc:
        raise ManifestError(where, "manifest has no config")
    config = Descriptor.from_dict(doc["config"], f"{where} config")
    if config.size > MAX_CONFIG_BYTES:
        raise ManifestError(f"{where} config {config.digest}",
                            f"{config.size} bytes is over the {MAX_CONFIG_BYTES}-byte limit of an image config")
    return ImageManifest(media_type, config, _descriptors(doc.get("layers"), f"{where} layers"), annotations)


def select_platform(index: ImageIndex, platform: Platform, where: str = "image index") -> Descriptor:
    """The manifest in ``index`` for ``platform``: an exact match, else the newest variant of the
    same os and architecture that ``platform`` can run. Raises PlatformNotFound listing the
    platforms the index offers."""
    candidates = [
        (d, d.platform.normalized()) for d in index.manifests if d.platform is not None and platform.can_run(d.platform)
    ]
    if not candidates:
        available = [
            str(d.platform)
            for d in index.manifests
            if d.platform is not None and d.annotations.get(_ATTESTATION[0]) != _ATTESTATION[1]
        ]
        raise PlatformNotFound(where, str(platform), list(dict.fromkeys(available)))
    # Candidates share os and architecture; their variants are ordered, or all equal (level None).
    return max(candidates, key=lambda c: _variant_level(c[1]) or (0, 0))[0]


def _descriptors(items: object, where: str) -> tuple[Descriptor, ...]:
    if not isinstance(items, list):
        raise ManifestError(where, "must be a list of descriptors")
    if len(items) > MAX_DESCRIPTORS:
        raise ManifestError(where, f"{len(items)} descriptors is over the limit of {MAX_DESCRIPTORS}")
    return tuple(Descriptor.from_dict(item, f"{where}[{i}]") for i, item in enumerate(items))


def _annotations(d: object, where: str) -> Mapping[str, str]:
    if d is None:
        return {}
    if not (isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in d.items())):
        raise ManifestError(where, "annotations must map strings to strings")
    return d


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI ChainIDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if chain:
            diff_id = "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
        chain.append(diff_id)
    return chain
