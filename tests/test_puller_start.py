"""How a pull starts (issue 20): an unpacking pull asks for its layers while its config is still on its
way, and a pull that unpacks nothing loads none of the unpacking code."""

from __future__ import annotations

import subprocess
import sys
import threading

from conftest import wait_until
from faultserver import FaultRegistry

from fastpull import FetchOptions
from fastpull.puller import Puller
from fastpull.testbed.images import LayerSpec, build_image

KiB = 1 << 10


def test_an_unpacking_pull_asks_for_its_layers_before_its_config_lands(image_cache, tmp_path):
    """The config's first answer hangs after its headers; every layer is asked for meanwhile, and
    once the config comes (a retry, after the stall timeout) the layers unpack from what landed."""
    image = build_image([LayerSpec(64 * KiB, files=2)] * 3, image_cache / "puller-start")
    config = image.config.digest
    with FaultRegistry() as srv, Puller(FetchOptions(stall_timeout=2.0)) as puller:
        srv.add_image("start/app", "v1", image)
        srv.stall_after(config, 0, first=1)
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["result"] = puller.pull(f"{srv.host}/start/app:v1", tmp_path / "layout",
                                                rootfs=tmp_path / "rootfs")
            except BaseException as e:  # noqa: BLE001 - reported below
                outcome["error"] = e

        thread = threading.Thread(target=run)
        thread.start()
        layers = {d.digest for d in image.layers}
        wait_until(lambda: layers <= {r.digest for r in srv.log if r.method == "GET"},
                   "every layer is asked for while the config hangs")
        configs = [r for r in srv.log if r.method == "GET" and r.digest == config]
        assert len(configs) == 1 and configs[0].bytes_sent == 0  # its first answer still hangs
        thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert sorted(p.name for p in (tmp_path / "rootfs").iterdir())


def test_a_pull_that_unpacks_nothing_loads_no_unpacking_code():
    probe = ("import sys, fastpull.puller, fastpull.cli.main; "
             "print(sorted(m for m in sys.modules if m.startswith('fastpull.unpack')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"
