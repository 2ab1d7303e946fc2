"""The VLM layer against Hugging Face's own forward and generate, on tiny random-init models (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from vlm_tiny import LLAVA_HF_ONEVISION_TEMPLATE, images, tiny_llava, tiny_llava_onevision, tiny_qwen_vl

from stitchkit.errors import ConfigError, InputError, ModelNotFoundError, StitchkitError
from stitchkit.vlm import AttentionPolicy, find_image_spans, load_vlm, parse_layer_spec

BUILDERS = {
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": lambda: tiny_qwen_vl(version="2"),
    "qwen2_5_vl": lambda: tiny_qwen_vl(version="2.5"),
    "llava_generic": tiny_llava,
}
MASKABLE = ("llava_onevision", "qwen2_vl")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mixed_batch(marker_row: bool = False):
    """Three rows of different lengths (left padding): 2 images, 1 image, 3 images."""
    ims = images(6)
    prompts = ["how many shapes?", "what colour is this? how many shapes are there in the image", "which shape"]
    return [ims[:2], ims[2:3], ims[3:6]], prompts


# ---- prompts and spans --------------------------------------------------------------------------------


def test_images_first_prompt_and_spans_llava_onevision():
    vlm = load_vlm(*tiny_llava_onevision())
    batch = vlm.encode(*mixed_batch())
    assert batch.prompts[0] == "<|im_start|>user\n<image> <image>\nhow many shapes?<|im_end|>\n<|im_start|>assistant\n"
    ids = batch.input_ids
    image_id = vlm.adapter.image_token_id
    # Multi-image rows: 16 SigLIP tokens + 1 newline per image; the single-image row is anyres: 16 + 16 + 4 newlines.
    assert [[len(s) for s in row] for row in batch.spans] == [[17, 17], [36], [17, 17, 17]]
    for row, spans in enumerate(batch.spans):
        covered = torch.zeros(ids.shape[1], dtype=torch.bool)
        for span in spans:
            assert (ids[row, span.start : span.end] == image_id).all()
            covered[span.start : span.end] = True
        assert not (ids[row][~covered] == image_id).any()
    assert (batch.attention_mask[:, -1] == 1).all() and (batch.attention_mask[:, 0] == 0).any()  # left padding


def test_llava_onevision_prompt_is_the_official_qwen_1_5_prompt():
    """mimic.md §3: LLaVA-NeXT's qwen_1_5 conversation with its default system prompt, here through the chat
    template llava-hf's checkpoints carry (which adds no system turn by itself)."""
    question = "Question: how many shapes are there?\nAnswer:"
    official = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image> <image>\n"
                "Question: how many shapes are there?\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    vlm = load_vlm(*tiny_llava_onevision(template=LLAVA_HF_ONEVISION_TEMPLATE))
    batch = vlm.encode([images(2)], [question])
    assert batch.prompts == [official]
    assert [[len(s) for s in row] for row in batch.spans] == [[17, 17]]
    # Qwen2-VL's own template inserts its default system turn; the adapter adds none.
    assert load_vlm(*tiny_qwen_vl()).adapter.system_prompt is None


def test_word_level_template_models_get_no_system_turn(tmp_path):
    """The micro VLM (and the tiny test models) use stitchkit's own ChatML template and were trained without a
    system turn: their prompts are unchanged, also after saving and loading the micro VLM's processor."""
    from stitchkit.vlm.adapters import uses_word_level_template
    from stitchkit.vlm.loading import load_processor
    from stitchkit.vlm.micro import micro_processor

    vlm = load_vlm(*tiny_llava_onevision())
    assert vlm.adapter.system_prompt is None
    assert vlm.build_prompt("how many?", 1) == "<|im_start|>user\n<image>\nhow many?<|im_end|>\n<|im_start|>assistant\n"
    micro_processor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).save_pretrained(tmp_path)
    assert uses_word_level_template(load_processor(str(tmp_path)))
    assert not uses_word_level_template(tiny_llava_onevision(template=LLAVA_HF_ONEVISION_TEMPLATE)[1])


