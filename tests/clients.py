"""Real registry clients for tests: a private containerd driven by ``ctr``, and skopeo, pointed at a
registry mirror the standard way (containerd's ``hosts.toml``, containers' ``registries.conf``), and
checks that what they pulled is the generated image, byte for byte and file for file.

Debian 12 ships containerd 1.6.20 and skopeo 1.9.3; the flags used here are theirs
(``ctr image pull --hosts-dir``/``--plain-http``, skopeo's hidden global ``--registries-conf``).

:class:`Containerd` also starts the way a Kubernetes node runs it: with its CRI plugin (``cri=True``;
tests/cri.py is the kubelet's side), with a proxy snapshotter (``proxy_plugins``) that CRI pulls
into (``cri_snapshotter``), restarted or killed on the same root; it runs containers with ``ctr run``
(``Containerd.run``; the images need a static binary: :func:`busybox_layer`) and collects its garbage
synchronously (``Containerd.gc``, ``Containerd.remove_image``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from fastpull.oci.manifest import chain_ids
from fastpull.testbed.images import BuiltImage, LayerSpec, Media, build_image
from fastpull.testbed.reference import describe, reference_rootfs

if TYPE_CHECKING:
    from cri import CriImages

CRI_NAMESPACE = "k8s.io"
"""The containerd namespace CRI keeps its images, containers and snapshots in."""

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
"""

_DISABLED = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
             "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
             "io.containerd.internal.v1.tracing"]

_CRI_CONFIG = """
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {sandbox_image}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = {snapshotter}
    disable_snapshot_annotations = {disable_annotations}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin}
    conf_dir = {cni_conf}
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = {hosts_dir}
"""

_PROXY_PLUGIN = """
[proxy_plugins.{name}]
  type = "snapshot"
  address = {address}
"""

NO_SANDBOX_IMAGE = "fastpull.invalid/pause:none"
"""The CRI sandbox (pause) image when none is given: a name that resolves nowhere (``.invalid``).
Only ``RunPodSandbox`` needs it, and without a CNI config no pod starts anyway; the image service,
which is what the tests use, never pulls it (containerd 1.6 does not pull it at start)."""


_MAX_SOCKET_PATH = 104
"""containerd refuses a unix socket path longer than this (the BSDs' sun_path; Linux allows 107)."""


def _toml(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value)


class ClientError(RuntimeError):
    """A client did not start or a command of it failed; the message quotes its output."""


