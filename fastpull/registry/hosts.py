"""Where a registry's content may be fetched from, as the node's other tools are configured:
containerd's ``hosts.toml`` directories, containers' ``registries.conf`` (and its
``registries.conf.d/``), Docker's ``daemon.json`` ``registry-mirrors``, and the certificate
directories of Docker and containers (``certs.d/<host>/``).

:meth:`RegistryHosts.endpoints` answers, for a repository, the ordered places to try: mirrors
first, the registry last. Pure: files are read when loaded, nothing here touches the network.
A file that cannot be parsed is a ConfigError naming it; a blocked registry is RegistryBlocked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from fastpull.errors import ConfigError, RegistryBlocked
from fastpull.oci.reference import DOCKER_HUB, DOCKER_HUB_API_HOST

HOSTS_DIR = "/etc/containerd/certs.d"
REGISTRIES_CONF = "/etc/containers/registries.conf"
DAEMON_JSON = "/etc/docker/daemon.json"
CERTS_DIRS = ("/etc/docker/certs.d", "/etc/containers/certs.d")
DIGEST_ONLY, TAG_ONLY = "digest-only", "tag-only"


class RegistryHost(NamedTuple):
    """One server to ask, and how: everything but the repository name."""

    host: str
    """``host[:port]`` (a registry's own endpoint keeps its name: ``docker.io``, not its API host)."""
    schemes: tuple[str, ...] | None = None
    """Schemes to try in order; None: HTTPS, and plain HTTP too for a loopback or ``--insecure-registry`` host."""
    path: str = "/v2"
    """The API root on the server (containerd's ``override_path`` sets it as written)."""
    ns: str | None = None
    """The registry a mirror stands in for, sent as ``?ns=`` (containerd's mirror requests)."""
    resolve: bool = True
    """Whether tags may be resolved here; else manifests by digest and blobs only."""
    verify: bool = True
    ca_files: tuple[str, ...] = ()
    """CA certificates trusted here beside the system's."""
    client_cert: tuple[str, str] | None = None
    """``(certificate, key)`` PEM files presented to the server (the key may be in the certificate's file)."""
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        """The API root as a URL (the first scheme), for messages."""
        return f"{(self.schemes or ('https',))[0]}://{self.host}{self.path}"


class Endpoint(NamedTuple):
    """A place to fetch one repository's content from: a server and the name it knows it by."""

    host: RegistryHost
    repository: str

    def __str__(self) -> str:
        return f"{self.host.url}/{self.repository}"


class _Certs(NamedTuple):
    ca_files: tuple[str, ...] = ()
    client_cert: tuple[str, str] | None = None


class _Mirror(NamedTuple):
    """A ``[[registry.mirror]]`` (or a ``[[registry]]``'s own location, ``pull_from`` empty)."""

    location: str
    insecure: bool = False
    pull_from: str = ""


class _ContainersRegistry(NamedTuple):
    """A ``[[registry]]`` of registries.conf."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[_Mirror, ...] = ()
    source: str = ""


class RegistriesConf(NamedTuple):
    """containers' registries.conf with its drop-ins merged (later files replace a prefix's entry)."""

    registries: tuple[_ContainersRegistry, ...] = ()
    search: tuple[str, ...] | None = None
    """``unqualified-search-registries``; None where no file sets it."""

    def find(self, name: str) -> _ContainersRegistry | None:
        """The entry whose prefix matches ``name`` (``registry/repository``) longest."""
        best: _ContainersRegistry | None = None
        for entry in self.registries:
            if _prefix_match(name, entry.prefix) >= 0 and (best is None or len(entry.prefix) > len(best.prefix)):
                best = entry
        return best


class RegistryHosts(NamedTuple):
    """The loaded configuration: which endpoints serve which registry, in order.

    For a registry, the first form that configures it decides: a ``hosts.toml`` directory (its own
    or ``_default``), else a ``registries.conf`` entry, else Docker's ``registry-mirrors`` (Docker
    Hub only); with none, the registry alone. The certificate directories add CAs and a client
    certificate to every endpoint they name that the form did not give its own.
    """

    hosts_dir: Path | None = None
    registries: RegistriesConf = RegistriesConf()
    docker_mirrors: tuple[str, ...] = ()
    certs_dirs: tuple[Path, ...] = ()
    insecure: frozenset[str] = frozenset()
    """``--insecure-registry`` hosts: any certificate, and plain HTTP if they do not speak TLS."""

    @classmethod
    def load(
        cls,
        hosts_dir: str | os.PathLike[str] | None = None,
        registries_conf: str | os.PathLike[str] | None = None,
        *,
        daemon_json: str | os.PathLike[str] | None = DAEMON_JSON,
        certs_dirs: Iterable[str | os.PathLike[str]] = CERTS_DIRS,
        insecure: Iterable[str] = (),
    ) -> RegistryHosts:
        """Read the configuration: ``hosts_dir`` (default ``/etc/containerd/certs.d`` if it exists),
        ``registries_conf`` (default ``/etc/containers/registries.conf`` and its ``registries.conf.d/``,
        if they exist; a file given must exist), ``daemon_json`` and the ``certs_dirs``. ConfigError
        names a file that cannot be read or parsed."""
        if hosts_dir is None:
            hosts = Path(HOSTS_DIR) if os.path.isdir(HOSTS_DIR) else None
        else:
            hosts = Path(hosts_dir)
            if not hosts.is_dir():
                raise ConfigError(str(hosts), "not a directory")
        conf = load_registries_conf(registries_conf)
        mirrors = load_docker_mirrors(daemon_json) if daemon_json is not None else ()
        return cls(hosts, conf, mirrors, tuple(Path(d) for d in certs_dirs), frozenset(insecure))

    @property
    def search_registries(self) -> tuple[str, ...] | None:
        """Where short names are looked up, in order (``unqualified-search-registries``); None if unset."""
        return self.registries.search

    def endpoints(self, registry: str, repository: str, *, by_digest: bool | None = None) -> list[Endpoint]:
        """Where to fetch ``registry/repository`` from, in order, the registry (or what stands in for
        it) last. ``by_digest``: whether what is fetched is named by digest, for registries.conf's
        ``pull-from-mirror`` (None: blobs, which any mirror may serve). Raises RegistryBlocked,
        ConfigError (a bad ``hosts.toml``)."""
        if self.hosts_dir is not None and (hosts := self._hosts_toml(registry)) is not None:
            found = [Endpoint(h, repository) for h in hosts]
        elif (entry := self.registries.find(f"{registry}/{repository}")) is not None:
            found = _containers_endpoints(entry, registry, repository, by_digest)
        elif registry == DOCKER_HUB and self.docker_mirrors:
            found = [Endpoint(_docker_mirror(url), repository) for url in self.docker_mirrors]
            found.append(Endpoint(RegistryHost(registry), repository))
        else:
            found = [Endpoint(RegistryHost(registry), repository)]
        return [Endpoint(self._with_defaults(e.host), e.repository) for e in found]

    def _hosts_toml(self, registry: str) -> list[RegistryHost] | None:
        """containerd's hosts for ``registry`` from its directory (``host_port_``, ``host``, ``_default``)."""
        assert self.hosts_dir is not None
        names = [registry] if ":" not in registry else [_host_port_dir(registry), registry]
        for name in [*names, "_default"]:
            directory = self.hosts_dir / name
            if directory.is_dir():
                return hosts_from_directory(directory, registry)
        return None

    def _with_defaults(self, host: RegistryHost) -> RegistryHost:
        """Add what the certificate directories and ``--insecure-registry`` say about ``host``."""
        if host.host in self.insecure:
            host = host._replace(verify=False, schemes=("https", "http"))
        if host.ca_files or host.client_cert:
            return host
        for root in self.certs_dirs:
            for name in dict.fromkeys((host.host, _api_host(host.host))):
                certs = certs_from_directory(root / name)
                if certs.ca_files or certs.client_cert:
                    return host._replace(ca_files=certs.ca_files, client_cert=certs.client_cert)
        return host


