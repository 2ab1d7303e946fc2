"""Tiny random-init VLMs of the real Hugging Face classes, with processors built from a word-level tokenizer
and each model's own image processor class. Shared by tests/test_vlm*.py; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from stitchkit.vlm import build_processor
from stitchkit.vlm.tokenizer import CHAT_SPECIAL_TOKENS, chat_template, word_tokenizer

WORDS = (
    "question answer how many shapes are there in the image images red blue green yellow one two three four five "
    "is this what colour count which shape every star circle square triangle id of"
).split()
# The chat template llava-hf's LLaVA-OneVision checkpoints are saved with (transformers'
# convert_llava_onevision_weights_to_hf.py): no default system turn of its own.
LLAVA_HF_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def images(n: int, seed: int = 0, size=(20, 24)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa", chat: bool = True, template: str | None = None):
    """SigLIP 16 px / patch 4 (16 tokens + newline per image; anyres single images: 16 + 16 + 4), Qwen2 LM.
    template: a chat template instead of stitchkit's word-level one (e.g. LLAVA_HF_ONEVISION_TEMPLATE)."""
    template = template or (chat_template("<image>") if chat else None)
    tokenizer = word_tokenizer(WORDS, (*CHAT_SPECIAL_TOKENS, "<image>", "<video>"), chat_template=template)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=[[16, 16]])
    processor = build_processor(
        LlavaOnevisionProcessor, image_processor, tokenizer, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), **TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 16]],
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval(), processor


def tiny_qwen_vl(seed: int = 0, version: str = "2", attn_implementation: str = "sdpa"):
    """Qwen2-VL (or 2.5-VL): patch 4, merge 2, 20 x 24 px images -> 24 x 24 -> 3 x 3 = 9 merged tokens."""
    specials = (*CHAT_SPECIAL_TOKENS, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    tokenizer = word_tokenizer(WORDS, specials, chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    image_processor = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 64, "longest_edge": 1024})
    processor_class, config_class, model_class = {
        "2": (Qwen2VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "2.5": (Qwen2_5_VLProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[version]
    processor = build_processor(processor_class, image_processor, tokenizer, chat_template=tokenizer.chat_template)
    vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    if version == "2.5":
        vision = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=16, fullatt_block_indexes=[1])  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids
    config = config_class(
        vision_config=vision,
        text_config=dict(vocab_size=len(tokenizer), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, **TEXT,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),  # fmt: skip
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return model_class(config).eval(), processor


def tiny_llava(seed: int = 0):
    """LLaVA-1.5 (CLIP 16 px / patch 4 + Llama): the generic image-text-to-text path."""
    tokenizer = word_tokenizer(WORDS, (*CHAT_SPECIAL_TOKENS, "<image>"), chat_template=chat_template("<image>"))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = build_processor(LlavaProcessor, image_processor, tokenizer, patch_size=4, num_additional_image_tokens=1, vision_feature_select_strategy="default", chat_template=tokenizer.chat_template)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


# Gemma 3's chat template opens with the BOS itself (abridged: the same opening and turn markers).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_gemma3(seed: int = 0):
    """Gemma 3 (the generic path) with a tokenizer that adds BOS and a template that writes it too."""
    from tokenizers import processors
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ("<pad>", "<unk>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    backend = word_tokenizer((*WORDS, "user", "model"), specials, eos_token="<eos>", chat_template=GEMMA_TEMPLATE).backend_tokenizer
    ids = backend.token_to_id
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", ids("<bos>"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<bos>", chat_template=GEMMA_TEMPLATE,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    processor = build_processor(Gemma3Processor, Gemma3ImageProcessorPil(size={"height": 16, "width": 16}), tokenizer,
                                chat_template=GEMMA_TEMPLATE, image_seq_length=4)
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=64,
                         bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"), pad_token_id=ids("<pad>")),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4),
        mm_tokens_per_image=4, image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
    )  # fmt: skip
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config).eval(), processor
