"""VQ-VAE (van den Oord et al. 2017) and VQ-VAE-2 (Razavi et al. 2019): one model, any number
of quantized latent maps.

A model is always a list of levels, **top-first**: index 0 is the coarsest map, index -1 the
bottom (finest) one; a VQ-VAE is the one-element case. Every per-level list in this module
(``strides``, ``codebook_sizes``, ``codes``, ``z_e``, ``perplexity``, ...) is ordered so.
``strides[l]`` is the downsampling exponent of level ``l`` relative to the level below it; the
bottom's is relative to the image. ``strides=[1, 2]`` thus puts the bottom map 4x below the
image and the top map 2x below the bottom (the paper's 256x256 model: 64x64 bottom, 32x32 top);
a VQ-VAE's ``strides`` is ``[downsample]``.

Algorithm 1, for L levels. With ``s_l = 2**strides[l]`` and ``x`` (B, C, H, W) in [-1, 1]:

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
  maps that to the likelihood parameters of the image (with the autoregressive ``pixelcnn``
  likelihood, to the features that condition its PixelCNN over the pixels; ``decode`` then
  samples, see ``vqkit.nn.pixelcnn``).

With one level this is exactly the VQ-VAE of section 4.1: encoder, quantizer, decoder.
Training minimises eq. 3, ``-log p(x | z_q_0..z_q_{L-1})`` plus the codebook and commitment
terms ``||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2`` of every level, each level with its own
``VectorQuantizer`` and codebook size.

Prefixes (Figure 3: "each latent map adds extra detail"). ``decode_levels(codes, p)`` decodes
the top ``p`` levels alone. Trained as above, the decoder has only ever seen every level, and
the bottom map ends up carrying nearly everything (layer collapse), so a prefix decodes to a
grey blur. ``VQVAE2Config.prefix_training`` trains the prefixes too, adding the reconstruction
loss of every proper prefix ``p < L`` to eq. 3, in one of two ways:

* ``"decoders"``: each proper prefix has a light decoder of its own ``D_p`` (half the trunk's
  widths, one residual block) over the prefix's maps at the bottom map's resolution, the loss
  ``sum_{p < L} ||x - D_p([U_0 z_q_0, .., U_{p-1} z_q_{p-1}])||^2``. The full decoder sees
  only whole hierarchies; the prefix losses reach the shared encoders, upsamplers and
  codebooks, which is what makes the top levels carry the global structure.
* ``"loss"``: the shared decoder decodes the prefixes too, each missing map ``l >= p`` entering
  as a learned "absent" vector ``a_l`` (D,) at the bottom map's resolution (in place of
  ``U_l(z_q_l)``): ``sum_{p < L} ||x - D([U_0 z_q_0, .., U_{p-1} z_q_{p-1}, a_p, .., a_{L-1}])||^2``.

Measured at equal CPU time (README), the light decoders beat the shared one on every prefix of
the 128x128 faces and cost less (a faces step 1.4x of ``"off"`` against 2.3x), and
``prefix_share`` (the share of each batch whose prefixes are decoded) makes either cheaper.
``prefix_scale`` stops the light decoders at a fraction of the image's side, upsampling their
output bilinearly: on the faces at scale 2, 0.41 dB more for the full model and 0.22 dB more
for the top, the mean of three seeds (README).
Level dropout (each batch decoded from a random prefix) lost on every prefix and is not offered.

A model without prefix training (``"off"``, every run made before the field existed) decodes a
prefix with zeros for the missing maps, as it always did.

The config's ``quantizer`` chooses another quantizer (``vqkit.nn.quantizers``): one spec for
every level, or a list of one per level, top-first, e.g. ``{"kind": "fsq", "levels": [8, 5, 5,
5]}``; each level's quantizer takes and gives D channels, so the rest of the model is the same.
Left out (None), it is the VQ above, and the config's dict has no ``quantizer`` entry, as before
the field existed, so that older runs and the fingerprints of their codec files are unchanged.

Code maps. What the model encodes to and decodes from is a list of **code maps**, top-first
(``config.code_maps()``): one per level, except that a residual level (``{"kind": "residual",
"stages": S}``, ``vqkit.nn.residual``) gives S maps of its own resolution, stage 0 first, each of
the level's codebook size. ``encode``, ``decode``, ``decode_levels`` and ``decode_without`` and
the outputs' ``codes``, ``perplexity`` and ``usage`` are per map; without a residual level maps
and levels are the same. A prefix of maps that ends inside a residual level decodes that level
from the sum of its first stages (what quantize dropout trains it to do) and the levels below it
as missing. Everything downstream (code sets, priors, sampling, the codec) works on maps, so
stage s's prior is conditioned on the maps above it, as a lower level's prior is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.config import JsonConfig
from vqkit.errors import ConfigError, UsageError
from vqkit.nn.likelihood import GaussianLikelihood, LikelihoodOutput, make_likelihood
from vqkit.nn.nets import Decoder, Encoder, ImageModel, TrunkConfig
from vqkit.nn.pretrained import PretrainedMixin
from vqkit.nn.quantize import QuantizerOutput
from vqkit.nn.quantizers import DEFAULT, build_quantizer, canonical_spec, spec_codebook_size, spec_stages
from vqkit.nn.residual import ResidualVQ
from vqkit.nn.vae import GaussianVAE, VAEConfig


class _Levels:
    """What both configurations derive from their per-level lists ``strides`` and
    ``codebook_sizes`` (top-first)."""

    strides: list[int]
    codebook_sizes: list[int]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def total_stride(self) -> int:
        """How many times smaller than the image the top map is, per side."""
        return 2 ** sum(self.strides)

    def level_strides(self) -> list[int]:
        """How many times smaller than the image each map is, per side, top-first."""
        return [2 ** sum(self.strides[level:]) for level in range(self.num_levels)]

    def latent_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (h, w) of every level's code map(s), top-first, for an image of (height, width); a
        ``ConfigError`` if the image is not divisible by the total stride."""
        stride = self.total_stride
        if height % stride or width % stride:
            raise ConfigError(f"image size {height}x{width} is not divisible by the model's total stride "
                              f"{stride} (strides {self.strides}, top-first)")
        return [(height // s, width // s) for s in self.level_strides()]


@dataclass
class _Network(_Levels, TrunkConfig):
    """The fields every VQ model shares; they apply to every level. The trunk's and the
    likelihood's fields are those of every stage-1 model (``TrunkConfig``).

    Args:
        beta: commitment weight of eq. 3 (0.25 in the paper).
        ema: update the codebooks by exponential moving averages (appendix A.1) instead of the
            codebook loss.
        decay: EMA decay (0.99 in the paper).
        kmeans_init: set each codebook by k-means on the first training batch.
        restart_after: re-seed a code unused for this many training steps (0: never).
        quantizer: the quantizer of every level (a spec such as ``{"kind": "fsq", "levels":
            [8, 5, 5, 5]}``, see ``vqkit.nn.quantizers``) or a list of one per level,
            top-first; None for VQ. ``ema``, ``decay``, ``kmeans_init`` and ``restart_after``
            apply to VQ levels; an FSQ or LFQ level's codebook size must be its grid's K.
    """

    beta: float = 0.25
    ema: bool = True
    decay: float = 0.99
    kmeans_init: bool = True
    restart_after: int = 100
    quantizer: dict | list | None = None

    def to_dict(self) -> dict:
        data = super().to_dict()
        if data["quantizer"] is None:  # the default: the dict (and its fingerprint) as before the field
            del data["quantizer"]
        return data

    def level_quantizers(self) -> list[dict]:
        """The canonical quantizer spec of every level, top-first."""
        return _level_specs(self.quantizer, self.num_levels)

    def code_maps(self) -> list[CodeMap]:
        """The model's code maps, top-first (a residual level's stages in order; see the module
        docstring)."""
        names = level_names(self.num_levels)
        maps = []
        for level, (spec, k, stride) in enumerate(zip(self.level_quantizers(), self.codebook_sizes,
                                                      self.level_strides())):
            stages = spec_stages(spec)
            for stage in range(stages) if spec["kind"] == "residual" else [None]:
                name = names[level] if stage is None else f"{names[level]}.{stage}"
                maps.append(CodeMap(name, level, stage, k, stride))
        return maps

    @property
    def num_maps(self) -> int:
        return len(self.code_maps())

    def map_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (h, w) of every code map, top-first, for an image of (height, width) (a
        ``ConfigError`` if the image is not divisible by the total stride)."""
        shapes = self.latent_shapes(height, width)
        return [shapes[m.level] for m in self.code_maps()]

    def _check_quantizer(self) -> None:
        """Makes ``quantizer`` canonical (None when every level is the default VQ, one spec when
        the levels share it, else one per level) after checking each level's K against it."""
        specs = self.level_quantizers()
        for level, (spec, k) in enumerate(zip(specs, self.codebook_sizes)):
            fixed = spec_codebook_size(spec)
            if fixed is not None and fixed != k:
                name = "codebook_size" if self.num_levels == 1 else f"codebook_sizes[{level}]"
                raise ConfigError(f"the {spec['kind']} quantizer {spec} has {fixed} codes but {name} is {k}; "
                                  f"set it to {fixed} (vqkit.nn.vqvae.with_quantizer does)")
        if all(spec == DEFAULT for spec in specs):
            self.quantizer = None
        elif all(spec == specs[0] for spec in specs):
            self.quantizer = specs[0]
        else:
            self.quantizer = specs

    def __post_init__(self):
        super().__post_init__()
        if self.restart_after < 0:
            raise ConfigError(f"restart_after must be >= 0, got {self.restart_after}")


@dataclass
class VQVAEConfig(_Network, JsonConfig):
    """Everything needed to rebuild a one-level VQ-VAE; saved as JSON beside its weights. The
    fields not listed here are those of every model (``_Network``).

    Args:
        downsample: number of stride-2 convolutions: the code map is ``2**downsample`` times
            smaller than the image per side.
        codebook_size: K, the number of codes.
    """

    label: ClassVar[str] = "VQ-VAE config"
    kind: ClassVar[str] = "vqvae"  # the run kind in config.json

    downsample: int = 2
    codebook_size: int = 512

    def __post_init__(self):
        super().__post_init__()
        if self.codebook_size < 1:
            raise ConfigError(f"codebook_size must be positive, got {self.codebook_size}")
        if self.downsample < 0:
            raise ConfigError(f"downsample must be >= 0, got {self.downsample}")
        self._check_quantizer()

    @property
    def strides(self) -> list[int]:
        return [self.downsample]

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size]


@dataclass
class VQVAE2Config(_Network, JsonConfig):
    """Everything needed to rebuild a VQ-VAE-2 of two or more levels; saved as JSON beside
    its weights. The fields not listed here are those of every model (``_Network``).

    Args:
        strides: per level, top-first, the downsampling exponent relative to the level below
            (the bottom's: relative to the image); >= 1 above the bottom, >= 0 for the bottom.
        codebook_sizes: K of each level, top-first.
        res_hidden: as in every model, with the narrower default of the paper's reproductions.
        prefix_training: how the top levels learn to decode without the levels below (see the
            module docstring): ``"off"`` (every batch decodes all levels; a prefix decodes with
            zeros for the missing maps), ``"decoders"`` (a reconstruction loss per prefix
            through a light decoder of its own) or ``"loss"`` (a reconstruction loss per prefix
            through the shared decoder, missing maps as learned absent inputs).
        prefix_share: with prefix training, the share of each batch whose proper prefixes are
            decoded and trained too (its first ``ceil(share * B)`` images; batches are
            shuffled): the prefix passes are most of the extra cost of a step.
        prefix_scale: with ``"decoders"``, the prefix decoders stop at 1/prefix_scale of the
            image's side (a power of two, at most the bottom map's downsampling) and their output is
            upsampled bilinearly to it: a prefix's image is coarse, and their last transposed
            convolutions at full size are most of their cost. 1 (the runs made before the field)
            decodes at full size.
    """

    label: ClassVar[str] = "VQ-VAE-2 config"
    kind: ClassVar[str] = "vqvae2"
    PREFIX_TRAINING: ClassVar[tuple[str, ...]] = ("off", "decoders", "loss")

    res_hidden: int = 32
    strides: list[int] = field(default_factory=lambda: [1, 2])
    codebook_sizes: list[int] = field(default_factory=lambda: [512, 512])
    prefix_training: str = "off"
    prefix_share: float = 1.0
    prefix_scale: int = 1

    def to_dict(self) -> dict:
        data = super().to_dict()
        # Absent at their old defaults, so that the config.json and the codec fingerprints (a
        # hash of this dict) of runs made before the fields existed stay what they were.
        if data["prefix_training"] == "off":
            del data["prefix_training"]
        if data["prefix_share"] == 1.0:
            del data["prefix_share"]
        if data["prefix_scale"] == 1:
            del data["prefix_scale"]
        return data

    def __post_init__(self):
        # Lists, whatever sequence was given: a config read back from JSON must compare equal.
        self.strides = list(self.strides)
        self.codebook_sizes = list(self.codebook_sizes)
        super().__post_init__()
        if len(self.strides) < 2:
            raise ConfigError(f"a VQ-VAE-2 needs at least two levels, got strides={self.strides}; "
                              "use VQVAEConfig for a single level")
        if len(self.codebook_sizes) != len(self.strides):
            raise ConfigError(f"codebook_sizes has {len(self.codebook_sizes)} entries but strides has "
                              f"{len(self.strides)}: give one per level, top-first")
        if any(not isinstance(k, int) or k < 1 for k in self.codebook_sizes):
            raise ConfigError(f"codebook_sizes must be positive integers, got {self.codebook_sizes}")
        if any(not isinstance(s, int) for s in self.strides) or self.strides[-1] < 0 \
                or any(s < 1 for s in self.strides[:-1]):
            raise ConfigError(f"strides (top-first) must be integers, >= 1 above the bottom level so that "
                              f"each level is coarser than the one below, >= 0 for the bottom; got {self.strides}")
        if self.prefix_training not in self.PREFIX_TRAINING:
            raise ConfigError(f"prefix_training must be one of {', '.join(map(repr, self.PREFIX_TRAINING))}, "
                              f"got {self.prefix_training!r}")
        if isinstance(self.prefix_share, bool) or not isinstance(self.prefix_share, (int, float)) \
                or not 0 < self.prefix_share <= 1:
            raise ConfigError(f"prefix_share must be a number in (0, 1], got {self.prefix_share!r}")
        self.prefix_share = float(self.prefix_share)
        scale = self.prefix_scale
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1 or scale & (scale - 1) \
                or scale > 2 ** self.strides[-1]:
            raise ConfigError(f"prefix_scale must be a power of two from 1 to {2 ** self.strides[-1]} (the bottom "
                              f"map's downsampling), got {scale!r}")
        self._check_quantizer()


StageOneConfig = VQVAEConfig | VQVAE2Config


@dataclass(frozen=True)
class CodeMap:
    """One code map of a model: its ``name`` (the level's, e.g. ``"top"``; ``"top.1"`` for stage 1
    of a residual level), its ``level`` (top-first), its residual ``stage`` (None for a level of
    one map), its codebook size and its ``stride``, image pixels per code along a side."""

    name: str
    level: int
    stage: int | None
    codebook_size: int
    stride: int


def _level_specs(quantizer, levels: int) -> list[dict]:
    """Canonical specs, one per level, of a config's ``quantizer`` (None, a spec or a list)."""
    if quantizer is None:
        return [dict(DEFAULT) for _ in range(levels)]
    if isinstance(quantizer, (list, tuple)):
        if len(quantizer) != levels:
            raise ConfigError(f"quantizer lists {len(quantizer)} quantizer(s) for a model of {levels} level(s): "
                              "give one object for every level or a list of one per level, top-first")
        return [canonical_spec(spec, f"quantizer[{level}]") for level, spec in enumerate(quantizer)]
    spec = canonical_spec(quantizer)
    return [dict(spec) for _ in range(levels)]


def with_quantizer(config: StageOneConfig, quantizer) -> StageOneConfig:
    """A copy of ``config`` with ``quantizer`` (a spec, a list of one per level, or None), and
    the codebook size of every FSQ or LFQ level set to its grid's K."""
    specs = _level_specs(quantizer, config.num_levels)
    sizes = [spec_codebook_size(spec) or k for spec, k in zip(specs, config.codebook_sizes)]
    data = {**config.to_dict(), "quantizer": quantizer}
    if isinstance(config, VQVAE2Config):
        data["codebook_sizes"] = sizes
    else:
        data["codebook_size"] = sizes[0]
    return type(config).from_dict(data)


@dataclass
class VQVAEOutput:
    """One forward pass.

    ``loss = recon_loss + vq_loss``; ``vq_loss`` and ``commitment_loss`` are summed over the
    levels; ``x_hat`` the expected reconstruction (B, C, H, W) in [-1, 1] (with the
    autoregressive ``pixelcnn`` likelihood, the teacher-forced mixture mean: each subpixel's
    mean given the true subpixels before it, so not an image the model could decode from the
    codes alone; ``decode`` samples one); ``nll`` -log p(x|z_q) in nats per image (B,),
    computed when first read (``likelihood``, the ``LikelihoodOutput``); ``codes`` (B, h_m, w_m)
    int64, ``perplexity`` and ``usage`` (this batch only) one per code map, top-first (in
    training, a residual stage that quantize dropout left out has codes -1, usage 0 and
    perplexity 1).

    With prefix training, in training mode: ``prefix_losses`` holds the reconstruction loss of
    each prefix, keyed by its number of levels; ``recon_loss`` is their sum, the proper
    prefixes' weighted by ``forward``'s ``prefix_weight``.
    """

    loss: torch.Tensor
    recon_loss: torch.Tensor
    vq_loss: torch.Tensor
    commitment_loss: torch.Tensor
    likelihood: LikelihoodOutput = field(repr=False)
    x_hat: torch.Tensor
    codes: list[torch.Tensor]
    perplexity: list[torch.Tensor]
    usage: list[torch.Tensor]
    prefix_losses: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def nll(self) -> torch.Tensor:
        return self.likelihood.nll


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

# One-level checkpoints written before levels were lists named these modules without an index.
_LEGACY_PREFIXES = {"encoder.": "encoders.0.", "quantizer.": "quantizers.0."}


class VQVAE(nn.Module, ImageModel, PretrainedMixin):
    """A VQ-VAE of one or more levels (``VQVAE2`` names the many-level case).

    Module lists are top-first: ``encoders[-1]`` sees the image, ``conditioners[l]`` and
    ``upsamplers[l]`` serve level ``l < L-1``, ``pre_quant[l-1]`` builds level ``l >= 1``'s z_e
    (all three are empty for one level); with ``prefix_training="decoders"``,
    ``prefix_decoders[p-1]`` decodes the top ``p < L`` levels; with ``"loss"``, ``absent[l-1]``
    (1, D, 1, 1) is the decoder's input for a missing level ``l >= 1``.

    Args:
        config: a ``VQVAEConfig`` (one level) or ``VQVAE2Config`` (two or more).
    """

    model_type: ClassVar[str] = "vqvae"
    config_class: ClassVar[type] = VQVAEConfig

    def __init__(self, config: StageOneConfig):
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
            build_quantizer(spec, k, d, beta=c.beta, ema=c.ema, decay=c.decay, kmeans_init=c.kmeans_init,
                            restart_after=c.restart_after)
            for spec, k in zip(c.level_quantizers(), c.codebook_sizes))
        # C_0 sees z_q_0 only; C_l below it sees [z_q_l, c_{l-1}].
        self.conditioners = nn.ModuleList(
            Decoder(d if level == 0 else 2 * d, c.hidden, c.res_hidden, c.num_res_blocks,
                    c.strides[level], d) for level in range(levels - 1))
        self.upsamplers = nn.ModuleList(
            _upsampler(d, sum(c.strides[level:levels - 1])) for level in range(levels - 1))
        self.likelihood = make_likelihood(c)
        self.decoder = Decoder(levels * d, c.hidden, c.res_hidden, c.num_res_blocks, c.strides[-1],
                               self.likelihood.decoder_channels)
        self.maps = c.code_maps()
        self.prefix_training = getattr(c, "prefix_training", "off")
        self.prefix_share = getattr(c, "prefix_share", 1.0)
        self.absent = nn.ParameterList(
            nn.Parameter(torch.zeros(1, d, 1, 1)) for _ in range(1, levels if self.prefix_training == "loss" else 1))
        # Half widths and one residual block: a prefix's image is coarse, and on the faces these
        # decoders beat the shared decoder at its prefixes for 1.4x a step instead of 2.3x.
        self.prefix_decoders = nn.ModuleList(
            Decoder(p * d, max(c.hidden // 2, 1), max(c.res_hidden // 2, 1), 1,
                    c.strides[-1] - (c.prefix_scale.bit_length() - 1), self.likelihood.decoder_channels)
            for p in range(1, levels if self.prefix_training == "decoders" else 1))
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    @property
    def num_maps(self) -> int:
        return len(self.maps)

    def _per_map(self, level: int, value: torch.Tensor) -> list[torch.Tensor]:
        """A level's codes (a residual level's (..., S)) or statistics ((S,)) as one entry per map."""
        return list(value.unbind(-1)) if isinstance(self.quantizers[level], ResidualVQ) else [value]

    def _lookup(self, level: int, maps: Sequence[torch.Tensor], without: int | None = None) -> torch.Tensor:
        """z_q (B, D, h_l, w_l) of ``level`` from its code maps (a residual level's first n
        stages, 1 <= n <= S), leaving out stage ``without`` (of a residual level)."""
        quantizer = self.quantizers[level]
        if isinstance(quantizer, ResidualVQ):
            return quantizer.lookup(torch.stack(list(maps), -1), without)
        return quantizer.lookup(maps[0])

    def _by_level(self, maps: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """A prefix of the code maps grouped by level, top-first (the last group may hold only the
        first stages of a residual level)."""
        groups: list[list[torch.Tensor]] = []
        for m, codes in zip(self.maps, maps):
            if m.level == len(groups):
                groups.append([])
            groups[-1].append(codes)
        return groups

    def _top_down(self, x: torch.Tensor, quantize: _QuantizeFn):
        """Encoder features bottom-up, then z_e and z_q of each level top-down (Algorithm 1).
        Returns the top-first lists z_e, z_q and the quantizer outputs."""
        features: list[torch.Tensor] = []
        h = x
        for encoder in reversed(self.encoders):
            h = encoder(h)
            features.append(h)
        features.reverse()
        z_es, z_qs, outs = [], [], []
        cond = None
        for level in range(self.num_levels):
            z_e = features[0] if level == 0 else \
                self.pre_quant[level - 1](torch.cat([features[level], cond], 1))
            z_q, out = quantize(level, z_e)
            if level < self.num_levels - 1:
                cond = self.conditioners[level](z_q if cond is None else torch.cat([z_q, cond], 1))
            z_es.append(z_e)
            z_qs.append(z_q)
            outs.append(out)
        return z_es, z_qs, outs

    def _decoder_input(self, z_qs: list[torch.Tensor], upto: int) -> torch.Tensor:
        """The decoder's input (B, L*D, h_{L-1}, w_{L-1}) from the top ``upto`` of the top-first
        z_q maps; each missing level's map is its learned absent vector, or, in a model without
        prefix training, zeros (B, D, h_l, w_l) through its upsampler."""
        levels = self.num_levels
        b, d = z_qs[0].shape[:2]
        h, w = self._level_shapes(z_qs[0][:, 0])[-1][1:]
        maps = []
        for level in range(levels):
            if level >= upto and self.absent:
                maps.append(self.absent[level - 1].expand(b, d, h, w))
                continue
            z_q = z_qs[level] if level < upto else \
                torch.zeros(b, d, *self._level_shapes(z_qs[0][:, 0])[level][1:], device=z_qs[0].device)
            maps.append(self.upsamplers[level](z_q) if level < levels - 1 else z_q)
        return torch.cat(maps, 1)

    def _decode_z_q(self, z_qs: list[torch.Tensor], upto: int | None = None) -> torch.Tensor:
        """Top-first z_q maps (the top ``upto``, default all) -> likelihood parameters (B, *, H, W):
        a proper prefix through its own decoder where the model has them, else the shared one."""
        upto = self.num_levels if upto is None else upto
        if upto < self.num_levels and self.prefix_decoders:
            return self._prefix_decode([self.upsamplers[level](z_qs[level]) for level in range(upto)], upto)
        return self.decoder(self._decoder_input(z_qs, upto))

    def _prefix_decode(self, upsampled: list[torch.Tensor], upto: int) -> torch.Tensor:
        """The light decoder of the top ``upto < L`` levels on their upsampled maps (at least
        ``upto`` of them, each (B, D, h_{L-1}, w_{L-1})) -> likelihood parameters (B, *, H, W)."""
        params = self.prefix_decoders[upto - 1](torch.cat(upsampled[:upto], 1))
        scale = self.config.prefix_scale
        return params if scale == 1 else F.interpolate(params, scale_factor=scale, mode="bilinear", align_corners=False)

    def _recon_loss(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The training loss of a prefix's reconstruction, leaving the likelihood's running
        statistics to the full model's."""
        if isinstance(self.likelihood, GaussianLikelihood):
            return (params.float() - x).square().mean()
        return self.likelihood(params, x).loss

    def forward(self, x: torch.Tensor, prefix_weight: float = 1.0) -> VQVAEOutput:
        """Images (B, C, H, W) in [-1, 1] -> losses, reconstruction and codes of every level
        (in training mode with prefix training, the prefixes' losses too: ``VQVAEOutput``).

        Args:
            x: the images.
            prefix_weight: with prefix training, the weight of the proper prefixes' losses in
                ``recon_loss`` and ``loss`` (the full model's is 1; ``TrainConfig.prefix_cooldown``
                schedules it).
        """
        self._check_input(x)

        def quantize(level: int, z_e: torch.Tensor):
            q = self.quantizers[level](z_e)
            return q.z_q, q

        _, z_qs, qs = self._top_down(x, quantize)
        levels = self.num_levels
        prefix_losses: dict[int, torch.Tensor] = {}
        n = math.ceil(self.prefix_share * x.shape[0])  # the images whose prefixes train too
        if self.training and self.prefix_training == "decoders":
            # Each level above the bottom upsampled once, for the full decoder and the prefixes'.
            upsampled = [self.upsamplers[level](z_q) for level, z_q in enumerate(z_qs[:-1])]
            rec = self.likelihood(self.decoder(torch.cat([*upsampled, z_qs[-1]], 1)), x)
            first = [u[:n] for u in upsampled]
            prefix_losses = {upto: self._recon_loss(self._prefix_decode(first, upto), x[:n])
                             for upto in range(levels - 1, 0, -1)}
        elif self.training and self.prefix_training == "loss":
            # Every prefix of the first n images through the shared decoder in one batch, after
            # the full model's decoding of them all.
            params = self.decoder(torch.cat([self._decoder_input(z_qs, levels)] + [
                self._decoder_input([z_q[:n] for z_q in z_qs], upto)
                for upto in range(levels - 1, 0, -1)]))  # (B + (L-1)*n, *, H, W)
            full, *shorter = params.split([x.shape[0]] + [n] * (levels - 1))
            rec: LikelihoodOutput = self.likelihood(full, x)
            prefix_losses = {levels - i: self._recon_loss(p, x[:n]) for i, p in enumerate(shorter, 1)}
        else:
            rec = self.likelihood(self._decode_z_q(z_qs), x)
        recon_loss = rec.loss + prefix_weight * sum(prefix_losses.values())
        if prefix_losses:
            prefix_losses[levels] = rec.loss
        vq_loss = torch.stack([q.loss for q in qs]).sum()
        return VQVAEOutput(loss=recon_loss + vq_loss, recon_loss=recon_loss, vq_loss=vq_loss,
                           commitment_loss=torch.stack([q.commitment_loss for q in qs]).sum(),
                           likelihood=rec, x_hat=rec.mean, codes=self._maps_of(qs, "codes"),
                           perplexity=self._maps_of(qs, "perplexity"), usage=self._maps_of(qs, "usage"),
                           prefix_losses=prefix_losses)

    def _maps_of(self, outs: list[QuantizerOutput], name: str) -> list[torch.Tensor]:
        """The levels' quantizer outputs' field ``name``, one entry per code map."""
        return [v for level, out in enumerate(outs) for v in self._per_map(level, getattr(out, name))]

    @torch.no_grad()
    def encode_levels(self, x: torch.Tensor, codes: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Pre-quantization ``z_e`` of every level (B, D, h_l, w_l), top-first.

        ``codes``, if given, fixes the top ``len(codes)`` code maps (whole levels) instead of
        quantizing their levels' z_e, so the lower levels' z_e show what they are conditioned on.
        Touches no codebook statistics.
        """
        self._check_input(x)
        if len(codes) > self.num_maps:
            raise UsageError(f"got {len(codes)} code maps for a model of {self.num_maps}")
        if codes and len(codes) < self.num_maps and self.maps[len(codes)].level == self.maps[len(codes) - 1].level:
            raise UsageError(f"the {len(codes)} code maps given end inside level {self.maps[len(codes)].level}: "
                             "give all the stages of a residual level")
        groups = self._by_level(codes)

        def quantize(level: int, z_e: torch.Tensor):
            quantizer = self.quantizers[level]
            if level < len(groups):
                for c in groups[level]:
                    if c.shape != z_e.shape[:1] + z_e.shape[2:]:
                        raise UsageError(f"level {level} codes have shape {tuple(c.shape)}, "
                                         f"expected {(z_e.shape[0], *z_e.shape[2:])} (codes are top-first)")
                return self._lookup(level, groups[level]), None
            return quantizer.lookup(quantizer.encode(z_e)), None

        return self._top_down(x, quantize)[0]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h_m, w_m) int64, one per code map, top-first."""
        self._check_input(x)
        codes: list[torch.Tensor] = []

        def quantize(level: int, z_e: torch.Tensor):
            quantizer = self.quantizers[level]
            level_codes = quantizer.encode(z_e)
            codes.extend(self._per_map(level, level_codes))
            return quantizer.lookup(level_codes), None

        self._top_down(x, quantize)
        return codes

    @torch.no_grad()
    def encode_maps(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per code map, top-first: its codes (B, h_m, w_m) int64 and the squared distance
        (B, h_m, w_m) float32 from the vector it quantized to the chosen code's: a level's z_e,
        or, for stage s of a residual level, the residual that the stages before it left."""
        out = []
        for quantizer, z_e in zip(self.quantizers, self.encode_levels(x)):
            if not isinstance(quantizer, ResidualVQ):
                codes = quantizer.encode(z_e)
                out.append((codes, (z_e.float() - quantizer.lookup(codes)).square().sum(1)))
                continue
            residual = z_e.float().movedim(1, -1)  # (B, h, w, D): the stages take channels last
            for s in range(quantizer.num_stages):
                codes = quantizer.stage(s).encode(residual)
                vectors = quantizer.stage(s).lookup(codes)
                out.append((codes, (residual - vectors).square().sum(-1)))
                residual = residual - vectors
        return out

    def map_code_vectors(self) -> list[torch.Tensor]:
        """The code vectors (K, D) of every code map's quantizer, top-first (a residual level's
        stages each their own, or its one shared codebook)."""
        vectors = []
        for quantizer in self.quantizers:
            if isinstance(quantizer, ResidualVQ):
                vectors += [quantizer.stage(s).code_vectors() for s in range(quantizer.num_stages)]
            else:
                vectors.append(quantizer.code_vectors())
        return vectors

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor], generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Codes of every code map, top-first (a list of (B, h_m, w_m)) -> images (B, C, H, W) in
        [-1, 1]: the expected image of a factorised likelihood; with the ``pixelcnn`` likelihood
        a sample of p(x | z) drawn with ``generator`` (default: seeded 0, so that the same codes
        decode to the same image) and ``temperature`` (``PixelCNNLikelihood.reconstruct``)."""
        if not isinstance(codes, torch.Tensor) and len(codes) != self.num_maps:
            raise UsageError(f"expected {self.num_maps} code maps (top-first), got {len(codes)}")
        return self.decode_levels(codes, self.num_maps, generator, temperature)

    def _given_levels(self, codes: Sequence[torch.Tensor | None], upto: int) -> list[torch.Tensor]:
        """The first ``upto`` code maps of ``codes``, checked against each other and the strides."""
        maps = self.num_maps
        if isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be a list of code maps, one per level, top-first; got a tensor of "
                            f"shape {tuple(codes.shape)} (a one-level model takes [codes])")
        if not 1 <= upto <= maps:
            raise UsageError(f"upto must be in 1..{maps}, got {upto}")
        if len(codes) > maps:
            raise UsageError(f"got {len(codes)} code maps for a model of {maps} (top-first)")
        given = list(codes)[:upto]
        # Without a residual level, maps are levels: the messages say so.
        what = "level" if maps == self.num_levels else "code map"
        if len(given) < upto or any(c is None for c in given):
            missing = next(i for i in range(upto) if i >= len(given) or given[i] is None)
            raise UsageError(f"{what} {missing} is missing: adding {what}s can only be decoded in order, so "
                             f"decoding {upto} {what}(s) needs the codes of {what}s 0..{upto - 1} (top-first)")
        top = given[0]
        if top.dim() != 3:
            raise UsageError(f"expected codes (B, h, w), got {tuple(top.shape)} for the top level")
        for i, (c, expected) in enumerate(zip(given, self._shapes_below(top))):
            if tuple(c.shape) != expected:
                raise UsageError(f"{what} {i} codes have shape {tuple(c.shape)}, expected {expected} "
                                 f"from the top map: codes are top-first, and adding {what}s can only be decoded "
                                 "in order")
        return given

    def _level_shapes(self, top: torch.Tensor) -> list[tuple[int, int, int]]:
        """(B, h_l, w_l) of every level's codes, top-first, given the top level's codes."""
        top_stride = self.config.total_stride
        return [(top.shape[0], top.shape[1] * top_stride // s, top.shape[2] * top_stride // s)
                for s in self.config.level_strides()]

    def _shapes_below(self, top: torch.Tensor) -> list[tuple[int, int, int]]:
        """(B, h_m, w_m) of every code map, top-first, given the top map."""
        levels = self._level_shapes(top)
        return [levels[m.level] for m in self.maps]

    @torch.no_grad()
    def decode_levels(self, codes: Sequence[torch.Tensor | None], upto: int,
                      generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """The view of VQ-VAE-2's Figure 3: the image decoded from the top ``upto`` code maps only
        (levels, but for a residual level's stages, each one map; see the module docstring).

        ``codes`` is top-first; entries from index ``upto`` on may be missing or None and are
        ignored. A model trained with ``prefix_training`` decodes a prefix as it was trained to,
        through the prefix's own decoder or with the learned absent inputs for the missing maps:
        the image is its reconstruction from those levels.
        Without, the quantized maps of the lower levels are replaced by zeros: a zero input adds
        nothing through the first (linear) layers they feed, so the image shows what the given
        levels carry, but the decoder never saw zeros there in training, so this is a view of
        the hierarchy, not a sample of the model. ``upto = num_maps`` is ``decode``; ``generator``
        and ``temperature`` are as there.
        """
        given = self._given_levels(codes, upto)
        z_qs = [self._lookup(level, group) for level, group in enumerate(self._by_level(given))]
        return self.likelihood.reconstruct(self._decode_z_q(z_qs, len(z_qs)), generator, temperature).clamp(-1, 1)

    def quantized(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The quantized maps z_q (B, D, h_l, w_l) of every level, top-first, from the codes of
        every code map (``encode``'s): a residual level's the sum of its stages' vectors."""
        given = self._given_levels(codes, self.num_maps)
        return [self._lookup(level, group) for level, group in enumerate(self._by_level(given))]

    @torch.no_grad()
    def nll(self, x: torch.Tensor, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """-log p(x | codes) in nats per image (B,): images (B, C, H, W) in [-1, 1] under the
        decoder given the codes of every code map, top-first (their own, or another image's)."""
        return self.likelihood(self._decode_z_q(self.quantized(codes)), x).nll

    @torch.no_grad()
    def decode_without(self, codes: Sequence[torch.Tensor], level: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode every code map but map ``level``, whose vectors are replaced by zeros (which
        no training ever showed the decoder there, prefix training included): a level's
        quantized map, or one stage's share of a residual level's sum.

        The gap between this and ``decode`` is what that map adds to the reconstruction
        (for the top level: the full model against the lower levels alone). Like
        ``decode_levels`` it is a view of the model, not a sample of it (with the ``pixelcnn``
        likelihood, drawn with ``generator``).
        """
        given = self._given_levels(codes, self.num_maps)
        if not 0 <= level < self.num_maps:
            raise UsageError(f"level must be in 0..{self.num_maps - 1}, got {level}")
        left_out = self.maps[level]
        z_qs = [self._lookup(i, group, left_out.stage if i == left_out.level else None)
                for i, group in enumerate(self._by_level(given))]
        if left_out.stage is None:
            z_qs[left_out.level] = torch.zeros_like(z_qs[left_out.level])
        return self.likelihood.reconstruct(self._decode_z_q(z_qs), generator).clamp(-1, 1)


class VQVAE2(VQVAE):
    """The hierarchical VQ-VAE of Razavi et al. 2019: a ``VQVAE`` of two or more levels.

    Args:
        config: a ``VQVAE2Config``.
    """

    model_type: ClassVar[str] = "vqvae2"
    config_class: ClassVar[type] = VQVAE2Config

    def __init__(self, config: VQVAE2Config):
        if not isinstance(config, VQVAE2Config):
            raise ConfigError(f"VQVAE2 takes a VQVAE2Config, got {type(config).__name__}")
        super().__init__(config)


# The configuration class of each stage-1 run kind, and the model class each builds. The VQ
# kinds have codes; a "vae" run (the Gaussian baseline) has continuous latents, so the commands
# that read codes take only ``VQ_KINDS``.
CONFIGS: dict[str, type[VQVAEConfig] | type[VQVAE2Config] | type[VAEConfig]] = {
    c.kind: c for c in (VQVAEConfig, VQVAE2Config, VAEConfig)}
VQ_KINDS = (VQVAEConfig.kind, VQVAE2Config.kind)
_MODELS = {VQVAEConfig: VQVAE, VQVAE2Config: VQVAE2, VAEConfig: GaussianVAE}


def build_model(config: StageOneConfig | VAEConfig) -> VQVAE | GaussianVAE:
    """A freshly initialised model for ``config``: a ``VQVAE2`` for a ``VQVAE2Config``, a
    ``GaussianVAE`` for a ``VAEConfig``."""
    return _MODELS[type(config)](config)


def _rename_legacy_keys(state_dict: dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook: one-level weights saved before levels were lists load
    into ``encoders.0`` and ``quantizers.0``."""
    for key in list(state_dict):
        for old, new in _LEGACY_PREFIXES.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


def level_names(num_levels: int) -> list[str]:
    """Names of the levels, top-first: "top", "middle"..., "bottom" ("codes" for one level)."""
    if num_levels == 1:
        return ["codes"]
    middle = ["middle"] if num_levels == 3 else [f"middle{i}" for i in range(1, num_levels - 1)]
    return ["top", *middle, "bottom"]
