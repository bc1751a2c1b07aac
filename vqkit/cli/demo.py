"""``vqkit demo``: both stages on Fashion-MNIST (see vqkit.train.demo)."""

from __future__ import annotations

from vqkit.train.demo import run_demo


def cmd_demo(args) -> None:
    run_demo(args.out, data=args.data, steps=args.steps, lr=args.lr, time_budget=args.time_budget,
             resume=args.resume, prior_steps=args.prior_steps, prior_time_budget=args.prior_time_budget)


def add_parsers(sub) -> None:
    m = sub.add_parser("demo", help="train a small VQ-VAE on Fashion-MNIST and show reconstructions")
    m.add_argument("--data", help="Fashion-MNIST folder (IDX files); default: search, then the embedded sample")
    m.add_argument("-o", "--out", default="runs/demo", help="run folder (default runs/demo)")
    m.add_argument("--steps", type=int, default=3000)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--time-budget", type=float, default=180.0, help="seconds (default 180)")
    m.add_argument("--resume", action="store_true")
    m.add_argument("--prior-steps", type=int, default=3000)
    m.add_argument("--prior-time-budget", type=float, default=180.0,
                   help="seconds for the prior (default 180; 0 skips stage 2)")
    m.set_defaults(func=cmd_demo)
