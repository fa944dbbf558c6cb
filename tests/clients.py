"""Real registry clients for tests: a private containerd driven by ``ctr``, and skopeo, pointed at a
registry mirror the standard way (containerd's ``hosts.toml``, containers' ``registries.conf``), and
checks that what they pulled is the generated image, byte for byte and file for file.

Debian 12 ships containerd 1.6.20 and skopeo 1.9.3; the flags used here are theirs
(``ctr image pull --hosts-dir``/``--plain-http``, skopeo's hidden global ``--registries-conf``).
"""

from __future__ import annotations

import contextlib
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from fastpull.testbed.images import BuiltImage, LayerSpec, Media, build_image
from fastpull.testbed.reference import describe, reference_rootfs

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{state}/containerd.sock"

[ttrpc]
  address = "{state}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
"""


class ClientError(RuntimeError):
    """A client did not start or a command of it failed; the message quotes its output."""


class Containerd:
    """A private ``containerd``: its own root, state, socket and config under ``workdir``, CRI disabled.

    A context manager; on exit the daemon is ended by its PID. ``snapshotter`` is chosen at start:
    overlayfs where containerd could load it (its plugin tries an overlay mount in ``root`` when it
    loads, so this is decided by trying), else native. ``command_prefix`` runs the daemon and ``ctr``
    in another context, e.g. ``["ip", "netns", "exec", NAME]``.
    """

    def __init__(self, workdir: Path, *, command_prefix: Sequence[str] = (), start_timeout: float = 20.0):
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.address = self.state / "containerd.sock"
        self.config = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.snapshotter = ""
        self._prefix = list(command_prefix)
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Self:
        """Launch the daemon and wait until ``ctr version`` answers; :class:`ClientError` quoting its log if not."""
        self.root.mkdir(parents=True)
        self.state.mkdir()
        self.config.write_text(_CONFIG.format(root=self.root, state=self.state))
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [*self._prefix, "containerd", "--config", str(self.config), "--log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self._start_timeout
        while not (self.address.exists() and self.ctr("version", check=False).returncode == 0):
            if (code := self._proc.poll()) is not None:
                self._proc = None
                raise ClientError(f"containerd exited {code}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ClientError(f"containerd did not answer in {self._start_timeout:g} s: {self.log_tail()}")
            time.sleep(0.02)
        plugins = self.ctr("plugins", "ls").stdout.split("\n")
        overlay = any(line.split()[1:2] == ["overlayfs"] and line.split()[-1] == "ok" for line in plugins)
        self.snapshotter = "overlayfs" if overlay else "native"
        return self

    def stop(self) -> None:
        """End the daemon (SIGTERM, then SIGKILL after 20 s) and wait for it; a no-op if not started."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def ctr_command(self, *args: str) -> list[str]:
        """``ctr`` against this daemon (without the command prefix)."""
        return ["ctr", "--address", str(self.address), *args]

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ctr ARGS``; with ``check``, :class:`ClientError` quoting its stderr if it fails."""
        done = subprocess.run([*self._prefix, *self.ctr_command(*args)], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise ClientError(f"ctr {' '.join(args)} -> {done.returncode}: {done.stderr.strip()}")
        return done

    def pull_args(self, ref: str, *, hosts_dir: Path | None = None, plain_http: bool = False) -> list[str]:
        """``ctr`` arguments that pull ``ref`` (fetch, then unpack into the snapshotter), through the
        ``hosts.toml`` files under ``hosts_dir`` if given, plain HTTP to the registry with ``plain_http``."""
        flags = ["--snapshotter", self.snapshotter]
        if hosts_dir is not None:
            flags += ["--hosts-dir", str(hosts_dir)]
        if plain_http:
            flags.append("--plain-http")
        return ["image", "pull", *flags, ref]

    def pull(self, ref: str, *, hosts_dir: Path | None = None, plain_http: bool = False) -> None:
        self.ctr(*self.pull_args(ref, hosts_dir=hosts_dir, plain_http=plain_http))

    def image_digest(self, ref: str) -> str | None:
        """The manifest digest containerd lists for ``ref``, None if it has no such image."""
        for line in self.ctr("image", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields[0] == ref:
                return fields[2]
        return None

    def content_path(self, digest: str) -> Path:
        """Where the content store keeps a blob."""
        return self.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / digest.removeprefix("sha256:")

    @contextlib.contextmanager
    def mounted(self, ref: str, target: Path) -> Iterator[Path]:
        """The image's rootfs, its snapshots mounted read-only on a new directory ``target``."""
        target.mkdir()
        self.ctr("image", "mount", "--snapshotter", self.snapshotter, ref, str(target))
        try:
            yield target
        finally:
            self.ctr("image", "unmount", "--rm", str(target))


