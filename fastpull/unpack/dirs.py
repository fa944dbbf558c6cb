"""Directories under one root, resolved as they would be inside a container, by descriptor.

Every directory is opened with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, so that
symlinks on the way, absolute ones included, resolve inside the root; missing ones are created
one component at a time, through their parent's descriptor, following symlinks (dangling ones
too) inside the root as containerd does.

Linux >= 5.6. ``openat2`` is called through ctypes: it runs once per directory (descriptors
are cached), so the ~1 us call overhead is noise beside the file creations it serves, and the
module needs no compiled part.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from pathlib import Path

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


DIR_FD = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""``os.open`` flags of a directory to list or change, never a symlink to one."""
NODE_FD = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
"""``os.open`` flags of a node to change through /proc, never followed."""
_CACHED_DIRS = 64
_MAX_HOPS = 40


class DirCache:
    """Descriptors of the directories under ``root``, by entry name (LRU, 64 of them).

    A removal that could change what a cached name resolves to (a directory or symlink
    removed) drops the whole cache at the next :meth:`checkpoint`; descriptors are closed
    only there, between entries, so that those in use stay valid.
    """

    def __init__(self, root: Path):
        self.implied: set[str] = set()
        """Directories created because a name went through them (canonical paths)."""
        self.root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache: dict[str, int] = {}
        self._stale = False
        try:
            os.close(_openat2(self.root, ".", _PARENT))  # ENOSYS before Linux 5.6
        except BaseException:
            os.close(self.root)
            raise

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        os.close(self.root)

    def get(self, rel: str, create: bool = True) -> int:
        """A descriptor of directory ``rel``, resolved inside the root; missing directories
        are created (0755, recorded in :attr:`implied`) when ``create``."""
        if not rel:
            return self.root
        fd = self._cache.pop(rel, None)
        if fd is None:
            try:
                fd = _openat2(self.root, rel, _PARENT)
            except FileNotFoundError:
                if not create:
                    raise
                fd = self._make_dirs(rel)
        self._cache[rel] = fd
        return fd

    def put(self, rel: str, fd: int) -> None:
        """Cache ``fd``, a directory just made at ``rel``, in place of what ``rel`` named."""
        old = self._cache.pop(rel, None)
        if old is not None:
            os.close(old)
        self._cache[rel] = fd

    def clear(self, pfd: int, base: str, st: os.stat_result | None = None) -> None:
        """Remove what is at ``base`` in ``pfd`` (``st``: its lstat) so that an entry can replace it."""
        if st is None:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            _rmtree(pfd, base)
            self._stale = True
        else:
            os.unlink(base, dir_fd=pfd)
            self._stale |= stat.S_ISLNK(st.st_mode)

    def checkpoint(self) -> None:
        """Between entries: drop the cache if stale, else trim it to size."""
        cache = self._cache
        if self._stale:
            for fd in cache.values():
                os.close(fd)
            cache.clear()
            self._stale = False
        while len(cache) > _CACHED_DIRS:
            os.close(cache.pop(next(iter(cache))))

    def _make_dirs(self, rel: str) -> int:
        """Walk ``rel`` from the root one component at a time, creating what is missing
        and following symlinks (dangling ones too) inside the root, as containerd does."""
        todo = rel.split("/")[::-1]
        names: list[str] = []
        cur = os.dup(self.root)
        hops = 0
        try:
            while todo:
                comp = todo.pop()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if names:
                        names.pop()
                        fd = _openat2(self.root, "/".join(names) or ".", _REAL_PATH)
                        os.close(cur)
                        cur = fd
                    continue
                try:
                    fd = os.open(comp, NODE_FD, dir_fd=cur)
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
                            fd = os.dup(self.root)
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
        fd = os.open(base, DIR_FD, dir_fd=pfd)
        try:
            os.fchmod(fd, 0o755)
        except BaseException:
            os.close(fd)
            raise
        self.implied.add(canon)
        return fd


def _rmtree(dfd: int, name: str) -> None:
    """Remove ``name`` under ``dfd`` and all below it, never following a symlink, with
    constant descriptors and stack depth."""
    try:
        os.unlink(name, dir_fd=dfd)
        return
    except IsADirectoryError:
        pass
    fd = os.open(name, DIR_FD, dir_fd=dfd)
    stack = [(name, _unlink_files(fd))]  # (directory, its subdirectories left to remove)
    try:
        while True:
            pending = stack[-1][1]
            if pending:
                sub = pending.pop()
                child = os.open(sub, DIR_FD, dir_fd=fd)
                os.close(fd)
                fd = child
                stack.append((sub, _unlink_files(fd)))
                continue
            done = stack.pop()[0]
            if not stack:
                break
            up = os.open("..", DIR_FD, dir_fd=fd)
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
