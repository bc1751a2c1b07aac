"""Inspection commands: inspect, report, collapse."""

from __future__ import annotations

from pathlib import Path

from vqkit.cli.args import add_config_args, config_from_args
from vqkit.cli.common import RUN_CHOICES, device_arg, run_and_data
from vqkit.inspect.collapse import DECODERS, CollapseSettings
from vqkit.precision import resolve_device


def cmd_inspect(args) -> None:
    from vqkit.inspect.atlas import inspect_run
    result = inspect_run(args.run, args.out, data=args.data, split=args.split, limit=args.limit,
                         batch_size=args.batch_size, exemplars=args.exemplars, maps=args.maps,
                         max_codes=args.max_codes, device=resolve_device(args.device))
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


def _collapse_settings(args) -> CollapseSettings:
    return config_from_args(CollapseSettings, args, decoders=args.decoder or list(DECODERS))


def cmd_collapse(args) -> None:
    from vqkit.inspect.collapse import run_collapse
    result = run_collapse(args.out, _collapse_settings(args))
    print(result.table())
    print(f"wrote {args.out}/collapse.json, collapse.png (KL in training, active units, swap cost) and samples.png")


def add_parsers(sub) -> None:
    ins = sub.add_parser("inspect", help="codebook atlas, usage plot, code maps and codebook PCA "
                                         "(PNGs) from one pass over a dataset")
    run_and_data(ins)
    ins.add_argument("--limit", type=int, help="inspect only the first N images")
    ins.add_argument("--batch-size", type=int, default=256)
    ins.add_argument("--exemplars", type=int, default=6, help="image patches shown per code")
    ins.add_argument("--maps", type=int, default=8, help="images shown with their code maps")
    ins.add_argument("--max-codes", type=int, help="show only the N most used codes in the atlas")
    ins.add_argument("-o", "--out", required=True, type=Path, help="folder for the PNGs and inspect.json")
    device_arg(ins)
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

    co = sub.add_parser("collapse", help="posterior collapse, shown: a Gaussian VAE and a VQ-VAE with the same conv "
                                         "decoder and with the same PixelCNN decoder, trained for the same budget "
                                         "and measured (table, collapse.json, collapse.png, samples.png)")
    add_config_args(co, CollapseSettings, exclude=["decoders"], choices={"clock": RUN_CHOICES["clock"]})
    co.add_argument("--decoder", action="append", choices=tuple(DECODERS),
                    help="compare only this decoder (repeat for several; default: all): conv, an independent "
                         "logistic mixture per subpixel; pixelcnn, autoregressive over subpixels")
    co.add_argument("-o", "--out", required=True, type=Path,
                    help="folder of the four run folders and the results (finished runs there are reused)")
    co.set_defaults(func=cmd_collapse)
