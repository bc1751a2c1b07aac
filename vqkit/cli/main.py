"""The ``vqkit`` command: parses arguments and calls the library; no logic of its own.

``build_parser`` assembles the command groups, one module each (``data``, ``stage1``, ``prior``, ``score``, ``codec``,
``inspect``, ``demo``, ``export``), every one with ``add_parsers(subparsers)``; ``main`` runs the chosen
command and turns a VqkitError or OSError into one ``vqkit: error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

import torch

from vqkit import __version__, distributed
from vqkit.cli import codec, data, demo, export, inspect, prior, score, stage1
from vqkit.errors import VqkitError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqkit", description="VQ-VAE: discrete latent image models")
    p.add_argument("--version", action="version", version=f"vqkit {__version__}")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    data.add_parsers(sub)
    stage1.add_parsers(sub)
    prior.add_parsers(sub)
    codec.add_parsers(sub)
    inspect.add_parsers(sub)
    demo.add_parsers(sub)
    export.add_parsers(sub)
    score.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        print(f"vqkit: error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    if nproc > 1 and not distributed.launched():
        return distributed.launch(nproc, _without_nproc(argv))
    try:
        if distributed.launched() and hasattr(args, "dist_timeout"):
            distributed.setup(timeout=args.dist_timeout, device=getattr(args, "device", "auto"))
        args.func(args)
        distributed.shutdown()
    except (VqkitError, OSError) as e:
        print(f"vqkit: error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not distributed.active():
            raise
        # torchrun ends the other processes; name this one and its error last, in one line.
        if distributed.lost_peers(e):
            print(f"vqkit: error: rank {distributed.rank()} stopped: the other processes stopped "
                  f"answering (the rank that failed first names its error) [{str(e).splitlines()[0]}]",
                  file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"vqkit: error: {_rank_prefix()}{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vqkit: interrupted (nothing half-written is left behind)", file=sys.stderr)
        return 130
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N``: the launched processes know their number from torchrun,
    whose own parser would take ``--nproc`` for an abbreviation of ``--nproc-per-node``."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
        elif arg == "--nproc":
            skip = True
        else:
            out.append(arg)
    return out


def _rank_prefix() -> str:
    return f"rank {distributed.rank()} failed: " if distributed.active() else ""


if __name__ == "__main__":
    sys.exit(main())
