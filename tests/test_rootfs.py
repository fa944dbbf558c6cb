"""rootfs: where whiteouts are applied. The merge of layer directories (whiteouts as marker files)
by renames, tested directly on hand-made trees; the live --rootfs path (each layer applied by
apply_layer in "keep" form side by side, then assembled) against GNU tar applying the layers one
by one with the whiteouts done by hand; and the implied directories of snapshots."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import lacking
from test_archive import MTIME, _gnu_extract, apply, entry, layer, needs_root, tree

from fastpull.errors import MalformedArchive, UnpackError
from fastpull.testbed.reference import describe
from fastpull.unpack.attrs import can_chown, rootless_owner
from fastpull.unpack.rootfs import assemble, inherit_implied, merge_layer, remove_tree


def make(root: Path, spec: dict[str, bytes | str | None]) -> Path:
    """Build a tree under ``root``: a value None is a directory, bytes a file, str a symlink's target."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, what in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if what is None:
            path.mkdir(exist_ok=True)
        elif isinstance(what, bytes):
            path.write_bytes(what)
        else:
            path.symlink_to(what)
    return root


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory beside the rootfs that no merge may change."""
    return make(tmp_path / "outside", {"secret": b"secret", "dir/a": b"a"})


def unchanged(outside: Path) -> bool:
    return listing(outside) == ["dir", "dir/a", "secret"] and (outside / "secret").read_bytes() == b"secret"


# --- merge_layer on hand-made trees ---------------------------------------------------------


def test_rootfs_merge_whiteouts_remove_what_is_below_and_never_follow_symlinks(tmp_path, outside):
    root = make(tmp_path / "root", {"etc/motd": b"hi", "etc/keep": b"k", "dir/sub/f": b"f",
                                    "link": "../outside/secret", "dirlink": str(outside / "dir")})
    upper = make(tmp_path / "upper", {"etc/.wh.motd": b"", ".wh.dir": b"", ".wh.link": b"",
                                      ".wh.dirlink": b"", ".wh.never-there": b"", "etc/new": b"n"})
    merge_layer(upper, root, frozenset({"etc"}))
    assert listing(root) == ["etc", "etc/keep", "etc/new"]
    assert unchanged(outside)


def test_rootfs_merge_whiteout_spares_what_the_same_layer_brings(tmp_path):
    root = make(tmp_path / "root", {"x/lower": b"l", "f": b"lower f"})
    upper = make(tmp_path / "upper", {".wh.x": b"", ".wh.f": b"", "x/mine": b"m", "f": b"mine f"})
    merge_layer(upper, root)
    assert listing(root) == ["f", "x", "x/mine"] and (root / "f").read_bytes() == b"mine f"


def test_rootfs_merge_opaque_directory_keeps_only_this_layers_entries(tmp_path):
    root = make(tmp_path / "root", {"d/lower": b"l", "d/sub/deep": b"x", "other/kept": b"k"})
    os.chmod(root / "d", 0o700)
    upper = make(tmp_path / "upper", {"d/.wh..wh..opq": b"", "d/new": b"n", "d/sub/mine": b"m"})
    os.chmod(upper / "d", 0o750)
    merge_layer(upper, root)
    assert listing(root) == ["d", "d/new", "d/sub", "d/sub/mine", "other", "other/kept"]
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o750  # listed by the layer: its metadata


def test_rootfs_merge_directory_over_file_lands_whole_without_its_markers(tmp_path):
    root = make(tmp_path / "root", {"f2d": b"file"})
    upper = make(tmp_path / "upper", {"f2d/child": b"c", "f2d/.wh.nothing": b"", "f2d/sub/.wh..wh..opq": b""})
    merge_layer(upper, root)
    assert listing(root) == ["f2d", "f2d/child", "f2d/sub"]


def test_rootfs_merge_file_over_directory(tmp_path):
    root = make(tmp_path / "root", {"d2f/child": b"c", "d2f/sub/deep": b"d"})
    upper = make(tmp_path / "upper", {"d2f": b"now a file"})
    merge_layer(upper, root)
    assert listing(root) == ["d2f"] and (root / "d2f").read_bytes() == b"now a file"


def test_rootfs_merge_replaces_symlinks_instead_of_writing_through(tmp_path, outside):
    root = make(tmp_path / "root", {"dir-over-link": str(outside / "dir"), "file-over-link": "../outside/secret",
                                    "link-over-dir/f": b"f", "link-over-link": "old"})
    upper = make(tmp_path / "upper", {"dir-over-link/a": b"new", "file-over-link": b"replaced",
                                      "link-over-dir": "elsewhere", "link-over-link": "new"})
    merge_layer(upper, root)
    assert not (root / "dir-over-link").is_symlink() and (root / "dir-over-link/a").read_bytes() == b"new"
    assert not (root / "file-over-link").is_symlink() and (root / "file-over-link").read_bytes() == b"replaced"
    assert os.readlink(root / "link-over-dir") == "elsewhere" and os.readlink(root / "link-over-link") == "new"
    assert unchanged(outside)


def test_rootfs_merge_keeps_hardlinks(tmp_path):
    root = make(tmp_path / "root", {"lower": b"shared"})
    os.link(root / "lower", root / "lower-alias")
    upper = make(tmp_path / "upper", {"d/h1": b"h", "lower": b"rewritten"})
    os.link(upper / "d/h1", upper / "d/h2")
    merge_layer(upper, root)
    assert os.stat(root / "d/h1").st_ino == os.stat(root / "d/h2").st_ino
    assert os.stat(root / "d/h1").st_nlink == 2
    assert (root / "lower").read_bytes() == b"rewritten" and (root / "lower-alias").read_bytes() == b"shared"


def test_rootfs_merge_implied_directories_keep_the_metadata_below(tmp_path):
    root = make(tmp_path / "root", {"a/b/old": b"o", "listed/old": b"o"})
    for d in ("a", "a/b", "listed"):
        os.chmod(root / d, 0o750)
        os.setxattr(root / d, "user.origin", b"lower")
    if lacking("chown") is None:
        os.chown(root / "a/b", 21, 22)
    upper = make(tmp_path / "upper", {"a/b/c/new": b"n", "listed/new": b"n"})
    os.setxattr(upper / "listed", "user.origin", b"upper")
    merge_layer(upper, root, frozenset({"a", "a/b", "a/b/c"}))
    for d in ("a", "a/b"):
        assert stat.S_IMODE(os.stat(root / d).st_mode) == 0o750 and os.getxattr(root / d, "user.origin") == b"lower"
    if lacking("chown") is None:
        assert (os.stat(root / "a/b").st_uid, os.stat(root / "a/b").st_gid) == (21, 22)
    assert stat.S_IMODE(os.stat(root / "a/b/c").st_mode) == 0o755  # new: lands as the layer has it
    assert stat.S_IMODE(os.stat(root / "listed").st_mode) == 0o755
    assert os.getxattr(root / "listed", "user.origin") == b"upper"
    assert listing(root) == ["a", "a/b", "a/b/c", "a/b/c/new", "a/b/old", "listed", "listed/new", "listed/old"]


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


def test_rootfs_rootless_owner_record_is_umocis():
    assert rootless_owner(0, 0) is None
    assert rootless_owner(1000, 0) == b"\x08\xe8\x07\x10\xff\xff\xff\xff\x0f"
    assert rootless_owner(0, 42) == b"\x08\xff\xff\xff\xff\x0f\x10\x2a"


# --- the live path: layers applied in "keep" form, then assembled --------------------------


def rootfs(layers: list[bytes], tmp_path: Path) -> Path:
    """The rootfs the layers make, built as ``pull --rootfs`` builds it."""
    unpacked = []
    for i, data in enumerate(layers):
        stats = apply(data, tmp_path / f"layer-{i}", "keep")
        unpacked.append((tmp_path / f"layer-{i}", frozenset(stats.implied_dirs)))
    (tmp_path / "root").mkdir()
    assemble(unpacked, tmp_path / "root")
    return tmp_path / "root"


def _reference_apply(data: bytes, dest: Path) -> None:
    """The OCI rules done simply: whiteouts remove lower content, then GNU tar extracts."""

    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    for ti in members:
        parent, _, base = ti.name.rpartition("/")
        if base == ".wh..wh..opq":
            for child in (dest / parent).iterdir():
                remove(child)
        elif base.startswith(".wh."):
            remove(dest / parent / base[4:])
    for ti in members:  # GNU tar will not replace a non-empty directory by a non-directory
        if not ti.isdir() and (dest / ti.name).is_dir() and not (dest / ti.name).is_symlink():
            shutil.rmtree(dest / ti.name)
    _gnu_extract(data, dest)


def _reference(layers: list[bytes], tmp_path: Path) -> Path:
    (tmp_path / "ref").mkdir()
    for data in layers:
        _reference_apply(data, tmp_path / "ref")
    return tmp_path / "ref"


IMPLIED_LAYERS = [
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


@pytest.mark.skipif(not can_chown(), reason="owners and device nodes need CAP_CHOWN and CAP_MKNOD")
def test_rootfs_assemble_equals_gnu_tar_layer_by_layer(tmp_path):
    root = rootfs(IMPLIED_LAYERS, tmp_path)
    assert describe(root) == describe(_reference(IMPLIED_LAYERS, tmp_path))
    assert sorted(os.listdir(root / "usr/lib")) == ["late"] and (root / "etc/motd").read_bytes() == b"back\n"
    lib = os.stat(root / "usr/lib")
    assert (stat.S_IMODE(lib.st_mode), lib.st_uid) == (0o755, 7)
    assert not [p for p in root.rglob("*") if p.name.startswith(".wh.")]


@pytest.mark.skipif(not can_chown(), reason="owners need CAP_CHOWN")
def test_rootfs_opaque_implied_directory_keeps_its_metadata(tmp_path):
    root = rootfs(IMPLIED_LAYERS[:2], tmp_path)
    lib = os.stat(root / "usr/lib")
    assert (stat.S_IMODE(lib.st_mode), lib.st_uid, lib.st_gid) == (0o700, 5, 6)
    assert sorted(os.listdir(root / "usr/lib")) == ["b.so"]
    assert not (root / "etc/motd").exists() and (root / "var/cache").read_bytes() == b"a file now"


LISTED_LAYERS = [
    layer(
        entry("etc", "dir"),
        entry("etc/os-release", data=b"base\n"),
        entry("etc/motd", data=b"hello\n", mode=0o600, uid=3),
        entry("usr", "dir"),
        entry("usr/bin", "dir"),
        entry("usr/bin/tool", data=b"\x7fELF tool", mode=0o4755),
        entry("usr/bin/tool-alias", "hardlink", link="usr/bin/tool"),
        entry("usr/lib", "dir", mode=0o700),
        entry("usr/lib/a.so", data=b"a" * 5000, xattrs={"user.v": b"1"}),
        entry("usr/lib/b.so", data=b"b"),
        entry("usr/lib/sub", "dir"),
        entry("usr/lib/sub/c", data=b"c"),
        entry("lib", "symlink", link="usr/lib"),
        entry("var", "dir"),
        entry("var/cache", "dir"),
        entry("var/cache/junk", data=b"junk"),
        entry("var/run", "symlink", link="/run"),
        entry("run", "dir", mode=0o755),
        entry("dev", "dir"),
        entry("dev/null", "char", mode=0o666, dev=(1, 3)),
        entry("tmp", "dir", mode=0o1777),
    ),
    layer(
        entry("etc", "dir", mtime=MTIME + 10),
        entry("etc/.wh.motd"),
        entry("etc/.wh.never-existed"),
        entry("etc/os-release", data=b"second\n", mtime=MTIME + 10),
        entry("etc/new.conf", data=b"new", xattrs={"trusted.x": b"t"}),
        entry("usr", "dir", mtime=MTIME + 10),
        entry("usr/lib", "dir", mode=0o755, mtime=MTIME + 10),
        entry("usr/lib/.wh..wh..opq"),
        entry("usr/lib/b.so", data=b"bb", mtime=MTIME + 10),
        entry("usr/bin", "dir", mtime=MTIME + 10),
        entry("usr/bin/other", data=b"other"),
        entry("usr/bin/other-alias", "hardlink", link="usr/bin/other"),
        entry("var", "dir", mtime=MTIME + 10),
        entry("var/.wh.cache"),
        entry("var/cache", data=b"a file now"),
        entry("tmp", "dir", mode=0o1777, mtime=MTIME + 10),
        entry("tmp/pipe", "fifo"),
    ),
    layer(
        entry("usr", "dir", mtime=MTIME + 20),
        entry("usr/lib", "dir", mode=0o755, mtime=MTIME + 20),
        entry("usr/lib/late", data=b"late"),
        entry("usr/lib/sub", "dir", mtime=MTIME + 20),
        entry("usr/lib/sub/new", data=b"n"),
        entry("usr/lib/.wh..wh..opq"),  # after this layer's own entries
        entry("etc", "dir", mtime=MTIME + 20),
        entry("etc/motd", data=b"back\n", mtime=MTIME + 20),
        entry("etc/new.conf", "symlink", link="os-release", mtime=MTIME + 20),
        entry("usr/bin", "dir", mtime=MTIME + 20),
        entry("usr/bin/.wh.tool"),
        entry("usr/bin/tool", "dir", mode=0o750, mtime=MTIME + 20),
        entry("dev", "dir", mtime=MTIME + 20),
        entry("dev/null", "char", mode=0o666, dev=(1, 5)),
        entry(".wh.tmp"),
    ),
]


@needs_root
def test_rootfs_listed_directories_like_gnu_tar_and_whiteouts_by_hand(tmp_path):
    """Every directory listed, so that directory times compare too; attributes of every kind."""
    root = rootfs(LISTED_LAYERS, tmp_path)
    got, expected = tree(root), tree(_reference(LISTED_LAYERS, tmp_path))
    assert got == expected
    assert (root / "etc/motd").read_bytes() == b"back\n" and not (root / "tmp").exists()
    assert sorted(os.listdir(root / "usr/lib")) == ["late", "sub"]  # b.so came from a lower layer
    assert os.listdir(root / "usr/lib/sub") == ["new"]
    assert expected[1] == [["usr/bin/other", "usr/bin/other-alias"]]  # tool-alias lost its twin


def test_rootfs_layers_replace_across_types(tmp_path):
    root = rootfs([
        layer(
            entry("f2d", data=b"file"),
            entry("d2f", "dir"),
            entry("d2f/child", data=b"c"),
            entry("merge", "dir", mode=0o700),
            entry("merge/old", data=b"old"),
            entry("link2f", "symlink", link="f2d"),
            entry("hard", data=b"shared"),
            entry("hard2", "hardlink", link="hard"),
        ),
        layer(
            entry("f2d", "dir"),
            entry("d2f", data=b"now a file"),
            entry("merge", "dir", mode=0o751),
            entry("merge/new", data=b"new"),
            entry("link2f", data=b"replaced"),
            entry("hard", data=b"rewritten"),
        ),
    ], tmp_path)
    assert (root / "f2d").is_dir() and (root / "d2f").read_bytes() == b"now a file"
    assert sorted(os.listdir(root / "merge")) == ["new", "old"]
    assert stat.S_IMODE(os.stat(root / "merge").st_mode) == 0o751
    assert not (root / "link2f").is_symlink() and (root / "link2f").read_bytes() == b"replaced"
    assert (root / "hard2").read_bytes() == b"shared" and (root / "hard").read_bytes() == b"rewritten"


@pytest.mark.parametrize("marker_first", [True, False], ids=["marker-first", "marker-last"])
def test_rootfs_opaque_keeps_this_layers_entries_wherever_the_marker_is(tmp_path, marker_first):
    base = layer(entry("d", "dir"), entry("d/lower", data=b"l"), entry("d/sub", "dir"), entry("d/sub/deep", data=b"x"))
    marker = [entry("d/.wh..wh..opq")]
    ours = [entry("d/new", data=b"n"), entry("d/sub", "dir"), entry("d/sub/mine", data=b"m"),
            entry("d/fresh/f", data=b"f")]
    root = rootfs([base, layer(entry("d", "dir"), *(marker + ours if marker_first else ours + marker))], tmp_path)
    assert listing(root) == ["d", "d/fresh", "d/fresh/f", "d/new", "d/sub", "d/sub/mine"]


@pytest.mark.parametrize("whiteout_first", [True, False], ids=["whiteout-first", "whiteout-last"])
def test_rootfs_whiteout_spares_this_layers_entry(tmp_path, whiteout_first):
    base = layer(entry("x", "dir"), entry("x/lower", data=b"l"), entry("f", data=b"lower f"))
    whiteouts = [entry(".wh.x"), entry(".wh.f")]
    ours = [entry("x", "dir"), entry("x/mine", data=b"m"), entry("f", data=b"mine f")]
    root = rootfs([base, layer(*(whiteouts + ours if whiteout_first else ours + whiteouts))], tmp_path)
    assert os.listdir(root / "x") == ["mine"] and (root / "f").read_bytes() == b"mine f"


def test_rootfs_implied_directory_replaces_a_symlink_below(tmp_path, outside):
    """A layer unpacks into a directory of its own, so a symlink of a lower layer is not in the
    path of its entries: the directory it implies replaces the symlink, as an overlayfs upper
    directory hides a lower symlink (and as containerd's overlayfs snapshotter unpacks)."""
    root = rootfs([layer(entry("usr", "dir"), entry("usr/lib", "symlink", link=str(outside))),
                   layer(entry("usr/lib/secret", data=b"evil"))], tmp_path)
    assert not (root / "usr/lib").is_symlink() and (root / "usr/lib/secret").read_bytes() == b"evil"
    assert unchanged(outside)


def test_rootfs_hardlink_to_a_lower_layer_is_refused(tmp_path):
    """Each layer is applied to a directory of its own: a hardlink names a file of its layer."""
    with pytest.raises(MalformedArchive, match="hardlink target 'usr/bin/tool' does not exist"):
        rootfs([layer(entry("usr/bin/tool", data=b"t")),
                layer(entry("usr/bin/other", "hardlink", link="usr/bin/tool"))], tmp_path)


# --- snapshots' implied directories --------------------------------------------------------


def test_rootfs_snapshot_implied_parents_take_the_nearest_lower_directory(tmp_path):
    lower = make(tmp_path / "lower", {"usr/share/": None, "opt/": None, "lib": "usr/share"})
    os.chmod(lower / "usr", 0o750)
    os.setxattr(lower / "usr", "user.origin", b"lower")
    os.utime(lower / "usr", (MTIME - 5, MTIME - 5))
    if lacking("chown") is None:
        os.chown(lower / "usr", 21, 22)
    middle = make(tmp_path / "middle", {"usr/": None})
    os.chmod(middle / "usr", 0o710)
    os.mknod(middle / "opt", stat.S_IFCHR, 0)  # an overlay whiteout: the lower opt is gone
    snap = tmp_path / "snap"
    stats = apply(layer(entry("usr/share/doc/x", data=b"x"), entry("lib/y", data=b"y"), entry("opt/z", data=b"z")),
                  snap, "overlay")
    assert stats.implied_dirs == {"usr", "usr/share", "usr/share/doc", "lib", "opt"}
    inherit_implied(snap, frozenset(stats.implied_dirs), [middle, lower])
    assert stat.S_IMODE(os.stat(snap / "usr").st_mode) == 0o710  # the nearest lower has it
    inherit_implied(snap, frozenset({"usr"}), [lower])
    usr = os.stat(snap / "usr")
    assert (stat.S_IMODE(usr.st_mode), usr.st_mtime) == (0o750, MTIME - 5)
    assert os.getxattr(snap / "usr", "user.origin") == b"lower"
    if lacking("chown") is None:
        assert (usr.st_uid, usr.st_gid) == (21, 22)
    assert stat.S_IMODE(os.stat(snap / "usr/share/doc").st_mode) == 0o755  # in no lower layer
    assert stat.S_IMODE(os.stat(snap / "opt").st_mode) == 0o755  # hidden by the whiteout
    # containerd applies to the upper dir: "lib" is a directory there, not the lower symlink's target
    assert (snap / "lib").is_dir() and not (snap / "lib").is_symlink()
    assert stat.S_IMODE(os.stat(snap / "lib").st_mode) == 0o755
