"""Experiment for results/zoo/shape_learning.md, not part of stitchkit: the SigLIP zoo recipe with one hard-negative
caption per image (same colour, another shape: the category word swapped) as extra negatives of the pairwise
sigmoid loss, so that in-batch contrast needs shape. Learning curve as benchmarks/bench_zoo.py prints it.

    PYTHONPATH=. OMP_NUM_THREADS=1 python results/zoo/hard_negative_captions.py [STEPS] [bench_zoo --set overrides...]
"""

import sys

import torch
import torch.nn.functional as F

import benchmarks.bench_zoo as bench
from stitchkit.engine.devices import BUILD_THREADS, torch_threads
from stitchkit.world import ONTOLOGY
from stitchkit.zoo import load_recipe, models
from stitchkit.zoo.builder import training_data

vocabulary = {}


def training_data_keeping_vocabulary(recipe):
    dataset, classes, vocabulary["words"] = training_data(recipe)
    return dataset, classes, vocabulary["words"]


def swap_category_word(ids: torch.Tensor) -> torch.Tensor:
    index = {token: i for i, token in enumerate(vocabulary["words"].tokens)}
    category_ids = torch.tensor([index[c.name] for c in ONTOLOGY.categories])
    matches = ids[..., None] == category_ids
    is_category, which = matches.any(-1), matches.float().argmax(-1)
    shift = torch.randint(1, len(category_ids), ids.shape)
    swapped = ids.clone()
    swapped[is_category] = category_ids[(which[is_category] + shift[is_category]) % len(category_ids)]
    return swapped


def pooled(output) -> torch.Tensor:
    return F.normalize(output.pooler_output if hasattr(output, "pooler_output") else output, dim=-1)


def forward_with_hard_negatives(self, batch):
    pixels = models.training_pixels(batch["image"], self.recipe.augment, self.recipe.encoder)
    model, n = self.model, len(pixels)
    images = pooled(model.get_image_features(pixel_values=pixels))
    texts = pooled(model.get_text_features(input_ids=torch.cat([batch["caption_ids"], swap_category_word(batch["caption_ids"])])))
    logits = images @ texts.t() * model.logit_scale.exp() + model.logit_bias  # (n, 2n): captions, then hard negatives
    labels = -torch.ones_like(logits)
    labels[:, :n] += 2 * torch.eye(n)
    return -F.logsigmoid(labels * logits).sum() / n, {}


bench.training_data = training_data_keeping_vocabulary
models.ImageTextContrastive.forward = forward_with_hard_negatives
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 600
recipe = bench.with_overrides(load_recipe("siglip"), [f"train.steps={steps}", *sys.argv[2:]])
with torch_threads(BUILD_THREADS):
    for row in bench.learning_curve(recipe, 300):
        print(f"step {row['step']}: category {row['category']:.3f}, colour x category {row['both']:.3f}")
