"""What containerd tells a remote snapshotter about a layer, and the one thing it asks of the
layer source: make this ChainID's unpacked layer exist in the cache.

The snapshotter knows nothing of how bytes arrive (as stargz keeps ``fs/`` apart from
``snapshot/``): the daemon hands it a :class:`LayerSource` that fetches and unpacks whole images.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from fastpull.digests import check_digest

SNAPSHOT_REF = "containerd.io/snapshot.ref"
"""The ChainID containerd's unpacker asks for; a committed snapshot carrying it lets it skip the layer."""
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
"""This layer's digest and those above it, comma-separated (cut by containerd to fit its label limit)."""


@dataclass(frozen=True)
class LayerRequest:
    """One layer of one image, as a ``Prepare``'s labels name it."""

    chain_id: str
    image_ref: str
    manifest_digest: str
    layer_digest: str

    def __str__(self) -> str:
        return f"layer {self.layer_digest} (ChainID {self.chain_id}) of {self.image_ref}"


def chain_id_of(labels: dict[str, str]) -> str | None:
    """The ChainID a ``Prepare`` asks for, if its ``snapshot.ref`` label is a digest."""
    target = labels.get(SNAPSHOT_REF)
    return target if target is not None and check_digest(target) is None else None


def layer_request(labels: dict[str, str]) -> LayerRequest | None:
    """The layer and its image, if the labels name them well enough to fetch it: a ChainID, an image
    reference and the manifest's digest (the manifest gives the layers, the config their diffIDs)."""
    chain_id = chain_id_of(labels)
    image_ref = labels.get(CRI_IMAGE_REF, "")
    manifest = labels.get(CRI_MANIFEST_DIGEST, "")
    layer = labels.get(CRI_LAYER_DIGEST, "")
    if chain_id is None or not image_ref or check_digest(manifest) is not None or check_digest(layer) is not None:
        return None
    return LayerRequest(chain_id, image_ref, manifest, layer)


class LayerSource(Protocol):
    """Brings layers into the ChainID cache."""

    def ensure(self, request: LayerRequest) -> Future[None]:
        """Start getting ``request``'s image unpacked into the cache, if that is not under way, and
        return a future that is done once this layer's ChainID is in the cache (or raises the
        FastpullError that stopped it). Calls for every layer of one image share one pull."""
        ...
