"""Experiment for results/zoo/shape_learning.md, not part of stitchkit: a zoo recipe trained N1 steps on upright
shapes, then N2 steps on its own (rotated) world, each with a fresh warmup + cosine schedule; probed like a build
(held-out rotated images, by category and by colour x category).

    PYTHONPATH=. OMP_NUM_THREADS=1 python results/zoo/rotation_curriculum.py RECIPE N1 N2
"""

import copy
import sys

from benchmarks.bench_zoo import with_overrides
from stitchkit.backbones import load_backbone
from stitchkit.engine import seed_everything, train
from stitchkit.engine.devices import BUILD_THREADS, torch_threads
from stitchkit.zoo import linear_probe, load_recipe
from stitchkit.zoo.builder import probe_sets, training_data
from stitchkit.zoo.models import make_trainable

UPRIGHT = "data.world={min_objects: 1, max_objects: 1, min_size: 0.4, max_size: 0.9, max_rotation: 0}"

name, upright_steps, rotated_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rotated = with_overrides(load_recipe(name), [f"train.steps={rotated_steps}"])
upright = with_overrides(load_recipe(name), [f"train.steps={upright_steps}", UPRIGHT])
with torch_threads(BUILD_THREADS):
    rotated_data, classes, vocab = training_data(rotated)
    seed_everything(rotated.train.seed)
    model = make_trainable(rotated, num_classes=classes, vocab_size=len(vocab) if vocab else 0)
    upright_data, _, upright_vocab = training_data(upright)
    # Both vocabularies hold every colour and category name, sorted: caption ids mean the same words in both.
    assert vocab is None or upright_vocab.tokens == vocab.tokens
    train(model, lambda m, batch: m(batch), upright_data, upright.train, None, description="upright")
    train(model, lambda m, batch: m(batch), rotated_data, rotated.train, None, description="rotated")
    encoder = rotated.encoder
    backbone = load_backbone(copy.deepcopy(model.vision_encoder()), image_size=encoder.image_size, mean=encoder.mean,
                             std=encoder.std)
    for target in ("category", "both"):
        print(f"{name}, {upright_steps} upright + {rotated_steps} rotated steps: {target} "
              f"{linear_probe(backbone, *probe_sets(rotated, target)):.3f}")
