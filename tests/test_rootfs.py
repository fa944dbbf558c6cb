"""rootfs.assemble, the live --rootfs path: layers applied side by side with their whiteouts
kept as marker files, then merged by renames, equal GNU tar applying them one by one with the
whiteouts done by hand."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_archive import MTIME, _reference_apply, apply, entry, layer

from fastpull.errors import UnpackError
from fastpull.testbed.reference import describe
from fastpull.unpack.rootfs import assemble, can_chown, remove_tree, rootless_owner

LAYERS = [
    layer(
        entry("etc", "dir", mode=0o750, uid=3),
        entry("etc/motd", data=b"hi\n"),
        entry("etc/os-release", data=b"base\n"),
        entry("usr", "dir"),
        entry("usr/lib", "dir", mode=0o700, uid=5, gid=6),
        entry("usr/lib/a.so", data=b"a"),
        entry("usr/lib/sub", "dir"),
        entry("usr/lib/sub/c", data=b"c"),
        entry("usr/bin", "dir"),
        entry("usr/bin/tool", data=b"tool", mode=0o4755),
        entry("lib", "symlink", link="usr/lib"),
        entry("var", "dir"),
        entry("var/cache", "dir", mode=0o700),
        entry("var/cache/junk", data=b"junk"),
        entry("tmp", "dir", mode=0o1777),
        entry("dev", "dir"),
        entry("dev/null", "char", mode=0o666, dev=(1, 3)),
    ),
    layer(  # no directory listed: each keeps the metadata it has below
        entry("etc/.wh.motd"),
        entry("etc/os-release", data=b"second\n"),
        entry("usr/lib/.wh..wh..opq"),
        entry("usr/lib/b.so", data=b"b"),
        entry("var/cache", data=b"a file now"),
        entry("var/.wh.cache"),  # after this layer's own var/cache: still spares it
        entry("tmp/pipe", "fifo"),
        entry(".wh.lib"),
        entry("lib", "dir", mode=0o711),  # the symlink below becomes a directory
    ),
    layer(
        entry("usr", "dir", mtime=MTIME + 20),
        entry("usr/lib", "dir", mode=0o755, uid=7),
        entry("usr/lib/late", data=b"late"),
        entry("usr/lib/.wh..wh..opq"),  # after this layer's own entries
        entry("etc/motd", data=b"back\n"),
        entry("usr/bin/.wh.tool"),
        entry("usr/bin/tool", "dir", mode=0o750),
        entry("usr/bin/tool/inside", data=b"in"),
        entry(".wh.tmp"),
        entry("new", "dir", mode=0o705),  # lands whole; its marker hides nothing
        entry("new/.wh.nothing"),
        entry("new/file", data=b"n"),
    ),
]


def _assemble(layers: list[bytes], tmp_path: Path) -> Path:
    unpacked = []
    for i, data in enumerate(layers):
        stats = apply(data, tmp_path / f"layer-{i}", "keep")
        unpacked.append((tmp_path / f"layer-{i}", frozenset(stats.implied_dirs)))
    (tmp_path / "root").mkdir()
    assemble(unpacked, tmp_path / "root")
    return tmp_path / "root"


@pytest.mark.skipif(not can_chown(), reason="owners and device nodes need CAP_CHOWN and CAP_MKNOD")
def test_rootfs_assemble_equals_gnu_tar_layer_by_layer(tmp_path):
    root = _assemble(LAYERS, tmp_path)
    (tmp_path / "ref").mkdir()
    for data in LAYERS:
        _reference_apply(data, tmp_path / "ref")
    assert describe(root) == describe(tmp_path / "ref")
    assert sorted(os.listdir(root / "usr/lib")) == ["late"] and (root / "etc/motd").read_bytes() == b"back\n"
    lib = os.stat(root / "usr/lib")
    assert (stat.S_IMODE(lib.st_mode), lib.st_uid) == (0o755, 7)
    assert not [p for p in root.rglob("*") if p.name.startswith(".wh.")]


@pytest.mark.skipif(not can_chown(), reason="owners need CAP_CHOWN")
def test_rootfs_opaque_implied_directory_keeps_its_metadata(tmp_path):
    root = _assemble(LAYERS[:2], tmp_path)
    lib = os.stat(root / "usr/lib")
    assert (stat.S_IMODE(lib.st_mode), lib.st_uid, lib.st_gid) == (0o700, 5, 6)
    assert sorted(os.listdir(root / "usr/lib")) == ["b.so"]
    assert not (root / "etc/motd").exists() and (root / "var/cache").read_bytes() == b"a file now"


def test_rootfs_rootless_owner_record_is_umocis():
    assert rootless_owner(0, 0) is None
    assert rootless_owner(1000, 0) == b"\x08\xe8\x07\x10\xff\xff\xff\xff\x0f"
    assert rootless_owner(0, 42) == b"\x08\xff\xff\xff\xff\x0f\x10\x2a"


def test_rootfs_merge_errors_name_the_path(tmp_path):
    (tmp_path / "layer").mkdir()
    (tmp_path / "layer/f").write_text("x")
    with pytest.raises(UnpackError, match=f"unpack error at {tmp_path / 'missing-root'}: No such file"):
        assemble([(tmp_path / "layer", frozenset())], tmp_path / "missing-root")


def test_rootfs_remove_tree_removes_read_only_directories(tmp_path):
    (tmp_path / "t/a/b").mkdir(parents=True)
    (tmp_path / "t/a/b/f").write_text("x")
    for d in ("t/a/b", "t/a", "t"):
        os.chmod(tmp_path / d, 0o500)
    remove_tree(tmp_path / "t")
    assert not (tmp_path / "t").exists()
    remove_tree(tmp_path / "t")  # absent: nothing to do
