"""containerd through a node-local registry mirror on the far-registry bed (bench/bed.py).

    python bench/bench_serve.py                     # all sections, 3 runs (~12 min on 2 cores)
    python bench/bench_serve.py --quick             # images / 10, one run
    python bench/bench_serve.py --mirrors direct,proxy --only pull
    python bench/bench_serve.py --tls               # the registry speaks HTTPS (HTTP/2 by ALPN)

Every process runs inside the bed's namespace. The registry on 127.0.0.1:5000 is shaped (each
connection capped at ``--per-flow``, all at ``--link``); the mirrors listen on other ports of the
same loopback, unshaped and over plain HTTP, as a daemon on the node would. With ``--tls`` the
registry serves HTTPS with a self-signed certificate, and every client of it verifies that (the
bench's environment names it in ``SSL_CERT_FILE`` and ``CURL_CA_BUNDLE`` for fastpull and
distribution's proxy; containerd's ``hosts.toml`` names it as ``ca``). Sections:

1. **pull**: ``ctr image pull`` (fetch + unpack, a fresh containerd per pull) of a ~1 GB multi-layer
   image: directly from the registry; through ``fastpull serve`` with a cold store, then warm (a
   fresh containerd, the daemon restarted on the same store); through distribution's registry in
   pull-through proxy mode (``proxy: remoteurl:``) cold, then warm likewise. containerd is pointed
   at the mirror, or at the registry, with a ``hosts.toml`` (tests/clients.py).
2. **fetch**: the same with ``ctr content fetch`` (no unpack): the mirror's part without containerd's
   unpack, which alone takes most of a warm pull.
3. **stream**: one cold ~850 MB layer as ``curl`` GETs it through each mirror (time to first byte and
   to the last), against ``fastpull pull`` of the same one-layer image (fetch only).
4. **fanout**: 20 ``curl`` clients at once GET one cold blob through each mirror; each body's
   sha256 is checked.

Upstream bytes are the bodies the shaped registry sent (its access log, which also tells the HTTP
version each client spoke to it). A mirror's peak RSS is ``VmHWM`` summed over its process and its
descendants, read before it stops; every mirror is a fresh process per measurement (its store kept
for the warm rows). Medians of ``--runs``; rows of one run are interleaved. Tables go to
``bench/results/serve[-tls][-quick].md`` (``--results``; raw samples in ``.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]

import clients  # tests/clients.py
import peers
from bed import REPO, ThrottledBed, compile_package, trust
from bench_bed import MB, RESULTS, bed_arguments, git_state, log
from procs import descendants

from fastpull.testbed import BuiltImage, LayerSpec, LocalRegistry, build_image, push_image
from fastpull.testbed.daemon import ServeProcess

PROXY_PORT = 5002
MIRRORS = ("direct", "serve", "proxy")
SECTIONS = ("pull", "fetch", "stream", "fanout")
IMAGE_OF = {"pull": "multi", "fetch": "multi", "stream": "stream", "fanout": "fanout"}
"""The image each section pulls: pull and fetch share the multi-layer one."""
MULTI_LAYERS_MB = (300, 200, 150, 120, 100, 60, 40, 30)  # 1000 MB in 8 layers
DIRECT = "containerd, directly"
SERVE_COLD = "containerd through fastpull serve, cold"
SERVE_WARM = "containerd through fastpull serve, warm"
PROXY_COLD = "containerd through distribution proxy, cold"
FASTPULL_PULL = "fastpull pull (fetch only, whole image)"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Mirror:
    """A running mirror inside the bed: ``host`` as clients reach it, ``stored(digest)`` where its store
    keeps a blob once it has it all."""

    name: str
    host: str
    pid: int
    stored: Callable[[str], Path]

    def peak_rss_mb(self) -> float:
        """``VmHWM`` of the mirror's process tree, summed (each process's peak over its life)."""
        total = 0.0
        for pid in descendants({self.pid}):
            try:
                total += peers.peak_rss_mb(pid)
            except OSError:  # exited meanwhile
                continue
        return total


@dataclass(frozen=True)
class Row:
    """One measurement: wall seconds, upstream body bytes, the mirror's peak RSS (None: no mirror)
    and what else the section reports."""

    setting: str
    wall: float
    upstream: int
    rss_mb: float | None
    extra: dict[str, float]


# ---- mirrors ---------------------------------------------------------------------------------------


@contextmanager
def fastpull_serve(bed: ThrottledBed, store: Path, upstream: str, root: Path) -> Iterator[Mirror]:
    """``fastpull serve`` of the tree at ``root`` inside the bed, on a free port of its loopback."""
    daemon = ServeProcess(store, upstream, env={"PYTHONPATH": str(root)})
    bed.call(daemon.start)  # a child forked from a thread inside the namespace starts inside it
    try:
        assert daemon.proc is not None
        yield Mirror("fastpull serve", daemon.host, daemon.proc.pid, lambda d: store / "blobs" / "sha256" / d[7:])
    finally:
        if (code := daemon.stop()) != 0:
            log(f"fastpull serve exited {code}: {daemon.log[-1500:]}")


@contextmanager
def distribution_proxy(bed: ThrottledBed, storage: Path, upstream_url: str) -> Iterator[Mirror]:
    """distribution's registry in pull-through proxy mode on 127.0.0.1:PROXY_PORT inside the bed."""
    reg = LocalRegistry(storage, host="127.0.0.1", port=PROXY_PORT, command_prefix=bed.prefix,
                        extra_config={"proxy": {"remoteurl": upstream_url}})
    bed.call(reg.start)
    try:
        assert reg.pid is not None
        yield Mirror("distribution proxy", reg.host, reg.pid, lambda d: _distribution_blob(storage, d))
    finally:
        reg.stop()


