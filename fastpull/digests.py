"""Content digests: the one form fastpull accepts, ``sha256:<64 lowercase hex>``; used by every layer."""

from __future__ import annotations

import re

DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
"""The only digest form fastpull accepts (matched with ``fullmatch``; group 1 is the hex)."""
_DIGEST_FORM_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")


def check_digest(digest: str) -> str | None:
    """Return why ``digest`` is not a ``sha256:<64 lowercase hex>`` digest, or None if it is."""
    if DIGEST_RE.fullmatch(digest):
        return None
    algorithm, _, encoded = digest.partition(":")
    if algorithm == "sha256":
        return f"a sha256 digest needs 64 lowercase hex characters, got {encoded!r}"
    if _DIGEST_FORM_RE.fullmatch(digest):
        return f"unsupported digest algorithm {algorithm!r} (only sha256)"
    return f"malformed digest {digest!r}"


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest; ValueError for anything else."""
    m = DIGEST_RE.fullmatch(digest)
    if not m:
        raise ValueError(f"unsupported digest {digest!r} (want sha256:<64 hex>)")
    return m.group(1)
