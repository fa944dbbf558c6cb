"""The write-path core: the compiled extension, or its pure-Python reference.

``FASTPULL_NO_EXTENSIONS=1`` selects the reference; ``BACKEND`` says which is active
(``"cy"`` or ``"py"``). Both expose the same API:

- ``preallocate(fd, size)``: ``posix_fallocate`` the whole blob up front.
- ``pwrite_all(fd, data, offset)``: positioned write of a whole buffer.
- ``start_writeback(fd, offset, nbytes)``: ``sync_file_range(SYNC_FILE_RANGE_WRITE)``.
- ``ChunkBitmap(path, size=0, chunk_size=0, create=False)``: per-blob bitmap of finished
  chunks in a shared mmap'd file, with ``set/test/watermark/missing/wait``.
- ``RangeSink(fd, bitmap, start, end, valid_from)``: a pycurl WRITEFUNCTION that
  pwrites a response at its offset and marks the chunks it completes; ``attach(curl)``
  installs it as a C-level libcurl write callback instead (compiled core only), so no
  Python runs per received buffer.
"""

from __future__ import annotations

import os

if os.environ.get("FASTPULL_NO_EXTENSIONS"):
    from fastpull._pycore import BACKEND, ChunkBitmap, RangeSink, preallocate, pwrite_all, start_writeback

    C_WRITE_CALLBACK = False
else:
    import pycurl  # noqa: F401  (loads the libcurl that bind_libcurl looks up)

    from fastpull._core import (  # type: ignore[no-redef]
        BACKEND,
        ChunkBitmap,
        RangeSink,
        bind_libcurl,
        preallocate,
        pwrite_all,
        start_writeback,
    )

    def _loaded_libcurl() -> str | None:
        """Path of the libcurl pycurl runs on (a pycurl wheel bundles its own copy)."""
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcurl" in path and ".so" in path:
                    return path
        return None

    _libcurl = _loaded_libcurl()
    C_WRITE_CALLBACK = bool(_libcurl and bind_libcurl(_libcurl))
    """Whether sinks attach to libcurl as C callbacks (else pycurl calls them per buffer)."""

__all__ = ["BACKEND", "C_WRITE_CALLBACK", "ChunkBitmap", "RangeSink", "preallocate", "pwrite_all", "start_writeback"]
