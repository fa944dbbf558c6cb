"""The daemon's image pulls in flight, as the status API shows them: the snapshotter's pulls into
the layer cache (:mod:`fastpull.serve.layers`) and the imports into containerd's own stores
(:mod:`fastpull.serve.imports`) keep one account each, fed by the pull's events."""

from __future__ import annotations

import time

from fastpull.events import Event, LayerDone, Progress, Resolved


class PullAccount:
    """How far one image's pull is. ``reference`` is what is pulled, ``image`` the name a client
    asked for, ``into`` where the layers go (``snapshotter``, or ``containerd NAMESPACE``)."""

    def __init__(self, reference: str, image: str, into: str):
        self.reference = reference
        self.image = image
        self.into = into
        self.started = time.monotonic()
        self.layers = 0
        """The image's layers, once resolved."""
        self.unpacked = 0
        """Its layers unpacked (by this pull, or found unpacked before)."""
        self.progress: Progress | None = None

    def heard(self, event: Event) -> int:
        """Count ``event`` (call it in the pull's thread); the compressed bytes unpacked since the
        last :class:`Progress`."""
        grown = 0
        if isinstance(event, Resolved):
            self.layers = len(event.layers)
        elif isinstance(event, Progress):
            grown = event.unpacked - (self.progress.unpacked if self.progress else 0)
            self.progress = event
        elif isinstance(event, LayerDone) and event.state == "unpacked":
            self.unpacked += 1
        return grown

    def status(self, now: float, waiting: int) -> dict:
        """The pull as the status API shows it; ``waiting``: the client calls waiting on it."""
        progress = self.progress or Progress(0, 0, 0, 0, 0)
        return {"image": self.image, "reference": self.reference, "into": self.into, "layers": self.unpacked,
                "layers_total": self.layers, "bytes": progress.done, "bytes_total": progress.total,
                "bytes_per_second": progress.rate, "waiting": waiting, "seconds": round(now - self.started, 3)}
