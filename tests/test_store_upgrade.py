"""Upgrades: a store written by the previous release (the code before the snapshotter: no format
marker) is read as it is by this code, which marks its format; a store of a newer format is refused
in one line that names it and says to upgrade fastpull."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fastpull.content.store import FORMAT
from fastpull.testbed.images import LayerSpec, build_image, push_image

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS_RELEASE = "d30e90b^"
"""The last commit before the snapshotter, whose stores carry no format marker."""
MiB = 1 << 20


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    """That commit's source tree (pure Python: it runs with FASTPULL_NO_EXTENSIONS=1, nothing built)."""
    tree = tmp_path_factory.mktemp("previous-release")
    if shutil.which("git") is None:
        pytest.skip(f"git is needed to check out {PREVIOUS_RELEASE}")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE], capture_output=True)
    if archive.returncode != 0:  # e.g. a shallow clone, or no git checkout at all
        pytest.skip(f"cannot check out {PREVIOUS_RELEASE}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def _fastpull(*args: str, code: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m fastpull ARGS`` of this tree, or of the source tree ``code``."""
    env = dict(os.environ)
    if code is not None:
        env.update(PYTHONPATH=str(code), FASTPULL_NO_EXTENSIONS="1")
    return subprocess.run([sys.executable, "-m", "fastpull", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=code or ROOT)  # `-m` puts the working directory first on sys.path


def test_a_store_of_the_previous_release_is_read_as_it_is(previous_release, registry, image_cache, tmp_path):
    image = build_image([LayerSpec(MiB, files=3), LayerSpec(100_000)], image_cache / "upgrade", seed=3)
    push_image(registry.url, "upgrade/app", "v1", image)
    ref = f"{registry.host}/upgrade/app:v1"
    store = tmp_path / "store"
    layers = store / "snapshots"
    done = _fastpull("pull", ref, "--layout", str(store), "--snapshots", str(layers), code=previous_release)
    assert done.returncode == 0, done.stderr
    marker = store / ".fastpull" / "format.json"
    assert not marker.exists()  # the previous release wrote it, not this code
    unpacked = sorted(layers.glob("sha256/*"))
    assert len(unpacked) == 2

    (listed,) = [json.loads(line) for line in _fastpull("images", "--json", "--layout", str(store)).stdout.splitlines()]
    assert (listed["name"], listed["digest"]) == (ref, image.manifest_digest)
    assert json.loads(marker.read_text()) == {"format": FORMAT}

    done = _fastpull("pull", ref, "--layout", str(store), "--snapshots", str(layers), "--json")
    assert done.returncode == 0, done.stderr
    pulled = json.loads(done.stdout.splitlines()[-1])
    assert (pulled["event"], pulled["digest"], pulled["fetched"]) == ("pulled", image.manifest_digest, 0)

    blobs = sorted(p.name for p in (store / "blobs" / "sha256").iterdir())
    done = _fastpull("gc", "--layout", str(store))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (store / "blobs" / "sha256").iterdir()) == blobs
    assert sorted(layers.glob("sha256/*")) == unpacked

    archive = tmp_path / "app.tar"
    done = _fastpull("export", ref, "-o", str(archive), "--layout", str(store))
    assert done.returncode == 0, done.stderr
    with tarfile.open(archive) as tar:
        assert f"blobs/sha256/{image.manifest_digest[7:]}" in tar.getnames()


def test_a_store_of_a_newer_format_is_refused_in_one_line(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(100_000)], image_cache / "upgrade-newer", seed=4)
    push_image(registry.url, "upgrade/newer", "v1", image)
    ref = f"{registry.host}/upgrade/newer:v1"
    store = tmp_path / "store"
    assert _fastpull("pull", ref, "--layout", str(store)).returncode == 0
    (store / ".fastpull" / "format.json").write_text(json.dumps({"format": FORMAT + 1}))
    index = (store / "index.json").read_bytes()
    for command in (["images"], ["pull", ref], ["gc"], ["export", ref, "-o", str(tmp_path / "x.tar")]):
        done = _fastpull(*command, "--layout", str(store))
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, (command, done.stderr)
        assert str(store) in done.stderr and f"format {FORMAT + 1}" in done.stderr
        assert "upgrade fastpull" in done.stderr
    assert (store / "index.json").read_bytes() == index and not (tmp_path / "x.tar").exists()
