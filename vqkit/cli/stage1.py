"""Stage-1 commands: train, eval, reconstruct, levels, encode, decode, extract."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from vqkit import distributed
from vqkit.cli.args import add_config_args, config_args, config_from_args
from vqkit.cli.common import (
    DATA_HELP,
    RUN_CHOICES,
    SPLITS,
    announce_placement,
    checkpoint_arg,
    device_arg,
    distributed_args,
    eval_data,
    image_size,
    run_and_data,
    save_eval_record,
    workers_arg,
)
from vqkit.data.datasets import from_model, load_dataset, to_model
from vqkit.data.images import load_image, make_grid, save_png
from vqkit.errors import UsageError
from vqkit.fsutil import atomic_write_bytes
from vqkit.nn.likelihood import LIKELIHOODS
from vqkit.nn.nets import TrunkConfig
from vqkit.nn.presets import PRESETS, preset
from vqkit.nn.quantizers import parse_quantizer
from vqkit.nn.vae import GaussianVAE, VAEConfig
from vqkit.nn.vqvae import StageOneConfig, VQVAE2Config, VQVAEConfig, with_quantizer
from vqkit.precision import resolve_device
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import extract_codes, read_maps, save_maps
from vqkit.runs.generate import decode_codes
from vqkit.training.evaluate import AUTOREGRESSIVE_RECON_LIMIT, evaluate
from vqkit.training.latents import evaluate_vae
from vqkit.training.prior import PriorEvalResult, evaluate_prior_run
from vqkit.training.stage1 import TrainConfig, train

# The model fields that `vqkit train` takes as options, overriding the preset's or config's.
_DECODER_OPTIONS = ("likelihood", "mixtures", *TrunkConfig.PIXELCNN_FIELDS)


def _model_config(args) -> StageOneConfig | VAEConfig:
    if args.config:
        config = ckpt.read_model_config(args.config)
    elif args.preset is None and args.resume and (Path(args.out) / "config.json").exists():
        config = ckpt.model_config_of(args.out)
    else:
        config = preset(args.preset or "cifar10")
    prefix = {name: value for name, value in (("prefix_training", args.prefix_training),
                                               ("prefix_share", args.prefix_share)) if value is not None}
    if isinstance(config, VAEConfig) and (args.quantizer or prefix):
        raise UsageError("--quantizer and --prefix-training/--prefix-share apply to VQ models; this is a "
                         "Gaussian VAE, which has no quantizer and one level")
    if args.quantizer:
        specs = [parse_quantizer(text) for text in args.quantizer]
        config = with_quantizer(config, specs[0] if len(specs) == 1 else specs)
    decoder = {name: value for name, value in config_args(VQVAEConfig, args).items() if value is not None}
    if decoder:
        config = type(config).from_dict({**config.to_dict(), **decoder})
    if not prefix:
        return config
    if not isinstance(config, VQVAE2Config):
        raise UsageError("--prefix-training and --prefix-share apply to a hierarchy (a VQ-VAE-2 preset or "
                         "config); this model has one level")
    return dataclasses.replace(config, **prefix)


def cmd_train(args) -> None:
    model_config, config = _model_config(args), config_from_args(TrainConfig, args)
    announce_placement(config)
    result = train(args.out, model_config, config, resume=args.resume, tensorboard=not args.no_tensorboard)
    if not distributed.is_main():
        return
    why = "time budget reached" if result.stopped_by_time else "done"
    print(f"{why}: step {result.step} in {result.seconds:.0f} s, loss {result.last_loss:.4f}; "
          f"checkpoint in {args.out}")


def cmd_eval(args) -> None:
    if ckpt.run_kind(args.run) == "prior":
        return _eval_prior(args)
    model, checkpoint = ckpt.load_model(args.run, resolve_device(args.device), kinds=ckpt.STAGE1_KINDS)
    data = load_dataset(eval_data(args, args.run), args.split, image_size=image_size(args.run))
    measure = evaluate_vae if isinstance(model, GaussianVAE) else evaluate
    result = measure(model, data, batch_size=args.batch_size, limit=args.limit, progress=not args.json,
                     workers=args.workers, recon_limit=args.recon_limit)
    record = {"data": data.spec, "split": args.split, **result.to_dict()}
    save_eval_record(args.run, checkpoint, record)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{data.spec} ({args.split}): {result.summary()}")


def _eval_prior(args) -> None:
    record = evaluate_prior_run(args.run, data=args.data, split=args.split, codes=args.codes, cond=args.cond,
                                limit=args.limit, batch_size=args.batch_size, progress=not args.json,
                                which=args.checkpoint, device=resolve_device(args.device))
    save_eval_record(args.run, ckpt.chosen_checkpoint(args.run, args.checkpoint), record)
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
    model, _ = ckpt.load_model(args.run, resolve_device(args.device), kinds=ckpt.STAGE1_KINDS)
    data = load_dataset(eval_data(args, args.run), args.split, image_size=image_size(args.run))
    images, _ = data.batch(torch.arange(min(args.n, len(data))))
    recon = from_model(model.decode(model.encode(to_model(images).to(model.device))).cpu())
    save_png(make_grid(torch.cat([images, recon]), nrow=args.nrow or len(images)), args.out)
    print(f"wrote {args.out}: {len(images)} originals (top) and reconstructions (bottom)")


def _images_from_args(args, run: Path) -> torch.Tensor:
    config = ckpt.model_config_of(run)
    if args.data:
        data = load_dataset(args.data, args.split, image_size=image_size(run))
        n = len(data) if args.limit is None else min(args.limit, len(data))
        return data.batch(torch.arange(n))[0]
    if not args.images:
        raise UsageError("give image files or --data SPEC")
    return torch.stack([load_image(p, args.image_size or image_size(run), config.in_channels)
                        for p in args.images])


def cmd_levels(args) -> None:
    from vqkit.inspect.figures import image_png
    from vqkit.inspect.levels import levels_image, levels_view
    model, _ = ckpt.load_model(args.run, resolve_device(args.device))
    data = load_dataset(eval_data(args, args.run), args.split, image_size=image_size(args.run))
    images, _ = data.batch(torch.arange(min(args.n, len(data))))
    view = levels_view(model, images)
    atomic_write_bytes(args.out, image_png(levels_image(view, args.side)))
    names = view.names
    psnrs = [f"{float(p.mean()):.2f}" for p in view.psnr]
    print(f"wrote {args.out}: per image (row), decoded from the {names[0]} level alone, "
          + "".join(f"then adding {name}, " for name in names[1:]) + "then the original; mean PSNR "
          + " / ".join(psnrs) + " dB")


def cmd_encode(args) -> None:
    model, _ = ckpt.load_model(args.run, resolve_device(args.device))
    images = _images_from_args(args, args.run)
    batches = [model.encode(to_model(images[i:i + 256]).to(model.device)) for i in range(0, len(images), 256)]
    maps = [torch.cat(level).cpu() for level in zip(*batches)]
    save_maps(maps, args.out, model.config)
    shapes = ", ".join(f"{code_map.name} {m.shape[1]}x{m.shape[2]}, K = {code_map.codebook_size}"
                       for code_map, m in zip(model.config.code_maps(), maps))
    print(f"wrote {args.out}: {len(maps[0])} images' code maps ({shapes})")


def cmd_decode(args) -> None:
    model, _ = ckpt.load_model(args.run, resolve_device(args.device))
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
    model, checkpoint = ckpt.load_model(args.run, resolve_device(args.device))
    data = load_dataset(eval_data(args, args.run), args.split, image_size=image_size(args.run))
    source = {"run": str(Path(args.run).resolve()), "step": checkpoint.step,
              "fingerprint": checkpoint.state.get("fingerprint"), "data": data.spec,
              "split": args.split}
    sets = extract_codes(model, data, args.out, batch_size=args.batch_size, limit=args.limit,
                         overwrite=args.overwrite, flip=args.flip, source=source, workers=args.workers)
    mirrored = " and their mirror images" if args.flip else ""
    print(f"wrote {args.out}: {sets[0].images} images{mirrored} from {data.spec} ({args.split}), one code set "
          "per code map (level, or residual stage), top-first:")
    for codes in sets:
        h, w = codes.shape
        print(f"  {codes.path}: {len(codes)} code maps of {h} x {w}, K = {codes.codebook_size}")


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a VQ-VAE, a VQ-VAE-2 or (--preset vae-...) a Gaussian VAE (stage 1)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="model preset (default cifar10; with --resume, the run's own model)")
    g.add_argument("--config", help="model config JSON (the 'model' part of a run's config.json)")
    t.add_argument("--prefix-training", choices=VQVAE2Config.PREFIX_TRAINING,
                   help="(hierarchies) override the model's prefix_training, how the top levels learn to decode "
                        "to an image alone: 'decoders', a reconstruction loss per prefix of levels through a light "
                        "decoder of its own; 'loss', the same through the shared decoder; 'off', every level "
                        "every batch, as before")
    t.add_argument("--prefix-share", type=float, metavar="SHARE",
                   help="(hierarchies, with prefix training) override the model's prefix_share: the share "
                        "of each batch whose prefixes are decoded and trained too, in (0, 1]")
    t.add_argument("--quantizer", action="append", metavar="SPEC",
                   help="the model's quantizer instead of the preset's or config's: vq[:cosine,rotation,"
                        "factor_dim=D], fsq:LEVELS (e.g. fsq:8,5,5,5, K = 1000), lfq:BITS[,entropy_weight=W] "
                        "(K = 2**BITS), residual:STAGES[,shared,quantize_dropout,cosine] (STAGES "
                        "code maps of K codes each), or a JSON object; FSQ and LFQ set the codebook size. Once "
                        "for every level, or repeated for one per level, top-first")
    add_config_args(t, VQVAEConfig, exclude=[f.name for f in dataclasses.fields(VQVAEConfig)
                                             if f.name not in _DECODER_OPTIONS],
                    choices={"likelihood": LIKELIHOODS}, unset=dict.fromkeys(_DECODER_OPTIONS, "the model's"))
    t.add_argument("-o", "--out", required=True, type=Path, help="run folder")
    add_config_args(t, TrainConfig, choices=RUN_CHOICES)
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.add_argument("--no-tensorboard", action="store_true")
    distributed_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="test MSE, PSNR, bits/dim and codebook usage; for a prior "
                                    "run, its held-out bits per code and the bits/dim it gives")
    run_and_data(e)
    e.add_argument("--codes", type=Path, help="(prior runs) held-out code set to evaluate on")
    e.add_argument("--cond", type=Path, action="append", default=[],
                   help="(conditioned prior runs, with --codes) the held-out code set of a level the "
                        "prior is conditioned on; repeat top-first, as in train-prior")
    e.add_argument("--limit", type=int, help="evaluate only the first N images")
    e.add_argument("--recon-limit", type=int,
                   help="measure MSE, PSNR and MS-SSIM on the first N images only (default: every image; with "
                        f"the autoregressive pixelcnn likelihood, whose reconstructions are sampled pixel by pixel, "
                        f"{AUTOREGRESSIVE_RECON_LIMIT}); bits/dim and codebook usage use every image")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--json", action="store_true", help="print machine-readable results")
    workers_arg(e)
    checkpoint_arg(e)
    device_arg(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("reconstruct", help="grid of originals above reconstructions")
    run_and_data(r)
    r.add_argument("-n", type=int, default=16)
    r.add_argument("--nrow", type=int)
    r.add_argument("-o", "--out", required=True, type=Path)
    device_arg(r)
    r.set_defaults(func=cmd_reconstruct)

    lv = sub.add_parser("levels", help="VQ-VAE-2 Figure 3: each image decoded from the top level "
                                       "alone, then adding each lower level, then the original")
    run_and_data(lv)
    lv.add_argument("-n", type=int, default=8)
    lv.add_argument("--side", type=int, default=128, help="width of each image in the figure, pixels")
    lv.add_argument("-o", "--out", required=True, type=Path)
    device_arg(lv)
    lv.set_defaults(func=cmd_levels)

    en = sub.add_parser("encode", help="images to integer code maps (.npy, N x h x w; for a VQ-VAE-2, a folder "
                                       "of top.npy, [middle.npy,] bottom.npy)")
    run_and_data(en)
    en.add_argument("images", nargs="*", help="image files (instead of --data)")
    en.add_argument("--limit", type=int)
    en.add_argument("--image-size", type=int)
    en.add_argument("-o", "--out", required=True, type=Path)
    device_arg(en)
    en.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="code maps (.npy, or a VQ-VAE-2's folder from encode) back to images")
    d.add_argument("run", type=Path)
    d.add_argument("codes", type=Path)
    d.add_argument("-o", "--out", required=True, help="a .png grid, or a folder for one PNG per map")
    d.add_argument("--nrow", type=int)
    device_arg(d)
    d.set_defaults(func=cmd_decode)

    x = sub.add_parser("extract", help="a dataset's code maps, stored for training a prior (for a "
                                       "VQ-VAE-2, one code set per level in OUT/top, ..., OUT/bottom)")
    x.add_argument("run", type=Path, help="run folder written by vqkit train")
    x.add_argument("--data", help=DATA_HELP + "; default: the run's training data")
    x.add_argument("--split", default="train", choices=SPLITS)
    x.add_argument("--limit", type=int, help="extract only the first N images")
    x.add_argument("--batch-size", type=int, default=256)
    x.add_argument("-o", "--out", required=True, type=Path,
                   help="code set folder (codes.npy, labels.npy, manifest.json); for a VQ-VAE-2 "
                        "the folder of one such set per level")
    x.add_argument("--overwrite", action="store_true", help="replace an existing code set")
    x.add_argument("--flip", action="store_true",
                   help="also store the codes of every image mirrored left to right (after the "
                        "originals): exact augmentation for the prior, which holds out originals only")
    workers_arg(x)
    device_arg(x)
    x.set_defaults(func=cmd_extract)
