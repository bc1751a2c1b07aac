"""The models, in pure torch (they know nothing of files): the quantizers (VQ, FSQ, LFQ, residual VQ),
the encoder and decoder stacks, the likelihoods p(x | z_q) (the autoregressive PixelCNN decoder among
them), the VQ-VAE of any number of levels, the Gaussian VAE beside it and their presets."""

from vqkit.nn.likelihood import (
    GaussianLikelihood,
    LikelihoodOutput,
    LogisticMixtureLikelihood,
    bits_per_dim,
    make_likelihood,
)
from vqkit.nn.pixelcnn import PixelCNNLikelihood
from vqkit.nn.presets import PRESET_IMAGE_SIZE, PRESETS, preset
from vqkit.nn.quantize import CodebookUsage, Quantizer, QuantizerOutput, VectorQuantizer
from vqkit.nn.residual import ResidualVQ
from vqkit.nn.scalar import FSQ, LFQ
from vqkit.nn.vae import GaussianVAE, VAEConfig, VAEOutput
from vqkit.nn.vqvae import (
    VQVAE,
    VQVAE2,
    CodeMap,
    VQVAE2Config,
    VQVAEConfig,
    VQVAEOutput,
    build_model,
    level_names,
    with_quantizer,
)

__all__ = ["FSQ", "LFQ", "CodeMap", "Quantizer", "ResidualVQ", "with_quantizer", "GaussianVAE", "VAEConfig",
           "VAEOutput",
           "CodebookUsage", "GaussianLikelihood", "LikelihoodOutput", "LogisticMixtureLikelihood", "PRESETS",
           "PixelCNNLikelihood", "make_likelihood",
           "PRESET_IMAGE_SIZE", "QuantizerOutput", "VQVAE", "VQVAE2", "VQVAE2Config", "VQVAEConfig", "VQVAEOutput",
           "VectorQuantizer", "bits_per_dim", "build_model", "level_names", "preset"]
