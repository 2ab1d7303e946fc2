"""In-memory datasets as numpy arrays: single-object classification sets and multi-object segmentation sets.

These feed probes and the micro zoo, which train on tens of thousands of small images, so they skip PNG
encoding and the per-scene bookkeeping of `render_scene` where it is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from stitchkit.config import validate_config
from stitchkit.errors import ConfigError
from stitchkit.progress import track
from stitchkit.world.captions import caption
from stitchkit.world.ontology import ONTOLOGY
from stitchkit.world.render import check_render_args, paint, render_scene
from stitchkit.world.scene import Scene, WorldConfig, sample_object, sample_scene

Target = Literal["category", "colour", "both"]

# One large object per image: small objects at 32-64 px would be a handful of pixels.
CLASSIFICATION_DEFAULTS = WorldConfig(min_objects=1, max_objects=1, min_size=0.4, max_size=0.9)


@dataclass
class ClassificationSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, index into class_names
    class_names: list[str]
    category: np.ndarray  # (N,) int64, index into ONTOLOGY.categories (category id - 1)
    colour: np.ndarray  # (N,) int64, index into ONTOLOGY.colours
    captions: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SegmentationSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) int64 semantic maps: 0 = background, else category id
    captions: list[str]
    scenes: list[Scene]  # as drawn (fully hidden objects left out)
    class_names: list[str]  # index = value in masks: "background", then the categories

    def __len__(self) -> int:
        return len(self.scenes)


def classification_set(
    n: int, size: int, seed: int, target: Target = "category", cfg: WorldConfig | None = None
) -> ClassificationSet:
    """`n` images of one object each, labelled by category, colour, or both (joint "colour category" classes).

    Classes are balanced (counts differ by at most one) and shuffled; what is not the target is drawn at random,
    as are size, position and rotation. `cfg` picks sizes, rotation, background and the category/colour subsets
    (default: `CLASSIFICATION_DEFAULTS`); its object counts are ignored.
    """
    check_render_args(n, size, seed)
    cfg = cfg or CLASSIFICATION_DEFAULTS
    categories, colours = cfg.category_list(), cfg.colour_list()
    if target == "category":
        class_names = [c.name for c in categories]
    elif target == "colour":
        class_names = [c.name for c in colours]
    elif target == "both":
        class_names = [f"{colour.name} {category.name}" for category in categories for colour in colours]
    else:
        raise ConfigError(f"unknown classification target {target!r}; choose from: category, colour, both")

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(class_names)).astype(np.int64)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    category_index = np.empty(n, dtype=np.int64)
    colour_index = np.empty(n, dtype=np.int64)
    captions = []
    for i, label in enumerate(labels.tolist()):
        category = colour = None
        if target == "category":
            category = categories[label]
        elif target == "colour":
            colour = colours[label]
        else:
            category, colour = categories[label // len(colours)], colours[label % len(colours)]
        obj = sample_object(rng, cfg, category=category, colour=colour)
        scene = Scene(objects=(obj,), background_seed=int(rng.integers(2**31)))
        images[i], _ = paint(scene, size, cfg.background)
        category_index[i] = obj.category.id - 1
        colour_index[i] = ONTOLOGY.colour_index(obj.colour.name)
        captions.append(caption(scene))
    return ClassificationSet(images, labels, class_names, category_index, colour_index, captions)


def segmentation_set(
    n: int, size: int, seed: int, max_objects: int = 4, cfg: WorldConfig | None = None
) -> SegmentationSet:
    """`n` scenes of 1..`max_objects` objects (overriding `cfg.max_objects`) with semantic maps."""
    check_render_args(n, size, seed)
    base = (cfg or WorldConfig()).model_dump()
    base.update(max_objects=max_objects, min_objects=min(base["min_objects"], max_objects))
    cfg = validate_config(WorldConfig, base, source="segmentation_set")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.int64)
    captions, scenes = [], []
    for i in track(range(n), "rendering segmentation set"):
        rendered = render_scene(sample_scene(rng, cfg), size, cfg)
        images[i] = np.asarray(rendered.image)
        masks[i] = rendered.semantic
        scenes.append(rendered.scene)
        captions.append(caption(rendered.scene))
    class_names = ["background"] + [c.name for c in ONTOLOGY.categories]
    return SegmentationSet(images, masks, captions, scenes, class_names)
