"""Measuring processes that leave descendants behind: adopt them (child subreaper), reap them and
count their CPU time and peak RSS."""

from __future__ import annotations

import contextlib
import os
import signal
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
