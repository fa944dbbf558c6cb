"""Streaming unpack against the real registry, compared with layer-by-layer GNU tar."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import needs

from fastpull import DigestMismatch, FetchOptions, pull
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.testbed.reference import describe, reference_rootfs
from fastpull.unpack.whiteouts import OPAQUE_XATTR

MiB = 1 << 20
OPTS = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4)


def _add(tar: tarfile.TarFile, name: str, kind=tarfile.REGTYPE, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = attrs.pop("mtime", 1_700_000_000)
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def base_layer(tar: tarfile.TarFile) -> None:
    for d in ("etc", "usr", "usr/bin", "opt", "opt/app", "var", "var/cache", "var/cache/x", "dev"):
        _add(tar, d, tarfile.DIRTYPE)
    _add(tar, "tmp", tarfile.DIRTYPE, mode=0o1777)
    _add(tar, "etc/hostname", data=b"base\n")
    _add(tar, "etc/remove-me", data=b"bye\n")
    _add(tar, "etc/shadow", data=b"secret\n", mode=0o640, uid=0, gid=42)
    _add(tar, "usr/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755)
    _add(tar, "usr/bin/tool-link", tarfile.LNKTYPE, linkname="usr/bin/tool")
    _add(tar, "bin", tarfile.SYMTYPE, linkname="usr/bin")
    _add(tar, "opt/app/old.txt", data=b"old\n")
    _add(tar, "opt/app/old-dir", tarfile.DIRTYPE)
    _add(tar, "opt/app/old-dir/f", data=b"f\n")
    _add(tar, "var/cache/x/blob", data=os.urandom(100_000))
    _add(tar, "home", tarfile.DIRTYPE)
    _add(tar, "home/user", tarfile.DIRTYPE, uid=1000, gid=1000, mode=0o700)
    _add(tar, "home/user/notes", data=b"mine\n", uid=1000, gid=1000)
    long_dir = "usr/" + "/".join(["d" * 60] * 4)
    parts = long_dir.split("/")
    for i in range(2, len(parts) + 1):
        _add(tar, "/".join(parts[:i]), tarfile.DIRTYPE)
    _add(tar, long_dir + "/" + "long-file-name-" + "x" * 120, data=b"long\n")
    info = tarfile.TarInfo("usr/bin/capable")
    info.size = 3
    info.mode = 0o755
    info.pax_headers = {
        "SCHILY.xattr.user.origin": "fastpull-test",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00" * 12,
    }
    tar.addfile(info, io.BytesIO(b"cap"))
    _add(tar, "dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
    _add(tar, "dev/fifo", tarfile.FIFOTYPE, mode=0o600)


def change_layer(tar: tarfile.TarFile) -> None:
    _add(tar, "etc", tarfile.DIRTYPE, mode=0o750)
    _add(tar, "etc/.wh.remove-me")
    _add(tar, "etc/hostname", data=b"changed\n")
    _add(tar, "opt/app", tarfile.DIRTYPE)
    _add(tar, "opt/app/.wh..wh..opq")
    _add(tar, "opt/app/new.txt", data=b"new\n")
    _add(tar, "var/.wh.cache")
    _add(tar, "bin", tarfile.DIRTYPE)  # the symlink becomes a real directory
    _add(tar, "bin/sh", data=b"#!sh\n", mode=0o755)
    _add(tar, "usr/bin/tool", data=b"#!/bin/sh\necho tool v2\n", mode=0o755)  # breaks the hardlink
    _add(tar, "srv", tarfile.DIRTYPE)
    _add(tar, "srv/a", data=b"aaa\n")
    _add(tar, "srv/b", tarfile.LNKTYPE, linkname="srv/a")


def empty_layer(tar: tarfile.TarFile) -> None:
    pass


def late_layer(tar: tarfile.TarFile) -> None:
    _add(tar, "srv/.wh.a")  # one name of a hardlink pair goes; the other stays
    _add(tar, "tmp/implied/file", data=b"x\n")  # tmp (1777 below) is not listed: it keeps its mode
    _add(tar, "opt/app/old.txt", data=b"resurrected\n")
    _add(tar, "var/cache", tarfile.DIRTYPE)


SPECS = [
    LayerSpec(MiB, entries=base_layer),
    LayerSpec(MiB, content="text", entries=change_layer),
    LayerSpec(0, files=0, entries=empty_layer),
    LayerSpec(64 * 1024, content="text", compression="zstd", entries=late_layer),
    LayerSpec(3 * MiB, compression="none", files=3),
]


@pytest.fixture(scope="module")
def special_image(registry, image_cache):
    image = build_image(SPECS, image_cache / "special", seed=21)
    push_image(registry.url, "unpack/special", "v1", image)
    return image, f"{registry.host}/unpack/special:v1"


@needs("chown", "mknod", "security-xattr")
def test_unpack_rootfs_equals_layer_by_layer_gnu_tar(special_image, tmp_path):
    image, ref = special_image
    result = pull(ref, tmp_path / "layout", rootfs=tmp_path / "rootfs", options=OPTS)
    assert result.rootfs == tmp_path / "rootfs"
    reference_rootfs(image, tmp_path / "reference", tmp_path)
    got, want = describe(tmp_path / "rootfs"), describe(tmp_path / "reference")
    assert set(got["tree"]) == set(want["tree"])
    for path in want["tree"]:
        assert got["tree"][path] == want["tree"][path], path
    assert got["hardlinks"] == want["hardlinks"]
    # Spot checks of what the layers did.
    root = tmp_path / "rootfs"
    assert not (root / "etc/remove-me").exists() and (root / "etc/hostname").read_text() == "changed\n"
    assert sorted(p.name for p in (root / "opt/app").iterdir()) == ["new.txt", "old.txt"]
    assert (root / "var/cache").is_dir() and not any((root / "var/cache").iterdir())
    assert (root / "usr/bin/tool").stat().st_mode & 0o7777 == 0o755
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert not [p for p in root.rglob("*") if p.name.startswith(".wh.")]
    assert not list(tmp_path.glob(".rootfs.fastpull-*"))  # work directories removed


@needs("trusted-xattr")  # opaque directories; whiteouts (0/0 devices) need no privilege
def test_unpack_snapshots_in_overlay_form(special_image, tmp_path):
    image, ref = special_image
    result = pull(ref, tmp_path / "layout", snapshots=tmp_path / "snapshots", options=OPTS)
    assert len(result.snapshots) == len(image.layers)
    change = result.snapshots[1]
    whiteout = (change / "etc/remove-me").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(change / "opt/app", OPAQUE_XATTR) == b"y"
    assert (change / "etc/hostname").read_text() == "changed\n"
    assert not (tmp_path / "snapshots" / ".tmp").exists() or not any((tmp_path / "snapshots" / ".tmp").iterdir())
    late = result.snapshots[3]
    assert stat.S_IMODE((late / "tmp").stat().st_mode) == 0o1777  # implied: inherited from below
    assert stat.S_IMODE((late / "tmp/implied").stat().st_mode) == 0o755
    again = pull(ref, tmp_path / "layout", snapshots=tmp_path / "snapshots", options=OPTS)
    assert again.snapshots == result.snapshots and again.unpacked_layers == 0


def test_unpack_wrong_diff_id_is_rejected_and_leaves_no_snapshot(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(MiB), LayerSpec(MiB)], image_cache / "baddiff", seed=22)
    config = json.loads(image.blob_path(image.config.digest).read_bytes())
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    forged = _with_config(image, json.dumps(config).encode(), tmp_path / "forged")
    push_image(registry.url, "unpack/baddiff", "v1", forged)
    ref = f"{registry.host}/unpack/baddiff:v1"
    with pytest.raises(DigestMismatch) as err:
        pull(ref, tmp_path / "layout", snapshots=tmp_path / "snapshots", options=OPTS)
    assert image.layers[1].digest in str(err.value) and "diffID" in str(err.value)
    committed = list((tmp_path / "snapshots" / "sha256").iterdir())
    assert len(committed) <= 1  # the good base layer may stay; the bad one never appears
    assert not any((tmp_path / "snapshots" / ".tmp").iterdir())
    with pytest.raises(DigestMismatch):
        pull(ref, tmp_path / "layout2", rootfs=tmp_path / "rootfs", options=OPTS)
    assert not (tmp_path / "rootfs").exists() and not list(tmp_path.glob(".rootfs.fastpull-*"))


def _with_config(image, config: bytes, out: Path):
    """A copy of ``image`` whose config blob is replaced (and the manifest rewritten to match)."""
    import dataclasses

    from fastpull.oci.manifest import Descriptor

    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for desc in image.layers:
        os.link(image.blob_path(desc.digest), blobs / desc.digest.split(":")[1])
    (blobs / digest.split(":")[1]).write_bytes(config)
    manifest = json.loads(image.manifest)
    manifest["config"]["digest"], manifest["config"]["size"] = digest, len(config)
    body = json.dumps(manifest).encode()
    (blobs / hashlib.sha256(body).hexdigest()).write_bytes(body)
    return dataclasses.replace(
        image, out_dir=out, manifest=body, manifest_digest="sha256:" + hashlib.sha256(body).hexdigest(),
        config=Descriptor(image.config.media_type, digest, len(config)),
    )


UNPACK_SCRIPT = """
import sys
from fastpull import FetchOptions, pull
if __name__ == "__main__":
    r = pull(sys.argv[1], sys.argv[2], snapshots=sys.argv[3], options=FetchOptions(transfer_rate_limit=4 << 20))
    print(r.unpacked_layers)
