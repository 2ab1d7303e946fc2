"""The supported Hugging Face vision architectures, keyed by `config.model_type`.

A family records only what cannot be probed from the module itself: which transformers class loads
it, its default normalisation and resize filter, whether it has a CLS token, and whether the model's
own `last_hidden_state` is normed (CLIP's is not). Module paths (blocks, norms, heads) are found by
probing attributes in `VisionBackbone`, never by transformers version (model_stitching.md §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)

BILINEAR, BICUBIC = PILImageResampling.BILINEAR, PILImageResampling.BICUBIC


@dataclass(frozen=True)
class Family:
    name: str
    vision_class: str  # the transformers class that holds the vision tower, loaded by name
    processor_class: str  # written into preprocessor_config.json by save_backbone
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_cls: bool
    # The filter of the family's HF image processor class (its `resample` default), used for a checkpoint
    # whose preprocessor_config.json does not say, as HF's processor would.
    resample: PILImageResampling
    # CLIP's last_hidden_state is the raw last block; post_layernorm touches only the pooled CLS.
    final_norms_tokens: bool = True
    # SigLIP2 NaFlex takes patchified pixels plus spatial_shapes and a padding mask.
    patchified: bool = False
    # Weights of the vision class that the backbone never uses, so a checkpoint may lack them.
    unused_weights: tuple[str, ...] = ()


_IMAGENET = dict(mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))
_HALF = dict(mean=tuple(IMAGENET_STANDARD_MEAN), std=tuple(IMAGENET_STANDARD_STD))  # 0.5 / 0.5

DINOV2 = Family("dinov2", "Dinov2Model", "BitImageProcessor", has_cls=True, resample=BICUBIC, **_IMAGENET)
DINOV2_REG = Family(
    "dinov2_with_registers",
    "Dinov2WithRegistersModel",
    "BitImageProcessor",
    has_cls=True,
    resample=BICUBIC,
    **_IMAGENET,
)
DINOV3 = Family(
    "dinov3_vit", "DINOv3ViTModel", "DINOv3ViTImageProcessorFast", has_cls=True, resample=BILINEAR, **_IMAGENET
)
# ViTModel builds a tanh pooler on CLS that the backbone does not use (its pool is the normed CLS); classification
# checkpoints such as google/vit-base-patch16-224 (ViTForImageClassification) carry no pooler weights.
VIT = Family(
    "vit", "ViTModel", "ViTImageProcessor", has_cls=True, resample=BILINEAR, unused_weights=("pooler.",), **_HALF
)
CLIP = Family(
    "clip",
    "CLIPVisionModel",
    "CLIPImageProcessor",
    mean=tuple(OPENAI_CLIP_MEAN),
    std=tuple(OPENAI_CLIP_STD),
    has_cls=True,
    resample=BICUBIC,
    final_norms_tokens=False,
)
SIGLIP = Family("siglip", "SiglipVisionModel", "SiglipImageProcessor", has_cls=False, resample=BICUBIC, **_HALF)
SIGLIP2_NAFLEX = Family(
    "siglip2",
    "Siglip2VisionModel",
    "Siglip2ImageProcessor",
    has_cls=False,
    resample=BILINEAR,
    patchified=True,
    **_HALF,
)

# Full image-text checkpoints (clip, siglip, siglip2) map to their vision tower's family.
# FixRes SigLIP2 checkpoints declare model_type "siglip" and so load as SiglipVisionModel.
FAMILIES: dict[str, Family] = {
    "dinov2": DINOV2,
    "dinov2_with_registers": DINOV2_REG,
    "dinov3_vit": DINOV3,
    "vit": VIT,
    "clip": CLIP,
    "clip_vision_model": CLIP,
    "siglip": SIGLIP,
    "siglip_vision_model": SIGLIP,
    "siglip2": SIGLIP2_NAFLEX,
    "siglip2_vision_model": SIGLIP2_NAFLEX,
}

SUPPORTED_MODEL_TYPES = ", ".join(sorted(FAMILIES))
