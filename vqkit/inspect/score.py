"""``vqkit score``: how good a prior's samples are, measured against real images with vqkit's
own classifier (``vqkit train-classifier``; no pretrained Inception network is assumed).

One table, one row per set of ``n`` images, every set compared with the same ``n`` real
held-out reference images (test-split images the classifier, stage 1 and the priors never
trained on):

* **real held-out**: ``n`` other test images, the floor that finite sets allow;
* **reconstructions**: those test images through stage 1 (the best the decoder can do);
* **uniform prior**: every level's codes uniform, as stage 1 assumes;
* **prior**: the chain's samples (``temperature``, ``top_k``, ``top_p``); class-conditional
  priors draw ``n / C`` samples of each class;
* **prior, rejection P** (with ``reject``): samples kept only when the classifier gives their
  class probability >= P (VQ-VAE-2 section 3.3), with the acceptance rate.

The columns: the classifier's **accuracy** on the images against their labels (the class a
sample was drawn for; a prior without classes has none); the **Classification Accuracy Score**
(Ravuri and Vinyals 2019): a classifier of the same configuration trained from scratch on these
images alone (``cas_steps`` steps) and tested on the whole real test split, beside it the share
of the real row's score (the same training on ``n`` real training images); and, in the
classifier's feature space (its penultimate layer), the **Fréchet distance** of the Gaussians
fitted to the features and the k-NN **precision** and **recall** (Kynkäänniemi et al. 2019, k=3)
against the reference images (``vqkit.inspect.metrics``). The k-NN precision is generous to
sets that collapse onto a few outlying real images: their large balls cover them (Fashion-MNIST,
2,000 reference images: 73% of uniform-prior samples lie in the balls of 23 real images, the 1%
of largest radii), so read it beside recall and the Fréchet distance.

Below the table, the classifier's accuracy by class for every row with classes: beside the
real row, the reconstructions' column shows the classes that stage 1 loses and the prior's those
that the prior loses (``class_accuracies`` in ``score.json``, by class index).

``sweep`` adds precision and recall over rejection thresholds, temperatures and top-k, the trade
between quality and diversity, to ``score.json`` and ``score.png``.

Importing this module does not load matplotlib (the command line builds its options from
``ScoreSettings``); drawing ``score.png`` does.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vqkit.data.datasets import ImageSet, from_model, load_dataset, to_model
from vqkit.errors import UsageError
from vqkit.fsutil import atomic_write_bytes, atomic_write_text
from vqkit.inspect.metrics import frechet_distance_of, precision_recall
from vqkit.nn.classifier import Classifier
from vqkit.nn.vqvae import VQVAE
from vqkit.precision import resolve_device
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import (
    LevelPrior,
    chain_codes,
    check_chain,
    check_classifier,
    decode_codes,
    reject_codes,
    uniform_chain_codes,
)
from vqkit.training.classifier import ClassifierTrainConfig, accuracy, classify, fit_classifier

log = logging.getLogger(__name__)

SCORE_FILE = "score.json"
PLOT_FILE = "score.png"
# The settings a sweep varies, one at a time from the row settings (temperature 1, no top-k).
SWEEP_THRESHOLDS = (0.5, 0.9, 0.99)
SWEEP_TEMPERATURES = (0.7, 0.85, 1.0, 1.15)
SWEEP_TOP_K = (4, 16, 64)


@dataclass
class ScoreSettings:
    """What ``score_chain`` draws and measures.

    Args:
        n: images per row, and reference images (at most half the test split).
        seed: seeds the choice of real images and the samples.
        temperature: the priors' sampling temperature.
        top_k: sample from the k most probable codes only.
        top_p: sample from the smallest set of codes whose probability reaches this only.
        reject: add a row of samples kept only when the classifier gives their class at least this
            probability (rejection sampling; class-conditional priors).
        max_draws: rejection draws at most this many samples per row (default 20 n).
        cas: measure the Classification Accuracy Score (trains a classifier per row).
        cas_steps: training steps of each CAS classifier.
        sweep: also plot precision against recall over rejection thresholds, temperatures and top-k.
        k: neighbours of the precision/recall manifolds.
        batch_size: images per batch when decoding, classifying and sampling.
        device: where the priors, the stage-1 model and the classifiers run: auto (CUDA when
            present, else the CPU), cpu, cuda or cuda:N.
    """

    n: int = 2000
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    reject: float | None = None
    max_draws: int | None = None
    cas: bool = True
    cas_steps: int = 500
    sweep: bool = False
    k: int = 3
    batch_size: int = 256
    device: str = "auto"

    def __post_init__(self):
        if self.n <= self.k:
            raise UsageError(f"-n must exceed k={self.k} (the neighbours of precision and recall), got {self.n}")
        if self.cas_steps < 1:
            raise UsageError(f"cas_steps must be >= 1, got {self.cas_steps}")


@dataclass
class ScoreRow:
    """One row of the table; None where a column does not apply (``note`` says why)."""

    name: str
    images: int
    class_accuracy: float | None = None
    class_accuracies: list[float | None] | None = None   # per class index; None where no image has it
    cas: float | None = None
    cas_ratio: float | None = None
    frechet_distance: float | None = None
    precision: float | None = None
    recall: float | None = None
    acceptance: float | None = None
    notes: list[str] = field(default_factory=list)


def feature_scores(reference: torch.Tensor, features: torch.Tensor, k: int = 3) -> dict:
    """Fréchet distance, precision and recall of ``features`` (N, F) against ``reference`` (M, F)."""
    precision, recall = precision_recall(reference, features, k=k)
    return {"frechet_distance": frechet_distance_of(reference, features), "precision": precision, "recall": recall}


@dataclass
class _Context:
    """What every row is measured with."""

    classifier: Classifier
    classifier_run: Path
    reference: torch.Tensor          # (n, F) features of the reference images
    test_images: torch.Tensor        # uint8 (T, C, H, W): the whole test split, for CAS
    test_labels: torch.Tensor
    settings: ScoreSettings
    work: Path
    class_names: list[str] | None

    def cas(self, name: str, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy on the real test split of a classifier trained on ``images`` alone."""
        saved = ckpt.read_config(self.classifier_run, kind="classifier")
        train = ClassifierTrainConfig(**{**saved["train"], "data": f"{name} ({len(images)} images in memory)",
                                         "steps": self.settings.cas_steps, "time_budget": None,
                                         "batch_size": min(saved["train"]["batch_size"], len(images)),
                                         "checkpoint_every": self.settings.cas_steps,
                                         "seed": self.settings.seed, "device": self.settings.device})
        run = self.work / name.replace(" ", "-").replace(",", "")
        model = fit_classifier(run, images, labels, self.classifier.config, train, self.class_names)
        return accuracy(model, self.test_images, self.test_labels)


