"""The auxiliary analyses of visual_stitching.md §5, optional parts of `stitchkit patches run` (config `analyses:`).

Patch localization (Fig. 4): before fine-tuning, the rank of the image's true name among all names given ONE
patch with the recognition prompt, ranked exactly as the recognition pre-check ranks a full image
(`evaluate.rank_true_names`: first-token logit, or full log-probability where names share a first token); the
mean over all patches of a split factor. Near 0: single patches already tell which image they come from.

Threshold-x (Fig. 5; the paper released no code for it): before fine-tuning, drop the patches whose true name
already ranks below x given the patch alone (rank < x: patches that by themselves reveal their image), then train
on the rest and evaluate as usual. x = 0 keeps every patch; with mid ties a rank may be a half-integer, and a
patch at rank 0.5 is dropped at x = 1 and kept at x = 0.

Steps of the run folder (experiment.py runs them):

    localization/<set>/f<f>.json            every patch's ranks at that split (computed once; Threshold-x reads them)
    threshold/<set>/x<x>/f<f>/seed<s>/      one fine-tuning on the kept patches, laid out as train/<set>/f<f>/seed<s>/

A threshold that drops no patch (x = 0 always) would train exactly what train/<set>/f<f>/seed<s>/ trains (the
same patches in the same order, the same seed), so its results are read from there instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stitchkit.patches.evaluate import EvalItem, TieRule, rank_true_names

LOCALIZATION_SUMMARY = ("patches", "mean_rank", "rule", "mean_ranks", "random")


def reference_names(images) -> list[str]:
    """The candidates of a recognition ranking: every image's name with its leading space (the response ` {name}`)."""
    return [f" {row['name']}" for row in images]


def patch_name(row: dict[str, Any]) -> str:
    """`<key>-<row>_<col>`: the official patch file stem (dataset.py), which names a patch in the records."""
    return f"{row['key']}-{row['row']}_{row['col']}"


def patch_localization(vlm, images, patches, prompt: str, ties: TieRule = "mid") -> dict[str, Any]:
    """§5, Fig. 4: the rank of each patch's true name among all `images`' names, given that patch alone with the
    recognition `prompt`; `mean_rank` averages over the patches (`rank_true_names` picks the ranking rule)."""
    gold = {row["key"]: i for i, row in enumerate(images)}
    items = [EvalItem(patch_name(p), "patch", [p["image"]], prompt, gold[p["key"]]) for p in patches]
    return {"patches": len(items), **rank_true_names(vlm, items, reference_names(images), ties)}


def patch_ranks(localization: dict[str, Any]) -> dict[str, float]:
    """{patch name: rank of its true name} under the rule the localization's mean rank uses."""
    field = f"rank_{localization['rule']}"
    return {record["key"]: record[field] for record in localization["records"]}


def threshold_keeps(ranks: Sequence[float], x: float) -> list[bool]:
    """Threshold-x (§5, Fig. 5): keep a patch unless its true name already ranks below x given the patch alone,
    i.e. keep iff rank >= x. x = 0 keeps every patch; larger x drops the patches that reveal their image."""
    return [rank >= x for rank in ranks]


def localization_summary(localization: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of a localization step (the per-patch records stay in its own file)."""
    return {key: localization[key] for key in LOCALIZATION_SUMMARY}
