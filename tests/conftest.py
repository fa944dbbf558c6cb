"""Shared fixtures: a real CNCF distribution registry on loopback, and generated images."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

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


def blob_storage_path(registry, digest: str) -> Path:
    """Where the registry's filesystem driver keeps a blob (for tests that tamper with it)."""
    hexd = digest.split(":", 1)[1]
    return registry.storage_dir / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


@pytest.fixture(autouse=True)
def _no_fd_leaks():
    """Every test closes what it opens (files, sockets, mmaps)."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = set(os.listdir("/proc/self/fd")) - before
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    targets = sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in leaked)
    # Session-wide fixtures (the registry's log files, pycurl's pools) may open descriptors
    # on first use; only files under a test's own tmp tree count as leaks.
    assert not [t for t in targets if "/pytest-" in t and "registry" not in t], targets


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
