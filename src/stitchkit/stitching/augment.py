"""TLT's training augmentation (spec §7): RandomResizedCrop (scale 0.5-1, aspect ratio 3/4-4/3) and a horizontal
flip, one draw per image shared by everything that reads it (the source's pixels and, in segmentation, the image's
label map), as torchvision's transforms do it (torchvision itself is not a dependency).

Draws come from torch's global CPU generator, which the engine seeds per run and saves in every checkpoint: an
augmented training gives the same bytes for the same seed and resumes exactly after a kill.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

SCALE = (0.5, 1.0)  # the crop's share of the image's area
RATIO = (3 / 4, 4 / 3)  # the crop's width / height (drawn log-uniformly)


def _uniform(low: float, high: float) -> float:
    return torch.empty(1).uniform_(low, high).item()


def crop_box(size: int, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box in a size x size image: torchvision's RandomResizedCrop.get_params.
    Ten tries at a box of random area and aspect ratio; if none fits, the whole image (its fallback for a square
    image whose ratio, 1, lies in `ratio`)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = size * size * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        width, height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < width <= size and 0 < height <= size:
            top = int(torch.randint(0, size - height + 1, (1,)))
            left = int(torch.randint(0, size - width + 1, (1,)))
            return left, top, left + width, top + height
    return 0, 0, size, size


def random_resized_crop(images: np.ndarray, labels: np.ndarray, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Each of `images` (B, S, S, 3) uint8 cut to a random box, resized back to S x S (bilinear, antialiased) and
    mirrored with probability 1/2. `labels` are (B,) class indices, returned as they are, or (B, S, S) label maps,
    cut, resized (nearest) and mirrored with their image."""
    size = images.shape[1]
    maps = labels.ndim == 3
    out_images, out_labels = np.empty_like(images), labels.copy()
    for i in range(len(images)):
        box = crop_box(size)
        mirror = flip and _uniform(0.0, 1.0) < 0.5
        # Cut, then resize (torchvision's resized_crop): pixels outside the box never blend in.
        image = Image.fromarray(images[i]).crop(box).resize((size, size), Image.Resampling.BILINEAR)
        out_images[i] = np.asarray(image)[:, ::-1] if mirror else np.asarray(image)
        if maps:  # mode I (int32) keeps negative ignore labels
            label = Image.fromarray(labels[i].astype(np.int32)).crop(box).resize((size, size), Image.Resampling.NEAREST)
            out_labels[i] = np.asarray(label)[:, ::-1] if mirror else np.asarray(label)
    return out_images, out_labels
