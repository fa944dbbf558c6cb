"""The streaming tar reader: headers of every format Go's archive/tar (containerd's reader) reads,
taken from a forward-only layer stream, with file contents passed through one reused buffer.

v7, ustar, PAX (``x``, Solaris ``X``; global headers ignored), GNU and old GNU (long names,
base-256 numbers, dumpdirs as directories), sparse files in old GNU, PAX 0.0, 0.1 and 1.0 form.
A malformed or unsupported header raises ``MalformedArchive`` naming its byte offset. What the
entries mean for a directory tree is the applier's (:mod:`fastpull.unpack.archive`).
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Protocol

from fastpull.errors import MalformedArchive


class LayerStream(Protocol):
    """An uncompressed layer tar: ``read(n)`` returns at most n bytes, empty at the end; a
    memoryview will do if later reads leave what it shows unchanged (no reused buffer).

    A ``readinto`` method, when present, is used for file contents.
    """

    def read(self, n: int, /) -> bytes | memoryview: ...


# --- the stream ------------------------------------------------------------------------

_BLOCK = 512
_CHUNK = 1 << 20
"""Largest single read and write of file contents."""
_READAHEAD = 64 << 10
"""Read-ahead for headers and small files."""
_MAX_META = 1 << 20
"""Largest PAX header, GNU long name or sparse map accepted (Go's archive/tar limit)."""


class TarInput:
    """The layer stream, read forward only, with a small read-ahead for headers.

    Raises ``EOFError`` where the tar needs bytes the stream no longer has.
    """

    __slots__ = ("_at", "_buf", "_chunk", "_read", "_readinto", "entry_at", "pos")

    def __init__(self, stream: LayerStream):
        self._read = stream.read
        self._readinto: Callable[[memoryview], int | None] | None = getattr(stream, "readinto", None)
        self._buf = b""
        self._at = 0
        self._chunk: memoryview | None = None
        self.pos = 0
        """Offset in the tar of the next unread byte."""
        self.entry_at = 0
        """Offset of the header of the entry being read."""

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        at = self._at
        if at + n > len(self._buf):
            self._fill(n)
            at = 0
        out = self._buf[at : at + n]
        self._at = at + len(out)
        self.pos += len(out)
        return out if type(out) is bytes else bytes(out)

    def skip(self, n: int) -> None:
        avail = len(self._buf) - self._at
        if n <= avail:
            self._at += n
            self.pos += n
            return
        self._buf, self._at = b"", 0
        self.pos += avail
        n -= avail
        while n:
            got = len(self._read(min(n, _CHUNK)))
            if not got:
                raise EOFError
            n -= got
            self.pos += got

    def copy_to(self, fd: int, n: int, offset: int) -> None:
        """Write the next ``n`` bytes to ``fd`` at ``offset``."""
        while n:
            avail = len(self._buf) - self._at
            if avail < n < _READAHEAD:  # a small file across the read-ahead's end: one write, not two
                self._fill(n)
                avail = len(self._buf)
            if not avail:
                if n >= _READAHEAD:
                    self._copy_direct(fd, n, offset)
                    return
                self._fill(n)
                avail = len(self._buf)
                if not avail:
                    raise EOFError
            k = min(avail, n)
            _pwrite_all(fd, memoryview(self._buf)[self._at : self._at + k], offset)
            self._at += k
            self.pos += k
            offset += k
            n -= k

    def drain(self) -> None:
        """Read to the end of the stream (all of it counts toward the layer's diffID)."""
        self.pos += len(self._buf) - self._at
        self._buf, self._at = b"", 0
        while more := self._read(_CHUNK):
            self.pos += len(more)

    def _fill(self, n: int) -> None:
        """Buffer at least ``n`` unread bytes, or all that is left. A stream's memoryview that holds
        them all is kept as it is: file contents are written from it without a copy."""
        parts = [self._buf[self._at :]]
        have = len(parts[0])
        while have < n:
            more = self._read(max(n - have, _READAHEAD))
            if not more:
                break
            parts.append(more)
            have += len(more)
        self._buf = parts[1] if len(parts) == 2 and not parts[0] else b"".join(parts)
        self._at = 0

    def _copy_direct(self, fd: int, n: int, offset: int) -> None:
        """Large contents: ``readinto`` one reused 1 MiB buffer when the stream has it."""
        readinto = self._readinto
        if readinto is not None and self._chunk is None:
            self._chunk = memoryview(bytearray(_CHUNK))
        while n:
            want = min(n, _CHUNK)
            data: bytes | memoryview
            if readinto is not None and self._chunk is not None:
                data = self._chunk[: readinto(self._chunk[:want]) or 0]
            else:
                data = self._read(want)
            if not data:
                raise EOFError
            _pwrite_all(fd, data, offset)
            self.pos += len(data)
            offset += len(data)
            n -= len(data)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    done = os.pwrite(fd, data, offset)
    if done < len(data):
        view = memoryview(data)
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


# --- tar headers -----------------------------------------------------------------------

_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_ZERO_BLOCK = bytes(_BLOCK)
_USTAR = b"ustar\x0000"
REGULAR, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
GLOBAL = b"g"
TRAILING = b"x"
"""Extension headers that no entry follows: the archive ended."""
_NO_OWNER = 0xFFFFFFFF
NO_DATA = frozenset((LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO))
_XATTR = b"SCHILY.xattr."
_TIME_LIMIT = 1 << 63
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsdecode, inlined


class TarEntry:
    """One tar member, extension headers merged.

    ``type`` is one of the ``REGULAR``.. ``FIFO`` flags (contiguous and sparse files are
    ``REGULAR``), ``GLOBAL``, or an unsupported flag. ``size`` is the file's logical size;
    a sparse file's data follows as the runs of ``sparse`` (offset, length).
    """

    __slots__ = (
        "atime_ns", "devmajor", "devminor", "gid", "linkname", "mode", "mtime_ns", "name",
        "size", "sparse", "type", "uid", "xattrs",
    )  # fmt: skip

    name: str
    type: bytes
    linkname: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] | None
    sparse: list[tuple[int, int]] | None


