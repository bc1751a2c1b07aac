"""Codes as compression: the ``.vq`` container (``format``), uniform mode's mixed-radix packing
(``packing``), the codec that range-codes the codes with the priors' conditionals (``codec``) and
rate-distortion against JPEG and WebP (``rd``)."""

from vqkit.codec.codec import Codec, CodecError, Compressed

__all__ = ["Codec", "CodecError", "Compressed"]
