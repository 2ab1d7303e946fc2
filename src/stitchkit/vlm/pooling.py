"""1-D average pooling of vision tokens inside each image (MIMIC's pooling probe, mimic.md §8).

Each image's post-projector tokens are averaged along the raster token axis in non-overlapping groups
of f; groups never cross images. A trailing separator (LLaVA-OneVision's image-newline feature) is left
out of the groups and appended after pooling. The last group may be short: pad="exclude" (default)
averages only the tokens that exist; pad="zeros" reproduces the official code, which zero-pads the tail
to a multiple of f so the zeros enter the mean.

The prompt keeps one placeholder token per pooled token: `pooling_keep_mask` marks, for every image,
the first token of each group (and the separators), so spans, masks and M-RoPE positions are taken
from the shortened sequence.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from stitchkit.errors import ConfigError
from stitchkit.vlm.spans import ImageSpan

POOL_FACTORS = (1, 2, 4, 8, 16)
PoolPad = Literal["exclude", "zeros"]


def check_pool_factor(factor: int) -> int:
    if factor not in POOL_FACTORS:
        raise ConfigError(f"pool_factor must be one of {POOL_FACTORS}, got {factor}")
    return factor


def pooled_length(n_tokens: int, factor: int) -> int:
    return math.ceil(n_tokens / factor)


def average_pool_tokens(tokens: torch.Tensor, factor: int, pad: PoolPad = "exclude") -> torch.Tensor:
    """(n, D) -> (ceil(n / f), D): the mean of each group of f consecutive tokens."""
    n, dim = tokens.shape
    groups = pooled_length(n, factor)
    padded = tokens.new_zeros(groups * factor, dim)
    padded[:n] = tokens
    sums = padded.view(groups, factor, dim).sum(dim=1)
    if pad == "zeros":
        return sums / factor
    sizes = torch.full((groups, 1), factor, dtype=tokens.dtype, device=tokens.device)
    sizes[-1] = n - (groups - 1) * factor
    return sums / sizes


def pool_image_features(features: list[torch.Tensor], factor: int, trailing: int, pad: PoolPad = "exclude") -> list[torch.Tensor]:
    """Pool every image's tokens, keeping its last `trailing` separator tokens as they are."""
    if factor == 1:
        return features
    pooled = []
    for tokens in features:
        body, tail = tokens[: len(tokens) - trailing], tokens[len(tokens) - trailing :]
        pooled.append(torch.cat([average_pool_tokens(body, factor, pad), tail]))
    return pooled


def pooling_keep_mask(spans: list[list[ImageSpan]], seq_len: int, factor: int, trailing: int) -> torch.Tensor:
    """(B, S) bool: the tokens that remain after pooling (one placeholder per group, separators, text)."""
    keep = torch.ones(len(spans), seq_len, dtype=torch.bool)
    for row, row_spans in enumerate(spans):
        for span in row_spans:
            start, end = span.tokens
            body_end = end - trailing
            keep[row, start:body_end] = False
            keep[row, start:body_end:factor] = True
    return keep


def compact(x: torch.Tensor, keep: torch.Tensor, pad_value: int) -> torch.Tensor:
    """Drop the positions keep (B, S) marks False from x (..., B, S); rows are left-padded to a common length."""
    lengths = keep.sum(-1)
    width = int(lengths.max()) if len(lengths) else 0
    out = x.new_full((*x.shape[:-1], width), pad_value)
    for row in range(keep.shape[0]):
        kept = x[..., row, keep[row]]
        out[..., row, width - kept.shape[-1] :] = kept
    return out
