"""apply_layer against hostile archives: nothing outside the root may change, whether layers
are applied as snapshots ("overlay", here each on the root as the layers below left it) or as
``pull --rootfs`` does ("rootfs": each in a directory of its own, in "keep" form, then merged
into the root).

Every archive is applied in a forked child confined to a sandbox (a private mount namespace
with its own /proc, chrooted into the sandbox), so that even a broken resolver could only
damage the sandbox, where the checks look: a sentinel tree beside the root, whose full
snapshot (contents, modes, owners, times, link counts, xattrs) must not change.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from conftest import needs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_archive import entry, layer

from fastpull.errors import MalformedArchive, UnpackError, UnsafeArchive
from fastpull.unpack.archive import apply_layer
from fastpull.unpack.rootfs import assemble

pytestmark = needs("confine", "chown", "trusted-xattr")

ROOT = "/l1/l2/l3/root"
"""The root as the confined child sees it; the sandbox is its "/"."""
LAYERS = "/layers"
"""Where the confined child unpacks the layers of a rootfs, one directory each."""
NOBODY = 65534
_CLONE_NEWNS, _MS_REC, _MS_PRIVATE = 0x20000, 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)


class Sandbox:
    """A sandbox holding the root three levels down, a sentinel tree and siblings."""

    def __init__(self, box: Path):
        self.box = box
        self.root = box / ROOT.lstrip("/")
        self.root.mkdir(parents=True)
        self.layers = box / LAYERS.lstrip("/")
        self.layers.mkdir()
        (box / "proc").mkdir()
        (box / "outside/etc").mkdir(parents=True)
        (box / "outside/etc/passwd").write_text("sentinel passwd\n")
        (box / "outside/secret").write_text("secret\n")
        (box / "outside/dir").mkdir()
        (box / "outside/dir/a").write_text("a\n")
        (box / "outside/link").symlink_to("/outside/secret")
        for level in ("l1", "l1/l2", "l1/l2/l3"):
            (box / level / "sibling").write_text(level)
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple]:
        """Everything in the sandbox but the root, the layers' directories and /proc, root's
        parent directory included."""
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.box):
            rel_dir = os.path.relpath(dirpath, self.box)
            if rel_dir in ("proc", ROOT.lstrip("/"), LAYERS.lstrip("/")):
                dirnames.clear()
                continue
            for name in [".", *dirnames, *filenames] if rel_dir == "." else [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                if path in (str(self.root), str(self.layers)):
                    continue
                st_ = os.lstat(path)
                info: tuple = (
                    st_.st_mode,
                    st_.st_uid,
                    st_.st_gid,
                    st_.st_nlink,
                    st_.st_ino,
                    st_.st_mtime_ns,
                    st_.st_ctime_ns,
                )
                if stat.S_ISREG(st_.st_mode):
                    info += (hashlib.sha256(Path(path).read_bytes()).hexdigest(),)
                elif stat.S_ISLNK(st_.st_mode):
                    info += (os.readlink(path),)
                info += (sorted(os.listxattr(path, follow_symlinks=False)),)
                out[os.path.normpath(os.path.join(rel_dir, name))] = info
        return out

    def run(self, *layers: bytes, whiteouts: str = "rootfs", user: int | None = None) -> list[list]:
        """Apply ``layers`` in order in a confined child; one outcome per layer applied:
        ``["ok", skipped]``, ``["unsafe", message]``, ``["malformed", message]``, ``["unpack", message]``
        or ``["error", ...]``."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe and always exits
            try:
                os.write(write_end, json.dumps(self._apply_confined(layers, whiteouts, user)).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        os.waitpid(pid, 0)
        return json.loads(report)

    def _apply_confined(self, layers, whiteouts, user) -> list[list]:
        outcomes: list[list] = []
        try:
            _confine(self.box)
            if user is not None:
                os.setgroups([])
                os.setgid(user)
                os.setuid(user)
            for data in layers:
                try:
                    stats = self._apply(data, whiteouts)
                except UnsafeArchive as err:
                    return [*outcomes, ["unsafe", str(err)]]
                except MalformedArchive as err:
                    return [*outcomes, ["malformed", str(err)]]
                except UnpackError as err:
                    return [*outcomes, ["unpack", str(err)]]
                outcomes.append(["ok", dict(stats.skipped)])
        except Exception as err:  # noqa: BLE001 - anything else is reported as a failure
            outcomes.append(["error", f"{type(err).__name__}: {err}"])
        return outcomes

    @staticmethod
    def _apply(data: bytes, whiteouts: str):
        if whiteouts == "overlay":
            return apply_layer(io.BytesIO(data), Path(ROOT), layer="sha256:hostile", whiteouts="overlay")
        directory = Path(tempfile.mkdtemp(dir=LAYERS))
        stats = apply_layer(io.BytesIO(data), directory, layer="sha256:hostile", whiteouts="keep")
        assemble([(directory, frozenset(stats.implied_dirs))], Path(ROOT))
        return stats

    def unchanged(self) -> bool:
        return self.snapshot() == self.before


def _confine(box: Path) -> None:
    """A private mount namespace with /proc mounted in ``box``, then chroot into it."""
    if (
        _libc.unshare(_CLONE_NEWNS)
        or _libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None)
        or _libc.mount(b"proc", os.fsencode(box / "proc"), b"proc", 0, None)
    ):
        raise OSError(ctypes.get_errno(), "cannot confine the child")
    os.chroot(box)
    os.chdir("/")


