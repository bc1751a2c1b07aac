"""Codes as compression: the ``.vq`` format (header, uniform packing, range coding with the
priors' conditionals) and rate-distortion against JPEG and WebP (``vqkit.codec.rd``)."""

from vqkit.codec.codec import Codec, CodecError, Compressed

__all__ = ["Codec", "CodecError", "Compressed"]
