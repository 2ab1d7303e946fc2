"""COCO export of the shapes world and the `stitchkit world render` command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stitchkit.errors import InputError
from stitchkit.world import ONTOLOGY, WorldConfig, render_coco, rle_to_mask
from stitchkit.world.coco import mask_to_rle

STITCHKIT = Path(sys.executable).parent / "stitchkit"
NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def test_rle_matches_hand_computed_runs_and_round_trips():
    mask = np.array([[0, 1, 1], [1, 1, 0]], dtype=bool)  # column-major: 0 1 | 1 1 | 1 0
    assert mask_to_rle(mask) == {"size": [2, 3], "counts": [1, 4, 1]}
    starts_on = np.array([[1, 0], [1, 0]], dtype=bool)
    assert mask_to_rle(starts_on)["counts"] == [0, 2, 2]
    rng = np.random.default_rng(0)
    for m in [np.zeros((3, 4), bool), np.ones((3, 4), bool), rng.random((17, 9)) > 0.5]:
        np.testing.assert_array_equal(rle_to_mask(mask_to_rle(m)), m)
    with pytest.raises(InputError, match="expected 2 x 3"):
        rle_to_mask({"size": [2, 3], "counts": [1, 4]})


def test_coco_file_is_valid_and_masks_match_the_pngs(tmp_path):
    cfg = WorldConfig(max_objects=6, max_overlap=0.5, background="noise")
    path = render_coco(tmp_path, n_images=8, size=48, seed=11, cfg=cfg)
    coco = json.loads(path.read_text())
    categories = {c["id"]: c for c in coco["categories"]}
    assert len(categories) == len(ONTOLOGY.categories)
    assert all(c["supercategory"] in ONTOLOGY.supercategories and c["name"] for c in categories.values())
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 8 and len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert min(a["id"] for a in coco["annotations"]) >= 1
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        pixels = np.asarray(Image.open(tmp_path / image["file_name"]).convert("RGB"))
        assert pixels.shape == (image["height"], image["width"], 3)
        mask = rle_to_mask(ann["segmentation"])
        assert mask.shape == pixels.shape[:2] and ann["area"] == mask.sum() > 0
        x, y, w, h = ann["bbox"]
        assert mask[y : y + h, x : x + w].sum() == mask.sum()  # the box contains the mask
        assert ann["category_id"] in categories and ann["iscrowd"] == 0
        assert (pixels[mask] == ONTOLOGY.colour(ann["colour"]).rgb).all()
    for image in coco["images"]:  # masks of one image never claim the same pixel
        masks = [rle_to_mask(a["segmentation"]) for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(masks) >= 1 and np.sum(masks, axis=0).max() == 1
        number_words = [phrase.split(" ")[0] for phrase in re.split(r", | and ", image["caption"])]
        assert len(masks) == sum(NUMBERS[w] for w in number_words)  # the caption counts the visible objects


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    a = files(render_coco(tmp_path / "a", 4, 40, seed=5).parent)
    b = files(render_coco(tmp_path / "b", 4, 40, seed=5).parent)
    c = files(render_coco(tmp_path / "c", 4, 40, seed=6).parent)
    assert a == b and len(a) == 5
    assert a["annotations.json"] != c["annotations.json"] and a["images/000000.png"] != c["images/000000.png"]
    # image i depends only on (seed, i): a shorter render is a prefix of a longer one
    d = files(render_coco(tmp_path / "d", 2, 40, seed=5).parent)
    assert d["images/000001.png"] == a["images/000001.png"]
    # A smaller render into the folder of a larger one leaves exactly its own images (and the user's other files).
    (tmp_path / "a" / "images" / "notes.png").write_bytes(b"mine")
    smaller = files(render_coco(tmp_path / "a", 2, 40, seed=5).parent)
    assert smaller == {**d, "images/notes.png": b"mine"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(STITCHKIT), "world", "render", *args], capture_output=True, text=True, timeout=60)


def test_cli_render_writes_a_dataset(tmp_path):
    out = tmp_path / "world"
    result = run_cli("--out", str(out), "--images", "3", "--size", "32", "--seed", "2", "--max-objects", "2",
                     "--background", "texture")  # fmt: skip
    assert result.returncode == 0, result.stderr
    coco = json.loads((out / "annotations.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == [f"images/00000{i}.png" for i in range(3)]
    assert coco["info"]["world_config"]["background"] == "texture"
    assert all(1 <= sum(a["image_id"] == i for a in coco["annotations"]) <= 2 for i in range(3))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "0"], "number of images must be at least 1"),
        (["--size", "4"], "image size must be between 16"),
        (["--background", "stripes"], "background"),
        (["--max-objects", "0"], "max_objects"),
    ],
)
def test_cli_bad_input_exits_2_with_one_clear_message(tmp_path, args, message):
    result = run_cli("--out", str(tmp_path / "w"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()