def entries(source: TarInput, layer: str) -> Iterator[TarEntry]:
    """The tar's members in order, read the way Go's archive/tar (containerd, moby) does.

    After each entry is yielded, whatever the consumer left of its data is skipped. Global
    PAX headers are yielded as ``GLOBAL`` entries and not merged (Go ignores them too), and
    extension headers that the end of the archive follows as one ``TRAILING`` entry (Go reads
    such an archive as empty). ``source.entry_at`` follows the header being read. The stream
    is read to its end.
    """
    pax: dict[bytes, bytes] = {}
    long_name = long_link = None
    while True:
        at = source.entry_at = source.pos
        block = source.read(_BLOCK)
        if len(block) < _BLOCK or block == _ZERO_BLOCK:
            if 0 < len(block) < _BLOCK:
                raise EOFError
            if block:  # like Go: a second block, if any, must be zeros too; the rest is not read
                second = source.read(_BLOCK)
                if 0 < len(second) < _BLOCK:
                    raise EOFError
                if second and second != _ZERO_BLOCK:
                    raise MalformedArchive(layer, at, "a lone zero block inside the archive")
            if pax or long_name is not None or long_link is not None:
                e = TarEntry()
                e.type, e.name = TRAILING, ""
                yield e
            source.drain()
            return
        try:
            fields = _HEADER.unpack(block)
            if not _checksum_ok(block, _num(fields[6])):
                raise ValueError("header checksum mismatch")
            typ, size = fields[7], _num(fields[4])
            if typ in (b"x", b"X", GLOBAL, b"L", b"K"):
                if not 0 <= size <= _MAX_META:
                    raise ValueError(f"extension header of {size} bytes (at most {_MAX_META} accepted)")
                data = source.read(size)
                if len(data) < size:
                    raise EOFError
                source.skip(-size % _BLOCK)
                if typ in (b"x", b"X"):  # X: Solaris tar's older name for it (GNU tar reads it too)
                    pax = _parse_pax(data)
                elif typ == b"L":
                    long_name = data.partition(b"\0")[0]
                elif typ == b"K":
                    long_link = data.partition(b"\0")[0]
                else:
                    e = TarEntry()
                    e.type, e.name = typ, os.fsdecode(fields[0].partition(b"\0")[0])
                    yield e
                continue
            e, end = _member(block, fields, size, pax, long_name, long_link, source)
        except ValueError as err:
            raise MalformedArchive(layer, at, str(err)) from None
        pax = {}
        long_name = long_link = None
        yield e
        source.skip(end - source.pos)


