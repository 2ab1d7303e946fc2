"""Training objectives for a stitch layer (Mai et al. 2026, Sec. 3; reference spec §1.2).

    LFM      match the target's own hidden state at the stitch point
    TLT      the task loss through the frozen target suffix
    FFM      match the target's final features (label-free); the matched layer is configurable
    FFM->TLT stage 1 FFM, stage 2 TLT from the stage-1 S with a fresh head (the paper's recipe)
    LFM->TLT the same with LFM as stage 1 (a baseline)

Distances are means over samples, tokens and channels. That is the paper's (1/M) sum ||.||^2 divided by the
width, so it does not change the optimum but it does scale the gradient (and so the effective learning rate).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from stitchkit.errors import ConfigError

Objective = Literal["lfm", "tlt", "ffm", "ffm_tlt", "lfm_tlt"]
OBJECTIVES: tuple[str, ...] = ("lfm", "tlt", "ffm", "ffm_tlt", "lfm_tlt")
# Objectives whose S is trained without labels; their task score comes from a head fitted on the frozen stitch.
LABEL_FREE = ("lfm", "ffm")
IGNORE_INDEX = -100  # segmentation pixels that carry no label


def stages(objective: str) -> tuple[str, ...]:
    """The S-training stages of an objective, in order: e.g. 'ffm_tlt' -> ('ffm', 'tlt')."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objectives: unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    return tuple(objective.split("_"))


def feature_distance(predicted: torch.Tensor, reference: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared distance over samples, tokens and channels; `token_weights` (T,) weights (or masks) tokens."""
    squared = (predicted.float() - reference.float()).pow(2).mean(dim=-1)  # (B, T)
    if token_weights is None:
        return squared.mean()
    weights = token_weights.to(squared.dtype)
    return (squared * weights).sum() / (weights.sum() * squared.shape[0])


def layer_feature_matching_loss(stitched_tokens: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """LFM: E_x ||S(R_src^n(x)) - R_tgt^n(x)||^2 over every token the target block n+1 receives (spec §1.2)."""
    return feature_distance(stitched_tokens, target_tokens)


def final_feature_matching_loss(
    stitched_features: torch.Tensor, target_features: torch.Tensor, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """FFM: E_x ||rho'(T_tgt^{>n}(S(R_src^n(x)))) - rho'(f_tgt(x))||^2 at the match layer (spec §1.2).

    "a feature-matching loss at the target model's penultimate layer" (paper abstract); label-free.
    """
    return feature_distance(stitched_features, target_features, token_weights)


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TLT: cross-entropy; for segmentation logits (B, C, H, W) against masks (B, H, W), per pixel."""
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX)


def resolve_match_layer(match_layer: str | int, num_blocks: int) -> tuple[int, bool]:
    """(number of target blocks to run, apply the final norm?) for a match layer.

    'last_normed' (the consumer's pre-head representation, the default for a classifier), 'last_raw'
    (block N output before the norm), a block k in 1..N, or -j for HF `hidden_states[-j]` (-2 = block N-1, the
    layer LLaVA-style MLLMs read).
    """
    if match_layer == "last_normed":
        return num_blocks, True
    if match_layer == "last_raw":
        return num_blocks, False
    if isinstance(match_layer, int) and not isinstance(match_layer, bool):
        block = match_layer if match_layer > 0 else num_blocks + 1 + match_layer
        if 1 <= block <= num_blocks:
            return block, False
    raise ConfigError(
        f"match_layer: {match_layer!r} is not last_normed, last_raw, a block 1..{num_blocks} or -1..-{num_blocks}"
    )
