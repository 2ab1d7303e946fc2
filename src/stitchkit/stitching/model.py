"""The stitched model F = head o readout o T_tgt[m+1..N_t] o bridge o R_src[1..n] (Mai et al. 2026, Sec. 3).

Indexing (reference spec §1.1): stitch point n means the source ran blocks 1..n (1-indexed), i.e. its HF
`hidden_states[n]`; the target then runs its blocks m+1..N_t, 0-indexed `blocks[m:]`. When depths are equal
m = n; otherwise m = round(n * N_t / N_s) (proportional depth mapping), or an explicit `target_point`.

The bridge is S followed by the prefix-token and grid policies (tokens.py). Both backbones are frozen and stay
in eval mode; only S, learnable prefix tokens and the head train. The target suffix runs *with* autograd: its
weights are frozen but gradients must flow through it to S.

The model's input is the source hidden state S reads (after block n, or before it for a LoRA stitch, which
runs its own adapted copy of block n). That state depends only on the frozen source prefix, so the protocol
computes it once per image and caches it (cache.py); `forward_pixels` runs the whole thing from images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stitchkit.errors import ConfigError, IncompatibleError
from stitchkit.stitching.objectives import resolve_match_layer
from stitchkit.stitching.tokens import (
    GridAdapter,
    PrefixBridge,
    check_grid_policy,
    check_prefix_policy,
)


def native_grid(backbone) -> tuple[int, int]:
    """The patch grid of a backbone at its own resolution (square images)."""
    side = backbone.image_size // backbone.patch_size
    return side, side


def resolution(backbone) -> str:
    """A backbone's resolution and patch grid, as reports and messages give it: '32 px, patch 8: 4x4 grid'."""
    height, width = native_grid(backbone)
    return f"{backbone.image_size} px, patch {backbone.patch_size}: {height}x{width} grid"


def check_resolution(name: str, backbone) -> None:
    """Refuse a resolution (`image_size.NAME`, or the checkpoint's own) that is not a whole number of patches: below
    one patch the patch embedding cannot run; between multiples the model silently drops the pixels past the last
    whole patch. The sweep and the tree check every model once it is loaded, before writing anything."""
    size, patch = backbone.image_size, backbone.patch_size
    if size < patch:
        raise ConfigError(f"image_size.{name}: {size} px is smaller than {name}'s patch size ({patch} px); "
                          f"use a multiple of {patch}")  # fmt: skip
    if size % patch:
        side = size // patch
        raise ConfigError(
            f"image_size.{name}: {size} px is not a multiple of {name}'s patch size ({patch} px): the model would see "
            f"a {side}x{side} grid and drop {size - side * patch} px of every image; use {side * patch} or {(side + 1) * patch}"
        )


def check_joinable(source_name: str, source, target_name: str, target, *, stitch_kind: str, stitch_field: str,
                   prefix_policy: str, grid_policy: str) -> None:  # fmt: skip
    """Refuse, from the two models' shapes alone, a stitch kind, prefix policy or grid policy that cannot join
    source to target, naming the pair: what building the stitched model would refuse, found before a sweep or a
    tree writes or trains anything (IdentityStitch, PrefixBridge and GridAdapter keep their own checks)."""
    pair = f"{source_name} → {target_name}"
    if stitch_kind == "identity" and source.hidden_size != target.hidden_size:
        raise IncompatibleError(
            f"{stitch_field}: 'identity' cannot join {pair}: {source_name} is {source.hidden_size} wide, "
            f"{target_name} {target.hidden_size}"
        )
    check_prefix_policy(prefix_policy, target.num_prefix_tokens, target=f"{target_name}, the target of {pair},")
    described = " → ".join(f"{name} ({bb.image_size} px, patch {bb.patch_size})" for name, bb in
                           ((source_name, source), (target_name, target)))  # fmt: skip
    check_grid_policy(grid_policy, native_grid(source), native_grid(target), pair=described)


def blank_pixels(backbone) -> torch.Tensor:
    """One black image at the backbone's resolution; block contexts depend only on the pixels' shape."""
    return backbone.preprocess(np.zeros((1, backbone.image_size, backbone.image_size, 3), dtype=np.uint8))


