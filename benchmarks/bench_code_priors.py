"""What a stage-1 run's codes cost under priors of a fixed training budget: extract its training
and test codes, fit one prior per code map top-first, each conditioned on every map above it (a
residual level's stage s on the stages before it, a lower level on the levels above), and report
each map's held-out bits per code on the test codes, the bits of an image's codes, and the run's
bits/dim on the test images with each map's uniform log K replaced by its prior's NLL.

    python benchmarks/bench_code_priors.py RUN --budget 300 --threads 1
    python benchmarks/bench_code_priors.py runs/vq1024 runs/rvq2x32 --budget 300 --threads 1

The budget is the priors' wall time in all, split equally between a run's maps, so that a run of
one map and a run of several get the same prior compute (one torch thread by default: run it on
a quiet machine, or read the step counts beside the figures). Several runs are measured one after
the other, in the order given. The codes and priors are kept under --work.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from vqkit.data.datasets import load_dataset
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import extract_codes
from vqkit.training.evaluate import evaluate
from vqkit.training.prior import PriorTrainConfig, evaluate_prior, prior_config_for, train_prior


def measure(run: Path, work: Path, args) -> dict:
    """One run's figures (see the module docstring); its codes and priors go under ``work``."""
    model, checkpoint = ckpt.load_model(run)
    train = ckpt.read_config(run)["train"]
    datasets, sets = {}, {}
    for split in ("train", "test"):
        datasets[split] = data = load_dataset(train["data"], split, image_size=train.get("image_size"))
        source = {"run": str(run.resolve()), "step": checkpoint.step,
                  "fingerprint": checkpoint.state.get("fingerprint"), "data": data.spec, "split": split}
        sets[split] = extract_codes(model, data, work / f"codes-{split}", source=source, progress=False,
                                    overwrite=True)
    code_maps = model.config.code_maps()
    test = datasets["test"]
    stage1 = evaluate(model, test, limit=args.limit)
    maps = []
    for index, code_map in enumerate(code_maps):
        codes, held_out = sets["train"][index], sets["test"][index]
        cond, held_out_cond = sets["train"][:index], sets["test"][:index]
        prior_config = prior_config_for(codes, args.arch, False, cond, channels=args.channels, layers=args.layers,
                                        dropout=args.dropout)
        config = PriorTrainConfig(codes=str(codes.path), val_codes=str(held_out.path),
                                  cond_codes=[str(c.path) for c in cond],
                                  val_cond_codes=[str(c.path) for c in held_out_cond], eval_every=args.eval_every,
                                  steps=10**9, batch_size=args.batch_size, lr=args.lr,
                                  time_budget=args.budget / len(code_maps), checkpoint_every=10**9)
        prior_run = work / f"prior-{code_map.name}"
        result = train_prior(prior_run, prior_config, config, progress=False, tensorboard=False)
        prior, _, _ = ckpt.load_prior_checkpoint(prior_run, ckpt.BEST)
        indices = torch.arange(held_out.images if args.limit is None else min(args.limit, held_out.images))
        figures = evaluate_prior(prior, held_out, indices, cond=held_out_cond)
        maps.append({"map": code_map.name, "steps": result.step, "bits_per_code": figures.bits_per_code,
                     "uniform_bits_per_code": figures.uniform_bits_per_code,
                     "positions": held_out.shape[0] * held_out.shape[1]})
    subpixels = test.channels * test.height * test.width
    saved = sum(m["positions"] * (m["uniform_bits_per_code"] - m["bits_per_code"]) for m in maps)
    return {"run": str(run), "psnr": stage1.psnr, "stage1_bits_per_dim": stage1.bits_per_dim, "maps": maps,
            "bits_per_image": sum(m["positions"] * m["bits_per_code"] for m in maps),
            "bits_per_dim_with_priors": stage1.bits_per_dim - saved / subpixels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="stage-1 run folders")
    p.add_argument("--budget", type=float, default=300.0, help="seconds of prior training per run, split "
                                                               "equally between its code maps")
    p.add_argument("--arch", default="pixelcnn", choices=("pixelcnn", "pixelsnail"))
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--limit", type=int, help="only the first N test images (bits/dim) and maps (bits per code)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, help="where the codes and priors go (default: a new folder under /tmp)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="vqkit-code-priors-"))
    records = [measure(run, work / f"{i}-{run.name}", args) for i, run in enumerate(args.runs)]
    print(json.dumps({"budget": args.budget, "threads": args.threads, "work": str(work), "runs": records}, indent=2))
    for r in records:
        per_map = ", ".join(f"{m['map']} {m['bits_per_code']:.3f} of {m['uniform_bits_per_code']:.0f} "
                            f"({m['steps']} steps)" for m in r["maps"])
        print(f"{r['run']}: PSNR {r['psnr']:.2f} dB; held-out bits per code {per_map}; "
              f"{r['bits_per_image']:.0f} bits per image; bits/dim {r['stage1_bits_per_dim']:.3f} uniform, "
              f"{r['bits_per_dim_with_priors']:.3f} with the priors")


if __name__ == "__main__":
    main()
