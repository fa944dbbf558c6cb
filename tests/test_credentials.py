"""Credentials end to end against real registries: identity tokens, namespaced keys, the containers
auth files."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastpull import FetchOptions, pull
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
