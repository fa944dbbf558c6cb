"""Image references (``[host[:port]/]name[:tag][@digest]``) with Docker Hub normalization.

Pure data: nothing here touches the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastpull.digests import check_digest
from fastpull.errors import InvalidReference

DOCKER_HUB = "docker.io"
"""Canonical registry name of Docker Hub."""
DOCKER_HUB_API_HOST = "registry-1.docker.io"
"""The host that serves Docker Hub's registry API."""
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_LEGACY_HUB = "index.docker.io"
_OFFICIAL_NAMESPACE = "library"

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::(?P<port>[0-9]+))?")
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"\w[\w.-]{0,127}")
_IMAGE_ID_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """A normalized image reference; ``str(ref)`` is its canonical form and parses back to it."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """``registry/repository``, e.g. ``docker.io/library/ubuntu``."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The ``host[:port]`` that serves this registry's HTTP API."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def parse_reference(s: str, default_registry: str = DOCKER_HUB) -> Reference:
    """Parse ``[host[:port]/]name[:tag][@digest]``.

    A name without a registry host (a short name) is on ``default_registry``, by default Docker Hub
    (``ubuntu`` is ``docker.io/library/ubuntu``);
    ``index.docker.io`` becomes ``docker.io``; a reference with neither tag nor digest gets ``latest``.
    Raises InvalidReference saying what is wrong.
    """
    if not s:
        raise InvalidReference(s, "empty reference")
    if _IMAGE_ID_RE.fullmatch(s):
        raise InvalidReference(s, "a 64-hex string is an image ID, not a repository name")

    rest, at, digest = s.partition("@")
    if at and (why := check_digest(digest)):
        raise InvalidReference(s, why)

    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(s, f"invalid tag {tag!r}")

    registry, repository = _split_registry(rest, default_registry)
    host = _HOST_RE.fullmatch(registry)
    if host is None:
        raise InvalidReference(s, f"invalid registry host {registry!r}")
    if host["port"] is not None and not 0 < int(host["port"]) < 65536:
        raise InvalidReference(s, f"port out of range in {registry!r}")
    if repository != repository.lower():
        raise InvalidReference(s, f"repository name {repository!r} must be lowercase")
    for component in repository.split("/"):
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise InvalidReference(s, f"invalid repository name component {component!r}")
    if len(registry) + 1 + len(repository) > MAX_NAME_LENGTH:
        raise InvalidReference(s, f"name longer than {MAX_NAME_LENGTH} characters")

    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest if at else None)


def is_short_name(s: str) -> bool:
    """Whether reference ``s`` names no registry (``ubuntu``, ``team/app:1``)."""
    first, slash, _ = s.partition("/")
    return not (slash and _is_host(first))


def _is_host(first: str) -> bool:
    """Docker's rule: a name's first component is a host if it has ``.`` or ``:``, is
    ``localhost`` or has upper case."""
    return "." in first or ":" in first or first == "localhost" or first != first.lower()


def _split_registry(name: str, default_registry: str) -> tuple[str, str]:
    """Split off the registry host (Docker's rule, :func:`_is_host`), else ``default_registry``."""
    first, slash, remainder = name.partition("/")
    if slash and _is_host(first):
        registry = DOCKER_HUB if first == _LEGACY_HUB else first
    else:
        registry, remainder = default_registry, name
    if registry == DOCKER_HUB and "/" not in remainder:
        remainder = f"{_OFFICIAL_NAMESPACE}/{remainder}"
    return registry, remainder
