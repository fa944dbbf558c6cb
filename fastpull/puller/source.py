"""Where the fetch engine gets a repository's blobs: one endpoint (a mirror or the registry) at a
time, the next one when it fails."""

from __future__ import annotations

import copy

from fastpull.errors import FastpullError
from fastpull.registry.client import RegistryClient
from fastpull.registry.mirrors import MirroredRegistry

MIRROR_ATTEMPTS = 2
"""Tries of one blob request at a mirror before the blob moves to the next endpoint."""


class RepositorySource:
    """The fetch engine's view of one repository at one endpoint (a mirror or the registry): blob
    URLs, Authorization values, how its host is reached; :meth:`fallback` names the next endpoint."""

    def __init__(self, client: RegistryClient | MirroredRegistry, repository: str):
        if isinstance(client, MirroredRegistry):
            self._registry: MirroredRegistry | None = client
            self._chain = tuple(client.endpoints(repository))
        else:
            self._registry, self._chain = None, ((client, repository),)
        self._at(self._usable(0) or 0)

    def _at(self, position: int) -> RepositorySource:
        self._position = position
        self.client, self.repository = self._chain[position]
        self.origin = self.client.origin
        self.attempts = MIRROR_ATTEMPTS if position < len(self._chain) - 1 else None
        return self

    def blob_url(self, digest: str) -> str:
        return self.client.blob_url(self.repository, digest)

    def authorization(self) -> str | None:
        return self.client.authorization(self.repository)

    def reauthorize(self, challenge: str, failed: str | None) -> str | None:
        return self.client.reauthorize(self.repository, challenge, failed)

    def fallback(self, digest: str, error: FastpullError | None) -> RepositorySource | None:
        """The next endpoint whose breaker has not tripped (the last one always counts); with no
        ``error``, this one if its breaker has not tripped."""
        if self._registry is None:
            return None
        if error is not None:
            self._registry.breaker.failed(self.client.host, error)
        position = self._usable(self._position + (error is not None))
        return None if position is None or position == self._position else copy.copy(self)._at(position)

    def _usable(self, start: int) -> int | None:
        """The first endpoint from ``start`` on whose breaker has not tripped (the last one always counts)."""
        last = len(self._chain) - 1
        for position in range(start, last + 1):
            if position == last or not self._registry.breaker.tripped(self._chain[position][0].host):
                return position
        return None
