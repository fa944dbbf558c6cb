"""Pulling an image: resolve the reference, fetch every blob through the engine, unpack the layers as
they land, tag the layout.

- :mod:`.core`: ``Puller`` (registry clients, resolving a reference, the pull's sequence) and ``pull()``;
- :mod:`.source`: ``RepositorySource``, the engine's view of one repository at one endpoint, and the next;
- :mod:`.image`: what a pull takes from the manifest and config: the layers, their diffIDs, the platform;
- :mod:`.follow`: one pull's account and the events that tell it; it waits for the pull's work to settle, or
  a stop (``Stopped``);
- :mod:`.unpacks`: the layers a pull unpacks, handed to workers as their blobs open (the base: none);
- :mod:`.rootfs`: into a rootfs, the layers side by side beside it and merged at the end;
- :mod:`.snapshots`: into ChainID snapshots, claimed in order, each committed as soon as it can be;
- :mod:`.result`: ``PullResult``.
"""

from fastpull.oci.manifest import NON_DISTRIBUTABLE
from fastpull.puller.core import Puller, pull
from fastpull.puller.follow import Stopped
from fastpull.puller.result import PullResult
from fastpull.puller.source import RepositorySource

__all__ = ["NON_DISTRIBUTABLE", "PullResult", "Puller", "RepositorySource", "Stopped", "pull", "remove_tree"]


def __getattr__(name: str):
    if name == "remove_tree":  # for `fastpull gc` (the cli reaches unpack through the puller); a pull never needs it
        from fastpull.unpack.rootfs import remove_tree

        return remove_tree
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
