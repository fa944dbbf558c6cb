"""The package's face: ``import fastpull`` stays cheap, and every public name resolves."""

from __future__ import annotations

import subprocess
import sys

import fastpull


def test_every_public_name_resolves_from_its_module():
    for name in fastpull.__all__:
        value = getattr(fastpull, name)
        assert getattr(value, "__name__", name) == name
    assert sorted(fastpull.__all__) == sorted(fastpull._HOME)


def test_importing_the_package_or_the_cli_loads_no_engine():
    """A ``fastpull pull`` that joins one in flight never needs the engine, pycurl or logging."""
    probe = ("import sys, fastpull, fastpull.cli.main, fastpull.cli.singleflight; fastpull.cli.main.build_parser(); "
             "print(sorted(m for m in ('fastpull.engine.loop', 'pycurl', 'logging', 'typing', 'fastpull.puller', "
             "'aiohttp', 'asyncio', 'fastpull.serve.daemon') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"
