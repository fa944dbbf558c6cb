"""The three configuration forms (containerd hosts.toml, containers registries.conf, Docker
daemon.json) and the certificate directories, read into ordered endpoints; and the breaker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.errors import ConfigError, RegistryBlocked, TransferError
from fastpull.registry.hosts import Endpoint, RegistryHost, RegistryHosts, _prefix_match, parse_hosts_toml
from fastpull.registry.mirrors import Breaker


def _hosts(tmp_path: Path, **files: str) -> RegistryHosts:
    """A configuration from ``files`` (relative path -> text) under ``tmp_path``; no system file is read."""
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    hosts_dir = tmp_path / "certs.d"
    hosts_dir.mkdir(exist_ok=True)
    conf = tmp_path / "registries.conf"
    conf.touch()
    return RegistryHosts.load(hosts_dir, conf, daemon_json=tmp_path / "daemon.json",
                              certs_dirs=[tmp_path / "docker-certs.d"])


# ---- containerd hosts.toml -------------------------------------------------------------------


def test_hosts_toml_mirrors_in_file_order_then_the_server(tmp_path):
    hosts = _hosts(tmp_path, **{"certs.d/docker.io/hosts.toml": """
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5050"]
  capabilities = ["pull", "resolve"]

[host."https://mirror.example.com/some/prefix"]
  capabilities = ["pull"]
  skip_verify = true
  ca = "mirror-ca.pem"
  client = [["client.crt", "/abs/client.key"]]
  [host."https://mirror.example.com/some/prefix".header]
    x-custom = ["a", "b"]

[host."https://raw.example.com/api"]
  override_path = true
"""})
    d = tmp_path / "certs.d" / "docker.io"
    assert hosts.endpoints("docker.io", "library/redis") == [
        Endpoint(RegistryHost("127.0.0.1:5050", ("http",), "/v2", "docker.io"), "library/redis"),
        Endpoint(RegistryHost("mirror.example.com", ("https",), "/some/prefix/v2", "docker.io", resolve=False,
                              verify=False, ca_files=(str(d / "mirror-ca.pem"),),
                              client_cert=(str(d / "client.crt"), "/abs/client.key"),
                              headers=(("x-custom", "a"), ("x-custom", "b"))), "library/redis"),
        Endpoint(RegistryHost("raw.example.com", ("https",), "/api", "docker.io"), "library/redis"),
        # The server is Docker Hub's API host: the registry itself, no ns=.
        Endpoint(RegistryHost("docker.io", ("https",)), "library/redis"),
    ]


def test_hosts_toml_directories_host_port_and_default(tmp_path):
    hosts = _hosts(tmp_path, **{
        "certs.d/reg.example:5000/hosts.toml": '[host."http://a:1"]\n',
        "certs.d/reg.example_5000_/hosts.toml": '[host."http://b:1"]\n',
        "certs.d/_default/hosts.toml": '[host."http://c:1"]\n',
    })
    first = hosts.endpoints("reg.example:5000", "app")[0].host
    assert (first.host, first.ns) == ("b:1", "reg.example:5000")  # host_port_ is looked up first
    assert [e.host.host for e in hosts.endpoints("quay.io", "x/y")] == ["c:1", "quay.io"]


def test_hosts_directory_without_hosts_toml_gives_its_certificates_to_the_registry(tmp_path):
    hosts = _hosts(tmp_path, **{"certs.d/reg.example/ca.crt": "x", "certs.d/reg.example/client.cert": "x",
                                "certs.d/reg.example/client.key": "x"})
    d = tmp_path / "certs.d" / "reg.example"
    assert hosts.endpoints("reg.example", "app") == [
        Endpoint(RegistryHost("reg.example", ca_files=(str(d / "ca.crt"),),
                              client_cert=(str(d / "client.cert"), str(d / "client.key"))), "app")]


def test_hosts_toml_without_pull_capability_is_not_an_endpoint(tmp_path):
    hosts = _hosts(tmp_path, **{"certs.d/r.example/hosts.toml": 'capabilities = ["resolve"]\n[host."http://m:1"]\n'})
    assert [e.host.host for e in hosts.endpoints("r.example", "app")] == ["m:1"]


@pytest.mark.parametrize(("text", "why"), [
    ("server = ", "not valid TOML"),
    ('[host."http://m:1"]\ncapabilities = ["pull", "fly"]\n', "unknown capability 'fly'"),
    ('[host."http://m:1"]\nskip_verify = "yes"\n', "skip_verify must be true or false"),
    ('[host."http://m:1"]\nclient = [["only-one"]]\n', "client must be"),
    ('[host."http://m:1"]\nheader = "x"\n', "header must be a table"),
    ('server = 5\n', "server must be a string"),
])
def test_hosts_toml_errors_name_the_file(tmp_path, text, why):
    hosts = _hosts(tmp_path, **{"certs.d/r.example/hosts.toml": text})
    with pytest.raises(ConfigError, match=why) as e:
        hosts.endpoints("r.example", "app")
    assert str(tmp_path / "certs.d" / "r.example" / "hosts.toml") in str(e.value)
    assert "\n" not in str(e.value)


_HOST_NAMES = st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,5})?(:[1-9][0-9]{0,3})?", fullmatch=True)


@given(entries=st.lists(st.tuples(_HOST_NAMES, st.sampled_from(["http", "https"]),
                                  st.sets(st.sampled_from(["pull", "resolve", "push"])),
                                  st.from_regex(r"(/[a-z]{1,4}){0,2}", fullmatch=True)),
                        max_size=5, unique_by=lambda e: (e[0], e[1], e[3])))
def test_hosts_toml_order_capabilities_and_paths(entries):
    """Each ``[host]`` that may pull, in file order, then the registry; ``/v2`` ends every API
    root; tags are resolved only where ``resolve`` is given; every mirror names the registry in ns."""
    text = "".join(f'[host."{scheme}://{name}{path}"]\ncapabilities = {json.dumps(sorted(caps))}\n'
                   for name, scheme, caps, path in entries)
    hosts = parse_hosts_toml(text, "reg.example", Path("/x/hosts.toml"))
    expected = [(name, (scheme,), (path if path.endswith("/v2") else path + "/v2"), "resolve" in caps)
                for name, scheme, caps, path in entries if "pull" in caps]
    assert [(h.host, h.schemes, h.path, h.resolve) for h in hosts[:-1]] == expected
    assert hosts[-1] == RegistryHost("reg.example")
    assert all(h.ns == "reg.example" for h in hosts[:-1] if h.host != "reg.example")


# ---- containers registries.conf ----------------------------------------------------------------


def test_registries_conf_mirrors_rewrite_and_order(tmp_path):
    hosts = _hosts(tmp_path, **{"registries.conf": """
