"""Mean rank of the true answer among all candidates (visual_stitching.md §4).

Every item is one prompt (a full image with the training prompt: image-based; a text reference alone:
reference-based) and one gold candidate among K. The prompt runs once (`VLM.score`); each candidate c gets
s_c, either the logit of its first token right after the prompt (the official code's ranking) or its full
log-probability log p(c | prompt) (the paper's wording). The rank of the gold g is

    strict:  #{c : s_c > s_g}                                   (the official argsort when nothing ties)
    mid:     #{c : s_c > s_g} + 1/2 #{c != g : s_c = s_g}       (default: keeps the random baseline at (K-1)/2)

and the mean rank averages it over items; lower is better, a random ranking gives (K - 1) / 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stitchkit.patches.ids import check_first_tokens, first_token_clashes

TieRule = Literal["mid", "strict"]
MODES = ("image", "reference")
SCORINGS = ("logit", "logprob")  # first-token logit, full-sequence log-probability


def rank_of(scores: Sequence[float], gold: int, ties: TieRule = "mid") -> float:
    """The 0-based rank of scores[gold] when scores are sorted from high to low (visual_stitching.md §4 step 4)."""
    s = np.asarray(scores, dtype=np.float64)
    higher = int((s > s[gold]).sum())
    if ties == "strict":
        return float(higher)
    equal = int((s == s[gold]).sum()) - 1
    return higher + equal / 2


def random_baseline(k: int) -> float:
    """Expected rank of the gold under a uniformly random order of k candidates: (k - 1) / 2."""
    return (k - 1) / 2


def gold_probability(first_token_logits: Sequence[float], gold: int) -> float:
    """exp(s_g) / sum_c exp(s_c): the softmax over the candidates' first-token logits only (§4 step 5)."""
    s = np.asarray(first_token_logits, dtype=np.float64)
    s = s - s.max()
    return float(math.exp(s[gold]) / np.exp(s).sum())


@dataclass(frozen=True)
class EvalItem:
    key: str
    mode: str  # "image" | "reference" | any label the caller groups by
    images: list[Any]
    prompt: str
    gold: int  # index into the candidates


def score_items(
    vlm, items: Sequence[EvalItem], candidates: Sequence[str], ties: TieRule = "mid", require_distinct_first_tokens: bool = True
) -> list[dict[str, Any]]:
    """One record per item: ranks by first-token logit and by full log-probability, the gold's probability,
    and the candidate the first-token logit puts on top. By default candidates whose first tokens clash are
    refused, as the official evaluator does; require_distinct_first_tokens=False scores them anyway (names
    such as "red star" and "red circle"), and then only the full log-probability tells those apart."""
    if require_distinct_first_tokens:
        check_first_tokens(vlm.tokenizer, candidates)
    records = []
    for item in items:
        scores = vlm.score(item.images, item.prompt, candidates)
        logits = [s.first_token_logit for s in scores]
        logprobs = [s.logprob for s in scores]
        records.append({
            "key": item.key, "mode": item.mode, "gold": candidates[item.gold].strip(),
            "rank_logit": rank_of(logits, item.gold, ties), "rank_logprob": rank_of(logprobs, item.gold, ties),
            "prob": gold_probability(logits, item.gold), "top": candidates[int(np.argmax(logits))].strip(),
        })  # fmt: skip
    return records


def rank_true_names(vlm, items: Sequence[EvalItem], names: Sequence[str], ties: TieRule = "mid") -> dict[str, Any]:
    """The rank of each item's true name among all `names` (leading space included), as the recognition
    pre-check (§1.5, given the full image) and patch localization (§5, given one patch) need it.

    Ranked as the official evaluator ranks (the first-token logit) when the names' first tokens are distinct
    under the tokenizer; otherwise by full log-probability, since names such as "red star" and "red circle"
    share their first token and the logit could not tell them apart. `rule` says which `mean_rank` uses;
    both mean ranks and every item's record are kept."""
    rule = "logprob" if first_token_clashes(vlm.tokenizer, names) else "logit"
    records = score_items(vlm, items, names, ties, require_distinct_first_tokens=False)
    means = {scoring: float(np.mean([r[f"rank_{scoring}"] for r in records])) for scoring in SCORINGS}
    return {"mean_rank": means[rule], "rule": rule, "mean_ranks": means, "random": random_baseline(len(names)), "records": records}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """{"<mode>_<logit|logprob>": mean rank, "<mode>_prob": mean gold probability} over the records."""
    summary = {}
    for mode in dict.fromkeys(r["mode"] for r in records):
        rows = [r for r in records if r["mode"] == mode]
        for field, name in (("rank_logit", "logit"), ("rank_logprob", "logprob"), ("prob", "prob")):
            values = [r[field] for r in rows if field in r]
            if values:
                summary[f"{mode}_{name}"] = float(np.mean(values))
    return summary
