"""OCI image layout on disk: ``oci-layout``, ``index.json`` and the content store's ``blobs/``.

Several images share one layout; each is named in ``index.json`` by the annotation
``org.opencontainers.image.ref.name``, and its entry records when it was tagged (pulled) in the
annotation ``io.fastpull.pulled-at`` (RFC 3339, UTC): the record lives and dies with the tag.
``index.json`` is rewritten atomically under a lock, so concurrent pulls into one layout never lose
each other's entries.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastpull.content.store import ContentStore
from fastpull.errors import ManifestError, StoreError
from fastpull.oci.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageIndex,
    parse_manifest,
)

REF_NAME = "org.opencontainers.image.ref.name"
PULLED_AT = "io.fastpull.pulled-at"
"""Annotation of an ``index.json`` entry: when fastpull tagged (pulled) the image."""
_LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


class ImageNotFound(StoreError):
    """No image of that name in the layout."""

    def __init__(self, root: Path, name: str):
        StoreError.__init__(self, str(root), f"no image named {name}")
        self.name = name


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

    @contextmanager
    def _index_locked(self) -> Iterator[dict]:
        """``index.json`` to change in place, written back when the block ends without an error."""
        lock_fd = os.open(self.root / ".fastpull" / "index.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            index = self.index()
            yield index
            self._write_json(self.root / "index.json", index)
        finally:
            os.close(lock_fd)

    def tag(self, ref_name: str, descriptor: Descriptor) -> None:
        """Point ``ref_name`` at ``descriptor`` (replacing an older entry of that name), stamped with
        the time (``PULLED_AT``)."""
        entry = descriptor.to_dict()
        entry.pop("platform", None)
        pulled_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: ref_name, PULLED_AT: pulled_at}
        with self._index_locked() as index:
            index["manifests"] = [*_without(index, ref_name), entry]

    def untag(self, ref_name: str) -> bool:
        """Remove the entry named ``ref_name``; False if there was none. Its blobs stay until a
        garbage collection finds that nothing else uses them."""
        with self._index_locked() as index:
            kept = _without(index, ref_name)
            if len(kept) == len(index.get("manifests", [])):
                return False
            index["manifests"] = kept
        return True

    def images(self) -> list[tuple[str, Descriptor]]:
        """Every named entry of ``index.json``, by name; ManifestError if one is malformed."""
        where = self.root / "index.json"
        named = [(m["annotations"][REF_NAME], m) for m in self.index().get("manifests", [])
                 if isinstance(m, dict) and isinstance(m.get("annotations"), dict) and REF_NAME in m["annotations"]]
        return sorted(((name, Descriptor.from_dict(m, f"{where} entry {name!r}")) for name, m in named),
                      key=lambda item: item[0])

    def resolve(self, ref_name: str) -> Descriptor | None:
        """The descriptor ``ref_name`` points at, if any; ManifestError if its entry is malformed."""
        for m in self.index().get("manifests", []):
            if m.get("annotations", {}).get(REF_NAME) == ref_name:
                return Descriptor.from_dict(m, f"{self.root / 'index.json'} entry {ref_name!r}")
        return None

    def children(self, digest: str, media_type: str | None) -> tuple[Descriptor, ...]:
        """What the stored blob ``digest`` names: an index's manifests, a manifest's config and
        layers; nothing for another blob or one the store lacks. ManifestError if ``media_type``
        says manifest or index and the blob does not parse as one; with ``media_type`` None
        (unknown), a blob that parses as a manifest or index counts as one."""
        known = media_type in MANIFEST_TYPES or media_type in INDEX_TYPES
        if media_type is not None and not known:
            return ()
        path = self.store.blob_path(digest)
        try:
            with open(path, "rb") as f:
                body = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return ()
        except OSError as e:
            raise StoreError(str(path), e.strerror or str(e)) from e
        if not known and not body.lstrip()[:1] == b"{":
            return ()
        try:
            document = parse_manifest(body, media_type, f"{digest} in {self.root}")
        except ManifestError:
            if known:
                raise
            return ()
        if isinstance(document, ImageIndex):
            return document.manifests
        return (document.config, *document.layers)

    def references(self, descriptor: Descriptor) -> list[Descriptor]:
        """``descriptor`` and every descriptor below it (see :meth:`children`), each once, parents
        first; the branch below a manifest the store lacks is not followed."""
        found: dict[str, Descriptor] = {}
        pending = [descriptor]
        while pending:
            desc = pending.pop()
            if desc.digest not in found:
                found[desc.digest] = desc
                pending.extend(reversed(self.children(desc.digest, desc.media_type)))
        return list(found.values())

    @staticmethod
    def _write_json(path: Path, doc: dict) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(str(path), e.strerror or str(e)) from e


def _without(index: dict, ref_name: str) -> list[dict]:
    return [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != ref_name]
