"""OCI image layout on disk: ``oci-layout``, ``index.json`` and the content store's ``blobs/``.

Several images share one layout; each is named in ``index.json`` by the annotation
``org.opencontainers.image.ref.name``. ``index.json`` is rewritten atomically under a
lock, so concurrent pulls into one layout never lose each other's entries.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from fastpull.content.store import ContentStore
from fastpull.errors import StoreError
from fastpull.oci.manifest import Descriptor

REF_NAME = "org.opencontainers.image.ref.name"
_LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


def default_root() -> Path:
    """Where images go when no layout is named: ``$FASTPULL_STORE``, else ``/var/lib/fastpull`` as
    root, else ``$XDG_DATA_HOME/fastpull`` (``~/.local/share/fastpull``)."""
    if store := os.environ.get("FASTPULL_STORE"):
        return Path(store)
    if os.geteuid() == 0:
        return Path("/var/lib/fastpull")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home, "fastpull")


class ImageLayout:
    """An OCI image layout directory whose ``blobs/`` is a :class:`ContentStore`."""

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = False):
        self.root = Path(root)
        self.store = ContentStore(self.root, durable=durable)
        marker = self.root / "oci-layout"
        if not marker.exists():
            self._write_json(marker, _LAYOUT_VERSION)

    def index(self) -> dict:
        """The parsed ``index.json`` (an empty index if none was written yet)."""
        path = self.root / "index.json"
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": _INDEX_MEDIA_TYPE, "manifests": []}
        except (ValueError, OSError) as e:
            raise StoreError(str(path), f"unreadable index.json: {e}") from e

    def tag(self, ref_name: str, descriptor: Descriptor) -> None:
        """Point ``ref_name`` at ``descriptor`` (replacing an older entry of that name)."""
        lock_fd = os.open(self.root / ".fastpull" / "index.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            index = self.index()
            entry = descriptor.to_dict()
            entry.pop("platform", None)
            entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: ref_name}
            manifests = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != ref_name]
            manifests.append(entry)
            index["manifests"] = manifests
            self._write_json(self.root / "index.json", index)
        finally:
            os.close(lock_fd)

    def resolve(self, ref_name: str) -> Descriptor | None:
        """The descriptor ``ref_name`` points at, if any; ManifestError if its entry is malformed."""
        for m in self.index().get("manifests", []):
            if m.get("annotations", {}).get(REF_NAME) == ref_name:
                return Descriptor.from_dict(m, f"{self.root / 'index.json'} entry {ref_name!r}")
        return None

    @staticmethod
    def _write_json(path: Path, doc: dict) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(str(path), e.strerror or str(e)) from e
