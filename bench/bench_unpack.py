"""Unpack benchmark: pull+unpack beside download-only and unpack-only (from the finished
download) of the same image in the same run, and decompression throughput of ISA-L, zlib
and zstd on this machine.

    python bench/bench_unpack.py            # a 1 GB image and a typical multi-layer one
    python bench/bench_unpack.py --quick    # small images, one run: a smoke test (unpack-quick.md)
    python bench/bench_unpack.py --bed 200,1000   # on the far-registry bed (root): per-flow, link Mbit/s
    python bench/bench_unpack.py --verify   # also check each rootfs against GNU tar, layer by layer

Overlap works when pull+unpack takes about max(download-only, unpack-only), not their sum.

As root, the pulls land on a tmpfs mounted for the bench: on this VM's disk the runs drifted
slower one after another (writeback of earlier runs' pages; on its journal-less ext4, creating
files soon after thousands were deleted makes the kernel scan the deleted inodes), so the disk,
not fastpull, decided the ratios. Every mode writes the same bytes to the same place.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import zstandard
from bed import compile_package
from bench_fetch import MB, RESULTS, median_sample, run_fastpull
from isal import isal_zlib

from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.testbed.reference import describe, reference_rootfs, uncompressed_layer
from fastpull.testbed.registry import LocalRegistry


def image_shapes(quick: bool) -> dict[str, list[LayerSpec]]:
    scale = 0.1 if quick else 1.0
    mb = lambda n: int(n * scale * MB)  # noqa: E731
    return {
        "large: 5 x 200 MB, random, 20 files each": [LayerSpec(mb(200), files=20) for _ in range(5)],
        "typical: 8 layers, 400 MB, text, 2000 files": [
            LayerSpec(mb(s), content="text", files=250) for s in (120, 80, 60, 50, 40, 25, 15, 10)
        ],
    }


def unpack_table(rows: list[tuple[str, object]], baseline: float) -> str:
    lines = ["| mode | wall s | vs max(download, unpack) | peak RSS MB | CPU s |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, s in rows:
        lines.append(f"| {name} | {s.wall:.2f} | {s.wall / baseline:.2f} | {s.rss_mb:.0f} | {s.cpu:.2f} |")
    return "\n".join(lines)


def decompression_table(sample: bytes, runs: int) -> str:
    """MB/s of uncompressed output for each decompressor, median of ``runs``."""
    gz = zlib.compress(sample, 6, wbits=31)  # as the testbed and Docker gzip layers
    zs = zstandard.ZstdCompressor(level=3).compress(sample)
    cases = {
        "gzip, ISA-L (isal_zlib)": lambda: isal_zlib.decompress(gz, wbits=31),
        "gzip, zlib": lambda: zlib.decompress(gz, wbits=31),
        "zstd (zstandard)": lambda: zstandard.ZstdDecompressor().decompress(zs, max_output_size=len(sample)),
    }
    lines = ["| decompressor | MB/s out | ratio to zlib |", "| --- | ---: | ---: |"]
    speeds = {}
    for name, fn in cases.items():
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        speeds[name] = len(sample) / statistics.median(times) / MB
    for name, speed in speeds.items():
        lines.append(f"| {name} | {speed:.0f} | {speed / speeds['gzip, zlib']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", default="large,typical", help="which images (default: large,typical)")
    ap.add_argument("--verify", action="store_true",
                    help="also compare each image's rootfs with GNU tar applying its layers one by one")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fastpull-bench")
    ap.add_argument("--bed", metavar="PER_FLOW,LINK",
                    help="run on bench/bed.py's shaped namespace, caps in Mbit/s (default: plain loopback)")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    compile_package()
    args.workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    report = []
    with contextlib.ExitStack() as stack:
        if args.bed:
            from bed import ThrottledBed

            per_flow, link = (float(x) for x in args.bed.split(","))
            bed = stack.enter_context(ThrottledBed(per_flow, link))
            registry = stack.enter_context(bed.registry(args.workdir / "registry-unpack-bed"))
            inside = bed.call  # pushes and pulls run inside the namespace
            report.append(f"## On the far-registry bed: {per_flow:g} Mbit/s per flow, {link:g} Mbit/s link")
        else:
            registry = stack.enter_context(LocalRegistry(args.workdir / "registry-unpack"))
            inside = _call
            report.append("## On plain loopback (no caps): CPU-bound on this machine")
        work = args.workdir / "runs"
        if scratch_tmpfs(stack, work, "fastpull-bench"):
            report.append("Layouts and rootfs trees on a tmpfs (see the script's docstring).")
        measured = []
        for i, (shape, specs) in enumerate(image_shapes(args.quick).items()):
            if shape.split(":")[0] not in args.images.split(","):
                continue
            image = build_image(specs, args.workdir / f"img-unpack-{i}-{'q' if args.quick else 'f'}", seed=100 + i)
            repo = f"unpack/shape{i}"
            inside(push_image, registry.url, repo, "latest", image)
            ref = f"{registry.host}/{repo}:latest"
            download, unpack, both = [], [], []
            for _ in range(runs):
                layout = Path(tempfile.mkdtemp(dir=work, prefix="layout-"))
                download.append(inside(run_fastpull, ref, work, {}, layout=layout))
                unpack.append(inside(run_fastpull, ref, work, {}, layout=layout, rootfs=True))  # blobs there
                shutil.rmtree(layout)
                both.append(inside(run_fastpull, ref, work, {}, rootfs=True))
                print(f"{shape}: download {download[-1].wall:.2f}s unpack {unpack[-1].wall:.2f}s "
                      f"both {both[-1].wall:.2f}s", file=sys.stderr, flush=True)
            rows = [("download only", median_sample(download)), ("unpack only (blobs present)", median_sample(unpack)),
                    ("pull + unpack (overlapped)", median_sample(both))]
            baseline = max(rows[0][1].wall, rows[1][1].wall)
            total = sum(d.size for d in image.layers)
            report.append(f"### {shape} ({total / MB:.0f} MB compressed), median of {runs} runs\n\n"
                          + unpack_table(rows, baseline))
            measured.append((shape, image, ref))
        # The memory-hungry parts come last: a pull forked from this process after them would
        # report their peak RSS as its own (ru_maxrss survives exec).
        for shape, image, ref in measured:
            if args.verify:
                report.append(f"{shape.split(':')[0]}: " + inside(verify_rootfs, ref, image, work))
            if shape.startswith("typical"):
                sample = uncompressed_layer(image, image.layers[0])[:int((20 if args.quick else 200) * MB)]
                report.append(f"### Decompression, {len(sample) / MB:.0f} MB of tar with text files, one core\n\n"
                              + decompression_table(sample, runs))
    text = "\n\n".join(report) + "\n"
    print(text)
    name = ("unpack-bed" if args.bed else "unpack") + ("-quick" if args.quick else "")
    (RESULTS / f"{name}.md").write_text(text)  # a smoke run never replaces a full run's tables
    return 0


def scratch_tmpfs(stack: contextlib.ExitStack, work: Path, name: str) -> bool:
    """Create ``work`` and, as root, mount a tmpfs there until ``stack`` closes; whether it did."""
    work.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        return False
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", name, str(work)], check=True)
    stack.callback(subprocess.run, ["umount", str(work)], check=True)
    return True


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def verify_rootfs(ref: str, image, work: Path) -> str:
    """Pull ``ref`` into a rootfs and compare it with GNU tar applying the layers one by one."""
    scratch = Path(tempfile.mkdtemp(dir=work, prefix="verify-"))
    try:
        run_fastpull(ref, work, {}, rootfs=scratch / "rootfs")
        reference_rootfs(image, scratch / "reference", scratch)
        got, want = describe(scratch / "rootfs"), describe(scratch / "reference")
        verdict = "identical to" if got == want else "DIFFERENT from"
        return (f"rootfs ({len(got['tree'])} paths: types, modes, owners, sizes, content hashes, link targets, "
                f"xattrs, hardlink groups) {verdict} GNU tar applying the layers one by one.")
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    raise SystemExit(main())
