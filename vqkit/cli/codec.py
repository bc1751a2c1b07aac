"""Compression commands: compress, decompress, rd."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vqkit.cli.common import checkpoint_arg
from vqkit.codec.codec import Codec
from vqkit.errors import UsageError
from vqkit.fsutil import atomic_write_text


def _qualities(text: str) -> list[int]:
    try:
        qualities = [int(q) for q in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not all(1 <= q <= 100 for q in qualities):
        raise argparse.ArgumentTypeError(f"qualities run from 1 to 100, got {text}")
    return qualities


def _codec(args) -> Codec:
    return Codec.load(args.run, args.prior, args.checkpoint)


def cmd_compress(args) -> None:
    if not args.prior and not args.uniform:
        raise UsageError("give the prior runs (--prior TOP [--prior LOWER ...], top-first) to code with "
                         "the priors, or --uniform for log2 K bits per code")
    codec = _codec(args)
    mode = "uniform" if args.uniform else "prior"
    out = Path(args.out)
    single = len(args.images) == 1 and out.suffix == ".vq"
    for image in args.images:
        target = out if single else out / (Path(image).stem + ".vq")
        result = codec.compress_file(image, target, mode)
        h = result.header
        print(f"wrote {target}: {len(result.data)} bytes, {8 * len(result.data) / (h.height * h.width):.4f} "
              f"bits per pixel ({mode} coding of {h.num_codes} codes; ideal {result.ideal_bits / 8:.0f} "
              f"payload bytes, header {result.header_bytes})")
        if len(h.levels) > 1:
            print("  progressive: " + ", ".join(
                f"{name} {s.length} bytes (preview from the levels down to it: {result.prefix_bytes(i + 1)} "
                f"bytes, {8 * result.prefix_bytes(i + 1) / (h.height * h.width):.4f} bpp)"
                for i, (name, s) in enumerate(zip((m.name for m in codec.model.config.code_maps()), h.segments))))


def cmd_decompress(args) -> None:
    codec = _codec(args)
    out = Path(args.out)
    single = len(args.files) == 1 and out.suffix.lower() == ".png"
    for path in args.files:
        target = out if single else out / (Path(path).stem + ".png")
        image, levels = codec.decompress_file(path, target, args.levels)
        total = codec.model.num_maps
        preview = "" if levels == total else f", a preview from the top {levels} of its {total} levels (code maps)"
        print(f"wrote {target}: {image.shape[2]}x{image.shape[1]}{preview}")


def cmd_rd(args) -> None:
    from vqkit.codec.rd import QUALITIES, codecs_for, image_files, measure, plot
    codecs = codecs_for(args.runs, args.prior, args.checkpoint)
    files = image_files(args.data)[:args.limit]
    result = measure(codecs, files, args.qualities or QUALITIES)
    print(result.table())
    plot(result, args.out)
    if args.json:
        atomic_write_text(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


def add_parsers(sub) -> None:
    prior_help = ("prior run fitted to RUN's codes, one per level (and residual stage), top-first (repeat); "
                  "the codes are entropy-coded with the priors' conditionals")
    cp = sub.add_parser("compress", help="images to .vq files: codes entropy-coded with the priors")
    cp.add_argument("run", type=Path, help="stage-1 run folder")
    cp.add_argument("images", nargs="+", help="image files (any size)")
    cp.add_argument("--prior", type=Path, action="append", default=[], help=prior_help)
    cp.add_argument("--uniform", action="store_true", help="code every code with log2 K bits (no prior)")
    cp.add_argument("-o", "--out", required=True, help="a .vq file for one image, else a folder")
    checkpoint_arg(cp)
    cp.set_defaults(func=cmd_compress)

    dp = sub.add_parser("decompress", help=".vq files back to PNG images")
    dp.add_argument("run", type=Path, help="the stage-1 run folder the files were made with")
    dp.add_argument("files", nargs="+", help=".vq files")
    dp.add_argument("--prior", type=Path, action="append", default=[],
                    help="the prior runs the files were made with, top-first (repeat)")
    dp.add_argument("--levels", type=int, metavar="N",
                    help="read only the top N levels' bytes of a progressive file (a hierarchy's, or a residual "
                         "model's, whose stages count as levels) and decode a preview from them; default: every "
                         "level (or those a file cut at the end of a level holds)")
    dp.add_argument("-o", "--out", required=True, help="a .png file for one file, else a folder")
    checkpoint_arg(dp)
    dp.set_defaults(func=cmd_decompress)

    rdp = sub.add_parser("rd", help="rate-distortion of .vq files against JPEG and WebP over a folder "
                                   "of images: table and plot")
    rdp.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                    help="stage-1 run folders (one operating point each)")
    rdp.add_argument("--prior", type=Path, action="append", default=[],
                    help="prior run (repeat, top-first per model); each goes to the RUN it was fitted to")
    rdp.add_argument("--data", required=True, type=Path, help="folder of images")
    rdp.add_argument("--limit", type=int, help="only the first N images (in name order)")
    rdp.add_argument("--qualities", type=_qualities,
                    help="JPEG/WebP qualities, comma-separated (default: 13 from 1 to 90, dense at low rates)")
    rdp.add_argument("-o", "--out", required=True, type=Path, help="the plot (PNG)")
    rdp.add_argument("--json", type=Path, help="also write every figure as JSON here")
    checkpoint_arg(rdp)
    rdp.set_defaults(func=cmd_rd)
