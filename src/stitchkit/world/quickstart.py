"""The shapes world's part of `stitchkit quickstart`: a small COCO export and a figure of sample scenes."""

from __future__ import annotations

import numpy as np

from stitchkit.data import load_coco
from stitchkit.report import image_grid, markdown_table
from stitchkit.runs import RunDir
from stitchkit.world.captions import caption
from stitchkit.world.coco import render_coco
from stitchkit.world.ontology import ONTOLOGY
from stitchkit.world.render import render_scene
from stitchkit.world.scene import WorldConfig, sample_scene

SEED = 0


def quickstart(run: RunDir) -> str:
    annotations = render_coco(run.path("world"), n_images=64, size=128, seed=SEED)
    coco = load_coco(annotations)  # read it back through the validating loader every suite uses

    scenes, titles = [], []
    for i, background in enumerate(["plain", "noise", "texture", "plain"] * 2):
        cfg = WorldConfig(background=background, max_objects=5)
        rendered = render_scene(sample_scene(np.random.default_rng([SEED, 1000 + i]), cfg), 160, cfg)
        scenes.append(rendered.image)
        titles.append(caption(rendered.scene))
    figure = image_grid(run.path("figures", "world_samples.png"), scenes, titles, cols=4)

    rows = [
        {"supercategory": sup, "categories": ", ".join(c.name for c in ONTOLOGY.categories if c.supercategory == sup)}
        for sup in ONTOLOGY.supercategories
    ]
    return (
        "## Shapes world\n\n"
        f"{len(ONTOLOGY.categories)} categories in {len(ONTOLOGY.supercategories)} supercategories, "
        f"{len(ONTOLOGY.colours)} colours ({', '.join(c.name for c in ONTOLOGY.colours)}).\n\n"
        + markdown_table(rows)
        + f"\nA COCO-format export of {len(coco.images)} images with {len(coco.annotations)} annotated objects: "
        f"`{annotations.relative_to(run.root)}`.\n\n"
        f"![sample scenes]({figure.relative_to(run.root)})\n"
    )