def test_qwen_spans_include_vision_start_and_end():
    vlm = load_vlm(*tiny_qwen_vl())
    batch = vlm.encode(*mixed_batch())
    tokens = vlm.tokenizer.convert_ids_to_tokens
    for row, spans in enumerate(batch.spans):
        for span in spans:
            ids = batch.input_ids[row, span.start : span.end].tolist()
            assert tokens(ids[0]) == "<|vision_start|>" and tokens(ids[-1]) == "<|vision_end|>"
            assert set(tokens(ids[1:-1])) == {"<|image_pad|>"}
            assert span.tokens == (span.start + 1, span.end - 1)


def test_marker_layout_places_images_in_the_text():
    vlm = load_vlm(*tiny_llava_onevision(), image_layout="markers")
    ims = images(2)
    batch = vlm.encode([ims], ["<image> is red and <image> is blue"])
    (first, second), ids = batch.spans[0], batch.input_ids[0]
    between = vlm.tokenizer.decode(ids[first.end : second.start])
    assert between.split() == ["is", "red", "and"]
    with pytest.raises(InputError, match="2 images"):
        vlm.encode([ims], ["only <image> one marker"])
    with pytest.raises(InputError, match="markers"):
        load_vlm(*tiny_llava_onevision()).encode([ims], ["<image> here"])


def test_adjacent_images_are_split_by_token_counts():
    # The word-level tokenizer drops the space between "<image> <image>": blocks touch, counts split them.
    ids = torch.tensor([[5, 7, 7, 7, 7, 7, 9]])
    spans = find_image_spans(ids, 7, [2], [2, 3])
    assert [(s.start, s.end) for s in spans[0]] == [(1, 3), (3, 6)]
    assert [(s.start, s.end) for s in find_image_spans(ids, 7, [1])[0]] == [(1, 6)]
    with pytest.raises(StitchkitError):
        find_image_spans(ids, 7, [2])


def test_layer_specs():
    assert AttentionPolicy(masked_layers="default").layers(24) == frozenset(range(12, 24))
    assert AttentionPolicy(masked_layers="default").layers(28) == frozenset(range(14, 28))
    assert AttentionPolicy(masked_layers="0-3,8").layers(24) == frozenset({0, 1, 2, 3, 8})
    assert AttentionPolicy(masked_layers=[1, 5]).layers(6) == frozenset({1, 5})
    assert AttentionPolicy().layers(24) == frozenset()
    assert parse_layer_spec("12-23") == list(range(12, 24))
    with pytest.raises(ConfigError):
        AttentionPolicy(masked_layers="12..23")
    with pytest.raises(ConfigError, match="do not exist"):
        AttentionPolicy(masked_layers="20-30").layers(24)


def official_decoder_loop(listed: set[int], num_layers: int) -> set[int]:
    """The official patched decoder loop, literally (mimic.md §6.1 quirk a): one mask variable, set to None by a
    layer outside the range, restored by a layer inside it only while it is not None."""
    mask, masked = "block", set()
    for layer in range(num_layers):
        if layer not in listed:
            mask = None
        elif mask is not None:
            mask = "block"
            masked.add(layer)
    return masked


def test_legacy_layer_loop_masks_only_the_run_from_layer_zero():
    intended = AttentionPolicy(masked_layers="12-23").layers(24)
    assert 12 in intended and 11 not in intended
    legacy = lambda spec, n=24: AttentionPolicy(masked_layers=spec, legacy_layer_loop=True).layers(n)  # noqa: E731
    assert legacy("12-23") == frozenset()
    assert legacy("0-11") == frozenset(range(12))
    assert legacy("all") == frozenset(range(24))
    for spec, n in (("12-23", 24), ("14-27", 28), ("0-11", 24), ("0-3,8", 24), ("default", 24), ([0, 1, 5], 6), ("none", 4)):
        listed = AttentionPolicy(masked_layers=spec).layers(n)
        assert legacy(spec, n) == official_decoder_loop(set(listed), n), spec


