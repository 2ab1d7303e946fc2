"""Vision-token pooling, the allowed-pair (FLOPs) formulas, and the attention analysis."""

from __future__ import annotations

import math

import pytest
import torch
from vlm_tiny import images, tiny_llava_onevision, tiny_qwen_vl

from stitchkit.vlm import AttentionPolicy, VisionLayout, average_pool_tokens, causal_pairs, layout_pairs, load_vlm, masked_pairs, pooled_length
from stitchkit.vlm.analysis import attention_analysis


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- pooling --------------------------------------------------------------------------------------------


def test_pooled_token_counts_of_a_729_token_image():
    assert [pooled_length(729, f) for f in (1, 2, 4, 8, 16)] == [729, 365, 183, 92, 46]


def test_average_pool_tokens_groups_and_tail():
    x = torch.arange(7 * 2, dtype=torch.float64).view(7, 2)
    pooled = average_pool_tokens(x, 3)
    expected = torch.stack([x[0:3].mean(0), x[3:6].mean(0), x[6:7].mean(0)])
    assert torch.equal(pooled, expected)  # the tail is averaged over what exists: no zero bias
    zeros = average_pool_tokens(x, 3, pad="zeros")
    assert torch.equal(zeros[:2], expected[:2]) and torch.equal(zeros[2], x[6] / 3)  # the official code's tail
    assert torch.equal(average_pool_tokens(x, 1), x)


def test_pooled_llava_onevision_forward_equals_hand_built_embeddings():
    model, processor = tiny_llava_onevision()
    vlm = load_vlm(model, processor, pool_factor=4)
    ims = images(5)
    rows, prompts = [ims[:2], ims[2:5]], ["how many shapes?", "which shape is red"]
    pooled_batch = vlm.encode(rows, prompts)
    # Spans: 16 tokens -> 4 pooled + the newline, per image; spans tile the image tokens exactly.
    assert [[len(s) for s in row] for row in pooled_batch.spans] == [[5, 5], [5, 5, 5]]
    with torch.no_grad():
        ours = vlm.forward(pooled_batch).logits

        # By hand: features from Hugging Face, averaged in groups of 4, newline kept, placed in a prompt with
        # 5 image tokens per image.
        vlm.pool_factor = 1
        full = vlm.encode(rows, prompts)
        features = model.model.get_image_features(
            full.pixels["pixel_values"], full.pixels["image_sizes"], batch_num_images=full.pixels["batch_num_images"]
        ).pooler_output
        pooled = [torch.cat([f[:16].view(4, 4, -1).mean(1), f[16:]]) for f in features]
        image_id = vlm.adapter.image_token_id
        sequences = []
        for row in full.input_ids.tolist():
            real = [t for t in row if t != processor.tokenizer.pad_token_id]
            out, i = [], 0
            while i < len(real):
                if real[i] == image_id:
                    out += [image_id] * 5  # one image of 17 tokens (the word tokenizer drops the space)
                    i += 17
                else:
                    out.append(real[i])
                    i += 1
            sequences.append(out)
        width = max(map(len, sequences))
        ids = torch.tensor([[processor.tokenizer.pad_token_id] * (width - len(s)) + s for s in sequences])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(s) for s in sequences])[:, None]).long()
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == image_id] = torch.cat(pooled)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        reference = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(pooled_batch.input_ids, ids)
    real = mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-5


def test_pooled_qwen_keeps_first_positions_and_masks_still_line_up():
    vlm = load_vlm(*tiny_qwen_vl())
    ims = images(3)
    full = vlm.encode([ims], ["how many shapes?"])
    vlm.pool_factor = 4
    pooled = vlm.encode([ims], ["how many shapes?"])
    # 6 merged tokens per image -> groups of 4 and 2 -> 2 tokens, plus <|vision_start|> and <|vision_end|>.
    assert [len(s) for s in pooled.spans[0]] == [4, 4, 4]
    for before, after in zip(full.spans[0], pooled.spans[0]):
        start = before.tokens[0]
        kept = full.position_ids[:, 0, [start, start + 4]]
        assert torch.equal(pooled.position_ids[:, 0, after.tokens[0] : after.tokens[1]], kept)
    assert torch.equal(full.position_ids[..., -5:], pooled.position_ids[..., -5:])  # text after the images
    vlm.policy = AttentionPolicy(masked_layers="all")
    layout = vlm.layout(pooled)
    prefix = pooled.spans[0][0].start  # the text before the first image is a segment of its own
    assert sorted((g.length, g.count) for g in layout.groups) == sorted([(4, 3), (prefix, 1)])
    assert len(vlm.generate(ims, "how many shapes?", max_new_tokens=3)) >= 0


# ---- allowed pairs and FLOPs (mimic.md §7) ------------------------------------------------------------


