"""Leases: what a live process is using in a store, which garbage collection keeps, as containerd's.

A lease is a file ``.fastpull/leases/<id>`` that its holder keeps locked (``flock``) for as long as
it lives, listing one entry a line::

    sha256:<hex>          a blob, kept with everything it names if it is a manifest or an index
    tree <absolute path>  a temporary tree of the holder's (an unpack's work directory)

A collection (:mod:`fastpull.content.gc`) keeps every blob of every lease whose lock is held, and
removes a lease whose holder died, with the temporary trees it lists. Leases are taken and extended
only while no collection runs (:meth:`ContentStore.gc_excluded`), so a collection sees a lease's
entries whole or not at all; a holder takes its lease *before* it looks at what the store has, so
what it finds there stays until it releases the lease.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from fastpull.content.store import ContentStore
from fastpull.errors import StoreError

_TREE = "tree "


def lease_dir(store: ContentStore) -> Path:
    return store.root / ".fastpull" / "leases"


class Lease:
    """Blobs (and temporary trees) this process uses in ``store``; keep them until :meth:`release`."""

    def __init__(self, store: ContentStore, digests: Iterable[str] = (), trees: Iterable[str | os.PathLike[str]] = ()):
        self.store = store
        directory = lease_dir(store)
        self.path = directory / f"{os.getpid()}-{os.urandom(6).hex()}"
        with store.gc_excluded():  # a collection never sees the file before it is locked
            try:
                directory.mkdir(exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                                   0o644)
            except OSError as e:
                raise StoreError(str(self.path), e.strerror or str(e)) from e
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._write(digests, trees)
            except BaseException:
                self.release()
                raise

    def add(self, digests: Iterable[str] = (), trees: Iterable[str | os.PathLike[str]] = ()) -> None:
        """Extend the lease (waits for a collection that is running). Look at the store for these
        blobs only after this returns."""
        with self.store.gc_excluded():
            self._write(digests, trees)

    def _write(self, digests: Iterable[str], trees: Iterable[str | os.PathLike[str]]) -> None:
        lines = [*digests, *(_TREE + os.path.abspath(t) for t in trees)]
        if lines:
            try:
                os.write(self._fd, ("\n".join(lines) + "\n").encode())
            except OSError as e:
                raise StoreError(str(self.path), e.strerror or str(e)) from e

    def release(self) -> None:
        """Drop the lease: what it named may now be collected unless an image or another lease names it."""
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Leases(NamedTuple):
    """The leases of a store as a collection finds them (it holds the store's gc lock)."""

    digests: frozenset[str]
    """Blobs that leases of live holders name."""
    dead_trees: tuple[Path, ...]
    """Temporary trees that leases of dead holders name."""
    dead: int
    """Leases of dead holders, removed."""


def collect_leases(store: ContentStore) -> Leases:
    """Read every lease; remove those whose holder died (the caller excludes new leases: it holds the
    gc lock exclusively). A lease is live while its lock is held: no pid is guessed at."""
    digests: set[str] = set()
    trees: list[Path] = []
    dead = 0
    for path, live in _leases(store):
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue  # released just now
        if live:
            digests.update(line for line in lines if not line.startswith(_TREE))
        else:
            trees.extend(Path(line[len(_TREE):]) for line in lines if line.startswith(_TREE))
            path.unlink(missing_ok=True)
            dead += 1
    return Leases(frozenset(digests), tuple(trees), dead)


def _leases(store: ContentStore) -> Iterator[tuple[Path, bool]]:
    """Each lease file and whether its holder lives (holds its lock); a dead one is yielded locked."""
    try:
        paths = sorted(lease_dir(store).iterdir())
    except FileNotFoundError:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                yield path, True
            else:
                yield path, False
        finally:
            os.close(fd)
