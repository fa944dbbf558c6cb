"""A pull handed to containerd as its own: layers into its snapshotter, documents into its content
store, the image into its image store, as containerd's own pull and unpack leave them.

fastpull pulls and unpacks the image (:class:`ContainerdLayers`: the layers containerd lacks, as
ChainID snapshots in a staging directory of the layout), then, base first, each of those layers is
``Prepare``d on its parent, its tree moved into the upper directory the mounts name (renamed, or
copied where the staging directory is on another filesystem: owners, modes, xattrs, hard links and
device nodes kept) and ``Commit``ted under its ChainID. The config goes to the content store
labelled with the top ChainID (``containerd.io/gc.ref.snapshot.<snapshotter>``), the manifest (and
index) labelled with their children, then the image names are pointed at them: CRI's three in its
namespace (the reference, ``repository@digest`` and the image ID, each labelled as CRI's own), the
reference elsewhere. Layer blobs are not copied: containerd needs them for no container (as with
CRI's ``discard_unpacked_layers``).

Everything is made under one containerd lease, removed at the end: an import stopped half-way
leaves snapshots and content that only the lease held, and containerd's next GC frees them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from fastpull.containerd.client import CRI_NAMESPACE, Containerd
from fastpull.content.layout import ImageLayout
from fastpull.content.leases import Lease
from fastpull.errors import ContainerdError, FastpullError, UnpackError
from fastpull.events import Event, Failed, Pulled, Resolved
from fastpull.oci.manifest import chain_ids
from fastpull.oci.reference import Reference
from fastpull.puller import Puller, PullResult
from fastpull.unpack.rootfs import remove_tree
from fastpull.unpack.snapshots import Snapshotter, SnapshotWriter

SNAPSHOT_REF = "containerd.io/snapshot.ref"
"""The label containerd's unpacker puts on a layer's snapshot: its ChainID."""
CRI_MANAGED = {"io.cri-containerd.image": "managed"}
"""The label of the images CRI made (it lists and removes an image by its names so labelled)."""
GC_CONTENT = "containerd.io/gc.ref.content"
"""Labels by which containerd's GC keeps content that other content references."""

_COPY = ["cp", "-dR", "--preserve=mode,ownership,timestamps,links,xattr"]
"""A tree copied as it is: no symlink followed; hard links, owners, modes, times and xattrs
(``trusted.overlay.opaque`` included, as root) kept, device nodes made; any of it lost is an error."""


class ContainerdLayers(Snapshotter):
    """The ChainID snapshots a pull into containerd unpacks, under a staging ``root``: all but those
    containerd's snapshotter has already. The puller sees those as there, so it neither fetches nor
    unpacks them; each is held by a view while the import runs (containerd removes no snapshot with
    a child), and its path is containerd's own directory, from which the layers above take the
    metadata of their implied directories."""

    def __init__(self, root: str | os.PathLike[str], containerd: Containerd):
        super().__init__(root)
        self._containerd = containerd
        self._held: dict[str, Path | None] = {}
        self._lock = threading.Lock()
        self.views: list[str] = []
        """The keys of the views made."""

    def held(self, chain_id: str) -> Path | None:
        """containerd's directory of the snapshot ``chain_id``, None if it has none (asked once)."""
        with self._lock:
            if chain_id not in self._held:
                self._held[chain_id] = self._view(chain_id) if self._containerd.has_snapshot(chain_id) else None
            return self._held[chain_id]

    def _view(self, chain_id: str) -> Path:
        key = f"fastpull-view-{secrets.token_hex(6)} {chain_id}"
        mounts = self._containerd.view(key, chain_id)
        self.views.append(key)
        # A bind of the snapshot's directory, or an overlay whose top lower it is.
        if (found := _mounted_dir(mounts, "lowerdir")) is None:
            raise ContainerdError(self._containerd.socket, f"the view of snapshot {chain_id} names no directory: "
                                                           f"{[str(m) for m in mounts]}")
        return found

    def path(self, chain_id: str) -> Path:
        return self.held(chain_id) or super().path(chain_id)

    def prepare(self, chain_id: str, *, block: bool = True) -> SnapshotWriter | None:
        """The writer's directory starts as containerd's for a snapshot, mode 0755: the root of the
        containers' tree, unless the layer's tar names ``./`` itself."""
        writer = super().prepare(chain_id, block=block)
        if writer is not None:
            os.chmod(writer.path, 0o755)
        return writer


