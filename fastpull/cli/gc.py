"""``fastpull gc``: remove what no image, running pull, snapshot or ``fastpull serve`` uses
(:mod:`fastpull.content.gc`; the unpacked layers, :meth:`fastpull.unpack.snapshots.Snapshotter.sweep`)."""

from __future__ import annotations

from fastpull.cli.store import add_layout_argument, open_layout, store_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("gc", help="remove blobs, unpacked layers, partial downloads and temporary trees that "
                                  "nothing uses")
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
    done = collect(layout, remove_tree=remove_tree, sweep_layers=_layer_sweeper(layout.root))
    for digest, size in done.blobs:
        print(f"removed blob {digest} ({size / 1e6:.1f} MB)")
    for digest, size in done.ingests:
        print(f"removed partial download of {digest} ({size / 1e6:.1f} MB)")
    for chain_id, size in done.layers:
        print(f"removed unpacked layer {chain_id} ({size / 1e6:.1f} MB)")
    for tree in done.trees:
        print(f"removed temporary tree {tree}")
    records = forget_finished(os.path.join(layout.root, PULL_LOCKS))
    print(f"freed {done.freed_bytes / 1e6:.1f} MB: {len(done.blobs)} blobs, {len(done.layers)} layers, "
          f"{len(done.ingests)} partial downloads, "
          f"{len(done.trees)} temporary trees, {done.temp_files} temporary files, {done.leases} leases of dead "
          f"processes, {records} pull records")
    return 0


def _layer_sweeper(root):
    """Removes the store's unpacked layers that neither the images and leases (the ChainIDs it is
    given) nor a snapshot of ``fastpull serve --snapshotter`` uses; None if there are none. The
    snapshots are read again for each layer, under its lock: the daemon may commit one meanwhile."""
    from pathlib import Path

    from fastpull.content.defaults import LAYER_CACHE, SNAPSHOTTER_STATE
    from fastpull.snapshotter.metadata import MetaStore
    from fastpull.snapshotter.overlay import METADATA_FILE
    from fastpull.unpack.snapshots import Snapshotter

    if not (Path(root) / LAYER_CACHE).is_dir():
        return None
    metadata = Path(root) / SNAPSHOTTER_STATE / METADATA_FILE

    def sweep(images: set[str]) -> list[tuple[str, int]]:
        if not metadata.exists():
            return Snapshotter(Path(root) / LAYER_CACHE).sweep(images.__contains__)
        db = MetaStore(metadata)
        try:
            def in_use(chain_id: str) -> bool:
                if chain_id in images:
                    return True
                with db.read() as tx:
                    return chain_id in tx.chains()
            return Snapshotter(Path(root) / LAYER_CACHE).sweep(in_use)
        finally:
            db.close()

    return sweep
