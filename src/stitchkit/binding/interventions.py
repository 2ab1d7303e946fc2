"""Interchange interventions (binding.md §7.1-7.2): which binding mechanism carries the query at each layer.

Counterfactual construction (our adapted form of Gur-Arieh et al.'s, r != s enforced, N >= 4). Object q is
queried in the original; pick q2 != q, s not in {q, q2}, r not in {q, q2, s}. The counterfactual swaps the shapes
of objects q2 and s and the colours of q2 and r, and queries object q2, whose colour is the original's colour r.
The associations (shape -> item map and its order) are the same text in both. Labels, as items of the ORIGINAL:

    positional = T(shape[q2])   the cf query's ordinal position, carried over
    symbolic   = T(shape[r])    the cf query's colour, looked up in the original context
    reflexive  = T(shape[s])    the cf's own answer, copied over
    no_effect  = T(shape[q])    the original answer

Patching overwrites the residual stream entering block l (resid_pre; l = L is the final resid_post) at the last
token (the query colour) with the cf's value, then runs the original. The prediction is the argmax over the N
association items; it is classified positional -> symbolic -> reflexive -> no_effect (the four are distinct by
construction), anything else `mixed`, whose ordinal offset q2 - index(prediction) is logged.

Symbolic / positional ratio per layer: R_l = p_sym(l) / max(p_pos(l), 1 / n_pairs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from stitchkit.binding.subjects import Subject, capture_residuals, forward_patched
from stitchkit.binding.task import Example, example_rng, replace, sample_example
from stitchkit.errors import ConfigError
from stitchkit.progress import track

LABELS = ("positional", "symbolic", "reflexive", "no_effect")
OUTCOMES = (*LABELS, "mixed")


@dataclass(frozen=True)
class Pair:
    orig: Example
    cf: Example
    q2: int
    r: int
    s: int

    @property
    def labels(self) -> dict[str, int]:
        """Each mechanism's predicted item."""
        items = self.orig.items
        return {"positional": items[self.q2], "symbolic": items[self.r], "reflexive": items[self.s], "no_effect": items[self.orig.query]}

    def classify(self, item: int) -> str:
        for label, predicted in self.labels.items():
            if item == predicted:
                return label
        return "mixed"


def make_pair(rng: np.random.Generator, orig: Example) -> Pair:
    if orig.n < 4:
        raise ConfigError(f"interchange interventions need contexts of >= 4 objects, got {orig.n}")
    q = orig.query
    others = lambda *taken: [i for i in range(orig.n) if i not in taken]  # noqa: E731
    q2 = int(rng.choice(others(q)))
    s = int(rng.choice(others(q, q2)))
    r = int(rng.choice(others(q, q2, s)))
    colours, shapes, items = list(orig.colours), list(orig.shapes), list(orig.items)
    shapes[q2], shapes[s] = shapes[s], shapes[q2]
    items[q2], items[s] = items[s], items[q2]  # the items travel with their shapes: associations unchanged
    colours[q2], colours[r] = colours[r], colours[q2]
    swap = {q2: s, s: q2}
    order = tuple(swap.get(i, i) for i in orig.order)  # the same (shape, item) sequence as the original
    cf = replace(orig, colours=tuple(colours), shapes=tuple(shapes), items=tuple(items), order=order, query=q2)
    return Pair(orig, cf, q2, r, s)


def sample_pairs(n: int, count: int, seed: int, subject: Subject) -> list[Pair]:
    pairs = []
    for i in range(count):
        rng = example_rng(seed, "interventions", n, i)
        pairs.append(make_pair(rng, sample_example(rng, n, subject.vocab)))
    return pairs


def _restricted_prediction(subject: Subject, logits: torch.Tensor, examples: list[Example]) -> list[int]:
    """The item (of each example's N association items) with the highest logit."""
    candidates = torch.tensor([[subject.item_token(t) for t in ex.items] for ex in examples], device=logits.device)
    best = logits.gather(1, candidates).argmax(dim=1).tolist()
    return [ex.items[b] for ex, b in zip(examples, best)]


def run_interventions(subject: Subject, n: int = 8, pairs: int = 1000, seed: int = 0, batch_size: int = 64) -> dict:
    """Outcome shares per layer (0..L, L = resid_post) over pairs the unpatched model gets right on both sides.
    Up to 4x `pairs` candidates are drawn to find `pairs` such pairs."""
    kept: list[Pair] = []
    candidates = sample_pairs(n, 4 * pairs, seed, subject)
    examined = 0
    counts = [Counter() for _ in range(subject.layers + 1)]
    offsets = [Counter() for _ in range(subject.layers + 1)]
    for start in track(range(0, len(candidates), batch_size), description=f"interventions N={n}"):
        if len(kept) >= pairs:
            break
        batch = candidates[start : start + batch_size]
        examined += len(batch)
        orig_ids = torch.tensor([subject.encode(p.orig) for p in batch])
        cf_ids = torch.tensor([subject.encode(p.cf) for p in batch])
        cf_resid, cf_logits = capture_residuals(subject, cf_ids)
        with torch.no_grad():
            orig_logits = subject.forward(orig_ids.to(subject.device))[:, -1]
        orig_pred = _restricted_prediction(subject, orig_logits, [p.orig for p in batch])
        cf_pred = _restricted_prediction(subject, cf_logits, [p.orig for p in batch])
        good = [i for i, p in enumerate(batch) if orig_pred[i] == p.orig.answer and cf_pred[i] == p.cf.answer]
        good = good[: pairs - len(kept)]
        if not good:
            continue
        kept += [batch[i] for i in good]
        rows = torch.tensor(good)
        for site in range(subject.layers + 1):
            logits = forward_patched(subject, orig_ids[rows], site, cf_resid[site][rows.to(cf_resid[site].device), -1])
            for pair, item in zip([batch[i] for i in good], _restricted_prediction(subject, logits, [batch[i].orig for i in good])):
                outcome = pair.classify(item)
                counts[site][outcome] += 1
                if outcome == "mixed":
                    offsets[site][pair.q2 - pair.orig.items.index(item)] += 1
    total = len(kept)
    layers = []
    for site in range(subject.layers + 1):
        shares = {o: counts[site][o] / total if total else 0.0 for o in OUTCOMES}
        layers.append(
            {
                "layer": site,
                "site": "resid_post" if site == subject.layers else "resid_pre",
                **shares,
                "ratio": symbolic_positional_ratio(shares["symbolic"], shares["positional"], total),
                "mixed_offsets": {str(k): v for k, v in sorted(offsets[site].items())},
            }
        )
    return {"n": n, "pairs": total, "candidates": examined, "layers": layers}


def symbolic_positional_ratio(p_symbolic: float, p_positional: float, pairs: int) -> float:
    return p_symbolic / max(p_positional, 1 / max(pairs, 1))


def peak_layer(layers: list[dict]) -> int:
    """The layer where positional + symbolic effects are largest (§7.2: the peak of a base LLM)."""
    return max(layers, key=lambda row: row["positional"] + row["symbolic"])["layer"]
