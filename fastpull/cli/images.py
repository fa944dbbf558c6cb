"""``fastpull images``: the images of a layout (name, digest, size, when pulled)."""

from __future__ import annotations

import json
import sys

from fastpull.cli.store import add_layout_argument, open_layout, store_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("images", help="list the images of the store (or of a layout)")
    add_layout_argument(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per image per line: name, digest, mediaType, size (bytes), pulledAt")
    p.set_defaults(func=_cmd_images)


def _cmd_images(args: argparse.Namespace) -> int:
    from fastpull.content.layout import PULLED_AT

    root = store_root(args)
    layout = open_layout(root)
    rows = []
    for name, desc in layout.images() if layout is not None else []:
        size = sum(d.size for d in layout.references(desc))
        rows.append({"name": name, "digest": desc.digest, "mediaType": desc.media_type, "size": size,
                     "pulledAt": desc.annotations.get(PULLED_AT)})
    if args.json:
        sys.stdout.writelines(json.dumps(row) + "\n" for row in rows)
        return 0
    table = [("NAME", "DIGEST", "SIZE", "PULLED AT")]
    table += [(r["name"], r["digest"][:19], f"{r['size'] / 1e6:.1f} MB", r["pulledAt"] or "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return 0
