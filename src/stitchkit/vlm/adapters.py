"""What differs between VLM families, and nothing else: each adapter is a few small methods.

    image_placeholder   the text that stands for one image in a prompt
    system_prompt       the default system turn of the family's official prompt, if its chat template lacks it
    tokens_per_image    how many placeholder tokens each image of a processed batch expands to
    open_ids/close_ids  separator tokens that belong to an image's span
    image_features      the post-projector tokens of every image (for pooling)
    positions           position ids of a prefilled batch, and of the tokens that follow it

LLaVA-OneVision and generic LLaVA-style models use 1-D positions counted over real tokens (as
`generate` does, so a padded row gets the positions it has alone). Qwen2-VL / Qwen2.5-VL use M-RoPE
(3, B, S) positions from the model's own `get_rope_index`.
"""

from __future__ import annotations

import torch

from stitchkit.errors import IncompatibleError
from stitchkit.vlm.tokenizer import CHAT_TEMPLATE


class Adapter:
    """Generic image-text-to-text model: the image token expands in place; each run of it is one image."""

    family = "generic"
    open_ids: frozenset[int] = frozenset()
    close_ids: frozenset[int] = frozenset()
    trailing_separators = 0  # feature tokens at the end of each image that pooling leaves alone
    mrope = False
    system_prompt: str | None = None  # prepended as a system turn when set

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.image_token_id = self._image_token_id()
        if uses_word_level_template(processor):
            # stitchkit's own ChatML template (the micro VLM, the tests' tiny models) has no system turn: those
            # models are trained and evaluated without one, so their prompts stay as they were built.
            self.system_prompt = None

    def _image_token_id(self) -> int:
        for owner, name in ((self.model.config, "image_token_id"), (self.model.config, "image_token_index"), (self.processor, "image_token_id")):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
        raise IncompatibleError(f"{type(self.model).__name__}: cannot find the id of its image token")

    @property
    def image_placeholder(self) -> str:
        token = getattr(self.processor, "image_token", None) or self.processor.tokenizer.convert_ids_to_tokens(self.image_token_id)
        return token

    def tokens_per_image(self, processed, image_sizes: list[tuple[int, int]]) -> list[int] | None:
        """Placeholder tokens of every image (original (height, width) sizes given), or None: one run each."""
        counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
        try:  # transformers' per-processor rule (the one vLLM uses); not every processor has it
            counts = counter(image_sizes=image_sizes)["num_image_tokens"] if counter else None
        except (NotImplementedError, KeyError, TypeError, AttributeError):
            counts = None
        return [int(c) for c in counts] if counts is not None and len(counts) == len(image_sizes) else None

    def image_features(self, processed) -> list[torch.Tensor]:
        raise IncompatibleError(
            f"vision-token pooling is implemented for LLaVA-OneVision and Qwen2-VL / Qwen2.5-VL, not {self.model.config.model_type}"
        )

    def pixel_keys(self) -> tuple[str, ...]:
        """Processor outputs that feed the vision tower (dropped when pooled features are given instead)."""
        return ("pixel_values", "image_sizes", "batch_num_images", "image_grid_thw", "pixel_attention_mask")

    # ---- positions ----
    def positions(self, processed, keep: torch.Tensor | None, compact) -> torch.Tensor:
        """Position ids of the final (pooled, compacted) batch. `keep` (B, S) marks the tokens pooling keeps
        of the processed batch; `compact(x, keep, pad)` applies it to a (..., B, S) tensor."""
        mask = processed["attention_mask"] if keep is None else compact(processed["attention_mask"], keep, 0)
        return mask.long().cumsum(-1).sub(1).masked_fill(mask == 0, 1)

    def next_positions(self, positions: torch.Tensor, n: int) -> torch.Tensor:
        """Positions of n tokens that follow a prefilled batch whose positions are `positions`."""
        last = positions.amax(dim=-1, keepdim=True)
        return last + torch.arange(1, n + 1, device=positions.device)


