"""fastpull's own image: scripts/build_image.py builds it, Debian's containerd imports it (``ctr images
import``) and runs it (``ctr run``), and ``fastpull serve`` in it answers ``GET /v2/``; the
Containerfile and the DaemonSet agree with the script.

The build takes minutes (about 1.5 with the Debian base cached, 1 more to debootstrap it), so that
test runs only when asked for: ``pytest -m slow tests/test_image_build.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cri import node_daemons, skip_unless_containers_run

from fastpull.oci.manifest import Platform

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "build_image.py"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NAME = f"docker.io/library/fastpull:{VERSION}"

_spec = importlib.util.spec_from_file_location("build_image", SCRIPT)
assert _spec is not None and _spec.loader is not None
build_image = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_image)


def _unbuildable() -> str | None:
    """Why the image cannot be built here, None if it can."""
    if os.geteuid() != 0:
        return "building the image needs root (debootstrap, chroot, overlay mounts)"
    if sys.version_info[:2] != build_image.SUITE_PYTHON:
        return f"the fastpull wheel must be built by Python {build_image.SUITE_PYTHON}, Debian 12's"
    if build_image.base_path(build_image.default_cache()).exists():
        return None
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap): no Debian base to build on"
    try:
        urllib.request.urlopen(f"{build_image.MIRROR}/dists/{build_image.SUITE}/Release", timeout=15).close()
    except OSError as e:
        return f"Debian's mirror cannot be reached ({e}): no Debian base to build on"
    return None


@pytest.fixture(scope="module")
def image_archive(request, tmp_path_factory) -> Path:
    """The image built by the script, once per session (the Debian base is cached across sessions)."""
    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip("slow (builds a Debian image, minutes): run with pytest -m slow")
    if (reason := _unbuildable()) is not None:
        pytest.skip(reason)
    archive = tmp_path_factory.mktemp("image") / f"fastpull-{VERSION}.oci.tar"
    done = subprocess.run([sys.executable, str(SCRIPT), "-o", str(archive)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return archive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, deadline: float, server: subprocess.Popen[str]) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` until it answers (an HTTP error is an answer) or ``deadline``; fails if ``server`` exits first."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except OSError:
            assert server.poll() is None, f"the container exited {server.returncode}: {server.communicate()}"
            assert time.monotonic() < deadline, f"no answer from {url}"
            time.sleep(0.2)


@pytest.mark.slow
def test_containerd_imports_and_runs_the_image(image_archive, tmp_path):
    with node_daemons(tmp_path) as start:
        daemon = start(cri=False)
        skip_unless_containers_run()
        daemon.ctr("images", "import", str(image_archive))
        manifest = json.loads(daemon.ctr("content", "get", daemon.images()[NAME]).stdout)
        config = json.loads(daemon.ctr("content", "get", manifest["config"]["digest"]).stdout)
        host = Platform.host()
        assert (config["os"], config["architecture"], config.get("variant")) == (host.os, host.architecture,
                                                                                 host.variant)
        assert config["config"]["Entrypoint"] == build_image.ENTRYPOINT
        assert config["config"]["Cmd"] == build_image.CMD
        assert config["config"]["Labels"]["org.opencontainers.image.version"] == VERSION

        # The image's own command, on a free port: ctr run's arguments replace the whole command line.
        port = _free_port()
        argv = [a.replace("127.0.0.1:5050", f"127.0.0.1:{port}")
                for a in config["config"]["Entrypoint"] + config["config"]["Cmd"]]
        container = f"fastpull-image-{os.getpid()}"
        server = subprocess.Popen(daemon.ctr_command("run", "--rm", "--net-host", "--snapshotter", daemon.snapshotter,
                                                     NAME, container, *argv),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            status, headers, body = _get(f"http://127.0.0.1:{port}/v2/", time.monotonic() + 60, server)
            assert (status, json.loads(body)) == (200, {})
            assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
            daemon.ctr("task", "kill", "--signal", "SIGTERM", container)
            out, _ = server.communicate(timeout=30)
            assert server.returncode in (0, 143), out  # SIGTERM stops it cleanly
        finally:
            if server.poll() is None:
                daemon.ctr("task", "kill", "--signal", "SIGKILL", container, check=False)
                server.communicate(timeout=30)
            daemon.ctr("container", "rm", container, check=False)


def _containerfile(instruction: str) -> list[str]:
    """The JSON arguments of the Containerfile's last ``instruction`` (ENTRYPOINT, CMD)."""
    lines = re.findall(rf"^{instruction} (\[.*\])$", (REPO / "Containerfile").read_text(), re.MULTILINE)
    return json.loads(lines[-1])


def test_the_containerfile_and_the_daemonset_name_the_image_the_script_builds():
    assert _containerfile("ENTRYPOINT") == build_image.ENTRYPOINT
    assert _containerfile("CMD") == build_image.CMD
    assert f"org.opencontainers.image.version={VERSION}" in (REPO / "Containerfile").read_text()
    daemonset = (REPO / "deploy" / "daemonset.yaml").read_text()
    assert re.search(rf"^ +image: fastpull:{re.escape(VERSION)}\b", daemonset, re.MULTILINE)


def test_layers_hold_overlay_whiteouts_as_oci_ones(tmp_path):
    """A chroot step's overlay upper directory becomes a layer: a whiteout (a 0/0 character device)
    becomes ``.wh.NAME``, an opaque directory gets ``.wh..wh..opq``; other entries stay as they are."""
    if os.geteuid() != 0:
        pytest.skip("overlay whiteouts are character devices and trusted xattrs: root only")
    upper = tmp_path / "upper"
    (upper / "etc" / "new").mkdir(parents=True)
    (upper / "etc" / "new" / "file").write_text("x")
    os.mknod(upper / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(upper / "etc" / "new", "trusted.overlay.opaque", b"y")
    os.link(upper / "etc" / "new" / "file", upper / "etc" / "hard")
    with tarfile.open(tmp_path / "layer.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        build_image._tree(upper, overlay=True)(tar)
    with tarfile.open(tmp_path / "layer.tar") as tar:
        members = [(m.name, m.type) for m in tar.getmembers()]
    assert members == [("etc", tarfile.DIRTYPE), ("etc/.wh.gone", tarfile.REGTYPE), ("etc/hard", tarfile.REGTYPE),
                       ("etc/new", tarfile.DIRTYPE), ("etc/new/.wh..wh..opq", tarfile.REGTYPE),
                       ("etc/new/file", tarfile.LNKTYPE)]
