"""Snapshot metadata in SQLite: names, kinds, parents, labels and usage, with containerd's rules
(``core/snapshots/storage``) for which call fails with which error.

Every operation is one transaction. Writes take SQLite's write lock (``BEGIN IMMEDIATE``) first,
so that a snapshotter can create or remove directories inside one knowing that no other writer,
in this process or another (``fastpull gc`` reading what is in use), runs meanwhile. Ids come from
``AUTOINCREMENT`` and are never reused once committed: a directory named by an id cannot be
mistaken for a later snapshot's.

One connection serves every thread, behind a lock: SQLite runs one writer at a time anyway, each
operation is a few statements, and one connection is closed in one place (per-thread connections
would outlive the gRPC server's threads).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastpull.errors import (
    SnapshotError,
    SnapshotExists,
    SnapshotInvalid,
    SnapshotNotFound,
    SnapshotPrecondition,
    quote,
)
from fastpull.snapshotter.filters import Lookup

SCHEMA_VERSION = 1
MAX_NAME_BYTES = 4096
MAX_LABEL_BYTES = 4096
"""A label's key and value together, as containerd's ``labels.Validate``."""
MAX_LABELS = 1024
MAX_LABELS_BYTES = 256 * 1024
"""All of a snapshot's labels together: a client cannot make one row unbounded."""

_SCHEMA = """
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    chain TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX snapshots_parent ON snapshots(parent_id);
CREATE INDEX snapshots_chain ON snapshots(chain) WHERE chain IS NOT NULL;
CREATE TABLE labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
) WITHOUT ROWID;
"""
_SELECT = ("SELECT s.id, s.name, p.name, s.kind, s.chain, s.created, s.updated, s.size, s.inodes"
           " FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id")


class Kind(enum.IntEnum):
    """containerd's snapshot kinds, with its proto enum's values."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    name: str
    parent: str
    kind: Kind
    labels: dict[str, str]
    created: float
    """Unix seconds, as ``updated``."""
    updated: float


@dataclass(frozen=True)
class Usage:
    size: int
    """Bytes of disk (blocks) taken."""
    inodes: int


NO_USAGE = Usage(0, 0)


@dataclass(frozen=True)
class Record:
    """A snapshot's row: its Info, and what only the snapshotter sees."""

    id: int
    info: Info
    usage: Usage
    chain: str | None
    """The layer cache's ChainID whose directory is this snapshot's filesystem, if any."""


def fields(info: Info) -> Lookup:
    """The fields a Walk filter sees (containerd's ``adaptSnapshot``): name, parent, kind and
    ``labels.<key>`` (a key with dots may also be written as several parts)."""

    def lookup(path: tuple[str, ...]) -> str | None:
        head = path[0]
        if head == "name":
            return info.name
        if head == "parent":
            return info.parent
        if head == "kind":
            return None if info.kind is Kind.UNKNOWN else info.kind.name.lower()
        if head == "labels":
            return info.labels.get(".".join(path[1:]))
        return None

    return lookup


def check_name(name: str, subject: str | None = None, what: str = "name") -> None:
    """SnapshotInvalid unless ``name`` can be a key or name: 1 to 4096 bytes of UTF-8 without NUL.
    The error names ``subject`` (``name`` itself by default) and calls ``name`` ``what``."""
    if not isinstance(name, str):
        raise SnapshotInvalid(None, f"a snapshot {what} must be a string, not {type(name).__name__}")
    subject = name if subject is None else subject
    if not name:
        raise SnapshotInvalid(subject, f"{what} is empty")
    if "\0" in name:
        raise SnapshotInvalid(subject, f"{what} contains NUL")
    size = _utf8_size(subject, name, what)
    if size > MAX_NAME_BYTES:
        raise SnapshotInvalid(subject, f"{what} is {size} bytes, more than {MAX_NAME_BYTES}")