# ---- containerd hosts.toml -----------------------------------------------------------------


def _host_port_dir(host: str) -> str:
    """containerd's directory name for ``host:port``: ``host_port_``."""
    name, _, port = host.rpartition(":")
    return f"{name}_{port}_"


def hosts_from_directory(directory: Path, registry: str) -> list[RegistryHost]:
    """The hosts a containerd host directory configures for ``registry``: its ``hosts.toml``, or,
    without one, the registry with the directory's certificates (Docker's layout)."""
    path = directory / "hosts.toml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        certs = certs_from_directory(directory)
        return [RegistryHost(registry, ca_files=certs.ca_files, client_cert=certs.client_cert)]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), _why(e)) from None
    return parse_hosts_toml(text, registry, path)


def _load_toml(text: str, path: Path) -> dict[str, Any]:
    """``text`` as TOML, or a ConfigError naming ``path``. tomllib is imported here, not at the top:
    most nodes have no such file, and every pull would pay for the import at start-up."""
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None


def parse_hosts_toml(text: str, registry: str, path: Path) -> list[RegistryHost]:
    """The hosts of a ``hosts.toml`` for ``registry``: each ``[host."URL"]`` in file order, then
    ``server`` (default: the registry itself), which gets the top-level settings."""
    doc = _load_toml(text, path)
    tables = doc.get("host", {})
    if not isinstance(tables, dict):
        raise ConfigError(str(path), "host must be a table of [host.\"URL\"] tables")
    hosts = [_hosts_toml_host(url, settings, registry, path) for url, settings in tables.items()]
    server = doc.get("server")
    if server is not None and not isinstance(server, str):
        raise ConfigError(str(path), f"server must be a string, not {server!r}")
    hosts.append(_hosts_toml_host(server, doc, registry, path))
    return [h for h in hosts if h is not None]


