"""Apply one uncompressed layer tar, read as a forward-only stream, to a directory.

``apply_layer(stream, root, layer=..., whiteouts=...)`` reads ``stream`` to its end and
recreates the tar's entries under ``root``, in one of two whiteout modes:

- ``"overlay"``: build a snapshot usable as an overlayfs lower dir, laid out like
  containerd's overlayfs snapshotter: ``dir/.wh.NAME`` becomes a 0/0 character device
  ``dir/NAME`` and ``dir/.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on ``dir``
  (``user.overlay.opaque`` when unprivileged: see ``fastpull.unpack.rootfs``).
- ``"keep"``: build one layer of a rootfs that ``fastpull.unpack.rootfs`` merges: whiteouts stay
  empty files with the tar's names, applied when the layers are merged.

Safety: nothing is written outside ``root``. Names are cleaned lexically (a leading ``/``
is rooted at ``root``; a ``..`` that climbs out of it is refused); every parent directory
is resolved with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, so symlinks,
including absolute ones planted by earlier entries, resolve inside ``root`` as
they would inside the container; the final component is created or changed through its
parent's descriptor and never followed. A refused entry raises ``UnsafeArchive``; a
malformed or unsupported header ``MalformedArchive`` (naming its byte offset). The partial tree
is left for the caller to discard.

Formats: what Go's archive/tar (containerd's reader) reads, parsed by :mod:`fastpull.unpack.tar`;
sparse files keep their holes.

Memory: file contents go through one reused 1 MiB buffer; what is kept across entries is
per directory (64 cached descriptors, modes and times set at the end).

Linux >= 5.6 with ``/proc`` mounted. ``openat2`` is called through ctypes: it runs once per
directory (descriptors are cached), so the ~1 us call overhead is noise beside the file
creations it serves, and the module needs no compiled part.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastpull.errors import MalformedArchive, UnpackError, UnsafeArchive
from fastpull.unpack.rootfs import (
    OPAQUE_MARKER,
    OVERLAY_XATTRS,
    ROOTLESS_XATTR,
    can_chown,
    is_whiteout,
    rootless_owner,
    set_opaque,
)
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
    stream: LayerStream,
    root: Path,
    *,
    layer: str,
    whiteouts: Literal["overlay", "keep"],
) -> ApplyStats:
    """Apply the layer tar read from ``stream`` to ``root``, a fresh directory.

    ``layer`` names the layer (its digest) in errors; ``whiteouts`` is "overlay" for a
    snapshot, "keep" for a layer of a rootfs (see the module's docstring).

    Owners are set with CAP_CHOWN, else recorded in ``user.rootlesscontainers`` (see
    ``fastpull.unpack.rootfs``); device nodes and xattrs this process may not create are skipped
    and counted in ``ApplyStats.skipped`` (``DEVICE_NODE`` for the nodes). Raises
    ``UnsafeArchive`` for a refused entry, ``MalformedArchive`` for a malformed one and
    ``UnpackError`` when the target filesystem fails.
    """
    if whiteouts not in ("overlay", "keep"):
        raise ValueError(f"whiteouts must be 'overlay' or 'keep', not {whiteouts!r}")
    source = TarInput(stream)
    applier = _Applier(source, Path(root), layer, whiteouts)
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


# --- openat2 ---------------------------------------------------------------------------

_SYS_OPENAT2 = 437  # one number on every architecture since Linux 5.6
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_IN_ROOT = 0x10

_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)


def _how(flags: int, resolve: int) -> bytes:
    """A ``struct open_how`` (flags, mode, resolve: three u64) that resolves inside the
    directory it starts from, never through /proc magic links."""
    resolve |= _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS
    return struct.pack("=QQQ", flags | os.O_CLOEXEC, 0, resolve)


_PARENT = _how(os.O_PATH | os.O_DIRECTORY, 0)
"""An entry's parent directory: symlinks on the way resolve inside the root."""
_REAL_PATH = _how(os.O_PATH | os.O_DIRECTORY, _RESOLVE_NO_SYMLINKS)
"""A directory by its canonical (symlink-free) path."""


def _openat2(dirfd: int, path: str, how: bytes) -> int:
    """``openat2(dirfd, path, how)``, raising ``OSError`` as ``os.open`` does."""
    raw = os.fsencode(path)
    for _ in range(32):
        fd = _syscall(_SYS_OPENAT2, dirfd, raw, how, len(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a rename raced the lookup
            break
    raise OSError(err, os.strerror(err), path)


# --- the applier -----------------------------------------------------------------------

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FD = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_FD = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_MARKER = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHED_DIRS = 64
_MAX_HOPS = 40
_GONE = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP))
_ARCHIVE_ERRNOS = frozenset(
    (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL)
)
"""Errors the archive's content causes (a parent that is a file, a whiteout marker whose name a directory
holds, a symlink loop...)."""
_NODE_KINDS = {CHAR: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_DEFAULT_ACL = "system.posix_acl_default"
"""A directory's default ACL: files created in it take their mode from it, not from the umask."""


class _Applier:
    """Applies entries under one root, through directory descriptors only.

    Parent directory descriptors are cached by name (LRU); a removal that could change
    what a cached name resolves to (a directory or symlink removed) drops the whole cache
    before the next entry. Descriptors are closed only between entries.
    """

    def __init__(self, source: TarInput, root: Path, layer: str, whiteouts: str):
        self.layer = layer
        self.stats = ApplyStats()
        self.entry = ""
        """Name of the entry being applied, for errors."""
        self._in = source
        self._overlay = whiteouts == "overlay"
        self._keep = whiteouts == "keep"
        self._chown = can_chown()
        self._cache: dict[str, int] = {}
        self._stale = False
        self._dirs: dict[str, tuple[int, int, int]] = {}
        """Directory modes and times, set once the layer is in (children change mtimes)."""
        self._root = _open_dir(root)
        try:
            os.close(_openat2(self._root, ".", _PARENT))
            # Fresh: every directory under the root is this layer's, none setgid (directory modes
            # are set at the end) or with a default ACL, so a new file gets this process's owner and
            # its mode less the umask; files are then created with their mode and chowned only when
            # their owner is another. Not for setuid, setgid and sticky bits (chown clears them) or
            # bits the umask drops: those files are chmodded as before.
            self._fresh = _plain_empty_dir(self._root)
            self._ids = (os.geteuid(), os.getegid()) if self._chown else None
            self._not_at_create = 0o7000 | _umask()
        except OSError as err:
            os.close(self._root)
            why = err.strerror or str(err)
            if err.errno == errno.ENOSYS:
                why = "openat2 is unavailable (Linux >= 5.6 needed; a seccomp filter may block it)"
            raise UnpackError(str(root), why) from err
        except BaseException:
            os.close(self._root)
            raise

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        os.close(self._root)

    # -- entries --

    def apply(self, e: TarEntry) -> None:
        self._checkpoint()
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
        if base.startswith(".wh."):
            return self._whiteout(parent, base, e)
        pfd = self._dir(parent)
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
        for name, (mode, atime_ns, mtime_ns) in reversed(self._dirs.items()):
            self._checkpoint()
            self.entry = name
            parent, _, base = name.rpartition("/")
            try:
                fd = os.open(base, _DIR_FD, dir_fd=self._dir(parent, create=False))
            except OSError as err:
                if err.errno in _GONE:  # removed or replaced later in the layer
                    continue
                raise
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(atime_ns, mtime_ns))
            finally:
                os.close(fd)

    def _file(self, pfd: int, base: str, e: TarEntry) -> None:
        mode = e.mode
        # Created with its final mode if that is exact and leaves it writable by its owner (user.*
        # xattrs need that); else 0600 and fchmod at the end.
        chmod = not (self._fresh and mode & 0o200 and not mode & self._not_at_create)
        create = 0o600 if chmod else mode
        try:
            fd = os.open(base, _CREATE, create, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base)
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
            if not self._fresh or (e.uid, e.gid) != self._ids:
                self._own(fd, e.uid, e.gid)
            if e.xattrs:
                self._set_xattrs(fd, e.xattrs)
            if chmod:
                os.fchmod(fd, mode)  # after chown, which clears setuid/setgid
            os.utime(fd, ns=(e.atime_ns, e.mtime_ns))
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
                self._clear(pfd, base, st)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FD, dir_fd=pfd)
        old = self._cache.pop(name, None)
        if old is not None:
            os.close(old)
        self._cache[name] = fd
        self._own(fd, e.uid, e.gid)
        if e.xattrs:
            self._set_xattrs(fd, e.xattrs)
        if opaque:
            set_opaque(fd)
        self._dirs[name] = (e.mode, e.atime_ns, e.mtime_ns)
        self.stats.implied_dirs.discard(name)

    def _symlink(self, pfd: int, base: str, e: TarEntry) -> None:
        if "\0" in e.linkname or not e.linkname:
            raise self._malformed("empty symlink target or NUL byte in it")
        try:
            os.symlink(e.linkname, base, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base)
            os.symlink(e.linkname, base, dir_fd=pfd)
        self._node_attrs(pfd, base, e, chmod=False)

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
        tfd = self._dir(tparent)
        try:
            try:
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                src = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
                dst = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                if (src.st_dev, src.st_ino) == (dst.st_dev, dst.st_ino):
                    return
                self._clear(pfd, base, dst)
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
                self._clear(pfd, base)
                os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        except PermissionError:
            self._skip(DEVICE_NODE)
            return False
        self._node_attrs(pfd, base, e, chmod=True)
        return True

    def _node_attrs(self, pfd: int, base: str, e: TarEntry, *, chmod: bool) -> None:
        """Owner, xattrs, mode and times of a node that must not be opened or followed."""
        self._own(f"/proc/self/fd/{pfd}/{base}", e.uid, e.gid, follow=False)
        if e.xattrs:
            self._set_xattrs(f"/proc/self/fd/{pfd}/{base}", e.xattrs, follow=False)
        if chmod:  # Linux has no lchmod: chmod the O_PATH descriptor through /proc
            fd = os.open(base, _NODE_FD, dir_fd=pfd)
            try:
                os.chmod(f"/proc/self/fd/{fd}", e.mode)
            finally:
                os.close(fd)
        os.utime(base, ns=(e.atime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _set_xattrs(self, target: int | str, xattrs: dict[str, bytes], *, follow: bool = True) -> None:
        for key, value in xattrs.items():
            if "\0" in key:
                raise self._malformed("NUL byte in an xattr name")
            if key.startswith(OVERLAY_XATTRS):
                self._skip(f"xattr {key.partition('.')[0]}.overlay.* from the archive")
                continue
            if key == _DEFAULT_ACL:
                self._fresh = False
            try:
                os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                    raise
                self._skip(f"xattr {key.partition('.')[0]}.*: {err.strerror}")

    # -- whiteouts --

    def _whiteout(self, parent: str, base: str, e: TarEntry) -> None:
        if base.startswith(".wh..wh.") and base != OPAQUE_MARKER:
            return self._skip("AUFS metadata")
        hidden = base[4:]
        if hidden in ("", ".", ".."):
            raise self._malformed("whiteout names no file in its directory")
        pfd = self._dir(parent)
        if self._keep:
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
        self._own(f"/proc/self/fd/{pfd}/{hidden}", e.uid, e.gid, follow=False)

    # -- names and directories --

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

    def _dir(self, rel: str, create: bool = True) -> int:
        """Descriptor of directory ``rel``, resolved inside the root; missing directories
        are created when ``create``."""
        if not rel:
            return self._root
        fd = self._cache.pop(rel, None)
        if fd is None:
            try:
                fd = _openat2(self._root, rel, _PARENT)
            except FileNotFoundError:
                if not create:
                    raise
                fd = self._make_dirs(rel)
        self._cache[rel] = fd
        return fd

    def _make_dirs(self, rel: str) -> int:
        """Walk ``rel`` from the root one component at a time, creating what is missing
        and following symlinks (dangling ones too) inside the root, as containerd does."""
        todo = rel.split("/")[::-1]
        names: list[str] = []
        cur = os.dup(self._root)
        hops = 0
        try:
            while todo:
                comp = todo.pop()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if names:
                        names.pop()
                        fd = _openat2(self._root, "/".join(names) or ".", _REAL_PATH)
                        os.close(cur)
                        cur = fd
                    continue
                try:
                    fd = os.open(comp, _NODE_FD, dir_fd=cur)
                except FileNotFoundError:
                    fd = self._implied_dir(cur, "/".join([*names, comp]), comp)
                else:
                    mode = os.fstat(fd).st_mode
                    if not stat.S_ISDIR(mode):
                        os.close(fd)
                        if not stat.S_ISLNK(mode):
                            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
                        hops += 1
                        if hops > _MAX_HOPS:
                            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                        target = os.readlink(comp, dir_fd=cur)
                        if target.startswith("/"):
                            names.clear()
                            fd = os.dup(self._root)
                            os.close(cur)
                            cur = fd
                        todo.extend(target.split("/")[::-1])
                        continue
                os.close(cur)
                cur = fd
                names.append(comp)
        except BaseException:
            os.close(cur)
            raise
        return cur

    def _implied_dir(self, pfd: int, canon: str, base: str) -> int:
        """Create a parent directory the archive did not list, 0755 (whatever the umask)."""
        os.mkdir(base, 0o755, dir_fd=pfd)
        fd = os.open(base, _DIR_FD, dir_fd=pfd)
        try:
            os.fchmod(fd, 0o755)
        except BaseException:
            os.close(fd)
            raise
        self.stats.implied_dirs.add(canon)
        return fd

    def _clear(self, pfd: int, base: str, st: os.stat_result | None = None) -> None:
        """Remove what is at ``base`` so that an entry can replace it."""
        if st is None:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            _rmtree(pfd, base)
            self._stale = True
        else:
            os.unlink(base, dir_fd=pfd)
            self._stale |= stat.S_ISLNK(st.st_mode)

    def _checkpoint(self) -> None:
        """Between entries: drop the cache if stale, else trim it to size."""
        cache = self._cache
        if self._stale:
            for fd in cache.values():
                os.close(fd)
            cache.clear()
            self._stale = False
        while len(cache) > _CACHED_DIRS:
            os.close(cache.pop(next(iter(cache))))

    def _skip(self, reason: str) -> None:
        self.stats.skipped[reason] += 1

    def _own(self, target: int | str, uid: int, gid: int, *, follow: bool = True) -> None:
        """Give ``target`` its owner; where that is not permitted, record it in
        ``user.rootlesscontainers`` (possible on files and directories only)."""
        if self._chown:
            try:
                os.chown(target, uid, gid, follow_symlinks=follow)
                return
            except OSError as err:  # EINVAL: an id this user namespace does not map
                if err.errno not in (errno.EPERM, errno.EINVAL):
                    raise
        record = rootless_owner(uid, gid)
        if record is not None:  # skipped, and counted, where user xattrs are refused (symlinks, devices)
            self._set_xattrs(target, {ROOTLESS_XATTR: record}, follow=follow)

    def _malformed(self, why: str) -> MalformedArchive:
        return MalformedArchive(self.layer, self._in.entry_at, why, self.entry)


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise UnpackError(str(path), err.strerror or str(err)) from err


def _plain_empty_dir(fd: int) -> bool:
    """Whether the directory ``fd`` is empty, not setgid and without a default ACL."""
    if os.fstat(fd).st_mode & stat.S_ISGID:
        return False
    try:
        os.getxattr(fd, _DEFAULT_ACL)
        return False
    except OSError as err:
        if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            return False
    with os.scandir(fd) as it:
        return next(it, None) is None


def _umask() -> int:
    """This process's umask (read, not set: ``os.umask`` would change it for every thread)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o777  # unknown: no file is created with its final mode


def _rmtree(dfd: int, name: str) -> None:
    """Remove ``name`` under ``dfd`` and all below it, never following a symlink, with
    constant descriptors and stack depth."""
    try:
        os.unlink(name, dir_fd=dfd)
        return
    except IsADirectoryError:
        pass
    fd = os.open(name, _DIR_FD, dir_fd=dfd)
    stack = [(name, _unlink_files(fd))]  # (directory, its subdirectories left to remove)
    try:
        while True:
            pending = stack[-1][1]
            if pending:
                sub = pending.pop()
                child = os.open(sub, _DIR_FD, dir_fd=fd)
                os.close(fd)
                fd = child
                stack.append((sub, _unlink_files(fd)))
                continue
            done = stack.pop()[0]
            if not stack:
                break
            up = os.open("..", _DIR_FD, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(done, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dfd)


def _unlink_files(fd: int) -> list[str]:
    """Unlink everything but subdirectories in ``fd``; the subdirectories' names."""
    with os.scandir(fd) as it:
        entries = list(it)
    subdirs = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(entry.name)
        else:
            os.unlink(entry.name, dir_fd=fd)
    return subdirs
