"""Where the time of a pull goes (issue 20): a timeline of cold ``fastpull pull`` processes on the
far-registry bed, and the small-image table against skopeo and the link's time.

    python bench/bench_timeline.py                   # timelines, plain HTTP and TLS (HTTP/2): ~2 min
    python bench/bench_timeline.py --table --runs 5  # also the table: fastpull pull, through fastpull serve, skopeo
    python bench/bench_timeline.py --replot          # redraw the PNGs from bench/results/timeline.json

The bed (bench/bed.py) caps each connection at ``--per-flow`` (240 Mbit/s: 30 MB/s) and all of them at
``--link`` (2400 Mbit/s: 300 MB/s), as S3 and node NICs have it. Images: *many*, 20 layers of 0.9-18 MB
(189 MB), and the quick bench's *small* (24 layers, 24 MB) and *typical* (8 layers, 60 MB); ``--images big``
adds one layer of 1000 MB.

**Timeline.** A pull runs as ``python -c DRIVER``, which wraps a few of fastpull's functions before running
``python -m fastpull``'s own ``__main__`` (its imports come first, the rest is as it is): each synchronous
request (the scheme probe, tokens, manifests), each transfer of the fetch engine with libcurl's own times
(queued, connected, first byte, last byte; whether it opened a connection), when each blob was asked for,
opened and committed. Beside it this process reads the namespace's ``lo`` transmit counter every 2 ms:
the bytes the shaped link carried, hence when it sat idle. Each run gives a PNG
(``bench/results/timeline-<image>[-tls].png``: a row per blob, its requests as bars, the link's
throughput under it) and a row of phases in ``timeline.md``: start-up (spawn to the first request),
resolve (to the first blob request), the fetch (first blob request to the last byte), the tail (last byte
to exit) and the link's idle share.

**Table** (``--table``): medians of ``--runs`` rounds, each round running every row once, interleaved:
``fastpull pull`` (cold: a fresh layout, a new process), a prefetch through a running ``fastpull serve``
(``POST /_fastpull/v1/prefetch``, timed from the POST to the daemon's log line saying it is pulled; the daemon
is fresh each round and has prefetched another image from the registry first, as a node's daemon has),
and ``skopeo copy``; the floor is the image's bytes at the link's rate. Written to
``bench/results/timeline-table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from bed import REPO, ThrottledBed, compile_package, trust

from fastpull.testbed.images import BuiltImage, LayerSpec, build_image, push_image

MB = 1_000_000
RESULTS = Path(__file__).resolve().parent / "results"

IMAGES = {
    "many": ("20 layers of 0.9-18 MB", tuple(0.9 * (1 + (i * 7) % 20) for i in range(20))),
    "small": ("the quick bench's small: 24 layers of 0.1-2 MB", tuple(0.1 * (1 + (i * 7) % 20) for i in range(24))),
    "typical": ("the quick bench's typical: 8 layers of 2-15 MB", (15, 12, 10, 8, 6, 4, 3, 2)),
    "big": ("one big layer of 1000 MB (not by default: that nothing changed for it)", (1000,)),
}
DEFAULT_IMAGES = "many,small,typical"

# The pull, instrumented: fastpull's own command line with a few functions wrapped to note when things happen.
DRIVER = r"""
import atexit, json, sys, time
t_driver = time.monotonic()
out, argv = sys.argv[1], sys.argv[2:]
import pycurl
from fastpull.http import transport
from fastpull.engine import blobs, loop, multi
from fastpull.puller import core
trace = {"driver": t_driver, "requests": [], "transfers": [], "asked": {}, "opened": {}, "committed": {}}
now = time.monotonic

def wrap(cls, name, before=None, after=None):
    original = getattr(cls, name)
    def wrapper(self, *args, **kwargs):
        note = before(self, *args, **kwargs) if before else None
        try:
            return original(self, *args, **kwargs)
        finally:
            if after:
                after(note, self, *args, **kwargs)
    setattr(cls, name, wrapper)

wrap(transport.Transport, "request", lambda self, method, url, *a, **k: now(),
     lambda t, self, method, url, *a, **k: trace["requests"].append({"method": method, "url": url, "start": t,
                                                                      "end": now()}))
