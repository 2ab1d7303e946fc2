"""The image version of a context (binding.md §3): N coloured shapes at random, non-overlapping places.

Glyphs name what colour token C_i and shape token S_j look like:
    world       the shapes world's 10 colours and 13 category outlines (world/ontology.py, world/render.py),
                the micro default: the micro-zoo encoders were trained on exactly these.
    parametric  the paper-scale proposal: 216 colours {0, 51, ..., 255}^3 and 216 silhouettes = k in 3..8
                vertices x inner-radius ratio in {1, .8, .65, .5, .4, .3} (1 = regular polygon, else a star)
                x 6 rotations j * (360 / k) / 6; the two stars that would draw their regular polygon (k = 3 at
                .5, k = 5 at .8) take ratio .2 instead (`_star_inner`)
Only the first `renderable` colours and shapes of the vocabulary have glyphs; image examples draw from those,
text examples from the whole vocabulary.

Placement (`Placement`), objects never overlapping and an object's token index following its random location:
    grid     the canvas is cut into cells x cells cells; the N objects take N distinct random cells, each drawn
             inside its cell with a random size (`fill` of the cell side, +-10%: `SIZE_JITTER`, so `fill` may be at
             most `MAX_FILL`) and offset (the micro default: objects as large as the small canvases allow)
    uniform  the spec's (§3): box side ~ U[box] of the canvas side (28-40 px at 224), centres uniform over the
             canvas, redrawn until the boxes keep `gap` apart and stay inside
Backgrounds are (128, 128, 128), outside both palettes. Drawn at 4x and downsampled (antialiasing).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from stitchkit.world.ontology import ONTOLOGY
from stitchkit.world.render import OUTLINES, regular_outline, star_outline

BACKGROUND = (128, 128, 128)
SUPERSAMPLE = 4
_LEVELS = (0, 51, 102, 153, 204, 255)
_VERTICES = (3, 4, 5, 6, 7, 8)
_INNER_RATIOS = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3)
_POLYGON_MARGIN = 0.03  # of the radius: a dent this shallow is at most 0.6 px at the spec's 28-40 px boxes
_SUBSTITUTE_INNER = 0.2  # the list's spacing continued below its smallest ratio
SIZE_JITTER = 0.1  # grid: an object's diameter is fill x U(1 - jitter, 1 + jitter) of its cell side
MAX_FILL = 1 / (1 + SIZE_JITTER)  # grid: the largest fill whose largest objects still stay inside their cells


@dataclass(frozen=True)
class Glyphs:
    colours: tuple[tuple[int, int, int], ...]
    outlines: tuple[tuple[np.ndarray, tuple[np.ndarray, ...]], ...]  # (outer, holes) inside the unit circle
    colour_names: tuple[str, ...] | None = None  # words for the colours and shapes, where the set has them
    shape_names: tuple[str, ...] | None = None

    @property
    def renderable(self) -> tuple[int, int]:
        return len(self.colours), len(self.outlines)

    def name(self, colour: int, shape: int) -> str:
        """What an object looks like, for people: "red circle" where the set has words, else its tokens "C0 S5"."""
        if self.colour_names and self.shape_names:
            return f"{self.colour_names[colour]} {self.shape_names[shape]}"
        return f"C{colour} S{shape}"


def _star_inner(vertices: int, inner: float) -> float:
    """The inner ratio a star is drawn with. At inner = cos(pi / k) a star's inner vertices lie on the edges of
    its regular k-gon, so it draws that polygon: the spec's k = 3 at .5 exactly, k = 5 at .8 within .009 of the
    radius. Those 12 of its 216 silhouettes would duplicate 12 others (their polygons at the same rotations), so
    a ratio within `_POLYGON_MARGIN` of cos(pi / k) takes `_SUBSTITUTE_INNER` (docs/binding.md, Deviations)."""
    if abs(inner - math.cos(math.pi / vertices)) < _POLYGON_MARGIN:
        return _SUBSTITUTE_INNER
    return inner


def _silhouette(vertices: int, inner: float, turn: int) -> np.ndarray:
    start = -90.0 + turn * (360.0 / vertices) / 6
    if inner == 1.0:
        return regular_outline(vertices, start_deg=start)
    return star_outline(vertices, _star_inner(vertices, inner), start_deg=start)


@functools.cache
def glyph_set(kind: str) -> Glyphs:
    if kind == "world":
        outlines = tuple((OUTLINES[c.name][0], tuple(OUTLINES[c.name][1])) for c in ONTOLOGY.categories)
        names = tuple(c.name for c in ONTOLOGY.colours), tuple(c.name for c in ONTOLOGY.categories)
        return Glyphs(tuple(c.rgb for c in ONTOLOGY.colours), outlines, *names)
    if kind == "parametric":
        # Ordered so that the first few shapes differ most (vertex count and star-ness before rotation).
        combos = itertools.product(range(6), _INNER_RATIOS, _VERTICES)
        outlines = tuple((_silhouette(k, rho, turn), ()) for turn, rho, k in combos)
        return Glyphs(tuple(itertools.product(_LEVELS, repeat=3)), outlines)
    raise ValueError(f"unknown glyph set {kind!r}")


def _polygon(points: np.ndarray, centre: tuple[float, float], radius: float) -> list[float]:
    return (points * radius + np.asarray(centre)).ravel().tolist()


def check_fill(fill: float) -> None:
    """Grid objects are drawn at fill x U(1 - SIZE_JITTER, 1 + SIZE_JITTER) of their cell side, so a fill above MAX_FILL would
    let the largest ones cross into the neighbouring cells (and leave no room to place them)."""
    if not 0 < fill <= MAX_FILL:
        raise ValueError(f"fill {fill} is out of range: objects are drawn up to {1 + SIZE_JITTER:g} x fill of their cell "
                         f"side, so fill must be in (0, {MAX_FILL:.3f}] to keep every object inside its cell")


@dataclass(frozen=True)
class Placement:
    """Where a context's objects go (module docstring). Fractions are of the canvas side."""

    kind: str = "grid"  # grid | uniform
    cells: int = 4
    fill: float = 0.8
    box: tuple[float, float] = (28 / 224, 40 / 224)
    gap: float = 4 / 224
    max_tries: int = 1000  # uniform: draws of one image before giving up

    def __post_init__(self):
        check_fill(self.fill)

    def fits(self, n: int) -> bool:
        """Whether n objects can be placed: distinct cells, or (uniform) a packing well below the jamming limit of
        random sequential placement, so the redraws end quickly."""
        if self.kind == "grid":
            return n <= self.cells**2
        return n * (self.box[1] + self.gap) ** 2 <= 0.4


