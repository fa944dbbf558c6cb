"""A root filesystem assembled by renames from layers unpacked side by side.

Each layer of a rootfs is unpacked into its own directory with its whiteouts kept as the tar has
them, empty files ``.wh.NAME`` and ``.wh..wh..opq`` (:mod:`fastpull.unpack.whiteouts`). Merging
the layers in order into one tree gives the same result as applying them one by one, without
copying file data: each layer's markers first remove what the layers below put there, then its
entries are moved with ``rename`` (all directories are on one filesystem). A directory the
layer used without listing it keeps the metadata it has below.

Owners are as :mod:`fastpull.unpack.attrs` set them; without CAP_CHOWN a directory's
``user.rootlesscontainers`` record moves with its other metadata.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastpull.errors import UnpackError
from fastpull.unpack.attrs import ROOTLESS_XATTR, can_chown
from fastpull.unpack.whiteouts import OPAQUE_MARKER, OVERLAY_XATTRS, hidden_name, is_marker_name


def remove_tree(path: str | os.PathLike[str], *, ignore_errors: bool = False) -> None:
    """Remove ``path`` (a directory tree or anything else), also where an unprivileged unpack
    left directories its owner may not write (an image's 0555 ``/proc``: root ignores modes)."""
    try:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return
        try:
            shutil.rmtree(path)
        except PermissionError:
            _open_up(Path(path))
            shutil.rmtree(path)
    except OSError:
        if not ignore_errors:
            raise


def _open_up(directory: Path) -> None:
    """Make every directory of a tree about to be removed writable and searchable by its owner."""
    os.chmod(directory, 0o700)
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _open_up(Path(entry.path))


def _make_writable(directory: Path) -> int | None:
    """Let this process add and remove entries in ``directory`` (its owner may lack the mode
    bits: root needs none); the mode to put back, if it was changed."""
    if os.access(directory, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
        return None
    mode = stat.S_IMODE(os.lstat(directory).st_mode)
    os.chmod(directory, mode | 0o700)
    return mode


def _copy_dir_metadata(st: os.stat_result, src: Path, dst: Path) -> None:
    """Give ``dst`` the owner, mode, xattrs and mtime of ``src`` (``st`` is src's stat)."""
    if can_chown():
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    names = os.listxattr(src, follow_symlinks=False)
    for name in names:
        if not name.startswith(OVERLAY_XATTRS):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    if ROOTLESS_XATTR not in names and not can_chown():  # src is owned by 0:0: no record
        try:
            os.removexattr(dst, ROOTLESS_XATTR, follow_symlinks=False)
        except OSError:
            pass  # none there (ENODATA), or user xattrs unsupported
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _is_marker(entry: os.DirEntry) -> bool:
    return is_marker_name(entry.name) and entry.is_file(follow_symlinks=False)


def _scrub_markers(tree: Path) -> None:
    """Drop the whiteout markers from a tree that lands whole (nothing below it to hide)."""
    restore = _make_writable(tree)
    with os.scandir(tree) as entries:
        for entry in entries:
            if _is_marker(entry):
                os.unlink(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                _scrub_markers(Path(entry.path))
    if restore is not None:
        os.chmod(tree, restore)


def merge_layer(upper: Path, root: Path, implied: frozenset[str] = frozenset(), prefix: str = "") -> None:
    """Move the layer directory ``upper`` (whiteouts as marker files) onto ``root``; ``upper``
    is consumed.

    ``implied`` names (relative paths) the directories the layer did not list: an existing
    directory keeps its metadata for those.
    """
    _make_writable(upper)  # consumed: its mode no longer matters
    restore = _make_writable(root)
    with os.scandir(upper) as it:
        entries = list(it)
    # Whiteouts hide what the layers below put here, never what this layer brings.
    for marker in filter(_is_marker, entries):
        if marker.name == OPAQUE_MARKER:
            with os.scandir(root) as below:
                for entry in below:
                    remove_tree(entry.path)
        else:
            remove_tree(root / hidden_name(marker.name))
        os.unlink(marker.path)
    for entry in entries:
        if _is_marker(entry):
            continue
        src = Path(entry.path)
        dst = root / entry.name
        rel = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir:
            try:
                dst_is_dir = stat.S_ISDIR(dst.lstat().st_mode)
            except FileNotFoundError:
                dst_is_dir = False
            if dst_is_dir:
                merge_layer(src, dst, implied, rel + "/")
                if rel not in implied:
                    _copy_dir_metadata(st, src, dst)
                continue
        # A new entry or a replacement of another type: it lands whole.
        remove_tree(dst)
        if is_dir:
            mode = _make_writable(src)  # renaming a directory rewrites its ".."
            os.rename(src, dst)
            _scrub_markers(dst)
            if mode is not None:
                os.chmod(dst, mode)
        else:
            os.rename(src, dst)
    if restore is not None:
        os.chmod(root, restore)


def assemble(layers: list[tuple[Path, frozenset[str]]], root: Path) -> None:
    """Merge layer directories (with their implied directories), base first, into the empty
    directory ``root``; raises ``UnpackError`` naming the path that failed."""
    with _naming_the_path(root):
        for layer, implied in layers:
            merge_layer(layer, root, implied)


def inherit_implied(snapshot: Path, implied: frozenset[str], lowers: list[Path]) -> None:
    """Give a snapshot's implied directories the metadata of the nearest lower layer that has
    them (what containerd's applier does over the mounted lower layers), ``lowers`` top first."""
    with _naming_the_path(snapshot):
        for rel in implied:
            for lower in lowers:
                try:
                    st = (lower / rel).lstat()
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    _copy_dir_metadata(st, lower / rel, snapshot / rel)
                break  # a whiteout or a non-directory hides anything further down


@contextmanager
def _naming_the_path(where: Path) -> Iterator[None]:
    """OSError becomes UnpackError naming the path at fault (or ``where``)."""
    try:
        yield
    except OSError as err:
        raise UnpackError(str(err.filename or where), err.strerror or str(err)) from err


def tree_usage(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Bytes on disk (blocks) and inodes of the tree at ``path``, not following symlinks, a
    hardlinked inode counted once (as containerd's ``fs.DiskUsage``); entries vanishing meanwhile
    are skipped."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def count(st: os.stat_result) -> None:
        nonlocal size
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512

    count(os.lstat(path))
    pending = [os.fspath(path)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        count(entry.stat(follow_symlinks=False))
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return size, len(seen)
