"""VFM Stitch Tree (VST): one shared trunk, one branch per model (Mai et al. 2026, Sec. 5; spec §1.5).

The trunk model `a` runs blocks 1..n once; every model i then has a branch S_i (identity for the trunk itself)
followed by its own blocks n+1..L_i, where L_i is the layer its consumer reads. A multi-encoder MLLM reads
`hidden_states[-2]` (block N-1, raw, patch tokens only; LLaVA's convention), so L = N - 1 by default.

Cost arithmetic (spec §1.5, in block units, ignoring embeddings, S and the LLM):
    single      = L
    VST-n, k    = n + k (L - n)
    overhead    = (k - 1)(L - n) / L          e.g. L = 23: n = 22, k = 2 -> 1/23 = 4.3%; n = 14 -> 39%
    normalised gain = (score_tree - score_single) / (score_dual - score_single)
"""

from __future__ import annotations

import torch
from torch import nn

from stitchkit.stitching.layers import IdentityStitch
from stitchkit.stitching.model import StitchedModel, sequence_length


def vst_blocks(point: int, feature_layer: int, branches: int) -> int:
    """Blocks a VST-n with `branches` models runs: the trunk's n plus (L - n) per branch."""
    return point + branches * (feature_layer - point)


def vst_overhead(feature_layer: int, point: int, branches: int) -> float:
    """Extra cost of a VST over one model, as a fraction of that model: (k - 1)(L - n) / L."""
    return (branches - 1) * (feature_layer - point) / feature_layer


def normalised_gain(tree: float, single: float, dual: float) -> float:
    """(tree - single) / (dual - single): the share of the multi-model gain the tree recovers."""
    return (tree - single) / (dual - single) if dual != single else float("nan")


def block_flops(backbone, tokens: int) -> float:
    """Forward FLOPs of one transformer block on one image: 2 * MACs of the linear layers plus attention."""
    config = backbone.model.config
    width = backbone.hidden_size
    mlp = int(getattr(config, "intermediate_size", 4 * width))
    linear = 4 * width * width + 2 * width * mlp  # q, k, v, o and the two MLP matrices
    attention = 2 * tokens * width  # q k^T and attention x v
    return 2.0 * tokens * (linear + attention)


def feature_layer_of(backbone, feature_layer: int) -> int:
    """A 1-indexed block from a block number or a negative HF `hidden_states` index (-2 -> N - 1)."""
    return feature_layer if feature_layer > 0 else backbone.num_blocks + 1 + feature_layer


class StitchTree(nn.Module):
    """Trunk blocks 1..n computed once, then every branch's S_i and its own blocks up to its feature layer.

    Each branch is a `StitchedModel(trunk, model_i, n, S_i)` (the trunk's own branch uses S = identity), so a
    branch's output equals that separately stitched model's hidden state at L_i, by construction and by test.
    """

    def __init__(self, trunk, point: int, branches: dict[str, tuple[object, nn.Module]], feature_layer: int = -2, **bridge_options):
        super().__init__()
        self.trunk, self.point = trunk, point
        self.branches = nn.ModuleDict()
        self.feature_layers = {}
        for name, (model, stitch) in branches.items():
            stitch = stitch if stitch is not None else IdentityStitch(trunk.hidden_size, model.hidden_size)
            self.branches[name] = StitchedModel(trunk, model, point, stitch, **bridge_options)
            self.feature_layers[name] = feature_layer_of(model, feature_layer)
        if any(branch.stitch.input_offset for branch in self.branches.values()):
            raise ValueError("tree branches need token-wise stitches that share the trunk's output at block n")

    def branch_features(self, name: str, trunk_hidden: torch.Tensor) -> torch.Tensor:
        """Branch `name`'s patch tokens at its feature layer, from the trunk's block-n output."""
        branch = self.branches[name]
        tokens = branch.target_blocks(branch.bridge(trunk_hidden), end=self.feature_layers[name])
        return tokens[:, branch.target.num_prefix_tokens :]

    def forward(self, trunk_hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self.branch_features(name, trunk_hidden) for name in self.branches}

    @torch.no_grad()
    def trunk_hidden(self, trunk_px) -> torch.Tensor:
        tokens, ctx = self.trunk.embed(trunk_px)
        return self.trunk.run_blocks(tokens, 0, self.point, ctx)

    def forward_pixels(self, trunk_px) -> dict[str, torch.Tensor]:
        return self(self.trunk_hidden(trunk_px))

    def cost(self) -> dict[str, float]:
        """Blocks and analytic FLOPs per image of this tree (trunk prefix + every branch + every S)."""
        trunk_tokens = sequence_length(self.trunk)
        blocks = float(self.point)
        flops = self.point * block_flops(self.trunk, trunk_tokens)
        for name, branch in self.branches.items():
            suffix = self.feature_layers[name] - branch.target_point
            tokens = sequence_length(branch.target)
            blocks += suffix
            flops += suffix * block_flops(branch.target, tokens)
            flops += 2.0 * trunk_tokens * sum(p.numel() for p in branch.stitch.parameters() if p.ndim >= 2)
        return {"blocks": blocks, "flops": flops}
