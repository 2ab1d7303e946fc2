"""The stitch tool (visual_stitching.md §1.4): rebuild images from their patch files, for inspection.

Patch files are named `<name>-<row>_<col>[-<suffix>].<ext>`, 0-based (dataset.py's naming and the official one).
Filtered or dropped patches keep the names of the others, so a missing (row, col) is a cell that was removed:
it is filled black. `shuffle` puts the f x f cells (black ones included) at seeded random positions, which
shows what the patches carry without their arrangement. The grid side f comes from the nearest folder named
`<f>x<f>` (the dataset layout, `patches/<f>x<f>/`), else from the largest row or column + 1. The right and
bottom remainders the cutting dropped are not restored: an image of W x H px comes back as f⌊W/f⌋ x f⌊H/f⌋,
equal to the source wherever f divides its sides and the patches are lossless (PNG).

    stitchkit patches stitch --patches data/mine/patches --out stitched [--shuffle --seed 1]
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from stitchkit.data import IMAGE_EXTENSIONS, load_image
from stitchkit.errors import InputError
from stitchkit.patches.dataset import encode_image
from stitchkit.runs import atomic_write_bytes, prepare_output

PATCH_STEM = re.compile(r"(?P<name>[^-]+)-(?P<row>\d+)_(?P<col>\d+)(?:-.*)?")
GRID_FOLDER = re.compile(r"(\d+)x\1")

Cell = tuple[int, int]  # (row, col), 0-based


def stitch_cells(cells: dict[Cell, Image.Image], f: int, cell_size: tuple[int, int], rng: np.random.Generator | None = None) -> Image.Image:
    """The f x f image of `cells` {(row, col): patch of cell_size (width, height)}; a missing cell is black. With
    `rng`, the cell at (row, col) goes to a seeded random position (a permutation of all f x f positions)."""
    width, height = cell_size
    canvas = Image.new("RGB", (f * width, f * height))
    positions = [(row, col) for row in range(f) for col in range(f)]
    order = positions if rng is None else [positions[i] for i in rng.permutation(len(positions))]
    moved = dict(zip(positions, order))
    for cell, patch in cells.items():
        row, col = moved[cell]
        canvas.paste(patch.convert("RGB"), (col * width, row * height))
    return canvas


def patch_files(folder: Path) -> dict[tuple[Path, str], dict[Cell, Path]]:
    """{(sub-folder relative to `folder`, image name): {(row, col): file}} of every patch file under `folder`;
    other files are skipped, as the official loaders skip names they do not know."""
    groups: dict[tuple[Path, str], dict[Cell, Path]] = {}
    for file in sorted(folder.rglob("*")):
        match = PATCH_STEM.fullmatch(file.stem)
        if not file.is_file() or file.suffix.lower() not in IMAGE_EXTENSIONS or match is None:
            continue
        cells = groups.setdefault((file.parent.relative_to(folder), match["name"]), {})
        cell = (int(match["row"]), int(match["col"]))
        if cell in cells:
            raise InputError(f"{cells[cell]} and {file} are both cell (row {cell[0]}, col {cell[1]}) of {match['name']!r}")
        cells[cell] = file
    return groups


def grid_side(folder: Path, cells: dict[Cell, Path]) -> int:
    """f of the patches in `folder`: from the nearest folder named `<f>x<f>`, else the largest index + 1."""
    largest = max(max(cell) for cell in cells) + 1
    named = next((int(m[1]) for part in reversed(folder.parts) if (m := GRID_FOLDER.fullmatch(part))), None)
    if named is None:
        return largest
    if largest > named:
        file = next(file for cell, file in cells.items() if max(cell) >= named)
        raise InputError(f"{file} lies outside the {named}x{named} grid its folder names")
    return named


def stitch_folder(patches: str | os.PathLike, out: str | os.PathLike, shuffle: bool = False, seed: int = 0) -> list[Path]:
    """Rebuild every image whose patches lie under `patches` (searched recursively) as `<out>/<sub-folder>/<name>.png`
    (lossless); returns the files written. With `shuffle`, one generator seeded with `seed` permutes the cells of
    each image in turn (images in path order), so the same seed gives the same pictures. `out` must lie outside
    `patches` and hold no images but the ones this call writes (see `check_out`)."""
    patches = Path(patches)
    if not patches.is_dir():
        raise InputError(f"patch folder not found: {patches}")
    groups = patch_files(patches)
    if not groups:
        raise InputError(f"no patch files (<name>-<row>_<col>.<ext>, e.g. cat-0_1.jpg) under {patches}")
    targets = {group: Path(out) / group[0] / f"{group[1]}.png" for group in groups}
    check_out(patches, Path(out), set(targets.values()))
    out = prepare_output(out)
    rng = np.random.default_rng(seed) if shuffle else None
    for (sub, name), files in groups.items():
        f = grid_side(Path(patches.resolve().name) / sub, files)
        cells = {cell: load_image(file) for cell, file in files.items()}
        sizes = {image.size for image in cells.values()}
        if len(sizes) > 1:
            raise InputError(f"the patches of {name!r} in {patches / sub} differ in size ({sorted(sizes)}): not one image's grid")
        atomic_write_bytes(targets[sub, name], encode_image(stitch_cells(cells, f, sizes.pop(), rng), "png"))
    return list(targets.values())


def check_out(patches: Path, out: Path, targets: set[Path]) -> None:
    """Refuse an output folder inside the patch folder (the rebuilt images would land among the patch files, and a
    later stitch would read them back as patches) or one holding other images (an earlier stitch's would mix with
    this one's); images this call rewrites may be there, so the same command can run again."""
    if patches.resolve() in (out.resolve(), *out.resolve().parents):
        raise InputError(f"--out {out} lies inside --patches {patches}: the rebuilt images would be written among the "
                         "patch files; choose a folder outside it")  # fmt: skip
    if out.is_dir():
        others = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p not in targets)
        if others:
            raise InputError(f"{out} already holds {len(others)} image(s) that this stitch does not write (e.g. {others[0]}), "
                             "which would mix with the rebuilt ones; choose another --out folder or delete them")  # fmt: skip
