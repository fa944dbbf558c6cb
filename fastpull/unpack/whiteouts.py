"""Whiteouts, a layer's deletions, in the two forms fastpull writes them.

In a layer tar, an entry ``dir/.wh.NAME`` removes ``dir/NAME`` of the layers below and
``dir/.wh..wh..opq`` makes ``dir`` opaque: everything the layers below put in it is removed
(OCI image spec). Other ``.wh..wh.`` names are AUFS metadata, ignored. A layer unpacked for a
rootfs keeps these names as empty files (no device node, no xattr: an unprivileged user can
write them), and :mod:`fastpull.unpack.rootfs` applies them when it merges the layers.

A snapshot (an overlayfs lower directory) has them in overlay form, as containerd's overlayfs
snapshotter lays them out: a 0/0 character device (which Linux >= 5.8 lets anyone create) for
a removed name, and ``trusted.overlay.opaque=y`` on an opaque directory, or
``user.overlay.opaque=y`` where trusted.* xattrs cannot be set (unprivileged), which overlayfs
reads when mounted with ``-o userxattr`` (Linux >= 5.11), as rootless podman and containerd
mount them.
"""

from __future__ import annotations

import os
import stat

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_AUFS_PREFIX = ".wh..wh."
OPAQUE_XATTR = "trusted.overlay.opaque"
USER_OPAQUE_XATTR = "user.overlay.opaque"
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
"""Prefixes of the xattrs overlayfs reads: only fastpull sets them, never an archive."""


def is_marker_name(name: str) -> bool:
    """Whether the base name ``name`` is a whiteout's (the opaque marker and AUFS metadata included)."""
    return name.startswith(WHITEOUT_PREFIX)


def is_aufs_metadata(name: str) -> bool:
    """Whether the base name ``name`` is AUFS metadata (``.wh..wh.*`` but the opaque marker)."""
    return name.startswith(_AUFS_PREFIX) and name != OPAQUE_MARKER


def hidden_name(marker: str) -> str:
    """The name that the whiteout ``marker`` (``.wh.NAME``) removes."""
    return marker[len(WHITEOUT_PREFIX) :]


def is_whiteout(st: os.stat_result) -> bool:
    """An overlay whiteout: a 0/0 character device."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


_opaque_key: str | None = None
"""The opaque xattr this process sets, decided by the first attempt."""


def set_opaque(target: int | str, *, follow_symlinks: bool = True) -> None:
    """Mark a snapshot directory opaque: ``trusted.overlay.opaque=y``, or, if this process may
    not set trusted.* xattrs (the first attempt decides), ``user.overlay.opaque=y``."""
    global _opaque_key
    if _opaque_key is None:
        try:
            os.setxattr(target, OPAQUE_XATTR, b"y", follow_symlinks=follow_symlinks)
        except PermissionError:
            _opaque_key = USER_OPAQUE_XATTR
        else:
            _opaque_key = OPAQUE_XATTR
            return
    os.setxattr(target, _opaque_key, b"y", follow_symlinks=follow_symlinks)