class LlavaOnevisionAdapter(Adapter):
    """LLaVA-OneVision: every image is one run of <image> tokens whose last is the image-newline feature
    (multi-image rows: base features + newline; single-image rows: anyres base + grid rows with newlines)."""

    family = "llava_onevision"
    trailing_separators = 1
    # The official protocol wraps the turn in LLaVA-NeXT's qwen_1_5 conversation, which opens with this system
    # turn (mimic.md §3); llava-hf's chat template adds none by itself. (Qwen2-VL's template inserts its own.)
    system_prompt = "You are a helpful assistant."

    def tokens_per_image(self, processed, image_sizes) -> list[int] | None:
        # The processor's own rule (single-image rows are anyres, multi-image rows are not) for how many tokens an image expands to.
        n_images = int(processed["batch_num_images"].sum()) if "batch_num_images" in processed else 0
        token = self.processor.image_token
        return [len(self.processor.replace_image_token(processed, i)) // len(token) for i in range(n_images)]

    def image_features(self, processed) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(
            processed["pixel_values"],
            processed["image_sizes"],
            batch_num_images=processed.get("batch_num_images"),
            return_dict=True,
        )
        return list(out.pooler_output)


class QwenVLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: <|vision_start|> <|image_pad|> x (t h w / merge^2) <|vision_end|>, M-RoPE."""

    family = "qwen2_vl"
    mrope = True

    def __init__(self, model, processor):
        super().__init__(model, processor)
        config = model.config
        self.open_ids = frozenset({config.vision_start_token_id})
        self.close_ids = frozenset({config.vision_end_token_id})

    @property
    def image_placeholder(self) -> str:
        tokenizer = self.processor.tokenizer
        start, end = (tokenizer.convert_ids_to_tokens(i) for i in (*self.open_ids, *self.close_ids))
        return f"{start}{self.processor.image_token}{end}"

    def tokens_per_image(self, processed, image_sizes) -> list[int] | None:
        if "image_grid_thw" not in processed:
            return []
        merge = self.processor.image_processor.merge_size
        return (processed["image_grid_thw"].prod(-1) // merge**2).tolist()

    def image_features(self, processed) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(processed["pixel_values"], processed["image_grid_thw"], return_dict=True)
        return list(out.pooler_output)

    def positions(self, processed, keep, compact) -> torch.Tensor:
        if "image_grid_thw" not in processed:
            return super().positions(processed, keep, compact).unsqueeze(0).expand(3, -1, -1)
        rope_kwargs = {k: processed[k] for k in ("image_grid_thw", "second_per_grid_ts") if k in processed}
        positions, _ = self.model.model.get_rope_index(
            processed["input_ids"],
            mm_token_type_ids=processed["mm_token_type_ids"],
            attention_mask=processed["attention_mask"],
            **rope_kwargs,
        )
        # A pooled image token keeps the M-RoPE position of the first token of its group.
        return positions if keep is None else compact(positions, keep, 1)

    def next_positions(self, positions: torch.Tensor, n: int) -> torch.Tensor:
        # After the prompt, text positions continue from the largest position of any axis (as M-RoPE does).
        last = positions.amax(dim=(0, -1), keepdim=False)[:, None]
        following = last + torch.arange(1, n + 1, device=positions.device)
        return following.unsqueeze(0).expand(3, -1, -1)


ADAPTERS: dict[str, type[Adapter]] = {
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": QwenVLAdapter,
}


def adapter_for(model, processor) -> Adapter:
    return ADAPTERS.get(model.config.model_type, Adapter)(model, processor)


def uses_word_level_template(processor) -> bool:
    """Whether the prompt's chat template (the processor's, else its tokenizer's) is stitchkit's own ChatML template
    (vlm.tokenizer.chat_template, for any image placeholder)."""
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    head, tail = CHAT_TEMPLATE.split("IMAGE_PLACEHOLDER")
    return isinstance(template, str) and template.startswith(head) and template.endswith(tail)
