"""One VisionBackbone interface over Hugging Face vision transformers (see backbone.py)."""

from stitchkit.backbones.backbone import BlockContext, VisionBackbone, call_block
from stitchkit.backbones.families import FAMILIES, SUPPORTED_MODEL_TYPES
from stitchkit.backbones.loading import load_backbone, save_backbone
from stitchkit.backbones.preprocess import PatchifiedPixels

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "BlockContext",
    "PatchifiedPixels",
    "VisionBackbone",
    "call_block",
    "load_backbone",
    "save_backbone",
]
