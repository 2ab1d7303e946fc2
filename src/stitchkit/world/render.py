"""Pixels from scenes: shape outlines, backgrounds, and masks that are exact for what was drawn.

Every object is rasterised once, as a boolean mask (PIL ImageDraw polygon fill, no anti-aliasing), and the image
is painted from those same masks in paint order. So an instance mask (the pixels of an object still visible after
later objects are painted over it), the semantic map and the image agree pixel for pixel by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from stitchkit.errors import ConfigError
from stitchkit.world.scene import Scene, SceneObject, WorldConfig

MIN_IMAGE_SIZE = 16  # below this the shapes are a few pixels wide and lose their identity
MAX_IMAGE_SIZE = 4096

# Backgrounds are grey (equal channels) and at most this bright, so they never look like a named colour.
_PLAIN_GREY = 24
_NOISE_MAX = 100


def check_render_args(n_images: int, size: int, seed: int) -> None:
    """User-facing limits on image count, pixels a side and seed (ConfigError: exit code 2)."""
    if seed < 0:
        raise ConfigError(f"the seed must be a non-negative integer (got {seed})")
    if n_images < 1:
        raise ConfigError(f"the number of images must be at least 1 (got {n_images})")
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"the image size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} px (got {size})")


def _normalise(outer: np.ndarray, holes: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Centre an outline on its bounding-box centre and scale it into the unit circle."""
    holes = holes or []
    centre = (outer.min(0) + outer.max(0)) / 2
    radius = np.linalg.norm(outer - centre, axis=1).max()
    return (outer - centre) / radius, [(h - centre) / radius for h in holes]


def regular_outline(n: int, start_deg: float = -90.0, radius: float = 1.0) -> np.ndarray:
    t = np.deg2rad(start_deg) + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], 1)


def _arc(t0: float, t1: float, n: int, rx: float = 1.0, ry: float = 1.0) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], 1)


def star_outline(points: int = 5, inner: float = 0.45, start_deg: float = -90.0) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    t = np.deg2rad(start_deg) + np.pi * np.arange(2 * points) / points
    return np.stack([radii * np.cos(t), radii * np.sin(t)], 1)