def _distribution_blob(storage: Path, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def _wait_stored(mirror: Mirror, digests: list[str], timeout: float = 300) -> None:
    """Until ``mirror`` has every blob in its store: distribution's proxy stores a blob in a
    goroutine of its own (fetching it upstream again) after the client has it."""
    deadline = time.monotonic() + timeout
    while not all(mirror.stored(d).exists() for d in digests):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mirror.name} did not store {digests} in {timeout:g} s")
        time.sleep(0.1)


# ---- sections --------------------------------------------------------------------------------------


class ServeBench:
    def __init__(self, bed: ThrottledBed, registry: Any, work: Path, root: Path, mirrors: list[str]):
        self.bed = bed
        self.registry = registry
        self.work = work
        self.root = root
        self.mirrors = mirrors
        self.raw: list[dict[str, Any]] = []
        self.protocols: dict[str, set[str]] = {}
        """Per setting, the HTTP versions of the GETs the registry answered with a body, over all runs."""
        self._n = 0

    def _fresh(self, prefix: str) -> Path:
        self._n += 1
        return self.work / f"{prefix}-{self._n}"

    def _record(self, section: str, setting: str, wall: float, rss_mb: float | None, extra: dict[str, float]) -> Row:
        """The row of a measurement, with what the registry served since its last ``clear_served()``."""
        gets = [r for r in self.registry.served() if r.method == "GET"]
        row = Row(setting, wall, sum(r.bytes_written for r in gets), rss_mb, extra)
        protocols = {r.protocol for r in gets if r.bytes_written}
        self.protocols.setdefault(setting, set()).update(protocols)
        self.raw.append({"section": section, **asdict(row), "protocols": sorted(protocols)})
        rss = f", mirror peak RSS {rss_mb:.0f} MB" if rss_mb is not None else ""
        log(f"{section} {setting}: {wall:.2f} s, upstream {row.upstream / MB:.1f} MB "
            f"({', '.join(sorted(protocols)) or '-'}){rss} {extra or ''}")
        return row

    @contextmanager
    def mirror(self, kind: str, store: Path) -> Iterator[Mirror]:
        if kind == "serve":
            with fastpull_serve(self.bed, store, self.registry.host, self.root) as m:
                yield m
        else:
            with distribution_proxy(self.bed, store, self.registry.url) as m:
                yield m

    def through_mirrors(self, section: str, digests: list[str], measure: Callable[[Mirror, str], tuple[str, float, dict]],
                        temperatures: tuple[str, ...] = ("cold",)) -> list[Row]:
        """Per mirror: a fresh store, and per temperature a fresh mirror process on it, in which
        ``measure(mirror, temperature)`` returns ``(setting, wall, extra)``; the row gets the upstream
        bytes and the mirror's peak RSS once it has stored ``digests``."""
        rows = []
        for kind in (m for m in ("serve", "proxy") if m in self.mirrors):
            store = self._fresh(kind) / "store"
            store.parent.mkdir()
            try:
                for temperature in temperatures:
                    self.registry.clear_served()
                    with self.mirror(kind, store) as mirror:
                        setting, wall, extra = measure(mirror, temperature)
                        _wait_stored(mirror, digests)
                        rss = mirror.peak_rss_mb()
                    rows.append(self._record(section, setting, wall, rss, extra))
            finally:
                shutil.rmtree(store.parent, ignore_errors=True)
        return rows

    # 1. containerd pulls (fetch + unpack), or fetches only ------------------------------------------

    def containerd(self, ref: str, unpack: bool, mirror: Mirror | None, label: str) -> float:
        """Wall seconds of ``ctr`` pulling ``ref`` (a fresh daemon) through ``mirror`` (None: directly from
        the registry), pointed there by a ``hosts.toml``."""
        hosts = clients.write_hosts_toml(self._fresh("hosts"), self.registry.host, mirror and mirror.host,
                                         self.registry.ca_file)
        try:
            return peers.measure_containerd(self.bed, ref, self.work, unpack=unpack, hosts_dir=hosts, label=label).wall
        finally:
            shutil.rmtree(hosts)

    def pull_run(self, ref: str, image: BuiltImage, unpack: bool) -> list[Row]:
        section = "pull" if unpack else "fetch"
        rows = []
        if "direct" in self.mirrors:
            self.registry.clear_served()
            wall = self.containerd(ref, unpack, None, "direct")
            rows.append(self._record(section, DIRECT, wall, None, {}))

        def pull(mirror: Mirror, temperature: str) -> tuple[str, float, dict]:
            wall = self.containerd(ref, unpack, mirror, f"{mirror.name} {temperature}")
            return f"containerd through {mirror.name}, {temperature}", wall, {}

        return rows + self.through_mirrors(section, [b.digest for b in image.blobs], pull, ("cold", "warm"))

    # 2. one cold layer streamed ------------------------------------------------------------------------

    def stream_run(self, ref: str, image: BuiltImage) -> list[Row]:
        (layer,) = image.layers

        def stream(mirror: Mirror, temperature: str) -> tuple[str, float, dict]:
            done = self.bed.run(
                ["curl", "-sfS", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total} %{size_download}",
                 _blob_url(mirror, ref, layer.digest)], capture_output=True, text=True, check=True)
            first, total, size = done.stdout.split()
            if int(size) != layer.size:
                raise RuntimeError(f"{mirror.name} sent {size} bytes of {layer.digest}, not {layer.size}")
            return f"curl through {mirror.name}, {temperature}", float(total), {"first_byte": float(first)}

        rows = self.through_mirrors("stream", [layer.digest], stream)
        self.registry.clear_served()
        s = peers.measure_fastpull(self.bed, ref, self.work, root=self.root)
        return rows + [self._record("stream", FASTPULL_PULL, s.wall, None, {})]

    # 3. many clients of one cold blob -------------------------------------------------------------------

    def fanout_run(self, ref: str, image: BuiltImage, n: int) -> list[Row]:
        (layer,) = image.layers

        def fanout(mirror: Mirror, temperature: str) -> tuple[str, float, dict]:
            command = f"curl -sfS '{_blob_url(mirror, ref, layer.digest)}' | sha256sum"
            started = time.perf_counter()
            procs = [self.bed.popen(["sh", "-c", command], stdout=subprocess.PIPE, text=True) for _ in range(n)]
            outs = [p.communicate()[0] for p in procs]
            wall = time.perf_counter() - started
            for p in procs:
                self.bed.forget(p)
            correct = sum(out.split()[:1] == [layer.digest.split(":")[1]] for out in outs)
            return f"{n} x curl through {mirror.name}, {temperature}", wall, {"correct": correct, "clients": n}

        return self.through_mirrors("fanout", [layer.digest], fanout)


