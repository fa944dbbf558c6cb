"""Owners, xattrs, modes and times of unpacked entries, with or without privileges.

Owners: with CAP_CHOWN, files get the tar's owners. Without it they belong to the user who
unpacks (who stands for root in a rootless container), and any other owner is recorded in the
``user.rootlesscontainers`` xattr as umoci writes it (https://github.com/rootless-containers/proto).
Xattrs this process may not set, and overlayfs' own (only fastpull sets those), are skipped
and counted.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections import Counter
from collections.abc import Callable

from fastpull.unpack.dirs import NODE_FD
from fastpull.unpack.tar import TarEntry
from fastpull.unpack.whiteouts import OVERLAY_XATTRS

ROOTLESS_XATTR = "user.rootlesscontainers"
_NOOP_ID = 0xFFFFFFFF
_CAP_CHOWN = 0
_DEFAULT_ACL = "system.posix_acl_default"
"""A directory's default ACL: files created in it take their mode from it, not from the umask."""


@functools.cache
def can_chown() -> bool:
    """Whether this process may give files to other owners (CAP_CHOWN in its effective set)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_CHOWN & 1)
    return os.geteuid() == 0


def rootless_owner(uid: int, gid: int) -> bytes | None:
    """The ``user.rootlesscontainers`` value recording owner ``uid:gid``, as umoci writes it:
    protobuf ``Resource {uint32 uid = 1; uint32 gid = 2}`` where 0 (the unpacking user's own
    id) is written as NoopID (2^32-1); None for 0:0, which needs no record."""
    if not uid and not gid:
        return None
    return b"\x08" + _varint(uid or _NOOP_ID) + b"\x10" + _varint(gid or _NOOP_ID)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class Attributes:
    """Sets the tar's attributes on the entries created under one root.

    Where the root is a plain empty directory (not setgid, no default ACL), a new file gets
    this process's owner and its mode less the umask; files are then created with their mode
    and chowned only when their owner is another. Not for setuid, setgid and sticky bits
    (chown clears them) or bits the umask drops: those files are chmodded after.
    """

    def __init__(self, root: int, skipped: Counter[str], malformed: Callable[[str], Exception]):
        self._skipped = skipped
        self._malformed = malformed
        self._chown = can_chown()
        self._fresh = _plain_empty_dir(root)
        self._ids = (os.geteuid(), os.getegid()) if self._chown else None
        self._not_at_create = 0o7000 | _umask()

    def creation_mode(self, mode: int) -> int | None:
        """The mode to create a file with to give it ``mode``, or None where that is not
        exact or would leave it unwritable by its owner (user.* xattrs need that): the file
        is then created 0600 and :meth:`file` sets its mode."""
        if self._fresh and mode & 0o200 and not mode & self._not_at_create:
            return mode
        return None

    def file(self, fd: int, e: TarEntry, *, chmod: bool) -> None:
        """Owner, xattrs, mode (with ``chmod``) and times of a regular file open as ``fd``."""
        if not self._fresh or (e.uid, e.gid) != self._ids:
            self.own(fd, e.uid, e.gid)
        if e.xattrs:
            self._set_xattrs(fd, e.xattrs)
        if chmod:
            os.fchmod(fd, e.mode)  # after chown, which clears setuid/setgid
        os.utime(fd, ns=(e.atime_ns, e.mtime_ns))

    def directory(self, fd: int, e: TarEntry) -> None:
        """Owner and xattrs of a directory open as ``fd`` (its mode and times are set once
        the layer is in: its children change them)."""
        self.own(fd, e.uid, e.gid)
        if e.xattrs:
            self._set_xattrs(fd, e.xattrs)

    def node(self, pfd: int, base: str, e: TarEntry, *, chmod: bool) -> None:
        """Owner, xattrs, mode (with ``chmod``) and times of a node that must not be opened
        or followed: a symlink, a device node or a fifo."""
        path = f"/proc/self/fd/{pfd}/{base}"
        self.own(path, e.uid, e.gid, follow=False)
        if e.xattrs:
            self._set_xattrs(path, e.xattrs, follow=False)
        if chmod:  # Linux has no lchmod: chmod the O_PATH descriptor through /proc
            fd = os.open(base, NODE_FD, dir_fd=pfd)
            try:
                os.chmod(f"/proc/self/fd/{fd}", e.mode)
            finally:
                os.close(fd)
        os.utime(base, ns=(e.atime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def own(self, target: int | str, uid: int, gid: int, *, follow: bool = True) -> None:
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

    def _set_xattrs(self, target: int | str, xattrs: dict[str, bytes], *, follow: bool = True) -> None:
        for key, value in xattrs.items():
            if "\0" in key:
                raise self._malformed("NUL byte in an xattr name")
            if key.startswith(OVERLAY_XATTRS):
                self._skipped[f"xattr {key.partition('.')[0]}.overlay.* from the archive"] += 1
                continue
            if key == _DEFAULT_ACL:
                self._fresh = False
            try:
                os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                    raise
                self._skipped[f"xattr {key.partition('.')[0]}.*: {err.strerror}"] += 1


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
