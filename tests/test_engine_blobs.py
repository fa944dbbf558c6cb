"""The fetch loop's table of blobs (:class:`~fastpull.engine.blobs.Blobs`) over a real content store,
without curl: which queued blobs are opened, and the bytes not yet asked for."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from fastpull.content.store import ContentStore
from fastpull.engine.blobs import Blobs
from fastpull.engine.commands import Fetch, Mailbox
from fastpull.engine.options import FetchOptions, FetchStats

MiB = 1 << 20
SOURCE = SimpleNamespace(fallback=lambda digest, error: None, blob_url=lambda digest: f"http://registry/{digest}",
                         authorization=lambda: None)


@pytest.fixture
def table(tmp_path):
    made = []

    def make(**options) -> tuple[Blobs, ContentStore]:
        mailbox = Mailbox()
        blobs = Blobs(FetchOptions(**options), FetchStats(), mailbox, cancel=lambda t: None)
        made.append((blobs, mailbox))
        return blobs, ContentStore(tmp_path / "store")

    yield make
    for blobs, mailbox in made:
        for blob in blobs.active:
            blob.writer.close()
        blobs.close()
        mailbox.close()


def _ask(blobs: Blobs, store: ContentStore, n: int, size: int) -> None:
    for i in range(n):
        blobs.request(Fetch(store, SOURCE, f"sha256:{i:064x}", size, Future(), None, None, None))


def test_blobs_open_up_to_blobs_in_flight_in_the_order_asked(table):
    blobs, store = table(blobs_in_flight=2)
    _ask(blobs, store, 10, 3 * MiB)
    blobs.activate()
    blobs.activate()
    assert [b.digest for b in blobs.active] == [f"sha256:{i:064x}" for i in range(2)]


def test_backlog_is_the_pending_chunks_of_open_blobs_and_the_queued_blobs(table):
    blobs, store = table(blobs_in_flight=2)
    _ask(blobs, store, 5, 3 * MiB)
    assert blobs.backlog == 15 * MiB
    blobs.activate()
    blobs.active[0].pending[:2] = []  # two of its chunks asked for
    assert blobs.backlog == 13 * MiB
