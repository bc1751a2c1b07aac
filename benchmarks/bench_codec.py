"""Rate-distortion of ``.vq`` files on photos, end to end: cut crops of the photos, train each
stage-1 model and its priors for a CPU budget, then ``vqkit rd`` on the held-out photos at their
own resolution beside JPEG and WebP.

    python benchmarks/bench_codec.py --photos ../shared/data/photos -o runs/codec \
        --model benchmarks/configs/photos-8x.json --model benchmarks/configs/photos-2level-8x.json \
        --stage1-budget 3900 --prior-budget 900

Every step is a ``vqkit`` command (printed before it runs, so any one can be repeated by hand)
and a step whose output already exists is skipped: a stopped benchmark goes on where it stopped,
and a longer-trained run put in OUT/NAME (``vqkit train --resume``) is measured as it is. The
priors: the top level (or a one-level model's only map) gets a PixelSNAIL when its map has at
most 256 positions and a gated PixelCNN otherwise (attention over 1,024 positions is too slow on
a CPU); each lower level a gated PixelCNN conditioned on every level above it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from vqkit.runs.codes import load_codes

HERE = Path(__file__).resolve().parent
ATTENTION_MAX_POSITIONS = 256


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def level_folders(codes: Path) -> list[Path]:
    """The code sets of one extraction, top-first: one set, or for a VQ-VAE-2 the folders its
    manifest lists."""
    manifest = json.loads((codes / "manifest.json").read_text())
    return [codes / name for name in manifest["levels"]] if "levels" in manifest else [codes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="folder of PNG photos")
    p.add_argument("-o", "--out", type=Path, required=True, help="folder for the crops, runs and results")
    p.add_argument("--model", type=Path, action="append", required=True,
                   help="stage-1 model config JSON (repeat); its file name names the run")
    p.add_argument("--per-photo", type=int, default=400, help="training crops per photo")
    p.add_argument("--stage1-budget", type=float, default=3900, help="seconds of stage-1 training per model")
    p.add_argument("--prior-budget", type=float, default=900, help="seconds of training per prior")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="measure only the first N held-out photos")
    args = p.parse_args()

    vqkit = [sys.executable, "-m", "vqkit", "--threads", str(args.threads)]
    patches = args.out / "patches"
    if not (patches / "held-out").exists():
        run([sys.executable, str(HERE / "photo_patches.py"), str(args.photos), "-o", str(patches),
             "--per-photo", str(args.per_photo)])
    runs, priors = [], []
    for config in args.model:
        name = config.stem
        stage1, codes, test = args.out / name, args.out / f"{name}-codes", args.out / f"{name}-codes-test"
        if not (stage1 / "latest").exists():
            run([*vqkit, "train", "--data", f"folder:{patches}", "--config", str(config), "--batch-size", "16",
                 "--lr", "1e-3", "--steps", "1000000", "--time-budget", str(args.stage1_budget),
                 "--no-tensorboard", "-o", str(stage1)])
        for split, folder in (("train", codes), ("test", test)):
            if not folder.exists():
                run([*vqkit, "extract", str(stage1), "--split", split, "-o", str(folder)])
        levels, test_levels = level_folders(codes), level_folders(test)
        for index, (level, test_level) in enumerate(zip(levels, test_levels)):
            prior = args.out / (f"{name}-prior" if len(levels) == 1 else f"{name}-prior-{level.name}")
            h, w = load_codes(level).shape
            if index == 0 and h * w <= ATTENTION_MAX_POSITIONS:
                arch = ["--arch", "pixelsnail", "--channels", "64", "--layers", "4", "--batch-size", "32"]
            else:
                arch = ["--arch", "pixelcnn", "--channels", "64", "--layers", "4", "--batch-size", "16"]
            cond = [a for above in levels[:index] for a in ("--cond", str(above))]
            val_cond = [a for above in test_levels[:index] for a in ("--val-cond", str(above))]
            if not (prior / "latest").exists():
                run([*vqkit, "train-prior", str(level), *cond, "--val-codes", str(test_level), *val_cond, *arch,
                     "--lr", "1e-3", "--steps", "1000000", "--time-budget", str(args.prior_budget),
                     "--no-tensorboard", "-o", str(prior)])
            priors += ["--prior", str(prior)]
        runs.append(str(stage1))
    limit = ["--limit", str(args.limit)] if args.limit else []
    run([*vqkit, "rd", *runs, *priors, "--data", str(patches / "held-out"), *limit,
         "-o", str(args.out / "rd.png"), "--json", str(args.out / "rd.json")])


if __name__ == "__main__":
    main()
