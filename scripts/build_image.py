"""Build fastpull's own OCI image, the Containerfile's, without Docker, podman or buildah.

    .venv/bin/python scripts/build_image.py [-o fastpull-VERSION.oci.tar] [--name NAME] [--cache DIR]

Its layers are those the Containerfile makes:

1. Debian 12 (``debootstrap --variant=minbase bookworm``) slimmed as ``debian:bookworm-slim`` is:
   no documentation but copyrights, no man pages, no locales, and dpkg told to install none. Made
   once and kept as a tarball under ``--cache`` (delete it to take Debian's updates).
2. python3 and ca-certificates, installed by apt-get in a chroot.
3. ``/opt/fastpull``: a venv of fastpull and its dependencies, from wheels built here with pip's
   own configuration, installed in a chroot without network.

Each chroot step runs on an overlay mount in a private mount namespace, and its layer is the overlay's
upper directory, its whiteouts written as OCI ones. The testbed's image builder compresses the layers
and ``fastpull export`` writes the OCI archive (``ctr images import``, ``skopeo``, ``podman load``).
Needs root, util-linux's ``unshare``, Debian's mirror, and ``debootstrap`` while the base is not cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from fastpull.content.export import export_archive
from fastpull.content.layout import ImageLayout
from fastpull.oci.manifest import Descriptor, Platform
from fastpull.oci.reference import parse_reference
from fastpull.testbed.images import LayerSpec, build_image

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
SUITE_PYTHON = (3, 11)  # bookworm's python3: the fastpull wheel built here is for it
MIRROR = "http://deb.debian.org/debian"
ENTRYPOINT = ["/opt/fastpull/bin/fastpull"]
CMD = ["serve", "--store", "/var/lib/fastpull", "--listen", "127.0.0.1:5050",
       "--snapshotter", "/run/fastpull/snapshotter.sock"]
PATH = "/opt/fastpull/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# debuerreotype's slimming, which debian:*-slim images have (/etc/dpkg/dpkg.cfg.d/docker there).
SLIM_EXCLUDES = ("usr/share/doc", "usr/share/groff", "usr/share/info", "usr/share/linda",
                 "usr/share/lintian/overrides", "usr/share/locale", "usr/share/man")
DPKG_SLIM = "".join(f"path-exclude /{d}/*\n" for d in SLIM_EXCLUDES) + "path-include /usr/share/doc/*/copyright\n"
APT_STEP = ("apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 ca-certificates >/dev/null"
            " && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log"
            " /var/log/alternatives.log")
# pip runs from its own wheel (the venv has none yet) and installs itself too, as ensurepip would.
VENV_STEP = ("python3 -m venv --without-pip /opt/fastpull && set -- /mnt/pip-*.whl && /opt/fastpull/bin/python"
             ' "$1/pip" install -q --no-index --no-cache-dir --find-links /mnt pip fastpull')


def main(argv: list[str] | None = None) -> int:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    version = project["version"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path(f"fastpull-{version}.oci.tar"))
    parser.add_argument("--name", default=f"fastpull:{version}", help="the image's name (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="where the Debian base tarball is kept (default: %(default)s)")
    parser.add_argument("--mirror", default=MIRROR, help="Debian mirror (default: %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("must run as root (debootstrap, chroot and overlay mounts)")
    if sys.version_info[:2] != SUITE_PYTHON:
        parser.error(f"run with Python {'.'.join(map(str, SUITE_PYTHON))}, {SUITE}'s python3: "
                     "the fastpull wheel is built for it")
    name = str(parse_reference(args.name))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastpull-image-") as scratch:
        size, digest = build(Path(scratch), args.output, name, version, project["description"],
                             base_tarball(args.cache, args.mirror))
    print(f"{args.output}: {name} {digest}, {size / 1e6:.1f} MB, built in {time.monotonic() - start:.0f} s\n"
          f"  load: ctr -n k8s.io images import {args.output}\n"
          f"  push: skopeo copy oci-archive:{args.output} docker://REGISTRY/fastpull:{version}")
    return 0


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastpull" / "image-build"


def base_path(cache: Path) -> Path:
    """Where ``cache`` keeps the Debian base for this machine's architecture."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    return cache / f"debian-{SUITE}-minbase-{arch}.tar"


