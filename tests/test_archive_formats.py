"""The tar formats containerd's reader (Go's archive/tar) accepts, as GNU tar and Python's tarfile
write them: each archive of the corpus unpacks as GNU tar extracts it, or is refused with
``MalformedArchive`` naming the header's byte offset and what is wrong in it."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from test_archive import _gnu_extract, apply, entry, layer, tree

from fastpull.errors import MalformedArchive
from fastpull.unpack.tar import TarInput, entries

MiB = 1 << 20
Y2250 = 8_836_128_000
"""An mtime past 11 octal digits (2242) that containerd keeps (it bounds times to 1970..2262)."""


def _can_chown(path: Path) -> bool:
    try:
        os.chown(path, 1, 1)
    except PermissionError:
        return False
    os.chown(path, os.geteuid(), os.getegid())
    return True


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tree with every shape the formats encode differently; the parts a format cannot hold
    sit under ``gnu-only/``: long names, big owners, late mtimes, sparse files."""
    src = tmp_path_factory.mktemp("corpus") / "src"
    (src / "d/sub").mkdir(parents=True)
    if not _can_chown(src):
        pytest.skip("comparing owners with GNU tar's extraction needs CAP_CHOWN")
    (src / "d/f").write_bytes(b"hello\n" * 100)
    os.chmod(src / "d/f", 0o4755)
    os.chown(src / "d/f", 12, 34)
    os.link(src / "d/f", src / "d/hard")
    (src / "d/sym").symlink_to("f")
    os.mkfifo(src / "d/fifo")
    os.chmod(src / "d/sub", 0o750)
    os.chown(src / "d/sub", 56, 78)  # a GNU dumpdir entry carries it
    extra = src / "gnu-only"
    deep = extra / "/".join(f"{i}" + "d" * 60 for i in range(3))
    deep.mkdir(parents=True)
    (deep / ("f" * 200)).write_bytes(b"long")
    os.link(deep / ("f" * 200), extra / ("h" * 120))
    (extra / "big-owner").write_bytes(b"x")
    os.chown(extra / "big-owner", 3_000_000, 2**31)  # past 7 octal digits: base-256 or PAX
    (extra / "late").write_bytes(b"y")
    os.utime(extra / "late", (Y2250, Y2250))
    with open(extra / "sparse", "wb") as f:  # holes before, between and after the data
        for offset in (4 * MiB, 9 * MiB):
            f.seek(offset)
            f.write(os.urandom(70_000))
        f.truncate(12 * MiB)
    with open(extra / "many-runs", "wb") as f:  # more runs than an old GNU header holds
        for i in range(60):
            f.seek(i * 65536)
            f.write(bytes([i + 1]) * 100)
    for path in (src / "d/sub", src / "d", extra, deep.parent):
        os.utime(path, (1_600_000_000, 1_600_000_000))
    return src


GNU_TAR = {
    "gnu": ["--format=gnu", "--sparse", "."],
    "oldgnu": ["--format=oldgnu", "--sparse", "."],
    "posix-sparse-1.0": ["--format=posix", "--sparse", "."],
    "posix-sparse-0.1": ["--format=posix", "--sparse", "--sparse-version=0.1", "."],
    "posix-sparse-0.0": ["--format=posix", "--sparse", "--sparse-version=0.0", "."],
    "gnu-dumpdir": ["--format=gnu", "--sparse", "--listed-incremental={snar}", "."],
    "ustar": ["--format=ustar", "d"],
    "v7": ["--format=v7", "--exclude=fifo", "d"],  # v7 has no fifos
}


@pytest.mark.parametrize("name", GNU_TAR)
def test_formats_gnu_tar_archives_unpack_as_gnu_tar_extracts_them(source, tmp_path, name):
    args = [a.format(snar=tmp_path / "snar") for a in GNU_TAR[name]]
    data = subprocess.run(["tar", "-c", "-f", "-", "-C", str(source), *args], capture_output=True,
                          check=True).stdout
    _same_as_gnu_tar(data, tmp_path)
    if name == "gnu-dumpdir":
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            assert b"D" in {m.type for m in tf.getmembers()}
    if "--sparse" in args:
        for sparse in ("gnu-only/sparse", "gnu-only/many-runs"):
            mine, gnu = os.stat(tmp_path / "mine" / sparse), os.stat(tmp_path / "gnu" / sparse)
            assert mine.st_blocks <= gnu.st_blocks and mine.st_blocks * 512 < mine.st_size // 4, "holes written"


