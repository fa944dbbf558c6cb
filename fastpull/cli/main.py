"""Command line: ``fastpull pull``, ``fastpull serve`` (:mod:`fastpull.cli.serve`), ``fastpull login``/``logout``
(:mod:`fastpull.cli.login`), ``fastpull demo``, ``fastpull bench``.

Start-up matters here: a node may start many ``fastpull pull`` processes at once, and an identical
pull that is already in flight is joined (:mod:`fastpull.cli.singleflight`) before the engine is even
imported. So this module imports the engine, the registry client and ``logging`` only where used.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys

from fastpull.errors import FastpullError, InvalidReference

TYPE_CHECKING = False  # not typing's: importing typing costs start-up time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import NoReturn

    from fastpull.cli.singleflight import Outcome
    from fastpull.engine import FetchOptions
    from fastpull.events import Event, Progress

MiB = 1 << 20
PULL_LOCKS = os.path.join(".fastpull", "pulls")
"""Where in a layout identical ``fastpull pull`` commands meet (see :func:`_cmd_pull`)."""

_REQUEST_ENVIRONMENT = ("HOME", "DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
                        "CURL_CA_BUNDLE", "SSL_CERT_FILE", "FASTPULL_NO_EXTENSIONS")
"""Environment variables that can change what a pull does: part of what makes two pulls identical."""


EXIT_FAILED, EXIT_USAGE = 1, 2
"""Exit statuses: a pull that failed; a bad command line. A pull stopped by a signal exits with 128 + its number."""

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class UsageError(Exception):
    """A command-line value the parser let through but the pull refuses (e.g. a too small --chunk-size)."""


class _StopSignals:
    """What SIGINT, SIGTERM and SIGHUP do while a command runs: stop it, and make it exit with 128 + the
    first one's number (the pull's transfers and unpack workers stopped, its temporary trees removed, its
    partial blobs kept for a resume). A signal ignored when the command started stays ignored, as
    Python leaves SIGINT: ``nohup fastpull pull ...`` survives its terminal's hang-up, and a pull started
    in the background by a script is not stopped by the terminal's Ctrl-C.

    Once a pull has resolved its image it runs threads, and a stop is a message (:meth:`Puller.stop`):
    the pull raises from its wait and unwinds from there. An exception raised here could land anywhere,
    in the middle of taking locks that the other threads then wait on for good. Before that only the
    main thread runs, and the first stop is raised here (a synchronous request lets it run within a
    second), as KeyboardInterrupt.
    """

    def __enter__(self) -> _StopSignals:
        self.received: list[int] = []
        self.pull: Callable[[], None] | None = None
        """Stops the pull under way, once it runs threads."""
        self._previous = {s: signal.signal(s, self) for s in _STOP_SIGNALS
                          if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __call__(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        if self.pull is not None:
            self.pull()
        elif len(self.received) == 1:  # the clean-up runs once, undisturbed by a second signal
            raise KeyboardInterrupt


_stop_signals = _StopSignals()


def fetch_options(args: argparse.Namespace) -> FetchOptions:
    from fastpull.engine import FetchOptions

    defaults = FetchOptions()
    try:
        return FetchOptions(
            adaptive=not args.fixed,
            chunk_size=int(args.chunk_size * MiB) if args.chunk_size else defaults.chunk_size,
            chunks_per_blob=args.chunks_per_blob or defaults.chunks_per_blob,
            blobs_in_flight=args.blobs_in_flight or defaults.blobs_in_flight,
            max_transfers=args.max_transfers or defaults.max_transfers,
            http2=not args.http1,
            streams_per_connection=(defaults.streams_per_connection if args.streams_per_connection is None
                                    else None if args.streams_per_connection == "auto" else args.streams_per_connection),
        )
    except ValueError as e:  # FetchOptions checks what the argument types cannot (e.g. the chunk size's floor)
        raise UsageError(f"invalid fetch options: {e}") from None


def add_registry_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registries and mirrors (read as containerd, podman and Docker read them)")
    g.add_argument("--hosts-dir", metavar="DIR",
                   help="containerd hosts.toml directories, DIR/<registry>/hosts.toml and DIR/_default "
                        "(default: /etc/containerd/certs.d if it exists)")
    g.add_argument("--registries-conf", metavar="FILE",
                   help="containers registries.conf, with FILE.d/*.conf (default: /etc/containers/registries.conf "
                        "and registries.conf.d/ if they exist)")


def add_fetch_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fetch engine")
    g.add_argument("--chunk-size", type=_positive_number, metavar="MiB",
                   help="bytes per Range request, in MiB (default: adapted to the measured stream speed)")
    g.add_argument("--fixed", action="store_true",
                   help="no self-tuning: run at the transfer caps (default: tune transfers in flight)")
    g.add_argument("--chunks-per-blob", type=_count, metavar="N", help="ranged transfers in flight per blob")
    g.add_argument("--blobs-in-flight", type=_count, metavar="N", help="blobs fetched at once")
    g.add_argument("--max-transfers", type=_count, metavar="N", help="transfers (connections) in flight in all")
    g.add_argument("--http1", action="store_true", help="never negotiate HTTP/2")
    g.add_argument("--streams-per-connection", type=_count_or_auto, metavar="N|auto",
                   help="HTTP/2 streams one connection carries at most (default 1; auto: tuned, from 1)")
    g.add_argument("--durable", action="store_true", help="fdatasync every blob before committing it")
    g.add_argument("--platform", type=_platform, help="os/arch[/variant] (default: this host)")
    g.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                   help="accept any certificate from this registry, or plain HTTP if it does not speak TLS "
                        "(loopback hosts may be plain HTTP too, but their certificates are checked)")


def _count(text: str) -> int:
    """A number of things: a whole number above zero."""
    import argparse

    if not (text.strip().isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a whole number greater than zero, got {text!r}")
    return int(text)


def _count_or_auto(text: str) -> int | str:
    return "auto" if text == "auto" else _count(text)


def _positive_number(text: str) -> float:
    """A size: a finite number above zero."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number greater than zero, got {text!r}")
    return value


