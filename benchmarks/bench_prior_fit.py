"""Does a prior generalise? Train priors that differ in one setting on the same code set for the
same number of steps, and print for each the held-out NLL at its best checkpoint (the step it
was reached at), at the last step, and the training loss at the end: a prior whose last
held-out NLL is far above its best one, or whose training loss is far below it, memorised.

    vqkit extract RUN -o CODES [--flip]
    python benchmarks/bench_prior_fit.py CODES --conditional --steps 3000 \\
        --variant dropout=0 --variant dropout=0.25 --variant channels=32,dropout=0.25

Each variant is ``field=value[,field=value...]`` over PriorConfig's sizes (channels, layers,
dropout, ...) and PriorTrainConfig's training settings (lr, schedule, batch_size, seed,
average_decay: 0 measures the trained weights rather than their running average); ``default`` is the sizes
``prior_config_for`` picks for the code set. Runs go under --out (default: a folder in /tmp).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from vqkit.prior import PriorConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import load_codes
from vqkit.training.prior import PriorTrainConfig, prior_config_for, train_prior

_SCHEDULE = {"lr": float, "batch_size": int, "seed": int, "average_decay": float, "schedule": str}


def _parse(variant: str) -> tuple[dict, dict]:
    sizes, schedule = {}, {}
    if variant == "default":
        return sizes, schedule
    types = {f: type(v) for f, v in PriorConfig().to_dict().items()}
    for item in variant.split(","):
        name, _, value = item.partition("=")
        if name in _SCHEDULE:
            schedule[name] = _SCHEDULE[name](value)
        elif name in types:
            sizes[name] = value if types[name] is str else (float(value) if types[name] is float else int(value))
        else:
            raise SystemExit(f"unknown setting {name!r} in --variant {variant!r}")
    return sizes, schedule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("codes", type=Path, help="code set written by vqkit extract")
    p.add_argument("--val-codes", type=Path, help="held-out code set (default: the last 5%% of CODES)")
    p.add_argument("--variant", action="append", default=[], help="field=value[,...] (repeat); or 'default'")
    p.add_argument("--conditional", action="store_true")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="vqkit-prior-fit-"))
    codes = load_codes(args.codes)
    rows = []
    for index, variant in enumerate(args.variant or ["default"]):
        sizes, schedule = _parse(variant)
        config = PriorTrainConfig(codes=str(args.codes), val_codes=str(args.val_codes) if args.val_codes else None,
                                  steps=args.steps, eval_every=args.eval_every, patience=0,
                                  checkpoint_every=10**9, **{"lr": args.lr, "batch_size": args.batch_size,
                                                             **schedule})
        prior_config = prior_config_for(codes, sizes.pop("arch", "pixelsnail"), args.conditional, **sizes)
        run = out / f"{index:02d}"
        result = train_prior(run, prior_config, config, progress=False, tensorboard=False)
        history = ckpt.read_validation(run)["history"]
        row = {"variant": variant, "channels": prior_config.channels, "layers": prior_config.layers,
               "dropout": prior_config.dropout, "steps": result.step, "seconds": round(result.seconds, 1),
               "best": result.best_value, "best_step": result.best_step, "last": history[-1][1],
               "train_loss_bits": result.last_loss / torch.log(torch.tensor(2.0)).item(), "run": str(run)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{codes.images} images ({len(codes)} maps{', with mirrors' if codes.flipped else ''}), "
          f"K={codes.codebook_size}, log2 K = {torch.log2(torch.tensor(float(codes.codebook_size))):.3f} bits")
    print(f"{'variant':<34} {'steps':>6} {'s':>6} {'best':>7} {'at':>6} {'last':>7} {'train':>7}")
    for r in rows:
        print(f"{r['variant']:<34} {r['steps']:>6} {r['seconds']:>6.0f} {r['best']:>7.3f} {r['best_step']:>6} "
              f"{r['last']:>7.3f} {r['train_loss_bits']:>7.3f}")


if __name__ == "__main__":
    main()
