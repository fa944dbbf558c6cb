"""apply_layer: every entry type and attribute, and whiteouts in both forms (layers merged into
a rootfs are tested in test_rootfs.py)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import struct
import subprocess
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import lacking, needs

from fastpull.errors import UnpackError, UnsafeArchive
from fastpull.unpack.archive import ApplyStats, apply_layer

MTIME = 1_600_000_000
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)  # v2, effective, cap_net_bind_service
OPAQUE = "trusted.overlay.opaque"
KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}

needs_root = needs("chown", "mknod", "trusted-xattr")


def entry(
    name, kind="file", data=b"", *, link="", mode=None, uid=0, gid=0, mtime=MTIME, xattrs=None, dev=(0, 0)
):
    """A tar member (TarInfo, data) for ``layer``."""
    ti = tarfile.TarInfo(name)
    ti.type = KINDS[kind]
    ti.mode = mode if mode is not None else 0o755 if kind == "dir" else 0o644
    ti.uid, ti.gid, ti.mtime, ti.linkname = uid, gid, mtime, link
    ti.devmajor, ti.devminor = dev
    ti.size = len(data) if kind == "file" else 0
    if xattrs:
        ti.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return ti, data


def layer(*entries, format=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


class Trickle:
    """A stream with only ``read``, returning short reads of random lengths."""

    def __init__(self, data: bytes, seed: int = 0):
        self._data = memoryview(data)
        self._pos = 0
        self._rng = random.Random(seed)

    def read(self, n: int) -> bytes:
        k = min(n, self._rng.choice((1, 7, 511, 513, 4096, 70_000, n)))
        out = bytes(self._data[self._pos : self._pos + k])
        self._pos += len(out)
        return out


class Views(Trickle):
    """Short reads as memoryviews of fresh blocks, as the unpack worker's inflated stream gives them."""

    def read(self, n: int) -> memoryview:
        return memoryview(super().read(n))


def apply(data: bytes, root: Path, whiteouts="keep", *, stream=io.BytesIO) -> ApplyStats:
    root.mkdir(parents=True, exist_ok=True)
    return apply_layer(stream(data), root, layer="sha256:test", whiteouts=whiteouts)


def tree(root: Path) -> tuple[dict[str, tuple], list[list[str]]]:
    """Everything under ``root`` (root itself excluded) and its hardlink groups."""
    out: dict[str, tuple] = {}
    inodes = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            info: list = [
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
            ]
            if stat.S_ISREG(st.st_mode):
                info += [st.st_size, hashlib.sha256(Path(path).read_bytes()).hexdigest()]
                inodes[st.st_ino].append(rel)
            elif stat.S_ISLNK(st.st_mode):
                info.append(os.readlink(path))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.append(st.st_rdev)
            info.append(
                sorted(
                    (k, os.getxattr(path, k, follow_symlinks=False))
                    for k in os.listxattr(path, follow_symlinks=False)
                )
            )
            out[rel] = tuple(info)
    return out, sorted(sorted(group) for group in inodes.values() if len(group) > 1)


# --- entry types and attributes ----------------------------------------------------------

ALL_TYPES = [
    entry("etc", "dir", mode=0o750, uid=11, gid=12, mtime=MTIME + 1, xattrs={"user.dir": b"d"}),
    entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", mode=0o640, uid=1234, gid=5678),
    entry("bin", "dir"),
    entry("bin/ping", data=b"\x7fELF ping", mode=0o755, xattrs={"security.capability": CAPABILITY}),
    entry("bin/su", data=b"\x7fELF su", mode=0o4755, uid=0, gid=0),
    entry("bin/wall", data=b"\x7fELF wall", mode=0o2755, gid=5),
    entry("bin/su-again", "hardlink", link="bin/su"),
    entry("bin/sh", "symlink", link="/bin/dash", uid=3, gid=4, mtime=MTIME + 7),
    entry("bin/dangling", "symlink", link="../nowhere/at/all"),
    entry("tmp", "dir", mode=0o1777, mtime=MTIME + 2),
    entry("dev", "dir"),
    entry("dev/null", "char", mode=0o666, dev=(1, 3)),
    entry("dev/loop0", "block", mode=0o660, gid=6, dev=(7, 0)),
    entry("run", "dir"),
    entry("run/initctl", "fifo", mode=0o600),
    entry("empty", data=b""),
    entry("user", data=b"x", xattrs={"user.mime": b"text/plain", "trusted.t": bytes(range(256))}),
    entry("trusted-link", "symlink", link="user", xattrs={"trusted.l": b"on the link"}),
]


