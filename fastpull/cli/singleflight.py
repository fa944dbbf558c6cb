"""Identical concurrent commands run once: the first leads, the others wait and share its outcome.

Go's ``singleflight`` across processes. Each distinct command (its ``key``) has a lock file and a
result file in a directory the caller owns (for ``fastpull pull``: the layout's ``.fastpull/pulls``):

- a process reads the result file (the last finished flight), then blocks on ``flock`` of the lock
  file; the kernel wakes it when the process in flight ends: no polling;
- if a new result appeared meanwhile, an identical command finished while this one waited, and its
  outcome (exit status and output, success or error) is this command's outcome too;
- otherwise this process leads: it runs the command and records the outcome atomically (write a
  temporary file, rename) before its lock is released. A leader that is killed, or whose work raises,
  records nothing, and the next waiter leads in its place.

A command that starts while an identical one is in flight thus joins it, like concurrent ``docker
pull``s of one image. The point is start-up cost: a waiting process imports only this module, so
twenty identical ``fastpull pull`` processes cost about one pull plus twenty interpreter start-ups.
Result files stay behind, one per distinct command (a few hundred bytes each), until
:func:`forget_finished` (``fastpull gc``) removes those of commands not in flight.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time

TYPE_CHECKING = False  # not typing's: a waiting process imports as little as it can
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypedDict

    class Outcome(TypedDict):
        """What a command produced: its exit status and output."""

        exit: int
        stdout: str
        stderr: str


def run_once(
    directory: str, key: str, lead: Callable[[], Outcome], on_wait: Callable[[], None] | None = None
) -> tuple[Outcome, int | None]:
    """Run ``lead`` unless an identical command (same ``key``) is in flight; then share its outcome.

    ``on_wait`` is called before blocking, if an identical command holds the lock.

    Returns the outcome and the pid of the process whose outcome it is (``None`` if this one led).
    Raises OSError, before ``lead`` runs, if the lock file cannot be made in ``directory``; exceptions
    from ``lead`` propagate unchanged.
    """
    os.makedirs(directory, exist_ok=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    result_path = os.path.join(directory, name + ".json")
    fd = os.open(os.path.join(directory, name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        seen = _read(result_path, key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        latest = _read(result_path, key)
        if latest is not None and (seen is None or latest["flight"] != seen["flight"]):
            return latest["outcome"], latest["pid"]
        outcome = lead()
        record = {"key": key, "flight": f"{os.getpid()}.{time.time_ns()}", "pid": os.getpid(), "outcome": outcome}
        tmp = f"{result_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, result_path)
        except OSError:  # e.g. a full disk: the outcome stands; whoever waits finds no result and leads
            _unlink(tmp)
        return outcome, None
    finally:
        os.close(fd)  # releases the lock: the waiters wake


def forget_finished(directory: str) -> int:
    """Remove the result and lock files of the commands in ``directory`` that are not in flight (whose
    lock is free); how many. A command that was waiting for one of them to finish finds no result
    and runs itself, as after a leader that recorded nothing."""
    forgotten = 0
    try:
        names = sorted(n.removesuffix(".lock") for n in os.listdir(directory) if n.endswith(".lock"))
    except FileNotFoundError:
        return 0
    for name in names:
        lock = os.path.join(directory, name + ".lock")
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in flight
        else:
            _unlink(os.path.join(directory, name + ".json"))
            _unlink(lock)
            forgotten += 1
        finally:
            os.close(fd)
    return forgotten


def _read(path: str, key: str) -> dict | None:
    """The recorded flight for ``key``, or None (none yet, unreadable, malformed, or another key's
    hash twin)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    outcome = record.get("outcome")
    well_formed = (
        isinstance(record.get("flight"), str) and isinstance(record.get("pid"), int)
        and isinstance(outcome, dict) and isinstance(outcome.get("exit"), int)
        and isinstance(outcome.get("stdout"), str) and isinstance(outcome.get("stderr"), str)
    )
    return record if well_formed else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