def _heart(n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y down: lobes on top
    return np.stack([x, y], 1)


_CIRCLE_VERTICES = 64
# Unit outlines in image orientation (x right, y down), each inside the unit circle: (outer, holes).
# The diamond and ellipse are elongated so that no rotation turns them into a square or a circle.
OUTLINES: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {
    "triangle": _normalise(regular_outline(3)),
    "square": _normalise(regular_outline(4, start_deg=45.0)),
    "pentagon": _normalise(regular_outline(5)),
    "hexagon": _normalise(regular_outline(6)),
    "diamond": _normalise(np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], dtype=float)),
    "circle": _normalise(regular_outline(_CIRCLE_VERTICES)),
    "ellipse": _normalise(_arc(0, 2 * np.pi, _CIRCLE_VERTICES, ry=0.55)[:-1]),
    "ring": _normalise(regular_outline(_CIRCLE_VERTICES), [regular_outline(_CIRCLE_VERTICES, radius=0.55)]),
    "semicircle": _normalise(_arc(np.pi, 2 * np.pi, _CIRCLE_VERTICES // 2 + 1)),
    "star": _normalise(star_outline()),
    "cross": _normalise(
        np.array(
            [[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
             [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]],
            dtype=float,
        )
    ),
    "heart": _normalise(_heart()),
    "arrow": _normalise(
        np.array(
            [[-1, -0.22], [0.2, -0.22], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.22], [-1, 0.22]], dtype=float
        )
    ),
}


def _to_pixels(points: np.ndarray, obj: SceneObject, size: int) -> list[float]:
    """Rotate (counter-clockwise on screen), scale and place a unit outline; flat [x0, y0, x1, y1, ...]."""
    theta = np.deg2rad(obj.rotation)
    c, s = np.cos(theta), np.sin(theta)
    # With y pointing down, a counter-clockwise turn on screen is x' = x cos + y sin, y' = -x sin + y cos.
    rotation = np.array([[c, -s], [s, c]])
    radius = obj.scale * size / 2
    # PIL puts pixel centres on integer coordinates, so the image spans [-0.5, size - 0.5].
    offset = np.array(obj.centre) * size - 0.5
    return (points @ rotation * radius + offset).ravel().tolist()


def object_mask(obj: SceneObject, size: int) -> np.ndarray:
    """(size, size) bool: the pixels the object covers when drawn alone."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    outer, holes = OUTLINES[obj.category.name]
    draw.polygon(_to_pixels(outer, obj, size), fill=255)
    for hole in holes:
        draw.polygon(_to_pixels(hole, obj, size), fill=0)
    return np.asarray(canvas) > 0


def background(kind: str, size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 grey background: flat, per-pixel noise, or two crossed sinusoidal gratings."""
    if kind == "plain":
        return np.full((size, size, 3), _PLAIN_GREY, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    if kind == "noise":
        grey = rng.integers(0, _NOISE_MAX, size=(size, size), dtype=np.uint8)
    elif kind == "texture":
        # Frequencies in cycles per image side, so a texture looks the same at every resolution.
        coords = (np.arange(size) + 0.5) / size
        y, x = np.meshgrid(coords, coords, indexing="ij")
        grey = np.full((size, size), 56.0)
        for _ in range(2):
            angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 8), rng.uniform(0, 2 * np.pi)
            grey += 20 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        grey = grey.astype(np.uint8)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.repeat(grey[:, :, None], 3, axis=2)


def paint(scene: Scene, size: int, background_kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The image (size, size, 3) uint8 and each object's full, unoccluded mask (K, size, size) bool."""
    pixels = background(background_kind, size, scene.background_seed)
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for k, obj in enumerate(scene.objects):
        masks[k] = object_mask(obj, size)
        pixels[masks[k]] = obj.colour.rgb
    return pixels, masks


def visible_masks(full_masks: np.ndarray) -> np.ndarray:
    """Occlusion in paint order: an object keeps the pixels that no later object covers."""
    visible = full_masks.copy()
    covered = np.zeros(full_masks.shape[1:], dtype=bool)
    for k in range(len(full_masks) - 1, -1, -1):
        visible[k] &= ~covered
        covered |= full_masks[k]
    return visible


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight COCO box [x, y, width, height] (integer pixels) of a non-empty mask."""
    cols = np.flatnonzero(mask.any(0))
    rows = np.flatnonzero(mask.any(1))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


@dataclass
class RenderedScene:
    image: Image.Image  # RGB
    boxes: np.ndarray  # (K, 4) int64 COCO [x, y, w, h], tight around each visible mask
    instance_masks: np.ndarray  # (K, H, W) bool, visible pixels only
    semantic: np.ndarray  # (H, W) int64: 0 = background, else the category id of the visible object
    scene: Scene  # the scene as drawn: objects hidden entirely by others are left out

    @property
    def objects(self) -> list[SceneObject]:
        """The visible objects in paint order, aligned with `boxes` and `instance_masks`."""
        return list(self.scene.objects)


def render_scene(scene: Scene, size: int, cfg: WorldConfig | None = None) -> RenderedScene:
    """Render `scene` at `size` x `size` px on `cfg.background`.

    An object that later objects hide completely has no pixels, so it is left out of the result (its mask,
    box and entry in `scene.objects`); caption `result.scene`, not the sampled scene, to describe what is seen.
    """
    cfg = cfg or WorldConfig()
    pixels, full = paint(scene, size, cfg.background)
    visible = visible_masks(full)
    keep = [k for k in range(len(scene.objects)) if visible[k].any()]
    visible = visible[keep]
    semantic = np.zeros((size, size), dtype=np.int64)
    for k, mask in zip(keep, visible):
        semantic[mask] = scene.objects[k].category.id
    boxes = np.array([mask_box(m) for m in visible], dtype=np.int64).reshape(-1, 4)
    return RenderedScene(
        image=Image.fromarray(pixels, "RGB"),
        boxes=boxes,
        instance_masks=visible,
        semantic=semantic,
        scene=Scene(objects=tuple(scene.objects[k] for k in keep), background_seed=scene.background_seed),
    )
