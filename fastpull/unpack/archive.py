"""Apply one uncompressed layer tar, read as a forward-only stream, to a fresh directory.

``apply_layer(stream, root, layer=..., whiteouts=...)`` reads ``stream`` to its end and
recreates the tar's entries under ``root``, its whiteouts in one of two forms
(:mod:`fastpull.unpack.whiteouts`):

- ``"overlay"``: a snapshot usable as an overlayfs lower dir, laid out like containerd's
  overlayfs snapshotter: ``dir/.wh.NAME`` becomes a 0/0 character device ``dir/NAME`` and
  ``dir/.wh..wh..opq`` sets the opaque xattr on ``dir``.
- ``"keep"``: one layer of a rootfs that :mod:`fastpull.unpack.rootfs` merges: whiteouts stay
  empty files with the tar's names, applied when the layers are merged.

Safety: nothing is written outside ``root``. Names are cleaned lexically (a leading ``/``
is rooted at ``root``; a ``..`` that climbs out of it is refused); every parent directory
is resolved inside ``root`` (:mod:`fastpull.unpack.dirs`), so symlinks, including absolute ones
planted by earlier entries, resolve as they would inside the container; the final component is
created or changed through its parent's descriptor and never followed. A refused entry raises
``UnsafeArchive``; a malformed or unsupported header ``MalformedArchive`` (naming its byte
offset). The partial tree is left for the caller to discard.

Formats: what Go's archive/tar (containerd's reader) reads, parsed by :mod:`fastpull.unpack.tar`;
sparse files keep their holes.

Memory: file contents go through one reused 1 MiB buffer; what is kept across entries is
per directory (64 cached descriptors, modes and times set at the end).

Linux >= 5.6 with ``/proc`` mounted.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastpull.errors import MalformedArchive, UnpackError, UnsafeArchive
from fastpull.unpack.attrs import Attributes
from fastpull.unpack.dirs import DIR_FD, DirCache
from fastpull.unpack.tar import (
    BLOCKDEV,
    CHAR,
    DIR,
    FIFO,
    GLOBAL,
    LINK,
    NO_DATA,
    REGULAR,
    SYMLINK,
    TRAILING,
    LayerStream,
    TarEntry,
    TarInput,
    entries,
)
from fastpull.unpack.whiteouts import (
    OPAQUE_MARKER,
    hidden_name,
    is_aufs_metadata,
    is_marker_name,
    is_whiteout,
    set_opaque,
)

__all__ = ["DEVICE_NODE", "ApplyStats", "LayerStream", "apply_layer"]

DEVICE_NODE = "device node (needs CAP_MKNOD)"
"""The ``ApplyStats.skipped`` reason of device nodes that could not be created."""


@dataclass
class ApplyStats:
    """What ``apply_layer`` did."""

    entries: int = 0
    """Tar entries applied, whiteouts included."""
    bytes: int = 0
    """File content bytes written (holes of sparse files excluded)."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Entries or attributes left out, counted by reason."""
    implied_dirs: set[str] = field(default_factory=set)
    """Parent directories the layer used without listing them (created 0755): when layers are
    merged, such a directory keeps the lower layer's metadata."""


def apply_layer(
    stream: LayerStream, root: Path, *, layer: str, whiteouts: Literal["overlay", "keep"]
) -> ApplyStats:
    """Apply the layer tar read from ``stream`` to ``root``, a fresh directory.

    ``layer`` names the layer (its digest) in errors; ``whiteouts`` is "overlay" for a
    snapshot, "keep" for a layer of a rootfs (see the module's docstring).

    Owners are set with CAP_CHOWN, else recorded in ``user.rootlesscontainers`` (see
    :mod:`fastpull.unpack.attrs`); device nodes and xattrs this process may not create are
    skipped and counted in ``ApplyStats.skipped`` (``DEVICE_NODE`` for the nodes). Raises
    ``UnsafeArchive`` for a refused entry, ``MalformedArchive`` for a malformed one and
    ``UnpackError`` when the target filesystem fails.
    """
    if whiteouts not in ("overlay", "keep"):
        raise ValueError(f"whiteouts must be 'overlay' or 'keep', not {whiteouts!r}")
    source = TarInput(stream)
    applier = _Applier(source, Path(root), layer, overlay=whiteouts == "overlay")
    try:
        for entry in entries(source, layer):
            applier.apply(entry)
        applier.finish()
    except EOFError:
        raise MalformedArchive(layer, source.entry_at, "the archive ends inside this entry") from None
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno in _ARCHIVE_ERRNOS:
            raise UnsafeArchive(layer, applier.entry, why) from err
        raise UnpackError(os.path.join(root, applier.entry.lstrip("/")), why) from err
    finally:
        applier.close()
    return applier.stats


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MARKER = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP))
_ARCHIVE_ERRNOS = frozenset(
    (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL)
)
"""Errors the archive's content causes (a parent that is a file, a whiteout marker whose name a directory
holds, a symlink loop...)."""
_NODE_KINDS = {CHAR: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}


