"""The fetch engine: blobs into content stores over one CurlMulti loop.

- :mod:`.options`: what the engine may do (``FetchOptions``), its counters, the ``BlobSource``
  interface through which callers say where a blob lives, and ``FetchGroup``, requests that fail together;
- :mod:`.loop`: ``FetchEngine``, its thread's loop: starts transfers, acts on each finished one;
- :mod:`.multi`: the ``CurlMulti`` with its sockets, timer and curl handles (the loop thread's);
- :mod:`.commands`: the typed commands other threads post to the loop;
- :mod:`.planner`: what to fetch next (transfers, connections, slot order, request spans, retries,
  stragglers), pure;
- :mod:`.blobs`: a blob from request to commit (shared downloads, per-digest locks, callbacks, groups
  ended together, futures settled off the loop's thread);
- :mod:`.transfers`: the loop's state of a blob and of each request in flight;
- :mod:`.hashing`: the threads that follow each blob with sha256 and commit it.
"""

from fastpull.engine.loop import FetchEngine
from fastpull.engine.options import BlobSource, FetchGroup, FetchOptions, FetchStats

__all__ = ["BlobSource", "FetchEngine", "FetchGroup", "FetchOptions", "FetchStats"]
