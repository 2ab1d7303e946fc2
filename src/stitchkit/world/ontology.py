"""What can exist in the shapes world: categories grouped in supercategories, named colours, sizes, positions.

Category ids start at 1, as in COCO, so a semantic segmentation map can use the id directly (0 = background).
Colours are saturated or clearly distinct (white, brown) and every background is grey, so the colour of an
object's pixels names its colour without ambiguity.
"""

from __future__ import annotations

from dataclasses import dataclass

from stitchkit.errors import ConfigError


@dataclass(frozen=True)
class Category:
    id: int  # COCO category id = index in ONTOLOGY.categories + 1 = value in semantic maps
    name: str
    supercategory: str
    plural: str


@dataclass(frozen=True)
class Colour:
    name: str
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Ontology:
    categories: list[Category]
    colours: list[Colour]
    sizes: list[str]
    positions: list[str]  # 3x3 grid, row by row from the top left

    @property
    def supercategories(self) -> list[str]:
        return list(dict.fromkeys(c.supercategory for c in self.categories))

    def category(self, name: str) -> Category:
        return self.categories[_index(name, [c.name for c in self.categories], "category")]

    def colour(self, name: str) -> Colour:
        return self.colours[_index(name, [c.name for c in self.colours], "colour")]

    def colour_index(self, name: str) -> int:
        return _index(name, [c.name for c in self.colours], "colour")


def _index(name: str, names: list[str], kind: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise ConfigError(f"unknown {kind} {name!r}; choose from: {', '.join(names)}") from None


_CATEGORIES = {
    "polygon": ["triangle", "square", "pentagon", "hexagon", "diamond"],
    "round": ["circle", "ellipse", "ring", "semicircle"],
    "symbol": ["star", "cross", "heart", "arrow"],
}
_IRREGULAR_PLURALS = {"cross": "crosses"}

ONTOLOGY = Ontology(
    categories=[
        Category(id=i + 1, name=name, supercategory=sup, plural=_IRREGULAR_PLURALS.get(name, name + "s"))
        for i, (sup, name) in enumerate((sup, name) for sup, names in _CATEGORIES.items() for name in names)
    ],
    colours=[
        Colour("red", (220, 30, 30)),
        Colour("green", (30, 170, 50)),
        Colour("blue", (40, 80, 235)),
        Colour("yellow", (250, 225, 30)),
        Colour("purple", (140, 40, 200)),
        Colour("orange", (255, 140, 0)),
        Colour("cyan", (0, 215, 220)),
        Colour("pink", (255, 120, 190)),
        Colour("white", (255, 255, 255)),
        Colour("brown", (140, 80, 30)),
    ],
    sizes=["small", "medium", "large"],
    positions=[
        "top left", "top", "top right",
        "left", "centre", "right",
        "bottom left", "bottom", "bottom right",
    ],
)


def position_name(x: float, y: float) -> str:
    """Name of the 3x3 grid cell holding the point (x, y), both fractions of the image side."""
    col = min(int(x * 3), 2)
    row = min(int(y * 3), 2)
    return ONTOLOGY.positions[row * 3 + col]