class _Applier:
    """Applies entries under one root: names are cleaned here, directories resolved by a
    :class:`DirCache`, attributes set by :class:`Attributes`."""

    def __init__(self, source: TarInput, root: Path, layer: str, *, overlay: bool):
        self.layer = layer
        self.stats = ApplyStats()
        self.entry = ""
        """Name of the entry being applied, for errors."""
        self._in = source
        self._overlay = overlay
        self._modes: dict[str, tuple[int, int, int]] = {}
        """Directory modes and times, set once the layer is in (children change mtimes)."""
        try:
            self._dirs = DirCache(root)
            try:
                self._attrs = Attributes(self._dirs.root, self.stats.skipped, self._malformed)
            except BaseException:
                self._dirs.close()
                raise
        except OSError as err:
            why = err.strerror or str(err)
            if err.errno == errno.ENOSYS:
                why = "openat2 is unavailable (Linux >= 5.6 needed; a seccomp filter may block it)"
            raise UnpackError(str(root), why) from err
        self.stats.implied_dirs = self._dirs.implied

    def close(self) -> None:
        self._dirs.close()

    def apply(self, e: TarEntry) -> None:
        self._dirs.checkpoint()
        self.entry = e.name
        t = e.type
        if t == GLOBAL:
            return self._skip("PAX global header (ignored, as containerd does)")
        if t == TRAILING:
            return self._skip("extension header that the end of the archive follows (ignored, as containerd does)")
        if t != REGULAR and t not in NO_DATA:
            return self._skip(f"unsupported entry type {t.decode('latin-1')!r}")
        name = self._clean(e.name)
        if not name:
            return self._skip("entry names the root directory")
        parent, _, base = name.rpartition("/")
        if is_marker_name(base):
            return self._whiteout(parent, base, e)
        pfd = self._dirs.get(parent)
        if t == REGULAR:
            self._file(pfd, base, e)
        elif t == DIR:
            self._mkdir(pfd, base, name, e)
        elif t == SYMLINK:
            self._symlink(pfd, base, e)
        elif t == LINK:
            self._hardlink(pfd, base, name, e)
        elif not self._node(pfd, base, e):
            return
        self.stats.entries += 1

    def finish(self) -> None:
        """Set directory modes and times, deepest last-listed first."""
        for name, (mode, atime_ns, mtime_ns) in reversed(self._modes.items()):
            self._dirs.checkpoint()
            self.entry = name
            parent, _, base = name.rpartition("/")
            try:
                fd = os.open(base, DIR_FD, dir_fd=self._dirs.get(parent, create=False))
            except OSError as err:
                if err.errno in _GONE:  # removed or replaced later in the layer
                    continue
                raise
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(atime_ns, mtime_ns))
            finally:
                os.close(fd)

    # -- entries --

    def _file(self, pfd: int, base: str, e: TarEntry) -> None:
        mode = self._attrs.creation_mode(e.mode)
        create = 0o600 if mode is None else mode
        try:
            fd = os.open(base, _CREATE, create, dir_fd=pfd)
        except FileExistsError:
            self._dirs.clear(pfd, base)
            fd = os.open(base, _CREATE, create, dir_fd=pfd)
        try:
            if e.sparse is None:
                if e.size:
                    self._in.copy_to(fd, e.size, 0)
                    self.stats.bytes += e.size
            else:
                for offset, length in e.sparse:
                    self._in.copy_to(fd, length, offset)
                    self.stats.bytes += length
                os.ftruncate(fd, e.size)
            self._attrs.file(fd, e, chmod=mode is None)
        finally:
            os.close(fd)

    def _mkdir(self, pfd: int, base: str, name: str, e: TarEntry) -> None:
        """Create a directory, or merge into the one this layer has there."""
        opaque = False
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):  # a directory replacing a whiteout still hides the lower one
                opaque = self._overlay and is_whiteout(st)
                self._dirs.clear(pfd, base, st)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, DIR_FD, dir_fd=pfd)
        self._dirs.put(name, fd)
        self._attrs.directory(fd, e)
        if opaque:
            set_opaque(fd)
        self._modes[name] = (e.mode, e.atime_ns, e.mtime_ns)
        self.stats.implied_dirs.discard(name)

    def _symlink(self, pfd: int, base: str, e: TarEntry) -> None:
        if "\0" in e.linkname or not e.linkname:
            raise self._malformed("empty symlink target or NUL byte in it")
        try:
            os.symlink(e.linkname, base, dir_fd=pfd)
        except FileExistsError:
            self._dirs.clear(pfd, base)
            os.symlink(e.linkname, base, dir_fd=pfd)
        self._attrs.node(pfd, base, e, chmod=False)

    def _hardlink(self, pfd: int, base: str, name: str, e: TarEntry) -> None:
        """Link to an entry earlier in this layer (a layer is applied to a fresh directory:
        a link to a lower layer's file finds no target).

        The target's parent resolves inside the root; a symlink target is linked itself,
        not followed. The link keeps the target's owner, mode and times (as GNU tar does).
        """
        target = self._clean(e.linkname)
        if not target:
            raise UnsafeArchive(self.layer, self.entry, "hardlink to the root directory")
        if target == name:
            return
        tparent, _, tbase = target.rpartition("/")
        tfd = self._dirs.get(tparent)
        try:
            try:
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                src = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
                dst = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                if (src.st_dev, src.st_ino) == (dst.st_dev, dst.st_ino):
                    return
                self._dirs.clear(pfd, base, dst)
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            why = f"hardlink target {e.linkname!r} does not exist"
            raise self._malformed(why) from None
        except PermissionError as err:  # EPERM: the target is a directory
            why = f"cannot hardlink to {e.linkname!r}: {err.strerror}"
            raise UnsafeArchive(self.layer, self.entry, why) from None

    def _node(self, pfd: int, base: str, e: TarEntry) -> bool:
        """Create a device node or fifo; False if not permitted here (skipped)."""
        kind = _NODE_KINDS[e.type]
        dev = 0 if kind == stat.S_IFIFO else os.makedev(e.devmajor, e.devminor)
        try:
            try:
                os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
            except FileExistsError:
                self._dirs.clear(pfd, base)
                os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        except PermissionError:
            self._skip(DEVICE_NODE)
            return False
        self._attrs.node(pfd, base, e, chmod=True)
        return True

    # -- whiteouts --

    def _whiteout(self, parent: str, base: str, e: TarEntry) -> None:
        """Keep the marker as an empty file ("keep"), or write it in overlay form."""
        if is_aufs_metadata(base):
            return self._skip("AUFS metadata")
        hidden = hidden_name(base)
        if hidden in ("", ".", ".."):
            raise self._malformed("whiteout names no file in its directory")
        pfd = self._dirs.get(parent)
        if not self._overlay:
            os.close(os.open(base, _MARKER, 0o600, dir_fd=pfd))
        elif base == OPAQUE_MARKER:
            set_opaque(f"/proc/self/fd/{pfd}")
        else:
            self._whiteout_node(pfd, hidden, e)
        self.stats.entries += 1

    def _whiteout_node(self, pfd: int, hidden: str, e: TarEntry) -> None:
        """A 0/0 character device; if this layer already has that name, keep it (a
        directory becomes opaque so that the lower one stays hidden)."""
        try:
            os.mknod(hidden, stat.S_IFCHR, 0, dir_fd=pfd)
        except FileExistsError:
            if stat.S_ISDIR(os.stat(hidden, dir_fd=pfd, follow_symlinks=False).st_mode):
                set_opaque(f"/proc/self/fd/{pfd}/{hidden}", follow_symlinks=False)
            return
        self._attrs.own(f"/proc/self/fd/{pfd}/{hidden}", e.uid, e.gid, follow=False)

    # -- names and errors --

    def _clean(self, raw: str) -> str:
        """The entry name relative to the root ("" for the root itself)."""
        if "\0" in raw:
            raise self._malformed("NUL byte in a name")
        if raw.startswith("/"):  # rooted at the root; ".." stops there
            return posixpath.normpath("/" + raw.lstrip("/")).lstrip("/")
        if raw.startswith(".") or raw.endswith("/") or "//" in raw or "/." in raw:
            raw = posixpath.normpath(raw)
            if raw == ".." or raw.startswith("../"):
                raise UnsafeArchive(self.layer, self.entry, "'..' climbs out of the root")
            if raw == ".":
                return ""
        return raw

    def _skip(self, reason: str) -> None:
        self.stats.skipped[reason] += 1

    def _malformed(self, why: str) -> MalformedArchive:
        return MalformedArchive(self.layer, self._in.entry_at, why, self.entry)