def pull_into(puller: Puller, ref: str | Reference, layout: str | os.PathLike[str], containerd: Containerd, *,
              events: Callable[[Event], None] | None = None) -> PullResult:
    """Pull ``ref`` through ``layout`` (which keeps no image of it) and import it into ``containerd``
    (see the module's description); returns the pull's result. ``events`` hears the pull's events,
    ``Pulled`` once the image is in containerd (without snapshot directories: they went there), or
    ``Failed``."""
    image_layout = ImageLayout(layout, durable=puller.durable)
    stage = Path(tempfile.mkdtemp(prefix=".fastpull-containerd-", dir=image_layout.root))
    pulled: list[Pulled] = []

    def heard(event: Event) -> None:
        if isinstance(event, Resolved):
            lease.add([event.digest])  # the manifest, and so its config, stay in the layout until the import ends
        if isinstance(event, Pulled):
            pulled.append(event)
        elif events is not None:
            events(event)

    # fastpull's lease: `fastpull gc` removes the staging tree if this process dies.
    with Lease(image_layout.store, trees=[stage]) as lease, containerd.lease():
        layers = ContainerdLayers(stage, containerd)
        try:
            result = puller.pull(ref, image_layout.root, snapshots=layers, events=heard, tag=False)
            try:
                _import(containerd, result, image_layout.store.blob_path(result.manifest.config.digest), layers)
            except FastpullError as exc:
                if events is not None:
                    events(Failed.of(exc, str(ref)))
                raise
        finally:
            remove_tree(stage, ignore_errors=True)
            with contextlib.suppress(ContainerdError):  # else the lease's removal frees them
                for key in layers.views:
                    containerd.remove_snapshot(key)
    if events is not None:
        events(dataclasses.replace(pulled[0], snapshots=()))
    return result


def _import(containerd: Containerd, result: PullResult, config_path: Path, layers: ContainerdLayers) -> None:
    """The layers containerd lacks into its snapshotter, then the documents, then the image names."""
    config = result.manifest.config
    config_body = config_path.read_bytes()
    chains = chain_ids(result.manifest.diff_ids(config_body))
    parent = ""
    for chain in chains:
        if layers.held(chain) is None:
            _commit_layer(containerd, layers.path(chain), chain, parent)
        parent = chain
    snapshot = {f"containerd.io/gc.ref.snapshot.{containerd.snapshotter}": chains[-1]} if chains else {}
    containerd.put_content(config.digest, config_body, snapshot)
    child = {f"{GC_CONTENT}.config": config.digest}
    for desc, body in reversed(result.documents):  # the manifest, then the index that names it
        containerd.put_content(desc.digest, body, child)
        child = {f"{GC_CONTENT}.m.0": desc.digest}
    target = result.documents[0][0]
    for name, labels in _image_names(result.reference, target.digest, config.digest, containerd.namespace).items():
        containerd.put_image(name, target.media_type, target.digest, target.size, labels)


def _image_names(reference: Reference, target: str, image_id: str, namespace: str) -> dict[str, dict[str, str]]:
    """Image name -> labels: in CRI's namespace, the names a CRI pull gives (the tag, the repository
    at the digest, the image ID), as CRI labels them; elsewhere the reference, as ``ctr`` names it."""
    if namespace != CRI_NAMESPACE:
        return {str(reference): {}}
    names = [f"{reference.name}@{target}", image_id]
    if reference.digest is None:
        names.insert(0, str(reference))
    return {name: dict(CRI_MANAGED) for name in names}


def _commit_layer(containerd: Containerd, tree: Path, chain: str, parent: str) -> None:
    """A new snapshot on ``parent`` whose upper directory becomes ``tree``, committed as ``chain``
    (one committed meanwhile by another client is kept, and this one removed)."""
    key = f"fastpull-extract-{secrets.token_hex(6)} {chain}"
    labels = {SNAPSHOT_REF: chain}
    mounts = containerd.prepare(key, parent, labels)
    try:
        _move_tree(tree, _upper_dir(containerd, key, mounts))
        if not containerd.commit(chain, key, labels):
            containerd.remove_snapshot(key)
    except BaseException:
        with contextlib.suppress(ContainerdError):  # else the lease's removal frees it
            containerd.remove_snapshot(key)
        raise


def _upper_dir(containerd: Containerd, key: str, mounts: list) -> Path:
    """Where an active overlayfs snapshot's changes go: the bind mount's source (a base layer) or
    the overlay's ``upperdir``; it must be visible to this process at the same path."""
    if (upper := _mounted_dir(mounts, "upperdir")) is None:
        raise ContainerdError(containerd.socket, f"snapshot {key!r} mounts no directory to write: "
                                                 f"{[m.type for m in mounts]}")
    if not upper.is_dir():
        raise ContainerdError(containerd.socket, f"{upper}, the directory of snapshot {key!r}, is not visible here: "
                                                 f"run fastpull where containerd's root is at the same path")
    return upper


def _mounted_dir(mounts: list, option: str) -> Path | None:
    """The directory that ``mounts`` name: a bind mount's source, else the first directory of an
    overlay's ``option`` (``upperdir``, ``lowerdir``); None if they name none."""
    for m in mounts:
        if m.type == "bind":
            return Path(m.source)
        for value in m.options:
            if value.startswith(f"{option}="):
                return Path(value.removeprefix(f"{option}=").split(":")[0])
    return None


def _move_tree(tree: Path, upper: Path) -> None:
    """Make ``tree`` the empty directory ``upper``: by a rename (which replaces an empty directory)
    on the same filesystem, else by a copy."""
    try:
        os.rename(tree, upper)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise UnpackError(str(upper), f"cannot move {tree} there: {e.strerror or e}") from e
    done = subprocess.run([*_COPY, f"{tree}/.", str(upper)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UnpackError(str(upper), f"cannot copy {tree} there: {' '.join(done.stderr.split())[:500]}")