def _hosts_toml_host(url: str | None, settings: Any, registry: str, path: Path) -> RegistryHost | None:
    """One host of a hosts.toml (None: it cannot pull)."""
    if not isinstance(settings, dict):
        raise ConfigError(str(path), f"host {url!r} must be a table")
    where = f"host {url!r}" if url is not None else "the top level"
    base = path.parent
    capabilities = settings.get("capabilities", ["pull", "resolve"])
    if not (isinstance(capabilities, list) and all(isinstance(c, str) for c in capabilities)):
        raise ConfigError(str(path), f"{where}: capabilities must be a list of strings")
    for c in capabilities:
        if c.lower() not in ("pull", "resolve", "push", "referrers"):
            raise ConfigError(str(path), f"{where}: unknown capability {c!r}")
    caps = {c.lower() for c in capabilities}
    if url is None:
        host, schemes, api_path, ns = registry, None, "/v2", None
    else:
        host, schemes, api_path = _parse_host_url(url, settings.get("override_path", False), path, where)
        ns = registry if host not in (registry, _api_host(registry)) else None
        if host == _api_host(registry):
            host = registry
    skip_verify = settings.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise ConfigError(str(path), f"{where}: skip_verify must be true or false")
    if "pull" not in caps:
        return None
    return RegistryHost(
        host, schemes, api_path, ns, resolve="resolve" in caps, verify=not skip_verify,
        ca_files=_ca_files(settings.get("ca"), base, path, where),
        client_cert=_client_pair(settings.get("client"), base, path, where),
        headers=_headers(settings.get("header"), path, where),
    )


def _api_host(registry: str) -> str:
    return DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry


def _parse_host_url(url: str, override_path: object, path: Path, where: str) -> tuple[str, tuple[str, ...], str]:
    """``(host, schemes, API root)`` of a host's URL, as containerd reads it: HTTPS unless given,
    ``/v2`` appended to the path unless ``override_path``."""
    if not isinstance(override_path, bool):
        raise ConfigError(str(path), f"{where}: override_path must be true or false")
    full = url if url.startswith(("http://", "https://")) else f"https://{url}"
    parts = urlsplit(full)
    if not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(str(path), f"{where}: not a host URL")
    api_path = os.path.normpath(parts.path) if parts.path else ""
    api_path = "" if api_path in ("/", ".") else api_path
    if not override_path and not api_path.endswith("/v2"):
        api_path += "/v2"
    return parts.netloc, (parts.scheme,), api_path