def _member(
    block: bytes,
    fields: tuple,
    phys: int,
    pax: dict[bytes, bytes],
    long_name: bytes | None,
    long_link: bytes | None,
    source: TarInput,
) -> tuple[TarEntry, int]:
    """The entry a header describes, its extension headers merged (GNU long names win over
    PAX, which wins over the header), and the offset of the next header. ``phys`` is the
    header's size field. Reads a sparse map, if any; raises ValueError on malformed fields."""
    name, mode, uid, gid, _, mtime, _, flag, link, magic, _, _, devmajor, devminor, prefix = fields
    e = TarEntry()
    raw_name = name.partition(b"\0")[0]
    if magic == _USTAR and prefix[0]:
        raw_name = prefix.partition(b"\0")[0] + b"/" + raw_name
    raw_link = link.partition(b"\0")[0]
    uid, gid = _num(uid), _num(gid)
    mtime_ns = _num(mtime) * 1_000_000_000
    atime_ns = 0
    xattrs = None
    if pax:
        raw_name = pax.get(b"path", raw_name)
        raw_link = pax.get(b"linkpath", raw_link)
        if b"size" in pax:
            phys = _decimal(pax[b"size"])
        if b"uid" in pax:
            uid = _decimal(pax[b"uid"])
        if b"gid" in pax:
            gid = _decimal(pax[b"gid"])
        if b"mtime" in pax:
            mtime_ns = _pax_time(pax[b"mtime"])
        if b"atime" in pax:
            atime_ns = _pax_time(pax[b"atime"])
        xattrs = {os.fsdecode(k[len(_XATTR) :]): v for k, v in pax.items() if k.startswith(_XATTR)} or None
    if long_name is not None:
        raw_name = long_name
    if long_link is not None:
        raw_link = long_link
    if phys < 0:
        raise ValueError(f"negative size {phys}")
    # The largest owner, (uid_t)-1, makes chown leave the owner as is.
    if not 0 <= uid <= _NO_OWNER:
        raise ValueError(f"uid {uid} out of range")
    if not 0 <= gid <= _NO_OWNER:
        raise ValueError(f"gid {gid} out of range")
    typ = flag
    if typ == b"\0":
        typ = DIR if raw_name.endswith(b"/") else REGULAR
    elif typ in (b"7", b"S"):
        typ = REGULAR
    if typ in NO_DATA:
        phys = 0
    elif typ == b"D":  # a GNU dumpdir: a directory; its data (a listing for incremental restores) is skipped
        typ = DIR
    e.type = typ
    e.uid, e.gid = uid, gid
    e.mode = _num(mode) & 0o7777
    # Times before the epoch or past 2262 become the epoch, as containerd does.
    e.mtime_ns = mtime_ns = mtime_ns if 0 <= mtime_ns < _TIME_LIMIT else 0
    e.atime_ns = atime_ns if mtime_ns < atime_ns < _TIME_LIMIT else mtime_ns
    e.xattrs = xattrs
    if typ in (CHAR, BLOCKDEV):
        e.devmajor, e.devminor = _num(devmajor), _num(devminor)
        if not (0 <= e.devmajor < 1 << 32 and 0 <= e.devminor < 1 << 32):
            raise ValueError("device number out of range")
    e.size = phys
    e.sparse = None
    if flag == b"S":
        e.sparse, e.size = _old_gnu_sparse(block, source)
    data_start = source.pos
    if pax and typ == REGULAR and _is_pax_sparse(pax):
        raw_name = pax.get(b"GNU.sparse.name", raw_name)
        e.size = _decimal(pax.get(b"GNU.sparse.size") or pax.get(b"GNU.sparse.realsize", b"0"))
        if pax.get(b"GNU.sparse.major") == b"1":
            e.sparse = _sparse_map_10(source, min(phys, _MAX_META))
        else:
            e.sparse = _pairs(pax.get(b"GNU.sparse.map", b"").split(b","))
    if e.sparse is not None:
        _check_sparse(e.sparse, e.size, data_start + phys - source.pos)
    e.name = raw_name.decode(_FS_ENCODING, _FS_ERRORS)
    e.linkname = raw_link.decode(_FS_ENCODING, _FS_ERRORS) if raw_link else ""
    return e, data_start + phys + (-phys % _BLOCK)


def _checksum_ok(block: bytes, stored: int) -> bool:
    """Whether ``stored`` is the header's unsigned (or historic signed) byte sum.

    zlib.adler32's low half is 1 + the byte sum mod 65521, which is exact for 256 bytes
    (at most 65280), so two halves give the sum at C speed.
    """
    unsigned = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    unsigned += 256 - sum(block[148:156])  # the checksum field counts as eight spaces
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(b > 127 for b in block[:148] + block[156:])


