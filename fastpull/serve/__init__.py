"""The node daemon, ``fastpull serve``: a pull-through registry mirror over the engine and store.

This module holds only the daemon's defaults, so that the command line can show them without
importing the server (aiohttp, the engine) for every command.
"""

DEFAULT_LISTEN = ("127.0.0.1", 5050)
DEFAULT_TAG_TTL = 30.0
"""Seconds a tag's upstream digest is trusted before it is resolved again."""
DEFAULT_CRI_UPSTREAM = "/run/containerd/containerd.sock"
"""containerd's socket, where the CRI proxy forwards by default."""