def _same_as_gnu_tar(data: bytes, tmp_path: Path) -> None:
    apply(data, tmp_path / "mine")
    (tmp_path / "gnu").mkdir()
    _gnu_extract(data, tmp_path / "gnu")
    mine, gnu = tree(tmp_path / "mine"), tree(tmp_path / "gnu")
    assert mine[0].keys() == gnu[0].keys()
    for path, info in gnu[0].items():
        assert mine[0][path] == info, path
    assert mine[1] == gnu[1]


def _gnu_member(name: str, **attrs) -> tuple[tarfile.TarInfo, bytes]:
    ti, data = entry(name, data=b"data\n")
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti, data


def _header(data: bytes, at: int, **fields: bytes) -> bytes:
    """``data`` with fields of the header at ``at`` replaced (by offset) and its checksum redone."""
    block = bytearray(data[at : at + 512])
    for offset, value in fields.values():
        block[offset : offset + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return data[:at] + bytes(block) + data[at + 512 :]


def _base256(n: int, width: int) -> bytes:
    """GNU's base-256: big-endian two's complement with the top bit set."""
    raw = n.to_bytes(width, "big", signed=True)
    return bytes([raw[0] | 0x80]) + raw[1:]


TARFILE = {
    # CPython's gnu/regtype-gnu-uid: (uid_t)-1 in base-256; chown leaves the owner as it is.
    "gnu-uid-all-ones": layer(_gnu_member("f", uid=2**32 - 1, gid=2**32 - 1), format=tarfile.GNU_FORMAT),
    "gnu-base256-owner": layer(_gnu_member("f", uid=2**31, gid=3_000_000), format=tarfile.GNU_FORMAT),
    "gnu-base256-mtime": layer(_gnu_member("f", mtime=Y2250), format=tarfile.GNU_FORMAT),
    "pax-big-owner": layer(_gnu_member("f", uid=2**32 - 2, gid=5_000_000)),
    "solaris-extended-header": _header(layer(_gnu_member("f", uid=3_000_000)), 0, type=(156, b"X")),
}


@pytest.mark.parametrize("name", TARFILE)
def test_formats_tarfile_archives_unpack_as_gnu_tar_extracts_them(source, tmp_path, name):
    _same_as_gnu_tar(TARFILE[name], tmp_path)


def test_formats_base256_size_and_negative_mtime(tmp_path):
    """GNU tar reads any numeric field in base-256; a time before 1970 becomes the epoch, as
    containerd bounds it (GNU tar would set it)."""
    data = layer(_gnu_member("f", mtime=-86400 * 365 * 10), format=tarfile.GNU_FORMAT)
    assert data[136] & 0x80  # tarfile wrote the negative mtime in base-256
    data = _header(data, 0, size=(124, _base256(5, 12)))
    apply(data, tmp_path / "mine")
    (tmp_path / "gnu").mkdir()
    _gnu_extract(data, tmp_path / "gnu")
    assert (tmp_path / "mine/f").read_bytes() == (tmp_path / "gnu/f").read_bytes() == b"data\n"
    assert os.stat(tmp_path / "gnu/f").st_mtime < 0 and os.stat(tmp_path / "mine/f").st_mtime == 0


def test_formats_extension_header_at_the_end_reads_as_empty(tmp_path):
    """Go's pax-path-hdr.tar: a PAX header, then the end of the archive. Go reads no entry."""
    full = layer(entry("a" * 120, data=b"x"))
    assert full[156:157] == b"x"
    stats = apply(full[:1024] + bytes(1024), tmp_path / "r")
    assert not os.listdir(tmp_path / "r") and stats.entries == 0
    assert stats.skipped == {
        "extension header that the end of the archive follows (ignored, as containerd does)": 1
    }


def _entries(data: bytes) -> list:
    return list(entries(TarInput(io.BytesIO(data)), "sha256:test"))


def test_formats_gnu_header_with_a_ustar_prefix_as_go_before_1_8_wrote_it():
    """Go's invalid-go17.tar: Go before 1.8 wrote a ustar prefix into GNU headers, where GNU keeps
    atime and ctime. Go reads it as the prefix where those are not numbers, and as times where they are."""
    gnu = layer(_gnu_member("foo"), format=tarfile.GNU_FORMAT)
    [e] = _entries(_header(gnu, 0, prefix=(345, b"a" * 99 + b"\0")))
    assert e.name == "a" * 99 + "/foo" and e.atime_ns == e.mtime_ns
    [e] = _entries(_header(gnu, 0, atime=(345, b"%011o\0" % Y2250)))
    assert e.name == "foo" and e.atime_ns == Y2250 * 10**9


def test_formats_archive_ending_inside_the_padding_reads_as_go_reads_it(tmp_path):
    """Go reads an archive that ends in the padding after its last file's data, without end blocks."""
    data = layer(entry("f", data=b"x" * 500))
    apply(data[: 512 + 500 + 3], tmp_path / "r")
    assert (tmp_path / "r/f").read_bytes() == b"x" * 500


def test_formats_global_header_drops_the_extension_headers_before_it():
    """Go returns a global header as an entry of its own, named by its path record, and forgets the
    extension headers before it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "global1"}) as tf:
        tf.addfile(*entry("f"))
    pending = layer(entry("a" * 120, data=b"x"))[:1024]  # a PAX header naming the next entry
    assert [(e.type, e.name) for e in _entries(pending + buf.getvalue())] == [(b"g", "global1"), (b"0", "f")]


def _pax_member(records: dict[str, str]) -> tuple[tarfile.TarInfo, bytes]:
    ti, data = entry("f")
    ti.pax_headers = records
    return ti, data


def _sparse_10(sparse_map: bytes) -> bytes:
    """A PAX 1.0 sparse file of 10 bytes whose data is ``sparse_map``, block-padded."""
    ti, _ = _pax_member({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
                         "GNU.sparse.realsize": "10"})
    ti.size = len(sparse_map) + -len(sparse_map) % 512
    return layer((ti, sparse_map.ljust(ti.size, b"\n")))


REFUSED = {
    "checksum": (lambda d: d[:148] + b"0000000\0" + d[156:], 0, "header checksum mismatch"),
    "truncated-data": (lambda d: d[:600], 0, "the archive ends inside this entry"),
    "truncated-header": (lambda d: d[:1024 + 100], 1024, "the archive ends inside this entry"),
    "negative-size": (lambda d: _header(d, 0, size=(124, _base256(-1, 12))), 0, "negative size -1"),
    "uid-past-32-bits": (lambda d: _header(d, 0, uid=(108, _base256(2**32, 8))), 0, "uid 4294967296 out of range"),
    "lone-zero-block": (lambda d: d[:1024] + bytes(512) + d[:1024], 1024, "a lone zero block inside the archive"),
    "bad-pax-record": (lambda d: layer(entry("x" * 120))[:512] + b"99 path=x\n".ljust(512, b"\0") + d, 0,
                       "bad PAX record"),
    "sparse-map-past-its-data": (lambda d: _sparse_10(b"100000\n"), 1024, "sparse map too large"),
    # Go's gnu-sparse-many-zeros (Go 1.19 read it; later releases refuse a map past 1 MiB)
    "sparse-map-past-1-mib": (lambda d: _sparse_10(b"300000\n" + b"0\n" * 600_000), 1024, "sparse map too large"),
    "nul-in-pax-path": (lambda d: layer(_pax_member({"path": "a\0b"})), 0, "NUL byte in PAX record path"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_formats_malformed_archives_are_refused_naming_the_header(tmp_path, name):
    mangle, offset, why = REFUSED[name]
    data = mangle(layer(entry("f", data=b"x" * 500), entry("g", data=b"y")))
    with pytest.raises(MalformedArchive) as err:
        apply(data, tmp_path / "r")
    assert err.value.offset == offset and why in str(err.value)
    assert f"byte {offset}" in str(err.value) and "sha256:test" in str(err.value)


def test_formats_base256_helper_agrees_with_gnu_tar():
    """The refusals above use this module's base-256 encoder: GNU tar reads what it writes."""
    raw = _header(layer(_gnu_member("f"), format=tarfile.GNU_FORMAT), 0, uid=(108, _base256(3_000_000, 8)))
    listing = subprocess.run(["tar", "-tv", "--numeric-owner", "-f", "-"], input=raw, capture_output=True,
                             check=True).stdout.decode()
    assert listing.split()[1].startswith("3000000/")
