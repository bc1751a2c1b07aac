"""Generating images: codes from a prior (or the uniform prior), then the stage-1 decoder.

For a VQ-VAE-2 (Razavi et al. 2019, Algorithm 2, sampling) the codes come from a chain of priors, one
per level, **top-first**: the top map is drawn from the top prior, then each lower level's map
from its prior conditioned on the maps already drawn for the levels above, and the stage-1
decoder turns all levels into images. The chain's links are the model's code maps
(``VQVAEConfig.code_maps``): a residual level's stages each have a prior, stage s's conditioned
on the maps above it (the stages before it, and the levels above), as a lower level's is.

Classifier-based rejection sampling (Razavi et al. 2019, section 3.3; ``reject_codes``) draws
class-conditional samples and keeps those that an image classifier (``vqkit.nn.classifier``)
assigns to their class with at least a given probability: fewer, more typical samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vqkit.data.datasets import from_model, to_model
from vqkit.errors import UsageError
from vqkit.nn.classifier import Classifier
from vqkit.nn.vqvae import VQVAE
from vqkit.prior import Prior
from vqkit.prior.sampling import sample
from vqkit.runs import checkpoint as ckpt


def stage1_of(prior_config: dict, prior_run: Path, device: str | torch.device = "cpu") -> VQVAE:
    """The stage-1 model whose codes the prior was fitted to, on ``device``, checked by fingerprint."""
    source = prior_config.get("source") or {}
    run = source.get("run")
    if not run:
        raise ckpt.CheckpointError(f"{Path(prior_run) / 'config.json'}: does not name its stage-1 run")
    model, checkpoint = ckpt.load_model(Path(run), device)
    if source.get("fingerprint") and checkpoint.state.get("fingerprint") != source["fingerprint"]:
        raise ckpt.CheckpointError(
            f"{run}: its latest checkpoint is not the model the prior's codes came from "
            f"(fingerprint {checkpoint.state.get('fingerprint', '?')[:12]} vs "
            f"{source['fingerprint'][:12]}); re-extract the codes and retrain the prior")
    return model


@dataclass
class LevelPrior:
    """One link of a sampling chain: a prior, its run folder, that run's config.json
    (``run_config``; the prior's own configuration is ``prior.config``) and the checkpoint its
    weights came from (None for a prior built in memory)."""

    run: Path
    prior: Prior
    run_config: dict
    checkpoint: ckpt.Checkpoint | None = None

    @classmethod
    def load(cls, run: str | Path, which: str = ckpt.BEST, device: str | torch.device = "cpu") -> "LevelPrior":
        """The prior of ``run`` at its checkpoint ``which`` (``best`` or ``latest``), on ``device``."""
        return cls(Path(run), *ckpt.load_prior_checkpoint(run, which, device))

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the prior's weights ("" for a prior built in memory)."""
        return self.checkpoint.state.get("fingerprint", "") if self.checkpoint else ""

    @property
    def source(self) -> dict:
        return self.run_config.get("source") or {}

    @property
    def cond_levels(self) -> list[int]:
        """Indices (top-first) of the levels whose maps the prior is conditioned on, as its
        training recorded them; a prior without that record takes the top len(cond_codes)."""
        recorded = self.source.get("cond_level_indices")
        return list(recorded) if recorded is not None else list(range(len(self.prior.config.cond_codes)))


def check_chain(chain: list[LevelPrior], model: VQVAE | None = None) -> VQVAE:
    """Check that ``chain`` is one prior per code map of one stage-1 model, top-first, each
    conditioned on maps the priors above it draw; return that model (loaded from the run the
    priors name and checked by fingerprint, unless the caller gives the model it loaded and
    checked itself), on the device of the first prior. Raises CheckpointError naming the prior run
    that does not fit."""
    if not chain:
        raise UsageError("give at least one prior run")
    first = chain[0]
    model = model if model is not None else stage1_of(first.run_config, first.run, first.prior.device)
    code_maps = model.config.code_maps()
    levels = len(code_maps)
    names = [m.name for m in code_maps]
    if len(chain) != levels:
        what = "level" if levels == model.config.num_levels else "code map (level or residual stage)"
        raise ckpt.CheckpointError(
            f"{first.source.get('run')}: the stage-1 model has {levels} {what.split(' (')[0]}(s) "
            f"({', '.join(names)}), so sampling needs one prior per {what}, top-first; got {len(chain)} "
            "prior run(s)")
    classes = {link.prior.config.num_classes for link in chain} - {None}
    for index, link in enumerate(chain):
        where = f"{Path(link.run) / 'config.json'}"
        if link.source.get("fingerprint") != first.source.get("fingerprint"):
            raise ckpt.CheckpointError(f"{where}: the prior was fitted to codes of another stage-1 model "
                                       f"than {first.run}'s; all priors must come from the same run")
        level = link.source.get("level_index", index)
        if levels > 1 and level != index:
            raise ckpt.CheckpointError(
                f"{where}: the prior of level {link.source.get('level', level)!r} was given in position "
                f"{index + 1}, the place of level {names[index]!r}; give the priors top-first "
                f"({', '.join(names)})")
        c = link.prior.config
        if c.codebook_size != code_maps[index].codebook_size:
            raise ckpt.CheckpointError(f"{where}: the prior draws K={c.codebook_size} codes but level "
                                       f"{names[index]!r} of the stage-1 model has K="
                                       f"{code_maps[index].codebook_size}")
        if any(not 0 <= j < index for j in link.cond_levels):
            raise ckpt.CheckpointError(f"{where}: conditioned on levels {link.cond_levels}, which are not "
                                       f"all above level {names[index]!r}; give the priors top-first "
                                       f"({', '.join(names)})")
        above = [[chain[j].prior.config.codebook_size, chain[j].prior.config.height,
                  chain[j].prior.config.width] for j in link.cond_levels]
        if c.cond_codes != above:
            raise ckpt.CheckpointError(f"{where}: the prior is conditioned on code maps [K, h, w] "
                                       f"{c.cond_codes}, but the priors above draw {above}")
    if len(classes) > 1:
        raise ckpt.CheckpointError(f"the class-conditional priors have different numbers of classes "
                                   f"({sorted(classes)}); they must share one labelling")
    return model


@torch.no_grad()
def chain_codes(chain: list[LevelPrior], n: int, labels: torch.Tensor | None = None,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                seed: int = 0) -> list[torch.Tensor]:
    """Codes of every level (n, h_l, w_l), top-first, drawn level by level from a checked chain;
    ``labels`` go to the class-conditional priors. With one prior it draws ``prior_codes``'s maps."""
    g = torch.Generator().manual_seed(seed)
    maps: list[torch.Tensor] = []
    for link in chain:
        prior = link.prior
        maps.append(sample(prior, n, labels=labels if prior.config.num_classes else None,
                           cond_codes=[maps[j] for j in link.cond_levels], temperature=temperature,
                           top_k=top_k, top_p=top_p, generator=g))
    return maps


def uniform_chain_codes(chain: list[LevelPrior], n: int, seed: int) -> list[torch.Tensor]:
    """Codes of every level drawn from the uniform prior that stage 1 assumes, top-first."""
    return [uniform_codes(n, c.height, c.width, c.codebook_size, seed + level)
            for level, c in enumerate(link.prior.config for link in chain)]


@torch.no_grad()
def decode_codes(model: VQVAE, codes: list[torch.Tensor], batch_size: int = 256,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Every level's codes (N, h_l, w_l), top-first, -> uint8 images (N, C, H, W), decoded
    ``batch_size`` at a time on the model's device. An autoregressive likelihood's samples
    draw from ``generator``, by default one seeded 0 for the whole call, so that the batches
    get different uniforms and the same codes give the same images."""
    device = model.device
    generator = torch.Generator(device).manual_seed(0) if generator is None else generator
    return torch.cat([from_model(model.decode([m[i:i + batch_size].to(device) for m in codes], generator).cpu())
                      for i in range(0, len(codes[0]), batch_size)])


@torch.no_grad()
def vae_samples(run: str | Path, n: int, seed: int) -> torch.Tensor:
    """``n`` images, uint8 (n, C, H, W), of a Gaussian VAE run: ``z ~ N(0, I)`` decoded, at the
    size of the images it was trained on."""
    model, _ = ckpt.load_model(Path(run), kinds=("vae",))
    shape = ckpt.read_config(Path(run)).get("image_shape")
    if shape is None:
        raise ckpt.CheckpointError(f"{Path(run) / 'config.json'}: no image_shape: the run's image size is unknown")
    return from_model(model.sample(n, shape[1], shape[2], torch.Generator().manual_seed(seed)).cpu())


def uniform_codes(n: int, height: int, width: int, codebook_size: int, seed: int) -> torch.Tensor:
    """Codes drawn from the uniform prior that stage 1 assumes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(codebook_size, (n, height, width), generator=g)


def prior_codes(prior: Prior, n: int, labels: torch.Tensor | None = None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> torch.Tensor:
    """Codes (n, h, w) drawn from ``prior`` with the incremental exact sampler."""
    g = torch.Generator().manual_seed(seed)
    return sample(prior, n, labels=labels, temperature=temperature, top_k=top_k, top_p=top_p,
                  generator=g)


def image_shape(model: VQVAE, chain: list[LevelPrior]) -> tuple[int, int, int]:
    """The shape (C, H, W) of the images the chain's code maps decode to."""
    zeros = [torch.zeros(1, link.prior.config.height, link.prior.config.width, dtype=torch.int64)
             for link in chain]
    return tuple(decode_codes(model, zeros).shape[1:])


def check_classifier(classifier: Classifier, run_config: dict, run: str | Path, shape: tuple[int, ...],
                     class_names: list[str] | None = None, num_classes: int | None = None) -> None:
    """Check that the classifier of run ``run`` (its config.json ``run_config``) was trained on
    images of ``shape`` (C, H, W) and, where given, on ``num_classes`` classes named
    ``class_names`` (those of the priors' data); raises CheckpointError naming the file."""
    where = Path(run) / "config.json"
    trained = tuple(run_config.get("data_shape") or ())
    data = (run_config.get("train") or {}).get("data")
    if trained != tuple(shape):
        raise ckpt.CheckpointError(f"{where}: the classifier was trained on images of shape {list(trained)} "
                                   f"({data}), but these images are {list(shape)}; train one on the "
                                   "priors' data (vqkit train-classifier --data ...)")
    if num_classes is not None and classifier.config.num_classes != num_classes:
        raise ckpt.CheckpointError(f"{where}: the classifier tells {classifier.config.num_classes} classes "
                                   f"apart ({data}), the priors {num_classes}; train one on the priors' data")
    names = run_config.get("class_names")
    if class_names and names and list(names) != list(class_names):
        raise ckpt.CheckpointError(f"{where}: the classifier's classes ({', '.join(names[:4])}, ...; {data}) "
                                   f"are not the priors' ({', '.join(class_names[:4])}, ...); train one on "
                                   "the priors' data")


@torch.no_grad()
def label_probability(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 500) -> torch.Tensor:
    """The probability (N,) float32 that ``classifier`` gives each uint8 image (N, C, H, W) of
    being of its label (N,)."""
    classifier.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model(images[start:start + batch_size]).to(classifier.device)
        probs = classifier(x).float().softmax(1).cpu()
        out.append(probs.gather(1, labels[start:start + batch_size, None].cpu())[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class Rejection:
    """What classifier-based rejection sampling kept: every level's codes (k, h_l, w_l),
    top-first, their labels (k,) and the probabilities the classifier gave those labels (k,),
    in the order of the labels asked for (those that were filled), out of ``drawn`` samples."""

    codes: list[torch.Tensor]
    labels: torch.Tensor
    probs: torch.Tensor
    drawn: int
    wanted: int

    @property
    def kept(self) -> int:
        return len(self.labels)

    @property
    def acceptance(self) -> float:
        return self.kept / self.drawn if self.drawn else 0.0

    @property
    def complete(self) -> bool:
        return self.kept == self.wanted

    def summary(self, threshold: float) -> str:
        return (f"kept {self.kept} of {self.drawn} samples drawn, those the classifier gives their class "
                f"with probability >= {threshold:g} (acceptance {100 * self.acceptance:.1f}%)")


@torch.no_grad()
def reject_codes(chain: list[LevelPrior], model: VQVAE, classifier: Classifier, labels: torch.Tensor,
                 threshold: float, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, batch_size: int = 256,
                 max_draws: int | None = None) -> Rejection:
    """Classifier-based rejection sampling (VQ-VAE-2, section 3.3): draw class-conditional samples
    from a checked chain in batches of at most ``batch_size`` and keep those that ``classifier``
    assigns to their class with probability >= ``threshold``, until every label of ``labels``
    (n,) has a sample or ``max_draws`` samples (default 20 n) have been drawn (then ``complete``
    is False: the caller warns). Raises UsageError for a chain without a class-conditional
    prior, and when no sample at all was kept."""
    if not any(link.prior.config.num_classes for link in chain):
        raise UsageError("rejection sampling keeps samples that the classifier assigns to their class, "
                         "so it needs a class-conditional prior (train-prior --conditional)")
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"the rejection threshold is a probability in [0, 1], got {threshold}")
    labels = labels.to(torch.int64).cpu()
    n = len(labels)
    max_draws = 20 * n if max_draws is None else max_draws
    if max_draws < 1:
        raise UsageError(f"max_draws must be >= 1, got {max_draws}")
    filled = torch.zeros(n, dtype=torch.bool)
    kept_codes: list[torch.Tensor] | None = None
    kept_probs = torch.zeros(n)
    drawn = rounds = 0
    while not filled.all() and drawn < max_draws:
        open_slots = (~filled).nonzero()[:, 0]
        rate = max(int(filled.sum()) / drawn if drawn else 1.0, 0.02)
        m = min(batch_size, max_draws - drawn, max(1, math.ceil(len(open_slots) / rate)))
        targets = open_slots.repeat(math.ceil(m / len(open_slots)))[:m]   # the slot each draw aims at
        draw_labels = labels[targets]
        codes = chain_codes(chain, m, draw_labels, temperature, top_k, top_p, seed=seed + 7919 * rounds)
        if kept_codes is None:
            kept_codes = [torch.zeros((n, *c.shape[1:]), dtype=c.dtype) for c in codes]
        probs = label_probability(classifier, decode_codes(model, codes), draw_labels)
        accepted = probs >= threshold
        for label in draw_labels[accepted].unique().tolist():
            draws = (accepted & (draw_labels == label)).nonzero()[:, 0]
            slots = (~filled & (labels == label)).nonzero()[:, 0]
            t = min(len(draws), len(slots))
            for level, c in enumerate(codes):
                kept_codes[level][slots[:t]] = c[draws[:t]].cpu()
            kept_probs[slots[:t]] = probs[draws[:t]]
            filled[slots[:t]] = True
        drawn += m
        rounds += 1
    if not filled.any():
        raise UsageError(f"none of the {drawn} samples drawn reached class probability {threshold:g}; "
                         "lower the threshold (--reject) or draw more (--max-draws)")
    return Rejection(codes=[c[filled] for c in kept_codes], labels=labels[filled], probs=kept_probs[filled],
                     drawn=drawn, wanted=n)


def load_checked_classifier(run: str | Path, model: VQVAE, chain: list[LevelPrior]) -> Classifier:
    """The classifier of run ``run`` (vqkit train-classifier), checked against the images and
    classes of a checked chain (``check_classifier``)."""
    classifier, config = ckpt.load_classifier(run)
    conditional = next((link for link in chain if link.prior.config.num_classes), None)
    check_classifier(classifier, config, run, image_shape(model, chain),
                     conditional.source.get("class_names") if conditional else None,
                     conditional.prior.config.num_classes if conditional else None)
    return classifier
