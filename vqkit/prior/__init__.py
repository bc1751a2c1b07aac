"""Stage-2 priors: autoregressive models of VQ-VAE code maps, and fast exact sampling.

    prior = build_prior(PriorConfig(arch="pixelsnail", codebook_size=512, height=8, width=8))
    loss = prior.nll(codes).mean()                # codes (B, 8, 8) int64; nats per code
    new = sample(prior, 16, temperature=0.9)      # (16, 8, 8) int64

VQ-VAE-2 (Algorithm 2): the bottom prior is conditioned on the top code map through a learned
conditioning stack (``vqkit.prior.condition``):

    bottom = build_prior(PriorConfig(codebook_size=512, height=16, width=16,
                                     cond_codes=[[512, 8, 8]]))    # [K_top, h_top, w_top]
    loss = bottom.nll(bottom_codes, cond_codes=[top_codes]).mean()
    new = sample(bottom, 16, cond_codes=[top_samples])             # top_samples (16, 8, 8)
"""

from .base import IncrementalState, Prior
from .config import PriorConfig
from .pixelcnn import GatedPixelCNN
from .pixelsnail import PixelSNAIL
from .sampling import filtered_probs, sample


def build_prior(config: PriorConfig) -> Prior:
    """The prior that ``config.arch`` names, freshly initialised."""
    return {"pixelcnn": GatedPixelCNN, "pixelsnail": PixelSNAIL}[config.arch](config)


__all__ = ["GatedPixelCNN", "IncrementalState", "PixelSNAIL", "Prior", "PriorConfig", "build_prior",
           "filtered_probs", "sample"]
