"""Measuring processes that leave descendants behind: adopt them (child subreaper), reap them and
count their CPU time and peak RSS."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

_ORPHAN_WAIT = 15.0
_subreaper = False


def become_subreaper() -> None:
    """Make this process adopt its orphaned descendants (e.g. a multiprocessing forkserver and
    its workers, which outlive the command that started them), so that they can be measured."""
    global _subreaper
    if not _subreaper:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        _subreaper = True


def children() -> list[int]:
    """PIDs whose parent is this process (zombies included)."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry.name))
    return found


def descendants(pids: set[int]) -> set[int]:
    """``pids`` and every process below them (children of each of their threads), now."""
    found: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += _children_of(pid)
    return found


def _children_of(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (cheaper than :func:`children`'s scan of /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += map(int, Path(task.path, "children").read_text().split())
    return found


def pss_mb(pids: set[int]) -> float:
    """Proportional set size of ``pids`` summed, MB (pages shared by n of them count 1/n each)."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # gone, or a zombie
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total / 1000


class PssSampler(threading.Thread):
    """Samples the summed PSS of a process tree every ``interval`` s until stopped; ``peak_mb``.

    The tree is ``pid`` and its descendants plus this process's children that are not in
    ``known`` (descendants re-parented here after their parent exited: see :func:`become_subreaper`).
    """

    def __init__(self, pid: int, known: set[int], interval: float = 0.05):
        super().__init__(daemon=True)
        self._roots = {pid}
        self._known = known
        self._interval = interval
        self._done = threading.Event()
        self.peak_mb = 0.0

    def run(self) -> None:
        while not self._done.wait(self._interval):
            roots = self._roots | (set(_children_of(os.getpid())) - self._known)
            self.peak_mb = max(self.peak_mb, pss_mb(descendants(roots)))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_mb


def reap_orphans(known: set[int]) -> tuple[float, float]:
    """Reap children that were not ours before a measurement (re-parented descendants): CPU s, RSS MB."""
    cpu = rss = 0.0
    deadline = time.monotonic() + _ORPHAN_WAIT
    while orphans := [pid for pid in children() if pid not in known]:
        for pid in orphans:
            try:
                got, _, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got:
                cpu += usage.ru_utime + usage.ru_stime
                rss += usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            for pid in orphans:  # descendants of the measured commands, still running: end them
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + _ORPHAN_WAIT
        time.sleep(0.01)
    return cpu, rss
