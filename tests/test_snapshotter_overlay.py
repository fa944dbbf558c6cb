"""The overlay snapshotter (fastpull.snapshotter.overlay) against containerd's snapshotter
testsuite (core/snapshots/testsuite), mirrored: the cases that need mounts mount for real (as
root; skipped, saying why, where overlay mounts fail), plus a table of error codes, snapshots
committed onto the layer cache, hostile keys, restarts and crashes at each step.

The error table (``CASES``) is data, run by ``drive`` against any object with the snapshotter's
methods, so the same table can be pointed at the gRPC socket."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastpull.errors import (
    SnapshotError,
    SnapshotExists,
    SnapshotInvalid,
    SnapshotNotFound,
    SnapshotPrecondition,
    UnpackError,
)
from fastpull.snapshotter import Info, Kind, Mount, OverlaySnapshotter, Usage
from fastpull.snapshotter.filters import quote as filter_quote
from fastpull.snapshotter.overlay import disk_usage
from fastpull.unpack.rootfs import remove_tree
from fastpull.unpack.snapshots import Snapshotter, chain_ids

ROOT = Path(__file__).resolve().parents[1]
CHAINS = chain_ids([f"sha256:{i:064x}" for i in range(1, 129)])
REF = "containerd.io/snapshot.ref"


@pytest.fixture
def snapshotter(tmp_path):
    with OverlaySnapshotter(tmp_path / "root", Snapshotter(tmp_path / "layers")) as sn:
        yield sn


def cache_layer(layers: Snapshotter, chain: str, ops=(("file", "/f", b"layer\n", 0o644),)) -> Path:
    """Put the layer ``chain`` in the cache, built by ``ops`` (see ``apply``)."""
    writer = layers.prepare(chain)
    assert writer is not None
    apply(writer.path, ops)
    return writer.commit()


# ---- the error table: data, and a driver for any snapshotter-shaped object ---------------------

def prepare(key, parent="", labels=None):
    return ("prepare", key, parent, labels or {})


def view(key, parent="", labels=None):
    return ("view", key, parent, labels or {})


def commit(name, key, labels=None):
    return ("commit", name, key, labels or {})


def commit_layer(name, parent, chain, labels=None):
    return ("commit_layer", name, parent, chain, labels or {})


def update(name, fieldpaths=(), labels=None):
    return ("update", Info(name, "", Kind.UNKNOWN, labels or {}, 0.0, 0.0), list(fieldpaths))


def layer(chain):
    """Not a snapshotter call: put ``chain`` in the layer cache."""
    return ("layer", chain)


def call(op, *args):
    return (op, *args)


def drive(sn, step):
    """Run one step of a case on ``sn``; ``walk`` is consumed, ``layer`` fills ``sn.layers``."""
    op, *args = step
    if op == "walk":
        return list(sn.walk(*args))
    if op == "layer":
        return cache_layer(sn.layers, *args)
    return getattr(sn, op)(*args)


@dataclass(frozen=True)
class Case:
    name: str
    setup: tuple[tuple, ...]
    step: tuple
    raises: type[SnapshotError] | None = None


BASE = (prepare("a0"), commit("c1", "a0"), prepare("a1", "c1"), view("v1", "c1"))
"""c1 committed, a1 active and v1 a view on it."""
BIG = "k" * 65536

CASES = [
    Case("prepare on a missing parent", BASE, prepare("k", "nope"), SnapshotNotFound),
    Case("prepare on an active parent", BASE, prepare("k", "a1"), SnapshotInvalid),
    Case("prepare on a view", BASE, prepare("k", "v1"), SnapshotInvalid),
    Case("prepare a taken key", BASE, prepare("a1", "c1"), SnapshotExists),
    Case("prepare a committed name", BASE, prepare("c1"), SnapshotExists),
    Case("view a taken key", BASE, view("v1", "c1"), SnapshotExists),
    Case("view on a missing parent", BASE, view("k", "nope"), SnapshotNotFound),
    Case("view with no parent", (), view("k"), None),
    Case("prepare an empty key", (), prepare(""), SnapshotInvalid),
    Case("prepare a key with NUL", (), prepare("a\0b"), SnapshotInvalid),
    Case("prepare a 64 KiB key", (), prepare(BIG), SnapshotInvalid),
    Case("prepare a 4 KiB key", (), prepare("k" * 4096), None),
    Case("commit a missing key", BASE, commit("k", "nope"), SnapshotNotFound),
    Case("commit to a taken name", BASE, commit("c1", "a1"), SnapshotExists),
    Case("commit a missing key to a taken name", BASE, commit("c1", "nope"), SnapshotExists),
    Case("commit under its own key", BASE, commit("a1", "a1"), SnapshotExists),
    Case("commit a view", BASE, commit("k", "v1"), SnapshotPrecondition),
    Case("commit a committed", BASE, commit("k", "c1"), SnapshotPrecondition),
    Case("commit an active", BASE, commit("k", "a1"), None),
    Case("remove a missing", BASE, call("remove", "nope"), SnapshotNotFound),
    Case("remove a parent of an active", BASE[:3], call("remove", "c1"), SnapshotPrecondition),
    Case("remove a parent of a view", (*BASE[:2], view("v1", "c1")), call("remove", "c1"), SnapshotPrecondition),
    Case("remove a parent of a committed", (*BASE[:3], commit("c2", "a1")), call("remove", "c1"),
         SnapshotPrecondition),
    Case("remove an active", BASE, call("remove", "a1"), None),
    Case("remove a view", BASE, call("remove", "v1"), None),
    Case("reuse a removed key", (*BASE, call("remove", "a1")), prepare("a1", "c1"), None),
    Case("mounts of a committed", BASE, call("mounts", "c1"), SnapshotPrecondition),
    Case("mounts of a missing", BASE, call("mounts", "nope"), SnapshotNotFound),
    Case("mounts of a view", BASE, call("mounts", "v1"), None),
    Case("stat a missing", BASE, call("stat", "nope"), SnapshotNotFound),
    Case("stat a key with NUL", BASE, call("stat", "\0"), SnapshotInvalid),
    Case("usage of a missing", BASE, call("usage", "nope"), SnapshotNotFound),
    Case("update a missing", BASE, update("nope"), SnapshotNotFound),
    Case("update the parent", BASE, update("a1", ["parent"]), SnapshotInvalid),
    Case("update the name", BASE, update("a1", ["name"]), SnapshotInvalid),
    Case("update the kind after a label", BASE, update("a1", ["labels.x", "kind"]), SnapshotInvalid),
    Case("update the created time", BASE, update("c1", ["created"]), SnapshotInvalid),
    Case("update a label", BASE, update("c1", ["labels.x"], {"x": "y"}), None),
    Case("a label at the limit", (), prepare("k", labels={"k": "v" * 4095}), None),
    Case("a label over the limit", (), prepare("k", labels={"k": "v" * 4096}), SnapshotInvalid),
    Case("too many labels", (), prepare("k", labels={str(i): "v" for i in range(1025)}), SnapshotInvalid),
    Case("labels too large in all", (), view("k", labels={str(i): "v" * 4000 for i in range(100)}), SnapshotInvalid),
    Case("commit with a label over the limit", BASE, commit("k", "a1", {"k": "v" * 4096}), SnapshotInvalid),
    Case("update to a label over the limit", BASE, update("c1", ["labels.k"], {"k": "v" * 4096}), SnapshotInvalid),
    Case("walk with a malformed filter", BASE, call("walk", ["name=="]), SnapshotInvalid),
    Case("walk with a bad regular expression", BASE, call("walk", ["name~=("]), SnapshotInvalid),
    Case("commit a layer missing from the cache", (), commit_layer("l", "", CHAINS[0]), SnapshotNotFound),
    Case("commit a layer by a bad chain id", (), commit_layer("l", "", "sha256:../../x"), SnapshotInvalid),
    Case("commit a layer on a missing parent", (layer(CHAINS[0]),), commit_layer("l", "nope", CHAINS[0]),
         SnapshotNotFound),
    Case("commit a layer on an active parent", (*BASE, layer(CHAINS[0])), commit_layer("l", "a1", CHAINS[0]),
         SnapshotInvalid),
    Case("commit a layer again", (layer(CHAINS[0]), commit_layer("l", "", CHAINS[0])),
         commit_layer("l", "", CHAINS[0]), None),
    Case("commit a layer again on another parent", (*BASE, layer(CHAINS[0]), commit_layer("l", "", CHAINS[0])),
         commit_layer("l", "c1", CHAINS[0]), SnapshotExists),
    Case("commit a layer under an active's key", (*BASE, layer(CHAINS[0])), commit_layer("a1", "c1", CHAINS[0]),
         SnapshotExists),
    Case("commit a layer under a local commit's name", (*BASE, layer(CHAINS[0])),
         commit_layer("c1", "", CHAINS[0]), SnapshotExists),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_codes(snapshotter, case):
    for step in case.setup:
        drive(snapshotter, step)
    if case.raises is None:
        drive(snapshotter, case.step)
        return
    with pytest.raises(case.raises) as refused:
        drive(snapshotter, case.step)
    assert type(refused.value) is case.raises
    assert len(str(refused.value)) < 1000  # client strings are cut
    if case.step[0] not in ("walk", "update"):
        assert str(refused.value).startswith("snapshot ")


# ---- containerd's testsuite, mirrored: metadata ------------------------------------------------

def test_stat_active(snapshotter):
    snapshotter.prepare("preparing", "", {})
    info = snapshotter.stat("preparing")
    assert (info.name, info.kind, info.parent) == ("preparing", Kind.ACTIVE, "")


def test_stat_committed(snapshotter):
    snapshotter.prepare("preparing", "", {})
    snapshotter.commit("committed", "preparing", {})
    info = snapshotter.stat("committed")
    assert (info.name, info.kind, info.parent) == ("committed", Kind.COMMITTED, "")
    with pytest.raises(SnapshotNotFound):
        snapshotter.stat("preparing")


def test_transitivity(snapshotter):
    snapshotter.prepare("preparing", "", {})
    snapshotter.commit("snapA", "preparing", {})
    snapshotter.prepare("next", "snapA", {})
    snapshotter.commit("snapB", "next", {})
    b = snapshotter.stat("snapB")
    assert b.parent == "snapA"
    assert snapshotter.stat(b.parent).parent == ""


def test_prepare_and_view_refuse_a_taken_key(snapshotter):
    snapshotter.prepare("preparing", "", {})
    snapshotter.commit("snapA", "preparing", {})
    for first, second in ((prepare, view), (prepare, prepare), (view, view)):
        key = f"{first.__name__}-{second.__name__}"
        drive(snapshotter, first(key, "snapA"))
        with pytest.raises(SnapshotExists):
            drive(snapshotter, second(key, "snapA"))


def _base_snapshots(sn):
    """c1 <- c2 committed; a1 active on c2, a2 active alone; v1 a view of c2, v2 alone."""
    for step in (prepare("c1-a"), commit("c1", "c1-a"), prepare("c2-a", "c1"), commit("c2", "c2-a"),
                 prepare("a1", "c2"), prepare("a2"), view("v1", "c2"), view("v2")):
        drive(sn, step)


@pytest.mark.parametrize(("name", "kind", "parent"), [
    ("c1", Kind.COMMITTED, ""), ("c2", Kind.COMMITTED, "c1"), ("a1", Kind.ACTIVE, "c2"),
    ("a2", Kind.ACTIVE, ""), ("v1", Kind.VIEW, "c2"), ("v2", Kind.VIEW, ""),
])
def test_update(snapshotter, name, kind, parent):
    _base_snapshots(snapshotter)
    st = snapshotter.stat(name)
    assert (st.kind, st.parent, st.created) == (kind, parent, st.updated)
    expected = {"l1": "v1", "l2": "v2", "l3": "v3", "containerd.io/gc.root": "now"}
    st = snapshotter.update(Info(name, "doesnotexist", st.kind, expected, st.created, st.updated), [])
    assert (st.kind, st.parent, st.labels) == (kind, parent, expected)
    assert st.updated >= st.created == snapshotter.stat(name).created
    st = snapshotter.update(Info(name, "", kind, {"l1": "updated", "l4": "v4"}, 0, 0), ["labels.l1", "labels.l2"])
    assert st.labels == {"l1": "updated", "l3": "v3", "containerd.io/gc.root": "now"}
    keep = {"l4": "v4", "containerd.io/gc.root": "now"}
    assert snapshotter.update(Info(name, "", kind, keep, 0, 0), ["labels"]).labels == keep
    with pytest.raises(SnapshotInvalid):
        snapshotter.update(Info(name, "doesnotexist", kind, keep, 0, 0), ["parent"])
    assert snapshotter.stat(name).labels == keep


def test_remove_and_reuse_keys(snapshotter):
    for step in (prepare("committed-a"), commit("committed-1", "committed-a"), prepare("reuse-1", "committed-1"),
                 call("remove", "reuse-1"), view("reuse-1", "committed-1"), call("remove", "reuse-1"),
                 prepare("reuse-1"), call("remove", "committed-1"), commit("committed-1", "reuse-1")):
        drive(snapshotter, step)
    assert snapshotter.stat("committed-1").kind is Kind.COMMITTED


def test_remove_intermediate_snapshot(snapshotter):
    for step in (prepare("base"), commit("committed-base", "base"), prepare("intermediate", "committed-base"),
                 commit("committed-inter", "intermediate"), prepare("top", "committed-inter")):
        drive(snapshotter, step)
    with pytest.raises(SnapshotPrecondition, match="remove"):
        snapshotter.remove("committed-inter")
    for key in ("top", "committed-inter", "committed-base"):
        snapshotter.remove(key)
    assert os.listdir(snapshotter.snapshots) == []


WALK = [
    (["labels.\"containerd.io/gc.root\"==check-walk"], ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
    (["kind==active,labels.\"containerd.io/gc.root\"==check-walk"], ["a-np", "a", "a-wl", "a-np-wl"]),
    (["kind==view,labels.\"containerd.io/gc.root\"==check-walk"], ["v", "v-wl"]),
    (["kind==committed,labels.\"containerd.io/gc.root\"==check-walk"], ["p", "p-wl"]),
    (["name==p", "name==a-np-wl"], ["p", "a-np-wl"]),
    (["name==a-wl,labels.l"], ["a-wl"]),
    (["parent==p"], ["a", "v"]),
    (["parent!=\"\",labels.\"containerd.io/gc.root\"==check-walk"], ["a", "v", "a-wl", "v-wl"]),
    (["labels.l"], ["p-wl", "a-wl", "v-wl", "a-np-wl"]),
    (["labels.l==2"], ["a-wl", "a-np-wl"]),
    ([], ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
]


def test_walk(snapshotter):
    root = {"containerd.io/gc.root": "check-walk"}
    for step in (prepare("a-np", labels=root), prepare("p-tmp", labels=root), commit("p", "p-tmp", root),
                 prepare("a", "p", root), view("v", "p", root), prepare("p-wl-tmp", labels=root),
                 commit("p-wl", "p-wl-tmp", {"l": "1", **root}), prepare("a-wl", "p-wl", {"l": "2", **root}),
                 view("v-wl", "p-wl", {"l": "3", **root}), prepare("a-np-wl", labels={"l": "2", **root})):
        drive(snapshotter, step)
    for filters, matches in WALK:
        assert sorted(i.name for i in snapshotter.walk(filters)) == sorted(matches), filters


def test_stat_in_walk(snapshotter):
    _base_snapshots(snapshotter)
    walked = list(snapshotter.walk([]))
    assert len(walked) == 6
    for info in snapshotter.walk([]):
        assert snapshotter.stat(info.name) == info


def test_close_twice(snapshotter):
    snapshotter.prepare("closeTwice-prepare", "", {})
    snapshotter.commit("closeTwice", "closeTwice-prepare", {})
    snapshotter.remove("closeTwice")
    snapshotter.close()
    snapshotter.close()


# ---- mounts: containerd's forms, and usage -----------------------------------------------------

def test_mounts_are_containerd_overlay_mounts(snapshotter):
    sn = snapshotter

    def fs(n):
        return str(sn.snapshots / str(n) / "fs")

    extra = sn.overlay_options
    expected = [
        (prepare("a-np"), [Mount("bind", fs(1), options=("rw", "rbind"))]),
        (view("v-np"), [Mount("bind", fs(2), options=("ro", "rbind"))]),
        (prepare("p-a"), [Mount("bind", fs(3), options=("rw", "rbind"))]),
        (commit("p", "p-a"), None),
        (view("v1", "p"), [Mount("bind", fs(3), options=("ro", "rbind"))]),
        (prepare("a1", "p"), [Mount("overlay", "overlay", options=(
            f"workdir={sn.snapshots / '5' / 'work'}", f"upperdir={fs(5)}", f"lowerdir={fs(3)}", *extra))]),
        (commit("q", "a1"), None),
        (view("v2", "q"), [Mount("overlay", "overlay", options=(f"lowerdir={fs(5)}:{fs(3)}", *extra))]),
        (prepare("a2", "q"), [Mount("overlay", "overlay", options=(
            f"workdir={sn.snapshots / '7' / 'work'}", f"upperdir={fs(7)}", f"lowerdir={fs(5)}:{fs(3)}", *extra))]),
    ]
    for step, mounts in expected:
        assert drive(sn, step) == mounts
        if mounts is not None:
            assert sn.mounts(step[1]) == mounts


def test_upper_and_work_directories_as_containerd_makes_them(snapshotter):
    snapshotter.prepare("a", "", {})
    snapshotter.view("v", "", {})
    active, view_dir = snapshotter.snapshots / "1", snapshotter.snapshots / "2"
    assert stat.S_IMODE((active / "fs").stat().st_mode) == 0o755
    assert stat.S_IMODE((active / "work").stat().st_mode) == 0o711
    assert sorted(os.listdir(view_dir)) == ["fs"]
    assert stat.S_IMODE(snapshotter.root.stat().st_mode) == 0o700


def test_usage_counts_blocks_and_inodes_once(snapshotter):
    snapshotter.prepare("a", "", {})
    fs = snapshotter.snapshots / "1" / "fs"
    (fs / "f").write_bytes(b"x" * 10000)
    os.link(fs / "f", fs / "hard")
    os.symlink("/usr", fs / "sym")
    (fs / "d").mkdir()
    (fs / "d" / "g").write_bytes(b"y")
    paths = [fs, fs / "f", fs / "sym", fs / "d", fs / "d" / "g"]
    expected = Usage(sum(os.lstat(p).st_blocks * 512 for p in paths), len(paths))
    assert snapshotter.usage("a") == expected
    snapshotter.commit("c", "a", {})
    assert snapshotter.usage("c") == expected
    snapshotter.view("v", "c", {})
    assert snapshotter.usage("v") == Usage(0, 0)


# ---- snapshots committed onto the layer cache --------------------------------------------------

def test_a_layer_committed_from_the_cache_is_a_link_to_it(snapshotter):
    layers = snapshotter.layers
    cached = cache_layer(layers, CHAINS[0])
    name = f"k8s.io/3/{CHAINS[0]}"
    info = snapshotter.commit_layer(name, "", CHAINS[0], {REF: CHAINS[0]})
    assert (info.name, info.parent, info.kind, info.labels) == (name, "", Kind.COMMITTED, {REF: CHAINS[0]})
    assert snapshotter.stat(name) == info
    link = snapshotter.snapshots / "1" / "fs"
    assert link.is_symlink() and link.resolve() == cached.resolve()
    assert snapshotter.usage(name) == disk_usage(cached)
    assert snapshotter.chains_in_use() == {CHAINS[0]}
    assert snapshotter.commit_layer(name, "", CHAINS[0], {REF: "other"}) == info  # done already
    assert snapshotter.view("v", name, {}) == [Mount("bind", str(link), options=("ro", "rbind"))]
    snapshotter.remove("v")
    snapshotter.remove(name)
    assert snapshotter.chains_in_use() == set()
    assert (cached / "f").read_bytes() == b"layer\n"  # the cache keeps its layer
    assert os.listdir(snapshotter.snapshots) == []


def test_a_layer_on_layers_and_two_names_for_one_layer(snapshotter):
    for chain in CHAINS[:2]:
        cache_layer(snapshotter.layers, chain)
    snapshotter.commit_layer("ns1/0", "", CHAINS[0], {})
    snapshotter.commit_layer("ns1/1", "ns1/0", CHAINS[1], {})
    snapshotter.commit_layer("ns2/0", "", CHAINS[0], {})
    assert snapshotter.usage("ns2/0") == snapshotter.usage("ns1/0")
    mounts = snapshotter.prepare("top", "ns1/1", {})
    lowers = [str(snapshotter.snapshots / n / "fs") for n in ("2", "1")]
    assert mounts[0].options[2] == "lowerdir=" + ":".join(lowers)
    with pytest.raises(SnapshotPrecondition):
        snapshotter.remove("ns1/0")
    assert snapshotter.chains_in_use() == {CHAINS[0], CHAINS[1]}


def test_concurrent_commits_of_one_layer_make_one_snapshot(snapshotter):
    cache_layer(snapshotter.layers, CHAINS[0])
    barrier = threading.Barrier(20)
    results: list = []

    def pull():
        barrier.wait()
        try:
            results.append(snapshotter.commit_layer(CHAINS[0], "", CHAINS[0], {REF: CHAINS[0]}))
        except BaseException as e:  # pragma: no cover - reported below
            results.append(e)

    threads = [threading.Thread(target=pull) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == results[0] for r in results) and isinstance(results[0], Info)
    assert [i.name for i in snapshotter.walk([])] == [CHAINS[0]]


def test_the_layer_is_recorded_while_its_lock_is_held(snapshotter, monkeypatch):
    """fastpull gc removes a layer only under its lock and only if no snapshot uses it: so the
    layer must be in use by the time commit_layer lets its lock go, and absent before."""
    layers = snapshotter.layers
    cache_layer(layers, CHAINS[0])
    seen = []
    hold = layers.hold

    @contextlib.contextmanager
    def watched(chain):
        with hold(chain):
            seen.append(("taken", snapshotter.chains_in_use()))
            yield
            seen.append(("released", snapshotter.chains_in_use()))

    monkeypatch.setattr(layers, "hold", watched)
    snapshotter.commit_layer("l", "", CHAINS[0], {})
    assert seen == [("taken", set()), ("released", {CHAINS[0]})]


def _gc(snapshotter: OverlaySnapshotter, chain: str) -> bool:
    """What fastpull gc does for one layer: remove it, under its lock, unless a snapshot uses it."""
    with snapshotter.layers.hold(chain):
        if chain in snapshotter.chains_in_use():
            return False
        remove_tree(snapshotter.layers.path(chain))
        return True


def test_gc_frees_a_layer_only_once_no_snapshot_uses_it(snapshotter):
    cache_layer(snapshotter.layers, CHAINS[0])
    snapshotter.commit_layer("l", "", CHAINS[0], {})
    assert not _gc(snapshotter, CHAINS[0])
    snapshotter.remove("l")
    assert _gc(snapshotter, CHAINS[0])
    with pytest.raises(SnapshotNotFound, match="not in the layer cache"):
        snapshotter.commit_layer("l", "", CHAINS[0], {})
    assert list(snapshotter.walk([])) == []
    assert os.listdir(snapshotter.layers.locks) == []  # the lock file goes with the hold


# ---- hostile input, restarts, crashes ----------------------------------------------------------

HOSTILE = ["../x", "../../../../../../../tmp/fastpull-escape", "/etc/passwd", "a/../../b", ".", "..", "x\n",
           "snapshots/1/fs", "k" * 4000, "-rf", "~", "$(touch /tmp/fastpull-pwned)", "é/ü"]


def _all_paths(top: Path) -> set[Path]:
    return {Path(d) / n for d, dirs, files in os.walk(top) for n in dirs + files}


def test_hostile_keys_never_become_paths(snapshotter, tmp_path):
    layers_before = _all_paths(tmp_path / "layers")
    cache_layer(snapshotter.layers, CHAINS[0])
    for key in HOSTILE:
        snapshotter.prepare(key, "", {key[:2000]: key[:2000]})
        snapshotter.commit(key + "/c", key, {})
        snapshotter.view(key + "/v", key + "/c", {})
        snapshotter.commit_layer(key + "/l", key + "/c", CHAINS[0], {})
        assert snapshotter.stat(key + "/l").parent == key + "/c"
        assert len(list(snapshotter.walk([f"name=={filter_quote(key + '/v')}"]))) == 1
    for bad in ("", "a\0b", BIG, "\ud800"):
        steps = [prepare(bad), commit(bad, HOSTILE[0]), call("stat", bad), commit_layer(bad, "", CHAINS[0])]
        for step in steps + ([view("k", bad)] if bad else []):
            with pytest.raises(SnapshotInvalid):
                drive(snapshotter, step)
    assert all(name.isdigit() for name in os.listdir(snapshotter.snapshots))
    outside = _all_paths(tmp_path) - _all_paths(snapshotter.root) - _all_paths(tmp_path / "layers")
    assert outside == {snapshotter.root, tmp_path / "layers"}
    assert _all_paths(tmp_path / "layers") - layers_before - {snapshotter.layers.path(CHAINS[0])} == {
        snapshotter.layers.path(CHAINS[0]) / "f"}
    assert not Path("/tmp/fastpull-escape").exists() and not Path("/tmp/fastpull-pwned").exists()


def _state(sn: OverlaySnapshotter):
    infos = sorted(sn.walk([]), key=lambda i: i.name)
    mounts = {i.name: sn.mounts(i.name) for i in infos if i.kind is not Kind.COMMITTED}
    return infos, mounts, {i.name: sn.usage(i.name) for i in infos}, sn.chains_in_use()


def test_everything_survives_a_restart(tmp_path):
    layers = Snapshotter(tmp_path / "layers")
    cache_layer(layers, CHAINS[0])
    with OverlaySnapshotter(tmp_path / "root", layers) as sn:
        _base_snapshots(sn)
        sn.update(Info("c2", "", Kind.COMMITTED, {"x": "y"}, 0, 0), [])
        sn.commit_layer("l", "c2", CHAINS[0], {REF: CHAINS[0]})
        before = _state(sn)
    with OverlaySnapshotter(tmp_path / "root", Snapshotter(tmp_path / "layers")) as sn:
        assert _state(sn) == before


def _ids(root: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(root / "metadata.db")) as conn:
        return {str(row[0]) for row in conn.execute("SELECT id FROM snapshots")}


def test_cleanup_removes_what_a_crash_left(snapshotter):
    snapshotter.prepare("a", "", {})
    leftovers = ["99", "new-123", "rm-abc", "2"]
    for name in leftovers:
        (snapshotter.snapshots / name / "fs").mkdir(parents=True)
        (snapshotter.snapshots / name / "fs" / "file").write_bytes(b"x")
    (snapshotter.snapshots / "stray-file").write_bytes(b"x")
    snapshotter.cleanup()
    assert os.listdir(snapshotter.snapshots) == ["1"]
    assert snapshotter.stat("a").kind is Kind.ACTIVE


CRASH = """
import os, sys
from pathlib import Path
from fastpull.snapshotter import overlay
from fastpull.unpack.snapshots import Snapshotter