@pytest.fixture
def sandbox(tmp_path) -> Sandbox:
    return Sandbox(tmp_path / "box")


def kinds(outcomes) -> list[str]:
    return [outcome[0] for outcome in outcomes]


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/x", "a/../../x", "../outside/secret", "..", "./../x"])
def test_hostile_dotdot_names_are_refused(sandbox, name):
    outcomes = sandbox.run(layer(entry(name, data=b"evil")))
    assert kinds(outcomes) == ["unsafe"] and "'..' climbs out" in outcomes[0][1]
    assert sandbox.unchanged() and os.listdir(sandbox.root) == []


def test_hostile_absolute_names_are_rooted(sandbox):
    outcomes = sandbox.run(
        layer(entry("/etc/x", data=b"1"), entry("/../../outside/secret", data=b"2"), entry("//x", data=b"3"))
    )
    assert kinds(outcomes) == ["ok"] and sandbox.unchanged()
    assert (sandbox.root / "etc/x").read_bytes() == b"1"
    assert (sandbox.root / "outside/secret").read_bytes() == b"2"
    assert (sandbox.root / "x").read_bytes() == b"3"


def test_hostile_nul_in_a_name_is_refused(sandbox):
    ti, _ = entry("ok")
    ti.pax_headers = {"path": "a\0/../../outside/secret"}
    assert kinds(sandbox.run(layer((ti, b"")))) == ["malformed"] and sandbox.unchanged()


# --- symlinks in the parent path ---------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "write", "lands_at"),
    [
        ("/", "a/etc/x", "etc/x"),
        ("/", "a/outside/secret", "outside/secret"),
        ("/outside", "a/secret", "outside/secret"),
        ("/outside/dir", "a/a", "outside/dir/a"),
        ("..", "a/x", "x"),
        ("../../../..", "a/outside/secret", "outside/secret"),
        ("/l1/l2/l3", "a/sibling", "l1/l2/l3/sibling"),
    ],
)
@pytest.mark.parametrize("whiteouts", ["rootfs", "overlay"])
def test_hostile_symlinked_parents_resolve_inside_the_root(sandbox, target, write, lands_at, whiteouts):
    outcomes = sandbox.run(
        layer(entry("a", "symlink", link=target), entry(write, data=b"evil")), whiteouts=whiteouts
    )
    assert kinds(outcomes) == ["ok"] and sandbox.unchanged()
    assert (sandbox.root / lands_at).read_bytes() == b"evil"


@pytest.mark.parametrize("whiteouts", ["rootfs", "overlay"])
def test_hostile_symlink_planted_by_an_earlier_layer(sandbox, whiteouts):
    first = layer(
        entry("usr", "dir"),
        entry("usr/lib", "symlink", link="/outside"),
        entry("up", "symlink", link="../../.."),
    )
    second = layer(
        entry("usr/lib/secret", data=b"evil"),
        entry("up/outside/dir/a", data=b"evil"),
        entry("usr/lib/new/f", data=b"n"),
    )
    assert kinds(sandbox.run(first, second, whiteouts=whiteouts)) == ["ok", "ok"]
    assert sandbox.unchanged()
    if whiteouts == "overlay":  # applied on the first layer: through its symlinks, inside the root
        assert (sandbox.root / "outside/secret").read_bytes() == b"evil"
        assert (sandbox.root / "outside/dir/a").read_bytes() == b"evil"
        assert (sandbox.root / "outside/new/f").read_bytes() == b"n"
    else:  # applied apart: the directories it implies replace the symlinks
        assert (sandbox.root / "usr/lib/secret").read_bytes() == b"evil"
        assert (sandbox.root / "up/outside/dir/a").read_bytes() == b"evil"
        assert (sandbox.root / "usr/lib/new/f").read_bytes() == b"n"


