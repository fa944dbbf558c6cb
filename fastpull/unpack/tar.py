"""The streaming tar reader: headers of every format Go's archive/tar (containerd's reader) reads,
taken from a forward-only layer stream, with file contents passed through one reused buffer.

v7, ustar, star, PAX (``x``, Solaris ``X``; global headers ignored), GNU and old GNU (long
names, base-256 numbers, dumpdirs as directories, the ustar prefix Go wrote before 1.8), sparse
files in old GNU, PAX 0.0, 0.1 and 1.0 form. What Go's reader refuses (its limits included) raises
``MalformedArchive`` naming the header's byte offset. What the entries mean for a directory tree
is the applier's (:mod:`fastpull.unpack.archive`).
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
"""Largest PAX header, GNU long name or sparse map accepted: Go's archive/tar limits (Go 1.19 read
a sparse map of any length; later releases refuse one past 1 MiB)."""


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
_USTAR = b"ustar\0"
_GNU = b"ustar  \0"
"""The magic (and GNU's version) that tell the formats apart, as Go does; any other is v7."""
REGULAR, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
GLOBAL = b"g"
TRAILING = b"x"
"""Extension headers that no entry follows: the archive ended."""
_NO_OWNER = 0xFFFFFFFF
NO_DATA = frozenset((LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO))
_XATTR = b"SCHILY.xattr."
_TIME_LIMIT = 1 << 63
_NS = 1_000_000_000
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
            if not _checksum_ok(block, _octal(fields[6])):
                raise ValueError("header checksum mismatch")
            typ, size = fields[7], _num(fields[4])
            if typ in (b"x", b"X", GLOBAL, b"L", b"K"):
                name = _read_header(block, fields)[0]  # Go refuses these too where a field does not parse
                if not 0 <= size <= _MAX_META:
                    raise ValueError(f"extension header of {size} bytes (at most {_MAX_META} accepted)")
                data = source.read(size)
                if len(data) < size:
                    raise EOFError
                _skip_padding(source, 0, source.pos)
                if typ in (b"x", b"X"):  # X: Solaris tar's older name for it (GNU tar reads it too)
                    pax = _parse_pax(data)
                elif typ == b"L":
                    long_name = data.partition(b"\0")[0]
                elif typ == b"K":
                    long_link = data.partition(b"\0")[0]
                else:
                    e = TarEntry()
                    e.type = typ
                    e.name = os.fsdecode(_parse_pax(data).get(b"path") or name)
                    pax, long_name, long_link = {}, None, None  # Go drops those before a global header
                    yield e
                continue
            e, end = _member(block, fields, size, pax, long_name, long_link, source)
        except ValueError as err:
            raise MalformedArchive(layer, at, str(err)) from None
        pax = {}
        long_name = long_link = None
        yield e
        _skip_padding(source, end - source.pos, end)


def _skip_padding(source: TarInput, data: int, end: int) -> None:
    """Skip ``data`` more bytes of an entry's data, which ends at offset ``end``, and its padding.
    Like Go, an archive may end inside the padding: the next header read finds the end."""
    try:
        source.skip(data + -end % _BLOCK)
    except EOFError:
        if source.pos < end:
            raise


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
    PAX, which wins over the header), and the offset where its data ends. ``phys`` is the
    header's size field. Reads a sparse map, if any; raises ValueError on malformed fields."""
    e = TarEntry()
    raw_name, mode, uid, gid, mtime_ns, atime_ns, major, minor = _read_header(block, fields)
    flag = fields[7]
    raw_link = fields[8].partition(b"\0")[0]
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
        if b"ctime" in pax:  # unused, but Go refuses a bad one
            _pax_time(pax[b"ctime"])
        xattrs = {os.fsdecode(k[len(_XATTR) :]): v for k, v in pax.items() if k.startswith(_XATTR)} or None
    if long_name:  # an empty one is ignored, as Go does
        raw_name = long_name
    if long_link:
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
    no_data = typ in NO_DATA
    if no_data:
        phys = 0
    elif typ == b"D":  # a GNU dumpdir: a directory; its data (a listing for incremental restores) is skipped
        typ = DIR
    e.type = typ
    e.uid, e.gid = uid, gid
    e.mode = mode & 0o7777
    # Times as containerd sets them: atime the later of the two, and either outside 1970..2262 the epoch.
    latest = max(atime_ns, mtime_ns)
    e.mtime_ns = mtime_ns if 0 <= mtime_ns < _TIME_LIMIT else 0
    e.atime_ns = latest if 0 <= latest < _TIME_LIMIT else 0
    e.xattrs = xattrs
    if typ in (CHAR, BLOCKDEV):
        if not (0 <= major < 1 << 32 and 0 <= minor < 1 << 32):
            raise ValueError("device number out of range")
        e.devmajor, e.devminor = major, minor
    e.size = phys
    e.sparse = None
    if flag == b"S":
        if block[257:265] != _GNU:  # star and others use the flag for other layouts
            raise ValueError("old GNU sparse file in a header that is not GNU")
        e.sparse, e.size = _old_gnu_sparse(block, source)
    data_start = source.pos
    if e.sparse is None and pax and (version_1 := _pax_sparse(pax)) is not None:
        raw_name = pax.get(b"GNU.sparse.name", raw_name)
        size = pax.get(b"GNU.sparse.size") or pax.get(b"GNU.sparse.realsize")
        if size is not None:
            e.size = _decimal(size)
        e.sparse = _sparse_map_10(source, min(phys, _MAX_META)) if version_1 else _sparse_map_01(pax)
    if e.sparse is not None:
        if no_data:
            raise ValueError("sparse map on an entry without data")
        _check_sparse(e.sparse, e.size, data_start + phys - source.pos)
    e.name = raw_name.decode(_FS_ENCODING, _FS_ERRORS)
    e.linkname = raw_link.decode(_FS_ENCODING, _FS_ERRORS) if raw_link else ""
    return e, data_start + phys


