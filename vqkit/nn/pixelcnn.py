"""The PixelCNN likelihood: an autoregressive decoder p(x | z) over the pixel values, conditioned
on the latent maps (the VQ-VAE paper's DeepMind Lab model; van den Oord et al. 2016,
"Conditional Image Generation with PixelCNN Decoders"; Salimans et al. 2017, PixelCNN++).

The model's conv decoder turns the latent maps into conditioning features ``h`` (B, F, H, W)
at the image's resolution (``decoder_channels`` = F = the stack's width). A gated PixelCNN
(``vqkit.nn.gated``) runs over the image in raster order, its input the pixel values embedded
by a linear map, and ``h`` enters every gated layer as a per-layer bias (a 1x1 projection,
eq. 5 of Conditional PixelCNN with a spatial ``h``). Its head gives each pixel ``i`` the
parameters of a mixture of M discretised logistics over the pixel's C subpixels with
PixelCNN++'s linear channel coupling (eq. 3 there): component ``k`` has weight ``pi_k``, and
subpixel ``c`` the mean and scale

    mu_kc + sum_{c' < c} a_kcc' x_ic'        (a = tanh of the head's output),   s_kc,

so ``p(x_i | x_<i, z) = sum_k pi_k prod_c L(x_ic; ...)`` with ``L`` the discretised logistic of
``vqkit.nn.likelihood`` (256 bins of width 2/255, the end bins taking the tails), its log taken
exactly (``discretized_logistic_exact_log_prob``: no density stands in for small masses), so that
the NLL is the code length under the very masses the sampler draws from. The network is
causal over pixels, the coupling over the subpixels of a pixel: the model is autoregressive over
the subpixels in the order (raster position, then R, G, B), and one pass over the image gives
every pixel's parameters (teacher forcing).

Conditionals. With ``l_kc = log L(x_ic; ...)`` and ``A_c = LSE_k(log pi_k + sum_{c' <= c} l_kc')``
(``A_{-1} = 0``), the conditional of subpixel ``c`` given everything before it is

    log p(x_ic | x_i<c, x_<i, z) = A_c - A_{c-1},

(the components reweighted by how well they explain the earlier subpixels), and a pixel's
conditionals telescope to its joint ``A_{C-1}``: the NLL is the exact code length of the image.

Sampling (``reconstruct``) draws an exact ancestral sample: pixel by pixel in raster order,
subpixel by subpixel in channel order, the 256 values' probabilities under those conditionals
(the masses of ``value_log_probs``, computed as differences of the components' CDFs at the bin
edges) inverted at uniforms drawn up front (``vqkit.nn.sampling``, as the priors' samplers do).
``method="incremental"`` (default) keeps the stack's per-layer caches (``GatedStackState``), so
each pixel costs one step through the layers at that pixel; ``method="naive"`` recomputes the
whole network over the whole canvas for each pixel (H*W passes). Both compute each pixel's
parameters with the same operations from the same pixels and pick from the same uniforms, so
they return the same image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.errors import UsageError
from vqkit.nn.gated import GatedStack
from vqkit.nn.likelihood import LikelihoodOutput, discretized_logistic_exact_log_prob, discretized_logistic_masses
from vqkit.nn.sampling import filtered_probs, sample_codes

METHODS = ("incremental", "naive")


class PixelCNNLikelihood(nn.Module):
    """p(x | h): a gated PixelCNN over the image, conditioned on the decoder's features ``h``.

    Args:
        channels: C, the image's channels (subpixels per pixel).
        mixtures: M, logistic components per pixel.
        layers: gated layers of the PixelCNN.
        width: channels of the PixelCNN, and of the conditioning features the decoder outputs.
        kernel_size: side of its causal convolutions (odd, >= 3).
    """

    autoregressive = True

    def __init__(self, channels: int, mixtures: int, layers: int, width: int, kernel_size: int):
        super().__init__()
        self.channels = channels
        self.mixtures = mixtures
        self.width = width
        self.embed = nn.Linear(channels, width)
        self.stack = GatedStack(width, kernel_size, layers)
        self.cond = nn.Linear(width, self.stack.bias_channels)
        # Per component: its logit, C means, C log-scales and the C(C-1)/2 coupling coefficients.
        rows, cols = torch.tril_indices(channels, channels, -1)
        self.register_buffer("coupled_to", rows, persistent=False)   # subpixel whose mean a coefficient shifts
        self.register_buffer("coupled_from", cols, persistent=False)  # earlier subpixel it multiplies
        self.per_mixture = 1 + 2 * channels + len(rows)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                  nn.Linear(width, mixtures * self.per_mixture))
        self.register_buffer("values", torch.arange(256) / 127.5 - 1, persistent=False)

    @property
    def decoder_channels(self) -> int:
        """Channels the decoder must output: the conditioning features, one per PixelCNN channel."""
        return self.width

    def _split(self, out: torch.Tensor):
        """Head output (..., M * per_mixture) -> log pi (..., M), means and log-scales (..., M, C),
        coupling coefficients (..., M, C(C-1)/2)."""
        c = self.channels
        p = out.float().unflatten(-1, (self.mixtures, self.per_mixture))
        return (F.log_softmax(p[..., 0], -1), p[..., 1:1 + c], p[..., 1 + c:1 + 2 * c].clamp(min=-7.0),
                torch.tanh(p[..., 1 + 2 * c:]))

    def _coupled(self, means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Means (..., M, C) shifted by the coupling: ``mu_c + sum_{c' < c} a_cc' x_c'`` with x (..., C);
        subpixel c's reads only x[..., :c]."""
        shift = coeffs * x[..., None, self.coupled_from]  # (..., M, C(C-1)/2)
        return means.index_add(-1, self.coupled_to, shift)

    def _head(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Features (B, F, H, W) and image (B, C, H, W) -> head output, channels-last (B, H, W, M * per_mixture)."""
        bias = self.cond(params.permute(0, 2, 3, 1))  # (B, H, W, 4 width layers)
        return self.head(self.stack(self.embed(x.permute(0, 2, 3, 1)), bias))

    def log_probs(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The conditional log-probability of every subpixel given the subpixels before it and
        the features, in nats, (B, C, H, W); their sum over a pixel is its joint log-probability."""
        cum = self._cumulative(self._head(params, x), x.permute(0, 2, 3, 1))
        return (cum - F.pad(cum, (1, 0))[..., :-1]).permute(0, 3, 1, 2)

    def _cumulative(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Head output and image, channels-last -> ``A_c``, the log-probability of each pixel's
        first c + 1 subpixels (B, H, W, C)."""
        log_pi, means, log_scales, coeffs = self._split(out)
        lp = discretized_logistic_exact_log_prob(x[..., None, :], self._coupled(means, coeffs, x), log_scales)
        return torch.logsumexp(log_pi[..., None] + lp.cumsum(-1), -2)  # (B, H, W, M, C) -> (B, H, W, C)

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> LikelihoodOutput:
        """Features (B, F, H, W) and images (B, C, H, W) -> the NLL, its mean per subpixel as the
        loss, and as ``mean`` the teacher-forced mixture mean (each subpixel's coupling reads
        the true earlier subpixels)."""
        out = self._head(params, x)
        xc = x.permute(0, 2, 3, 1).float()
        nll = -self._cumulative(out, xc)[..., -1].flatten(1).sum(1)
        log_pi, means, _, coeffs = self._split(out)
        mean = (log_pi.exp()[..., None] * self._coupled(means, coeffs, xc)).sum(-2)  # (B, H, W, C)
        return LikelihoodOutput(loss=nll.mean() / x[0].numel(), mean=mean.clamp(-1, 1).permute(0, 3, 1, 2),
                                compute_nll=nll.detach)

    def value_log_probs(self, out: torch.Tensor, x: torch.Tensor, c: int) -> torch.Tensor:
        """Head output (n, M * per_mixture) at one pixel and the pixel's subpixels x (n, C), of
        which only ``x[:, :c]`` is read -> log p(v | x_<c, the context) (n, 256) of the 256 values
        v of subpixel ``c``: the conditionals whose sum over the image is -NLL."""
        log_pi, means, log_scales, coeffs = self._split(out)
        mean = self._coupled(means, coeffs, x)  # (n, M, C)
        # The components' posterior weights given the earlier subpixels.
        weights = log_pi + discretized_logistic_exact_log_prob(x[:, None, :c], mean[..., :c],
                                                               log_scales[..., :c]).sum(-1)
        lp = discretized_logistic_exact_log_prob(self.values, mean[..., c, None], log_scales[..., c, None])
        return torch.logsumexp(weights[..., None] + lp, 1) - torch.logsumexp(weights, -1, keepdim=True)

    def _sample_pixel(self, out: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
        """Head output (n, *) at a pixel and uniforms (n, C) -> the pixel's values (n, C), subpixel
        by subpixel, each from the masses of ``value_log_probs``'s distribution (computed as CDF
        differences, which is cheaper than the 256 log-probabilities)."""
        log_pi, means, log_scales, coeffs = self._split(out)
        x = out.new_zeros(out.shape[0], self.channels, dtype=torch.float32)
        posterior = log_pi.softmax(-1)  # (n, M): pi_k times the masses of the subpixels drawn so far, normalised
        for c in range(self.channels):
            mean = self._coupled(means, coeffs, x)[..., c]  # (n, M)
            masses = discretized_logistic_masses(mean, log_scales[..., c])  # (n, M, 256)
            probs = torch.bmm(posterior[:, None], masses)[:, 0]  # (n, 256)
            v = sample_codes(probs if temperature == 1 else filtered_probs(probs.log(), temperature), u[:, c])
            x[:, c] = self.values[v]
            if c < self.channels - 1:
                posterior = posterior * masses.gather(2, v[:, None, None].expand(-1, self.mixtures, 1))[..., 0]
                posterior = posterior / posterior.sum(-1, keepdim=True)
        return x

    @torch.no_grad()
    def reconstruct(self, params: torch.Tensor, generator: torch.Generator | None = None,
                    temperature: float = 1.0, method: str = "incremental") -> torch.Tensor:
        """Features (B, F, H, W) -> an image (B, C, H, W) in [-1, 1] drawn from p(x | h), with
        the 256-way distribution of each subpixel taken to the power ``1 / temperature``
        (renormalised; 1 is the model). The uniforms, (B, H, W, C), come from ``generator``;
        without one, from a generator seeded 0, so that decoding is a function of the codes
        (a codec's decompressed image is its reconstruction; the global RNG is left alone).

        Args:
            method: ``"incremental"`` (cached per-layer state) or ``"naive"`` (the whole network
                per pixel); both return the same image for the same uniforms.
        """
        if method not in METHODS:
            raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if not temperature > 0:
            raise UsageError(f"temperature must be > 0, got {temperature!r}")
        b, _, h, w = params.shape
        device = params.device
        if generator is None:
            generator = torch.Generator(device).manual_seed(0)
        u = torch.rand(b, h, w, self.channels, generator=generator, dtype=torch.float64,
                       device=generator.device).to(device)
        x = torch.zeros(b, h, w, self.channels, device=device)  # the canvas, channels-last
        if method == "naive":
            for i in range(h):
                for j in range(w):
                    out = self._head(params, x.permute(0, 3, 1, 2))[:, i, j]
                    x[:, i, j] = self._sample_pixel(out, u[:, i, j], temperature)
            return x.permute(0, 3, 1, 2)
        state = self.stack.incremental(b, h, w, self.cond(params.permute(0, 2, 3, 1)))
        for i in range(h):
            for j in range(w):
                x[:, i, j] = self._sample_pixel(self.head(state.skip(i, j)), u[:, i, j], temperature)
                state.write(i, j, self.embed(x[:, i, j]))
        return x.permute(0, 3, 1, 2)