root, layers, point, chain = sys.argv[1:5]
rename = os.rename

def rename_then_die(a, b):
    rename(a, b)
    os._exit(9)

if point.startswith("before-rename"):
    os.rename = lambda a, b: os._exit(9)
elif point.startswith("after-rename"):
    os.rename = rename_then_die
else:
    overlay.remove_tree = lambda *a, **k: os._exit(9)
sn = overlay.OverlaySnapshotter(Path(root), Snapshotter(layers))
if point.endswith("prepare"):
    sn.prepare("victim", "base", {})
elif point.endswith("layer"):
    sn.commit_layer("victim", "base", chain, {})
elif point.endswith("remove"):
    sn.remove("base-view")
raise SystemExit("survived " + point)
"""

CRASH_POINTS = ["before-rename:prepare", "after-rename:prepare", "before-rename:layer", "after-rename:layer",
                "after-commit:remove", "during-cleanup"]
"""Where the process dies: around the rename of a new snapshot's directory into place (inside its
transaction), after a removal's commit (before its directory goes), while cleanup removes."""


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_any_step_leaves_a_consistent_state(tmp_path, point):
    """A process killed at each step (os._exit: no cleanup, no close), then restarted: every row has
    its directory, nothing else is left, and the same calls work."""
    root, layers = tmp_path / "root", Snapshotter(tmp_path / "layers")
    cache_layer(layers, CHAINS[0])
    with OverlaySnapshotter(root, layers) as sn:
        sn.prepare("base-a", "", {})
        sn.commit("base", "base-a", {})
        sn.view("base-view", "base", {})
    if point == "during-cleanup":
        (root / "snapshots" / "77" / "fs").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", CRASH, str(root), str(layers.root), point, CHAINS[0]],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr
    if point == "during-cleanup":
        assert [n for n in os.listdir(root / "snapshots") if n.startswith("rm-")]
    with OverlaySnapshotter(root, layers) as sn:
        assert sorted(os.listdir(sn.snapshots)) == sorted(_ids(root))
        assert all((sn.snapshots / i / "fs").exists() for i in _ids(root))
        assert list(sn.walk(["name==victim"])) == []
        assert sn.chains_in_use() == set()
        assert sn.prepare("victim", "base", {})[0].type == "overlay"
        sn.commit_layer("layer", "base", CHAINS[0], {})
        if point != "after-commit:remove":
            sn.remove("base-view")
        assert sorted(os.listdir(sn.snapshots)) == sorted(_ids(root))


