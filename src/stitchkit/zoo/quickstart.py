"""The micro zoo's part of `stitchkit quickstart`: build the four CPU recipes and tabulate them."""

from __future__ import annotations

from stitchkit.report import markdown_table
from stitchkit.runs import RunDir, atomic_write_json
from stitchkit.zoo.builder import build_all, summary_row, zoo_info
from stitchkit.zoo.recipes import list_recipes, load_recipe


def quickstart(run: RunDir) -> str:
    recipes = [load_recipe(name) for name in list_recipes(include_gpu=False)]
    build_all(recipes)  # cached by recipe hash: later suites load the same models
    atomic_write_json(run.path("zoo", "models.json"), [zoo_info(r) for r in recipes])
    return (
        "## Micro zoo\n\n"
        "Small encoders of four Hugging Face classes, each trained here with its own objective (supervised "
        "cross-entropy, CLIP softmax contrastive, SigLIP sigmoid, DINO self-distillation with registers). "
        "tokens: patch grid + prefix tokens (CLS, registers). probe: linear probe on the encoder's own pooled "
        "output, held-out shapes-world images labelled colour x category, next to the same architecture at random "
        "init; category: the same probe by category (shape) alone, which these tiny ViTs learn far less well than "
        "colour (results/zoo/shape_learning.md in the repository).\n\n"
        + markdown_table([summary_row(r) for r in recipes])
        + f"\nMetadata of every model: `{run.path('zoo', 'models.json').relative_to(run.root)}`.\n"
    )
