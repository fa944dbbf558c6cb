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
from typing import NamedTuple

from fastpull.puller import Puller, PullResult
from fastpull.serve.pulls import PullAccount

log = logging.getLogger(__name__)

IMPORTS_AT_ONCE = 4
"""Images imported at once (their blobs share the one engine's connections)."""


class _Import(NamedTuple):
    """An import under way: its outcome, its account, the waits of the calls that asked for it."""

    done: asyncio.Future[PullResult]
    account: PullAccount
    waits: list[asyncio.Future[PullResult]]


class ContainerdImports:
    """Imports into the containerd on ``socket``, namespace ``namespace``, through the store ``layout``.
    Use from the daemon's event loop."""

    def __init__(self, puller: Puller, layout: Path, socket: Path, namespace: str):
        self.puller = puller
        self.layout = layout
        self.socket = socket
        self.namespace = namespace
        self._imports: dict[str, _Import] = {}
        self._pool = ThreadPoolExecutor(IMPORTS_AT_ONCE, thread_name_prefix="import")

    def ensure(self, ref: str) -> asyncio.Future[PullResult]:
        """The import of ``ref``, started unless one is under way: awaiting it raises what the import
        raised (a FastpullError). Cancelling the wait leaves the import going (others may wait on it)."""
        under_way = self._imports.get(ref)
        if under_way is None:
            account = PullAccount(ref, ref, f"containerd {self.namespace}")
            done = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(self._import, ref, account))
            under_way = self._imports[ref] = _Import(done, account, [])
            done.add_done_callback(lambda _: self._imports.pop(ref, None))
        wait = asyncio.shield(under_way.done)
        under_way.waits.append(wait)
        return wait

    def pulls(self) -> list[dict]:
        """The imports in flight, as the status API shows them (:meth:`PullAccount.status`), ``waiting``
        the calls waiting on each."""
        now = time.monotonic()
        return [i.account.status(now, sum(not w.done() for w in i.waits)) for i in self._imports.values()]

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