wrap(core.Puller, "_resolve", lambda self, *a: trace.setdefault("resolve_start", now()),
     lambda _, self, *a: trace.setdefault("resolve_end", now()))
wrap(core.Puller, "pull", after=lambda _, self, *a, **k: trace.setdefault("pulled", now()))
wrap(core.Puller, "close", after=lambda _, self, *a, **k: trace.setdefault("closed", now()))
wrap(loop.FetchEngine, "fetch", lambda self, store, source, digest, size, **k: trace["asked"].setdefault(digest, [now(), size]))
wrap(blobs.Blobs, "_start", lambda self, blob, writer: trace["opened"].setdefault(blob.digest, now()))
wrap(blobs.Blobs, "committed", lambda self, command: trace["committed"].setdefault(command.blob.digest, now()))
INFO = {"queue": "QUEUE_TIME_T", "connect": "CONNECT_TIME_T", "tls": "APPCONNECT_TIME_T",
        "pretransfer": "PRETRANSFER_TIME_T", "first_byte": "STARTTRANSFER_TIME_T", "total": "TOTAL_TIME_T"}

def removed(self, t):
    c = t.curl
    row = {"digest": t.blob.digest, "start": t.started, "end": now(), "range": [t.start, t.end],
           "bytes": int(c.getinfo(pycurl.SIZE_DOWNLOAD_T)), "connects": c.getinfo(pycurl.NUM_CONNECTS),
           "port": c.getinfo(pycurl.LOCAL_PORT), "http2": t.http2, "status": t.status}
    row.update({k: c.getinfo(getattr(pycurl, v)) / 1e6 for k, v in INFO.items()})
    trace["transfers"].append(row)

wrap(multi.Multi, "remove", removed)
trace["imported"] = now()

def dump():
    if "exit" not in trace:
        trace["exit"] = now()
        with open(out, "w") as f:
            json.dump(trace, f)

atexit.register(dump)
import os, runpy
_exit = os._exit

def exit_now(status):  # python -m fastpull may leave without the interpreter's finalization
    dump()
    _exit(status)

os._exit = exit_now
sys.argv = ["fastpull", *argv]
runpy.run_module("fastpull", run_name="__main__", alter_sys=True)
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the link's counter -----------------------------------------------------------------------------


