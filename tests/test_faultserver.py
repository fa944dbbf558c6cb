"""Tests of the fault-injecting registry itself: each knob does what it says, and nothing more."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pycurl
import pytest
from faultserver import CORRUPT_STRIDE, FaultRegistry
from hypothesis import given, settings
from hypothesis import strategies as st

DATA = bytes(range(256)) * 800 + b"tail"  # 204,804 bytes: spans several 64 KiB pieces


@pytest.fixture
def reg() -> Iterator[FaultRegistry]:
    with FaultRegistry() as r:
        yield r


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultRegistry, str, str]]:
    """A registry without faults serving ``DATA`` from memory and from a file."""
    path = tmp_path_factory.mktemp("blobs") / "blob"
    path.write_bytes(DATA[::-1])
    with FaultRegistry() as r:
        yield r, r.add_blob(DATA), r.add_blob(path)


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: int = 0


def curl(url: str, *, byte_range: str | None = None, headers: tuple[str, ...] = (), follow: bool = False, timeout_ms: int = 5000) -> Reply:
    """One pycurl GET; ``error`` is the curl error code (0 on success)."""
    reply = Reply()
    chunks: list[bytes] = []

    def on_header(line: bytes) -> None:
        text = line.decode("latin-1").strip()
        if text.startswith("HTTP/"):
            reply.headers.clear()  # a new response after a redirect
        elif ":" in text:
            name, value = text.split(":", 1)
            reply.headers[name.strip().lower()] = value.strip()

    c = pycurl.Curl()
    c.setopt(pycurl.URL, url)
    c.setopt(pycurl.WRITEFUNCTION, chunks.append)
    c.setopt(pycurl.HEADERFUNCTION, on_header)
    c.setopt(pycurl.HTTPHEADER, list(headers))
    c.setopt(pycurl.FOLLOWLOCATION, follow)
    c.setopt(pycurl.TIMEOUT_MS, timeout_ms)
    if byte_range is not None:
        c.setopt(pycurl.RANGE, byte_range)
    try:
        c.perform()
    except pycurl.error as e:
        reply.error = e.args[0]
    reply.status = c.getinfo(pycurl.RESPONSE_CODE)
    reply.body = b"".join(chunks)
    c.close()
    return reply


def get(conn: http.client.HTTPConnection, path: str, **headers: str) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    return resp, resp.read()


def connect(r: FaultRegistry) -> closing[http.client.HTTPConnection]:
    host, port = r.host.rsplit(":", 1)
    return closing(http.client.HTTPConnection(host, int(port), timeout=5))


@settings(max_examples=150, deadline=None)
@given(
    which=st.sampled_from([1, 2]),
    kind=st.sampled_from(["a-b", "a-", "-n"]),
    a=st.integers(0, len(DATA) + 3),
    n=st.integers(0, len(DATA) + 3),
)
def test_ranges_exact(shared: tuple[FaultRegistry, str, str], which: int, kind: str, a: int, n: int) -> None:
    r, digest = shared[0], shared[which]
    data = DATA if which == 1 else DATA[::-1]
    spec = {"a-b": f"{a}-{a + n}", "a-": f"{a}-", "-n": f"-{n}"}[kind]
    with connect(r) as conn:
        resp, body = get(conn, f"/v2/any/repo/blobs/{digest}", Range=f"bytes={spec}")
    if (kind == "-n" and n == 0) or (kind != "-n" and a >= len(data)):
        assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(data)}"
        return
    start = max(0, len(data) - n) if kind == "-n" else a
    end = min(len(data), a + n + 1) if kind == "a-b" else len(data)
    assert resp.status == 206 and body == data[start:end]
    assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert resp.headers["Accept-Ranges"] == "bytes" and resp.headers["Docker-Content-Digest"] == digest


def test_keepalive_manifests_and_unknown(reg: FaultRegistry) -> None:
    body = json.dumps({"schemaVersion": 2}).encode()
    mt = "application/vnd.oci.image.manifest.v1+json"
    digest = reg.add_manifest("lib/app", "v1", body, mt)
    with connect(reg) as conn:
        assert get(conn, "/v2/")[0].status == 200
        for ref in ("v1", digest):
            resp, got = get(conn, f"/v2/lib/app/manifests/{ref}")
            assert (resp.status, got, resp.headers["Content-Type"], resp.headers["Docker-Content-Digest"]) == (200, body, mt, digest)
        conn.request("HEAD", "/v2/lib/app/manifests/v1")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["Content-Length"] == str(len(body)) and resp.read() == b""
        assert get(conn, "/v2/other/manifests/v1")[0].status == 404
        resp, got = get(conn, f"/v2/lib/app/blobs/sha256:{'0' * 64}")
        assert resp.status == 404 and json.loads(got)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert len({r.client_port for r in reg.log}) == 1  # one connection for all seven requests
    assert [r.status for r in reg.requests_for(digest)] == [200, 200, 200]


def test_file_blob_streams_in_pieces(reg: FaultRegistry, tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(bytes(range(256)) * (32 * 1024))  # 8 MiB
    digest = reg.add_blob(path)
    h = hashlib.sha256()
    c = pycurl.Curl()
    c.setopt(pycurl.URL, f"{reg.url}/v2/r/blobs/{digest}")
    c.setopt(pycurl.WRITEFUNCTION, h.update)
    tracemalloc.start()
    try:
        c.perform()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        c.close()
    assert "sha256:" + h.hexdigest() == digest and reg.bytes_served(digest) == 8 << 20
    assert peak < 1 << 20


def test_ignore_range(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.ignore_range(digest)
    reply = curl(f"{reg.url}/v2/r/blobs/{digest}", byte_range="100-199")
    assert (reply.status, reply.body, "content-range" in reply.headers) == (200, DATA, False)
    reg.ignore_range(digest, False)
    assert curl(f"{reg.url}/v2/r/blobs/{digest}", byte_range="100-199").body == DATA[100:200]


def test_corrupt_flips_bytes_keeps_length(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.corrupt(digest)
    body = curl(f"{reg.url}/v2/r/blobs/{digest}").body
    assert len(body) == len(DATA)
    assert [i for i in range(len(DATA)) if body[i] != DATA[i]] == list(range(0, len(DATA), CORRUPT_STRIDE))
    part = curl(f"{reg.url}/v2/r/blobs/{digest}", byte_range=f"{CORRUPT_STRIDE - 1}-{CORRUPT_STRIDE}").body
    assert part == bytes([DATA[CORRUPT_STRIDE - 1], DATA[CORRUPT_STRIDE] ^ 0xFF])


def test_fail_first_with_retry_after(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.fail_first(digest, 2, status=429, retry_after=3)
    with connect(reg) as conn:
        for _ in range(2):
            resp, body = get(conn, f"/v2/r/blobs/{digest}")
            assert (resp.status, resp.headers["Retry-After"]) == (429, "3")
            assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
        resp, body = get(conn, f"/v2/r/blobs/{digest}")
        assert resp.status == 200 and body == DATA
    assert [r.status for r in reg.requests_for(digest)] == [429, 429, 200]
    assert len({r.client_port for r in reg.log}) == 1  # errors keep the connection alive


def test_reset_first_closes_mid_body(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.reset_first(digest, 1, after=70_000)
    url = f"{reg.url}/v2/r/blobs/{digest}"
    first = curl(url, byte_range="1000-")
    assert (first.status, first.error) == (206, pycurl.E_RECV_ERROR)  # reset by peer, not a clean EOF
    assert first.body == DATA[1000:71_000]
    second = curl(url, byte_range=f"{1000 + len(first.body)}-")
    assert second.error == 0 and first.body + second.body == DATA[1000:]
    assert [r.bytes_sent for r in reg.requests_for(digest)] == [70_000, len(DATA) - 71_000]


def test_truncate_first_closes_in_order_mid_body(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.truncate_first(digest, 1, after=70_000)
    url = f"{reg.url}/v2/r/blobs/{digest}"
    first = curl(url, byte_range="1000-")
    assert (first.status, first.error, first.body) == (206, pycurl.E_PARTIAL_FILE, DATA[1000:71_000])  # a clean EOF
    assert curl(url).body == DATA


@pytest.mark.parametrize("delta", [100, -100])
def test_wrong_length_sends_the_true_body_then_closes(reg: FaultRegistry, delta: int) -> None:
    digest = reg.add_blob(DATA)
    reg.wrong_length(digest, delta, first=1)
    host, port = reg.host.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET /v2/r/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reply = b""
        while piece := sock.recv(65536):  # until the server closes
            reply += piece
    head, _, body = reply.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(DATA) + delta}".encode() in head and body == DATA
    assert curl(f"{reg.url}/v2/r/blobs/{digest}").body == DATA  # only the first GET lies


def test_corrupt_one_offset_in_the_first_responses_that_carry_it(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.corrupt(digest, offset=150_000, first=1)
    url = f"{reg.url}/v2/r/blobs/{digest}"
    assert curl(url, byte_range="0-99999").body == DATA[:100_000]  # does not carry it: not counted
    body = curl(url, byte_range="100000-").body
    assert [i for i in range(len(body)) if body[i] != DATA[100_000 + i]] == [50_000]
    assert curl(url).body == DATA


def test_expire_token_after_the_nth_get(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.require_bearer("t0")
    reg.expire_token_after(digest, 2)
    path = f"/v2/r/blobs/{digest}"
    with connect(reg) as conn:
        statuses = [get(conn, path, Authorization="Bearer t0")[0].status for _ in range(3)]
    assert statuses == [200, 200, 401] and reg.token not in (None, "t0")
    assert [r.arrived for r in reg.log] == sorted(r.arrived for r in reg.log) and reg.log[0].arrived > 0


def test_redirect_drops_auth_on_other_host(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.require_bearer("secret")
    with FaultRegistry("127.0.0.2") as cdn:
        reg.redirect_to(digest, cdn)
        reply = curl(f"{reg.url}/v2/r/blobs/{digest}", headers=("Authorization: Bearer secret",), follow=True, byte_range="0-9")
        assert (reply.status, reply.body) == (206, DATA[:10])
        (origin,) = reg.requests_for(digest)
        (served,) = cdn.requests_for(digest)
    assert (origin.status, origin.authorization, origin.bytes_sent) == (307, True, 2)
    assert (served.status, served.authorization, served.range) == (206, False, "bytes=0-9")
    assert cdn.host.startswith("127.0.0.2:")


def test_bearer_challenge_token_and_expiry(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.require_bearer("t0")
    path = f"/v2/lib/app/blobs/{digest}"
    with connect(reg) as conn:
        resp, _ = get(conn, path)
        challenge = dict(re.findall(r'(\w+)="([^"]*)"', resp.headers["WWW-Authenticate"]))
        assert resp.status == 401 and challenge == {
            "realm": f"{reg.url}/token",
            "service": "faultregistry",
            "scope": "repository:lib/app:pull",
        }
        token = json.loads(get(conn, f"/token?service=faultregistry&scope={challenge['scope']}")[1])["token"]
        assert get(conn, path, Authorization=f"Bearer {token}")[0].status == 200
        reg.expire_token()
        assert get(conn, path, Authorization=f"Bearer {token}")[0].status == 401
        fresh = json.loads(get(conn, "/token")[1])["token"]
        assert fresh != token and get(conn, path, Authorization=f"Bearer {fresh}")[0].status == 200
    assert reg.token_requests == 2


def test_slow_only_at_given_starts(reg: FaultRegistry) -> None:
    digest = reg.add_blob(DATA)
    reg.slow(digest, 400_000, ranges={0})
    url = f"{reg.url}/v2/r/blobs/{digest}"
    began = time.monotonic()
    assert curl(url, byte_range="0-99999").body == DATA[:100_000]
    slowed = time.monotonic() - began
    began = time.monotonic()
    assert curl(url, byte_range="100000-199999").body == DATA[100_000:200_000]
    fast = time.monotonic() - began
    assert slowed > 0.24 and fast < 0.15  # 100 kB at 400 kB/s vs unthrottled


def test_stall_then_prompt_stop() -> None:
    r = FaultRegistry()
    digest = r.add_blob(DATA)
    r.stall_after(digest, 1000, first=1)
    url = f"{r.url}/v2/r/blobs/{digest}"
    stalled = curl(url, timeout_ms=300)
    assert (stalled.error, stalled.body) == (pycurl.E_OPERATION_TIMEDOUT, DATA[:1000])
    assert curl(url).body == DATA  # only the first GET stalls
    r.stall_after(digest, 10)
    trickled = r.add_blob(DATA[::-1])
    r.slow(trickled, 1000)
    host, port = r.host.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port)), timeout=2) for _ in range(3)]
    for sock, path in zip(socks, [f"/v2/r/blobs/{digest}", f"/v2/r/blobs/{trickled}", "/v2/"]):  # the last then idles
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    began = time.monotonic()
    r.stop()
    assert time.monotonic() - began < 0.5
    for sock in socks:
        while sock.recv(65536):
            pass  # until EOF: stop() closed the stalled, the trickling and the idle connection
        sock.close()
    assert r.bytes_served(digest) == len(DATA) + 1000 + 10
