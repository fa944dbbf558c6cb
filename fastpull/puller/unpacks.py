"""The layers a pull unpacks: each handed to an unpack worker as soon as its blob can be read (while
it downloads), and what the pull's :meth:`~fastpull.puller.follow.Follow.settle` asks of them.

:class:`Unpacks` itself unpacks nothing (a pull into the layout alone); :mod:`.rootfs` and
:mod:`.snapshots` say where the layers go and when they are in place.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastpull.content.store import ContentStore
from fastpull.oci.manifest import Descriptor

if TYPE_CHECKING:  # unpacking pulls in the tar applier and decompressors: imported when used
    from fastpull.unpack.workers import LayerJob, LayerResult, Unpacker


def layer_job(store: ContentStore, layer: Descriptor, diff_id: str, target: Path, whiteouts="overlay") -> LayerJob:
    from fastpull.unpack.workers import LayerJob

    return LayerJob(str(store.root), layer.digest, layer.size, layer.media_type, diff_id, str(target), whiteouts)


@dataclass(eq=False)
class LayerUnpack:
    """One layer's unpack: where it goes, and the worker's future once its bytes can be read."""

    job: LayerJob
    future: Future | None = None


class Unpacks:
    """A pull's layers, by position (base first), and the unpack of each that this pull does."""

    snapshots: tuple[Path, ...] = ()
    """The snapshot directories by layer (a pull into snapshots)."""

    def __init__(self, layers: list[Descriptor]):
        self.layers = layers
        self.unpacks: list[LayerUnpack | None] = [None] * len(layers)
        """By position in ``layers``: None for a layer this pull does not unpack (now)."""
        self.unpacker: Unpacker | None = None
        """The workers, given by the pull if :attr:`unpacking` (before any layer opens)."""
        self.progress: str | None = None
        """An :class:`~fastpull.unpack.workers.UnpackProgress`'s path, if anyone listens: each
        layer's worker counts the bytes it read in the slot of the layer's position."""
        self.started: float | None = None
        """When the first layer went to an unpack worker (set from the engine's thread)."""

    @property
    def unpacking(self) -> bool:
        """Whether any layer may go to a worker."""
        return any(self.unpacks)

    @property
    def unpacked_layers(self) -> int:
        return sum(u is not None for u in self.unpacks)

    def needs_blob(self, i: int) -> bool:
        """Whether layer ``i``'s blob is needed to unpack it (no: its unpacked form was there already)."""
        return True

    def on_open(self, i: int) -> Callable[[], None] | None:
        """What the engine calls (in its thread) once layer ``i``'s blob can be read, if anything."""
        return None if self.unpacks[i] is None else functools.partial(self._submit, i)

    def _submit(self, i: int) -> None:
        unpack = self.unpacks[i]
        job = unpack.job if self.progress is None else dataclasses.replace(unpack.job, progress=(self.progress, i))
        self.started = self.started or time.monotonic()
        unpack.future = self.unpacker.submit(job)

    def futures(self) -> list[Future]:
        """The unpacks handed to workers: all must settle before the pull ends."""
        return [u.future for u in self.unpacks if u is not None and u.future is not None]

    def waits(self) -> list[Future]:
        """What else the layers wait for (other pulls' work), until something fails."""
        return []

    def running(self) -> bool:
        return not all(f.done() for f in self.futures())

    def advance(self, fetches: list[Future]) -> bool:
        """Act on what has settled (``fetches``: the layers' blobs, by position); True if that
        handed a layer to a worker."""
        return False

    def unpacked(self, i: int) -> bool:
        """Whether layer ``i`` is unpacked and in place, its diffID checked."""
        unpack = self.unpacks[i]
        return unpack is not None and succeeded(unpack.future)

    def counted(self, i: int) -> bool:
        """Whether layer ``i``'s bytes count in the unpack's progress."""
        return self.unpacks[i] is not None

    def failures(self) -> list[tuple[str, BaseException]]:
        """(layer digest, error) of each layer that failed, base first."""
        return [(layer.digest, error) for i, layer in enumerate(self.layers) for error in self._errors(i)]

    def _errors(self, i: int) -> list[BaseException]:
        unpack = self.unpacks[i]
        error = None if unpack is None else failure(unpack.future)
        return [] if error is None else [error]

    def results(self) -> list[LayerResult]:
        """What each unpack did (once all succeeded)."""
        return [u.future.result() for u in self.unpacks if u is not None]

    def finish(self) -> None:
        """Every layer succeeded: put what is still to be put in place."""

    def abort(self) -> None:
        """The pull failed (the workers are done or stopped): drop what is not in place."""

    def close(self) -> None:
        """The pull is over: remove what it built on the way."""


class Openers:
    """The engine's ``on_open`` callbacks of layers asked for before the pull knows how it unpacks them
    (their diffIDs are in the config, still on its way): a layer that opens meanwhile is remembered and
    handed on once :meth:`ready` names the unpacks; later ones go straight there. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unpacks: Unpacks | None = None
        self._early: list[int] = []

    def on_open(self, i: int) -> Callable[[], None]:
        return functools.partial(self._opened, i)

    def _opened(self, i: int) -> None:
        with self._lock:
            if self._unpacks is None:
                self._early.append(i)
                return
            unpacks = self._unpacks
        if (opened := unpacks.on_open(i)) is not None:
            opened()

    def ready(self, unpacks: Unpacks) -> None:
        """The layers unpack through ``unpacks`` (its unpacker set): hand on those that opened already."""
        with self._lock:
            self._unpacks, early = unpacks, self._early
        for i in early:
            if (opened := unpacks.on_open(i)) is not None:
                opened()


def failure(future: Future | None) -> BaseException | None:
    """The error of a settled future (None while it runs, or if it succeeded)."""
    return future.exception() if future is not None and future.done() else None


def succeeded(future: Future | None) -> bool:
    return future is not None and future.done() and future.exception() is None
