"""A real CNCF distribution registry (``docker-registry`` 2.8) on loopback, and the requests it served.

The registry writes two logs: a JSON application log on stderr (``registry.log``), which records only
2xx/3xx responses, and a combined-format access log on stdout (``access.log``), which records every
request with its method, URI, status and the body bytes the handler wrote. :meth:`LocalRegistry.served`
parses the access log: for a ranged ``GET`` it counts exactly the bytes of the ``206`` body.

A client can receive the last byte of a response before the registry writes its access-log line, so
``served()`` first waits until no request is inside the logging handler, which it learns from the
goroutine dump of the registry's debug server (``http.debug.addr``, on a second free port).
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fastpull.errors import FastpullError

_INTERNAL_AGENT = "fastpull-testbed-internal"
"""User-Agent of the readiness probes, which served() leaves out."""

_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>\S+) (?P<uri>\S+) (?P<proto>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-)'
)
"""A combined-format line: ``HOST - USER [TIME] "METHOD URI PROTO" STATUS BYTES "REFERER" "AGENT"``."""

_LOGGING_FRAME = "handlers.loggingHandler.ServeHTTP"
"""Stack frame of a goroutine whose request is not yet in the access log (gorilla/handlers)."""

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Talks to the registry directly, whatever proxy the environment names."""


class LocalRegistryError(FastpullError):
    """The local registry process did not come up or stopped answering; the message quotes its log tail."""

    def __init__(self, url: str, why: str, log_tail: str):
        super().__init__(f"registry at {url}: {why}\n--- registry log tail ---\n{log_tail}")
        self.url = url
        self.log_tail = log_tail


@dataclass(frozen=True)
class ServedRequest:
    """One request from the access log; ``path`` has no query string; ``protocol`` is as Go names it
    (``HTTP/1.1``, ``HTTP/2.0``).

    ``bytes_written`` is the body the handler wrote: exact for complete responses (for a ``206``, the
    range); for a transfer the client aborted it may exceed what the client received (socket buffers);
    for a ``HEAD`` it counts an error body that Go then drops (a ``404`` shows 157).
    """

    method: str
    path: str
    status: int
    bytes_written: int
    protocol: str


