"""The store and its commands: ``fastpull pull`` without ``--layout`` (the default store),
``fastpull images``, ``rm``, ``gc`` and ``export`` (an OCI archive skopeo copies), with bad input."""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from clients import check_containerd_image, client_image

from fastpull.content.defaults import default_store
from fastpull.content.layout import PULLED_AT, REF_NAME
from fastpull.testbed.images import LayerSpec, build_image, push_image

MiB = 1 << 20


def _fastpull(*args: str, store: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FASTPULL_STORE=str(store))
    return subprocess.run([sys.executable, "-m", "fastpull", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def _push(registry, image_cache: Path, repo: str, specs, *, seed: int, media: str = "oci"):
    image = build_image(specs, image_cache / f"store-{repo.replace('/', '_')}-{media}-{seed}", seed=seed, media=media)
    push_image(registry.url, repo, "v1", image)
    return image, f"{registry.host}/{repo}:v1"


def _images(store: Path) -> list[dict]:
    done = _fastpull("images", "--json", store=store)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _image_bytes(image) -> int:
    return len(image.manifest) + image.config.size + sum(d.size for d in image.layers)


def test_default_store_locations(monkeypatch):
    monkeypatch.setenv("FASTPULL_STORE", "/srv/images")
    assert default_store() == "/srv/images"
    monkeypatch.delenv("FASTPULL_STORE")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_store() == "/var/lib/fastpull"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/data")
    assert default_store() == "/home/u/data/fastpull"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_store() == "/home/u/.local/share/fastpull"


def test_pull_without_a_layout_goes_to_the_store_and_images_lists_it(registry, image_cache, tmp_path):
    image, ref = _push(registry, image_cache, "store/app", [LayerSpec(MiB, files=3), LayerSpec(100_000)], seed=1)
    store = tmp_path / "store"
    before = time.time()
    done = _fastpull("pull", ref, "--rootfs", str(tmp_path / "rootfs"), store=store)
    assert done.returncode == 0, done.stderr
    assert f"layout: {store}" in done.stdout and (tmp_path / "rootfs").is_dir()
    (entry,) = json.loads((store / "index.json").read_text())["manifests"]
    assert entry["annotations"][REF_NAME] == ref and entry["digest"] == image.manifest_digest

    (listed,) = _images(store)
    pulled_at = calendar.timegm(time.strptime(listed.pop("pulledAt"), "%Y-%m-%dT%H:%M:%SZ"))
    assert before - 1 <= pulled_at <= time.time()
    assert listed == {"name": ref, "digest": image.manifest_digest, "mediaType": image.media_type,
                      "size": _image_bytes(image)}
    text = _fastpull("images", store=store).stdout.splitlines()
    assert text[0].split() == ["NAME", "DIGEST", "SIZE", "PULLED", "AT"]
    assert text[1].split()[:2] == [ref, image.manifest_digest[:19]]

    again = _fastpull("pull", ref, "--layout", str(tmp_path / "elsewhere"), store=store)  # --layout as before
    assert again.returncode == 0 and (tmp_path / "elsewhere" / "index.json").exists()


def test_rm_untags_and_gc_frees_what_no_image_uses(registry, image_cache, tmp_path):
    one, ref_one = _push(registry, image_cache, "store/one", [LayerSpec(300_000), LayerSpec(200_000)], seed=2)
    two, ref_two = _push(registry, image_cache, "store/two", [LayerSpec(250_000)], seed=3)
    store = tmp_path / "store"
    for ref in (ref_one, ref_two):
        assert _fastpull("pull", ref, store=store).returncode == 0

    done = _fastpull("rm", ref_one, f"{registry.host}/store/nope:v1", store=store)
    assert done.returncode == 1 and done.stdout == f"untagged {ref_one}\n"
    assert done.stderr == f"fastpull rm: no image named {registry.host}/store/nope:v1 in {store}\n"
    assert [i["name"] for i in _images(store)] == [ref_two]

    done = _fastpull("gc", store=store)
    assert done.returncode == 0, done.stderr
    removed = {line.split()[2] for line in done.stdout.splitlines() if line.startswith("removed blob ")}
    assert removed == {one.manifest_digest, one.config.digest, *(d.digest for d in one.layers)}
    assert done.stdout.splitlines()[-1].startswith(f"freed {_image_bytes(one) / 1e6:.1f} MB: 4 blobs")
    for desc in (two.config, *two.layers):
        data = (store / "blobs" / "sha256" / desc.digest[7:]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == desc.digest[7:]
    assert _fastpull("gc", store=store).stdout.startswith("freed 0.0 MB: 0 blobs")

    done = _fastpull("rm", ref_two, store=store)  # the name `fastpull images` shows, or the reference
    assert done.returncode == 0 and _images(store) == []


def test_rm_refuses_a_bad_reference_before_it_removes_anything(registry, image_cache, tmp_path):
    _, ref = _push(registry, image_cache, "store/kept", [LayerSpec(100_000)], seed=4)
    store = tmp_path / "store"
    assert _fastpull("pull", ref, store=store).returncode == 0
    done = _fastpull("rm", ref, "Bad:Name:x", store=store)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "'Bad:Name:x'" in done.stderr
    assert [i["name"] for i in _images(store)] == [ref]


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_export_writes_an_oci_archive_that_skopeo_copies(registry, image_cache, tmp_path, media):
    image, ref = _push(registry, image_cache, f"store/export-{media}", [LayerSpec(MiB, files=2), LayerSpec(50_000)],
                       seed=5, media=media)
    store = tmp_path / "store"
    assert _fastpull("pull", ref, store=store).returncode == 0
    archive = tmp_path / "app.tar"
    done = _fastpull("export", ref, "-o", str(archive), store=store)
    assert done.returncode == 0 and done.stdout.startswith(f"exported {ref} to {archive}"), done.stderr

    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        (docker,) = json.load(tar.extractfile("manifest.json"))
        names = set(tar.getnames())
    (entry,) = index["manifests"]
    assert entry["digest"] == image.manifest_digest and entry["annotations"][REF_NAME] == ref
    assert PULLED_AT not in entry["annotations"]
    blob_names = {f"blobs/sha256/{d[7:]}" for d in (image.manifest_digest, image.config.digest)}
    blob_names |= {f"blobs/sha256/{d.digest[7:]}" for d in image.layers}
    assert names == {"oci-layout", "index.json", "manifest.json", "blobs", "blobs/sha256"} | blob_names
    assert docker == {"Config": f"blobs/sha256/{image.config.digest[7:]}", "RepoTags": [ref],
                      "Layers": [f"blobs/sha256/{d.digest[7:]}" for d in image.layers]}

    copied = tmp_path / "copied"
    skopeo = subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"dir:{copied}"],
                            capture_output=True, text=True, timeout=120)
    assert skopeo.returncode == 0, skopeo.stderr
    assert (copied / "manifest.json").read_bytes() == image.manifest  # copied as it is, digest and all
    for desc in (image.config, *image.layers):
        assert (copied / desc.digest[7:]).read_bytes() == image.blob_path(desc.digest).read_bytes()


def test_export_bad_input_gets_one_line_and_leaves_nothing_behind(registry, image_cache, tmp_path):
    _, ref = _push(registry, image_cache, "store/export-bad", [LayerSpec(100_000)], seed=6)
    store = tmp_path / "store"
    assert _fastpull("pull", ref, store=store).returncode == 0
    existing = tmp_path / "existing.tar"
    existing.write_bytes(b"kept")

    done = _fastpull("export", f"{registry.host}/store/nope:v1", "-o", str(existing), store=store)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"fastpull: content store error at {store}: no image named {registry.host}/store/nope:v1"]
    assert existing.read_bytes() == b"kept"
    done = _fastpull("export", ref, "-o", str(tmp_path / "no-such-dir" / "a.tar"), store=store)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"fastpull: content store error at {tmp_path / 'no-such-dir' / 'a.tar'}: No such file or directory"]
    done = _fastpull("export", "x:y:z", "-o", str(existing), store=store)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "'x:y:z'" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.tar", "store"]
    assert existing.read_bytes() == b"kept"


