"""Export rendered scenes as a COCO-format dataset: images/*.png plus annotations.json.

Segmentations are uncompressed COCO RLE (exact for pixel masks, unlike polygons), so `area` equals the mask's
pixel count. Each annotation also carries the object's "colour", "size" and "position" names; each image its
"caption". Image i is rendered from the generator seeded with (seed, i), so it does not depend on how many
images are asked for, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

import stitchkit
from stitchkit.errors import InputError
from stitchkit.progress import track
from stitchkit.runs import atomic_path, atomic_write_text, prepare_output
from stitchkit.world.captions import caption
from stitchkit.world.ontology import ONTOLOGY
from stitchkit.world.render import RenderedScene, check_render_args, render_scene
from stitchkit.world.scene import WorldConfig, sample_scene

def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    h, w = mask.shape
    flat = mask.ravel(order="F").astype(np.int8)
    starts = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(h), int(w)], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of `mask_to_rle`: (h, w) bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise InputError(f"RLE run lengths sum to {int(counts.sum())}, expected {h} x {w} = {h * w} pixels")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def coco_categories() -> list[dict[str, Any]]:
    return [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in ONTOLOGY.categories]


def coco_annotations(rendered: RenderedScene, image_id: int, first_id: int) -> list[dict[str, Any]]:
    return [
        {
            "id": first_id + k,
            "image_id": image_id,
            "category_id": obj.category.id,
            "bbox": [int(v) for v in box],
            "area": int(mask.sum()),
            "segmentation": mask_to_rle(mask),
            "iscrowd": 0,
            "colour": obj.colour.name,
            "size": obj.size,
            "position": obj.position,
        }
        for k, (obj, box, mask) in enumerate(zip(rendered.objects, rendered.boxes, rendered.instance_masks))
    ]


def write_png(image, path: str | os.PathLike) -> None:
    """Fixed encoder options and no metadata chunks, so equal pixels give equal bytes."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=6, optimize=False)


def render_coco(
    out_dir: str | os.PathLike, n_images: int, size: int, seed: int, cfg: WorldConfig | None = None
) -> Path:
    """Render `n_images` scenes to `out_dir`/images/NNNNNN.png and write `out_dir`/annotations.json (last).

    Image ids are the file indices (0, 1, ...); annotation ids start at 1 because COCOeval reads id 0 as
    "unmatched".
    """
    cfg = cfg or WorldConfig()
    check_render_args(n_images, size, seed)
    out_dir = prepare_output(out_dir)
    images, annotations = [], []
    for index in track(range(n_images), "rendering shapes world"):
        scene = sample_scene(np.random.default_rng([seed, index]), cfg)
        rendered = render_scene(scene, size, cfg)
        file_name = f"images/{index:06d}.png"
        write_png(rendered.image, out_dir / file_name)
        images.append(
            {"id": index, "file_name": file_name, "width": size, "height": size, "caption": caption(rendered.scene)}
        )
        annotations += coco_annotations(rendered, image_id=index, first_id=len(annotations) + 1)
    coco = {
        "info": {
            "description": "stitchkit shapes world",
            "version": stitchkit.__version__,
            "seed": seed,
            "image_size": size,
            "world_config": cfg.model_dump(mode="json"),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    path = out_dir / "annotations.json"
    atomic_write_text(path, json.dumps(coco))  # compact: RLE count lists one number per line would be huge
    # A larger render here before left images beyond this one's: remove them (only files named as ours), so the
    # folder holds exactly what annotations.json lists.
    for stale in (out_dir / "images").glob("*.png"):
        if re.fullmatch(r"\d{6}", stale.stem) and int(stale.stem) >= n_images:
            stale.unlink()
    return path