def test_legacy_maxlen_fallback_runs_long_rows_dense_at_inference():
    vlm = load_vlm(*tiny_llava_onevision())
    long_prompt, short_prompt = "how many shapes are there in the images? what colour is this?", "how many?"
    rows = [vlm.encode([images(2, seed)], [p]) for seed, p in ((0, long_prompt), (1, short_prompt))]
    lengths = [row.input_ids.shape[1] for row in rows]

    def logits(batch, **policy):
        vlm.policy = AttentionPolicy(**policy)
        with torch.no_grad():
            return vlm.forward(batch).logits

    long_row = rows[0]
    dense, masked = logits(long_row), logits(long_row, masked_layers="all")
    assert (dense - masked).abs().max() > 1e-3
    # A prompt longer than the fallback is the dense model, bit for bit; one of exactly that length is masked.
    assert torch.equal(logits(long_row, masked_layers="all", legacy_maxlen_fallback=lengths[0] - 1), dense)
    assert torch.equal(logits(long_row, masked_layers="all", legacy_maxlen_fallback=lengths[0]), masked)
    # Training forwards keep the mask at any length (the official fallback is in its evaluation path).
    vlm.model.train()
    try:
        trained = logits(long_row, masked_layers="all", legacy_maxlen_fallback=1)
    finally:
        vlm.model.eval()
    assert torch.allclose(trained, masked, atol=1e-6)
    # Per row: in a padded batch the long row runs dense, the short one stays masked.
    batch = vlm.encode([images(2, 0), images(2, 1)], [long_prompt, short_prompt])
    both = logits(batch, masked_layers="all", legacy_maxlen_fallback=lengths[1])
    assert torch.allclose(both[0], dense[0], atol=1e-5)
    short_masked = logits(rows[1], masked_layers="all")
    assert torch.allclose(both[1, -lengths[1] :], short_masked[0], atol=1e-5)
    assert (short_masked - logits(rows[1])).abs().max() > 1e-3


# ---- dense policy == the unmodified model, bit for bit ------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
def test_dense_policy_is_the_unmodified_model(family):
    model, processor = BUILDERS[family]()
    vlm = load_vlm(model, processor)
    batch = vlm.encode(*mixed_batch())
    # Installed or not, a forward without masked layers runs the model's own attention.
    vlm.policy = AttentionPolicy(masked_layers="none")
    ours = vlm.forward(batch).logits
    from stitchkit.vlm import uninstall_attention

    uninstall_attention(model)
    reference = model(**batch.text, **batch.pixels, position_ids=batch.position_ids).logits
    assert torch.equal(ours, reference)
    # An unpadded row with the model's default positions, too.
    single = vlm.encode([images(2)], ["how many shapes?"])
    assert torch.equal(vlm.forward(single).logits, model(**single.text, **single.pixels).logits)


# ---- masked policy == a naive eager reference with an explicit 4-D boolean mask -----------------------

_reference_masks: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Naive eager attention that ignores the model's mask and uses the test's explicit per-layer masks."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    masks = _reference_masks
    allowed = masks["masked"] if module.layer_idx in masks["layers"] else masks["dense"]
    scores = (query @ key.transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2), probs


AttentionInterface.register("test_reference", _reference_attention)
AttentionMaskInterface.register("test_reference", sdpa_mask)


def reference_blocks(ids: list[int], tokens, n_images: int) -> list[tuple[int, int]]:
    """Image blocks found from the token strings alone: Qwen's <|vision_start|> .. <|vision_end|>, or runs of
    <image> cut into 17-token images (16 SigLIP tokens + newline: the tiny LLaVA-OV's multi-image blocks)."""
    names = tokens(ids)
    if "<|vision_start|>" in names:
        starts = [p for p, t in enumerate(names) if t == "<|vision_start|>"]
        return [(s, names.index("<|vision_end|>", s) + 1) for s in starts]
    blocks, p = [], 0
    while p < len(names):
        if names[p] == "<image>":
            run_end = p
            while run_end < len(names) and names[run_end] == "<image>":
                run_end += 1
            size = (run_end - p) if n_images == 1 else 17
            blocks += [(b, b + size) for b in range(p, run_end, size)]
            p = run_end
        else:
            p += 1
    return blocks