"""


def test_unpack_concurrent_processes_unpack_each_snapshot_once(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(4 * MiB, files=4), LayerSpec(2 * MiB)], image_cache / "dedupe", seed=23)
    push_image(registry.url, "unpack/dedupe", "v1", image)
    ref = f"{registry.host}/unpack/dedupe:v1"
    script = tmp_path / "unpack_once.py"
    script.write_text(UNPACK_SCRIPT)
    procs = [
        subprocess.Popen([sys.executable, str(script), ref, str(tmp_path / "layout"), str(tmp_path / "snaps")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        counts.append(int(out.strip().splitlines()[-1]))
    assert sum(counts) == len(image.layers)  # every snapshot unpacked by exactly one process
    assert len(list((tmp_path / "snaps" / "sha256").iterdir())) == len(image.layers)


HOSTILE = ("isal", "zstandard", "pycurl", "numpy")


def _hostile_directory(where: Path, markers: Path, package: bool) -> Path:
    """A working directory whose modules, if ever imported, leave a marker file."""
    where.mkdir()
    for name in HOSTILE:
        (where / f"{name}.py").write_text(f"open({str(markers / name)!r}, 'w').close()\n")
    if package:
        (where / "fastpull").mkdir()
        (where / "fastpull" / "__init__.py").write_text(f"open({str(markers / 'fastpull')!r}, 'w').close()\n")
    return where


CONSOLE_SCRIPT = """import sys
from fastpull.cli.main import main
if __name__ == "__main__":
    sys.exit(main())
