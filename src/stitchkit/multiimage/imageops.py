"""Pixel-space controls of the MIMIC studies: the down/up-sampling control of the pooling probe, and the
image-stitching control (one canvas instead of N images).

Both work at the resolution the model's encoder sees (`encoder_side`): LLaVA-OneVision pads every image of a
multi-image prompt to a square and resizes it to 384 px, so a control that removes information must do so
relative to 384 px, not to the (usually larger) original file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

STITCH_BACKGROUND = (255, 255, 255)  # the official legacy loader white-pads the images it concatenates


def encoder_side(vlm) -> int | None:
    """The square side the model's image processor resizes an image to (LLaVA-OV: 384), or None when the
    processor keeps native resolutions (Qwen2-VL)."""
    size = getattr(getattr(vlm.processor, "image_processor", None), "size", None)
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)  # dict or SizeDict
    if get("height"):
        return int(get("height"))
    # CLIP-style {"shortest_edge": 224} is a side; Qwen2-VL's {"shortest_edge", "longest_edge"} are pixel counts
    if get("shortest_edge") and not get("longest_edge"):
        return int(get("shortest_edge"))
    return None


def fit_size(width: int, height: int, side: int | None) -> tuple[int, int]:
    """(w, h) with the longer edge scaled to `side`: what the encoder sees of the image after square padding."""
    if side is None:
        return width, height
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resample_image(image: Image.Image, factor: int, side: int | None) -> Image.Image:
    """The pooling probe's pixel control (mimic.md section 8): at the encoder's resolution, bicubic downsampling
    by sqrt(f) per side (so 1/f of the pixels), then back up. The encoder then produces as many tokens as
    before -- the sequence keeps its length -- but the image holds about as much information as f-pooled tokens."""
    if factor == 1:
        return image
    width, height = fit_size(*image.size, side)
    small = (max(1, round(width / math.sqrt(factor))), max(1, round(height / math.sqrt(factor))))
    seen = image.resize((width, height), Image.Resampling.BICUBIC)
    return seen.resize(small, Image.Resampling.BICUBIC).resize((width, height), Image.Resampling.BICUBIC)


def stitch_grid(n: int) -> tuple[int, int]:
    """(columns, rows) of the most square grid that holds n tiles."""
    columns = math.ceil(math.sqrt(n))
    return columns, math.ceil(n / columns)


def stitch_images(images: Sequence[Image.Image], tile: int) -> Image.Image:
    """The image-stitching control (paper appendix): the sample's images, in order, tiled row by row into one
    canvas. Every image is fitted into a `tile` x `tile` cell (aspect kept, white padding, centred), so the
    canvas holds the N images at the resolution each would have had alone; a processor with dynamic
    resolution (LLaVA-OV's anyres, Qwen2-VL) then gives the canvas a vision-token count similar to N images."""
    columns, rows = stitch_grid(len(images))
    canvas = Image.new("RGB", (columns * tile, rows * tile), STITCH_BACKGROUND)
    for i, image in enumerate(images):
        width, height = fit_size(*image.size, tile)
        fitted = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        x, y = (i % columns) * tile + (tile - width) // 2, (i // columns) * tile + (tile - height) // 2
        canvas.paste(fitted, (x, y))
    return canvas
