"""Where the default store is: a module of its own, light to import (no pathlib), so that a
``fastpull pull`` joining an identical one in flight finds the store without loading it."""

from __future__ import annotations

import os

LAYER_CACHE = "snapshots"
"""The store's unpacked layers by ChainID, overlay lower directories (``fastpull pull --snapshots
STORE/snapshots`` and ``fastpull serve --snapshotter`` share them)."""
SNAPSHOTTER_STATE = "snapshotter"
"""``fastpull serve --snapshotter``'s metadata and its containers' directories, in the store."""


def default_store() -> str:
    """Where images go when no layout is named: ``$FASTPULL_STORE``, else ``/var/lib/fastpull`` as
    root, else ``$XDG_DATA_HOME/fastpull`` (``~/.local/share/fastpull``)."""
    if store := os.environ.get("FASTPULL_STORE"):
        return store
    if os.geteuid() == 0:
        return "/var/lib/fastpull"
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "fastpull")
