"""The fault matrix: each fault a pull can meet (tests/faultmatrix.py), in each phase of the pull.

A cell ends either identical to a clean pull, or in one FastpullError naming the digest, URL or
path with nothing corrupt committed, after which the same pull (fault lifted) completes and fetches
only what was missing. Each cell records what it proved; conftest.py writes docs/faults.md from
the run.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tmpfs, wait_until
from faultmatrix import DOC, FAULTS, NOT_APPLICABLE, PHASES
from faultserver import FaultRegistry

from fastpull import DigestMismatch, FetchOptions, Puller, RegistryError, StoreError, UnpackError
from fastpull.content.core import ChunkBitmap
from fastpull.content.layout import REF_NAME
from fastpull.http.policy import RetryPolicy
from fastpull.http.transport import Transport
from fastpull.registry.client import RegistryClient
from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.testbed.reference import describe
from fastpull.testbed.registry import LocalRegistry

MiB = 1 << 20
CHUNK = 256 * 1024
REPO = "matrix/app"
FAST = dict(chunk_size=CHUNK, chunks_per_blob=4, retries=5, backoff_base=0.02, backoff_max=0.5,
            stall_timeout=1.0, straggler_min_age=60.0)
"""Fetch options of the cells: small chunks, quick retries, a 1 s stall timeout, no straggler cuts."""


def cell_params(faults, phases=tuple(PHASES)):
    """pytest params ``(fault, phase)``, each marked as the matrix cell it proves."""
    return [pytest.param(f, p, id=f"{f}-{p}", marks=pytest.mark.fault_cell(f, p))
            for f in faults for p in phases if (f, p) not in NOT_APPLICABLE]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    specs = [LayerSpec(2 * MiB, files=4), LayerSpec(256 * 1024, content="text", files=30)]
    return build_image(specs, tmp_path_factory.mktemp("matrix-image"), seed=23)


@pytest.fixture
def server(image):
    with FaultRegistry() as srv:
        srv.add_image(REPO, "v1", image)
        yield srv


@pytest.fixture(scope="module")
def clean_rootfs(image, tmp_path_factory) -> dict:
    """What a fault-free pull unpacks (``describe``d)."""
    where = tmp_path_factory.mktemp("clean")
    with FaultRegistry() as srv:
        srv.add_image(REPO, "v1", image)
        with _puller(srv.host) as puller:
            puller.pull(f"{srv.host}/{REPO}:v1", where / "layout", rootfs=where / "rootfs")
    return describe(where / "rootfs")


def _client(host: str, timeout: float = 2.0, attempts: int = 4) -> RegistryClient:
    """A client with quick retries; its whole-request timeout cuts a stalled manifest."""
    transport = Transport(retry=RetryPolicy(attempts=attempts, base_delay=0.02, max_delay=5.0))
    return RegistryClient(host, credentials=None, timeout=timeout, transport=transport)


def _puller(host: str, client: RegistryClient | None = None, **options) -> Puller:
    return Puller(FetchOptions(**{**FAST, **options}), clients=[client or _client(host)], unpack_workers=1)


def _stored(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _gets(srv: FaultRegistry, digest: str) -> list:
    return [r for r in srv.requests_for(digest) if r.method == "GET"]


def _range_starts(srv: FaultRegistry, digest: str) -> list[int]:
    return [int(r.range.split("=")[1].split("-")[0]) for r in _gets(srv, digest) if r.range]


class Cell:
    """One cell's pull: where it goes, what it fetches, and the checks of its outcome."""

    def __init__(self, request, image, tmp_path: Path, clean_rootfs):
        fault, phase = request.node.get_closest_marker("fault_cell").args
        self.fault, self.phase, self.image = fault, phase, image
        self._node = request.node
        self._clean_rootfs = clean_rootfs
        self.layout = tmp_path / "layout"
        self.rootfs = tmp_path / "rootfs" if phase == "unpack" else None
        self.big = image.layers[0]
        self.target = image.manifest_digest if phase == "manifest" else self.big.digest
        """What the fault hits: the manifest, or the big layer (followed by an unpacker when unpacking)."""
        self.stats = None
        self._outcome: list[str] = []

    def ref(self, host: str) -> str:
        return f"{host}/{REPO}:v1"

    def pull(self, host: str, client: RegistryClient | None = None, **options):
        """Pull with the cell's options (``options`` override them); engine stats land in ``stats``."""
        with _puller(host, client, **options) as puller:
            try:
                return puller.pull(self.ref(host), self.layout, rootfs=self.rootfs)
            finally:
                self.stats = puller.engine.stats

    def identical(self, host: str, *, record: bool = True) -> None:
        """The layout (and rootfs) equal a clean pull's; record it."""
        for desc in self.image.blobs:
            assert _stored(self.layout, desc.digest).read_bytes() == self.image.blob_path(desc.digest).read_bytes()
        assert _stored(self.layout, self.image.manifest_digest).read_bytes() == self.image.manifest
        (entry,) = json.loads((self.layout / "index.json").read_text())["manifests"]
        assert (entry["digest"], entry["annotations"][REF_NAME]) == (self.image.manifest_digest, self.ref(host))
        assert not list((self.layout / ".fastpull" / "ingest").iterdir())
        if self.rootfs is not None:
            assert describe(self.rootfs) == self._clean_rootfs
            assert not list(self.rootfs.parent.glob(f".{self.rootfs.name}.fastpull-*"))
        if record:
            self.record("identical")

    def failed(self, error: BaseException, kind: type, *names: str) -> None:
        """``error`` is a ``kind`` naming each of ``names``, and nothing corrupt is visible."""
        assert type(error) is kind, repr(error)
        for name in names:
            assert name in str(error), (name, str(error))
        blobs = self.layout / "blobs" / "sha256"
        for path in blobs.iterdir() if blobs.exists() else ():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        index = self.layout / "index.json"
        assert not index.exists() or json.loads(index.read_text())["manifests"] == []
        if self.rootfs is not None:
            assert not self.rootfs.exists() or not any(self.rootfs.iterdir())
            assert not list(self.rootfs.parent.glob(f".{self.rootfs.name}.fastpull-*"))
        self.record(f"`{kind.__name__}`")

    def missing_bytes(self) -> dict[str, int]:
        """Bytes of each blob not yet in the layout: all of it, or the chunks its ingest lacks."""
        missing = {}
        for desc in self.image.blobs:
            bitmap_path = self.layout / ".fastpull" / "ingest" / desc.digest.split(":")[1] / "bitmap"
            if _stored(self.layout, desc.digest).exists():
                missing[desc.digest] = 0
            elif bitmap_path.exists():
                bitmap = ChunkBitmap(bitmap_path)
                missing[desc.digest] = sum(bitmap.chunk_span(i)[1] - bitmap.chunk_span(i)[0] for i in bitmap.missing())
                bitmap.close()
            else:
                missing[desc.digest] = desc.size
        return missing

    def resumes(self, srv: FaultRegistry, host: str | None = None) -> None:
        """With the fault lifted, the same pull completes fetching only what was missing."""
        srv.clear_faults()
        missing = self.missing_bytes()
        srv.clear()
        self.pull(host or srv.host)
        self.identical(host or srv.host, record=False)
        for digest, left in missing.items():
            assert srv.bytes_served(digest) <= left, (digest, srv.bytes_served(digest), left)
        self.record("resumed")

    def record(self, text: str, *, replace: bool = False) -> None:
        """Add ``text`` to what the cell proved (or make it all of it)."""
        if replace:
            self._outcome.clear()
        self._outcome.append(text)
        self._node.user_properties = [p for p in self._node.user_properties if p[0] != "fault_outcome"]
        self._node.user_properties.append(("fault_outcome", ", ".join(self._outcome).replace(":,", ":")))


