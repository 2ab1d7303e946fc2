"""Stitch layers S: the only trainable piece between a frozen source prefix and a frozen target suffix.

Families (Mai et al. 2026, Sec. 3 "stitch layer"; reference spec §1.4):
    identity  S(h) = h                                   diagnostic, same width only
    linear    S(h) = W h + b                             token-wise
    mlp       S(h) = W2 act(W1 h + b1) + b2, hidden = d_t token-wise, the paper's default
    lora      source block n with W0 + (alpha/r) B A on every nn.Linear (B = 0 at init), then a
              Linear if the widths differ; the only family in which tokens interact

Token-wise layers read the source hidden state after block n (HF `hidden_states[n]`). The LoRA layer
reads the state *before* block n (`hidden_states[n-1]`) and runs its own adapted copy of block n, so
`input_offset` says which cached source layer a stitch consumes.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from stitchkit.errors import IncompatibleError

StitchKind = Literal["identity", "linear", "mlp", "lora"]
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
LORA_ADAPTER = "default"  # the name of the stitch's only peft adapter


class IdentityStitch(nn.Module):
    """S(h) = h. With source = target it must reproduce the unstitched model exactly."""

    input_offset = 0
    tokenwise = True

    def __init__(self, source_dim: int, target_dim: int):
        super().__init__()
        if source_dim != target_dim:
            raise IncompatibleError(
                f"stitch kind 'identity' needs equal widths, got source {source_dim} and target {target_dim}"
            )

    def forward(self, tokens: torch.Tensor, ctx=None) -> torch.Tensor:
        return tokens


class LinearStitch(nn.Module):
    """S(h) = W h + b, W in R^{d_t x d_s} (spec §1.4 "Linear")."""

    input_offset = 0
    tokenwise = True

    def __init__(self, source_dim: int, target_dim: int):
        super().__init__()
        self.proj = nn.Linear(source_dim, target_dim)

    def forward(self, tokens: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.proj(tokens)


class MLPStitch(nn.Module):
    """S(h) = W2 act(W1 h + b1) + b2 with hidden width d_t (spec §1.4 "MLP", the paper's default).

    act = relu follows the paper notes; gelu matches LLaVA-1.5's `mlp2x_gelu` projector.
    """

    input_offset = 0
    tokenwise = True

    def __init__(self, source_dim: int, target_dim: int, act: str = "relu", hidden: int | None = None):
        super().__init__()
        hidden = hidden or target_dim
        self.fc1 = nn.Linear(source_dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, target_dim)

    def forward(self, tokens: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class LoRAStitch(nn.Module):
    """An adapted copy of source block n: every nn.Linear W0 becomes W0 + (alpha/r) B A (peft LoRA, B = 0).

    The copy keeps the shared source model untouched (a self-stitch uses the same model object as its
    target, and the FFM reference features must come from the unadapted model). Linears are selected by
    type, not by name, because names differ across architectures and transformers versions (spec §4.5).
    `call_block(block, tokens, ctx)` is the source backbone's own way of calling one of its blocks.
    """

    input_offset = 1
    tokenwise = False

    def __init__(self, block: nn.Module, call_block, source_dim: int, target_dim: int, rank: int = 16, alpha: float = 32.0):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import cast_adapter_dtype

        block = copy.deepcopy(block)
        for p in block.parameters():
            p.requires_grad_(False)
        names = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
        if not names:
            raise IncompatibleError(f"stitch kind 'lora': source block {type(block).__name__} has no nn.Linear layers")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names)
        self.block = inject_adapter_in_model(config, block, adapter_name=LORA_ADAPTER)
        # peft creates the factors in the base layer's dtype, bf16 for a frozen model on a GPU, and only PeftModel
        # casts them back. AdamW would then update A and B in bf16 with no fp32 master copy, and round most small
        # steps away (spec §7: S in fp32). peft's own helper upcasts just the adapter and leaves the block in bf16;
        # in the forward, peft casts the input to A's dtype and the sum back to the block's.
        cast_adapter_dtype(self.block, LORA_ADAPTER)
        self.call_block = call_block
        # Widths differ: a Linear carries the adapted block's output into the target's space.
        self.proj = nn.Linear(source_dim, target_dim) if source_dim != target_dim else None

    def train(self, mode: bool = True):
        # The copied block's own dropout / drop-path stay off, like the frozen models it came from.
        super().train(mode)
        self.block.eval()
        return self

    def forward(self, tokens: torch.Tensor, ctx=None) -> torch.Tensor:
        out = self.call_block(self.block, tokens, ctx)
        return self.proj(out) if self.proj is not None else out


def stitch_input_layer(kind: str, point: int) -> int:
    """The source hidden state (HF `hidden_states` index) a stitch of this kind reads at stitch point n."""
    return point - (LoRAStitch.input_offset if kind == "lora" else 0)


def build_stitch(
    kind: StitchKind,
    source_dim: int,
    target_dim: int,
    *,
    act: str = "relu",
    hidden: int | None = None,
    rank: int = 16,
    alpha: float = 32.0,
    source_block: nn.Module | None = None,
    call_block=None,
) -> nn.Module:
    """One stitch layer by name; `source_block`/`call_block` are needed only for kind='lora'."""
    if kind == "identity":
        return IdentityStitch(source_dim, target_dim)
    if kind == "linear":
        return LinearStitch(source_dim, target_dim)
    if kind == "mlp":
        return MLPStitch(source_dim, target_dim, act=act, hidden=hidden)
    if kind == "lora":
        return LoRAStitch(source_block, call_block, source_dim, target_dim, rank=rank, alpha=alpha)
    raise IncompatibleError(f"stitch.kind: unknown stitch layer {kind!r}; choose identity, linear, mlp or lora")


def least_squares_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form LFM: argmin_A ||[X, 1] A - Y||^2 + ridge * n * ||A||^2, solved in float64 (spec §1.4).

    x: (M, d_s) source tokens, y: (M, d_t) target tokens at the stitch point. Returns (W (d_t, d_s), b (d_t,)).
    The ridge term is scaled by the sample count so its strength does not depend on how many tokens were used.
    """
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    gram = design.T @ design
    gram += ridge * len(x) * torch.eye(gram.shape[0], dtype=gram.dtype)
    solution = torch.linalg.solve(gram, design.T @ y)  # (d_s + 1, d_t)
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def least_squares_init(stitch: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> None:
    """Initialise a linear stitch (or a LoRA stitch's width projection) with the closed-form LFM solution."""
    linear = stitch.proj if isinstance(stitch, (LinearStitch, LoRAStitch)) else None
    if linear is None:
        raise IncompatibleError(
            f"stitch.init: least-squares initialisation needs a linear map; stitch kind {type(stitch).__name__} has none "
            "(use kind 'linear', or 'lora' between models of different widths)"
        )
    weight, bias = least_squares_fit(x, y, ridge)
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        linear.bias.copy_(bias.to(linear.bias.dtype))


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
