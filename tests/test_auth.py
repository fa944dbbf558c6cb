"""WWW-Authenticate parsing, Docker config credentials, the token cache and token requests."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fastpull.errors import AuthError, ConfigError
from fastpull.http.transport import Headers, Response, Transport
from fastpull.registry.auth import (
    Authenticator,
    Challenge,
    Credentials,
    RegistryCredentials,
    TokenCache,
    auth_file_paths,
    docker_config_path,
    fetch_token,
    load_credentials,
    parse_www_authenticate,
    remove_credentials,
    store_credentials,
)
from fastpull.testbed.tokenserver import TokenRequest, TokenServer


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/ubuntu:pull",
                    },
                )
            ],
        ),
        (
            'Bearer realm="http://a/token", scope="repository:x:pull,push", error="insufficient_scope"',
            [
                Challenge(
                    "bearer",
                    {"realm": "http://a/token", "scope": "repository:x:pull,push", "error": "insufficient_scope"},
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ("basic", [Challenge("basic", {})]),
        (
            'Basic realm="a, b", Bearer realm="http://t",service=svc',
            [Challenge("basic", {"realm": "a, b"}), Challenge("bearer", {"realm": "http://t", "service": "svc"})],
        ),
        ('Bearer REALM = "x\\"y\\\\z"', [Challenge("bearer", {"realm": 'x"y\\z'})]),
        ("Bearer realm=", [Challenge("bearer", {"realm": ""})]),
        ("", []),
        (" , ,", []),
        ('Bearer realm="unterminated', [Challenge("bearer", {"realm": '"unterminated'})]),  # lenient, no crash
    ],
)
def test_auth_parses_www_authenticate(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


def test_auth_basic_header() -> None:
    assert Credentials("user", "p:ss").basic() == "Basic " + base64.b64encode(b"user:p:ss").decode()
    assert "p:ss" not in repr(Credentials("user", "p:ss"))


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Docker's config in a temp dir, the only auth file read (the containers ones are absent)."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    yield tmp_path / "config.json"


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(config))


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def creds(registry: str, repository: str | None = None) -> Credentials | None:
    return load_credentials(registry).for_repository(repository)


def test_auth_docker_config_path(docker_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert docker_config_path() == docker_config
    monkeypatch.delenv("DOCKER_CONFIG")
    assert docker_config_path() == Path.home() / ".docker" / "config.json"


@pytest.mark.parametrize(
    ("auths", "registry", "expected"),
    [
        ({"https://index.docker.io/v1/": {"auth": b64("hub:pw")}}, "docker.io", Credentials("hub", "pw")),
        ({"docker.io": {"username": "u", "password": "p"}}, "docker.io", Credentials("u", "p")),
        ({"registry-1.docker.io": {"auth": b64("u:p")}}, "docker.io", Credentials("u", "p")),
        ({"ghcr.io": {"auth": b64("u:p:with:colons")}}, "ghcr.io", Credentials("u", "p:with:colons")),
        ({"https://ghcr.io": {"auth": b64("u:p")}}, "ghcr.io", Credentials("u", "p")),
        ({"http://localhost:5000/v2/": {"auth": b64("u:p")}}, "localhost:5000", Credentials("u", "p")),
        ({"localhost": {"auth": b64("u:p")}}, "localhost:5000", None),
        ({"ghcr.io": {"auth": b64("u:p")}}, "docker.io", None),
        ({"https://index.docker.io/v1/": {"auth": b64("u:p")}}, "ghcr.io", None),
        ({"ghcr.io": {"auth": "!!!not base64"}}, "ghcr.io", None),
        ({"ghcr.io": {"auth": b64("no-colon")}}, "ghcr.io", None),
        ({"ghcr.io": {}}, "ghcr.io", None),
        # The exact key wins over other spellings of the same host.
        ({"https://ghcr.io/": {"auth": b64("a:1")}, "ghcr.io": {"auth": b64("b:2")}}, "ghcr.io", Credentials("b", "2")),
        (
            {"docker.io": {"auth": b64("a:1")}, "https://index.docker.io/v1/": {"auth": b64("b:2")}},
            "docker.io",
            Credentials("b", "2"),
        ),
    ],
)
def test_auth_docker_config_auths(
    docker_config: Path, auths: dict[str, Any], registry: str, expected: Credentials | None
) -> None:
    write_config(docker_config, {"auths": auths})
    assert creds(registry) == expected


@pytest.mark.parametrize("content", ["{not json", "[]", '{"auths": []}'])
def test_auth_docker_config_unusable(docker_config: Path, content: str) -> None:
    docker_config.write_text(content)
    assert creds("ghcr.io") is None


def test_auth_docker_config_missing(docker_config: Path) -> None:
    assert creds("ghcr.io") is None


def test_auth_docker_config_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    write_config(path, {"auths": {"ghcr.io": {"auth": b64("u:p")}}})
    assert load_credentials("ghcr.io", [path]).for_repository() == Credentials("u", "p")


def test_auth_credential_helpers(docker_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text(
        "#!/bin/sh\n"
        "read server\n"
        'case "$server" in\n'
        '  https://index.docker.io/v1/) echo \'{"Username": "hubuser", "Secret": "hubsecret"}\' ;;\n'
        '  ghcr.io) echo \'{"Username": "<token>", "Secret": "identity"}\' ;;\n'
        '  *) echo "credentials not found in native keychain"; exit 1 ;;\n'
        "esac\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    write_config(docker_config, {"credHelpers": {"https://index.docker.io/v1/": "fake", "ghcr.io": "fake"}})
    assert creds("docker.io") == Credentials("hubuser", "hubsecret")
    assert creds("ghcr.io") == Credentials("", "", "identity")  # "<token>": an identity token
    write_config(docker_config, {"credsStore": "fake"})
    assert creds("docker.io") == Credentials("hubuser", "hubsecret")
    assert creds("quay.io") is None
    write_config(docker_config, {"auths": {"quay.io": {"auth": b64("u:p")}}, "credsStore": "fake"})
    assert creds("quay.io") == Credentials("u", "p")
    write_config(docker_config, {"credsStore": "missing"})
    assert creds("quay.io") is None


def test_auth_token_cache_expires() -> None:
    now = [100.0]
    cache = TokenCache(clock=lambda: now[0])
    key = ("realm", "svc", "repository:a:pull")
    cache.put(key, "t", 60)
    assert cache.get(key) == "t"
    assert cache.get(("realm", "svc", "repository:b:pull")) is None
    now[0] = 154.9  # 5 s margin before the 60 s lifetime ends
    assert cache.get(key) == "t"
    now[0] = 155.0
    assert cache.get(key) is None
    cache.put(key, "short", 4)  # margin is a quarter of a short lifetime
    now[0] = 157.9
    assert cache.get(key) == "short"
    now[0] = 158.0
    assert cache.get(key) is None


class FakeTransport(Transport):
    """Answers every request with one canned response and records the requests."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__()
        self.response = Response(status, Headers(), body, "")
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.methods: list[str] = []
        self.bodies: list[bytes | None] = []

    def request(self, method: str, url: str, headers: Mapping[str, str] | None = None, **kw: Any) -> Response:
        self.calls.append((url, dict(headers or {})))
        self.methods.append(method)
        self.bodies.append(kw.get("body"))
        return self.response


