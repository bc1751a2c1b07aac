"""VQ-VAE-2 (Razavi et al. 2019), stage 1: a hierarchy of quantized latent maps.

Every per-level list in this module (``strides``, ``codebook_sizes``, ``codes``, ``z_e``,
``perplexity``, ...) is ordered **top-first**: index 0 is the coarsest map, index -1 the
bottom (finest) one. ``strides[l]`` is the downsampling exponent of level ``l`` relative to the
level below it; the bottom's is relative to the image. ``strides=[1, 2]`` thus puts the bottom
map 4x below the image and the top map 2x below the bottom (the paper's 256x256 model:
64x64 bottom, 32x32 top).

Algorithm 1, generalised to L levels. With ``s_l = 2**strides[l]`` and ``x`` (B, C, H, W):

* Bottom-up features: ``h_{L-1} = E_{L-1}(x)`` (B, hidden, H/s_{L-1}, W/s_{L-1}), then
  ``h_l = E_l(h_{l+1})``, each ``s_l`` times smaller; the top encoder ``E_0`` projects straight
  to the code dimension, so ``z_e_0 = h_0`` (B, D, h_0, w_0).
* Top-down quantization (Figure 2a): ``z_q_0 = Quantize_0(z_e_0)``; a conditioning decoder
  ``c_0 = C_0(z_q_0)`` (transposed convolutions) brings it to level 1's resolution; then for
  each lower level ``z_e_l = P_l([h_l, c_{l-1}])`` (a 1x1 convolution of the concatenation),
  ``z_q_l = Quantize_l(z_e_l)`` and ``c_l = C_l([z_q_l, c_{l-1}])``. ``c_l`` carries every level
  above, so with three levels the bottom is conditioned on the middle *and* the top code.
* Decoder: each higher ``z_q_l`` is upsampled by transposed convolutions ``U_l`` to the bottom
  map's resolution and concatenated with ``z_q_{L-1}`` (B, L*D, h_{L-1}, w_{L-1}); one decoder
  maps that to the likelihood parameters of the image.

Training minimises ``-log p(x | z_q_0..z_q_{L-1})`` plus the eq. 3 codebook and commitment
terms of every level, each level with its own ``VectorQuantizer`` and codebook size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vqkit.config import JsonConfig
from vqkit.nn.likelihood import LikelihoodOutput, make_likelihood
from vqkit.nn.vqvae import check_network_fields
from vqkit.nn.nets import Decoder, Encoder
from vqkit.nn.pretrained import PretrainedMixin
from vqkit.nn.quantize import QuantizerOutput, VectorQuantizer


@dataclass
class VQVAE2Config(JsonConfig):
    """Everything needed to rebuild a VQ-VAE-2; saved as JSON beside its weights.

    ``strides`` and ``codebook_sizes`` have one entry per level, top-first (see the module
    docstring); the other fields mean what they mean in ``VQVAEConfig`` and apply to every level.
    """

    label: ClassVar[str] = "VQ-VAE-2 config"

    in_channels: int = 3
    hidden: int = 128
    res_hidden: int = 32
    num_res_blocks: int = 2
    strides: list[int] = field(default_factory=lambda: [1, 2])
    code_dim: int = 64
    codebook_sizes: list[int] = field(default_factory=lambda: [512, 512])
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.99
    kmeans_init: bool = True
    restart_after: int = 100
    likelihood: str = "gaussian"
    mixtures: int = 5

    def __post_init__(self):
        # Lists, whatever sequence was given: a config read back from JSON must compare equal.
        self.strides = list(self.strides)
        self.codebook_sizes = list(self.codebook_sizes)
        check_network_fields(self)
        if len(self.strides) < 2:
            raise ValueError(f"a VQ-VAE-2 needs at least two levels, got strides={self.strides}; "
                             "use vqkit.nn.vqvae.VQVAE for a single level")
        if len(self.codebook_sizes) != len(self.strides):
            raise ValueError(f"codebook_sizes has {len(self.codebook_sizes)} entries but strides has "
                             f"{len(self.strides)}: give one per level, top-first")
        if any(not isinstance(k, int) or k < 1 for k in self.codebook_sizes):
            raise ValueError(f"codebook_sizes must be positive integers, got {self.codebook_sizes}")
        if any(not isinstance(s, int) for s in self.strides) or self.strides[-1] < 0 \
                or any(s < 1 for s in self.strides[:-1]):
            raise ValueError(f"strides (top-first) must be integers, >= 1 above the bottom level so that "
                             f"each level is coarser than the one below, >= 0 for the bottom; got {self.strides}")

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def total_stride(self) -> int:
        """How many times smaller than the image the top map is, per side."""
        return 2 ** sum(self.strides)

    def latent_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (h, w) of every code map, top-first, for an image of (height, width)."""
        stride = self.total_stride
        if height % stride or width % stride:
            raise ValueError(f"image size {height}x{width} is not divisible by the model's total stride "
                             f"{stride} (strides {self.strides}, top-first)")
        shapes = []
        for level in range(self.num_levels):
            s = 2 ** sum(self.strides[level:])
            shapes.append((height // s, width // s))
        return shapes


PRESETS2: dict[str, VQVAE2Config] = {
    # The paper's 256x256 ImageNet model (64x64 bottom, 32x32 top, K = 512 and D = 64 at each
    # level, EMA codebooks) with the widths of the popular PyTorch reproduction
    # (rosinality/vq-vae-2-pytorch): 128 hidden units, two residual blocks of 32 units.
    "vqvae2-256": VQVAE2Config(in_channels=3, hidden=128, res_hidden=32, num_res_blocks=2,
                               strides=[1, 2], code_dim=64, codebook_sizes=[512, 512],
                               kmeans_init=False, restart_after=0),
    # Three levels laid out as the paper's FFHQ 1024x1024 model (32x32 top, 64x64 middle,
    # 128x128 bottom) with the widths of vqvae2-256.
    "vqvae2-3level": VQVAE2Config(in_channels=3, hidden=128, res_hidden=32, num_res_blocks=2,
                                  strides=[1, 1, 3], code_dim=64, codebook_sizes=[512, 512, 512],
                                  kmeans_init=False, restart_after=0),
    # CPU presets, with k-means initialisation and dead-code restarts as in our `cifar10`.
    # 32x32 images -> 16x16 bottom, 8x8 top.
    "cifar10-2level": VQVAE2Config(in_channels=3, hidden=64, res_hidden=32, num_res_blocks=2,
                                   strides=[1, 1], code_dim=64, codebook_sizes=[512, 512]),
    # 128x128 faces -> 32x32 bottom, 16x16 middle, 8x8 top. The 1,800 training faces give a
    # CPU run a few hundred steps, so unused codes are restarted after 20 steps instead of 100:
    # with 100, a 600 s run left a quarter of the top codebook dead.
    "faces-3level": VQVAE2Config(in_channels=3, hidden=64, res_hidden=32, num_res_blocks=2,
                                 strides=[1, 1, 2], code_dim=64, codebook_sizes=[512, 512, 512],
                                 restart_after=20),
}

# The image side each preset was laid out for (its code map shapes above follow from it).
PRESET2_IMAGE_SIZE = {"vqvae2-256": 256, "vqvae2-3level": 1024, "cifar10-2level": 32,
                      "faces-3level": 128}


def preset2(name: str) -> VQVAE2Config:
    if name not in PRESETS2:
        raise ValueError(f"unknown VQ-VAE-2 preset {name!r}; choose one of {', '.join(PRESETS2)}")
    # A deep copy: the presets' lists must not be shared with (and edited through) a caller's copy.
    return VQVAE2Config.from_dict(PRESETS2[name].to_dict())


@dataclass
class VQVAE2Output:
    """One forward pass. ``loss = recon_loss + vq_loss``; ``vq_loss`` and ``commitment_loss``
    are summed over the levels; ``x_hat`` the expected reconstruction (B, C, H, W) in [-1, 1];
    ``nll`` -log p(x|z_q) in nats per image (B,); ``codes`` (B, h_l, w_l), ``perplexity`` and
    ``usage`` (this batch only) one per level, top-first."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    vq_loss: torch.Tensor
    commitment_loss: torch.Tensor
    nll: torch.Tensor
    x_hat: torch.Tensor
    codes: list[torch.Tensor]
    perplexity: list[torch.Tensor]
    usage: list[torch.Tensor]


def _upsampler(channels: int, steps: int) -> nn.Sequential:
    """``steps`` transposed 4x4 convolutions of stride 2 (as the decoder's), each doubling the side."""
    layers: list[nn.Module] = []
    for i in range(steps):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


# Quantizes level ``l``'s z_e: returns z_q (B, D, h_l, w_l) and the quantizer's output, if any.
_QuantizeFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, QuantizerOutput | None]]


class VQVAE2(nn.Module, PretrainedMixin):
    """Hierarchical VQ-VAE; module lists are top-first: ``encoders[-1]`` sees the image,
    ``conditioners[l]`` and ``upsamplers[l]`` serve level ``l < L-1``, ``pre_quant[l-1]``
    builds level ``l >= 1``'s z_e."""

    model_type: ClassVar[str] = "vqvae2"
    config_class: ClassVar[type] = VQVAE2Config

    def __init__(self, config: VQVAE2Config):
        super().__init__()
        self.config = c = config
        levels = c.num_levels
        d = c.code_dim

        def encoder(level: int, out_channels: int) -> Encoder:
            in_channels = c.in_channels if level == levels - 1 else c.hidden
            return Encoder(in_channels, c.hidden, c.res_hidden, c.num_res_blocks, c.strides[level],
                           out_channels)

        self.encoders = nn.ModuleList(
            [encoder(0, d)] + [encoder(level, c.hidden) for level in range(1, levels)])
        self.pre_quant = nn.ModuleList(nn.Conv2d(c.hidden + d, d, 1) for _ in range(1, levels))
        self.quantizers = nn.ModuleList(
            VectorQuantizer(k, d, beta=c.beta, ema=c.ema, decay=c.decay, kmeans_init=c.kmeans_init,
                            restart_after=c.restart_after) for k in c.codebook_sizes)
        # C_0 sees z_q_0 only; C_l below it sees [z_q_l, c_{l-1}].
        self.conditioners = nn.ModuleList(
            Decoder(d if level == 0 else 2 * d, c.hidden, c.res_hidden, c.num_res_blocks,
                    c.strides[level], d) for level in range(levels - 1))
        self.upsamplers = nn.ModuleList(
            _upsampler(d, sum(c.strides[level:levels - 1])) for level in range(levels - 1))
        self.likelihood = make_likelihood(c.likelihood, c.in_channels, c.mixtures)
        out_channels = self.likelihood.decoder_channels(c.in_channels, c.mixtures) \
            if c.likelihood == "logistic_mixture" else c.in_channels
        self.decoder = Decoder(levels * d, c.hidden, c.res_hidden, c.num_res_blocks, c.strides[-1],
                               out_channels)

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        self.config.latent_shapes(x.shape[2], x.shape[3])

    def _top_down(self, x: torch.Tensor, quantize: _QuantizeFn):
        """Encoder features bottom-up, then z_e and z_q of each level top-down (Algorithm 1).
        Returns the top-first lists z_e, z_q and the quantizer outputs."""
        levels = self.num_levels
        features: list[torch.Tensor] = []
        h = x
        for encoder in reversed(self.encoders):
            h = encoder(h)
            features.append(h)
        features.reverse()
        z_es, z_qs, outs = [], [], []
        cond = None
        for level in range(levels):
            z_e = features[0] if level == 0 else \
                self.pre_quant[level - 1](torch.cat([features[level], cond], 1))
            z_q, out = quantize(level, z_e)
            if level < levels - 1:
                cond = self.conditioners[level](z_q if cond is None else torch.cat([z_q, cond], 1))
            z_es.append(z_e)
            z_qs.append(z_q)
            outs.append(out)
        return z_es, z_qs, outs

    def _decode_z_q(self, z_qs: list[torch.Tensor]) -> torch.Tensor:
        """Top-first z_q maps -> likelihood parameters (B, *, H, W)."""
        maps = [up(z_q) for up, z_q in zip(self.upsamplers, z_qs[:-1])] + [z_qs[-1]]
        return self.decoder(torch.cat(maps, 1))

    def forward(self, x: torch.Tensor) -> VQVAE2Output:
        self._check_input(x)

        def quantize(level: int, z_e: torch.Tensor):
            q = self.quantizers[level](z_e)
            return q.z_q, q

        _, z_qs, qs = self._top_down(x, quantize)
        rec: LikelihoodOutput = self.likelihood(self._decode_z_q(z_qs), x)
        vq_loss = torch.stack([q.loss for q in qs]).sum()
        return VQVAE2Output(loss=rec.loss + vq_loss, recon_loss=rec.loss, vq_loss=vq_loss,
                            commitment_loss=torch.stack([q.commitment_loss for q in qs]).sum(),
                            nll=rec.nll, x_hat=rec.mean, codes=[q.codes for q in qs],
                            perplexity=[q.perplexity for q in qs], usage=[q.usage for q in qs])

    @torch.no_grad()
    def encode_levels(self, x: torch.Tensor, codes: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Pre-quantization ``z_e`` of every level (B, D, h_l, w_l), top-first.

        ``codes``, if given, fixes the codes of the top ``len(codes)`` levels instead of
        quantizing their z_e, so the lower levels' z_e show what they are conditioned on.
        Touches no codebook statistics.
        """
        self._check_input(x)
        if len(codes) > self.num_levels:
            raise ValueError(f"got {len(codes)} code maps for a {self.num_levels}-level model")

        def quantize(level: int, z_e: torch.Tensor):
            quantizer = self.quantizers[level]
            if level < len(codes):
                if codes[level].shape != z_e.shape[:1] + z_e.shape[2:]:
                    raise ValueError(f"level {level} codes have shape {tuple(codes[level].shape)}, "
                                     f"expected {(z_e.shape[0], *z_e.shape[2:])} (codes are top-first)")
                return quantizer.lookup(codes[level]), None
            return quantizer.lookup(quantizer.encode(z_e)), None

        return self._top_down(x, quantize)[0]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h_l, w_l) int64, one map per level, top-first."""
        self._check_input(x)
        codes: list[torch.Tensor] = []

        def quantize(level: int, z_e: torch.Tensor):
            quantizer = self.quantizers[level]
            codes.append(quantizer.encode(z_e))
            return quantizer.lookup(codes[-1]), None

        self._top_down(x, quantize)
        return codes

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Codes of every level (top-first) -> expected images (B, C, H, W), clamped to [-1, 1]."""
        if len(codes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} code maps (top-first), got {len(codes)}")
        return self.decode_levels(codes, self.num_levels)

    @torch.no_grad()
    def decode_levels(self, codes: Sequence[torch.Tensor | None], upto: int) -> torch.Tensor:
        """The view of the paper's Figure 3: the image decoded from the top ``upto`` levels only.

        ``codes`` is top-first; entries from index ``upto`` on may be missing or None and are
        ignored. The quantized maps of the lower levels are replaced by zeros: a zero input adds
        nothing through the first (linear) layers they feed, so the image shows what the given
        levels carry. The decoder never saw zeros there in training, so this is a view of the
        hierarchy, not a sample of the model. ``upto = L`` is ``decode``.
        """
        levels = self.num_levels
        if not 1 <= upto <= levels:
            raise ValueError(f"upto must be in 1..{levels}, got {upto}")
        if len(codes) > levels:
            raise ValueError(f"got {len(codes)} code maps for a {levels}-level model")
        given = list(codes)[:upto]
        if len(given) < upto or any(c is None for c in given):
            missing = next(level for level in range(upto) if level >= len(given) or given[level] is None)
            raise ValueError(f"level {missing} is missing: adding levels can only be decoded in order, "
                             f"so decoding {upto} levels needs the codes of levels 0..{upto - 1} (top-first)")
        top = given[0]
        if top.dim() != 3:
            raise ValueError(f"expected codes (B, h, w), got {tuple(top.shape)} for the top level")
        shapes = [(top.shape[0], top.shape[1] * 2 ** sum(self.config.strides[:level]),
                   top.shape[2] * 2 ** sum(self.config.strides[:level])) for level in range(levels)]
        for level, c in enumerate(given):
            if tuple(c.shape) != shapes[level]:
                raise ValueError(f"level {level} codes have shape {tuple(c.shape)}, expected {shapes[level]} "
                                 "from the top map: codes are top-first, and adding levels can only be "
                                 "decoded in order")
        z_qs = [self.quantizers[level].lookup(c) for level, c in enumerate(given)]
        z_qs += [torch.zeros(b, self.config.code_dim, h, w, device=top.device)
                 for b, h, w in shapes[upto:]]
        return self.likelihood.mean(self._decode_z_q(z_qs)).clamp(-1, 1)

    @torch.no_grad()
    def decode_without(self, codes: Sequence[torch.Tensor], level: int) -> torch.Tensor:
        """Decode every level but ``level``, whose quantized map is replaced by zeros.

        The gap between this and ``decode`` is what that level adds to the reconstruction
        (for the top level: the full model against the lower levels alone). Like
        ``decode_levels`` it is a view of the model, not a sample.
        """
        if len(codes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} code maps (top-first), got {len(codes)}")
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in 0..{self.num_levels - 1}, got {level}")
        z_qs = [self.quantizers[i].lookup(c) for i, c in enumerate(codes)]
        z_qs[level] = torch.zeros_like(z_qs[level])
        return self.likelihood.mean(self._decode_z_q(z_qs)).clamp(-1, 1)


def level_names(num_levels: int) -> list[str]:
    """Names of the levels, top-first: "top", "middle"..., "bottom" ("codes" for one level)."""
    if num_levels == 1:
        return ["codes"]
    middle = ["middle"] if num_levels == 3 else [f"middle{i}" for i in range(1, num_levels - 1)]
    return ["top", *middle, "bottom"]
