"""The package's layers import one way (as go-containerregistry checks its own):

    errors, digests, _core/_pycore     used by all
    sockets                            gRPC servers on root-only unix sockets (snapshotter, CRI proxy)
    protos      -> (nothing of ours)   gRPC stubs generated from containerd's and cri-api's protos
    oci         -> (nothing of ours)   references, descriptors, manifests, platforms: pure data
    http        -> (nothing of ours)   transport and the HTTP policy; no OCI
    registry    -> oci, http           credentials, tokens, the registry client
    content     -> oci                 the content store (no OCI), the image layout, gc, export, the compiled core
    engine      -> http, content       the fetch loop, its planner and hashers; no OCI
    unpack      -> content, oci        the tar applier, worker processes, snapshots, rootfs
    puller      -> all of the above    a pull, wired together; events, what a pull tells as it runs
    snapshotter -> unpack, protos      containerd's snapshots API over overlay directories and the layer cache
    containerd  -> puller, protos and below   a pull handed to containerd through its API
    serve       -> containerd, snapshotter and below   the node daemon: mirror, snapshotter and CRI proxy over one engine and store
    cli         -> serve, containerd, puller, oci, engine (options), content (the store commands), registry (login, configuration), testbed (the demo)

Every module of the package is in one layer; a new one must be placed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fastpull

PACKAGE = Path(fastpull.__file__).parent
COMMON = {"fastpull", "fastpull.errors", "fastpull.digests", "fastpull._core", "fastpull._pycore", "fastpull.sockets"}
ALLOWED = {
    "protos": {"protos"},
    "oci": {"oci"},
    "http": {"http"},
    "registry": {"oci", "http", "registry"},
    "content": {"oci", "content"},
    "engine": {"http", "content", "engine"},
    "unpack": {"oci", "content", "unpack"},
    "puller": {"puller", "oci", "registry", "engine", "content", "unpack", "events"},
    "snapshotter": {"snapshotter", "unpack", "protos"},
    "serve": {"serve", "containerd", "snapshotter", "puller", "events", "registry", "engine", "content", "unpack", "oci", "protos"},
    "containerd": {"containerd", "puller", "events", "oci", "content", "unpack", "protos"},
    "cli": {"cli", "serve", "containerd", "snapshotter", "puller", "events", "oci", "engine", "content", "unpack", "registry",
            "testbed"},
    "testbed": {"testbed", "oci", "registry", "content", "http", "unpack"},
}
TOP = {"__init__": "package", "__main__": "cli", "errors": "common", "digests": "common", "_pycore": "common",
       "sockets": "common",
       "events": "puller"}
OCI_FREE = ("http/*.py", "engine/*.py", "content/store.py", "content/core.py")  # no manifests, no references


def _layer(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return TOP[rel.stem] if len(rel.parts) == 1 else rel.parts[0]


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").exists() or path.is_dir()


def _imports(module: Path) -> set[str]:
    """Every ``fastpull.*`` module it imports, at the top or inside functions (``from P import m``
    counts as importing ``P.m`` when ``m`` is a module)."""
    tree = ast.parse(module.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            submodules = {f"{n.module}.{a.name}" for a in n.names if _is_module(f"{n.module}.{a.name}")}
            names |= submodules or {n.module}
    return {n for n in names if n.startswith("fastpull.")} - COMMON


def _allowed(name: str, layer: str) -> bool:
    inner = name.removeprefix("fastpull.")
    return any(inner == a or inner.startswith(a + ".") for a in ALLOWED[layer])


def test_every_module_imports_only_from_its_own_or_lower_layers():
    modules = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(modules) > 20
    wrong = {}
    for module in modules:
        layer = _layer(module)
        if layer in ("package", "common"):
            continue
        # "from fastpull.registry import manifest" names fastpull.registry and fastpull.oci.manifest
        bad = {n for n in _imports(module) if not _allowed(n, layer)
               and not any(other.startswith(n + ".") and _allowed(other, layer) for other in _imports(module))}
        if bad:
            wrong[str(module.relative_to(PACKAGE))] = sorted(bad)
    assert not wrong, wrong


def test_http_engine_and_the_store_know_nothing_of_oci():
    for pattern in OCI_FREE:
        for module in PACKAGE.glob(pattern):
            assert not {n for n in _imports(module) if n.startswith(("fastpull.oci", "fastpull.registry"))}, module
