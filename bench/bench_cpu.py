"""CPU budget of pull+unpack: what each stage costs alone, beside what the real pipeline spends,
measured in the same run; and the memory of the pipeline's whole process tree.

    python bench/bench_cpu.py                   # a 1.6 GB 5-layer image and a many-small-files one
    python bench/bench_cpu.py --baseline main   # also the pipeline of a git revision, interleaved
    python bench/bench_cpu.py --quick           # small images, one run: a smoke test (cpu-budget-quick.md)

Stages, each alone, CPU seconds on the client side:

- receive: one ``curl`` per blob, all at once, into files on the tmpfs (socket to page cache);
- sha256 of the compressed blobs, inflate (ISA-L), sha256 of the tar: in this process, one core,
  on blocks already in memory (the read that brings them there is not counted);
- file writes: GNU tar (1 MiB records) extracting each layer's uncompressed tar into the tmpfs.

The pipeline is ``python -m fastpull pull REF --layout DIR --rootfs DIR``, cold, on plain loopback:
the CPU of all its processes (the command, the forkserver and the unpack workers, adopted by this
process as a child subreaper, start-up included), and its memory as the largest summed PSS
(``smaps_rollup``) of the process tree, sampled every 50 ms (pages the forkserver's workers share
count once in all). The registry's own CPU is shown beside, from ``/proc/PID/stat``. "vs sum of the
stages" is the median over the runs of pipeline / sum, each run measuring both. As root everything
lands on a tmpfs mounted for the run.

On this VM, memory that has been free for ~2 s goes back to the host (virtio page reporting), and
the first touch of such a page costs a fault in the host, charged as system time to whoever
allocates it: from nothing to ~2 s per GB, varying with the host. Every row that writes files
carries some of it; each measurement starts after ``--settle`` idle seconds so that all start in
that state, and the "first touch" row shows its size in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bed import REPO, compile_package
from bench_fetch import MB, RESULTS
from bench_unpack import scratch_tmpfs
from isal import isal_zlib
from procs import PssSampler, _children_of, become_subreaper, reap_orphans

from fastpull.testbed.images import BuiltImage, LayerSpec, build_image, push_image
from fastpull.testbed.registry import LocalRegistry

GB = 1e9
_BLOCK = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 4.0
"""Idle time before each measurement: this VM hands memory that has been free for ~2 s back to its
host (virtio page reporting), and touching such a page again costs a fault in the host, which shows
as system time of whoever allocates it (~0.5-2.5 s per GB here). After this wait every measured
command starts with its memory in that state."""

# fastpull's tar applier alone on the uncompressed tars, in a fresh process of the measured tree.
_APPLY_DRIVER = """
import json, sys, time
from pathlib import Path
from fastpull.unpack.archive import apply_layer
cpu = 0.0
for tar, target in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(tar, "rb", buffering=1 << 20) as f:
        started = time.process_time()
        apply_layer(f, Path(target), layer=tar, whiteouts="overlay")
        cpu += time.process_time() - started
print(json.dumps(cpu))
"""


def image_shapes(quick: bool) -> dict[str, list[LayerSpec]]:
    scale = 0.02 if quick else 1.0
    mb = lambda n: int(n * scale * MB)  # noqa: E731
    random = lambda n: LayerSpec(mb(n), files=max(1, n // 10))  # noqa: E731  # already compressed data
    text = lambda n: LayerSpec(mb(n), content="text", files=max(1, n // 2))  # noqa: E731  # gzip ~0.42
    return {
        "big": [random(400), text(750), random(400), text(750), text(750)],
        "small-files": [LayerSpec(mb(100), content="text", files=max(10, int(10_000 * scale))) for _ in range(4)],
    }


STAGE_TITLES = {
    "receive": "receive (curl, one per blob at once, to files)",
    "file writes": "file writes (GNU tar -x with 1 MiB records, layer by layer)",
}


@dataclass
class Run:
    """One measurement of a command (or a group run at once): client CPU s, wall s, registry CPU s,
    peak summed PSS MB (0 when not sampled)."""

    cpu: float
    wall: float = 0.0
    registry: float = 0.0
    pss_mb: float = 0.0


def median_run(runs: list[Run]) -> Run:
    """Median of each field; the largest PSS."""
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in ("cpu", "wall", "registry")),
               pss_mb=max(r.pss_mb for r in runs))


def registry_cpu(pid: int) -> float:
    """CPU seconds of the registry so far (its children's included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / _TICK


def settle() -> None:
    """Wait until the memory freed so far is back with the hypervisor (see ``SETTLE_S``)."""
    time.sleep(SETTLE_S)


def run_commands(commands: list[list[str]], registry_pid: int, *, sample_pss: bool = False, cold: bool = True,
                 **popen) -> Run:
    """Start ``commands`` at once (after :func:`settle` if ``cold``) and wait for all of them and their
    descendants: their CPU, the registry's meanwhile, and (``sample_pss``, one command) the tree's peak
    summed PSS."""
    if cold:
        settle()
    become_subreaper()
    before = set(_children_of(os.getpid()))
    reg_before = registry_cpu(registry_pid)
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              **popen) for cmd in commands]
    sampler = PssSampler(procs[0].pid, before | {p.pid for p in procs}) if sample_pss else None
    if sampler is not None:
        sampler.start()
    cpu = 0.0
    failed = []
    for proc in procs:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        if proc.returncode:
            failed.append(f"{' '.join(proc.args)} -> {proc.returncode}\n{out[-2000:].decode(errors='replace')}")
    orphans_cpu, _ = reap_orphans(before)  # the forkserver and workers outlive the command
    wall = time.perf_counter() - started
    pss = sampler.stop() if sampler is not None else 0.0
    if failed:
        raise RuntimeError("\n".join(failed))
    return Run(cpu + orphans_cpu, wall, registry_cpu(registry_pid) - reg_before, pss)