class Containerd:
    """A private ``containerd``: its own root, state, socket and config under ``workdir``, CRI disabled
    unless ``cri``.

    A context manager; on exit the daemon is ended by its PID. ``snapshotter`` is chosen at start:
    overlayfs where containerd could load it (its plugin tries an overlay mount in ``root`` when it
    loads, so this is decided by trying), else native. ``command_prefix`` runs the daemon and ``ctr``
    in another context, e.g. ``["ip", "netns", "exec", NAME]``.

    As a Kubernetes node runs it:

    - ``cri``: the CRI plugin serves the kubelet's API on ``address`` (tests/cri.py), and ``start``
      waits until its image service answers. Its state and root are under ``state`` and ``root``,
      its CNI directories empty ones under ``workdir/cni`` (containerd 1.6's CRI starts without a
      network config: only pods need one), its sandbox image ``sandbox_image``
      (:data:`NO_SANDBOX_IMAGE` by default), and it reaches registries through the ``hosts.toml``
      files under ``hosts_dir`` (``workdir/certs.d`` by default, read at each pull: write them with
      :func:`write_hosts_toml` before or after the start). CRI pulls into ``cri_snapshotter``
      (overlayfs by default) in the namespace :data:`CRI_NAMESPACE`.
    - ``proxy_plugins``: name -> unix socket of each proxy snapshotter (``[proxy_plugins.NAME]``,
      ``type = "snapshot"``); ``ctr --snapshotter NAME`` and ``cri_snapshotter`` may then name it.
      The socket need not exist at start: containerd dials it at the first call.
    - ``snapshot_annotations``: whether CRI passes the remote-snapshot labels
      (``containerd.io/snapshot/cri.*``) to the snapshotter's ``Prepare``
      (``disable_snapshot_annotations = false``); by default on exactly when ``cri_snapshotter``
      is one of ``proxy_plugins``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        command_prefix: Sequence[str] = (),
        start_timeout: float = 20.0,
        cri: bool = False,
        cri_snapshotter: str = "overlayfs",
        proxy_plugins: Mapping[str, str | Path] | None = None,
        snapshot_annotations: bool | None = None,
        sandbox_image: str = NO_SANDBOX_IMAGE,
        hosts_dir: Path | None = None,
    ):
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.address = self.state / "containerd.sock"
        self._socket_dir: Path | None = None
        if len(str(self.address)) + len(".ttrpc") > _MAX_SOCKET_PATH:
            # A deep workdir (a long test name): the sockets go to a short directory of their own.
            tag = hashlib.sha256(str(self.workdir.absolute()).encode()).hexdigest()[:16]
            self._socket_dir = Path("/tmp") / f"fastpull-containerd-{tag}"
            self.address = self._socket_dir / "containerd.sock"
        self.config = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.snapshotter = ""
        self.cri = cri
        self.cri_snapshotter = cri_snapshotter
        self.proxy_plugins = {name: Path(address) for name, address in (proxy_plugins or {}).items()}
        self.snapshot_annotations = (cri_snapshotter in self.proxy_plugins if snapshot_annotations is None
                                     else snapshot_annotations)
        self.sandbox_image = sandbox_image
        self.hosts_dir = Path(hosts_dir) if hosts_dir is not None else self.workdir / "certs.d"
        self.cni_dir = self.workdir / "cni"
        self._prefix = list(command_prefix)
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._runs = itertools.count()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def config_text(self) -> str:
        """The ``config.toml`` that ``start`` writes."""
        disabled = _DISABLED if self.cri else ["io.containerd.grpc.v1.cri", *_DISABLED]
        text = _CONFIG.format(root=self.root, state=self.state, address=self.address,
                              disabled=", ".join(_toml(plugin) for plugin in disabled))
        if self.cri:
            text += _CRI_CONFIG.format(
                sandbox_image=_toml(self.sandbox_image), snapshotter=_toml(self.cri_snapshotter),
                disable_annotations=str(not self.snapshot_annotations).lower(),
                cni_bin=_toml(str(self.cni_dir / "bin")), cni_conf=_toml(str(self.cni_dir / "conf")),
                hosts_dir=_toml(str(self.hosts_dir)),
            )
        for name, address in self.proxy_plugins.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"proxy plugin name {name!r}: letters, digits, - and _ only (a TOML bare key)")
            text += _PROXY_PLUGIN.format(name=name, address=_toml(str(address)))
        return text

    def start(self) -> Self:
        """Write the config, launch the daemon and wait until ``ctr version`` answers (and, with
        ``cri``, CRI's ``ListImages``); :class:`ClientError` quoting its log if not."""
        self.root.mkdir(parents=True)
        self.state.mkdir()
        if self.cri:
            (self.cni_dir / "bin").mkdir(parents=True)
            (self.cni_dir / "conf").mkdir()
            self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text())
        self._launch()
        return self

    def restart(self) -> Self:
        """Stop the daemon (if it runs: after :meth:`kill` it does not) and start it again on the same
        root, state and config, as a node's containerd restarts; waits as :meth:`start` does."""
        self.stop()
        self._launch()
        return self

    def kill(self) -> None:
        """SIGKILL the daemon by its PID and reap it, as a crash or ``kill -9`` ends it; a no-op if not started."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _launch(self) -> None:
        if self._proc is not None:
            raise RuntimeError("containerd is already running")
        if self._socket_dir is not None:
            self._socket_dir.mkdir(mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*self._prefix, "containerd", "--config", str(self.config), "--log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self._start_timeout
        while not (self.address.exists() and self.ctr("version", check=False).returncode == 0):
            self._check_starting(deadline)
        if self.cri:
            self._wait_cri(deadline)
        plugins = self.ctr("plugins", "ls").stdout.split("\n")
        overlay = any(line.split()[1:2] == ["overlayfs"] and line.split()[-1] == "ok" for line in plugins)
        self.snapshotter = "overlayfs" if overlay else "native"

    def _check_starting(self, deadline: float) -> None:
        """Between two readiness probes: fail if the daemon exited or the deadline passed, else pause."""
        assert self._proc is not None
        if (code := self._proc.poll()) is not None:
            self._proc = None
            self._remove_socket_dir()
            raise ClientError(f"containerd exited {code}: {self.log_tail()}")
        if time.monotonic() > deadline:
            self.stop()
            raise ClientError(f"containerd did not answer in {self._start_timeout:g} s: {self.log_tail()}")
        time.sleep(0.02)

    def _wait_cri(self, deadline: float) -> None:
        """Until CRI's image service answers ``ListImages`` (before its init ends it answers an error);
        :class:`ClientError` at once if containerd serves no such service (the CRI plugin did not load)."""
        from cri import CriError, CriImages  # tests/cri.py imports this module

        with CriImages(self.address) as images:
            while True:
                try:
                    images.list(timeout=2)
                    return
                except CriError as e:
                    if e.code.name == "UNIMPLEMENTED":
                        self.stop()
                        raise ClientError(f"containerd serves no CRI ({e}): {self.log_tail()}") from None
                    self._check_starting(deadline)

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
        self._remove_socket_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def ctr_command(self, *args: str, namespace: str | None = None) -> list[str]:
        """``ctr`` against this daemon (without the command prefix), in ``namespace`` if given (else
        ctr's own default, ``$CONTAINERD_NAMESPACE`` or ``default``)."""
        return ["ctr", "--address", str(self.address), *(["--namespace", namespace] if namespace else []), *args]

    def ctr(self, *args: str, check: bool = True, namespace: str | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr ARGS``; with ``check``, :class:`ClientError` quoting its stderr if it fails."""
        command = [*self._prefix, *self.ctr_command(*args, namespace=namespace)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ClientError(f"ctr {' '.join(args)} did not finish in {timeout:g} s") from e
        if check and done.returncode != 0:
            raise ClientError(f"ctr {' '.join(args)} -> {done.returncode}: {done.stderr.strip()}")
        return done

    def pull_args(self, ref: str, *, hosts_dir: Path | None = None, plain_http: bool = False,
                  snapshotter: str | None = None) -> list[str]:
        """``ctr`` arguments that pull ``ref`` (fetch, then unpack into ``snapshotter``, this daemon's by
        default), through the ``hosts.toml`` files under ``hosts_dir`` if given, plain HTTP to the
        registry with ``plain_http``. ctr 1.6 passes no remote-snapshot labels: it fetches every layer
        and applies it through the snapshotter's mounts."""
        flags = ["--snapshotter", snapshotter or self.snapshotter]
        if hosts_dir is not None:
            flags += ["--hosts-dir", str(hosts_dir)]
        if plain_http:
            flags.append("--plain-http")
        return ["image", "pull", *flags, ref]

    def pull(self, ref: str, *, hosts_dir: Path | None = None, plain_http: bool = False,
             snapshotter: str | None = None, namespace: str | None = None) -> None:
        self.ctr(*self.pull_args(ref, hosts_dir=hosts_dir, plain_http=plain_http, snapshotter=snapshotter),
                 namespace=namespace)

    def images(self, *, namespace: str | None = None) -> dict[str, str]:
        """Every image of ``namespace`` (``ctr image ls``): name -> manifest digest. CRI names an image
        three times: by tag, by digest reference and by image ID (``sha256:`` of the config)."""
        return {fields[0]: fields[2] for line in self.ctr("image", "ls", namespace=namespace).stdout.splitlines()[1:]
                if (fields := line.split())}

    def image_digest(self, ref: str, *, namespace: str | None = None) -> str | None:
        """The manifest digest containerd lists for ``ref``, None if it has no such image."""
        return self.images(namespace=namespace).get(ref)

    def remove_image(self, *refs: str, namespace: str | None = None, sync: bool = True) -> None:
        """``ctr image rm``; with ``sync`` (``--sync``) the last deletion runs containerd's garbage
        collection and waits for it, so on return the content and snapshots nothing references any
        more are gone, from proxy snapshotters too (containerd 1.6 waits for each snapshotter's
        cleanup: a walk that removes what its metadata lacks, then ``Cleanup``). A CRI image has three
        names (:meth:`images`): remove them all, or use CRI's ``RemoveImage``, which does the same."""
        self.ctr("image", "rm", *(["--sync"] if sync else []), *refs, namespace=namespace)

    def gc(self) -> None:
        """Run containerd's garbage collection now and wait for it to finish (content, metadata and
        every snapshotter's cleanup), with no image removed: ``ctr leases rm --sync`` of a new empty
        lease schedules a collection and waits for it. The collection covers every namespace."""
        lease = self.ctr("leases", "create", "--expires", "0").stdout.strip()
        self.ctr("leases", "rm", "--sync", lease)

    def snapshots(self, *, snapshotter: str | None = None, namespace: str | None = None) -> list[tuple[str, str, str]]:
        """``ctr snapshots ls`` of ``snapshotter`` (this daemon's by default) in ``namespace``:
        ``(key, parent, kind)`` each, ``parent`` empty for a base layer, ``kind`` ``Committed``,
        ``Active`` or ``View``."""
        out = self.ctr("snapshots", "--snapshotter", snapshotter or self.snapshotter, "ls", namespace=namespace)
        rows = []
        for line in out.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) == 2:
                fields.insert(1, "")
            if fields:
                rows.append((fields[0], fields[1], fields[2]))
        return rows

    def content_path(self, digest: str) -> Path:
        """Where the content store keeps a blob."""
        return self.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def cri_images(self) -> CriImages:
        """A CRI image-service client on this daemon (``cri``): close it, or use it with ``with``."""
        from cri import CriImages  # tests/cri.py imports this module

        return CriImages(self.address)

    @contextlib.contextmanager
    def mounted(self, ref: str, target: Path, *, snapshotter: str | None = None,
                namespace: str | None = None) -> Iterator[Path]:
        """The image's rootfs, a read-only view of its top snapshot of ``snapshotter`` (this daemon's
        by default) mounted on a new directory ``target``. Done by hand with ``ctr snapshots view``:
        ctr 1.6's ``image mount`` reads ``--snapshotter`` as a global flag that ctr does not have,
        so it always unpacks into the default snapshotter."""
        snapshotter = snapshotter or self.snapshotter
        manifest = json.loads(self.ctr("content", "get", self.images(namespace=namespace)[ref],
                                       namespace=namespace).stdout)
        config = json.loads(self.ctr("content", "get", manifest["config"]["digest"], namespace=namespace).stdout)
        top = chain_ids(config["rootfs"]["diff_ids"])[-1]
        key = f"fastpull-mount-{os.getpid()}-{next(self._runs)}"
        target.mkdir()
        mounts = json.loads(self.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, top,
                                     namespace=namespace).stdout)
        try:
            for m in mounts:
                subprocess.run(["mount", "-t", m["Type"], "-o", ",".join(m["Options"]), m["Source"], str(target)],
                               check=True, capture_output=True)
            try:
                yield target
            finally:
                subprocess.run(["umount", str(target)], check=True, capture_output=True)
        finally:
            # ctr 1.6 takes no lease for a view: containerd's GC may have removed it already.
            done = self.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, namespace=namespace, check=False)
            if done.returncode != 0 and "not found" not in done.stderr:
                raise ClientError(f"ctr snapshots rm {key} -> {done.returncode}: {done.stderr.strip()}")

    def run(self, ref: str, args: Sequence[str], *, snapshotter: str | None = None, namespace: str | None = None,
            timeout: float = 60.0) -> str:
        """Run ``args`` in a container of ``ref`` and return its stdout: ``ctr run --rm --snapshotter S
        REF ID ARGS`` with runc (io.containerd.runc.v2), its rootfs a new active snapshot of
        ``snapshotter`` (this daemon's by default; ctr unpacks the image there first if it is not).
        The image needs the binary (:func:`busybox_layer`). :class:`ClientError` quoting stderr if
        the container cannot start or exits non-zero; after ``timeout`` s its task is killed and the
        container removed."""
        container = f"fastpull-run-{os.getpid()}-{next(self._runs)}"
        argv = ["run", "--rm", "--snapshotter", snapshotter or self.snapshotter, ref, container, *args]
        try:
            done = self.ctr(*argv, check=False, namespace=namespace, timeout=timeout)
        except ClientError:
            self._remove_container(container, namespace)
            raise
        if done.returncode != 0:
            self._remove_container(container, namespace)
            raise ClientError(f"ctr run {ref} {' '.join(args)} -> {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def _remove_container(self, container: str, namespace: str | None) -> None:
        """Best effort, after a failed or timed-out ``run``: kill its task, delete it, its container and
        its snapshot (``ctr run --rm`` does this itself unless ctr was killed)."""
        self.ctr("task", "kill", "--signal", "SIGKILL", container, check=False, namespace=namespace, timeout=20)
        self.ctr("task", "rm", "--force", container, check=False, namespace=namespace, timeout=20)
        self.ctr("container", "rm", container, check=False, namespace=namespace, timeout=20)


def check_containerd_image(daemon: Containerd, ref: str, image: BuiltImage, scratch: Path, *,
                           namespace: str | None = None, snapshotter: str | None = None,
                           layers: bool = True) -> None:
    """Assert that ``daemon`` has ``ref`` as ``image`` in ``namespace``: its manifest digest, every blob
    byte for byte in the content store (the layers only with ``layers``: a remote snapshotter's pull
    fetches none), and the rootfs its snapshots of ``snapshotter`` (the daemon's by default) make
    equal to the layers applied one by one with GNU tar. ``scratch`` is a new directory for the
    comparison."""
    scratch.mkdir()
    assert daemon.image_digest(ref, namespace=namespace) == image.manifest_digest
    blobs = image.blobs if layers else (image.config,)
    for digest in (image.manifest_digest, *(blob.digest for blob in blobs)):
        assert daemon.content_path(digest).read_bytes() == image.blob_path(digest).read_bytes(), digest
    reference_rootfs(image, scratch / "expected", scratch)
    with daemon.mounted(ref, scratch / "mounted", snapshotter=snapshotter, namespace=namespace) as rootfs:
        assert describe(rootfs) == describe(scratch / "expected")


def blob_bytes_sent(registry) -> dict[str, int]:
    """Body bytes of each blob a testbed registry sent since its ``clear_served()``, by digest."""
    sent: dict[str, int] = {}
    for r in registry.served():
        if r.method == "GET" and "/blobs/" in r.path:
            digest = r.path.rsplit("/", 1)[1]
            sent[digest] = sent.get(digest, 0) + r.bytes_written
    return sent


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


def _client_layers(media: Media) -> list[LayerSpec]:
    return [LayerSpec(1_000_000, files=3), LayerSpec(300_000, "text", "zstd" if media == "oci" else "gzip", files=2),
            LayerSpec(0, files=0, entries=_whiteout)]


def client_image(out_dir: Path, media: Media = "oci") -> BuiltImage:
    """The small image the client tests pull: three files, two more in a second layer (zstd in OCI,
    gzip in Docker media, which defines no zstd), and a third layer whose whiteout deletes a file
    of the first."""
    return build_image(_client_layers(media), out_dir, media=media)


# ---- images that run ---------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")
"""Debian's ``busybox-static`` (scripts/install.sh): the one binary the runnable test images carry."""


def _is_static_elf(path: Path) -> bool:
    """Whether ``path`` is an ELF executable without a program interpreter (``PT_INTERP``), so it runs
    in an image that has no libc."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only: the test images are amd64/arm64
            return False
        order = "<" if header[5] == 1 else ">"
        phoff, = struct.unpack_from(order + "Q", header, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from(order + "I", table, i * phentsize)[0] != 3 for i in range(phnum))


def busybox_missing() -> str | None:
    """Why no runnable image can be built here (no static ``/bin/busybox``), None if one can."""
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} is missing: install busybox-static (scripts/install.sh)"
    if not _is_static_elf(BUSYBOX):
        return f"{BUSYBOX} is not statically linked: install busybox-static, not busybox"
    return None


def _add_busybox(tar: tarfile.TarFile) -> None:
    def member(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.linkname, info.mtime = kind, mode, size, link, 1_700_000_000
        return info

    tar.addfile(member("bin/", tarfile.DIRTYPE, 0o755))
    with open(BUSYBOX, "rb") as f:
        tar.addfile(member("bin/busybox", tarfile.REGTYPE, 0o755, os.fstat(f.fileno()).st_size), f)
    tar.addfile(member("bin/sh", tarfile.SYMTYPE, 0o777, link="busybox"))
    tar.addfile(member("bin/ls", tarfile.LNKTYPE, 0o755, link="bin/busybox"))


def busybox_layer() -> LayerSpec:
    """A layer of ``/bin/busybox`` (static, from the host), ``/bin/sh`` a symlink to it and ``/bin/ls``
    a hard link: put it on top of
    any test image's layers and ``Containerd.run`` can run ``/bin/busybox APPLET ...`` in it
    (:func:`container_tree`). Check :func:`busybox_missing` first. Never served from the build cache."""
    return LayerSpec(0, files=0, entries=_add_busybox)


def runnable_image(out_dir: Path, media: Media = "oci") -> BuiltImage:
    """:func:`client_image` with :func:`busybox_layer` on top."""
    return build_image([*_client_layers(media), busybox_layer()], out_dir, media=media)


Tree = dict[str, Any]
"""``{"tree": {path: (type, permissions, uid, gid, size, content)}, "hardlinks": [[path, ...], ...]}``,
paths relative to the rootfs: ``size`` and ``content`` (sha256) for a regular file, ``content`` the
target for a symlink, None otherwise; ``hardlinks`` the sorted groups of paths of one inode."""

_TREE_SCRIPT = (
    'cd / && for root; do busybox find "$root" -exec busybox stat -c "S %f %u %g %s %i %n" {} + '
    '&& busybox find "$root" -type f -exec busybox sha256sum {} + '
    '&& busybox find "$root" -type l -exec busybox stat -c "L %N" {} +; done'
)
"""Lists the trees under the given roots (relative to ``/``), one line per fact: ``S`` lines (raw mode in
hex, uid, gid, size, inode, path), sha256sum lines, ``L`` lines (``'path' -> 'target'``). Paths must
not contain newlines, and symlink names no quotes."""


def _tree(entries: dict[str, list], inodes: dict[int, list[str]]) -> Tree:
    return {"tree": {path: tuple(fields) for path, fields in entries.items()},
            "hardlinks": sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)}


def container_tree(daemon: Containerd, ref: str, roots: Sequence[str], *, snapshotter: str | None = None,
                   namespace: str | None = None) -> Tree:
    """What a container of ``ref`` (with :func:`busybox_layer`) sees under ``roots`` (paths relative to
    ``/``, each included), run by ``Containerd.run``; compare with :func:`host_tree` of the expected
    rootfs. Only the image's own directories make sense as roots: runc adds ``/proc``, ``/dev``,
    ``/sys`` and ``/run`` to every container. Hard links are found by inode: overlayfs shows a lower
    layer's file with its own inode number, so links within one layer group, and files of two
    snapshots that share an inode (a snapshotter that hard-links equal files) group too."""
    out = daemon.run(ref, ["/bin/busybox", "sh", "-c", _TREE_SCRIPT, "sh", *roots], snapshotter=snapshotter,
                     namespace=namespace)
    entries: dict[str, list] = {}
    inodes: dict[int, list[str]] = {}
    content: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("S "):
            _, mode, uid, gid, size, inode, path = line.split(" ", 6)
            raw = int(mode, 16)
            regular = stat.S_ISREG(raw)
            entries[path] = [stat.S_IFMT(raw), stat.S_IMODE(raw), int(uid), int(gid), int(size) if regular else None,
                             None]
            if regular:
                inodes.setdefault(int(inode), []).append(path)
        elif line.startswith("L "):
            path, _, target = line[2:].partition(" -> ")
            content[path.strip("'")] = target.strip("'")
        else:
            digest, path = line.split("  ", 1)
            content[path] = digest
    for path, value in content.items():
        entries[path][5] = value
    return _tree(entries, inodes)


def host_tree(rootfs: Path, roots: Sequence[str]) -> Tree:
    """:func:`container_tree`'s view of ``rootfs`` (e.g. ``reference_rootfs``'s) under ``roots``."""
    entries: dict[str, list] = {}
    inodes: dict[int, list[str]] = {}

    def add(path: Path) -> None:
        st = path.lstat()
        rel = str(path.relative_to(rootfs))
        value = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                value = hashlib.file_digest(f, "sha256").hexdigest()
            inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            value = os.readlink(path)
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        entries[rel] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, value]

    for root in roots:
        add(rootfs / root)
        for dirpath, dirnames, filenames in os.walk(rootfs / root):
            for name in dirnames + filenames:
                add(Path(dirpath) / name)
    return _tree(entries, inodes)
