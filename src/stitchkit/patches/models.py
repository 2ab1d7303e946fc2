"""Which VLM a patches run fine-tunes: a hub id, a local folder, or a micro VLM spec such as `zoo:micro_vlm` (built on demand)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from stitchkit.errors import ConfigError
from stitchkit.patches.config import ModelSettings
from stitchkit.vlm import VLM, load_vlm


def model_loader(settings: ModelSettings, source: str) -> Callable[[], VLM]:
    """A function that loads a fresh copy of the model (every training starts from the pretrained weights)."""
    device = "cuda" if torch.cuda.is_available() else None

    def load() -> VLM:
        vlm = load_vlm(source, dtype=getattr(torch, settings.dtype), device=device,
                       chat_template=settings.chat_template, image_layout=settings.image_layout)  # fmt: skip
        if settings.min_pixels is not None or settings.max_pixels is not None:
            _set_pixel_bounds(vlm, settings.min_pixels, settings.max_pixels)
        return vlm

    return load


def _set_pixel_bounds(vlm: VLM, min_pixels: int | None, max_pixels: int | None) -> None:
    """Qwen2-VL's image processor bounds (the official runs use 32*28^2 .. 128*28^2: 32 to 128 vision tokens)."""
    image_processor = vlm.processor.image_processor
    size = dict(getattr(image_processor, "size", None) or {})
    if "shortest_edge" not in size or "longest_edge" not in size:
        raise ConfigError("model.min_pixels / max_pixels apply to Qwen2-VL-style image processors only")
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    image_processor.size = size


