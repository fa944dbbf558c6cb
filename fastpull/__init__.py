"""fastpull: pull OCI/Docker images fast, verified while they land.

>>> import fastpull
>>> result = fastpull.pull("127.0.0.1:5000/app:v1", layout="/var/lib/images")

``Puller`` runs many pulls over one fetch engine; ``fastpull.core.BACKEND`` says
whether the compiled core (``"cy"``) or its pure-Python reference (``"py"``) is active.
"""

from fastpull.errors import (
    AuthError,
    DigestMismatch,
    FastpullError,
    InvalidReference,
    ManifestError,
    PlatformNotFound,
    RegistryError,
    StoreError,
    TransferError,
    UnsafeArchive,
)
from fastpull.fetch import FetchEngine, FetchOptions
from fastpull.puller import PullResult, Puller, pull

__all__ = [
    "AuthError",
    "DigestMismatch",
    "FastpullError",
    "FetchEngine",
    "FetchOptions",
    "InvalidReference",
    "ManifestError",
    "PlatformNotFound",
    "PullResult",
    "Puller",
    "RegistryError",
    "StoreError",
    "TransferError",
    "UnsafeArchive",
    "pull",
]
