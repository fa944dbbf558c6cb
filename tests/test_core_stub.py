"""fastpull/_core.pyi types the compiled core: both backends have what it declares, with the
reference's parameter names, and nothing public it lacks."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import pytest

from fastpull import _core, _pycore

STUB = ast.parse((Path(_pycore.__file__).parent / "_core.pyi").read_text())
COMPILED_ONLY = {"bind_libcurl"}


def _stub_functions(body) -> dict[str, list[str]]:
    return {n.name: [a.arg for a in n.args.args if a.arg != "self"] for n in body if isinstance(n, ast.FunctionDef)}


def _stub_attributes(body) -> set[str]:
    return {n.target.id for n in body if isinstance(n, ast.AnnAssign)}


STUB_CLASSES = {n.name: n.body for n in STUB.body if isinstance(n, ast.ClassDef)}


def _instances(backend, tmp_path):
    bitmap = backend.ChunkBitmap(str(tmp_path / f"bitmap.{backend.BACKEND}"), 4 << 20, 1 << 20, create=True)
    fd = os.open(tmp_path / f"data.{backend.BACKEND}", os.O_RDWR | os.O_CREAT, 0o600)
    return {"ChunkBitmap": bitmap, "RangeSink": backend.RangeSink(fd, bitmap, 0, 1 << 20, 0)}, fd


def test_module_functions_match_the_stub():
    for name, params in _stub_functions(STUB.body).items():
        assert callable(getattr(_core, name)), name
        if name not in COMPILED_ONLY:
            assert list(inspect.signature(getattr(_pycore, name)).parameters) == params, name
            assert list(inspect.signature(getattr(_core, name)).parameters) == params, name
    public = {n for n in vars(_pycore) if not n.startswith("_") and (inspect.isfunction(vars(_pycore)[n])
                                                                     or inspect.isclass(vars(_pycore)[n]))}
    public -= {n for n in public if getattr(_pycore, n).__module__ != _pycore.__name__}  # imported helpers
    assert public <= set(_stub_functions(STUB.body)) | set(STUB_CLASSES), public


@pytest.mark.parametrize("backend", [_core, _pycore], ids=["cy", "py"])
def test_classes_have_what_the_stub_declares(backend, tmp_path):
    instances, fd = _instances(backend, tmp_path)
    try:
        for cls, body in STUB_CLASSES.items():
            obj = instances[cls]
            for name in (set(_stub_functions(body)) - {"__init__"}) | _stub_attributes(body):
                assert hasattr(obj, name), f"{backend.BACKEND}: {cls}.{name}"
            declared = set(_stub_functions(body)) | _stub_attributes(body)
            extra = {n for n in dir(obj) if not n.startswith("_")} - declared
            assert not extra, f"{backend.BACKEND}: {cls} has public names the stub lacks: {extra}"
            init = _stub_functions(body)["__init__"]
            if backend is _pycore:
                assert list(inspect.signature(getattr(_pycore, cls)).parameters) == init, cls
    finally:
        instances["ChunkBitmap"].close()
        os.close(fd)


@pytest.mark.parametrize("backend", [_core, _pycore], ids=["cy", "py"])
def test_a_closed_bitmap_raises_instead_of_reading_freed_memory(backend, tmp_path):
    bitmap = backend.ChunkBitmap(str(tmp_path / "bitmap"), 4 << 20, 1 << 20, create=True)
    bitmap.close()
    bitmap.close()  # closing twice is harmless
    for use in (lambda: bitmap.set(0), lambda: bitmap.test(0), bitmap.count, bitmap.missing, bitmap.watermark,
                bitmap.complete, lambda: bitmap.abandoned, lambda: bitmap.sequence,
                lambda: bitmap.set_abandoned(True), lambda: bitmap.wait(0, 0.01)):
        with pytest.raises(ValueError, match="closed"):
            use()
