"""Scenes: which objects, where, how big, at what angle. Sampled from a seeded generator, no pixels yet.

Geometry is in fractions of the image side, so one scene renders at any resolution. An object's `scale` is the
diameter of the circle that circumscribes its outline; the object always lies fully inside the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import pydantic

from stitchkit.config import Config
from stitchkit.world.ontology import ONTOLOGY, Category, Colour, position_name

# Extra clearance (fraction of the image side) around each object's box when measuring overlap, so that two
# objects whose boxes merely touch cannot share a boundary pixel after rasterisation, even at 32 px.
_OVERLAP_MARGIN = 0.02
_PLACEMENT_TRIES = 100


class WorldConfig(Config):
    """How scenes are sampled and rendered."""

    min_objects: int = pydantic.Field(1, ge=1, le=32)
    max_objects: int = pydantic.Field(4, ge=1, le=32)
    min_size: float = pydantic.Field(0.15, gt=0.0, le=1.0, description="smallest object diameter / image side")
    max_size: float = pydantic.Field(0.4, gt=0.0, le=1.0, description="largest object diameter / image side")
    max_rotation: float = pydantic.Field(180.0, ge=0.0, le=180.0, description="degrees; 0 keeps shapes upright")
    background: Literal["plain", "noise", "texture"] = "plain"
    max_overlap: float = pydantic.Field(
        0.2, ge=0.0, le=0.9, description="largest fraction of an object's box that other boxes may cover; 0 = none"
    )
    colours: Optional[list[str]] = pydantic.Field(None, description="subset of colour names (default: all)")
    categories: Optional[list[str]] = pydantic.Field(None, description="subset of category names (default: all)")

    @pydantic.model_validator(mode="after")
    def _check(self) -> "WorldConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) exceeds max_objects ({self.max_objects})")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) exceeds max_size ({self.max_size})")
        for field, names, known in (
            ("colours", self.colours, [c.name for c in ONTOLOGY.colours]),
            ("categories", self.categories, [c.name for c in ONTOLOGY.categories]),
        ):
            if names is None:
                continue
            if not names:
                raise ValueError(f"{field} must not be empty (leave it out to use all)")
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"unknown {field} {unknown}; choose from: {', '.join(known)}")
            if len(set(names)) != len(names):
                raise ValueError(f"{field} lists a name twice: {names}")
        return self

    def category_list(self) -> list[Category]:
        return [ONTOLOGY.category(n) for n in self.categories] if self.categories else list(ONTOLOGY.categories)

    def colour_list(self) -> list[Colour]:
        return [ONTOLOGY.colour(n) for n in self.colours] if self.colours else list(ONTOLOGY.colours)


@dataclass(frozen=True)
class SceneObject:
    category: Category
    colour: Colour
    size: str  # "small" | "medium" | "large": the third of [min_size, max_size] that `scale` falls in
    scale: float  # diameter of the circumscribing circle, as a fraction of the image side
    centre: tuple[float, float]  # (x, y) fractions of the image side, y pointing down
    rotation: float  # degrees, counter-clockwise as seen on screen

    @property
    def position(self) -> str:
        return position_name(*self.centre)

    def box(self, margin: float = 0.0) -> tuple[float, float, float, float]:
        """Circumscribing box (x0, y0, x1, y1) in fractions of the image side."""
        r = self.scale / 2 + margin
        return (self.centre[0] - r, self.centre[1] - r, self.centre[0] + r, self.centre[1] + r)

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category.name,
            "colour": self.colour.name,
            "size": self.size,
            "scale": self.scale,
            "centre": list(self.centre),
            "rotation": self.rotation,
            "position": self.position,
        }


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in paint order: later objects occlude earlier ones
    background_seed: int  # drives the noise/texture background, so a scene alone fixes its pixels

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "background_seed": self.background_seed}


def sample_object(
    rng: np.random.Generator,
    cfg: WorldConfig,
    category: Category | None = None,
    colour: Colour | None = None,
) -> SceneObject:
    """One object with a random size band, scale, rotation and position; category/colour random unless given."""
    categories, colours = cfg.category_list(), cfg.colour_list()
    if category is None:
        category = categories[int(rng.integers(len(categories)))]
    if colour is None:
        colour = colours[int(rng.integers(len(colours)))]
    size_index = int(rng.integers(len(ONTOLOGY.sizes)))
    band = (cfg.max_size - cfg.min_size) / len(ONTOLOGY.sizes)
    scale = cfg.min_size + band * (size_index + float(rng.random()))
    rotation = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    r = scale / 2
    centre = (float(rng.uniform(r, 1 - r)), float(rng.uniform(r, 1 - r)))
    return SceneObject(category, colour, ONTOLOGY.sizes[size_index], scale, centre, rotation)


def _box_intersection(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig, n_objects: int | None = None) -> Scene:
    """A scene of `n_objects` (default: uniform in [min_objects, max_objects]) placed by rejection sampling.

    Occlusion control: for every object, the summed area of its box covered by other objects' boxes stays at or
    below `cfg.max_overlap` of its own box area (boxes padded by a small margin). An object that finds no such
    place in 100 tries is left out, so a crowded configuration can yield fewer objects than asked for.
    """
    if n_objects is None:
        n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    placed: list[SceneObject] = []
    boxes: list[tuple[float, ...]] = []
    covered: list[float] = []  # summed intersection area of each placed box with the others
    for _ in range(n_objects):
        for _ in range(_PLACEMENT_TRIES):
            obj = sample_object(rng, cfg)
            box = obj.box(_OVERLAP_MARGIN)
            inter = [_box_intersection(box, b) for b in boxes]
            if _fits(box, sum(inter), cfg.max_overlap) and all(
                _fits(b, c + i, cfg.max_overlap) for b, c, i in zip(boxes, covered, inter)
            ):
                covered = [c + i for c, i in zip(covered, inter)] + [sum(inter)]
                placed.append(obj)
                boxes.append(box)
                break
    return Scene(objects=tuple(placed), background_seed=int(rng.integers(2**31)))


def _fits(box: tuple[float, ...], covered_area: float, max_overlap: float) -> bool:
    area = (box[2] - box[0]) * (box[3] - box[1])
    return covered_area <= max_overlap * area + 1e-12
