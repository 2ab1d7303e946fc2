"""COCO and image-folder loading: valid input parses, bad input names the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stitchkit.data import check_images, load_coco, load_image, scan_image_folder
from stitchkit.errors import InputError

COCO = {
    "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 8}],
    "categories": [{"id": 3, "name": "star", "supercategory": "symbols"}, {"id": 4, "name": "circle"}],
    "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "colour": "red"}],
}


def test_load_coco_builds_lookups(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(COCO))
    index = load_coco(path)
    assert index.images[1].file_name == "a.png"
    assert index.categories[4].supercategory == "circle"  # defaults to the name
    (ann,) = index.by_image[1]
    assert ann.area == 12.0 and ann.extra == {"colour": "red"}
    assert set(index.supercategories) == {"symbols", "circle"}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("categories"), "missing field"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\] is missing field\(s\) file_name"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] is missing"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2]), "bbox must be"),
        (lambda d: d["annotations"][0].update(image_id=99), "unknown image_id 99"),
        (lambda d: d["annotations"][0].update(category_id=99), "unknown category_id 99"),
        (lambda d: d["annotations"][0].update(bbox=["a", 2, 3, 4]), r"annotations\[0\] has a field of the wrong type"),
        (lambda d: d["images"][0].update(width=None), r"images\[0\] has a field of the wrong type"),
        (lambda d: d.update(annotations={"0": {}}), "annotations must be a list"),
    ],
)
def test_bad_coco_names_the_field(tmp_path, mutate, message):
    data = json.loads(json.dumps(COCO))
    mutate(data)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        load_coco(path)


def test_coco_not_json(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_coco(path)


def test_corrupt_and_truncated_images_are_input_errors(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    assert load_image(good).size == (8, 8)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(tmp_path / "bad.png")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(InputError):
        load_image(truncated)
    check_images([good])
    with pytest.raises(InputError, match=r"2 image file\(s\) cannot be read, e.g. .*bad.png"):
        check_images([good, tmp_path / "bad.png", truncated])


def test_image_folder(tmp_path):
    for cls in ("b", "a"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / cls / "x.png")
    folder = scan_image_folder(tmp_path)
    assert folder.classes == ["a", "b"] and [label for _, label in folder.samples] == [0, 1]
    (tmp_path / "c").mkdir()
    with pytest.raises(InputError, match="without images: c"):
        scan_image_folder(tmp_path)


def transparent_images() -> dict[str, Image.Image]:
    """An opaque red square on a background that is transparent (and stores black or a palette colour)."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:12, 4:12] = [255, 0, 0, 255]
    rgba[0:4, :, 3] = 128  # a half-transparent band as well
    la = np.zeros((16, 16, 2), np.uint8)
    la[4:12, 4:12] = [200, 255]
    palette = Image.fromarray(np.where(rgba[..., 3:] == 255, 1, 0).astype(np.uint8)[..., 0], "P")
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0  # palette index 0 (black) is transparent
    return {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": Image.fromarray(la, "LA"), "P": palette}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white_like_hugging_face(tmp_path, mode):
    from transformers.image_transforms import convert_to_rgb

    image = transparent_images()[mode]
    path = tmp_path / "t.png"
    image.save(path)
    expected = convert_to_rgb(Image.open(path), return_numpy=True)
    loaded = np.asarray(load_image(path))
    assert loaded.dtype == np.uint8 and loaded.shape == (16, 16, 3)
    assert np.array_equal(loaded, expected)
    assert (loaded[12:, 0] == 255).all()  # the transparent corner is white, not the black it stores
