"""fastpull: pull OCI/Docker images fast, verified while they land.

>>> import fastpull
>>> result = fastpull.pull("127.0.0.1:5000/app:v1", layout="/var/lib/images")

``Puller`` runs many pulls over one fetch engine; ``fastpull.content.core.BACKEND`` says
whether the compiled core (``"cy"``) or its pure-Python reference (``"py"``) is active.

The names below are imported on first use: ``import fastpull`` (and so every ``fastpull``
command) stays cheap until the engine is needed.
"""

TYPE_CHECKING = False  # typing itself costs start-up time; checkers know this name
if TYPE_CHECKING:
    from fastpull.engine import FetchEngine, FetchOptions
    from fastpull.errors import (
        AuthError,
        DigestMismatch,
        FastpullError,
        InvalidReference,
        MalformedArchive,
        ManifestError,
        PlatformNotFound,
        RegistryError,
        StoreError,
        TransferError,
        UnpackError,
        UnsafeArchive,
    )
    from fastpull.puller import Puller, PullResult, pull
    from fastpull.registry.client import RegistryClient

_MODULES = {
    "fastpull.errors": ("AuthError", "DigestMismatch", "FastpullError", "InvalidReference", "MalformedArchive",
                        "ManifestError", "PlatformNotFound", "RegistryError", "StoreError", "TransferError",
                        "UnpackError", "UnsafeArchive"),
    "fastpull.engine": ("FetchEngine", "FetchOptions"),
    "fastpull.puller": ("PullResult", "Puller", "pull"),
    "fastpull.registry.client": ("RegistryClient",),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "AuthError",
    "DigestMismatch",
    "FastpullError",
    "FetchEngine",
    "FetchOptions",
    "InvalidReference",
    "MalformedArchive",
    "ManifestError",
    "PlatformNotFound",
    "PullResult",
    "Puller",
    "RegistryClient",
    "RegistryError",
    "StoreError",
    "TransferError",
    "UnpackError",
    "UnsafeArchive",
    "pull",
]


def __getattr__(name: str) -> object:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'fastpull' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
