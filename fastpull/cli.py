"""Command line: ``fastpull pull``, ``fastpull demo``, ``fastpull bench``."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from fastpull.errors import FastpullError
from fastpull.fetch import MiB, FetchOptions
from fastpull.manifest import Platform
from fastpull.puller import PullResult, Puller


def _fetch_options(args: argparse.Namespace) -> FetchOptions:
    defaults = FetchOptions()
    return FetchOptions(
        adaptive=not args.fixed,
        chunk_size=int(args.chunk_size * MiB) if args.chunk_size else defaults.chunk_size,
        chunks_per_blob=args.chunks_per_blob or defaults.chunks_per_blob,
        blobs_in_flight=args.blobs_in_flight or defaults.blobs_in_flight,
        max_transfers=args.max_transfers or defaults.max_transfers,
        http2=not args.http1,
    )


def _add_fetch_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fetch engine")
    g.add_argument("--chunk-size", type=float, metavar="MiB",
                   help="bytes per Range request, in MiB (default: adapted to the measured stream speed)")
    g.add_argument("--fixed", action="store_true",
                   help="no self-tuning: run at the transfer caps (default: tune transfers in flight)")
    g.add_argument("--chunks-per-blob", type=int, metavar="N", help="ranged transfers in flight per blob")
    g.add_argument("--blobs-in-flight", type=int, metavar="N", help="blobs fetched at once")
    g.add_argument("--max-transfers", type=int, metavar="N", help="transfers (connections) in flight in all")
    g.add_argument("--http1", action="store_true", help="never negotiate HTTP/2")
    g.add_argument("--durable", action="store_true", help="fdatasync every blob before committing it")
    g.add_argument("--platform", type=Platform.parse, help="os/arch[/variant] (default: this host)")
    g.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                   help="use plain HTTP for this registry (loopback hosts always do)")


def _report(result: PullResult) -> str:
    mb = result.fetched_bytes / 1e6
    return (
        f"pulled {result.reference} -> {result.descriptor.digest}\n"
        f"  {len(result.manifest.layers)} layers, {result.total_bytes / 1e6:.1f} MB in the image, "
        f"{mb:.1f} MB fetched in {result.seconds:.2f} s ({result.throughput / 1e6:.1f} MB/s)\n"
        f"  layout: {result.layout}"
        + (f"\n  rootfs: {result.rootfs}" if result.rootfs else "")
        + (f"\n  snapshots: {result.snapshots[-1].parent}" if result.snapshots else "")
    )


def _cmd_pull(args: argparse.Namespace) -> int:
    with Puller(
        _fetch_options(args), insecure_registries=args.insecure_registry,
        platform=args.platform, durable=args.durable, unpack_workers=args.unpack_workers,
    ) as puller:
        print(_report(puller.pull(args.reference, args.layout, rootfs=args.rootfs, snapshots=args.snapshots)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Start a local registry, push a generated image, pull it with fastpull."""
    from fastpull.testbed.images import LayerSpec, build_image, push_image
    from fastpull.testbed.registry import LocalRegistry

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastpull-demo-"))
    layer_bytes = int(args.size_mb * 1e6 / args.layers)
    print(f"building a {args.layers}-layer image of {args.size_mb} MB in {work / 'image'} ...", flush=True)
    image = build_image([LayerSpec(layer_bytes) for _ in range(args.layers)], work / "image")
    with LocalRegistry(work / "registry") as registry:
        print(f"registry at {registry.url}; pushing ...", flush=True)
        push_image(registry.url, "demo/big", "latest", image)
        ref = f"{registry.host}/demo/big:latest"
        layout = work / "layout"
        with Puller(_fetch_options(args), platform=args.platform, durable=args.durable) as puller:
            print(_report(puller.pull(ref, layout)))
    return 0


BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_bed.py"


def _run_bench(bench_args: list[str]) -> int:
    """Run the far-registry bench of the source tree with ``bench_args`` (its own options)."""
    if not BENCH_SCRIPT.is_file():
        print(f"fastpull: the bench comes with the source tree; {BENCH_SCRIPT} is missing", file=sys.stderr)
        return 2
    import subprocess

    return subprocess.call([sys.executable, str(BENCH_SCRIPT), *bench_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpull", description="Pull OCI/Docker images fast.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="pull an image into an OCI image layout")
    p.add_argument("reference", help="[host[:port]/]name[:tag][@digest]")
    p.add_argument("--layout", required=True, type=Path, help="OCI image layout directory (shared by images)")
    unpack = p.add_mutually_exclusive_group()
    unpack.add_argument("--rootfs", type=Path, help="also unpack the image into this (absent or empty) directory")
    unpack.add_argument("--snapshots", type=Path,
                        help="also unpack each layer into SNAPSHOTS/sha256/<chainid> (overlayfs lower dirs)")
    p.add_argument("--unpack-workers", type=int, metavar="N", help="unpack worker processes (default: CPUs)")
    _add_fetch_arguments(p)
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("demo", help="start a local registry, push a generated image, pull it")
    p.add_argument("--size-mb", type=float, default=300, help="image size in MB (default 300)")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--workdir", type=Path, help="where the image, registry and layout go (default: a temp dir)")
    _add_fetch_arguments(p)
    p.set_defaults(func=_cmd_demo)

    # Listed for --help only: main() hands everything after "bench" to the bench script.
    sub.add_parser("bench", help="far-registry bench against skopeo and containerd (root; see `fastpull bench --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FastpullError as exc:
        print(f"fastpull: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
