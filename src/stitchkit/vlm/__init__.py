"""One VLM interface over Hugging Face VLMs (LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL, generic image-text-to-text).

    model.py      VLM: interleaved multi-image prompts, encode, forward, generate (greedy), score
    adapters.py   what differs between families: placeholders, token counts, separators, positions
    spans.py      every image's [start, end) token span: the one source for masking, pooling, analysis
    attention.py  per-layer attention policies (dense / image-block-diagonal) via AttentionInterface,
                  the fast masked kernel, allowed-pair and FLOPs formulas
    pooling.py    1-D average pooling of vision tokens inside each image
    analysis.py   inter- vs intra-image attention, an N x N matrix per layer
    finetune.py   LoRA (peft) or full fine-tuning on the engine, with any attention policy active
    micro.py      the micro VLM: LLaVA-OneVision with a micro zoo vision tower, trained on the shapes world
    loading.py    load_vlm, and processors without torchvision
"""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.vlm.attention import (
        AttentionPolicy,
        VisionLayout,
        attention_core_flops,
        causal_pairs,
        install_attention,
        layout_pairs,
        masked_pairs,
        parse_layer_spec,
        uninstall_attention,
    )
    from stitchkit.vlm.loading import build_processor, load_processor, load_vlm
    from stitchkit.vlm.model import IMAGE_MARKER, CandidateScore, VLM, VLMBatch
    from stitchkit.vlm.pooling import POOL_FACTORS, average_pool_tokens, pooled_length
    from stitchkit.vlm.spans import ImageSpan, block_ids, find_image_spans

__all__ = [
    "IMAGE_MARKER",
    "POOL_FACTORS",
    "AttentionPolicy",
    "CandidateScore",
    "ImageSpan",
    "VLM",
    "VLMBatch",
    "VisionLayout",
    "attention_core_flops",
    "average_pool_tokens",
    "block_ids",
    "build_processor",
    "causal_pairs",
    "find_image_spans",
    "install_attention",
    "layout_pairs",
    "load_processor",
    "load_vlm",
    "masked_pairs",
    "parse_layer_spec",
    "pooled_length",
    "uninstall_attention",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "attention": [
            "AttentionPolicy",
            "VisionLayout",
            "attention_core_flops",
            "causal_pairs",
            "install_attention",
            "layout_pairs",
            "masked_pairs",
            "parse_layer_spec",
            "uninstall_attention",
        ],
        "loading": ["build_processor", "load_processor", "load_vlm"],
        "model": ["IMAGE_MARKER", "CandidateScore", "VLM", "VLMBatch"],
        "pooling": ["POOL_FACTORS", "average_pool_tokens", "pooled_length"],
        "spans": ["ImageSpan", "block_ids", "find_image_spans"],
    },
)
