"""The shapes world in memory: ontology, sampler, renderer, captions, classification and segmentation sets."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from stitchkit.config import validate_config
from stitchkit.errors import ConfigError
from stitchkit.world import (
    ONTOLOGY,
    Scene,
    SceneObject,
    WorldConfig,
    caption,
    classification_set,
    render_scene,
    sample_scene,
    segmentation_set,
)
from stitchkit.world.render import background, paint

GREY = 24  # the plain background


def obj(category: str, colour: str, scale=0.5, centre=(0.5, 0.5), rotation=0.0) -> SceneObject:
    return SceneObject(ONTOLOGY.category(category), ONTOLOGY.colour(colour), "medium", scale, centre, rotation)


def random_scenes(n: int, cfg: WorldConfig, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, cfg) for _ in range(n)]


# --- ontology and config ---------------------------------------------------------------------------------------


def test_ontology_has_enough_categories_colours_and_unique_names():
    cats, colours = ONTOLOGY.categories, ONTOLOGY.colours
    assert len(cats) >= 12 and len(ONTOLOGY.supercategories) >= 3 and len(colours) >= 8
    assert len({c.name for c in cats}) == len(cats) and len({c.name for c in colours}) == len(colours)
    assert [c.id for c in cats] == list(range(1, len(cats) + 1))  # semantic value = id, 0 = background
    assert ONTOLOGY.category("cross").plural == "crosses" and ONTOLOGY.category("star").plural == "stars"
    assert len({c.rgb for c in colours}) == len(colours)
    assert all(len(set(c.rgb)) > 1 or c.name == "white" for c in colours)  # only white is grey-like


@pytest.mark.parametrize(
    "data, field",
    [
        ({"colours": ["red", "mauve"]}, "colours"),
        ({"categories": []}, "categories"),
        ({"min_size": 0.5, "max_size": 0.2}, "min_size"),
        ({"background": "stripes"}, "background"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_overlap": 1.5}, "max_overlap"),
        ({"max_object": 3}, "max_object"),
    ],
)
def test_world_config_rejects_bad_values_with_a_clear_message(data, field):
    with pytest.raises(ConfigError, match=field):
        validate_config(WorldConfig, data)


def test_subsets_restrict_what_is_sampled():
    cfg = WorldConfig(colours=["red", "blue"], categories=["star", "ring"], max_objects=6)
    seen = {(o.colour.name, o.category.name) for s in random_scenes(50, cfg) for o in s.objects}
    assert seen == {(c, k) for c in ("red", "blue") for k in ("star", "ring")}


# --- sampler ---------------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_in_the_seed_and_inside_the_image():
    cfg = WorldConfig(max_objects=6, min_objects=2)
    a, b, c = random_scenes(30, cfg, 1), random_scenes(30, cfg, 1), random_scenes(30, cfg, 2)
    assert a == b and a != c
    for scene in a:
        assert 1 <= len(scene.objects) <= 6
        for o in scene.objects:
            x0, y0, x1, y1 = o.box()
            assert 0 <= x0 and 0 <= y0 and x1 <= 1 and y1 <= 1
            assert cfg.min_size <= o.scale <= cfg.max_size


def test_box_overlap_stays_within_max_overlap():
    cfg = WorldConfig(max_objects=8, max_overlap=0.3, max_size=0.5)
    for scene in random_scenes(40, cfg):
        boxes = [o.box() for o in scene.objects]
        for i, a in enumerate(boxes):
            covered = 0.0
            for j, b in enumerate(boxes):
                if i != j:
                    covered += max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            assert covered <= 0.3 * (a[2] - a[0]) ** 2 + 1e-9


@pytest.mark.parametrize("size", [24, 32, 64, 224])  # from 24 px up, as docs/world.md says
def test_max_overlap_zero_means_no_shared_pixel(size):
    cfg = WorldConfig(max_objects=6, min_objects=6, max_overlap=0.0, max_size=0.35)
    for scene in random_scenes(400, cfg):  # enough that 16 px fails (3 scenes share a pixel there)
        _, full = paint(scene, size, "plain")
        assert full.sum(0).max() <= 1


# --- renderer --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bg", ["plain", "noise", "texture"])
def test_image_masks_and_semantic_map_agree(bg):
    cfg = WorldConfig(max_objects=6, max_overlap=0.6, background=bg)
    for scene in random_scenes(12, cfg, seed=5):
        r = render_scene(scene, 64, cfg)
        pixels = np.asarray(r.image)
        masks = r.instance_masks
        assert masks.shape == (len(r.objects), 64, 64) and masks.dtype == bool
        assert masks.sum(0).max() <= 1  # visible masks are disjoint
        assert all(m.any() for m in masks)
        expected = np.zeros((64, 64), dtype=np.int64)
        for o, m, (x, y, w, h) in zip(r.objects, masks, r.boxes):
            expected[m] = o.category.id
            assert (pixels[m] == o.colour.rgb).all()
            rows, cols = np.nonzero(m)  # the box is tight around the mask
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
        np.testing.assert_array_equal(r.semantic, expected)
        background_pixels = pixels[r.semantic == 0]
        assert (background_pixels[:, 0] == background_pixels[:, 1]).all()  # grey
        if bg == "plain":
            assert (background_pixels == GREY).all()


def test_later_objects_occlude_earlier_ones_and_hidden_objects_are_dropped():
    big, small = obj("square", "red", scale=0.8), obj("circle", "blue", scale=0.3)
    r = render_scene(Scene((big, small), 0), 64)
    _, full = paint(Scene((big, small), 0), 64, "plain")
    np.testing.assert_array_equal(r.instance_masks[0], full[0] & ~full[1])
    np.testing.assert_array_equal(r.instance_masks[1], full[1])
    hidden = render_scene(Scene((small, big), 0), 64)  # the circle lies wholly under the square
    assert [o.category.name for o in hidden.objects] == ["square"] and caption(hidden.scene) == "a red square"


def test_ring_has_a_hole_and_upright_shapes_fill_their_boxes_as_geometry_says():
    def fill(category: str) -> tuple[float, float]:  # (mask area / box area, box width / height)
        r = render_scene(Scene((obj(category, "white", scale=0.9),), 0), 128)
        x, y, w, h = r.boxes[0]
        return r.instance_masks[0].sum() / (w * h), w / h

    assert fill("square")[0] == pytest.approx(1.0, abs=0.03)
    assert fill("circle") == pytest.approx((np.pi / 4, 1.0), abs=0.03)
    assert fill("triangle") == pytest.approx((0.5, 2 / np.sqrt(3)), abs=0.04)  # base / height = 2 / sqrt(3)
    assert fill("diamond") == pytest.approx((0.5, 0.6), abs=0.04)
    assert fill("ring")[0] == pytest.approx(np.pi / 4 * (1 - 0.55**2), abs=0.03)
    ring = render_scene(Scene((obj("ring", "white", scale=0.9),), 0), 128)
    assert not ring.instance_masks[0][64, 64] and ring.semantic[64, 64] == 0


def test_backgrounds_are_grey_dark_and_deterministic():
    for kind in ("plain", "noise", "texture"):
        a, b = background(kind, 48, 7), background(kind, 48, 7)
        np.testing.assert_array_equal(a, b)
        assert (a[..., 0] == a[..., 2]).all() and a.max() <= 100
    assert not np.array_equal(background("noise", 48, 7), background("noise", 48, 8))
    assert background("texture", 48, 7).std() > 5


# --- captions --------------------------------------------------------------------------------------------------


def test_caption_examples():
    scene = Scene((obj("star", "red"), obj("circle", "blue"), obj("star", "red")), 0)
    assert caption(scene) == "two red stars and a blue circle"
    assert caption(Scene((obj("ellipse", "orange"),), 0)) == "an orange ellipse"
    three = Scene((obj("cross", "green"),) * 3 + (obj("heart", "pink"), obj("ring", "white")), 0)
    assert caption(three) == "three green crosses, a pink heart and a white ring"


NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}


def parse_caption(text: str) -> Counter:
    counts = Counter()
    plurals = {c.plural: c.name for c in ONTOLOGY.categories}
    for phrase in re.split(r", | and ", text):
        number, colour, noun = phrase.split(" ")
        counts[(colour, plurals.get(noun, noun))] += NUMBERS[number]
    return counts


def test_caption_counts_match_the_objects():
    cfg = WorldConfig(max_objects=8, min_objects=3, colours=["red", "blue"], categories=["star", "cross"])
    for scene in random_scenes(40, cfg):
        drawn = Counter((o.colour.name, o.category.name) for o in scene.objects)
        assert parse_caption(caption(scene)) == drawn


# --- classification and segmentation sets ----------------------------------------------------------------------


def nearest_colour(rgb: np.ndarray) -> int:
    return int(np.argmin([np.abs(np.array(c.rgb) - rgb).sum() for c in ONTOLOGY.colours]))


@pytest.mark.parametrize("target", ["category", "colour", "both"])
def test_classification_set_is_balanced_and_labels_match_what_was_drawn(target):
    ds = classification_set(300, 32, seed=3, target=target)
    n_classes = {"category": len(ONTOLOGY.categories), "colour": len(ONTOLOGY.colours)}.get(
        target, len(ONTOLOGY.categories) * len(ONTOLOGY.colours)
    )
    assert ds.images.shape == (300, 32, 32, 3) and ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    assert len(ds.class_names) == n_classes and len(ds.captions) == 300
    counts = np.bincount(ds.labels, minlength=n_classes)
    assert counts.max() - counts.min() <= 1
    for image, label, category, colour, text in zip(ds.images, ds.labels, ds.category, ds.colour, ds.captions):
        name = ds.class_names[label]
        if target == "category":
            assert name == ONTOLOGY.categories[category].name
        elif target == "colour":
            assert name == ONTOLOGY.colours[colour].name
        else:
            assert name == f"{ONTOLOGY.colours[colour].name} {ONTOLOGY.categories[category].name}"
        # Oracle for the colour: the most frequent non-background pixel value names it.
        foreground = image.reshape(-1, 3)[(image.reshape(-1, 3) != GREY).any(1)]
        values, freq = np.unique(foreground, axis=0, return_counts=True)
        assert nearest_colour(values[freq.argmax()]) == colour
        assert text.split(" ")[1:] == [ONTOLOGY.colours[colour].name, ONTOLOGY.categories[category].name]


def test_classification_set_is_deterministic_and_respects_the_config():
    a = classification_set(64, 32, seed=1, target="both")
    b = classification_set(64, 32, seed=1, target="both")
    c = classification_set(64, 32, seed=2, target="both")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and not np.array_equal(a.images, c.images)
    cfg = WorldConfig(colours=["red", "green"], categories=["square", "star", "ring"], background="noise")
    ds = classification_set(60, 32, seed=0, target="both", cfg=cfg)
    assert ds.class_names == [f"{c} {k}" for k in ("square", "star", "ring") for c in ("red", "green")]
    assert np.bincount(ds.labels).tolist() == [10] * 6


def test_bad_classification_arguments_are_user_errors():
    with pytest.raises(ConfigError, match="target"):
        classification_set(10, 32, 0, target="shape")
    with pytest.raises(ConfigError, match="image size"):
        classification_set(10, 4, 0)
    with pytest.raises(ConfigError, match="at least 1"):
        classification_set(0, 32, 0)


def test_segmentation_set_matches_its_scenes():
    ds = segmentation_set(20, 48, seed=4, max_objects=5, cfg=WorldConfig(background="texture"))
    assert ds.images.shape == (20, 48, 48, 3) and ds.masks.shape == (20, 48, 48) and ds.masks.dtype == np.int64
    assert ds.class_names[0] == "background" and len(ds.class_names) == len(ONTOLOGY.categories) + 1
    assert max(len(s.objects) for s in ds.scenes) <= 5
    for image, mask, scene, text in zip(ds.images, ds.masks, ds.scenes, ds.captions):
        assert set(np.unique(mask)) - {0} == {o.category.id for o in scene.objects}
        assert text == caption(scene)
        for o in scene.objects:  # every visible object shows its colour somewhere in its class region
            assert (image[mask == o.category.id] == o.colour.rgb).all(-1).any()
    again = segmentation_set(20, 48, seed=4, max_objects=5, cfg=WorldConfig(background="texture"))
    np.testing.assert_array_equal(ds.images, again.images)
