"""Credentials end to end against real registries: identity tokens, namespaced keys, the containers
auth files, and ``fastpull login``/``logout`` writing the files Docker and podman read."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import stat
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from fastpull import AuthError, FetchOptions, pull
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.testbed.registry import LocalRegistry
from fastpull.testbed.tokenserver import TokenServer

MiB = 1 << 20
OPTS = FetchOptions(chunk_size=256 * 1024, chunks_per_blob=4)
USERS = {"alice": "wonderland", "bob": "builder"}


@pytest.fixture
def auth_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Every auth file in a temp dir, none existing: Docker's config, the two containers ones."""
    files = {"docker": tmp_path / "docker" / "config.json", "runtime": tmp_path / "run" / "containers" / "auth.json",
             "config": tmp_path / "cfg" / "containers" / "auth.json"}
    monkeypatch.setenv("DOCKER_CONFIG", str(files["docker"].parent))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return files


@pytest.fixture
def token_registry(tmp_path: Path, image_cache: Path):
    """A registry behind the token server (users alice and bob, identity token ``refresh-alice``),
    with one image pushed as ``team/app:v1`` and ``other/app:v1``."""
    image = build_image([LayerSpec(MiB)], image_cache / "login", seed=41)
    with (
        TokenServer(tmp_path, USERS, identity_tokens={"refresh-alice": "alice"}) as tokens,
        LocalRegistry(tmp_path / "storage", auth=tokens.auth_config()) as registry,
    ):
        for repo in ("team/app", "other/app"):
            push_image(registry.url, repo, "v1", image, token_getter=lambda scope: tokens.issue([scope], "alice"))
        tokens.requests.clear()
        yield registry, tokens, image


