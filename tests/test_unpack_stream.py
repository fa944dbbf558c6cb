"""fastpull.unpack.workers's layer streams: gzip members inflated block by block from one reused buffer, the
diffID hashed once per block, malformed gzip refused by name."""

from __future__ import annotations

import hashlib
import io
import os
import zlib

import pytest

from fastpull.errors import MalformedArchive
from fastpull.unpack.workers import _BLOCK, _READ_SIZE, _TarStream, layer_blocks

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DIGEST = "sha256:" + "ab" * 32


def gz(data: bytes) -> bytes:
    return zlib.compress(data, 6, wbits=31)


def inflate(blob: bytes) -> bytes:
    blocks = list(layer_blocks(io.BytesIO(blob), GZIP, DIGEST))
    assert all(0 < len(b) <= _BLOCK for b in blocks)
    return b"".join(blocks)


def test_unpack_stream_inflates_members_and_skips_zero_padding():
    # Compressible data much longer than a read (the inflater holds input over several blocks),
    # random data longer than a read, then a second member after zero padding.
    first = bytes(5 * _BLOCK) + os.urandom(3 * _READ_SIZE)
    assert inflate(gz(first) + b"\0" * 700 + gz(b"second") + b"\0" * 3) == first + b"second"


@pytest.mark.parametrize("blob, why", [
    (lambda b: b[:-1], "ends inside a member"),
    (lambda b: b[:-8] + bytes([b[-8] ^ 1]) + b[-7:], "malformed gzip"),  # the CRC
    (lambda b: b + b"trailing garbage", "malformed gzip"),
])
def test_unpack_stream_refuses_malformed_gzip(blob, why):
    with pytest.raises((MalformedArchive, EOFError), match=why) as err:
        inflate(blob(gz(os.urandom(100_000))))
    if err.type is MalformedArchive:
        assert err.value.layer == DIGEST


def test_unpack_stream_hands_out_views_and_hashes_every_byte():
    data = os.urandom(3 * _BLOCK + 5)
    tar = _TarStream(layer_blocks(io.BytesIO(gz(data)), GZIP, DIGEST))
    got = bytearray()
    while part := tar.read(100_000):
        assert isinstance(part, memoryview) and len(part) <= 100_000
        got += part
    assert got == data and tar.count == len(data)
    assert tar.hexdigest() == "sha256:" + hashlib.sha256(data).hexdigest()


def test_unpack_stream_zstd_and_plain():
    import zstandard

    data = os.urandom(_BLOCK + 1)
    frames = zstandard.ZstdCompressor().compress(data[:10]) + zstandard.ZstdCompressor().compress(data[10:])
    assert b"".join(layer_blocks(io.BytesIO(frames), ZSTD, DIGEST)) == data
    assert b"".join(layer_blocks(io.BytesIO(data), GZIP.removesuffix("+gzip"), DIGEST)) == data
