"""A run's inspection written as files: ``vqkit inspect`` (see ``vqkit.inspect.stats`` for what
is measured and ``vqkit.inspect.figures`` for how it is drawn)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vqkit.data.datasets import ImageSet, load_dataset
from vqkit.errors import UsageError
from vqkit.fsutil import atomic_path, atomic_write_text
from vqkit.inspect.figures import atlas_image, code_map_figure, figure_png, pca_figure, usage_figure
from vqkit.inspect.stats import Inspection, inspect_model
from vqkit.nn.vqvae import VQVAE
from vqkit.runs import checkpoint as ckpt


@dataclass
class InspectOutput:
    """The files ``inspect_run`` wrote (``atlases`` one per level, top-first) and what it saw."""

    inspection: Inspection
    atlases: list[Path]
    usage: Path
    code_maps: Path
    pca: Path
    summary: Path
    files: list[Path] = field(default_factory=list)


def load_complete(run: Path, attempts: int = 3,
                  device: str | torch.device = "cpu") -> tuple[VQVAE, ckpt.Checkpoint]:
    """The latest complete checkpoint of ``run`` (on ``device``), which may still be training:
    ``latest`` only ever names a checkpoint whose files are all in place, but training may prune
    it while we read it; then ``latest`` has moved on and we read the newer one."""
    for attempt in range(attempts):
        pointer = Path(run) / "latest"
        before = pointer.read_text().strip() if pointer.exists() else None
        try:
            return ckpt.load_model(run, device)
        except ckpt.CheckpointError:
            after = pointer.read_text().strip() if pointer.exists() else None
            if attempt == attempts - 1 or before == after:
                raise
    raise AssertionError("unreachable")


def inspect_run(run: str | Path, out: str | Path, *, data: str | None = None, split: str = "test",
                limit: int | None = None, batch_size: int = 256, exemplars: int = 6, maps: int = 8,
                max_codes: int | None = None, progress: bool = True,
                device: str | torch.device = "cpu") -> InspectOutput:
    """Inspect the latest complete checkpoint of stage-1 run ``run`` on ``data`` (default: its
    training data), the model on ``device``, and write into ``out``: ``atlas_<level>.png`` per
    level, ``usage.png``, ``code_maps.png``, ``pca.png`` and ``inspect.json`` (every figure's
    numbers)."""
    run, out = Path(run), Path(out)
    model, checkpoint = load_complete(run, device=device)
    dataset = run_dataset(run, data, split, model.config.in_channels)
    inspection = inspect_model(model, dataset, batch_size=batch_size, limit=limit, exemplars=exemplars,
                               maps=maps, progress=progress, split=split, checkpoint=checkpoint)
    return write_inspection(inspection, out, max_codes=max_codes)


def run_dataset(run: Path, data: str | None, split: str, in_channels: int) -> ImageSet:
    """``data`` (default: the run's training data), ``split``, at the run's image size."""
    config = ckpt.read_config(run)
    dataset = load_dataset(data or config["train"]["data"], split,
                           image_size=config.get("train", {}).get("image_size"))
    if dataset.channels != in_channels:
        raise UsageError(f"{dataset.spec}: images have {dataset.channels} channels but {run} expects "
                         f"{in_channels}")
    return dataset


def write_inspection(inspection: Inspection, out: Path, max_codes: int | None = None) -> InspectOutput:
    """Write the figures of ``inspection`` into ``out`` (each file atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atlases = []
    for lv in inspection.levels:
        path = out / f"atlas_{lv.name}.png"
        with atomic_path(path) as tmp:
            atlas_image(lv, max_codes=max_codes).save(tmp, format="PNG")
        atlases.append(path)
    figures = {"usage": usage_figure, "code_maps": code_map_figure, "pca": pca_figure}
    paths = {}
    for name, make in figures.items():
        paths[name] = out / f"{name}.png"
        with atomic_path(paths[name]) as tmp:
            tmp.write_bytes(figure_png(make(inspection)))
    summary = out / "inspect.json"
    atomic_write_text(summary, json.dumps(inspection.summary(), indent=1) + "\n")
    return InspectOutput(inspection=inspection, atlases=atlases, usage=paths["usage"],
                         code_maps=paths["code_maps"], pca=paths["pca"], summary=summary,
                         files=[*atlases, *paths.values(), summary])
