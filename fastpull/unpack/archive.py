"""Apply one uncompressed layer tar, read as a forward-only stream, to a directory.

``apply_layer(stream, root, layer=..., whiteouts=...)`` reads ``stream`` to its end and
recreates the tar's entries under ``root``, in one of three whiteout modes:

- ``"overlay"``: build a snapshot usable as an overlayfs lower dir, laid out like
  containerd's overlayfs snapshotter: ``dir/.wh.NAME`` becomes a 0/0 character device
  ``dir/NAME`` and ``dir/.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on ``dir``
  (``user.overlay.opaque`` when unprivileged: see ``fastpull.unpack.rootfs``).
- ``"keep"``: build one layer of a rootfs that ``fastpull.unpack.rootfs`` merges: whiteouts stay
  empty files with the tar's names, applied when the layers are merged.
- ``"apply"``: apply the layer in place on a rootfs holding the layers below. Whiteouts
  remove what lower layers put there and keep what this layer writes, wherever the marker
  sits in the tar (OCI image spec; containerd's ``archive.Apply``).

Safety: nothing is written outside ``root``. Names are cleaned lexically (a leading ``/``
is rooted at ``root``; a ``..`` that climbs out of it is refused); every parent directory
is resolved with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, so symlinks,
including absolute ones planted by earlier entries or layers, resolve inside ``root`` as
they would inside the container; the final component is created or changed through its
parent's descriptor and never followed. A refused entry raises ``UnsafeArchive``; a
malformed or unsupported header ``MalformedArchive`` (naming its byte offset). The partial tree
is left for the caller to discard.

Formats: what Go's archive/tar (containerd's reader) reads: v7, ustar, PAX (``x``, Solaris
``X``; global headers ignored), GNU and old GNU (long names, base-256 numbers, dumpdirs as
directories), sparse files in old GNU, PAX 0.0, 0.1 and 1.0 form (holes stay holes).

Memory: file contents go through one reused 1 MiB buffer; what is kept across entries is
per directory (64 cached descriptors, modes and times set at the end) plus, in "apply" mode,
the names this layer wrote in directories it did not create.

Linux >= 5.6 with ``/proc`` mounted. ``openat2`` is called through ctypes: it runs once per
directory (descriptors are cached), so the ~1 us call overhead is noise beside the file
creations it serves, and the module needs no compiled part.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from fastpull.errors import MalformedArchive, UnpackError, UnsafeArchive
from fastpull.unpack.rootfs import (
    OPAQUE_MARKER,
    OVERLAY_XATTRS,
    ROOTLESS_XATTR,
    can_chown,
    is_whiteout,
    rootless_owner,
    set_opaque,
)

__all__ = ["DEVICE_NODE", "ApplyStats", "LayerStream", "apply_layer"]

DEVICE_NODE = "device node (needs CAP_MKNOD)"
"""The ``ApplyStats.skipped`` reason of device nodes that could not be created."""


class LayerStream(Protocol):
    """An uncompressed layer tar: ``read(n)`` returns at most n bytes, empty at the end; a
    memoryview will do if later reads leave what it shows unchanged (no reused buffer).

    A ``readinto`` method, when present, is used for file contents.
    """

    def read(self, n: int, /) -> bytes | memoryview: ...


@dataclass
class ApplyStats:
    """What ``apply_layer`` did."""

    entries: int = 0
    """Tar entries applied, whiteouts included."""
    bytes: int = 0
    """File content bytes written (holes of sparse files excluded)."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Entries or attributes left out, counted by reason."""
    implied_dirs: set[str] = field(default_factory=set)
    """Parent directories the layer used without listing them (created 0755, or as in
    ``lower``): when layers are merged, such a directory keeps the lower layer's metadata."""


