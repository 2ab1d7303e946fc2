"""Experiment for results/zoo/shape_learning.md, not part of stitchkit: the supervised recipe with two linear heads
on the CLS token, cross-entropy on the category plus cross-entropy on the colour (weight W), instead of one head
over the 130 joint colour x category classes. Everything else as `benchmarks.bench_zoo` trains and probes the
recipe (same images, augmentation, optimiser, steps; probes every 300 steps). Extra arguments are recipe
overrides, as bench_zoo's --set.

    PYTHONPATH=. OMP_NUM_THREADS=1 python results/zoo/two_heads.py [W] [SECTION.FIELD=VALUE ...]
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import benchmarks.bench_zoo as bench
from stitchkit.engine.devices import BUILD_THREADS, torch_threads
from stitchkit.world.ontology import ONTOLOGY
from stitchkit.world.sets import classification_set
from stitchkit.zoo.builder import ColumnDataset
from stitchkit.zoo.models import SupervisedClassifier, training_pixels

colour_weight = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0


def training_data(recipe):
    data = classification_set(recipe.data.images, recipe.encoder.image_size, recipe.data.seed, "both", recipe.data.world)
    columns = {"image": data.images, "category": data.category, "colour": data.colour}
    return ColumnDataset(**{k: torch.from_numpy(v) for k, v in columns.items()}), len(data.class_names), None


class TwoHeads(SupervisedClassifier):
    def __init__(self, recipe):
        super().__init__(recipe, num_classes=len(ONTOLOGY.categories))  # self.head: the category head
        self.colour_head = nn.Linear(recipe.encoder.hidden_size, len(ONTOLOGY.colours))

    def forward(self, batch):
        pixels = training_pixels(batch["image"], self.recipe.augment, self.recipe.encoder)
        cls = self.encoder(pixel_values=pixels).last_hidden_state[:, 0]
        category_logits = self.head(cls)
        loss = F.cross_entropy(category_logits, batch["category"])
        loss = loss + colour_weight * F.cross_entropy(self.colour_head(cls), batch["colour"])
        return loss, {"accuracy": (category_logits.argmax(1) == batch["category"]).float().mean()}


# learning_curve builds its data and model through these module-level names.
bench.training_data = training_data
bench.make_trainable = lambda recipe, num_classes, vocab_size: TwoHeads(recipe)
recipe = bench.with_overrides(bench.load_recipe("supervised"), sys.argv[2:])
with torch_threads(BUILD_THREADS):
    for row in bench.learning_curve(recipe, 300):
        print(row)