def _read_header(block: bytes, fields: tuple) -> tuple[bytes, int, int, int, int, int, int, int]:
    """What Go's archive/tar takes from every header block, by the format it tells from the
    magic: the name with its prefix, mode, uid, gid, mtime and atime in ns (0 if none), device
    numbers (0 in v7). Raises ValueError where a field does not parse, as Go refuses the block."""
    name, mode, uid, gid, _, mtime, _, _, _, _, _, _, devmajor, devminor, _ = fields
    name = name.partition(b"\0")[0]
    numbers = _num(mode), _num(uid), _num(gid), _num(mtime) * _NS
    magic = block[257:263]
    atime_ns = 0
    if magic == _USTAR:
        if block[508:512] == b"tar\0":  # star: a shorter prefix, then atime and ctime
            prefix = block[345:476]
            atime_ns = _num(block[476:488]) * _NS
            _num(block[488:500])
        elif block[345]:
            prefix = block[345:500]
        else:
            return name, *numbers, 0, _num(devmajor), _num(devminor)
    elif block[257:265] == _GNU:
        if not (block[345] or block[357]):
            return name, *numbers, 0, _num(devmajor), _num(devminor)
        prefix = b""
        try:
            if block[345]:
                atime_ns = _num(block[345:357]) * _NS
            if block[357]:
                _num(block[357:369])
        except ValueError:  # Go before 1.8 wrote a ustar prefix where GNU keeps these times
            atime_ns = 0
            prefix = block[345:500].partition(b"\0")[0]
            if not prefix.isascii():
                prefix = b""
    else:
        return name, *numbers, 0, 0, 0
    prefix = prefix.partition(b"\0")[0]
    return (prefix + b"/" + name if prefix else name), *numbers, atime_ns, _num(devmajor), _num(devminor)


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
    """A numeric header field: octal, or GNU base-256 (two's complement, at most 63 bits) when
    the top bit is set."""
    digits = f.strip(b" \0")
    if digits.isdigit():
        return int(digits, 8)
    if not digits:
        return 0
    if not f[0] & 0x80:
        return _octal(f)
    mask = (1 << 8 * len(f) - 1) - 1
    n = int.from_bytes(f, "big") & mask
    negative = f[0] & 0x40
    if negative:
        n ^= mask
    if n >> 63:
        raise ValueError(f"numeric field {f!r} out of range")
    return ~n if negative else n


def _octal(f: bytes) -> int:
    """Octal text between leading and trailing NULs and spaces; what follows a NUL is ignored."""
    digits = f.strip(b" \0")
    if not digits.isdigit():
        digits = digits.partition(b"\0")[0]
        if digits.translate(None, b"01234567"):
            raise ValueError(f"bad numeric field {f!r}")
    return int(digits or b"0", 8)


