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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastpull.puller import Puller, PullResult
from fastpull.serve.pulls import PullAccount

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
        self._accounts: dict[str, PullAccount] = {}
        self._waiting: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(IMPORTS_AT_ONCE, thread_name_prefix="import")

    def ensure(self, ref: str) -> asyncio.Future[PullResult]:
        """The import of ``ref``, started unless one is under way: awaiting it raises what the import
        raised (a FastpullError). Cancelling the wait leaves the import going (others may wait on it)."""
        future = self._imports.get(ref)
        if future is None:
            account = self._accounts[ref] = PullAccount(ref, ref, f"containerd {self.namespace}")
            future = asyncio.get_running_loop().run_in_executor(self._pool,
                                                                functools.partial(self._import, ref, account))
            self._imports[ref] = future
            future.add_done_callback(lambda _: self._ended(ref))
        self._waiting[ref] = self._waiting.get(ref, 0) + 1
        wait = asyncio.shield(future)
        wait.add_done_callback(lambda _: self._waited(ref))
        return wait

    def pulls(self) -> list[dict]:
        """The imports in flight, as the status API shows them (:meth:`PullAccount.status`), ``waiting``
        the calls waiting on each."""
        now = time.monotonic()
        return [account.status(now, self._waiting.get(ref, 0)) for ref, account in self._accounts.items()]

    def _ended(self, ref: str) -> None:
        self._imports.pop(ref, None)
        self._accounts.pop(ref, None)

    def _waited(self, ref: str) -> None:
        if (left := self._waiting.get(ref, 0) - 1) > 0:
            self._waiting[ref] = left
        else:
            self._waiting.pop(ref, None)

    def _import(self, ref: str, account: PullAccount) -> PullResult:
        from fastpull.containerd import Containerd, pull_into

        # A client per import: containerd may start after the daemon, or restart, between imports.
        with Containerd(self.socket, self.namespace) as containerd:
            result = pull_into(self.puller, ref, self.layout, containerd, events=account.heard)
        log.info("imported %s into containerd at %s (namespace %s): %.1f MB fetched", result.reference,
                 self.socket, self.namespace, result.fetched_bytes / 1e6)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
