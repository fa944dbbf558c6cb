"""Unprivileged unpack, run as an unprivileged user: ``--rootfs`` equals the privileged result
but for owners (recorded in ``user.rootlesscontainers``), device nodes and privileged xattrs;
``--snapshots`` mark opaque directories with ``user.overlay.opaque`` and, mounted with
overlayfs' ``userxattr`` in a user namespace, show the tree ``--rootfs`` builds.

When the tests run as root (CI), the pulls run in a child that drops to ``nobody``."""

from __future__ import annotations

import json
import os
import shutil
import site
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_unpack import OPTS, _add, special_image  # noqa: F401 - special_image is a fixture

import fastpull
from fastpull import pull
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.testbed.reference import describe
from fastpull.unpack.attrs import ROOTLESS_XATTR, can_chown
from fastpull.unpack.whiteouts import OPAQUE_XATTR, USER_OPAQUE_XATTR

NOBODY = 65534
SOURCE_ROOT = Path(fastpull.__file__).resolve().parents[1]

PULL = """
import sys
from fastpull import FetchOptions, pull
if __name__ == "__main__":
    ref, home, kind = sys.argv[1:]
    options = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4)
    result = pull(ref, home + "/layout", options=options, **{kind: home + "/" + kind})
    print("\\n".join(map(str, result.snapshots)))
"""

MOUNT_AND_DESCRIBE = """
import json, os, subprocess, sys
from pathlib import Path
from fastpull.testbed.reference import describe
lowers, merged = sys.argv[1:]
os.mkdir(merged)
subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "userxattr,lowerdir=" + lowers, merged], check=True)
print(json.dumps({path: repr(info) for path, info in describe(Path(merged))["tree"].items()}))
"""


def _drop_privileges() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


class Unprivileged:
    """Runs commands as ``nobody`` (or as this user if it is unprivileged already) in ``home``,
    a directory that user owns, with fastpull importable by ``python``."""

    def __init__(self, home: Path, python: str, packages: list[str]):
        self.home = home
        self.python = python
        self._env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                     "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), *packages])}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self._env, cwd=self.home, capture_output=True, text=True, timeout=300,
                              preexec_fn=_drop_privileges if can_chown() else None)

    def pull(self, ref: str, kind: str) -> subprocess.CompletedProcess:
        done = self.run(self.python, str(self.home / "pull.py"), ref, str(self.home), kind)
        assert done.returncode == 0, done.stderr
        return done


def _interpreters() -> list[tuple[str, list[str]]]:
    """This interpreter, then the system's of the same version with this one's packages: a
    venv's base interpreter may sit where ``nobody`` cannot reach it (pyenv under /root)."""
    same = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = [path for d in ("/usr/local/bin", "/usr/bin") if os.path.exists(path := os.path.join(d, same))]
    return [(sys.executable, []), *((path, site.getsitepackages()) for path in system)]


@pytest.fixture
def unprivileged() -> Iterator[Unprivileged]:
    """An unprivileged user that can run fastpull; skips, saying why, if there is none."""
    home = Path(tempfile.mkdtemp(prefix="fastpull-rootless-"))  # tmp_path is private to its owner
    try:
        if can_chown():
            os.chown(home, NOBODY, NOBODY)
        (home / "pull.py").write_text(PULL)
        failures = []
        for python, packages in _interpreters():
            user = Unprivileged(home, python, packages)
            try:
                probe = user.run(python, "-c", "import fastpull.puller, fastpull.unpack.workers")
            except OSError as err:
                failures.append(f"{python}: {err.strerror}")
                continue
            if probe.returncode == 0:
                yield user
                return
            failures.append(f"{python}: {probe.stderr.strip().splitlines()[-1:]}")
        pytest.skip(f"user {NOBODY} cannot run fastpull from {SOURCE_ROOT}: {'; '.join(failures)}")
    finally:
        shutil.rmtree(home)


def decode_owner(record: bytes) -> tuple[int, int]:
    """uid and gid from a ``user.rootlesscontainers`` value (protobuf varints; NoopID means 0)."""
    fields, pos = {}, 0
    while pos < len(record):
        key, value, shift = record[pos], 0, 0
        pos += 1
        while True:
            value |= (record[pos] & 0x7F) << shift
            shift += 7
            pos += 1
            if record[pos - 1] < 0x80:
                break
        fields[key >> 3] = 0 if value == 0xFFFFFFFF else value
    return fields.get(1, 0), fields.get(2, 0)


def read_only_base(tar: tarfile.TarFile) -> None:
    _add(tar, "proc", tarfile.DIRTYPE, mode=0o555)
    _add(tar, "ro", tarfile.DIRTYPE, mode=0o555)
    for name in ("ro/a", "ro/keep"):
        _add(tar, name, data=name.encode())
    _add(tar, "ro/sub", tarfile.DIRTYPE, mode=0o500)
    _add(tar, "ro/sub/x", data=b"x")