def _decimal(v: bytes) -> int:
    """A signed 64-bit decimal, as Go's strconv.ParseInt reads it."""
    digits = v[1:] if v[:1] in (b"+", b"-") else v
    if not digits.isdigit() or not -(1 << 63) <= (n := int(v)) < 1 << 63:
        raise ValueError(f"bad number {v!r}")
    return n


def _pax_time(v: bytes) -> int:
    """A PAX time (``[-]seconds[.fraction]``) in nanoseconds, exactly."""
    sec, _, frac = v.partition(b".")
    ns = _decimal(sec) * _NS
    if frac:
        if not frac.isdigit():
            raise ValueError(f"bad time {v!r}")
        fraction = int(frac[:9].ljust(9, b"0"))
        ns += -fraction if sec.startswith(b"-") else fraction
    return ns


_STRING_RECORDS = (b"path", b"linkpath", b"uname", b"gname")
_SPARSE_RUN = (b"GNU.sparse.offset", b"GNU.sparse.numbytes")


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records (``"%d %s=%s\\n"``); repeated GNU 0.0 sparse pairs become ``GNU.sparse.map``."""
    records: dict[bytes, bytes] = {}
    runs: list[bytes] = []
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        nxt = pos + _decimal(data[pos:space]) if space > pos else -1
        if not space + 1 < nxt <= len(data) or data[nxt - 1] != 0x0A:
            raise ValueError("bad PAX record")
        key, eq, value = data[space + 1 : nxt - 1].partition(b"=")
        if not eq or not key:
            raise ValueError("bad PAX record")
        if b"\0" in (value if key in _STRING_RECORDS else key):
            raise ValueError(f"NUL byte in PAX record {key.decode(errors='backslashreplace')}")
        if key in _SPARSE_RUN:
            if key != _SPARSE_RUN[len(runs) % 2] or b"," in value:
                raise ValueError("bad GNU 0.0 sparse map")
            runs.append(value)
        elif value or key.startswith(_XATTR):  # containerd sets an xattr's empty value too
            records[key] = value
        else:  # an empty value unsets the key
            records.pop(key, None)
        pos = nxt
    if runs:
        records[b"GNU.sparse.map"] = b",".join(runs)
    return records


def _pax_sparse(pax: dict[bytes, bytes]) -> bool | None:
    """Whether a GNU sparse file's map is in 1.0 form (in the data) rather than 0.0 or 0.1 (in the
    records); None if the records describe no sparse file, or one of a version Go does not read."""
    version = (pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor"))
    if version == (b"1", b"0"):
        return True
    if version in ((b"0", b"0"), (b"0", b"1")) or version == (None, None) and b"GNU.sparse.map" in pax:
        return False
    return None


def _pairs(numbers: list[bytes]) -> list[tuple[int, int]]:
    values = [_decimal(n) for n in numbers]
    return list(zip(values[0::2], values[1::2]))


def _sparse_map_01(pax: dict[bytes, bytes]) -> list[tuple[int, int]]:
    """The GNU 0.0 or 0.1 sparse map of the PAX records: ``numblocks`` offset, length pairs."""
    count = _decimal(pax.get(b"GNU.sparse.numblocks", b""))
    numbers = pax[b"GNU.sparse.map"].split(b",") if b"GNU.sparse.map" in pax else []
    if len(numbers) != 2 * count:
        raise ValueError("sparse map does not match its count")
    return _pairs(numbers)


def _old_gnu_sparse(block: bytes, source: TarInput) -> tuple[list[tuple[int, int]], int]:
    """The runs and real size of an old GNU sparse header and its extension blocks."""
    runs = _sparse_structs(block[386:482], 4)
    extended = block[482]
    map_bytes = 4 * 24 + 1  # Go bounds the map's bytes: the header's part, then whole blocks
    while extended:
        map_bytes += _BLOCK
        if map_bytes >= _MAX_META:
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
            if want < 0:
                raise ValueError("negative sparse map count")
        else:
            numbers.append(line)
    return _pairs(numbers)


def _check_sparse(runs: list[tuple[int, int]], size: int, data_len: int) -> None:
    if size < 0:
        raise ValueError(f"negative size {size}")
    end = total = 0
    for offset, length in runs:
        if offset < end or length < 0 or offset + length > size:
            raise ValueError("sparse runs overlap or pass the end of the file")
        end = offset + length
        total += length
    if total != data_len:
        raise ValueError("sparse runs do not match the stored data")
