"""Images in, model pixels out: resize (no crop), rescale to [0, 1], normalise with mean/std.

We resize ourselves instead of calling each model's image processor because processors crop
differently (model_stitching.md §4.1): two models that see "the same image" must see the same
field of view. Otherwise we do what the checkpoint's own (PIL) processor does: transparency is
composited onto white, and the uint8 image is resized with PIL using the checkpoint's own filter
(its processor's `resample`, else the family's default, see families.py), so where the processor
does not crop, we give its pixels.
SigLIP2 NaFlex models additionally take patchified pixels with a per-image grid and padding mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from stitchkit.data.images import to_rgb
from stitchkit.errors import InputError

# The filter of a model that has no processor of its own (a module built in memory, e.g. a micro-zoo
# encoder, which trains at its native size): bicubic, what stitchkit has always written for those.
DEFAULT_RESAMPLE = Image.Resampling.BICUBIC


@dataclass
class PatchifiedPixels:
    """The input of a SigLIP2 NaFlex model, as its Hugging Face processor makes it.

    pixel_values: (B, max_num_patches, patch*patch*3), each image's patches in row-major order,
        channels last inside a patch; rows past an image's own patches are zero padding.
    pixel_attention_mask: (B, max_num_patches) int32, 1 for real patches, 0 for padding.
    spatial_shapes: (B, 2) int64, each image's patch grid (rows, cols).
    """

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    spatial_shapes: torch.Tensor

    def to(self, *args, **kwargs) -> PatchifiedPixels:
        """Like Tensor.to; a dtype applies only to pixel_values (the mask and grid stay integers)."""
        pixel_values = self.pixel_values.to(*args, **kwargs)
        device = pixel_values.device
        return PatchifiedPixels(
            pixel_values, self.pixel_attention_mask.to(device), self.spatial_shapes.to(device)
        )

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


def as_uint8_images(images) -> list[np.ndarray]:
    """A PIL image, a list of PIL images / uint8 (H, W, 3) arrays, or a uint8 (N, H, W, 3) batch -> arrays."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(
                f"expected a uint8 image batch of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
            )
        return list(images)
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        raise InputError("expected a non-empty list of PIL images or a uint8 (N, H, W, 3) array")
    arrays = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            arrays.append(np.asarray(to_rgb(image)))
        elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
            arrays.append(image)
        else:
            raise InputError(f"image {i}: expected a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")
    return arrays


def resampling_filter(value) -> Image.Resampling:
    """A PIL filter from its number (what a preprocessor_config.json's `resample` holds) or itself."""
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError):
        choices = ", ".join(f"{f.value} ({f.name.lower()})" for f in Image.Resampling)
        raise InputError(f"resample must be one of PIL's filters {choices}; got {value!r}") from None


def resize_uint8(image: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """Resize one uint8 (H, W, 3) image with a PIL filter; an image already at that size is left untouched."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W): (x / 255 - mean) / std, per channel."""
    x = torch.from_numpy(batch.astype(np.float32)) / 255.0  # astype copies: PIL arrays are read-only
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()


def preprocess_fixed(images, image_size: int, mean, std, resample: Image.Resampling) -> torch.Tensor:
    """Every image resized to image_size x image_size and normalised: float32 (N, 3, S, S)."""
    arrays = [resize_uint8(a, image_size, image_size, resample) for a in as_uint8_images(images)]
    return normalize(np.stack(arrays), mean, std)


def naflex_image_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The size SigLIP2's NaFlex processor resizes an image to: the largest aspect-preserving scale whose
    patch grid (each side rounded up to whole patches, at least one) holds at most max_num_patches.

    Same binary search as transformers' `get_image_size_for_max_num_patches` (siglip2 image processor).
    """

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    eps = 1e-5
    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size) <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, rows*cols, patch*patch*C): row-major patches, channels last inside a patch."""
    n, c, h, w = pixels.shape
    rows, cols = h // patch_size, w // patch_size
    x = pixels[:, :, : rows * patch_size, : cols * patch_size]
    x = x.reshape(n, c, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, rows * cols, patch_size * patch_size * c)


def full_patchified(pixels: torch.Tensor, patch_size: int) -> PatchifiedPixels:
    """An already normalised (N, 3, H, W) batch as unpadded NaFlex input (every patch real)."""
    n, _, h, w = pixels.shape
    patches = patchify(pixels, patch_size)
    mask = torch.ones(n, patches.shape[1], dtype=torch.int32, device=pixels.device)
    shapes = torch.tensor([[h // patch_size, w // patch_size]] * n, dtype=torch.long, device=pixels.device)
    return PatchifiedPixels(patches, mask, shapes)


def preprocess_naflex(
    images, patch_size: int, max_num_patches: int, mean, std, resample: Image.Resampling
) -> PatchifiedPixels:
    """Each image resized to keep its aspect ratio within max_num_patches, patchified, zero-padded."""
    values, masks, shapes = [], [], []
    for array in as_uint8_images(images):
        height, width = naflex_image_size(array.shape[0], array.shape[1], patch_size, max_num_patches)
        pixels = normalize(resize_uint8(array, height, width, resample)[None], mean, std)
        patches = patchify(pixels, patch_size)[0]
        count = patches.shape[0]
        padded = torch.zeros(max_num_patches, patches.shape[1], dtype=torch.float32)
        padded[:count] = patches
        mask = torch.zeros(max_num_patches, dtype=torch.int32)
        mask[:count] = 1
        values.append(padded)
        masks.append(mask)
        shapes.append((height // patch_size, width // patch_size))
    return PatchifiedPixels(torch.stack(values), torch.stack(masks), torch.tensor(shapes, dtype=torch.long))