def test_hostile_dangling_symlink_parent_is_created_inside_the_root(sandbox):
    outcomes = sandbox.run(layer(entry("d", "symlink", link="/outside/made/here"), entry("d/f", data=b"f")))
    assert kinds(outcomes) == ["ok"] and sandbox.unchanged()
    assert (sandbox.root / "outside/made/here/f").read_bytes() == b"f"


def test_hostile_symlink_loop_and_file_parents_are_refused(sandbox):
    loop = layer(entry("a", "symlink", link="b"), entry("b", "symlink", link="a"), entry("a/x", data=b"x"))
    assert kinds(sandbox.run(loop)) == ["unsafe"]
    assert kinds(sandbox.run(layer(entry("f", data=b"x"), entry("f/x", data=b"x")))) == ["unsafe"]
    assert sandbox.unchanged()


# --- hardlinks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prelude",
    [
        [],
        [entry("d", "symlink", link="/outside")],
        [entry("d", "symlink", link="../../../../outside")],
        [entry("etc", "symlink", link="/outside/etc")],
    ],
    ids=["plain", "abs-symlinked-dir", "rel-symlinked-dir", "symlinked-etc"],
)
@pytest.mark.parametrize(
    "target", ["/etc/passwd", "../outside/secret", "d/secret", "/outside/link", "outside/secret"]
)
def test_hostile_hardlinks_never_reach_outside(sandbox, prelude, target):
    outcomes = sandbox.run(layer(*prelude, entry("h", "hardlink", link=target)))
    assert kinds(outcomes) in (["malformed"], ["unsafe"])  # no such target inside the root, or '..' refused
    assert sandbox.unchanged()


def test_hostile_hardlink_to_a_symlink_links_the_symlink(sandbox):
    outcomes = sandbox.run(
        layer(
            entry("s", "symlink", link="/outside/secret"),
            entry("h", "hardlink", link="s"),
            entry("h", data=b"x"),
        )
    )
    assert kinds(outcomes) == ["ok"] and sandbox.unchanged()
    assert os.readlink(sandbox.root / "s") == "/outside/secret" and (sandbox.root / "h").read_bytes() == b"x"


# --- replacing symlinks --------------------------------------------------------------------


@pytest.mark.parametrize(
    "replacement",
    [
        entry("f", data=b"replaced"),
        entry("f", "dir"),
        entry("f", "fifo"),
        entry("f", "symlink", link="elsewhere"),
        entry("f", "hardlink", link="other"),
    ],
    ids=["file", "dir", "fifo", "symlink", "hardlink"],
)
@pytest.mark.parametrize("across", [False, True], ids=["same-layer", "next-layer"])
def test_hostile_entries_replace_symlinks_instead_of_writing_through(sandbox, replacement, across):
    links = [entry("f", "symlink", link="/outside/secret"), entry("g", "symlink", link="/outside/dir")]
    then = [entry("other", data=b"o"), replacement, entry("g", "dir", mode=0o700), entry("g/a", data=b"new")]
    layers = [layer(*links), layer(*then)] if across else [layer(*links, *then)]
    assert kinds(sandbox.run(*layers)) == ["ok"] * len(layers)
    assert sandbox.unchanged()
    assert not (sandbox.root / "f").is_symlink() or os.readlink(sandbox.root / "f") == "elsewhere"
    assert not (sandbox.root / "g").is_symlink() and (sandbox.root / "g/a").read_bytes() == b"new"


# --- whiteouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".wh...", ".wh..", ".wh.", "a/.wh..."])
@pytest.mark.parametrize("whiteouts", ["rootfs", "overlay"])
def test_hostile_whiteouts_naming_no_file_are_refused(sandbox, name, whiteouts):
    (sandbox.root / "keep").write_text("k")
    assert kinds(sandbox.run(layer(entry(name)), whiteouts=whiteouts)) == ["malformed"]
    assert sandbox.unchanged() and (sandbox.root / "keep").exists()


@pytest.mark.parametrize("link", ["/outside", "../../../../outside", "/", "/l1/l2/l3"])
def test_hostile_whiteouts_through_symlinks_stay_inside(sandbox, link):
    (sandbox.root / "outside").mkdir()
    (sandbox.root / "outside/secret").write_text("in root")
    (sandbox.root / "outside/dir").mkdir()
    attack = layer(
        entry("s", "symlink", link=link),
        entry("s/.wh.secret"),
        entry("s/.wh.sibling"),
        entry("s/outside/.wh.secret"),
        entry("s/dir/.wh..wh..opq"),
        entry("s/outside/dir/.wh..wh..opq"),
        entry("s/.wh..wh..opq"),
    )
    assert kinds(sandbox.run(attack)) == ["ok"]
    assert sandbox.unchanged()


