"""Which VLM a patches run fine-tunes: a hub id, a local folder, or a micro VLM spec such as `zoo:micro_vlm` (built on demand),
and how its images are prepared: Qwen2-VL's pixel bounds and, optionally, the official Qwen pre-resize."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from PIL import Image

from stitchkit.errors import ConfigError, InputError
from stitchkit.patches.config import ModelSettings
from stitchkit.vlm import VLM, load_vlm

# qwen_vl_utils 0.0.10 (the version the official code pins), src/qwen_vl_utils/vision_process.py: fetch_image's
# defaults. Written from that source (QwenLM's qwen-vl-utils; not a dependency here).
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 4 * 28 * 28
QWEN_MAX_PIXELS = 16384 * 28 * 28
QWEN_MAX_RATIO = 200


def model_loader(settings: ModelSettings, source: str) -> Callable[[], VLM]:
    """A function that loads a fresh copy of the model (every training starts from the pretrained weights)."""
    device = "cuda" if torch.cuda.is_available() else None

    def load() -> VLM:
        vlm = load_vlm(source, dtype=getattr(torch, settings.dtype), device=device,
                       chat_template=settings.chat_template, image_layout=settings.image_layout)  # fmt: skip
        prepare_images(vlm, settings)
        return vlm

    return load


def prepare_images(vlm: VLM, settings: ModelSettings) -> None:
    """Apply the model settings that shape its images: Qwen2-VL's pixel bounds and the pre-resize. Every image
    the suite hands the model (training batches, image-based evaluation, the recognition pre-check, the
    moderation study) goes through `vlm.encode`, which runs `vlm.image_transform` on it and then the processor."""
    if settings.min_pixels is not None or settings.max_pixels is not None:
        _set_pixel_bounds(vlm, settings.min_pixels, settings.max_pixels)
    if settings.pre_resize == "qwen_fetch_image":
        _qwen_image_processor(vlm, "model.pre_resize: qwen_fetch_image")
        vlm.image_transform = qwen_fetch_image


def _qwen_image_processor(vlm: VLM, setting: str):
    image_processor = getattr(vlm.processor, "image_processor", None)
    size = dict(getattr(image_processor, "size", None) or {})
    if "shortest_edge" not in size or "longest_edge" not in size:
        raise ConfigError(f"{setting} applies to Qwen2-VL-style image processors only, not {type(image_processor).__name__}")
    return image_processor


def _set_pixel_bounds(vlm: VLM, min_pixels: int | None, max_pixels: int | None) -> None:
    """Qwen2-VL's image processor bounds (the official runs use 32*28^2 .. 128*28^2: 32 to 128 vision tokens)."""
    image_processor = _qwen_image_processor(vlm, "model.min_pixels / max_pixels")
    size = dict(image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    image_processor.size = size


# ---- the official Qwen pre-resize ------------------------------------------------------------------------


def qwen_smart_resize(
    height: int, width: int, factor: int = QWEN_FACTOR, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) as qwen_vl_utils.smart_resize (0.0.10): each side rounded to the nearest multiple of
    `factor` (Python's round: halves go to the even multiple; at least `factor`); if that has more than
    `max_pixels` pixels, both sides are scaled by sqrt(max_pixels / (h w)) and floored to multiples of
    `factor`; if fewer than `min_pixels`, scaled by sqrt(min_pixels / (h w)) and ceiled. The scaled sides
    start from the original size, not the rounded one. An aspect ratio above 200 is refused, as there."""
    if max(height, width) / min(height, width) > QWEN_MAX_RATIO:
        raise InputError(f"a {width}x{height} px image has an aspect ratio above {QWEN_MAX_RATIO}, which the Qwen "
                         "pre-resize (model.pre_resize: qwen_fetch_image) refuses, as qwen_vl_utils does")  # fmt: skip
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_fetch_image(image: Image.Image) -> Image.Image:
    """The image as qwen_vl_utils.fetch_image({"image": image}) gives it to the official code's Qwen processor:
    RGB (transparent pixels on white), resized (PIL, bicubic) to qwen_smart_resize of its size with the
    default bounds 4..16384 x 28^2 pixels. The processor then applies its own bounds to the result."""
    if image.mode == "RGBA":  # qwen_vl_utils composites RGBA only (data.to_rgb also does LA and palette transparency)
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(image, mask=image.split()[3])
    else:
        rgb = image.convert("RGB")
    height, width = qwen_smart_resize(rgb.height, rgb.width)
    return rgb.resize((width, height), Image.Resampling.BICUBIC)