BEARER = Challenge("bearer", {"realm": "http://auth.test/token?x=1", "service": "reg"})


@pytest.mark.parametrize(
    ("reply", "token", "lifetime"),
    [
        ({"token": "a", "expires_in": 300}, "a", 300.0),
        ({"access_token": "b"}, "b", 60.0),
        ({"token": "c", "access_token": "d", "expires_in": 0}, "c", 60.0),
        ({"token": "", "access_token": "e", "expires_in": "300"}, "e", 60.0),
    ],
)
def test_auth_fetch_token_reply(reply: dict[str, Any], token: str, lifetime: float) -> None:
    transport = FakeTransport(200, json.dumps(reply).encode())
    assert fetch_token(transport, BEARER, "repository:a/b:pull", Credentials("u", "p"), timeout=5) == (token, lifetime)
    url, headers = transport.calls[0]
    assert url == "http://auth.test/token?x=1&service=reg&scope=repository%3Aa%2Fb%3Apull"
    assert headers == {"Authorization": Credentials("u", "p").basic()}


@pytest.mark.parametrize(
    ("status", "body", "challenge", "why"),
    [
        (200, b"{}", BEARER, "has no token"),
        (200, b"not json", BEARER, "has no token"),
        (200, b'{"token": 5}', BEARER, "has no token"),
        (401, b'{"details": "bad password"}', BEARER, "401: .*bad password"),
        (200, b'{"token": "x"}', Challenge("bearer", {"realm": "file:///etc/passwd"}), "no http"),
        (200, b'{"token": "x"}', Challenge("bearer", {}), "no http"),
    ],
)
def test_auth_fetch_token_refused(status: int, body: bytes, challenge: Challenge, why: str) -> None:
    with pytest.raises(AuthError, match=why):
        fetch_token(FakeTransport(status, body), challenge, "repository:a:pull", None, timeout=5)


