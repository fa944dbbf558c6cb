"""What the mirror knows about where its content came from, kept across restarts.

A blob or manifest in the store is served for a repository only if it came from that
repository (fetched from it, or named by a manifest fetched from it) or the upstream confirmed
that the repository has it: otherwise a private image's layers could be read through any name.
Tags are remembered with the digest they last resolved to, so that a tag can still be served,
stale and logged, while the upstream cannot be reached.

The ledger is one append-only file of JSON lines under the store; a torn last line (a crash in
the middle of a write) is skipped when it is read back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastpull.errors import StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagEntry:
    digest: str
    resolved_at: float
    """``time.time()`` when the upstream last said so."""


class Ledger:
    """Provenance of blobs and manifests by (registry, repository), and the last digest of each tag."""

    def __init__(self, path: Path):
        self.path = path
        self._sizes: dict[tuple[str, str, str], int] = {}
        self._media_types: dict[str, str] = {}
        self._tags: dict[tuple[str, str, str], TagEntry] = {}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._load()
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the ledger's life
        except OSError as e:
            raise StoreError(str(path), e.strerror or str(e)) from e

    def size(self, registry: str, repository: str, digest: str) -> int | None:
        """The size of ``digest`` if ``repository`` of ``registry`` is known to have it."""
        return self._sizes.get((registry, repository, digest))

    def media_type(self, digest: str) -> str | None:
        """The media type a manifest was served with by its upstream."""
        return self._media_types.get(digest)

    def tag(self, registry: str, repository: str, tag: str) -> TagEntry | None:
        return self._tags.get((registry, repository, tag))

    def record(self, registry: str, repository: str, digest: str, size: int, media_type: str | None = None) -> None:
        """``repository`` has ``digest`` of ``size`` bytes (and, for a manifest, that media type)."""
        key = (registry, repository, digest)
        if self._sizes.get(key) == size and (media_type is None or self._media_types.get(digest) == media_type):
            return
        self._append({"registry": registry, "repository": repository, "digest": digest, "size": size,
                      **({"mediaType": media_type} if media_type else {})})

    def record_tag(self, registry: str, repository: str, tag: str, digest: str) -> None:
        """The upstream says ``tag`` is ``digest`` now. Written only when the digest changes, so that
        the file grows with what the node pulls, not with how often: a restart then trusts the tag
        from its older time, and asks the upstream again sooner."""
        entry = {"registry": registry, "repository": repository, "tag": tag, "digest": digest, "at": time.time()}
        known = self._tags.get((registry, repository, tag))
        if known is not None and known.digest == digest:
            self._apply(entry)
        else:
            self._append(entry)

    def close(self) -> None:
        self._file.close()

    def _append(self, entry: dict) -> None:
        self._apply(entry)
        try:
            self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as e:  # the mirror goes on serving from memory; the next start knows less
            log.warning("cannot write %s: %s", self.path, e.strerror or e)

    def _apply(self, entry: dict) -> None:
        key = (entry["registry"], entry["repository"])
        if "tag" in entry:
            self._tags[(*key, entry["tag"])] = TagEntry(entry["digest"], float(entry["at"]))
        else:
            self._sizes[(*key, entry["digest"])] = int(entry["size"])
            if media_type := entry.get("mediaType"):
                self._media_types[entry["digest"]] = media_type

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for number, line in enumerate(data.splitlines(), 1):
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: skipping an unreadable entry", self.path, number)
        if data and not data.endswith(b"\n"):
            with open(self.path, "a", encoding="utf-8") as f:  # end a torn line before appending
                f.write("\n")
