"""containerd's CRI pulls through ``fastpull serve --snapshotter`` on the far-registry bed (bench/bed.py).

    python bench/bench_snapshotter.py --quick         # images / 10, one run (~2 min on 2 cores)
    python bench/bench_snapshotter.py                 # 3 runs, plain HTTP registry (~12 min)
    python bench/bench_snapshotter.py --tls           # the registry speaks HTTPS (HTTP/2 by ALPN)
    python bench/bench_snapshotter.py --versions 1.6 --images files --rows alone-cri,snap-cri
    python bench/bench_snapshotter.py --fastpull-root /tmp/tree   # a git archive of a commit (see bench/README.md)
    python bench/bench_snapshotter.py --rewrite bench/results/snapshotter.json   # the markdown again
    python bench/bench_snapshotter.py --pool a.json b.json c.json --results snapshotter   # invocations pooled

A node's containerd pulls an image with CRI ``PullImage`` (as the kubelet asks it) or ``ctr image
pull``, each time with a FRESH containerd (its own root, state and socket: a cold node), in these ways:

- **alone**: containerd by itself into its overlayfs snapshotter, straight from the registry (a
  ``hosts.toml``); CRI, and ``ctr image pull`` (fetch + unpack);
- **mirror**: through ``fastpull serve`` as a registry mirror only (``hosts.toml`` names it;
  containerd still fetches and unpacks), cold store; CRI;
- **snapshotter**: through ``fastpull serve --snapshotter SOCKET``, the proxy snapshotter ``fastpull``
  that CRI pulls into with the remote-snapshot labels on: fastpull fetches and unpacks every layer
  itself and answers ALREADY_EXISTS, so containerd fetches the manifest and config only. CRI cold
  (empty store), CRI prefetched (the daemon already unpacked the image into its layer cache,
  ``POST /_fastpull/v1/prefetch``), and ``ctr image pull --snapshotter fastpull`` cold: ctr 1.6
  sends no labels (containerd fetches and applies each layer itself through fastpull's mounts),
  ctr 2.x pulls through the transfer service, which sends them;
- **concurrent**: ``--clients`` (20) CRI ``PullImage`` calls of one image at once through the
  snapshotter, cold; the image should be fetched once;
- **import**: ``fastpull pull REF --containerd SOCKET`` into a containerd in its default configuration
  (no proxy plugin: its own overlayfs snapshotter, content and image stores, CRI's namespace), from an
  empty store, straight from the registry: what a node agent does where containerd's configuration
  cannot change. Measured from the command's start (the interpreter's start-up included) to its exit.

By default containerd's ``hosts.toml`` points at the registry for the alone rows and at ``fastpull
serve`` for the mirror and snapshotter rows (what ``fastpull serve --print-config`` prints; with
``--snapshotter-hosts direct`` the snapshotter rows' containerd goes to the registry itself).

On containerd 1.6 (Debian's ``/usr/bin/containerd``) CRI is configured by tests/clients.py
(version 2: CRI snapshotter ``fastpull``, ``disable_snapshot_annotations = false``). On containerd
2.x (``--containerd2 DIR``, default /opt/containerd-2/bin; its rows are left out with a note if
absent) the bench writes a version-3 config: ``[proxy_plugins.fastpull]`` exporting
``enable_remote_snapshot_annotations``, the transfer service's ``unpack_config`` listing overlayfs
and fastpull, CRI images' ``snapshotter`` and ``registry.config_path`` (and nothing that moves CRI
to its local pull path: no ``disable_snapshot_annotations``, mirrors, configs, auths or
``max_concurrent_downloads``). containerd alone on 2.x runs its defaults with snapshotter overlayfs.

Every process runs inside the bed's namespace; the registry on 127.0.0.1:5000 is shaped (each
connection capped at ``--per-flow``, all at ``--link``), the daemon and containerd talk over the
unshaped loopback and unix sockets. Measured per row: the wall time of the pull (from the CRI call,
or ctr's start, to its return), the bytes the registry sent (its access log, split by client:
containerd or fastpull), and the daemon's memory: ``VmHWM`` summed over its process tree (each
process's peak, its unpack workers' too, sampled every 0.2 s so that exited ones count), beside the
largest sampled sum of PSS. Medians of ``--runs`` (rows interleaved within each run), ratios
against containerd alone in the same run. Results: ``bench/results/snapshotter[-tls][-quick].md``
and ``.json`` (raw samples).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]

import clients  # tests/clients.py
from bed import REPO, ThrottledBed, compile_package, trust
from bench_bed import MB, RESULTS, bed_arguments, git_state, log
from procs import descendants

from fastpull.testbed import BuiltImage, LayerSpec, build_image, push_image
from fastpull.testbed.daemon import ServeProcess
from fastpull.testbed.registry import _ACCESS_LINE, _INTERNAL_AGENT

SNAPSHOTTER = "fastpull"
BIG_LAYERS_MB = (300, 200, 150, 120, 100, 60, 40, 30)  # 1000 MB in 8 layers, as bench_serve.py's
FILES_LAYERS = 5
FILES_TOTAL = 30_000
FILES_MB = 300  # uncompressed text: ~10 KB a file, ~125 MB of gzip

ROWS = {
    "alone-cri": "containerd alone, CRI",
    "alone-ctr": "containerd alone, ctr image pull",
    "mirror-cri": "fastpull serve as mirror, CRI, cold",
    "snap-cri": "fastpull snapshotter, CRI, cold",
    "snap-prefetched": "fastpull snapshotter, CRI, prefetched",
    "snap-ctr": "fastpull snapshotter, ctr image pull, cold",
    "import": "fastpull pull --containerd (containerd as it is), cold",
}
CONCURRENT = "concurrent"
VERSIONS = ("1.6", "2")
IMAGES = ("big", "files")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PULLED = re.compile(r"pulled \S+: [\d.]+ MB fetched in ([\d.]+) s, .*; \d+ layers unpacked in ([\d.]+) s")
"""fastpull's log line of a finished pull: its download and its unpack seconds."""


