"""The daemon's parts without a server: Range arithmetic, which upstream a path names, the
provenance ledger across restarts, and the runtime configuration it prints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.errors import InvalidReference
from fastpull.serve.api import ApiError, _range
from fastpull.serve.config import snippets
from fastpull.serve.ledger import Ledger
from fastpull.serve.mirror import Upstream, route

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("header, expected", [
    (None, (0, 100)),
    ("bytes=0-9", (0, 10)),
    ("bytes=10-", (10, 100)),
    ("bytes=90-200", (90, 100)),
    ("bytes=-10", (90, 100)),
    ("bytes=-500", (0, 100)),
    ("bytes=0-0,5-6", (0, 100)),  # several ranges: the whole body, as RFC 9110 allows
    ("items=0-5", (0, 100)),
    ("bytes=x-5", (0, 100)),
])
def test_range(header, expected):
    assert _range(header, 100, "blob") == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-160", "bytes=-0", "bytes=9-3"])
def test_unsatisfiable_range(header):
    with pytest.raises(ApiError) as e:
        _range(header, 100, "blob")
    assert e.value.status == 416 and e.value.headers == {"Content-Range": "bytes */100"}


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(1, 5_000))
def test_a_satisfiable_range_is_inside_the_body(first, last, size):
    try:
        start, end = _range(f"bytes={first}-{last}", size, "blob")
    except ApiError:
        assert first >= size or first > last
        return
    assert (start, end) == (first, min(last + 1, size))


def test_route():
    assert route("library/nginx", None, "docker.io") == Upstream("docker.io", "library/nginx")
    assert route("nginx", None, "docker.io") == Upstream("docker.io", "library/nginx")
    assert route("team/app", "ghcr.io", "docker.io") == Upstream("ghcr.io", "team/app")
    assert route("quay.io/org/app", None, "docker.io") == Upstream("quay.io", "org/app")
    assert route("localhost:5000/app", None, "docker.io") == Upstream("localhost:5000", "app")
    with pytest.raises(InvalidReference):
        route("Team/app", None, "docker.io")
    with pytest.raises(InvalidReference):
        route("app", "bad host!", "docker.io")


def test_ledger_is_read_back_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.record("r", "a/b", DIGEST, 5, "application/vnd.oci.image.manifest.v1+json")
    ledger.record_tag("r", "a/b", "v1", DIGEST)
    ledger.close()
    with open(path, "a") as f:
        f.write('{"registry": "r", "repos')  # a crash in the middle of a write
    again = Ledger(path)
    assert again.size("r", "a/b", DIGEST) == 5 and again.size("r", "other", DIGEST) is None
    assert again.media_type(DIGEST) == "application/vnd.oci.image.manifest.v1+json"
    assert again.tag("r", "a/b", "v1").digest == DIGEST
    again.record("r", "other", DIGEST, 5)
    again.close()
    assert Ledger(path).size("r", "other", DIGEST) == 5


def test_runtime_configuration():
    containerd = snippets("containerd", "127.0.0.1:5050", ["docker.io", "quay.io"], "docker.io")
    assert 'config_path = "/etc/containerd/certs.d"' in containerd
    assert '# /etc/containerd/certs.d/docker.io/hosts.toml\nserver = "https://registry-1.docker.io"' in containerd
    assert '[host."http://127.0.0.1:5050"]\n  capabilities = ["pull", "resolve"]' in containerd
    crio = snippets("crio", "127.0.0.1:5050", ["docker.io", "quay.io"], "docker.io")
    assert 'location = "127.0.0.1:5050"\n' in crio and 'location = "127.0.0.1:5050/quay.io"' in crio
    assert '"registry-mirrors": [\n    "http://127.0.0.1:5050"' in snippets("docker", "127.0.0.1:5050", ["docker.io"],
                                                                        "docker.io")
    with pytest.raises(ValueError, match="docker.io only"):
        snippets("docker", "127.0.0.1:5050", ["quay.io"], "docker.io")


def _config_toml(text: str) -> dict:
    """The config.toml part of a containerd snippet (before the first hosts.toml), parsed."""
    import tomllib

    return tomllib.loads(text.split("# /etc/containerd/certs.d/")[0])


def test_containerd_configuration_for_the_snapshotter():
    two = _config_toml(snippets("containerd", "127.0.0.1:5050", ["docker.io"], "docker.io", "/run/fp.sock",
                                "linux/arm64/v8"))
    assert two["proxy_plugins"]["fastpull"] == {
        "type": "snapshot", "address": "/run/fp.sock", "exports": {"enable_remote_snapshot_annotations": "true"}}
    assert [(u["snapshotter"], u["platform"]) for u in two["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
            ] == [("overlayfs", "linux/arm64/v8"), ("fastpull", "linux/arm64/v8")]  # overlayfs kept
    images = two["plugins"]["io.containerd.cri.v1.images"]
    assert images["snapshotter"] == "fastpull" and "disable_snapshot_annotations" not in images
    assert set(images["registry"]) == {"config_path"}  # mirrors, configs or auths: CRI's local pull path
    one = _config_toml(snippets("containerd1", "127.0.0.1:5050", ["docker.io"], "docker.io", "/run/fp.sock"))
    assert one["plugins"]["io.containerd.grpc.v1.cri"]["containerd"] == {
        "snapshotter": "fastpull", "disable_snapshot_annotations": False}
    assert one["proxy_plugins"]["fastpull"] == {"type": "snapshot", "address": "/run/fp.sock"}
    mirror_only = _config_toml(snippets("containerd", "127.0.0.1:5050", ["docker.io"], "docker.io"))
    assert "proxy_plugins" not in mirror_only and "snapshotter" not in mirror_only["plugins"][
        "io.containerd.cri.v1.images"]
    with pytest.raises(ValueError, match="containerd's"):
        snippets("crio", "127.0.0.1:5050", ["docker.io"], "docker.io", "/run/fp.sock")


def test_the_shipped_unit_and_daemonset_run_a_valid_command():
    import re
    import shlex
    from pathlib import Path

    from fastpull.cli.main import build_parser

    deploy = Path(__file__).parent.parent / "deploy"
    unit = (deploy / "fastpull-serve.service").read_text()
    exec_start = shlex.split(re.search(r"^ExecStart=((?:.*\\\n)*.*)$", unit, re.M)[1].replace("\\\n", " "))
    daemonset = (deploy / "daemonset.yaml").read_text()
    args = re.search(r"args: \[(.*?)\]", daemonset, re.S)[1]
    for argv in (exec_start[1:], [a.strip().strip('"') for a in args.split(",")]):
        parsed = build_parser().parse_args(argv)
        assert parsed.command == "serve" and parsed.listen == ("127.0.0.1", 5050)
        assert str(parsed.snapshotter) == "/run/fastpull/snapshotter.sock"
        assert (str(parsed.cri_proxy), str(parsed.cri_upstream)) == (
            "/run/fastpull/cri.sock", "/run/containerd/containerd.sock")


def test_the_ledger_grows_with_what_is_pulled_not_how_often(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    for _ in range(100):
        ledger.record("r", "a/b", DIGEST, 5)
        ledger.record_tag("r", "a/b", "v1", DIGEST)
    size = path.stat().st_size
    ledger.record_tag("r", "a/b", "v1", "sha256:" + "1" * 64)  # the tag moved: that is news
    ledger.close()
    assert size < 300 and path.stat().st_size > size
    assert Ledger(path).tag("r", "a/b", "v1").digest == "sha256:" + "1" * 64
