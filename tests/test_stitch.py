"""Stitching pieces on tiny random-init Hugging Face models (reference spec §8 acceptance tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as hf

from stitchkit.backbones import load_backbone
from stitchkit.engine import TrainConfig, train
from stitchkit.errors import ConfigError, IncompatibleError
from stitchkit.stitching.cache import FeatureStore, batch_features, compute_features
from stitchkit.stitching.diagnostics import DistanceMeter, prediction_overlap
from stitchkit.stitching.layers import LoRAStitch, build_stitch, least_squares_fit, least_squares_init
from stitchkit.stitching.model import StitchedModel, build_head, readout_token_weights
from stitchkit.stitching.objectives import final_feature_matching_loss, resolve_match_layer, stages
from stitchkit.stitching.protocol import task_score
from stitchkit.stitching.tokens import GridAdapter
from stitchkit.stitching.tree import StitchTree, normalised_gain, vst_blocks, vst_overhead

TINY = dict(num_hidden_layers=4, num_attention_heads=2, patch_size=8)


def tiny(kind: str, width: int = 32, image_size: int = 32, layers: int = 4):
    """A random-init HF vision model, perturbed so norms and biases matter, as a frozen VisionBackbone."""
    torch.manual_seed(hash(kind) % 1000)
    kw = dict(TINY, hidden_size=width, intermediate_size=2 * width, image_size=image_size, num_hidden_layers=layers)
    model = {
        "dinov2": lambda: hf.Dinov2Model(hf.Dinov2Config(**kw)),
        "dinov2_registers": lambda: hf.Dinov2WithRegistersModel(hf.Dinov2WithRegistersConfig(**kw, num_register_tokens=4)),
        "dinov3": lambda: hf.DINOv3ViTModel(hf.DINOv3ViTConfig(**kw, num_register_tokens=4)),
        "clip": lambda: hf.CLIPVisionModel(hf.CLIPVisionConfig(**kw)),
        "siglip": lambda: hf.SiglipVisionModel(hf.SiglipVisionConfig(**kw)),
    }[kind]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return load_backbone(model.eval())


def images(n: int = 3, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


KINDS = ["dinov2", "dinov2_registers", "dinov3", "clip", "siglip"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    return {kind: tiny(kind) for kind in KINDS}


# ---- the stitched model -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_identity_self_stitch_reproduces_the_model_exactly(models, kind):
    bb = models[kind]
    px = bb.preprocess(images())
    with torch.no_grad():
        reference = bb.model(pixel_values=px).pooler_output  # Hugging Face's own forward is the oracle
        for point in (1, 2, bb.num_blocks - 1):
            stitched = StitchedModel(bb, bb, point, build_stitch("identity", bb.hidden_size, bb.hidden_size))
            assert torch.equal(stitched.forward_pixels(px), reference), (kind, point)


@pytest.mark.parametrize(
    "source, target, length, layout",
    [
        ("dinov2", "clip", 17, "S(src[0])"),
        ("siglip", "dinov2", 17, "learnable"),  # no CLS in the source: a learnable CLS
        ("dinov2", "dinov3", 21, "S(src[0]), learnable, learnable, learnable, learnable"),
        ("dinov3", "dinov2", 17, "S(src[0])"),  # registers dropped
        ("dinov3", "dinov2_registers", 21, "S(src[0]), S(src[1]), S(src[2]), S(src[3]), S(src[4])"),
        ("dinov2_registers", "siglip", 16, "none"),  # any -> SigLIP drops every prefix token
    ],
)
def test_prefix_policy_gives_the_target_its_own_sequence(models, source, target, length, layout):
    src, tgt = models[source], models[target]
    stitched = StitchedModel(src, tgt, 2, build_stitch("mlp", src.hidden_size, tgt.hidden_size))
    assert stitched.prefix.describe() == layout
    hidden = stitched.source_hidden(src.preprocess(images()))
    assert stitched.bridge(hidden).shape == (3, length, tgt.hidden_size)
    assert stitched.forward(hidden).shape == (3, tgt.hidden_size)


def test_sequence_lengths_on_16x16_grids():
    """Spec §8.3: DINOv2 and CLIP 257 tokens, SigLIP 256, DINOv3 261; DINOv2 -> DINOv3 after the policy is 261."""
    grid16 = {kind: tiny(kind, width=16, image_size=128, layers=2) for kind in ("dinov2", "clip", "siglip", "dinov3")}
    pixels = images(1, 128)
    for kind, length in {"dinov2": 257, "clip": 257, "siglip": 256, "dinov3": 261}.items():
        assert grid16[kind].embed(grid16[kind].preprocess(pixels))[0].shape[1] == length
    for source, target, length in [("dinov2", "dinov3", 261), ("siglip", "dinov2", 257), ("dinov3", "siglip", 256)]:
        stitched = StitchedModel(grid16[source], grid16[target], 1, build_stitch("linear", 16, 16))
        assert stitched.bridge(stitched.source_hidden(grid16[source].preprocess(pixels))).shape[1] == length


def test_learnable_prefix_starts_at_the_target_mean_and_drop_needs_a_prefixless_target(models):
    src, tgt = models["siglip"], models["dinov3"]
    stitched = StitchedModel(src, tgt, 2, build_stitch("linear", 32, 32))
    mean = torch.randn(5, 32)
    stitched.prefix.init_learnable(mean)
    assert torch.equal(stitched.prefix.tokens, mean)
    with pytest.raises(IncompatibleError, match="prefix_policy"):
        StitchedModel(src, tgt, 2, build_stitch("linear", 32, 32), prefix_policy="drop")


def test_stitching_between_different_grids_and_widths():
    source = tiny("siglip", width=32, image_size=32)  # 4x4 grid, no prefix
    target = tiny("dinov2_registers", width=48, image_size=24)  # 3x3 grid, CLS + 4 registers
    with pytest.raises(IncompatibleError, match="grid_policy"):
        StitchedModel(source, target, 2, build_stitch("mlp", 32, 48))
    stitched = StitchedModel(source, target, 2, build_stitch("mlp", 32, 48), grid_policy="bilinear")
    hidden = stitched.source_hidden(source.preprocess(images()))
    assert stitched.bridge(hidden).shape == (3, 5 + 9, 48)
    assert stitched(hidden).shape == (3, 48)


def test_depth_mapping_between_models_of_different_depths():
    source, target = tiny("dinov2", layers=4), tiny("clip", layers=6)
    stitched = StitchedModel(source, target, 2, build_stitch("mlp", 32, 32))
    assert stitched.target_point == 3  # the same relative depth: 2/4 of the way -> after target block 3 of 6
    hidden = stitched.source_hidden(source.preprocess(images()))
    assert len(stitched.target_profile(stitched.bridge(hidden))) == 6 - 3 + 1


def test_grid_adapter_against_manual_resampling():
    patches = torch.randn(2, 16, 5)
    pooled = GridAdapter((4, 4), (2, 2), "avgpool")(patches)
    image = patches.reshape(2, 4, 4, 5)
    manual = image.reshape(2, 2, 2, 2, 2, 5).mean(dim=(2, 4)).reshape(2, 4, 5)  # 2x2 blocks, row-major
    torch.testing.assert_close(pooled, manual)
    up = GridAdapter((2, 2), (4, 4), "bilinear")(pooled)
    reference = F.interpolate(pooled.transpose(1, 2).reshape(2, 5, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, reference.flatten(2).transpose(1, 2))


def test_out_of_range_point_and_unknown_names_are_clear_errors(models):
    bb = models["dinov2"]
    with pytest.raises(ConfigError, match="points: stitch point 4"):
        StitchedModel(bb, bb, 4, build_stitch("identity", 32, 32))
    with pytest.raises(ConfigError, match="objectives: unknown objective 'ffn'"):
        stages("ffn")
    with pytest.raises(ConfigError, match="match_layer"):
        resolve_match_layer(9, 4)
    with pytest.raises(IncompatibleError, match="stitch.kind"):
        build_stitch("conv", 32, 32)
    assert resolve_match_layer(-2, 24) == (23, False)  # LLaVA's hidden_states[-2]


def test_ffm_weighs_patches_and_cls_at_the_normed_last_layer_and_patches_alone_at_a_raw_block(models):
    """Spec §4.4, §7: a classifier reads the normed last layer (patches and CLS; registers weigh 0), an MLLM a raw
    block (LLaVA: hidden_states[-2][:, 1:]), so FFM there weighs patch tokens only."""
    src, tgt = models["clip"], models["dinov2_registers"]  # target: CLS + 4 registers + a 4x4 grid
    patches_and_cls = torch.tensor([1.0, 0, 0, 0, 0] + [1.0] * 16)
    patches = torch.tensor([0.0] * 5 + [1.0] * 16)
    for match_layer, expected in (("last_normed", patches_and_cls), (-2, patches), ("last_raw", patches), (3, patches)):
        stitched = StitchedModel(src, tgt, 2, build_stitch("linear", 32, 32), match_layer=match_layer)
        assert torch.equal(stitched.match_token_weights(), expected), match_layer
    assert torch.equal(readout_token_weights(tgt), patches_and_cls)  # the default keeps the weights it had
    no_prefix = StitchedModel(src, models["siglip"], 2, build_stitch("linear", 32, 32), match_layer=-2)
    assert torch.equal(no_prefix.match_token_weights(), torch.ones(16))


def test_learnable_prefix_tokens_train_without_weight_decay(models):
    """Spec §7 (no decay on biases or norms) and timm's rule for cls/reg tokens: the learnable prefix tokens start
    at the target's mean, so AdamW's groups leave them undecayed; S's and the head's matrices keep the decay."""
    from stitchkit.engine.loop import _parameter_groups

    stitched = StitchedModel(models["siglip"], models["dinov3"], 2, build_stitch("mlp", 32, 32))  # 5 learnable slots
    stitched.head = build_head("classification", models["dinov3"], 3)
    cfg = TrainConfig(steps=1, batch_size=1, weight_decay=0.05, lr_groups={"head": 1e-2})
    decay = {id(p): group["weight_decay"] for group in _parameter_groups(stitched, cfg) for p in group["params"]}
    by_name = {name: decay[id(p)] for name, p in stitched.named_parameters() if p.requires_grad}
    assert stitched.prefix.tokens.ndim == 2 and by_name["prefix.tokens"] == 0.0
    matrices = [name for name, p in stitched.named_parameters() if p.requires_grad and p.ndim >= 2 and name != "prefix.tokens"]
    assert matrices and all(by_name[name] == 0.05 for name in matrices)  # stitch.*.weight, head.linear.weight


# ---- training touches only S, prefix tokens and head --------------------------------------------


def _one_step(model, loss_fn, rows):
    cfg = TrainConfig(steps=1, batch_size=len(rows["hidden"]), lr=1e-2, mixed_precision="no", max_grad_norm=None)
    dataset = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["hidden"]))]
    train(model, loss_fn, dataset, cfg, out_dir=None)


def test_ffm_step_changes_only_stitch_prefix_and_head_and_backbones_stay_in_eval(models):
    src, tgt = models["siglip"], models["dinov3"]  # learnable prefix slots; DINOv3 RoPE augments in train mode
    stitched = StitchedModel(src, tgt, 2, build_stitch("mlp", 32, 32))
    stitched.head = build_head("classification", tgt, 3)
    frozen = {n: p.clone() for n, p in list(src.named_parameters()) + list(tgt.named_parameters())}
    px, target_px = src.preprocess(images(4)), tgt.preprocess(images(4))
    hidden = stitched.source_hidden(px)
    with torch.no_grad():
        reference = tgt.final_norm(tgt.run_blocks(*_embed(tgt, target_px)))
        eval_out = stitched(hidden, output="match")
    stitched.train()
    with torch.no_grad():
        assert torch.equal(stitched(hidden, output="match"), eval_out)  # train() leaves the VFMs in eval
    weights = readout_token_weights(tgt)
    before = {n: p.clone() for n, p in stitched.named_parameters() if p.requires_grad}

    def loss_fn(model, batch):
        ffm = final_feature_matching_loss(model(batch["hidden"], output="match"), batch["reference"], weights)
        return ffm + model(batch["hidden"]).square().mean()  # a head term, so the head gets a gradient too

    _one_step(stitched, loss_fn, {"hidden": hidden, "reference": reference})
    trainable = {n for n, p in stitched.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("stitch.", "prefix.", "head.")) for n in trainable)
    assert all(not torch.equal(before[n], p) for n, p in stitched.named_parameters() if n in before)
    for name, p in list(src.named_parameters()) + list(tgt.named_parameters()):
        assert torch.equal(p, frozen[name]) and p.grad is None


def _embed(bb, px):
    tokens, ctx = bb.embed(px)
    return tokens, 0, None, ctx


# ---- stitch layers ------------------------------------------------------------------------------


def test_lora_stitch_starts_as_the_model_and_trains_only_its_factors(models):
    bb = models["dinov2"]
    px = bb.preprocess(images())
    stitch = build_stitch("lora", 32, 32, rank=4, source_block=bb.block(1), call_block=bb.call_block)
    stitched = StitchedModel(bb, bb, 2, stitch)
    assert stitched.source_layer == 1  # LoRA reads the state before block n and runs its own block n
    with torch.no_grad():
        assert torch.equal(stitched.forward_pixels(px), bb.model(pixel_values=px).pooler_output)  # B = 0 at init
    trainable = {n for n, p in stitched.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for n, p in stitched.named_parameters() if n in trainable)
    block_before = {n: p.clone() for n, p in bb.block(1).named_parameters()}
    hidden = stitched.source_hidden(px)
    _one_step(stitched, lambda model, batch: model(batch["hidden"]).square().mean(), {"hidden": hidden})
    with torch.no_grad():
        assert not torch.equal(stitched.forward_pixels(px), bb.model(pixel_values=px).pooler_output)
    # The shared model's own block n is untouched: the stitch adapted a copy.
    assert all(torch.equal(p, block_before[n]) for n, p in bb.block(1).named_parameters())
    assert not any("lora" in n for n, _ in bb.named_parameters())


def test_lora_between_widths_gets_a_projection_with_least_squares_init(models):
    src, tgt = models["clip"], tiny("dinov2", width=48)
    stitch = build_stitch("lora", 32, 48, source_block=src.block(0), call_block=src.call_block)
    assert isinstance(stitch, LoRAStitch) and stitch.proj.weight.shape == (48, 32)
    stitched = StitchedModel(src, tgt, 1, stitch)
    assert stitched(stitched.source_hidden(src.preprocess(images()))).shape == (3, 48)


def bf16_backbone(kind: str = "dinov2"):
    """A tiny backbone in bf16, the way load_frozen_backbone loads every frozen model on a GPU."""
    return load_backbone(tiny(kind).model, dtype=torch.bfloat16)


def test_lora_factors_stay_fp32_on_a_bf16_block_and_take_small_steps():
    """Spec §7: S in fp32 while the frozen blocks are bf16. bf16 factors would round a 1e-5 AdamW step away."""
    bb = bf16_backbone()
    stitch = build_stitch("lora", 32, 32, rank=4, source_block=bb.block(1), call_block=bb.call_block)
    trainable = {n: p for n, p in stitch.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in stitch.parameters() if not p.requires_grad} == {torch.bfloat16}  # the frozen copy
    stitched = StitchedModel(bb, bb, 2, stitch)
    hidden = stitched.source_hidden(bb.preprocess(images()).to(torch.bfloat16))
    assert hidden.dtype == torch.bfloat16
    with torch.no_grad():
        assert stitched(hidden).dtype == torch.bfloat16  # peft casts the adapter's sum back to the block's dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(stitched(hidden)).all()
        for name, p in trainable.items():  # B = 0 at init gives A no gradient: start from a nonzero B
            if "lora_B" in name:
                p.normal_(std=0.1)
    lora_a = {n: p.detach().clone() for n, p in trainable.items() if "lora_A" in n}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-5)
    stitched(hidden).float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in trainable.values())
    optimizer.step()
    for name, before in lora_a.items():  # Adam's first step moves every entry by ~lr (1e-5), far below a bf16 ulp
        assert (trainable[name] != before).all(), name


@pytest.mark.parametrize("kind", ["identity", "linear", "mlp", "lora"])
def test_every_stitch_kind_trains_in_fp32_between_bf16_models(kind):
    bb = bf16_backbone("dinov2_registers")  # CLS + registers: learnable prefix slots on the dinov2 -> registers path
    source = bf16_backbone("dinov2")
    stitch = build_stitch(kind, 32, 32, source_block=source.block(1), call_block=source.call_block)
    stitched = StitchedModel(source, bb, 2, stitch)
    stitched.head = build_head("classification", bb, 3)
    trainable = {n: p.dtype for n, p in stitched.named_parameters() if p.requires_grad}
    assert any(n.startswith("prefix.") for n in trainable) and any(n.startswith("head.") for n in trainable)
    assert kind == "identity" or any(n.startswith("stitch.") for n in trainable)
    assert set(trainable.values()) == {torch.float32}, trainable


def test_least_squares_recovers_a_linear_map():
    torch.manual_seed(0)
    x = torch.randn(500, 6)
    weight, bias = torch.randn(4, 6), torch.randn(4)
    y = x @ weight.T + bias
    fitted_w, fitted_b = least_squares_fit(x, y, ridge=0.0)
    torch.testing.assert_close(fitted_w.float(), weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fitted_b.float(), bias, atol=1e-5, rtol=1e-5)
    stitch = build_stitch("linear", 6, 4)
    least_squares_init(stitch, x, y, ridge=0.0)
    torch.testing.assert_close(stitch(x), y, atol=1e-4, rtol=1e-4)
    with pytest.raises(IncompatibleError, match="stitch.init"):
        least_squares_init(build_stitch("mlp", 6, 4), x, y)


# ---- cache, diagnostics, metrics ----------------------------------------------------------------


def test_ffm_loss_from_cached_target_features_equals_the_online_loss(models, tmp_path):
    src, tgt = models["dinov2"], models["clip"]
    data = images(6)
    stitched = StitchedModel(src, tgt, 2, build_stitch("mlp", 32, 32))
    store = FeatureStore(tmp_path, mode="disk", batch_size=4, dtype="float32")
    store.plan("clip", "train", ["normed", "h2"])
    cached = torch.from_numpy(np.array(store.get("clip", "train", "normed", tgt, data, "classification")))
    assert store.computed_passes == 1 and (tmp_path / "clip" / "train" / "h2.npy").exists()  # one pass, both keys
    store.get("clip", "train", "h2", tgt, data, "classification")
    assert store.computed_passes == 1
    weights = readout_token_weights(tgt)
    with torch.no_grad():
        online = batch_features(tgt, tgt.preprocess(data), ["normed"], "classification")["normed"]
        stitched_match = stitched(stitched.source_hidden(src.preprocess(data)), output="match")
        torch.testing.assert_close(
            final_feature_matching_loss(stitched_match, cached, weights),
            final_feature_matching_loss(stitched_match, online, weights),
        )
    half = compute_features(tgt, data, ["normed"], "classification", batch_size=4)["normed"]
    assert half.dtype == np.float16 and np.allclose(half, cached.numpy(), atol=1e-2)


def test_distance_meter_and_overlap_against_direct_computation():
    torch.manual_seed(0)
    predicted, reference = torch.randn(10, 7, 3), torch.randn(10, 7, 3) * 2 + 1
    meter = DistanceMeter()
    meter.update(predicted[:4], reference[:4])
    meter.update(predicted[4:], reference[4:])
    result = meter.result()
    assert result["distance"] == pytest.approx((predicted - reference).pow(2).mean().item(), rel=1e-6)
    variance = reference.reshape(-1, 3).var(dim=0, unbiased=False).mean().item()
    assert result["relative"] == pytest.approx(result["distance"] / variance, rel=1e-6)
    table = prediction_overlap([1, 0, 0, 1, 1], [1, 0, 1, 1, 0], [0, 1, 1, 1, 1])
    assert (table["rescue"], table["interference"], table["011"], table["111"], table["101"]) == (1, 1, 1, 1, 1)


def test_task_scores():
    assert task_score("classification", np.array([1, 2, 3, 0]), np.array([1, 2, 0, 0]), 4) == 75.0
    labels = np.array([[0, 0], [1, 1]])
    predictions = np.array([[0, 1], [1, 1]])
    # class 0: IoU 1/2, class 1: IoU 2/3
    assert task_score("segmentation", predictions, labels, 3) == pytest.approx((0.5 + 2 / 3) / 2 * 100)


# ---- the stitch tree ----------------------------------------------------------------------------


def test_vst_cost_arithmetic_reproduces_the_paper():
    assert vst_overhead(23, 22, 2) == pytest.approx(1 / 23)  # VST-22: 4.3%
    assert vst_overhead(23, 14, 2) == pytest.approx(9 / 23)  # VST-14: 39%
    assert vst_overhead(23, 14, 4) == pytest.approx(27 / 23)  # four VFMs: 117%
    assert vst_blocks(14, 23, 2) == 32
    assert normalised_gain(tree=60.0, single=50.0, dual=70.0) == 0.5


def test_tree_branches_equal_separately_stitched_models(models):
    trunk, clip, siglip = models["dinov2"], models["clip"], models["siglip"]
    stitches = {"clip": build_stitch("mlp", 32, 32), "siglip": build_stitch("linear", 32, 32)}
    tree = StitchTree(trunk, 2, {"dino": (trunk, None), "clip": (clip, stitches["clip"]), "siglip": (siglip, stitches["siglip"])})
    px = trunk.preprocess(images())
    with torch.no_grad():
        branches = tree.forward_pixels(px)
        # The trunk's own branch is the unstitched model at block N-1 (HF hidden_states[-2], patches only).
        hf_states = trunk.model(pixel_values=px, output_hidden_states=True).hidden_states
        assert torch.equal(branches["dino"], hf_states[-2][:, 1:])
        for name, bb in (("clip", clip), ("siglip", siglip)):
            separate = StitchedModel(trunk, bb, 2, stitches[name])
            hidden = separate.source_hidden(px)
            expected = separate.target_blocks(separate.bridge(hidden), end=bb.num_blocks - 1)[:, bb.num_prefix_tokens :]
            assert torch.equal(branches[name], expected)
    cost = tree.cost()
    assert cost["blocks"] == 2 + 3 * (3 - 2)


def test_augmentation_cuts_and_mirrors_an_image_and_its_label_map_alike():
    from stitchkit.stitching.augment import random_resized_crop

    size, n = 32, 64
    ys, xs = np.mgrid[:size, :size]
    # Each pixel's label is its own index, and its colour encodes its coordinates: after the crop, the label map
    # says exactly which pixel each output pixel came from, and the image (bilinear) says so approximately.
    ids = (ys * size + xs).astype(np.int16)
    image = np.stack([ys * 8, xs * 8, np.zeros_like(ys)], -1).astype(np.uint8)
    images, maps = np.repeat(image[None], n, 0), np.repeat(ids[None], n, 0)
    torch.manual_seed(0)
    out_images, out_maps = random_resized_crop(images, maps)
    torch.manual_seed(0)
    again = random_resized_crop(images, maps)
    np.testing.assert_array_equal(again[0], out_images)  # the draws are torch's: same seed, same crops
    np.testing.assert_array_equal(again[1], out_maps)
    mirrored, boxes = [], set()
    for out_image, out_map in zip(out_images, out_maps):
        src_y, src_x = out_map // size, out_map % size
        height, width = src_y.max() - src_y.min() + 1, src_x.max() - src_x.min() + 1
        assert 0.5 * size * size - 2 * size <= height * width <= size * size  # scale 0.5-1, up to rounding
        assert 3 / 4 - 0.1 <= width / height <= 4 / 3 + 0.1
        steps = np.sign(np.diff(src_x, axis=1))
        assert (steps >= 0).all() or (steps <= 0).all()  # each row runs one way: mirrored or not, never mixed
        mirrored.append((steps < 0).any())
        boxes.add((int(src_y.min()), int(src_x.min()), int(height), int(width)))
        # The image was cut by the same box and mirrored alike: its colours name the label map's pixels.
        assert np.abs(out_image[..., 0] / 8 - src_y).max() <= 1.0
        assert np.abs(out_image[..., 1] / 8 - src_x).max() <= 1.0
    assert 0 < sum(mirrored) < n and len(boxes) > n // 2  # flips and boxes vary from image to image
    classes = np.arange(n)
    assert (random_resized_crop(images, classes)[1] == classes).all()  # class labels pass unchanged


def test_augmentation_keeps_ignore_labels():
    from stitchkit.stitching.augment import random_resized_crop

    maps = np.full((4, 8, 8), -100, dtype=np.int16)
    maps[:, :, :4] = 3
    _, out = random_resized_crop(np.zeros((4, 8, 8, 3), dtype=np.uint8), maps)
    assert out.dtype == np.int16 and set(np.unique(out)) <= {-100, 3}