def check_labels(subject: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The labels to store (empty values mean unset, as in containerd), or SnapshotInvalid where
    one is too large or there are too many."""
    if len(labels) > MAX_LABELS:
        raise SnapshotInvalid(subject, f"{len(labels)} labels, more than {MAX_LABELS}")
    kept: dict[str, str] = {}
    total = 0
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SnapshotInvalid(subject, "label keys and values must be strings")
        what = f"label {quote(key, 64)}"
        size = _utf8_size(subject, key, what) + _utf8_size(subject, value, what)
        if size > MAX_LABEL_BYTES:
            raise SnapshotInvalid(subject, f"{what}: key and value are {size} bytes, more than {MAX_LABEL_BYTES}")
        total += size
        if value:
            kept[key] = value
    if total > MAX_LABELS_BYTES:
        raise SnapshotInvalid(subject, f"labels of {total} bytes, more than {MAX_LABELS_BYTES}")
    return kept


def _utf8_size(subject: str, text: str, what: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise SnapshotInvalid(subject, f"{what} is not valid Unicode (a lone surrogate)") from None


class MetaStore:
    """The metadata database at ``path``; :meth:`read` and :meth:`write` are its transactions."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))  # SQLite's files take this mode
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                path, timeout=30, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise self._failed(e) from e
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self.write() as tx:
                if (check := tx.conn.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")
                version = tx.conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise SnapshotPrecondition(
                        None, f"snapshot metadata {path} has format {version}, newer than the {SCHEMA_VERSION} "
                              "this fastpull knows: run a newer fastpull")
                if version == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            tx.conn.execute(statement)
                    tx.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException as e:
            self.close()
            if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
                raise SnapshotError(None, f"snapshot metadata {path} is corrupt ({e}): to recover, move it aside "
                                          f"(mv {path} {path}.corrupt) and start again; the snapshots containerd "
                                          "holds in this snapshotter are then lost: remove their images and pull "
                                          "them again") from e
            if isinstance(e, sqlite3.Error):
                raise self._failed(e) from e
            raise

    @contextmanager
    def read(self) -> Iterator[Tx]:
        with self._transaction("BEGIN", commit=False) as tx:
            yield tx

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A transaction holding SQLite's write lock from the start; committed if the block ends normally."""
        with self._transaction("BEGIN IMMEDIATE", commit=True) as tx:
            yield tx

    @contextmanager
    def _transaction(self, begin: str, *, commit: bool) -> Iterator[Tx]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise SnapshotPrecondition(None, f"snapshot metadata {self.path} is closed")
            try:
                conn.execute(begin)
                try:
                    yield Tx(conn)
                    conn.execute("COMMIT" if commit else "ROLLBACK")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                raise self._failed(e) from e

    def _failed(self, e: Exception) -> SnapshotError:
        return SnapshotError(None, f"snapshot metadata {self.path}: {e}")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class Tx:
    """One transaction's operations, each checking as containerd's storage does."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def find(self, name: str) -> Record | None:
        check_name(name)
        row = self.conn.execute(_SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return None if row is None else self._record(row, self._labels(row[0]))

    def get(self, name: str) -> Record:
        record = self.find(name)
        if record is None:
            raise SnapshotNotFound(name, "does not exist")
        return record

    def get_mountable(self, key: str) -> Record:
        """The active or view snapshot ``key``."""
        record = self.get(key)
        if record.info.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise SnapshotPrecondition(key, f"is {record.info.kind.name.lower()}: only active and view snapshots mount")
        return record

    def parent_ids(self, snapshot_id: int) -> list[int]:
        """The ids of the snapshot's ancestors, its parent first."""
        rows = self.conn.execute(
            "WITH RECURSIVE up(id, parent_id, depth) AS ("
            " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
            " UNION ALL SELECT s.id, s.parent_id, up.depth + 1 FROM snapshots s JOIN up ON s.id = up.parent_id)"
            " SELECT id FROM up WHERE depth > 0 ORDER BY depth", (snapshot_id,))
        return [row[0] for row in rows]

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str], *,
               chain: str | None = None, usage: Usage = NO_USAGE) -> Record:
        """A new snapshot on the committed ``parent`` (none if ``""``): active or view, or committed
        onto the layer cache's ``chain``."""
        check_name(key)
        if (kind is Kind.COMMITTED) != (chain is not None) or kind is Kind.UNKNOWN:
            raise SnapshotInvalid(key, f"cannot create a {kind.name.lower()} snapshot")
        labels = check_labels(key, labels)
        parent_id = None
        if parent:
            check_name(parent, key, f"parent {quote(parent)}")
            found = self.find(parent)
            if found is None:
                raise SnapshotNotFound(key, f"parent {quote(parent)} does not exist")
            if found.info.kind is not Kind.COMMITTED:
                raise SnapshotInvalid(key, f"parent {quote(parent)} is not a committed snapshot")
            parent_id = found.id
        if self._exists(key):
            raise SnapshotExists(key, "already exists")
        now = time.time()
        cursor = self.conn.execute(
            "INSERT INTO snapshots (name, parent_id, kind, chain, created, updated, size, inodes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (key, parent_id, int(kind), chain, now, now, usage.size, usage.inodes))
        snapshot_id = cursor.lastrowid
        assert snapshot_id is not None
        self._set_labels(snapshot_id, labels)
        return Record(snapshot_id, Info(key, parent, kind, labels, now, now), usage, chain)

    def committable(self, key: str, name: str) -> Record:
        """The active snapshot ``key``, checked for a commit under ``name`` (containerd's order:
        the name taken, then the key missing, then not active)."""
        check_name(name)
        if self._exists(name):
            raise SnapshotExists(name, "already exists")
        record = self.get(key)
        if record.info.kind is not Kind.ACTIVE:
            raise SnapshotPrecondition(key, f"is {record.info.kind.name.lower()}, not active: only active snapshots commit")
        return record

    def commit(self, active: Record, name: str, labels: Mapping[str, str], usage: Usage) -> Record:
        """``active`` (from :meth:`committable`) committed as ``name``, same id, labels replaced."""
        labels = check_labels(name, labels)
        now = time.time()
        self.conn.execute("UPDATE snapshots SET name = ?, kind = ?, created = ?, updated = ?, size = ?, inodes = ?"
                          " WHERE id = ?", (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, active.id))
        self._set_labels(active.id, labels)
        info = dataclasses.replace(active.info, name=name, kind=Kind.COMMITTED, labels=labels, created=now, updated=now)
        return Record(active.id, info, usage, active.chain)

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        """Change labels only: ``labels`` replaces them all, ``labels.<key>`` one (an absent or
        empty value unsets it), no field paths at all replace them all; any other path is refused."""
        record = self.get(info.name)
        labels = dict(record.info.labels)
        for path in fieldpaths:
            if path.startswith("labels."):
                key = path.removeprefix("labels.")
                labels[key] = info.labels.get(key, "")
            elif path == "labels":
                labels = dict(info.labels)
            else:
                raise SnapshotInvalid(info.name, f"cannot update field {quote(path)}: only labels change")
        if not fieldpaths:
            labels = dict(info.labels)
        labels = check_labels(info.name, labels)
        now = time.time()
        self.conn.execute("UPDATE snapshots SET updated = ? WHERE id = ?", (now, record.id))
        self._set_labels(record.id, labels)
        return dataclasses.replace(record.info, labels=labels, updated=now)

    def remove(self, key: str) -> Record:
        record = self.get(key)
        child = self.conn.execute("SELECT name FROM snapshots WHERE parent_id = ? LIMIT 1", (record.id,)).fetchone()
        if child is not None:
            raise SnapshotPrecondition(key, f"cannot remove snapshot with child {quote(child[0])}")
        self.conn.execute("DELETE FROM snapshots WHERE id = ?", (record.id,))
        return record

    def records(self) -> list[Record]:
        labels: dict[int, dict[str, str]] = {}
        for snapshot_id, key, value in self.conn.execute("SELECT snapshot_id, key, value FROM labels"):
            labels.setdefault(snapshot_id, {})[key] = value
        return [self._record(row, labels.get(row[0], {})) for row in self.conn.execute(_SELECT + " ORDER BY s.id")]

    def ids(self) -> set[int]:
        return {row[0] for row in self.conn.execute("SELECT id FROM snapshots")}

    def chains(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT DISTINCT chain FROM snapshots WHERE chain IS NOT NULL")}

    def chain_usage(self, chain: str) -> Usage | None:
        """The usage recorded for the layer ``chain`` by a snapshot already committed onto it."""
        row = self.conn.execute("SELECT size, inodes FROM snapshots WHERE chain = ? LIMIT 1", (chain,)).fetchone()
        return None if row is None else Usage(*row)

    def _exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM snapshots WHERE name = ?", (name,)).fetchone() is not None

    def _labels(self, snapshot_id: int) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM labels WHERE snapshot_id = ?", (snapshot_id,)))

    def _set_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        self.conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        self.conn.executemany("INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
                              ((snapshot_id, k, v) for k, v in labels.items()))

    @staticmethod
    def _record(row: tuple, labels: dict[str, str]) -> Record:
        snapshot_id, name, parent, kind, chain, created, updated, size, inodes = row
        return Record(snapshot_id, Info(name, parent or "", Kind(kind), labels, created, updated),
                      Usage(size, inodes), chain)
