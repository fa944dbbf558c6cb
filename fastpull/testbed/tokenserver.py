"""A Docker token server for tests: issues the ES256 JWTs that distribution 2.8's token auth accepts,
for ``GET /token`` (the Docker token spec, Basic credentials) and ``POST /token`` (distribution's
OAuth2 spec: an identity token as a refresh token).

The registry is configured with ``auth: {token: {realm, service, issuer, rootcertbundle}}``
(``TokenServer.auth_config()``). It trusts a token whose ``x5c`` header carries a certificate
chaining to ``rootcertbundle``, whose ``iss`` and ``aud`` match ``issuer`` and ``service``, and
whose ``access`` claim grants the actions a request needs.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fastpull.testbed.tls import self_signed

AUTHENTICATED_ACTIONS = frozenset({"pull", "push"})


@dataclass(frozen=True)
class TokenRequest:
    """One request the server answered with a token: who asked (None: anonymous), for which
    scopes, with which method (``POST``: an OAuth2 refresh-token grant)."""

    user: str | None
    scopes: tuple[str, ...]
    method: str = "GET"


class TokenServer:
    """Serves ``/token`` on 127.0.0.1 from a thread; use as a context manager.

    ``users`` maps user names to passwords (checked with Basic auth), ``identity_tokens`` refresh
    tokens to user names; each user is granted pull and push, anonymous callers ``anonymous``
    (nothing by default). ``requests`` records every token issued over HTTP. The signing
    certificate is written under ``workdir``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        users: Mapping[str, str] | None = None,
        *,
        service: str = "fastpull-testbed-registry",
        issuer: str = "fastpull-testbed-tokens",
        lifetime: int = 300,
        anonymous: Iterable[str] = (),
        identity_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.users = dict(users or {})
        self.identity_tokens = dict(identity_tokens or {})
        self.service = service
        self.issuer = issuer
        self.lifetime = lifetime
        self.anonymous = frozenset(anonymous)
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self_signed(self._key, "fastpull testbed token signer", ca=True)
        self.cert_path = Path(workdir) / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        """The token endpoint's URL."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/token"

    def auth_config(self) -> dict[str, Any]:
        """The ``auth`` section of a distribution registry config that trusts this server."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def issue(self, scopes: Iterable[str], user: str | None = None) -> str:
        """A signed token for ``user`` granting what it may of ``scopes`` (``repository:<name>:<actions>``).

        No password is checked: tests may call this directly, e.g. to push.
        """
        allowed = AUTHENTICATED_ACTIONS if user is not None else self.anonymous
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = sorted(set(actions.split(",")) & allowed) if kind == "repository" else []
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        der = self._cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode("ascii")]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def start(self) -> Self:
        """Start serving; returns self."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="tokenserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for a ``GET`` of ``path``."""
        url = urlsplit(path)
        query = parse_qs(url.query)
        if url.path != "/token":
            return 404, {"error": "not found"}
        if query.get("service", [self.service]) != [self.service]:
            return 400, {"error": f"unknown service {query['service']}"}
        user: str | None = None
        if authorization is not None:
            scheme, _, encoded = authorization.partition(" ")
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                return 400, {"error": "malformed Basic credentials"}
            if scheme.lower() != "basic" or self.users.get(user) != password:
                return 401, {"error": "invalid credentials"}
        return self._grant(user, query.get("scope", []), "GET")

    def _answer_post(self, path: str, form: str) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for a ``POST`` of the form ``form`` to ``path``: the OAuth2
        refresh-token grant, whose errors are RFC 6749's (400 and an ``error`` code)."""
        fields = parse_qs(form)
        if urlsplit(path).path != "/token":
            return 404, {"error": "not found"}
        if fields.get("grant_type") != ["refresh_token"]:
            return 400, {"error": "unsupported_grant_type"}
        if fields.get("service") != [self.service] or len(fields.get("client_id", [])) != 1:
            return 400, {"error": "invalid_request", "error_description": "service and client_id are required"}
        user = self.identity_tokens.get(fields.get("refresh_token", [""])[0])
        if user is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown refresh token"}
        return self._grant(user, fields.get("scope", []), "POST")

    def _grant(self, user: str | None, scope_values: list[str], method: str) -> tuple[int, dict[str, Any]]:
        scopes = tuple(s for value in scope_values for s in value.split())
        token = self.issue(scopes, user)
        with self._lock:
            self.requests.append(TokenRequest(user, scopes, method))
        issued = dt.datetime.now(dt.UTC).isoformat()
        return 200, {"token": token, "access_token": token, "expires_in": self.lifetime, "issued_at": issued}


def _handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._reply(*server._answer(self.path, self.headers.get("Authorization")))

        def do_POST(self) -> None:
            form = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
            self._reply(*server._answer_post(self.path, form))

        def _reply(self, status: int, reply: dict[str, Any]) -> None:
            body = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="fastpull-testbed"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
