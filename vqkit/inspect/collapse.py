"""Posterior collapse, shown (VQ-VAE section 3.1): a Gaussian VAE and a VQ-VAE with the same
decoder, first a convolutional one, then an autoregressive (PixelCNN) one, trained for the same
budget on the same images and measured the same way.

"With a strong autoregressive decoder, posterior collapse happens": the VAE's KL term pulls its
posterior to the prior, and a decoder that models the image on its own lets the latents carry
nothing. VQ-VAE's posterior is one-hot and its KL to the uniform prior is the constant log K,
"thus posterior collapse doesn't happen".

``run_collapse`` trains the four models as ordinary run folders ``OUT/<model>-<decoder>`` (a
folder that already holds a finished run of the same configuration is reused, not retrained), then
measures each on the test split (``vqkit.training.latents``: KL per latent, active units, the
cost of another image's latents) and writes ``collapse.json``, ``collapse.png`` (the KL per
latent over training; active units and the swap cost) and ``samples.png`` (per model: test
images' reconstructions, then samples: the VAE's from N(0, I), the VQ-VAE's from the uniform
prior over codes, as it has no fitted prior here).

A model counts as collapsed by the issue's criterion: KL below 0.1 nats per latent dimension or
at most 10% of its latents active (a VQ-VAE's KL is log K, so only its active units can say so).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vqkit.data.datasets import ImageSet, from_model, load_dataset, to_model
from vqkit.data.images import make_grid
from vqkit.errors import UsageError
from vqkit.fsutil import atomic_write_bytes, atomic_write_text
from vqkit.inspect.scalars import read_scalars
from vqkit.nn.presets import preset
from vqkit.nn.vae import GaussianVAE, VAEConfig
from vqkit.nn.vqvae import VQVAE, VQVAEConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import decode_codes, uniform_codes
from vqkit.training.evaluate import evaluate
from vqkit.training.latents import evaluate_vae, latent_use
from vqkit.training.stage1 import TrainConfig, train

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The decoders compared, and the likelihood each is: the conv decoder's independent logistic
# mixture per subpixel, or the PixelCNN over subpixels.
DECODERS = {"conv": "logistic_mixture", "pixelcnn": "pixelcnn"}
COLLAPSE_FILE = "collapse.json"
# The criterion of collapse.
COLLAPSED_KL = 0.1
COLLAPSED_ACTIVE = 0.10


@dataclass
class CollapseSettings:
    """One comparison.

    Args:
        data: the images, as KIND:DIR; grey images get the ``mnist`` and ``vae-mnist`` trunks,
            colour ones ``cifar10`` and ``vae-cifar10``.
        budget: training seconds per model.
        clock: what budget counts: "wall" seconds, or "cpu", this process's CPU seconds (so that on a
            shared machine every model gets the same CPU, whatever else runs).
        steps: at most this many training steps per model.
        batch_size: images per training step.
        lr: Adam's learning rate.
        eval_images: test images each model is measured on.
        samples: reconstructions and samples drawn per model.
        seed: the training seed (the same for every model), and the samples'.
        decoders: the decoders compared: "conv" (an independent logistic mixture per subpixel),
            "pixelcnn" (autoregressive over subpixels).
    """

    data: str
    budget: float = 120.0
    clock: str = "wall"
    steps: int = 100_000
    batch_size: int = 32
    lr: float = 1e-3
    eval_images: int = 500
    samples: int = 8
    seed: int = 0
    decoders: list[str] = field(default_factory=lambda: list(DECODERS))

    def __post_init__(self):
        self.decoders = list(self.decoders)
        unknown = [d for d in self.decoders if d not in DECODERS]
        if unknown or not self.decoders:
            raise UsageError(f"decoders must be some of {', '.join(DECODERS)}; "
                             f"got {', '.join(self.decoders) or 'none'}")
        if self.budget <= 0 or self.steps < 1 or self.eval_images < 2 or self.samples < 1:
            raise UsageError("budget must be positive, steps and samples >= 1, eval_images >= 2")


def model_configs(channels: int, decoders: list[str]) -> dict[str, VQVAEConfig | VAEConfig]:
    """The models compared, by run name ("vae-conv", "vqvae-conv", ...): per decoder a VQ-VAE
    (the ``mnist`` or ``cifar10`` preset) and a Gaussian VAE on the same trunk (hidden widths,
    residual blocks, downsampling) with the latent width of ``vae-mnist`` or ``vae-cifar10``."""
    grey = channels == 1
    vq = preset("mnist" if grey else "cifar10")
    vae_width = preset("vae-mnist" if grey else "vae-cifar10").code_dim
    if vq.in_channels != channels:
        raise UsageError(f"collapse compares models of grey or RGB images; these have {channels} channels")
    configs: dict[str, VQVAEConfig | VAEConfig] = {}
    for decoder in decoders:
        likelihood = DECODERS[decoder]
        configs[f"vae-{decoder}"] = VAEConfig(
            in_channels=vq.in_channels, hidden=vq.hidden, res_hidden=vq.res_hidden,
            num_res_blocks=vq.num_res_blocks, downsample=vq.downsample, code_dim=vae_width,
            likelihood=likelihood)
        configs[f"vqvae-{decoder}"] = dataclasses.replace(vq, likelihood=likelihood)
    return configs


@dataclass
class CollapseRow:
    """One model's figures. ``kl_per_latent``: nats per latent dimension (a VQ-VAE's: log K per
    code); ``kl_per_position``: nats per position of the latent map; ``usage``: the VQ-VAE's share
    of codes used on the test images (None for a VAE); ``kl_curve``: (steps, KL per latent)
    logged in training."""

    name: str
    model: str
    decoder: str
    steps: int
    bits_per_dim: float
    nll_bits_per_dim: float
    kl_per_latent: float
    kl_per_position: float
    latents: int
    active_units: int
    active_fraction: float
    swap_bits_per_dim: float
    psnr: float
    usage: float | None
    kl_curve: tuple[list[int], list[float]]

    @property
    def collapsed(self) -> bool:
        return self.kl_per_latent < COLLAPSED_KL or self.active_fraction <= COLLAPSED_ACTIVE


@dataclass
class CollapseResult:
    settings: CollapseSettings
    rows: list[CollapseRow]

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings),
                "rows": [{**asdict(row), "collapsed": row.collapsed} for row in self.rows]}

    def table(self) -> str:
        header = (f"{'model':<14} {'steps':>6} {'bits/dim':>8} {'KL/latent':>10} {'KL/position':>11} "
                  f"{'active units':>15} {'swap cost':>9} {'usage':>6} {'PSNR':>6}  collapsed")
        lines = [header]
        for r in self.rows:
            usage = f"{100 * r.usage:5.1f}%" if r.usage is not None else f"{'-':>6}"
            active = f"{r.active_units:>6}/{r.latents:<5} ({100 * r.active_fraction:3.0f}%)"
            lines.append(f"{r.name:<14} {r.steps:>6} {r.bits_per_dim:>8.3f} {r.kl_per_latent:>10.4f} "
                         f"{r.kl_per_position:>11.3f} {active}{r.swap_bits_per_dim:>+9.3f} {usage} {r.psnr:>6.2f}  "
                         f"{'yes' if r.collapsed else 'no'}")
        return "\n".join(lines)


def _train_or_reuse(folder: Path, config, settings: CollapseSettings, dataset: ImageSet, progress: bool) -> int:
    """Train ``config`` in ``folder`` for the budget, or reuse the run there; returns its step."""
    if (folder / ckpt.LATEST).exists():
        saved = ckpt.read_config(folder)
        if saved["model"] != config.to_dict():
            raise UsageError(f"{folder} holds a run of another model configuration; choose another -o or remove it")
        return ckpt.latest_checkpoint(folder).step
    train_config = TrainConfig(data=settings.data, steps=settings.steps, time_budget=settings.budget,
                               clock=settings.clock,
                               batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                               checkpoint_every=10**9, log_every=10)
    return train(folder, config, train_config, dataset=dataset, progress=progress).step


def _measure(name: str, model: VQVAE | GaussianVAE, step: int, folder: Path, test: ImageSet,
             settings: CollapseSettings, progress: bool) -> CollapseRow:
    kl_curve = read_scalars(folder / "tensorboard").series.get("train/kl_per_latent", ([], []))
    kind, decoder = name.split("-", 1)
    common = dict(name=name, decoder=decoder, steps=step)
    if isinstance(model, GaussianVAE):
        r = evaluate_vae(model, test, limit=settings.eval_images, progress=progress, seed=settings.seed)
        return CollapseRow(**common, model="VAE", bits_per_dim=r.bits_per_dim, nll_bits_per_dim=r.nll_bits_per_dim,
                           kl_per_latent=r.kl_per_latent, kl_per_position=r.kl_per_position, latents=r.latents,
                           active_units=r.active_units, active_fraction=r.active_fraction,
                           swap_bits_per_dim=r.swap_bits_per_dim, psnr=r.psnr, usage=None,
                           kl_curve=(list(kl_curve[0]), list(kl_curve[1])))
    e = evaluate(model, test, limit=settings.eval_images, progress=progress)
    use = latent_use(model, test, limit=settings.eval_images, progress=progress)
    log_k = math.log(model.config.codebook_size)
    return CollapseRow(**common, model="VQ-VAE", bits_per_dim=e.bits_per_dim, nll_bits_per_dim=e.nll_bits_per_dim,
                       kl_per_latent=log_k, kl_per_position=log_k, latents=use.latents,
                       active_units=use.active_units, active_fraction=use.active_fraction,
                       swap_bits_per_dim=use.swap_bits_per_dim, psnr=e.psnr, usage=e.usage, kl_curve=([], []))


@torch.no_grad()
def _pictures(model: VQVAE | GaussianVAE, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 reconstructions of ``images`` and as many samples (see the module docstring)."""
    x = to_model(images)
    recon = from_model(model.decode(model.encode(x)))
    n, (h, w) = len(images), images.shape[2:]
    if isinstance(model, GaussianVAE):
        return recon, from_model(model.sample(n, h, w, torch.Generator().manual_seed(seed)))
    (mh, mw), = model.config.latent_shapes(h, w)
    codes = uniform_codes(n, mh, mw, model.config.codebook_size, seed)
    return recon, decode_codes(model, [codes])