# ---- containerd ------------------------------------------------------------------------------------

_CONFIG_V3 = """\
version = 3
root = {root}
state = {state}
disabled_plugins = [{disabled}]

[grpc]
  address = {address}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = [{cni_bin}]
  conf_dir = {cni_conf}

[plugins."io.containerd.cri.v1.images"]
  snapshotter = {snapshotter}

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = {sandbox}

[plugins."io.containerd.cri.v1.images".registry]
  config_path = {hosts_dir}
"""

_PROXY_V3 = """
[proxy_plugins.{name}]
  type = "snapshot"
  address = {address}
  [proxy_plugins.{name}.exports]
    enable_remote_snapshot_annotations = "true"

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
  differ = "walking"

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "{name}"
  differ = "walking"
"""

_DISABLED_V3 = ["io.containerd.nri.v1.nri",  # its socket is global (/var/run/nri): one per host
                "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.erofs",
                "io.containerd.snapshotter.v1.blockfile", "io.containerd.tracing.processor.v1.otlp",
                "io.containerd.internal.v1.tracing"]


class Containerd2(clients.Containerd):
    """tests/clients.py's private containerd, run from ``bin_dir`` (containerd 2.x) with a version-3
    config: CRI pulls through the transfer service into ``cri_snapshotter``; a proxy snapshotter
    exports ``enable_remote_snapshot_annotations`` and is listed, beside overlayfs, in the transfer
    service's ``unpack_config``."""

    def __init__(self, workdir: Path, bin_dir: Path, *, command_prefix: list[str], **options: Any):
        path = f"PATH={bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        super().__init__(workdir, command_prefix=[*command_prefix, "env", path], **options)

    def config_text(self) -> str:
        q = clients._toml
        text = _CONFIG_V3.format(
            root=q(str(self.root)), state=q(str(self.state)), address=q(str(self.address)),
            ttrpc=q(f"{self.address}.ttrpc"), opt=q(f"{self.root}/opt"),
            disabled=", ".join(q(p) for p in _DISABLED_V3), cni_bin=q(str(self.cni_dir / "bin")),
            cni_conf=q(str(self.cni_dir / "conf")), snapshotter=q(self.cri_snapshotter),
            sandbox=q(self.sandbox_image), hosts_dir=q(str(self.hosts_dir)))
        for name, address in self.proxy_plugins.items():
            text += _PROXY_V3.format(name=name, address=q(str(address)))
        return text


