"""Attention knockouts (binding.md §7.3): block chosen attention edges in a window of layers, slid over depth,
and measure the accuracy lost (windowed knockout after Geva et al. 2023).

Edge sets (query position -> key positions) on the token format:
    K1 query -> context colours          K4 e_i -> a_i (binding formation)
    K2 query -> context shapes           K5 association item -> its shape
    K3 query -> association tokens       K6 association shape -> context shapes (look-back)
Blocked edges get -inf before the softmax on all heads (stitchkit.vlm.attention.AttentionKnockout), in layers
[l, l + window) for every start l. Accuracy is the argmax over the whole vocabulary, as in evaluation.
"""

from __future__ import annotations

import torch

from stitchkit.binding.task import Encoded, encode_text, example_rng, sample_example
from stitchkit.progress import track
from stitchkit.vlm.attention import AttentionKnockout, install_attention

EDGE_SETS = {
    "K1": "query -> context colours",
    "K2": "query -> context shapes",
    "K3": "query -> association tokens",
    "K4": "shape e_i -> its colour a_i",
    "K5": "association item -> its shape",
    "K6": "association shape -> context shapes",
}


def edges(enc: Encoded, name: str) -> list[tuple[int, int]]:
    """The (query position, key position) pairs of edge set `name` in one encoded example."""
    q = enc.query_pos
    assoc = sorted(p for i in range(len(enc.assoc_shape_pos)) for p in range(enc.assoc_shape_pos[i], enc.assoc_item_pos[i] + 1))
    return {
        "K1": [(q, k) for k in enc.colour_pos],
        "K2": [(q, k) for k in enc.shape_pos],
        "K3": [(q, k) for k in assoc],
        "K4": list(zip(enc.shape_pos, enc.colour_pos)),
        "K5": list(zip(enc.assoc_item_pos, enc.assoc_shape_pos)),
        "K6": [(a, k) for a in enc.assoc_shape_pos for k in enc.shape_pos],
    }[name]


def blocked_mask(encoded: list[Encoded], name: str) -> torch.Tensor:
    length = len(encoded[0].input_ids)
    mask = torch.zeros(len(encoded), length, length, dtype=torch.bool)
    for row, enc in enumerate(encoded):
        for q, k in edges(enc, name):
            mask[row, q, k] = True
    return mask


@torch.no_grad()
def run_knockouts(model, n: int = 8, examples: int = 500, seed: int = 0, window: int = 3, sets=tuple(EDGE_SETS)) -> dict:
    """Accuracy with each edge set knocked out in each window, next to the unmodified accuracy."""
    install_attention(model.lm)
    vocab, device = model.vocab, next(model.parameters()).device
    encoded = [encode_text(sample_example(example_rng(seed, "knockouts", n, i), n, vocab), vocab) for i in range(examples)]
    ids = torch.tensor([e.input_ids for e in encoded], device=device)
    targets = torch.tensor([e.target for e in encoded], device=device)
    layers = model.settings.layers
    window = min(window, layers)

    def accuracy(knockout: AttentionKnockout | None) -> float:
        logits = model.run(ids, attention_knockout=knockout).logits[:, -1]
        return float((logits.argmax(-1) == targets).float().mean())

    base = accuracy(None)
    rows = []
    for name in track(sets, description=f"knockouts N={n}"):
        mask = blocked_mask(encoded, name).to(device)
        for start in range(layers - window + 1):
            acc = accuracy(AttentionKnockout(frozenset(range(start, start + window)), mask))
            rows.append({"set": name, "start": start, "layers": [start, start + window - 1], "accuracy": acc, "delta": acc - base})
    return {"n": n, "examples": examples, "window": window, "baseline": base, "edge_sets": {k: EDGE_SETS[k] for k in sets}, "windows": rows}
