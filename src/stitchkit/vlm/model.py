"""One interface over Hugging Face VLMs: interleaved multi-image prompts, generate, score, policies, pooling.

    vlm = load_vlm("llava-hf/llava-onevision-qwen2-0.5b-si-hf")   # or Qwen2-VL, or a local folder
    vlm.generate([img1, img2, img3], "How many dogs are there?")   # images first, greedy
    vlm.score([img1], "The ID of this image is", [" ar413", " fl346"])
    vlm.policy = AttentionPolicy(masked_layers="default")          # MIMIC's block-diagonal mask
    vlm.pool_factor = 4                                            # MIMIC's 1-D pooling probe

A prompt's images go first (joined by spaces, then a newline, then the text: MIMIC's layout) or, with
image_layout="markers", where the text has the marker "<image>". The user turn is wrapped in the model's
chat template when it has one, after the family's default system turn (the adapter's system_prompt). Batches are
left-padded.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stitchkit.errors import InputError, StitchkitError
from stitchkit.vlm.adapters import Adapter, adapter_for
from stitchkit.vlm.attention import AttentionPolicy, Probe, VisionLayout, install_attention, text_config_of
from stitchkit.vlm.pooling import PoolPad, check_pool_factor, compact, pool_image_features, pooled_length, pooling_keep_mask
from stitchkit.vlm.spans import ImageSpan, find_image_spans

IMAGE_MARKER = "<image>"
ImageLayout = Literal["first", "markers"]
IGNORE_INDEX = -100


@dataclass
class VLMBatch:
    """A processed, padded batch and everything derived from it.

    text: input_ids, attention_mask (and mm_token_type_ids for Qwen), after pooling's shortening.
    pixels: the processor's vision inputs (pixel_values, image_sizes, image_grid_thw, ...).
    position_ids: (B, S) or (3, B, S) for M-RoPE.
    spans: every row's image spans, found in text["input_ids"].
    labels: (B, S) next-token targets (IGNORE_INDEX off the response), when responses were given.
    """

    text: dict[str, torch.Tensor]
    pixels: dict[str, torch.Tensor]
    position_ids: torch.Tensor
    spans: list[list[ImageSpan]]
    pool_factor: int = 1
    labels: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.text["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.text["attention_mask"]

    def to(self, device, non_blocking: bool = False) -> "VLMBatch":
        move = lambda d: {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in d.items()}  # noqa: E731
        labels = self.labels.to(device, non_blocking=non_blocking) if self.labels is not None else None
        return VLMBatch(move(self.text), move(self.pixels), self.position_ids.to(device), self.spans, self.pool_factor, labels, self.prompts)


@dataclass(frozen=True)
class CandidateScore:
    text: str
    token_ids: tuple[int, ...]
    logprob: float  # log p(candidate tokens | prompt), summed over its tokens
    first_token_logit: float  # the raw logit of its first token after the prompt (visual-stitching ranking)
    first_token_logprob: float


def as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] in (3, 4) and image.dtype == np.uint8:
        return Image.fromarray(image[..., :3])
    raise InputError(f"an image must be a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__} {getattr(image, 'shape', '')}")


class VLM:
    """A Hugging Face VLM with its processor, adapter, attention policy and pooling factor."""

    def __init__(
        self,
        model,
        processor,
        *,
        policy: AttentionPolicy | None = None,
        pool_factor: int = 1,
        pool_pad: PoolPad = "exclude",
        image_layout: ImageLayout = "first",
        chat_template: bool = True,
        image_transform: Callable[[Image.Image], Image.Image] | None = None,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row at the same column
        self.adapter: Adapter = adapter_for(model, processor)
        install_attention(model)
        self.policy = policy or AttentionPolicy()
        self.pool_factor = pool_factor
        self.pool_pad = pool_pad
        self.image_layout = image_layout
        self.chat_template = chat_template
        # applied to every image before the processor (e.g. the official Qwen pipeline's fetch_image resize)
        self.image_transform = image_transform

    # ---- settings ----
    @property
    def pool_factor(self) -> int:
        return self._pool_factor

    @pool_factor.setter
    def pool_factor(self, factor: int) -> None:
        self._pool_factor = check_pool_factor(factor)

    @property
    def num_layers(self) -> int:
        return int(text_config_of(self.model).num_hidden_layers)

    @property
    def masked_layers(self) -> frozenset[int]:
        return self.policy.layers(self.num_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_ids(self) -> set[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- prompts ----
    def build_prompt(self, text: str, n_images: int) -> str:
        """The full prompt text for one sample: images placed, user turn in the chat template."""
        placeholder = self.adapter.image_placeholder
        if self.image_layout == "first":
            if IMAGE_MARKER in text:
                raise InputError(f"the prompt has {IMAGE_MARKER} markers; use image_layout='markers' to place images there")
            user = (" ".join([placeholder] * n_images) + "\n" + text) if n_images else text
        else:
            found = text.count(IMAGE_MARKER)
            if found != n_images:
                raise InputError(f"the prompt has {found} {IMAGE_MARKER} markers but {n_images} images were given")
            user = text.replace(IMAGE_MARKER, placeholder) if placeholder != IMAGE_MARKER else text
        if not self.chat_template:
            return user
        system = self.adapter.system_prompt
        turns = [("user", user)] if system is None else [("system", system), ("user", user)]
        if getattr(self.processor, "chat_template", None):  # processor templates read a list of content items
            messages = [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in turns]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": role, "content": text} for role, text in turns]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return user

    # ---- encoding ----
    def encode(
        self,
        images: Sequence[Sequence[Any]],
        prompts: Sequence[str],
        responses: Sequence[str] | None = None,
    ) -> VLMBatch:
        """Process a batch: images[i] are the images of prompts[i]. With responses, each row is
        prompt + response + end-of-turn and `labels` supervise the response tokens only."""
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} image lists")
        n_images = [len(row) for row in images]
        texts = [self.build_prompt(p, n) for p, n in zip(prompts, n_images)]
        response_ids = None
        if responses is not None:
            eos = self.tokenizer.eos_token or ""
            response_ids = [self.tokenizer(r + eos, add_special_tokens=False)["input_ids"] for r in responses]
            texts = [t + r + eos for t, r in zip(texts, responses)]
        pil = [[as_pil(im) for im in row] for row in images]
        if self.image_transform is not None:
            pil = [[self.image_transform(im) for im in row] for row in pil]
        kwargs = {"images": pil} if any(n_images) else {}
        # A chat template that writes the BOS itself (Gemma's) must not get a second one from the tokenizer: the
        # rule of Hugging Face's own apply_chat_template(tokenize=True).
        bos = self.tokenizer.bos_token
        if bos and all(t.startswith(bos) for t in texts):
            kwargs["add_special_tokens"] = False
        processed = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        processed = {k: v for k, v in processed.items()}
        sizes = [(im.height, im.width) for row in pil for im in row]
        counts = self.adapter.tokens_per_image(processed, sizes) if sizes else []
        spans = self._find_spans(processed["input_ids"], n_images, counts)

        keep = None
        if self.pool_factor > 1 and any(n_images):
            keep = pooling_keep_mask(spans, processed["input_ids"].shape[1], self.pool_factor, self.adapter.trailing_separators)
            keep &= processed["attention_mask"].bool()  # old padding goes too; compaction re-pads to the new width
        position_ids = self.adapter.positions(processed, keep, compact)
        text_keys = [k for k in processed if k not in self.adapter.pixel_keys()]
        text = {k: processed[k] for k in text_keys}
        if keep is not None:
            pads = {"input_ids": self.tokenizer.pad_token_id or 0}
            text = {k: compact(v, keep, pads.get(k, 0)) for k, v in text.items()}
            spans = self._find_spans(text["input_ids"], n_images, self._pooled_counts(spans))
        pixels = {k: processed[k] for k in processed if k in self.adapter.pixel_keys()}
        labels = self._labels(text["input_ids"], response_ids) if response_ids is not None else None
        return VLMBatch(text, pixels, position_ids, spans, self.pool_factor, labels, texts)

    def _find_spans(self, input_ids, n_images: list[int], counts: list[int] | None) -> list[list[ImageSpan]]:
        adapter = self.adapter
        return find_image_spans(input_ids, adapter.image_token_id, n_images, counts, adapter.open_ids, adapter.close_ids)

    def _pooled_counts(self, spans: list[list[ImageSpan]]) -> list[int]:
        """Placeholder tokens per image after pooling: ceil(body / f) plus the trailing separators."""
        trailing = self.adapter.trailing_separators
        bodies = [s.tokens[1] - s.tokens[0] - trailing for row in spans for s in row]
        return [pooled_length(body, self.pool_factor) + trailing for body in bodies]

    def _labels(self, input_ids: torch.Tensor, response_ids: list[list[int]]) -> torch.Tensor:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, ids in enumerate(response_ids):
            n = len(ids)
            # Rows are left-padded, so every response ends the row.
            if input_ids[row, -n:].tolist() != ids:
                raise StitchkitError(
                    "the response does not tokenise the same inside the prompt as alone; "
                    "end prompts with whitespace or a special token"
                )
            labels[row, -n:] = input_ids[row, -n:]
        return labels

    # ---- forward ----
    def layout(self, batch: VLMBatch, probe: Probe | None = None) -> VisionLayout:
        """What every forward's attention layers read: the policy applied to this batch. A row that the policy
        runs dense (legacy_maxlen_fallback) is given no image spans, so no layer masks it."""
        spans = batch.spans
        if self.policy.legacy_maxlen_fallback is not None:  # only then read the lengths (a device sync)
            lengths = batch.attention_mask.sum(-1).tolist()
            spans = [[] if self.policy.runs_dense(n, self.model.training) else row for row, n in zip(spans, lengths)]
        return VisionLayout.build(spans, batch.input_ids.shape[1], self.masked_layers, self.policy.kernel, probe, batch.attention_mask)

    def model_kwargs(self, batch: VLMBatch, probe: Probe | None = None) -> dict[str, Any]:
        """The keyword arguments of one Hugging Face forward over `batch` (what training calls the model with)."""
        kwargs: dict[str, Any] = {**batch.text, "position_ids": batch.position_ids}
        kwargs["vision_layout"] = self.layout(batch, probe)
        if batch.pool_factor == 1 or not batch.pixels:
            kwargs.update(batch.pixels)
        else:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            features = self.adapter.image_features(batch.pixels)
            pooled = pool_image_features(features, batch.pool_factor, self.adapter.trailing_separators, self.pool_pad)
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        return kwargs

    def forward(self, batch: VLMBatch, probe: Probe | None = None, **kwargs):
        """One forward of the Hugging Face model over the batch, under the current policy and pooling."""
        batch = batch.to(self.device)
        return self.model(**self.model_kwargs(batch, probe), **kwargs)

    __call__ = forward

    # ---- generation ----
    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens: int = 16) -> list[str] | str:
        """Greedy decoding (MIMIC decodes greedily); one prompt (a list of images and a str) or a batch.

        The prompt runs once through `forward` (policy, pooling), then one token at a time on the cache;
        generated tokens are text, so they attend to every earlier token in every layer.
        """
        single = isinstance(prompts, str)
        images, prompts = ([images], [prompts]) if single else (images, prompts)
        tokens = self.generate_ids(images, prompts, max_new_tokens)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
        return texts[0] if single else texts

    @torch.no_grad()
    def generate_ids(self, images, prompts, max_new_tokens: int = 16) -> list[list[int]]:
        """The greedy continuation token ids of every row, up to and without its first end-of-sequence token."""
        batch = self.encode(images, prompts).to(self.device)
        out = self.forward(batch, use_cache=True, logits_to_keep=1)  # only the next token's logits
        cache, mask, positions = out.past_key_values, batch.attention_mask, batch.position_ids
        eos = torch.tensor(sorted(self.eos_token_ids), device=self.device)
        rows = batch.input_ids.shape[0]
        generated = torch.empty(rows, 0, dtype=torch.long, device=self.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            generated = torch.cat([generated, token[:, None]], dim=1)
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            step_positions = self.adapter.next_positions(positions, 1)
            positions = torch.cat([positions, step_positions], dim=-1)
            out = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=step_positions, past_key_values=cache, use_cache=True
            )
        result = []
        for row in generated.tolist():
            ends = [i for i, t in enumerate(row) if t in self.eos_token_ids]
            result.append(row[: ends[0]] if ends else row)
        return result

    # ---- scoring ----
    @torch.no_grad()
    def score(self, images, prompt: str, candidates: Sequence[str], batch_size: int = 32) -> list[CandidateScore]:
        """Every candidate continuation's full log-probability and first-token logit after one prompt.

        The prompt (with its images) is encoded by ONE forward; candidates are then run together on copies
        of its cache, `batch_size` at a time (single-token candidates need no second forward). A candidate
        is tokenised alone (no special tokens), so include its leading space if the text has one.
        """
        if not candidates:
            raise InputError("score needs at least one candidate")
        if not self.chat_template and prompt[-1:].isspace():
            # The candidates are tokenised apart from the prompt, so a space on the prompt's side would be tokenised
            # differently from the same text in one piece (byte-level BPE glues a space to the next word).
            raise InputError(f"score: the prompt ends with whitespace ({prompt[-12:]!r}); put the space at the start "
                             "of each candidate (' ar413') instead")
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
        empty = [c for c, t in zip(candidates, ids) if not t]
        if empty:
            raise InputError(f"candidates that tokenise to nothing: {empty}")
        batch = self.encode([images], [prompt]).to(self.device)
        out = self.forward(batch, use_cache=True, logits_to_keep=1)
        first = out.logits[0, -1].float()
        first_logprobs = F.log_softmax(first, dim=-1)
        logprobs = [float(first_logprobs[t[0]]) for t in ids]

        longer = [i for i, t in enumerate(ids) if len(t) > 1]
        for chunk_start in range(0, len(longer), batch_size):
            chunk = longer[chunk_start : chunk_start + batch_size]
            for i, value in zip(chunk, self._continuation_logprobs(batch, out.past_key_values, [ids[i] for i in chunk])):
                logprobs[i] += value
        return [
            CandidateScore(c, tuple(t), lp, float(first[t[0]]), float(first_logprobs[t[0]]))
            for c, t, lp in zip(candidates, ids, logprobs)
        ]

    def _continuation_logprobs(self, batch: VLMBatch, cache, candidates: list[list[int]]) -> list[float]:
        """log p(t_1 .. t_n | prompt, t_0) for every candidate, all on one copy of the prompt's cache."""
        n = len(candidates)
        width = max(len(t) for t in candidates) - 1
        inputs = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for row, t in enumerate(candidates):  # right-padded: real tokens never see the padding after them
            inputs[row, : len(t) - 1] = torch.tensor(t[:-1])
            targets[row, : len(t) - 1] = torch.tensor(t[1:])
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(n)
        mask = torch.cat([batch.attention_mask.expand(n, -1), (targets != IGNORE_INDEX).long()], dim=1)
        positions = self.adapter.next_positions(batch.position_ids, width)
        positions = positions.expand(*positions.shape[:-2], n, width)
        logits = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
        token_logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return (token_logprobs * (targets != IGNORE_INDEX)).sum(-1).tolist()

    # ---- saving ----
    def save_pretrained(self, folder) -> None:
        """Save model and processor so that from_pretrained + AutoProcessor load them (no stitchkit needed)."""
        from stitchkit.vlm.attention import uninstall_attention

        uninstall_attention(self.model)
        try:
            self.model.save_pretrained(folder)
            self.processor.save_pretrained(folder)
        finally:
            install_attention(self.model)
