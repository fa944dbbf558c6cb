"""The command line's dispatch (pulling through the CLI is tested in test_pull.py)."""

from __future__ import annotations

import subprocess
import sys


def _fastpull(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastpull", *args], capture_output=True, text=True, timeout=60)


def test_bench_hands_every_argument_to_the_bench_script():
    done = _fastpull("bench", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: bench_bed.py") and "--per-flow" in done.stdout


def test_help_lists_the_commands():
    done = _fastpull("--help")
    assert done.returncode == 0
    assert "{pull,demo,bench}" in done.stdout


def test_unknown_command_is_refused():
    done = _fastpull("push")
    assert done.returncode == 2 and "invalid choice: 'push'" in done.stderr