def apply_layer(
    stream: LayerStream,
    root: Path,
    *,
    layer: str,
    whiteouts: Literal["overlay", "keep", "apply"],
    lower: Path | None = None,
) -> ApplyStats:
    """Apply the layer tar read from ``stream`` to the directory ``root``.

    ``layer`` names the layer (its digest) in errors. With ``whiteouts="overlay"``, ``root``
    is a fresh snapshot directory and ``lower``, if given, holds the layers below merged
    (e.g. the rootfs being built alongside): directories this layer implies without listing
    them take their mode, owner, times and xattrs from it, as containerd's ``WithParents``
    does; without it they are made 0755 root-owned. With ``whiteouts="keep"``, ``root`` is a
    fresh directory too. With ``whiteouts="apply"``, ``root`` holds the layers below, fully
    applied.

    Owners are set with CAP_CHOWN, else recorded in ``user.rootlesscontainers`` (see
    ``fastpull.unpack.rootfs``); device nodes and xattrs this process may not create are skipped
    and counted in ``ApplyStats.skipped`` (``DEVICE_NODE`` for the nodes). Raises
    ``UnsafeArchive`` for a refused entry, ``MalformedArchive`` for a malformed one and
    ``UnpackError`` when the target filesystem fails.
    """
    if whiteouts not in ("overlay", "keep", "apply"):
        raise ValueError(f"whiteouts must be 'overlay', 'keep' or 'apply', not {whiteouts!r}")
    if lower is not None and whiteouts != "overlay":
        raise ValueError("lower is only used with whiteouts='overlay'")
    source = _Input(stream)
    applier = _Applier(source, Path(root), layer, whiteouts, lower)
    try:
        for entry in _entries(source, layer):
            applier.apply(entry)
        applier.finish()
    except EOFError:
        raise MalformedArchive(layer, source.entry_at, "the archive ends inside this entry") from None
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno in _ARCHIVE_ERRNOS:
            raise UnsafeArchive(layer, applier.entry, why) from err
        raise UnpackError(os.path.join(root, applier.entry.lstrip("/")), why) from err
    finally:
        applier.close()
    return applier.stats


# --- openat2 ---------------------------------------------------------------------------

_SYS_OPENAT2 = 437  # one number on every architecture since Linux 5.6
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_IN_ROOT = 0x10

_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)


def _how(flags: int, resolve: int) -> bytes:
    """A ``struct open_how`` (flags, mode, resolve: three u64) that resolves inside the
    directory it starts from, never through /proc magic links."""
    resolve |= _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS
    return struct.pack("=QQQ", flags | os.O_CLOEXEC, 0, resolve)


_PARENT = _how(os.O_PATH | os.O_DIRECTORY, 0)
"""An entry's parent directory: symlinks on the way resolve inside the root."""
_REAL_PATH = _how(os.O_PATH | os.O_DIRECTORY, _RESOLVE_NO_SYMLINKS)
"""A directory by its canonical (symlink-free) path."""
_REAL_DIR = _how(os.O_RDONLY | os.O_DIRECTORY, _RESOLVE_NO_SYMLINKS)
"""The same, opened for listing."""
_LOWER_DIR = _how(os.O_RDONLY | os.O_DIRECTORY, 0)
"""A directory in ``lower``, resolved the way the merged view shows it."""