def test_auth_fetch_token_scopes_and_anonymous() -> None:
    transport = FakeTransport(200, b'{"token": "t"}')
    fetch_token(
        transport, Challenge("bearer", {"realm": "https://t/"}), "repository:a:pull repository:b:pull", None, timeout=5
    )
    assert transport.calls == [("https://t/?scope=repository%3Aa%3Apull&scope=repository%3Ab%3Apull", {})]


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[TokenServer]:
    with TokenServer(tmp_path, {"alice": "wonderland"}, anonymous=["pull"]) as server:
        yield server


def test_auth_authenticator_caches_per_scope(token_server: TokenServer) -> None:
    challenge = Challenge("bearer", {"realm": token_server.realm, "service": token_server.service})
    auth = Authenticator(Transport(), Credentials("alice", "wonderland"), timeout=5)
    first = auth.authorization(challenge, "repository:a:pull")
    assert first is not None and first.startswith("Bearer ")
    assert auth.authorization(challenge, "repository:a:pull") == first
    assert auth.authorization(challenge, "repository:b:pull") != first
    assert [r.scopes for r in token_server.requests] == [("repository:a:pull",), ("repository:b:pull",)]
    assert {r.user for r in token_server.requests} == {"alice"}

    renewed = auth.refresh(challenge, "repository:a:pull", stale=first)
    assert renewed != first and len(token_server.requests) == 3
    # A refusal of the old value after another thread renewed it fetches nothing more.
    assert auth.refresh(challenge, "repository:a:pull", stale=first) == renewed
    assert len(token_server.requests) == 3
    assert auth.refresh(challenge, "repository:a:pull") not in (first, renewed)
    assert len(token_server.requests) == 4


def test_auth_authenticator_one_token_request_for_concurrent_callers(token_server: TokenServer) -> None:
    challenge = Challenge("bearer", {"realm": token_server.realm, "service": token_server.service})
    auth = Authenticator(Transport(), None, timeout=5)
    barrier = threading.Barrier(8)
    results: list[str | None] = []

    def pull() -> None:
        barrier.wait()
        results.append(auth.authorization(challenge, "repository:a:pull"))

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0] is not None
    assert token_server.requests == [token_server.requests[0]] and token_server.requests[0].user is None


def test_auth_authenticator_basic_and_none() -> None:
    basic = Challenge("basic", {"realm": "r"})
    assert (
        Authenticator(Transport(), Credentials("u", "p"), timeout=5).authorization(basic, "s")
        == Credentials("u", "p").basic()
    )
    assert Authenticator(Transport(), None, timeout=5).authorization(basic, "s") is None
    assert Authenticator(Transport(), Credentials("u", "p"), timeout=5).authorization(None, "s") is None


def test_auth_token_server_refuses_bad_password(token_server: TokenServer) -> None:
    challenge = Challenge("bearer", {"realm": token_server.realm, "service": token_server.service})
    with pytest.raises(AuthError, match="401"):
        fetch_token(Transport(), challenge, "repository:a:pull", Credentials("alice", "wrong"), timeout=5)
    assert token_server.requests == []


def test_auth_file_paths_follow_containers_then_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    assert auth_file_paths() == [Path("/run/user/7/containers/auth.json"), tmp_path / "cfg/containers/auth.json",
                                 tmp_path / "docker/config.json"]
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert auth_file_paths()[:2] == [Path(f"/run/containers/{os.getuid()}/auth.json"),
                                     Path.home() / ".config/containers/auth.json"]
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "only.json"))  # as podman: that file alone
    assert auth_file_paths() == [tmp_path / "only.json"]