def _row(ctx: _Context, name: str, images: torch.Tensor, labels: torch.Tensor | None,
         cas_images: torch.Tensor | None = None, cas_labels: torch.Tensor | None = None,
         notes: Sequence[str] = ()) -> ScoreRow:
    """Score ``images`` (with the labels they should show, or None); the CAS classifier trains on
    ``cas_images`` (default: the images themselves) with ``cas_labels``."""
    probs, feats = classify(ctx.classifier, images, ctx.settings.batch_size)
    row = ScoreRow(name, len(images), notes=list(notes), **feature_scores(ctx.reference, feats, ctx.settings.k))
    if labels is None:
        row.notes.append("no class accuracy or CAS: the images carry no class")
        return row
    hits = (probs.argmax(1) == labels).float()
    row.class_accuracy = float(hits.mean())
    row.class_accuracies = per_class_accuracy(hits, labels, ctx.classifier.config.num_classes)
    if ctx.settings.cas:
        cas_images = images if cas_images is None else cas_images
        row.cas = ctx.cas(name, cas_images, labels if cas_labels is None else cas_labels)
    return row


def per_class_accuracy(hits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """The share of ``hits`` (N,), 1 where the classifier was right, among the images of each
    class of ``labels`` (N,): a list of ``num_classes``, None for a class without images."""
    counts = torch.bincount(labels, minlength=num_classes)
    right = torch.bincount(labels, weights=hits, minlength=num_classes)
    return [float(r / c) if c else None for r, c in zip(right.tolist(), counts.tolist())]


def _stage1_data(chain: list[LevelPrior]) -> tuple[ImageSet, ImageSet]:
    """The training and test splits of the data the priors' stage-1 model was trained on."""
    run = Path(chain[0].source["run"])
    train = ckpt.read_config(run)["train"]
    size = train.get("image_size")
    return load_dataset(train["data"], "train", image_size=size), load_dataset(train["data"], "test", image_size=size)


@torch.no_grad()
def _reconstruct(model: VQVAE, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model(images[start:start + batch_size]).to(model.device)
        out.append(from_model(model.decode(model.encode(x)).cpu()))
    return torch.cat(out)


def score_chain(prior_runs: Sequence[str | Path], classifier_run: str | Path, out: str | Path,
                settings: ScoreSettings | None = None, progress: bool = False, which: str = ckpt.BEST) -> dict:
    """Score the samples of a chain of priors (top-first, as ``vqkit sample`` takes them, each at
    its checkpoint ``which``: ``best`` or ``latest``) with the classifier of ``classifier_run``;
    write ``out/score.json`` and ``out/score.png`` and return the record (see the module
    docstring)."""
    settings = settings or ScoreSettings()
    out, classifier_run = Path(out), Path(classifier_run)
    device = resolve_device(settings.device)
    chain = [LevelPrior.load(run, which, device) for run in prior_runs]
    model = check_chain(chain)
    classifier, classifier_config = ckpt.load_classifier(classifier_run)
    classifier.to(device)
    train_set, test_set = _stage1_data(chain)
    conditional = next((link for link in chain if link.prior.config.num_classes), None)
    num_classes = conditional.prior.config.num_classes if conditional else None
    class_names = (conditional.source.get("class_names") if conditional else None) or train_set.class_names
    shape = (test_set.channels, test_set.height, test_set.width)
    check_classifier(classifier, classifier_config, classifier_run, shape, class_names, num_classes)
    if (num_classes or train_set.num_classes) != classifier.config.num_classes:
        raise ckpt.CheckpointError(f"{classifier_run / 'config.json'}: the classifier tells "
                                   f"{classifier.config.num_classes} classes apart, {train_set.spec} has "
                                   f"{train_set.num_classes}")

    n = min(settings.n, len(test_set) // 2, len(train_set))
    notes = [] if n == settings.n else [f"n lowered from {settings.n} to {n}: the reference and the real row "
                                        f"take two disjoint halves of the {len(test_set)} test images"]
    if n <= settings.k:
        raise UsageError(f"{test_set.spec}: {len(test_set)} test images are too few to score {n} per row")
    g = torch.Generator().manual_seed(settings.seed)
    test_perm = torch.randperm(len(test_set), generator=g)
    train_pick = torch.randperm(len(train_set), generator=g)[:n]
    test_images, test_labels = test_set.batch(torch.arange(len(test_set)))
    reference_images = test_images[test_perm[:n]]
    held, held_labels = test_images[test_perm[n:2 * n]], test_labels[test_perm[n:2 * n]]
    train_images, train_labels = train_set.batch(train_pick)
    _, reference = classify(classifier, reference_images, settings.batch_size)

    labels = torch.arange(n) % num_classes if num_classes else None
    rows: list[ScoreRow] = []
    sweep: list[dict] = []
    with tempfile.TemporaryDirectory(prefix=".cas-", dir=_mkdir(out)) as work:
        ctx = _Context(classifier, classifier_run, reference, test_images, test_labels, settings, Path(work),
                       class_names)
        step = _progress(progress)
        step("real held-out images")
        cas_note = lambda text: [text] if settings.cas else []
        rows.append(_row(ctx, "real held-out", held, held_labels, cas_images=train_images, cas_labels=train_labels,
                         notes=cas_note("CAS: trained on n real training images")))
        step("reconstructions")
        rows.append(_row(ctx, "reconstructions", _reconstruct(model, held, settings.batch_size), held_labels,
                         cas_images=_reconstruct(model, train_images, settings.batch_size), cas_labels=train_labels,
                         notes=["of the real held-out images", *cas_note("CAS: of the real training images")]))
        step("uniform prior")
        uniform = decode_codes(model, uniform_chain_codes(chain, n, settings.seed), settings.batch_size)
        rows.append(_row(ctx, "uniform prior", uniform, labels,
                         notes=["labels assigned as for the prior's samples"] if labels is not None else []))
        step("prior samples")
        rows.append(_row(ctx, "prior", _samples(chain, model, n, labels, settings), labels,
                         notes=[_sampling(settings)]))
        if settings.reject is not None:
            step(f"prior with rejection at {settings.reject:g}")
            if labels is None:
                rows.append(ScoreRow(f"prior, rejection {settings.reject:g}", 0,
                                     notes=["left out: rejection needs a class-conditional prior"]))
            else:
                rows.append(_rejection_row(ctx, chain, model, labels, settings.reject, settings))
        real_cas = rows[0].cas
        for row in rows:
            if row.cas is not None and real_cas:
                row.cas_ratio = row.cas / real_cas
        if settings.sweep:
            sweep = _sweep(ctx, chain, model, labels, settings, step)

    record = {"priors": [str(Path(r).resolve()) for r in prior_runs],
              "classifier": str(classifier_run.resolve()),
              "classifier_step": ckpt.latest_checkpoint(classifier_run).step,
              "data": test_set.spec, "reference": f"{n} real test images", "n": n, "k": settings.k,
              "class_names": class_names,
              "settings": asdict(settings), "notes": notes,
              "rows": [asdict(row) for row in rows], "sweep": sweep}
    atomic_write_text(out / SCORE_FILE, json.dumps(record, indent=2) + "\n")
    from vqkit.inspect.figures import figure_png  # matplotlib, loaded only to draw

    atomic_write_bytes(out / PLOT_FILE, figure_png(score_figure(record)))
    return record


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _progress(enabled: bool):
    def step(what: str) -> None:
        if enabled:
            print(f"scoring: {what}", flush=True)
    return step


def _sampling(settings: ScoreSettings, temperature: float | None = None, top_k: int | None = None) -> str:
    t = settings.temperature if temperature is None else temperature
    k = settings.top_k if top_k is None else top_k
    parts = [f"temperature {t:g}"] + ([f"top-k {k}"] if k else []) + ([f"top-p {settings.top_p:g}"]
                                                                        if settings.top_p else [])
    return ", ".join(parts)


def _samples(chain, model, n, labels, settings, temperature=None, top_k=None) -> torch.Tensor:
    """``n`` decoded samples, in batches (so that memory stays bounded), seeded by the settings."""
    t = settings.temperature if temperature is None else temperature
    k = settings.top_k if top_k is None else top_k
    images = []
    for batch, start in enumerate(range(0, n, settings.batch_size)):
        m = min(settings.batch_size, n - start)
        codes = chain_codes(chain, m, None if labels is None else labels[start:start + m], t, k, settings.top_p,
                            seed=settings.seed + 1 + batch)
        images.append(decode_codes(model, codes, settings.batch_size))
    return torch.cat(images)


def _rejection_row(ctx: _Context, chain, model, labels, threshold: float, settings: ScoreSettings) -> ScoreRow:
    name = f"prior, rejection {threshold:g}"
    try:
        kept = reject_codes(chain, model, ctx.classifier, labels, threshold, settings.temperature, settings.top_k,
                            settings.top_p, seed=settings.seed + 1, batch_size=settings.batch_size,
                            max_draws=settings.max_draws)
    except UsageError as e:
        return ScoreRow(name, 0, acceptance=0.0, notes=[f"left out: {e}"])
    notes = [f"{_sampling(settings)}; {kept.summary(threshold)}"]
    if not kept.complete:
        notes.append(f"only {kept.kept} of {kept.wanted} kept within {kept.drawn} draws")
    if kept.kept <= settings.k:
        return ScoreRow(name, kept.kept, acceptance=kept.acceptance,
                        notes=notes + ["too few kept to score"])
    row = _row(ctx, name, decode_codes(model, kept.codes, settings.batch_size),
               kept.labels, notes=notes)
    row.acceptance = kept.acceptance
    return row


def _sweep(ctx: _Context, chain, model, labels, settings: ScoreSettings, step) -> list[dict]:
    """Precision, recall, Fréchet distance and class accuracy (no CAS) of the prior's samples
    as one setting at a time moves away from the row settings."""
    points = []
    plain = replace(ctx, settings=replace(settings, cas=False))

    def point(family: str, value, images, point_labels, acceptance=None) -> None:
        row = _row(plain, family, images, point_labels)
        points.append({"family": family, "value": value, "images": row.images, "precision": row.precision,
                       "recall": row.recall, "frechet_distance": row.frechet_distance,
                       "class_accuracy": row.class_accuracy, "acceptance": acceptance})

    if labels is not None:
        for threshold in SWEEP_THRESHOLDS:
            step(f"sweep: rejection at {threshold:g}")
            try:
                kept = reject_codes(chain, model, ctx.classifier, labels, threshold, settings.temperature,
                                    settings.top_k, settings.top_p, seed=settings.seed + 1,
                                    batch_size=settings.batch_size, max_draws=settings.max_draws)
            except UsageError as e:
                log.warning("sweep: %s", e)
                continue
            if kept.kept > settings.k:
                point("threshold", threshold, decode_codes(model, kept.codes, settings.batch_size), kept.labels,
                      kept.acceptance)
    for temperature in SWEEP_TEMPERATURES:
        step(f"sweep: temperature {temperature:g}")
        point("temperature", temperature, _samples(chain, model, len(ctx.reference), labels, settings,
                                                   temperature=temperature), labels)
    codebook = chain[-1].prior.config.codebook_size
    for top_k in (k for k in SWEEP_TOP_K if k < codebook):
        step(f"sweep: top-k {top_k}")
        point("top_k", top_k, _samples(chain, model, len(ctx.reference), labels, settings, top_k=top_k), labels)
    return points


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _columns(head: list[str], lines: list[list[str]]) -> list[str]:
    """A plain-text table: the head, a rule, the lines; the first column left-aligned."""
    widths = [max(len(line[i]) for line in [head, *lines]) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in [head, *lines]]
    text.insert(1, "  ".join("-" * w for w in widths))
    return text


def table(record: dict) -> str:
    """The rows of a score record as a plain-text table (then the notes)."""
    head = ["images", "n", "classifier accuracy", "CAS", "CAS / real", "Fréchet distance", "precision", "recall",
            "acceptance"]
    lines = [[r["name"], str(r["images"]), _fmt(r["class_accuracy"], True), _fmt(r["cas"], True),
              _fmt(r["cas_ratio"], True), _fmt(r["frechet_distance"]), _fmt(r["precision"]), _fmt(r["recall"]),
              _fmt(r["acceptance"], True)] for r in record["rows"]]
    text = _columns(head, lines)
    text.append(f"reference: {record['reference']} of {record['data']}; Fréchet distance, precision and recall "
                f"(k={record['k']}) in the classifier's features")
    for r in record["rows"]:
        text += [f"{r['name']}: {note}" for note in r["notes"]]
    text += record["notes"]
    text += _class_table(record)
    if record["sweep"]:
        text.append("sweep (precision / recall / Fréchet distance / classifier accuracy):")
        text += [f"  {p['family']} {p['value']:g}: {_fmt(p['precision'])} / {_fmt(p['recall'])} / "
                 f"{_fmt(p['frechet_distance'])} / {_fmt(p['class_accuracy'], True)}"
                 + (f", acceptance {_fmt(p['acceptance'], True)}" if p["acceptance"] is not None else "")
                 + (f" ({p['images']} images: the cap on draws was reached)" if p["images"] != record["n"] else "")
                 for p in record["sweep"]]
    return "\n".join(text)


def _class_table(record: dict) -> list[str]:
    """The classifier's accuracy by class (a line per class, a column per row with classes),
    which tells the classes that stage 1 loses (reconstructions) from those the prior loses."""
    rows = [r for r in record["rows"] if r.get("class_accuracies")]
    if not rows:
        return []
    count = len(rows[0]["class_accuracies"])
    names = record.get("class_names") or [str(i) for i in range(count)]
    head = ["class", *(r["name"] for r in rows)]
    lines = [[names[c], *(_fmt(r["class_accuracies"][c], True) for r in rows)] for c in range(count)]
    return ["classifier accuracy by class:", *_columns(head, lines)]


def score_figure(record: dict):
    """Precision against recall, a matplotlib ``Figure``: one marker per row of the table and,
    after a sweep, one line per setting swept (rejection threshold, temperature, top-k), each
    point labelled with its value."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 5.2))
    ax = fig.subplots()
    markers = "osD^v<>p*h"
    for i, row in enumerate(r for r in record["rows"] if r["precision"] is not None):
        ax.scatter([row["recall"]], [row["precision"]], marker=markers[i % len(markers)], s=60, zorder=3,
                   label=row["name"])
    for family, colour in (("threshold", "tab:red"), ("temperature", "tab:blue"), ("top_k", "tab:green")):
        points = [p for p in record["sweep"] if p["family"] == family]
        if not points:
            continue
        x, y = np.array([p["recall"] for p in points]), np.array([p["precision"] for p in points])
        ax.plot(x, y, "-", color=colour, alpha=0.7, label=f"sweep: {family.replace('_', '-')}")
        for p, xi, yi in zip(points, x, y):
            ax.annotate(f"{p['value']:g}", (xi, yi), fontsize=7, color=colour, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"recall (k={record['k']}, classifier features)")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    kind = str(record["data"]).split(":")[0]
    ax.set_title(f"samples against {record['reference']} ({kind})", fontsize=9)
    fig.subplots_adjust(left=0.09, right=0.72, bottom=0.1, top=0.93)
    return fig