@needs_root
@pytest.mark.parametrize("stream", [io.BytesIO, Trickle, Views], ids=["readinto", "read-only", "memoryviews"])
def test_archive_all_entry_types_and_attributes(tmp_path, stream):
    stats = apply(layer(*ALL_TYPES), tmp_path / "root", "overlay", stream=stream)
    root = tmp_path / "root"
    assert stats.entries == len(ALL_TYPES) and not stats.skipped
    assert stats.bytes == sum(len(data) for _, data in ALL_TYPES)

    etc = os.stat(root / "etc")
    assert (stat.S_IMODE(etc.st_mode), etc.st_uid, etc.st_gid, etc.st_mtime) == (0o750, 11, 12, MTIME + 1)
    assert os.getxattr(root / "etc", "user.dir") == b"d"
    passwd = os.stat(root / "etc/passwd")
    assert (stat.S_IMODE(passwd.st_mode), passwd.st_uid, passwd.st_gid) == (0o640, 1234, 5678)
    assert (root / "etc/passwd").read_bytes() == ALL_TYPES[1][1] and passwd.st_mtime == MTIME
    assert os.getxattr(root / "bin/ping", "security.capability") == CAPABILITY
    assert stat.S_IMODE(os.stat(root / "bin/su").st_mode) == 0o4755
    assert (
        stat.S_IMODE(os.stat(root / "bin/wall").st_mode) == 0o2755 and os.stat(root / "bin/wall").st_gid == 5
    )
    assert os.stat(root / "bin/su").st_ino == os.stat(root / "bin/su-again").st_ino
    assert os.stat(root / "bin/su").st_nlink == 2
    sh = os.lstat(root / "bin/sh")
    assert os.readlink(root / "bin/sh") == "/bin/dash" and (sh.st_uid, sh.st_gid, sh.st_mtime) == (
        3,
        4,
        MTIME + 7,
    )
    assert os.readlink(root / "bin/dangling") == "../nowhere/at/all"
    tmp = os.stat(root / "tmp")
    assert stat.S_IMODE(tmp.st_mode) == 0o1777 and tmp.st_mtime == MTIME + 2
    null = os.stat(root / "dev/null")
    assert (
        stat.S_ISCHR(null.st_mode)
        and null.st_rdev == os.makedev(1, 3)
        and stat.S_IMODE(null.st_mode) == 0o666
    )
    loop = os.stat(root / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0) and loop.st_gid == 6
    assert stat.S_ISFIFO(os.stat(root / "run/initctl").st_mode)
    assert (root / "empty").read_bytes() == b""
    assert os.getxattr(root / "user", "trusted.t") == bytes(range(256))
    assert os.getxattr(root / "trusted-link", "trusted.l", follow_symlinks=False) == b"on the link"
    assert "trusted.l" not in os.listxattr(root / "user")


@needs_root
def test_archive_matches_gnu_tar_extraction(tmp_path):
    data = layer(*ALL_TYPES)
    apply(data, tmp_path / "mine", "overlay")
    (tmp_path / "gnu").mkdir()
    _gnu_extract(data, tmp_path / "gnu")
    assert tree(tmp_path / "mine") == tree(tmp_path / "gnu")


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_archive_long_names_and_link_names(tmp_path, format):
    deep = "/".join(f"{i:02d}-" + "d" * 60 for i in range(6))
    name = f"{deep}/" + "f" * 200
    entries = [entry(deep, "dir"), entry(name, data=b"long"), entry("l", "symlink", link="/" + name)]
    entries.append(entry(f"{deep}/hard-" + "h" * 150, "hardlink", link=name))
    apply(layer(*entries, format=format), tmp_path / "root")
    root = tmp_path / "root"
    assert (root / name).read_bytes() == b"long"
    assert os.readlink(root / "l") == "/" + name
    assert os.stat(root / deep / ("hard-" + "h" * 150)).st_ino == os.stat(root / name).st_ino


