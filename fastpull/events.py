"""What a pull tells while it runs: small typed events, handed in order to ``Puller.pull(..., events=)``.

The command line draws its progress bar, writes its report and writes ``fastpull pull --json``
(one ``to_dict()`` per line) from these events alone. A pull sends, in this order:

- one :class:`Resolved`;
- :class:`Progress` about twice a second (and once when every byte is in), :class:`LayerDone` as
  each layer is fetched and then unpacked (a layer's ``unpacked`` always after its ``fetched`` or
  ``present``);
- last, :class:`Pulled`, or :class:`Failed` if the pull raises a :class:`FastpullError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from fastpull.errors import FastpullError


@dataclass(frozen=True)
class Event:
    """Base of the events; ``to_dict()`` is the JSON object (``{"event": NAME, ...fields}``)."""

    NAME: ClassVar[str]

    def to_dict(self) -> dict:
        return {"event": self.NAME, **asdict(self)}


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class Resolved(Event):
    """The reference resolved to one platform's manifest: its layers will be fetched, base first."""

    NAME = "resolved"
    reference: str
    digest: str
    """The platform manifest's digest (the one the layout is tagged with)."""
    platform: str | None
    """As the index names it; None for an image that is no index (its platform is in its config)."""
    layers: tuple[Blob, ...]
    """The layers to fetch, base first (non-distributable layers are left out, as they are by the pull)."""


@dataclass(frozen=True)
class Progress(Event):
    """Where the pull is: download bytes, and compressed layer bytes read by the unpack workers."""

    NAME = "progress"
    done: int
    """Bytes downloaded of ``total``, the blobs that were missing from the layout."""
    total: int
    rate: int
    """Download bytes per second over the last seconds."""
    unpacked: int
    """Compressed bytes of the layers to unpack read so far by the workers (0 of 0 without unpacking)."""
    unpack_total: int


@dataclass(frozen=True)
class LayerDone(Event):
    """A layer is ``fetched`` (this pull downloaded it, and its digest matched), ``present`` (it was in
    the layout already, or another pull committed it), or ``unpacked`` (its diffID matched too)."""

    NAME = "layer"
    digest: str
    state: str


@dataclass(frozen=True)
class Pulled(Event):
    """The pull succeeded and the layout is tagged."""

    NAME = "pulled"
    reference: str
    digest: str
    layers: int
    bytes: int
    """Size of every blob of the image (config, layers, manifest documents)."""
    fetched: int
    """Bytes of the blobs this pull downloaded (see ``PullResult.fetched_bytes``)."""
    seconds: float
    """From start to finish, resolving the reference included."""
    download_seconds: float
    """From the first blob request until every blob was committed."""
    unpack_seconds: float
    """From the first layer handed to an unpack worker until the rootfs or snapshots were in place
    (it overlaps the download: layers unpack as they land); 0 without unpacking."""
    layout: str
    rootfs: str | None
    snapshots: tuple[str, ...]
    """Snapshot directories by layer, base first (overlayfs lower dirs)."""


@dataclass(frozen=True)
class Failed(Event):
    """The pull raised a FastpullError: its class, its message, and as fields the digest, URL, path...
    it names (its attributes: ``url``, ``status``, ``path``, ``layer``, ``expected``...)."""

    NAME = "error"
    reference: str
    kind: str
    """The FastpullError subclass, e.g. ``RegistryError``."""
    message: str
    digest: str | None = None
    """The blob the pull was fetching or unpacking when it failed, if it was one."""
    details: dict = field(default_factory=dict)

    @classmethod
    def of(cls, error: FastpullError, reference: str, digest: str | None = None) -> Failed:
        details = {k: v for k, v in vars(error).items() if not k.startswith("_") and _plain(v)}
        return cls(reference, type(error).__name__, str(error), digest, details)

    def to_dict(self) -> dict:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        return {"event": self.NAME, **self.details, **{k: v for k, v in plain.items() if v is not None}}


def _plain(value: object) -> bool:
    """Whether JSON carries ``value`` as it is: a scalar or a list of strings."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, str) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))
