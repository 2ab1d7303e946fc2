"""The binding transformer (binding.md §4): a Hugging Face decoder-only LM trained from scratch, plus the
projector that turns frozen encoder patch tokens into its inputs.

The LM is a LlamaForCausalLM or Qwen2ForCausalLM (config `arch`) of the paper's size by default: 12 layers,
d 128, 4 heads, FFN 512, RoPE base 10000, untied embeddings, init std 0.02. Both classes use RMSNorm and a
gated (SwiGLU-style) MLP; the reference proposes pre-LN + GELU, which no HF decoder class has exactly, so we take
the HF classes as they are (hidden_act gelu) rather than write our own transformer.

Image tokens enter through inputs_embeds: every IMG placeholder of a sequence is replaced, in order, by the
projected features of that sequence's image (row `image_index` of the feature bank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pydantic
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stitchkit.binding.task import IMG, PAD, Vocabulary
from stitchkit.config import Config, format_validation_error
from stitchkit.errors import InputError
from stitchkit.runs import atomic_path, atomic_write_json

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
META = "binding.json"
PROJECTOR = "projector.safetensors"


class ModelSettings(Config):
    arch: Literal["llama", "qwen2"] = "llama"
    layers: int = pydantic.Field(12, ge=1)
    hidden: int = pydantic.Field(128, ge=8)
    heads: int = pydantic.Field(4, ge=1)
    ffn: int = pydantic.Field(512, ge=1)
    rope_theta: float = pydantic.Field(10000.0, gt=0)
    max_positions: int = pydantic.Field(512, ge=16, description="the config's max_position_embeddings (HF computes RoPE on the fly; positions may exceed it)")
    projector_hidden: int = pydantic.Field(512, ge=1, description="MLP d_enc -> hidden -> d (GELU)")

    @pydantic.model_validator(mode="after")
    def _heads_divide(self) -> "ModelSettings":
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        return self


def lm_config(settings: ModelSettings, vocab: Vocabulary):
    config_class, _ = ARCHS[settings.arch]
    return config_class(
        vocab_size=vocab.size,
        hidden_size=settings.hidden,
        intermediate_size=settings.ffn,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        hidden_act="gelu",
        max_position_embeddings=settings.max_positions,
        rope_theta=settings.rope_theta,
        initializer_range=0.02,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation="sdpa",
    )


class BindingModel(nn.Module):
    """The LM and (when the run has image stages) the projector. `image_bank` (P, T, D_enc), set by the
    caller, holds the frozen encoder's patch tokens; it is data, not a parameter, and is never saved."""

    def __init__(self, settings: ModelSettings, vocab: Vocabulary, encoder_dim: int | None = None):
        super().__init__()
        self.settings, self.vocab = settings, vocab
        _, model_class = ARCHS[settings.arch]
        self.lm = model_class(lm_config(settings, vocab))
        self.projector = None
        if encoder_dim is not None:
            self.projector = nn.Sequential(
                nn.Linear(encoder_dim, settings.projector_hidden), nn.GELU(), nn.Linear(settings.projector_hidden, settings.hidden)
            )
        self.image_bank: torch.Tensor | None = None

    @property
    def encoder_dim(self) -> int | None:
        return None if self.projector is None else self.projector[0].in_features

    def embed(self, input_ids: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)
        is_image = input_ids == IMG
        if image_index is None or not bool(is_image.any()):
            return embeds
        if self.projector is None or self.image_bank is None:
            raise InputError("image examples need a projector and an image bank")
        rows = is_image.any(dim=1)
        features = self.image_bank[image_index[rows].to(self.image_bank.device)].to(embeds.device)
        projected = self.projector(features.to(self.projector[0].weight.dtype)).to(embeds.dtype)
        # Rows are in order and each image row has exactly T placeholders, so a flat assignment lines up.
        embeds = embeds.clone()
        embeds[is_image] = projected.reshape(-1, projected.shape[-1])
        return embeds

    def run(self, input_ids, position_ids=None, attention_mask=None, image_index=None, **kwargs):
        """The LM's output (logits for every position, hidden states if asked) for ids with IMG placeholders."""
        return self.lm(
            inputs_embeds=self.embed(input_ids, image_index),
            position_ids=position_ids,
            attention_mask=attention_mask,
            **kwargs,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) logits at each sequence's answer position (its last real token). The training forward, so
        that a DDP wrapper's call (which syncs gradients) is all the loss needs."""
        logits = self.run(batch["input_ids"], batch["position_ids"], batch["attention_mask"], batch.get("image_index")).logits
        return logits[torch.arange(len(logits), device=logits.device), batch["answer_pos"]]


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]):
    """Next-token cross-entropy on the answer token only (binding.md §2), and its accuracy."""
    logits = model(batch)
    loss = nn.functional.cross_entropy(logits.float(), batch["target"])
    return loss, {"accuracy": (logits.argmax(-1) == batch["target"]).float().mean()}


# ---- saving and loading ---------------------------------------------------------------------------------


def save_binding_model(model: BindingModel, folder: str | Path, extra: dict | None = None, with_projector: bool = True) -> Path:
    """folder/lm (save_pretrained), folder/projector.safetensors, folder/binding.json. `with_projector` False saves
    the LM alone, as a text-only model: a stage that has seen no images holds only the projector's untrained
    initial value, of whichever encoder's width its branch was built for."""
    folder = Path(folder)
    model.lm.save_pretrained(folder / "lm")
    projector = model.projector if with_projector else None
    if projector is not None:
        with atomic_path(folder / PROJECTOR) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}, str(tmp))
    meta = {
        "model": model.settings.model_dump(mode="json"),
        "vocab": {"colours": model.vocab.colours, "shapes": model.vocab.shapes, "items": model.vocab.items},
        "encoder_dim": None if projector is None else model.encoder_dim,
        **(extra or {}),
    }
    atomic_write_json(folder / META, meta)
    return folder


def is_binding_model(folder: str | Path) -> bool:
    return (Path(folder) / META).is_file()


def load_binding_model(folder: str | Path) -> tuple[BindingModel, dict]:
    """The model in a folder written by save_binding_model, and its binding.json; a missing or unreadable part is
    one InputError naming the folder and the file."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
        settings, vocab = ModelSettings(**meta["model"]), Vocabulary(**meta["vocab"])
    except pydantic.ValidationError as err:
        raise InputError(format_validation_error(err, f"{folder / META} (the binding model's settings)")) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{folder} is not a binding model folder ({META}): {err}") from None
    model = BindingModel(settings, vocab, meta.get("encoder_dim"))
    _require(folder, "lm/config.json")
    _require(folder, "lm/model.safetensors", "lm/model.safetensors.index.json")  # one file, or shards
    try:
        model.lm = AutoModelForCausalLM.from_pretrained(folder / "lm", attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: cannot load the binding model's LM (lm/): {err}") from None
    if model.projector is not None:  # binding.json's encoder_dim says the model has one
        _require(folder, PROJECTOR)
        try:
            model.projector.load_state_dict(load_file(str(folder / PROJECTOR)))
        except (OSError, RuntimeError, SafetensorError) as err:
            raise InputError(f"{folder}: cannot load the binding model's {PROJECTOR}: {err}") from None
    return model.eval(), meta


def _require(folder: Path, *names: str) -> None:
    """An InputError naming the folder and the file when none of `names` (alternatives) is in it."""
    if not any((folder / name).is_file() for name in names):
        raise InputError(f"{folder}: the binding model's {names[0]} is missing, so the model cannot load (an incomplete "
                         "copy? copy the whole model folder again)")
