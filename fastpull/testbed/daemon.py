"""``fastpull serve`` as a child process, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

_READY = re.compile(r"serving on http://(\S+):(\d+) ")


class ServeProcess:
    """Runs ``fastpull serve --store STORE --listen 127.0.0.1:0 --upstream UPSTREAM ARGS...``; a
    context manager. Ready once the daemon logs the address it listens on; its stderr is kept."""

    def __init__(self, store: Path, upstream: str, *args: str, env: dict[str, str] | None = None,
                 start_timeout: float = 30.0):
        self.command = [sys.executable, "-m", "fastpull", "serve", "--store", str(store),
                        "--listen", "127.0.0.1:0", "--upstream", upstream, *args]
        self._env = env
        self._start_timeout = start_timeout
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self.host = ""
        """``127.0.0.1:PORT`` once started."""
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log(self) -> str:
        """Everything the daemon wrote on stderr so far."""
        return "".join(self._lines)

    def start(self) -> ServeProcess:
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(self._env or {})})
        self._reader.start()
        if not self._ready.wait(self._start_timeout) or not self.host:
            self.stop()
            raise RuntimeError(f"fastpull serve did not start: {self.log[-2000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait; the exit status. Then :attr:`log` holds every line the daemon wrote."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout)  # to the end of stderr: the exit can come before its last lines are read
        return self.proc.returncode

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.append(line)
            if not self._ready.is_set() and (m := _READY.search(line)):
                self.host = f"{m[1]}:{m[2]}"
                self._ready.set()
        self._ready.set()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
