"""Configuration snippets that point a node's container runtime at ``fastpull serve``.

containerd reads ``hosts.toml`` per registry (``config_path``) and adds ``?ns=<registry>`` to
mirror requests; containers (CRI-O, podman, skopeo) read ``registries.conf`` mirrors, which cannot
add ``ns``, so the mirror location carries the registry as a path prefix; Docker's
``registry-mirrors`` applies to Docker Hub only.
"""

from __future__ import annotations

import json

from fastpull.oci.reference import DOCKER_HUB, DOCKER_HUB_API_HOST

RUNTIMES = ("containerd", "crio", "docker")


def snippets(runtime: str, mirror: str, registries: list[str], default_registry: str) -> str:
    """What to write where, for ``runtime`` to pull ``registries`` through the mirror at
    ``mirror`` (``host:port``) whose ``--upstream`` is ``default_registry``. ValueError if the
    runtime cannot do it."""
    if runtime == "containerd":
        return _containerd(mirror, registries)
    if runtime == "crio":
        return _crio(mirror, registries, default_registry)
    if runtime == "docker":
        if registries != [DOCKER_HUB] or default_registry != DOCKER_HUB:
            raise ValueError("Docker mirrors docker.io only (its registry-mirrors), with --upstream docker.io")
        doc = {"registry-mirrors": [f"http://{mirror}"]}
        return f"# /etc/docker/daemon.json (merge into it; then restart docker)\n{json.dumps(doc, indent=2)}\n"
    raise ValueError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")


def _containerd(mirror: str, registries: list[str]) -> str:
    parts = ['# /etc/containerd/config.toml (containerd 1.x; then restart containerd)\n'
             '[plugins."io.containerd.grpc.v1.cri".registry]\n'
             '  config_path = "/etc/containerd/certs.d"\n']
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
