"""What a pull takes from an image's manifest and config: the layers it fetches, their diffIDs, and
whether the image runs here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastpull.digests import check_digest
from fastpull.errors import ManifestError, PlatformNotFound
from fastpull.oci.manifest import (
    DOCKER_FOREIGN_LAYER,
    OCI_LAYER_NONDIST,
    OCI_LAYER_NONDIST_GZIP,
    OCI_LAYER_NONDIST_ZSTD,
    Descriptor,
    ImageManifest,
    Platform,
)
from fastpull.registry.client import Resolved

log = logging.getLogger("fastpull.puller")  # one logger for the pull and its parts

NON_DISTRIBUTABLE = frozenset({OCI_LAYER_NONDIST, OCI_LAYER_NONDIST_GZIP, OCI_LAYER_NONDIST_ZSTD, DOCKER_FOREIGN_LAYER})


def fetched_layers(manifest: ImageManifest) -> list[Descriptor]:
    """The layers a pull fetches and unpacks, base first: all but the non-distributable ones."""
    return [d for d in manifest.layers if d.media_type not in NON_DISTRIBUTABLE]


def layer_diff_ids(config_path: Path, manifest: ImageManifest) -> list[str]:
    """The config's ``rootfs.diff_ids`` (one per layer of the manifest, each checked) of the
    :func:`fetched_layers`."""
    where = f"image config {manifest.config.digest}"
    try:
        diff_ids = json.loads(config_path.read_bytes())["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(where, f"no rootfs.diff_ids: {e}") from e
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
        raise ManifestError(where, f"{len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
    for d in diff_ids:
        if not isinstance(d, str) or check_digest(d):
            raise ManifestError(where, f"bad diff_id {d!r}")
    return [i for d, i in zip(manifest.layers, diff_ids) if d.media_type not in NON_DISTRIBUTABLE]


def check_platform(config_path: Path, resolved: Resolved, wanted: Platform, given: bool) -> None:
    """Refuse (``given``) or warn about a single-platform image (no index: its platform is in its
    config) that ``wanted`` cannot run, as containerd does."""
    if len(resolved.documents) > 1:
        return  # an index chose the manifest by platform
    try:
        config = json.loads(config_path.read_bytes())
        actual = Platform.from_dict(config, f"image config {resolved.manifest.config.digest}").normalized()
    except (ValueError, ManifestError):
        return  # no usable os and architecture: nothing to compare (the unpack reads what it needs)
    if wanted.can_run(actual):
        return
    if given:
        raise PlatformNotFound(f"{resolved.reference} (a single-platform image)", str(wanted), [str(actual)])
    log.warning("%s is an image for %s, not for this host (%s)", resolved.reference, actual, wanted)
