"""A registry reached through the endpoints its configuration names (:mod:`fastpull.registry.hosts`):
mirrors first, the registry last, as containerd and containers try them.

A mirror that refuses a connection or answers with an error is left for the next endpoint at
once (no retries: only the last endpoint retries, as containerd does). A :class:`Breaker` remembers
for the process which hosts failed, and skips them for a while (the last endpoint is always tried),
so that a dead mirror costs one failure, not one per blob or per pull.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from fastpull.digests import check_digest
from fastpull.errors import DigestMismatch, FastpullError, RegistryError, TransferError
from fastpull.oci.manifest import Platform
from fastpull.oci.reference import Reference
from fastpull.registry.client import RegistryClient, Resolved, _is_loopback
from fastpull.registry.hosts import RegistryHost, RegistryHosts

log = logging.getLogger(__name__)

T = TypeVar("T")

BREAKER_RESET_S = 30.0
"""How long a host that failed is skipped."""
_SKIPPABLE = (TransferError, RegistryError, DigestMismatch)
"""What an endpoint that is not the last may fail with, for the next one to be tried."""


class Breaker:
    """Hosts that failed lately, per process: a host whose failure says it is unwell (no
    connection, a 5xx or 429; not a 404, which is about one repository or blob) is skipped for
    ``reset_after`` seconds, then tried again. Thread-safe."""

    def __init__(self, reset_after: float = BREAKER_RESET_S, clock: Callable[[], float] = time.monotonic):
        self.reset_after = reset_after
        self._clock = clock
        self._until: dict[str, tuple[float, str]] = {}
        """Each tripped host: when it is tried again, and the failure that tripped it."""
        self._lock = threading.Lock()

    def tripped(self, host: str) -> bool:
        """Whether ``host`` failed less than ``reset_after`` seconds ago."""
        with self._lock:
            until = self._until.get(host)
            if until is not None and self._clock() >= until[0]:
                del self._until[host]
                return False
            return until is not None

    def failed(self, host: str, error: BaseException) -> None:
        """``host`` failed with ``error``: trip the breaker if the error is the host's."""
        if unwell(error):
            with self._lock:
                self._until[host] = (self._clock() + self.reset_after, str(error))

    def tripped_hosts(self) -> list[tuple[str, float, str]]:
        """The hosts skipped now: each with the seconds until it is tried again and the failure that tripped it."""
        now = self._clock()
        with self._lock:
            return [(host, until - now, why) for host, (until, why) in self._until.items() if until > now]


def unwell(error: BaseException) -> bool:
    """Whether ``error`` says a host is unwell, not that it lacks something."""
    if isinstance(error, TransferError):
        return True
    return isinstance(error, RegistryError) and (error.status >= 500 or error.status == 429)


class MirroredRegistry:
    """The registry ``name`` through its configured endpoints: the calls of :class:`RegistryClient`
    that the puller and ``fastpull serve`` make, each tried at the endpoints in order.

    ``client(server, last)`` gives the client of one endpoint's server; ``last``: the endpoint that
    is tried last, the only one that retries.
    """

    def __init__(self, name: str, hosts: RegistryHosts, client: Callable[[RegistryHost, bool], RegistryClient],
                 breaker: Breaker):
        self.host = name
        self._hosts = hosts
        self._client = client
        self.breaker = breaker

    def endpoints(self, repository: str, *, by_digest: bool | None = None,
                  resolve: bool = False) -> list[tuple[RegistryClient, str]]:
        """``(client, repository there)`` of each endpoint to try, in order: those that may
        ``resolve`` tags if asked; mirrors whose breaker tripped are left out, and so is this very
        process (``fastpull serve`` named as a mirror in the files it reads itself). Raises
        RegistryBlocked, ConfigError, FastpullError if no endpoint is left."""
        found = [e for e in self._hosts.endpoints(self.host, repository, by_digest=by_digest)
                 if e.host.resolve or not resolve]
        found = [e for i, e in enumerate(found) if i == len(found) - 1 or not _this_process(e.host.host)]
        if not found:
            raise FastpullError(f"{self.host}/{repository}: no configured host may resolve tags")
        return [(self._client(e.host, i == len(found) - 1), e.repository) for i, e in enumerate(found)]

    def resolve(self, ref: Reference, platform: Platform) -> Resolved:
        """:meth:`RegistryClient.resolve` at the first endpoint that answers (a tag only where tags
        may be resolved); the result names ``ref`` as asked."""
        def resolve(client: RegistryClient, repository: str) -> Resolved:
            resolved = client.resolve(dataclasses.replace(ref, repository=repository), platform)
            return resolved._replace(reference=ref)

        return self._first(ref.repository, ref.digest is not None, resolve)

    def manifest(self, repository: str, target: str) -> tuple[bytes, str | None]:
        """:meth:`RegistryClient.manifest` at the first endpoint that answers."""
        by_digest = check_digest(target) is None
        return self._first(repository, by_digest, lambda client, repo: client.manifest(repo, target))

    def blob_size(self, repository: str, digest: str) -> int | None:
        """:meth:`RegistryClient.blob_size`, asked of the registry itself (the last endpoint): whether
        the repository has the blob is the word of the registry that guards it (``fastpull serve``
        serves a blob to a repository only then). If the registry is unwell, the mirrors answer."""
        *mirrors, registry = self._usable(self.endpoints(repository, by_digest=True))
        try:
            return registry[0].blob_size(registry[1], digest)
        except _SKIPPABLE as e:
            if not mirrors or not unwell(e):
                raise
            error = e
        for client, repo in mirrors:
            try:
                if (size := client.blob_size(repo, digest)) is not None:
                    return size
            except _SKIPPABLE as e:
                self._skip(client, e)
        raise error

    def _first(self, repository: str, by_digest: bool, call: Callable[[RegistryClient, str], T]) -> T:
        chain = self._usable(self.endpoints(repository, by_digest=by_digest, resolve=not by_digest))
        for client, repo in chain[:-1]:
            try:
                return call(client, repo)
            except _SKIPPABLE as e:
                self._skip(client, e)
        client, repo = chain[-1]
        return call(client, repo)

    def _usable(self, chain: list[tuple[RegistryClient, str]]) -> list[tuple[RegistryClient, str]]:
        """``chain`` without the mirrors whose breaker tripped (the last endpoint stays)."""
        return [e for i, e in enumerate(chain) if i == len(chain) - 1 or not self.breaker.tripped(e[0].host)]

    def _skip(self, client: RegistryClient, error: BaseException) -> None:
        self.breaker.failed(client.host, error)
        log.warning("skipping %s for %s: %s", client.host, self.host, error)


_LISTENING: dict[str, bool] = {}


def _this_process(host: str) -> bool:
    """Whether ``host`` (a loopback ``address:port``) is a socket this process listens on."""
    if host not in _LISTENING:
        _LISTENING[host] = _listens_here(host)
    return _LISTENING[host]


def _listens_here(host: str) -> bool:
    name, colon, port = host.rpartition(":")
    if not (colon and port.isdigit() and _is_loopback(host)):
        return False
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            sockets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == int(port) \
                    and f"socket:[{fields[9]}]" in sockets:
                return True
    return False
