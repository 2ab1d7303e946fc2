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

Shares over a handful of pairs mean nothing, and a model that answers so few candidates right on both sides has
not learned the task at that N: below MIN_PAIRS pairs (`enough_pairs`) reports show "n/a (k of M pairs)" instead
of shares and R, leave the run out of mean R, and give no peak layer.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from stitchkit.binding.subjects import Subject, capture_residuals, forward_patched
from stitchkit.binding.task import Example, example_rng, replace, sample_example
from stitchkit.errors import ConfigError
from stitchkit.progress import track

if TYPE_CHECKING:
    from stitchkit.vlm.attention import AttentionKnockout

LABELS = ("positional", "symbolic", "reflexive", "no_effect")
OUTCOMES = (*LABELS, "mixed")
MIN_PAIRS = 20  # fewest pairs whose shares are reported (each pair then moves a share by at most 5 points)


@dataclasses.dataclass(frozen=True)
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
    """Outcome shares per layer (0..L, L = resid_post) over pairs the unpatched model gets right on both sides;
    `requested` the pairs asked for, `candidates` those examined, `accuracy` the share of their originals the
    model answers right among the N items."""
    kept, examined, right = correct_pairs(subject, n, pairs, seed, batch_size)
    layers = patch_outcomes(subject, kept, range(subject.layers + 1), batch_size=batch_size, description=f"interventions N={n}")
    return {"n": n, "pairs": len(kept), "requested": pairs, "candidates": examined, "accuracy": right / max(examined, 1), "layers": layers}


def enough_pairs(interventions: dict) -> bool:
    """Whether an interventions result rests on enough pairs to report its shares: MIN_PAIRS, or every pair asked
    for when fewer were (results from before `requested` was recorded count as asking for MIN_PAIRS)."""
    return interventions["pairs"] >= min(MIN_PAIRS, interventions.get("requested", MIN_PAIRS))


def pairs_note(interventions: dict) -> str:
    """ "k of M pairs", M the pairs asked for ("k pairs" for results from before that was recorded)."""
    requested = interventions.get("requested")
    return f"{interventions['pairs']} of {requested} pairs" if requested else f"{interventions['pairs']} pairs"


def not_learned_warning(interventions: dict, model: str) -> str:
    """The one line that says why a result's shares are n/a."""
    return (f"{model} answers only {interventions['pairs']} of {interventions['candidates']} candidate pairs right on both sides "
            f"at N = {interventions['n']}: it has not learned the task at that N, so its mechanism shares are not "
            f"meaningful (n/a; fewer than {MIN_PAIRS} pairs)")


def correct_pairs(subject: Subject, n: int, pairs: int, seed: int, batch_size: int = 64) -> tuple[list[Pair], int, int]:
    """Up to `pairs` pairs the unmodified model answers right (among the N items) on both sides, drawn from up to
    4x as many candidates; how many candidates were examined, and on how many of them the original was right."""
    candidates = sample_pairs(n, 4 * pairs, seed, subject)
    kept: list[Pair] = []
    examined = right = 0
    for start in track(range(0, len(candidates), batch_size), description=f"pairs N={n}"):
        if len(kept) >= pairs:
            break
        batch = candidates[start : start + batch_size]
        examined += len(batch)
        with torch.no_grad():
            orig_pred = _restricted_prediction(subject, subject.forward(_ids(subject, [p.orig for p in batch]))[:, -1], [p.orig for p in batch])
            cf_pred = _restricted_prediction(subject, subject.forward(_ids(subject, [p.cf for p in batch]))[:, -1], [p.orig for p in batch])
        right += sum(o == p.orig.answer for p, o in zip(batch, orig_pred))
        good = [p for p, o, c in zip(batch, orig_pred, cf_pred) if o == p.orig.answer and c == p.cf.answer]
        kept += good[: pairs - len(kept)]
    return kept, examined, right


def patch_outcomes(
    subject: Subject, pairs: list[Pair], layers: Iterable[int], knockout: AttentionKnockout | None = None,
    batch_size: int = 64, description: str | None = "interventions",
) -> list[dict]:  # fmt: skip
    """Outcome shares (and R, and the mixed outcomes' offsets) per patched layer over `pairs`.

    `knockout` (§7.3; `blocked` has one row per pair) is active on the cf forward whose residuals are patched
    in and on the patched forward, so the outcomes show the mechanism with those edges blocked; orig and cf
    share one token layout, hence one mask. The pairs stay those the unmodified model gets right.
    description: the progress bar's, or None for no bar of its own (a caller looping over many calls has one)."""
    layers = list(layers)
    if any(not 0 <= site <= subject.layers for site in layers):
        raise ConfigError(f"patched layers {layers}: this model has layers 0..{subject.layers}")
    counts = {site: Counter() for site in layers}
    offsets = {site: Counter() for site in layers}
    starts = range(0, len(pairs), batch_size)
    for start in starts if description is None else track(starts, description=description):  # None: the caller's bar
        batch = pairs[start : start + batch_size]
        extra = {} if knockout is None else {"attention_knockout": dataclasses.replace(knockout, blocked=knockout.blocked[start : start + batch_size])}
        cf_resid, _ = capture_residuals(subject, _ids(subject, [p.cf for p in batch]), **extra)
        orig_ids = _ids(subject, [p.orig for p in batch])
        for site in layers:
            logits = forward_patched(subject, orig_ids, site, cf_resid[site][:, -1], **extra)
            for pair, item in zip(batch, _restricted_prediction(subject, logits, [p.orig for p in batch])):
                outcome = pair.classify(item)
                counts[site][outcome] += 1
                if outcome == "mixed":
                    offsets[site][pair.q2 - pair.orig.items.index(item)] += 1
    total = len(pairs)
    rows = []
    for site in layers:
        shares = {o: counts[site][o] / total if total else 0.0 for o in OUTCOMES}
        rows.append(
            {
                "layer": site,
                "site": "resid_post" if site == subject.layers else "resid_pre",
                **shares,
                "ratio": symbolic_positional_ratio(shares["symbolic"], shares["positional"], total),
                "mixed_offsets": {str(k): v for k, v in sorted(offsets[site].items())},
            }
        )
    return rows


def _ids(subject: Subject, examples: list[Example]) -> torch.Tensor:
    return torch.tensor([subject.encode(ex) for ex in examples], device=subject.device)


def symbolic_positional_ratio(p_symbolic: float, p_positional: float, pairs: int) -> float:
    return p_symbolic / max(p_positional, 1 / max(pairs, 1))


def ratio_layer(layers: int) -> int:
    """Where R is reported: the last block's input, l = L - 1 (the paper's l = 11 of 12 layers)."""
    return layers - 1


def peak_layer(layers: list[dict]) -> int | None:
    """The layer where positional + symbolic effects are largest (§7.2: the peak of a base LLM); None when they
    are 0 at every layer, where an argmax would name the first layer for no reason."""
    peak = max(layers, key=lambda row: row["positional"] + row["symbolic"])
    return peak["layer"] if peak["positional"] + peak["symbolic"] > 0 else None