unqualified-search-registries = ["quay.io", "docker.io"]

[[registry]]
prefix = "example.com/team"
location = "internal.example/mirrors/team"

[[registry.mirror]]
location = "127.0.0.1:5050/example.com/team"
insecure = true

[[registry.mirror]]
location = "by-digest.example/team"
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "by-tag.example/team"
pull-from-mirror = "tag-only"

[[registry]]
location = "example.com"
"""})
    assert hosts.search_registries == ("quay.io", "docker.io")

    def chain(by_digest):
        return [(e.host.host, e.repository, e.host.resolve, e.host.verify)
                for e in hosts.endpoints("example.com", "team/app", by_digest=by_digest)]

    insecure = ("127.0.0.1:5050", "example.com/team/app", True, False)
    own = ("internal.example", "mirrors/team/app", True, True)
    assert chain(False) == [insecure, ("by-tag.example", "team/app", True, True), own]
    assert chain(True) == [insecure, ("by-digest.example", "team/app", False, True), own]
    assert chain(None) == [insecure, ("by-digest.example", "team/app", False, True),
                           ("by-tag.example", "team/app", True, True), own]
    assert hosts.endpoints("example.com", "team/app")[0].host.schemes == ("https", "http")
    # Longest prefix wins; a prefix matches whole components only.
    assert [e.host.host for e in hosts.endpoints("example.com", "teammate/app")] == ["example.com"]


def test_registries_conf_blocked_is_an_error_naming_the_file(tmp_path):
    hosts = _hosts(tmp_path, **{"registries.conf": '[[registry]]\nlocation = "bad.example"\nblocked = true\n'})
    with pytest.raises(RegistryBlocked, match=r"bad.example/app is blocked by .*registries.conf"):
        hosts.endpoints("bad.example", "app")


def test_registries_conf_drop_ins_replace_entries_by_prefix_in_name_order(tmp_path):
    hosts = _hosts(tmp_path, **{
        "registries.conf": ('unqualified-search-registries = ["a.example"]\n'
                            '[[registry]]\nlocation = "r.example"\n[[registry.mirror]]\nlocation = "m1"\n'),
        "registries.conf.d/20-b.conf": '[[registry]]\nlocation = "r.example"\n[[registry.mirror]]\nlocation = "m3"\n',
        "registries.conf.d/10-a.conf": ('unqualified-search-registries = ["b.example"]\n[[registry]]\n'
                                        'location = "r.example"\n[[registry.mirror]]\nlocation = "m2"\n'),
        "registries.conf.d/30-c.ignored": "not toml at all [",
    })
    assert [e.host.host for e in hosts.endpoints("r.example", "app")] == ["m3", "r.example"]
    assert hosts.search_registries == ("b.example",)


def test_registries_conf_wildcard_prefix(tmp_path):
    hosts = _hosts(tmp_path, **{"registries.conf": '[[registry]]\nprefix = "*.example.com"\n'
                                                   '[[registry.mirror]]\nlocation = "mirror.local"\n'})
    assert [(e.host.host, e.repository) for e in hosts.endpoints("a.example.com", "x/y")] == [
        ("mirror.local", "x/y"), ("a.example.com", "x/y")]
    assert [e.host.host for e in hosts.endpoints("example.com", "x")] == ["example.com"]


@pytest.mark.parametrize(("text", "why"), [
    ("[[registry]\n", "not valid TOML"),
    ('[registries.search]\nregistries = ["a"]\n', "v1 format"),
    ('[[registry]]\nlocation = "https://r.example"\n', "URI schemes are not supported"),
    ('[[registry]]\nprefix = "r.example/x"\n', "a location is needed"),
    ('[[registry]]\nlocation = "r"\n[[registry.mirror]]\ninsecure = true\n', "needs a location"),
    ('[[registry]]\nlocation = "r"\n[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "sometimes"\n',
     "pull-from-mirror must be"),
    ('[[registry]]\nlocation = "r"\nblocked = "yes"\n', "blocked must be true or false"),
])
def test_registries_conf_errors_name_the_file(tmp_path, text, why):
    (tmp_path / "registries.conf").write_text(text)
    with pytest.raises(ConfigError, match=why) as e:
        _hosts(tmp_path)
    assert str(tmp_path / "registries.conf") in str(e.value) and "\n" not in str(e.value)


_COMPONENT = st.from_regex(r"[a-z0-9]{1,4}", fullmatch=True)


@given(name=st.lists(_COMPONENT, min_size=1, max_size=5), prefix=st.lists(_COMPONENT, min_size=1, max_size=5),
       location=st.lists(_COMPONENT, min_size=1, max_size=3))
def test_registries_conf_prefix_matches_whole_components_and_rewrites_the_rest(name, prefix, location):
    full, pre = "/".join(name), "/".join(prefix)
    matched = _prefix_match(full, pre)
    assert (matched >= 0) == (name[:len(prefix)] == prefix)
    if matched >= 0:
        conf = f'[[registry]]\nprefix = "{pre}"\nlocation = "{".".join(location)}.x/{"/".join(location)}"\n'
        hosts = RegistryHosts(registries=_parse(conf))
        if len(name) > 1 and name[:len(prefix)] == prefix:
            endpoint = hosts.endpoints(name[0], "/".join(name[1:]))[-1]
            suffix = "/".join(name[len(prefix):])
            assert endpoint.host.host == ".".join(location) + ".x"
            assert endpoint.repository == "/".join(location) + (f"/{suffix}" if suffix else "")


def _parse(text: str):
    import tomllib

    from fastpull.registry.hosts import RegistriesConf, _parse_registries_doc

    search, entries = _parse_registries_doc(tomllib.loads(text), Path("/x.conf"))
    return RegistriesConf(tuple(entries), search)


# ---- Docker, certificates, precedence ----------------------------------------------------------


def test_docker_registry_mirrors_are_for_docker_hub_only(tmp_path):
    hosts = _hosts(tmp_path, **{"daemon.json": json.dumps({"registry-mirrors": ["http://127.0.0.1:5050/"]})})
    assert hosts.endpoints("docker.io", "library/redis") == [
        Endpoint(RegistryHost("127.0.0.1:5050", ("http",), "/v2"), "library/redis"),
        Endpoint(RegistryHost("docker.io"), "library/redis"),
    ]
    assert hosts.endpoints("quay.io", "a/b") == [Endpoint(RegistryHost("quay.io"), "a/b")]


def test_daemon_json_errors_name_the_file(tmp_path):
    (tmp_path / "daemon.json").write_text('{"registry-mirrors": "http://m"}')
    with pytest.raises(ConfigError, match="daemon.json: registry-mirrors must be a list of URLs"):
        _hosts(tmp_path)


def test_certs_directories_apply_to_every_endpoint_they_name(tmp_path):
    hosts = _hosts(tmp_path, **{
        "daemon.json": json.dumps({"registry-mirrors": ["https://mirror.example:5443"]}),
        "docker-certs.d/mirror.example:5443/ca.crt": "x",
        "docker-certs.d/mirror.example:5443/client.cert": "x",
        "docker-certs.d/mirror.example:5443/client.key": "x",
        "docker-certs.d/registry-1.docker.io/extra.crt": "x",
    })
    mirror, hub = (e.host for e in hosts.endpoints("docker.io", "library/redis"))
    d = tmp_path / "docker-certs.d" / "mirror.example:5443"
    assert (mirror.ca_files, mirror.client_cert) == ((str(d / "ca.crt"),), (str(d / "client.cert"), str(d / "client.key")))
    assert hub.ca_files == (str(tmp_path / "docker-certs.d" / "registry-1.docker.io" / "extra.crt"),)


def test_the_first_form_that_configures_a_registry_decides(tmp_path):
    hosts = _hosts(tmp_path, **{
        "certs.d/docker.io/hosts.toml": '[host."http://from-hosts-toml:1"]\n',
        "registries.conf": '[[registry]]\nlocation = "docker.io"\n[[registry.mirror]]\nlocation = "from-conf"\n'
                           '[[registry]]\nlocation = "quay.io"\n[[registry.mirror]]\nlocation = "quay-mirror"\n',
        "daemon.json": json.dumps({"registry-mirrors": ["http://from-docker:1"]}),
    })
    assert [e.host.host for e in hosts.endpoints("docker.io", "library/a")] == ["from-hosts-toml:1", "docker.io"]
    assert [e.host.host for e in hosts.endpoints("quay.io", "a/b")] == ["quay-mirror", "quay.io"]


def test_insecure_registries_accept_any_certificate_and_plain_http(tmp_path):
    hosts = RegistryHosts(insecure=frozenset({"r.example"}))
    assert hosts.endpoints("r.example", "a")[0].host == RegistryHost("r.example", ("https", "http"), verify=False)


def test_no_configuration_means_the_registry_alone(tmp_path):
    assert _hosts(tmp_path).endpoints("docker.io", "library/a") == [Endpoint(RegistryHost("docker.io"), "library/a")]


def test_a_missing_hosts_dir_or_registries_conf_given_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        RegistryHosts.load(tmp_path / "nope", daemon_json=None)
    with pytest.raises(ConfigError, match="nope.conf"):
        RegistryHosts.load(None, tmp_path / "nope.conf", daemon_json=None)


# ---- the breaker -----------------------------------------------------------------------------


def test_breaker_skips_an_unwell_host_for_a_while():
    now = [0.0]
    breaker = Breaker(reset_after=30, clock=lambda: now[0])
    breaker.failed("m:1", TransferError("http://m:1/v2/", "refused", 7))
    from fastpull.errors import RegistryError

    breaker.failed("n:1", RegistryError(404, "GET", "http://n:1/v2/x", ""))  # about one blob, not the host
    assert breaker.tripped("m:1") and not breaker.tripped("n:1")
    now[0] = 29.9
    assert breaker.tripped("m:1")
    now[0] = 30.0
    assert not breaker.tripped("m:1")