def _platform(spec: str) -> str:
    """Check ``--platform`` (kept as text: it is part of a pull's key; see :func:`_pull_key`)."""
    import argparse

    from fastpull.oci.manifest import Platform

    try:
        Platform.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def _report(pulled: dict, leader: int | None) -> str:
    """The text report of a ``pulled`` event (as JSON: it may be another process's)."""
    rate = pulled["fetched"] / pulled["download_seconds"] if pulled["download_seconds"] > 0 else 0.0
    unpacked = f", unpacked in {pulled['unpack_seconds']:.2f} s" if pulled["unpack_seconds"] else ""
    return (
        f"pulled {pulled['reference']} -> {pulled['digest']}\n"
        f"  {pulled['layers']} layers, {pulled['bytes'] / 1e6:.1f} MB in the image, "
        f"{pulled['fetched'] / 1e6:.1f} MB fetched in {pulled['download_seconds']:.2f} s ({rate / 1e6:.1f} MB/s)"
        f"{unpacked}; {pulled['seconds']:.2f} s in all\n"
        f"  layout: {pulled['layout']}\n"
        + (f"  rootfs: {pulled['rootfs']}\n" if pulled["rootfs"] else "")
        + (f"  snapshots: {os.path.dirname(pulled['snapshots'][-1])}\n" if pulled["snapshots"] else "")
        + (f"  shared with process {leader}, which pulled it at the same time\n" if leader is not None else "")
    )


