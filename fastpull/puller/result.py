"""What a pull returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastpull.oci.manifest import Descriptor, ImageManifest
from fastpull.oci.reference import Reference


@dataclass(frozen=True)
class PullResult:
    """What a pull resolved and stored."""

    reference: Reference
    descriptor: Descriptor
    """The platform manifest, as tagged in the layout's index.json."""
    documents: tuple[tuple[Descriptor, bytes], ...]
    """What the reference points to, as fetched: the index (if any), then the manifest."""
    manifest: ImageManifest
    layout: Path
    total_bytes: int
    """Size of every blob of the image (config, layers, manifest documents)."""
    fetched_bytes: int
    """Bytes of the blobs this pull downloaded (a resumed blob counts whole); not those that were
    already in the layout, that another process committed while this pull waited, or that a
    concurrent pull over the same engine was already fetching."""
    seconds: float
    """From start to finish, resolving the reference included."""
    rootfs: Path | None = None
    snapshots: tuple[Path, ...] = ()
    """Snapshot directories by layer, base first (overlayfs lower dirs)."""
    unpacked_layers: int = 0
    """Layers this pull unpacked (snapshots that already existed, or that another pull built, are not counted)."""
    download_seconds: float = 0.0
    """From the first blob request until every blob was committed."""
    unpack_seconds: float = 0.0
    """From the first layer handed to an unpack worker until the rootfs or snapshots were in place
    (layers unpack as they download, so this overlaps ``download_seconds``)."""

    @property
    def throughput(self) -> float:
        """Bytes per second of the download: the fetched bytes over ``download_seconds``."""
        return self.fetched_bytes / self.download_seconds if self.download_seconds > 0 else 0.0
