"""Attention knockouts (binding.md §7.3): block chosen attention edges in a window of layers, slid over depth,
and measure the accuracy lost (windowed knockout after Geva et al. 2023).

Edge sets (query position -> key positions) on the token format:
    K1 query -> context colours          K4 e_i -> a_i (binding formation)
    K2 query -> context shapes           K5 association item -> its shape
    K3 query -> association tokens       K6 association shape -> context shapes (look-back)
Blocked edges get -inf before the softmax on all heads (stitchkit.vlm.attention.AttentionKnockout), in layers
[l, l + window) for every start l. Accuracy is the argmax over the whole vocabulary, as in evaluation.

Each window also measures the interchange-intervention outcome shares (§7.1) at one read-out layer (default
l = L - 1, where R is reported) with the knockout active on the counterfactual forward and on the patched one,
and their change against the same pairs without it: which mechanism the blocked edges carry.
"""

from __future__ import annotations

import torch

from stitchkit.binding.interventions import OUTCOMES, correct_pairs, patch_outcomes, ratio_layer
from stitchkit.binding.subjects import TokenSubject
from stitchkit.binding.task import Encoded, encode_text, example_rng, sample_example
from stitchkit.errors import ConfigError
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
    """(B, S, S) bool: the edges of set `name` in each of B examples of one length."""
    length = len(encoded[0].input_ids) if encoded else 0
    mask = torch.zeros(len(encoded), length, length, dtype=torch.bool)
    for row, enc in enumerate(encoded):
        for q, k in edges(enc, name):
            mask[row, q, k] = True
    return mask


def read_out_layer(label_layer: int | None, layers: int, name: str = "knockout_label_layer") -> int:
    """The layer the knockouts' intervention outcomes are read at: `label_layer`, or L - 1 (ratio_layer) if None;
    one out of 0..L is refused, naming the option `name`."""
    if label_layer is None:
        return ratio_layer(layers)
    if not 0 <= label_layer <= layers:
        raise ConfigError(f"{name} {label_layer}: this model has layers 0..{layers} (L = resid_post)")
    return label_layer


@torch.no_grad()
def run_knockouts(
    model, n: int = 8, examples: int = 500, seed: int = 0, window: int = 3, sets=tuple(EDGE_SETS),
    pairs: int = 1000, label_layer: int | None = None,
) -> dict:  # fmt: skip
    """Accuracy (over `examples` examples) and intervention outcome shares at `label_layer` (over the pairs of
    run_interventions with the same n, pairs and seed) with each edge set knocked out in each window, next to
    the unmodified model's."""
    install_attention(model.lm)
    vocab, device = model.vocab, next(model.parameters()).device
    encoded = [encode_text(sample_example(example_rng(seed, "knockouts", n, i), n, vocab), vocab) for i in range(examples)]
    ids = torch.tensor([e.input_ids for e in encoded], device=device)
    targets = torch.tensor([e.target for e in encoded], device=device)
    layers = model.settings.layers
    window = min(window, layers)
    label_layer = read_out_layer(label_layer, layers)
    subject = TokenSubject(model, vocab)
    kept, _, _ = correct_pairs(subject, n, pairs, seed)
    pair_layouts = [encode_text(p.orig, vocab) for p in kept]  # the cf has the same layout: one mask serves both

    def accuracy(knockout: AttentionKnockout | None) -> float:
        logits = model.run(ids, attention_knockout=knockout).logits[:, -1]
        return float((logits.argmax(-1) == targets).float().mean())

    def labels(knockout: AttentionKnockout | None) -> dict[str, float]:
        row = patch_outcomes(subject, kept, [label_layer], knockout, description=None)[0]
        return {o: row[o] for o in OUTCOMES}

    base, base_labels = accuracy(None), labels(None)
    rows = []
    masks = {name: (blocked_mask(encoded, name).to(device), blocked_mask(pair_layouts, name).to(device)) for name in sets}
    windows = [(name, start) for name in sets for start in range(layers - window + 1)]
    for name, start in track(windows, description=f"knockouts N={n}"):
        span = frozenset(range(start, start + window))
        acc = accuracy(AttentionKnockout(span, masks[name][0]))
        shares = labels(AttentionKnockout(span, masks[name][1]))
        rows.append({"set": name, "start": start, "layers": [start, start + window - 1], "accuracy": acc, "delta": acc - base,
                     "labels": shares, "labels_delta": {o: shares[o] - base_labels[o] for o in OUTCOMES}})  # fmt: skip
    return {
        "n": n, "examples": examples, "window": window, "baseline": base, "edge_sets": {k: EDGE_SETS[k] for k in sets},
        "label_layer": label_layer, "pairs": len(kept), "labels_baseline": base_labels, "windows": rows,
    }  # fmt: skip
