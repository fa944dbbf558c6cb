"""``fastpull rm``: untag images (``fastpull gc`` then frees the blobs nothing else uses)."""

from __future__ import annotations

import sys

from fastpull.cli.store import add_layout_argument, image_name, open_layout, store_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("rm", help="remove images' names from the store (`fastpull gc` frees their blobs)")
    p.add_argument("references", nargs="+", metavar="REF", help="an image name as `fastpull images` lists it, "
                   "or a reference as given to `fastpull pull`")
    add_layout_argument(p)
    p.set_defaults(func=_cmd_rm)


def _cmd_rm(args: argparse.Namespace) -> int:
    """Untag each name; every unknown one is a line on stderr and exit status 1 (the others go)."""
    from fastpull.cli.main import EXIT_FAILED, UsageError
    from fastpull.errors import InvalidReference

    root = store_root(args)
    layout = open_layout(root)
    try:
        names = [image_name(layout, text) for text in args.references]
    except InvalidReference as e:  # before anything is removed
        raise UsageError(str(e)) from None
    status = 0
    for name in dict.fromkeys(names):
        if layout is not None and layout.untag(name):
            print(f"untagged {name}")
        else:
            print(f"fastpull rm: no image named {name} in {root}", file=sys.stderr)
            status = EXIT_FAILED
    return status
