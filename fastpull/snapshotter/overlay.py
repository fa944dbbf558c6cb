"""containerd's overlayfs snapshotter (``plugins/snapshots/overlay``), plus snapshots committed
straight onto the layer cache.

Layout under ``root``::

    metadata.db            the metadata (fastpull.snapshotter.metadata)
    snapshots/<id>/fs      a snapshot's upper directory, or for one committed onto the layer
                           cache a symlink to the cache's directory of that ChainID
    snapshots/<id>/work    overlayfs's work directory (active snapshots)
    snapshots/new-*        being created; snapshots/rm-* being removed

Directories are named by integer id only: keys and labels come from the client and never reach a
path. A snapshot's directory is made under a temporary name and renamed to its id inside the
write transaction that records it, so a row always has its directory; a removal deletes the row,
then the directory. Whatever a crash leaves without a row, :meth:`OverlaySnapshotter.cleanup`
(run at start) removes.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastpull.digests import check_digest
from fastpull.errors import SnapshotExists, SnapshotInvalid, SnapshotNotFound, UnpackError, quote
from fastpull.snapshotter.filters import parse_all
from fastpull.snapshotter.metadata import (
    NO_USAGE,
    Info,
    Kind,
    MetaStore,
    Record,
    Usage,
    check_labels,
    check_name,
    fields,
)
from fastpull.unpack.rootfs import remove_tree, tree_usage
from fastpull.unpack.snapshots import Snapshotter

__all__ = ["Info", "Kind", "Mount", "OverlaySnapshotter", "Usage", "default_overlay_options", "disk_usage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    """One mount, as containerd's ``types.Mount``."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


def default_overlay_options() -> tuple[str, ...]:
    """The options containerd (1.6 and later) adds to every overlay mount by default: ``userxattr``
    inside a user namespace (overlayfs then reads ``user.overlay.*``; containerd also checks for
    tmpfs and for kernels before 5.11, which fastpull does not support), and ``index=off`` where the
    kernel has the index feature (with it on, a lower directory shared by several mounts fails
    them with EBUSY)."""
    options = []
    try:
        in_user_namespace = Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]
    except OSError:
        in_user_namespace = False
    if in_user_namespace:
        options.append("userxattr")
    if os.path.exists("/sys/module/overlay/parameters/index"):
        options.append("index=off")
    return tuple(options)


def disk_usage(path: str | os.PathLike[str]) -> Usage:
    """Blocks and inodes of the tree at ``path``, as containerd's ``fs.DiskUsage``."""
    return Usage(*tree_usage(path))


METADATA_FILE = "metadata.db"
"""The metadata's file in the snapshotter's root."""