@pytest.fixture
def cell(request, image, tmp_path, clean_rootfs) -> Cell:
    return Cell(request, image, tmp_path, clean_rootfs)


# ---- transient faults: the pull completes, identical ---------------------------------------

TRANSIENT = {
    "reset": lambda srv, digest: srv.reset_first(digest, 2),
    "storm": lambda srv, digest: srv.fail_first(digest, 3, status=503),
    "truncated": lambda srv, digest: srv.truncate_first(digest, 2),
    "length-long": lambda srv, digest: srv.wrong_length(digest, 100, first=2),
    "stall": lambda srv, digest: srv.stall_after(digest, 100, first=1),
}


@pytest.mark.parametrize(("fault", "phase"), cell_params(TRANSIENT))
def test_transient_fault_ends_identical(cell, server, fault, phase):
    TRANSIENT[fault](server, cell.target)
    cell.pull(server.host)
    cell.identical(server.host)
    if phase == "manifest":
        assert len(_gets(server, cell.target)) > 1  # the fault was met, and the GET sent again
        return
    # Retried (a range whose bytes all arrived before the fault needs no new request), and for a
    # stall by the stall timeout: the straggler logic is off.
    assert cell.stats.retries >= 1 and cell.stats.stragglers_reissued == 0
    if fault == "truncated":  # half a range came (a reset may lose some of it): the rest is asked from there
        assert any(start % CHUNK == CHUNK // 2 for start in _range_starts(server, cell.target))


# The bytes past the short Content-Length reach the next request on the kept-alive connection as
# its status line: curl error 8 (Invalid status line), which the HTTP policy retries.
@pytest.mark.parametrize(("fault", "phase"), cell_params(["length-short"], ["blob", "unpack"]))
def test_short_content_length_is_requested_again(cell, server, fault, phase):
    server.wrong_length(cell.target, -100, first=2)
    cell.pull(server.host)
    cell.identical(server.host)
    assert cell.stats.retries >= 2


@pytest.mark.parametrize(("fault", "phase"), cell_params(["length-short", "corrupt"], ["manifest"]))
def test_bad_manifest_body_fails_its_digest(cell, server, fault, phase):
    if fault == "corrupt":
        server.corrupt(cell.target, offset=50, first=1)
    else:
        server.wrong_length(cell.target, -100, first=1)
    with pytest.raises(DigestMismatch) as err:
        cell.pull(server.host)
    cell.failed(err.value, DigestMismatch, cell.ref(server.host))
    cell.resumes(server)


@pytest.mark.parametrize(("fault", "phase"), cell_params(["429-seconds", "429-date"]))
def test_429_waits_as_long_as_retry_after_asks(cell, server, fault, phase):
    # An HTTP date has whole seconds: 2 s ahead is at least 1 s ahead.
    retry_after = email.utils.formatdate(time.time() + 2, usegmt=True) if fault == "429-date" else 1
    server.fail_first(cell.target, 1, status=429, retry_after=retry_after)
    cell.pull(server.host)
    cell.identical(server.host)
    refused, *later = _gets(server, cell.target)
    again = next(r for r in later if r.range == refused.range)  # other ranges may go ahead
    assert refused.status == 429 and again.arrived - refused.arrived >= 0.95  # backoff alone is < 0.5 s


@pytest.mark.parametrize(("fault", "phase"), cell_params(["endless-5xx"]))
def test_endless_5xx_fails_naming_the_url(cell, server, fault, phase):
    server.fail_first(cell.target, 1000, status=500)
    with pytest.raises(RegistryError) as err:  # a blob's like a manifest's: one HTTP policy
        cell.pull(server.host)
    assert err.value.status == 500
    cell.failed(err.value, RegistryError, server.host, cell.target if phase != "manifest" else REPO)
    cell.resumes(server)


@pytest.mark.parametrize(("fault", "phase"), cell_params(["trickle"]))
def test_trickle(cell, server, fault, phase):
    if phase == "manifest":
        server.slow(cell.target, 4000)  # the whole manifest trickles, and arrives
        cell.pull(server.host)
    else:
        server.slow(cell.target, 4000, ranges={2 * CHUNK})  # one range trickles, its peers do not
        cell.pull(server.host, straggler_min_age=0.5, straggler_ratio=4)
        assert cell.stats.stragglers_reissued >= 1 and cell.stats.retries == 0  # cut as a straggler, not a stall
        assert [s for s in _range_starts(server, cell.target) if 2 * CHUNK < s < 3 * CHUNK]  # the rest of the slow range, asked anew
    cell.identical(server.host)


@pytest.mark.parametrize(("fault", "phase"), cell_params(["range-ignored"]))
def test_range_ignored_falls_back_to_one_stream(cell, server, fault, phase, caplog):
    server.ignore_range(cell.target)
    with caplog.at_level("INFO", logger="fastpull.engine.loop"):
        cell.pull(server.host)
    cell.identical(server.host)
    gets = _gets(server, cell.target)
    assert len(gets) == 1 and gets[0].status == 200  # the probe became the single stream
    assert server.bytes_served(cell.target) == cell.big.size
    assert sum("ignores Range" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(("fault", "phase"), cell_params(["redirect-expires"]))
def test_expired_redirect_is_resolved_again(cell, server, fault, phase):
    with FaultRegistry(host="127.0.0.2") as cdn:
        # Each signed URL serves 3 requests, then answers 403 "Request has expired" (as S3 does).
        server.redirect_to(cell.target, cdn, signed_uses=3)
        cell.pull(server.host)
        cell.identical(server.host)
        assert [r for r in cdn.requests_for(cell.target) if r.status == 403], "the signed URL never expired"
        assert len(_gets(server, cell.target)) >= -(-cell.big.size // CHUNK // 3)  # a fresh redirect per 3 requests
        assert cdn.bytes_served(cell.target) == cell.big.size  # bytes written before an expiry were kept


@pytest.mark.parametrize(("fault", "phase"), cell_params(["token-expires"]))
def test_expired_token_is_renewed(cell, server, fault, phase):
    server.require_bearer("t0")
    client = _client(server.host)
    if phase == "manifest":
        client.authorization(REPO)  # holds a token; it expires before the manifest is asked
        server.expire_token()
    else:
        server.expire_token_after(cell.target, 3)  # refused from the 4th chunk on
    before = server.token_requests
    cell.pull(server.host, client)
    cell.identical(server.host)
    assert server.token_requests > before
    what = "/manifests/" if phase == "manifest" else cell.target
    assert [r for r in server.log if r.status == 401 and r.path.startswith(f"/v2/{REPO}/") and what in r.path]


@pytest.mark.parametrize(("fault", "phase"), cell_params(["corrupt"], ["blob", "unpack"]))
def test_corrupt_byte(cell, server, fault, phase):
    server.corrupt(cell.target, offset=2 * CHUNK + 5, first=1)
    if phase == "blob":
        cell.pull(server.host)  # fetched once more from scratch
        cell.identical(server.host)
        assert server.bytes_served(cell.target) == 2 * cell.big.size
        cell.record("identical (fetched once more); always corrupt:", replace=True)
        server.corrupt(cell.target, offset=2 * CHUNK + 5)  # every time: the registry's copy is bad
        cell.layout = cell.layout.with_name("again")
        server.clear()
    with pytest.raises(DigestMismatch) as err:
        cell.pull(server.host)
    cell.failed(err.value, DigestMismatch, cell.target)
    expected_downloads = 2 if phase == "blob" else 1  # a followed layer is not fetched again
    assert server.bytes_served(cell.target) == expected_downloads * cell.big.size
    cell.resumes(server)


# ---- a real registry restarted mid-pull ----------------------------------------------------


@pytest.fixture(scope="module")
def restartable(image, tmp_path_factory):
    """A real registry of its own (the cells stop and start it) holding the image."""
    with LocalRegistry(tmp_path_factory.mktemp("restart") / "storage") as reg:
        push_image(reg.url, REPO, "v1", image)
        yield reg


def _restart(reg: LocalRegistry) -> None:
    """Stop the registry, refuse the next connection to its port (so a client surely meets the
    registry down), then start it again on the same port."""
    host, port = reg.host.rsplit(":", 1)
    reg.stop()
    with socket.create_server((host, int(port))) as down:
        down.settimeout(30)
        conn, _ = down.accept()  # a client came: it gets nothing
        conn.close()
    reg.start()


def _in_thread(run) -> tuple[threading.Thread, list]:
    """Start ``run()`` in a thread; the list gets its result or its exception."""
    settled: list = []

    def target():
        try:
            settled.append(run())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            settled.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, settled


@pytest.mark.parametrize(("fault", "phase"), cell_params(["restart"]))
def test_registry_restarted_mid_pull(cell, restartable, fault, phase):
    reg = restartable
    client = _client(reg.host, attempts=12)  # the registry may take seconds to come back
    if phase == "manifest":
        client.authorization(REPO)  # the pull starts with the registry known; it is down when the manifest is asked
        puller, settled = _in_thread(lambda: cell.pull(reg.host, client))
        _restart(reg)
    else:
        # Throttled transfers (4 x 256 kB/s), so that the restart lands mid-blob.
        puller, settled = _in_thread(lambda: cell.pull(reg.host, client, transfer_rate_limit=256 * 1024, retries=20))
        bitmap_path = cell.layout / ".fastpull" / "ingest" / cell.big.digest.split(":")[1] / "bitmap"
        wait_until(bitmap_path.exists, "the pull is fetching the layer")
        bitmap = ChunkBitmap(bitmap_path)
        try:
            seen = bitmap.sequence
            while bitmap.count() < 2:
                seen = bitmap.wait(seen, 5.0)
            _restart(reg)
            assert not bitmap.complete()
        finally:
            bitmap.close()
    puller.join(60)
    assert settled and not isinstance(settled[0], BaseException), settled
    cell.identical(reg.host)


# ---- the local disk fills up ---------------------------------------------------------------


@pytest.mark.parametrize(("fault", "phase"), cell_params(["enospc"]))
def test_full_disk(cell, server, tmp_path, fault, phase):
    disk = tmp_path / "disk"
    # 2 MiB: the small blobs fit, the 2.1 MB layer does not; 1 MiB: nor do the layer's files.
    with tmpfs(disk, "2m" if phase == "blob" else "1m") as resize:
        if phase == "unpack":  # the layout has room, the rootfs does not
            cell.rootfs = disk / "rootfs"
        else:
            cell.layout = disk / "layout"
        if phase == "manifest":
            filler = disk / "filler"
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
        with pytest.raises(StoreError if phase != "unpack" else UnpackError) as err:
            cell.pull(server.host)
        assert "space" in str(err.value).lower()
        cell.failed(err.value, type(err.value), str(disk))
        if phase == "blob":  # the pull stopped at the layer that does not fit: the one after it is not fetched
            assert not server.requests_for(cell.image.layers[1].digest)
        if phase == "unpack":
            assert os.listdir(disk) == []  # the partial tree is gone
        opened = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not [path for path in opened if path.startswith(str(disk))]  # partial files released
        if phase == "manifest":
            filler.unlink()
        resize("16m")
        cell.resumes(server)


# ---- the pull process is killed --------------------------------------------------------------


def _spawn_cli(cell: Cell, host: str) -> subprocess.Popen:
    """``fastpull pull`` in a session of its own (so that whatever it leaves can be found and ended)."""
    command = [sys.executable, "-m", "fastpull", "pull", cell.ref(host), "--layout", str(cell.layout),
               "--chunk-size", str(CHUNK / MiB), "--chunks-per-blob", "4", "--no-join"]
    if cell.rootfs is not None:
        command += ["--rootfs", str(cell.rootfs)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (the pull, its forkserver and its workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _interrupt(cell: Cell, srv: FaultRegistry, sig: signal.Signals) -> subprocess.Popen:
    """Start ``fastpull pull``, and send it ``sig`` in the cell's phase."""
    if cell.phase == "manifest":
        srv.stall_after(cell.target, 100, first=1)
    else:
        srv.slow(cell.big.digest, 128 * 1024)  # 4 transfers at 128 kB/s: the layer takes ~4 s
    proc = _spawn_cli(cell, srv.host)
    try:
        if cell.phase == "manifest":
            wait_until(lambda: _gets(srv, cell.target), "the manifest is asked")
        elif cell.phase == "blob":
            bitmap_path = cell.layout / ".fastpull" / "ingest" / cell.big.digest.split(":")[1] / "bitmap"
            wait_until(bitmap_path.exists, "the layer is being fetched", timeout=30)
            bitmap = ChunkBitmap(bitmap_path)
            try:
                seen = bitmap.sequence
                while bitmap.count() < 2:
                    seen = bitmap.wait(seen, 5.0)
            finally:
                bitmap.close()
        else:
            work = cell.rootfs.parent
            wait_until(lambda: any(p.iterdir() for p in work.glob(f".{cell.rootfs.name}.fastpull-*/layer-0")),
                       "the layer is being unpacked", timeout=30)
        assert proc.poll() is None
        proc.send_signal(sig)
        proc.wait(5)
    except BaseException:
        _end_session(proc.pid)
        proc.__exit__(None, None, None)
        raise
    return proc


def _end_session(sid: int) -> None:
    for pid in _session_pids(sid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("fault", "phase"), cell_params(["kill-9"]))
def test_kill_9(cell, server, fault, phase):
    with _interrupt(cell, server, signal.SIGKILL) as proc:
        assert proc.returncode == -signal.SIGKILL
        wait_until(lambda: not _session_pids(proc.pid), "the unpack workers exit with the pull", timeout=5)
        assert cell.rootfs is None or not cell.rootfs.exists()  # no rootfs, not even a half one
        index = cell.layout / "index.json"
        assert not index.exists() or json.loads(index.read_text())["manifests"] == []
        if phase == "blob":
            assert 0 < cell.missing_bytes()[cell.big.digest] < cell.big.size  # a partial ingest to resume
        try:
            cell.resumes(server)
        finally:
            _end_session(proc.pid)  # anything the killed pull left (a failed test may leave workers)


# The CLI stops on a signal by raising in the main thread; a manifest GET stuck in the synchronous
# transport's perform() lets the handler run from its progress callback.
@pytest.mark.parametrize(("fault", "phase"), cell_params(["sigterm"]))
def test_sigterm(cell, server, fault, phase):
    with _interrupt(cell, server, signal.SIGTERM) as proc:
        try:
            assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), proc.stderr.read()
            wait_until(lambda: not _session_pids(proc.pid), "no process of the pull remains", timeout=5)
            if cell.rootfs is not None:
                assert not cell.rootfs.exists()
                assert not list(cell.rootfs.parent.glob(f".{cell.rootfs.name}.fastpull-*"))
            cell.record("status 143:")
            cell.resumes(server)
        finally:
            _end_session(proc.pid)


def test_faults_doc_has_a_row_for_every_fault():
    """docs/faults.md is regenerated by a full run; a fault added since would be missing from it."""
    table = DOC.read_text()
    assert all(f"| {title} |" in table for title, _ in FAULTS.values())
