"""Small synchronous HTTP(S) over pycurl easy handles, one per thread, retrying as the HTTP policy
(:mod:`fastpull.http.policy`) says.

Knows nothing of OCI or registries. HTTPS is verified unless a caller turns it off for one
request. A custom ``Authorization`` header goes to the original host only: libcurl (>= 7.58) drops
it when a redirect leads to another host or port.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import pycurl  # type: ignore[import-untyped]

from fastpull.errors import RegistryError, TransferError
from fastpull.http.policy import MAX_REDIRECTS, Action, Counters, Exchange, RetryPolicy, judge

log = logging.getLogger(__name__)

USER_AGENT = "fastpull/0.1"
_IDEMPOTENT = frozenset({"GET", "HEAD"})
_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # macOS, BSDs
    "/etc/ssl/ca-bundle.pem",  # openSUSE
)


class Headers(Mapping[str, str]):
    """Response headers: case-insensitive names; ``h[name]`` is the first value, ``get_all`` all."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = tuple(items)
        self._first: dict[str, str] = {}
        for name, value in self._items:
            self._first.setdefault(name.lower(), value)

    def __getitem__(self, name: str) -> str:
        return self._first[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def __iter__(self) -> Iterator[str]:
        return iter(self._first)

    def __len__(self) -> int:
        return len(self._first)

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in the order received."""
        name = name.lower()
        return [v for n, v in self._items if n.lower() == name]

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"


class Origin(NamedTuple):
    """How requests to one server are made beyond the defaults: its certificate checked (against
    ``ca_file``, None: the system bundle) or not, a client certificate, extra headers. A redirect
    to another host gets none of it but the CA bundle."""

    verify: bool = True
    ca_file: str | None = None
    client_cert: tuple[str, str] | None = None
    """``(certificate, key)`` PEM files."""
    headers: tuple[tuple[str, str], ...] = ()


class Response(NamedTuple):
    """A complete response; ``url`` is where the last redirect led."""

    status: int
    headers: Headers
    body: bytes
    url: str


DEFAULT_CONNECT_TIMEOUT = 10.0
"""As the engine's ``FetchOptions.connect_timeout``."""


class Transport:
    """Blocking HTTP requests; safe to share between threads (each thread has its own handle)."""

    def __init__(self, *, retry: RetryPolicy | None = None, ca_file: str | None = None,
                 client_cert: tuple[str, str] | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """``client_cert``: ``(certificate, key)`` PEM files presented to servers that ask for one.
        ``connect_timeout``: seconds a TCP and TLS connect may take (within a request's timeout): a
        host that drops packets, such as a dead mirror, fails in that time, not the whole timeout."""
        self.retry = retry or RetryPolicy()
        self.connect_timeout = connect_timeout
        self.ca_file = ca_file or default_ca_file()
        self.client_cert = client_cert
        self._local = threading.local()

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        body: bytes | None = None,
        max_body: int,
        timeout: float,
        follow_redirects: bool = True,
        verify: bool = True,
        attempts: int | None = None,
    ) -> Response:
        """Perform one request, retrying transient failures of GET and HEAD.

        Returns the final response whatever its status. Raises TransferError when the transfer
        itself fails after the retries, RegistryError when the body exceeds ``max_body`` bytes.
        ``verify=False`` accepts any certificate (an insecure registry); ``attempts`` overrides
        the retry policy's number of tries; ``body`` is sent as it is (a POST's form).
        """
        policy = self.retry
        if method not in _IDEMPOTENT or attempts is not None:
            policy = RetryPolicy(1 if method not in _IDEMPOTENT else attempts, policy.base_delay, policy.max_delay)
        tries = 1
        while True:
            try:
                response = self._perform(method, url, headers or {}, body, max_body, timeout, follow_redirects,
                                         verify)
            except _CurlFailure as e:
                exchange = Exchange(0, {}, e.code, e.message)
            else:
                exchange = Exchange(response.status, response.headers)
            verdict = judge(exchange, Counters(tries=tries), policy)
            if verdict.action is not Action.RETRY:
                if exchange.curl_code:
                    raise TransferError(url, verdict.why, exchange.curl_code)
                return response  # what it means for a registry is the caller's to say
            log.debug("%s %s: %s; retry %d in %.2fs", method, url, verdict.why, tries, verdict.delay)
            time.sleep(verdict.delay)
            tries += 1

    def _perform(
        self, method: str, url: str, headers: Mapping[str, str], data: bytes | None, max_body: int, timeout: float,
        follow: bool, verify: bool,
    ) -> Response:
        curl = self._handle()
        body = bytearray()
        received: list[tuple[str, str]] = []
        too_large = False

        def on_header(line: bytes) -> None:
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("HTTP/"):  # a new response (after a redirect or 100 Continue)
                received.clear()
            elif ":" in text:
                name, _, value = text.partition(":")
                received.append((name.strip(), value.strip()))

        def on_body(chunk: bytes) -> int:
            nonlocal too_large
            if len(body) + len(chunk) > max_body:
                too_large = True
                return 0  # makes libcurl abort with CURLE_WRITE_ERROR
            body.extend(chunk)
            return len(chunk)

        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()])
        curl.setopt(pycurl.HEADERFUNCTION, on_header)
        curl.setopt(pycurl.WRITEFUNCTION, on_body)
        curl.setopt(pycurl.FOLLOWLOCATION, follow)
        curl.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
        curl.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        curl.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        curl.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout * 1000)))
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(min(timeout, self.connect_timeout) * 1000)))
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.USERAGENT, USER_AGENT)
        # Python runs signal handlers only while Python code runs in the main thread: libcurl calls
        # this no-op at least once a second, so a SIGTERM handler's exception (the CLI's, while a
        # pull resolves its image) ends a request that waits on a stalled server, and perform() raises it.
        curl.setopt(pycurl.NOPROGRESS, 0)
        curl.setopt(pycurl.XFERINFOFUNCTION, _let_signal_handlers_run)
        configure_tls(curl, self.ca_file, verify, self.client_cert)
        configure_proxy(curl, url)
        if data is not None:
            curl.setopt(pycurl.POSTFIELDS, data)
        if method == "HEAD":
            curl.setopt(pycurl.NOBODY, 1)
        elif method != "GET":
            curl.setopt(pycurl.CUSTOMREQUEST, method)
        try:
            curl.perform()
        except pycurl.error as e:
            code, message = e.args
            if too_large:
                status = curl.getinfo(pycurl.RESPONSE_CODE)
                raise RegistryError(status, method, url, f"response body exceeds {max_body} bytes") from None
            raise _CurlFailure(code, message) from None
        return Response(
            curl.getinfo(pycurl.RESPONSE_CODE),
            Headers(received),
            bytes(body),
            curl.getinfo(pycurl.EFFECTIVE_URL),
        )

    def _handle(self) -> pycurl.Curl:
        """This thread's easy handle, reset; its connection and TLS session caches stay warm."""
        curl: pycurl.Curl | None = getattr(self._local, "curl", None)
        if curl is None:
            curl = self._local.curl = pycurl.Curl()
        else:
            curl.reset()
        return curl


