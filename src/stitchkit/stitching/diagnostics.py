"""Diagnostics for a trained stitch (reference spec §2 "Metrics" and "Prediction overlap").

Feature distances explain *why* an objective works: LFM reaches a tiny error at the stitch point (D_n) that the
frozen target layers amplify into a large error at the end (D_fin), worst at shallow points; FFM keeps both low.
Distances are also given relative to the target's own variance, because feature scales differ between models.

Prediction overlap compares the stitched model with both constituents (each a linear probe on its own pooled
feature): rescue = both constituents wrong and the stitch right; interference = both right and the stitch wrong.
"""

from __future__ import annotations

import itertools

import torch


class DistanceMeter:
    """Accumulates the mean squared distance and the target's variance over batches, in float64.

    relative = D / Var(target), with Var the mean over channels of the variance over samples and tokens; 1.0 means
    "no better than predicting the target's mean token".
    """

    def __init__(self):
        self.count = 0
        self.squared_error = 0.0
        self.sum = None
        self.sum_squares = None

    def update(self, predicted: torch.Tensor, reference: torch.Tensor) -> None:
        predicted = predicted.detach().double().reshape(-1, predicted.shape[-1])
        reference = reference.detach().double().reshape(-1, reference.shape[-1])
        self.squared_error += (predicted - reference).pow(2).sum().item()
        batch_sum, batch_squares = reference.sum(0), reference.pow(2).sum(0)
        self.sum = batch_sum if self.sum is None else self.sum + batch_sum
        self.sum_squares = batch_squares if self.sum_squares is None else self.sum_squares + batch_squares
        self.count += reference.shape[0]

    def result(self) -> dict[str, float]:
        if not self.count:
            return {"distance": float("nan"), "relative": float("nan")}
        width = self.sum.numel()
        distance = self.squared_error / (self.count * width)
        mean = self.sum / self.count
        variance = (self.sum_squares / self.count - mean.pow(2)).clamp_min(0).mean().item()
        return {"distance": distance, "relative": distance / variance if variance > 0 else float("nan")}


OVERLAP_KEYS = tuple("".join(bits) for bits in itertools.product("01", repeat=3))


def prediction_overlap(source_correct, target_correct, stitched_correct) -> dict[str, int]:
    """The 2x2x2 correct/incorrect table over (source probe, target probe, stitched), plus rescue/interference.

    Keys 'sts' are bits for source, target, stitched (1 = correct), e.g. '001' = only the stitch is right.
    Inputs are boolean arrays over the same samples (or pixels).
    """
    s, t, x = (torch.as_tensor(v).bool().reshape(-1) for v in (source_correct, target_correct, stitched_correct))
    code = s.long() * 4 + t.long() * 2 + x.long()
    counts = torch.bincount(code, minlength=8).tolist()
    table = {key: int(count) for key, count in zip(OVERLAP_KEYS, counts)}
    table["rescue"] = table["001"]
    table["interference"] = table["110"]
    return table