"""


@pytest.mark.parametrize("launcher", ["console-script", "python-m"])
def test_unpack_workers_import_nothing_from_the_working_directory(registry, image_cache, tmp_path, launcher):
    """From a directory holding isal.py, zstandard.py, pycurl.py, numpy.py (and, for the console
    script, a fastpull/ package; ``python -m`` runs a fastpull/ found there by design), a pull
    with --rootfs runs none of them: not in the CLI, the fork server or the workers."""
    image = build_image([LayerSpec(MiB, files=2), LayerSpec(MiB, compression="zstd")], image_cache / "cwd", seed=24)
    push_image(registry.url, "unpack/cwd", "v1", image)
    markers = tmp_path / "markers"
    markers.mkdir()
    cwd = _hostile_directory(tmp_path / "cwd", markers, package=launcher == "console-script")
    if launcher == "console-script":  # what pip writes as bin/fastpull
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "fastpull").write_text(CONSOLE_SCRIPT)
        command = [sys.executable, str(tmp_path / "bin" / "fastpull")]
    else:
        command = [sys.executable, "-m", "fastpull"]
    done = subprocess.run([*command, "pull", f"{registry.host}/unpack/cwd:v1", "--layout", str(tmp_path / "layout"),
                           "--rootfs", str(tmp_path / "rootfs")], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "rootfs").iterdir()) == ["layer-0", "layer-1"]
    assert list(markers.iterdir()) == []
