"""Registry authentication: ``WWW-Authenticate`` challenges, Docker config credentials, the Docker
token protocol and a token cache.

Builds on the transport only; which URL to challenge and which scope to ask for is the registry
client's business.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from fastpull.errors import AuthError
from fastpull.http.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token server gives no ``expires_in`` (the Docker token spec's default)."""
MAX_TOKEN_RESPONSE = 1 << 20

_DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
_DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SEPARATORS_RE = re.compile(r"[\s,]*")
_SCHEME_RE = re.compile(_TOKEN)
_PARAM_RE = re.compile(rf'(?P<name>{_TOKEN})\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<token>[^\s,]*))')
_ESCAPE_RE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header; scheme and parameter names are lower case."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict, hash=False)


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` (RFC 7235): ``Bearer realm="...",service="...",scope="..."``,
    ``Basic realm="..."``, several challenges in one value, quoted strings holding commas."""
    challenges: list[Challenge] = []
    scheme: str | None = None
    params: dict[str, str] = {}
    pos = 0
    while (pos := _SEPARATORS_RE.match(value, pos).end()) < len(value):  # type: ignore[union-attr]
        if scheme is not None and (param := _PARAM_RE.match(value, pos)):
            quoted = param["quoted"]
            params[param["name"].lower()] = param["token"] if quoted is None else _ESCAPE_RE.sub(r"\1", quoted)
            pos = param.end()
        elif token := _SCHEME_RE.match(value, pos):
            if scheme is not None:
                challenges.append(Challenge(scheme, params))
            scheme, params, pos = token[0].lower(), {}, token.end()
        else:
            pos += 1  # stray character: skip it
    if scheme is not None:
        challenges.append(Challenge(scheme, params))
    return challenges


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or registry token) for Basic auth and token requests."""

    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        """The ``Authorization`` header value for Basic auth."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def load_docker_credentials(registry: str, path: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (``host[:port]``, ``docker.io`` for Docker Hub) from a Docker
    config file: its ``auths`` (``auth`` base64 or ``username``/``password``), keyed by ``host``,
    ``https://host`` or, for Docker Hub, ``https://index.docker.io/v1/``; else its ``credHelpers``
    or ``credsStore`` helper. None when nothing is configured or the file is unreadable."""
    path = path or docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable Docker config %s: %s", path, e)
        return None
    if not isinstance(config, dict):
        log.warning("ignoring Docker config %s: not a JSON object", path)
        return None
    hub = registry in _DOCKER_HUB_NAMES
    names = _DOCKER_HUB_NAMES if hub else (registry,)
    server = _DOCKER_HUB_CONFIG_KEY if hub else registry

    auths = config.get("auths")
    auths = auths if isinstance(auths, dict) else {}
    keys = sorted((k for k in auths if _config_key_host(k) in names), key=lambda k: (k != server, k))
    for key in keys:
        if (creds := _entry_credentials(auths[key])) is not None:
            return creds
    helpers = config.get("credHelpers")
    helpers = helpers if isinstance(helpers, dict) else {}
    helper = next((v for k, v in helpers.items() if _config_key_host(k) in names), None) or config.get("credsStore")
    return _helper_credentials(helper, server) if isinstance(helper, str) and helper else None


def _config_key_host(key: str) -> str:
    """``https://host:port/v1/`` -> ``host:port``, as Docker matches ``auths`` keys."""
    return key.split("://", 1)[-1].split("/", 1)[0]


def _entry_credentials(entry: object) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(encoded := entry.get("auth"), str) and encoded:
        try:
            decoded = base64.b64decode(encoded).decode()
        except ValueError:
            log.warning("ignoring malformed 'auth' value in Docker config")
            return None
        name, sep, secret = decoded.partition(":")
        return Credentials(name, secret) if sep else None
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and user and isinstance(password, str):
        return Credentials(user, password)
    return None


def _helper_credentials(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` (the Docker credential helper protocol)."""
    import subprocess  # only here: keeps every pull's start-up short

    try:
        done = subprocess.run(
            [f"docker-credential-{helper}", "get"], input=server.encode(), capture_output=True, timeout=30, check=False
        )
        reply = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        log.warning("credential helper docker-credential-%s failed: %s", helper, e)
        return None
    if not isinstance(reply, dict) or not isinstance(reply.get("Username"), str):
        return None
    if reply["Username"] == "<token>":
        log.warning("docker-credential-%s gave an identity token for %s; not supported", helper, server)
        return None
    return Credentials(reply["Username"], str(reply.get("Secret", "")))


TokenKey = tuple[str, str, str]
"""(realm, service, scope)."""


class TokenCache:
    """Bearer tokens keyed by (realm, service, scope), forgotten shortly before they expire. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[TokenKey, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: TokenKey) -> str | None:
        """The token for ``key`` if it has some life left, else None."""
        with self._lock:
            token, expires = self._tokens.get(key, (None, 0.0))
            if token is not None and self._clock() < expires:
                return token
            self._tokens.pop(key, None)
            return None

    def put(self, key: TokenKey, token: str, lifetime: float) -> None:
        """Keep ``token`` for ``lifetime`` seconds, less a margin so that it is not sent expiring."""
        with self._lock:
            self._tokens[key] = (token, self._clock() + lifetime - min(5.0, lifetime / 4))