def read_only_change(tar: tarfile.TarFile) -> None:
    _add(tar, "ro/b", data=b"b")  # into a read-only directory this layer does not list
    _add(tar, "ro/.wh.a")
    _add(tar, "ro/sub", tarfile.DIRTYPE, mode=0o555)
    _add(tar, "ro/sub/.wh..wh..opq")
    _add(tar, "ro/sub/y", data=b"y")
    _add(tar, "ro/new", tarfile.DIRTYPE, mode=0o500)  # lands whole, holding a marker to drop
    _add(tar, "ro/new/.wh.nothing")
    _add(tar, "ro/new/z", data=b"z")


@pytest.fixture(scope="module")
def read_only_image(registry, image_cache):
    """Directories their owner may not write (an image's 0555 /proc): root ignores that, the
    unprivileged merge must not."""
    specs = [LayerSpec(0, files=0, entries=read_only_base), LayerSpec(0, files=0, entries=read_only_change)]
    image = build_image(specs, image_cache / "read-only", seed=31)
    push_image(registry.url, "unpack/read-only", "v1", image)
    return f"{registry.host}/unpack/read-only:v1"


def test_rootless_rootfs_equals_the_privileged_one_but_for_owners(special_image, unprivileged, tmp_path):  # noqa: F811
    _, ref = special_image
    privileged = _compare_with_privileged(ref, unprivileged, tmp_path, devices={"dev/null"})
    assert privileged["etc/shadow"][3] == 42 and privileged["home/user/notes"][2] == 1000


def test_rootless_rootfs_merges_into_read_only_directories(read_only_image, unprivileged, tmp_path):
    privileged = _compare_with_privileged(read_only_image, unprivileged, tmp_path)
    assert sorted(name for name in privileged if name.startswith("ro/")) == [
        "ro/b", "ro/keep", "ro/new", "ro/new/z", "ro/sub", "ro/sub/y"
    ]
    assert privileged["ro"][1] == privileged["proc"][1] == 0o555 and privileged["ro/new"][1] == 0o500


def _compare_with_privileged(ref: str, unprivileged: Unprivileged, tmp_path: Path, devices=frozenset()) -> dict:
    """Pull ``ref`` with ``--rootfs`` unprivileged and privileged and compare the trees: the same
    but for owners (recorded), ``devices`` (not created, one warning) and security xattrs."""
    if not can_chown():
        pytest.skip("the privileged reference needs CAP_CHOWN")
    done = unprivileged.pull(ref, "rootfs")
    assert done.stderr.count("CAP_MKNOD") == (1 if devices else 0), done.stderr
    pull(ref, tmp_path / "layout", rootfs=tmp_path / "rootfs", options=OPTS)
    privileged, rootless = describe(tmp_path / "rootfs"), describe(unprivileged.home / "rootfs")
    assert rootless["hardlinks"] == privileged["hardlinks"]
    assert {p for p, info in privileged["tree"].items() if stat.S_ISCHR(info[0]) or stat.S_ISBLK(info[0])} == devices
    assert set(rootless["tree"]) == set(privileged["tree"]) - devices
    for path, got in rootless["tree"].items():
        kind, mode, uid, gid, size, extra, xattrs = privileged["tree"][path]
        assert got[2:4] == (NOBODY, NOBODY), path
        owner = got[6].pop(ROOTLESS_XATTR, None)
        if not stat.S_ISLNK(kind):  # a symlink cannot carry a user xattr: its owner is lost
            assert (decode_owner(owner) if owner else (0, 0)) == (uid, gid), path
        xattrs = {k: v for k, v in xattrs.items() if not k.startswith("security.")}  # needs CAP_SETFCAP
        assert (got[0], got[1], got[4], got[5], got[6]) == (kind, mode, size, extra, xattrs), path
    assert not list(unprivileged.home.glob(".rootfs.fastpull-*"))  # work directories removed
    return privileged["tree"]


def test_rootless_snapshots_use_user_xattrs_and_mount_with_userxattr(special_image, unprivileged):  # noqa: F811
    _, ref = special_image
    snapshots = unprivileged.pull(ref, "snapshots").stdout.split()
    change = Path(snapshots[1])
    assert os.getxattr(change / "opt/app", USER_OPAQUE_XATTR) == b"y"
    assert OPAQUE_XATTR not in os.listxattr(change / "opt/app")
    whiteout = (change / "etc/remove-me").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    late = Path(snapshots[3])
    assert stat.S_IMODE((late / "tmp").stat().st_mode) == 0o1777  # implied: inherited from below
    # Mounted as rootless podman mounts them, the snapshots show the tree --rootfs builds.
    unprivileged.pull(ref, "rootfs")
    home = unprivileged.home
    (home / "mount_and_describe.py").write_text(MOUNT_AND_DESCRIBE)
    shown = unprivileged.run("unshare", "--user", "--map-root-user", "--mount", unprivileged.python,
                             str(home / "mount_and_describe.py"), ":".join(reversed(snapshots)), str(home / "merged"))
    if shown.returncode:
        pytest.skip(f"no overlayfs with userxattr in an unprivileged user namespace here: {shown.stderr.strip()}")
    merged, rootfs = json.loads(shown.stdout), describe(home / "rootfs")["tree"]
    assert merged.keys() == rootfs.keys()
    for path, info in rootfs.items():  # owners: the namespace maps the unprivileged user to 0
        assert merged[path] == repr(info[:2] + (0, 0) + info[4:]), path