def _pull_key(args: argparse.Namespace) -> str:
    """What makes two ``fastpull pull`` commands identical: their options (paths made absolute;
    not ``-v``, ``--json`` or ``--quiet``, which change only what is written) and the environment
    a pull reads."""
    options = {k: os.path.abspath(v) if k in ("layout", "rootfs", "snapshots", "containerd") and v else v
               for k, v in vars(args).items() if k not in ("func", "verbose", "json", "quiet")}
    environment = {k: os.environ.get(k) for k in _REQUEST_ENVIRONMENT}
    proxies = {k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")}
    return json.dumps([options, environment, proxies], sort_keys=True)


def _cmd_pull(args: argparse.Namespace) -> int:
    """Pull, or join an identical pull already in flight (another process with the same command,
    layout and environment) and report its outcome."""
    from fastpull.cli.singleflight import run_once
    from fastpull.content.defaults import default_store

    args.layout = args.layout or default_store()
    started = False

    def lead() -> Outcome:
        nonlocal started
        started = True
        log_to_stderr(args.verbose, args.quiet)
        return _run_pull(args, args.reference, args.layout, json_lines=args.json, rootfs=args.rootfs,
                         snapshots=args.snapshots, unpack_workers=args.unpack_workers,
                         registries=(args.hosts_dir, args.registries_conf),
                         containerd=(args.containerd, args.namespace) if args.containerd else None)

    if not args.join:
        outcome, leader = lead(), None
    else:
        try:
            outcome, leader = run_once(os.path.join(args.layout, PULL_LOCKS), _pull_key(args), lead,
                                       on_wait=_say_waiting if sys.stderr.isatty() and not args.quiet else None)
        except OSError:
            if started:
                raise
            outcome, leader = lead(), None  # no lock file (unwritable layout...): the pull says what is wrong
    _write_outcome(outcome, leader, json_lines=args.json, quiet=args.quiet)
    return outcome["exit"]


def _say_waiting() -> None:
    print("fastpull: an identical pull is in flight; waiting for it to finish", file=sys.stderr, flush=True)


def _run_pull(args: argparse.Namespace, ref: str, layout: str, *, json_lines: bool = False,
              unpack_workers: int | None = None, registries: tuple[str | None, str | None] = (None, None),
              containerd: tuple[str, str] | None = None, **unpack: str | None) -> Outcome:
    """Pull ``ref`` with the fetch options in ``args``; with ``json_lines`` its events go to stdout
    as they happen, else a progress bar runs on a terminal. ``registries`` are the ``--hosts-dir`` and
    ``--registries-conf`` (None: the system's); ``containerd``, a socket and namespace to import the
    image into (:mod:`fastpull.containerd`).

    The outcome (shared with identical pulls that join this one, whatever they write) holds the
    exit status, the pull's summary events as JSON lines (``resolved``, then ``pulled`` or
    ``error``) as "stdout", and the error line for stderr; :func:`_write_outcome` writes it.
    """
    # The imports make tens of thousands of objects that live as long as the process, and the cyclic
    # collector would walk them again and again while they are made: a few ms of every pull's start-up.
    collecting = gc.isenabled()
    gc.disable()
    try:
        from fastpull.events import Failed, Resolved
        from fastpull.oci.manifest import Platform
        from fastpull.puller import Puller
        from fastpull.registry.hosts import RegistryHosts
    finally:
        if collecting:
            gc.enable()

    def show(event: Event) -> None:
        if isinstance(event, Resolved):  # the pull starts its threads: a stop is a message from now on
            _stop_signals.pull = puller.stop
        output.show(event)

    status, error = 0, ""
    with _Output(f"pulling {ref}", json_lines) as output:
        try:
            hosts = RegistryHosts.load(*registries, insecure=args.insecure_registry)
            with Puller(
                fetch_options(args), insecure_registries=args.insecure_registry,
                platform=Platform.parse(args.platform) if args.platform else None, durable=args.durable,
                unpack_workers=unpack_workers, hosts=hosts,
            ) as puller:
                if containerd is None:
                    puller.pull(ref, layout, events=show, **unpack)
                else:
                    from fastpull.containerd import Containerd, pull_into

                    with Containerd(*containerd) as client:
                        pull_into(puller, ref, layout, client, events=show)
        except FastpullError as exc:
            if not any(e["event"] == Failed.NAME for e in output.summary):
                output.show(Failed.of(exc, ref))  # raised before the pull began
            # A reference is parsed by the pull: a process that joins another imports no parser.
            status, error = ((EXIT_USAGE, f"fastpull pull: error: {exc}\n") if isinstance(exc, InvalidReference)
                             else (EXIT_FAILED, f"fastpull: {exc}\n"))
        finally:
            _stop_signals.pull = None
    return {"exit": status, "stdout": "".join(json.dumps(e) + "\n" for e in output.summary), "stderr": error}


def _write_outcome(outcome: Outcome, leader: int | None, *, json_lines: bool = False, quiet: bool = False) -> None:
    """Write a pull's outcome: as JSON lines if this process did not write them as they happened (it
    joined ``leader``'s pull: its ``pulled`` line says ``shared_with``), or the text report, or with
    ``quiet`` the manifest digest alone; then the error line, if any."""
    for line in outcome["stdout"].splitlines():
        event = json.loads(line)
        if json_lines and leader is not None:
            if event["event"] == "pulled":
                event["shared_with"] = leader
            sys.stdout.write(json.dumps(event) + "\n")
        elif not json_lines and event["event"] == "pulled":
            sys.stdout.write(event["digest"] + "\n" if quiet else _report(event, leader))
    sys.stderr.write(outcome["stderr"])


class _Output:
    """Where a pull's events go: each as a JSON line on stdout (``json_lines``), else the download
    and unpack progress as bars on stderr if it is a terminal (``rich``, imported only then; erased
    when the pull ends, so that the report stands alone). The summary events are kept."""

    SUMMARY = ("resolved", "pulled", "error")

    def __init__(self, description: str, json_lines: bool):
        self.summary: list[dict] = []
        self._json_lines = json_lines
        self._bar = not json_lines and sys.stderr.isatty()
        self._description = description
        self._download = self._unpack = None
        if self._bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                      transient=True)

    def show(self, event: Event) -> None:
        if event.NAME in self.SUMMARY or self._json_lines:
            as_dict = event.to_dict()
            if event.NAME in self.SUMMARY:
                self.summary.append(as_dict)
            if self._json_lines:
                try:
                    sys.stdout.write(json.dumps(as_dict) + "\n")
                    sys.stdout.flush()
                except BrokenPipeError:  # the reader left: the pull goes on, its output to /dev/null
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stdout.fileno())
                    os.close(devnull)
        if self._bar and event.NAME == "progress":
            self._draw(event)

    def _draw(self, p: Progress) -> None:
        if self._download is None:
            self._download = self._progress.add_task(self._description, total=p.total)
        self._progress.update(self._download, completed=p.done)
        if p.unpack_total:
            if self._unpack is None:
                self._unpack = self._progress.add_task("unpacking", total=p.unpack_total)
            self._progress.update(self._unpack, completed=p.unpacked)

    def __enter__(self) -> _Output:
        if self._bar:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar:
            self._progress.stop()


