"""A run report: one self-contained HTML page that shows how a run went.

For a stage-1 run (VQ-VAE or VQ-VAE-2) the page holds, in this order, the sections that the
run has (``Report.sections`` names them by id):

* ``summary``: the run folder, its kind, the latest complete checkpoint (step, fingerprint);
* ``config``: the model and training configuration of ``config.json``;
* ``curves``: the training curves of the scalars logged in ``RUN/tensorboard`` (per-level
  tags such as ``perplexity_top`` and ``perplexity_bottom`` share one panel);
* ``eval``: the figures of the last ``vqkit eval`` (``RUN/eval.json``: MSE, PSNR, bits/dim and,
  for a hierarchy, each level's);
* ``reconstructions``: the first test images above their reconstructions;
* ``atlas-<level>``, ``usage``, ``code-maps``, ``pca``: the figures of ``vqkit inspect``;
* ``prior-<i>``: for each prior run given (``priors``): its NLL curves, last evaluation and
  samples;
* ``extra-<i>``: images given as files (``extra_images``: sample grids of ``vqkit sample``,
  rate-distortion plots, ...).

For a prior run (``kind: prior``) the page holds its summary, config, NLL curves, last
evaluation and samples. Samples are drawn here for a prior that needs no other level's codes
(a one-level model's prior, decoded; the top prior of a VQ-VAE-2, shown decoded from the top
level alone, ``VQVAE.decode_levels``); a lower-level prior needs the chain of ``vqkit sample``,
whose grid can be given as an extra image.

Images are embedded as base64 PNG data URLs; the page loads nothing and runs no script. Its
CSS lays the page out for a phone-sized and a desktop-sized window: images scale to the
width, the atlases scroll at their own size, tables scroll sideways.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from vqkit.data.datasets import from_model, to_model
from vqkit.data.images import ImageError, make_grid
from vqkit.fsutil import atomic_write_text
from vqkit.inspect.atlas import InspectOutput, load_complete, run_dataset, write_inspection
from vqkit.inspect.collapse import COLLAPSE_FILE
from vqkit.inspect.figures import figure_png, image_png, rgb_image
from vqkit.inspect.scalars import Curves, read_scalars
from vqkit.inspect.stats import inspect_model
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import prior_codes, stage1_of, vae_samples


@dataclass
class Section:
    """One part of the page: ``id`` (the anchor), a title and its HTML body."""

    id: str
    title: str
    body: str


@dataclass
class Report:
    """The page and what it holds; ``images`` counts the embedded images."""

    path: Path
    sections: list[Section]
    images: int = 0

    @property
    def section_ids(self) -> list[str]:
        return [s.id for s in self.sections]


# A level's name, with a residual stage's index after it (``_top.1``, ``_codes.0``).
_LEVEL_SUFFIX = re.compile(r"^(.*?)_((?:top|bottom|middle\d*)(?:\.\d+)?|codes\.\d+)$")


def curves_figure(curves: Curves, title: str) -> Figure:
    """Small multiples, one panel per logged quantity; a quantity logged per level (tag suffix
    ``_top``, ``_middle``, ``_bottom``; ``_top.0`` for a residual stage) draws one line per level
    in its panel. Losses and perplexities are drawn on a log scale when positive."""
    panels: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for tag, (steps, values) in curves.series.items():
        match = _LEVEL_SUFFIX.match(tag)
        base, level = (match.group(1), match.group(2)) if match else (tag, "")
        panels.setdefault(base, []).append((level, steps, values))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (base, lines) in zip(axes.flat, panels.items()):
        for level, steps, values in lines:
            ax.plot(steps, values, label=level or None, lw=1)
        if any(level for level, _, _ in lines):
            ax.legend(fontsize=7)
        if "loss" in base and all(v > 0 for _, _, values in lines for v in values):
            ax.set_yscale("log")
        ax.set_title(base, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.45 / (2.9 * rows), top=1 - 0.6 / (2.9 * rows),
                        hspace=0.6, wspace=0.3)
    return fig


# ---------------------------------------------------------------------------------------------
# HTML pieces


def _img(png: bytes, alt: str, wide: bool = False) -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = ' class="wide"' if wide else ""
    img = f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{cls}>'
    return f'<div class="scroll">{img}</div>' if wide else img


def _table(rows: list[tuple[str, object]], header: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="table"><table>{f"<thead><tr>{head}</tr></thead>" if head else ""}' \
           f"<tbody>{body}</tbody></table></div>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d1d1f;
       background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 0.75rem; }
h1 { font-size: 1.4rem; word-break: break-all; }
h2 { font-size: 1.15rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
nav { display: flex; flex-wrap: wrap; gap: 0.3rem 0.8rem; font-size: 0.9rem; }
img { max-width: 100%; height: auto; display: block; margin: 0.4rem 0; background: #fff; }
.scroll { overflow: auto; max-height: 85vh; border: 1px solid #ddd; background: #fff; }
.scroll img.wide { max-width: none; margin: 0; }
.table { overflow-x: auto; }
.cols { display: flex; flex-wrap: wrap; gap: 0 2rem; align-items: flex-start; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { text-align: left; padding: 0.2rem 0.6rem; border-bottom: 1px solid #e4e4e4; vertical-align: top; }
td { word-break: break-word; }
.note { color: #555; font-size: 0.9rem; }
"""


