"""vqkit: VQ-VAE (van den Oord et al. 2017) discrete latent image models in PyTorch.

Modules: ``data`` (datasets), ``quantize`` (vector quantizer), ``nets`` and ``model`` (the
VQ-VAE), ``likelihood`` (p(x|z) and bits/dim), ``train``, ``evaluate``, ``checkpoint`` (run
folders), ``cli`` (the ``vqkit`` command).
"""

__version__ = "0.1.0"
