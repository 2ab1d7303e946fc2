"""Token bookkeeping between two ViTs: prefix tokens (CLS, registers) and patch grids (reference spec §5).

Prefix policy (the paper does not say how it handles prefix tokens; this is the spec's proposal):
    map        target CLS <- S(source CLS) and target register j <- S(source register j) where the source
               has one; every other target prefix slot is learnable (mean-initialised); source prefix
               tokens the target has no slot for are dropped. This reproduces every row of spec §5's table.
    learnable  every target prefix slot is learnable; all source prefix tokens are dropped.
    drop       no prefix tokens enter the target (only for targets without prefix tokens, e.g. SigLIP).
Slot 0 is the CLS token in every model that has prefix tokens; slots 1.. are registers.

Grid policy: identity (grids must match) or resample (bilinear with antialias, or adaptive average pooling),
on the (B, d, H, W) view of row-major patch tokens. Resample before S when downsampling (fewer tokens through
S), after S when upsampling.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stitchkit.errors import IncompatibleError

PrefixPolicy = Literal["map", "learnable", "drop"]
GridPolicy = Literal["identity", "bilinear", "avgpool"]


def check_prefix_policy(policy: str, target_prefix: int, target: str = "the target") -> None:
    """Refuse a prefix policy that cannot feed this target. PrefixBridge calls it when built, and the sweep and
    the tree for every pair before anything is written or trained (model.check_joinable), naming the pair."""
    if policy not in ("map", "learnable", "drop"):
        raise IncompatibleError(f"prefix_policy: unknown policy {policy!r}; choose map, learnable or drop")
    if policy == "drop" and target_prefix:
        raise IncompatibleError(
            f"prefix_policy: 'drop' feeds the target no prefix tokens, but {target} reads {target_prefix} "
            "(its readout uses the CLS token); use 'map' or 'learnable'"
        )


def check_grid_policy(policy: str, source_grid, target_grid, pair: str = "source → target") -> None:
    """Refuse a grid policy that cannot join these patch grids (GridAdapter when built; the sweep and the tree
    for every pair beforehand, with `pair` naming the models and their resolutions)."""
    if policy not in ("identity", "bilinear", "avgpool"):
        raise IncompatibleError(f"grid_policy: unknown policy {policy!r}; choose identity, bilinear or avgpool")
    if policy == "identity" and tuple(source_grid) != tuple(target_grid):
        source_side, target_side = ("x".join(map(str, grid)) for grid in (source_grid, target_grid))
        raise IncompatibleError(
            f"grid_policy: 'identity' needs equal patch grids, but {pair} joins a {source_side} grid to a "
            f"{target_side} grid; set grid_policy to bilinear or avgpool, or choose resolutions (image_size) that "
            "give one grid"
        )


class PrefixBridge(nn.Module):
    """Builds the target's prefix tokens from the (already stitched) source prefix tokens and learnable slots."""

    # The learnable tokens start at the mean of the target's own (init_learnable); weight decay would pull them
    # toward 0 instead (the engine reads this; timm exempts its cls/reg tokens alike).
    no_weight_decay = ("tokens",)

    def __init__(self, source_prefix: int, target_prefix: int, dim: int, policy: PrefixPolicy = "map"):
        super().__init__()
        check_prefix_policy(policy, target_prefix)
        self.source_prefix, self.target_prefix, self.policy = source_prefix, target_prefix, policy
        # For every target slot: the source slot it copies, or -1 for a learnable slot.
        self.sources = [j if policy == "map" and j < source_prefix else -1 for j in range(target_prefix)]
        self.learnable_slots = [j for j, s in enumerate(self.sources) if s < 0]
        self.tokens = nn.Parameter(torch.zeros(len(self.learnable_slots), dim)) if self.learnable_slots else None

    def init_learnable(self, target_prefix_mean: torch.Tensor) -> None:
        """Initialise learnable slots from the mean of the target's own prefix tokens at the stitch point (P_t, d)."""
        if self.tokens is not None:
            with torch.no_grad():
                self.tokens.copy_(target_prefix_mean[self.learnable_slots].to(self.tokens.dtype))

    def forward(self, stitched_prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        if not self.target_prefix:
            return patches
        batch = patches.shape[0]
        slots, learned = [], iter(range(len(self.learnable_slots)))
        for source_slot in self.sources:
            if source_slot >= 0:
                slots.append(stitched_prefix[:, source_slot])
            else:
                slots.append(self.tokens[next(learned)].to(patches.dtype).expand(batch, -1))
        return torch.cat([torch.stack(slots, dim=1), patches], dim=1)

    def describe(self) -> str:
        parts = [f"S(src[{s}])" if s >= 0 else "learnable" for s in self.sources]
        return ", ".join(parts) if parts else "none"


class GridAdapter(nn.Module):
    """Resamples row-major patch tokens (B, h*w, d) from the source grid to the target grid."""

    def __init__(self, source_grid: tuple[int, int], target_grid: tuple[int, int], policy: GridPolicy = "identity"):
        super().__init__()
        self.source_grid, self.target_grid = tuple(source_grid), tuple(target_grid)
        check_grid_policy(policy, self.source_grid, self.target_grid)
        self.policy = policy

    @property
    def is_identity(self) -> bool:
        return self.source_grid == self.target_grid

    @property
    def downsamples(self) -> bool:
        return self.target_grid[0] * self.target_grid[1] < self.source_grid[0] * self.source_grid[1]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return patches
        batch, count, dim = patches.shape
        height, width = self.source_grid
        if count != height * width:
            raise IncompatibleError(f"expected {height}x{width}={height * width} patch tokens, got {count}")
        image = patches.transpose(1, 2).reshape(batch, dim, height, width)
        if self.policy == "avgpool":
            image = F.adaptive_avg_pool2d(image, self.target_grid)
        else:
            image = F.interpolate(image, size=self.target_grid, mode="bilinear", align_corners=False, antialias=True)
        return image.flatten(2).transpose(1, 2)
