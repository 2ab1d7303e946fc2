"""Per-layer attention policies, through transformers' attention interface (no patched model forwards).

`install_attention(model)` switches the language model's attention implementation to a registered
function, `stitchkit_<base>` (base = the model's own "sdpa" or "eager"), paired with the base's own mask
builder. That function runs the base attention unchanged unless the forward call carries a
`vision_layout=VisionLayout(...)` keyword (transformers hands extra forward keywords down to every
attention call) and the calling layer is one of its masked layers. So without a layout, or with no
masked layer, the model computes exactly what the unmodified model computes.

Image-block-diagonal masking (MIMIC, mimic.md §6.1). With img(p) = j inside image j's span and -1 for
text, a masked layer allows query q to see key k iff
    k <= q  and  key k is not padding  and  (img(q) = -1  or  img(k) = img(q)).
Vision tokens see only earlier tokens of their own image (causal inside the block, nothing before it);
text tokens keep full causal attention; tokens generated while decoding are text; rows with fewer than
two images are not masked. Position ids are unchanged.

Attention knockouts (binding.md §7.3). A forward call with `attention_knockout=AttentionKnockout(...)` blocks
the chosen (query, key) pairs in the chosen layers, on all heads: their pre-softmax logits become -inf, i.e. the
base mask loses those pairs. Other layers run the base attention unchanged.

Kernels for a masked layer:
    fast        causal attention inside segments, then the late text queries over all keys. The segments
                partition the flattened (B * S) batch: each image block, each text or padding run of a
                multi-image row, and the real tokens of every other row (whose causal attention is the base
                attention). On CUDA in half precision the segments are one variable-length flash call
                (torch's varlen_attn, cu_seqlens = the segment bounds); elsewhere the segments a masked row
                needs (image blocks, the text before the first image) are stacked by length into one causal
                SDPA call per distinct length, and other rows run the base attention. Text queries after a
                row's first image ("late text") see every earlier key: one SDPA call for all of them.
                Its cost is that of the allowed pairs, so it shrinks with what the mask removes.
    dense_mask  the official code's way: one SDPA call with the explicit (B, 1, S, S) boolean mask.
                Same numbers, no savings; kept as the readable definition and for benchmarks.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from stitchkit.config import Config
from stitchkit.errors import ConfigError, IncompatibleError
from stitchkit.vlm.spans import ImageSpan, block_ids

try:  # torch >= 2.9; CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover
    varlen_attn = None

PREFIX = "stitchkit_"
BASES = ("sdpa", "eager")
# A probe sees attention probabilities (B, H, q_chunk, S) of one layer for queries [q0, q0 + q_chunk).
Probe = Callable[[int, torch.Tensor, int], None]
PROBE_QUERY_CHUNK = 512


class AttentionPolicy(Config):
    """Which decoder layers mask attention between images, and with which kernel.

    masked_layers: "none" (the dense model), "default" (floor(L/2) .. L-1, MIMIC's best setting), "all",
    a range string like "12-23" or "0-3,8", or a list of 0-based layer indices.

    Two quirks of the official MIMIC code (mimic.md §6.1 "Official quirks"), off by default, for reproducing what
    the released code computes rather than what the paper describes:
    legacy_layer_loop: the official decoder loop keeps one mask variable; a layer outside the range sets it to None
        and a layer inside it restores the block mask only while it is not None, so only the run of listed layers
        that starts at layer 0 is masked ("0-11" masks 0..11, "12-23" masks nothing, "all" masks all).
    legacy_maxlen_fallback: N: at inference (the model not training), a row longer than N tokens runs dense; the
        official evaluation drops the mask silently above 20,000 tokens.
    """

    masked_layers: Literal["none", "default", "all"] | str | list[int] = "none"
    kernel: Literal["fast", "dense_mask"] = "fast"
    legacy_layer_loop: bool = False
    legacy_maxlen_fallback: int | None = pydantic.Field(None, ge=1)

    @pydantic.field_validator("masked_layers")
    @classmethod
    def _check_spec(cls, value):
        if isinstance(value, str) and value not in ("none", "default", "all"):
            parse_layer_spec(value)
        return value

    def layers(self, num_layers: int) -> frozenset[int]:
        """The 0-based masked layers of a model with `num_layers` decoder layers."""
        layers = self._listed_layers(num_layers)
        if self.legacy_layer_loop:  # the official loop loses the mask at the first unlisted layer, for good
            return frozenset(itertools.takewhile(layers.__contains__, range(num_layers)))
        return layers

    def runs_dense(self, length: int, training: bool) -> bool:
        """Whether a row of `length` real tokens drops the mask: legacy_maxlen_fallback, at inference only (the
        official fallback sits in its evaluation path; training forwards keep the mask at any length)."""
        return self.legacy_maxlen_fallback is not None and not training and length > self.legacy_maxlen_fallback

    def _listed_layers(self, num_layers: int) -> frozenset[int]:
        spec = self.masked_layers
        if spec == "none":
            return frozenset()
        if spec == "all":
            return frozenset(range(num_layers))
        if spec == "default":
            return frozenset(range(num_layers // 2, num_layers))
        layers = frozenset(parse_layer_spec(spec) if isinstance(spec, str) else spec)
        bad = sorted(i for i in layers if not 0 <= i < num_layers)
        if bad:
            raise ConfigError(f"masked_layers {bad} do not exist: the language model has layers 0..{num_layers - 1}")
        return layers


def parse_layer_spec(spec: str) -> list[int]:
    """"12-23" -> 12..23 (inclusive); "0-3,8" -> 0, 1, 2, 3, 8."""
    layers: list[int] = []
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ConfigError(f"masked_layers {spec!r}: expected ranges like '12-23' or '0-3,8'")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ConfigError(f"masked_layers {spec!r}: range {part} is empty")
        layers.extend(range(first, last + 1))
    return layers


@dataclass(frozen=True)
class BlockGroup:
    """Segments of one length, gathered as a batch of sequences for one causal SDPA call."""

    index: torch.Tensor  # (n * length,) positions of the segments' tokens in the flattened (B * S) batch
    count: int  # n, the number of segments
    length: int


@dataclass(frozen=True)
class VisionLayout:
    """What a masked layer needs to know about a batch: built once per batch from its spans.

    block_ids: (B, S) j inside image j's span, -1 for text and padding.
    multi_image: (B,) rows with at least two images, the only rows that are masked.
    cu_seqlens: (n + 1,) int32 bounds of the segments in the flattened (B * S) batch (module docstring);
        max_segment: the longest one.
    groups: the segments of the multi-image rows that the late text does not cover (image blocks, text before
        the first image), grouped by length.
    text_positions: (B_multi, T) positions of the late text tokens (text after the row's first image) of each
        multi-image row, padded to the longest row by repeating a real position; text_index: the same in the
        flattened (B * S) batch; text_from / text_to: which entries of the flattened (B_multi * T) queries are
        real, and where they go.
    probe: attention analysis; when set, every layer computes its probabilities explicitly.
    Index tensors are built once per batch, so a masked layer launches no index arithmetic of its own
    and never waits for the device.
    """

    seq_len: int
    block_ids: torch.Tensor
    multi_image: torch.Tensor
    multi_rows: torch.Tensor
    single_rows: torch.Tensor
    cu_seqlens: torch.Tensor
    max_segment: int
    groups: tuple[BlockGroup, ...]
    text_positions: torch.Tensor
    text_index: torch.Tensor
    text_from: torch.Tensor
    text_to: torch.Tensor
    masked_layers: frozenset[int] = frozenset()
    kernel: str = "fast"
    probe: Probe | None = None
    # The text queries' mask, made by the first masked layer of a forward and reused by the others.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        spans: list[list[ImageSpan]],
        seq_len: int,
        masked_layers: frozenset[int] = frozenset(),
        kernel: str = "fast",
        probe: Probe | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> "VisionLayout":
        """attention_mask: (B, S), 0 at padding (at either end of a row); None = no padding."""
        ids = block_ids(spans, seq_len)
        batch = len(spans)
        real = torch.ones(batch, seq_len, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
        multi = torch.tensor([len(s) >= 2 for s in spans], dtype=torch.bool)
        multi_rows = multi.nonzero().flatten()

        # Segments: maximal runs of one label, never across rows. Labels: the image index in a multi-image row's
        # blocks, -1 for its text and for every real token of another row, -2 for padding.
        labels = torch.where(multi[:, None], ids, -1).masked_fill(~real, -2).flatten()
        first = torch.ones_like(labels, dtype=torch.bool)
        first[1:] = labels[1:] != labels[:-1]
        first[::seq_len] = True
        starts = first.nonzero().flatten()
        bounds = torch.cat([starts, torch.tensor([batch * seq_len])])
        lengths = bounds.diff()

        first_image = {row: spans[row][0].start for row in multi_rows.tolist()}
        by_length: dict[int, list[torch.Tensor]] = {}
        for start, length in zip(starts.tolist(), lengths.tolist()):
            row, position, label = start // seq_len, start % seq_len, int(labels[start])
            if row in first_image and (label >= 0 or (label == -1 and position < first_image[row])):
                by_length.setdefault(length, []).append(torch.arange(start, start + length))
        groups = tuple(BlockGroup(torch.cat(blocks), len(blocks), length) for length, blocks in sorted(by_length.items()))

        text_lists = [
            ((ids[row] < 0) & real[row] & (torch.arange(seq_len) > first_image[row])).nonzero().flatten()
            for row in multi_rows.tolist()
        ]
        width = max((len(t) for t in text_lists), default=0)
        text_positions = torch.zeros(len(text_lists), width, dtype=torch.long)
        text_from, text_to = [], []
        for i, (row, positions) in enumerate(zip(multi_rows.tolist(), text_lists)):
            text_positions[i, : len(positions)] = positions
            # Padding entries repeat a real position (the row's last real token if it has no late text), so no
            # query row of the text call is fully masked.
            text_positions[i, len(positions) :] = positions[-1] if len(positions) else int(real[row].nonzero()[-1])
            text_from.append(i * width + torch.arange(len(positions)))
            text_to.append(row * seq_len + positions)
        empty = torch.zeros(0, dtype=torch.long)
        return cls(
            seq_len=seq_len,
            block_ids=ids,
            multi_image=multi,
            multi_rows=multi_rows,
            single_rows=(~multi).nonzero().flatten(),
            cu_seqlens=bounds.to(torch.int32),
            max_segment=int(lengths.max()) if len(lengths) else 0,
            groups=groups,
            text_positions=text_positions,
            text_index=(multi_rows[:, None] * seq_len + text_positions).flatten(),
            text_from=torch.cat(text_from) if text_from else empty,
            text_to=torch.cat(text_to) if text_to else empty,
            masked_layers=frozenset(masked_layers),
            kernel=kernel,
            probe=probe,
        )

    def to(self, device, non_blocking: bool = False) -> "VisionLayout":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self,
            block_ids=move(self.block_ids),
            multi_image=move(self.multi_image),
            multi_rows=move(self.multi_rows),
            single_rows=move(self.single_rows),
            cu_seqlens=move(self.cu_seqlens),
            groups=tuple(replace(g, index=move(g.index)) for g in self.groups),
            text_positions=move(self.text_positions),
            text_index=move(self.text_index),
            text_from=move(self.text_from),
            text_to=move(self.text_to),
            cache={},
        )

    def allowed_rows(self, base_allowed: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
        """The policy applied to rows [q0, q1) of a base mask (B, 1, q1 - q0, S) of allowed pairs."""
        ids = self.block_ids
        query_ids = ids[:, q0:q1, None]
        free = (query_ids < 0) | ~self.multi_image[:, None, None]
        return base_allowed & (free | (query_ids == ids[:, None, :]))[:, None]


# ---- the registered attention function ----------------------------------------------------------------


@dataclass(frozen=True)
class AttentionKnockout:
    """Blocked attention edges: in `layers`, query p may not attend to key k where blocked[b, p, k]."""

    layers: frozenset[int]
    blocked: torch.Tensor  # (B, S, S) bool


def base_attention(base: str, module: torch.nn.Module) -> Callable:
    if base == "sdpa":
        return sdpa_attention_forward
    # Eager attention lives in each modeling file; use the calling module's own, as the model would.
    return sys.modules[type(module).__module__].eager_attention_forward


def policy_attention(
    module, query, key, value, attention_mask, *, base: str, vision_layout: VisionLayout | None = None,
    attention_knockout: AttentionKnockout | None = None, **kwargs,
):  # fmt: skip
    """The attention of one layer: the base attention, or the layout's policy if this layer is masked, or the
    base mask minus the knocked-out edges if this layer is knocked out."""
    layout = vision_layout
    run_base = partial(base_attention(base, module), module)
    if attention_knockout is not None and module.layer_idx in attention_knockout.layers:
        if layout is not None:
            raise IncompatibleError("attention knockouts and image masking cannot be combined in one forward")
        q_len, kv_len = query.shape[2], key.shape[2]
        blocked = attention_knockout.blocked[:, None, kv_len - q_len : kv_len, :kv_len].to(query.device)
        allowed = allowed_pairs(attention_mask, q_len, kv_len, query.device) & ~blocked
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
        return _sdpa(query, key, value, allowed, scaling, dropout).transpose(1, 2).contiguous(), None
    if layout is None or (module.layer_idx not in layout.masked_layers and layout.probe is None):
        return run_base(query, key, value, attention_mask, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_len - q_len >= layout.seq_len:  # decoding after the prompt: generated tokens are text
        return run_base(query, key, value, attention_mask, **kwargs)
    if q_len != kv_len:
        raise IncompatibleError("masked attention needs the whole prompt in one forward (no chunked prefill)")
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    masked = module.layer_idx in layout.masked_layers
    if layout.probe is not None:
        return explicit_attention(query, key, value, attention_mask, layout if masked else None, scaling, layout.probe, module.layer_idx)
    if layout.kernel == "dense_mask":
        allowed = layout.allowed_rows(allowed_pairs(attention_mask, q_len, kv_len, query.device), 0, q_len)
        return _sdpa(query, key, value, allowed, scaling, dropout).transpose(1, 2).contiguous(), None
    return block_diagonal_attention(query, key, value, attention_mask, layout, scaling, dropout, run_base, kwargs), None


def allowed_pairs(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """The base mask as booleans (B or 1, 1, q, kv): sdpa's bool mask, eager's additive mask, or None = causal."""
    if attention_mask is None:
        q = torch.arange(kv_len - q_len, kv_len, device=device)
        return (torch.arange(kv_len, device=device)[None, :] <= q[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0


def _sdpa(query, key, value, mask, scaling, dropout, is_causal=False):
    """SDPA with grouped key/value heads: shared by enable_gqa without a mask (flash kernels), repeated
    with one (as transformers does)."""
    groups = query.shape[1] // key.shape[1]
    if mask is None and groups > 1:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=is_causal, scale=scaling, enable_gqa=True)
    return F.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups),
        attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
    )  # fmt: skip


def _sdpa_few_queries(query, key, value, folded_mask, scaling, dropout):
    """SDPA for a few masked queries over many keys, without copying keys per query head: the query heads
    of each key/value head are folded into the query axis (B, H_kv, groups x T, d); folded_mask is the
    (B, 1, T, S) mask repeated `groups` times along the query axis."""
    batch, heads, length, dim = query.shape
    folded = query.reshape(batch, key.shape[1], heads // key.shape[1] * length, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=folded_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, length, dim)


def block_diagonal_attention(
    query, key, value, attention_mask, layout: VisionLayout, scaling, dropout, run_base, kwargs,
    executor: Literal["varlen", "grouped"] | None = None,
):  # fmt: skip
    """The fast kernel of a masked layer; returns (B, S, H, d) like transformers' attention functions.

    Tokens are addressed in the flattened (B * S) batch, where a segment is a contiguous range and the late
    text queries are one index_select. executor: "varlen" (one flash call over all segments), "grouped" (SDPA
    per segment length), or None: varlen where `varlen_eligible`, else grouped.
    """
    if not len(layout.multi_rows):  # no row is masked: the base attention, unchanged
        return run_base(query, key, value, attention_mask, **kwargs)[0]
    batch, heads, seq, dim = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim)  # noqa: E731
    q, k, v = flat(query), flat(key), flat(value)
    varlen = (executor or ("varlen" if varlen_eligible(query, dropout) else "grouped")) == "varlen"
    if varlen:
        out = varlen_causal(q, k, v, layout.cu_seqlens, layout.max_segment, scaling)
    else:
        out = query.new_zeros(batch * seq, heads, dim)  # padding of masked rows stays 0
        if len(layout.single_rows):  # rows with < 2 images are not masked: the base attention, unchanged
            rows = layout.single_rows
            mask = attention_mask[rows] if attention_mask is not None and attention_mask.shape[0] > 1 else attention_mask
            dense = run_base(query[rows], key[rows], value[rows], mask, **kwargs)[0]
            out.view(batch, seq, heads, dim)[rows] = dense
        for group in layout.groups:  # image blocks and leading text: causal inside the segment only
            gather = lambda t: t.index_select(0, group.index).view(group.count, group.length, t.shape[1], dim).transpose(1, 2)  # noqa: E731
            block_out = _sdpa(gather(q), gather(k), gather(v), None, scaling, dropout, is_causal=True)
            out.index_copy_(0, group.index, block_out.transpose(1, 2).reshape(-1, heads, dim))

    # Late text queries of the masked rows: ordinary causal attention over every key of their row.
    if layout.text_positions.numel():
        rows = layout.multi_rows
        text_queries = q.index_select(0, layout.text_index).view(len(rows), -1, heads, dim).transpose(1, 2)
        keys, values = (key, value) if len(rows) == batch else (key[rows], value[rows])
        mask = _text_query_mask(layout, attention_mask, seq, heads // key.shape[1], query.device)
        text_out = _sdpa_few_queries(text_queries, keys, values, mask, scaling, dropout)
        text_out = text_out.transpose(1, 2).reshape(-1, heads, dim).index_select(0, layout.text_from)
        if varlen and out.requires_grad:  # varlen saved its output for backward: write the late text into a copy
            out = out.index_copy(0, layout.text_to, text_out)
        else:
            out.index_copy_(0, layout.text_to, text_out)
    return out.view(batch, seq, heads, dim)


def varlen_eligible(query: torch.Tensor, dropout: float) -> bool:
    """Whether torch's flash varlen kernel can run this layer: CUDA (Ampere or newer), half precision, no
    attention dropout (varlen has none), a head size flash takes."""
    return (
        varlen_attn is not None
        and _varlen_options(varlen_attn) is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
        and query.shape[-1] % 8 == 0
        and query.shape[-1] <= 256
        and torch.cuda.get_device_capability(query.device) >= (8, 0)
    )


def varlen_causal(q, k, v, cu_seqlens: torch.Tensor, max_len: int, scaling: float) -> torch.Tensor:
    """Causal attention inside every segment of packed (T, H, d) q and (T, H_kv, d) k/v: one flash call."""
    options = _varlen_options(varlen_attn)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and "enable_gqa" not in options:  # torch versions without it take equal head counts
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scaling, **options)


@functools.cache
def _varlen_options(function) -> dict | None:
    """Causality and GQA in the keywords this torch's varlen_attn has (is_causal in early versions, window_size
    later); None if it has neither (not eligible)."""
    params = inspect.signature(function).parameters
    if "window_size" in params:
        options: dict = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        options = {"is_causal": True}
    else:
        return None
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    return options


def _text_query_mask(layout: VisionLayout, attention_mask, seq: int, groups: int, device) -> torch.Tensor:
    """(B_multi, 1, groups x T, S): the base mask's rows of the text queries, repeated for the folded
    query heads; made once per forward (all masked layers of a forward share the same mask object)."""
    cached = layout.cache.get("text_mask")
    if cached is not None and cached[0] is attention_mask:
        return cached[1]
    positions = layout.text_positions
    if attention_mask is None:
        mask = torch.arange(seq, device=device)[None, None, :] <= positions[:, :, None]
    else:
        base = allowed_pairs(attention_mask, seq, seq, device)
        rows = layout.multi_rows if base.shape[0] > 1 else torch.zeros_like(layout.multi_rows)
        mask = base[rows[:, None], 0, positions]
    mask = mask[:, None].repeat(1, 1, groups, 1)
    layout.cache["text_mask"] = (attention_mask, mask)  # holding the key keeps its identity unique
    return mask


def explicit_attention(query, key, value, attention_mask, layout: VisionLayout | None, scaling, probe: Probe, layer: int):
    """Attention with its probabilities materialised in query chunks (fp32), each shown to `probe`.

    layout=None: the base mask only (a dense layer); otherwise the layout's policy on top of it.
    Dropout is not applied (analysis runs in eval mode).
    """
    batch, heads, seq, dim = query.shape
    groups = heads // key.shape[1]
    key, value = repeat_kv(key, groups).float(), repeat_kv(value, groups)
    base = allowed_pairs(attention_mask, seq, seq, query.device)
    out = query.new_empty(batch, seq, heads, dim)
    for q0 in range(0, seq, PROBE_QUERY_CHUNK):
        q1 = min(q0 + PROBE_QUERY_CHUNK, seq)
        allowed = base[:, :, q0:q1]
        if layout is not None:
            allowed = layout.allowed_rows(allowed, q0, q1)
        scores = torch.matmul(query[:, :, q0:q1].float(), key.transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
        probe(layer, probs, q0)
        out[:, q0:q1] = torch.matmul(probs.to(value.dtype), value).transpose(1, 2)
    return out, None


# ---- installation --------------------------------------------------------------------------------------


def _register(base: str) -> str:
    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, partial(policy_attention, base=base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def text_config_of(model):
    return getattr(model.config, "text_config", None) or model.config


def install_attention(model) -> None:
    """Route the language model's attention through `policy_attention` (idempotent).

    Only the text model changes; the vision tower keeps its own implementation. Without a `vision_layout`
    keyword the routed model computes exactly what it computed before.
    """
    text_config = text_config_of(model)
    current = text_config._attn_implementation
    if current.startswith(PREFIX):
        return
    if current not in BASES:
        raise IncompatibleError(
            f"attention policies need the language model to use 'sdpa' or 'eager' attention, not {current!r}; "
            "load it with attn_implementation='sdpa'"
        )
    name = _register(current)
    if text_config is model.config:
        model.set_attn_implementation(name)
    else:
        key = next(k for k in model.config.sub_configs if getattr(model.config, k) is text_config)
        model.set_attn_implementation({key: name})


def uninstall_attention(model) -> None:
    """Give the language model back its base implementation (e.g. before save_pretrained)."""
    text_config = text_config_of(model)
    current = text_config._attn_implementation
    if not current.startswith(PREFIX):
        return
    base = current.removeprefix(PREFIX)
    if text_config is model.config:
        model.set_attn_implementation(base)
    else:
        key = next(k for k in model.config.sub_configs if getattr(model.config, k) is text_config)
        model.set_attn_implementation({key: base})


# ---- cost: allowed query-key pairs (mimic.md §7) -------------------------------------------------------


def causal_pairs(seq_len: int) -> int:
    """E_c = S (S + 1) / 2: the query-key pairs of causal attention over S tokens."""
    return seq_len * (seq_len + 1) // 2


def masked_pairs(prefix: int, n_images: int, image_tokens: int, suffix: int) -> int:
    """E_m = P(P+1)/2 + N T(T+1)/2 + Q (P + N T) + Q(Q+1)/2 (mimic.md §7): pairs kept by the block mask for
    P prefix text tokens, N contiguous image blocks of T tokens, and Q suffix text tokens."""
    return (
        prefix * (prefix + 1) // 2
        + n_images * image_tokens * (image_tokens + 1) // 2
        + suffix * (prefix + n_images * image_tokens)
        + suffix * (suffix + 1) // 2
    )


def layout_pairs(layout: VisionLayout, attention_mask: torch.Tensor | None = None) -> tuple[int, int]:
    """(dense, masked) allowed pairs of a batch, over real tokens: text queries keep every earlier real key,
    a vision query at offset o of its block keeps o + 1 keys; rows with < 2 images are not masked."""
    ids = layout.block_ids.cpu()
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    dense = masked = 0
    for row in range(ids.shape[0]):
        n = int(real[row].sum())
        dense += causal_pairs(n)
        if not bool(layout.multi_image[row]):
            masked += causal_pairs(n)
            continue
        seen = torch.cumsum(real[row].long(), 0)  # real keys up to and including each position
        text = (ids[row] < 0) & real[row]
        masked += int(seen[text].sum())
        for j in ids[row].unique().tolist():
            if j >= 0:
                t = int((ids[row] == j).sum())
                masked += causal_pairs(t)
    return dense, masked


def attention_core_flops(pairs: int, hidden_size: int) -> int:
    """F = 4 d E: 2d for QK^T and 2d for AV per allowed pair, softmax ignored (mimic.md §7)."""
    return 4 * hidden_size * pairs
