"""OpenImages box annotations -> a COCO-format file (stitchkit.data.openimages), checked against hand-computed boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stitchkit.cli import main
from stitchkit.data import load_coco
from stitchkit.data.openimages import convert_openimages
from stitchkit.errors import InputError

HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
CLASSES = "/m/dog,Dog\n/m/cat,Cat\n/m/animal,Animal\n/m/car,Car\n"
HIERARCHY = {"LabelName": "/m/0bl9f", "Subcategory": [
    {"LabelName": "/m/animal", "Subcategory": [{"LabelName": "/m/dog"}, {"LabelName": "/m/cat"}]},
    {"LabelName": "/m/car"},
]}


def write_openimages(root, rows: list[str]) -> dict:
    (root / "images").mkdir(parents=True)
    for name, size in (("aaa", (40, 20)), ("bbb", (10, 30))):  # "ccc" is listed in the boxes but not downloaded
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
    (root / "boxes.csv").write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    (root / "classes.csv").write_text(CLASSES)
    (root / "hierarchy.json").write_text(json.dumps(HIERARCHY))
    return {"boxes": root / "boxes.csv", "classes": root / "classes.csv", "images": root / "images"}


ROWS = [
    "aaa,xclick,/m/dog,1,0.25,0.75,0.1,0.6,0,0,0,0,0",
    "aaa,xclick,/m/car,1,0.0,0.5,0.5,1.0,0,0,1,0,0",
    "bbb,xclick,/m/cat,1,0.1,0.3,0.2,0.8,0,0,0,0,0",
    "ccc,xclick,/m/dog,1,0.1,0.3,0.2,0.8,0,0,0,0,0",
]


def test_boxes_become_pixels_group_boxes_crowds_and_parents_supercategories(tmp_path):
    files = write_openimages(tmp_path, ROWS)
    counts = convert_openimages(**files, out=tmp_path / "coco.json", hierarchy=tmp_path / "hierarchy.json")
    assert counts == {"images": 2, "annotations": 3, "group_boxes": 1, "images not in the folder": 1, "boxes of those images": 1}
    coco = load_coco(tmp_path / "coco.json")
    by_name = {image.file_name: image for image in coco.images.values()}
    assert (by_name["aaa.jpg"].width, by_name["aaa.jpg"].height) == (40, 20)
    boxes = {(coco.images[a.image_id].file_name, coco.categories[a.category_id].name): a for a in coco.annotations}
    # By hand: aaa is 40 x 20; the dog spans x 0.25..0.75 -> 10..30, y 0.1..0.6 -> 2..12.
    assert boxes["aaa.jpg", "Dog"].bbox == pytest.approx((10, 2, 20, 10)) and boxes["aaa.jpg", "Dog"].area == pytest.approx(200)
    assert boxes["aaa.jpg", "Car"].iscrowd == 1 and boxes["aaa.jpg", "Dog"].iscrowd == 0
    assert boxes["bbb.jpg", "Cat"].bbox == pytest.approx((1, 6, 2, 18))
    supercategories = {c.name: c.supercategory for c in coco.categories.values()}
    # Leaves join their parent's group; Animal, a parent itself, is not one of its own leaves.
    assert supercategories == {"Dog": "Animal", "Cat": "Animal", "Animal": "Entity", "Car": "Car"}
    no_hierarchy = convert_openimages(**files, out=tmp_path / "flat.json")
    assert no_hierarchy["images"] == 2
    assert all(c.supercategory == c.name for c in load_coco(tmp_path / "flat.json").categories.values())


def test_bad_openimages_files_are_one_clear_error_and_write_nothing(tmp_path, capsys):
    files = write_openimages(tmp_path, ROWS)
    out = tmp_path / "coco.json"
    (tmp_path / "unknown.csv").write_text(HEADER + "\naaa,xclick,/m/owl,1,0,1,0,1,0,0,0,0,0\n")
    (tmp_path / "columns.csv").write_text("ImageID,LabelName\naaa,/m/dog\n")
    (tmp_path / "values.csv").write_text(HEADER + "\naaa,xclick,/m/dog,1,left,1,0,1,0,0,0,0,0\n")
    (tmp_path / "none.csv").write_text(HEADER + "\nccc,xclick,/m/dog,1,0,1,0,1,0,0,0,0,0\n")
    cases = {
        "unknown.csv": "line 2: class /m/owl is not in the class descriptions file",
        "columns.csv": "missing column(s) XMin, XMax, YMin, YMax, IsGroupOf",
        "values.csv": "line 2: could not convert string to float",
        "none.csv": "none of the 1 images",
    }
    for name, message in cases.items():
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            convert_openimages(**{**files, "boxes": tmp_path / name}, out=out)
    (tmp_path / "bad_classes.csv").write_text("Dog,/m/dog\n")
    with pytest.raises(InputError, match="expected 'MID,display name'"):
        convert_openimages(**{**files, "classes": tmp_path / "bad_classes.csv"}, out=out)
    assert not out.exists()

    args = ["mimic", "convert-openimages", "--boxes", str(tmp_path / "unknown.csv"), "--classes", str(files["classes"]),
            "--images", str(files["images"]), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "/m/owl" in error and "Traceback" not in error and not out.exists()
