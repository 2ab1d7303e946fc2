"""Model stitching of vision foundation models (Mai et al., "Revisiting Model Stitching in the Foundation
Model Era", CVPR 2026): stitch layers, the stitched model, objectives (LFM, TLT, FFM, FFM->TLT), diagnostics,
the protocol sweep with self-stitch controls, and the VFM Stitch Tree. See docs/stitching.md.
"""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.stitching.diagnostics import DistanceMeter, prediction_overlap
    from stitchkit.stitching.layers import build_stitch, least_squares_fit, least_squares_init
    from stitchkit.stitching.model import StitchedModel
    from stitchkit.stitching.objectives import (
        final_feature_matching_loss,
        layer_feature_matching_loss,
        task_loss,
    )
    from stitchkit.stitching.tokens import GridAdapter, PrefixBridge
    from stitchkit.stitching.tree import StitchTree, normalised_gain, vst_blocks, vst_overhead

__all__ = [
    "DistanceMeter",
    "GridAdapter",
    "PrefixBridge",
    "StitchTree",
    "StitchedModel",
    "build_stitch",
    "final_feature_matching_loss",
    "layer_feature_matching_loss",
    "least_squares_fit",
    "least_squares_init",
    "normalised_gain",
    "prediction_overlap",
    "task_loss",
    "vst_blocks",
    "vst_overhead",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "diagnostics": ["DistanceMeter", "prediction_overlap"],
        "layers": ["build_stitch", "least_squares_fit", "least_squares_init"],
        "model": ["StitchedModel"],
        "objectives": ["final_feature_matching_loss", "layer_feature_matching_loss", "task_loss"],
        "tokens": ["GridAdapter", "PrefixBridge"],
        "tree": ["StitchTree", "normalised_gain", "vst_blocks", "vst_overhead"],
    },
)
