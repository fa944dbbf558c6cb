"""Assemble a root filesystem from layers unpacked side by side, by renames.

Each layer directory is in overlay form (a whiteout is a 0/0 character device, an opaque
directory carries ``trusted.overlay.opaque=y``). Merging the layers in order into one tree
gives the same result as applying them one by one, without copying file data: every entry
is moved with ``rename`` (all directories are on one filesystem).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

OPAQUE_XATTR = "trusted.overlay.opaque"


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _copy_dir_metadata(src: Path, dst: Path) -> None:
    """A later layer's directory entry sets the directory's owner, mode, xattrs and mtime."""
    st = src.lstat()
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        if name != OPAQUE_XATTR:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def scrub_whiteouts(tree: Path) -> None:
    """Drop overlay markers from a tree that lands whole (nothing below it to hide)."""
    if _is_opaque(tree):
        os.removexattr(tree, OPAQUE_XATTR, follow_symlinks=False)
    for entry in os.scandir(tree):
        st = entry.stat(follow_symlinks=False)
        if is_whiteout(st):
            os.unlink(entry.path)
        elif stat.S_ISDIR(st.st_mode):
            scrub_whiteouts(Path(entry.path))


def merge_layer(upper: Path, root: Path, implied: frozenset[str] = frozenset(), prefix: str = "") -> None:
    """Move the overlay-form layer ``upper`` onto ``root``; ``upper`` is consumed.

    ``implied`` names (relative paths) the directories the layer did not list: an existing
    directory keeps its metadata for those.
    """
    for entry in os.scandir(upper):
        src = Path(entry.path)
        dst = root / entry.name
        rel = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        if is_whiteout(st):
            _remove(dst)
            continue
        if stat.S_ISDIR(st.st_mode) and not _is_opaque(src):
            try:
                dst_st = dst.lstat()
            except FileNotFoundError:
                dst_st = None
            if dst_st is not None and stat.S_ISDIR(dst_st.st_mode):
                merge_layer(src, dst, implied, rel + "/")
                if rel not in implied:
                    _copy_dir_metadata(src, dst)
                continue
        # A new entry, a replacement of another type, or an opaque directory: it lands whole.
        _remove(dst)
        os.rename(src, dst)
        if stat.S_ISDIR(st.st_mode):
            scrub_whiteouts(dst)


def assemble(layers: list[tuple[Path, frozenset[str]]], root: Path) -> None:
    """Merge overlay-form layer directories (with their implied directories), base first,
    into the empty directory ``root``."""
    for layer, implied in layers:
        merge_layer(layer, root, implied)


def inherit_implied(snapshot: Path, implied: frozenset[str], lowers: list[Path]) -> None:
    """Give a snapshot's implied directories the metadata of the nearest lower layer that has
    them (what containerd's applier does over the mounted lower layers), ``lowers`` top first."""
    for rel in implied:
        for lower in lowers:
            try:
                st = (lower / rel).lstat()
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISDIR(st.st_mode):
                _copy_dir_metadata(lower / rel, snapshot / rel)
            break  # a whiteout or a non-directory hides anything further down
