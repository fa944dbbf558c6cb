"""The reference an unpacked rootfs is compared with: the image's layers applied one by one with
GNU tar (OCI whiteouts processed by hand), and a description of a tree that covers everything
the comparison looks at."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import zstandard

from fastpull.testbed.images import BuiltImage, LayerDescriptor


def uncompressed_layer(image: BuiltImage, desc: LayerDescriptor) -> bytes:
    """The tar inside one of ``image``'s layers."""
    data = image.blob_path(desc.digest).read_bytes()
    if desc.media_type.endswith("gzip"):
        return gzip.decompress(data)
    if desc.media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def reference_rootfs(image: BuiltImage, target: Path, scratch: Path) -> None:
    """Apply the layers of ``image`` one by one into a new directory ``target`` with GNU tar,
    processing OCI whiteouts by hand; ``scratch`` holds each layer's tar meanwhile."""
    target.mkdir()
    for i, desc in enumerate(image.layers):
        tar_path = scratch / f"layer-{i}.tar"
        tar_path.write_bytes(uncompressed_layer(image, desc))
        names = subprocess.run(["tar", "-tf", tar_path], capture_output=True, text=True, check=True).stdout
        for name in names.splitlines():
            parent, base = os.path.split(name.rstrip("/"))
            if base == ".wh..wh..opq":
                for child in (target / parent).iterdir():
                    subprocess.run(["rm", "-rf", child], check=True)
            elif base.startswith(".wh."):
                subprocess.run(["rm", "-rf", target / parent / base[4:]], check=True)
        subprocess.run(
            ["tar", "-xpf", tar_path, "-C", target, "--numeric-owner", "--xattrs", "--xattrs-include=*",
             "--exclude=.wh.*"],
            check=True,
        )
        tar_path.unlink()


def describe(root: Path) -> dict[str, Any]:
    """Everything the comparison looks at, by path: type, mode, owner, size, content, links, xattrs."""
    tree: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            extra = None
            if stat.S_ISREG(st.st_mode):
                extra = _file_sha256(path)
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                xattrs = {k: os.getxattr(path, k) for k in os.listxattr(path) if k.startswith(("user.", "security."))}
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
            tree[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, extra, xattrs)
    groups = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return {"tree": tree, "hardlinks": groups}


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
