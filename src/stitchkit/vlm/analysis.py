"""Inter- vs intra-image attention (MIMIC's attention analysis, mimic.md §9), one N x N matrix per layer.

For every layer l, attention probabilities are averaged over heads; for each vision query q of image i
its weights on vision keys are renormalised to sum to 1, w(q, .); then

    A_l[i, j] = mean over q in image i of  sum over k in image j of w(q, k)

(A_l[i, j] = 0 for j > i under causality). intra_l = mean over i >= 1 of A_l[i, i] (image 0 can only see
itself) and inter_l = 1 - intra_l. The density-corrected variant first divides each block's mass by the
number of that block's keys the query can see, so uniform attention gives equal mass to every visible
image. Matrices are averaged per sample, then over samples.

Each layer's probabilities are reduced as soon as they are computed (in query chunks, inside the
attention call), so no more than one chunk of one layer's attention map exists at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from stitchkit.errors import InputError
from stitchkit.vlm.model import VLM, VLMBatch


@dataclass
class AttentionAnalysis:
    matrices: torch.Tensor  # (L, N, N) A_l, mean over samples
    density_matrices: torch.Tensor  # (L, N, N) the density-corrected variant
    samples: int

    @property
    def intra(self) -> torch.Tensor:
        """(L,) mean over images i >= 1 of A_l[i, i]."""
        diagonal = self.matrices.diagonal(dim1=1, dim2=2)[:, 1:]
        return diagonal.mean(-1)

    @property
    def inter(self) -> torch.Tensor:
        return 1 - self.intra

    @property
    def density_intra(self) -> torch.Tensor:
        return self.density_matrices.diagonal(dim1=1, dim2=2)[:, 1:].mean(-1)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "intra": self.intra.tolist(),
            "inter": self.inter.tolist(),
            "density_intra": self.density_intra.tolist(),
            "matrices": self.matrices.tolist(),
            "density_matrices": self.density_matrices.tolist(),
        }


class _Accumulator:
    """The probe: reduces each chunk of probabilities to per-row (L, N, N) sums and query counts."""

    def __init__(self, batch: VLMBatch, num_layers: int, n_images: int, device):
        rows, seq = batch.input_ids.shape
        self.n = n_images
        self.image_of = torch.full((rows, seq), -1, dtype=torch.long)
        for row, spans in enumerate(batch.spans):
            for j, span in enumerate(spans):
                self.image_of[row, span.start : span.end] = j
        self.image_of = self.image_of.to(device)
        keys = torch.nn.functional.one_hot(self.image_of.clamp_min(0), n_images).float() * (self.image_of >= 0)[..., None]
        self.keys = keys  # (B, S, N) which image each key belongs to
        self.visible = keys.cumsum(1)  # (B, S, N) keys of each image at or before each position
        self.sums = torch.zeros(rows, num_layers, n_images, n_images, device=device)
        self.density_sums = torch.zeros_like(self.sums)
        self.counts = torch.zeros(rows, num_layers, n_images, device=device)

    def __call__(self, layer: int, probs: torch.Tensor, q0: int) -> None:
        q1 = q0 + probs.shape[2]
        mass = torch.matmul(probs.mean(1), self.keys)  # (B, q, N): head-averaged mass on each image's tokens
        weights = _normalise(mass)
        density = _normalise(mass / self.visible[:, q0:q1].clamp_min(1) * (self.visible[:, q0:q1] > 0))
        queries = torch.nn.functional.one_hot(self.image_of[:, q0:q1].clamp_min(0), self.n).float()
        queries = queries * (self.image_of[:, q0:q1] >= 0)[..., None]  # (B, q, N) which image each query is in
        self.sums[:, layer] += torch.einsum("bqi,bqj->bij", queries, weights)
        self.density_sums[:, layer] += torch.einsum("bqi,bqj->bij", queries, density)
        self.counts[:, layer] += queries.sum(1)

    def per_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.counts.clamp_min(1)[..., None]
        return self.sums / counts, self.density_sums / counts


def _normalise(mass: torch.Tensor) -> torch.Tensor:
    total = mass.sum(-1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(1e-30), torch.zeros_like(mass))


@torch.no_grad()
def attention_analysis(
    vlm: VLM,
    samples: Iterable[tuple[Sequence, str]],
    batch_size: int = 1,
) -> AttentionAnalysis:
    """A_l for samples of (images, prompt), all with the same number N >= 2 of images, under the VLM's
    current attention policy and pooling (a masked layer shows its masked attention)."""
    samples = list(samples)
    if not samples:
        raise InputError("attention analysis needs at least one sample")
    n_images = {len(images) for images, _ in samples}
    if len(n_images) != 1 or min(n_images) < 2:
        raise InputError(f"every sample must have the same number (>= 2) of images, got {sorted(n_images)}")
    n = n_images.pop()
    total = torch.zeros(vlm.num_layers, n, n)
    density_total = torch.zeros_like(total)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = vlm.encode([images for images, _ in chunk], [prompt for _, prompt in chunk]).to(vlm.device)
        accumulator = _Accumulator(batch, vlm.num_layers, n, vlm.device)
        vlm.forward(batch, probe=accumulator)
        matrices, density = accumulator.per_row()
        total += matrices.sum(0).cpu()
        density_total += density.sum(0).cpu()
    return AttentionAnalysis(total / len(samples), density_total / len(samples), len(samples))