@pytest.fixture
def auth_files(docker_config: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The three default auth files, in the order they are read (none exists yet)."""
    runtime, config = tmp_path / "run/containers/auth.json", tmp_path / "config/containers/auth.json"
    for path in (runtime, config):
        path.parent.mkdir(parents=True)
    return runtime, config, docker_config


def test_auth_first_file_with_credentials_wins(auth_files: tuple[Path, Path, Path]) -> None:
    runtime, config, docker = auth_files
    write_config(docker, {"auths": {"ghcr.io": {"auth": b64("docker:1")}, "quay.io": {"auth": b64("docker:2")}}})
    write_config(config, {"auths": {"ghcr.io": {"auth": b64("config:3")}}})
    assert creds("ghcr.io") == Credentials("config", "3")
    assert creds("quay.io") == Credentials("docker", "2")
    write_config(runtime, {"auths": {"ghcr.io": {"auth": b64("runtime:4")}}})
    assert creds("ghcr.io") == Credentials("runtime", "4")


def test_auth_namespace_keys_match_repositories_under_them(auth_files: tuple[Path, Path, Path]) -> None:
    runtime, _, docker = auth_files
    write_config(runtime, {"auths": {
        "quay.io/team": {"auth": b64("team:1")},
        "quay.io/team/app": {"auth": b64("app:2")},
        "quay.io": {"auth": b64("all:3")},
        "docker.io/library": {"auth": b64("lib:4")},
    }})
    write_config(docker, {"auths": {"quay.io/other": {"auth": b64("later:5")}}})
    assert creds("quay.io", "team/app") == Credentials("app", "2")  # the longest namespace
    assert creds("quay.io", "team/app/sub") == Credentials("app", "2")
    assert creds("quay.io", "team/tool") == Credentials("team", "1")
    assert creds("quay.io", "teamwork/x") == Credentials("all", "3")  # a namespace is a whole path component
    assert creds("quay.io", "other/x") == Credentials("all", "3")  # an earlier file's registry key wins
    assert creds("quay.io") == Credentials("all", "3")
    assert creds("docker.io", "library/ubuntu") == Credentials("lib", "4")
    assert creds("docker.io", "someone/else") is None


def test_auth_identity_tokens(docker_config: Path) -> None:
    write_config(docker_config, {"auths": {
        "ghcr.io": {"auth": b64("user:"), "identitytoken": "refresh-1"},
        "quay.io": {"identitytoken": "refresh-2"},
        "https://index.docker.io/v1/": {"auth": b64("hub:pw"), "identitytoken": ""},
    }})
    assert creds("ghcr.io") == Credentials("user", "", "refresh-1")
    assert creds("quay.io") == Credentials("", "", "refresh-2")
    assert creds("docker.io") == Credentials("hub", "pw")
    assert "refresh-1" not in repr(creds("ghcr.io"))


@pytest.fixture
def fake_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``docker-credential-fake`` on PATH, keeping its secrets as JSON in the file it returns."""
    bin_dir, store = tmp_path / "bin", tmp_path / "helper-store.json"
    bin_dir.mkdir()
    store.write_text("{}")
    helper = bin_dir / "docker-credential-fake"
    helper.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"path = {str(store)!r}\n"
        "store = json.load(open(path))\n"
        "data = sys.stdin.read()\n"
        "if sys.argv[1] == 'store':\n"
        "    entry = json.loads(data)\n"
        "    store[entry['ServerURL']] = entry\n"
        "elif data.strip() not in store:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "elif sys.argv[1] == 'get':\n"
        "    print(json.dumps(store[data.strip()]))\n"
        "else:\n"
        "    del store[data.strip()]\n"
        "json.dump(store, open(path, 'w'))\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return store


def test_auth_helper_named_for_the_registry_answers_alone_in_its_file(
    auth_files: tuple[Path, Path, Path], fake_helper: Path
) -> None:
    runtime, _, docker = auth_files
    fake_helper.write_text(json.dumps({"ghcr.io": {"Username": "helped", "Secret": "s"}}))
    write_config(runtime, {"credHelpers": {"ghcr.io": "fake"}, "auths": {"ghcr.io/team": {"auth": b64("ns:1")}}})
    assert creds("ghcr.io", "team/app") == Credentials("helped", "s")
    write_config(runtime, {"credHelpers": {"quay.io": "fake"}})  # it has nothing: the next file answers
    write_config(docker, {"auths": {"quay.io": {"auth": b64("docker:2")}}})
    assert creds("quay.io") == Credentials("docker", "2")
    # credsStore comes after namespace keys and before the registry's own key (Docker's order).
    write_config(docker, {"credsStore": "fake", "auths": {"ghcr.io": {"auth": b64("file:3")},
                                                         "ghcr.io/team": {"auth": b64("ns:4")}}})
    runtime.unlink()
    assert creds("ghcr.io", "team/x") == Credentials("ns", "4")
    assert creds("ghcr.io", "other/x") == Credentials("helped", "s")


def test_auth_helpers_run_once_and_only_when_needed(auth_files: tuple[Path, Path, Path], fake_helper: Path) -> None:
    runtime, _, docker = auth_files
    write_config(runtime, {"auths": {"ghcr.io/team": {"auth": b64("ns:1")}}})
    write_config(docker, {"credsStore": "fake"})
    fake_helper.write_text(json.dumps({"ghcr.io": {"Username": "helped", "Secret": "s"}}))
    found = load_credentials("ghcr.io")
    fake_helper.write_text("not json: the helper fails if it runs")
    assert found.for_repository("team/app") == Credentials("ns", "1")
    fake_helper.write_text(json.dumps({"ghcr.io": {"Username": "helped", "Secret": "s"}}))
    assert found.for_repository("other/app") == Credentials("helped", "s")
    fake_helper.write_text("{}")
    assert found.for_repository("third/app") == Credentials("helped", "s")  # answered once


def test_auth_store_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "config.json"
    path.parent.mkdir()
    original = {"auths": {"quay.io": {"auth": b64("q:1")}, "ghcr.io": {"auth": b64("old:0")}},
                "psFormat": "table {{.ID}}", "proxies": {"default": {"httpProxy": "http://p:3128"}}}
    write_config(path, original)
    path.chmod(0o644)
    assert store_credentials(path, "ghcr.io", Credentials("new", "2"), docker=True) == str(path)
    assert store_credentials(path, "docker.io", Credentials("hub", "3"), docker=True) == str(path)
    saved = json.loads(path.read_text())
    assert saved == {**original, "auths": {"quay.io": {"auth": b64("q:1")}, "ghcr.io": {"auth": b64("new:2")},
                                           "https://index.docker.io/v1/": {"auth": b64("hub:3")}}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and os.listdir(path.parent) == ["config.json"]
    assert load_credentials("docker.io", [path]).for_repository() == Credentials("hub", "3")

    podman = tmp_path / "new" / "auth.json"  # created, in a private directory, with podman's keys
    store_credentials(podman, "docker.io", Credentials("hub", "4"), docker=False)
    store_credentials(podman, "quay.io/team", Credentials("team", "5"), docker=False)
    assert json.loads(podman.read_text())["auths"] == {"docker.io": {"auth": b64("hub:4")},
                                                       "quay.io/team": {"auth": b64("team:5")}}
    assert stat.S_IMODE(podman.parent.stat().st_mode) == 0o700

    assert remove_credentials(path, "docker.io") and remove_credentials(path, "ghcr.io")
    assert not remove_credentials(path, "ghcr.io")
    assert json.loads(path.read_text()) == {**original, "auths": {"quay.io": {"auth": b64("q:1")}}}
    assert remove_credentials(podman, "quay.io/team") and not remove_credentials(podman, "quay.io")
    assert json.loads(podman.read_text())["auths"] == {"docker.io": {"auth": b64("hub:4")}}


def test_auth_remove_takes_every_spelling_of_the_registry_but_not_its_namespaces(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    write_config(path, {"auths": {"ghcr.io": {}, "https://ghcr.io/v2/": {}, "http://ghcr.io": {}, "ghcr.io/team": {},
                                  "ghcr.io:5000": {}}})
    assert remove_credentials(path, "ghcr.io")
    assert json.loads(path.read_text()) == {"auths": {"ghcr.io/team": {}, "ghcr.io:5000": {}}}


@pytest.mark.parametrize("content", ["{not json", "[]", '{"auths": []}'])
def test_auth_store_refuses_a_file_it_cannot_read_and_leaves_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=str(path)):
        store_credentials(path, "ghcr.io", Credentials("u", "p"), docker=True)
    with pytest.raises(ConfigError, match=str(path)):
        remove_credentials(path, "ghcr.io")
    assert path.read_text() == content and os.listdir(tmp_path) == ["config.json"]


def test_auth_store_through_the_helper_the_file_names(tmp_path: Path, fake_helper: Path) -> None:
    path = tmp_path / "config.json"
    write_config(path, {"credsStore": "fake"})
    assert "docker-credential-fake" in store_credentials(path, "docker.io", Credentials("hub", "1"), docker=True)
    assert json.loads(path.read_text()) == {"credsStore": "fake"}  # the secret is the helper's only
    assert load_credentials("docker.io", [path]).for_repository() == Credentials("hub", "1")
    with pytest.raises(ConfigError, match="per namespace"):
        store_credentials(path, "docker.io/team", Credentials("t", "2"), docker=True)
    assert not remove_credentials(path, "docker.io/team")  # nothing to forget there; the helper is not asked
    assert remove_credentials(path, "docker.io") and not remove_credentials(path, "docker.io")
    assert load_credentials("docker.io", [path]).for_repository() is None


def test_auth_identity_token_is_a_refresh_token_grant(tmp_path: Path) -> None:
    with TokenServer(tmp_path, identity_tokens={"refresh-abc": "alice"}) as server:
        challenge = Challenge("bearer", {"realm": server.realm, "service": server.service})
        token, lifetime = fetch_token(Transport(), challenge, "repository:a:pull repository:b:pull",
                                      Credentials("", "", "refresh-abc"), timeout=5)
        assert token and lifetime == server.lifetime
        assert server.requests == [TokenRequest("alice", ("repository:a:pull", "repository:b:pull"), "POST")]
        with pytest.raises(AuthError) as refused:
            fetch_token(Transport(), challenge, "repository:a:pull", Credentials("alice", "", "wrong"), timeout=5,
                        registry="reg.example:5000")
        message = str(refused.value)
        assert "\n" not in message and "identity token for reg.example:5000 refused" in message
        assert "invalid_grant" in message and "wrong" not in message


def test_auth_identity_token_form_is_dockers() -> None:
    transport = FakeTransport(200, b'{"access_token": "t", "expires_in": 120}')
    fetch_token(transport, BEARER, "repository:a/b:pull", Credentials("", "", "r1"), timeout=5)
    assert transport.calls == [("http://auth.test/token?x=1", {"Content-Type": "application/x-www-form-urlencoded"})]
    assert transport.bodies == [b"grant_type=refresh_token&refresh_token=r1&client_id=fastpull&service=reg"
                                b"&scope=repository%3Aa%2Fb%3Apull"]
    assert transport.methods == ["POST"]


def test_auth_authenticator_picks_credentials_per_repository(tmp_path: Path) -> None:
    candidates = [("team", lambda: Credentials("alice", "wonderland")), ("", lambda: Credentials("bob", "builder"))]
    with TokenServer(tmp_path, {"alice": "wonderland", "bob": "builder"}) as server:
        challenge = Challenge("bearer", {"realm": server.realm, "service": server.service})
        auth = Authenticator(Transport(), RegistryCredentials("r", candidates), timeout=5)
        auth.authorization(challenge, "repository:team/app:pull")
        auth.authorization(challenge, "repository:other/app:pull")
        auth.authorization(challenge, "")
        assert [r.user for r in server.requests] == ["alice", "bob", "bob"]
    basic = Challenge("basic", {})
    assert auth.authorization(basic, "repository:team/x:pull") == Credentials("alice", "wonderland").basic()
    assert Authenticator(Transport(), Credentials("", "", "tok"), timeout=5).authorization(basic, "s") is None
