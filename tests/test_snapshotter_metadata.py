"""The snapshot metadata (fastpull.snapshotter.metadata): containerd's storage rules on SQLite,
its format version, durability settings, limits, and transactions that leave nothing behind."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from fastpull.errors import SnapshotError, SnapshotExists, SnapshotInvalid, SnapshotNotFound, SnapshotPrecondition
from fastpull.snapshotter.metadata import (
    MAX_LABEL_BYTES,
    MAX_LABELS,
    MAX_NAME_BYTES,
    SCHEMA_VERSION,
    Info,
    Kind,
    MetaStore,
    Usage,
    check_labels,
    check_name,
)

CHAIN = "sha256:" + "c" * 64


@pytest.fixture
def store(tmp_path):
    db = MetaStore(tmp_path / "metadata.db")
    yield db
    db.close()


def _chain(store):
    """c1 <- c2 committed; a1 active and v1 view on c2."""
    with store.write() as tx:
        tx.create(Kind.ACTIVE, "c1-a", "", {})
        tx.commit(tx.committable("c1-a", "c1"), "c1", {}, Usage(10, 1))
        tx.create(Kind.ACTIVE, "c2-a", "c1", {})
        tx.commit(tx.committable("c2-a", "c2"), "c2", {}, Usage(20, 2))
        tx.create(Kind.ACTIVE, "a1", "c2", {"l": "1"})
        tx.create(Kind.VIEW, "v1", "c2", {})


def test_a_new_database_is_wal_with_full_sync_and_the_current_format(store, tmp_path):
    with store.read() as tx:
        assert tx.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert tx.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert tx.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert (tmp_path / "metadata.db").stat().st_mode & 0o777 == 0o600


def test_a_newer_format_is_refused_by_name(tmp_path):
    path = tmp_path / "metadata.db"
    MetaStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SnapshotPrecondition, match=f"format {SCHEMA_VERSION + 1}, newer"):
        MetaStore(path)


def test_a_file_that_is_no_database_is_a_snapshot_error(tmp_path):
    path = tmp_path / "metadata.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(SnapshotError, match="metadata.db"):
        MetaStore(path)


def test_everything_survives_a_reopen(tmp_path):
    store = MetaStore(tmp_path / "metadata.db")
    _chain(store)
    with store.read() as tx:
        before = tx.records()
    store.close()
    store = MetaStore(tmp_path / "metadata.db")
    with store.read() as tx:
        assert tx.records() == before
        assert tx.parent_ids(tx.get("a1").id) == [tx.get("c2").id, tx.get("c1").id]
    store.close()


def test_parents_nearest_first_and_commit_keeps_the_id(store):
    _chain(store)
    with store.read() as tx:
        c1, c2, a1 = tx.get("c1"), tx.get("c2"), tx.get("a1")
        assert tx.parent_ids(a1.id) == [c2.id, c1.id]
        assert tx.parent_ids(c1.id) == []
        assert (c2.info.parent, c2.info.kind, c2.usage) == ("c1", Kind.COMMITTED, Usage(20, 2))
        assert a1.info.labels == {"l": "1"}
    with store.write() as tx:
        active = tx.committable("a1", "c3")
        committed = tx.commit(active, "c3", {"new": "x"}, Usage(1, 1))
    with store.read() as tx:
        assert tx.get("c3").id == active.id == committed.id
        assert tx.get("c3").info.labels == {"new": "x"}  # replaced, not inherited
        assert tx.find("a1") is None


ERRORS = [
    # (what, call on a Tx after _chain, expected)
    ("create on a missing parent", lambda tx: tx.create(Kind.ACTIVE, "k", "nope", {}), SnapshotNotFound),
    ("create on an active parent", lambda tx: tx.create(Kind.ACTIVE, "k", "a1", {}), SnapshotInvalid),
    ("create on a view parent", lambda tx: tx.create(Kind.VIEW, "k", "v1", {}), SnapshotInvalid),
    ("create a taken key", lambda tx: tx.create(Kind.ACTIVE, "a1", "", {}), SnapshotExists),
    ("create a taken key on a missing parent: parent first",
     lambda tx: tx.create(Kind.ACTIVE, "a1", "nope", {}), SnapshotNotFound),
    ("create a committed without a layer", lambda tx: tx.create(Kind.COMMITTED, "k", "", {}), SnapshotInvalid),
    ("commit to a taken name", lambda tx: tx.committable("a1", "c1"), SnapshotExists),
    ("commit a missing key to a taken name: name first", lambda tx: tx.committable("nope", "c1"), SnapshotExists),
    ("commit a missing key", lambda tx: tx.committable("nope", "k"), SnapshotNotFound),
    ("commit a view", lambda tx: tx.committable("v1", "k"), SnapshotPrecondition),
    ("commit a committed", lambda tx: tx.committable("c2", "k"), SnapshotPrecondition),
    ("remove a missing", lambda tx: tx.remove("nope"), SnapshotNotFound),
    ("remove with an active child", lambda tx: tx.remove("c2"), SnapshotPrecondition),
    ("remove with a committed child", lambda tx: tx.remove("c1"), SnapshotPrecondition),
    ("mount a committed", lambda tx: tx.get_mountable("c1"), SnapshotPrecondition),
    ("get a missing", lambda tx: tx.get("nope"), SnapshotNotFound),
    ("update a missing", lambda tx: tx.update(Info("nope", "", Kind.ACTIVE, {}, 0, 0), []), SnapshotNotFound),
    ("update the parent", lambda tx: tx.update(Info("a1", "x", Kind.ACTIVE, {}, 0, 0), ["parent"]),
     SnapshotInvalid),
    ("update a label and the kind", lambda tx: tx.update(Info("a1", "", Kind.VIEW, {}, 0, 0), ["labels.x", "kind"]),
     SnapshotInvalid),
    ("an empty key", lambda tx: tx.get(""), SnapshotInvalid),
    ("a key with NUL", lambda tx: tx.get("a\0b"), SnapshotInvalid),
    ("a key with a lone surrogate", lambda tx: tx.get("a\ud800"), SnapshotInvalid),
    ("a key too long", lambda tx: tx.get("k" * (MAX_NAME_BYTES + 1)), SnapshotInvalid),
    ("a parent with NUL", lambda tx: tx.create(Kind.ACTIVE, "k", "\0", {}), SnapshotInvalid),
]


@pytest.mark.parametrize(("call", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_as_containerd_storage(store, call, expected):
    _chain(store)
    with store.read() as tx:
        before = tx.records()
    with pytest.raises(expected):
        with store.write() as tx:
            call(tx)
    with store.read() as tx:
        assert tx.records() == before  # the failed transaction changed nothing


def test_a_failing_transaction_rolls_back_its_earlier_writes(store):
    with pytest.raises(SnapshotExists):
        with store.write() as tx:
            tx.create(Kind.ACTIVE, "first", "", {})
            tx.create(Kind.ACTIVE, "first", "", {})
    with store.read() as tx:
        assert tx.records() == []


def test_update_as_containerd_check_update(store):
    """containerd's testsuite checkUpdate: only labels change, and ``updated`` moves."""
    _chain(store)
    with store.read() as tx:
        original = tx.get("a1").info
    expected = {"l1": "v1", "l2": "v2", "l3": "v3"}
    given = Info("a1", "doesnotexist", Kind.VIEW, expected, 1.0, 1.0)
    with store.write() as tx:
        info = tx.update(given, [])
    assert (info.parent, info.kind, info.created, info.labels) == ("c2", Kind.ACTIVE, original.created, expected)
    assert info.updated >= original.updated
    with store.write() as tx:
        info = tx.update(Info("a1", "", Kind.ACTIVE, {"l1": "updated", "l4": "v4"}, 0, 0), ["labels.l1", "labels.l2"])
    assert info.labels == {"l1": "updated", "l3": "v3"}
    with store.write() as tx:
        info = tx.update(Info("a1", "", Kind.ACTIVE, {"l4": "v4", "empty": ""}, 0, 0), ["labels"])
    assert info.labels == {"l4": "v4"}  # an empty value is no label
    with store.read() as tx:
        assert tx.get("a1").info == info


