"""One error hierarchy for fastpull: every message names the reference, digest, URL or path involved."""

from __future__ import annotations

import json


def quote(value: str, limit: int = 200) -> str:
    """What a client sent, for a message or a log line: double-quoted with control characters escaped
    (one line), cut to ``limit`` characters; always valid UTF-8 (a lone surrogate is escaped), as a
    gRPC status message must be."""
    cut = value if len(value) <= limit else value[:limit] + "…"
    return json.dumps(cut, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()


class FastpullError(Exception):
    """Base of every error fastpull raises on purpose."""

    def __reduce__(self):
        # Subclasses take structured arguments but pass one message up; pickle (for worker
        # processes) by message and attributes instead of by constructor arguments.
        return (_rebuild, (type(self), str(self), self.__dict__))


def _rebuild(cls: type[FastpullError], message: str, state: dict) -> FastpullError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidReference(FastpullError):
    """An image reference that cannot be parsed."""

    def __init__(self, reference: str, why: str):
        super().__init__(f"invalid image reference {reference!r}: {why}")
        self.reference = reference


class ManifestError(FastpullError):
    """A manifest or index that is malformed, too large or lacks what the pull needs."""

    def __init__(self, where: str, why: str):
        super().__init__(f"bad manifest {where}: {why}")
        self.where = where


class PlatformNotFound(ManifestError):
    """An index that has no manifest for the wanted platform."""

    def __init__(self, where: str, platform: str, available: list[str]):
        FastpullError.__init__(
            self,
            f"no manifest for platform {platform} in {where}; available: {', '.join(available) or 'none'}",
        )
        self.where = where
        self.platform = platform
        self.available = available


class RegistryError(FastpullError):
    """An HTTP request to a registry that failed with a status the pull cannot use."""

    def __init__(self, status: int, method: str, url: str, body: bytes | str = b"", *, retry_after: str | None = None):
        excerpt = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        excerpt = " ".join(excerpt.split())[:300]
        msg = f"{method} {url} -> HTTP {status}"
        if excerpt:
            msg += f": {excerpt}"
        super().__init__(msg)
        self.status = status
        self.method = method
        self.url = url
        self.body = excerpt
        self.retry_after = retry_after
        """The response's ``Retry-After``, as sent (a 429 or 503 may carry one)."""


class AuthError(RegistryError):
    """Credentials missing or refused (401/403 after the auth flow ran)."""


class ConfigError(FastpullError):
    """A configuration file (credentials, registries) that cannot be read or written as needed."""

    def __init__(self, path: str, why: str):
        super().__init__(f"configuration file {path}: {why}")
        self.path = path


class RegistryBlocked(FastpullError):
    """A pull from a registry (or repository) that the configuration blocks."""

    def __init__(self, name: str, where: str):
        super().__init__(f"pulling from {name} is blocked by {where}")
        self.name = name


class TransferError(FastpullError):
    """A transfer that failed at the transport level after its retries ran out."""

    def __init__(self, url: str, why: str, curl_code: int | None = None):
        code = f" (curl error {curl_code})" if curl_code is not None else ""
        super().__init__(f"transfer of {url} failed{code}: {why}")
        self.url = url
        self.curl_code = curl_code


class DigestMismatch(FastpullError):
    """Content whose size or sha256 differs from its descriptor; it was not committed."""

    def __init__(self, what: str, expected: str, actual: str):
        super().__init__(f"digest mismatch for {what}: expected {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual


class StoreError(FastpullError):
    """The content store cannot write, lock or read a path (full disk, permissions, corrupt state)."""

    def __init__(self, path: str, why: str):
        super().__init__(f"content store error at {path}: {why}")
        self.path = path


class UnpackError(FastpullError):
    """The unpacked tree (rootfs, snapshot) cannot be written at a path: full disk, permissions,
    a filesystem that lacks a feature."""

    def __init__(self, path: str, why: str):
        super().__init__(f"unpack error at {path}: {why}")
        self.path = path


class MalformedArchive(FastpullError):
    """A layer tar that is malformed or uses a form that is not supported: names the byte offset
    of the header at fault (and the entry, once its name is known)."""

    def __init__(self, layer: str, offset: int, why: str, entry: str | None = None):
        where = f"header at byte {offset}" if entry is None else f"entry {entry!r} (header at byte {offset})"
        super().__init__(f"malformed tar in layer {layer}, {where}: {why}")
        self.layer = layer
        self.offset = offset
        self.entry = entry


class UnsafeArchive(FastpullError):
    """A layer tar entry refused for path safety: it would write outside the target root, or
    through or onto something an entry must not (a symlink loop, a file as a parent, a
    hardlink to a directory)."""

    def __init__(self, layer: str, entry: str, why: str):
        super().__init__(f"unsafe entry {entry!r} in layer {layer}: {why}")
        self.layer = layer
        self.entry = entry


class SnapshotError(FastpullError):
    """A snapshotter operation refused; each subclass is one of containerd's errdefs codes. Keys,
    names and labels come from the client, so messages quote them cut short."""

    def __init__(self, key: str | None, why: str):
        super().__init__(why if key is None else f"snapshot {quote(key)}: {why}")
        self.key = key


class SnapshotNotFound(SnapshotError):
    """NOT_FOUND: no such snapshot, parent or cached layer."""


class SnapshotExists(SnapshotError):
    """ALREADY_EXISTS: the key or name is taken."""


class SnapshotPrecondition(SnapshotError):
    """FAILED_PRECONDITION: the snapshot is of the wrong kind, or has children."""


class SnapshotInvalid(SnapshotError):
    """INVALID_ARGUMENT: a malformed key, label, field path or filter."""


class ContainerdError(FastpullError):
    """containerd's API (on its socket) cannot be reached, or refused a call: names the socket and
    what was asked of it (a snapshot, a digest, an image)."""

    def __init__(self, socket: str, why: str):
        super().__init__(f"containerd at {socket}: {why}")
        self.socket = socket