class LinkSampler:
    """Reads the namespace's ``lo`` transmit bytes (``/proc/PID/net/dev`` of a process inside it) every
    ``interval`` s on a thread: (monotonic time, bytes) pairs. Loopback counts a packet when the shaper
    lets it go, so the counter follows the shaped link (requests and ACKs add a little)."""

    def __init__(self, pid: int, interval: float = 0.002):
        self._path = f"/proc/{pid}/net/dev"
        self._interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        with open(self._path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])
        raise RuntimeError(f"no lo in {self._path}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._read()))
            time.sleep(self._interval)

    def __enter__(self) -> LinkSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def link_rate(samples: list[tuple[float, int]], t0: float, t1: float, bin_s: float) -> list[tuple[float, float]]:
    """Bytes/s the link carried in bins of ``bin_s`` from ``t0`` to ``t1``: (bin start, rate)."""
    out = []
    t = t0
    i = 0
    while t < t1:
        while i + 1 < len(samples) and samples[i + 1][0] <= t:
            i += 1
        j = i
        while j + 1 < len(samples) and samples[j][0] < t + bin_s:
            j += 1
        (ta, a), (tb, b) = samples[i], samples[j]
        out.append((t, (b - a) / (tb - ta) if tb > ta else 0.0))
        t += bin_s
    return out


# ---- one timeline ---------------------------------------------------------------------------------------


def run_timeline(bed: ThrottledBed, registry_pid: int, ref: str, work: Path, root: Path) -> dict[str, Any]:
    """One cold pull of ``ref`` under the driver; its trace, the link's samples, and the wall."""
    layout = Path(tempfile.mkdtemp(dir=work, prefix="timeline-"))
    trace_file = layout / "trace.json"
    env = {**os.environ, "PYTHONPATH": str(root)}
    try:
        with LinkSampler(registry_pid) as sampler:
            time.sleep(0.05)
            spawn = time.monotonic()
            proc = bed.popen([sys.executable, "-c", DRIVER, str(trace_file), "pull", ref, "--layout",
                              str(layout / "oci")], cwd=root, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
            _, err = proc.communicate()
            ended = time.monotonic()
            bed.forget(proc)
            time.sleep(0.02)
        if proc.returncode != 0:
            raise RuntimeError(f"the pull failed ({proc.returncode}): {err[-2000:]}")
        trace = json.loads(trace_file.read_text())
    finally:
        shutil.rmtree(layout, ignore_errors=True)
    return {"spawn": spawn, "ended": ended, "trace": trace, "link": sampler.samples}


def phases(run: dict[str, Any], link_bytes_s: float) -> dict[str, float]:
    """The run's phases in seconds, and the link's use during the fetch."""
    tr, spawn = run["trace"], run["spawn"]
    first_request = min([r["start"] for r in tr["requests"]] + [a[0] for a in tr["asked"].values()])
    first_blob = min(a[0] for a in tr["asked"].values())
    transfers = tr["transfers"]
    last_byte = max(t["start"] + t["total"] for t in transfers)
    first_byte = min(t["start"] + t["first_byte"] for t in transfers)
    nbytes = sum(t["bytes"] for t in transfers)
    rates = [r for t, r in link_rate(run["link"], first_blob, last_byte, 0.01)]
    idle = sum(1 for r in rates if r < 0.5 * link_bytes_s) / max(len(rates), 1)
    return {
        "wall": run["ended"] - spawn,
        "interpreter": tr["driver"] - spawn,
        "imports": tr["imported"] - tr["driver"],
        "startup": first_request - spawn,
        "resolve": first_blob - first_request,
        "first_byte": first_byte - first_blob,
        "fetch": last_byte - first_blob,
        "tail": run["ended"] - last_byte,
        "to_pulled": tr.get("pulled", last_byte) - last_byte,
        "close": tr.get("closed", last_byte) - tr.get("pulled", last_byte),
        "link_floor": nbytes / link_bytes_s,
        "fetch_link_share": nbytes / link_bytes_s / (last_byte - first_blob),
        "idle_share": idle,
        "requests": len(transfers),
        "connections": sum(t["connects"] for t in transfers),
        "sync_requests": len(tr["requests"]),
    }


PHASE_COLUMNS = ("wall", "startup", "resolve", "first_byte", "fetch", "tail", "link_floor")
TAIL_COLUMNS = ("to_pulled", "close")


def phase_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    head = ("| run | wall s | start-up s | resolve s | to first byte s | fetch s | tail s | link floor s | "
            "fetch / floor | idle 10 ms bins in fetch | requests | connections | sync requests | tail: to the "
            "pull's return s | tail: closing s |")
    lines = [head, "| --- |" + " ---: |" * 14]
    for name, p in rows:
        lines.append(f"| {name} | " + " | ".join(f"{p[k]:.3f}" for k in PHASE_COLUMNS)
                     + f" | {p['fetch'] / p['link_floor']:.2f}x | {p['idle_share']:.0%} | {p['requests']} | "
                       f"{p['connections']} | {p['sync_requests']} | {p['to_pulled']:.3f} | {p['close']:.3f} |")
    return "\n".join(lines)


def plot(run: dict[str, Any], title: str, link_bytes_s: float, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, t0 = run["trace"], run["spawn"]
    order = list(tr["asked"])  # config first, then the layers base first, as the pull asks
    size = {d: a[1] for d, a in tr["asked"].items()}
    fig, (ax, link) = plt.subplots(2, 1, figsize=(10, 2.2 + 0.18 * len(order)), sharex=True,
                                   gridspec_kw={"height_ratios": [max(3, len(order) * 0.18), 1.4]})
    for t in tr["transfers"]:
        y = order.index(t["digest"])
        start = t["start"] - t0
        ax.barh(y, t["first_byte"], left=start, height=0.7, color="#cccccc")
        ax.barh(y, t["total"] - t["first_byte"], left=start + t["first_byte"], height=0.7,
                color="#1f77b4" if t["status"] in (200, 206) else "#d62728", edgecolor="white", linewidth=0.3)
        if t["connects"]:
            ax.plot(start + t["connect"], y, marker="|", color="k", markersize=6)
    for digest, at in tr["committed"].items():
        if digest in order:
            ax.plot(at - t0, order.index(digest), marker=".", color="#2ca02c", markersize=5)
    for r in tr["requests"]:
        ax.barh(-1.2, r["end"] - r["start"], left=r["start"] - t0, height=0.7, color="#ff7f0e")
    ax.set_yticks([-1.2] + list(range(len(order))),
                  ["sync requests"] + [f"{'config' if i == 0 else f'layer {i}'} {size[d] / MB:.1f} MB"
                                       for i, d in enumerate(order)], fontsize=6)
    ax.invert_yaxis()
    marks = {"interpreter up": tr["driver"], "imports": tr["imported"], "exit": run["ended"]}
    for name, at in marks.items():
        ax.axvline(at - t0, color="k", ls=":", lw=0.8)
        ax.text(at - t0, -2.2, name, fontsize=6, rotation=0, ha="left")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    rates = link_rate(run["link"], t0, run["ended"], 0.01)
    link.plot([t - t0 for t, _ in rates], [r / MB for _, r in rates], drawstyle="steps-post", lw=0.8)
    link.axhline(link_bytes_s / MB, color="k", ls="--", lw=0.8, label="link cap")
    link.set_ylabel("link MB/s", fontsize=7)
    link.set_xlabel("seconds since the process was spawned (grey: waiting for the first byte; | a new "
                    "connection; green dot: committed)", fontsize=7)
    link.legend(fontsize=6, loc="upper right")
    link.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---- the table: fastpull pull, fastpull serve, skopeo ---------------------------------------------------


class _StampedLines(list):
    """The daemon's stderr lines, each with the monotonic time it arrived (ServeProcess appends here)."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[float] = []

    def append(self, line: str) -> None:
        self.stamps.append(time.monotonic())
        super().append(line)

    def wait_for(self, text: str, since: int, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(since, len(self)):
                if text in self[i]:
                    return self.stamps[i]
            time.sleep(0.002)
        raise RuntimeError(f"no {text!r} in the daemon's log: {''.join(self[since:])[-2000:]}")


def measure_serve(bed: ThrottledBed, registry_host: str, warm_ref: str, ref: str, work: Path, root: Path) -> float:
    """A prefetch of ``ref`` through a running ``fastpull serve`` that prefetched ``warm_ref`` first:
    seconds from the POST to the log line saying it is pulled."""
    from fastpull.testbed.daemon import ServeProcess

    base = Path(tempfile.mkdtemp(dir=work, prefix="serve-"))
    serve = ServeProcess(base / "store", registry_host, env={"PYTHONPATH": str(root)})
    serve._lines = lines = _StampedLines()
    here = os.getcwd()
    os.chdir(root)  # python -m fastpull finds the package in its working directory first
    try:
        bed.call(serve.start)
    finally:
        os.chdir(here)
    try:
        def prefetch(target: str) -> float:
            since = len(lines)
            request = urllib.request.Request(f"{serve.url}/_fastpull/v1/prefetch",
                                             data=json.dumps({"refs": [target]}).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            started = time.monotonic()
            bed.call(lambda: opener.open(request, timeout=30).read())
            return lines.wait_for(f"prefetched {target}", since) - started

        prefetch(warm_ref)
        return prefetch(ref)
    finally:
        serve.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class TableRow:
    image: str
    protocol: str
    tool: str
    walls: list[float]
    cpus: list[float] = field(default_factory=list)
    """User + system CPU seconds of the process (not for serve: its daemon runs on)."""


def table_markdown(rows: list[TableRow], images: dict[str, BuiltImage], link_bytes_s: float) -> str:
    base = any(r.tool.endswith("@base") for r in rows)
    lines = ["| registry | image | link floor s | fastpull pull s | x floor | through fastpull serve s | x floor | "
             "skopeo s | x floor | fastpull vs skopeo | CPU s: fastpull / skopeo |"
             + (" before: fastpull pull s | x floor | before: through serve s | x floor |" if base else ""),
             "| --- | --- |" + " ---: |" * (13 if base else 9)]
    keys = list(dict.fromkeys((r.protocol, r.image) for r in rows))
    for protocol, image in keys:
        floor = images[image].total_size / link_bytes_s
        cells = {r.tool: statistics.median(r.walls) for r in rows if (r.protocol, r.image) == (protocol, image)}
        spread = {r.tool: (min(r.walls), max(r.walls)) for r in rows if (r.protocol, r.image) == (protocol, image)}

        def cell(tool: str, cells=cells, spread=spread, floor=floor) -> str:
            if tool not in cells:
                return "- | -"
            lo, hi = spread[tool]
            return f"{cells[tool]:.3f} ({lo:.2f}-{hi:.2f}) | {cells[tool] / floor:.2f}x"

        cpus = {r.tool: statistics.median(r.cpus) for r in rows if (r.protocol, r.image) == (protocol, image) and r.cpus}
        vs = f"{cells['skopeo'] / cells['fastpull']:.2f}x" if "skopeo" in cells and "fastpull" in cells else "-"
        cpu = " / ".join(f"{cpus[t]:.2f}" if t in cpus else "-" for t in ("fastpull", "skopeo"))
        lines.append(f"| {protocol} | {image} ({images[image].total_size / MB:.0f} MB, "
                     f"{len(images[image].layers)} layers) | {floor:.3f} | {cell('fastpull')} | {cell('serve')} | "
                     f"{cell('skopeo')} | {vs} | {cpu} |"
                     + (f" {cell('fastpull@base')} | {cell('serve@base')} |" if base else ""))
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-flow", type=float, default=240, help="Mbit/s per TCP connection (default 240)")
    ap.add_argument("--link", type=float, default=2400, help="Mbit/s for all connections (default 2400)")
    ap.add_argument("--protocols", default="http,https", help="http (plain HTTP/1.1), https (TLS, HTTP/2)")
    ap.add_argument("--images", default=DEFAULT_IMAGES, help=f"any of {','.join(IMAGES)} (default {DEFAULT_IMAGES})")
    ap.add_argument("--timelines", type=int, default=1, help="timeline runs per image and protocol (default 1)")
    ap.add_argument("--table", action="store_true", help="also measure the table (fastpull, serve, skopeo)")
    ap.add_argument("--runs", type=int, default=5, help="rounds of the table, median (default 5)")
    ap.add_argument("--tools", default="fastpull,serve,skopeo",
                    help="the table's rows: fastpull, serve, skopeo; fastpull@base and serve@base with --baseline")
    ap.add_argument("--baseline", type=Path, help="another tree holding a fastpull package (e.g. git archive of HEAD "
                                                   "with the compiled core copied in), for the @base rows")
    ap.add_argument("--name", default="fptimeline", help="network namespace name (must not exist)")
    ap.add_argument("--fastpull-root", type=Path, default=REPO)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastpull-bench-timeline"))
    ap.add_argument("--suffix", default="", help="added to the result files' names")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNGs from the JSON of the timelines")
    args = ap.parse_args()

    link_bytes_s = args.link * 1e6 / 8
    RESULTS.mkdir(exist_ok=True)
    raw_path = RESULTS / f"timeline{args.suffix}.json"
    if args.replot:
        data = json.loads(raw_path.read_text())
        for run in data["timelines"]:
            print(plot(run, run["title"], data["link_bytes_s"], RESULTS / run["png"]))
        return 0

    compile_package(args.fastpull_root)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    wanted = [k for k in args.images.split(",") if k]
    images = {k: build_image([LayerSpec(int(mb * MB)) for mb in IMAGES[k][1]], work / "images" / k) for k in wanted}
    warm = build_image([LayerSpec(MB)], work / "images" / "warm", seed=1)
    load = os.getloadavg()
    data: dict[str, Any] = {"per_flow_mbit": args.per_flow, "link_mbit": args.link, "link_bytes_s": link_bytes_s,
                            "fastpull": _git_state(args.fastpull_root), "load_before": load, "timelines": [],
                            "table": []}
    log(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    phase_rows: list[tuple[str, dict[str, float]]] = []
    table: list[TableRow] = []
    tools = [t for t in args.tools.split(",") if t]
    with ThrottledBed(args.per_flow, args.link, name=args.name) as bed:
        for protocol in [p for p in args.protocols.split(",") if p]:
            tls = protocol == "https"
            with bed.registry(work / f"registry-{protocol}", tls=tls) as registry:
                trust(registry.ca_file)
                for key, image in images.items():
                    bed.call(push_image, registry.url, f"bench/{key}", "latest", image)
                bed.call(push_image, registry.url, "bench/warm", "latest", warm)
                refs = {key: f"{registry.host}/bench/{key}:latest" for key in images}
                for key in images:
                    for n in range(args.timelines):
                        run = run_timeline(bed, registry.pid, refs[key], work / "runs", args.fastpull_root)
                        name = f"{key}, {protocol}" + (f" #{n + 1}" if args.timelines > 1 else "")
                        p = phases(run, link_bytes_s)
                        phase_rows.append((name, p))
                        log(f"timeline {name}: " + ", ".join(f"{k} {p[k]:.3f}" for k in PHASE_COLUMNS + TAIL_COLUMNS))
                        if n == 0:
                            run["title"] = (f"fastpull pull, {key} ({len(images[key].layers)} layers, "
                                            f"{images[key].total_size / MB:.0f} MB), {protocol}: wall "
                                            f"{p['wall']:.2f} s, link floor {p['link_floor']:.2f} s "
                                            f"(per flow {args.per_flow:g} / link {args.link:g} Mbit/s)")
                            run["png"] = f"timeline-{key}{'-tls' if tls else ''}{args.suffix}.png"
                            data["timelines"].append(run)
                            plot(run, run["title"], link_bytes_s, RESULTS / run["png"])
                if args.table:
                    cells = {(key, tool): TableRow(key, protocol, tool, []) for key in images for tool in tools}
                    for n in range(args.runs):
                        log(f"table round {n + 1} of {args.runs} ({protocol}), load {os.getloadavg()[0]:.2f}")
                        for key in images:
                            for tool in tools:
                                root = args.baseline if tool.endswith("@base") else args.fastpull_root
                                cpu = None
                                if tool.startswith("fastpull"):
                                    sample = peers.measure_fastpull(bed, refs[key], work / "runs", root=root)
                                    wall, cpu = sample.wall, sample.cpu
                                elif tool == "skopeo":
                                    sample = peers.measure_skopeo(bed, refs[key], work / "runs")
                                    wall, cpu = sample.wall, sample.cpu
                                else:
                                    wall = measure_serve(bed, registry.host, f"{registry.host}/bench/warm:latest",
                                                         refs[key], work / "runs", root)
                                cells[key, tool].walls.append(wall)
                                if cpu is not None:
                                    cells[key, tool].cpus.append(cpu)
                                log(f"  {key} {tool}: {wall:.3f} s" + (f", CPU {cpu:.2f} s" if cpu is not None else ""))
                    table += cells.values()
    data["load_after"] = os.getloadavg()
    data["phases"] = phase_rows
    data["table"] = [vars(r) for r in table]
    raw_path.write_text(json.dumps(data))
    caps = f"per flow {args.per_flow:g} / link {args.link:g} Mbit/s"
    md = [f"# Where the time of a pull goes ({caps})\n\nfastpull {data['fastpull']}; load average "
          f"{load[0]:.2f} before, {data['load_after'][0]:.2f} after (2 CPUs, shared).\n\n"
          "start-up: spawn to the first request; resolve: to the first blob asked of the engine; to first byte: "
          "from there to the first blob byte; fetch: first blob asked to the last byte; tail: last byte to the "
          "process's exit; idle: 10 ms bins of the fetch in which the link carried under half its cap.\n\n"
          + phase_table(phase_rows)]
    md += [f"![{r['png']}]({r['png']})" for r in data["timelines"]]
    (RESULTS / f"timeline{args.suffix}.md").write_text("\n\n".join(md) + "\n")
    log(f"wrote {RESULTS / f'timeline{args.suffix}.md'}")
    if table:
        text = (f"# Small images on the far-registry bed ({caps})\n\nMedians of {args.runs} interleaved rounds "
                f"(min-max in brackets); fastpull {data['fastpull']}; load average {load[0]:.2f} before, "
                f"{data['load_after'][0]:.2f} after.\n\n" + table_markdown(table, images, link_bytes_s))
        (RESULTS / f"timeline-table{args.suffix}.md").write_text(text + "\n")
        print(text)
    return 0


def _git_state(root: Path) -> str:
    from bench_bed import git_state

    return git_state(root)


if __name__ == "__main__":
    raise SystemExit(main())
