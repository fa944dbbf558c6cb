"""Commands into the fetch loop: typed objects posted from any thread to a :class:`Mailbox` whose
eventfd wakes the loop's ``select``. The loop thread alone reads them (:mod:`fastpull.engine.loop`).

They are named tuples, not dataclasses: every pull imports them, and a frozen dataclass costs its
module most of a millisecond to build (six methods compiled from source), a named tuple a tenth of it."""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple

from fastpull.content.store import BlobWriter, ContentStore
from fastpull.engine.options import BlobSource, FetchGroup
from fastpull.engine.transfers import BlobFetch


class Fetch(NamedTuple):
    """A caller asks for a blob (``FetchEngine.fetch``)."""

    store: ContentStore
    source: BlobSource
    digest: str
    size: int
    future: Future
    on_open: Callable[[], None] | None
    on_downloaded: Callable[[], None] | None
    group: FetchGroup | None


class Locked(NamedTuple):
    """A side thread's wait for another writer's per-digest lock ended."""

    blob: BlobFetch
    writer: BlobWriter | None
    error: BaseException | None


class Committed(NamedTuple):
    """A hasher thread verified and committed a blob (or failed to)."""

    blob: BlobFetch
    result: Path | BaseException


class Switched(NamedTuple):
    """A side thread asked a blob's source where to fetch it next, after it failed there: ``source``
    (None: nowhere) with its blob URL and Authorization value, or the ``error`` that ends the blob."""

    blob: BlobFetch
    source: BlobSource | None
    url: str
    auth: str | None
    error: BaseException


class Cancel(NamedTuple):
    """A caller withdraws a group's requests (``FetchEngine.cancel``)."""

    group: FetchGroup


class Stop:
    """The engine is closing."""


Command = Fetch | Locked | Committed | Switched | Cancel | Stop


class Mailbox:
    """Commands for the loop thread: a queue, and an eventfd (``fd``) that is readable while
    commands wait, for the loop to ``select`` on beside its sockets."""

    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def post(self, command: Command) -> None:
        """Hand ``command`` to the loop and wake it (any thread)."""
        self._commands.put(command)
        os.eventfd_write(self.fd, 1)

    def drain(self) -> Iterator[Command]:
        """The commands waiting, in the order posted, until none is left (the loop thread)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def get(self, block: bool) -> Command | None:
        """The next command; None if there is none (after waiting for one if ``block``)."""
        try:
            return self._commands.get(block=block)
        except queue.Empty:
            return None

    def close(self) -> None:
        os.close(self.fd)
