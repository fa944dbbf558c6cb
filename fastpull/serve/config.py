"""Configuration snippets that point a node's container runtime at ``fastpull serve``.

containerd reads ``hosts.toml`` per registry (``config_path``) and adds ``?ns=<registry>`` to
mirror requests; containers (CRI-O, podman, skopeo) read ``registries.conf`` mirrors, which cannot
add ``ns``, so the mirror location carries the registry as a path prefix; Docker's
``registry-mirrors`` applies to Docker Hub only.

With the snapshotter, containerd also names ``fastpull`` as a proxy snapshotter and has CRI unpack
into it with the remote-snapshot labels on. Where those labels come from differs by version:
containerd 2.x's transfer service sends them when the proxy plugin exports
``enable_remote_snapshot_annotations``, and unpacks only into the snapshotters its ``unpack_config``
lists (a list replaces the default, so overlayfs stays in it); in 2.x, CRI's own
``disable_snapshot_annotations = false`` (or mirrors or auths in CRI's registry table) silently
moves CRI to its older local pull path. containerd 1.6 and 1.7 need that very setting.
"""

from __future__ import annotations

import json

from fastpull.oci.reference import DOCKER_HUB, DOCKER_HUB_API_HOST

RUNTIMES = ("containerd", "containerd1", "crio", "docker")
SNAPSHOTTER = "fastpull"
"""The proxy plugin's name in containerd's configuration."""


def snippets(runtime: str, mirror: str, registries: list[str], default_registry: str,
             snapshotter: str | None = None, platform: str = "linux/amd64") -> str:
    """What to write where, for ``runtime`` to pull ``registries`` through the mirror at
    ``mirror`` (``host:port``) whose ``--upstream`` is ``default_registry``, and, given the socket
    ``snapshotter``, to unpack with it (containerd 2.x as ``containerd``, 1.6/1.7 as ``containerd1``;
    ``platform`` is the node's, for 2.x's unpack configuration). ValueError if the runtime cannot do it."""
    if snapshotter is not None and runtime not in ("containerd", "containerd1"):
        raise ValueError(f"the snapshotter is containerd's: {runtime} cannot use it")
    if runtime == "containerd":
        return _containerd2(mirror, registries, snapshotter, platform)
    if runtime == "containerd1":
        return _containerd1(mirror, registries, snapshotter)
    if runtime == "crio":
        return _crio(mirror, registries, default_registry)
    if runtime == "docker":
        if registries != [DOCKER_HUB] or default_registry != DOCKER_HUB:
            raise ValueError("Docker mirrors docker.io only (its registry-mirrors), with --upstream docker.io")
        doc = {"registry-mirrors": [f"http://{mirror}"]}
        return f"# /etc/docker/daemon.json (merge into it; then restart docker)\n{json.dumps(doc, indent=2)}\n"
    raise ValueError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")


def _containerd2(mirror: str, registries: list[str], snapshotter: str | None, platform: str) -> str:
    config = ('# /etc/containerd/config.toml (containerd 2.x, version = 3: merge, then restart containerd).\n'
              '# Leave CRI\'s disable_snapshot_annotations, registry.mirrors, .configs and .auths unset: any of\n'
              '# them moves CRI to its local pull path, which bypasses the transfer service.\n')
    if snapshotter is not None:
        config += (f'# Every CRI pull, the sandbox (pause) image\'s too, goes through fastpull: it must reach its registry.\n'
                   f'[plugins."io.containerd.cri.v1.images"]\n  snapshotter = "{SNAPSHOTTER}"\n\n')
    config += '[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "/etc/containerd/certs.d"\n'
    if snapshotter is not None:
        config += (f'\n[proxy_plugins.{SNAPSHOTTER}]\n'
                   f'  type = "snapshot"\n'
                   f'  address = "{snapshotter}"\n'
                   f'  # no capabilities: a "rebase" snapshotter gets layers without their parents\n'
                   f'  [proxy_plugins.{SNAPSHOTTER}.exports]\n'
                   f'    enable_remote_snapshot_annotations = "true"\n\n'
                   f'# Where pulls may unpack: a list replaces the default, so overlayfs stays in it.\n')
        for name in ("overlayfs", SNAPSHOTTER):
            config += (f'[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n'
                       f'  platform = "{platform}"\n  snapshotter = "{name}"\n  differ = "walking"\n')
    return _with_hosts(config, mirror, registries)


def _containerd1(mirror: str, registries: list[str], snapshotter: str | None) -> str:
    config = ('# /etc/containerd/config.toml (containerd 1.6 and 1.7, version = 2: merge, then restart containerd)\n'
              '[plugins."io.containerd.grpc.v1.cri".registry]\n'
              '  config_path = "/etc/containerd/certs.d"\n')
    if snapshotter is not None:
        config += (f'\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                   f'  snapshotter = "{SNAPSHOTTER}"\n'
                   f'  # CRI sends the layers\' image labels only with this; fastpull then fetches them itself\n'
                   f'  disable_snapshot_annotations = false\n\n'
                   f'[proxy_plugins.{SNAPSHOTTER}]\n'
                   f'  type = "snapshot"\n'
                   f'  address = "{snapshotter}"\n')
    return _with_hosts(config, mirror, registries)


def _with_hosts(config: str, mirror: str, registries: list[str]) -> str:
    parts = [config]
    for registry in registries:
        server = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
        parts.append(f'# /etc/containerd/certs.d/{registry}/hosts.toml\n'
                     f'server = "https://{server}"\n\n'
                     f'[host."http://{mirror}"]\n'
                     f'  capabilities = ["pull", "resolve"]\n')
    return "\n".join(parts)


def _crio(mirror: str, registries: list[str], default_registry: str) -> str:
    parts = ["# /etc/containers/registries.conf.d/50-fastpull.conf (CRI-O, podman, skopeo; "
             "CRI-O reloads on SIGHUP)\n"]
    for registry in registries:
        location = mirror if registry == default_registry else f"{mirror}/{registry}"
        parts.append(f'[[registry]]\nprefix = "{registry}"\nlocation = "{registry}"\n\n'
                     f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n')
    return "\n".join(parts)
