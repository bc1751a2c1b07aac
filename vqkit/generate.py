"""Generating images: codes from a prior (or the uniform prior), then the stage-1 decoder."""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .data import from_model
from .model import VQVAE
from .prior import Prior
from .prior.sampling import sample


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


@torch.no_grad()
def decode_codes(model: VQVAE, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Codes (N, h, w) -> uint8 images (N, C, H, W)."""
    return torch.cat([from_model(model.decode(codes[i:i + batch_size]))
                      for i in range(0, len(codes), batch_size)])


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