def _cmd_demo(args: argparse.Namespace) -> int:
    """Start a local registry, push a generated image, pull it with fastpull; remove what was built
    unless ``--keep``."""
    import shutil
    import tempfile
    from pathlib import Path

    from fastpull.testbed.images import LayerSpec, build_image, push_image
    from fastpull.testbed.registry import LocalRegistry

    log_to_stderr(args.verbose)
    ours = args.workdir is None or not os.path.exists(args.workdir)  # else only what the demo puts there goes
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastpull-demo-"))
    built = {"image": work / "image", "registry data": work / "registry", "layout": work / "layout"}
    layer_bytes = int(args.size_mb * 1e6 / args.layers)
    try:
        print(f"building a {args.layers}-layer image of {args.size_mb} MB in {built['image']} ...", flush=True)
        image = build_image([LayerSpec(layer_bytes) for _ in range(args.layers)], built["image"])
        with LocalRegistry(built["registry data"] / "storage") as registry:  # its logs go beside the storage
            print(f"registry at {registry.url}; pushing ...", flush=True)
            push_image(registry.url, "demo/big", "latest", image)
            outcome = _run_pull(args, f"{registry.host}/demo/big:latest", str(built["layout"]))
        _write_outcome(outcome, None)
        return outcome["exit"]
    finally:
        if args.keep:
            print("kept: " + ", ".join(f"the {what} in {path}" for what, path in built.items()), flush=True)
        else:
            for path in [work] if ours else built.values():
                shutil.rmtree(path, ignore_errors=True)


BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))), "bench",
                            "bench_bed.py")


def log_to_stderr(verbose: int, quiet: bool = False) -> None:
    """Log warnings (``quiet``: errors only; ``-v``: what the engine does; ``-vv``: each retry) to stderr."""
    import logging

    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level,
                        format="%(levelname)s %(name)s: %(message)s")


def _run_bench(bench_args: list[str]) -> int:
    """Run the far-registry bench of the source tree with ``bench_args`` (its own options)."""
    if not os.path.isfile(BENCH_SCRIPT):
        print(f"fastpull: the bench comes with the source tree; {BENCH_SCRIPT} is missing", file=sys.stderr)
        return 2
    import subprocess

    return subprocess.call([sys.executable, BENCH_SCRIPT, *bench_args])


