"""Fine-tuning a VLM on the engine: LoRA through peft, or full fine-tuning, with any attention policy active.

MIMIC's recipe (mimic.md §6.2): LoRA r=128, alpha=32, dropout 0.05, no bias, on every linear layer of the
language model (not lm_head, not the vision tower or projector); the projector is trained fully; the
vision tower stays frozen; next-token cross-entropy on the response tokens only; the block mask is on in
every training forward. Full fine-tuning trains every language-model parameter (and the projector).

    samples = [Sample(images=[...], prompt="How many ...?", response="4"), ...]
    result = finetune(vlm, samples, FinetuneConfig(train=TrainConfig(steps=100, batch_size=8)), "runs/ft")
    merge_lora(vlm)   # fold the adapters into the weights (peft's merge_and_unload)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from stitchkit.backbones.backbone import find_module
from stitchkit.config import Config
from stitchkit.engine import TrainConfig, TrainResult, seed_everything, train
from stitchkit.errors import IncompatibleError
from stitchkit.vlm.attention import AttentionPolicy
from stitchkit.vlm.model import IGNORE_INDEX, VLM

PROJECTORS = ("multi_modal_projector", "merger")  # LLaVA-style projector; Qwen2-VL's patch merger


@dataclass(frozen=True)
class Sample:
    images: Sequence[Any]
    prompt: str
    response: str


class FinetuneConfig(Config):
    method: Literal["lora", "full"] = "lora"
    lora_r: int = pydantic.Field(128, ge=1)
    lora_alpha: float = pydantic.Field(32, gt=0)
    lora_dropout: float = pydantic.Field(0.05, ge=0, lt=1)
    train_projector: bool = True
    policy: AttentionPolicy | None = None  # None: the VLM's current policy
    train: TrainConfig


def language_model(model: nn.Module) -> nn.Module:
    module = find_module(model, ("model.language_model", "language_model", "model.model.language_model"))
    if module is not None:
        return module
    raise IncompatibleError(f"{type(model).__name__}: cannot find its language model")


def _module_names(model: nn.Module, within: nn.Module, kind: type) -> list[str]:
    inside = {id(m) for m in within.modules()}
    return [name for name, m in model.named_modules() if isinstance(m, kind) and id(m) in inside]


def projector_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name.split(".")[-1] in PROJECTORS]


def prepare(vlm: VLM, cfg: FinetuneConfig) -> None:
    """Freeze the model, then make trainable what the method trains (LoRA wraps vlm.model in peft)."""
    model = vlm.model
    model.requires_grad_(False)
    projectors = projector_names(model) if cfg.train_projector else []
    if cfg.method == "full":
        language_model(model).requires_grad_(True)
        for name in projectors:
            model.get_submodule(name).requires_grad_(True)
        if hasattr(model, "lm_head"):
            model.lm_head.requires_grad_(True)
        return
    from peft import LoraConfig, get_peft_model

    # LoRA's A matrices are drawn from the global RNG: seed it, or a process's first adapter is irreproducible.
    seed_everything(cfg.train.seed)
    targets = _module_names(model, language_model(model), nn.Linear)
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=targets,
        modules_to_save=[name.split(".")[-1] for name in projectors] or None,
    )
    with warnings.catch_warnings():
        # peft (0.21) reads transformers 5's deprecated `is_gradient_checkpointing`: a warning for them, not our users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        vlm.model = get_peft_model(model, config)


def merge_lora(vlm: VLM) -> None:
    """Fold LoRA adapters into the base weights; vlm.model becomes the plain Hugging Face model again."""
    if hasattr(vlm.model, "merge_and_unload"):
        vlm.model = vlm.model.merge_and_unload()


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised (response) tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def collate_for(vlm: VLM):
    """A collate function: samples -> {"inputs": model kwargs (vision layout included), "labels": ...}."""

    def collate(samples: list[Sample]) -> dict[str, Any]:
        batch = vlm.encode([s.images for s in samples], [s.prompt for s in samples], [s.response for s in samples])
        return {"inputs": vlm.model_kwargs(batch), "labels": batch.labels}

    return collate


def vlm_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """response_loss, with logits computed only where a response token is predicted: rows are left-padded, so
    every supervised token lies in the last `keep - 1` positions, and `logits_to_keep` skips the lm_head (and a
    (B, S, vocab) float tensor, GBs for real vocabularies) on the whole prompt."""
    labels = batch["labels"]
    supervised = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(supervised) == 0:
        raise IncompatibleError("a training batch without response tokens")
    keep = labels.shape[1] - int(supervised[0]) + 1  # from the position that predicts the first response token
    return response_loss(model(**batch["inputs"], logits_to_keep=keep).logits, labels[:, -keep:])


def finetune(
    vlm: VLM,
    samples: Sequence[Sample],
    cfg: FinetuneConfig,
    out_dir: str | Path | None,
    eval_fn=None,
    eval_every: int | None = None,
) -> TrainResult:
    """Train vlm.model on (images, prompt, response) samples with the engine (resumable in out_dir)."""
    if vlm.pool_factor != 1:
        raise IncompatibleError("fine-tuning runs on unpooled vision tokens; set vlm.pool_factor = 1")
    if cfg.policy is not None:
        vlm.policy = cfg.policy
    prepare(vlm, cfg)
    vlm.model.train()
    result = train(
        vlm.model,
        vlm_loss,
        list(samples),
        cfg.train,
        out_dir,
        collate_fn=collate_for(vlm),
        description=f"{cfg.method} fine-tuning",
        eval_fn=eval_fn,
        eval_every=eval_every,
    )
    vlm.model.eval()
    return result
