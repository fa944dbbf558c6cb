"""Fetch-engine benchmark: fastpull over a sweep of chunk size x chunks per blob x blobs in
flight, beside the ceiling measured in the same run (parallel ``curl`` range downloads of the
same blobs to files, one process per range; the best curl setting is the ceiling).

    python bench/bench_fetch.py                       # 1 GB, 5 layers, default sweep
    python bench/bench_fetch.py --layers 256 --rss    # RSS as blob size grows

Every fastpull run is a fresh process pulling into an empty layout; each cell is the median
of ``--runs`` runs. Prints markdown tables and writes them to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bed import compile_package
from procs import become_subreaper, children, reap_orphans

from fastpull.testbed.images import BuiltImage, LayerSpec, build_image, push_image
from fastpull.testbed.registry import LocalRegistry

MB = 1_000_000
MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"

# Runs in a fresh interpreter: times only the pull (not Python start-up) and reports its rusage.
# Unpack workers (a forkserver and its children) outlive it: run_fastpull adopts and counts them.
DRIVER = """
import json, resource, sys, time
from fastpull import FetchOptions, pull
if __name__ == "__main__":
    opts = FetchOptions(**json.loads(sys.argv[3]))
    started = time.perf_counter()
    result = pull(sys.argv[1], sys.argv[2], options=opts, rootfs=sys.argv[4] or None)
    wall = time.perf_counter() - started
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"wall": wall, "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                      "rss_mb": (me.ru_maxrss + kids.ru_maxrss) / 1024, "bytes": result.fetched_bytes}))
"""


@dataclass
class Sample:
    wall: float
    cpu: float
    rss_mb: float
    bytes: int


def run_fastpull(ref: str, work: Path, options: dict, *, layout: Path | None = None,
                 rootfs: bool | Path = False) -> Sample:
    """One pull in a fresh process: into a fresh layout unless ``layout`` is given (kept then),
    and unpacked into a fresh rootfs with ``rootfs`` (into that directory, kept, if it is a
    path). What it made is removed afterwards."""
    fresh = layout is None
    layout = layout or Path(tempfile.mkdtemp(dir=work, prefix="layout-"))
    made = [layout] if fresh else []
    target = rootfs if isinstance(rootfs, Path) else None
    if rootfs is True:
        target = Path(tempfile.mkdtemp(dir=work, prefix="rootfs-")) / "root"
        made.append(target.parent)
    become_subreaper()  # unpack workers outlive the driver's report: adopt and count them
    before = set(children())
    try:
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, ref, str(layout), json.dumps(options), str(target or "")],
            capture_output=True, text=True, check=True,
        ).stdout
        sample = Sample(**json.loads(out.strip().splitlines()[-1]))
        cpu, rss = reap_orphans(before)
        sample.cpu += cpu
        sample.rss_mb += rss
        return sample
    finally:
        for path in made:
            shutil.rmtree(path)


def run_curl(registry_url: str, repo: str, image: BuiltImage, work: Path, streams_per_blob: int,
             *, verify: bool = False) -> Sample:
    """All blobs at once, each split into ``streams_per_blob`` ranges, one curl process each;
    with ``verify``, then the sha256 of every blob, all at once (``openssl dgst``: the same
    SHA-NI code fastpull's hashlib runs), which fastpull does as it goes."""
    out_dir = Path(tempfile.mkdtemp(dir=work, prefix="curl-"))
    procs = []
    started = time.perf_counter()
    before = os.times()
    try:
        for desc in image.layers:
            url = f"{registry_url}/v2/{repo}/blobs/{desc.digest}"
            step = -(-desc.size // streams_per_blob)
            for i, start in enumerate(range(0, desc.size, step)):
                end = min(start + step, desc.size) - 1
                target = out_dir / f"{desc.digest[7:19]}.{i}"
                procs.append(subprocess.Popen(["curl", "-sf", "-r", f"{start}-{end}", "-o", str(target), url]))
        peak_rss = 0.0
        for p in procs:
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0:
                raise RuntimeError(f"curl failed with {p.returncode}")
            peak_rss += ru.ru_maxrss / 1024
        if verify:
            hashers = []
            for desc in image.layers:
                parts = sorted(out_dir.glob(f"{desc.digest[7:19]}.*"), key=lambda p: int(p.suffix[1:]))
                cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
                hashers.append((desc, cat, subprocess.Popen(["openssl", "dgst", "-sha256", "-r"], stdin=cat.stdout,
                                                            stdout=subprocess.PIPE, text=True)))
                cat.stdout.close()
            for desc, cat, hasher in hashers:
                digest = hasher.communicate()[0]
                cat.wait()
                if not desc.digest.endswith(digest.split()[0]):
                    raise RuntimeError(f"curl fetched a bad {desc.digest}")
        wall = time.perf_counter() - started
        after = os.times()
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        return Sample(wall, cpu, peak_rss, sum(d.size for d in image.layers))
    finally:
        shutil.rmtree(out_dir)


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(
        wall=statistics.median(s.wall for s in samples),
        cpu=statistics.median(s.cpu for s in samples),
        rss_mb=max(s.rss_mb for s in samples),
        bytes=samples[0].bytes,
    )


def table(rows: list[tuple[str, Sample]], ceiling: Sample) -> str:
    lines = [
        "| setting | wall s | MB/s | vs ceiling | peak RSS MB | CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in rows:
        mbs = s.bytes / s.wall / MB
        lines.append(
            f"| {name} | {s.wall:.2f} | {mbs:.0f} | {ceiling.wall / s.wall:.2f} | {s.rss_mb:.0f} | {s.cpu:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="200,200,200,200,200", help="layer sizes in MB (default: 1 GB in 5)")
    ap.add_argument("--chunk-mib", default="4,16,64", help="chunk sizes to sweep, MiB")
    ap.add_argument("--per-blob", default="1,4,8,16", help="chunks in flight per blob to sweep")
    ap.add_argument("--blobs", default="1,5", help="blobs in flight to sweep")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    ap.add_argument("--curl-streams", default="1,4,8", help="ranges per blob for curl; the best is the ceiling")
    ap.add_argument("--rss", action="store_true", help="instead: RSS at 64 transfers as the blob grows")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fastpull-bench")
    args = ap.parse_args()

    compile_package()
    args.workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    sizes = [int(float(x) * MB) for x in args.layers.split(",")]
    images = []
    if args.rss:
        for size in sizes:
            images.append((f"rss/{size // MB}", build_image([LayerSpec(size)], args.workdir / f"img-rss-{size}")))
    else:
        name = "bench/" + "-".join(str(s // MB) for s in sizes)
        images.append((name, build_image([LayerSpec(s) for s in sizes], args.workdir / f"img-{name[6:]}")))

    report = []
    with LocalRegistry(args.workdir / "registry") as registry:
        for repo, image in images:
            push_image(registry.url, repo, "latest", image)
        work = args.workdir / "runs"
        work.mkdir(exist_ok=True)
        for repo, image in images:
            ref = f"{registry.host}/{repo}:latest"
            total = sum(d.size for d in image.layers)
            header = f"### {repo}: {len(image.layers)} layers, {total / MB:.0f} MB, median of {args.runs} runs"
            curl = {}
            for streams in [int(x) for x in args.curl_streams.split(",")]:
                curl[streams] = median_sample([run_curl(registry.url, repo, image, work, streams)
                                               for _ in range(args.runs)])
            rows = [(f"curl: {n} ranges/blob, all blobs at once", s) for n, s in curl.items()]
            best = min(curl, key=lambda n: curl[n].wall)
            ceiling = curl[best]  # the best curl setting is the ceiling
            samples = [run_curl(registry.url, repo, image, work, best, verify=True) for _ in range(args.runs)]
            rows.append((f"curl: {best} ranges/blob, then sha256 of every blob at once (verified, like fastpull)",
                         median_sample(samples)))
            if args.rss:
                grid = [(16, 64, 1)]  # 64 transfers in flight on one blob
            else:
                grid = list(itertools.product(
                    [int(x) for x in args.chunk_mib.split(",")],
                    [int(x) for x in args.per_blob.split(",")],
                    [int(x) for x in args.blobs.split(",")],
                ))
            for chunk, per_blob, blobs in grid:
                options = dict(chunk_size=chunk * MiB, chunks_per_blob=per_blob, blobs_in_flight=blobs,
                               max_transfers=max(64, per_blob * blobs), adaptive=False)
                samples = [run_fastpull(ref, work, options) for _ in range(args.runs)]
                rows.append((f"fastpull chunk {chunk} MiB x {per_blob}/blob x {blobs} blobs", median_sample(samples)))
                print(f"{repo} {rows[-1][0]}: {rows[-1][1]}", file=sys.stderr, flush=True)
            rows.append(("fastpull defaults (self-tuning)",
                         median_sample([run_fastpull(ref, work, {}) for _ in range(args.runs)])))
            report.append(header + "\n\n" + table(rows, ceiling))
    text = "\n\n".join(report) + "\n"
    print(text)
    (RESULTS / ("fetch-rss.md" if args.rss else "fetch.md")).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