def _write(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _fastpull(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastpull", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_pull_with_only_an_identity_token(token_registry, auth_env, tmp_path):
    registry, tokens, image = token_registry
    _write(auth_env["docker"], {"auths": {registry.host: {"identitytoken": "refresh-alice"}}})
    pull(f"{registry.host}/team/app:v1", tmp_path / "layout", options=OPTS)
    assert [(r.user, r.method) for r in tokens.requests] == [("alice", "POST")]

    _write(auth_env["docker"], {"auths": {registry.host: {"auth": _b64("alice:"), "identitytoken": "stolen"}}})
    done = _fastpull("pull", f"{registry.host}/team/app:v1", "--layout", str(tmp_path / "refused"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"identity token for {registry.host} refused" in done.stderr and "stolen" not in done.stderr


def test_pull_picks_credentials_by_namespace_across_files(token_registry, auth_env, tmp_path):
    registry, tokens, _ = token_registry
    _write(auth_env["runtime"], {"auths": {f"{registry.host}/team": {"auth": _b64("alice:wonderland")}}})
    _write(auth_env["docker"], {"auths": {registry.host: {"auth": _b64("bob:builder")}}})
    pull(f"{registry.host}/team/app:v1", tmp_path / "layout", options=OPTS)
    pull(f"{registry.host}/other/app:v1", tmp_path / "layout", options=OPTS)
    assert [(r.user, r.scopes) for r in tokens.requests] == [
        ("alice", ("repository:team/app:pull",)), ("bob", ("repository:other/app:pull",))]


def test_login_checks_saves_and_logout_forgets(token_registry, auth_env, tmp_path):
    registry, tokens, image = token_registry
    docker = auth_env["docker"]
    _write(docker, {"auths": {"quay.io": {"auth": _b64("q:1")}}, "credHelpers": {"gcr.io": "gcloud"}})

    done = _fastpull("login", registry.host, "-u", "alice", "--password-stdin", stdin="wrong\n")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert registry.host in done.stderr and "credentials of 'alice'" in done.stderr and "wrong" not in done.stderr
    assert json.loads(docker.read_text())["auths"] == {"quay.io": {"auth": _b64("q:1")}}  # nothing written

    done = _fastpull("login", registry.host, "-u", "alice", "--password-stdin", stdin="wonderland\n")
    assert done.returncode == 0, done.stderr
    assert str(docker) in done.stdout and done.stderr == ""
    assert json.loads(docker.read_text()) == {
        "auths": {"quay.io": {"auth": _b64("q:1")}, registry.host: {"auth": _b64("alice:wonderland")}},
        "credHelpers": {"gcr.io": "gcloud"}}
    assert stat.S_IMODE(docker.stat().st_mode) == 0o600
    assert [r.scopes for r in tokens.requests] == [()]  # the login's check: a token for no scope

    done = _fastpull("pull", f"{registry.host}/team/app:v1", "--layout", str(tmp_path / "layout"))
    assert done.returncode == 0, done.stderr

    done = _fastpull("logout", registry.host)
    assert done.returncode == 0 and registry.host in done.stdout
    assert json.loads(docker.read_text())["auths"] == {"quay.io": {"auth": _b64("q:1")}}
    done = _fastpull("logout", registry.host)
    assert done.returncode == 0 and "not logged in" in done.stderr
    with pytest.raises(AuthError):
        pull(f"{registry.host}/team/app:v1", tmp_path / "anonymous", options=OPTS)


def test_login_writes_the_auth_file_asked_for(token_registry, auth_env, tmp_path, monkeypatch):
    registry, _, _ = token_registry
    chosen = tmp_path / "chosen.json"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(chosen))
    done = _fastpull("login", f"{registry.host}/team", "-u", "alice", "--password-stdin", stdin="wonderland")
    assert done.returncode == 0, done.stderr
    assert json.loads(chosen.read_text()) == {"auths": {f"{registry.host}/team": {"auth": _b64("alice:wonderland")}}}
    assert not auth_env["docker"].exists()
    pull(f"{registry.host}/team/app:v1", tmp_path / "layout", options=OPTS)  # REGISTRY_AUTH_FILE is read
    with pytest.raises(AuthError):  # the namespace's credentials only
        pull(f"{registry.host}/other/app:v1", tmp_path / "layout", options=OPTS)

    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    _write(auth_env["runtime"], {"auths": {registry.host: {"auth": _b64("bob:builder")}}})
    elsewhere = tmp_path / "elsewhere.json"
    done = _fastpull("login", registry.host, "-u", "alice", "--password-stdin", "--authfile", str(elsewhere),
                     stdin="wonderland")
    assert done.returncode == 0 and "pulls do not read" in done.stderr and elsewhere.exists()
    done = _fastpull("login", registry.host, "-u", "alice", "--password-stdin", stdin="wonderland")
    assert done.returncode == 0 and f"pulls read {auth_env['runtime']} first" in done.stderr


def test_login_to_a_basic_auth_registry(tmp_path, auth_env):
    with LocalRegistry(tmp_path / "storage", htpasswd={"bob": "builder"}) as registry:
        done = _fastpull("login", registry.host, "-u", "bob", "--password-stdin", stdin="nope")
        assert done.returncode == 1 and f"GET http://{registry.host}/v2/ -> HTTP 401" in done.stderr
        assert not auth_env["docker"].exists()
        done = _fastpull("login", f"http://{registry.host}/v2/", "-u", "bob", "--password-stdin", stdin="builder")
        assert done.returncode == 0, done.stderr
        assert json.loads(auth_env["docker"].read_text()) == {"auths": {registry.host: {"auth": _b64("bob:builder")}}}


def test_login_asks_on_the_terminal_without_echoing_the_password(token_registry, auth_env):
    registry, _, _ = token_registry
    primary, secondary = pty.openpty()
    try:
        # The pty is the login's controlling terminal (getpass talks to /dev/tty) and its stdio.
        proc = subprocess.Popen([sys.executable, "-m", "fastpull", "login", registry.host], stdin=secondary,
                                stdout=secondary, stderr=secondary, start_new_session=True,
                                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(secondary)
        secondary = -1
        terminal = _until(primary, b"Username: ")
        os.write(primary, b"alice\n")
        terminal += _until(primary, b"Password: ")
        os.write(primary, b"wonderland\n")
        while chunk := _read(primary):
            terminal += chunk
        proc.wait(timeout=60)
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    assert proc.returncode == 0, terminal
    assert b"alice" in terminal and b"wonderland" not in terminal  # the name echoes, the password does not
    assert b"login succeeded" in terminal
    assert json.loads(auth_env["docker"].read_text())["auths"][registry.host] == {"auth": _b64("alice:wonderland")}


def test_login_without_a_terminal_or_password_stdin_is_a_usage_error(auth_env):
    for args in (["-u", "alice"], [], ["--password-stdin"]):
        done = _fastpull("login", "127.0.0.1:9", *args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert not auth_env["docker"].exists()


def _until(fd: int, prompt: bytes) -> bytes:
    seen = b""
    while prompt not in seen:
        chunk = _read(fd)
        assert chunk, f"the terminal closed before {prompt!r}: {seen!r}"
        seen += chunk
    return seen


def _read(fd: int) -> bytes:
    """The next bytes from a pty, or b"" once the other side has closed (Linux raises EIO)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
