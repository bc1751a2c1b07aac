"""Images in and out: datasets named ``KIND:DIR`` (IDX, CIFAR-10 binary batches, image folders),
decoded to uint8 tensors, and the image helpers (decode a file, tile a grid, write a PNG).

Models see ``to_model(images)``, floats in [-1, 1]; ``from_model`` turns them back into uint8.
"""

from vqkit.data.datasets import (
                                 DataError,
                                 ImageSet,
                                 TensorImageSet,
                                 find_fashion_mnist,
                                 from_model,
                                 in_memory,
                                 load_dataset,
                                 sample_dir,
                                 to_model,
)
from vqkit.data.images import IMAGE_SUFFIXES, ImageError, load_image, make_grid, save_png, side_by_side

__all__ = ["DataError", "IMAGE_SUFFIXES", "ImageError", "ImageSet", "TensorImageSet", "find_fashion_mnist",
           "from_model", "in_memory", "load_dataset", "load_image", "make_grid", "sample_dir", "save_png",
           "side_by_side", "to_model"]