def test_hostile_overlay_whiteout_through_a_symlink_makes_its_node_inside(sandbox):
    outcomes = sandbox.run(
        layer(entry("s", "symlink", link="/outside"), entry("s/.wh.secret"), entry("s/.wh..wh..opq")),
        whiteouts="overlay",
    )
    assert kinds(outcomes) == ["ok"] and sandbox.unchanged()
    node = os.lstat(sandbox.root / "outside/secret")
    assert stat.S_ISCHR(node.st_mode) and node.st_rdev == 0
    assert os.getxattr(sandbox.root / "outside", "trusted.overlay.opaque") == b"y"


def test_hostile_whiteout_of_a_symlink_removes_the_link(sandbox):
    first = layer(entry("s", "symlink", link="/outside"), entry("t", "symlink", link="/outside/secret"))
    assert kinds(sandbox.run(first, layer(entry(".wh.s"), entry(".wh.t")))) == ["ok", "ok"]
    assert sandbox.unchanged() and os.listdir(sandbox.root) == []


# --- privileges and malformed headers ------------------------------------------------------


def test_hostile_device_nodes_are_skipped_when_not_root(sandbox):
    os.chown(sandbox.root, NOBODY, NOBODY)
    os.chown(sandbox.layers, NOBODY, NOBODY)
    data = layer(
        entry("mem", "char", dev=(1, 1)),
        entry("sda", "block", dev=(8, 0)),
        entry("fifo", "fifo"),
        entry("f", data=b"x", uid=0),
    )
    outcomes = sandbox.run(data, user=NOBODY)
    assert outcomes == [["ok", {"device node (needs CAP_MKNOD)": 2}]]
    assert sorted(os.listdir(sandbox.root)) == ["f", "fifo"]
    assert os.stat(sandbox.root / "f").st_uid == NOBODY
    assert sandbox.unchanged()


def test_hostile_oversized_extension_header_is_refused(sandbox):
    ti, _ = entry("x")
    ti.pax_headers = {"comment": "x" * (2 << 20)}
    assert kinds(sandbox.run(layer((ti, b"")))) == ["malformed"]


def test_hostile_negative_size_is_refused(sandbox):
    block = bytearray(layer(entry("x", data=b"12345"))[:512])
    block[124:136] = b"\xff" * 12  # base-256 -1
    block[148:156] = b"        "
    block[148:155] = f"{sum(block):06o}\0".encode()
    assert kinds(sandbox.run(bytes(block) + bytes(1024))) == ["malformed"]


# --- random archives ------------------------------------------------------------------------

# Weighted so that names collide: later entries often go through symlinks planted earlier.
COMPONENTS = ["a", "a", "a", "a", "b", "b", "..", ".", ".wh.a", ".wh..wh..opq"]
TARGETS = ["/", "/outside", "/outside/secret", "/l1/l2/l3", "..", "../..", "../../../..", "a", "a/b", "/.."]

names = st.builds(
    lambda parts, absolute: "/" * absolute + "/".join(parts),
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=3),
    st.booleans(),
)
members = st.one_of(
    st.builds(lambda n: entry(n, data=b"x"), names),
    st.builds(lambda n: entry(n, "dir"), names),
    st.builds(lambda n, t: entry(n, "symlink", link=t), names, st.sampled_from(TARGETS)),
    st.builds(
        lambda n, t: entry(n, "hardlink", link=t),
        names,
        st.sampled_from(["a", "b", "a/a", "/outside/secret"]) | names,
    ),
)
archives = st.lists(
    st.lists(members, min_size=1, max_size=10).map(lambda es: layer(*es)), min_size=1, max_size=3
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=archives, whiteouts=st.sampled_from(["rootfs", "overlay"]))
def test_hostile_random_archives_change_nothing_outside_the_root(tmp_path, layers, whiteouts):
    box = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        sandbox = Sandbox(box)
        outcomes = sandbox.run(*layers, whiteouts=whiteouts)
        assert all(kind in ("ok", "unsafe", "malformed") for kind in kinds(outcomes)), outcomes
        assert sandbox.unchanged()
        assert os.path.isdir(sandbox.root) and not os.path.islink(sandbox.root)
    finally:
        shutil.rmtree(box)


def test_hostile_random_archive_builder_writes_names_verbatim():
    data = layer(entry("/../a", data=b"x"), entry("a/../..", "symlink", link="/"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getnames() == ["/../a", "a/../.."]