LABELS = [
    # (labels, refused)
    ({"k": "v" * (MAX_LABEL_BYTES - 1)}, False),
    ({"k": "v" * MAX_LABEL_BYTES}, True),
    ({"é": "v" * (MAX_LABEL_BYTES - 2)}, False),
    ({"é": "v" * (MAX_LABEL_BYTES - 1)}, True),  # bytes, not characters
    ({f"k{i}": "v" for i in range(MAX_LABELS)}, False),
    ({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, True),
    ({f"k{i}": "v" * 4000 for i in range(100)}, True),  # 400 kB in all
    ({"k": "\ud800"}, True),
    ({"k": "with\0nul"}, False),
]


@pytest.mark.parametrize(("labels", "refused"), LABELS)
def test_label_limits(labels, refused):
    if refused:
        with pytest.raises(SnapshotInvalid, match='snapshot "s": .*label'):
            check_labels("s", labels)
    else:
        assert check_labels("s", labels) == labels


def test_labels_with_any_text_round_trip(store):
    labels = {"containerd.io/gc.ref.snapshot.overlayfs/0": "x", "nul\0key": "nul\0value", "é": "ü"}
    with store.write() as tx:
        tx.create(Kind.ACTIVE, "k", "", labels)
    with store.read() as tx:
        assert tx.get("k").info.labels == labels


def test_names_up_to_the_limit_are_fine_and_messages_cut_them(store):
    check_name("k" * MAX_NAME_BYTES)
    with pytest.raises(SnapshotInvalid) as refused:
        check_name("k" * 65536)
    assert len(str(refused.value)) < 300


def test_ids_are_never_reused(store):
    with store.write() as tx:
        first = tx.create(Kind.ACTIVE, "a", "", {})
    with store.write() as tx:
        tx.remove("a")
    with store.write() as tx:
        assert tx.create(Kind.ACTIVE, "a", "", {}).id > first.id


def test_layer_chains_and_their_usage(store):
    with store.write() as tx:
        tx.create(Kind.COMMITTED, "ns1/l", "", {}, chain=CHAIN, usage=Usage(100, 5))
        tx.create(Kind.COMMITTED, "ns2/l", "", {}, chain=CHAIN, usage=Usage(100, 5))
        tx.create(Kind.ACTIVE, "a", "ns1/l", {})
    with store.read() as tx:
        assert tx.chains() == {CHAIN}
        assert tx.chain_usage(CHAIN) == Usage(100, 5)
        assert tx.chain_usage("sha256:" + "d" * 64) is None
    with store.write() as tx:
        tx.remove("a")
        tx.remove("ns1/l")
        tx.remove("ns2/l")
    with store.read() as tx:
        assert tx.chains() == set()


def test_threads_share_the_store(store):
    barrier = threading.Barrier(8)
    errors = []

    def work(n):
        barrier.wait()
        try:
            for i in range(20):
                with store.write() as tx:
                    tx.create(Kind.ACTIVE, f"t{n}-{i}", "", {"n": str(n)})
                with store.read() as tx:
                    assert tx.get(f"t{n}-{i}").info.labels == {"n": str(n)}
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with store.read() as tx:
        assert len(tx.ids()) == 160


def test_a_closed_store_refuses_and_closes_twice(tmp_path):
    store = MetaStore(tmp_path / "metadata.db")
    store.close()
    store.close()
    with pytest.raises(SnapshotPrecondition, match="closed"):
        with store.read():
            pass
