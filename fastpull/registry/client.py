"""The registry client: resolves references to verified manifests, and hands the fetch engine
blob URLs and ``Authorization`` header values.

Builds on auth and transport; the distribution API (``/v2/...``) is known here only.
"""

from __future__ import annotations

import logging
import threading
from typing import Literal, NamedTuple

from fastpull.digests import check_digest
from fastpull.errors import AuthError, DigestMismatch, ManifestError, RegistryError, TransferError
from fastpull.http.policy import SSL_CONNECT_ERROR, RetryPolicy
from fastpull.http.transport import Origin, Response, Transport, ca_bundle
from fastpull.oci.manifest import (
    ACCEPT,
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    digest_of,
    parse_manifest,
    select_platform,
)
from fastpull.oci.reference import DEFAULT_TAG, DOCKER_HUB, DOCKER_HUB_API_HOST, Reference
from fastpull.registry.auth import (
    Authenticator,
    Challenge,
    Credentials,
    CredentialsProvider,
    load_credentials,
    parse_www_authenticate,
)
from fastpull.registry.hosts import RegistryHost

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
_MAX_ERROR_BODY = 64 << 10
_SCHEMES: dict[tuple[str, bool], str] = {}
"""The scheme a registry answered on, per (API host, verified), learned once per process."""
_SCHEMES_LOCK = threading.Lock()


class Resolved(NamedTuple):
    """A reference resolved to one platform's manifest, every document verified by digest."""

    reference: Reference
    descriptor: Descriptor
    """What the reference points to: an index or a manifest."""
    documents: tuple[tuple[Descriptor, bytes], ...]
    """Bodies fetched, in order: the index (if any), then the manifest. Store these bytes as they are."""
    manifest: ImageManifest
    """The manifest for the platform: config and layers."""

    @property
    def manifest_descriptor(self) -> Descriptor:
        """The descriptor of ``manifest`` (from the index, with its platform, if there was one)."""
        return self.documents[-1][0]