def explicit_masks(batch, tokens, n_images: list[int]):
    """MIMIC's mask, built from scratch as a dense (B, S, S) boolean: dense causal+padding, and masked."""
    ids, real = batch.input_ids, batch.attention_mask.bool()
    rows, seq = ids.shape
    block = torch.full((rows, seq), -1)
    for row in range(rows):
        blocks = reference_blocks(ids[row].tolist(), tokens, n_images[row])
        assert len(blocks) == n_images[row]
        if len(blocks) >= 2:  # single-image rows are not masked
            for j, (start, end) in enumerate(blocks):
                block[row, start:end] = j
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    dense = causal[None] & real[:, None, :]
    masked = dense & ((block[:, :, None] < 0) | (block[:, :, None] == block[:, None, :]))
    pad_self = torch.eye(seq, dtype=torch.bool)[None] & ~real[:, :, None]  # keeps padding rows finite
    return dense | pad_self, masked | pad_self


@pytest.mark.parametrize("kernel", ["fast", "dense_mask"])
@pytest.mark.parametrize("family", MASKABLE)
def test_masked_policy_matches_naive_reference(family, kernel):
    model, processor = BUILDERS[family]()
    vlm = load_vlm(model, processor, image_layout="markers")
    ims = images(6)
    prompts = [
        "<image> <image> how many shapes?",  # images first
        "what colour is this? <image> how many shapes are there",  # single image: not masked
        "<image> which shape <image> is red and <image>",  # text between images
    ]
    batch = vlm.encode([ims[:2], ims[2:3], ims[3:6]], prompts)
    vlm.policy = AttentionPolicy(masked_layers="default", kernel=kernel)
    ours = vlm.forward(batch).logits

    dense, masked = explicit_masks(batch, vlm.tokenizer.convert_ids_to_tokens, [2, 1, 3])
    _reference_masks.update(dense=dense, masked=masked, layers={2, 3})
    text_key = next(k for k in model.config.sub_configs if getattr(model.config, k) is model.config.text_config)
    model.set_attn_implementation({text_key: "test_reference"})
    reference = model(**batch.text, **batch.pixels, position_ids=batch.position_ids).logits
    _reference_masks.update(layers=set())
    unmasked = model(**batch.text, **batch.pixels, position_ids=batch.position_ids).logits

    real = batch.attention_mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-5
    assert (unmasked - reference)[real].abs().max() > 1e-2  # the mask changes the model
    single_row = real[1]
    assert (ours[1] - unmasked[1])[single_row].abs().max() <= 1e-5  # the single-image row is unmasked


def test_masked_gradients_match_dense_mask_kernel():
    vlm = load_vlm(*tiny_llava_onevision())
    batch = vlm.encode(*mixed_batch())
    grads = {}
    for kernel in ("fast", "dense_mask"):
        vlm.policy = AttentionPolicy(masked_layers="all", kernel=kernel)
        vlm.model.zero_grad()
        logits = vlm.forward(batch).logits
        logits[batch.attention_mask.bool()].logsumexp(-1).sum().backward()
        grads[kernel] = torch.cat([p.grad.flatten() for p in vlm.model.parameters() if p.grad is not None])
    assert torch.allclose(grads["fast"], grads["dense_mask"], atol=1e-4, rtol=1e-4)


def _fake_varlen(new_api: bool):
    """torch's varlen_attn (CUDA only) on CPU, for its contract: cu_seqlens partition the packed tokens, every
    segment is causal inside itself. new_api: window_size and enable_gqa (newer torch); else is_causal (older)."""

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        bounds = cu_q.tolist()
        assert bounds[0] == 0 and bounds[-1] == q.shape[0] and all(a < b for a, b in zip(bounds, bounds[1:]))
        assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        parts = [
            F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scale)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(parts, 1).transpose(0, 1)

    if new_api:
        return lambda q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False: attend(
            q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size == (-1, 0)
        )

    def old_api(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None, scale=None):
        assert q.shape[1] == k.shape[1], "this torch's varlen_attn has no enable_gqa"
        return attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal)

    return old_api


