"""OpenImages box annotations as a COCO-format file, so the MIMIC generator (and anything else reading COCO) can
build from them: the paper's training data was composed from OpenImages (reference mimic.md §5).

Inputs are OpenImages' own files (V6/V7, https://storage.googleapis.com/openimages/web/download_v7.html):
    boxes        *-annotations-bbox.csv: ImageID, LabelName, XMin, XMax, YMin, YMax (fractions), IsGroupOf, ...
    classes      *class-descriptions-boxable.csv: MID, display name (no header row)
    hierarchy    bbox_labels_600_hierarchy.json (optional): a category's supercategory is its parent's name, so
                 Listing asks for hierarchy parents with their leaves (§5; `_supercategory`); without it every
                 class is a group of its own
    images       the folder of {ImageID}.jpg; box rows of images not there are skipped and counted, so a
                 downloaded subset converts as it is
Class names keep OpenImages' display names ("Bus"); MIMIC lowercases them in its questions and answers
(multiimage/index.py). A group box (IsGroupOf = 1: "a crowd of people", uncountable) becomes an iscrowd annotation:
the generator never uses an image for a class that has a crowd region in it, which is stricter than dropping the
box (§5), since a dropped group box would make the image's count of that class too low.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from stitchkit.errors import InputError
from stitchkit.progress import track
from stitchkit.runs import atomic_write_json

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
HIERARCHY_ROOT = "/m/0bl9f"  # "Entity", the root of bbox_labels_600_hierarchy.json; not a class
Box = tuple[int, float, float, float, float, int]  # category id, XMin, XMax, YMin, YMax (fractions), IsGroupOf


def convert_openimages(
    boxes: str | os.PathLike,
    classes: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    hierarchy: str | os.PathLike | None = None,
) -> dict[str, int]:
    """Write `out`, a COCO-format annotation file whose file_names are relative to `images`; returns counts of
    what was converted and skipped."""
    names = read_class_names(Path(classes))
    parents = read_parents(Path(hierarchy)) if hierarchy is not None else {}
    images = Path(images)
    if images.exists() and not images.is_dir():
        raise InputError(f"image folder {images} is not a folder: give the folder of the <ImageID>.jpg files")
    if not images.is_dir():
        raise InputError(f"image folder not found: {images}")
    by_image: dict[str, list[Box]] = {}
    for image_id, box in read_boxes(Path(boxes), names):
        by_image.setdefault(image_id, []).append(box)

    image_entries, annotations, skipped = [], [], Counter()
    image_ids: dict[str, int] = {}
    for oi_id in track(sorted(by_image), "reading image sizes"):
        path = images / f"{oi_id}.jpg"
        size = _image_size(path)
        if size is None:
            skipped["images not in the folder"] += 1
            skipped["boxes of those images"] += len(by_image[oi_id])
            continue
        width, height = size
        image_ids[oi_id] = len(image_entries) + 1
        image_entries.append({"id": image_ids[oi_id], "file_name": path.name, "width": width, "height": height})
        for category_id, x_min, x_max, y_min, y_max, group in by_image[oi_id]:
            x, y, w, h = x_min * width, y_min * height, (x_max - x_min) * width, (y_max - y_min) * height
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_ids[oi_id], "category_id": category_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": group,
            })  # fmt: skip
    if not image_entries:
        raise InputError(f"none of the {len(by_image)} images of {boxes} is in {images} (as <ImageID>.jpg)")
    categories = [
        {"id": cid, "name": name, "supercategory": _supercategory(mid, names, parents), "mid": mid}
        for mid, (cid, name) in names.items()
    ]
    atomic_write_json(out, {"images": image_entries, "annotations": annotations, "categories": categories})
    return {"images": len(image_entries), "annotations": len(annotations),
            "group_boxes": sum(a["iscrowd"] for a in annotations), **skipped}  # fmt: skip


def read_class_names(path: Path) -> dict[str, tuple[int, str]]:
    """MID -> (category id from 1, in file order; display name)."""
    names: dict[str, tuple[int, str]] = {}
    for number, row in enumerate(_csv_rows(path), start=1):
        if number == 1 and row[:1] == ["LabelName"]:
            continue  # some mirrors add a header row
        if len(row) < 2 or not row[0].startswith("/"):
            raise InputError(f"{path}, line {number}: expected 'MID,display name' (e.g. /m/011k07,Tortoise), got {row}")
        names.setdefault(row[0], (len(names) + 1, row[1]))
    if not names:
        raise InputError(f"{path}: no classes")
    return names


def _supercategory(mid: str, names: dict[str, tuple[int, str]], parents: dict[str, str]) -> str:
    """The name of the class's parent, so Listing groups a parent's leaves. A class that is a parent itself
    (Animal) joins its own parent's group (the root's children: "Entity"), never its children's: Listing asks
    for leaves (§5). Classes without a parent class are a group of their own."""
    parent = parents.get(mid)
    if parent in names:
        return names[parent][1]
    is_parent = mid in set(parents.values())
    return "Entity" if is_parent and parent == HIERARCHY_ROOT else names[mid][1]


def read_parents(path: Path) -> dict[str, str]:
    """MID -> the MID of its first parent in the hierarchy (HIERARCHY_ROOT for the root's children)."""
    try:
        tree = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read the class hierarchy {path}: {err}") from None
    parents: dict[str, str] = {}
    stack = [tree] if isinstance(tree, dict) else []
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or "LabelName" not in node:
            raise InputError(f"{path}: every node needs a LabelName (bbox_labels_600_hierarchy.json's format)")
        for child in node.get("Subcategory", []):
            if isinstance(child, dict):
                parents.setdefault(child.get("LabelName"), node["LabelName"])
            stack.append(child)
    return parents


def read_boxes(path: Path, names: dict[str, tuple[int, str]]) -> Iterator[tuple[str, Box]]:
    """(ImageID, (category id, XMin, XMax, YMin, YMax, IsGroupOf)) per row, streamed: the train file has 15M rows."""
    rows = _csv_rows(path)
    header = next(rows, None)
    missing = [c for c in BOX_COLUMNS if header is None or c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; is this an OpenImages *-annotations-bbox.csv?")
    at = [header.index(c) for c in BOX_COLUMNS]
    for line, row in enumerate(rows, start=2):
        try:
            image_id, label, x_min, x_max, y_min, y_max, group = (row[i] for i in at)
            box = (names[label][0], float(x_min), float(x_max), float(y_min), float(y_max), int(group == "1"))
        except KeyError:
            raise InputError(f"{path}, line {line}: class {label} is not in the class descriptions file") from None
        except (IndexError, ValueError) as err:
            raise InputError(f"{path}, line {line}: {err}") from None
        yield image_id, box


def _csv_rows(path: Path) -> Iterator[list[str]]:
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.reader(f)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image's header, or None if it is not there; a file that is not an image is an error."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read image {path}: {err}") from None
