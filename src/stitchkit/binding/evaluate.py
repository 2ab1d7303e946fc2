"""Accuracy per context size (binding.md §6): argmax over the whole vocabulary at the answer position.

Evaluation examples come from their own split ("eval", or "eval_images" for the image bank), never from
training code paths that could leak: the generator is the task's, the split differs.
"""

from __future__ import annotations

import numpy as np
import torch

from stitchkit.binding.data import ImageBank, as_sample, bank_example, collate
from stitchkit.binding.task import Vocabulary, encode_image, encode_text, example_rng, sample_example


@torch.no_grad()
def accuracy_of_samples(model, samples: list[dict], batch_size: int) -> float:
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in collate(samples[start : start + batch_size]).items()}
        correct += int((model(batch).argmax(-1) == batch["target"]).sum())
    return correct / len(samples)


def text_samples(vocab: Vocabulary, n: int, count: int, seed: int, split: str = "eval") -> list[dict]:
    return [as_sample(encode_text(sample_example(example_rng(seed, split, n, i), n, vocab), vocab)) for i in range(count)]


def text_accuracy(model, vocab: Vocabulary, ns, per_n: int, seed: int, batch_size: int = 256) -> dict[int, float]:
    """{N: accuracy} on `per_n` fresh text examples of each context size."""
    was_training = model.training
    model.eval()
    result = {n: accuracy_of_samples(model, text_samples(vocab, n, per_n, seed), batch_size) for n in ns}
    model.train(was_training)
    return result


def image_accuracy(model, vocab: Vocabulary, bank: ImageBank, seed: int, batch_size: int = 256) -> dict[int, float]:
    """{N: accuracy} over the contexts of an evaluation image bank, grouped by their size. The model reads
    image features from `bank` for the duration of the call."""
    was_training, training_bank = model.training, model.image_bank
    model.eval()
    model.image_bank = bank.features.to(next(model.parameters()).device)
    by_n: dict[int, list[dict]] = {}
    for index in range(len(bank)):
        ex = bank_example(bank, index, example_rng(seed, "eval_images", 0, index), vocab)
        by_n.setdefault(ex.n, []).append(as_sample(encode_image(ex, vocab, bank.tokens), index))
    try:
        return {n: accuracy_of_samples(model, by_n[n], batch_size) for n in sorted(by_n)}
    finally:
        model.image_bank = training_bank
        model.train(was_training)


def ood_ranges(train_objects: tuple[int, int], settings) -> dict[str, list[int] | None]:
    """The N ranges `summarize` averages as OOD and far OOD, [first, last] (None when empty), for the report."""
    hi, top = train_objects[1], settings.max_objects
    headline = top if settings.ood_headline is None else min(settings.ood_headline, top)
    return {"ood": [hi + 1, headline] if headline > hi else None, "ood_far": [headline + 1, top] if top > headline else None}


def summarize(per_n: dict[int, float], train_objects: tuple[int, int], ood_headline: int | None) -> dict[str, float | None]:
    """ID average (the trained range lo..hi; smaller N, when lo > 1, are neither ID nor OOD), OOD average (above
    hi, up to `ood_headline`: the config's eval.ood_headline, the paper's headline 9..16) and far-OOD average
    (above the headline range; None headline: every N above hi is OOD); unweighted over N (§6)."""
    lo, hi = train_objects
    headline = max(per_n) if ood_headline is None else ood_headline
    groups = {
        "id": [a for n, a in per_n.items() if lo <= n <= hi],
        "ood": [a for n, a in per_n.items() if hi < n <= headline],
        "ood_far": [a for n, a in per_n.items() if n > headline],
    }
    return {k: float(np.mean(v)) if v else None for k, v in groups.items()}