@pytest.mark.parametrize("new_api", [True, False])
def test_varlen_segments_equal_the_grouped_kernel(monkeypatch, new_api):
    """The CUDA path (one varlen flash call over the layout's segments) against the tested CPU path, with text
    between images, a single-image row and left padding: same logits and gradients."""
    from stitchkit.vlm import attention

    vlm = load_vlm(*tiny_llava_onevision(), image_layout="markers")
    ims = images(6)
    prompts = ["<image> <image> how many shapes?", "what colour is this? <image> how many", "<image> which <image> is red <image>"]
    batch = vlm.encode([ims[:2], ims[2:3], ims[3:6]], prompts)
    vlm.policy = AttentionPolicy(masked_layers="all")
    results = {}
    for executor in ("grouped", "varlen"):
        if executor == "varlen":
            monkeypatch.setattr(attention, "varlen_attn", _fake_varlen(new_api))
            monkeypatch.setattr(attention, "varlen_eligible", lambda query, dropout: True)
        vlm.model.zero_grad()
        logits = vlm.forward(batch).logits
        logits[batch.attention_mask.bool()].logsumexp(-1).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in vlm.model.parameters() if p.grad is not None])
        results[executor] = logits.detach(), grads
    real = batch.attention_mask.bool()
    assert (results["varlen"][0] - results["grouped"][0])[real].abs().max() <= 1e-5
    assert torch.allclose(results["varlen"][1], results["grouped"][1], atol=1e-4, rtol=1e-4)
    # A varlen_attn without any causal keyword is never used.
    assert attention._varlen_options(lambda q, k, v, cu_q, cu_k, max_q, max_k, scale=None: q) is None


# ---- generate and score -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
def test_greedy_generate_matches_hugging_face_generate(family):
    model, processor = BUILDERS[family]()
    vlm = load_vlm(model, processor)
    ims, prompts = mixed_batch()
    ours = vlm.generate_ids(ims, prompts, max_new_tokens=5)
    batch = vlm.encode(ims, prompts)
    theirs = model.generate(**batch.text, **batch.pixels, max_new_tokens=5, do_sample=False)[:, batch.input_ids.shape[1] :]
    for mine, hf in zip(ours, theirs.tolist()):
        assert mine == hf[: len(mine)] and (len(mine) == 5 or hf[len(mine)] in vlm.eos_token_ids)
    texts = vlm.generate(ims, prompts, max_new_tokens=5)
    assert texts == [vlm.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ours]


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_score_matches_brute_force_forward_per_candidate(family):
    model, processor = BUILDERS[family]()
    vlm = load_vlm(model, processor)
    ims = images(3)
    candidates = [" two", " red star", " one two three", "square", " ar413"]
    scores = vlm.score(ims, "how many shapes?", candidates, batch_size=2)
    prompt = vlm.encode([ims], ["how many shapes?"])
    length = prompt.input_ids.shape[1]
    for candidate, score in zip(candidates, scores):
        tokens = processor.tokenizer(candidate, add_special_tokens=False)["input_ids"]
        assert list(score.token_ids) == tokens
        ids = torch.cat([prompt.input_ids, torch.tensor([tokens])], dim=1)
        extra = {k: F.pad(v, (0, len(tokens))) for k, v in prompt.text.items() if k == "mm_token_type_ids"}
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra, **prompt.pixels).logits[0].float()
        logprobs = F.log_softmax(logits, dim=-1)
        brute = sum(float(logprobs[length - 1 + i, t]) for i, t in enumerate(tokens))
        assert score.logprob == pytest.approx(brute, abs=1e-4)
        assert score.first_token_logit == pytest.approx(float(logits[length - 1, tokens[0]]), abs=1e-5)
    assert scores[-1].token_ids[0] == processor.tokenizer.convert_tokens_to_ids("a")  # ID strings fall back to characters


def test_a_template_that_writes_the_bos_gets_no_second_one():
    """Gemma 3's template opens with <bos> and its tokenizer adds one: one BOS, as HF's apply_chat_template gives,
    and the scores of that input."""
    from PIL import Image
    from vlm_tiny import tiny_gemma3

    model, processor = tiny_gemma3()
    vlm = load_vlm(model, processor)
    ims = images(2)
    batch = vlm.encode([ims], ["how many shapes?"])
    bos = processor.tokenizer.bos_token_id
    assert batch.input_ids[0].tolist().count(bos) == 1 and batch.input_ids[0, 0] == bos
    hf = processor(text=batch.prompts, images=[[Image.fromarray(a) for a in ims]], add_special_tokens=False, return_tensors="pt")
    assert batch.input_ids.tolist() == hf["input_ids"].tolist()
    with torch.no_grad():
        reference = model(**hf).logits[0, -1]
    words = processor.tokenizer.convert_tokens_to_ids(["two", "red"])
    scores = vlm.score(ims, "how many shapes?", [" two", " red"])
    torch.testing.assert_close(torch.tensor([s.first_token_logit for s in scores]), reference[words].float(), rtol=1e-5, atol=1e-5)


