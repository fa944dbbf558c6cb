"""Unpacked layers keyed by ChainID, each ready to be an overlayfs lower directory.

Layout under ``root``::

    sha256/<chainid hex>/      a committed snapshot (overlay-form whiteouts)
    .tmp/<chainid hex>.<n>/    being built; renamed into sha256/ only when complete and verified
    .locks/<chainid hex>.lock  per-ChainID flock: one unpack at a time, others wait to be woken

A snapshot is visible only once complete: a crashed unpack leaves a ``.tmp`` directory that
the next writer of that ChainID removes. Snapshots built without privileges mark opaque
directories with ``user.overlay.opaque`` (mount them with ``-o userxattr``; see ``fastpull.unpack.whiteouts``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastpull.content.store import acquire_key_lock
from fastpull.digests import digest_hex
from fastpull.errors import UnpackError
from fastpull.oci.manifest import chain_ids
from fastpull.unpack.rootfs import remove_tree, tree_usage

__all__ = ["Snapshotter", "SnapshotWriter", "chain_ids"]


class Snapshotter:
    """Committed snapshots by ChainID under ``root``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.committed = self.root / "sha256"
        self.building = self.root / ".tmp"
        self.locks = self.root / ".locks"
        try:
            for d in (self.committed, self.building, self.locks):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UnpackError(str(self.root), e.strerror or str(e)) from e

    def path(self, chain_id: str) -> Path:
        return self.committed / digest_hex(chain_id)

    def has(self, chain_id: str) -> bool:
        return self.path(chain_id).is_dir()

    def prepare(self, chain_id: str, *, block: bool = True) -> SnapshotWriter | None:
        """Lock ``chain_id`` and return a writer with an empty build directory.

        None if the snapshot exists (perhaps built by the holder we waited for) or, with
        ``block=False``, if another unpack of it is under way.
        """
        hexd = digest_hex(chain_id)
        lock_fd = acquire_key_lock(self.locks / f"{hexd}.lock", block=block, done=lambda: self.has(chain_id))
        if lock_fd is None:
            return None
        try:
            for stale in self.building.glob(f"{hexd}.*"):  # left by a crashed unpack
                remove_tree(stale, ignore_errors=True)
            build = Path(tempfile.mkdtemp(prefix=f"{hexd}.", dir=self.building))
        except BaseException as e:
            os.close(lock_fd)
            if isinstance(e, OSError):
                raise UnpackError(str(self.building), e.strerror or str(e)) from e
            raise
        return SnapshotWriter(self, chain_id, build, lock_fd)

    @contextmanager
    def hold(self, chain_id: str) -> Iterator[None]:
        """Hold ``chain_id``'s lock (waiting for it) while a use of its snapshot is recorded or a
        removal decided: what gc and a snapshotter committing onto the cache agree on."""
        lock = self.locks / f"{digest_hex(chain_id)}.lock"
        lock_fd = acquire_key_lock(lock, block=True, done=lambda: False)
        assert lock_fd is not None  # never done, so it waits for the lock
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            os.close(lock_fd)


    def sweep(self, in_use: Callable[[str], bool]) -> list[tuple[str, int]]:
        """Remove the committed layers that ``in_use(chain_id)`` disowns, and what crashed unpacks
        left in ``.tmp``; each layer is judged while its lock is held (a snapshotter records a use
        under that lock), and one being unpacked is left alone. The (ChainID, bytes) removed."""
        removed = []
        for entry in sorted(self.committed.iterdir()):
            chain_id = "sha256:" + entry.name
            lock_fd = acquire_key_lock(self.locks / f"{entry.name}.lock", block=False, done=lambda: False)
            if lock_fd is None:
                continue  # being recorded or built
            try:
                if entry.is_dir() and not in_use(chain_id):
                    size = tree_usage(entry)[0]
                    # Out of sha256/ first: a half-removed layer must never look whole.
                    doomed = Path(tempfile.mkdtemp(prefix=f"{entry.name}.", dir=self.building))
                    os.rename(entry, doomed / "layer")
                    remove_tree(doomed, ignore_errors=True)
                    removed.append((chain_id, size))
            except OSError as e:
                raise UnpackError(str(entry), e.strerror or str(e)) from e
            finally:
                (self.locks / f"{entry.name}.lock").unlink(missing_ok=True)
                os.close(lock_fd)
        for stale in sorted(self.building.iterdir()):
            hexd = stale.name.partition(".")[0]
            lock_fd = acquire_key_lock(self.locks / f"{hexd}.lock", block=False, done=lambda: False)
            if lock_fd is not None:  # no writer: a crash left it
                remove_tree(stale, ignore_errors=True)
                os.close(lock_fd)
        return removed


class SnapshotWriter:
    """Exclusive builder of one snapshot: fill ``path``, then :meth:`commit` or :meth:`abort`."""

    def __init__(self, snapshotter: Snapshotter, chain_id: str, path: Path, lock_fd: int):
        self.snapshotter = snapshotter
        self.chain_id = chain_id
        self.path = path
        self._lock_fd: int | None = lock_fd

    def commit(self) -> Path:
        """Rename the build directory into place and release the lock."""
        target = self.snapshotter.path(self.chain_id)
        try:
            os.rename(self.path, target)
        except OSError as e:
            self.abort()
            raise UnpackError(str(target), e.strerror or str(e)) from e
        self._release(remove_lock=True)
        return target

    def abort(self) -> None:
        """Throw the build directory away and release the lock."""
        remove_tree(self.path, ignore_errors=True)
        self._release(remove_lock=False)

    def _release(self, *, remove_lock: bool) -> None:
        if self._lock_fd is None:
            return
        if remove_lock:
            (self.snapshotter.locks / f"{digest_hex(self.chain_id)}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None