def receive(image: BuiltImage, url: str, repo: str, work: Path, registry_pid: int, sink: str) -> Run:
    """One curl per blob, all at once, to files under ``work`` (``sink="file"``) or /dev/null."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="curl-"))
    try:
        return run_commands([["curl", "-sf", "-o", str(out / d.digest[7:]) if sink == "file" else "/dev/null",
                              f"{url}/v2/{repo}/blobs/{d.digest}"] for d in image.layers], registry_pid)
    finally:
        shutil.rmtree(out)


def first_touch(nbytes: int, work: Path, registry_pid: int) -> float:
    """CPU s that allocating ``nbytes`` of tmpfs pages costs beyond reusing pages just freed: ``dd``
    of fresh memory, then the same again at once into the pages the first one freed."""
    target = work / "first-touch"
    dd = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={nbytes >> 20}", "status=none"]
    try:
        fresh = run_commands([dd], registry_pid).cpu
        target.unlink()
        reused = run_commands([dd], registry_pid, cold=False).cpu
    finally:
        target.unlink(missing_ok=True)
    return fresh - reused


def compute_stages(image: BuiltImage, tars: Path) -> dict[str, float]:
    """CPU s of sha256 of the blobs, inflate and sha256 of the tars, each alone on blocks in memory;
    writes each layer's uncompressed tar under ``tars`` for the file-write stage. glibc keeps freed
    memory for reuse here (as in fastpull's unpack workers): each inflated block is a fresh allocation,
    and mapping it anew each time would count page faults as inflating."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    cpu = dict.fromkeys(("sha256 of the blobs", "inflate", "sha256 of the tars"), 0.0)
    buf = memoryview(bytearray(_BLOCK))
    clock = time.thread_time
    for layer in image.layers:
        blob_hash, tar_hash = hashlib.sha256(), hashlib.sha256()
        inflater = isal_zlib.decompressobj(wbits=31)
        with open(image.blob_path(layer.digest), "rb", buffering=0) as f, open(tars / layer.digest[7:], "wb") as out:
            while n := f.readinto(buf):
                block = buf[:n]
                t0 = clock()
                blob_hash.update(block)
                t1 = clock()
                data = inflater.decompress(block)
                t2 = clock()
                tar_hash.update(data)
                t3 = clock()
                out.write(data)
                cpu["sha256 of the blobs"] += t1 - t0
                cpu["inflate"] += t2 - t1
                cpu["sha256 of the tars"] += t3 - t2
        if "sha256:" + blob_hash.hexdigest() != layer.digest or "sha256:" + tar_hash.hexdigest() != layer.diff_id:
            raise RuntimeError(f"layer {layer.digest} does not match its digests")
    return cpu


def file_writes(image: BuiltImage, tars: Path, work: Path, registry_pid: int, root: Path) -> tuple[Run, float]:
    """GNU tar extracting each layer tar into a fresh directory (one after the other), and the CPU s of
    fastpull's applier doing the same (in a fresh process of ``root``'s tree; start-up not counted)."""
    target = Path(tempfile.mkdtemp(dir=work, prefix="untar-"))
    try:
        cpu = 0.0
        for i, layer in enumerate(image.layers):
            (target / f"gnu-{i}").mkdir()
            cpu += run_commands([["tar", "-b", "2048", "-xf", str(tars / layer.digest[7:]), "-C", str(target / f"gnu-{i}")]],
                                registry_pid).cpu
        args = []
        for i, layer in enumerate(image.layers):
            (target / f"fp-{i}").mkdir()
            args += [str(tars / layer.digest[7:]), str(target / f"fp-{i}")]
        settle()
        out = subprocess.run([sys.executable, "-c", _APPLY_DRIVER, *args], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(root)}).stdout
        return Run(cpu), json.loads(out)
    finally:
        shutil.rmtree(target)


