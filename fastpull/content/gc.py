"""Garbage collection of an image layout: mark from the roots, then sweep, as containerd does.

The roots are the images ``index.json`` names, the blobs of every lease whose holder lives
(:mod:`fastpull.content.leases`) and every ingest whose lock a writer holds; marking follows each
index to its manifests and each manifest to its config and layers; the ChainIDs of the marked
images are what the store's unpacked layers keep (``sweep_layers``). Then the sweep removes the
blobs nobody marked, the ingests (partial downloads) of unmarked blobs, the temporary files of
``put_bytes`` that dead processes left, and the leases of dead holders with the temporary trees they
list. Nothing is judged by its age: the whole collection holds the store's gc lock exclusively, and
whatever a live process uses is either leased (taken under that lock, shared) or locked.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastpull.content.layout import ImageLayout
from fastpull.content.leases import collect_leases
from fastpull.content.store import PUT_SUFFIX, acquire_key_lock
from fastpull.digests import DIGEST_RE
from fastpull.errors import StoreError
from fastpull.oci.manifest import DOCKER_CONFIG, OCI_CONFIG, chain_ids, parse_manifest

CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
TREE_MARK = ".fastpull-"
"""Only a directory whose name has this in it is removed as a dead lease's temporary tree."""


@dataclass
class Collected:
    """What a collection removed."""

    blobs: list[tuple[str, int]] = field(default_factory=list)
    """Committed blobs nothing referenced: (digest, bytes)."""
    ingests: list[tuple[str, int]] = field(default_factory=list)
    """Partial downloads of blobs nothing referenced: (digest, bytes on disk)."""
    temp_files: int = 0
    trees: list[Path] = field(default_factory=list)
    """Temporary trees of dead pulls."""
    leases: int = 0
    """Leases of dead processes."""
    layers: list[tuple[str, int]] = field(default_factory=list)
    """Unpacked layers nothing uses: (ChainID, bytes)."""

    @property
    def freed_bytes(self) -> int:
        return sum(n for _, n in self.blobs) + sum(n for _, n in self.ingests) + sum(n for _, n in self.layers)


def collect(layout: ImageLayout, *, remove_tree: Callable[[Path], None],
            sweep_layers: Callable[[set[str]], list[tuple[str, int]]] | None = None) -> Collected:
    """Remove what nothing uses from ``layout`` (see the module's description); waits for leases
    being taken and, while it runs, makes new ones wait. ``remove_tree(path)`` removes a dead
    pull's temporary tree; ``sweep_layers(chain_ids)`` removes the unpacked layers that neither
    those ChainIDs (of the images and leases) nor anything it knows of uses, and says which.
    ManifestError (nothing removed) if an image's manifest or config is malformed."""
    store = layout.store
    collected = Collected()
    try:
        fd = os.open(store.gc_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StoreError(str(store.gc_lock_path), e.strerror or str(e)) from e
    locked_ingests: list[tuple[str, int]] = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Leases before index.json: a pull tags its image before it drops its lease.
        leases = collect_leases(store)
        collected.leases = leases.dead
        marked: set[str] = set()
        manifests: set[str] = set()
        _mark(layout, [(desc.digest, desc.media_type) for _, desc in layout.images()], marked, manifests)
        _mark(layout, [(d, None) for d in leases.digests], marked, manifests)
        chains = set().union(*(_chain_ids(layout, m) for m in manifests)) if sweep_layers is not None else set()
        for digest in _ingest_digests(store.ingest_dir):
            if digest in marked:
                continue  # a resumable download of a blob in use
            lock = acquire_key_lock(store.ingest_dir / f"{digest[7:]}.lock", block=False, done=lambda: False)
            if lock is None:
                _mark(layout, [(digest, None)], marked, manifests)  # a writer is at work
            else:
                locked_ingests.append((digest, lock))
        for path in _entries(store.blobs):
            digest = "sha256:" + path.name
            if DIGEST_RE.fullmatch(digest) and digest not in marked:
                collected.blobs.append((digest, _remove(path)))
        for digest, _ in locked_ingests:
            collected.ingests.append((digest, _remove_ingest(store.ingest_dir, digest)))
        for path in _entries(store.ingest_dir):
            if PUT_SUFFIX in path.name and path.is_file():  # no put_bytes runs while we hold the lock
                _remove(path)
                collected.temp_files += 1
        for tree in leases.dead_trees:
            if _remove_abandoned(tree, remove_tree):
                collected.trees.append(tree)
        if sweep_layers is not None:
            collected.layers = sweep_layers(chains)
    finally:
        for _, lock in locked_ingests:
            os.close(lock)
        os.close(fd)
    return collected


def _mark(layout: ImageLayout, roots: Iterable[tuple[str, str | None]], marked: set[str], manifests: set[str]) -> None:
    """Mark each root ``(digest, media type or None if unknown)`` and all that it names; add the
    image manifests met (those naming a config) to ``manifests``."""
    pending = list(roots)
    while pending:
        digest, media_type = pending.pop()
        if digest not in marked and DIGEST_RE.fullmatch(digest) is not None:
            marked.add(digest)
            children = layout.children(digest, media_type)
            if any(d.media_type in CONFIG_TYPES for d in children):
                manifests.add(digest)
            pending.extend((d.digest, d.media_type) for d in children)


def _chain_ids(layout: ImageLayout, manifest_digest: str) -> list[str]:
    """The ChainIDs of the layers a pull of this image unpacks (none if the store lacks its config)."""
    body = _read(layout, manifest_digest)
    manifest = None if body is None else parse_manifest(body, None, f"{manifest_digest} in {layout.root}")
    config = None if manifest is None else _read(layout, manifest.config.digest)
    return [] if config is None else chain_ids(manifest.diff_ids(config))


def _read(layout: ImageLayout, digest: str) -> bytes | None:
    """A stored blob's bytes; None if the store lacks it."""
    path = layout.store.blob_path(digest)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(str(path), e.strerror or str(e)) from e


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def _ingest_digests(ingest_dir: Path) -> set[str]:
    """Digests with an ingest directory or lock file."""
    found = set()
    for path in _entries(ingest_dir):
        name = path.name.removesuffix(".lock")
        if DIGEST_RE.fullmatch("sha256:" + name):
            found.add("sha256:" + name)
    return found


def _remove(path: Path) -> int:
    """Unlink ``path``; its size (0 if it was gone already)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise StoreError(str(path), e.strerror or str(e)) from e
    return size


def _remove_ingest(ingest_dir: Path, digest: str) -> int:
    """Remove an ingest whose lock we hold (the lock file last: a writer waiting on it then finds
    the lock path gone and starts on a fresh one); the bytes it held."""
    hexd = digest[7:]
    directory = ingest_dir / hexd
    freed = sum(_remove(p) for p in _entries(directory))
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StoreError(str(directory), e.strerror or str(e)) from e
    _remove(ingest_dir / f"{hexd}.lock")
    return freed


def _remove_abandoned(tree: Path, remove_tree: Callable[[Path], None]) -> bool:
    """Remove a dead pull's temporary tree unless someone holds its lock (flock on the directory)."""
    if TREE_MARK not in tree.name or not tree.is_absolute():
        return False
    try:
        fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone (its pull's next run removed it), or not a directory
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        remove_tree(tree)
        return True
    finally:
        os.close(fd)
