"""fastpull.content.layout: an OCI image layout that several pulls tag into at once."""

from __future__ import annotations

import json
import threading

import pytest

from fastpull.content.layout import REF_NAME, ImageLayout
from fastpull.errors import ManifestError
from fastpull.oci.manifest import Descriptor, Platform

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _descriptor(n: int) -> Descriptor:
    return Descriptor(MANIFEST, "sha256:" + f"{n:064x}", 100 + n, platform=Platform("linux", "amd64"))


def test_layout_tags_resolve_and_replace(tmp_path):
    layout = ImageLayout(tmp_path)
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert layout.resolve("a:1") is None
    layout.tag("a:1", _descriptor(1))
    layout.tag("b:1", _descriptor(2))
    layout.tag("a:1", _descriptor(3))  # re-tagged: replaces, never duplicates
    assert layout.resolve("a:1").digest == _descriptor(3).digest
    assert layout.resolve("b:1").size == _descriptor(2).size
    entries = layout.index()["manifests"]
    assert sorted(e["annotations"][REF_NAME] for e in entries) == ["a:1", "b:1"]
    assert all("platform" not in e for e in entries)  # the layout names images, not platforms


def test_layout_concurrent_tags_lose_nothing(tmp_path):
    layout = ImageLayout(tmp_path)
    threads = [threading.Thread(target=layout.tag, args=(f"img:{n}", _descriptor(n))) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {layout.resolve(f"img:{n}").digest for n in range(16)} == {_descriptor(n).digest for n in range(16)}


def test_layout_malformed_entry_names_the_index(tmp_path):
    layout = ImageLayout(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(
        {"schemaVersion": 2, "manifests": [{"annotations": {REF_NAME: "bad:1"}, "digest": "nope"}]}))
    with pytest.raises(ManifestError, match="index.json entry 'bad:1'"):
        layout.resolve("bad:1")