def render_context(
    colours, shapes, glyphs: Glyphs, size: int, rng: np.random.Generator, placement: Placement = Placement()
) -> tuple[Image.Image, list[tuple[float, float, float]]]:
    """The context image and each object's (centre x, centre y, radius) in output pixels; an object's glyph lies
    inside the square of side 2 * radius around its centre."""
    if not placement.fits(len(colours)):
        raise ValueError(f"{len(colours)} objects do not fit the placement {placement}")
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    where = (_grid_places if placement.kind == "grid" else _uniform_places)(len(colours), big, rng, placement)
    for colour, shape, (x, y, radius) in zip(colours, shapes, where):
        outer, holes = glyphs.outlines[shape]
        draw.polygon(_polygon(outer, (x, y), radius), fill=tuple(glyphs.colours[colour]))
        for hole in holes:
            draw.polygon(_polygon(hole, (x, y), radius), fill=BACKGROUND)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    return image, [(x / SUPERSAMPLE, y / SUPERSAMPLE, r / SUPERSAMPLE) for x, y, r in where]


def _grid_places(n: int, side: float, rng: np.random.Generator, placement: Placement) -> list[tuple[float, float, float]]:
    cells = placement.cells
    cell = side / cells
    places = []
    for index in (int(c) for c in rng.choice(cells * cells, size=n, replace=False)):
        radius = cell / 2 * placement.fill * float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
        slack = max(cell / 2 - radius, 0.0)  # at fill = MAX_FILL the largest object fills its cell (up to rounding)
        row, col = divmod(index, cells)
        places.append(((col + 0.5) * cell + rng.uniform(-slack, slack), (row + 0.5) * cell + rng.uniform(-slack, slack), radius))
    return places


def _uniform_places(n: int, side: float, rng: np.random.Generator, placement: Placement) -> list[tuple[float, float, float]]:
    """Sequential random placement: each box drawn anew until it keeps `gap` from the boxes before it."""
    gap = placement.gap * side
    places: list[tuple[float, float, float]] = []
    for _ in range(placement.max_tries):
        if len(places) == n:
            return places
        radius = float(rng.uniform(*placement.box)) * side / 2
        x, y = (float(v) for v in rng.uniform(radius, side - radius, size=2))
        if all(max(abs(x - px), abs(y - py)) >= radius + pr + gap for px, py, pr in places):
            places.append((x, y, radius))
    if len(places) == n:
        return places
    raise ValueError(f"could not place {n} objects apart in {placement.max_tries} draws ({placement})")
