"""Micro zoo learning curves: linear-probe accuracy of each recipe's encoder as training goes on.

For every recipe, trains in memory through stitchkit.engine (no cache, nothing written) and, every
`--every` steps, probes the encoder's own pooled output on held-out shapes-world images, by category and
by the joint colour x category label, next to the same architecture at random init. It also times the
training steps. Used to choose the recipes' step counts; the built models' numbers live in zoo.json.

    .venv/bin/python -m benchmarks.bench_zoo                          # the four CPU recipes
    .venv/bin/python -m benchmarks.bench_zoo dino --steps 400 --every 100 --set train.lr=2e-3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import yaml
from rich.console import Console
from rich.table import Table

from stitchkit.backbones import load_backbone
from stitchkit.config import validate_config
from stitchkit.engine import seed_everything, train
from stitchkit.engine.devices import BUILD_THREADS, torch_threads
from stitchkit.zoo import ZooRecipe, linear_probe, list_recipes, load_recipe
from stitchkit.zoo.builder import probe_sets, training_data
from stitchkit.zoo.models import make_trainable

PROBE_TARGETS = ("category", "both")


def with_overrides(recipe: ZooRecipe, settings: list[str]) -> ZooRecipe:
    """Apply dotted `section.field=value` overrides (values parsed as YAML)."""
    data = recipe.model_dump(mode="json")
    for setting in settings:
        path, value = setting.split("=", 1)
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = yaml.safe_load(value)
    return validate_config(ZooRecipe, data, source="--set")


def learning_curve(recipe: ZooRecipe, every: int) -> list[dict]:
    encoder = recipe.encoder
    dataset, num_classes, vocab = training_data(recipe)
    sets = {target: probe_sets(recipe, target) for target in PROBE_TARGETS}

    def probe(vision_model) -> dict[str, float]:
        # deepcopy: load_backbone freezes the module it wraps, and this one is still training.
        bb = load_backbone(copy.deepcopy(vision_model), image_size=encoder.image_size, mean=encoder.mean, std=encoder.std)
        accuracies = {target: linear_probe(bb, *pair) for target, pair in sets.items()}
        print(f"  {recipe.name}: " + ", ".join(f"{t} {a:.3f}" for t, a in accuracies.items()), flush=True)
        return accuracies

    seed_everything(recipe.train.seed)
    model = make_trainable(recipe, num_classes=num_classes, vocab_size=len(vocab) if vocab else 0)
    rows = [{"step": 0, "seconds": 0.0, **probe(model.vision_encoder())}]
    clock = {"train": 0.0, "since": time.perf_counter()}

    def eval_fn(trained, step: int) -> dict[str, float]:
        clock["train"] += time.perf_counter() - clock["since"]
        rows.append({"step": step, "seconds": clock["train"], **probe(trained.vision_encoder())})
        clock["since"] = time.perf_counter()
        return {}

    train(model, lambda m, batch: m(batch), dataset, recipe.train, None,
          description=f"bench {recipe.name}", eval_fn=eval_fn, eval_every=every)
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=list_recipes(include_gpu=False))
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--every", type=int, help="probe every N steps (default: steps / 3)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. train.lr=2e-3")
    args = parser.parse_args(argv if argv is not None else [])
    results = {}
    for name in args.recipes:
        recipe = with_overrides(load_recipe(name), args.set + ([f"train.steps={args.steps}"] if args.steps else []))
        with torch_threads(BUILD_THREADS):  # as the builds run
            rows = learning_curve(recipe, args.every or max(recipe.train.steps // 3, 1))
        results[name] = rows
        table = Table(title=f"{name}: probe accuracy vs steps ({'cuda' if torch.cuda.is_available() else 'cpu'})")
        for column in ("step", "train s", *PROBE_TARGETS):
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(str(row["step"]), f"{row['seconds']:.1f}", *(f"{row[t]:.3f}" for t in PROBE_TARGETS))
        Console().print(table)
    return results


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