def version_of(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.split()
    except FileNotFoundError:
        return "not installed"
    return out[2].split("~")[0].removeprefix("v") if len(out) >= 3 else " ".join(out)


# ---- the daemon and its memory ---------------------------------------------------------------------


class TreeMemory:
    """Samples a process tree every ``interval`` s in a thread: each process's ``VmHWM`` (kept after it
    exits; counted anew when it execs) and the largest sum of PSS."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid = pid
        self.interval = interval
        self.hwm_kb: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.peak_pss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        pss = 0
        for pid in descendants({self.pid}):
            try:
                name = _command(pid)
                status = Path(f"/proc/{pid}/status").read_text()
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                if _command(pid) != name:  # it exec'd meanwhile: status may be its old image's
                    continue
            except OSError:
                continue
            if self.names.get(pid) != name:
                # New, or it exec'd: a child caught between fork and exec shows its parent's peak.
                self.names[pid] = name
                self.hwm_kb[pid] = 0
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.hwm_kb[pid] = max(self.hwm_kb[pid], int(line.split()[1]))
            for line in rollup.splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                    break
        self.peak_pss_kb = max(self.peak_pss_kb, pss)

    def per_process(self) -> list[tuple[str, float]]:
        """Each process's peak RSS, MB, with the start of its command line."""
        return [(self.names.get(pid, "?"), kb * 1024 / MB) for pid, kb in sorted(self.hwm_kb.items())]

    @property
    def hwm_mb(self) -> float:
        return sum(self.hwm_kb.values()) * 1024 / MB

    @property
    def pss_mb(self) -> float:
        return self.peak_pss_kb * 1024 / MB


def _command(pid: int) -> str:
    """The start of a process's command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return " ".join(a.decode(errors="replace") for a in argv[:4])[:80]


@dataclass
class Daemon:
    serve: ServeProcess
    socket: Path | None
    memory: TreeMemory

    @property
    def host(self) -> str:
        return self.serve.host


# ---- rows ------------------------------------------------------------------------------------------


@dataclass
class Row:
    version: str
    image: str
    row: str
    wall: float
    upstream: int
    by_agent: dict[str, int] = field(default_factory=dict)
    rss_mb: float | None = None
    pss_mb: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    processes: list[tuple[str, float]] = field(default_factory=list)


class SnapshotterBench:
    def __init__(self, bed: ThrottledBed, registry: Any, work: Path, root: Path, containerd2: Path | None,
                 snapshotter_hosts: str, clients_n: int):
        self.bed = bed
        self.registry = registry
        self.work = work
        self.root = root
        self.containerd2 = containerd2
        self.snapshotter_hosts = snapshotter_hosts
        self.clients_n = clients_n
        self.raw: list[dict[str, Any]] = []
        self.protocols: dict[str, set[str]] = {}
        self._n = 0
        self.sockets = Path(f"/tmp/fpsb-{os.getpid()}")  # unix socket paths must stay under 104 bytes
        self.sockets.mkdir(mode=0o700)

    def close(self) -> None:
        shutil.rmtree(self.sockets, ignore_errors=True)

    def _fresh(self, prefix: str) -> Path:
        self._n += 1
        path = self.work / f"{prefix}-{self._n}"
        path.mkdir(parents=True)
        return path

    # -- upstream ---------------------------------------------------------------------------------

    def upstream(self) -> tuple[int, dict[str, int], set[str]]:
        """Body bytes of the registry's GETs since the last clear: total, per client (containerd or
        fastpull, from the access log's user agent), and the HTTP versions of those with a body."""
        lines, _ = self.bed.call(self.registry.local._read_access_log, True)  # what served() reads
        total, by_agent, protocols = 0, {}, set()
        for line in lines:
            m = _ACCESS_LINE.match(line)
            if m is None or line.endswith(f'"{_INTERNAL_AGENT}"') or m["method"] != "GET" or m["size"] == "-":
                continue
            size = int(m["size"])
            agent = line.rsplit('"', 2)[-2] if line.endswith('"') else "?"
            who = "fastpull" if agent.startswith("fastpull") else "containerd" if "containerd" in agent else agent
            total += size
            by_agent[who] = by_agent.get(who, 0) + size
            if size:
                protocols.add(m["proto"])
        return total, by_agent, protocols

    # -- daemons ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def fastpull(self, snapshotter: bool, label: str) -> Iterator[Daemon]:
        """``fastpull serve`` (``--snapshotter`` on a short socket path) on a fresh store inside the bed;
        its log is kept in the work dir; the store is removed after."""
        base = self._fresh("serve")
        socket = self.sockets / f"{self._n}.sock" if snapshotter else None
        args = ("--snapshotter", str(socket)) if socket else ()
        serve = ServeProcess(base / "store", self.registry.host, *args, env={"PYTHONPATH": str(self.root)})
        self.bed.call(serve.start)
        assert serve.proc is not None
        try:
            with TreeMemory(serve.proc.pid, 0.25) as memory:
                yield Daemon(serve, socket, memory)
        finally:
            code = serve.stop()
            logs = self.work.parent / "logs"  # beside the tmpfs: kept after the bench
            logs.mkdir(exist_ok=True)
            (logs / f"{self._n:03d}-{label}.log").write_text(serve.log)
            if code != 0:
                log(f"fastpull serve exited {code}: {serve.log[-2000:]}")
            _remove(base)
            if socket is not None:
                socket.unlink(missing_ok=True)

    @contextlib.contextmanager
    def containerd(self, version: str, hosts_to: str | None, snapshotter: Daemon | None) -> Iterator[clients.Containerd]:
        """A fresh containerd of ``version`` inside the bed with CRI on, reaching the registry directly
        (``hosts_to`` None) or through the mirror at ``hosts_to``; CRI pulls into ``snapshotter``'s
        socket as the proxy plugin ``fastpull`` if given, else into overlayfs."""
        workdir = self._fresh(f"containerd{version}")
        hosts = clients.write_hosts_toml(workdir / "certs.d", self.registry.host, hosts_to, self.registry.ca_file)
        options: dict[str, Any] = dict(cri=True, hosts_dir=hosts, start_timeout=60)
        if snapshotter is not None:
            options.update(cri_snapshotter=SNAPSHOTTER, proxy_plugins={SNAPSHOTTER: snapshotter.socket})
        if version == "2":
            assert self.containerd2 is not None
            node: clients.Containerd = Containerd2(workdir, self.containerd2, command_prefix=self.bed.prefix,
                                                   **options)
        else:
            node = clients.Containerd(workdir, command_prefix=self.bed.prefix, **options)
        try:
            node.start()
            yield node
        finally:
            node.stop()
            _remove(workdir)

    # -- one measurement -------------------------------------------------------------------------

    def measure(self, version: str, image_key: str, row: str, ref: str, image: BuiltImage) -> Row:
        snap = row.startswith("snap") or row == CONCURRENT
        extra: dict[str, float] = {"clients": self.clients_n} if row == CONCURRENT else {}
        self.registry.clear_served()
        with contextlib.ExitStack() as stack:
            daemon = stack.enter_context(self.fastpull(snap, f"{version}-{image_key}-{row}")) \
                if row not in ("alone-cri", "alone-ctr", "import") else None
            if row == "snap-prefetched":
                assert daemon is not None
                extra["prefetch_s"] = self.prefetch(daemon, ref)
                extra["prefetch_upstream"], _, _ = self.upstream()
                self.registry.clear_served()
            hosts_to = None if daemon is None or (snap and self.snapshotter_hosts == "direct") else daemon.host
            node = stack.enter_context(self.containerd(version, hosts_to, daemon if snap else None))
            if row.endswith("ctr"):
                args = node.pull_args(ref, hosts_dir=node.hosts_dir, snapshotter=SNAPSHOTTER if snap else "overlayfs")
                started = time.perf_counter()
                node.ctr(*args, timeout=600)
                wall = time.perf_counter() - started
                namespace = "default"
            elif row == CONCURRENT:
                wall = self.cri_pulls(node, ref, self.clients_n)
                namespace = clients.CRI_NAMESPACE
            elif row == "import":
                wall = self.import_pull(node, ref, f"{version}-{image_key}-{row}")
                namespace = clients.CRI_NAMESPACE
            else:
                wall = self.cri_pulls(node, ref, 1)
                namespace = clients.CRI_NAMESPACE
            self.check(node, ref, image, namespace, SNAPSHOTTER if snap else None)
            if daemon is not None:
                daemon.memory.sample()
                extra.update(self.daemon_counts(daemon))
                extra["daemon_cpu_s"] = _tree_cpu_seconds(daemon.memory.pid)
        total, by_agent, protocols = self.upstream()
        extra["load1"] = float(Path("/proc/loadavg").read_text().split()[0])  # the machine is shared
        label = ROWS.get(row, f"{self.clients_n} x CRI through the snapshotter, cold")
        result = Row(version, image_key, row, wall, total, by_agent,
                     daemon.memory.hwm_mb if daemon else None, daemon.memory.pss_mb if daemon else None, extra,
                     daemon.memory.per_process() if daemon else [])
        self.protocols.setdefault(row, set()).update(protocols)
        self.raw.append(asdict(result))
        agents = ", ".join(f"{k} {v / MB:.1f}" for k, v in sorted(by_agent.items()))
        mem = f", daemon peak RSS {result.rss_mb:.0f} MB (PSS {result.pss_mb:.0f})" if daemon else ""
        log(f"containerd {version} {image_key}: {label}: {wall:.2f} s, upstream {total / image.total_size:.3f}x "
            f"({agents}){mem} {extra or ''}")
        return result

    def daemon_counts(self, daemon: Daemon) -> dict[str, float]:
        """From the daemon's metrics and log: bytes it served to clients (containerd, through the mirror),
        containerd's Prepare calls by outcome (cache, remote, local), and its last pull's download and
        unpack seconds as it logs them."""
        def scrape() -> str:
            with _OPENER.open(f"http://{daemon.host}/metrics", timeout=30) as response:
                return response.read().decode()

        counts: dict[str, float] = {"served": 0.0}
        for line in self.bed.call(scrape).splitlines():
            if line.startswith("fastpull_served_bytes_total "):
                counts["served"] = float(line.split()[1])
            elif m := re.match(r'fastpull_snapshotter_prepare_duration_seconds_count\{outcome="(\w+)"\} (\S+)', line):
                counts[f"prepare_{m[1]}"] = float(m[2])
        pulls = _PULLED.findall(daemon.serve.log)
        if pulls:
            counts["fastpull_fetch_s"], counts["fastpull_unpack_s"] = float(pulls[-1][0]), float(pulls[-1][1])
        return counts

    def cri_pulls(self, node: clients.Containerd, ref: str, n: int) -> float:
        """Wall seconds of ``n`` CRI ``PullImage`` calls of ``ref`` at once, each on its own channel."""
        from cri import CriImages

        channels = [CriImages(node.address) for _ in range(n)]
        try:
            with ThreadPoolExecutor(n) as pool:
                started = time.perf_counter()
                ids = list(pool.map(lambda c: c.pull(ref, timeout=900), channels))
                wall = time.perf_counter() - started
        finally:
            for c in channels:
                c.close()
        if len(set(ids)) != 1:
            raise RuntimeError(f"CRI answered different image IDs for {ref}: {set(ids)}")
        return wall

    def import_pull(self, node: clients.Containerd, ref: str, label: str) -> float:
        """Wall seconds of ``fastpull pull REF --containerd`` into ``node`` from a fresh store (its
        log kept beside the runs, as the daemons' are)."""
        store = self._fresh("import")
        started = time.perf_counter()
        done = self.bed.run([sys.executable, "-m", "fastpull", "pull", ref, "--containerd", str(node.address),
                             "--layout", str(store / "store")], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(self.root)})
        wall = time.perf_counter() - started
        logs = self.work.parent / "logs"
        logs.mkdir(exist_ok=True)
        (logs / f"{self._n:03d}-{label}.log").write_text(done.stdout + done.stderr)
        _remove(store)
        if done.returncode != 0:
            raise RuntimeError(f"fastpull pull --containerd exited {done.returncode}: {done.stderr[-2000:]}")
        return wall

    def check(self, node: clients.Containerd, ref: str, image: BuiltImage, namespace: str,
              snapshotter: str | None) -> None:
        """The image is there, with its manifest digest and, through the snapshotter, one committed
        snapshot per layer (cheap checks; the tests compare trees)."""
        if node.image_digest(ref, namespace=namespace) != image.manifest_digest:
            raise RuntimeError(f"containerd has not {ref} as {image.manifest_digest} in {namespace}")
        if snapshotter is not None:
            committed = sum(kind == "Committed" for _, _, kind in node.snapshots(snapshotter=snapshotter,
                                                                                  namespace=namespace))
            if committed != len(image.layers):
                raise RuntimeError(f"{committed} committed {snapshotter} snapshots for {len(image.layers)} layers")

    def prefetch(self, daemon: Daemon, ref: str, timeout: float = 600) -> float:
        """POST the prefetch of ``ref`` and wait until the daemon has pulled and unpacked it: seconds."""
        url = f"http://{daemon.host}/_fastpull/v1"

        def post() -> None:
            request = urllib.request.Request(f"{url}/prefetch", data=json.dumps({"refs": [ref]}).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            with _OPENER.open(request, timeout=30) as response:
                if response.status != 202:
                    raise RuntimeError(f"prefetch answered {response.status}")

        def status() -> dict[str, Any]:
            with _OPENER.open(f"{url}/status", timeout=30) as response:
                return json.loads(response.read())

        started = time.perf_counter()
        self.bed.call(post)
        while self.bed.call(status)["prefetching"]:
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"prefetch of {ref} not done in {timeout:g} s")
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        if "prefetched" not in daemon.serve.log:
            raise RuntimeError(f"prefetch of {ref} failed: {daemon.serve.log[-2000:]}")
        return seconds


