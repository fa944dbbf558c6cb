"""Registry authentication: ``WWW-Authenticate`` challenges, credentials from the auth files of
containers and Docker (read, and written by login), the Docker token protocol with identity tokens,
and a token cache.

Builds on the transport only; which URL to challenge and which scope to ask for is the registry
client's business.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastpull.errors import AuthError, ConfigError
from fastpull.http.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token server gives no ``expires_in`` (the Docker token spec's default)."""
MAX_TOKEN_RESPONSE = 1 << 20
CLIENT_ID = "fastpull"
"""The ``client_id`` of OAuth2 token requests (Docker sends ``docker``)."""

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
    """A user name and password for Basic auth and token requests, or an identity token."""

    username: str
    password: str = field(repr=False)
    identity_token: str = field(default="", repr=False)
    """An OAuth2 refresh token (Docker's ``identitytoken``): token requests then POST it instead of
    sending the user name and password."""
    registry_token: str = field(default="", repr=False)
    """A bearer token for the registry itself (CRI's ``registry_token``), sent as it is."""

    def basic(self) -> str:
        """The ``Authorization`` header value for Basic auth."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def auth_file_paths() -> list[Path]:
    """The files credentials are read from, in the order containers/image (podman, skopeo) reads
    them: ``$REGISTRY_AUTH_FILE`` alone if set; else ``$XDG_RUNTIME_DIR/containers/auth.json``
    (``/run/containers/$UID/auth.json`` without ``XDG_RUNTIME_DIR``),
    ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``, then Docker's config."""
    if chosen := os.environ.get("REGISTRY_AUTH_FILE"):
        return [Path(chosen)]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [
        Path(runtime) / "containers" / "auth.json" if runtime else Path(f"/run/containers/{os.getuid()}/auth.json"),
        config_home / "containers" / "auth.json",
        docker_config_path(),
    ]


CredentialSource = Callable[[], "Credentials | None"]
CredentialsProvider = Callable[[str, "str | None"], "Credentials | None"]
"""Credentials for (registry, repository) that come before the configured ones, e.g. a CRI pull's."""


class RegistryCredentials:
    """The credentials configured for one registry, chosen per repository as containers/image
    chooses them: the first file that has some for the repository wins. In a file, a credential
    helper named for the registry (``credHelpers``) answers alone; otherwise the ``auths`` key of
    the repository's longest namespace (``host/team/app``, ``host/team``), then a ``credsStore``
    helper, then the registry's own key (``host``, ``https://host/v1/``...). Helpers run when first
    needed, once. Thread-safe."""

    def __init__(self, registry: str, candidates: Iterable[tuple[str, CredentialSource]]) -> None:
        self.registry = registry
        self._candidates = list(candidates)
        """(namespace, source), in the order they are tried; the namespace "" is the whole registry."""
        self._answers: dict[int, Credentials | None] = {}
        self._lock = threading.Lock()

    def for_repository(self, repository: str | None = None) -> Credentials | None:
        """Credentials for ``repository`` (None: the registry as a whole), or None."""
        for i, (namespace, source) in enumerate(self._candidates):
            if namespace and not (repository == namespace or (repository or "").startswith(namespace + "/")):
                continue
            with self._lock:
                if i not in self._answers:
                    self._answers[i] = source()
                found = self._answers[i]
            if found is not None:
                return found
        return None


def load_credentials(registry: str, paths: Iterable[Path] | None = None) -> RegistryCredentials:
    """The credentials configured for ``registry`` (``host[:port]``, ``docker.io`` for Docker Hub)
    in the auth files ``paths`` (default :func:`auth_file_paths`). Entries hold ``auth`` (base64
    ``user:password``), ``username``/``password`` and/or ``identitytoken``; unreadable files are
    skipped with a warning."""
    names = _registry_names(registry)
    server = helper_key(registry)
    candidates: list[tuple[str, CredentialSource]] = []
    for path in auth_file_paths() if paths is None else paths:
        config = _read_auth_file(path)
        if helper := _registry_helper(config, registry):
            candidates.append(("", functools.partial(_helper_credentials, helper, server)))
            continue
        auths = config.get("auths")
        auths = auths if isinstance(auths, dict) else {}
        keys = [(k, _key_namespace(k)) for k in auths if _key_host(k) in names]
        keys.sort(key=lambda kn: (-len(kn[1]), kn[0] != server, kn[0]))
        found = [(ns, functools.partial(_entry_credentials, auths[k], f"{path} {k!r}")) for k, ns in keys]
        if isinstance(store := config.get("credsStore"), str) and store:
            found.insert(sum(1 for _, ns in keys if ns), ("", functools.partial(_helper_credentials, store, server)))
        candidates += found
    return RegistryCredentials(registry, candidates)


