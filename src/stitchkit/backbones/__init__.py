"""One VisionBackbone interface over Hugging Face vision transformers (see backbone.py)."""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
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

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "backbone": ["BlockContext", "VisionBackbone", "call_block"],
        "families": ["FAMILIES", "SUPPORTED_MODEL_TYPES"],
        "loading": ["load_backbone", "save_backbone"],
        "preprocess": ["PatchifiedPixels"],
    },
)
