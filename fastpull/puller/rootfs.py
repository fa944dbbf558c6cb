"""A pull into a rootfs: the layers unpack side by side in a work directory beside it, and are merged
into it (whiteouts applied, by renames) once all are in."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from fastpull.content.leases import Lease
from fastpull.content.store import ContentStore
from fastpull.errors import UnpackError
from fastpull.oci.manifest import Descriptor
from fastpull.puller.unpacks import LayerUnpack, Unpacks, layer_job
from fastpull.unpack.rootfs import assemble, remove_tree


class RootfsUnpacks(Unpacks):
    """Each layer into ``layer-<i>`` of a :class:`WorkDir` (whiteouts kept as markers); :meth:`finish`
    merges them into ``rootfs``."""

    def __init__(self, store: ContentStore, layers: list[Descriptor], diff_ids: list[str], rootfs: Path,
                 lease: Lease):
        """``lease`` names the work directory, so that `fastpull gc` removes it if this process dies."""
        super().__init__(layers)
        self.rootfs = rootfs
        self.work = WorkDir(rootfs)
        try:
            lease.add(trees=[self.work.path])
            for i, (layer, diff_id) in enumerate(zip(layers, diff_ids)):
                target = self.work.path / f"layer-{i}"
                target.mkdir()
                # Whiteouts kept as they are in the tar: assemble() applies them.
                self.unpacks[i] = LayerUnpack(layer_job(store, layer, diff_id, target, "keep"))
        except BaseException:
            self.work.remove()
            raise

    def finish(self) -> None:
        root = self.work.path / "root"
        root.mkdir()
        assemble([(Path(u.job.target), u.future.result().implied_dirs) for u in self.unpacks], root)
        if self.rootfs.exists():
            self.rootfs.rmdir()
        os.rename(root, self.rootfs)

    def close(self) -> None:
        self.work.remove()


class WorkDir:
    """Where a rootfs is built, beside it: ``.<name>.fastpull-<random>``, locked (flock) while in use.

    A pull killed outright leaves its work directory behind, unlocked: the next pull into the same
    rootfs removes it.
    """

    def __init__(self, rootfs: Path):
        try:
            if rootfs.exists() and (not rootfs.is_dir() or any(rootfs.iterdir())):
                raise UnpackError(str(rootfs), "it exists and is not an empty directory")
            rootfs.parent.mkdir(parents=True, exist_ok=True)
            prefix = f".{rootfs.name}.fastpull-"
            for entry in os.scandir(rootfs.parent):
                if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                    _remove_if_abandoned(Path(entry.path))
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=rootfs.parent))
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            why = e.strerror or str(e)
            if e.filename is not None and os.fspath(e.filename) != os.fspath(rootfs):
                why = f"{os.fspath(e.filename)}: {why}"
            raise UnpackError(str(rootfs), why) from e
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def remove(self) -> None:
        remove_tree(self.path, ignore_errors=True)
        os.close(self._fd)


def _remove_if_abandoned(work: Path) -> None:
    """Remove another pull's work directory if no process holds its lock any more."""
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # a pull is building there
    else:
        remove_tree(work, ignore_errors=True)
    finally:
        os.close(fd)
