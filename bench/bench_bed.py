"""Far-registry benchmark: fastpull against skopeo and containerd on a throttled bed (bench/bed.py).

    python bench/bench_bed.py                  # the full bench (~15-20 min on 2 cores)
    python bench/bench_bed.py --quick          # a smoke run: everything scaled down (~2 min)
    python bench/bench_bed.py --per-flow 400 --link 1600 --rtt 20 --runs 5

The registry serves from inside a network namespace whose loopback caps each TCP connection at
``--per-flow`` Mbit/s and all of them at ``--link`` Mbit/s; every tool runs in the same namespace.
Sections, each written as markdown to ``bench/results/bed.md`` (raw samples in ``bed.json``) and
plotted to ``bench/results/bed-*.png``:

1. bed check: 1..32 curl streams of one blob against the caps;
2. image shapes (one big layer, a typical multi-layer image, many small layers): fastpull (defaults)
   vs ``skopeo copy`` vs ``ctr content fetch`` -- all fetch-only, cold, median of ``--runs``;
3. sweeps: chunk size x chunks per blob x blobs in flight on the typical image (and chunk size x
   chunks per blob on the big layer), median of ``--sweep-runs``;
4. concurrency: 1/5/20 simultaneous ``fastpull pull`` of one image into one layout vs as many
   ``ctr image pull`` (fetch + unpack) and ``ctr content fetch`` against one containerd;
5. ceiling: fastpull on an unshaped bed, to show where the CPU saturates.

Ratios are ``best peer wall / wall`` against the best peer measured in the same run for the same image
(and, for concurrency, the same N): above 1 is faster than the best peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from bed import REPO, ThrottledBed, compile_package, trust
from peers import Sample

from fastpull.testbed.images import BuiltImage, LayerSpec, build_image, push_image

MB = 1_000_000
MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"
PEERS = ("skopeo", "containerd fetch", "containerd pull")


@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    layers_mb: tuple[float, ...]


def shapes(scale: float) -> list[Shape]:
    typical = (150, 120, 100, 80, 60, 40, 30, 20)  # 600 MB in 8 layers
    small = tuple(1 + (i * 7) % 20 for i in range(24))  # 24 layers of 1-20 MB, 236 MB
    return [
        Shape("big", "one big layer", (1000 * scale,)),
        Shape("typical", "typical multi-layer image", tuple(x * scale for x in typical)),
        Shape("small", "many small layers", tuple(x * scale for x in small)),
    ]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- measuring ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, bed: ThrottledBed, work: Path, fastpull_root: Path):
        self.bed = bed
        self.work = work
        self.fastpull_root = fastpull_root
        self.raw: list[dict[str, Any]] = []

    def measure(self, section: str, image: str, setting: str, runs: int, fn: Any, *args: Any, **kw: Any) -> Sample:
        samples = []
        for _ in range(runs):
            samples.append(fn(self.bed, *args, **kw))
            self.raw.append({"section": section, "image": image, "setting": setting, **asdict(samples[-1])})
        m = peers.median(samples)
        log(f"{section} {image} {setting}: {m.wall:.2f} s (runs {[round(s.wall, 2) for s in samples]})")
        return m

    def fastpull(self, section: str, image: str, setting: str, ref: str, runs: int,
                 options: dict[str, int] | None = None, concurrent: int = 1, unpack: bool = False) -> Sample:
        return self.measure(section, image, setting, runs, peers.measure_fastpull, ref, self.work, options,
                            concurrent=concurrent, root=self.fastpull_root, unpack=unpack,
                            label="fastpull pull+unpack" if unpack else "fastpull")


def bed_check(bed: ThrottledBed, url: str, size: int, streams: list[int]) -> list[dict[str, Any]]:
    """``n`` curl downloads of one blob at once: aggregate and per-stream Mbit/s against the caps."""
    rows = []
    for n in streams:
        run = bed.curl_streams(url, n)
        rows.append({
            "streams": n,
            "expected": min(n * bed.per_flow_mbit, bed.link_mbit),
            "aggregate": n * size * 8 / run.wall / 1e6,
            "per_stream_median": statistics.median(run.mbit),
            "per_stream_max": max(run.mbit),
            "collisions": bed.collisions(run.ports),
        })
        log(f"bed check {n} streams: {rows[-1]['aggregate']:.0f} Mbit/s (expected {rows[-1]['expected']:.0f})")
    return rows


# ---- tables ---------------------------------------------------------------------------------------


def sample_table(rows: list[tuple[str, Sample]], nbytes: int, best_peer: Sample | None, note_col: str = "") -> str:
    lines = ["| setting | wall s | MB/s | vs best peer | CPU s | peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in rows:
        ratio = f"{best_peer.wall / s.wall:.2f}" if best_peer else "-"
        lines.append(f"| {name} | {s.wall:.2f} | {nbytes / s.wall / MB:.0f} | {ratio} | {s.cpu:.2f} | {s.rss_mb:.0f} |")
    return "\n".join(lines)


def best(rows: list[tuple[str, Sample]], tools: tuple[str, ...]) -> tuple[str, Sample] | None:
    candidates = [(n, s) for n, s in rows if s.tool in tools]
    return min(candidates, key=lambda r: r[1].wall) if candidates else None


def git_state(root: Path) -> str:
    if root.resolve() != REPO:
        return f"from {root}"
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "fastpull", "csrc"],
                           capture_output=True, text=True, check=False)
    return rev.stdout.strip() + (" + uncommitted changes in fastpull/ or csrc/" if dirty.stdout.strip() else "")


# ---- plots ----------------------------------------------------------------------------------------


def plot_all(data: dict[str, Any], out: Path, prefix: str = "bed") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"fastpull": "#1f77b4", "fastpull, no join": "#17becf", "fastpull, one process": "#8c564b",
              "fastpull pull+unpack": "#9467bd", "skopeo": "#ff7f0e", "containerd fetch": "#2ca02c",
              "containerd pull": "#d62728"}
    caps = f"per flow {data['per_flow_mbit']:g} Mbit/s, link {data['link_mbit']:g} Mbit/s, RTT {data['rtt_ms']:g} ms"

    # 1. bed check
    rows = data["bed_check"]
    if rows:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        n = [r["streams"] for r in rows]
        ax.plot(n, [r["expected"] for r in rows], "k--", label="cap: min(n x per flow, link)")
        ax.plot(n, [r["aggregate"] for r in rows], "o-", label="measured, all streams")
        ax.plot(n, [r["per_stream_median"] * r["streams"] for r in rows], "x:", label="n x median stream")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_xlabel("concurrent curl streams")
        ax.set_ylabel("Mbit/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Bed check ({caps})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / f"{prefix}-check.png"))

    # 2. shapes: throughput per tool
    shape_rows = data["shapes"]
    if shape_rows:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        keys = list(dict.fromkeys(r["image"] for r in shape_rows))
        tools = list(dict.fromkeys(r["tool"] for r in shape_rows))
        width = 0.8 / len(tools)
        for i, tool in enumerate(tools):
            xs, ys = [], []
            for j, key in enumerate(keys):
                for r in shape_rows:
                    if r["image"] == key and r["tool"] == tool:
                        xs.append(j + (i - (len(tools) - 1) / 2) * width)
                        ys.append(r["mb_s"])
            bars = ax.bar(xs, ys, width, label=tool, color=colors.get(tool))
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.axhline(data["link_mbit"] / 8, color="k", ls="--", lw=1, label="link cap")
        labels = [f"{k}\n{data['images'][k]['layers']} layers, {data['images'][k]['mb']:.0f} MB" for k in keys]
        ax.set_xticks(range(len(keys)), labels, fontsize=8)
        ax.set_ylabel("MB/s (image bytes / wall)")
        ax.set_title(f"Cold pull, fetch only, median of {data['runs']} ({caps})", fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
        fig.tight_layout()
        written.append(_save(fig, out / f"{prefix}-shapes.png"))

    # 3. sweeps: heatmaps of MB/s
    sweep = data["sweep"]
    panels = sorted({(r["image"], r["blobs_in_flight"]) for r in sweep}, key=lambda p: (p[0] != "big", p[1]))
    if panels:
        vmax = max(r["mb_s"] for r in sweep)
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.2, 3.8), squeeze=False,
                                 layout="constrained")
        im = None
        for ax, (image, blobs) in zip(axes[0], panels):
            cells = [r for r in sweep if r["image"] == image and r["blobs_in_flight"] == blobs]
            chunks = sorted({r["chunk_mib"] for r in cells})
            per_blob = sorted({r["chunks_per_blob"] for r in cells})
            grid = [[float("nan")] * len(per_blob) for _ in chunks]
            for r in cells:
                grid[chunks.index(r["chunk_mib"])][per_blob.index(r["chunks_per_blob"])] = r["mb_s"]
            im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", origin="lower")
            for y, row in enumerate(grid):
                for x, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=8,
                                color="white" if v < 0.6 * vmax else "black")
            ax.set_xticks(range(len(per_blob)), [str(p) for p in per_blob])
            ax.set_yticks(range(len(chunks)), [f"{c:g}" for c in chunks])
            ax.set_xlabel("chunks per blob")
            if ax is axes[0][0]:
                ax.set_ylabel("chunk MiB")
            ax.set_title(f"{image}, {blobs} blob(s) in flight", fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), label="MB/s")
        fig.suptitle(f"fastpull sweep, median of {data['sweep_runs']} ({caps})", fontsize=9)
        written.append(_save(fig, out / f"{prefix}-sweep.png"))

    # 4. concurrency
    conc = data["concurrency"]
    if conc:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for tool in dict.fromkeys(r["tool"] for r in conc):
            pts = sorted((r["concurrent"], r["wall"]) for r in conc if r["tool"] == tool)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=tool, color=colors.get(tool))
        ns = sorted({r["concurrent"] for r in conc})
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(x) for x in ns])
        ax.set_yscale("log")
        ax.set_xlabel("simultaneous pulls of one image")
        ax.set_ylabel("wall of the slowest, s (log)")
        ax.set_title(f"Concurrent pulls of '{data['concurrency_image']}' ({caps})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / f"{prefix}-concurrency.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---- main -----------------------------------------------------------------------------------------


def results_name(args: Any) -> str:
    """``bed``, then ``-tls``, ``-rttN`` and ``-quick`` as the run's options say."""
    return ("bed" + ("-tls" if args.tls else "") + (f"-rtt{args.rtt:g}" if args.rtt else "")
            + ("-quick" if args.quick else ""))


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def bed_arguments(description: str | None, quick_help: str) -> argparse.ArgumentParser:
    """A parser with the options every bed bench shares: --quick, the caps and the RTT."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--per-flow", type=float, default=200, help="Mbit/s per TCP connection (default 200)")
    ap.add_argument("--link", type=float, default=1000, help="Mbit/s for all connections (default 1000)")
    ap.add_argument("--rtt", type=float, default=0, help="added round-trip ms (userspace delay proxy)")
    return ap


def main() -> int:
    ap = bed_arguments(__doc__, "smoke run: images / 10, small grid, 1 run")
    ap.add_argument("--runs", type=int, help="runs per comparison cell, median (default 3; quick 1)")
    ap.add_argument("--tls", action="store_true",
                    help="the registry serves HTTPS with HTTP/2 (fastpull verifies it; peers skip verification)")
    ap.add_argument("--sweep-runs", type=int, help="runs per sweep cell, median (default 1)")
    ap.add_argument("--chunk-mib", help="sweep chunk sizes, MiB (default 4,16,64)")
    ap.add_argument("--per-blob", help="sweep chunks per blob (default 1,4,16,64 typical; 4,16,128 big)")
    ap.add_argument("--blobs", help="sweep blobs in flight (default 1,8)")
    ap.add_argument("--concurrency", default="1,5,20", help="simultaneous pulls (default 1,5,20)")
    ap.add_argument("--concurrency-runs", type=int, help="runs per concurrency cell, median (default 1)")
    ap.add_argument("--concurrency-image", default="typical", help="shape pulled concurrently (default typical)")
    ap.add_argument("--only", default="check,shapes,sweep,concurrency,ceiling", help="sections to run")
    ap.add_argument("--name", default="fpbench", help="network namespace name (must not exist)")
    ap.add_argument("--fastpull-root", type=Path, default=REPO,
                    help="directory holding the fastpull package to run (default: this tree)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastpull-bench-bed"))
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the PNGs from bench/results/bed.json (bed-quick.json with --quick)")
    args = ap.parse_args()

    RESULTS.mkdir(exist_ok=True)
    if args.replot:
        name = results_name(args)
        data = json.loads((RESULTS / f"{name}.json").read_text())
        for p in plot_all(data, RESULTS, name):
            print(p)
        return 0

    quick = args.quick
    scale = 0.1 if quick else 1.0
    runs = args.runs or (1 if quick else 3)
    sweep_runs = args.sweep_runs or 1
    chunk_mib = parse_ints(args.chunk_mib or ("4,16" if quick else "4,16,64"))
    per_blob_typical = parse_ints(args.per_blob or ("1,8" if quick else "1,4,16,64"))
    per_blob_big = parse_ints(args.per_blob or ("4,16" if quick else "4,16,128"))
    per_blob_small = parse_ints(args.per_blob or ("1,4" if quick else "1,4,16"))
    blobs = parse_ints(args.blobs or "1,8")
    concurrency = parse_ints(args.concurrency)
    concurrency_runs = args.concurrency_runs or 1
    sections = set(args.only.split(","))
    compile_package(args.fastpull_root)
    flags = peers.fastpull_flags(args.fastpull_root)
    fixed = "--fixed" in flags  # a self-tuning engine: the sweep pins each setting
    unpack = "--snapshots" in flags
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = work / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir()
    storage = work / "registry"
    shutil.rmtree(storage, ignore_errors=True)
    shutil.rmtree(work / "registry-logs", ignore_errors=True)
    for stale in work.glob("registry-logs-*"):
        shutil.rmtree(stale, ignore_errors=True)

    started = time.monotonic()
    images: dict[str, BuiltImage] = {}
    for shape in shapes(scale):
        specs = [LayerSpec(int(mb * MB)) for mb in shape.layers_mb]
        images[shape.key] = build_image(specs, work / "images" / f"{shape.key}-{scale:g}")
        log(f"image {shape.key}: {len(specs)} layers, {images[shape.key].total_size / MB:.0f} MB")
    titles = {s.key: s.title for s in shapes(scale)}

    data: dict[str, Any] = {
        "per_flow_mbit": args.per_flow, "link_mbit": args.link, "rtt_ms": args.rtt, "runs": runs,
        "sweep_runs": sweep_runs, "concurrency_runs": concurrency_runs, "quick": quick, "fastpull": git_state(args.fastpull_root), "versions": peers.versions(),
        "images": {k: {"layers": len(v.layers), "mb": v.total_size / MB, "title": titles[k]} for k, v in images.items()},
        "bed_check": [], "shapes": [], "sweep": [], "concurrency": [], "ceiling": [],
        "concurrency_image": args.concurrency_image,
    }
    md: list[str] = []

    with ThrottledBed(args.per_flow, args.link, rtt_ms=args.rtt, name=args.name) as bed:
        with bed.registry(storage, tls=args.tls) as registry:
            trust(registry.ca_file)
            for key, image in images.items():
                bed.call(push_image, registry.url, f"bench/{key}", "latest", image)
            refs = {key: f"{registry.host}/bench/{key}:latest" for key in images}
            bench = Bench(bed, runs_dir, args.fastpull_root)

            if "check" in sections:
                typical = images["typical"]
                layer = max(typical.layers, key=lambda d: d.size) if quick else min(typical.layers, key=lambda d: d.size)
                url = f"{registry.url}/v2/bench/typical/blobs/{layer.digest}"
                data["bed_check"] = bed_check(bed, url, layer.size, [1, 2, 4, 8, 16, 32])
                lines = ["| curl streams | cap Mbit/s | measured, all streams | vs cap | median stream | max stream | port collisions |",
                         "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
                for r in data["bed_check"]:
                    lines.append(f"| {r['streams']} | {r['expected']:.0f} | {r['aggregate']:.0f} | "
                                 f"{r['aggregate'] / r['expected']:.2f} | {r['per_stream_median']:.0f} | "
                                 f"{r['per_stream_max']:.0f} | {r['collisions']} |")
                md.append(f"## Bed check: one blob of {layer.size / MB:.1f} MB, n curl streams at once\n\n"
                          "Measured = n x blob / wall of the slowest (start-up skew included, so a little low).\n\n"
                          + "\n".join(lines))

            if "shapes" in sections:
                md.append(f"## Image shapes: cold pull, fetch only, median of {runs} runs\n\n"
                          "fastpull with its defaults (`FetchOptions()`); skopeo copy to an OCI layout (6 blobs "
                          "at once, one stream each); `ctr content fetch` (containerd 1.6: 3 downloads at once, "
                          "one stream each). Runs of the tools interleave.")
                for key, image in images.items():
                    rows: dict[str, list[Sample]] = {"fastpull": [], "skopeo": [], "containerd fetch": []}
                    for _ in range(runs):
                        rows["fastpull"].append(bench.fastpull("shapes", key, "fastpull", refs[key], 1))
                        rows["skopeo"].append(bench.measure("shapes", key, "skopeo", 1, peers.measure_skopeo,
                                                            refs[key], runs_dir))
                        rows["containerd fetch"].append(bench.measure(
                            "shapes", key, "containerd fetch", 1, peers.measure_containerd, refs[key], runs_dir,
                            unpack=False, tls=args.tls))
                    table_rows = [(name, peers.median(samples)) for name, samples in rows.items()]
                    top = best(table_rows, PEERS)
                    for name, s in table_rows:
                        data["shapes"].append({"image": key, "tool": name, **asdict(s),
                                               "mb_s": image.total_size / s.wall / MB})
                    md.append(f"### {key}: {titles[key]}, {len(image.layers)} layers, {image.total_size / MB:.0f} MB\n\n"
                              + sample_table(table_rows, image.total_size, top[1] if top else None))

            if "sweep" in sections:
                md.append(f"## fastpull sweep: median of {sweep_runs} run(s) per cell\n\n"
                          "vs best peer: the best peer of the shapes table for the same image (if measured). "
                          "Connections are capped at 64 (`max_host_connections`), whatever the product."
                          + (" Every cell runs `--fixed` (no self-tuning: the setting as given)." if fixed else ""))
                best_peer = {r["image"]: r for r in data["shapes"] if r["tool"] in PEERS}
                grids = (("typical", per_blob_typical, blobs), ("big", per_blob_big, [1]),
                         ("small", per_blob_small, [8, 24]))
                for key, per_blob_list, blob_list in grids:
                    image = images[key]
                    peer_rows = [r for r in data["shapes"] if r["image"] == key and r["tool"] in PEERS]
                    peer = min(peer_rows, key=lambda r: r["wall"]) if peer_rows else None
                    table_rows = []
                    for b in blob_list:
                        for chunk in chunk_mib:
                            for per_blob in per_blob_list:
                                opts = {"chunk_size": chunk * MiB, "chunks_per_blob": per_blob,
                                        "blobs_in_flight": b, "max_transfers": max(64, per_blob * b)}
                                if fixed:
                                    opts["adaptive"] = False
                                name = f"{chunk} MiB x {per_blob}/blob x {b} blobs"
                                s = bench.fastpull("sweep", key, name, refs[key], sweep_runs, opts)
                                table_rows.append((name, s))
                                data["sweep"].append({"image": key, "chunk_mib": chunk, "chunks_per_blob": per_blob,
                                                      "blobs_in_flight": b, **asdict(s),
                                                      "mb_s": image.total_size / s.wall / MB})
                    ref_sample = Sample(peer["tool"], peer["wall"], peer["cpu"], peer["rss_mb"]) if peer else None
                    head = f"### sweep on {key} ({len(image.layers)} layers, {image.total_size / MB:.0f} MB)"
                    if peer:
                        head += f"; best peer: {peer['tool']} {peer['wall']:.2f} s"
                    md.append(head + "\n\n" + sample_table(table_rows, image.total_size, ref_sample))
                    defaults = [r for r in data["shapes"] if r["image"] == key and r["tool"] == "fastpull"]
                    if defaults and table_rows:
                        top_name, top = min(table_rows, key=lambda row: row[1].wall)
                        md.append(f"fastpull's defaults (shapes table, {defaults[0]['wall']:.2f} s) reach "
                                  f"{top.wall / defaults[0]['wall']:.0%} of the best sweep point ({top_name}, "
                                  f"{top.wall:.2f} s).")
                del best_peer

            if "concurrency" in sections:
                key = args.concurrency_image
                image = images[key]
                md.append(f"## Concurrent pulls of {key} ({image.total_size / MB:.0f} MB): wall of the slowest, "
                          f"median of {concurrency_runs} run(s)\n\n"
                          "fastpull: N identical `python -m fastpull pull` processes into one layout: the "
                          "first leads, the others wait for it and print its result (`fastpull.cli.singleflight`). "
                          "fastpull, no join: the same with `--no-join`: each process resolves and pulls, "
                          "sharing only each blob's download through the store's per-digest lock. containerd: N `ctr` clients against "
                          "one fresh daemon: `ctr image pull` (fetch + unpack to overlayfs) and `ctr content "
                          "fetch` (fetch only). CPU and RSS are summed over all processes (and the daemon). "
                          "fastpull, one process: the N pulls as threads of one process sharing one `Puller` "
                          "(the Python API, as a node prefetcher would use it): no interpreter start-up per pull."
                          + (" fastpull pull+unpack: the same with `--snapshots DIR` (one directory for all N: "
                             "overlayfs lower dirs by ChainID); compare it with `ctr image pull`." if unpack else ""))
                lines = ["| N | setting | wall s | vs best peer | CPU s | peak RSS MB (sum) |",
                         "| ---: | --- | ---: | ---: | ---: | ---: |"]
                for n in concurrency:
                    rows: dict[str, list[Sample]] = {"fastpull": []}
                    if "--no-join" in flags:
                        rows["fastpull, no join"] = []
                    rows |= {"fastpull, one process": [], "containerd fetch": [], "containerd pull": []}
                    if unpack:
                        rows["fastpull pull+unpack"] = []
                    for _ in range(concurrency_runs):
                        rows["fastpull"].append(bench.fastpull("concurrency", key, f"fastpull x{n}", refs[key], 1,
                                                               concurrent=n))
                        if "--no-join" in flags:
                            rows["fastpull, no join"].append(bench.measure(
                                "concurrency", key, f"fastpull no join x{n}", 1, peers.measure_fastpull, refs[key],
                                runs_dir, {"join": False}, concurrent=n, label="fastpull, no join",
                                root=args.fastpull_root))
                        rows["fastpull, one process"].append(bench.measure(
                            "concurrency", key, f"fastpull one process x{n}", 1, peers.measure_fastpull, refs[key],
                            runs_dir, concurrent=n, label="fastpull, one process", root=args.fastpull_root,
                            one_process=True))
                        if unpack:
                            rows["fastpull pull+unpack"].append(bench.fastpull(
                                "concurrency", key, f"fastpull pull+unpack x{n}", refs[key], 1, concurrent=n,
                                unpack=True))
                        rows["containerd fetch"].append(bench.measure(
                            "concurrency", key, f"containerd fetch x{n}", 1, peers.measure_containerd, refs[key],
                            runs_dir, concurrent=n, unpack=False, tls=args.tls))
                        rows["containerd pull"].append(bench.measure(
                            "concurrency", key, f"containerd pull x{n}", 1, peers.measure_containerd, refs[key],
                            runs_dir, concurrent=n, tls=args.tls))
                    table_rows = [(name, peers.median(samples)) for name, samples in rows.items()]
                    top = best(table_rows, PEERS)
                    for name, s in table_rows:
                        ratio = f"{top[1].wall / s.wall:.2f}" if top else "-"
                        lines.append(f"| {n} | {name} | {s.wall:.2f} | {ratio} | {s.cpu:.2f} | {s.rss_mb:.0f} |")
                        data["concurrency"].append({"image": key, "tool": name, "concurrent": n, **asdict(s)})
                md.append("\n".join(lines))
            data["raw"] = bench.raw

    if "ceiling" in sections:
        # Where the 2-core machine saturates: the same fastpull with caps far above what it can reach.
        with ThrottledBed(100_000, 100_000, name=args.name) as bed:
            with bed.registry(storage, tls=args.tls) as registry:
                trust(registry.ca_file)
                bench = Bench(bed, runs_dir, args.fastpull_root)
                lines = ["| image | setting | wall s | MB/s | CPU s | CPU s / wall s |",
                         "| --- | --- | ---: | ---: | ---: | ---: |"]
                for key in ("big", "typical"):
                    s = bench.fastpull("ceiling", key, "fastpull", f"{registry.host}/bench/{key}:latest", runs)
                    mbs = images[key].total_size / s.wall / MB
                    data["ceiling"].append({"image": key, **asdict(s), "mb_s": mbs})
                    lines.append(f"| {key} | fastpull defaults | {s.wall:.2f} | {mbs:.0f} | {s.cpu:.2f} | "
                                 f"{s.cpu / s.wall:.2f} |")
                md.append("## Ceiling: unshaped bed (100 Gbit/s caps), fastpull defaults\n\n"
                          "What this machine reaches without a cap; the shaped link above should stay well below "
                          "it, or the bench measures the CPU, not the network.\n\n" + "\n".join(lines))

    elapsed = time.monotonic() - started
    header = (f"# Far-registry bench: per flow {args.per_flow:g} Mbit/s, link {args.link:g} Mbit/s, "
              f"RTT {args.rtt:g} ms, {'TLS with HTTP/2' if args.tls else 'plain HTTP'}{' (quick)' if quick else ''}\n\n"
              f"fastpull {data['fastpull']}; " + "; ".join(f"{k} {v}" for k, v in data["versions"].items()
                                                            if k not in ("pycurl",))
              + f"; {os.cpu_count()} CPUs; bench took {elapsed / 60:.1f} min.")
    text = header + "\n\n" + "\n\n".join(md) + "\n"
    name = results_name(args)
    (RESULTS / f"{name}.md").write_text(text)
    data["elapsed_s"] = elapsed
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    plot_all(data, RESULTS, name)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