class OverlaySnapshotter:
    """Snapshots under ``root``; ``layers`` is the store's ChainID layer cache, onto which
    :meth:`commit_layer` commits without copying. Thread-safe."""

    def __init__(self, root: str | os.PathLike[str], layers: Snapshotter):
        self.root = Path(os.path.abspath(root))
        self.layers = layers
        self.snapshots = self.root / "snapshots"
        self.overlay_options = default_overlay_options()
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.snapshots.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise UnpackError(str(self.root), e.strerror or str(e)) from e
        self._db = MetaStore(self.root / METADATA_FILE)
        try:
            self.cleanup()
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> OverlaySnapshotter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stat(self, key: str) -> Info:
        with self._db.read() as tx:
            return tx.get(key).info

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        """Change ``info.name``'s labels, as containerd: only ``labels`` and ``labels.<key>`` paths
        (none: all labels); ``updated`` is set to now."""
        with self._db.write() as tx:
            return tx.update(info, fieldpaths)

    def usage(self, key: str) -> Usage:
        """An active snapshot's upper directory measured now; any other's as recorded at commit."""
        with self._db.read() as tx:
            record = tx.get(key)
        if record.info.kind is not Kind.ACTIVE:
            return record.usage
        try:
            return disk_usage(self._fs(record.id))
        except FileNotFoundError:
            raise SnapshotNotFound(key, "removed while measured") from None
        except OSError as e:
            raise UnpackError(self._fs(record.id), e.strerror or str(e)) from e

    def mounts(self, key: str) -> list[Mount]:
        with self._db.read() as tx:
            record = tx.get_mountable(key)
            parent_ids = tx.parent_ids(record.id)
        return self._mounts(record, parent_ids)

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """An active (writable) snapshot ``key`` on the committed ``parent`` (none if ``""``)."""
        return self._mounts(*self._create(Kind.ACTIVE, key, parent, labels))

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """A read-only view ``key`` of the committed ``parent``."""
        return self._mounts(*self._create(Kind.VIEW, key, parent, labels))

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Commit the active snapshot ``key`` as ``name`` with ``labels`` (not the active's); its
        usage is measured and recorded in the same transaction, as containerd does."""
        check_labels(name, labels)
        with self._db.write() as tx:
            active = tx.committable(key, name)
            try:
                usage = disk_usage(self._fs(active.id))
            except OSError as e:
                raise UnpackError(self._fs(active.id), e.strerror or str(e)) from e
            tx.commit(active, name, labels, usage)

    def commit_layer(self, name: str, parent: str, chain_id: str, labels: Mapping[str, str]) -> Info:
        """A committed snapshot ``name`` on ``parent`` whose filesystem is the layer cache's
        directory of ``chain_id``, not copied. Done already (same parent and layer) returns the
        existing one; SnapshotNotFound if the cache lacks the layer. The layer's lock is held
        while it is recorded, so ``fastpull gc``, which removes a layer only under that lock and
        only if :meth:`chains_in_use` lacks it, cannot remove it meanwhile."""
        check_name(name)
        check_labels(name, labels)
        if (why := check_digest(chain_id)) is not None:
            raise SnapshotInvalid(name, f"layer {quote(chain_id)}: {why}")
        source = self.layers.path(chain_id)
        with self.layers.hold(chain_id):
            with self._db.read() as tx:
                existing = tx.find(name)
                usage = tx.chain_usage(chain_id)
            if existing is not None:
                info = existing.info
                if info.kind is Kind.COMMITTED and info.parent == parent and existing.chain == chain_id:
                    return info
                origin = f" from layer {existing.chain}" if existing.chain else ""
                raise SnapshotExists(name, f"already exists, {info.kind.name.lower()} on parent "
                                           f"{quote(info.parent)}{origin}")
            if not source.is_dir():
                raise SnapshotNotFound(name, f"layer {chain_id} is not in the layer cache {self.layers.root}")
            if usage is None:
                try:
                    usage = disk_usage(source)
                except OSError as e:
                    raise UnpackError(str(source), e.strerror or str(e)) from e
            record, _ = self._create(Kind.COMMITTED, name, parent, labels, chain=chain_id, usage=usage)
            return record.info

    def remove(self, key: str) -> None:
        """Remove ``key`` (not one with children). A snapshot on the layer cache loses only its own
        directory, a symlink; the cache keeps the layer."""
        with self._db.write() as tx:
            record = tx.remove(key)
        self._discard(self.snapshots / str(record.id))

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """Every snapshot matching any of ``filters`` (containerd's filter syntax; none: all)."""
        matcher = parse_all(filters)
        with self._db.read() as tx:
            infos = [record.info for record in tx.records()]
        return iter([info for info in infos if matcher.match(fields(info))])

    def cleanup(self) -> None:
        """Remove snapshot directories that have no row: what a crash or a failed removal left."""
        try:
            with self._db.write() as tx:  # no other writer, so no directory is half-made
                ids = {str(i) for i in tx.ids()}
                for name in os.listdir(self.snapshots):
                    if name not in ids and not name.startswith("rm-"):
                        # Renamed while no writer runs: no later snapshot is given this name's id meanwhile.
                        os.rename(self.snapshots / name, self.snapshots / f"rm-{secrets.token_hex(8)}")
            trash = [name for name in os.listdir(self.snapshots) if name.startswith("rm-")]
        except OSError as e:
            raise UnpackError(str(self.snapshots), e.strerror or str(e)) from e
        for name in trash:
            self._discard(self.snapshots / name)

    def chains_in_use(self) -> set[str]:
        """The ChainIDs of the cached layers that snapshots are committed onto."""
        with self._db.read() as tx:
            return tx.chains()

    def close(self) -> None:
        self._db.close()

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str], *,
                chain: str | None = None, usage: Usage = NO_USAGE) -> tuple[Record, list[int]]:
        """Record a snapshot and make its directory; returns it and its ancestors' ids."""
        target = None
        try:
            with self._db.write() as tx:
                record = tx.create(kind, key, parent, labels, chain=chain, usage=usage)
                parent_ids = tx.parent_ids(record.id)
                target = self._make_directory(record, parent_ids)
        except BaseException:
            if target is not None:  # the row was not committed
                self._discard(target)
            raise
        return record, parent_ids

    def _make_directory(self, record: Record, parent_ids: list[int]) -> Path:
        """``snapshots/<id>``, made under a temporary name and renamed into place."""
        target = self.snapshots / str(record.id)
        try:
            temporary = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots))
        except OSError as e:
            raise UnpackError(str(self.snapshots), e.strerror or str(e)) from e
        try:
            fs = temporary / "fs"
            if record.chain is not None:
                fs.symlink_to(self.layers.path(record.chain).absolute())
            else:
                fs.mkdir()
                fs.chmod(0o755)
                if record.info.kind is Kind.ACTIVE:
                    (temporary / "work").mkdir()
                    (temporary / "work").chmod(0o711)
                if parent_ids:  # as containerd: the new upper is owned as the parent's root is
                    owner = os.stat(self._fs(parent_ids[0]))
                    os.lchown(fs, owner.st_uid, owner.st_gid)
            os.rename(temporary, target)
        except OSError as e:
            remove_tree(temporary, ignore_errors=True)
            raise UnpackError(str(target), e.strerror or str(e)) from e
        return target

    def _mounts(self, record: Record, parent_ids: list[int]) -> list[Mount]:
        """containerd's overlay mounts: a bind of the snapshot's own directory without parents, a
        read-only bind of the parent for a view of one, overlay otherwise."""
        kind = record.info.kind
        if not parent_ids:
            return [Mount("bind", self._fs(record.id), options=("ro" if kind is Kind.VIEW else "rw", "rbind"))]
        if kind is Kind.VIEW and len(parent_ids) == 1:
            return [Mount("bind", self._fs(parent_ids[0]), options=("ro", "rbind"))]
        options = []
        if kind is Kind.ACTIVE:
            options += [f"workdir={self.snapshots / str(record.id) / 'work'}", f"upperdir={self._fs(record.id)}"]
        options.append("lowerdir=" + ":".join(self._fs(i) for i in parent_ids))
        return [Mount("overlay", "overlay", options=(*options, *self.overlay_options))]

    def _fs(self, snapshot_id: int) -> str:
        return str(self.snapshots / str(snapshot_id) / "fs")

    @staticmethod
    def _discard(path: Path) -> None:
        try:
            remove_tree(path)
        except OSError as e:
            log.warning("cannot remove snapshot directory %s (cleanup retries): %s", path, e)
