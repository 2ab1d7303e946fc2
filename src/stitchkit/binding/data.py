"""Training and evaluation data: the image bank (rendered contexts through a frozen encoder) and the
deterministic example streams of each stage.

Image bank. Rendering and encoding every image example afresh is what dominates cost, so a stage draws its image
contexts from a bank of `pool` pre-rendered contexts (N ~ U{1..max train N}) encoded once by the frozen encoder;
each draw pairs a bank context with fresh items, association order and query, so the sequences still vary
freely. The bank stores, per context, its colours and shapes and the encoder's patch tokens (prefix tokens
dropped), in raster order.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from stitchkit.binding.render import Glyphs, Placement, render_context
from stitchkit.binding.task import (
    PAD,
    Encoded,
    Example,
    Vocabulary,
    encode_grounding,
    encode_hop,
    encode_image,
    encode_text,
    example_rng,
    noise_gaps,
    sample_example,
)
from stitchkit.progress import track
from stitchkit.runs import atomic_path, atomic_write_json

ENCODE_BATCH = 128  # images per encoder forward


@dataclass
class ImageBank:
    colours: list[tuple[int, ...]]
    shapes: list[tuple[int, ...]]
    features: torch.Tensor  # (P, T, D) float32

    @property
    def tokens(self) -> int:
        return self.features.shape[1]

    def __len__(self) -> int:
        return len(self.colours)

    def save(self, path: Path) -> None:
        """Features as float16 safetensors at `path`, the contexts as JSON beside it."""
        with atomic_path(path) as tmp:
            save_file({"features": self.features.half().contiguous()}, str(tmp))
        atomic_write_json(path.with_suffix(".json"), {"colours": self.colours, "shapes": self.shapes})

    @classmethod
    def load(cls, path: Path) -> "ImageBank":
        meta = json.loads(path.with_suffix(".json").read_text())
        colours = [tuple(c) for c in meta["colours"]]
        shapes = [tuple(s) for s in meta["shapes"]]
        return cls(colours, shapes, load_file(str(path))["features"])


@torch.no_grad()
def patch_tokens(backbone, images: Iterable[Image.Image], batch_size: int = ENCODE_BATCH, pool: bool = False) -> torch.Tensor:
    """The encoder's final tokens without its prefix (CLS / register) tokens, (N, T, D) float32 on the CPU; with
    `pool`, their mean over the tokens, (N, D). `images` may be a generator: it is consumed one batch at a time, so
    pooling keeps only one batch of images and tokens at once. The separability gate needs that: (N, T, D) for
    its 216 x 216 x 2 single-object images would be ~52 GiB, the pooled (N, D) 0.27 GiB."""
    chunks, images = [], iter(images)
    while batch := list(itertools.islice(images, batch_size)):
        tokens = backbone.forward_features(backbone.preprocess(batch))[:, backbone.num_prefix_tokens :]
        chunks.append((tokens.float().mean(dim=1) if pool else tokens.float()).cpu())
    return torch.cat(chunks)


def build_bank(
    backbone, size: int, seed: int, split: str, objects: tuple[int, int], vocab: Vocabulary, glyphs: Glyphs, placement: Placement
) -> ImageBank:
    """`size` contexts of N ~ U{objects} renderable objects, rendered at the encoder's resolution and encoded."""
    n_colours, n_shapes = glyphs.renderable
    colours, shapes, images = [], [], []
    for index in track(range(size), description=f"render {split} contexts"):
        rng = example_rng(seed, split, 0, index)
        n = int(rng.integers(objects[0], objects[1] + 1))
        ex = sample_example(rng, n, vocab, min(n_colours, vocab.colours), min(n_shapes, vocab.shapes))
        image, _ = render_context(ex.colours, ex.shapes, glyphs, backbone.image_size, rng, placement)
        colours.append(ex.colours)
        shapes.append(ex.shapes)
        images.append(image)
    return ImageBank(colours, shapes, patch_tokens(backbone, images))


def bank_example(bank: ImageBank, index: int, rng: np.random.Generator, vocab: Vocabulary) -> Example:
    """Bank context `index` with fresh items, association order and query."""
    colours, shapes = bank.colours[index], bank.shapes[index]
    n = len(colours)
    items = tuple(int(t) for t in rng.choice(vocab.items, size=n, replace=False))
    return Example(colours, shapes, items, tuple(int(i) for i in rng.permutation(n)), int(rng.integers(n)))


def as_sample(enc: Encoded, image_index: int = -1) -> dict:
    return {"input_ids": enc.input_ids, "position_ids": enc.position_ids, "target": enc.target, "image_index": image_index}


@dataclass(frozen=True)
class StreamSpec:
    """What one stage trains on: text (optionally with noise gaps), images (+ grounding), or a mix."""

    image_fraction: float  # 0: text only; 1: images only
    noise: bool
    noise_span: int
    noise_between_pairs_only: bool
    grounding_fraction: float  # of the image examples
    hop_practice: float = 0.0  # of the text examples: one hop alone (encode_hop), hop 1 or 2 with equal odds


class ExampleStream(Dataset):
    """`length` training examples, each regenerated from its own seed on access (no storage, any order)."""

    def __init__(self, spec: StreamSpec, length: int, seed: int, split: str, vocab: Vocabulary, objects: tuple[int, int], bank: ImageBank | None):
        if spec.image_fraction > 0 and bank is None:
            raise ValueError("image examples need an image bank")
        self.spec, self.length, self.seed, self.split = spec, length, seed, split
        self.vocab, self.objects, self.bank = vocab, objects, bank

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        spec, rng = self.spec, example_rng(self.seed, self.split, 0, index)
        if rng.random() < spec.image_fraction:
            b = int(rng.integers(len(self.bank)))
            ex = bank_example(self.bank, b, rng, self.vocab)
            if rng.random() < spec.grounding_fraction:
                obj, c2s = int(rng.integers(ex.n)), bool(rng.random() < 0.5)
                return as_sample(encode_grounding(ex, self.vocab, self.bank.tokens, obj, c2s), b)
            return as_sample(encode_image(ex, self.vocab, self.bank.tokens), b)
        n = int(rng.integers(self.objects[0], self.objects[1] + 1))
        ex = sample_example(rng, n, self.vocab)
        gaps = noise_gaps(rng, n, spec.noise_span, spec.noise_between_pairs_only) if spec.noise else None
        if spec.hop_practice and rng.random() < spec.hop_practice:  # no draw without practice: streams unchanged
            return as_sample(encode_hop(ex, self.vocab, 1 + int(rng.integers(2)), gaps))
        return as_sample(encode_text(ex, self.vocab, gaps))


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded batch; the answer is read at each sequence's last real token."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), PAD, dtype=torch.long)
    positions = torch.zeros((len(samples), longest), dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n] = torch.tensor(s["input_ids"])
        positions[row, :n] = torch.tensor(s["position_ids"])
        # Padding continues the positions, so no position repeats inside a row.
        positions[row, n:] = torch.arange(s["position_ids"][-1] + 1, s["position_ids"][-1] + 1 + longest - n)
        mask[row, :n] = 1
    return {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": mask,
        "answer_pos": torch.tensor([len(s["input_ids"]) - 1 for s in samples]),
        "target": torch.tensor([s["target"] for s in samples]),
        "image_index": torch.tensor([s["image_index"] for s in samples]),
    }