class RegistryClient:
    """Talks to one registry host. Thread-safe.

    ``host`` is a reference's registry (``docker.io`` is served by ``registry-1.docker.io``).
    HTTPS, verified, by default. As Docker does, a loopback host is tried with HTTPS first and
    plain HTTP when it does not speak TLS; ``insecure=True`` does the same for any host and accepts
    any certificate; ``insecure=False`` allows verified HTTPS only. The scheme that answered is
    remembered for the life of the process. ``credentials`` are read from the containers and Docker
    auth files by default (:func:`~fastpull.registry.auth.load_credentials`); None pulls anonymously;
    ``credentials_provider`` comes before them (:class:`~fastpull.registry.auth.Authenticator`).
    ``server`` is where a mirror or a configured registry is reached and how (schemes, API root,
    ``?ns=``, TLS, headers); ``host`` is then its ``server.host``. ``attempts`` bounds the tries of
    each request (a mirror that another endpoint backs up: one).
    """

    def __init__(
        self,
        host: str,
        *,
        insecure: bool | None = None,
        credentials: Credentials | Literal["docker-config"] | None = "docker-config",
        timeout: float = DEFAULT_TIMEOUT,
        transport: Transport | None = None,
        server: RegistryHost | None = None,
        attempts: int | None = None,
        credentials_provider: CredentialsProvider | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be greater than zero")
        server = server or RegistryHost(host)
        self.host = host
        self.api_host = DOCKER_HUB_API_HOST if host == DOCKER_HUB else host
        self.tls_verify = insecure is not True and server.verify
        """Whether the registry's certificate is checked."""
        may_be_plain = insecure is True or (insecure is None and _is_loopback(self.api_host))
        self.schemes = server.schemes or (("https", "http") if may_be_plain else ("https",))
        """The schemes tried, in order, until one answers."""
        self._base_url: str | None = None
        self._api = server.path
        self._query = f"?ns={server.ns}" if server.ns else ""
        self._headers = dict(server.headers)
        self.timeout = timeout
        self._transport = transport or Transport(
            retry=RetryPolicy(attempts) if attempts else None,
            ca_file=ca_bundle(server.ca_files) if server.ca_files else None, client_cert=server.client_cert)
        found = load_credentials(host) if credentials == "docker-config" else credentials
        self._auth = Authenticator(self._transport, found, timeout=timeout, registry=host,
                                   provider=credentials_provider)
        self._lock = threading.Lock()
        self._ping_lock = threading.Lock()
        self._known = False  # whether _challenge has been learned
        self._challenge: Challenge | None = None
        self._scopes: dict[str, str] = {}

    @property
    def ca_file(self) -> str | None:
        """The CA bundle HTTPS is verified with (None: libcurl's default)."""
        return self._transport.ca_file

    @property
    def origin(self) -> Origin:
        """How the fetch engine reaches this registry: TLS, client certificate, headers."""
        return Origin(self.tls_verify, self.ca_file, self._transport.client_cert, tuple(self._headers.items()))

    @property
    def base_url(self) -> str:
        """``scheme://host``: the first use learns which scheme the registry speaks (``GET /v2/``)."""
        self._ping()
        assert self._base_url is not None
        return self._base_url

    def blob_url(self, repository: str, digest: str) -> str:
        """The URL of a blob (the registry may redirect it elsewhere)."""
        return f"{self.base_url}{self._api}/{repository}/blobs/{digest}{self._query}"

    def authorization(self, repository: str) -> str | None:
        """The ``Authorization`` header value for pulling from ``repository``, None if the registry
        needs none. The first call learns the registry's challenge (``GET /v2/``); tokens are cached."""
        self._ping()
        with self._lock:
            challenge, scope = self._challenge, self._scopes.get(repository, _pull_scope(repository))
        return self._auth.authorization(challenge, scope)

    def reauthorize(self, repository: str, www_authenticate: str, failed: str | None = None) -> str | None:
        """Answer a 401's ``WWW-Authenticate`` for ``repository``: take its realm, service and
        scope and return a fresh header value. ``failed`` is the header value the request was
        refused with: if another thread has already replaced it, its replacement is returned and
        no new token is fetched (callers should still bound their retries)."""
        challenge = _pick_challenge(www_authenticate, f"{self.base_url}{self._api}/{repository}/")
        scope = challenge.params.get("scope") or _pull_scope(repository)
        with self._lock:
            self._challenge, self._known = challenge, True
            self._scopes[repository] = scope
        return self._auth.refresh(challenge, scope, failed)

    def check_login(self) -> None:
        """Check the credentials as ``docker login`` does: ``GET /v2/`` with the answer to the
        registry's challenge (Basic, or a token asked for no scope). Raises AuthError if refused."""
        self._ping()
        with self._lock:
            challenge = self._challenge
        authorization = self._auth.authorization(challenge, "")
        url = f"{self.base_url}{self._api}/"
        response = self._request(url, _MAX_ERROR_BODY, {"Authorization": authorization} if authorization else None)
        if response.status in (401, 403):
            raise AuthError(response.status, "GET", url, response.body)
        if response.status != 200:
            raise RegistryError(response.status, "GET", url, response.body)

    def resolve(self, ref: Reference, platform: Platform) -> Resolved:
        """Fetch what ``ref`` names (by digest if it has one, else by tag) and, for an index, the
        manifest for ``platform``. Raises DigestMismatch when a body is not what its digest, the
        index or ``Docker-Content-Digest`` says; ManifestError, PlatformNotFound, RegistryError."""
        where = str(ref)
        body, media_type = self._manifest(ref.repository, ref.digest or ref.tag or DEFAULT_TAG, ref.digest, where)
        top = parse_manifest(body, media_type, where)
        descriptor = Descriptor(top.media_type, digest_of(body), len(body))
        if isinstance(top, ImageManifest):
            return Resolved(ref, descriptor, ((descriptor, body),), top)

        chosen = select_platform(top, platform, where)
        child_where = f"{ref.name}@{chosen.digest} ({platform})"
        child, child_type = self._manifest(ref.repository, chosen.digest, chosen.digest, child_where)
        if len(child) != chosen.size:
            raise DigestMismatch(f"manifest {child_where} size", str(chosen.size), str(len(child)))
        manifest = parse_manifest(child, child_type, child_where)
        if isinstance(manifest, ImageIndex):
            raise ManifestError(
                child_where, "the platform's entry is itself an index; nested indexes are not supported"
            )
        return Resolved(ref, descriptor, ((descriptor, body), (chosen, child)), manifest)

    def manifest(self, repository: str, target: str) -> tuple[bytes, str | None]:
        """GET the manifest or index ``target`` (a tag or a digest) of ``repository`` as it is:
        (body, Content-Type), its digest checked against ``target`` or ``Docker-Content-Digest``.
        Raises DigestMismatch, AuthError, RegistryError, TransferError."""
        expected = target if check_digest(target) is None else None
        return self._manifest(repository, target, expected, f"{self.host}/{repository}:{target}")

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The size ``repository`` says its blob ``digest`` has (a ``HEAD``), None if it has none."""
        url = self.blob_url(repository, digest)
        response = self._send("HEAD", repository, url, {}, 0, accept=(200, 404))
        if response.status == 404:
            return None
        length = response.headers.get("content-length", "")
        if not length.isdigit():
            raise RegistryError(response.status, "HEAD", url, "no Content-Length for the blob")
        return int(length)

    def _manifest(self, repository: str, target: str, expected: str | None, where: str) -> tuple[bytes, str | None]:
        """GET a manifest and check its digest; returns (body, Content-Type)."""
        url = f"{self.base_url}{self._api}/{repository}/manifests/{target}{self._query}"
        try:
            response = self._send("GET", repository, url, {"Accept": ACCEPT}, MAX_MANIFEST_BYTES)
        except RegistryError as e:
            if e.status != 200:  # a 200 is refused only by the transport, which stopped reading at the cap
                raise
            raise ManifestError(where, f"more than {MAX_MANIFEST_BYTES} bytes, the limit of a manifest") from None
        actual = digest_of(response.body)
        if expected is not None and actual != expected:
            raise DigestMismatch(f"manifest {where}", expected, actual)
        claimed = response.headers.get("docker-content-digest", "")
        if claimed.startswith("sha256:") and claimed != actual:
            raise DigestMismatch(f"manifest {where} (Docker-Content-Digest)", claimed, actual)
        return response.body, response.headers.get("content-type")

    def _probe(self) -> Response:
        """``GET /v2/`` on the first of ``schemes`` that speaks to us; sets ``_base_url``. The
        scheme learned before is tried alone, and forgotten if the server changed since (a TLS
        server answers plain HTTP with 400; a plain one fails the TLS handshake)."""
        key = (self.api_host, self.tls_verify)
        with _SCHEMES_LOCK:
            known = _SCHEMES.get(key)
        if known in self.schemes and len(self.schemes) > 1:
            try:  # one try: a failure falls back to the full probe, with its retries
                response = self._request(f"{known}://{self.api_host}{self._api}/", _MAX_ERROR_BODY, attempts=1)
                if not (known == "http" and response.status == 400):
                    self._base_url = f"{known}://{self.api_host}"
                    return response
            except TransferError:
                pass
            log.info("%s no longer answers over %s: probing again", self.api_host, known)
            with _SCHEMES_LOCK:
                _SCHEMES.pop(key, None)
        return self._probe_schemes(self.schemes)

    def _probe_schemes(self, schemes: tuple[str, ...]) -> Response:
        key = (self.api_host, self.tls_verify)
        for i, scheme in enumerate(schemes):
            url = f"{scheme}://{self.api_host}{self._api}/"
            fallback = i + 1 < len(schemes)
            if scheme == "https" and fallback and self.tls_verify and not self._speaks_tls(url):
                continue
            try:
                # When plain HTTP may follow, one try tells a server that does not speak TLS.
                response = self._request(url, _MAX_ERROR_BODY, attempts=1 if fallback else None)
            except TransferError as exc:
                if not fallback:
                    raise
                if exc.curl_code != SSL_CONNECT_ERROR:
                    response = self._request(url, _MAX_ERROR_BODY)  # the usual retries, same scheme
                else:
                    log.info("%s does not speak TLS (%s): using plain HTTP", self.api_host, exc)
                    continue
            self._base_url = f"{scheme}://{self.api_host}"
            with _SCHEMES_LOCK:
                _SCHEMES[key] = scheme
            return response
        raise AssertionError("unreachable: the last scheme raises or returns")

    def _speaks_tls(self, url: str) -> bool:
        """Whether the host answers TLS at all: one try, its certificate not checked, so that a
        plain-HTTP registry (loopback) costs no loading of the CA bundle (~10 ms) to say no. It
        carries none of the host's configured headers. A host that does speak TLS is then probed
        again, checked."""
        try:
            self._transport.request("GET", url, {}, max_body=_MAX_ERROR_BODY, timeout=self.timeout, verify=False,
                                    attempts=1)
        except TransferError as exc:
            if exc.curl_code == SSL_CONNECT_ERROR:
                log.info("%s does not speak TLS (%s): using plain HTTP", self.api_host, exc)
                return False
        return True

    def _request(self, url: str, max_body: int, headers: dict[str, str] | None = None,
                 attempts: int | None = None, method: str = "GET") -> Response:
        headers = {**self._headers, **headers} if headers else self._headers
        return self._transport.request(method, url, headers, max_body=max_body, timeout=self.timeout,
                                       verify=self.tls_verify, attempts=attempts)

    def _send(self, method: str, repository: str, url: str, headers: dict[str, str], max_body: int,
              accept: tuple[int, ...] = (200,)) -> Response:
        """A request with the repository's authorization, answering one 401 with a fresh one;
        a status outside ``accept`` raises AuthError or RegistryError (with its ``Retry-After``)."""

        def send(authorization: str | None) -> Response:
            sent = dict(headers, Authorization=authorization) if authorization else headers
            return self._request(url, max_body, sent, method=method)

        authorization = self.authorization(repository)
        response = send(authorization)
        if response.status == 401 and (challenges := response.headers.get_all("www-authenticate")):
            response = send(self.reauthorize(repository, ", ".join(challenges), authorization))
        if response.status in accept:
            return response
        if response.status in (401, 403):
            raise AuthError(response.status, method, url, response.body)
        raise RegistryError(response.status, method, url, response.body,
                            retry_after=response.headers.get("retry-after"))

    def _ping(self) -> None:
        """Learn the registry's scheme and challenge from ``GET /v2/``, once."""
        with self._ping_lock:
            with self._lock:
                if self._known:
                    return
            response = self._probe()
            url = response.url
            if response.status == 401:
                challenge = _pick_challenge(", ".join(response.headers.get_all("www-authenticate")), url)
            elif 200 <= response.status < 300:
                challenge = None
            else:
                raise RegistryError(response.status, "GET", url, response.body)
            with self._lock:
                if not self._known:
                    self._challenge, self._known = challenge, True


def _pick_challenge(www_authenticate: str, url: str) -> Challenge:
    """The Bearer challenge if offered, else the Basic one."""
    challenges = parse_www_authenticate(www_authenticate)
    for scheme in ("bearer", "basic"):
        if challenge := next((c for c in challenges if c.scheme == scheme), None):
            return challenge
    raise AuthError(401, "GET", url, f"no Bearer or Basic challenge in WWW-Authenticate: {www_authenticate!r}")


def _pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def _is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` (IPv6 in brackets) names this machine: localhost, 127.0.0.0/8, ::1."""
    name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
    if name == "localhost":
        return True
    import ipaddress  # only here: keeps every pull's start-up short

    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