def _strings(value: object, path: Path, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(str(path), f"{what} must be a string or a list of strings")


def _ca_files(value: object, base: Path, path: Path, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(str(base / f) for f in _strings(value, path, f"{where}: ca"))


def _client_pair(value: object, base: Path, path: Path, where: str) -> tuple[str, str] | None:
    """The first client certificate: ``"both.pem"``, ``["both.pem", ...]`` or ``[["cert", "key"], ...]``."""
    if value is None or value == []:
        return None
    first = value[0] if isinstance(value, list) else value
    if isinstance(first, str):
        return str(base / first), str(base / first)
    if isinstance(first, list) and len(first) == 2 and all(isinstance(f, str) for f in first):
        return str(base / first[0]), str(base / first[1])
    raise ConfigError(str(path), f"{where}: client must be a file, a list of files or a list of [cert, key] pairs")


def _headers(value: object, path: Path, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(str(path), f"{where}: header must be a table")
    headers = []
    for name, values in value.items():
        for v in _strings(values, path, f"{where}: header {name!r}"):
            if "\n" in v or "\r" in v or "\n" in name or ":" in name:
                raise ConfigError(str(path), f"{where}: header {name!r} is not a valid header")
            headers.append((name, v))
    return tuple(headers)


# ---- containers registries.conf --------------------------------------------------------------


def load_registries_conf(path: str | os.PathLike[str] | None) -> RegistriesConf:
    """registries.conf and its ``.d`` drop-ins (``*.conf``, in name order): ``path`` must exist;
    None reads the system's, if there."""
    main = Path(path) if path is not None else Path(REGISTRIES_CONF)
    if path is None and not main.exists():
        files = []
    else:
        files = [main]
    drop_ins = Path(f"{main}.d")
    if drop_ins.is_dir():
        files += sorted(p for p in drop_ins.iterdir() if p.suffix == ".conf" and p.is_file())
    registries: dict[str, _ContainersRegistry] = {}
    search: tuple[str, ...] | None = None
    for f in files:
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(str(f), _why(e)) from None
        doc = _load_toml(text, f)
        file_search, entries = _parse_registries_doc(doc, f)
        search = file_search if file_search is not None else search
        for entry in entries:
            registries[entry.prefix] = entry
    return RegistriesConf(tuple(registries[p] for p in sorted(registries)), search)


def _parse_registries_doc(doc: Mapping[str, Any], path: Path) -> tuple[tuple[str, ...] | None, list[_ContainersRegistry]]:
    if "registries" in doc:
        raise ConfigError(str(path), "the v1 format ([registries.search] ...) is not supported; use [[registry]] tables")
    search = doc.get("unqualified-search-registries")
    if search is not None:
        search = tuple(_location(s, path, "unqualified-search-registries") for s in _strings(search, path, "unqualified-search-registries"))
    tables = doc.get("registry", [])
    if not (isinstance(tables, list) and all(isinstance(t, dict) for t in tables)):
        raise ConfigError(str(path), "registry must be an array of [[registry]] tables")
    return search, [_containers_registry(t, path) for t in tables]


def _containers_registry(table: Mapping[str, Any], path: Path) -> _ContainersRegistry:
    location = _location(table.get("location", ""), path, "location")
    prefix = _location(table.get("prefix", ""), path, "prefix") or location
    where = f"[[registry]] {prefix!r}"
    if not prefix:
        raise ConfigError(str(path), "a [[registry]] needs a location or a prefix")
    if not location and not prefix.startswith("*."):
        raise ConfigError(str(path), f"{where}: a location is needed unless the prefix is *.domain")
    if prefix.startswith("*.") and any(c in prefix for c in "/@:"):
        raise ConfigError(str(path), f"{where}: a wildcard prefix is *.domain only")
    if "pull-from-mirror" in table:
        raise ConfigError(str(path), f"{where}: pull-from-mirror goes in a [[registry.mirror]]")
    by_digest_only = _flag(table, "mirror-by-digest-only", path, where)
    mirrors = []
    for m in table.get("mirror", []):
        if not isinstance(m, dict):
            raise ConfigError(str(path), f"{where}: mirror must be an array of [[registry.mirror]] tables")
        m_location = _location(m.get("location", ""), path, "mirror location")
        if not m_location:
            raise ConfigError(str(path), f"{where}: a [[registry.mirror]] needs a location")
        pull_from = m.get("pull-from-mirror", "")
        if pull_from not in ("", "all", DIGEST_ONLY, TAG_ONLY):
            raise ConfigError(str(path), f"{where}: pull-from-mirror must be all, digest-only or tag-only")
        if by_digest_only and pull_from:
            raise ConfigError(str(path), f"{where}: mirror-by-digest-only and pull-from-mirror together")
        mirrors.append(_Mirror(m_location, _flag(m, "insecure", path, where),
                               DIGEST_ONLY if by_digest_only else "" if pull_from == "all" else pull_from))
    return _ContainersRegistry(prefix, location, _flag(table, "insecure", path, where),
                               _flag(table, "blocked", path, where), tuple(mirrors), str(path))


def _location(value: object, path: Path, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(str(path), f"{what} must be a string, not {value!r}")
    if value.startswith(("http://", "https://")):
        raise ConfigError(str(path), f"{what} {value!r}: URI schemes are not supported")
    return value.rstrip("/")


def _flag(table: Mapping[str, Any], key: str, path: Path, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(str(path), f"{where}: {key} must be true or false")
    return value


def _prefix_match(name: str, prefix: str) -> int:
    """How many characters of ``name`` the prefix matches (-1: it does not), as containers match:
    whole components (``example.com/foo`` matches ``example.com/foo/bar``, not ``example.com/foobar``);
    ``*.example.com`` matches a host under example.com."""
    if prefix.startswith("*."):
        host = name.partition("/")[0]
        return len(host) if host.endswith(prefix[1:]) else -1
    if name == prefix or name.startswith(prefix + "/"):
        return len(prefix)
    return -1


def _containers_endpoints(entry: _ContainersRegistry, registry: str, repository: str,
                          by_digest: bool | None) -> list[Endpoint]:
    if entry.blocked:
        raise RegistryBlocked(f"{registry}/{repository}", f"{entry.source} ([[registry]] prefix {entry.prefix!r})")
    name = f"{registry}/{repository}"
    matched = _prefix_match(name, entry.prefix)
    own = _Mirror(entry.location or registry, entry.insecure)
    excluded = None if by_digest is None else TAG_ONLY if by_digest else DIGEST_ONLY
    chosen = [m for m in entry.mirrors if m.pull_from != excluded]
    endpoints = []
    for m in [*chosen, own]:
        host, _, path = (m.location + name[matched:]).partition("/")
        # Not insecure: HTTPS, or the rules for a registry with no configuration (loopback may be plain).
        schemes, verify = (("https", "http"), False) if m.insecure else (None, True)
        endpoints.append(Endpoint(RegistryHost(host, schemes, verify=verify, resolve=m.pull_from != DIGEST_ONLY), path))
    return endpoints


# ---- Docker ------------------------------------------------------------------------------------


def load_docker_mirrors(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """``registry-mirrors`` of Docker's daemon.json (none if the file is absent)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), _why(e)) from None
    except ValueError as e:
        raise ConfigError(str(path), f"not valid JSON: {e}") from None
    mirrors = doc.get("registry-mirrors", []) if isinstance(doc, dict) else None
    if not (isinstance(mirrors, list) and all(isinstance(m, str) and "://" in m for m in mirrors)):
        raise ConfigError(str(path), "registry-mirrors must be a list of URLs")
    return tuple(mirrors)


def _docker_mirror(url: str) -> RegistryHost:
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    return RegistryHost(parts.netloc, (parts.scheme,), path if path.endswith("/v2") else f"{path}/v2")


def certs_from_directory(directory: Path) -> _Certs:
    """Docker's certificate directory layout: ``*.crt`` CAs, ``*.cert`` client certificates with
    the ``.key`` of the same name (the first, by name)."""
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return _Certs()
    except OSError as e:
        raise ConfigError(str(directory), _why(e)) from None
    cas = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    for n in names:
        if n.endswith(".cert"):
            key = directory / f"{n[:-5]}.key"
            return _Certs(cas, (str(directory / n), str(key) if key.exists() else str(directory / n)))
    return _Certs(cas)


def _why(e: OSError | UnicodeDecodeError) -> str:
    return "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or str(e)