def render(title: str, sections: list[Section]) -> str:
    """The whole page: a title, a table of contents, then the sections."""
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main><h1>{html.escape(title)}</h1><nav>{nav}</nav>{body}</main></body></html>\n")


# ---------------------------------------------------------------------------------------------
# Sections


def _summary(run: Path, config: dict, checkpoint: ckpt.Checkpoint) -> Section:
    rows = [("run folder", str(run.resolve())), ("kind", config.get("kind")),
            ("latest complete checkpoint", f"step {checkpoint.step}"),
            *([("best checkpoint (held-out)", f"step {ckpt.read_checkpoint(run, ckpt.BEST).step}")]
              if (run / ckpt.BEST).exists() else []),
            ("weights fingerprint (sha256)", checkpoint.state.get("fingerprint")),
            ("last logged loss", checkpoint.state.get("metrics", {}).get("loss"))]
    source = config.get("source")
    if source:
        rows += [("stage-1 run", source.get("run")), ("codes from", f"{source.get('data')} ({source.get('split')})")]
        if source.get("level"):
            rows.append(("level", source.get("level")))
    return Section("summary", "Run", _table(rows))


def _config(config: dict) -> Section:
    tables = [_table(list((config.get(part) or {}).items()), (part, "value")) for part in ("model", "train")]
    return Section("config", "Configuration", f'<div class="cols">{"".join(tables)}</div>')


def _curves(run: Path, what: str, sid: str = "curves") -> Section | None:
    curves = read_scalars(run / "tensorboard")
    if not curves.series:
        return None
    fig = curves_figure(curves, f"{what}: {run.name}")
    tags = ", ".join(curves.series)
    return Section(sid, what, _img(figure_png(fig), f"{what} of {run}") +
                   f'<p class="note">logged scalars: {html.escape(tags)}</p>')


def validation_figure(history: list[list], best: tuple[int, float], uniform: float | None, title: str) -> Figure:
    """The held-out measure over training, the best point marked, beside the uniform prior's
    log2 K when known: a curve that turns up while training goes on is a prior memorising."""
    fig = Figure(figsize=(5.6, 3.2))
    ax = fig.subplots()
    steps, values = zip(*history)
    ax.plot(steps, values, lw=1.2, marker="." if len(history) < 40 else None, label="held-out")
    ax.plot([best[0]], [best[1]], "o", color="C3", label=f"best: {best[1]:.3f} at step {best[0]}")
    if uniform is not None:
        ax.axhline(uniform, color="0.5", ls="--", lw=1, label=f"uniform prior: {uniform:.3f}")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("bits per code", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.9)
    return fig


def _validation(run: Path, config: dict) -> Section | None:
    record = ckpt.read_validation(run)
    if not record or not record["history"]:
        return None
    history = record["history"]
    best = tuple(min(history, key=lambda h: h[1]))
    k = (config.get("model") or {}).get("codebook_size")
    uniform = math.log2(k) if isinstance(k, int) and k > 1 else None
    fig = validation_figure(history, best, uniform, f"held-out {record.get('metric')}: {run.name}")
    last = history[-1]
    text = (f"measured {len(history)} times; best {best[1]:.4f} at step {best[0]} (the checkpoint eval, sample "
            f"and compress use), last {last[1]:.4f} at step {last[0]}")
    return Section("validation", "Held-out NLL", _p(text) + _img(figure_png(fig), f"held-out NLL of {run}"))


