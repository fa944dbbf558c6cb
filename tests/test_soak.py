"""A short soak of the node daemon (bench/bench_soak.py): 20 cycles of four CRI pulls at once through
``fastpull serve --snapshotter`` with skopeo copying through its mirror, a container run, image
removal and both GCs; nothing the daemon holds grows with the number of pulls."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from cri import skip_unless_containers_run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_soak  # noqa: E402

CYCLES = 20


def test_twenty_cycles_return_every_resource_to_its_baseline(tmp_path, image_cache):
    if shutil.which("containerd") is None or shutil.which("skopeo") is None:
        pytest.skip("containerd or skopeo is not installed: run scripts/install.sh")
    skip_unless_containers_run()  # root, runc, busybox
    with bench_soak.started(tmp_path / "node", image_cache) as soak:
        bench_soak.run(soak, CYCLES, every=5)
        verdicts = soak.verdicts()
    failing = {r: why for r, (_, ok, why) in verdicts.items() if not ok}
    assert not failing, bench_soak.table(soak, CYCLES, 0)
    start, warm, end = (s for _, s in (soak.samples[0], soak.samples[1], soak.samples[-1]))
    for r in bench_soak.EXACT:
        assert end[r] == warm[r] == start[r], (r, start[r], warm[r], end[r])
