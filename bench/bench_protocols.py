"""Registries as they really are: plain HTTP, TLS with HTTP/2, and a registry that redirects blobs to
another host, on the far-registry bed (bench/bed.py), with or without added round trips.

    python bench/bench_protocols.py                    # plain, TLS + HTTP/2, redirecting; ~10 min
    python bench/bench_protocols.py --rtt 20 --registries http,https
    python bench/bench_protocols.py --quick            # images / 10, one run each

For each registry kind and image shape, cold fetch-only pulls: fastpull with its defaults (the tuner
chooses transfers, request size and, over HTTP/2, streams per connection), fastpull with every
transfer of a host as a stream of one HTTP/2 connection (``--streams-per-connection 100``: libcurl's
default, and fastpull's before it spread ranges over connections), skopeo and ``ctr content fetch``.
Each connection is capped at ``--per-flow``, all at ``--link``. fastpull verifies the registry's
certificate (``SSL_CERT_FILE``); skopeo and ctr skip verification. The tables go to
``bench/results/protocols[-rttN].md`` (raw samples in ``.json``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from bed import REPO, ThrottledBed, compile_package, trust
from bench_bed import MB, PEERS, RESULTS, Bench, bed_arguments, best, git_state, log, sample_table, shapes
from peers import Sample

from fastpull.testbed.images import LayerSpec, build_image, push_image

KINDS = {
    "http": "plain HTTP/1.1",
    "https": "TLS, HTTP/2 (ALPN)",
    "redirect": "TLS, HTTP/2; blobs redirected (307) to another host with a signed URL",
}
ONE_CONNECTION = {"streams_per_connection": 100}


def main() -> int:
    ap = bed_arguments(__doc__, "smoke run: images / 10, one run each")
    ap.add_argument("--runs", type=int, help="fastpull runs per cell, median (default 3; quick 1)")
    ap.add_argument("--peer-runs", type=int, default=1, help="runs of skopeo and ctr per cell (default 1)")
    ap.add_argument("--registries", default=",".join(KINDS), help=f"any of {','.join(KINDS)}")
    ap.add_argument("--images", default="big,typical,small", help="shapes (bench_bed's): big,typical,small")
    ap.add_argument("--name", default="fpproto", help="network namespace name (must not exist)")
    ap.add_argument("--fastpull-root", type=Path, default=REPO)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastpull-bench-protocols"))
    args = ap.parse_args()

    scale = 0.1 if args.quick else 1.0
    runs = args.runs or (1 if args.quick else 3)
    kinds = [k for k in args.registries.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"unknown registry kinds: {', '.join(sorted(unknown))}")
    wanted = set(args.images.split(","))
    compile_package(args.fastpull_root)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    images = {s.key: build_image([LayerSpec(int(mb * MB)) for mb in s.layers_mb], work / "images" / s.key)
              for s in shapes(scale) if s.key in wanted}
    titles = {s.key: s.title for s in shapes(scale)}
    link_mb_s = args.link * 1e6 / 8 / MB

    data: dict[str, Any] = {"per_flow_mbit": args.per_flow, "link_mbit": args.link, "rtt_ms": args.rtt,
                            "runs": runs, "peer_runs": args.peer_runs, "fastpull": git_state(args.fastpull_root),
                            "versions": peers.versions(), "rows": []}
    md = [f"# Registries as they are: per flow {args.per_flow:g} / link {args.link:g} Mbit/s, "
          f"RTT +{args.rtt:g} ms\n\nCold, fetch only. fastpull: median of {runs} run(s); skopeo and "
          f"`ctr content fetch`: median of {args.peer_runs}. '% of link' = image bytes / wall / link. "
          "fastpull, one connection: `--streams-per-connection 100` (every transfer to a host a stream "
          "of one HTTP/2 connection). vs best peer = best peer's wall / this wall."]
    started = time.monotonic()
    with ThrottledBed(args.per_flow, args.link, rtt_ms=args.rtt, name=args.name) as bed:
        bench = Bench(bed, work / "runs", args.fastpull_root)
        for kind in kinds:
            tls = kind != "http"
            with ExitStack() as stack:
                registry = stack.enter_context(bed.registry(work / f"registry-{kind}", tls=tls))
                host, ca_file = registry.host, registry.ca_file
                if kind == "redirect":
                    front = stack.enter_context(bed.redirector(registry))
                    host, ca_file = front.host, front.ca_file
                trust(ca_file)
                md.append(f"## {kind}: {KINDS[kind]}")
                for key, image in images.items():
                    bed.call(push_image, registry.url, f"bench/{key}", "latest", image)
                    ref = f"{host}/bench/{key}:latest"
                    rows = [("fastpull", bench.fastpull("protocols", key, f"{kind} fastpull", ref, runs))]
                    if tls:
                        rows.append(("fastpull, one connection", bench.fastpull(
                            "protocols", key, f"{kind} fastpull one connection", ref, 1, ONE_CONNECTION)))
                    rows.append(("skopeo", bench.measure("protocols", key, f"{kind} skopeo", args.peer_runs,
                                                         peers.measure_skopeo, ref, work / "runs")))
                    rows.append(("containerd fetch", bench.measure(
                        "protocols", key, f"{kind} containerd fetch", args.peer_runs, peers.measure_containerd,
                        ref, work / "runs", unpack=False, tls=tls)))
                    top = best(rows, PEERS)
                    for name, s in rows:
                        data["rows"].append({"registry": kind, "image": key, "tool": name, **asdict(s),
                                             "link_share": image.total_size / s.wall / MB / link_mb_s})
                    md.append(f"### {kind}, {key}: {titles[key]}, {len(image.layers)} layers, "
                              f"{image.total_size / MB:.0f} MB\n\n"
                              + _with_link_share(sample_table(rows, image.total_size, top[1] if top else None),
                                                 rows, image.total_size, link_mb_s))
    md.append(f"Bench took {(time.monotonic() - started) / 60:.1f} min; fastpull {data['fastpull']}; "
              + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".")
    RESULTS.mkdir(exist_ok=True)
    suffix = ("-quick" if args.quick else "") + (f"-rtt{args.rtt:g}" if args.rtt else "")
    (RESULTS / f"protocols{suffix}.md").write_text("\n\n".join(md) + "\n")
    (RESULTS / f"protocols{suffix}.json").write_text(json.dumps({**data, "raw": bench.raw}, indent=1))
    log(f"wrote {RESULTS / f'protocols{suffix}.md'}")
    return 0


def _with_link_share(table: str, rows: list[tuple[str, Sample]], nbytes: int, link_mb_s: float) -> str:
    """``table`` (bench_bed's) with a '% of link' column after its last."""
    lines = table.splitlines()
    out = [lines[0] + " % of link |", lines[1] + " ---: |"]
    for line, (_, s) in zip(lines[2:], rows):
        out.append(f"{line} {nbytes / s.wall / MB / link_mb_s:.0%} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