def _eval(run: Path, checkpoint: ckpt.Checkpoint, sid: str = "eval") -> Section | None:
    record = ckpt.read_eval(run)
    if record is None:
        return None
    notes = [f"{record.get('data')} ({record.get('split')}), checkpoint step {record.get('step')}"]
    if record.get("step") != checkpoint.step:
        notes.append(f"the run has moved on to step {checkpoint.step} since; rerun vqkit eval for current figures")
    keys = ["images", "mse", "psnr", "nll_bits_per_dim", "bits_per_dim", "codes_used", "codebook_size",
            "usage", "perplexity", "mean_batch_perplexity", "maps", "bits_per_code", "uniform_bits_per_code",
            "saving_bits_per_code", "bits_per_dim_with_prior", "kl_bits_per_dim", "kl_per_latent",
            "kl_per_position", "latents", "active_units", "active_fraction", "swap_bits_per_dim"]
    body = "".join(_p(n) for n in notes) + _table([(k, record[k]) for k in keys if k in record])
    levels = record.get("levels") or []
    if len(levels) > 1:
        cols = ("name", "shape", "reduction", "codes_used", "codebook_size", "perplexity", "psnr_upto",
                "psnr_without")
        body += _p("per level, top-first (psnr_upto: decoded from this level and those above; "
                   "psnr_without: with this level zeroed)")
        body += _table([tuple(lv.get(c) for c in cols) for lv in levels], cols)
    return Section(sid, "Last evaluation", body)


def _reconstructions(model, dataset, n: int = 16) -> Section:
    images, _ = dataset.batch(torch.arange(min(n, len(dataset))))
    with torch.no_grad():
        recon = from_model(model.decode(model.encode(to_model(images))))
    # Rows of 8 originals, each above its reconstructions: narrow enough for a phone.
    rows = [part for start in range(0, len(images), 8) for part in (images[start:start + 8], recon[start:start + 8])]
    grid = make_grid(torch.cat(rows), nrow=min(8, len(images)))
    return Section("reconstructions", "Reconstructions",
                   _p(f"the first {len(images)} images of {dataset.spec}, each row of originals above "
                      "its reconstructions") + _img(_png_of(grid, images.shape[-1]), "reconstruction grid"))


