"""The micro vision zoo: small encoders of real Hugging Face classes, trained here on the shapes world with
the objectives of the real foundation-model zoo (supervised ViT, CLIP, SigLIP, DINO with registers).

    from stitchkit.zoo import build, load_zoo_backbone
    folder = build("dino")            # trains once (~1 min on 2 CPU cores), then cached by recipe hash
    bb = load_zoo_backbone("siglip")  # a VisionBackbone, like load_backbone("google/siglip...")

    recipes.py     ZooRecipe (configs/zoo/*.yaml), list_recipes, load_recipe, recipe_hash
    objectives.py  CLIP, SigLIP and DINO losses, one function per formula
    augment.py     random resized crop, flip, brightness/contrast in plain torch
    text.py        the word-level caption tokenizer of the image-text recipes
    models.py      the four trainable modules (forward -> loss) and what each saves
    probe.py       linear probe (closed-form ridge) on a backbone's own pooled output
    builder.py     build / build_all / zoo_path / load_zoo_backbone: train through stitchkit.engine, save, probe,
                   cache (build_all: one process per core on a CPU);
                   load_frozen_backbone: a hub id, folder or zoo:NAME as a frozen VisionBackbone
"""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.zoo.builder import (
        build,
        build_all,
        load_frozen_backbone,
        load_zoo_backbone,
        zoo_info,
        zoo_path,
        zoo_root,
    )
    from stitchkit.zoo.probe import linear_probe, ridge_probe_accuracy
    from stitchkit.zoo.recipes import ZooRecipe, list_recipes, load_recipe, recipe_hash

__all__ = [
    "ZooRecipe",
    "build",
    "build_all",
    "linear_probe",
    "list_recipes",
    "load_recipe",
    "load_frozen_backbone",
    "load_zoo_backbone",
    "recipe_hash",
    "ridge_probe_accuracy",
    "zoo_info",
    "zoo_path",
    "zoo_root",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "builder": ["build", "build_all", "load_frozen_backbone", "load_zoo_backbone", "zoo_info", "zoo_path", "zoo_root"],
        "probe": ["linear_probe", "ridge_probe_accuracy"],
        "recipes": ["ZooRecipe", "list_recipes", "load_recipe", "recipe_hash"],
    },
)