def test_archive_names_are_rooted_and_cleaned(tmp_path):
    apply(
        layer(entry("/abs/x", data=b"1"), entry("./dot//y/./z", data=b"2"), entry("a/../b", data=b"3")),
        tmp_path / "r",
    )
    root = tmp_path / "r"
    assert (root / "abs/x").read_bytes() == b"1" and (root / "dot/y/z").read_bytes() == b"2"
    assert (root / "b").read_bytes() == b"3" and not (root / "a").exists()


def test_archive_big_file_in_chunks(tmp_path):
    data = os.urandom(5 << 20) + b"tail"
    stats = apply(layer(entry("big", data=data)), tmp_path / "r", stream=Trickle)
    assert (tmp_path / "r/big").read_bytes() == data and stats.bytes == len(data)


# --- overlay snapshots -------------------------------------------------------------------


def test_archive_overlay_whiteouts_and_opaque_dirs(tmp_path):
    root = tmp_path / "snap"
    stats = apply(
        layer(
            entry("etc", "dir"),
            entry("etc/.wh.motd", uid=7, gid=8),
            entry("opt", "dir"),
            entry("opt/.wh..wh..opq"),
            entry("opt/new", data=b"n"),
            entry("var/lib/.wh..wh..opq"),  # parent not listed: created
            entry(".wh.top"),
            entry("keep", data=b"k"),
            entry(".wh.keep"),  # this layer's own file stays
            entry("d", "dir"),
            entry("d/inside", data=b"i"),
            entry(".wh.d"),  # this layer's own directory stays, and hides the lower one
            entry(".wh.redo"),
            entry("redo", "dir"),  # a directory replacing a whiteout hides the lower one
        ),
        root,
        "overlay",
    )
    motd = os.lstat(root / "etc/motd")
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == 0 and stat.S_IMODE(motd.st_mode) == 0
    if lacking("chown") is None:
        assert (motd.st_uid, motd.st_gid) == (7, 8)
    assert os.lstat(root / "top").st_rdev == 0 and stat.S_ISCHR(os.lstat(root / "top").st_mode)
    for opaque in ("opt", "var/lib", "d", "redo"):
        assert os.getxattr(root / opaque, OPAQUE) == b"y", opaque
    assert OPAQUE not in os.listxattr(root / "etc") and OPAQUE not in os.listxattr(root / "var")
    assert (root / "opt/new").read_bytes() == b"n" and (root / "keep").read_bytes() == b"k"
    assert (root / "d/inside").read_bytes() == b"i"
    assert not any(p.name.startswith(".wh.") for p in root.rglob("*"))
    assert stats.entries == 14 and not stats.skipped


def test_archive_overlay_refuses_overlay_xattrs_from_the_archive(tmp_path):
    stats = apply(
        layer(entry("d", "dir", xattrs={OPAQUE: b"y", "trusted.overlay.redirect": b"/x"})),
        tmp_path / "s",
        "overlay",
    )
    assert os.listxattr(tmp_path / "s/d") == []
    assert stats.skipped == {"xattr trusted.overlay.* from the archive": 2}


# u::rwx g::--- o::--- as a system.posix_acl_default value: files created below get at most 0700
PRIVATE_ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                             for tag, perm in ((0x01, 7), (0x04, 0), (0x20, 0)))


