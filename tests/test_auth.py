"""WWW-Authenticate parsing, Docker config credentials, the token cache and token requests."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fastpull.errors import AuthError
from fastpull.http.transport import Headers, Response, Transport
from fastpull.registry.auth import (
    Authenticator,
    Challenge,
    Credentials,
    TokenCache,
    docker_config_path,
    fetch_token,
    load_docker_credentials,
    parse_www_authenticate,
)
from fastpull.testbed.tokenserver import TokenServer


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
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    yield tmp_path / "config.json"


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(config))


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


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
    assert load_docker_credentials(registry) == expected


@pytest.mark.parametrize("content", ["{not json", "[]", '{"auths": []}'])
def test_auth_docker_config_unusable(docker_config: Path, content: str) -> None:
    docker_config.write_text(content)
    assert load_docker_credentials("ghcr.io") is None


def test_auth_docker_config_missing(docker_config: Path) -> None:
    assert load_docker_credentials("ghcr.io") is None


def test_auth_docker_config_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    write_config(path, {"auths": {"ghcr.io": {"auth": b64("u:p")}}})
    assert load_docker_credentials("ghcr.io", path) == Credentials("u", "p")


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
    assert load_docker_credentials("docker.io") == Credentials("hubuser", "hubsecret")
    assert load_docker_credentials("ghcr.io") is None  # identity tokens are not supported
    write_config(docker_config, {"credsStore": "fake"})
    assert load_docker_credentials("docker.io") == Credentials("hubuser", "hubsecret")
    assert load_docker_credentials("quay.io") is None
    write_config(docker_config, {"auths": {"quay.io": {"auth": b64("u:p")}}, "credsStore": "fake"})
    assert load_docker_credentials("quay.io") == Credentials("u", "p")
    write_config(docker_config, {"credsStore": "missing"})
    assert load_docker_credentials("quay.io") is None


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

    def request(self, method: str, url: str, headers: Mapping[str, str] | None = None, **kw: Any) -> Response:
        self.calls.append((url, dict(headers or {})))
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