def build_parser(only_pull: bool = False) -> argparse.ArgumentParser:
    """The command line's parser; ``only_pull``: with the ``pull`` command alone."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            """One line, not the whole usage."""
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    parser = Parser(prog="fastpull", description="Pull OCI/Docker images fast.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="pull an image into an OCI image layout")
    p.add_argument("reference", help="[host[:port]/]name[:tag][@digest]")
    p.add_argument("--layout", help="OCI image layout directory, shared by images (default: the store: "
                   "$FASTPULL_STORE, else /var/lib/fastpull as root, else $XDG_DATA_HOME/fastpull)")
    unpack = p.add_mutually_exclusive_group()
    unpack.add_argument("--rootfs", help="also unpack the image into this (absent or empty) directory")
    unpack.add_argument("--snapshots",
                        help="also unpack each layer into SNAPSHOTS/sha256/<chainid> (overlayfs lower dirs)")
    unpack.add_argument("--containerd", metavar="SOCKET",
                        help="hand the image to the containerd on this socket: its overlayfs snapshots, content "
                             "and image stores, through its API (the layout keeps no image of it)")
    p.add_argument("--namespace", default="k8s.io",
                   help="containerd namespace for --containerd (default k8s.io, CRI's: kubelet sees the image)")
    p.add_argument("--unpack-workers", type=_count, metavar="N", help="unpack worker processes (default: CPUs)")
    p.add_argument("--no-join", dest="join", action="store_false",
                   help="pull even if an identical pull is in flight (default: wait for it and share its "
                        "result); each blob is still fetched once")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="write the pull's events to stdout as JSON lines (resolved, progress, layer, "
                             "then pulled or error), not a report")
    output.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar, warnings or report: the manifest digest on stdout, errors on stderr")
    add_registry_arguments(p)
    add_fetch_arguments(p)
    p.set_defaults(func=_cmd_pull)
    if only_pull:
        return parser

    from fastpull.cli import export, gc, images, login, rm, serve, status

    serve.add_parser(sub)
    login.add_parsers(sub)
    for command in (images, rm, gc, export, status):
        command.add_parser(sub)

    p = sub.add_parser("demo", help="start a local registry, push a generated image, pull it")
    p.add_argument("--size-mb", type=_positive_number, default=300, help="image size in MB (default 300)")
    p.add_argument("--layers", type=_count, default=5)
    p.add_argument("--workdir", help="where the image, registry and layout go (default: a temp dir)")
    p.add_argument("--keep", action="store_true",
                   help="keep the image, registry data and layout (default: removed when the demo ends)")
    add_fetch_arguments(p)
    p.set_defaults(func=_cmd_demo)

    # Listed for --help only: main() hands everything after "bench" to the bench script.
    sub.add_parser("bench", help="far-registry bench against skopeo and containerd (root; see `fastpull bench --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; the exit status is 0, EXIT_FAILED, EXIT_USAGE or 128 + a stopping signal's number."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _run_bench(argv[1:])
    # A pull (the command that runs most, and whose start-up counts) builds its own parser alone.
    command = next((a for a in argv if a not in ("-v", "-vv", "-vvv", "--verbose")), None)
    args = build_parser(only_pull=command == "pull").parse_args(argv)
    with _stop_signals as stop:
        try:
            return args.func(args)
        except FastpullError as exc:
            print(f"fastpull: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except UsageError as exc:
            print(f"fastpull {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:  # raised by the handler, or a stopped pull's Stopped
            return 128 + stop.received[0]


def run() -> NoReturn:
    """The ``fastpull`` program (its console script, and ``python -m fastpull``): :func:`main`, then
    exit with its status.

    The command is done and has said what it had to, so it leaves without finalizing the interpreter
    (tearing down a pull's few hundred modules costs 15-20 ms), unless something may still need the
    exit's own clean-up: worker processes, an event loop, a thread still running, a profiler or a
    coverage tracer that writes at exit; or an output cannot be flushed (the usual exit reports it).
    """
    status = main()
    if not {"multiprocessing", "asyncio"} & sys.modules.keys() and sys.getprofile() is None and sys.gettrace() is None:
        import threading

        if all(t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except OSError:
                pass
            else:
                if "logging" in sys.modules:
                    sys.modules["logging"].shutdown()
                os._exit(status)
    raise SystemExit(status)