def _openat2(dirfd: int, path: str, how: bytes) -> int:
    """``openat2(dirfd, path, how)``, raising ``OSError`` as ``os.open`` does."""
    raw = os.fsencode(path)
    for _ in range(32):
        fd = _syscall(_SYS_OPENAT2, dirfd, raw, how, len(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a rename raced the lookup
            break
    raise OSError(err, os.strerror(err), path)


# --- the stream ------------------------------------------------------------------------

_BLOCK = 512
_CHUNK = 1 << 20
"""Largest single read and write of file contents."""
_READAHEAD = 64 << 10
"""Read-ahead for headers and small files."""
_MAX_META = 1 << 20
"""Largest PAX header, GNU long name or sparse map accepted (Go's archive/tar limit)."""


class _Input:
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
_REGULAR, _LINK, _SYMLINK, _CHAR, _BLOCKDEV, _DIR, _FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_GLOBAL = b"g"
_TRAILING = b"x"
"""Extension headers that no entry follows: the archive ended."""
_NO_OWNER = 0xFFFFFFFF
_NO_DATA = frozenset((_LINK, _SYMLINK, _CHAR, _BLOCKDEV, _DIR, _FIFO))
_XATTR = b"SCHILY.xattr."
_TIME_LIMIT = 1 << 63
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsdecode, inlined


class _Entry:
    """One tar member, extension headers merged.

    ``type`` is one of the ``_REGULAR``.. ``_FIFO`` flags (contiguous and sparse files are
    ``_REGULAR``), ``_GLOBAL``, or an unsupported flag. ``size`` is the file's logical size;
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


def _entries(source: _Input, layer: str) -> Iterator[_Entry]:
    """The tar's members in order, read the way Go's archive/tar (containerd, moby) does.

    After each entry is yielded, whatever the consumer left of its data is skipped. Global
    PAX headers are yielded as ``_GLOBAL`` entries and not merged (Go ignores them too), and
    extension headers that the end of the archive follows as one ``_TRAILING`` entry (Go reads
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
                e = _Entry()
                e.type, e.name = _TRAILING, ""
                yield e
            source.drain()
            return
        try:
            fields = _HEADER.unpack(block)
            if not _checksum_ok(block, _num(fields[6])):
                raise ValueError("header checksum mismatch")
            typ, size = fields[7], _num(fields[4])
            if typ in (b"x", b"X", _GLOBAL, b"L", b"K"):
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
                    e = _Entry()
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
    source: _Input,
) -> tuple[_Entry, int]:
    """The entry a header describes, its extension headers merged (GNU long names win over
    PAX, which wins over the header), and the offset of the next header. ``phys`` is the
    header's size field. Reads a sparse map, if any; raises ValueError on malformed fields."""
    name, mode, uid, gid, _, mtime, _, flag, link, magic, _, _, devmajor, devminor, prefix = fields
    e = _Entry()
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
        typ = _DIR if raw_name.endswith(b"/") else _REGULAR
    elif typ in (b"7", b"S"):
        typ = _REGULAR
    if typ in _NO_DATA:
        phys = 0
    elif typ == b"D":  # a GNU dumpdir: a directory; its data (a listing for incremental restores) is skipped
        typ = _DIR
    e.type = typ
    e.uid, e.gid = uid, gid
    e.mode = _num(mode) & 0o7777
    # Times before the epoch or past 2262 become the epoch, as containerd does.
    e.mtime_ns = mtime_ns = mtime_ns if 0 <= mtime_ns < _TIME_LIMIT else 0
    e.atime_ns = atime_ns if mtime_ns < atime_ns < _TIME_LIMIT else mtime_ns
    e.xattrs = xattrs
    if typ in (_CHAR, _BLOCKDEV):
        e.devmajor, e.devminor = _num(devmajor), _num(devminor)
        if not (0 <= e.devmajor < 1 << 32 and 0 <= e.devminor < 1 << 32):
            raise ValueError("device number out of range")
    e.size = phys
    e.sparse = None
    if flag == b"S":
        e.sparse, e.size = _old_gnu_sparse(block, source)
    data_start = source.pos
    if pax and typ == _REGULAR and _is_pax_sparse(pax):
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


def _old_gnu_sparse(block: bytes, source: _Input) -> tuple[list[tuple[int, int]], int]:
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


def _sparse_map_10(source: _Input, limit: int) -> list[tuple[int, int]]:
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


# --- the applier -----------------------------------------------------------------------

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FD = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_FD = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_MARKER = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHED_DIRS = 64
_MAX_HOPS = 40
_GONE = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP))
_ARCHIVE_ERRNOS = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL))
"""Errors the archive's content causes (a parent that is a file, a symlink loop...)."""
_NODE_KINDS = {_CHAR: stat.S_IFCHR, _BLOCKDEV: stat.S_IFBLK, _FIFO: stat.S_IFIFO}
_DEFAULT_ACL = "system.posix_acl_default"
"""A directory's default ACL: files created in it take their mode from it, not from the umask."""