def _blob_url(mirror: Mirror, ref: str, digest: str) -> str:
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    return f"http://{mirror.host}/v2/{repo}/blobs/{digest}"


def medians(runs: list[list[Row]]) -> list[Row]:
    """Per setting (rows in the order of the first run): median wall, upstream and extras; the largest RSS."""
    out = []
    for i, first in enumerate(runs[0]):
        rows = [run[i] for run in runs]
        rss = [r.rss_mb for r in rows if r.rss_mb is not None]
        out.append(Row(first.setting, statistics.median(r.wall for r in rows),
                       int(statistics.median(r.upstream for r in rows)), max(rss) if rss else None,
                       {k: statistics.median(r.extra[k] for r in rows) for k in first.extra}))
    return out


# ---- tables ----------------------------------------------------------------------------------------


def _rss(row: Row) -> str:
    return "-" if row.rss_mb is None else f"{row.rss_mb:.0f}"


def pull_table(rows: list[Row], nbytes: int) -> str:
    direct = next((r for r in rows if r.setting == DIRECT), None)
    lines = ["| setting | wall s | MB/s | vs direct | upstream MB | upstream / image | mirror peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = f"{direct.wall / r.wall:.2f}" if direct else "-"
        lines.append(f"| {r.setting} | {r.wall:.2f} | {nbytes / r.wall / MB:.0f} | {ratio} | {r.upstream / MB:.0f} "
                     f"| {r.upstream / nbytes:.2f} | {_rss(r)} |")
    return "\n".join(lines)


def stream_table(rows: list[Row], nbytes: int) -> str:
    pull = next((r for r in rows if r.setting == FASTPULL_PULL), None)
    lines = ["| setting | first byte s | whole layer s | MB/s | time / fastpull pull's | upstream / layer | "
             "mirror peak RSS MB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        first = f"{r.extra['first_byte']:.2f}" if "first_byte" in r.extra else "-"
        ratio = f"{r.wall / pull.wall:.2f}" if pull else "-"
        lines.append(f"| {r.setting} | {first} | {r.wall:.2f} | {nbytes / r.wall / MB:.0f} | {ratio} "
                     f"| {r.upstream / nbytes:.2f} | {_rss(r)} |")
    return "\n".join(lines)


def fanout_table(rows: list[Row], nbytes: int) -> str:
    lines = ["| setting | wall s | bodies correct | upstream / blob | mirror peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.setting} | {r.wall:.2f} | {r.extra['correct']:.0f} of {r.extra['clients']:.0f} "
                     f"| {r.upstream / nbytes:.2f} | {_rss(r)} |")
    return "\n".join(lines)


def targets(summary: dict[str, list[Row]], images: dict[str, BuiltImage]) -> list[str]:
    """The issue's targets that this run's rows can answer, each with its number and met or not."""
    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    checks = []
    pull = {r.setting: r for r in summary.get("pull", [])}
    size = images["multi"].total_size if "multi" in images else 0
    if (cold := pull.get(SERVE_COLD)) and (direct := pull.get(DIRECT)):
        speedup = direct.wall / cold.wall
        checks.append(f"containerd through cold `fastpull serve` at least 2x faster than directly: "
                      f"{speedup:.2f}x, {mark(speedup >= 2)}")
        checks.append(f"upstream bytes within 5% of the image: {cold.upstream / size:.3f}, "
                      f"{mark(abs(cold.upstream / size - 1) <= 0.05)}")
    if cold and (proxy := pull.get(PROXY_COLD)):
        checks.append(f"faster than through distribution's proxy: {cold.wall:.2f} s vs {proxy.wall:.2f} s, "
                      f"{mark(cold.wall < proxy.wall)}")
    if warm := pull.get(SERVE_WARM):
        checks.append(f"warm, nothing fetched upstream: {warm.upstream} bytes, {mark(warm.upstream == 0)}")
    stream = {r.setting: r for r in summary.get("stream", [])}
    if (through := stream.get("curl through fastpull serve, cold")) and (fetched := stream.get(FASTPULL_PULL)):
        checks.append(f"cold layer: first byte under 1.5 s: {through.extra['first_byte']:.2f} s, "
                      f"{mark(through.extra['first_byte'] < 1.5)}")
        checks.append(f"cold layer: whole layer within 1.3x of `fastpull pull`: {through.wall / fetched.wall:.2f}x, "
                      f"{mark(through.wall <= 1.3 * fetched.wall)}")
    for r in summary.get("fanout", []):
        if "fastpull serve" in r.setting:
            copies = r.upstream / images["fanout"].layers[0].size
            checks.append(f"{r.extra['clients']:.0f} clients of one cold blob: {copies:.2f} upstream copies, "
                          f"{r.extra['correct']:.0f} bodies correct, peak RSS {r.rss_mb:.0f} MB: "
                          f"{mark(copies <= 1.1 and r.extra['correct'] == r.extra['clients'] and (r.rss_mb or 0) < 100)}")
    return checks


# ---- main ------------------------------------------------------------------------------------------


def serve_available(root: Path) -> bool:
    """Whether the tree at ``root`` has ``fastpull serve``."""
    done = subprocess.run([sys.executable, "-m", "fastpull", "serve", "--help"], capture_output=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    return done.returncode == 0


def main() -> int:
    ap = bed_arguments(__doc__, "smoke run: images / 10, one run")
    ap.add_argument("--runs", type=int, help="runs per row, median (default 3; quick 1)")
    ap.add_argument("--mirrors", default=",".join(MIRRORS), help=f"any of {','.join(MIRRORS)}")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections: any of {','.join(SECTIONS)}")
    ap.add_argument("--multi-mb", default=",".join(map(str, MULTI_LAYERS_MB)),
                    help="layers of the image of the pull and fetch sections, MB (default %(default)s)")
    ap.add_argument("--tls", action="store_true", help="the registry speaks HTTPS (HTTP/2 by ALPN), not plain HTTP")
    ap.add_argument("--results", default="serve", help="results file name, without .md (default serve; "
                                                        "-tls, -quick, -rttN are appended)")
    ap.add_argument("--stream-mb", type=float, default=850, help="the streamed cold layer, MB (default 850)")
    ap.add_argument("--fanout-mb", type=float, default=200, help="the blob of the fanout section, MB (default 200)")
    ap.add_argument("--clients", type=int, default=20, help="clients of the fanout section (default 20)")
    ap.add_argument("--name", default="fpserve", help="network namespace name (must not exist)")
    ap.add_argument("--fastpull-root", type=Path, default=REPO)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastpull-bench-serve"))
    args = ap.parse_args()

    scale = 0.1 if args.quick else 1.0
    runs = args.runs or (1 if args.quick else 3)
    mirrors = [m for m in args.mirrors.split(",") if m]
    sections = [s for s in args.only.split(",") if s]
    if unknown := (set(mirrors) - set(MIRRORS)) | (set(sections) - set(SECTIONS)):
        ap.error(f"unknown mirrors or sections: {', '.join(sorted(unknown))}")
    if "serve" in mirrors and not serve_available(args.fastpull_root):
        log(f"{args.fastpull_root} has no `fastpull serve`: leaving its rows out")
        mirrors.remove("serve")
    compile_package(args.fastpull_root)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    specs = {
        "multi": [LayerSpec(int(float(mb) * scale * MB)) for mb in args.multi_mb.split(",")],
        "stream": [LayerSpec(int(args.stream_mb * scale * MB))],
        "fanout": [LayerSpec(int(args.fanout_mb * scale * MB))],
    }
    images = {key: build_image(layers, work / "images" / key, seed=i) for i, (key, layers) in enumerate(specs.items())
              if key in {IMAGE_OF[s] for s in sections}}

    data: dict[str, Any] = {"per_flow_mbit": args.per_flow, "link_mbit": args.link, "rtt_ms": args.rtt,
                            "tls": args.tls, "runs": runs, "mirrors": mirrors,
                            "fastpull": git_state(args.fastpull_root),
                            "versions": peers.versions()}
    results: dict[str, list[list[Row]]] = {key: [] for key in SECTIONS if key in sections}
    started = time.monotonic()
    with ThrottledBed(args.per_flow, args.link, rtt_ms=args.rtt, name=args.name) as bed, \
            bed.registry(work / "registry", tls=args.tls) as registry:
        trust(registry.ca_file)  # the pusher, fastpull (serve and pull) and distribution's proxy
        refs = {}
        for key, image in images.items():
            bed.call(push_image, registry.url, f"bench/{key}", "latest", image)
            refs[key] = f"{registry.host}/bench/{key}:latest"
        bench = ServeBench(bed, registry, work / "runs", args.fastpull_root, mirrors)
        for run in range(runs):
            log(f"run {run + 1} of {runs}")
            for key in results:
                ref, image = refs[IMAGE_OF[key]], images[IMAGE_OF[key]]
                if key in ("pull", "fetch"):
                    results[key].append(bench.pull_run(ref, image, unpack=key == "pull"))
                elif key == "stream":
                    results[key].append(bench.stream_run(ref, image))
                else:
                    results[key].append(bench.fanout_run(ref, image, args.clients))

    upstream = "HTTPS, HTTP/2 by ALPN (verified with the bed's CA)" if args.tls else "plain HTTP"
    md = [f"# containerd through a node-local mirror: per flow {args.per_flow:g} / link {args.link:g} Mbit/s, "
          f"RTT +{args.rtt:g} ms, registry {upstream}\n\nMedians of {runs} run(s) (the largest peak RSS). "
          "Upstream: body bytes the shaped registry sent. Mirror peak RSS: VmHWM of its process tree (a fresh "
          "process per measurement; warm = restarted on the store the cold pull filled). The mirrors listen on "
          "the bed's loopback, unshaped, over plain HTTP; only the registry is far."]
    tables = {"pull": (pull_table, "containerd `ctr image pull` (fetch + unpack, a fresh containerd each)"),
              "fetch": (pull_table, "containerd `ctr content fetch` (fetch only, a fresh containerd each)"),
              "stream": (stream_table, "one cold layer streamed through the mirror (curl), against "
                                       "`fastpull pull` of the same one-layer image"),
              "fanout": (fanout_table, f"{args.clients} clients of one cold blob at once (curl | sha256sum)")}
    summary = {}
    for key, runs_rows in results.items():
        table, title = tables[key]
        image = images[IMAGE_OF[key]]
        summary[key] = rows = medians(runs_rows)
        layers = ", ".join(f"{layer.size / MB:.0f}" for layer in image.layers)
        md.append(f"## {key}: {title}; {image.total_size / MB:.0f} MB in {len(image.layers)} layer(s) ({layers} MB)\n\n"
                  + table(rows, image.total_size if key in ("pull", "fetch") else image.layers[0].size))
        data[key] = [asdict(r) for r in rows]
    if used := {setting: versions for setting, versions in bench.protocols.items() if versions}:
        md.append("## HTTP versions the registry answered (its GETs with a body, all runs)\n\n"
                  + "\n".join(f"- {setting}: {', '.join(sorted(versions))}" for setting, versions in used.items()))
    if checks := targets(summary, images):
        md.append("## The issue's targets (issue 12, *Done when*)\n\n" + "\n".join(f"- {c}" for c in checks))
    md.append(f"Bench took {(time.monotonic() - started) / 60:.1f} min; fastpull {data['fastpull']}; "
              + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".")
    RESULTS.mkdir(exist_ok=True)
    name = (args.results + ("-tls" if args.tls else "") + ("-quick" if args.quick else "")
            + (f"-rtt{args.rtt:g}" if args.rtt else ""))
    (RESULTS / f"{name}.md").write_text("\n\n".join(md) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({**data, "raw": bench.raw}, indent=1))
    log(f"wrote {RESULTS / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
