"""Batched image augmentations in plain torch (no torchvision): random resized crop, flip, light jitter.

They run on the training device inside the loss function, on float images in [0, 1] of shape (B, 3, H, W),
and draw from torch's global generator, which the engine seeds, so the same seed gives the same views.
The jitter only scales brightness and contrast: hue is untouched, so an object's colour name stays true.
Only `grayscale` removes colour; it is for self-supervised recipes (DINO uses it), where no label names a colour.
"""

from __future__ import annotations

import math

import pydantic
import torch
import torch.nn.functional as F

from stitchkit.config import Config


class Augmentation(Config):
    """How training views are drawn; the defaults leave images unchanged."""

    crop_scale: tuple[float, float] = (1.0, 1.0)  # fraction of the image area a crop covers, min and max
    flip: bool = False  # horizontal flip with probability 1/2
    brightness: float = 0.0  # multiply by a factor in [1 - brightness, 1 + brightness]
    contrast: float = 0.0  # scale the distance to the mean grey by a factor in [1 - contrast, 1 + contrast]
    grayscale: float = 0.0  # probability of replacing an image by its luminance (DINO's RandomGrayscale)

    @pydantic.field_validator("crop_scale")
    @classmethod
    def _check_scale(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"needs 0 < min <= max <= 1, got {list(scale)}")
        return scale

    @pydantic.field_validator("brightness", "contrast", "grayscale")
    @classmethod
    def _check_fraction(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"needs 0 <= value < 1, got {value}")
        return value


def _uniform(low: float, high: float, n: int, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device)


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float], flip: bool) -> torch.Tensor:
    """Crop a random box (area fraction in `scale`, aspect ratio in [3/4, 4/3]) and resize it to the input size.

    One affine sampling grid per image does crop, resize and flip at once (bilinear, border padding).
    """
    n, device = images.shape[0], images.device
    area = _uniform(scale[0], scale[1], n, device)
    # The aspect ratio r must keep both sides inside the image: sqrt(area * r) <= 1 and sqrt(area / r) <= 1.
    low = torch.clamp(area.log(), min=math.log(3 / 4))
    high = torch.clamp(-area.log(), max=math.log(4 / 3))
    ratio = (low + (high - low) * torch.rand(n, device=device)).exp()
    # Half-sizes in affine_grid's [-1, 1] coordinates equal the crop's fraction of the side.
    half_w = torch.sqrt(area * ratio)
    half_h = torch.sqrt(area / ratio)
    centre_x = (2 * torch.rand(n, device=device) - 1) * (1 - half_w)
    centre_y = (2 * torch.rand(n, device=device) - 1) * (1 - half_h)
    sign_x = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=device)
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = half_w * sign_x
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = half_h
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def brightness_contrast(images: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    n, device = images.shape[0], images.device
    b = _uniform(1 - brightness, 1 + brightness, n, device).view(n, 1, 1, 1)
    c = _uniform(1 - contrast, 1 + contrast, n, device).view(n, 1, 1, 1)
    grey = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - grey) * c + grey) * b


def random_grayscale(images: torch.Tensor, probability: float) -> torch.Tensor:
    """Replace each image, with `probability`, by its ITU-R 601 luminance in all three channels."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    luminance = (images * weights).sum(dim=1, keepdim=True).expand_as(images)
    chosen = (torch.rand(images.shape[0], device=images.device) < probability).view(-1, 1, 1, 1)
    return torch.where(chosen, luminance, images)


def augment(images: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """One random view of each image in a (B, 3, H, W) float batch in [0, 1]."""
    if aug.crop_scale != (1.0, 1.0) or aug.flip:
        images = random_resized_crop(images, aug.crop_scale, aug.flip)
    if aug.brightness > 0 or aug.contrast > 0:
        images = brightness_contrast(images, aug.brightness, aug.contrast)
    if aug.grayscale > 0:
        images = random_grayscale(images, aug.grayscale)
    return images.clamp(0.0, 1.0)