class LocalRegistry:
    """A ``docker-registry serve`` process with filesystem storage in ``storage_dir``; a context manager.

    ``port=0`` picks a free port at the first start; a restart keeps the port and the storage, and
    ``served()`` keeps counting across restarts. ``htpasswd`` maps users to passwords (bcrypt, cost 4:
    the registry checks it on every request); ``auth`` is placed raw as the config's ``auth:`` section.
    ``extra_config`` is merged over the generated config. ``command_prefix`` is prepended to the launch
    command, e.g. ``["ip", "netns", "exec", "fpbench"]``; ``host`` must then be reachable from here.
    """

    def __init__(
        self,
        storage_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        htpasswd: dict[str, str] | None = None,
        auth: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        command_prefix: list[str] | None = None,
        log_level: str = "info",
        binary: str = "docker-registry",
        start_timeout: float = 10.0,
    ):
        if htpasswd is not None and auth is not None:
            raise ValueError("give htpasswd or auth, not both")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if start_timeout <= 0:
            raise ValueError("start_timeout must be greater than zero")
        self.storage_dir = Path(storage_dir).resolve()
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"{self.storage_dir.name}-logs-", dir=self.storage_dir.parent))
        self.access_log = self.log_dir / "access.log"
        self.registry_log = self.log_dir / "registry.log"
        self.config_path = self.log_dir / "config.yml"
        self._bind_host = host
        self._port = port
        self._debug_port = 0
        self._htpasswd = htpasswd
        self._auth = auth
        self._extra_config = extra_config or {}
        self._command_prefix = list(command_prefix or [])
        self._log_level = log_level
        self._binary = binary
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._served_offset = 0

    @property
    def host(self) -> str:
        """``HOST:PORT`` as clients reach it; known once the registry has started (or if a port was given)."""
        if self._port == 0:
            raise RuntimeError("registry port is chosen at start(); start it first")
        return f"{self._bind_host}:{self._port}"

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, or ``https://`` when ``extra_config`` sets ``http.tls``."""
        return f"{'https' if self._tls_certificate else 'http'}://{self.host}"

    @property
    def _tls_certificate(self) -> str | None:
        return self._extra_config.get("http", {}).get("tls", {}).get("certificate")

    @property
    def pid(self) -> int | None:
        """PID of the running registry process (of the command prefix, which usually execs it)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalRegistry:
        """Launch the registry and wait until ``GET /v2/`` answers 200 or 401."""
        if self._proc is not None:
            raise RuntimeError(f"registry at {self.url} is already started")
        pick_port = self._port == 0
        attempt = 0
        while True:
            attempt += 1
            if pick_port:
                self._port = _free_port()
            if pick_port or self._debug_port == 0:
                self._debug_port = _free_port()
            self._write_config()
            self._launch()
            try:
                self._wait_ready()
                return self
            except LocalRegistryError as e:
                self.stop()
                # Another process may have taken the port between the pick and the bind.
                if not pick_port or attempt == 3 or "address already in use" not in e.log_tail:
                    raise

    def stop(self) -> None:
        """Terminate the registry process and wait for it; a no-op if it is not running."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def served(self, *, wait: bool = True) -> list[ServedRequest]:
        """Requests served since the last ``clear_served()``, in the order the registry finished them.

        With ``wait`` (while the registry runs) it first waits, up to 10 s, until no request is in flight,
        so every request that has started is listed; without it, only those already logged.
        """
        lines, _ = self._read_access_log(wait)
        served = []
        for line in lines:
            m = _ACCESS_LINE.match(line)
            if m is None or line.endswith(f'"{_INTERNAL_AGENT}"'):
                continue
            size = m["size"]
            served.append(
                ServedRequest(
                    method=m["method"],
                    path=m["uri"].split("?", 1)[0],
                    status=int(m["status"]),
                    bytes_written=0 if size == "-" else int(size),
                    protocol=m["proto"],
                )
            )
        return served

    def clear_served(self) -> None:
        """Forget the requests served so far: ``served()`` will list only later ones."""
        _, self._served_offset = self._read_access_log(wait=True)

    def log_tail(self, max_lines: int = 20) -> str:
        """The last lines of the registry's application log (stderr)."""
        try:
            lines = self.registry_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-max_lines:])

    def _read_access_log(self, wait: bool) -> tuple[list[str], int]:
        """Complete access-log lines after the served() offset, and the offset just past them."""
        if wait and self.running:
            self._wait_idle()
        with open(self.access_log, "rb") as f:
            f.seek(self._served_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        return complete.decode("utf-8", "replace").splitlines(), self._served_offset + len(complete)

    def _wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is inside the access-logging handler, so every started request is logged.

        The registry's debug server dumps its goroutines (a stop-the-world snapshot); the access log line
        is written before ``loggingHandler.ServeHTTP`` returns.
        """
        debug = f"http://{self._bind_host}:{self._debug_port}"
        deadline = time.monotonic() + timeout
        while True:
            with _OPENER.open(f"{debug}/debug/pprof/goroutine?debug=2", timeout=5) as response:
                dump = response.read().decode("utf-8", "replace")
            in_flight = sum(_LOGGING_FRAME in stack for stack in dump.split("\n\n"))
            if in_flight == 0:
                return
            if time.monotonic() > deadline:
                raise LocalRegistryError(
                    self.url, f"{in_flight} request(s) still in flight after {timeout:g} s", self.log_tail()
                )
            time.sleep(0.005)

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": self._log_level, "formatter": "json", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
            },
            "http": {
                "addr": f"{self._bind_host}:{self._port}",
                "secret": secrets.token_hex(16),
                "debug": {"addr": f"{self._bind_host}:{self._debug_port}"},
            },
        }
        if self._htpasswd is not None:
            path = self.log_dir / "htpasswd"
            path.write_text(_htpasswd_file(self._htpasswd))
            config["auth"] = {"htpasswd": {"realm": "fastpull-testbed", "path": str(path)}}
        elif self._auth is not None:
            config["auth"] = self._auth
        return _merged(config, self._extra_config)

    def _write_config(self) -> None:
        # JSON is YAML: the registry reads it as is.
        self.config_path.write_text(json.dumps(self._config(), indent=2))

    def _launch(self) -> None:
        command = [*self._command_prefix, self._binary, "serve", str(self.config_path)]
        with open(self.access_log, "ab") as out, open(self.registry_log, "ab") as err:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        last = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise LocalRegistryError(self.url, f"did not start: exit status {code}", self.log_tail())
            try:
                status = _probe(self.url + "/v2/", self._tls_certificate)
                if status in (200, 401):
                    return
                last = f"GET /v2/ answered HTTP {status}"
            except OSError as e:
                last = f"GET /v2/ failed: {e}"
            if time.monotonic() > deadline:
                why = f"did not start: not ready after {self._start_timeout:g} s ({last})"
                raise LocalRegistryError(self.url, why, self.log_tail())
            time.sleep(0.02)


def _probe(url: str, ca_file: str | None = None) -> int:
    """Status of an internal GET (not listed by served())."""
    request = urllib.request.Request(url, headers={"User-Agent": _INTERNAL_AGENT})
    opener = _OPENER
    if ca_file:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file))
        )
    try:
        with opener.open(request, timeout=2) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def _free_port() -> int:
    """A TCP port free on every local address (also for a host that lives in another network namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _htpasswd_file(users: dict[str, str]) -> str:
    import bcrypt  # only registries with htpasswd auth need it

    lines = []
    for user, password in users.items():
        if not user or ":" in user:
            raise ValueError(f"invalid htpasswd user name {user!r}")
        digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"{user}:{digest}\n")
    return "".join(lines)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged over it, recursing into nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out
