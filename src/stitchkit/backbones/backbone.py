"""One interface over Hugging Face vision transformers: preprocess, embed, run blocks i..j, final, pool.

    bb = load_backbone("facebook/dinov2-large")
    px = bb.preprocess(images)                 # the model's own resolution, mean and std
    tokens, ctx = bb.embed(px)                 # ctx: RoPE cos/sin, attention masks, grid
    tokens = bb.run_blocks(tokens, 0, n, ctx)  # blocks[0:n]; python-slice semantics
    tokens = bb.run_blocks(tokens, n, None, ctx)
    feats = bb.final(tokens)                   # == the model's own last_hidden_state

Per family, `final` and `pool` follow the model's own forward (model_stitching.md §4.4):
    Dinov2Model, Dinov2WithRegistersModel, ViTModel, DINOv3ViTModel
        final = final layer norm on every token; pool = normed CLS. (ViTModel's own pooler_output is
        tanh(dense(CLS)), a pre-training leftover that ViTForImageClassification ignores; we pool the
        normed CLS like that classifier does.)
    CLIPVisionModel
        final = identity: its last_hidden_state is the RAW last block; pool = post_layernorm(CLS).
        Use `bb.final_norm` to norm all tokens yourself.
    SiglipVisionModel (SigLIP and FixRes SigLIP2), Siglip2VisionModel (NaFlex)
        final = post_layernorm on every token; pool = the MAP head, or the mean over patch tokens when
        the checkpoint has no head (vision_use_head=False).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from stitchkit.backbones.families import FAMILIES, SUPPORTED_MODEL_TYPES, Family
from stitchkit.backbones.preprocess import (
    DEFAULT_RESAMPLE,
    PatchifiedPixels,
    full_patchified,
    preprocess_fixed,
    preprocess_naflex,
    resampling_filter,
)
from stitchkit.errors import IncompatibleError, ModelNotFoundError

# Where the pieces live, probed in order (model_stitching.md §4.2); the first existing path wins.
BLOCK_PATHS = ("encoder.layer", "encoder.layers", "layers", "model.layer", "layer")
FINAL_NORM_PATHS = ("layernorm", "post_layernorm", "norm")


@dataclass(repr=False)
class BlockContext:
    """What a model's blocks need besides the tokens; built once per batch from the pixels.

    grid: the patch grid (rows, cols), or None for a NaFlex batch whose images have different grids.
    attention_mask: the mask the blocks take (built by transformers from the NaFlex padding mask);
        None means every token attends to every token.
    position_embeddings: DINOv3's RoPE (cos, sin) for the patch tokens; prefix tokens stay unrotated,
        so any number of prefix tokens may precede the patches.
    pixel_attention_mask, spatial_shapes: NaFlex only, (B, N) padding mask and (B, 2) per-image grids.
    """

    grid: tuple[int, int] | None
    attention_mask: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    pixel_attention_mask: torch.Tensor | None = None
    spatial_shapes: torch.Tensor | None = None

    def __repr__(self) -> str:
        parts = [f"grid={self.grid}"]
        if self.position_embeddings is not None:
            parts.append(f"rope={tuple(self.position_embeddings[0].shape)}")
        if self.pixel_attention_mask is not None:
            parts.append(f"padding_mask={tuple(self.pixel_attention_mask.shape)}")
        return f"BlockContext({', '.join(parts)})"


def family_of(config) -> Family:
    """The family of a transformers config (a module without a config is not a HF model)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        what = f"{model_type!r} ({type(config).__name__})" if config is not None else "(a module without an HF config)"
        raise ModelNotFoundError(f"unsupported architecture {what}; supported model types: {SUPPORTED_MODEL_TYPES}")
    return FAMILIES[model_type]


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower of a full image-text model (CLIPModel, SiglipModel, ...), else the model itself."""
    while hasattr(model, "vision_model"):
        model = model.vision_model
    return model


def find_module(root: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    for path in paths:
        module = root
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        else:
            return module
    return None


@functools.lru_cache(maxsize=None)
def _forward_parameters(block_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(block_class.forward).parameters)


def call_block(block: nn.Module, tokens: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """One block, called the way its own model calls it, whatever the transformers version.

    What a block takes is read off its forward's signature: the attention mask (CLIP/SigLIP require it
    in 5.x, None when unpadded; DINOv2 blocks of some 5.x releases take none), CLIP's causal mask of
    4.x releases, and DINOv3's RoPE `position_embeddings=(cos, sin)`. Some versions return a tuple,
    so the hidden states are unwrapped.
    """
    takes = _forward_parameters(type(block))
    kwargs = {}
    if "attention_mask" in takes:
        kwargs["attention_mask"] = ctx.attention_mask
    if "causal_attention_mask" in takes:
        kwargs["causal_attention_mask"] = None
    if "position_embeddings" in takes:
        kwargs["position_embeddings"] = ctx.position_embeddings
    out = block(tokens, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def size_pair(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def default_image_size(config, family: Family) -> int:
    """The resolution a model's config implies: its image_size, or for NaFlex the square that fills
    its position table (num_patches)."""
    if family.patchified:
        return math.isqrt(int(config.num_patches)) * size_pair(config.patch_size)[0]
    return size_pair(config.image_size)[0]


class VisionBackbone(nn.Module):
    """A frozen (by default) Hugging Face vision transformer behind one interface.

    The wrapped model always stays in eval mode, even when a parent module is put in train mode:
    dropout, drop-path and DINOv3's RoPE coordinate augmentation must never fire on a backbone that
    serves as a fixed feature extractor or stitching target (model_stitching.md §4.5).

    `resample` is the PIL filter `preprocess` resizes with: a checkpoint's own (load_backbone reads it),
    else DEFAULT_RESAMPLE (bicubic) for a module that has no processor.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_size: int | None = None,
        mean=None,
        std=None,
        max_num_patches: int | None = None,
        resample: int | None = None,
        trainable: bool = False,
    ):
        super().__init__()
        self.model = vision_tower(model)
        config = getattr(self.model, "config", None)
        self.family = family_of(config)
        self.patch_size = size_pair(config.patch_size)[0]
        self.hidden_size = int(config.hidden_size)
        self.num_prefix_tokens = int(self.family.has_cls) + int(getattr(config, "num_register_tokens", 0) or 0)
        self.mean = tuple(float(m) for m in (mean if mean is not None else self.family.mean))
        self.std = tuple(float(s) for s in (std if std is not None else self.family.std))
        self.resample = resampling_filter(resample) if resample is not None else DEFAULT_RESAMPLE
        # NaFlex has no fixed resolution: each image keeps its aspect ratio within max_num_patches,
        # and image_size is the side of the square that fills that budget.
        if self.family.patchified and max_num_patches and not image_size:
            image_size = math.isqrt(max_num_patches) * self.patch_size
        self.image_size = int(image_size or default_image_size(config, self.family))
        self.max_num_patches = None
        if self.family.patchified:
            self.max_num_patches = int(max_num_patches or (self.image_size // self.patch_size) ** 2)
        if find_module(self.model, BLOCK_PATHS) is None or find_module(self.model, FINAL_NORM_PATHS) is None:
            raise IncompatibleError(
                f"{type(self.model).__name__}: found no blocks at {BLOCK_PATHS} or no final norm at {FINAL_NORM_PATHS}"
            )
        # CLIP/SigLIP/ViT raise on a non-native size unless told to interpolate their position table.
        self._embeddings_interpolate = "interpolate_pos_encoding" in inspect.signature(
            self.model.embeddings.forward
        ).parameters
        self._native_size = None if self.family.patchified else size_pair(config.image_size)
        self.model.requires_grad_(trainable)
        self.model.eval()

    # ---- structure -------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return find_module(self.model, BLOCK_PATHS)

    @property
    def final_norm(self) -> nn.Module:
        return find_module(self.model, FINAL_NORM_PATHS)

    @property
    def head(self) -> nn.Module | None:
        """SigLIP's attention-pooling (MAP) head, if the checkpoint has one."""
        return getattr(self.model, "head", None)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block(self, i: int) -> nn.Module:
        return self.blocks[i]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> VisionBackbone:
        super().train(mode)
        self.model.eval()
        return self

    # ---- pixels ----------------------------------------------------------------------------

    def preprocess(self, images) -> torch.Tensor | PatchifiedPixels:
        """PIL images or a uint8 (N, H, W, 3) batch -> float32 pixels at this model's resolution.

        Fixed-resolution models: (N, 3, image_size, image_size). NaFlex: `PatchifiedPixels`.
        """
        if self.family.patchified:
            return preprocess_naflex(
                images, self.patch_size, self.max_num_patches, self.mean, self.std, self.resample
            )
        return preprocess_fixed(images, self.image_size, self.mean, self.std, self.resample)

    def _model_input(self, px) -> torch.Tensor | PatchifiedPixels:
        if self.family.patchified and isinstance(px, torch.Tensor):
            px = full_patchified(px, self.patch_size)
        if isinstance(px, PatchifiedPixels) and not self.family.patchified:
            raise IncompatibleError(f"{type(self.model).__name__} takes (N, 3, H, W) pixels, not patchified ones")
        return px.to(device=self.device, dtype=self.dtype)

    def grid_size(self, px) -> tuple[int, int]:
        """The patch grid (rows, cols) these pixels give."""
        grid = self._grid(px)
        if grid is None:
            raise IncompatibleError("the images of this NaFlex batch have different patch grids")
        return grid

    def _grid(self, px) -> tuple[int, int] | None:
        if isinstance(px, PatchifiedPixels):
            shapes = px.spatial_shapes
            if not bool((shapes == shapes[0]).all()):
                return None
            return int(shapes[0, 0]), int(shapes[0, 1])
        return px.shape[-2] // self.patch_size, px.shape[-1] // self.patch_size

    # ---- forward pieces --------------------------------------------------------------------

    def context(self, px) -> BlockContext:
        """The block context for these pixels, without computing the embeddings."""
        px = self._model_input(px)
        ctx = BlockContext(grid=self._grid(px))
        rope = getattr(self.model, "rope_embeddings", None)
        if rope is not None:
            ctx.position_embeddings = rope(px)
        if isinstance(px, PatchifiedPixels):
            from transformers.masking_utils import create_bidirectional_mask

            ctx.pixel_attention_mask = px.pixel_attention_mask
            ctx.spatial_shapes = px.spatial_shapes
            # The mask's form (None, bool or additive float) depends on the attention implementation;
            # transformers builds it from the embeddings' shape, dtype and device only.
            shape_like = px.pixel_values.new_empty(*px.pixel_values.shape[:2], self.hidden_size)
            ctx.attention_mask = create_bidirectional_mask(
                config=self.model.config, inputs_embeds=shape_like, attention_mask=px.pixel_attention_mask
            )
        return ctx

    def embed(self, px) -> tuple[torch.Tensor, BlockContext]:
        """Pixels -> the tokens that enter block 0 (HF hidden_states[0]) and the block context."""
        px = self._model_input(px)
        ctx = self.context(px)
        if isinstance(px, PatchifiedPixels):
            tokens = self.model.embeddings(px.pixel_values, px.spatial_shapes)
        elif self._embeddings_interpolate and tuple(px.shape[-2:]) != self._native_size:
            tokens = self.model.embeddings(px, interpolate_pos_encoding=True)
        else:
            tokens = self.model.embeddings(px)
        pre_norm = getattr(self.model, "pre_layrnorm", None)  # CLIP (sic), applied before block 0
        if pre_norm is not None:
            tokens = pre_norm(tokens)
        return tokens, ctx

    call_block = staticmethod(call_block)

    def run_blocks(self, tokens: torch.Tensor, start: int | None, end: int | None, ctx: BlockContext) -> torch.Tensor:
        """Run blocks[start:end] (0-indexed, python-slice semantics)."""
        for block in self.blocks[start:end]:
            tokens = call_block(block, tokens, ctx)
        return tokens

    def final(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last-block tokens -> the model's own last_hidden_state (identity for CLIP, see module doc)."""
        return self.final_norm(tokens) if self.family.final_norms_tokens else tokens

    def pool(self, final_tokens: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        """final() tokens -> (B, D), the model's own pooled output (see module doc).

        NaFlex batches with padding need `ctx` so that padding is left out of the pooling.
        """
        padding_mask = ctx.pixel_attention_mask if ctx is not None else None
        if self.head is not None:
            return self.head(final_tokens, padding_mask) if self.family.patchified else self.head(final_tokens)
        if not self.family.final_norms_tokens:
            return self.final_norm(final_tokens[:, 0])
        if self.num_prefix_tokens:
            return final_tokens[:, 0]
        if padding_mask is None:
            return final_tokens.mean(dim=1)
        weights = padding_mask.to(final_tokens.dtype).unsqueeze(-1)
        return (final_tokens * weights).sum(dim=1) / weights.sum(dim=1)

    # ---- whole passes ----------------------------------------------------------------------

    def forward_features(self, px) -> torch.Tensor:
        """Pixels -> final tokens (== the model's own last_hidden_state)."""
        tokens, ctx = self.embed(px)
        return self.final(self.run_blocks(tokens, 0, None, ctx))

    forward = forward_features

    def hidden_states(self, px) -> list[torch.Tensor]:
        """N+1 tensors like HF's output_hidden_states: [0] the embeddings, [k] block k's raw output."""
        tokens, ctx = self.embed(px)
        states = [tokens]
        for block in self.blocks:
            tokens = call_block(block, tokens, ctx)
            states.append(tokens)
        return states
