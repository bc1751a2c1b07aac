"""Stage-2 commands: train-prior, sample."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vqkit import distributed
from vqkit.cli.args import add_config_args, config_args, config_from_args
from vqkit.cli.common import RUN_CHOICES, announce_placement, checkpoint_arg, device_arg, distributed_args
from vqkit.data.images import make_grid, save_png, side_by_side
from vqkit.errors import UsageError
from vqkit.precision import resolve_device
from vqkit.prior import PriorConfig
from vqkit.prior.config import ARCHS
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import load_codes
from vqkit.runs.generate import (
    LevelPrior,
    chain_codes,
    check_chain,
    decode_codes,
    load_checked_classifier,
    reject_codes,
    uniform_chain_codes,
    vae_samples,
)
from vqkit.training.prior import (
    SIZED_BY_MAPS,
    PriorTrainConfig,
    evaluate_prior,
    load_cond,
    prior_config_for,
    split_indices,
    train_prior,
)

# PriorConfig's fields that the data decide (K, the map shape, the conditioning maps; the classes
# through --conditional); the rest are the user's choice of model.
_FROM_DATA = ("codebook_size", "height", "width", "num_classes", "cond_channels", "cond_codes")


def cmd_train_prior(args) -> None:
    codes = load_codes(args.codes)
    config = config_from_args(PriorTrainConfig, args)
    _, val, val_idx = split_indices(codes, config)
    cond, val_cond = load_cond(config, codes, val)
    if args.resume and (Path(args.out) / "config.json").exists():
        prior_config = PriorConfig.from_dict(ckpt.read_config(args.out, kind="prior")["model"])
    else:
        # The sizes left unset follow the number of maps (prior_sizes).
        sizes = {k: v for k, v in config_args(PriorConfig, args).items() if v is not None}
        prior_config = prior_config_for(codes, sizes.pop("arch"), args.conditional, cond, **sizes)
        chosen = [f"{name} {getattr(prior_config, name)}" for name in SIZED_BY_MAPS if name not in sizes]
        if chosen and distributed.is_main():
            print(f"{', '.join(chosen)}: the sizes for a code set of {len(codes)} maps (set them with "
                  f"{', '.join('--' + name for name in SIZED_BY_MAPS)})")
    announce_placement(config)
    result = train_prior(args.out, prior_config, config, resume=args.resume,
                         tensorboard=not args.no_tensorboard)
    if not distributed.is_main():
        return
    prior, _ = ckpt.load_prior(args.out)
    stop = " (stopped early: no better held-out NLL)" if result.stopped_early else ""
    best = f"; best checkpoint: step {result.best_step}" if result.best_step is not None else ""
    print(f"step {result.step} in {result.seconds:.0f} s{stop}{best}; "
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
    if ckpt.run_kind(args.runs[0]) == "vae":
        return _sample_vae(args)
    device = resolve_device(args.device)
    chain = [LevelPrior.load(run, args.checkpoint, device) for run in args.runs]
    model = check_chain(chain)
    nrow = args.nrow or max(1, int(round(args.n ** 0.5)))
    # The labels follow the first class-conditional prior (the top one, when it is).
    labelled = next((link.run_config for link in chain if link.prior.config.num_classes), chain[0].run_config)
    labels, nrow = _class_labels(args.class_, args.n, nrow, labelled)
    n = len(labels) if labels is not None else args.n
    if args.reject is not None:
        codes = _rejection(args, chain, model, labels)
    else:
        codes = chain_codes(chain, n, labels, args.temperature, args.top_k, args.top_p, args.seed)
    grid = make_grid(decode_codes(model, codes), nrow=nrow)
    if args.compare_uniform:
        uniform = make_grid(decode_codes(model, uniform_chain_codes(chain, n, args.seed)), nrow=nrow)
        grid = side_by_side(uniform, grid)
    save_png(grid, args.out)
    what = "uniform prior (left) beside the fitted prior (right)" if args.compare_uniform else "samples"
    steps = ", ".join(f"{link.run.name} at step {link.checkpoint.step}" for link in chain)
    print(f"wrote {args.out}: {len(codes[0])} {what} ({args.checkpoint} checkpoint: {steps})")


def _sample_vae(args) -> None:
    if len(args.runs) > 1 or args.class_ or args.reject is not None or args.compare_uniform:
        raise UsageError(f"{args.runs[0]} is a Gaussian VAE run: it samples from N(0, I) alone (one run; "
                         "no --class, --reject or --compare-uniform)")
    images = vae_samples(args.runs[0], args.n, args.seed)
    save_png(make_grid(images, nrow=args.nrow or max(1, int(round(args.n ** 0.5)))), args.out)
    print(f"wrote {args.out}: {len(images)} samples of z ~ N(0, I), decoded")


def _rejection(args, chain, model, labels) -> list[torch.Tensor]:
    if args.classifier is None:
        raise UsageError("--reject needs the classifier that judges the samples (--classifier RUN)")
    if labels is None:
        raise UsageError("--reject keeps samples the classifier assigns to their class; it needs a "
                         "class-conditional prior (train-prior --conditional)")
    classifier = load_checked_classifier(args.classifier, model, chain)
    kept = reject_codes(chain, model, classifier, labels, args.reject, args.temperature, args.top_k, args.top_p,
                        args.seed, max_draws=args.max_draws)
    print(kept.summary(args.reject))
    if not kept.complete:
        print(f"vqkit: warning: only {kept.kept} of {kept.wanted} samples reached the threshold within "
              f"{kept.drawn} draws; lower --reject or raise --max-draws", file=sys.stderr)
    return kept.codes


def add_parsers(sub) -> None:
    tp = sub.add_parser("train-prior", help="fit an autoregressive prior to extracted codes (stage 2)")
    tp.add_argument("-o", "--out", required=True, type=Path, help="prior run folder")
    add_config_args(tp, PriorTrainConfig, positional=["codes"],
                    flags={"cond_codes": "--cond", "val_cond_codes": "--val-cond"},
                    choices=RUN_CHOICES)
    model = tp.add_argument_group("the prior's model (with --resume, the run's own)")
    add_config_args(model, PriorConfig, exclude=_FROM_DATA, choices={"arch": ARCHS},
                    unset=dict.fromkeys(SIZED_BY_MAPS, "by the number of training maps, printed when training starts"))
    model.add_argument("--conditional", action="store_true", help="class-conditional prior")
    tp.add_argument("--resume", action="store_true")
    tp.add_argument("--no-tensorboard", action="store_true")
    distributed_args(tp)
    tp.set_defaults(func=cmd_train_prior)

    sm = sub.add_parser("sample", help="sample codes from a prior (for a VQ-VAE-2, a prior per level) "
                                       "and decode them to images")
    sm.add_argument("runs", nargs="+", type=Path, metavar="PRIOR",
                    help="prior run folder written by vqkit train-prior; for a VQ-VAE-2 one per level, "
                         "top-first (TOP [MIDDLE] BOTTOM), each lower one conditioned on the levels above (a "
                         "residual level: one per stage, each conditioned on the stages above); or a Gaussian "
                         "VAE run, which samples its own prior N(0, I)")
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
    checkpoint_arg(sm)
    sm.add_argument("--reject", type=float, metavar="P",
                    help="classifier-based rejection sampling: keep only samples that --classifier assigns "
                         "to their class with probability >= P, drawing more until n are kept")
    sm.add_argument("--classifier", type=Path, metavar="RUN", help="classifier run (vqkit train-classifier)")
    sm.add_argument("--max-draws", type=int, help="with --reject, draw at most this many samples (default: 20 n)")
    device_arg(sm)
    sm.set_defaults(func=cmd_sample)
