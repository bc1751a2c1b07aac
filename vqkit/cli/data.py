"""``vqkit prepare SPEC -o SET``: parses its arguments and calls ``vqkit.data.prepared``."""

from __future__ import annotations

from pathlib import Path

from vqkit.cli.common import DATA_HELP
from vqkit.data.prepared import prepare


def add_parsers(subparsers) -> None:
    """Register the ``prepare`` subcommand on ``subparsers`` (argparse's add_subparsers())."""
    p = subparsers.add_parser(
        "prepare", help="decode, crop and resize a dataset once into a prepared set that every command "
                        "reads in place as prepared:SET (for sets too large to decode per read or to hold)")
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("-o", "--out", required=True, type=Path, help="the prepared set's folder")
    p.add_argument("--image-size", type=int, help="centre-crop and resize every image to this side")
    p.add_argument("--workers", type=int, help="decoding processes (default: one per CPU; 0: this process)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable files out (listed in the manifest) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared set")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> None:
    result = prepare(args.data, args.out, image_size=args.image_size, workers=args.workers,
                     skip_bad=args.skip_bad, overwrite=args.overwrite, progress=True)
    resumed = f", resumed after {result.resumed} files" if result.resumed else ""
    skipped = f", {result.skipped} unreadable files left out" if result.skipped else ""
    print(f"wrote {result.path}: {result.counts['train']} train and {result.counts['test']} test images "
          f"in {result.seconds:.1f} s{resumed}{skipped}; use it as --data prepared:{result.path}")