def _let_signal_handlers_run(*_: int) -> int:
    return 0


class _CurlFailure(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message


def configure_tls(curl: pycurl.Curl, ca_file: str | None, verify: bool,
                  client_cert: tuple[str, str] | None = None) -> None:
    """Set how ``curl`` checks an HTTPS server: against ``ca_file`` (libcurl's default if None), or
    not at all; and the ``(certificate, key)`` it presents if the server asks for one."""
    if not verify:
        curl.setopt(pycurl.SSL_VERIFYPEER, 0)
        curl.setopt(pycurl.SSL_VERIFYHOST, 0)
    elif ca_file:
        curl.setopt(pycurl.CAINFO, ca_file)
    if client_cert is not None:
        curl.setopt(pycurl.SSLCERT, client_cert[0])
        curl.setopt(pycurl.SSLKEY, client_cert[1])


_BUNDLES: dict[tuple[str, ...], str] = {}
_BUNDLES_LOCK = threading.Lock()


def ca_bundle(extra: tuple[str, ...]) -> str:
    """A CA bundle of the system's CAs and the PEM files ``extra`` (as Docker and containerd add a
    registry's CAs to the system pool): one per set of files, kept in memory (a memfd) for the life
    of the process, named by its ``/proc/self/fd`` path. Raises ConfigError naming a file that
    cannot be read."""
    from fastpull.errors import ConfigError

    with _BUNDLES_LOCK:
        if (path := _BUNDLES.get(extra)) is not None:
            return path
        parts = []
        for name in (default_ca_file(), *extra):
            if name is None:
                continue
            try:
                with open(name, "rb") as f:
                    parts.append(f.read().rstrip(b"\n") + b"\n")
            except OSError as e:
                raise ConfigError(name, f"cannot read the CA certificate: {e.strerror or e}") from None
        fd = os.memfd_create("fastpull-ca-bundle", os.MFD_CLOEXEC)
        data = memoryview(b"".join(parts))
        while data:
            data = data[os.write(fd, data):]
        path = _BUNDLES[extra] = f"/proc/self/fd/{fd}"
        return path


def configure_proxy(curl: pycurl.Curl, url: str) -> None:
    """Send ``url`` through the proxy the environment names, as Docker does. libcurl itself reads
    ``https_proxy``/``HTTPS_PROXY``, ``http_proxy``, ``ALL_PROXY`` and ``NO_PROXY`` (host names,
    domains, CIDR ranges; loopback is proxied unless listed there) and never sends a request's own
    headers (``Authorization``) to the proxy in a ``CONNECT``. It ignores an upper-case
    ``HTTP_PROXY``, which a CGI program's ``Proxy:`` request header could set: as Go does, it is
    honoured here for plain-HTTP URLs unless this runs as CGI (``REQUEST_METHOD`` set)."""
    if (url.startswith("http://") and (proxy := os.environ.get("HTTP_PROXY")) and "http_proxy" not in os.environ
            and "REQUEST_METHOD" not in os.environ):
        curl.setopt(pycurl.PROXY, proxy)
    else:
        curl.unsetopt(pycurl.PROXY)  # a reused handle: back to libcurl's own reading of the environment


def default_ca_file() -> str | None:
    """The system CA bundle; pycurl's bundled libcurl may look for one at another distro's path."""
    for var in ("CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        if (path := os.environ.get(var)) and os.path.isfile(path):
            return path
    return next((p for p in _CA_BUNDLES if os.path.isfile(p)), None)