class _Applier:
    """Applies entries under one root, through directory descriptors only.

    Parent directory descriptors are cached by name (LRU); a removal that could change
    what a cached name resolves to (a directory or symlink removed) drops the whole cache
    before the next entry. Descriptors are closed only between entries.

    In "apply" mode, what this layer wrote is tracked by canonical (symlink-free) path so
    that whiteouts spare it: ``_new`` holds the directories this layer created (everything
    under them is its own), ``_touched`` the other paths it wrote and their ancestors.
    """

    def __init__(self, source: _Input, root: Path, layer: str, whiteouts: str, lower: Path | None):
        self.layer = layer
        self.stats = ApplyStats()
        self.entry = ""
        """Name of the entry being applied, for errors."""
        self._in = source
        self._overlay = whiteouts == "overlay"
        self._keep = whiteouts == "keep"
        self._track = whiteouts == "apply"
        self._chown = can_chown()
        self._cache: dict[str, tuple[int, str]] = {}
        self._stale = False
        self._dirs: dict[str, tuple[int, int, int]] = {}
        """Directory modes and times, set once the layer is in (children change mtimes)."""
        self._new: set[str] = set()
        self._touched: set[str] = set()
        self._lower = -1
        self._root = _open_dir(root)
        try:
            os.close(_openat2(self._root, ".", _PARENT))
            self._root_prefix = os.readlink(f"/proc/self/fd/{self._root}").rstrip("/") + "/"
            if lower is not None:
                self._lower = _open_dir(lower)
            # Fresh: every directory under the root is this layer's, none setgid (directory modes
            # are set at the end) or with a default ACL, so a new file gets this process's owner and
            # its mode less the umask; files are then created with their mode and chowned only when
            # their owner is another. Not for setuid, setgid and sticky bits (chown clears them) or
            # bits the umask drops: those files are chmodded as before.
            self._fresh = not self._track and _plain_empty_dir(self._root)
            self._ids = (os.geteuid(), os.getegid()) if self._chown else None
            self._not_at_create = 0o7000 | _umask()
        except OSError as err:
            os.close(self._root)
            why = err.strerror or str(err)
            if err.errno == errno.ENOSYS:
                why = "openat2 is unavailable (Linux >= 5.6 needed; a seccomp filter may block it)"
            raise UnpackError(str(root), why) from err
        except BaseException:
            os.close(self._root)
            raise

    def close(self) -> None:
        for fd, _ in self._cache.values():
            os.close(fd)
        self._cache.clear()
        if self._lower >= 0:
            os.close(self._lower)
        os.close(self._root)

    # -- entries --

    def apply(self, e: _Entry) -> None:
        self._checkpoint()
        self.entry = e.name
        t = e.type
        if t == _GLOBAL:
            return self._skip("PAX global header (ignored, as containerd does)")
        if t == _TRAILING:
            return self._skip("extension header that the end of the archive follows (ignored, as containerd does)")
        if t != _REGULAR and t not in _NO_DATA:
            return self._skip(f"unsupported entry type {t.decode('latin-1')!r}")
        name = self._clean(e.name)
        if not name:
            return self._skip("entry names the root directory")
        parent, _, base = name.rpartition("/")
        if base.startswith(".wh."):
            return self._whiteout(parent, base, e)
        pfd, pcanon = self._dir(parent)
        fresh = False
        if t == _REGULAR:
            self._file(pfd, base, e)
        elif t == _DIR:
            fresh = self._mkdir(pfd, pcanon, base, name, e)
        elif t == _SYMLINK:
            self._symlink(pfd, base, e)
        elif t == _LINK:
            self._hardlink(pfd, base, name, e)
        elif not self._node(pfd, base, e):
            return
        self.stats.entries += 1
        if self._track:
            self._mark(pcanon, base, fresh)

    def finish(self) -> None:
        """Set directory modes and times, deepest last-listed first."""
        for name, (mode, atime_ns, mtime_ns) in reversed(self._dirs.items()):
            self._checkpoint()
            self.entry = name
            parent, _, base = name.rpartition("/")
            try:
                fd = os.open(base, _DIR_FD, dir_fd=self._dir(parent, create=False)[0])
            except OSError as err:
                if err.errno in _GONE:  # removed or replaced later in the layer
                    continue
                raise
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(atime_ns, mtime_ns))
            finally:
                os.close(fd)

    def _file(self, pfd: int, base: str, e: _Entry) -> None:
        mode = e.mode
        # Created with its final mode if that is exact and leaves it writable by its owner (user.*
        # xattrs need that); else 0600 and fchmod at the end.
        chmod = not (self._fresh and mode & 0o200 and not mode & self._not_at_create)
        create = 0o600 if chmod else mode
        try:
            fd = os.open(base, _CREATE, create, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base)
            fd = os.open(base, _CREATE, create, dir_fd=pfd)
        try:
            if e.sparse is None:
                if e.size:
                    self._in.copy_to(fd, e.size, 0)
                    self.stats.bytes += e.size
            else:
                for offset, length in e.sparse:
                    self._in.copy_to(fd, length, offset)
                    self.stats.bytes += length
                os.ftruncate(fd, e.size)
            if not self._fresh or (e.uid, e.gid) != self._ids:
                self._own(fd, e.uid, e.gid)
            if e.xattrs:
                self._set_xattrs(fd, e.xattrs)
            if chmod:
                os.fchmod(fd, mode)  # after chown, which clears setuid/setgid
            os.utime(fd, ns=(e.atime_ns, e.mtime_ns))
        finally:
            os.close(fd)

    def _mkdir(self, pfd: int, pcanon: str, base: str, name: str, e: _Entry) -> bool:
        """Create or merge a directory; whether it is new."""
        fresh = True
        opaque = False
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                fresh = False
            else:  # a directory replacing a whiteout still hides the lower one
                opaque = self._overlay and is_whiteout(st)
                self._clear(pfd, base, st)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FD, dir_fd=pfd)
        old = self._cache.pop(name, None)
        if old is not None:
            os.close(old[0])
        self._cache[name] = (fd, _join(pcanon, base) if self._track else "")
        self._own(fd, e.uid, e.gid)
        if e.xattrs:
            self._set_xattrs(fd, e.xattrs)
        if opaque:
            set_opaque(fd)
        self._dirs[name] = (e.mode, e.atime_ns, e.mtime_ns)
        self.stats.implied_dirs.discard(name)
        return fresh

    def _symlink(self, pfd: int, base: str, e: _Entry) -> None:
        if "\0" in e.linkname or not e.linkname:
            raise self._malformed("empty symlink target or NUL byte in it")
        try:
            os.symlink(e.linkname, base, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base)
            os.symlink(e.linkname, base, dir_fd=pfd)
        self._node_attrs(pfd, base, e, chmod=False)

    def _hardlink(self, pfd: int, base: str, name: str, e: _Entry) -> None:
        """Link to an entry earlier in this layer or a file already in the root.

        The target's parent resolves inside the root; a symlink target is linked itself,
        not followed. The link keeps the target's owner, mode and times (as GNU tar does).
        """
        target = self._clean(e.linkname)
        if not target:
            raise UnsafeArchive(self.layer, self.entry, "hardlink to the root directory")
        if target == name:
            return
        tparent, _, tbase = target.rpartition("/")
        tfd = self._dir(tparent)[0]
        try:
            try:
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                src = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
                dst = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                if (src.st_dev, src.st_ino) == (dst.st_dev, dst.st_ino):
                    return
                self._clear(pfd, base, dst)
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            why = f"hardlink target {e.linkname!r} does not exist"
            raise self._malformed(why) from None
        except PermissionError as err:  # EPERM: the target is a directory
            why = f"cannot hardlink to {e.linkname!r}: {err.strerror}"
            raise UnsafeArchive(self.layer, self.entry, why) from None

    def _node(self, pfd: int, base: str, e: _Entry) -> bool:
        """Create a device node or fifo; False if not permitted here (skipped)."""
        kind = _NODE_KINDS[e.type]
        dev = 0 if kind == stat.S_IFIFO else os.makedev(e.devmajor, e.devminor)
        try:
            try:
                os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
            except FileExistsError:
                self._clear(pfd, base)
                os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        except PermissionError:
            self._skip(DEVICE_NODE)
            return False
        self._node_attrs(pfd, base, e, chmod=True)
        return True

    def _node_attrs(self, pfd: int, base: str, e: _Entry, *, chmod: bool) -> None:
        """Owner, xattrs, mode and times of a node that must not be opened or followed."""
        self._own(f"/proc/self/fd/{pfd}/{base}", e.uid, e.gid, follow=False)
        if e.xattrs:
            self._set_xattrs(f"/proc/self/fd/{pfd}/{base}", e.xattrs, follow=False)
        if chmod:  # Linux has no lchmod: chmod the O_PATH descriptor through /proc
            fd = os.open(base, _NODE_FD, dir_fd=pfd)
            try:
                os.chmod(f"/proc/self/fd/{fd}", e.mode)
            finally:
                os.close(fd)
        os.utime(base, ns=(e.atime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _set_xattrs(self, target: int | str, xattrs: dict[str, bytes], *, follow: bool = True) -> None:
        for key, value in xattrs.items():
            if "\0" in key:
                raise self._malformed("NUL byte in an xattr name")
            if key.startswith(OVERLAY_XATTRS):
                self._skip(f"xattr {key.partition('.')[0]}.overlay.* from the archive")
                continue
            if key == _DEFAULT_ACL:
                self._fresh = False
            try:
                os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                    raise
                self._skip(f"xattr {key.partition('.')[0]}.*: {err.strerror}")

    # -- whiteouts --

    def _whiteout(self, parent: str, base: str, e: _Entry) -> None:
        if base.startswith(".wh..wh.") and base != OPAQUE_MARKER:
            return self._skip("AUFS metadata")
        hidden = base[4:]
        if hidden in ("", ".", ".."):
            raise self._malformed("whiteout names no file in its directory")
        pfd, pcanon = self._dir(parent)
        if self._keep:
            os.close(os.open(base, _MARKER, 0o600, dir_fd=pfd))
        elif base == OPAQUE_MARKER:
            if self._overlay:
                set_opaque(f"/proc/self/fd/{pfd}")
            else:
                fd = os.open(".", _DIR_FD, dir_fd=pfd)
                try:
                    names = os.listdir(fd)
                finally:
                    os.close(fd)
                self._hide_lower(pcanon, names)
        elif self._overlay:
            self._whiteout_node(pfd, hidden, e)
        else:
            self._hide_lower(pcanon, [hidden])
        self.stats.entries += 1

    def _whiteout_node(self, pfd: int, hidden: str, e: _Entry) -> None:
        """A 0/0 character device; if this layer already has that name, keep it (a
        directory becomes opaque so that the lower one stays hidden)."""
        try:
            os.mknod(hidden, stat.S_IFCHR, 0, dir_fd=pfd)
        except FileExistsError:
            if stat.S_ISDIR(os.stat(hidden, dir_fd=pfd, follow_symlinks=False).st_mode):
                set_opaque(f"/proc/self/fd/{pfd}/{hidden}", follow_symlinks=False)
            return
        self._own(f"/proc/self/fd/{pfd}/{hidden}", e.uid, e.gid, follow=False)

    def _hide_lower(self, dcanon: str, names: Iterable[str]) -> None:
        """Remove what lower layers put at each ``dcanon/name``, keeping this layer's entries."""
        todo = [(dcanon, list(names))]
        while todo:
            dcanon, names = todo.pop()
            if dcanon in self._new:
                continue
            try:
                dfd = _openat2(self._root, dcanon or ".", _REAL_DIR)
            except OSError as err:
                if err.errno in _GONE:
                    continue
                raise
            try:
                for name in names:
                    path = _join(dcanon, name)
                    if path in self._new:
                        continue
                    if path not in self._touched:
                        try:
                            _rmtree(dfd, name)
                        except FileNotFoundError:  # nothing to hide
                            continue
                        self._stale = True
                        continue
                    try:
                        sub = os.open(name, _DIR_FD, dir_fd=dfd)
                    except OSError as err:  # not a directory: this layer's own
                        if err.errno in _GONE:
                            continue
                        raise
                    try:
                        todo.append((path, os.listdir(sub)))
                    finally:
                        os.close(sub)
            finally:
                os.close(dfd)

    def _mark(self, pcanon: str, base: str, fresh: bool) -> None:
        path = _join(pcanon, base)
        if fresh:
            self._new.add(path)
        if pcanon in self._new:
            return
        touched = self._touched
        touched.add(path)
        while pcanon and pcanon not in touched:
            touched.add(pcanon)
            pcanon = pcanon.rpartition("/")[0]

    # -- names and directories --

    def _clean(self, raw: str) -> str:
        """The entry name relative to the root ("" for the root itself)."""
        if "\0" in raw:
            raise self._malformed("NUL byte in a name")
        if raw.startswith("/"):  # rooted at the root; ".." stops there
            return posixpath.normpath("/" + raw.lstrip("/")).lstrip("/")
        if raw.startswith(".") or raw.endswith("/") or "//" in raw or "/." in raw:
            raw = posixpath.normpath(raw)
            if raw == ".." or raw.startswith("../"):
                raise UnsafeArchive(self.layer, self.entry, "'..' climbs out of the root")
            if raw == ".":
                return ""
        return raw

    def _dir(self, rel: str, create: bool = True) -> tuple[int, str]:
        """Descriptor and canonical path of directory ``rel``, resolved inside the root;
        missing directories are created when ``create``."""
        if not rel:
            return self._root, ""
        hit = self._cache.pop(rel, None)
        if hit is None:
            try:
                fd = _openat2(self._root, rel, _PARENT)
            except FileNotFoundError:
                if not create:
                    raise
                hit = self._make_dirs(rel)
            else:
                hit = (fd, self._canon(fd) if self._track else "")
        self._cache[rel] = hit
        return hit

    def _canon(self, fd: int) -> str:
        real = os.readlink(f"/proc/self/fd/{fd}") + "/"
        if not real.startswith(self._root_prefix):
            raise UnpackError(real, f"resolved outside the root {self._root_prefix}")
        return real[len(self._root_prefix) : -1]

    def _make_dirs(self, rel: str) -> tuple[int, str]:
        """Walk ``rel`` from the root one component at a time, creating what is missing
        and following symlinks (dangling ones too) inside the root, as containerd does."""
        todo = rel.split("/")[::-1]
        names: list[str] = []
        cur = os.dup(self._root)
        hops = 0
        try:
            while todo:
                comp = todo.pop()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if names:
                        names.pop()
                        fd = _openat2(self._root, "/".join(names) or ".", _REAL_PATH)
                        os.close(cur)
                        cur = fd
                    continue
                try:
                    fd = os.open(comp, _NODE_FD, dir_fd=cur)
                except FileNotFoundError:
                    fd = self._implied_dir(cur, "/".join(names), comp)
                else:
                    mode = os.fstat(fd).st_mode
                    if not stat.S_ISDIR(mode):
                        os.close(fd)
                        if not stat.S_ISLNK(mode):
                            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
                        hops += 1
                        if hops > _MAX_HOPS:
                            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                        target = os.readlink(comp, dir_fd=cur)
                        if target.startswith("/"):
                            names.clear()
                            fd = os.dup(self._root)
                            os.close(cur)
                            cur = fd
                        todo.extend(target.split("/")[::-1])
                        continue
                os.close(cur)
                cur = fd
                names.append(comp)
        except BaseException:
            os.close(cur)
            raise
        return cur, "/".join(names)

    def _implied_dir(self, pfd: int, pcanon: str, base: str) -> int:
        """Create a parent directory the archive did not list: 0755, or as in ``lower``."""
        os.mkdir(base, 0o755, dir_fd=pfd)
        fd = os.open(base, _DIR_FD, dir_fd=pfd)
        try:
            os.fchmod(fd, 0o755)
            canon = _join(pcanon, base)
            self.stats.implied_dirs.add(canon)
            if self._lower >= 0:
                self._inherit(fd, canon)
            if self._track:
                self._mark(pcanon, base, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _inherit(self, fd: int, canon: str) -> None:
        try:
            lfd = _openat2(self._lower, canon, _LOWER_DIR)
        except OSError as err:
            if err.errno in _GONE:
                return
            raise
        try:
            st = os.fstat(lfd)
            if self._chown:  # else the lower directory's user.rootlesscontainers is copied below
                os.fchown(fd, st.st_uid, st.st_gid)
            for key in os.listxattr(lfd):
                if not key.startswith(OVERLAY_XATTRS):
                    self._set_xattrs(fd, {key: os.getxattr(lfd, key)})
            self._dirs[canon] = (stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns)
        finally:
            os.close(lfd)

    def _clear(self, pfd: int, base: str, st: os.stat_result | None = None) -> None:
        """Remove what is at ``base`` so that an entry can replace it."""
        if st is None:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            _rmtree(pfd, base)
            self._stale = True
        else:
            os.unlink(base, dir_fd=pfd)
            self._stale |= stat.S_ISLNK(st.st_mode)

    def _checkpoint(self) -> None:
        """Between entries: drop the cache if stale, else trim it to size."""
        cache = self._cache
        if self._stale:
            for fd, _ in cache.values():
                os.close(fd)
            cache.clear()
            self._stale = False
        while len(cache) > _CACHED_DIRS:
            os.close(cache.pop(next(iter(cache)))[0])

    def _skip(self, reason: str) -> None:
        self.stats.skipped[reason] += 1

    def _own(self, target: int | str, uid: int, gid: int, *, follow: bool = True) -> None:
        """Give ``target`` its owner; where that is not permitted, record it in
        ``user.rootlesscontainers`` (possible on files and directories only)."""
        if self._chown:
            try:
                os.chown(target, uid, gid, follow_symlinks=follow)
                return
            except OSError as err:  # EINVAL: an id this user namespace does not map
                if err.errno not in (errno.EPERM, errno.EINVAL):
                    raise
        record = rootless_owner(uid, gid)
        if record is not None:  # skipped, and counted, where user xattrs are refused (symlinks, devices)
            self._set_xattrs(target, {ROOTLESS_XATTR: record}, follow=follow)

    def _malformed(self, why: str) -> MalformedArchive:
        return MalformedArchive(self.layer, self._in.entry_at, why, self.entry)


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise UnpackError(str(path), err.strerror or str(err)) from err


def _plain_empty_dir(fd: int) -> bool:
    """Whether the directory ``fd`` is empty, not setgid and without a default ACL."""
    if os.fstat(fd).st_mode & stat.S_ISGID:
        return False
    try:
        os.getxattr(fd, _DEFAULT_ACL)
        return False
    except OSError as err:
        if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            return False
    with os.scandir(fd) as it:
        return next(it, None) is None


def _umask() -> int:
    """This process's umask (read, not set: ``os.umask`` would change it for every thread)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o777  # unknown: no file is created with its final mode


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _rmtree(dfd: int, name: str) -> None:
    """Remove ``name`` under ``dfd`` and all below it, never following a symlink, with
    constant descriptors and stack depth."""
    try:
        os.unlink(name, dir_fd=dfd)
        return
    except IsADirectoryError:
        pass
    fd = os.open(name, _DIR_FD, dir_fd=dfd)
    stack = [(name, _unlink_files(fd))]  # (directory, its subdirectories left to remove)
    try:
        while True:
            pending = stack[-1][1]
            if pending:
                sub = pending.pop()
                child = os.open(sub, _DIR_FD, dir_fd=fd)
                os.close(fd)
                fd = child
                stack.append((sub, _unlink_files(fd)))
                continue
            done = stack.pop()[0]
            if not stack:
                break
            up = os.open("..", _DIR_FD, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(done, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dfd)


def _unlink_files(fd: int) -> list[str]:
    """Unlink everything but subdirectories in ``fd``; the subdirectories' names."""
    with os.scandir(fd) as it:
        entries = list(it)
    subdirs = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(entry.name)
        else:
            os.unlink(entry.name, dir_fd=fd)
    return subdirs
