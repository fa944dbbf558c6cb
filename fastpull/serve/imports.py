"""Images handed to containerd's own stores by the daemon: pulled and unpacked by its puller, then
imported (:mod:`fastpull.containerd`) into one containerd's namespace.

The prefetch (``--containerd SOCKET``) lands images there, and the CRI proxy on a node without the
snapshotter imports each ``PullImage``'s image before containerd sees the call, which then finds it
present. Requests of one image while it is imported share that import.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastpull.puller import Puller, PullResult

log = logging.getLogger(__name__)

IMPORTS_AT_ONCE = 4
"""Images imported at once (their blobs share the one engine's connections)."""


class ContainerdImports:
    """Imports into the containerd on ``socket``, namespace ``namespace``, through the store ``layout``.
    Use from the daemon's event loop."""

    def __init__(self, puller: Puller, layout: Path, socket: Path, namespace: str):
        self.puller = puller
        self.layout = layout
        self.socket = socket
        self.namespace = namespace
        self._imports: dict[str, asyncio.Future[PullResult]] = {}
        self._pool = ThreadPoolExecutor(IMPORTS_AT_ONCE, thread_name_prefix="import")

    def ensure(self, ref: str) -> asyncio.Future[PullResult]:
        """The import of ``ref``, started unless one is under way: awaiting it raises what the import
        raised (a FastpullError). Cancelling the wait leaves the import going (others may wait on it)."""
        future = self._imports.get(ref)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(self._import, ref))
            self._imports[ref] = future
            future.add_done_callback(lambda _: self._imports.pop(ref, None))
        return asyncio.shield(future)

    def _import(self, ref: str) -> PullResult:
        from fastpull.containerd import Containerd, pull_into

        # A client per import: containerd may start after the daemon, or restart, between imports.
        with Containerd(self.socket, self.namespace) as containerd:
            result = pull_into(self.puller, ref, self.layout, containerd)
        log.info("imported %s into containerd at %s (namespace %s): %.1f MB fetched", result.reference,
                 self.socket, self.namespace, result.fetched_bytes / 1e6)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
