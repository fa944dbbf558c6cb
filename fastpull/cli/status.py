"""``fastpull status``: what the node's ``fastpull serve`` is doing, from its status API: the
snapshotter's pulls in flight, the blobs being fetched, the store's size, the upstream hosts' health.

It imports none of the daemon (aiohttp, gRPC, the engine) and asks the daemon directly, never
through ``HTTP_PROXY``: the daemon is on the node."""

from __future__ import annotations

import json
import sys

from fastpull.errors import FastpullError
from fastpull.serve import DEFAULT_LISTEN

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

STATUS_PATH = "/_fastpull/v1/status"
TIMEOUT_S = 10.0
RECENT_ERRORS = 5
"""The last errors the text shows (--json has all the daemon keeps)."""
_UNITS = ("B", "kB", "MB", "GB", "TB")


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="what the node's fastpull serve is doing: pulls in flight, store size, "
                                      "upstream health")
    p.add_argument("--url", type=_url, default=f"http://{DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]}",
                   help="the daemon (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="the status API's JSON object, as the daemon sends it")
    p.set_defaults(func=_cmd_status)


def _url(text: str) -> str:
    import argparse
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        if parts.scheme == "http" and parts.hostname and parts.port != 0:
            return text.rstrip("/")
    except ValueError:  # a port that is no number, or out of range
        pass
    raise argparse.ArgumentTypeError(f"expected http://HOST:PORT, got {text!r}")


def _cmd_status(args: argparse.Namespace) -> int:
    status = read_status(args.url)
    if args.json:
        print(json.dumps(status))
    elif sys.stdout.isatty():
        _print_tables(status, args.url)
    else:
        _print_text(status, args.url)
    return 0


def read_status(url: str) -> dict:
    """The status of the daemon at ``url``; FastpullError, in one line naming ``url``, if none answers."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT_S)
    try:
        connection.request("GET", parts.path + STATUS_PATH)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise FastpullError(f"no fastpull serve answers at {url}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        connection.close()
    if response.status == 200:
        try:
            return json.loads(body)
        except ValueError:
            pass
    raise FastpullError(f"{url} is not fastpull serve: GET {STATUS_PATH} answered {response.status} "
                        f"{response.reason} ({response.getheader('Content-Type')})")


def _summary(status: dict, url: str) -> str:
    size, tripped = status["store_size"], status["tripped_hosts"]
    health = f"{len(tripped)} upstream host(s) skipped for failing" if tripped else "no upstream host failing"
    return (f"fastpull serve at {url}; store {status['store']}: {_size(size['total'])} (blobs {_size(size['blobs'])}, "
            f"unpacked layers {_size(size['layers'])}); {health}")


def _sections(status: dict) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """(title, column names, rows) of each table."""
    import time

    pulls = [(p["image"], f"{p['layers']}/{p['layers_total']}", f"{_size(p['bytes'])} / {_size(p['bytes_total'])}",
              f"{_size(p['bytes_per_second'])}/s", str(p["waiting"]), p["into"]) for p in status["pulls"]]
    blobs = [(f"{b['registry']}/{b['repository']}@{b['digest'][:19]}", f"{_size(b['bytes'])} / {_size(b['size'])}",
              f"{_size(b['bytes_per_second'])}/s", str(b["clients"])) for b in status["inflight"]]
    hosts = [(h["host"], f"{h['retry_in']:.0f} s", h["error"]) for h in status["tripped_hosts"]]
    errors = [(time.strftime("%H:%M:%S", time.localtime(e["time"])), e["kind"], e["message"])
              for e in status["errors"][-RECENT_ERRORS:]]
    return [("pulls in flight", ("IMAGE", "LAYERS", "BYTES", "SPEED", "WAITING", "INTO"), pulls),
            ("blobs in flight", ("BLOB", "BYTES", "SPEED", "CLIENTS"), blobs),
            ("upstream hosts skipped", ("HOST", "TRIED AGAIN IN", "FAILURE"), hosts),
            ("recent errors", ("TIME", "KIND", "MESSAGE"), errors)]


def _print_tables(status: dict, url: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, highlight=False)  # names and messages are shown as they are
    console.print(_summary(status, url))
    for title, columns, rows in _sections(status):
        if not rows:
            console.print(f"{title}: none")
            continue
        table = Table(title=title, title_justify="left")
        for i, column in enumerate(columns):  # names and messages whole, folded; the numbers on one line
            table.add_column(column, overflow="fold", no_wrap=0 < i < len(columns) - 1)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def _print_text(status: dict, url: str) -> None:
    """Plain lines: each section's title, then its rows in aligned columns (the last one free)."""
    lines = [_summary(status, url)]
    for title, columns, rows in _sections(status):
        lines.append(f"{title}: {len(rows) or 'none'}")
        if rows:
            widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns) - 1)]
            lines += ["  " + "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]])
                      for row in [columns, *rows]]
    print("\n".join(lines))


def _size(n: float) -> str:
    """``n`` bytes in decimal units, as the other commands show them."""
    unit = 0
    while n >= 1000 and unit < len(_UNITS) - 1:
        n, unit = n / 1000, unit + 1
    return f"{n:.1f} {_UNITS[unit]}" if unit else f"{n:.0f} B"
