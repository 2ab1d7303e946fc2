"""The shapes world: a procedural, seeded stand-in for COCO/ImageNet that works offline.

    ontology.py  categories in supercategories, named colours, sizes, positions (ONTOLOGY)
    scene.py     WorldConfig and the scene sampler (objects, geometry, occlusion control)
    render.py    outlines, backgrounds, rasteriser with exact instance masks and semantic maps
    captions.py  "two red stars and a blue circle"
    coco.py      COCO-format export (PNG files + annotations.json with RLE masks)
    sets.py      in-memory numpy classification and segmentation sets
"""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.world.captions import caption
    from stitchkit.world.coco import mask_to_rle, render_coco, rle_to_mask
    from stitchkit.world.ontology import ONTOLOGY, Category, Colour, Ontology, position_name
    from stitchkit.world.render import RenderedScene, render_scene
    from stitchkit.world.scene import Scene, SceneObject, WorldConfig, sample_object, sample_scene
    from stitchkit.world.sets import ClassificationSet, SegmentationSet, classification_set, segmentation_set

__all__ = [
    "ONTOLOGY",
    "Category",
    "ClassificationSet",
    "Colour",
    "Ontology",
    "RenderedScene",
    "Scene",
    "SceneObject",
    "SegmentationSet",
    "WorldConfig",
    "caption",
    "classification_set",
    "mask_to_rle",
    "position_name",
    "render_coco",
    "render_scene",
    "rle_to_mask",
    "sample_object",
    "sample_scene",
    "segmentation_set",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "captions": ["caption"],
        "coco": ["mask_to_rle", "render_coco", "rle_to_mask"],
        "ontology": ["ONTOLOGY", "Category", "Colour", "Ontology", "position_name"],
        "render": ["RenderedScene", "render_scene"],
        "scene": ["Scene", "SceneObject", "WorldConfig", "sample_object", "sample_scene"],
        "sets": ["ClassificationSet", "SegmentationSet", "classification_set", "segmentation_set"],
    },
)
