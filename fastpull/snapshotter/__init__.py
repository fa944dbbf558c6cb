"""containerd's snapshotter for ``fastpull serve``: an overlay snapshotter (``overlay``) whose
committed layers may be the store's ChainID layer cache itself, its metadata (``metadata``) and
containerd's filter language (``filters``)."""

from fastpull.snapshotter.metadata import Info, Kind, Usage
from fastpull.snapshotter.overlay import Mount, OverlaySnapshotter

__all__ = ["Info", "Kind", "Mount", "OverlaySnapshotter", "Usage"]
