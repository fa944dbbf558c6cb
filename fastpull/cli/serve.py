"""``fastpull serve``: the node daemon, a pull-through registry mirror for the node's runtimes."""

from __future__ import annotations

import sys
from pathlib import Path

from fastpull.cli.main import (
    EXIT_USAGE,
    UsageError,
    add_fetch_arguments,
    add_registry_arguments,
    fetch_options,
    log_to_stderr,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_parser(sub) -> None:
    from fastpull.serve import DEFAULT_CRI_UPSTREAM, DEFAULT_LISTEN, DEFAULT_TAG_TTL

    p = sub.add_parser("serve", help="serve the node's container runtimes as a pull-through registry mirror")
    p.add_argument("--store", type=Path, help="content store (an OCI image layout; default: $FASTPULL_STORE, "
                   "else /var/lib/fastpull as root, else $XDG_DATA_HOME/fastpull)")
    p.add_argument("--listen", type=_address, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to listen on (default {DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]}; "
                        "anything but loopback must be asked for here; port 0: any free port, logged)")
    p.add_argument("--upstream", default="docker.io", metavar="HOST",
                   help="the registry of requests that name none (no ?ns= and no host in the path; "
                        "default docker.io, as Docker's registry-mirrors assume)")
    p.add_argument("--prefetch", type=Path, metavar="FILE",
                   help="image references, one per line: pulled into the store at start and when the file changes")
    p.add_argument("--tag-ttl", type=float, default=DEFAULT_TAG_TTL, metavar="SECONDS",
                   help=f"how long a tag's upstream digest is trusted (default {DEFAULT_TAG_TTL:g})")
    p.add_argument("--no-fetch-ahead", dest="fetch_ahead", action="store_false",
                   help="fetch only the blobs clients ask for (default: a client's GET of an image manifest "
                        "starts fetching all its layers the store lacks)")
    p.add_argument("--snapshotter", type=Path, metavar="SOCKET",
                   help="also be containerd's snapshotter: serve its snapshots API on this unix socket (mode 0600), "
                        "as the proxy plugin named fastpull, fetching and unpacking the layers of CRI pulls itself")
    p.add_argument("--cri-proxy", type=Path, metavar="SOCKET",
                   help="also serve CRI's image service on this unix socket (mode 0600), for kubelet's "
                        "--image-service-endpoint: every call goes to --cri-upstream, and a PullImage's "
                        "credentials serve the snapshotter's pulls of its layers, in memory, for that pull only")
    p.add_argument("--cri-upstream", type=Path, default=Path(DEFAULT_CRI_UPSTREAM), metavar="SOCKET",
                   help=f"containerd's socket, where --cri-proxy forwards (default {DEFAULT_CRI_UPSTREAM}); "
                        "without --snapshotter, the proxy first imports each pulled image there, as "
                        "`fastpull pull --containerd` does")
    p.add_argument("--containerd", type=Path, metavar="SOCKET",
                   help="import prefetched images into the containerd on this socket (its own overlayfs snapshots "
                        "and image store, as `fastpull pull --containerd` does) instead of tagging them in the store")
    p.add_argument("--namespace", default="k8s.io",
                   help="containerd namespace for --containerd (default k8s.io, CRI's: kubelet sees the images)")
    p.add_argument("--print-config", choices=("containerd", "containerd1", "crio", "docker"), metavar="RUNTIME",
                   help="print what to write for containerd (2.x), containerd1 (1.6, 1.7), crio or docker to use "
                        "this mirror for the REGISTRY arguments (and, with --snapshotter, this snapshotter), and exit")
    p.add_argument("registries", nargs="*", metavar="REGISTRY", help="with --print-config: registries to mirror")
    add_registry_arguments(p)
    add_fetch_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _address(text: str) -> tuple[str, int]:
    import argparse

    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (colon and host and port.isdigit() and int(port) < 65536):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _cmd_serve(args: argparse.Namespace) -> int:
    from fastpull.content.defaults import default_store
    from fastpull.serve.config import snippets
    from fastpull.serve.daemon import ServeOptions, serve

    host, port = args.listen
    if args.print_config:
        try:
            from fastpull.oci.manifest import Platform

            sys.stdout.write(snippets(args.print_config, f"{host}:{port}", args.registries or [args.upstream],
                                      args.upstream, None if args.snapshotter is None else str(args.snapshotter.absolute()),
                                      str(Platform.host())))
        except ValueError as e:
            raise UsageError(str(e)) from None
        return 0
    if args.registries:
        print("fastpull serve: error: REGISTRY arguments go with --print-config", file=sys.stderr)
        return EXIT_USAGE
    if args.tag_ttl < 0:
        raise UsageError(f"--tag-ttl must not be negative, got {args.tag_ttl:g}")
    if args.containerd is not None and args.snapshotter is not None:
        raise UsageError("--containerd goes without --snapshotter: with it, prefetched images are unpacked "
                         "for fastpull's snapshotter")
    log_to_stderr(max(args.verbose, 1))
    serve(ServeOptions(
        store=(args.store or Path(default_store())).absolute(), host=host, port=port, upstream=args.upstream,
        insecure_registries=tuple(args.insecure_registry), prefetch=args.prefetch, tag_ttl=args.tag_ttl,
        fetch_ahead=args.fetch_ahead, hosts_dir=args.hosts_dir, registries_conf=args.registries_conf,
        snapshotter=None if args.snapshotter is None else args.snapshotter.absolute(), fetch=fetch_options(args),
        cri_proxy=None if args.cri_proxy is None else args.cri_proxy.absolute(), cri_upstream=args.cri_upstream.absolute(),
        containerd=None if args.containerd is None else args.containerd.absolute(), namespace=args.namespace,
    ))
    return 0