def check_containerd_image(daemon: Containerd, ref: str, image: BuiltImage, scratch: Path) -> None:
    """Assert that ``daemon`` has ``ref`` as ``image``: its manifest digest, every blob byte for byte
    in the content store, and the rootfs its snapshots make equal to the layers applied one by one
    with GNU tar. ``scratch`` is a new directory for the comparison."""
    scratch.mkdir()
    assert daemon.image_digest(ref) == image.manifest_digest
    for digest in (image.manifest_digest, *(blob.digest for blob in image.blobs)):
        assert daemon.content_path(digest).read_bytes() == image.blob_path(digest).read_bytes(), digest
    reference_rootfs(image, scratch / "expected", scratch)
    with daemon.mounted(ref, scratch / "mounted") as rootfs:
        assert describe(rootfs) == describe(scratch / "expected")


def write_hosts_toml(hosts_dir: Path, registry: str, mirror: str | None = None, ca_file: str | None = None) -> Path:
    """Write ``hosts_dir/REGISTRY/hosts.toml``: containerd pulls of ``registry`` (``HOST:PORT``) go to the
    plain-HTTP mirror ``mirror`` (``HOST:PORT``) for manifests and blobs, then to ``registry`` itself if
    the mirror fails; without ``mirror``, to ``registry`` alone. ``registry`` speaks plain HTTP, or with
    ``ca_file`` HTTPS verified with that CA. Returns ``hosts_dir`` (for ``--hosts-dir``)."""
    server = f"{'https' if ca_file else 'http'}://{registry}"
    ca = f'ca = "{ca_file}"\n' if ca_file else ""
    host = f"http://{mirror}" if mirror else server
    # containerd 1.6 rejects a hosts.toml without a [host] table; top-level keys configure `server`.
    (hosts_dir / registry).mkdir(parents=True, exist_ok=True)
    (hosts_dir / registry / "hosts.toml").write_text(
        f'server = "{server}"\n{ca}\n'
        f'[host."{host}"]\n  capabilities = ["pull", "resolve"]\n' + (f"  {ca}" if host == server else "")
    )
    return hosts_dir


def write_registries_conf(path: Path, registry: str, mirror: str) -> Path:
    """Write a containers ``registries.conf`` at ``path`` whose entry for ``registry`` pulls through the
    mirror ``mirror`` (both ``HOST:PORT``, plain HTTP allowed); returns ``path``."""
    path.write_text(
        f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
    )
    return path


def skopeo_copy_command(ref: str, dest: Path, registries_conf: Path) -> list[str]:
    """``skopeo copy docker://REF dir:DEST`` with ``registries_conf``; ``dir:`` keeps the manifest as served."""
    return ["skopeo", "--registries-conf", str(registries_conf), "--insecure-policy", "copy", "--quiet",
            f"docker://{ref}", f"dir:{dest}"]


def skopeo_copy(ref: str, dest: Path, registries_conf: Path) -> None:
    """Copy ``ref`` into the new directory ``dest``; :class:`ClientError` quoting skopeo if it fails."""
    done = subprocess.run(skopeo_copy_command(ref, dest, registries_conf), capture_output=True, text=True)
    if done.returncode != 0:
        raise ClientError(f"skopeo copy {ref} -> {done.returncode}: {done.stderr.strip()}")


def check_skopeo_dir(dest: Path, image: BuiltImage) -> None:
    """Assert that the ``dir:`` copy in ``dest`` is ``image``: the manifest and every blob byte for byte."""
    assert (dest / "manifest.json").read_bytes() == image.manifest
    for blob in image.blobs:
        assert (dest / blob.digest.removeprefix("sha256:")).read_bytes() == image.blob_path(blob.digest).read_bytes()


def _whiteout(tar: tarfile.TarFile) -> None:
    """Delete ``layer-0/file-00001``: the rootfs must not show it."""
    info = tarfile.TarInfo("layer-0/.wh.file-00001")
    info.mtime = 1_700_000_000
    tar.addfile(info)


def client_image(out_dir: Path, media: Media = "oci") -> BuiltImage:
    """The small image the client tests pull: three files, two more in a second layer (zstd in OCI,
    gzip in Docker media, which defines no zstd), and a third layer whose whiteout deletes a file
    of the first."""
    return build_image([LayerSpec(1_000_000, files=3),
                        LayerSpec(300_000, "text", "zstd" if media == "oci" else "gzip", files=2),
                        LayerSpec(0, files=0, entries=_whiteout)], out_dir, media=media)
