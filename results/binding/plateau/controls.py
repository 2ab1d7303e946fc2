"""Experiment for results/binding/README.md, not part of stitchkit: is the N = 2 plateau (plateau/n2.yaml) the
task's, or would this model and training loop fail any retrieval? Easier controls, trained exactly like
n2.yaml's S1 (the suite's model, batching, answer-only loss, engine, optimiser, stop rule; 6 x 6 x 6, N = 2):

    onehop   BOS a_1 e_1 a_2 e_2 QUE a_q            -> e_q     (first hop only: the colour's shape; task.encode_hop)
    ordered  the suite's sequence, but the associations listed in context order, so the second hop can be an
             ordinal lookup (the reason binding.md §2 makes the shuffled order mandatory)
    hop1     onehop with the grounding question's tokens: BOS a_1 e_1 a_2 e_2 CTX_END GND_C2S a_q -> e_q
    hop2     the suite's sequence queried by the shape instead of the colour: QUE e_q -> t(e_q) (second hop only;
             task.encode_hop)
    mixed    the suite's task, with two thirds of the training examples replaced by its single hops: one third
             onehop, one third the suite's sequence queried by the shape (QUE e_q -> t(e_q), the second hop
             alone). Held out: the suite's task only. Does practising each hop break the two-hop plateau?
    staged   onehop first (until 99% held out, at most 1,000 steps), then the suite's task from that model (a new
             optimiser and warmup, as a new stage). Does a first hop that is already there break the plateau?

    full     the suite's task itself (as n2.yaml), for other depths

    PYTHONPATH=. OMP_NUM_THREADS=1 python results/binding/plateau/controls.py onehop|hop1|hop2|ordered|mixed|staged|full [STEPS [LAYERS [SEED]]]

Prints the held-out accuracy at every check (500 examples, every 250 steps) and the step at which it stopped.

    PYTHONPATH=. OMP_NUM_THREADS=1 python results/binding/plateau/controls.py kinds MODEL_FOLDER

prints a saved N = 2 model's held-out accuracy on the task, onehop and hop2 (e.g. a `binding run` S1 model).
"""

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from stitchkit.binding.config import BindingConfig
from stitchkit.binding.data import as_sample, collate
from stitchkit.binding.evaluate import accuracy_of_samples
from stitchkit.binding.model import BindingModel, answer_loss, load_binding_model
from stitchkit.binding.task import BOS, CTX_END, GND_C2S, encode_hop, encode_text, example_rng, sample_example
from stitchkit.config import load_config
from stitchkit.engine import TrainConfig, seed_everything, train

N = 2
MIXED = ("full", "onehop", "hop2")
variant = sys.argv[1]
cfg = load_config(BindingConfig, Path(__file__).with_name("n2.yaml"))
steps = int(sys.argv[2]) if len(sys.argv) > 2 and variant != "kinds" else cfg.stages["S1"].steps
if len(sys.argv) > 3:
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"layers": int(sys.argv[3])})})
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # model initialisation, data and batch order
vocab = cfg.vocab.vocabulary


def sample(split: str, index: int, kind: str) -> dict:
    ex = sample_example(example_rng(seed, split, N, index), N, vocab)
    if kind == "full":
        return as_sample(encode_text(ex, vocab))
    if kind in ("onehop", "hop2"):  # the suite's hop-practice formats
        return as_sample(encode_hop(ex, vocab, 1 if kind == "onehop" else 2))
    if kind == "hop1":
        context = [BOS] + [t for c, s in zip(ex.colours, ex.shapes) for t in (vocab.colour(c), vocab.shape(s))]
        ids = context + [CTX_END, GND_C2S, vocab.colour(ex.colours[ex.query])]
        return {"input_ids": ids, "position_ids": list(range(len(ids))), "target": vocab.shape(ex.shapes[ex.query]), "image_index": -1}
    if kind == "ordered":
        return as_sample(encode_text(dataclasses.replace(ex, order=tuple(range(N))), vocab))
    raise SystemExit(f"unknown variant {variant!r}: onehop, hop1, hop2, ordered, mixed, staged or full")


def print_kinds(model) -> None:
    """The model's held-out accuracy on each kind of MIXED."""
    for kind in MIXED:
        print(f"final held-out accuracy, {kind}: {accuracy_of_samples(model, [sample('stop', i, kind) for i in range(500)], 500):.3f}")


if variant == "kinds":
    print_kinds(load_binding_model(sys.argv[2])[0])
    sys.exit()

STAGED_STEPS = 1000
# Training phases: (the kind of training example `index`, the held-out kind of the stop rule, steps).
phases = {
    "mixed": [(lambda index: MIXED[index % 3], "full", steps)],
    "staged": [(lambda index: "onehop", "onehop", STAGED_STEPS), (lambda index: "full", "full", steps)],
}.get(variant, [(lambda index: variant, variant, steps)])


class Stream(torch.utils.data.Dataset):
    def __init__(self, kind_of, length):
        self.kind_of, self.length = kind_of, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return sample("train", index, self.kind_of(index))


torch.set_num_threads(1)
seed_everything(seed)
model = BindingModel(cfg.model, vocab)
o = cfg.optim
for kind_of, held_out_kind, phase_steps in phases:
    held_out = [sample("stop", i, held_out_kind) for i in range(500)]
    train_cfg = TrainConfig(
        steps=phase_steps, batch_size=o.batch_size, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, warmup_steps=o.warmup_steps,
        schedule="constant", max_grad_norm=o.max_grad_norm, log_every=50, seed=seed,
    )  # fmt: skip

    def eval_fn(m, step, held_out=held_out, held_out_kind=held_out_kind):
        accuracy = accuracy_of_samples(m, held_out, 500)
        print(f"step {step}: held-out accuracy {accuracy:.3f}" + (f" ({held_out_kind})" if len(phases) > 1 else ""), flush=True)
        return {"id_accuracy": accuracy}

    with tempfile.TemporaryDirectory() as folder:
        result = train(model, answer_loss, Stream(kind_of, phase_steps * o.batch_size), train_cfg, Path(folder),
                       collate_fn=collate, eval_fn=eval_fn, eval_every=250, stop_fn=lambda metrics: metrics["id_accuracy"] >= 0.99)  # fmt: skip
    print(f"{variant}: stopped at step {result.steps}" + (f" of the {held_out_kind} phase" if len(phases) > 1 else ""))
if variant in ("mixed", "staged"):  # which of the trained kinds the final model answers
    print_kinds(model)