class ContextCache:
    """A backbone's block context (RoPE tables, masks) at its own resolution, built once per device."""

    def __init__(self, backbone):
        self.backbone = backbone
        self._by_device = {}

    def get(self, device) -> object:
        key = str(device)
        if key not in self._by_device:
            with torch.no_grad():
                self._by_device[key] = self.backbone.context(blank_pixels(self.backbone).to(device))
        return self._by_device[key]


def map_depth(point: int, source_blocks: int, target_blocks: int) -> int:
    """Target stitch point for source point n: the same relative depth, at least one target block left."""
    if source_blocks == target_blocks:
        return point
    return min(max(1, round(point * target_blocks / source_blocks)), target_blocks - 1)


def check_point(point: int, blocks: int, field: str = "points") -> None:
    if not isinstance(point, int) or not 1 <= point <= blocks - 1:
        raise ConfigError(
            f"{field}: stitch point {point!r} is out of range; a model with {blocks} blocks can be stitched after "
            f"blocks 1..{blocks - 1} (at least one target block must remain)"
        )


class ClassificationHead(nn.Module):
    """A linear head on the target's own pooled output; truncated-normal (std 0.01) init (spec §1.2)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)


class SegmentationHead(nn.Module):
    """BatchNorm + per-patch linear map (a 1x1 conv) on normed patch tokens, upsampled bilinearly (spec §2)."""

    def __init__(self, dim: int, num_classes: int, grid: tuple[int, int], mask_size: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        self.grid, self.mask_size = tuple(grid), mask_size

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, count, dim = patches.shape
        x = self.norm(patches.reshape(-1, dim).float()).reshape(batch, count, dim)
        logits = self.linear(x).transpose(1, 2).reshape(batch, -1, *self.grid)
        return F.interpolate(logits, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False)


def build_head(task: str, backbone, num_classes: int, mask_size: int | None = None) -> nn.Module:
    if task == "classification":
        return ClassificationHead(backbone.hidden_size, num_classes)
    return SegmentationHead(backbone.hidden_size, num_classes, native_grid(backbone), mask_size)


def readout(backbone, last_tokens: torch.Tensor, task: str) -> torch.Tensor:
    """What a task head reads from a model's last-block tokens: its own pooled output, or its normed patches."""
    if task == "classification":
        return backbone.pool(backbone.final(last_tokens))
    return backbone.final_norm(last_tokens)[:, backbone.num_prefix_tokens :]


def match_features(backbone, tokens: torch.Tensor, normed: bool) -> torch.Tensor:
    """The FFM match layer rho' (spec §7): all tokens, normed by the final norm (every family, CLIP included) or raw."""
    return backbone.final_norm(tokens) if normed else tokens


def sequence_length(backbone) -> int:
    """Tokens a backbone's blocks see at its own resolution: prefix tokens, then the patch grid."""
    grid = native_grid(backbone)
    return backbone.num_prefix_tokens + grid[0] * grid[1]


def readout_token_weights(backbone) -> torch.Tensor:
    """Token weights at the normed last layer (spec §5): patch tokens and the CLS token the target reads out;
    registers weigh 0."""
    weights = torch.ones(sequence_length(backbone))
    weights[1 : backbone.num_prefix_tokens] = 0.0
    return weights


def patch_token_weights(backbone) -> torch.Tensor:
    """Token weights at a raw block: patch tokens only, every prefix token 0. What a multi-encoder MLLM reads
    (LLaVA: `hidden_states[-2][:, 1:]`, spec §4.4), so a prefix token there has no consumer to match for."""
    weights = torch.ones(sequence_length(backbone))
    weights[: backbone.num_prefix_tokens] = 0.0
    return weights


def match_token_weights(backbone, normed: bool) -> torch.Tensor:
    """FFM's token weights at a match layer (spec §7): the last normed output is what a classifier reads (patches
    and CLS, readout_token_weights); a raw block is what an MLLM or the stitch tree reads (patches only)."""
    return readout_token_weights(backbone) if normed else patch_token_weights(backbone)


def check_match_after_point(match_end: int, target_point: int, where: str = "") -> None:
    """FFM matches the target's features after its stitch point: the match block must come later."""
    if match_end <= target_point:
        raise ConfigError(f"match_layer: block {match_end} is not after the target stitch point {target_point}{where}")