@pytest.mark.parametrize(
    "n_images, seq_len, per_layer, model_wide",
    [(2, 1510, 49.3, 24.6), (4, 2970, 73.8, 36.9), (5, 3700, 78.9, 39.4), (6, 4430, 82.3, 41.2), (10, 7350, 89.3, 44.7)],
)
def test_worked_flops_reductions(n_images, seq_len, per_layer, model_wide):
    prefix, suffix, tokens = 20, 30, 730
    assert prefix + n_images * tokens + suffix == seq_len
    reduction = 1 - masked_pairs(prefix, n_images, tokens, suffix) / causal_pairs(seq_len)
    assert round(100 * reduction, 1) == per_layer
    assert abs(100 * reduction * 12 / 24 - model_wide) <= 0.06


def test_layout_pairs_count_the_explicit_mask():
    vlm = load_vlm(*tiny_llava_onevision(), image_layout="markers")
    ims = images(4)
    batch = vlm.encode([ims[:3], ims[3:]], ["<image> how many <image> shapes <image>", "<image> what colour"])
    layout = VisionLayout.build(batch.spans, batch.input_ids.shape[1])
    real = batch.attention_mask.bool()
    seq = batch.input_ids.shape[1]
    ids = layout.block_ids.clone()
    ids[~layout.multi_image] = -1
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None] & real[:, None, :] & real[:, :, None]
    masked = causal & ((ids[:, :, None] < 0) | (ids[:, :, None] == ids[:, None, :]))
    assert layout_pairs(layout, batch.attention_mask) == (int(causal.sum()), int(masked.sum()))


# ---- attention analysis ---------------------------------------------------------------------------------


def analysis_by_hand(attentions, spans) -> torch.Tensor:
    """A_l[i, j] from Hugging Face's eager attention probabilities, one query at a time."""
    n = len(spans)
    result = torch.zeros(len(attentions), n, n)
    for layer, probs in enumerate(attentions):
        p = probs[0].mean(0).double()
        for i, span in enumerate(spans):
            rows = []
            for q in range(span.start, span.end):
                mass = torch.stack([p[q, s.start : s.end].sum() for s in spans])
                rows.append(mass / mass.sum())
            result[layer, i] = torch.stack(rows).mean(0).float()
    return result


def test_attention_analysis_matches_eager_attention_probabilities():
    model, processor = tiny_llava_onevision(attn_implementation="eager")
    ims = images(4)
    vlm = load_vlm(model, processor)
    samples = [(ims[:3], "how many shapes?"), (ims[1:4], "which shape is red")]
    analysis = attention_analysis(vlm, samples, batch_size=2)
    expected = torch.zeros(vlm.num_layers, 3, 3)
    with torch.no_grad():
        for sample_images, prompt in samples:
            batch = vlm.encode([sample_images], [prompt])
            attentions = model(**vlm.model_kwargs(batch), output_attentions=True).attentions
            expected += analysis_by_hand(attentions, batch.spans[0]) / len(samples)
    assert torch.allclose(analysis.matrices, expected, atol=1e-5)
    assert torch.allclose(analysis.matrices.sum(-1), torch.ones(vlm.num_layers, 3), atol=1e-5)
    assert analysis.matrices.triu(1).abs().max() == 0  # causality: no image sees a later one
    assert torch.allclose(analysis.intra, expected.diagonal(dim1=1, dim2=2)[:, 1:].mean(-1), atol=1e-5)

    vlm.policy = AttentionPolicy(masked_layers="default")
    masked = attention_analysis(vlm, samples)
    assert torch.allclose(masked.matrices[2:], torch.eye(3).expand(2, 3, 3), atol=1e-6)  # masked layers: intra only
    assert torch.allclose(masked.matrices[:2], analysis.matrices[:2], atol=1e-5)
    assert torch.allclose(masked.intra[2:], torch.ones(2)) and torch.allclose(masked.inter[2:], torch.zeros(2))


def test_density_corrected_analysis_is_flat_for_uniform_attention():
    from stitchkit.vlm.analysis import _Accumulator

    vlm = load_vlm(*tiny_llava_onevision())
    batch = vlm.encode([images(3)], ["how many?"])
    seq = batch.input_ids.shape[1]
    accumulator = _Accumulator(batch, 1, 3, torch.device("cpu"))
    uniform = torch.ones(seq, seq).tril()
    accumulator(0, (uniform / uniform.sum(-1, keepdim=True))[None, None], 0)
    matrices, density = accumulator.per_row()
    last = density[0, 0, 2]
    assert torch.allclose(last, torch.full((3,), 1 / 3), atol=1e-6)  # every visible image gets the same mass
    assert not math.isclose(float(matrices[0, 0, 2, 2]), 1 / 3, abs_tol=1e-3)  # the raw mass favours its own block
