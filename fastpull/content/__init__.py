"""Where blobs land: the content store (per-digest locks, ingests with chunk bitmaps, resume,
verified commit), the OCI image layout over it, and the compiled core they write through.

Knows nothing of HTTP or registries. Modules: :mod:`.store`, :mod:`.layout`, :mod:`.core`.
"""
