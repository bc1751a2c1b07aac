"""``vqkit demo``: both stages on Fashion-MNIST (see vqkit.training.demo)."""

from __future__ import annotations

import inspect

from vqkit.training.demo import run_demo

# The demo's defaults are run_demo's own.
_DEFAULTS = {name: p.default for name, p in inspect.signature(run_demo).parameters.items()}


def cmd_demo(args) -> None:
    run_demo(args.out, data=args.data, steps=args.steps, lr=args.lr, time_budget=args.time_budget,
             resume=args.resume, prior_steps=args.prior_steps, prior_time_budget=args.prior_time_budget)


def add_parsers(sub) -> None:
    m = sub.add_parser("demo", help="train a small VQ-VAE on Fashion-MNIST and show reconstructions")
    m.add_argument("--data", help="Fashion-MNIST folder (IDX files); default: search, then the embedded sample")
    m.add_argument("-o", "--out", default=_DEFAULTS["out"], help="run folder (default %(default)s)")
    m.add_argument("--steps", type=int, default=_DEFAULTS["steps"])
    m.add_argument("--lr", type=float, default=_DEFAULTS["lr"])
    m.add_argument("--time-budget", type=float, default=_DEFAULTS["time_budget"],
                   help="seconds (default %(default)g)")
    m.add_argument("--resume", action="store_true")
    m.add_argument("--prior-steps", type=int, default=_DEFAULTS["prior_steps"])
    m.add_argument("--prior-time-budget", type=float, default=_DEFAULTS["prior_time_budget"],
                   help="seconds for the prior (default %(default)g; 0 skips stage 2)")
    m.set_defaults(func=cmd_demo)