def _png_of(grid: torch.Tensor, tile: int = 0) -> bytes:
    """A uint8 grid (C, H, W) as PNG bytes, enlarged (nearest neighbour) by the whole factor
    that brings image tiles of side ``tile`` to about 64 pixels, so small images stay visible."""
    image = rgb_image(grid)
    factor = max(1, 64 // tile) if tile else 1
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image_png(image)


def _inspection_sections(result: InspectOutput) -> list[Section]:
    ins = result.inspection
    sections = []
    for lv, path in zip(ins.levels, result.atlases):
        text = (f"{lv.used} of {lv.codebook_size} codes used over {ins.num_images} images "
                f"({lv.dead} dead), perplexity {lv.perplexity:.1f}. Codes by decreasing use; each cell: "
                f"#code and its count, what a map filled with the code decodes to, then the "
                f"{lv.exemplars.shape[1]} image patches ({lv.crop}x{lv.crop} around the code's "
                f"{lv.stride}x{lv.stride} footprint) nearest to the code vector.")
        sections.append(Section(f"atlas-{lv.name}", f"Codebook atlas ({lv.name})",
                                _p(text) + _img(path.read_bytes(), f"codebook atlas of the {lv.name} level",
                                                wide=True)))
    sections.append(Section("usage", "Code usage", _img(result.usage.read_bytes(), "code usage plot")))
    sections.append(Section("code-maps", "Code maps", _p("each image beside its code map in false colour "
                                                         "(one colour per code)")
                            + _img(result.code_maps.read_bytes(), "code maps")))
    sections.append(Section("pca", "Codebook PCA", _img(result.pca.read_bytes(), "codebook PCA")))
    return sections


def _prior_samples(run: Path, config: dict, sid: str, n: int = 16) -> Section:
    """Samples of a prior that needs no other level's codes, decoded by its stage-1 model."""
    prior, _ = ckpt.load_prior(run)
    if prior.config.cond_codes:
        return Section(sid, "Samples", _p("this prior is conditioned on the levels above it: draw the chain "
                                          "with vqkit sample TOP ... BOTTOM and pass its grid with --extra-image"))
    try:
        model = stage1_of(config, run)
    except ckpt.CheckpointError as e:  # e.g. the stage-1 run trained on after the codes were extracted
        return Section(sid, "Samples", _p(f"no samples: {e}"))
    labels = torch.arange(n) % prior.config.num_classes if prior.config.num_classes else None
    codes = prior_codes(prior, n, labels, seed=0)
    images = model.decode_levels([codes], 1)
    what = ("decoded from the top level alone (the lower levels zeroed)" if model.num_maps > 1
            else "decoded by the stage-1 model")
    grid = make_grid(from_model(images), nrow=8)
    text = f"{n} code maps drawn from the prior (seed 0" + (", labels 0, 1, ... in turn" if labels is not None
                                                             else "") + f"), {what}"
    return Section(sid, "Samples", _p(text) + _img(_png_of(grid, images.shape[-1]), "prior samples"))


def _prior_sections(run: Path, prefix: str, title: str) -> list[Section]:
    config = ckpt.read_config(run, kind="prior")
    checkpoint = ckpt.latest_checkpoint(run)
    parts = [_summary(run, config, checkpoint), _config(config), _validation(run, config),
             _curves(run, "NLL curves"), _eval(run, ckpt.chosen_checkpoint(run)),
             _prior_samples(run, config, "samples")]
    sections = [p for p in parts if p is not None]
    if not prefix:
        return sections
    # Nested under one heading per prior on a stage-1 page.
    body = "".join(f"<h3>{html.escape(s.title)}</h3>{s.body}" for s in sections)
    return [Section(prefix, title, body)]


def _vae_samples(run: Path, n: int = 16) -> Section:
    samples = vae_samples(run, n, seed=0)
    return Section("samples", "Samples", _p(f"{n} samples: z ~ N(0, I), decoded")
                   + _img(_png_of(make_grid(samples, nrow=8), samples.shape[-1]), "samples of the VAE"))


def _collapse_sections(folder: Path) -> list[Section]:
    """The page of a ``vqkit collapse`` folder: its table and its two figures."""
    record = json.loads((folder / COLLAPSE_FILE).read_text())
    cols = ("name", "steps", "bits_per_dim", "kl_per_latent", "kl_per_position", "active_units", "latents",
            "active_fraction", "swap_bits_per_dim", "usage", "psnr", "collapsed")
    settings = record.get("settings", {})
    note = _p(f"{settings.get('data')}, {settings.get('budget')} s of training per model; KL per latent in nats "
              "(a VQ-VAE's: log K per code), swap cost in bits/dim (another image's latents)")
    sections = [Section("collapse", "Posterior collapse", note + _table(
        [tuple(row.get(c) for c in cols) for row in record.get("rows", [])], cols))]
    figures = (("collapse.png", "KL, active units, swap cost"), ("samples.png", "Reconstructions and samples"))
    for name, title in figures:
        if (folder / name).exists():
            sections.append(Section(name.removesuffix(".png") + "-figure", title,
                                    _img((folder / name).read_bytes(), title)))
    return sections


def _extra(index: int, path: Path) -> Section:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format != "PNG":
                buffer = io.BytesIO()
                img.convert("RGB").save(buffer, format="PNG")
                data = buffer.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot decode image ({e})") from None
    return Section(f"extra-{index}", path.name, _img(data, path.name))


def build_report(run: str | Path, out: str | Path, *, data: str | None = None, split: str = "test",
                 limit: int | None = None, inspect_dir: str | Path | None = None,
                 priors: list[str | Path] = (), extra_images: list[str | Path] = (),
                 progress: bool = True) -> Report:
    """Write the report of ``run`` to ``out`` (atomically). For a stage-1 run the atlas
    figures are computed into ``inspect_dir`` (default: ``OUT`` minus its suffix, plus
    ``_files``) on the first ``limit`` images of ``data`` (default: the run's training data),
    ``split``; ``priors`` are prior runs fitted to this run's codes, shown with their curves
    and samples; ``extra_images`` are image files shown at the end."""
    run, out = Path(run), Path(out)
    # Read the extra images first: a bad one fails before the long pass over the data.
    extras = [_extra(i, Path(p)) for i, p in enumerate(extra_images)]
    kind = ckpt.run_kind(run)
    if kind == "prior":
        sections = _prior_sections(run, "", "")
    elif kind is None and (run / COLLAPSE_FILE).exists():
        sections = _collapse_sections(run)
    elif kind == "vae":
        model, checkpoint = ckpt.load_model(run, kinds=("vae",))
        config = ckpt.read_config(run)
        dataset = run_dataset(run, data, split, model.config.in_channels)
        parts = [_summary(run, config, checkpoint), _config(config), _curves(run, "Training curves"),
                 _eval(run, checkpoint), _reconstructions(model, dataset), _vae_samples(run)]
        sections = [p for p in parts if p is not None]
    else:
        model, checkpoint = load_complete(run)
        config = ckpt.read_config(run)
        dataset = run_dataset(run, data, split, model.config.in_channels)
        inspection = inspect_model(model, dataset, limit=limit, progress=progress, split=split,
                                   checkpoint=checkpoint)
        result = write_inspection(inspection, Path(inspect_dir) if inspect_dir else
                                  out.with_name(out.stem + "_files"))
        parts = [_summary(run, config, checkpoint), _config(config), _curves(run, "Training curves"),
                 _eval(run, checkpoint), _reconstructions(model, dataset)]
        sections = [p for p in parts if p is not None] + _inspection_sections(result)
        for i, prior in enumerate(priors):
            sections += _prior_sections(Path(prior), f"prior-{i}", f"Prior: {Path(prior).name}")
    sections += extras
    page = render(f"vqkit report: {run.name}", sections)
    atomic_write_text(out, page)
    return Report(path=out, sections=sections, images=page.count("<img "))
