"""Named model configurations, one registry for one level and many.

``preset(name)`` returns a fresh copy that the caller may edit; ``PRESET_IMAGE_SIZE`` gives the
image side each preset was laid out for (its code map shapes follow from it).
"""

from __future__ import annotations

from vqkit.errors import ConfigError
from vqkit.nn.vae import VAEConfig
from vqkit.nn.vqvae import StageOneConfig, VQVAE2Config, VQVAEConfig

# Every hierarchical preset trains a light decoder per proper prefix of levels
# (``prefix_training="decoders"``), so that the top levels alone decode to an image (VQ-VAE-2
# Figure 3): on CIFAR-10 in 300 CPU seconds it took the top alone from 12.3 to 23.8 dB and kept
# the full model's PSNR (30.55 dB, the 16x16 one-level model's 30.59); the shared decoder's
# per-prefix loss gave the same top for 0.7 dB of the full model (README).
PRESETS: dict[str, StageOneConfig | VAEConfig] = {
    # VQ-VAE section 4.1: two stride-2 4x4 convolutions, two residual blocks, 256 hidden units,
    # K = 512; plain codebook loss as in the paper's main experiments. 32x32 -> 8x8 codes.
    "cifar10-paper": VQVAEConfig(in_channels=3, hidden=256, res_hidden=256, num_res_blocks=2,
                                 downsample=2, code_dim=64, codebook_size=512, ema=False,
                                 kmeans_init=False, restart_after=0),
    # Our CIFAR-10 preset for a CPU budget: one downsampling step (16x16 codes), 64 hidden
    # units (in 120 s of CPU training it beat 128 units by 1.7 dB: more steps per second),
    # EMA codebook with k-means initialisation and dead-code restarts. Train it with lr 1e-3.
    "cifar10": VQVAEConfig(in_channels=3, hidden=64, res_hidden=32, num_res_blocks=2,
                           downsample=1, code_dim=64, codebook_size=512),
    # 28x28 grey images (MNIST, Fashion-MNIST) -> 7x7 codes.
    "mnist": VQVAEConfig(in_channels=1, hidden=64, res_hidden=32, num_res_blocks=2,
                         downsample=2, code_dim=32, codebook_size=256),
    # Small enough to train in a couple of minutes on two CPU cores.
    "demo": VQVAEConfig(in_channels=1, hidden=48, res_hidden=24, num_res_blocks=1,
                        downsample=2, code_dim=16, codebook_size=128, restart_after=50),
    # VQ-VAE-2's 256x256 ImageNet model (64x64 bottom, 32x32 top, K = 512 and D = 64 at each
    # level, EMA codebooks) with the widths of the popular PyTorch reproduction
    # (rosinality/vq-vae-2-pytorch): 128 hidden units, two residual blocks of 32 units.
    "vqvae2-256": VQVAE2Config(in_channels=3, hidden=128, res_hidden=32, num_res_blocks=2,
                               strides=[1, 2], code_dim=64, codebook_sizes=[512, 512],
                               kmeans_init=False, restart_after=0, prefix_training="decoders"),
    # Three levels laid out as the paper's FFHQ 1024x1024 model (32x32 top, 64x64 middle,
    # 128x128 bottom) with the widths of vqvae2-256.
    "vqvae2-3level": VQVAE2Config(in_channels=3, hidden=128, res_hidden=32, num_res_blocks=2,
                                  strides=[1, 1, 3], code_dim=64, codebook_sizes=[512, 512, 512],
                                  kmeans_init=False, restart_after=0, prefix_training="decoders"),
    # CPU presets, with k-means initialisation and dead-code restarts as in our `cifar10`.
    # 32x32 images -> 16x16 bottom, 8x8 top.
    "cifar10-2level": VQVAE2Config(in_channels=3, hidden=64, res_hidden=32, num_res_blocks=2,
                                   strides=[1, 1], code_dim=64, codebook_sizes=[512, 512],
                                   prefix_training="decoders"),
    # 28x28 grey images -> 14x14 bottom, 7x7 top. On Fashion-MNIST (900 CPU s, 1 thread) it
    # reconstructs at 32.3 dB, and its class-conditional samples (a 7x7 top prior, a 14x14 bottom
    # prior given the top) were classified as their class more often than those of `mnist` (7x7,
    # 24 dB: 82.7%) or of a one-level 14x14 model (31.1 dB, whose flat prior loses the global
    # shape: 77.5%): 84.2% (README, "scores").
    "mnist-2level": VQVAE2Config(in_channels=1, hidden=64, res_hidden=32, num_res_blocks=2,
                                 strides=[1, 1], code_dim=32, codebook_sizes=[256, 256],
                                 prefix_training="decoders"),
    # 128x128 faces -> 32x32 bottom, 16x16 middle, 8x8 top. The 1,800 training faces give a batch-32
    # CPU run a few hundred steps, so unused codes are restarted after 20 steps instead of 100:
    # with 100, a 600 s run left a quarter of the top codebook dead. Prefix decoders at 64x64:
    # better on every level than at 128x128 over three seeds, and cheaper (README). Train it with
    # lr 1e-3 and batch 8: at 600 CPU s, 1.4 to 1.8 dB above batch 32 on all levels (README).
    "faces-3level": VQVAE2Config(in_channels=3, hidden=64, res_hidden=32, num_res_blocks=2,
                                 strides=[1, 1, 2], code_dim=64, codebook_sizes=[512, 512, 512],
                                 restart_after=20, prefix_training="decoders", prefix_scale=2),
    # Gaussian VAEs on the trunks of `mnist` and `cifar10`, the baseline of `vqkit collapse`
    # (VQ-VAE section 3.1: a VAE's posterior collapses under a strong decoder; VQ-VAE's cannot):
    # 7x7x8 latents for 28x28 grey images, 8x8x16 for 32x32 colour ones.
    "vae-mnist": VAEConfig(in_channels=1, hidden=64, res_hidden=32, num_res_blocks=2, downsample=2, code_dim=8),
    "vae-cifar10": VAEConfig(in_channels=3, hidden=64, res_hidden=32, num_res_blocks=2, downsample=2,
                             code_dim=16),
}

PRESET_IMAGE_SIZE = {"cifar10-paper": 32, "cifar10": 32, "mnist": 28, "demo": 28, "vqvae2-256": 256,
                     "vqvae2-3level": 1024, "cifar10-2level": 32, "mnist-2level": 28, "faces-3level": 128,
                     "vae-mnist": 28, "vae-cifar10": 32}


def preset(name: str) -> StageOneConfig | VAEConfig:
    """A copy of the preset ``name`` (its lists are not shared with the registry)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]
    return type(config).from_dict(config.to_dict())
