"""A pull into ChainID snapshots (:mod:`fastpull.unpack.snapshots`), each committed as soon as it can be.

A layer's snapshot is claimed, in layer order, by taking its ChainID's lock: the pull then builds it
(a writer), or finds it there. A snapshot that another pull (a thread or a process) is building is
waited for on a side thread, still in order, so that this pull's fetches, its own layers' unpacks
and its events go on meanwhile: it is there once that pull commits it, or this pull's to build if
that pull gave up. Layers are locked in order, so two pulls never wait on each other.

Layer ``i``'s snapshot is committed (its implied directories given the metadata of the layers
below, then renamed into place) as soon as its blob's digest and its diffID are checked and layers
``0..i-1`` are in place; a failure later in the pull leaves it committed. ``unpacked`` says which
snapshots are in place, whoever put them there.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from fastpull.content.store import ContentStore
from fastpull.errors import FastpullError
from fastpull.oci.manifest import Descriptor
from fastpull.puller.unpacks import LayerUnpack, Unpacks, failure, layer_job, succeeded
from fastpull.unpack.rootfs import inherit_implied
from fastpull.unpack.snapshots import Snapshotter, SnapshotWriter, chain_ids


class SnapshotUnpacks(Unpacks):
    """Each layer into its ChainID snapshot under ``snapshotter``'s root (whiteouts in overlay form)."""

    def __init__(self, store: ContentStore, layers: list[Descriptor], diff_ids: list[str], snapshotter: Snapshotter):
        super().__init__(layers)
        self._store = store
        self._diff_ids = diff_ids
        self._snapshotter = snapshotter
        self._chains = chain_ids(diff_ids)
        self.snapshots = tuple(snapshotter.path(c) for c in self._chains)
        self._claims: list[Future[SnapshotWriter | None]] = [Future() for _ in layers]
        """Each layer's claim, resolved in order: its writer, or None once the snapshot is there."""
        self._there = [False] * len(layers)
        """Committed, by this pull or another, or there before."""
        self._opened = [False] * len(layers)
        """The layer's blob can be read (set from the engine's thread)."""
        self._commit_failed: dict[int, FastpullError] = {}
        self._gave_up = False
        self._lock = threading.Lock()
        """Between the pull's thread, the engine's (blobs opening) and the side thread's claims."""
        self._claim()
        self._there_before = list(self._there)

    def needs_blob(self, i: int) -> bool:
        return not self._there_before[i]

    def _claim(self) -> None:
        """Claim the layers in order without waiting; from the first that another pull is
        building on, in order on a side thread."""
        for i, chain_id in enumerate(self._chains):
            try:
                writer = self._snapshotter.prepare(chain_id, block=False)
            except BaseException:
                self.abort()
                raise
            if writer is None and not self._snapshotter.has(chain_id):
                threading.Thread(target=self._wait_for_others, args=(i,), name="fastpull-snapshot-claims",
                                 daemon=True).start()
                break
            self._claims[i].set_result(writer)
        self._take_claims()

    def _wait_for_others(self, start: int) -> None:
        """The claims from ``start`` on, each woken by the kernel when its lock's holder commits or gives up."""
        for i in range(start, len(self._chains)):
            try:
                writer = self._snapshotter.prepare(self._chains[i], block=True)
            except BaseException as e:  # the pull hears it as this layer's failure
                self._claims[i].set_exception(e)
                return
            with self._lock:
                wanted = not self._gave_up
                if wanted:
                    self._claims[i].set_result(writer)
            if not wanted:
                if writer is not None:
                    writer.abort()
                return

    def _take_claims(self) -> bool:
        """Act on the claims resolved since: a snapshot there, or one to build (handed to a worker
        if its blob can be read already; True if one was)."""
        started = False
        with self._lock:
            for i, claim in enumerate(self._claims):
                if self._there[i] or self.unpacks[i] is not None or not succeeded(claim):
                    continue
                writer = claim.result()
                if writer is None:
                    self._there[i] = True
                else:
                    job = layer_job(self._store, self.layers[i], self._diff_ids[i], writer.path)
                    self.unpacks[i] = LayerUnpack(job)
                    started = self._submit_if_open(i) or started
        return started

    @property
    def unpacking(self) -> bool:
        return not all(self._there_before)

    def on_open(self, i: int) -> Callable[[], None] | None:
        return None if self._there_before[i] else functools.partial(self._open, i)

    def _open(self, i: int) -> None:
        with self._lock:
            self._opened[i] = True
            self._submit_if_open(i)

    def _submit_if_open(self, i: int) -> bool:
        """With the lock held: hand layer ``i`` to a worker once it is claimed and its blob opened."""
        unpack = self.unpacks[i]
        if unpack is None or unpack.future is not None or not self._opened[i] or self._gave_up:
            return False
        self._submit(i)
        return True

    def waits(self) -> list[Future]:
        return [c for c in self._claims if not c.done()]

    def advance(self, fetches: list[Future]) -> bool:
        """Take the claims resolved since, then commit, in order, each snapshot whose blob and
        unpack succeeded and whose lower layers are in place."""
        started = self._take_claims()
        for i, fetch in enumerate(fetches):
            if self._there[i]:
                continue
            unpack = self.unpacks[i]
            if i in self._commit_failed or unpack is None or not succeeded(unpack.future) or not succeeded(fetch):
                break
            lowers = list(self.snapshots[:i][::-1])  # top first
            try:
                inherit_implied(Path(unpack.job.target), unpack.future.result().implied_dirs, lowers)
                self._claims[i].result().commit()
            except FastpullError as e:
                self._commit_failed[i] = e
                break
            self._there[i] = True
        return started

    def unpacked(self, i: int) -> bool:
        return self._there[i]

    def counted(self, i: int) -> bool:
        return not self._there_before[i]

    def _errors(self, i: int) -> list[BaseException]:
        errors = super()._errors(i)
        if (claim_failed := failure(self._claims[i])) is not None:
            errors.insert(0, claim_failed)
        if i in self._commit_failed:
            errors.append(self._commit_failed[i])
        return errors

    def abort(self) -> None:
        """Throw away the snapshots this pull claimed and did not commit; a claim still waited for
        is given up as soon as it resolves."""
        with self._lock:
            self._gave_up = True
        for i, claim in enumerate(self._claims):
            if succeeded(claim) and claim.result() is not None and not self._there[i]:
                claim.result().abort()
