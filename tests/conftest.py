"""Shared fixtures: a real CNCF distribution registry on loopback, and generated images."""

from __future__ import annotations

import os
import shutil
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
