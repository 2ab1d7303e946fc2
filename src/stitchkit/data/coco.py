"""COCO-format annotation files (real COCO, OpenImages converted to COCO, the shapes world), validated.

Only the fields stitchkit uses are required: images (id, file_name, width, height), annotations (id, image_id,
category_id, bbox, and area or a bbox to derive it from), categories (id, name; supercategory defaults to the
name). Extra fields are kept in `extra` (the shapes world adds each object's "colour").
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stitchkit.errors import InputError


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoCategory:
    id: int
    name: str
    supercategory: str


@dataclass(frozen=True)
class CocoAnnotation:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels
    area: float
    iscrowd: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CocoIndex:
    """The parsed file plus the lookups every consumer needs, built once."""

    path: Path
    images: dict[int, CocoImage]
    categories: dict[int, CocoCategory]
    annotations: list[CocoAnnotation]
    by_image: dict[int, list[CocoAnnotation]]

    @property
    def supercategories(self) -> dict[str, list[CocoCategory]]:
        groups: dict[str, list[CocoCategory]] = defaultdict(list)
        for cat in self.categories.values():
            groups[cat.supercategory].append(cat)
        return dict(groups)


def _require(record: dict, keys: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(record, dict):
        raise InputError(f"{path}: {where} is not an object")
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{path}: {where} is missing field(s) {', '.join(missing)}")


@contextmanager
def _values_of(where: str, path: Path):
    """A field of the wrong type or value (a string bbox, a null id) becomes a message naming its record."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: {where} has a field of the wrong type or value ({err})") from None


def _records(data: dict, key: str, path: Path) -> list:
    if not isinstance(data[key], list):
        raise InputError(f"{path}: {key} must be a list, got {type(data[key]).__name__}")
    return data[key]


def load_coco(path: str | os.PathLike) -> CocoIndex:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON: {err}") from None
    _require(data, ("images", "annotations", "categories"), "the top level", path)

    images: dict[int, CocoImage] = {}
    for i, rec in enumerate(_records(data, "images", path)):
        _require(rec, ("id", "file_name", "width", "height"), f"images[{i}]", path)
        with _values_of(f"images[{i}]", path):
            images[int(rec["id"])] = CocoImage(int(rec["id"]), str(rec["file_name"]), int(rec["width"]), int(rec["height"]))
    categories: dict[int, CocoCategory] = {}
    for i, rec in enumerate(_records(data, "categories", path)):
        _require(rec, ("id", "name"), f"categories[{i}]", path)
        name = str(rec["name"])
        with _values_of(f"categories[{i}]", path):
            categories[int(rec["id"])] = CocoCategory(int(rec["id"]), name, str(rec.get("supercategory") or name))

    known = {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
    annotations: list[CocoAnnotation] = []
    by_image: dict[int, list[CocoAnnotation]] = defaultdict(list)
    for i, rec in enumerate(_records(data, "annotations", path)):
        _require(rec, ("image_id", "category_id", "bbox"), f"annotations[{i}]", path)
        bbox = rec["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise InputError(f"{path}: annotations[{i}].bbox must be [x, y, w, h], got {bbox!r}")
        with _values_of(f"annotations[{i}]", path):
            image_id, category_id = int(rec["image_id"]), int(rec["category_id"])
            x, y, w, h = (float(v) for v in bbox)
            ann = CocoAnnotation(
                id=int(rec.get("id", i)),
                image_id=image_id,
                category_id=category_id,
                bbox=(x, y, w, h),
                area=float(rec.get("area", w * h)),
                iscrowd=int(rec.get("iscrowd", 0)),
                extra={k: v for k, v in rec.items() if k not in known},
            )
        if image_id not in images:
            raise InputError(f"{path}: annotations[{i}] refers to unknown image_id {rec['image_id']}")
        if category_id not in categories:
            raise InputError(f"{path}: annotations[{i}] refers to unknown category_id {rec['category_id']}")
        annotations.append(ann)
        by_image[ann.image_id].append(ann)
    return CocoIndex(path, images, categories, annotations, dict(by_image))