def test_a_snapshot_directory_that_cannot_be_made_leaves_no_row(snapshotter, monkeypatch):
    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(UnpackError, match="No space left"):
        snapshotter.prepare("a", "", {})
    monkeypatch.undo()
    assert list(snapshotter.walk([])) == []
    assert os.listdir(snapshotter.snapshots) == []


# ---- real mounts, as containerd's mount.All makes them (root) ----------------------------------

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def c(s):
        return None if s is None else os.fsencode(s)

    if _libc.mount(c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(errno)}")


def unmount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"umount {target}: {os.strerror(errno)}")


@contextlib.contextmanager
def mounted(mounts: list[Mount], target: Path):
    """Mount ``mounts`` (one, as the overlay snapshotter gives) on ``target``, unmounted after.
    An overlay whose options pass a page has its lower directories made relative to their
    common directory, mounted from there, as containerd does."""
    (m,) = mounts
    if m.type == "bind":
        _mount(m.source, str(target), None, MS_BIND | (MS_REC if "rbind" in m.options else 0), None)
        if "ro" in m.options:
            try:
                _mount(None, str(target), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
            except BaseException:
                unmount(target)
                raise
    else:
        assert (m.type, m.source) == ("overlay", "overlay")
        options = list(m.options)
        cwd = None
        if len(",".join(options)) >= os.sysconf("SC_PAGESIZE"):
            i = next(i for i, o in enumerate(options) if o.startswith("lowerdir="))
            lowers = options[i].removeprefix("lowerdir=").split(":")
            cwd = os.path.commonpath(lowers)
            options[i] = "lowerdir=" + ":".join(os.path.relpath(p, cwd) for p in lowers)
        before = os.getcwd()
        try:
            if cwd is not None:
                os.chdir(cwd)
            _mount("overlay", str(target), "overlay", 0, ",".join(options))
        finally:
            os.chdir(before)
    try:
        yield target
    finally:
        unmount(target)


@functools.cache
def _mounts_lacking() -> str | None:
    """Why overlay and bind mounts cannot be made here (tried), or None."""
    with tempfile.TemporaryDirectory() as scratch:
        dirs = [Path(scratch) / n for n in ("lower", "upper", "work", "target")]
        for d in dirs:
            d.mkdir()
        try:
            with mounted([Mount("overlay", "overlay", options=(
                    f"lowerdir={dirs[0]}", f"upperdir={dirs[1]}", f"workdir={dirs[2]}"))], dirs[3]):
                pass
            with mounted([Mount("bind", str(dirs[0]), options=("ro", "rbind"))], dirs[3]):
                pass
        except OSError as e:
            return f"cannot mount here: {e}"
    return None


needs_mounts = pytest.mark.skipif(_mounts_lacking() is not None, reason=str(_mounts_lacking()))


def apply(root: Path, ops) -> None:
    """containerd's fstest appliers, as tuples: (file, path, content, mode), (dir, path, mode),
    (rm, path), (chown, path, uid, gid), (link, old, new), (rename, old, new); for cache layers
    also overlay whiteouts: (whiteout, path), (opaque, path)."""
    for op, path, *args in ops:
        p = root / path.lstrip("/")
        if op == "file":
            p.write_bytes(args[0])
            p.chmod(args[1])
        elif op == "dir":
            p.mkdir(exist_ok=True)
            p.chmod(args[0])
        elif op == "rm":
            remove_tree(p)
        elif op == "chown":
            os.lchown(p, *args)
        elif op == "link":
            os.link(p, root / args[0].lstrip("/"))
        elif op == "rename":
            os.rename(p, root / args[0].lstrip("/"))
        elif op == "whiteout":
            os.mknod(p, stat.S_IFCHR | 0o600, 0)
        elif op == "opaque":
            p.mkdir(exist_ok=True)
            p.chmod(0o755)
            os.setxattr(p, "trusted.overlay.opaque", b"y")
        else:
            raise AssertionError(op)


def tree(root: Path) -> dict[str, tuple]:
    """Everything under ``root`` (not itself): type, mode, owner, and content or link target."""
    out = {}
    for path in sorted(_all_paths(root)):
        st = os.lstat(path)
        what = None
        if stat.S_ISREG(st.st_mode):
            what = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            what = os.readlink(path)
        out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                            what)
    return out


