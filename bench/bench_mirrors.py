"""Mirrors on the far-registry bed (bench/bed.py): what a dead mirror listed first costs, and what a
mirror killed in the middle of a pull costs, against a direct pull of the same image in the same run.

    python bench/bench_mirrors.py            # 1 GB image, 3 runs per row; ~3 min
    python bench/bench_mirrors.py --tls      # both registries serve HTTPS (HTTP/2 by ALPN)
    python bench/bench_mirrors.py --quick    # 100 MB, 1 run per row

The registry is on 127.0.0.1:5000 and the mirror, a second ``docker-registry`` holding the same
image, on 127.0.0.2:5000: both shaped alike (per connection and one link together). fastpull reads a
``hosts.toml`` naming the mirror first (``--hosts-dir``), as containerd would. With ``--tls`` both
serve HTTPS, HTTP/2 by ALPN, each with its own self-signed certificate: fastpull verifies the
registry with ``SSL_CERT_FILE`` and the mirror with the ``ca`` of its ``hosts.toml`` entry. Rows:

- direct: no mirror (the baseline);
- dead mirror first: the mirror's address refuses connections (nothing listens there);
- live mirror: the pull comes from the mirror;
- mirror killed at 30%: the mirror process gets SIGKILL once 30% of the image's bytes have left the
  registries (the bed's traffic counters); the rest comes from the registry.

"bytes sent" is what both registries sent in all (the bed's counters: payload and headers) over the
image's bytes; the image is checked by digest as it lands (and its layer once more by sha256 here).
The table goes to ``bench/results/mirrors[-tls][-quick].md``, with the HTTP versions the registries
answered fastpull (their access logs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bed import REDIRECTOR_HOST, REGISTRY_PORT, REPO, BedRegistry, ThrottledBed, compile_package, tls_config, trust
from bench_bed import MB, RESULTS, bed_arguments, git_state, log

from fastpull.testbed.images import LayerSpec, build_image, push_image
from fastpull.testbed.registry import LocalRegistry

KILL_AT = 0.30


def main() -> int:
    ap = bed_arguments(__doc__, "smoke run: a 100 MB image, one run per row")
    ap.add_argument("--runs", type=int, help="runs per row (default 3; quick 1)")
    ap.add_argument("--tls", action="store_true",
                    help="the registry and the mirror serve HTTPS with HTTP/2 (fastpull verifies both)")
    ap.add_argument("--name", default="fpmirror", help="network namespace name (must not exist)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastpull-bench-mirrors"))
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    size_mb = 100 if args.quick else 1000
    compile_package(REPO)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = build_image([LayerSpec(int(size_mb * MB))], work / "image")
    (layer,) = image.layers
    mirror_ca, mirror_config = tls_config(work / "mirror-tls", REDIRECTOR_HOST) if args.tls else (None, None)
    scheme = "https" if args.tls else "http"
    rows: dict[str, list[tuple[float, float]]] = {}
    started = time.monotonic()
    with ThrottledBed(args.per_flow, args.link, rtt_ms=args.rtt, name=args.name) as bed, \
            bed.registry(work / "registry", tls=args.tls) as registry:
        mirror = LocalRegistry(work / "mirror", host=REDIRECTOR_HOST, port=REGISTRY_PORT, command_prefix=bed.prefix,
                               extra_config=mirror_config)
        bed.call(mirror.start)
        ref = f"{registry.host}/bench/mirrors:latest"
        configs = {
            "direct": None,
            "dead mirror first": f"{scheme}://127.0.0.1:{_free_port()}",
            "live mirror": mirror.url,
            f"mirror killed at {KILL_AT:.0%}": mirror.url,
        }
        try:
            # The pusher verifies each with its CA; the registry's stays trusted for fastpull, which
            # gets the mirror's from hosts.toml only.
            for url, ca_file in ((mirror.url, mirror_ca), (registry.url, registry.ca_file)):
                trust(ca_file)
                bed.call(push_image, url, "bench/mirrors", "latest", image)
            registry.clear_served()
            bed.call(mirror.clear_served)
            for _ in range(runs):
                for name, via in configs.items():
                    hosts_dir = _hosts_dir(work / "config" / name, registry, via, mirror_ca)
                    kill = mirror if name.startswith("mirror killed") else None
                    wall, sent = _pull(bed, ref, work / "layout", hosts_dir, kill, image.total_size)
                    _check(work / "layout", layer.digest)
                    rows.setdefault(name, []).append((wall, sent / image.total_size))
                    log(f"{name}: {wall:.2f} s, {sent / image.total_size:.3f}x the image sent")
                    if kill is not None:
                        mirror.stop()
                        bed.call(mirror.start)
            protocols = {"registry": Counter(r.protocol for r in registry.served()),
                         "mirror": Counter(r.protocol for r in bed.call(mirror.served))}
        finally:
            mirror.stop()

    base = statistics.median(w for w, _ in rows["direct"])
    table = ["| pull | wall s | vs direct | MB/s | bytes sent |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, samples in rows.items():
        wall = statistics.median(w for w, _ in samples)
        sent = statistics.median(s for _, s in samples)
        table.append(f"| {name} | {wall:.2f} | {wall / base:.2f}x | {image.total_size / wall / MB:.0f} | {sent:.3f}x |")
    served = "TLS, HTTP/2 by ALPN (fastpull verifies both)" if args.tls else "plain HTTP"
    md = [f"# Mirrors on the bed: per flow {args.per_flow:g} / link {args.link:g} Mbit/s, RTT +{args.rtt:g} ms, "
          f"{served}",
          f"A {image.total_size / MB:.0f} MB image (one layer), cold, fetch only; median of {runs} run(s), "
          "all rows in the same run. fastpull reads a hosts.toml that names the mirror first "
          "(`--hosts-dir`). 'bytes sent': both registries together (the bed's counters, TLS records "
          "included) over the image's bytes.",
          "\n".join(table)]
    md.append("Requests answered in all the runs, by HTTP version: " + "; ".join(
        f"{who}: " + ", ".join(f"{proto} {n}" for proto, n in sorted(counts.items()))
        for who, counts in protocols.items()))
    md.append("Runs (wall s, bytes sent): " + "; ".join(
        f"{name}: " + ", ".join(f"{w:.2f} s / {s:.3f}x" for w, s in samples) for name, samples in rows.items()))
    md.append(f"Bench took {(time.monotonic() - started) / 60:.1f} min; fastpull {git_state(REPO)}.")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"mirrors{'-tls' if args.tls else ''}{'-quick' if args.quick else ''}.md"
    out.write_text("\n\n".join(md) + "\n")
    log(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _hosts_dir(directory: Path, upstream: BedRegistry, mirror: str | None, mirror_ca: str | None) -> Path:
    """A hosts.toml directory naming the ``mirror`` URL before ``upstream`` (none: an empty directory);
    ``mirror_ca`` (a file) verifies the mirror."""
    (directory / upstream.host).mkdir(parents=True, exist_ok=True)
    if mirror is not None:
        ca = f'  ca = "{mirror_ca}"\n' if mirror_ca else ""
        (directory / upstream.host / "hosts.toml").write_text(
            f'server = "{upstream.url}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n{ca}')
    return directory


def _pull(bed: ThrottledBed, ref: str, layout: Path, hosts_dir: Path, kill, image_bytes: int) -> tuple[float, int]:
    """One cold ``fastpull pull`` through ``hosts_dir`` (no other configuration file): wall seconds
    and the bytes the registries sent. With ``kill``, that registry gets SIGKILL once
    ``KILL_AT`` of the image's bytes were sent."""
    shutil.rmtree(layout, ignore_errors=True)
    empty_conf = Path(tempfile.mkdtemp()) / "registries.conf"
    empty_conf.touch()
    cmd = [sys.executable, "-m", "fastpull", "pull", ref, "--layout", str(layout), "--no-join", "-q",
           "--hosts-dir", str(hosts_dir), "--registries-conf", str(empty_conf)]
    before = _sent(bed)
    done = threading.Event()

    def killer() -> None:
        while not done.wait(0.02):
            if _sent(bed) - before >= KILL_AT * image_bytes:
                os.kill(kill.pid, signal.SIGKILL)
                return

    watcher = threading.Thread(target=killer) if kill is not None else None
    started = time.perf_counter()
    proc = bed.popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    if watcher is not None:
        watcher.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    if watcher is not None:
        watcher.join()
    bed.forget(proc)
    shutil.rmtree(empty_conf.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"fastpull pull failed ({proc.returncode}): {err.strip()}")
    return wall, _sent(bed) - before


def _sent(bed: ThrottledBed) -> int:
    return sum(bed.class_bytes().values())


def _check(layout: Path, digest: str) -> None:
    h = hashlib.sha256()
    with open(layout / "blobs" / "sha256" / digest.split(":")[1], "rb") as f:
        while piece := f.read(1 << 22):
            h.update(piece)
    if f"sha256:{h.hexdigest()}" != digest:
        raise RuntimeError(f"the layer in {layout} is not {digest}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
