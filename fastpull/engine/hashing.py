"""Hasher threads: sha256 follows each blob's contiguous watermark while later chunks still land,
and a finished blob is verified and committed off the loop's thread (hashlib releases the GIL)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpull.content.store import BlobWriter
from fastpull.errors import FastpullError


class Hashers:
    """A few threads that advance digests and commit blobs; ``on_committed(token, path or error)``
    is called from a hasher thread when a commit settles."""

    def __init__(self, threads: int, on_committed: Callable[[Any, Path | BaseException], None]):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._on_committed = on_committed
        self._threads = [threading.Thread(target=self._run, name=f"fastpull-hash-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def advance(self, writer: BlobWriter) -> None:
        """Hash what the watermark has passed since last time (a hint: it may be dropped)."""
        self._jobs.put((None, writer))

    def commit(self, token: Any, digest: str, writer: BlobWriter) -> None:
        """Finish hashing ``writer`` and commit it as ``digest``; ``token`` comes back with the result."""
        self._jobs.put((token, (digest, writer)))

    def stop(self) -> None:
        """End the threads after the jobs already queued."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            token, work = job
            if token is None:
                try:
                    work.advance_digest()
                except (FastpullError, OSError, ValueError):
                    pass  # the writer was closed under us (its blob failed); a commit reports real errors
                continue
            digest, writer = work
            try:
                result: Path | BaseException = writer.commit(digest)
            except BaseException as exc:
                result = exc
            self._on_committed(token, result)
