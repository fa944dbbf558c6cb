"""A ``fastpull pull`` stopped by a signal while its layers download and unpack: every process
of the pull goes, nothing is left beside the target, the exit status says which signal, and the
same command then completes, resuming the partial blobs. Stopped at any moment of a pull of hundreds
of layers, it never hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import wait_until
from faultserver import FaultRegistry
from test_many_layers import BOUND_S, blob_gets, serve, tiny_image

from fastpull.puller.core import MAX_LAYERS
from fastpull.testbed.images import LayerSpec, build_image

MiB = 1 << 20
RATE = 256 * 1024
"""Bytes/s of each response for a layer: the pull lasts long enough to be stopped mid-unpack."""


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    specs = [LayerSpec(4 * MiB, files=16), LayerSpec(2 * MiB, content="text", compression="zstd", files=8)]
    return build_image(specs, tmp_path_factory.mktemp("img"), seed=41)


@pytest.fixture
def server(image):
    with FaultRegistry() as srv:
        srv.add_image("slow/app", "v1", image)
        for layer in image.layers:
            srv.slow(layer.digest, RATE)
        yield srv


def _session(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (the pull started a new one: its forkserver,
    workers and resource tracker stay in it, even once reparented)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # fields after "(comm)": state ppid pgrp session
                pids.append(int(entry.name))
    return pids


def _start(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _unpacking(out: Path, what: str) -> bool:
    """A worker has written a file into a layer's temporary tree."""
    return any(p.is_file() for tree in out.glob(what) for p in tree.rglob("*"))


def _stop_mid_unpack(command: list[str], out: Path, what: str, signum: int) -> subprocess.CompletedProcess[str]:
    return _signal_when(command, lambda pid: _unpacking(out, what) and len(_session(pid)) > 2,  # with its workers
                        "a layer unpacks", signum)


def _signal_when(command: list[str], ready: Callable[[int], bool], what: str, signum: int
                 ) -> subprocess.CompletedProcess[str]:
    """Run ``command``; send it ``signum`` once ``ready(its pid)``; wait until it and its processes are gone."""
    proc = _start(command)
    try:
        wait_until(lambda: ready(proc.pid), what, timeout=BOUND_S)
        os.kill(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=BOUND_S)
        wait_until(lambda: not _session(proc.pid), "every process of the pull is gone", timeout=30)
    finally:
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _rerun_resumes(server: FaultRegistry, image, command: list[str]) -> subprocess.CompletedProcess[str]:
    big = image.layers[0]
    server.clear_faults()
    server.clear()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 0 < server.bytes_served(big.digest) < big.size  # the partial blob was resumed
    return done


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_during_rootfs_unpack_stops_everything_and_the_pull_resumes(server, image, tmp_path, signum):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastpull", "pull", f"{server.host}/slow/app:v1",
               "--layout", str(tmp_path / "layout"), "--rootfs", str(out / "rootfs"), "--unpack-workers", "2"]
    stopped = _stop_mid_unpack(command, out, ".rootfs.fastpull-*", signum)
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert list(out.iterdir()) == []  # no temporary tree, no rootfs
    assert (tmp_path / "layout" / ".fastpull" / "ingest" / image.layers[0].digest.split(":")[1]).is_dir()
    _rerun_resumes(server, image, command)
    assert sorted(p.name for p in out.iterdir()) == ["rootfs"]


def test_a_pull_under_nohup_keeps_running_through_a_hang_up(server, image, tmp_path):
    """A stop signal ignored when the pull started stays ignored (here nohup's SIGHUP, mid-unpack)."""
    out = tmp_path / "out"
    command = ["nohup", sys.executable, "-m", "fastpull", "pull", f"{server.host}/slow/app:v1",
               "--layout", str(tmp_path / "layout"), "--rootfs", str(out / "rootfs"), "--unpack-workers", "2"]
    # nohup execs the pull (one pid); an ignored signal is dropped as it is sent: none stays pending
    done = _signal_when(command, lambda pid: _unpacking(out, ".rootfs.fastpull-*"), "a layer unpacks", signal.SIGHUP)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["rootfs"]


def test_sigterm_during_snapshot_unpack_leaves_no_snapshot_building(server, image, tmp_path):
    snapshots = tmp_path / "snapshots"
    command = [sys.executable, "-m", "fastpull", "pull", f"{server.host}/slow/app:v1",
               "--layout", str(tmp_path / "layout"), "--snapshots", str(snapshots)]
    stopped = _stop_mid_unpack(command, snapshots, ".tmp", signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert list((snapshots / ".tmp").iterdir()) == [] and list((snapshots / "sha256").iterdir()) == []
    _rerun_resumes(server, image, command)
    assert len(list((snapshots / "sha256").iterdir())) == len(image.layers)


def test_sigkill_takes_the_workers_too_and_the_next_pull_clears_the_tree_left(server, image, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastpull", "pull", f"{server.host}/slow/app:v1",
               "--layout", str(tmp_path / "layout"), "--rootfs", str(out / "rootfs")]
    killed = _stop_mid_unpack(command, out, ".rootfs.fastpull-*", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    left = list(out.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".rootfs.fastpull-")  # nobody could remove it
    _rerun_resumes(server, image, command)
    assert sorted(p.name for p in out.iterdir()) == ["rootfs"]


@pytest.fixture(scope="module")
def many_layers():
    return tiny_image(MAX_LAYERS)


@pytest.mark.parametrize("moment", ["manifest", 1, 2, 5, 10, 20, 50, 100, 200, 300, 400, "all"], ids=str)
def test_sigterm_at_any_moment_of_a_pull_of_many_layers_exits_143_and_leaves_no_tree(many_layers, tmp_path, moment):
    """500 tiny layers into a rootfs, the base one never landing (so the pull is under way whenever the
    signal comes): SIGTERM once the manifest is asked, once ``moment`` blobs are, or once all but the base
    are. Each time the pull exits 143 within the bound, every process gone and no tree left: the stop is
    a message its wait acts on, never an exception amid the locks of futures that its threads settle."""
    out = tmp_path / "out"
    with FaultRegistry() as srv:
        ref = serve(srv, many_layers)
        srv.stall_after(many_layers.digests[0], 0)

        def ready(pid: int) -> bool:
            if moment == "manifest":
                return any("/manifests/" in r.path for r in srv.log)
            if moment == "all":
                return {r.digest for r in blob_gets(srv)} >= set(many_layers.digests[1:])
            return len(blob_gets(srv)) >= moment

        command = [sys.executable, "-m", "fastpull", "pull", ref, "--layout", str(tmp_path / "layout"),
                   "--rootfs", str(out / "rootfs"), "--unpack-workers", "2"]
        stopped = _signal_when(command, ready, f"the pull reaches {moment}", signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not out.exists() or list(out.iterdir()) == []  # no temporary tree, no rootfs