def collapse_figure(result: CollapseResult) -> Figure:
    """The KL per latent over training (VAEs; a VQ-VAE's log K as a dashed line), then each
    model's share of active units and the cost of another image's latents."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 4), layout="constrained")
    kl_ax, active_ax, swap_ax = fig.subplots(1, 3)
    for row in result.rows:
        if row.model == "VAE" and row.kl_curve[0]:
            kl_ax.plot(*row.kl_curve, label=row.name)
    for log_k in sorted({row.kl_per_latent for row in result.rows if row.model == "VQ-VAE"}):
        kl_ax.axhline(log_k, linestyle="--", color="grey")
        kl_ax.annotate(f"VQ-VAE: log K = {log_k:.2f}", (0, log_k), textcoords="offset points", xytext=(4, -10),
                       fontsize=8, color="grey", xycoords=("axes fraction", "data"))
    kl_ax.axhline(COLLAPSED_KL, linestyle=":", color="red")
    # Log steps: the decoders train at very different speeds within one budget.
    kl_ax.set(title="KL per latent in training (nats)", xlabel="step", xscale="log", yscale="log")
    kl_ax.legend(fontsize=8)
    names = [row.name for row in result.rows]
    colours = ["tab:red" if row.collapsed else "tab:blue" for row in result.rows]
    active_ax.barh(names, [100 * row.active_fraction for row in result.rows], color=colours)
    active_ax.axvline(100 * COLLAPSED_ACTIVE, linestyle=":", color="red")
    active_ax.set(title="active units (%; red: collapsed)", xlim=(0, 100))
    swap_ax.barh(names, [row.swap_bits_per_dim for row in result.rows], color=colours)
    swap_ax.set(title="another image's latents cost (bits/dim)")
    for ax in (active_ax, swap_ax):
        ax.invert_yaxis()
    return fig


def samples_figure(originals: torch.Tensor, pictures: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Figure:
    """A row of test images, then per model a row of their reconstructions and a row of samples."""
    from matplotlib.figure import Figure
    rows = [("test images", originals)]
    for name, (recon, samples) in pictures.items():
        rows += [(f"{name}: reconstructions", recon), (f"{name}: samples", samples)]
    fig = Figure(figsize=(1 + 0.9 * len(originals), 1.05 * len(rows)), layout="constrained")
    for ax, (title, images) in zip(fig.subplots(len(rows), 1, squeeze=False)[:, 0], rows):
        grid = make_grid(images, nrow=len(images)).permute(1, 2, 0).numpy()
        ax.imshow(grid[:, :, 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9, loc="left")
        ax.axis("off")
    return fig


def run_collapse(out: str | Path, settings: CollapseSettings, progress: bool = True) -> CollapseResult:
    """Train (or reuse) and measure the models of ``model_configs`` in ``out`` and write
    ``collapse.json``, ``collapse.png`` and ``samples.png`` there (each atomically)."""
    out = Path(out)
    train_set = load_dataset(settings.data, "train")
    test_set = load_dataset(settings.data, "test")
    originals, _ = test_set.batch(torch.arange(min(settings.samples, len(test_set))))
    rows, pictures = [], {}
    for name, config in model_configs(train_set.channels, settings.decoders).items():
        folder = out / name
        step = _train_or_reuse(folder, config, settings, train_set, progress)
        model, _ = ckpt.load_model(folder, kinds=ckpt.STAGE1_KINDS)
        rows.append(_measure(name, model, step, folder, test_set, settings, progress))
        pictures[name] = _pictures(model, originals, settings.seed)
    from vqkit.inspect.figures import figure_png  # matplotlib: not needed to parse the command line
    result = CollapseResult(settings, rows)
    atomic_write_text(out / COLLAPSE_FILE, json.dumps(result.to_dict(), indent=2))
    atomic_write_bytes(out / "collapse.png", figure_png(collapse_figure(result)))
    atomic_write_bytes(out / "samples.png", figure_png(samples_figure(originals, pictures)))
    return result