@needs_root
@pytest.mark.parametrize("setup", ["umask", "setgid-root", "acl-root", "acl-entry"])
def test_archive_files_get_their_mode_and_owner_where_creation_would_not(tmp_path, setup):
    """Files are created with their final mode and not chowned only where that gives the entry's
    mode and owner: not under a umask that drops bits, a setgid directory or a default ACL."""
    root = tmp_path / "root"
    root.mkdir()
    files = [entry("d/plain", data=b"p"), entry("d/shared", data=b"s", mode=0o664),
             entry("d/open", data=b"o", mode=0o777), entry("d/tool", data=b"t", mode=0o4755),
             entry("d/readonly", data=b"r", mode=0o444, xattrs={"user.k": b"v"})]
    dir_xattrs = {"system.posix_acl_default": PRIVATE_ACL} if setup == "acl-entry" else None
    umask = os.umask(0o077 if setup == "umask" else 0o022)
    try:
        if setup == "setgid-root":
            os.chown(root, 0, 4321)
            os.chmod(root, 0o2755)
        elif setup == "acl-root":
            os.setxattr(root, "system.posix_acl_default", PRIVATE_ACL)
        apply(layer(entry("d", "dir", xattrs=dir_xattrs), *files), root, "overlay")
    finally:
        os.umask(umask)
    for ti, _ in files:
        st = os.stat(root / ti.name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (ti.mode, 0, 0), ti.name
    assert os.getxattr(root / "d/readonly", "user.k") == b"v"


def test_archive_whiteout_forms_are_overlay_and_keep(tmp_path):
    for mode in ("apply", "merge"):
        with pytest.raises(ValueError, match="'overlay' or 'keep'"):
            apply(layer(), tmp_path / "r", mode)


def test_archive_keep_writes_whiteouts_as_empty_marker_files(tmp_path):
    root = tmp_path / "layer"
    stats = apply(
        layer(
            entry("etc", "dir"),
            entry("etc/.wh.motd", uid=7, mode=0o755),
            entry("opt/.wh..wh..opq"),  # parent not listed: created
            entry("keep", data=b"k"),
            entry(".wh.keep"),  # beside this layer's own file: rootfs.merge_layer spares it
        ),
        root,
    )
    markers = {str(p.relative_to(root)): p.lstat() for p in root.rglob(".wh.*")}
    assert sorted(markers) == [".wh.keep", "etc/.wh.motd", "opt/.wh..wh..opq"]
    assert all(stat.S_ISREG(st.st_mode) and st.st_size == 0 for st in markers.values())
    assert not any(os.listxattr(root / path) for path in markers)
    assert (root / "keep").read_bytes() == b"k" and stats.implied_dirs == {"opt"}
    assert stats.entries == 5 and not stats.skipped


def _gnu_extract(data: bytes, dest: Path) -> None:
    subprocess.run(
        [
            "tar",
            "-x",
            "-C",
            str(dest),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--exclude=.wh.*",
            "-f",
            "-",
        ],
        input=data,
        check=True,
    )


# --- stats, the stream, unpack errors --------------------------------------------


@pytest.mark.parametrize("dir_first", [True, False], ids=["dir-first", "marker-first"])
def test_archive_keep_marker_colliding_with_a_directory_is_the_archives_fault(tmp_path, dir_first):
    """A whiteout ``.wh.a`` beside a directory ``.wh.a`` of the same layer cannot be kept as a marker file."""
    entries = [entry(".wh.a/a", data=b"x"), entry(".wh.a")]
    with pytest.raises(UnsafeArchive, match="sha256:test"):
        apply(layer(*(entries if dir_first else entries[::-1])), tmp_path / "r", "keep")


def test_archive_stats_count_skips(tmp_path):
    data = layer(entry("a", data=b"12345"), entry(".wh..wh.plnk", "dir"), entry("./", "dir"))
    stats = apply(data, tmp_path / "r")
    assert (stats.entries, stats.bytes) == (1, 5)
    assert stats.skipped == {"AUFS metadata": 1, "entry names the root directory": 1}


def test_archive_reads_the_stream_to_its_end(tmp_path):
    stream = io.BytesIO(layer(entry("f", data=b"x")) + b"trailing bytes count toward the diffID")
    apply_layer(stream, tmp_path, layer="sha256:test", whiteouts="keep")
    assert stream.read() == b""


def test_archive_unpack_errors_name_the_path(tmp_path):
    with pytest.raises(UnpackError, match=f"unpack error at {tmp_path / 'missing'}"):
        apply_layer(io.BytesIO(layer()), tmp_path / "missing", layer="sha256:test", whiteouts="keep")
