"""What the store commands (``images``, ``rm``, ``gc``, ``export``) share: which layout, and image names."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

    from fastpull.content.layout import ImageLayout


def add_layout_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", "--store", dest="layout", metavar="DIR",
                   help="OCI image layout (default: the store: $FASTPULL_STORE, else /var/lib/fastpull as root, "
                        "else $XDG_DATA_HOME/fastpull)")


def store_root(args: argparse.Namespace) -> str:
    """The layout the command names, or the default store."""
    from fastpull.content.defaults import default_store

    return args.layout or default_store()


def open_layout(root: str) -> ImageLayout | None:
    """The layout at ``root``; None if nothing is there yet. StoreError if ``root`` is something
    other than an OCI image layout: it is never made one."""
    from fastpull.content.layout import ImageLayout
    from fastpull.errors import StoreError

    if not os.path.lexists(root):
        return None
    if not os.path.isfile(os.path.join(root, "oci-layout")):
        raise StoreError(root, "not an OCI image layout (no oci-layout file)")
    return ImageLayout(root)


def image_name(layout: ImageLayout | None, text: str) -> str:
    """The name under which ``layout`` knows the image ``text`` names: ``text`` itself if an entry
    has that name, else its normalized reference (``alpine`` is ``docker.io/library/alpine:latest``,
    as ``fastpull pull`` tags it). InvalidReference if it is neither."""
    from fastpull.oci.reference import parse_reference

    if layout is not None and layout.resolve(text) is not None:
        return text
    return str(parse_reference(text))
