"""The ``vqkit`` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

import torch

from vqkit import distributed
from vqkit.cli import export as export_cli
from vqkit.codec.codec import Codec
from vqkit.data.datasets import from_model, load_dataset, to_model
from vqkit.data.images import load_image, make_grid, save_png, side_by_side
from vqkit.errors import UsageError, VqkitError
from vqkit.fsutil import atomic_write_text
from vqkit.nn.presets import PRESETS, preset
from vqkit.nn.vqvae import StageOneConfig, level_names
from vqkit.precision import PRECISIONS
from vqkit.prior import PriorConfig
from vqkit.prior.config import ARCHS
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import extract_codes, load_codes, read_maps, save_maps
from vqkit.runs.generate import LevelPrior, chain_codes, check_chain, decode_codes, uniform_chain_codes
from vqkit.training.demo import run_demo
from vqkit.training.evaluate import evaluate
from vqkit.training.prior import (
    PriorEvalResult,
    PriorTrainConfig,
    evaluate_prior,
    evaluate_prior_run,
    load_cond,
    prior_config_for,
    split_indices,
    train_prior,
)
from vqkit.training.stage1 import TrainConfig, train

log = logging.getLogger(__name__)


def _model_config(args) -> StageOneConfig:
    if args.config:
        return ckpt.read_model_config(args.config)
    if args.preset is None and args.resume and (Path(args.out) / "config.json").exists():
        return ckpt.model_config_of(args.out)
    return preset(args.preset or "cifar10")


def cmd_train(args) -> None:
    model_config = _model_config(args)
    config = TrainConfig(data=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, time_budget=args.time_budget,
                         checkpoint_every=args.checkpoint_every, image_size=args.image_size,
                         skip_bad=args.skip_bad, **_placement(args))
    result = train(args.out, model_config, config, resume=args.resume,
                   tensorboard=not args.no_tensorboard)
    if not distributed.is_main():
        return
    why = "time budget reached" if result.stopped_by_time else "done"
    print(f"{why}: step {result.step} in {result.seconds:.0f} s, loss {result.last_loss:.4f}; "
          f"checkpoint in {args.out}")


def _eval_data(args, run: Path) -> str:
    return args.data or ckpt.read_config(run)["train"]["data"]


def _image_size(run: Path) -> int | None:
    return ckpt.read_config(run).get("train", {}).get("image_size")


def cmd_eval(args) -> None:
    if ckpt.run_kind(args.run) == "prior":
        return _eval_prior(args)
    model, checkpoint = ckpt.load_model(args.run)
    data = load_dataset(_eval_data(args, args.run), args.split, image_size=_image_size(args.run))
    result = evaluate(model, data, batch_size=args.batch_size, limit=args.limit, progress=not args.json)
    record = {"data": data.spec, "split": args.split, **result.to_dict()}
    _save_eval(args.run, checkpoint, record)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{data.spec} ({args.split}): {result.summary()}")


def _save_eval(run: Path, checkpoint: ckpt.Checkpoint, record: dict) -> None:
    """Keep the figures in RUN/eval.json for vqkit report; a read-only run only loses that."""
    try:
        ckpt.save_eval(run, {"step": checkpoint.step, "fingerprint": checkpoint.state.get("fingerprint"),
                        **record})
    except OSError as e:
        print(f"vqkit: warning: could not save {run / 'eval.json'} ({e})", file=sys.stderr)


def _eval_prior(args) -> None:
    record = evaluate_prior_run(args.run, data=args.data, split=args.split, codes=args.codes, cond=args.cond,
                                limit=args.limit, batch_size=args.batch_size, progress=not args.json)
    _save_eval(args.run, ckpt.latest_checkpoint(args.run), record)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        prior = PriorEvalResult(record["maps"], record["bits_per_code"], record["uniform_bits_per_code"])
        print(f"prior: {prior.summary()}")
        level = record["level"]
        print(f"{record['data']} ({args.split}): {record['stage1']['bits_per_dim']:.3f} bits/dim with the "
              f"uniform prior, {record['bits_per_dim_with_prior']:.3f} with this prior"
              + (f" for the {level} level" if level else ""))


def cmd_reconstruct(args) -> None:
    model, _ = ckpt.load_model(args.run)
    data = load_dataset(_eval_data(args, args.run), args.split, image_size=_image_size(args.run))
    images, _ = data.batch(torch.arange(min(args.n, len(data))))
    recon = from_model(model.decode(model.encode(to_model(images))))
    save_png(make_grid(torch.cat([images, recon]), nrow=args.nrow or len(images)), args.out)
    print(f"wrote {args.out}: {len(images)} originals (top) and reconstructions (bottom)")


def _images_from_args(args, run: Path) -> torch.Tensor:
    config = ckpt.model_config_of(run)
    if args.data:
        data = load_dataset(args.data, args.split, image_size=_image_size(run))
        n = len(data) if args.limit is None else min(args.limit, len(data))
        return data.batch(torch.arange(n))[0]
    if not args.images:
        raise UsageError("give image files or --data SPEC")
    return torch.stack([load_image(p, args.image_size or _image_size(run), config.in_channels)
                        for p in args.images])


def cmd_levels(args) -> None:
    model, _ = ckpt.load_model(args.run)
    data = load_dataset(_eval_data(args, args.run), args.split, image_size=_image_size(args.run))
    images, _ = data.batch(torch.arange(min(args.n, len(data))))
    x = to_model(images)
    codes = model.encode(x)
    columns = [from_model(model.decode_levels(codes, upto)) for upto in range(1, len(codes) + 1)] + [images]
    save_png(make_grid(torch.stack(columns, 1).flatten(0, 1), nrow=len(columns)), args.out)
    names = level_names(len(codes))
    print(f"wrote {args.out}: per image (row), decoded from the {names[0]} level alone, "
          + "".join(f"then adding {name}, " for name in names[1:]) + "then the original")


def cmd_encode(args) -> None:
    model, _ = ckpt.load_model(args.run)
    images = _images_from_args(args, args.run)
    batches = [model.encode(to_model(images[i:i + 256])) for i in range(0, len(images), 256)]
    maps = [torch.cat(level) for level in zip(*batches)]
    save_maps(maps, args.out, model.config.codebook_sizes)
    shapes = ", ".join(f"{name} {m.shape[1]}x{m.shape[2]}, K = {k}" for name, m, k in
                       zip(level_names(len(maps)), maps, model.config.codebook_sizes))
    print(f"wrote {args.out}: {len(maps[0])} images' code maps ({shapes})")


def cmd_decode(args) -> None:
    model, _ = ckpt.load_model(args.run)
    images = decode_codes(model, read_maps(args.codes, model.config))
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        save_png(make_grid(images, nrow=args.nrow or min(len(images), 16)), out)
        print(f"wrote {out}: grid of {len(images)} images")
    else:
        for i, image in enumerate(images):
            save_png(image, out / f"{i:06d}.png")
        print(f"wrote {len(images)} images to {out}/")


def cmd_extract(args) -> None:
    model, checkpoint = ckpt.load_model(args.run)
    data = load_dataset(_eval_data(args, args.run), args.split, image_size=_image_size(args.run))
    source = {"run": str(Path(args.run).resolve()), "step": checkpoint.step,
              "fingerprint": checkpoint.state.get("fingerprint"), "data": data.spec,
              "split": args.split}
    sets = extract_codes(model, data, args.out, batch_size=args.batch_size, limit=args.limit,
                         overwrite=args.overwrite, source=source)
    print(f"wrote {args.out}: {len(sets[0])} images from {data.spec} ({args.split}), one code set per "
          "level, top-first:")
    for codes in sets:
        h, w = codes.shape
        print(f"  {codes.path}: {len(codes)} code maps of {h} x {w}, K = {codes.codebook_size}")


def cmd_train_prior(args) -> None:
    codes = load_codes(args.codes)
    config = PriorTrainConfig(codes=str(args.codes), val_codes=args.val_codes,
                              cond_codes=[str(p) for p in args.cond],
                              val_cond_codes=[str(p) for p in args.val_cond], steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              time_budget=args.time_budget, checkpoint_every=args.checkpoint_every,
                              **_placement(args))
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


def _qualities(text: str) -> list[int]:
    try:
        qualities = [int(q) for q in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not all(1 <= q <= 100 for q in qualities):
        raise argparse.ArgumentTypeError(f"qualities run from 1 to 100, got {text}")
    return qualities


def _codec(args) -> Codec:
    return Codec.load(args.run, args.prior)


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


def cmd_decompress(args) -> None:
    codec = _codec(args)
    out = Path(args.out)
    single = len(args.files) == 1 and out.suffix.lower() == ".png"
    for path in args.files:
        target = out if single else out / (Path(path).stem + ".png")
        image = codec.decompress_file(path, target)
        print(f"wrote {target}: {image.shape[2]}x{image.shape[1]}")


def cmd_rd(args) -> None:
    from vqkit.codec.rd import QUALITIES, codecs_for, image_files, measure, plot
    codecs = codecs_for(args.runs, args.prior)
    files = image_files(args.data)[:args.limit]
    result = measure(codecs, files, args.qualities or QUALITIES)
    print(result.table())
    plot(result, args.out)
    if args.json:
        atomic_write_text(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


def cmd_demo(args) -> None:
    run_demo(args.out, data=args.data, steps=args.steps, lr=args.lr, time_budget=args.time_budget,
             resume=args.resume, prior_steps=args.prior_steps, prior_time_budget=args.prior_time_budget)


def _distributed_args(sp) -> None:
    sp.add_argument("--nproc", type=int, default=1,
                    help="train data-parallel in this many processes on this machine (launches "
                         "torchrun; --batch-size is per process); for several machines run "
                         "torchrun -m vqkit ... yourself")
    sp.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT,
                    help="seconds a process waits for the others before the job fails "
                         f"(default {distributed.DEFAULT_TIMEOUT:.0f})")


def _placement_args(sp) -> None:
    sp.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda, cuda:N")
    sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="bf16: autocast the forward pass to bfloat16 (codebook maths stays float32); "
                         "auto: bf16 where the device computes it natively, else fp32")
    sp.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="channels_last memory format (default: with bf16)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the model")


def _placement(args) -> dict:
    return {"device": args.device, "precision": args.precision, "channels_last": args.channels_last,
            "compile": args.compile}


def cmd_inspect(args) -> None:
    from vqkit.inspect.atlas import inspect_run
    result = inspect_run(args.run, args.out, data=args.data, split=args.split, limit=args.limit,
                         batch_size=args.batch_size, exemplars=args.exemplars, maps=args.maps,
                         max_codes=args.max_codes)
    ins = result.inspection
    print(f"{ins.num_images} images of {ins.data} ({ins.split}), checkpoint step {ins.step}:")
    for lv in ins.levels:
        print(f"  {lv.name}: {lv.used}/{lv.codebook_size} codes used, {lv.dead} dead, perplexity "
              f"{lv.perplexity:.1f}; most used {lv.order[:5].tolist()}")
    print(f"wrote {', '.join(p.name for p in result.files)} to {args.out}")


def cmd_report(args) -> None:
    from vqkit.inspect.report import build_report
    report = build_report(args.run, args.out, data=args.data, split=args.split, limit=args.limit,
                          inspect_dir=args.inspect_dir, priors=args.prior, extra_images=args.extra_image)
    print(f"wrote {args.out}: {len(report.sections)} sections ({', '.join(report.section_ids)}), "
          f"{report.images} images embedded")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqkit", description="VQ-VAE: discrete latent image models")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    data_help = ("dataset as KIND:DIR with KIND one of mnist, fashion-mnist, cifar10, folder "
                 "(e.g. cifar10:../shared/data/cifar10)")

    t = sub.add_parser("train", help="train a VQ-VAE (stage 1)")
    t.add_argument("--data", required=True, help=data_help)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="model preset (default cifar10; with --resume, the run's own model)")
    g.add_argument("--config", help="model config JSON (the 'model' part of a run's config.json)")
    t.add_argument("-o", "--out", required=True, type=Path, help="run folder")
    t.add_argument("--steps", type=int, default=10_000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--time-budget", type=float, help="stop after this many seconds (and save)")
    t.add_argument("--checkpoint-every", type=int, default=1000)
    t.add_argument("--image-size", type=int, help="centre-crop and resize folder images to this size")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (counted in the log)")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.add_argument("--no-tensorboard", action="store_true")
    _placement_args(t)
    _distributed_args(t)
    t.set_defaults(func=cmd_train)

    def run_and_data(sp, need_data=False):
        sp.add_argument("run", type=Path, help="run folder written by vqkit train")
        sp.add_argument("--data", required=need_data,
                        help=data_help + "; default: the run's training data")
        sp.add_argument("--split", default="test", choices=["train", "test", "all"])

    e = sub.add_parser("eval", help="test MSE, PSNR, bits/dim and codebook usage; for a prior "
                                    "run, its held-out bits per code and the bits/dim it gives")
    run_and_data(e)
    e.add_argument("--codes", type=Path, help="(prior runs) held-out code set to evaluate on")
    e.add_argument("--cond", type=Path, action="append", default=[],
                   help="(conditioned prior runs, with --codes) the held-out code set of a level the "
                        "prior is conditioned on; repeat top-first, as in train-prior")
    e.add_argument("--limit", type=int, help="evaluate only the first N images")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--json", action="store_true", help="print machine-readable results")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("reconstruct", help="grid of originals above reconstructions")
    run_and_data(r)
    r.add_argument("-n", type=int, default=16)
    r.add_argument("--nrow", type=int)
    r.add_argument("-o", "--out", required=True, type=Path)
    r.set_defaults(func=cmd_reconstruct)

    lv = sub.add_parser("levels", help="VQ-VAE-2 Figure 3: each image decoded from the top level "
                                       "alone, then adding each lower level, then the original")
    run_and_data(lv)
    lv.add_argument("-n", type=int, default=8)
    lv.add_argument("-o", "--out", required=True, type=Path)
    lv.set_defaults(func=cmd_levels)

    en = sub.add_parser("encode", help="images to integer code maps (.npy, N x h x w; for a VQ-VAE-2, a folder "
                                       "of top.npy, [middle.npy,] bottom.npy)")
    run_and_data(en)
    en.add_argument("images", nargs="*", help="image files (instead of --data)")
    en.add_argument("--limit", type=int)
    en.add_argument("--image-size", type=int)
    en.add_argument("-o", "--out", required=True, type=Path)
    en.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="code maps (.npy, or a VQ-VAE-2's folder from encode) back to images")
    d.add_argument("run", type=Path)
    d.add_argument("codes", type=Path)
    d.add_argument("-o", "--out", required=True, help="a .png grid, or a folder for one PNG per map")
    d.add_argument("--nrow", type=int)
    d.set_defaults(func=cmd_decode)

    x = sub.add_parser("extract", help="a dataset's code maps, stored for training a prior (for a "
                                       "VQ-VAE-2, one code set per level in OUT/top, ..., OUT/bottom)")
    x.add_argument("run", type=Path, help="run folder written by vqkit train")
    x.add_argument("--data", help=data_help + "; default: the run's training data")
    x.add_argument("--split", default="train", choices=["train", "test", "all"])
    x.add_argument("--limit", type=int, help="extract only the first N images")
    x.add_argument("--batch-size", type=int, default=256)
    x.add_argument("-o", "--out", required=True, type=Path,
                   help="code set folder (codes.npy, labels.npy, manifest.json); for a VQ-VAE-2 "
                        "the folder of one such set per level")
    x.add_argument("--overwrite", action="store_true", help="replace an existing code set")
    x.set_defaults(func=cmd_extract)

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
    _placement_args(tp)
    _distributed_args(tp)
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

    prior_help = ("prior run fitted to RUN's codes, one per level, top-first (repeat); the codes are "
                  "entropy-coded with the priors' conditionals")
    cp = sub.add_parser("compress", help="images to .vq files: codes entropy-coded with the priors")
    cp.add_argument("run", type=Path, help="stage-1 run folder")
    cp.add_argument("images", nargs="+", help="image files (any size)")
    cp.add_argument("--prior", type=Path, action="append", default=[], help=prior_help)
    cp.add_argument("--uniform", action="store_true", help="code every code with log2 K bits (no prior)")
    cp.add_argument("-o", "--out", required=True, help="a .vq file for one image, else a folder")
    cp.set_defaults(func=cmd_compress)

    dp = sub.add_parser("decompress", help=".vq files back to PNG images")
    dp.add_argument("run", type=Path, help="the stage-1 run folder the files were made with")
    dp.add_argument("files", nargs="+", help=".vq files")
    dp.add_argument("--prior", type=Path, action="append", default=[],
                    help="the prior runs the files were made with, top-first (repeat)")
    dp.add_argument("-o", "--out", required=True, help="a .png file for one file, else a folder")
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
    rdp.set_defaults(func=cmd_rd)

    ins = sub.add_parser("inspect", help="codebook atlas, usage plot, code maps and codebook PCA "
                                         "(PNGs) from one pass over a dataset")
    run_and_data(ins)
    ins.add_argument("--limit", type=int, help="inspect only the first N images")
    ins.add_argument("--batch-size", type=int, default=256)
    ins.add_argument("--exemplars", type=int, default=6, help="image patches shown per code")
    ins.add_argument("--maps", type=int, default=8, help="images shown with their code maps")
    ins.add_argument("--max-codes", type=int, help="show only the N most used codes in the atlas")
    ins.add_argument("-o", "--out", required=True, type=Path, help="folder for the PNGs and inspect.json")
    ins.set_defaults(func=cmd_inspect)

    rp = sub.add_parser("report", help="one self-contained HTML page: config, training curves, last "
                                       "eval, reconstructions, atlas and usage (or a prior's curves "
                                       "and samples)")
    run_and_data(rp)
    rp.add_argument("--limit", type=int, help="inspect only the first N images")
    rp.add_argument("--inspect-dir", type=Path, help="where the atlas PNGs go (default: OUT_files/)")
    rp.add_argument("--prior", type=Path, action="append", default=[],
                    help="a prior run fitted to this run's codes: its NLL curves and samples (repeat)")
    rp.add_argument("--extra-image", type=Path, action="append", default=[],
                    help="an image to include (sample grid, rate-distortion plot, ...; repeat)")
    rp.add_argument("-o", "--out", required=True, type=Path, help="the HTML file")
    rp.set_defaults(func=cmd_report)

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
    export_cli.add_parser(sub)
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
            distributed.setup(timeout=args.dist_timeout)
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
