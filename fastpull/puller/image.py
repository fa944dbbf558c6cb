"""Whether an image a pull resolved runs here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastpull.errors import ManifestError, PlatformNotFound
from fastpull.oci.manifest import Platform
from fastpull.registry.client import Resolved

log = logging.getLogger("fastpull.puller")  # one logger for the pull and its parts


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