def test_score_with_masked_policy_scores_the_masked_model():
    vlm = load_vlm(*tiny_llava_onevision(), policy=AttentionPolicy(masked_layers="default"))
    ims = images(2)
    scores = vlm.score(ims, "how many shapes?", [" two", " red star"])
    with torch.no_grad():
        logits = vlm.forward(vlm.encode([ims], ["how many shapes?"])).logits[0, -1]
    two = vlm.tokenizer(" two", add_special_tokens=False)["input_ids"][0]
    assert scores[0].first_token_logit == pytest.approx(float(logits[two]), abs=1e-6)
    dense = load_vlm(*tiny_llava_onevision()).score(ims, "how many shapes?", [" two"])
    assert abs(dense[0].first_token_logit - scores[0].first_token_logit) > 1e-4


def test_llava_next_format_checkpoints_are_refused_with_the_hf_conversion_named(tmp_path):
    """lmms-lab's llava-onevision-* releases are LLaVA-NeXT-format (LlavaQwenForCausalLM): transformers would read
    model_type "llava" as LLaVA-1.5 with default settings, "llava_qwen" not at all."""
    import json

    from stitchkit.vlm.loading import check_transformers_format

    for config in ({"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava"}, {"model_type": "llava_qwen"}):
        (tmp_path / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "google/siglip-so400m-patch14-384"}))
        with pytest.raises(ModelNotFoundError, match="original LLaVA-NeXT format") as error:
            load_vlm(tmp_path)
        assert error.value.exit_code == 2 and "llava-hf" in str(error.value)
    with pytest.raises(ModelNotFoundError, match="'llava-hf/llava-onevision-qwen2-7b-si-hf'"):
        check_transformers_format("lmms-lab/llava-onevision-qwen2-7b-si", {"architectures": ["LlavaQwenForCausalLM"]})
    check_transformers_format("llava-hf/llava-onevision-qwen2-0.5b-si-hf",
                              {"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision"})


def test_a_model_object_finds_the_processor_of_its_checkpoint(tmp_path):
    from stitchkit.vlm import VLM
    from transformers import LlavaOnevisionForConditionalGeneration

    model, processor = tiny_llava_onevision()
    VLM(model, processor).save_pretrained(tmp_path / "model")
    loaded = load_vlm(LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "model"))
    assert loaded.encode([images(2)], ["how many?"]).input_ids.tolist() == VLM(model, processor).encode([images(2)], ["how many?"]).input_ids.tolist()
    with pytest.raises(ModelNotFoundError, match="needs the model's processor"):
        load_vlm(tiny_llava_onevision()[0])  # built in memory: no checkpoint to read it from


def test_user_errors_are_one_message():
    vlm = load_vlm(*tiny_llava_onevision())
    with pytest.raises(InputError, match="at least one candidate"):
        vlm.score(images(1), "hi", [])
    vlm.chat_template = False
    with pytest.raises(InputError, match="ends with whitespace"):
        vlm.score(images(1), "The ID is ", ["ar413"])
    vlm.chat_template = True
    with pytest.raises(InputError, match="image"):
        vlm.encode([["not an image"]], ["how many?"])
    with pytest.raises(StitchkitError, match="cannot load"):
        load_vlm("/nonexistent/folder")
    with pytest.raises(ConfigError):
        vlm.pool_factor = 3


def test_attention_benchmark_runs_and_its_kernels_agree_with_the_dense_mask():
    """`python -m benchmarks vlm` stays runnable (its CPU part), and what it times computes the masked attention."""
    from benchmarks.bench_vlm import main as bench_vlm

    rows = bench_vlm(quick=True)
    assert rows and all(row["fast_error"] <= 1e-5 and row["fast_fwd_ms"] > 0 for row in rows)
