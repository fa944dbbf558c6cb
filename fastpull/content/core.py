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

Importing this module does not import pycurl: the compiled core finds libcurl on the first
``attach``, so the unpack workers, which never fetch, never load libcurl and OpenSSL.
"""

from __future__ import annotations

import os

if os.environ.get("FASTPULL_NO_EXTENSIONS"):
    from fastpull._pycore import BACKEND, ChunkBitmap, RangeSink, preallocate, pwrite_all, start_writeback
else:
    from fastpull._core import (  # type: ignore[no-redef]
        BACKEND,
        ChunkBitmap,
        RangeSink,
        preallocate,
        pwrite_all,
        start_writeback,
    )

__all__ = ["BACKEND", "ChunkBitmap", "RangeSink", "preallocate", "pwrite_all", "start_writeback"]
