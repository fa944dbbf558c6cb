"""parse_reference, Reference and its canonical form."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fastpull.errors import InvalidReference
from fastpull.oci.reference import Reference, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("library/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("bitnami/redis:7", "docker.io", "bitnami/redis", "7", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("index.docker.io/library/ubuntu:x", "docker.io", "library/ubuntu", "x", None),
        ("index.docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        (f"ubuntu@{D}", "docker.io", "library/ubuntu", None, D),
        (f"ubuntu:22.04@{D}", "docker.io", "library/ubuntu", "22.04", D),
        ("localhost/foo", "localhost", "foo", "latest", None),
        ("localhost:5000/foo/bar:v1", "localhost:5000", "foo/bar", "v1", None),
        ("127.0.0.1:5000/a/b/c", "127.0.0.1:5000", "a/b/c", "latest", None),
        ("10.1.2.3/img", "10.1.2.3", "img", "latest", None),
        ("[::1]:5000/img:t", "[::1]:5000", "img", "t", None),
        ("ghcr.io/org/img@" + D, "ghcr.io", "org/img", None, D),
        ("quay.io/a__b/c-d.e_f:T_1.x-y", "quay.io", "a__b/c-d.e_f", "T_1.x-y", None),
        ("Registry/img", "Registry", "img", "latest", None),  # upper case: a host, as Docker has it
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),  # a tag, as Docker has it
        ("a---b/c", "docker.io", "a---b/c", "latest", None),
    ],
)
def test_reference_parses(text: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert ref == Reference(registry, repository, tag, digest)
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Ubuntu", "lowercase"),
        ("ghcr.io/Org/img", "lowercase"),
        ("img:", "invalid tag"),
        ("img:-x", "invalid tag"),
        ("img:" + "x" * 129, "invalid tag"),
        ("img@sha256:abc", "64 lowercase hex"),
        ("img@sha256:" + "AB" * 32, "64 lowercase hex"),
        ("img@sha512:" + "ab" * 64, "unsupported digest algorithm"),
        ("img@latest", "malformed digest"),
        ("img@", "malformed digest"),
        ("a//b", "component ''"),
        ("/img", "component ''"),
        ("img/", "component ''"),
        ("a/_b", "component '_b'"),
        ("a/b-", "component 'b-'"),
        ("a/b..c", "component 'b..c'"),
        ("-host.io/img", "invalid registry host"),
        ("host.io:99999/img", "port out of range"),
        ("host.io:0/img", "port out of range"),
        ("host.io:/img", "invalid registry host"),
        ("ab" * 32, "image ID"),
        ("docker.io/" + "a" * 250, "longer than 255"),
        ("img name", "component 'img name'"),
    ],
)
def test_reference_rejects(text: str, why: str) -> None:
    with pytest.raises(InvalidReference, match=why) as e:
        parse_reference(text)
    assert e.value.reference == text


def test_reference_properties() -> None:
    hub = parse_reference("ubuntu")
    assert (hub.name, hub.api_host, str(hub)) == (
        "docker.io/library/ubuntu",
        "registry-1.docker.io",
        "docker.io/library/ubuntu:latest",
    )
    local = parse_reference(f"localhost:5000/x:1@{D}")
    assert (local.name, local.api_host, str(local)) == ("localhost:5000/x", "localhost:5000", f"localhost:5000/x:1@{D}")


_component = st.from_regex(r"\A[a-z0-9]{1,5}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,5}){0,2}\Z")
_host = st.one_of(
    st.from_regex(r"\A[a-z0-9]{1,8}(?:\.[a-z0-9]{1,8}){1,2}\Z"),
    st.just("localhost"),
    st.from_regex(r"\A(?:[0-9]{1,3}\.){3}[0-9]{1,3}\Z"),
    st.just("[::1]"),
)
_port = st.one_of(st.none(), st.integers(1, 65535))
_tag = st.one_of(st.none(), st.from_regex(r"\A\w[\w.-]{0,20}\Z", alphabet=st.characters(max_codepoint=127)))
_digest = st.one_of(st.none(), st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()))


@given(st.one_of(st.none(), _host), _port, st.lists(_component, min_size=1, max_size=3), _tag, _digest)
def test_reference_round_trips(
    host: str | None, port: int | None, path: list[str], tag: str | None, digest: str | None
) -> None:
    assume(host is not None or len(path) == 1 or "." not in path[0])  # else path[0] reads as a host
    text = "/".join(path)
    if host is not None:
        text = f"{host}{f':{port}' if port else ''}/{text}"
    text += (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = parse_reference(text)
    assert parse_reference(str(ref)) == ref
    assert ref.digest == digest
    assert ref.tag == (tag or (None if digest else "latest"))