def base_tarball(cache: Path, mirror: str) -> Path:
    """The slimmed Debian base as a tarball in ``cache``, made with debootstrap if not there yet."""
    tarball = base_path(cache)
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        sys.exit("debootstrap is not installed: apt-get install debootstrap")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".base-", dir=cache) as scratch:
        root = Path(scratch, "root")
        _log(f"debootstrap --variant=minbase {SUITE} from {mirror}")
        subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), mirror],
                       check=True, stdout=subprocess.DEVNULL)
        # What a build host leaves, and what images leave out (the runtime provides resolv.conf and hostname).
        for junk in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*", "var/log/*.log",
                     "var/log/apt/*", "etc/resolv.conf", "etc/hostname",
                     *(f"{d}/*" for d in SLIM_EXCLUDES if d != "usr/share/doc")):
            for path in root.glob(junk):
                _remove(path)
        for doc in (root / "usr/share/doc").iterdir():  # each package's copyright stays
            if doc.is_dir() and not doc.is_symlink():
                for path in doc.iterdir():
                    if path.name != "copyright":
                        _remove(path)
        (root / "etc/dpkg/dpkg.cfg.d/slim").write_text(DPKG_SLIM)
        partial = Path(scratch, "base.tar")
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], check=True)
        os.replace(partial, tarball)
    return tarball


def build(work: Path, output: Path, name: str, version: str, description: str, base: Path) -> tuple[int, str]:
    """Build the image in ``work`` and write it to ``output``; its size in bytes and manifest digest."""
    rootfs, upper_apt, upper_venv, wheels = (work / d for d in ("base", "apt", "venv", "wheels"))
    rootfs.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xpf", str(base), "-C", str(rootfs)], check=True)
    _log("layer 2: apt-get install python3 ca-certificates")
    _step(work, [rootfs], upper_apt, APT_STEP, network=True)
    _log("wheels of fastpull and its dependencies")
    _wheels(work / "src", wheels)
    _log("layer 3: the venv /opt/fastpull")
    _step(work, [upper_apt, rootfs], upper_venv, VENV_STEP, bind_mnt=wheels)
    _log("compressing the layers")
    # The testbed's builder writes and hashes the layers; the config and manifest are this image's own.
    trees = [_tree(rootfs, skip_contents=frozenset({"dev", "proc", "sys"})),
             _tree(upper_apt, overlay=True), _tree(upper_venv, overlay=True)]
    built = build_image([LayerSpec(0, files=0, entries=tree) for tree in trees], work / "image")
    platform = Platform.host()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = {
        "architecture": platform.architecture, "os": platform.os,
        **({"variant": platform.variant} if platform.variant else {}),
        "created": created,
        "config": {"Entrypoint": ENTRYPOINT, "Cmd": CMD, "Env": [f"PATH={PATH}"], "Labels": {
            "org.opencontainers.image.title": "fastpull", "org.opencontainers.image.description": description,
            "org.opencontainers.image.version": version, "org.opencontainers.image.licenses": "Apache-2.0"}},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in built.layers]},
        "history": [{"created": created, "created_by": step} for step in (
            f"debootstrap --variant=minbase {SUITE} (slimmed)", APT_STEP, VENV_STEP)],
    }
    layout = ImageLayout(work / "image")
    config_desc = _put(layout, OCI_CONFIG, config)
    manifest = _put(layout, OCI_MANIFEST, {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                           "config": config_desc.to_dict(),
                                           "layers": [layer.to_dict() for layer in built.layers]})
    layout.tag(name, manifest)
    return export_archive(layout, name, output), manifest.digest


def _step(work: Path, lowers: list[Path], upper: Path, command: str, *, network: bool = False,
          bind_mnt: Path | None = None) -> None:
    """Run ``command`` in a chroot of an overlay of ``lowers`` (top first) with its changes in ``upper``.

    The mounts live in a mount namespace of their own, so they go when the step ends, however it ends.
    ``network``: the host's resolv.conf while it runs (absent below, it leaves no trace in ``upper``);
    ``bind_mnt``: a directory seen at /mnt (empty in Debian's base)."""
    merged, overlay_work = work / "merged", work / f"{upper.name}.work"
    for d in (upper, merged, overlay_work):
        d.mkdir(exist_ok=True)
    q = shlex.quote
    options = (f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={overlay_work},"
               "redirect_dir=off,metacopy=off")  # whole files and plain directories in upper: a layer as is
    env = f"env -i PATH={PATH} HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1"
    script = "\n".join([
        f"mount -t overlay overlay -o {q(options)} {q(str(merged))}",
        f"mount -t proc proc {q(str(merged / 'proc'))}",
        f"mount --rbind /dev {q(str(merged / 'dev'))}",
        *([f"mount --bind {q(str(bind_mnt))} {q(str(merged / 'mnt'))}"] if bind_mnt else []),
        *([f"cp /etc/resolv.conf {q(str(merged / 'etc/resolv.conf'))}"] if network else []),
        f"chroot {q(str(merged))} {env} /bin/sh -euc {q(command)}",
        *([f"rm {q(str(merged / 'etc/resolv.conf'))}"] if network else []),
    ])
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", script], check=True)


def _wheels(src: Path, wheels: Path) -> None:
    """Wheels of fastpull (built from a copy of the work tree, which stays untouched), its dependencies and pip."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():  # not a tracked file deleted in the work tree
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(src), "pip"],
                   check=True)


def _tree(root: Path, *, overlay: bool = False, skip_contents: frozenset[str] = frozenset()
          ) -> Callable[[tarfile.TarFile], None]:
    """Adds the tree under ``root`` to a layer's tar, sorted, with numeric owners; hard links as
    links; ``skip_contents`` names directories added empty. ``overlay``: ``root`` is an overlay's
    upper directory, whose whiteouts (0/0 character devices) and opaque directories become OCI's
    ``.wh.NAME`` and ``.wh..wh..opq``."""

    def whiteout(tar: tarfile.TarFile, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.mode = 0o600
        tar.addfile(info)

    def walk(tar: tarfile.TarFile, directory: str, prefix: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            info = tar.gettarinfo(entry.path, prefix + entry.name)
            if info is None:  # a socket: no layer holds one
                continue
            info.uname = info.gname = ""
            info.mtime = int(info.mtime)  # a float would cost a PAX header per member
            if overlay and info.ischr() and info.devmajor == info.devminor == 0:
                whiteout(tar, f"{prefix}.wh.{entry.name}")
            elif info.isreg():
                with open(entry.path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if info.isdir():
                if overlay and _opaque(entry.path):
                    whiteout(tar, f"{info.name}/.wh..wh..opq")
                if info.name not in skip_contents:
                    walk(tar, entry.path, f"{info.name}/")

    return lambda tar: walk(tar, str(root), "")


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _put(layout: ImageLayout, media_type: str, document: dict) -> Descriptor:
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    layout.store.put_bytes(digest, data)
    return Descriptor(media_type, digest, len(data))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _log(message: str) -> None:
    print(f"build_image: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