def _tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree so far: each process's own and that of the children
    it reaped (the forkserver reaps the unpack workers)."""
    total = 0
    for p in descendants({pid}):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def _remove(path: Path) -> None:
    """Unmount whatever is still mounted under ``path`` (deepest first; containerd's mounts live in its
    own mount namespace and go with it, so normally nothing), then remove the tree."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        log(f"unmounting leftover {point}")
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)


# ---- summary ---------------------------------------------------------------------------------------


def medians(rows: list[Row]) -> dict[tuple[str, str, str], Row]:
    """Per (version, image, row): median wall, upstream and extras; the largest memory, and the
    processes of the run with the largest summed peak."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.version, r.image, r.row), []).append(r)
    out = {}
    for key, rs in groups.items():
        agents = {a for r in rs for a in r.by_agent}
        rss = [r.rss_mb for r in rs if r.rss_mb is not None]
        pss = [r.pss_mb for r in rs if r.pss_mb is not None]
        out[key] = Row(*key, statistics.median(r.wall for r in rs), int(statistics.median(r.upstream for r in rs)),
                       {a: int(statistics.median(r.by_agent.get(a, 0) for r in rs)) for a in agents},
                       max(rss) if rss else None, max(pss) if pss else None,
                       {k: statistics.median(r.extra[k] for r in rs if k in r.extra)
                        for k in sorted({k for r in rs for k in r.extra})},
                       max(rs, key=lambda r: r.rss_mb or 0).processes)
    return out


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _daemon_mb(r: Row) -> float | None:
    """Peak RSS of the daemon's own process (not its unpack workers)."""
    own = [mb for name, mb in r.processes if "fastpull serve" in name]
    return max(own) if own else None