def pull(ref: str, work: Path, root: Path, registry_pid: int, *, layout: Path | None = None,
         rootfs: bool = True) -> Run:
    """``fastpull pull`` (of the tree at ``root``) in a fresh process: cold into a fresh layout unless
    ``layout`` is given; unpacked into a fresh rootfs with ``rootfs``. What it made is removed."""
    fresh = layout is None
    layout = layout or Path(tempfile.mkdtemp(dir=work, prefix="layout-"))
    cmd = [sys.executable, "-m", "fastpull", "pull", ref, "--layout", str(layout)]
    target = Path(tempfile.mkdtemp(dir=work, prefix="rootfs-")) if rootfs else None
    if target is not None:
        cmd += ["--rootfs", str(target / "root")]
    try:
        return run_commands([cmd], registry_pid, sample_pss=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    finally:
        for path in ([layout] if fresh else []) + ([target] if target else []):
            shutil.rmtree(path)


STAGES = ("receive", "sha256 of the blobs", "inflate", "sha256 of the tars", "file writes")
FIRST_TOUCH = "first touch of fresh memory for the blobs and tars (the VM's host faults; in every row)"


def budget_table(image: BuiltImage, tar_bytes: int, samples: dict[str, list[Run]]) -> str:
    """The stages, the pipelines against their sum (median of the per-run ratios: the runs interleave
    stages and pipelines), and the reference rows."""
    med = {k: median_run(v) for k, v in samples.items()}
    blob_gb, tar_gb = image.total_size / GB, tar_bytes / GB
    per_gb = {"receive": blob_gb, "sha256 of the blobs": blob_gb}
    sums = [sum(samples[k][i].cpu for k in STAGES) for i in range(len(samples["receive"]))]
    lines = ["| stage, alone | CPU s | CPU s per GB | registry CPU s |", "| --- | ---: | ---: | ---: |"]
    for name in STAGES:
        r = med[name]
        unit, gb = ("GB of blobs", per_gb[name]) if name in per_gb else ("GB of tar", tar_gb)
        reg = f"{r.registry:.2f}" if r.registry else ""
        lines.append(f"| {STAGE_TITLES.get(name, name)} | {r.cpu:.2f} | {r.cpu / gb:.2f} / {unit} | {reg} |")
    lines.append(f"| **sum of the stages** | **{statistics.median(sums):.2f}** | | |")
    lines += ["", "| pipeline | CPU s, all processes | vs sum of the stages | wall s | peak summed PSS MB | registry CPU s |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in (k for k in samples if k.startswith("pull + unpack")):
        r = med[name]
        ratio = statistics.median(p.cpu / s for p, s in zip(samples[name], sums))
        lines.append(f"| {name} | {r.cpu:.2f} | **{ratio:.2f}** | {r.wall:.2f} | {r.pss_mb:.0f} "
                     f"| {r.registry:.2f} |")
    lines += ["", "| reference | CPU s | wall s | peak summed PSS MB |", "| --- | ---: | ---: | ---: |"]
    for name in (k for k in samples if k not in STAGES and not k.startswith("pull + unpack")):
        r = med[name]
        pss = f"{r.pss_mb:.0f}" if r.pss_mb else ""
        wall = f"{r.wall:.2f}" if r.wall else ""
        lines.append(f"| {name} | {r.cpu:.2f} | {wall} | {pss} |")
    return "\n".join(lines)


def checkout(rev: str, workdir: Path) -> Path:
    """A built copy of the tree at git revision ``rev`` (``git archive``, then the Cython core)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    root = workdir / f"tree-{sha}"
    if not (root / "fastpull").is_dir():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        archive = subprocess.Popen(["git", "-C", str(REPO), "archive", sha], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(root)], stdin=archive.stdout, check=True)
        if archive.wait():
            raise RuntimeError(f"git archive {rev} failed")
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=root, check=True,
                       capture_output=True)
    return root


def describe(specs: list[LayerSpec]) -> str:
    """E.g. "5 layers: 400 MB random in 40 files, ..."."""
    return f"{len(specs)} layers: " + ", ".join(f"{s.size / MB:g} MB {s.content} in {s.files} files" for s in specs)


def measure_image(name: str, specs: list[LayerSpec], image: BuiltImage, registry: LocalRegistry, repo: str, work: Path, runs: int,
                  trees: dict[str, Path]) -> str:
    ref = f"{registry.host}/{repo}:latest"
    pid = registry.pid
    tars = Path(tempfile.mkdtemp(dir=work, prefix="tars-"))
    samples: dict[str, list[Run]] = {}
    add = lambda key, run: samples.setdefault(key, []).append(run)  # noqa: E731
    try:
        for i in range(runs):
            add("receive", receive(image, registry.url, repo, work, pid, "file"))
            for stage, cpu in compute_stages(image, tars).items():
                add(stage, Run(cpu))
            tar_bytes = sum(p.stat().st_size for p in tars.iterdir())
            gnu, applier = file_writes(image, tars, work, pid, REPO)
            add("file writes", gnu)
            for label, root in trees.items():
                add(f"pull + unpack, {label}", pull(ref, work, root, pid))
            add(FIRST_TOUCH, Run(first_touch(image.total_size + tar_bytes, work, pid)))
            add("curl to /dev/null, one per blob at once", receive(image, registry.url, repo, work, pid, "null"))
            add("fastpull's tar applier alone (this tree; file writes and tar parsing)", Run(applier))
            for label, root in trees.items():
                layout = Path(tempfile.mkdtemp(dir=work, prefix="layout-"))
                add(f"download only, {label}", pull(ref, work, root, pid, layout=layout, rootfs=False))
                add(f"unpack only (blobs present), {label}", pull(ref, work, root, pid, layout=layout))
                shutil.rmtree(layout)
            print(f"{name} run {i + 1}: " + ", ".join(f"{k} {v[-1].cpu:.2f}" for k, v in samples.items()),
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tars)
    return (f"### {name}: {describe(specs)} ({image.total_size / MB:.0f} MB of blobs, {tar_bytes / MB:.0f} MB of tar), "
            f"median of {runs} runs\n\n" + budget_table(image, tar_bytes, samples))


def main() -> int:
    global SETTLE_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", default="big,small-files", help="which images (default: big,small-files)")
    ap.add_argument("--baseline", metavar="REV", help="also run the pipeline of this git revision (e.g. main)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fastpull-bench")
    ap.add_argument("--settle", type=float, default=SETTLE_S, metavar="S",
                    help=f"idle seconds before each measurement (default: {SETTLE_S:g}; see the code)")
    ap.add_argument("--out", type=Path, help="where to write the table (default: bench/results/cpu-budget.md)")
    args = ap.parse_args()
    SETTLE_S = args.settle
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up (registry, tmpfs) when ended
    runs = 1 if args.quick else args.runs
    args.workdir.mkdir(parents=True, exist_ok=True)
    trees = {"this tree": REPO}
    if args.baseline:
        trees[f"baseline {args.baseline}"] = checkout(args.baseline, args.workdir)
    for root in trees.values():
        compile_package(root)
    report = [f"## CPU budget of pull + unpack on plain loopback, {os.cpu_count()} CPUs"]
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(LocalRegistry(args.workdir / "registry-cpu"))
        work = args.workdir / "cpu-runs"
        if scratch_tmpfs(stack, work, "fastpull-bench-cpu"):
            report.append("Layouts, rootfs trees and tars on a tmpfs.")
        for i, (name, specs) in enumerate(image_shapes(args.quick).items()):
            if name not in args.images.split(","):
                continue
            image = build_image(specs, args.workdir / f"img-cpu-{name}-{'q' if args.quick else 'f'}", seed=200 + i)
            repo = f"cpu/{name}"
            push_image(registry.url, repo, "latest", image)
            report.append(measure_image(name, specs, image, registry, repo, work, runs, trees))
    text = "\n\n".join(report) + "\n"
    print(text)
    out = args.out or RESULTS / ("cpu-budget-quick.md" if args.quick else "cpu-budget.md")
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