def test_store_commands_never_make_a_layout_of_something_else(tmp_path):
    other = tmp_path / "not-a-layout"
    (other / "blobs" / "sha256").mkdir(parents=True)
    (other / "blobs" / "sha256" / ("0" * 64)).write_text("someone else's")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args in (["gc"], ["images"], ["rm", "a:1"], ["export", "a:1", "-o", str(tmp_path / "a.tar")]):
        for root in (other, a_file):
            done = _fastpull(*args, "--layout", str(root), store=tmp_path / "unused")
            assert done.returncode == 1 and done.stderr.splitlines() == [
                f"fastpull: content store error at {root}: not an OCI image layout (no oci-layout file)"], done.stderr
    assert sorted(p.name for p in other.rglob("*")) == ["0" * 64, "blobs", "sha256"]
    missing = tmp_path / "missing"
    assert _fastpull("images", store=missing).stdout.splitlines() == ["NAME  DIGEST  SIZE  PULLED AT"]
    assert _fastpull("gc", store=missing).stdout == f"nothing to collect: no store at {missing}\n"
    assert not missing.exists()


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_ctr_imports_an_exported_archive(registry, image_cache, tmp_path, containerd, media):
    image = client_image(image_cache / f"store-ctr-{media}", media)
    push_image(registry.url, f"store/ctr-{media}", "v1", image)
    ref = f"{registry.host}/store/ctr-{media}:v1"
    store = tmp_path / "store"
    assert _fastpull("pull", ref, store=store).returncode == 0
    archive = tmp_path / "app.tar"
    assert _fastpull("export", ref, "-o", str(archive), store=store).returncode == 0
    containerd.ctr("image", "import", "--snapshotter", containerd.snapshotter, str(archive))
    check_containerd_image(containerd, ref, image, tmp_path / "scratch")