class StitchedModel(nn.Module):
    """source blocks 1..n (frozen) -> S -> prefix/grid policy -> target blocks m+1..N (frozen) -> head."""

    def __init__(
        self,
        source,
        target,
        point: int,
        stitch: nn.Module,
        *,
        target_point: int | None = None,
        prefix_policy: str = "map",
        grid_policy: str = "identity",
        head: nn.Module | None = None,
        task: str = "classification",
        match_layer: str | int = "last_normed",
    ):
        super().__init__()
        check_point(point, source.num_blocks)
        self.target_point = map_depth(point, source.num_blocks, target.num_blocks) if target_point is None else target_point
        check_point(self.target_point, target.num_blocks, field="target_point")
        self.source, self.target, self.point, self.task = source, target, point, task
        self.stitch, self.head = stitch, head
        self.grid = GridAdapter(native_grid(source), native_grid(target), grid_policy)
        self.prefix = PrefixBridge(source.num_prefix_tokens, target.num_prefix_tokens, target.hidden_size, prefix_policy)
        self._source_ctx, self._target_ctx = ContextCache(source), ContextCache(target)
        self.match_end, self.match_normed = resolve_match_layer(match_layer, target.num_blocks)
        check_match_after_point(self.match_end, self.target_point)

    @property
    def source_layer(self) -> int:
        """Which source hidden state (HF `hidden_states` index) this model takes as input."""
        return self.point - self.stitch.input_offset

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- the pieces ------------------------------------------------------------------------

    @torch.no_grad()
    def source_hidden(self, source_px) -> torch.Tensor:
        """R_src^{layer}(x): the frozen source prefix, the part the cache replaces."""
        tokens, ctx = self.source.embed(source_px)
        return self.source.run_blocks(tokens, 0, self.source_layer, ctx)

    def bridge(self, hidden: torch.Tensor) -> torch.Tensor:
        """S plus the prefix and grid policies: source tokens at the stitch point -> target block m+1 input."""
        p = self.source.num_prefix_tokens
        resample_first = self.stitch.tokenwise and self.grid.downsamples
        if resample_first:
            hidden = torch.cat([hidden[:, :p], self.grid(hidden[:, p:])], dim=1)
        ctx = self._source_ctx.get(hidden.device) if not self.stitch.tokenwise else None
        mapped = self.stitch(hidden, ctx)
        prefix, patches = mapped[:, :p], mapped[:, p:]
        if not resample_first:
            patches = self.grid(patches)
        return self.prefix(prefix, patches)

    def target_blocks(self, tokens: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """Target blocks m+1..end (1-indexed; None = through the last block)."""
        return self.target.run_blocks(tokens, self.target_point, end, self._target_ctx.get(tokens.device))

    def target_profile(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states after each target block m..N (the per-layer distance profile, spec §2)."""
        states = [tokens]
        ctx = self._target_ctx.get(tokens.device)
        for block in self.target.blocks[self.target_point :]:
            tokens = self.target.call_block(block, tokens, ctx)
            states.append(tokens)
        return states

    # ---- whole passes ----------------------------------------------------------------------

    def last_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target_blocks(self.bridge(hidden))

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the head reads: the target's pooled output (classification) or normed patches (segmentation)."""
        return readout(self.target, self.last_tokens(hidden), self.task)

    def match(self, hidden: torch.Tensor) -> torch.Tensor:
        """rho'(T_tgt(S(h))): the stitched model's features at the FFM match layer, all tokens."""
        tokens = self.target_blocks(self.bridge(hidden), end=self.match_end)
        return match_features(self.target, tokens, self.match_normed)

    def match_token_weights(self) -> torch.Tensor:
        """The tokens FFM weighs at this model's match layer (T,): the loss, D_fin and the profile all use them."""
        return match_token_weights(self.target, self.match_normed)

    def forward(self, hidden: torch.Tensor, output: str = "logits") -> torch.Tensor:
        """output: 'logits' (the head's; features without a head), 'features', 'match' (FFM), 'bridge' (LFM).

        Every training objective goes through forward, so a DDP wrapper sees (and syncs) all of them.
        """
        if output == "bridge":
            return self.bridge(hidden)
        if output == "match":
            return self.match(hidden)
        features = self.features(hidden)
        return self.head(features) if output == "logits" and self.head is not None else features

    def forward_pixels(self, source_px) -> torch.Tensor:
        return self(self.source_hidden(source_px))
