"""Shared fixtures: a real CNCF distribution registry on loopback, and generated images."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faultmatrix
import pytest
from clients import ClientError, Containerd

if shutil.which("docker-registry") is None:  # pragma: no cover - a set-up problem, said plainly
    raise pytest.UsageError("docker-registry is not installed: run scripts/install.sh")


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """One real ``docker-registry`` on a free 127.0.0.1 port for the whole session."""
    from fastpull.testbed.registry import LocalRegistry

    with LocalRegistry(tmp_path_factory.mktemp("registry") / "storage") as reg:
        yield reg


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory) -> Path:
    """Where generated images are built (builds are cached by spec and seed)."""
    return tmp_path_factory.mktemp("images")


@pytest.fixture
def layout(tmp_path) -> Path:
    return tmp_path / "layout"


@pytest.fixture
def start_containerd(tmp_path) -> Iterator[Callable[[], Containerd]]:
    """Starts private containerd daemons under ``tmp_path`` (a fresh one is a cold cache); ends them
    by PID at teardown. Skips the test, quoting containerd, where one cannot start (e.g. not root)."""
    started: list[Containerd] = []

    def start() -> Containerd:
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            pytest.skip("containerd is not installed: run scripts/install.sh")
        if os.geteuid() != 0:
            pytest.skip("containerd needs root (it mounts snapshots and owns its root directory)")
        daemon = Containerd(tmp_path / f"containerd-{len(started)}")
        try:
            daemon.start()
        except ClientError as e:
            pytest.skip(f"cannot start containerd: {e}")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def containerd(start_containerd) -> Containerd:
    """One private containerd daemon, started for the test."""
    return start_containerd()


def blob_storage_path(registry, digest: str) -> Path:
    """Where the registry's filesystem driver keeps a blob (for tests that tamper with it)."""
    hexd = digest.split(":", 1)[1]
    return registry.storage_dir / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


@pytest.fixture(autouse=True)
def _no_fd_leaks():
    """Every test closes what it opens (files, sockets, mmaps)."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    targets = sorted(filter(None, map(_fd_target, set(os.listdir("/proc/self/fd")) - before)))
    # Session-wide fixtures (the registry's log files, pycurl's pools) may open descriptors
    # on first use; only files under a test's own tmp tree count as leaks.
    assert not [t for t in targets if "/pytest-" in t and "registry" not in t], targets


def _fd_target(fd: str) -> str | None:
    """What descriptor ``fd`` of this process names; None if a background thread (a daemon's reader,
    gRPC's poller) closed it since it was listed: a closed descriptor is no leak."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


def flocks(directory: Path) -> list[tuple[int, bool]]:
    """``(pid, waiting)`` for each flock on a ``*.lock`` file in ``directory``, from /proc/locks
    (a waiter's line reads ``N: -> FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...``)."""
    inodes = {p.stat().st_ino for p in directory.glob("*.lock")}
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        waiting = fields[1] == "->"
        if waiting:
            del fields[1]
        if fields[1] == "FLOCK" and int(fields[5].split(":")[2]) in inodes:
            found.append((int(fields[4]), waiting))
    return found


def blocked_on(directory: Path) -> int:
    """How many flock waiters are blocked on a lock file in ``directory``."""
    return sum(waiting for _, waiting in flocks(directory))


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    """Re-check ``condition`` every 10 ms; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def _try_chown(scratch: Path) -> None:
    os.chown(scratch, 12345, 12345)


def _try_mknod(scratch: Path) -> None:
    os.mknod(scratch / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))


def _try_xattr(namespace: str) -> Callable[[Path], None]:
    return lambda scratch: os.setxattr(scratch, f"{namespace}.fastpull-probe", b"1")


def _try_run(*command: str) -> Callable[[Path], None]:
    def run(_: Path) -> None:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{' '.join(command)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return run


PRIVILEGES: dict[str, tuple[str, Callable[[Path], None]]] = {
    # name: (what it takes, a probe that raises OSError without it)
    "chown": ("CAP_CHOWN", _try_chown),
    "mknod": ("CAP_MKNOD", _try_mknod),
    "trusted-xattr": ("CAP_SYS_ADMIN (trusted.* xattrs)", _try_xattr("trusted")),
    "security-xattr": ("CAP_SYS_ADMIN (security.* xattrs)", _try_xattr("security")),
    "confine": ("a mount namespace and chroot", _try_run("unshare", "--mount", "--", "chroot", "/", "true")),
    "netns-tc": ("a network namespace and tc qdiscs",
                 _try_run("unshare", "--net", "--", "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")),
}


@functools.cache
def lacking(privilege: str) -> str | None:
    """Why this process cannot do ``privilege`` (a key of ``PRIVILEGES``), found by trying it in a
    scratch directory; None if it can."""
    needs, probe = PRIVILEGES[privilege]
    with tempfile.TemporaryDirectory() as scratch:
        try:
            probe(Path(scratch))
        except OSError as e:
            return f"needs {needs}: {e}"
    return None


def needs(*privileges: str) -> pytest.MarkDecorator:
    """Skip unless this process has each of ``privileges`` (tried, not guessed from the uid)."""
    reasons = [r for p in privileges if (r := lacking(p)) is not None]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A tmpfs of ``size`` (``mount -o size=``) mounted on a new directory ``path``; yields a
    function that resizes it. Skips the test, saying why, where mounting is not allowed."""
    path.mkdir()
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs CAP_SYS_ADMIN): {tried.stderr.strip()}")

    def resize(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)

    try:
        yield resize
    finally:
        # Not lazily: a file still open on it (a leak) fails the test, and then it is detached.
        busy = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if busy.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)
            raise AssertionError(f"{path} could not be unmounted: {busy.stderr.strip()}")


# ---- signals as a terminal gives them ----------------------------------------------------------

def pytest_sessionstart(session):
    """Tests send SIGINT, SIGHUP and SIGQUIT to the processes they start, and expect what a terminal's
    shell gives them: a suite started in the background by a script (CI, nohup) inherits them ignored,
    and Python then raises no KeyboardInterrupt. Give this process (and so every child) the defaults."""
    for signum in (signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ---- the fault matrix's table (tests/faultmatrix.py) --------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "fault_cell(fault, phase): a cell of the fault matrix (tests/faultmatrix.py)")
    config.stash[_CELL_OUTCOMES] = {}


_CELL_OUTCOMES = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("fault_cell")
    if marker is not None and (report.when == "call" or report.outcome != "passed"):
        outcomes = item.config.stash[_CELL_OUTCOMES]
        if report.failed:
            outcomes[marker.args] = None
        elif hasattr(report, "wasxfail"):
            outcomes[marker.args] = f"xfail: {report.wasxfail.removeprefix('reason: ')}"
        elif report.passed:
            outcomes[marker.args] = dict(item.user_properties).get("fault_outcome", "passed")
    return report


def pytest_sessionfinish(session):
    """Write docs/faults.md when every cell of the matrix ran and none failed."""
    outcomes = session.config.stash.get(_CELL_OUTCOMES, {})
    if set(outcomes) == set(faultmatrix.cells()) and None not in outcomes.values():
        text = faultmatrix.render(outcomes)
        if not faultmatrix.DOC.exists() or faultmatrix.DOC.read_text() != text:
            faultmatrix.DOC.parent.mkdir(exist_ok=True)
            faultmatrix.DOC.write_text(text)
