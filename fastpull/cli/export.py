"""``fastpull export``: an image of the store as an OCI archive (:mod:`fastpull.content.export`)."""

from __future__ import annotations

from fastpull.cli.store import add_layout_argument, image_name, open_layout, store_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write an image as an OCI archive (for skopeo, podman load, docker load, "
                                      "ctr images import)")
    p.add_argument("reference", metavar="REF", help="an image name as `fastpull images` lists it, or a reference")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive to write (replaced if it exists)")
    add_layout_argument(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastpull.cli.main import UsageError
    from fastpull.content.export import export_archive
    from fastpull.content.layout import ImageNotFound
    from fastpull.errors import InvalidReference

    root = store_root(args)
    layout = open_layout(root)
    try:
        name = image_name(layout, args.reference)
    except InvalidReference as e:
        raise UsageError(str(e)) from None
    if layout is None:
        raise ImageNotFound(Path(root), name)
    size = export_archive(layout, name, args.output)
    print(f"exported {name} to {args.output} ({size / 1e6:.1f} MB)")
    return 0
