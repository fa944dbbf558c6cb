"""Identical concurrent commands run once (fastpull.cli.singleflight).

flock locks belong to open file descriptions, so threads that each open the lock file contend like
processes do. Tests learn that a waiter is blocked from /proc/locks, never from a sleep.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import blocked_on, wait_until

from fastpull.cli.singleflight import forget_finished, run_once


def outcome(text: str, code: int = 0) -> dict:
    return {"exit": code, "stdout": text, "stderr": ""}


class Flight:
    """``run_once`` in a thread; its lead() waits for ``release`` and counts that it ran."""

    def __init__(self, directory: Path, key: str, result: dict | None = None, fail: bool = False):
        self.release = threading.Event()
        self.led = False
        self.waited = False
        self.returned: tuple[dict, int | None] | None = None
        self.error: BaseException | None = None

        def lead() -> dict:
            self.led = True
            assert self.release.wait(10)
            if fail:
                raise RuntimeError("the work itself failed")
            return result or outcome(f"led by {key}")

        def run() -> None:
            try:
                self.returned = run_once(str(directory), key, lead, on_wait=lambda: setattr(self, "waited", True))
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.error = e

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def join(self) -> tuple[dict, int | None]:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error
        assert self.returned is not None
        return self.returned


def test_waiters_share_the_outcome_of_the_flight_in_progress(tmp_path):
    leader = Flight(tmp_path, "pull x", outcome("pulled x\n"))
    wait_until(lambda: leader.led, "the first command leads")
    waiters = [Flight(tmp_path, "pull x") for _ in range(3)]
    wait_until(lambda: blocked_on(tmp_path) == 3, "three identical commands wait")
    assert leader.join() == (outcome("pulled x\n"), None)
    for w in waiters:
        assert w.join() == (outcome("pulled x\n"), os.getpid())
        assert not w.led and w.waited
    assert not leader.waited


def test_an_error_outcome_is_shared_too(tmp_path):
    leader = Flight(tmp_path, "pull y", outcome("", 1) | {"stderr": "fastpull: registry down\n"})
    wait_until(lambda: leader.led, "the first command leads")
    waiter = Flight(tmp_path, "pull y")
    wait_until(lambda: blocked_on(tmp_path) == 1, "the second command waits")
    leader.join()
    shared, pid = waiter.join()
    assert shared["exit"] == 1 and shared["stderr"] == "fastpull: registry down\n" and pid == os.getpid()


def test_a_command_after_the_flight_leads_again(tmp_path):
    assert run_once(str(tmp_path), "pull z", lambda: outcome("first\n")) == (outcome("first\n"), None)
    assert run_once(str(tmp_path), "pull z", lambda: outcome("second\n")) == (outcome("second\n"), None)


def test_different_commands_do_not_wait_for_each_other(tmp_path):
    a = Flight(tmp_path, "pull a")
    wait_until(lambda: a.led, "the first command leads")
    assert run_once(str(tmp_path), "pull b", lambda: outcome("b\n")) == (outcome("b\n"), None)
    assert a.join() == (outcome("led by pull a"), None)


def test_forget_finished_removes_the_records_of_commands_not_in_flight(tmp_path):
    run_once(str(tmp_path), "pull done", lambda: outcome("done\n"))
    flying = Flight(tmp_path, "pull flying")
    wait_until(lambda: flying.led, "a command is in flight")
    assert forget_finished(str(tmp_path)) == 1
    assert len(list(tmp_path.glob("*.lock"))) == 1 and not list(tmp_path.glob("*.json"))
    assert flying.join() == (outcome("led by pull flying"), None)
    assert forget_finished(str(tmp_path)) == 1 and not any(tmp_path.iterdir())
    assert forget_finished(str(tmp_path / "none")) == 0


def test_a_leader_whose_work_raises_records_nothing_and_a_waiter_leads(tmp_path):
    leader = Flight(tmp_path, "pull w", fail=True)
    wait_until(lambda: leader.led, "the first command leads")
    waiter = Flight(tmp_path, "pull w", outcome("retried\n"))
    wait_until(lambda: blocked_on(tmp_path) == 1, "the second command waits")
    leader.release.set()
    with pytest.raises(RuntimeError, match="the work itself failed"):
        leader.join()
    wait_until(lambda: waiter.led, "the waiter leads in the failed leader's place")
    assert waiter.join() == (outcome("retried\n"), None)


_KILLED_LEADER = """
import sys, time
from fastpull.cli.singleflight import forget_finished, run_once
def lead():
    print("leading", flush=True)
    time.sleep(60)
run_once(sys.argv[1], "pull k", lead)
"""


def test_a_killed_leader_records_nothing_and_a_waiter_leads(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_LEADER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "leading\n"
        waiter = Flight(tmp_path, "pull k", outcome("after the kill\n"))
        wait_until(lambda: blocked_on(tmp_path) == 1, "the second command waits")
        os.kill(proc.pid, signal.SIGKILL)
        assert waiter.join() == (outcome("after the kill\n"), None)
        assert waiter.led
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_result_recorded_under_another_key_is_not_adopted(tmp_path):
    run_once(str(tmp_path), "pull one", lambda: outcome("one\n"))
    (lock,) = tmp_path.glob("*.lock")
    (result,) = tmp_path.glob("*.json")
    fd = os.open(lock, os.O_RDWR)  # a command whose key hashes alike is in flight
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        waiter = Flight(tmp_path, "pull one", outcome("mine\n"))
        wait_until(lambda: blocked_on(tmp_path) == 1, "the command waits")
        result.write_text(json.dumps({"key": "pull twin", "flight": "1.1", "pid": 1, "outcome": outcome("twin\n")}))
    finally:
        os.close(fd)
    assert waiter.join() == (outcome("mine\n"), None)


def test_a_malformed_record_is_not_adopted(tmp_path):
    run_once(str(tmp_path), "pull m", lambda: outcome("m\n"))
    (lock,) = tmp_path.glob("*.lock")
    (result,) = tmp_path.glob("*.json")
    fd = os.open(lock, os.O_RDWR)  # a writer of the same key, in flight, that records garbage
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        waiter = Flight(tmp_path, "pull m", outcome("mine\n"))
        wait_until(lambda: blocked_on(tmp_path) == 1, "the command waits")
        result.write_text(json.dumps({"key": "pull m", "flight": "2.2", "pid": "?", "outcome": {"exit": "0"}}))
    finally:
        os.close(fd)
    assert waiter.join() == (outcome("mine\n"), None)