def table(summary: dict[tuple[str, str, str], Row], version: str, image: str, size: int, runs: dict) -> str:
    alone = {"cri": summary.get((version, image, "alone-cri")), "ctr": summary.get((version, image, "alone-ctr"))}
    lines = ["| pull | wall s | runs | vs containerd alone | upstream / image | containerd got / image | "
             "Prepares: cache, remote, local | fastpull's pull: download, unpack s | daemon peak RSS MB: "
             "tree, process | peak PSS MB |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in [*ROWS, CONCURRENT]:
        r = summary.get((version, image, row))
        if r is None:
            continue
        base = alone["ctr" if row.endswith("ctr") else "cri"]
        ratio = f"{base.wall / r.wall:.2f}x" if base else "-"
        got = (r.by_agent.get("containerd", 0) + r.extra.get("served", 0)) / size
        label = ROWS.get(row) or f"{r.extra.get('clients', 20):.0f} x CRI at once, fastpull snapshotter, cold"
        samples = ", ".join(f"{w:.2f}" for w in runs.get((version, image, row), []))
        if "prefetch_s" in r.extra:
            label += f" (prefetch took {r.extra['prefetch_s']:.1f} s)"
        prepares = ", ".join(f"{r.extra.get(f'prepare_{k}', 0):.0f}" for k in ("cache", "remote", "local")) \
            if row.startswith("snap") or row == CONCURRENT else "-"
        pull = (f"{r.extra['fastpull_fetch_s']:.2f}, {r.extra['fastpull_unpack_s']:.2f}"
                if "fastpull_fetch_s" in r.extra else "-")
        memory = "-" if r.rss_mb is None else f"{r.rss_mb:.0f}, {_mb(_daemon_mb(r))}"
        lines.append(f"| {label} | {r.wall:.2f} | {samples} | {ratio} | {r.upstream / size:.3f} | {got:.3f} | "
                     f"{prepares} | {pull} | {memory} | {_mb(r.pss_mb)} |")
    return "\n".join(lines)


def overview(summary: dict[tuple[str, str, str], Row], versions: list[str], images: list[str],
             names: dict[str, str]) -> str:
    """One line per version and image: wall seconds of each way, and the ratios to containerd alone."""
    def cell(v: str, i: str, row: str, base_row: str = "alone-cri") -> str:
        r, base = summary.get((v, i, row)), summary.get((v, i, base_row))
        if r is None:
            return "-"
        return f"{r.wall:.2f}" if base is None or row == base_row else f"{r.wall:.2f} ({base.wall / r.wall:.1f}x)"

    lines = ["| containerd | image | alone, CRI | mirror, CRI | snapshotter, CRI cold | snapshotter, CRI prefetched "
             "| alone, ctr | snapshotter, ctr | 20 CRI pulls at once: wall, upstream / image "
             "| fastpull pull --containerd |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in versions:
        for i in images:
            conc = summary.get((v, i, CONCURRENT))
            size = summary.get((v, i, "alone-cri"))
            upstream = f"{conc.wall:.2f} s, {conc.upstream / size.upstream:.3f}" if conc and size else "-"
            lines.append(f"| {names[v]} | {i} | {cell(v, i, 'alone-cri')} | {cell(v, i, 'mirror-cri')} | "
                         f"{cell(v, i, 'snap-cri')} | {cell(v, i, 'snap-prefetched')} | "
                         f"{cell(v, i, 'alone-ctr', 'alone-ctr')} | {cell(v, i, 'snap-ctr', 'alone-ctr')} | {upstream} | "
                         f"{cell(v, i, 'import')} |")
    return "\n".join(lines)


def targets(summary: dict[tuple[str, str, str], Row], versions: list[str], sizes: dict[str, int],
            names: dict[str, str]) -> list[str]:
    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    out = []
    for v in versions:
        for i in sizes:
            alone, cold = summary.get((v, i, "alone-cri")), summary.get((v, i, "snap-cri"))
            if alone and cold:
                x = alone.wall / cold.wall
                out.append(f"cold through the snapshotter >= 3x containerd alone (CRI), {names[v]}, {i}: "
                           f"{x:.2f}x, {mark(x >= 3)}")
            if alone and (imported := summary.get((v, i, "import"))):
                x = alone.wall / imported.wall
                out.append(f"fastpull pull --containerd >= 3x containerd alone (CRI), {names[v]}, {i}: "
                           f"{x:.2f}x, {mark(x >= 3)}")
            if pre := summary.get((v, i, "snap-prefetched")):
                out.append(f"prefetched < 2 s, {names[v]}, {i}: {pre.wall:.2f} s, {mark(pre.wall < 2)}")
            if conc := summary.get((v, i, CONCURRENT)):
                copies = conc.upstream / sizes[i]
                out.append(f"{conc.extra.get('clients', 20):.0f} concurrent CRI pulls fetch the image once, "
                           f"{names[v]}, {i}: {copies:.3f}x the image upstream in {conc.wall:.2f} s, "
                           f"{mark(copies <= 1.05)}")
    rss = [(r.rss_mb, k) for k, r in summary.items() if r.rss_mb is not None]
    if rss:
        peak, key = max(rss)
        own = max((m, k) for k, r in summary.items() if (m := _daemon_mb(r)) is not None)
        pss = max((r.pss_mb, k) for k, r in summary.items() if r.pss_mb is not None)
        out.append(f"daemon memory < 150 MB: the daemon's process {own[0]:.0f} MB at most ({names[own[1][0]]}, "
                   f"{own[1][1]}, {own[1][2]}), {mark(own[0] < 150)}; with its unpack workers, forkserver and "
                   f"resource tracker, peak RSS summed {peak:.0f} MB ({names[key[0]]}, {key[1]}, {key[2]}), "
                   f"{mark(peak < 150)}, sampled PSS summed {pss[0]:.0f} MB, {mark(pss[0] < 150)}")
    return out


def report(data: dict[str, Any]) -> str:
    """The markdown of a bench's results, from its JSON."""
    results = [Row(**{**r, "processes": [tuple(p) for p in r.get("processes", [])]}) for r in data["raw"]]
    names = data["containerd"]
    versions = [v for v in VERSIONS if v in names]
    images = data["images"]
    summary = medians(results)
    samples: dict[tuple[str, str, str], list[float]] = {}
    for r in results:
        samples.setdefault((r.version, r.image, r.row), []).append(r.wall)
    upstream = "HTTPS, HTTP/2 by ALPN (verified with the bed's CA)" if data["tls"] else "plain HTTP"
    md = [f"# containerd's CRI pulls through `fastpull serve --snapshotter`: per flow {data['per_flow_mbit']:g} / "
          f"link {data['link_mbit']:g} Mbit/s, RTT +{data['rtt_ms']:g} ms, registry {upstream}\n\n"
          f"Median of {data['runs']} run(s) (rows interleaved within each run; every run's walls in *runs*); a "
          "fresh containerd (own root) per pull, a fresh `fastpull serve` (empty store) per row. *vs containerd "
          "alone*: containerd alone's wall (CRI; for the ctr rows, its ctr pull) over this row's, same "
          "version and image. *upstream / image*: body bytes the shaped registry sent over the image's "
          "blobs (manifest, config, layers); *containerd got*: what containerd fetched itself, from the "
          "registry (its user agent in the registry's log) or through the mirror (the bytes `fastpull serve` "
          "served); *Prepares*: containerd's Prepare calls by how fastpull answered them (cache: the layer was "
          "unpacked already; remote: fetched and unpacked for it; local: containerd applies the layer itself), "
          "per row (the 20 pulls at once together), median; *fastpull's pull*: download and unpack seconds of the daemon's own pull of the "
          "image, as it logs them (for the prefetched row, the prefetch's). Daemon memory: VmHWM summed over "
          "`fastpull serve`'s process tree (its unpack workers, their forkserver and multiprocessing's resource "
          "tracker), and the daemon's process alone; the largest sampled sum of PSS over the tree. "
          "containerd's hosts.toml "
          + ("points at `fastpull serve` for the mirror and snapshotter rows (as `--print-config` writes it), "
             "at the registry for containerd alone." if data["snapshotter_hosts"] == "mirror" else
             "points at `fastpull serve` for the mirror row, at the registry otherwise.")
          + (" containerd's roots and fastpull's stores are on a tmpfs (this VM's disk slows file creation "
             "down run after run)." if data.get("tmpfs") else " containerd's roots and fastpull's stores on disk.")]
    md += [f"Note: {n}" for n in data.get("notes", [])]
    md.append("## Overview: wall seconds (x containerd alone, CRI or ctr)\n\n"
              + overview(summary, versions, list(images), names))
    for version in versions:
        for key, image in images.items():
            layers = ", ".join(f"{size / MB:.0f}" for size in image["layers"])
            md.append(f"## containerd {names[version]}: {key}, {image['bytes'] / MB:.0f} MB in {len(image['layers'])} "
                      f"layers ({layers} MB compressed)\n\n" + table(summary, version, key, image["bytes"], samples))
    sizes = {k: im["bytes"] for k, im in images.items()}
    if checks := targets(summary, versions, sizes, names):
        md.append("## The issue's targets (issue 17, *Bench*)\n\n" + "\n".join(f"- {c}" for c in checks))
    if data.get("protocols"):
        md.append("HTTP versions the registry answered with a body: "
                  + "; ".join(f"{k}: {', '.join(v) or '-'}" for k, v in data["protocols"].items()) + ".")
    if "files" in images:
        md.append("The images: big is random data (gzip level 6: stored blocks), 10 files a layer; files is "
                  f"text in {images['files'].get('files', FILES_TOTAL):,} files.")
    md.append(f"Bench took {data.get('minutes', 0):.1f} min; fastpull {data['fastpull']}; containerd "
              + ", ".join(names[v] for v in versions) + f"; kernel {data.get('kernel', '?')}; "
              f"{data.get('cpus', '?')} CPUs.")
    return "\n\n".join(md) + "\n"


# ---- main ------------------------------------------------------------------------------------------


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several invocations' results as one: their runs together (each row tagged with its invocation's
    start), the settings of the first (which must match in the others), their notes and minutes summed."""
    same = ("per_flow_mbit", "link_mbit", "rtt_ms", "tls", "fastpull", "containerd", "snapshotter_hosts", "images")
    first = results[0]
    for other in results[1:]:
        if differ := [k for k in same if other.get(k) != first.get(k)]:
            raise SystemExit(f"cannot pool results that differ in {', '.join(differ)}")
    pooled = {**first, "raw": [], "runs": sum(r["runs"] for r in results),
              "minutes": sum(r.get("minutes", 0) for r in results), "protocols": {}}
    pooled["notes"] = [*first.get("notes", []),
                       f"{len(results)} invocations of this bench pooled ({', '.join(str(r['runs']) for r in results)} "
                       "runs), one after the other; a run's rows are interleaved within it"]
    for i, r in enumerate(results):
        pooled["raw"] += [{**row, "extra": {**row["extra"], "invocation": i}} for row in r["raw"]]
        for k, v in r.get("protocols", {}).items():
            pooled["protocols"][k] = sorted({*pooled["protocols"].get(k, []), *v})
    return pooled


def images_for(scale: float, cache: Path, keys: list[str]) -> dict[str, BuiltImage]:
    specs = {
        "big": [LayerSpec(int(mb * scale * MB), files=10) for mb in BIG_LAYERS_MB],
        "files": [LayerSpec(int(FILES_MB / FILES_LAYERS * scale * MB), "text",
                            files=max(1, int(FILES_TOTAL / FILES_LAYERS * scale)))
                  for _ in range(FILES_LAYERS)],
    }
    return {key: build_image(specs[key], cache / f"{key}-{scale:g}", seed=10 + i)
            for i, key in enumerate(IMAGES) if key in keys}


def fastpull_state(root: Path) -> str:
    """The fastpull that runs: this tree's git state, or ``--fastpull-root``'s path and, if it has a
    ``.git-archive-of`` file (written beside a ``git archive``), the commit it holds."""
    state = git_state(root)
    if (root / ".git-archive-of").exists():
        state += f" (git archive of {(root / '.git-archive-of').read_text().strip()})"
    return state


def main() -> int:
    ap = bed_arguments(__doc__, "smoke run: images / 10, one run")
    ap.set_defaults(per_flow=240, link=2400)
    ap.add_argument("--runs", type=int, help="runs, median (default 3; quick 1)")
    ap.add_argument("--tls", action="store_true", help="the registry speaks HTTPS (HTTP/2 by ALPN), not plain HTTP")
    ap.add_argument("--versions", default=",".join(VERSIONS), help="containerd versions: any of 1.6,2")
    ap.add_argument("--images", default=",".join(IMAGES), help=f"any of {','.join(IMAGES)}")
    ap.add_argument("--rows", default=",".join([*ROWS, CONCURRENT]), help=f"any of {','.join([*ROWS, CONCURRENT])}")
    ap.add_argument("--concurrent-images", default="big", help="images of the concurrent row (default big)")
    ap.add_argument("--clients", type=int, default=20, help="CRI pulls at once in the concurrent row (default 20)")
    ap.add_argument("--containerd2", type=Path, default=Path("/opt/containerd-2/bin"),
                    help="directory with containerd 2.x's containerd and ctr (default %(default)s)")
    ap.add_argument("--snapshotter-hosts", choices=("mirror", "direct"), default="mirror",
                    help="where containerd's hosts.toml points in the snapshotter rows: fastpull serve (the "
                         "printed config) or the registry (default %(default)s)")
    ap.add_argument("--results", default="snapshotter", help="results name (default snapshotter; -tls, -quick appended)")
    ap.add_argument("--rewrite", type=Path, metavar="JSON",
                    help="write the markdown again from a results JSON (beside it), and run nothing")
    ap.add_argument("--pool", type=Path, nargs="+", metavar="JSON",
                    help="pool the runs of several results JSONs of one tree and setting (each run's rows stay "
                         "interleaved) into bench/results/RESULTS.json and .md, and run nothing")
    ap.add_argument("--name", default="fpsnap", help="network namespace name (must not exist)")
    ap.add_argument("--fastpull-root", type=Path, default=REPO,
                    help="directory holding the fastpull package that serves (default: this tree; e.g. a git archive)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastpull-bench-snapshotter"))
    ap.add_argument("--disk", action="store_true",
                    help="containerd's roots and fastpull's stores on the work dir's disk, not on a tmpfs")
    args = ap.parse_args()

    if args.rewrite:
        args.rewrite.with_suffix(".md").write_text(report(json.loads(args.rewrite.read_text())))
        return 0
    if args.pool:
        pooled = pool([json.loads(p.read_text()) for p in args.pool])
        (RESULTS / f"{args.results}.json").write_text(json.dumps(pooled, indent=1))
        (RESULTS / f"{args.results}.md").write_text(report(pooled))
        log(f"wrote {RESULTS / f'{args.results}.md'}: {pooled['runs']} runs")
        return 0
    scale = 0.1 if args.quick else 1.0
    runs = args.runs or (1 if args.quick else 3)
    versions = [v for v in args.versions.split(",") if v]
    image_keys = [i for i in args.images.split(",") if i]
    rows = [r for r in args.rows.split(",") if r]
    if unknown := (set(versions) - set(VERSIONS)) | (set(image_keys) - set(IMAGES)) | (set(rows) - {*ROWS, CONCURRENT}):
        ap.error(f"unknown versions, images or rows: {', '.join(sorted(unknown))}")
    notes = []
    containerd2 = args.containerd2.resolve()
    if "2" in versions and not (containerd2 / "containerd").exists():
        notes.append(f"containerd 2.x rows left out: no {containerd2 / 'containerd'} (see bench/README.md, "
                     "How to get containerd 2.x)")
        log(notes[-1])
        versions.remove("2")
    names = {"1.6": version_of("containerd"), "2": version_of(str(containerd2 / "containerd"))}
    root = args.fastpull_root.resolve()
    compile_package(root)
    work = args.workdir.resolve()
    for entry in work.glob("*") if work.exists() else []:
        if entry.name != "images":
            _remove(entry)
            if entry.is_mount():
                subprocess.run(["umount", "-l", str(entry)], check=False)
            shutil.rmtree(entry, ignore_errors=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    if not args.disk:
        # On this VM's disk, creating files slows down run after run (writeback of the runs before,
        # deleted inodes scanned): 3,000 files took 1.3 s, then 2.7, 3.1, 3.6 s; 0.2 s on a tmpfs.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fpsnap", str(work / "runs")], check=True)
        stack.callback(subprocess.run, ["umount", "-l", str(work / "runs")], check=False)
    # `python -m fastpull serve` puts its working directory first on sys.path: never this tree's, so
    # that PYTHONPATH=--fastpull-root decides which fastpull runs.
    os.chdir(work)
    images = images_for(scale, work / "images", image_keys)
    data: dict[str, Any] = {"per_flow_mbit": args.per_flow, "link_mbit": args.link, "rtt_ms": args.rtt,
                            "tls": args.tls, "runs": runs, "fastpull": fastpull_state(root),
                            "containerd": {v: names[v] for v in versions}, "notes": notes,
                            "snapshotter_hosts": args.snapshotter_hosts, "tmpfs": not args.disk,
                            "kernel": os.uname().release, "cpus": os.cpu_count(),
                            "images": {k: {"bytes": im.total_size, "layers": [layer.size for layer in im.layers]}
                                       for k, im in images.items()}}
    if "files" in data["images"]:
        data["images"]["files"]["files"] = max(1, int(FILES_TOTAL / FILES_LAYERS * scale)) * FILES_LAYERS
    results: list[Row] = []
    started = time.monotonic()
    with stack, ThrottledBed(args.per_flow, args.link, rtt_ms=args.rtt, name=args.name) as bed, \
            bed.registry(work / "registry", tls=args.tls) as registry:
        trust(registry.ca_file)  # the pusher and fastpull serve verify the registry with the bed's CA
        refs = {}
        for key, image in images.items():
            bed.call(push_image, registry.url, f"bench/{key}", "latest", image)
            refs[key] = f"{registry.host}/bench/{key}:latest"
        bench = SnapshotterBench(bed, registry, work / "runs", root,
                                 containerd2 if "2" in versions else None, args.snapshotter_hosts, args.clients)
        try:
            for run in range(runs):
                log(f"run {run + 1} of {runs}")
                for version in versions:
                    for key in image_keys:
                        for row in rows:
                            if row == CONCURRENT and key not in args.concurrent_images.split(","):
                                continue
                            results.append(bench.measure(version, key, row, refs[key], images[key]))
        finally:
            bench.close()
            data["raw"] = [asdict(r) for r in results]
            data["protocols"] = {k: sorted(v) for k, v in bench.protocols.items()}

    data["minutes"] = (time.monotonic() - started) / 60
    RESULTS.mkdir(exist_ok=True)
    name = args.results + ("-tls" if args.tls else "") + ("-quick" if args.quick else "") + \
        (f"-rtt{args.rtt:g}" if args.rtt else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text(report(data))
    log(f"wrote {RESULTS / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
