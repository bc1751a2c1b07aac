"""``vqkit export RUN -o DIR``: parses its arguments and calls ``vqkit.runs.export``."""

from __future__ import annotations

from pathlib import Path

from vqkit.nn.pretrained import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from vqkit.runs.export import export_run


def add_parsers(subparsers) -> None:
    """Register the ``export`` subcommand on ``subparsers`` (argparse's add_subparsers())."""
    ex = subparsers.add_parser(
        "export", help="a run's latest checkpoint as a shareable model folder (config.json, "
                       "model.safetensors, README.md model card) for from_pretrained and the Hugging Face Hub")
    ex.add_argument("run", type=Path, help="run folder written by vqkit train or vqkit train-prior")
    ex.add_argument("-o", "--out", required=True, type=Path, help="the model folder to write (new or empty)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace an existing model folder (one holding only the files export writes)")
    ex.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    out = export_run(args.run, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {CONFIG_NAME}, {WEIGHTS_NAME} and {CARD_NAME} from {args.run}'s latest checkpoint")