def _create_snapshot(sn, parent: str, work: Path, ops, n: int) -> str:
    name, key = f"layer-{n}", f"layer-{n}-prepare"
    target = work / f"apply-{n}"
    target.mkdir()
    with mounted(sn.prepare(key, parent, {}), target):
        apply(target, ops)
    sn.commit(name, key, {})
    return name


def _check_snapshot(sn, work: Path, name: str, expected: Path) -> None:
    target = work / f"check-{name}"
    target.mkdir()
    mounts = sn.view(f"{name}-view", name, {})
    try:
        with mounted(mounts, target):
            assert tree(target) == tree(expected), name
    finally:
        sn.remove(f"{name}-view")


def check_snapshots(sn, work: Path, *appliers) -> None:
    """containerd's checkSnapshots: each applier committed on the last, each checked in a view
    against the same appliers run on one plain directory."""
    flat = work / "flat"
    flat.mkdir(parents=True)
    parent = ""
    for n, ops in enumerate(appliers):
        parent = _create_snapshot(sn, parent, work, ops, n)
        apply(flat, ops)
        _check_snapshot(sn, work, parent, flat)


LAYERED = {
    "LayerFileUpdate": [
        [("dir", "/etc", 0o700), ("file", "/etc/hosts", b"mydomain 10.0.0.1", 0o644),
         ("file", "/etc/profile", b"PATH=/usr/bin", 0o644)],
        [("file", "/etc/hosts", b"mydomain 10.0.0.2", 0o644), ("file", "/etc/profile", b"PATH=/usr/bin", 0o666),
         ("dir", "/root", 0o700), ("file", "/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644)],
    ],
    "RemoveDirectoryInLowerLayer": [
        [("dir", "/lib", 0o700), ("file", "/lib/hidden", b"", 0o644)],
        [("rm", "/lib"), ("dir", "/lib", 0o700), ("file", "/lib/not-hidden", b"", 0o644)],
        [("file", "/lib/newfile", b"", 0o644)],
    ],
    "Chown": [
        [("dir", "/opt", 0o700), ("dir", "/opt/a", 0o700), ("dir", "/opt/a/b", 0o700),
         ("file", "/opt/a/b/file.txt", b"hello", 0o644)],
        [("chown", "/opt", 1, 1), ("chown", "/opt/a", 1, 1), ("chown", "/opt/a/b", 1, 1),
         ("chown", "/opt/a/b/file.txt", 1, 1)],
    ],
    "DirectoryPermissionOnCommit": [
        [("dir", "/dir1", 0o700), ("dir", "/dir2", 0o700), ("dir", "/dir3", 0o700), ("dir", "/dir4", 0o700),
         ("file", "/dir4/f1", b"...", 0o644), ("dir", "/dir5", 0o700), ("file", "/dir5/f1", b"...", 0o644),
         ("chown", "/dir1", 1, 1), ("chown", "/dir2", 1, 1), ("chown", "/dir3", 1, 1), ("chown", "/dir5", 1, 1),
         ("chown", "/dir5/f1", 1, 1)],
        [("chown", "/dir2", 0, 0), ("rm", "/dir3"), ("chown", "/dir4", 1, 1), ("chown", "/dir4/f1", 1, 1)],
        [("dir", "/dir3", 0o700), ("chown", "/dir3", 1, 1), ("rm", "/dir5"), ("dir", "/dir5", 0o700),
         ("chown", "/dir5", 1, 1)],
    ],
    "DeletedFilesInChildSnapshot": [
        [("file", "/foo", b"foo\n", 0o777), ("file", "/foobar", b"foobar\n", 0o777)],
        [("rm", "/foobar")],
        [],
    ],
    "MoveFileFromLowerLayer": [
        [("dir", "/dir1", 0o700), ("file", "/dir1/f1", b"Hello", 0o644), ("dir", "dir2", 0o700),
         ("file", "dir2/f2", b"...", 0o644)],
        [("dir", "/dir3", 0o700), ("file", "/dir3/f1", b"Hello", 0o644), ("rm", "/dir1"),
         ("link", "dir2/f2", "dir3/f2"), ("rm", "dir2/f2")],
    ],
    "Rename": [  # the overlayfs form: no directory rename in a lower layer
        [("dir", "/dir1", 0o700), ("dir", "/somefiles", 0o700), ("file", "/somefiles/f1", b"was here first!", 0o644),
         ("file", "/somefiles/f2", b"nothing interesting", 0o644)],
        [("file", "/somefiles/f1-overwrite", b"new content 1", 0o644),
         ("rename", "/somefiles/f1-overwrite", "/somefiles/f1"), ("rename", "/somefiles/f2", "/somefiles/f3")],
    ],
}


@needs_mounts
@pytest.mark.parametrize("name", list(LAYERED))
def test_layered_changes_read_back(snapshotter, tmp_path, name):
    check_snapshots(snapshotter, tmp_path / "work", *LAYERED[name])


@needs_mounts
def test_basic(snapshotter, tmp_path):
    sn, work = snapshotter, tmp_path / "work"
    initial = [("file", "/foo", b"foo\n", 0o777), ("dir", "/a", 0o755), ("dir", "/a/b", 0o755),
               ("dir", "/a/b/c", 0o755)]
    diff = [("file", "/bar", b"bar\n", 0o777), ("file", "/foo", b"bar\n", 0o777), ("rm", "/a/b")]
    preparing, nxt, nextnext, expected = (work / n for n in ("preparing", "nextlayer", "nextnextlayer", "expected"))
    for d in (preparing, nxt, nextnext, expected):
        d.mkdir(parents=True)
    with mounted(sn.prepare(str(preparing), "", {}), preparing):
        apply(preparing, initial)
    committed = str(work / "committed")
    sn.commit(committed, str(preparing), {})
    assert (sn.stat(committed).parent, sn.stat(committed).kind) == ("", Kind.COMMITTED)
    with pytest.raises(SnapshotNotFound):
        sn.stat(str(preparing))
    apply(expected, initial)
    with mounted(sn.prepare(str(nxt), committed, {}), nxt):
        assert tree(nxt) == tree(expected)
        apply(nxt, diff)
    assert (sn.stat(str(nxt)).parent, sn.stat(str(nxt)).kind) == (committed, Kind.ACTIVE)
    next_committed = str(work / "committed-next")
    sn.commit(next_committed, str(nxt), {})
    si2 = sn.stat(next_committed)
    assert (si2.parent, si2.kind) == (committed, Kind.COMMITTED)
    assert {i.name: i for i in sn.walk([])} == {committed: sn.stat(committed), next_committed: si2}
    apply(expected, diff)
    with mounted(sn.view(str(nextnext), next_committed, {}), nextnext):
        assert tree(nextnext) == tree(expected)
    sn.remove(str(nextnext))
    with pytest.raises(SnapshotPrecondition, match="remove"):
        sn.remove(committed)
    sn.remove(next_committed)
    sn.remove(committed)


@needs_mounts
def test_view_is_readonly(snapshotter, tmp_path):
    snapshotter.prepare("preparing", "", {})
    snapshotter.commit("committed", "preparing", {})
    target = tmp_path / "view-mount"
    target.mkdir()
    with mounted(snapshotter.view("view", "committed", {}), target):
        with pytest.raises(OSError):  # EROFS
            (target / "testfile").write_bytes(b"testcontent")
    snapshotter.remove("view")
    snapshotter.remove("committed")


@needs_mounts
def test_root_permission(snapshotter, tmp_path):
    target = tmp_path / "preparing"
    target.mkdir(mode=0o700)
    with mounted(snapshotter.prepare("preparing", "", {}), target):
        assert stat.S_IMODE(target.stat().st_mode) == 0o755


def _layer_128(i: int) -> list[tuple]:
    if i == 0:
        return [("file", "/bottom", b"way at the bottom\n", 0o777), ("file", "/overwriteme", b"FIRST!\n", 0o777),
                ("dir", "/addhere", 0o755), ("dir", "/onlyme", 0o755), ("file", "/onlyme/bottom", b"bye!\n", 0o777)]
    return [("file", "/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
            ("dir", "/addhere", 0o755), ("file", f"/addhere/file-{i}", b"same\n", 0o755),
            ("rm", "/onlyme"), ("dir", "/onlyme", 0o755), ("file", f"/onlyme/file-{i}", b"only me!\n", 0o777)]


@needs_mounts
def test_128_layers_mount(snapshotter, tmp_path):
    """containerd's 128LayersMount: each layer applied through its overlay mount and to a plain
    directory, then all 128 read back through one view (its options are past a page)."""
    work, flat = tmp_path / "work", tmp_path / "work" / "flat"
    flat.mkdir(parents=True)
    parent = ""
    for i in range(128):
        target = work / f"prepare-layer-{i}"
        target.mkdir()
        with mounted(snapshotter.prepare(str(target), parent, {}), target):
            assert tree(target) == tree(flat), i
            apply(flat, _layer_128(i))
            apply(target, _layer_128(i))
            assert tree(target) == tree(flat), i
        parent = str(work / f"committed-{i}")
        snapshotter.commit(parent, str(target), {})
    view = work / "fullview"
    view.mkdir()
    mounts = snapshotter.view(str(view), parent, {})
    assert len(",".join(mounts[0].options)) > os.sysconf("SC_PAGESIZE")
    with mounted(mounts, view):
        assert tree(view) == tree(flat)


@needs_mounts
def test_128_cached_layers_mount(snapshotter, tmp_path):
    """The remote path: 128 layers committed from the cache (whiteouts in overlay form) mount as
    one view, and an active snapshot on them writes only to its own upper directory."""
    flat = tmp_path / "flat"
    flat.mkdir()
    parent = ""
    for i, chain in enumerate(CHAINS):
        apply(flat, _layer_128(i))
        # as unpacked: the removal of /onlyme is the new /onlyme's opaque mark
        ops = [("opaque", op[1]) if op[:2] == ("dir", "/onlyme") and i else op for op in _layer_128(i) if op[0] != "rm"]
        if i == 64:
            ops.append(("whiteout", "/bottom"))
            apply(flat, [("rm", "/bottom")])
        cache_layer(snapshotter.layers, chain, ops)
        snapshotter.commit_layer(f"ns/{chain}", parent, chain, {REF: chain})
        parent = f"ns/{chain}"
    cache_before = tree(snapshotter.layers.committed)
    view = tmp_path / "view"
    view.mkdir()
    with mounted(snapshotter.view("view", parent, {}), view):
        assert tree(view) == tree(flat)
    with mounted(snapshotter.prepare("container", parent, {}), view):
        apply(view, [("file", "/overwriteme", b"container\n", 0o644), ("rm", "/addhere")])
    snapshotter.commit("container-committed", "container", {})
    apply(flat, [("file", "/overwriteme", b"container\n", 0o644), ("rm", "/addhere")])
    with mounted(snapshotter.view("view-2", "container-committed", {}), view):
        assert tree(view) == tree(flat)
    assert tree(snapshotter.layers.committed) == cache_before


@needs_mounts
def test_a_view_of_one_cached_layer_binds_it(snapshotter, tmp_path):
    cache_layer(snapshotter.layers, CHAINS[0], [("dir", "/d", 0o755), ("file", "/d/f", b"cached\n", 0o644)])
    snapshotter.commit_layer("l", "", CHAINS[0], {})
    target = tmp_path / "view"
    target.mkdir()
    with mounted(snapshotter.view("v", "l", {}), target):
        assert (target / "d" / "f").read_bytes() == b"cached\n"
        with pytest.raises(OSError):
            (target / "new").write_bytes(b"x")