def _num(f: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    digits = f.strip(b" \0")
    if digits.isdigit():
        return int(digits, 8)
    if f[0] & 0x80:
        if f[0] & 0x40:
            return int.from_bytes(f, "big", signed=True)
        return int.from_bytes(bytes((f[0] & 0x7F,)) + f[1:], "big")
    digits = digits.partition(b"\0")[0].strip(b" ")  # text after a NUL is ignored
    if digits and not digits.isdigit():
        raise ValueError(f"bad numeric field {f!r}")
    return int(digits or b"0", 8)


def _decimal(v: bytes) -> int:
    if not v.isdigit():
        raise ValueError(f"bad number {v!r}")
    return int(v)


def _pax_time(v: bytes) -> int:
    """A PAX time (``[-]seconds[.fraction]``) in nanoseconds, exactly."""
    sec, _, frac = v.partition(b".")
    negative = sec.startswith(b"-")
    ns = _decimal(sec[negative:]) * 1_000_000_000
    if frac:
        ns += _decimal(frac[:9].ljust(9, b"0"))
    return -ns if negative else ns


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records (``"%d %s=%s\\n"``); repeated GNU 0.0 sparse pairs become ``GNU.sparse.map``."""
    records: dict[bytes, bytes] = {}
    runs: list[bytes] = []
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        nxt = pos + _decimal(data[pos:space]) if space > pos else -1
        if not space + 1 < nxt <= len(data) or data[nxt - 1] != 0x0A:
            raise ValueError("bad PAX record")
        key, eq, value = data[space + 1 : nxt - 1].partition(b"=")
        if not eq or not key:
            raise ValueError("bad PAX record")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            runs.append(value)
        elif value:
            records[key] = value
        else:  # an empty value unsets the key
            records.pop(key, None)
        pos = nxt
    if runs:
        records[b"GNU.sparse.map"] = b",".join(runs)
    return records


def _is_pax_sparse(pax: dict[bytes, bytes]) -> bool:
    version = (pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor"))
    if version in ((b"1", b"0"), (b"0", b"0"), (b"0", b"1")):
        return True
    return version == (None, None) and b"GNU.sparse.map" in pax


def _pairs(numbers: list[bytes]) -> list[tuple[int, int]]:
    if len(numbers) % 2:
        raise ValueError("odd sparse map")
    values = [_decimal(n) for n in numbers]
    return list(zip(values[0::2], values[1::2]))


def _old_gnu_sparse(block: bytes, source: TarInput) -> tuple[list[tuple[int, int]], int]:
    """The runs and real size of an old GNU sparse header and its extension blocks."""
    runs = _sparse_structs(block[386:482], 4)
    extended = block[482]
    while extended:
        if len(runs) > _MAX_META // 24:
            raise ValueError("sparse map too large")
        ext = source.read(_BLOCK)
        if len(ext) < _BLOCK:
            raise EOFError
        runs += _sparse_structs(ext, 21)
        extended = ext[504]
    return runs, _num(block[483:495])


def _sparse_structs(buf: bytes, count: int) -> list[tuple[int, int]]:
    runs = []
    for i in range(0, 24 * count, 24):
        if not buf[i]:
            break
        runs.append((_num(buf[i : i + 12]), _num(buf[i + 12 : i + 24])))
    return runs


def _sparse_map_10(source: TarInput, limit: int) -> list[tuple[int, int]]:
    """The GNU 1.0 sparse map at the start of the data: decimal lines, block-padded."""
    numbers: list[bytes] = []
    buf = b""
    want = None
    used = 0
    while want is None or len(numbers) < want:
        line, nl, rest = buf.partition(b"\n")
        if not nl:
            if used + _BLOCK > limit:
                raise ValueError("sparse map too large")
            block = source.read(_BLOCK)
            if len(block) < _BLOCK:
                raise EOFError
            buf += block
            used += _BLOCK
            continue
        buf = rest
        if want is None:
            want = 2 * _decimal(line)
        else:
            numbers.append(line)
    return _pairs(numbers)


def _check_sparse(runs: list[tuple[int, int]], size: int, data_len: int) -> None:
    end = total = 0
    for offset, length in runs:
        if offset < end or length < 0 or offset + length > size:
            raise ValueError("sparse runs overlap or pass the end of the file")
        end = offset + length
        total += length
    if total != data_len:
        raise ValueError("sparse runs do not match the stored data")