def helper_key(registry: str) -> str:
    """The server name Docker gives a credential helper and uses as its config key for ``registry``."""
    return _DOCKER_HUB_CONFIG_KEY if registry in _DOCKER_HUB_NAMES else registry


def _read_auth_file(path: Path) -> dict[str, Any]:
    try:
        return _load_auth_file(path)
    except ConfigError as e:
        log.warning("ignoring %s", e)
        return {}


def _load_auth_file(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, {} if there is no file. Raises ConfigError."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), f"cannot be read: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(str(path), "not a JSON object")
    return config


def _key_host(key: str) -> str:
    """``https://host:port/v1/`` or ``host:port/team`` -> ``host:port``, as Docker and containers match keys."""
    return key.split("://", 1)[-1].split("/", 1)[0]


def _key_namespace(key: str) -> str:
    """The repository namespace a key is limited to: ``host/team`` -> ``team``; "" for the whole
    registry (a URL key's path, ``https://host/v1/``, is no namespace)."""
    return "" if "://" in key else key.partition("/")[2].strip("/")


def _entry_credentials(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    token = token if isinstance(token, str) else ""
    user, password = entry.get("username"), entry.get("password")
    if isinstance(encoded := entry.get("auth"), str) and encoded:
        try:
            user, sep, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            sep = ""
        if not sep:
            log.warning("ignoring malformed 'auth' value of %s", where)
            return None
    if isinstance(user, str) and (user or token) and isinstance(password, str):
        return Credentials(user, password, token)
    return Credentials("", "", token) if token else None


def _helper_credentials(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` (the Docker credential helper protocol); a user name
    ``<token>`` means that the secret is an identity token."""
    reply = _run_helper(helper, "get", server.encode())
    if not isinstance(reply, dict) or not isinstance(reply.get("Username"), str):
        return None
    secret = str(reply.get("Secret", ""))
    if reply["Username"] == "<token>":
        return Credentials("", "", secret)
    return Credentials(reply["Username"], secret)


def _run_helper(helper: str, action: str, data: bytes) -> object:
    """Run ``docker-credential-<helper> <action>`` with ``data`` on stdin: its JSON reply (None
    if it failed or said nothing)."""
    import subprocess  # only here: keeps every pull's start-up short

    try:
        done = subprocess.run([f"docker-credential-{helper}", action], input=data, capture_output=True, timeout=30,
                              check=False)
        if done.returncode != 0:
            log.debug("docker-credential-%s %s: %s", helper, action, (done.stdout + done.stderr).strip())
            return None
        return json.loads(done.stdout) if done.stdout.strip() else {}
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        log.warning("credential helper docker-credential-%s failed: %s", helper, e)
        return None


def store_credentials(path: Path, registry: str, credentials: Credentials, *, docker: bool) -> str:
    """Save ``credentials`` for ``registry`` (``host[:port]``, ``docker.io``, or with a
    ``/namespace``) as ``docker login`` and ``podman login`` do: through the credential helper the
    auth file ``path`` names for the registry (``credHelpers``, else ``credsStore``), else as its
    ``auths`` entry, keyed as Docker keys Docker Hub (``https://index.docker.io/v1/``) if ``docker``,
    else as given (podman); every other entry and setting of the file is kept, and the file is
    replaced atomically, mode 0600. Returns where they went. Raises ConfigError."""
    config = _load_auth_file(path)
    host, _, namespace = registry.partition("/")
    if helper := _named_helper(config, host):
        if namespace:  # as containers/image refuses it
            raise ConfigError(str(path), f"docker-credential-{helper} holds the credentials of {host}; it keeps "
                                         f"none per namespace ({registry})")
        secret = {"ServerURL": helper_key(registry), "Username": credentials.username, "Secret": credentials.password}
        if _run_helper(helper, "store", json.dumps(secret).encode()) is None:
            raise ConfigError(str(path), f"docker-credential-{helper} could not store the credentials of {registry}")
        return f"docker-credential-{helper} (named in {path})"
    encoded = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode("ascii")
    _auths(config, path)[helper_key(registry) if docker else registry] = {"auth": encoded}
    _write_auth_file(path, config)
    return str(path)


def remove_credentials(path: Path, registry: str) -> bool:
    """Forget the credentials of ``registry`` (or ``registry/namespace``) in the auth file
    ``path``: its ``auths`` entries for exactly that (``host``, ``https://host/...``; or
    ``host/namespace``), and what the credential helper the file names for the registry holds.
    Returns whether there were any. Raises ConfigError."""
    config = _load_auth_file(path)
    host, _, namespace = registry.partition("/")
    helper = None if namespace else _named_helper(config, host)  # helpers keep no namespaces
    erased = helper is not None and _run_helper(helper, "erase", helper_key(host).encode()) is not None
    auths = _auths(config, path)
    names = _registry_names(host)
    stale = [k for k in auths if _key_host(k) in names and _key_namespace(k) == namespace]
    for k in stale:
        del auths[k]
    if stale:
        _write_auth_file(path, config)
    return erased or bool(stale)


def _registry_names(registry: str) -> tuple[str, ...]:
    """The host names config keys may give ``registry`` (Docker Hub has three)."""
    return _DOCKER_HUB_NAMES if registry in _DOCKER_HUB_NAMES else (registry,)


def _named_helper(config: dict[str, Any], registry: str) -> str | None:
    """The credential helper an auth file names for ``registry``: its ``credHelpers`` entry, else
    ``credsStore``."""
    helper = _registry_helper(config, registry) or config.get("credsStore")
    return helper if isinstance(helper, str) and helper else None


def _registry_helper(config: dict[str, Any], registry: str) -> str | None:
    """The ``credHelpers`` entry of an auth file for ``registry``."""
    helpers = config.get("credHelpers")
    names = _registry_names(registry)
    helper = next((v for k, v in helpers.items() if _key_host(k) in names), None) if isinstance(helpers, dict) else None
    return helper if isinstance(helper, str) and helper else None


def _auths(config: dict[str, Any], path: Path) -> dict[str, Any]:
    auths = config.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(str(path), "'auths' is not a JSON object")
    return auths


def _write_auth_file(path: Path, config: dict[str, Any]) -> None:
    """Replace the file at ``path`` (a symlink's target) by ``config``, mode 0600, atomically."""
    import tempfile

    target = Path(os.path.realpath(path))
    tmp: str | None = None
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent="\t") + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise ConfigError(str(path), f"cannot be written: {e}") from None
    finally:
        if tmp is not None:
            os.unlink(tmp)


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
    transport: Transport, challenge: Challenge, scope: str, credentials: Credentials | None, *, timeout: float,
    registry: str = "the registry",
) -> tuple[str, float]:
    """Ask the token server of a Bearer ``challenge`` for a token for ``scope`` (space-separated
    scopes allowed): a GET with Basic ``credentials`` if given (the Docker token spec), or, with an
    identity token, a POST of it as an OAuth2 refresh token (distribution's OAuth2 spec, as Docker
    sends it). Returns (token, lifetime in seconds). Raises AuthError, naming ``registry``, if the
    server refuses."""
    realm = challenge.params.get("realm", "")
    if not realm.startswith(("https://", "http://")):
        raise AuthError(401, "GET", realm or "(no realm)", f"Bearer challenge of {registry} has no http(s) realm")
    service = [("service", challenge.params["service"])] if "service" in challenge.params else []
    if credentials is not None and credentials.identity_token:
        method, url, who = "POST", realm, "identity token"
        form = [("grant_type", "refresh_token"), ("refresh_token", credentials.identity_token),
                ("client_id", CLIENT_ID), *service] + ([("scope", scope)] if scope else [])
        headers, body = {"Content-Type": "application/x-www-form-urlencoded"}, urlencode(form).encode()
    else:
        query = service + [("scope", s) for s in scope.split()]
        method, url, body = "GET", f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}" if query else realm, None
        headers = {"Authorization": credentials.basic()} if credentials else {}
        who = f"credentials of {credentials.username!r}" if credentials else "anonymous token request"
    response = transport.request(method, url, headers, body=body, max_body=MAX_TOKEN_RESPONSE, timeout=timeout)
    if response.status != 200:
        excerpt = response.body.decode("utf-8", "replace")
        raise AuthError(response.status, method, url, f"{who} for {registry} refused: {excerpt}")
    try:
        reply = json.loads(response.body)
    except ValueError:
        reply = None
    token = (reply.get("token") or reply.get("access_token")) if isinstance(reply, dict) else None
    if not isinstance(reply, dict) or not isinstance(token, str) or not token:
        raise AuthError(response.status, method, url, f"token response for {registry} has no token")
    lifetime = reply.get("expires_in")
    if isinstance(lifetime, (int, float)) and not isinstance(lifetime, bool) and lifetime > 0:
        return token, float(lifetime)
    return token, DEFAULT_TOKEN_LIFETIME


class Authenticator:
    """``Authorization`` header values for one registry, per scope. Thread-safe; concurrent
    requests for one scope share one token request.

    ``credentials`` are used for every scope, or chosen per repository (the scope's first
    ``repository:NAME:...``) from a :class:`RegistryCredentials`; ``registry`` names the registry
    in errors. ``provider(registry, repository)`` is asked first; tokens got with its credentials
    serve only requests that present the same ones, and are forgotten with them."""

    def __init__(self, transport: Transport, credentials: Credentials | RegistryCredentials | None, *,
                 timeout: float, registry: str = "the registry", provider: CredentialsProvider | None = None) -> None:
        self._credentials = credentials
        self._provider = provider
        self._provided: weakref.WeakKeyDictionary[Credentials, TokenCache] = weakref.WeakKeyDictionary()
        self._registry = registry
        self._transport = transport
        self._timeout = timeout
        self._cache = TokenCache()
        self._flights: dict[TokenKey, threading.Lock] = {}
        self._lock = threading.Lock()

    def credentials(self, scope: str) -> Credentials | None:
        """The credentials used for ``scope``."""
        return self._choose(scope)[0]

    def _choose(self, scope: str) -> tuple[Credentials | None, TokenCache]:
        """The credentials for ``scope`` and the cache of the tokens got with them."""
        repository = next((s.split(":")[1] for s in scope.split() if s.startswith("repository:")), None)
        if self._provider is not None and (given := self._provider(self._registry, repository)) is not None:
            with self._lock:
                return given, self._provided.setdefault(given, TokenCache())
        if isinstance(self._credentials, RegistryCredentials):
            return self._credentials.for_repository(repository), self._cache
        return self._credentials, self._cache

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
        credentials, cache = self._choose(scope)
        if challenge.scheme == "basic":
            # a token has no use for Basic auth (its entry's password is empty)
            usable = credentials is not None and (
                credentials.password or not (credentials.identity_token or credentials.registry_token))
            return credentials.basic() if usable else None
        if credentials is not None and credentials.registry_token:
            return f"Bearer {credentials.registry_token}"
        key = (challenge.params.get("realm", ""), challenge.params.get("service", ""), scope)
        with self._lock:
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:
            token = cache.get(key)
            if token is None or (refresh and stale in (None, f"Bearer {token}")):
                token, lifetime = fetch_token(self._transport, challenge, scope, credentials, timeout=self._timeout,
                                              registry=self._registry)
                cache.put(key, token, lifetime)
            return f"Bearer {token}"
