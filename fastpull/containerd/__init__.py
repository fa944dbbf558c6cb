"""A pull handed to containerd through its own API: its overlayfs snapshotter, content and image
stores (:func:`pull_into`, over a :class:`Containerd` client)."""

from fastpull.containerd.client import CRI_NAMESPACE, Containerd
from fastpull.containerd.importer import pull_into

__all__ = ["CRI_NAMESPACE", "Containerd", "pull_into"]
