"""Stage-2 commands: train-prior, sample."""

from __future__ import annotations

from pathlib import Path

import torch

from vqkit import distributed
from vqkit.cli.common import distributed_args, placement, placement_args
from vqkit.data.images import make_grid, save_png, side_by_side
from vqkit.errors import UsageError
from vqkit.prior import PriorConfig
from vqkit.prior.config import ARCHS
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import load_codes
from vqkit.runs.generate import LevelPrior, chain_codes, check_chain, decode_codes, uniform_chain_codes
from vqkit.train.prior import (
    PriorTrainConfig,
    evaluate_prior,
    load_cond,
    prior_config_for,
    split_indices,
    train_prior,
)


def cmd_train_prior(args) -> None:
    codes = load_codes(args.codes)
    config = PriorTrainConfig(codes=str(args.codes), val_codes=args.val_codes,
                              cond_codes=[str(p) for p in args.cond],
                              val_cond_codes=[str(p) for p in args.val_cond], steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              time_budget=args.time_budget, checkpoint_every=args.checkpoint_every,
                              **placement(args))
    _, val, val_idx = split_indices(codes, config)
    cond, val_cond = load_cond(config, codes, val)
    if args.resume and (Path(args.out) / "config.json").exists():
        prior_config = PriorConfig.from_dict(ckpt.read_config(args.out, kind="prior")["model"])
    else:
        prior_config = prior_config_for(codes, args.arch, args.conditional, cond, channels=args.channels,
                                        layers=args.layers)
    result = train_prior(args.out, prior_config, config, resume=args.resume,
                         tensorboard=not args.no_tensorboard)
    if not distributed.is_main():
        return
    prior, _ = ckpt.load_prior(args.out)
    print(f"step {result.step} in {result.seconds:.0f} s; "
          f"{evaluate_prior(prior, val, val_idx, cond=val_cond).summary()}")


def _class_labels(value: str | None, n: int, nrow: int, config: dict) -> tuple[torch.Tensor | None, int]:
    num_classes = config["model"].get("num_classes")
    if value is None:
        if num_classes:
            return torch.arange(n) % num_classes, nrow
        return None, nrow
    if not num_classes:
        raise UsageError("--class needs a class-conditional prior (train-prior --conditional)")
    if value == "all":  # one row of n samples per class
        return torch.arange(num_classes).repeat_interleave(n), n
    names = (config.get("source") or {}).get("class_names") or []
    label = names.index(value) if value in names else int(value) if value.isdigit() else -1
    if not 0 <= label < num_classes:
        raise UsageError(f"--class {value!r}: choose 0..{num_classes - 1}, a class name or 'all'")
    return torch.full((n,), label), nrow


def cmd_sample(args) -> None:
    chain = [LevelPrior.load(run) for run in args.runs]
    model = check_chain(chain)
    nrow = args.nrow or max(1, int(round(args.n ** 0.5)))
    # The labels follow the first class-conditional prior (the top one, when it is).
    labelled = next((link.run_config for link in chain if link.prior.config.num_classes), chain[0].run_config)
    labels, nrow = _class_labels(args.class_, args.n, nrow, labelled)
    n = len(labels) if labels is not None else args.n
    codes = chain_codes(chain, n, labels, args.temperature, args.top_k, args.top_p, args.seed)
    grid = make_grid(decode_codes(model, codes), nrow=nrow)
    if args.compare_uniform:
        uniform = make_grid(decode_codes(model, uniform_chain_codes(chain, n, args.seed)), nrow=nrow)
        grid = side_by_side(uniform, grid)
    save_png(grid, args.out)
    what = "uniform prior (left) beside the fitted prior (right)" if args.compare_uniform else "samples"
    print(f"wrote {args.out}: {n} {what}")


def add_parsers(sub) -> None:
    tp = sub.add_parser("train-prior", help="fit an autoregressive prior to extracted codes (stage 2)")
    tp.add_argument("codes", type=Path, help="code set written by vqkit extract (for a VQ-VAE-2, "
                                              "one level's: CODES/top, CODES/bottom, ...)")
    tp.add_argument("--cond", type=Path, action="append", default=[],
                    help="VQ-VAE-2: condition the prior on this code set of a level above CODES, "
                         "from the same extraction; repeat top-first (--cond CODES/top --cond "
                         "CODES/middle); the top prior takes none")
    tp.add_argument("-o", "--out", required=True, type=Path, help="prior run folder")
    tp.add_argument("--arch", choices=ARCHS, default="pixelsnail")
    tp.add_argument("--conditional", action="store_true", help="class-conditional prior")
    tp.add_argument("--channels", type=int, default=64)
    tp.add_argument("--layers", type=int, default=6)
    tp.add_argument("--val-codes", help="held-out code set (default: the last 5%% of CODES)")
    tp.add_argument("--val-cond", type=Path, action="append", default=[],
                    help="the held-out code set of each --cond level (with --val-codes), same order")
    tp.add_argument("--steps", type=int, default=5000)
    tp.add_argument("--batch-size", type=int, default=32)
    tp.add_argument("--lr", type=float, default=3e-4)
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--time-budget", type=float, help="stop after this many seconds (and save)")
    tp.add_argument("--checkpoint-every", type=int, default=1000)
    tp.add_argument("--resume", action="store_true")
    tp.add_argument("--no-tensorboard", action="store_true")
    placement_args(tp)
    distributed_args(tp)
    tp.set_defaults(func=cmd_train_prior)

    sm = sub.add_parser("sample", help="sample codes from a prior (for a VQ-VAE-2, a prior per level) "
                                       "and decode them to images")
    sm.add_argument("runs", nargs="+", type=Path, metavar="PRIOR",
                    help="prior run folder written by vqkit train-prior; for a VQ-VAE-2 one per level, "
                         "top-first (TOP [MIDDLE] BOTTOM), each lower one conditioned on the levels above")
    sm.add_argument("-n", type=int, default=64)
    sm.add_argument("-o", "--out", required=True, type=Path, help="PNG grid")
    sm.add_argument("--class", dest="class_",
                    help="a class index or name, or 'all' for one row of n samples per class")
    sm.add_argument("--temperature", type=float, default=1.0)
    sm.add_argument("--top-k", type=int)
    sm.add_argument("--top-p", type=float)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--nrow", type=int)
    sm.add_argument("--compare-uniform", action="store_true",
                    help="put samples of the uniform prior (every level uniform; left) beside the "
                         "fitted priors' (right)")
    sm.set_defaults(func=cmd_sample)
