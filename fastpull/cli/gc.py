"""``fastpull gc``: remove what no image, running pull or ``fastpull serve`` uses (:mod:`fastpull.content.gc`)."""

from __future__ import annotations

from fastpull.cli.store import add_layout_argument, open_layout, store_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("gc", help="remove blobs, partial downloads and temporary trees that nothing uses")
    add_layout_argument(p)
    p.set_defaults(func=_cmd_gc)


def _cmd_gc(args: argparse.Namespace) -> int:
    import os

    from fastpull.cli.main import PULL_LOCKS
    from fastpull.cli.singleflight import forget_finished
    from fastpull.content.gc import collect
    from fastpull.puller import remove_tree

    root = store_root(args)
    layout = open_layout(root)
    if layout is None:
        print(f"nothing to collect: no store at {root}")
        return 0
    done = collect(layout, remove_tree=remove_tree)
    for digest, size in done.blobs:
        print(f"removed blob {digest} ({size / 1e6:.1f} MB)")
    for digest, size in done.ingests:
        print(f"removed partial download of {digest} ({size / 1e6:.1f} MB)")
    for tree in done.trees:
        print(f"removed temporary tree {tree}")
    records = forget_finished(os.path.join(layout.root, PULL_LOCKS))
    print(f"freed {done.freed_bytes / 1e6:.1f} MB: {len(done.blobs)} blobs, {len(done.ingests)} partial downloads, "
          f"{len(done.trees)} temporary trees, {done.temp_files} temporary files, {done.leases} leases of dead "
          f"processes, {records} pull records")
    return 0
