"""Generating images: codes from a prior (or the uniform prior), then the stage-1 decoder.

For a VQ-VAE-2 (Razavi et al. 2019, Algorithm 2, sampling) the codes come from a chain of priors, one
per level, **top-first**: the top map is drawn from the top prior, then each lower level's map
from its prior conditioned on the maps already drawn for the levels above, and the stage-1
decoder turns all levels into images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vqkit.data.datasets import from_model
from vqkit.errors import UsageError
from vqkit.nn.vqvae import VQVAE, level_names
from vqkit.prior import Prior
from vqkit.prior.sampling import sample
from vqkit.runs import checkpoint as ckpt


def stage1_of(prior_config: dict, prior_run: Path) -> VQVAE:
    """The stage-1 model whose codes the prior was fitted to, checked by fingerprint."""
    source = prior_config.get("source") or {}
    run = source.get("run")
    if not run:
        raise ckpt.CheckpointError(f"{Path(prior_run) / 'config.json'}: does not name its stage-1 run")
    model, checkpoint = ckpt.load_model(Path(run))
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
    def load(cls, run: str | Path, which: str = ckpt.BEST) -> "LevelPrior":
        """The prior of ``run`` at its checkpoint ``which`` (``best`` or ``latest``)."""
        return cls(Path(run), *ckpt.load_prior_checkpoint(run, which))

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
    """Check that ``chain`` is one prior per level of one stage-1 model, top-first, each
    conditioned on maps the priors above it draw; return that model (loaded from the run the
    priors name and checked by fingerprint, unless the caller gives the model it loaded and
    checked itself). Raises CheckpointError naming the prior run that does not fit."""
    if not chain:
        raise UsageError("give at least one prior run")
    first = chain[0]
    model = model if model is not None else stage1_of(first.run_config, first.run)
    levels = model.config.num_levels
    names = level_names(levels)
    if len(chain) != levels:
        raise ckpt.CheckpointError(
            f"{first.source.get('run')}: the stage-1 model has {levels} level(s) ({', '.join(names)}), "
            f"so sampling needs one prior per level, top-first; got {len(chain)} prior run(s)")
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
        if c.codebook_size != model.config.codebook_sizes[index]:
            raise ckpt.CheckpointError(f"{where}: the prior draws K={c.codebook_size} codes but level "
                                       f"{names[index]!r} of the stage-1 model has K="
                                       f"{model.config.codebook_sizes[index]}")
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
def decode_codes(model: VQVAE, codes: list[torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """Every level's codes (N, h_l, w_l), top-first, -> uint8 images (N, C, H, W), decoded
    ``batch_size`` at a time on the model's device."""
    device = model.device
    return torch.cat([from_model(model.decode([m[i:i + batch_size].to(device) for m in codes]).cpu())
                      for i in range(0, len(codes[0]), batch_size)])


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
