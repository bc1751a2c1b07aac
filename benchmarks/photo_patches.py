"""Cut random square crops from the photos into a ``folder:`` dataset for training a codec model.

    python benchmarks/photo_patches.py ../shared/data/photos -o runs/photo-patches

The last ``--held-out`` photos (in name order) are kept out of ``train/``: their crops go to
``test/`` and the whole photos are copied to ``held-out/``, the folder ``vqkit rd`` measures.
Crops are taken at the photos' own resolution, seeded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vqkit.fsutil import atomic_path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("photos", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--per-photo", type=int, default=100)
    p.add_argument("--held-out", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    photos = sorted(args.photos.glob("*.png"))
    rng = np.random.default_rng(args.seed)
    for index, path in enumerate(photos):
        split = "test" if index >= len(photos) - args.held_out else "train"
        image = Image.open(path).convert("RGB")
        count = args.per_photo if split == "train" else max(1, args.per_photo // 10)
        for k in range(count):
            x = int(rng.integers(0, image.width - args.size + 1))
            y = int(rng.integers(0, image.height - args.size + 1))
            crop = image.crop((x, y, x + args.size, y + args.size))
            with atomic_path(args.out / split / f"{path.stem}-{k:04d}.png") as tmp:
                crop.save(tmp, format="PNG")
    held = photos[len(photos) - args.held_out:]
    for path in held:
        with atomic_path(args.out / "held-out" / path.name) as tmp:
            tmp.write_bytes(path.read_bytes())
    print(f"wrote {args.out}: crops of {len(photos) - len(held)} photos in train/, of "
          f"{len(held)} held-out photos in test/, and those photos in held-out/ "
          f"({', '.join(p.name for p in held)})")


if __name__ == "__main__":
    main()