def fetch_token(
    transport: Transport, challenge: Challenge, scope: str, credentials: Credentials | None, *, timeout: float
) -> tuple[str, float]:
    """Ask the token server of a Bearer ``challenge`` for a token for ``scope`` (space-separated
    scopes allowed), with Basic ``credentials`` if given. Returns (token, lifetime in seconds).
    Raises AuthError if the server refuses."""
    realm = challenge.params.get("realm", "")
    if not realm.startswith(("https://", "http://")):
        raise AuthError(401, "GET", realm or "(no realm)", "Bearer challenge has no http(s) realm")
    query = [("service", challenge.params["service"])] if "service" in challenge.params else []
    query += [("scope", s) for s in scope.split()]
    url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}" if query else realm
    headers = {"Authorization": credentials.basic()} if credentials else {}
    response = transport.request("GET", url, headers, max_body=MAX_TOKEN_RESPONSE, timeout=timeout)
    if response.status != 200:
        raise AuthError(response.status, "GET", url, response.body)
    try:
        reply = json.loads(response.body)
    except ValueError:
        reply = None
    token = (reply.get("token") or reply.get("access_token")) if isinstance(reply, dict) else None
    if not isinstance(reply, dict) or not isinstance(token, str) or not token:
        raise AuthError(response.status, "GET", url, "token response has no token")
    lifetime = reply.get("expires_in")
    if isinstance(lifetime, (int, float)) and not isinstance(lifetime, bool) and lifetime > 0:
        return token, float(lifetime)
    return token, DEFAULT_TOKEN_LIFETIME


class Authenticator:
    """``Authorization`` header values for one registry, per scope. Thread-safe; concurrent
    requests for one scope share one token request."""

    def __init__(self, transport: Transport, credentials: Credentials | None, *, timeout: float) -> None:
        self.credentials = credentials
        self._transport = transport
        self._timeout = timeout
        self._cache = TokenCache()
        self._flights: dict[TokenKey, threading.Lock] = {}
        self._lock = threading.Lock()

    def authorization(self, challenge: Challenge | None, scope: str) -> str | None:
        """The header value answering ``challenge`` (None: the registry asked for nothing) for
        ``scope``: Basic credentials, or a Bearer token from the cache or the token server."""
        return self._header(challenge, scope, refresh=False, stale=None)

    def refresh(self, challenge: Challenge, scope: str, stale: str | None = None) -> str | None:
        """Like ``authorization`` after a refusal: a new token is fetched, unless the cached one is
        no longer ``stale`` (the header value that was refused), i.e. another thread renewed it."""
        return self._header(challenge, scope, refresh=True, stale=stale)

    def _header(self, challenge: Challenge | None, scope: str, *, refresh: bool, stale: str | None) -> str | None:
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self.credentials.basic() if self.credentials else None
        key = (challenge.params.get("realm", ""), challenge.params.get("service", ""), scope)
        with self._lock:
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:
            token = self._cache.get(key)
            if token is None or (refresh and stale in (None, f"Bearer {token}")):
                token, lifetime = fetch_token(
                    self._transport, challenge, scope, self.credentials, timeout=self._timeout
                )
                self._cache.put(key, token, lifetime)
            return f"Bearer {token}"
