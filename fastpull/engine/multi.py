"""The loop thread's ``CurlMulti`` in socket-action form, as pycurl's ``async_multi`` drives it:
libcurl says which sockets to watch and when to time out, a selector waits on them (and on the
mailbox's eventfd), finished transfers are read back after each batch of actions. Curl handles are
reused from a free list. What the transfers are for is the loop's (:mod:`fastpull.engine.loop`).
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable, Collection, Iterator

import pycurl

from fastpull.engine.options import FetchOptions
from fastpull.engine.transfers import Transfer
from fastpull.http.transport import USER_AGENT, Origin, configure_proxy, configure_tls


class Multi:
    """The curl handles and sockets of every transfer in flight; the loop thread's only."""

    def __init__(self, options: FetchOptions, wake_fd: int):
        """``wake_fd`` is watched beside the sockets: :meth:`wait` calls back when it is readable."""
        self._options = options
        self._wake_fd = wake_fd
        self._sel = selectors.DefaultSelector()
        self._sel.register(wake_fd, selectors.EVENT_READ, None)
        self._fds: dict[int, int] = {}
        self._deadline: float | None = None  # libcurl's timeout, monotonic
        self._transfers: dict[pycurl.Curl, Transfer] = {}
        self._free: list[pycurl.Curl] = []
        self._streams_per_connection = 0  # as set on the multi handle
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, options.max_host_connections)
        self._multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, options.max_transfers)
        self._multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX if options.http2 else 0)

    @property
    def transfers(self) -> Collection[Transfer]:
        """The transfers in flight."""
        return self._transfers.values()

    def share_connections(self, streams: int) -> None:
        """At most ``streams`` HTTP/2 streams per connection: a new transfer joins a connection
        that carries fewer, else libcurl opens another connection."""
        if streams != self._streams_per_connection:
            self._multi.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, streams)
            self._streams_per_connection = streams

    def start(self, t: Transfer, headers: list[str], origin: Origin) -> None:
        """Send ``t``'s GET of ``t.url`` on a free handle, with ``origin``'s TLS settings; its body goes to ``t.sink``."""
        opts = self._options
        c = t.curl = self._free.pop() if self._free else pycurl.Curl()
        c.setopt(pycurl.URL, t.url)
        configure_proxy(c, t.url)
        c.setopt(pycurl.HTTPHEADER, headers)
        if not t.sink.attach(c):
            c.setopt(pycurl.WRITEFUNCTION, t.sink)
        c.setopt(pycurl.HEADERFUNCTION, t.on_header)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(opts.connect_timeout * 1000))
        c.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, int(opts.stall_timeout)))
        c.setopt(pycurl.BUFFERSIZE, opts.buffer_size)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS if opts.http2 else pycurl.CURL_HTTP_VERSION_1_1)
        # Wait for a connection still being set up (TLS, ALPN) to carry this transfer too only while
        # connections may carry more than one stream: else the transfer waited for nothing (it gets
        # a connection of its own once that one says it is HTTP/2 and full), up to a handshake at start.
        c.setopt(pycurl.PIPEWAIT, 0 if self._streams_per_connection == 1 else 1)
        if opts.transfer_rate_limit:
            c.setopt(pycurl.MAX_RECV_SPEED_LARGE, opts.transfer_rate_limit)
        c.setopt(pycurl.USERAGENT, USER_AGENT)
        configure_tls(c, origin.ca_file, origin.verify, origin.client_cert)
        self._transfers[c] = t
        self._multi.add_handle(c)

    def remove(self, t: Transfer) -> int:
        """Take ``t`` out (finished or not) and free its handle; returns the connections it opened."""
        c = t.curl
        self._multi.remove_handle(c)
        self._transfers.pop(c, None)
        connections = c.getinfo(pycurl.NUM_CONNECTS)
        c.reset()
        self._free.append(c)
        return connections

    def wait(self, until: float, on_wake: Callable[[], None]) -> None:
        """Wait for a socket, libcurl's timeout or the wake fd, at the latest until ``until``
        (monotonic), and let libcurl act on what happened; ``on_wake`` runs when the fd is readable."""
        if self._deadline is not None:
            until = min(until, self._deadline)
        for key, mask in self._sel.select(max(until - time.monotonic(), 0)):
            if key.fd == self._wake_fd:
                on_wake()
                continue
            action = (pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0) | (
                pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0
            )
            self._multi.socket_action(key.fd, action)
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._deadline = None
            self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)

    def finished(self) -> Iterator[tuple[Transfer, int, str]]:
        """The transfers that ended, with libcurl's code and message (0, "" if it went through).
        Read them one at a time: one that is removed meanwhile is not given."""
        while True:
            queued, ok, failed = self._multi.info_read()
            for c in ok:
                if c in self._transfers:
                    yield self._transfers[c], 0, ""
            for c, code, message in failed:
                if c in self._transfers:
                    yield self._transfers[c], code, message
            if not queued:
                return

    def close(self) -> None:
        for c in list(self._transfers) + self._free:
            c.close()
        self._multi.close()
        self._sel.close()

    def _on_socket(self, what: int, fd: int, multi, socketp) -> None:
        if what == pycurl.POLL_REMOVE:
            if self._fds.pop(fd, None) is not None:
                try:
                    self._sel.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            return
        events = (selectors.EVENT_READ if what & pycurl.POLL_IN else 0) | (
            selectors.EVENT_WRITE if what & pycurl.POLL_OUT else 0
        )
        if fd in self._fds:
            self._sel.modify(fd, events)
        else:
            self._sel.register(fd, events)
        self._fds[fd] = events

    def _on_timer(self, timeout_ms: int) -> None:
        self._deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
