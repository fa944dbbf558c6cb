"""Following a blob while the engine downloads it, from the event loop.

One thread per blob in flight (not per client) sleeps on the blob's chunk bitmap, woken by the
kernel as chunks land, and publishes the contiguous watermark to the event loop; every client
of the blob awaits the watermark there and sends what is below it with ``sendfile``.
"""

from __future__ import annotations

import asyncio
import os
import threading

from fastpull.content.store import BlobReader
from fastpull.errors import FastpullError, StoreError


class Follower:
    """The watermark of one blob, published to ``loop``; created in the loop's thread."""

    def __init__(self, reader: BlobReader, loop: asyncio.AbstractEventLoop):
        self.size = reader.size
        self.available = 0
        """Bytes from the start that have landed (all of them once the blob is committed)."""
        self.error: FastpullError | None = None
        self._reader = reader
        self._fd = os.open(f"/proc/self/fd/{reader.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] = []
        self._thread = threading.Thread(target=self._watch, name=f"follow-{reader.digest[7:19]}", daemon=True)
        self._thread.start()

    def open(self) -> int:
        """A descriptor of the blob's bytes of the caller's own (close it), valid after the commit too."""
        if self._fd < 0:
            raise StoreError(self._reader.digest, "opened after its follower was closed")
        return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)

    async def beyond(self, offset: int) -> int:
        """Wait until more than ``offset`` bytes (or all) have landed; return how many have.
        Raises the fetch's error if it failed first."""
        while not (self.available > offset or self.available >= self.size):
            if self.error is not None:
                raise self.error
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter
        return self.available

    def close(self) -> None:
        """Release the blob once its download is over (the watcher then returns by itself)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def end(self, error: FastpullError | None) -> None:
        """The fetch is over: all bytes have landed, or none will after ``error`` (the fetch's own,
        which says why better than the stopped download the watcher sees)."""
        self._publish(self.size if error is None else self.available, error)

    def _watch(self) -> None:
        available = 0
        try:
            while available < self.size:
                available = self._reader.wait_beyond(available)
                self._loop.call_soon_threadsafe(self._publish, available, None)
        except FastpullError:  # the download stopped: the fetch ends with the reason, see end()
            pass
        except RuntimeError:  # the loop closed under us: the daemon is stopping
            pass
        finally:
            self._reader.close()

    def _publish(self, available: int, error: FastpullError | None) -> None:
        self.available = max(self.available, available)
        self.error = self.error or error
        waiting, self._waiters = self._waiters, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)
