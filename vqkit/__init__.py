"""vqkit: VQ-VAE (van den Oord et al. 2017) and VQ-VAE-2 (Razavi et al. 2019) in PyTorch.

What a script needs is importable from here::

    from vqkit import VQVAE, preset, load_model, Codec

    model = VQVAE(preset("mnist"))                  # or load_model("runs/mnist")[0]
    codes = model.encode(x)                          # a list of code maps, top-first
    x_hat = model.decode(codes)

The package is laid out by layers, each importing only those below it (``tests/test_layers.py``
checks it): ``nn`` (quantizers, nets, likelihoods, models, presets: pure torch), ``data``
(datasets, image helpers), ``prior`` (autoregressive priors, sampling), ``runs`` (run folders,
code sets), ``training`` (training, evaluation), ``codec`` (``.vq`` files, rate-distortion),
``inspect`` (statistics, figures, report) and ``cli`` (the ``vqkit`` command); ``errors``,
``config``, ``fsutil``, ``precision`` and ``distributed`` serve them all. The names below load
their module on first use, so ``import vqkit`` costs nothing and importing a lower layer never
pulls in a higher one.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(["VqkitError", "ConfigError", "UsageError", "CodecError"], "vqkit.errors"),
    **dict.fromkeys(["VectorQuantizer", "Quantizer", "QuantizerOutput", "CodebookUsage"], "vqkit.nn.quantize"),
    **dict.fromkeys(["FSQ", "LFQ"], "vqkit.nn.scalar"),
    **dict.fromkeys(["ResidualVQ"], "vqkit.nn.residual"),
    **dict.fromkeys(["VQVAE", "VQVAE2", "VQVAEConfig", "VQVAE2Config", "VQVAEOutput", "CodeMap", "build_model",
                     "level_names", "with_quantizer"], "vqkit.nn.vqvae"),
    **dict.fromkeys(["GaussianVAE", "VAEConfig", "VAEOutput", "gaussian_kl"], "vqkit.nn.vae"),
    **dict.fromkeys(["PRESETS", "preset"], "vqkit.nn.presets"),
    **dict.fromkeys(["GaussianLikelihood", "LogisticMixtureLikelihood", "make_likelihood"], "vqkit.nn.likelihood"),
    **dict.fromkeys(["PixelCNNLikelihood"], "vqkit.nn.pixelcnn"),
    **dict.fromkeys(["Classifier", "ClassifierConfig"], "vqkit.nn.classifier"),
    **dict.fromkeys(["Prior", "PriorConfig", "GatedPixelCNN", "PixelSNAIL", "build_prior", "sample"], "vqkit.prior"),
    **dict.fromkeys(["DataError", "load_dataset", "to_model", "from_model"], "vqkit.data.datasets"),
    **dict.fromkeys(["ImageError", "load_image", "save_png", "make_grid"], "vqkit.data.images"),
    **dict.fromkeys(["CheckpointError", "load_model", "load_prior", "load_classifier"], "vqkit.runs.checkpoint"),
    **dict.fromkeys(["CodeSet", "CodeStoreError", "extract_codes", "load_codes"], "vqkit.runs.codes"),
    **dict.fromkeys(["LevelPrior", "chain_codes", "decode_codes", "reject_codes", "Rejection"], "vqkit.runs.generate"),
    **dict.fromkeys(["TrainConfig", "train"], "vqkit.training.stage1"),
    **dict.fromkeys(["PriorTrainConfig", "train_prior", "evaluate_prior"], "vqkit.training.prior"),
    **dict.fromkeys(["TrainingError"], "vqkit.training.loop"),
    **dict.fromkeys(["ClassifierTrainConfig", "train_classifier", "fit_classifier"], "vqkit.training.classifier"),
    **dict.fromkeys(["evaluate", "EvalResult"], "vqkit.training.evaluate"),
    **dict.fromkeys(["evaluate_vae", "latent_use", "LatentUse", "VAEEvalResult"], "vqkit.training.latents"),
    **dict.fromkeys(["Codec"], "vqkit.codec.codec"),
    **dict.fromkeys(["frechet_distance", "precision_recall"], "vqkit.inspect.metrics"),
    **dict.fromkeys(["ScoreSettings", "score_chain"], "vqkit.inspect.score"),
    **dict.fromkeys(["CollapseSettings", "run_collapse"], "vqkit.inspect.collapse"),
    **dict.fromkeys(["DistributedError"], "vqkit.distributed"),
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vqkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
