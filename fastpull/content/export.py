"""An image of a layout written out as an OCI archive: a tar of an OCI image layout holding that
one image, which ``skopeo copy oci-archive:``, ``podman load``, ``ctr images import`` and (through its
``manifest.json``) ``docker load`` accept.

The archive's ``index.json`` names the image with ``org.opencontainers.image.ref.name`` (the full
reference, as the layout does; podman and skopeo use it) and ``io.containerd.image.name``
(containerd's name for it); ``manifest.json`` is Docker's list of config and layers per image. The
image is leased while it is written, so a ``fastpull rm`` and ``fastpull gc`` meanwhile cannot take
its blobs; the archive appears (renamed) only once complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from fastpull.content.layout import REF_NAME, ImageLayout, ImageNotFound
from fastpull.content.leases import Lease
from fastpull.errors import InvalidReference, StoreError
from fastpull.oci.manifest import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, Descriptor
from fastpull.oci.reference import parse_reference

CONTAINERD_NAME = "io.containerd.image.name"
_COPY_BUFFER = 1 << 20


def export_archive(layout: ImageLayout, name: str, out: str | os.PathLike[str]) -> int:
    """Write the image ``name`` of ``layout`` to the OCI archive ``out``; the bytes written.
    ImageNotFound if the layout has no such image; StoreError naming a blob it lacks."""
    out = Path(out)
    with Lease(layout.store) as lease:
        descriptor = layout.resolve(name)
        if descriptor is None:
            raise ImageNotFound(layout.root, name)
        lease.add([descriptor.digest])  # and what it names: gc marks below a leased manifest
        blobs = layout.references(descriptor)
        for desc in blobs:
            if not layout.store.has(desc.digest, desc.size):
                raise StoreError(str(layout.store.blob_path(desc.digest)),
                                 f"blob {desc.digest} ({desc.size} bytes) of {name} is not in the store")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": descriptor.media_type, "digest": descriptor.digest, "size": descriptor.size,
             "annotations": {REF_NAME: name, CONTAINERD_NAME: name}}]}
        members = [("oci-layout", _json({"imageLayoutVersion": "1.0.0"})), ("index.json", _json(index)),
                   ("manifest.json", _json(_docker_manifest(layout, blobs, _docker_tag(name))))]
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_BUFFER) as tar:
                for member, data in members:
                    tar.addfile(_info(member, len(data)), io.BytesIO(data))
                for directory in ("blobs", "blobs/sha256"):
                    info = _info(directory, 0)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                for desc in blobs:
                    with open(layout.store.blob_path(desc.digest), "rb") as blob:
                        tar.addfile(_info(_blob_name(desc), desc.size), blob)
            os.replace(tmp, out)
            return out.stat().st_size
        except OSError as e:
            tmp.unlink(missing_ok=True)
            path = str(out) if e.filename in (None, str(tmp), tmp) else os.fspath(e.filename)
            raise StoreError(path, e.strerror or str(e)) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _docker_manifest(layout: ImageLayout, blobs: list[Descriptor], tag: str | None) -> list[dict]:
    """``docker load``'s ``manifest.json``: config and layers of each image manifest (the top one tagged)."""
    images = []
    for desc in blobs:
        if desc.media_type in MANIFEST_TYPES:
            config, *layers = layout.children(desc.digest, desc.media_type)
            images.append({"Config": _blob_name(config), "RepoTags": [],
                           "Layers": [_blob_name(layer) for layer in layers]})
    if images and tag is not None and blobs[0].media_type not in INDEX_TYPES:
        images[0]["RepoTags"] = [tag]
    return images


def _docker_tag(name: str) -> str | None:
    """The image's name for ``docker load``: ``name:tag`` (Docker cannot tag by digest)."""
    try:
        ref = parse_reference(name)
    except InvalidReference:
        return None  # a layout's own name (e.g. skopeo's "latest"): loaded untagged
    return f"{ref.name}:{ref.tag}" if ref.tag is not None else None


def _blob_name(desc: Descriptor) -> str:
    return "blobs/sha256/" + desc.digest.removeprefix("sha256:")


def _json(doc: object) -> bytes:
    return json.dumps(doc, indent=2).encode() + b"\n"


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info
