"""bench/bench_cpu.py's smoke mode: every stage, the pipeline against their sum, and the summed PSS
of the pull's process tree (its unpack workers included) end up in the table."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("curl", "tar", "dd", "docker-registry")),
                                reason="needs curl, tar, dd and docker-registry")


def test_bench_cpu_quick_writes_the_budget_table(tmp_path):
    out = tmp_path / "cpu.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_cpu.py"), "--quick", "--settle", "0",
                    "--images", "small-files", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                   check=True, capture_output=True, cwd=REPO)
    text = out.read_text()
    for stage in ("receive", "sha256 of the blobs", "inflate", "sha256 of the tars", "file writes"):
        assert re.search(rf"^\| {re.escape(stage)}[^|]* \| \d+\.\d\d \|", text, re.M), stage
    row = re.search(r"^\| pull \+ unpack, this tree \| (\d+\.\d\d) \| \*\*(\d+\.\d\d)\*\* \| [\d.]+ \| (\d+) \|",
                    text, re.M)
    assert row, text
    cpu, ratio, pss = float(row[1]), float(row[2]), int(row[3])
    assert cpu > 0 and ratio > 0
    assert pss > 20  # the command, the forkserver and its workers: each Python process alone is ~10 MB
