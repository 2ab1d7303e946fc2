"""VisionBackbone against Hugging Face's own forward, on tiny random-init models of every supported class."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers as hf
from PIL import Image
from torch import nn

from stitchkit.backbones import FAMILIES, BlockContext, PatchifiedPixels, VisionBackbone, load_backbone, save_backbone
from stitchkit.backbones.preprocess import naflex_image_size
from stitchkit.errors import ModelNotFoundError

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
FIXED = dict(TINY, image_size=32, patch_size=8)  # a 4x4 patch grid
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
TOL = 1e-5


def _perturb(model: nn.Module) -> nn.Module:
    """Random-init norms are exactly 1/0 and many biases 0; perturb everything so every piece matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "dinov2":
        model = hf.Dinov2Model(hf.Dinov2Config(**FIXED))
    elif kind == "dinov2_registers":
        model = hf.Dinov2WithRegistersModel(hf.Dinov2WithRegistersConfig(**FIXED, num_register_tokens=4))
    elif kind == "dinov3":
        model = hf.DINOv3ViTModel(hf.DINOv3ViTConfig(**FIXED, num_register_tokens=4))
    elif kind == "vit":
        model = hf.ViTModel(hf.ViTConfig(**FIXED))
    elif kind == "clip":
        model = hf.CLIPVisionModel(hf.CLIPVisionConfig(**FIXED))
    elif kind == "siglip":
        model = hf.SiglipVisionModel(hf.SiglipVisionConfig(**FIXED))
    elif kind == "siglip_no_head":
        model = hf.SiglipVisionModel(hf.SiglipVisionConfig(**FIXED, vision_use_head=False))
    elif kind == "siglip2_naflex":
        model = hf.Siglip2VisionModel(hf.Siglip2VisionConfig(**TINY, num_patches=16, patch_size=8))
    else:
        raise KeyError(kind)
    return _perturb(model)


KINDS = ["dinov2", "dinov2_registers", "dinov3", "vit", "clip", "siglip", "siglip_no_head", "siglip2_naflex"]
PREFIX = {"dinov2": 1, "dinov2_registers": 5, "dinov3": 5, "vit": 1, "clip": 1, "siglip": 0, "siglip_no_head": 0}


def images() -> list[Image.Image]:
    """Two random images of different aspect ratios (NaFlex then pads the wider one's grid)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in [(40, 40, 3), (20, 50, 3)]]


def hf_forward(model: nn.Module, px):
    with torch.no_grad():
        if isinstance(px, PatchifiedPixels):
            return model(
                pixel_values=px.pixel_values,
                pixel_attention_mask=px.pixel_attention_mask,
                spatial_shapes=px.spatial_shapes,
                output_hidden_states=True,
            )
        return model(pixel_values=px, output_hidden_states=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_manual_forward_reproduces_hf(kind):
    model = build(kind)
    bb = load_backbone(model)
    px = bb.preprocess(images())
    ref = hf_forward(model, px)
    with torch.no_grad():
        tokens, ctx = bb.embed(px)
        out = bb.final(bb.run_blocks(tokens, 0, bb.num_blocks, ctx))
        states = bb.hidden_states(px)
        pooled = bb.pool(out, ctx)

    assert isinstance(bb, VisionBackbone) and isinstance(ctx, BlockContext)
    assert max_diff(out, ref.last_hidden_state) <= TOL
    assert len(states) == len(ref.hidden_states) == bb.num_blocks + 1 == 4
    for ours, theirs in zip(states, ref.hidden_states):
        assert max_diff(ours, theirs) <= TOL
    assert torch.equal(bb.forward_features(px), out)

    if kind == "vit":  # ViT's pooler_output is tanh(dense(CLS)); we pool the normed CLS (module doc)
        assert torch.equal(pooled, ref.last_hidden_state[:, 0])
    elif kind == "siglip_no_head":  # no CLS and no head: mean over patch tokens
        assert ref.pooler_output is None
        assert max_diff(pooled, ref.last_hidden_state.mean(dim=1)) <= TOL
    else:
        assert max_diff(pooled, ref.pooler_output) <= TOL
    assert pooled.shape == (2, bb.hidden_size)

    if kind == "siglip2_naflex":
        assert bb.num_prefix_tokens == 0
        assert out.shape[1] == bb.max_num_patches == 16
        assert ctx.grid is None and ctx.spatial_shapes.tolist() == [[4, 4], [2, 5]]
    else:
        assert bb.num_prefix_tokens == PREFIX[kind]
        assert bb.grid_size(px) == ctx.grid == (4, 4)
        assert out.shape == (2, PREFIX[kind] + 16, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_run_blocks_in_pieces_equals_one_go(kind):
    bb = load_backbone(build(kind))
    px = bb.preprocess(images())
    with torch.no_grad():
        tokens, ctx = bb.embed(px)
        whole = bb.run_blocks(tokens, 0, bb.num_blocks, ctx)
        for k in range(bb.num_blocks + 1):
            pieces = bb.run_blocks(bb.run_blocks(tokens, 0, k, ctx), k, bb.num_blocks, ctx)
            assert torch.equal(pieces, whole)
        # python-slice semantics: negative and open ends
        assert torch.equal(bb.run_blocks(bb.run_blocks(tokens, None, -1, ctx), -1, None, ctx), whole)
        # one block at a time, through the block accessor
        step = tokens
        for i in range(bb.num_blocks):
            step = bb.call_block(bb.block(i), step, ctx)
        assert torch.equal(step, whole)


def test_clip_final_is_raw_and_pool_is_post_layernorm_of_cls():
    model = build("clip")
    bb = load_backbone(model)
    px = bb.preprocess(images())
    ref = hf_forward(model, px)
    with torch.no_grad():
        out = bb.forward_features(px)
        assert max_diff(out, ref.hidden_states[-1]) <= TOL  # the quirk: last_hidden_state is the raw last block
        assert max_diff(bb.pool(out), model.post_layernorm(ref.last_hidden_state[:, 0])) <= TOL


def test_naflex_without_head_pools_the_mean_of_real_patches():
    torch.manual_seed(0)
    model = _perturb(hf.Siglip2VisionModel(hf.Siglip2VisionConfig(**TINY, num_patches=16, patch_size=8, vision_use_head=False)))
    bb = load_backbone(model)
    px = bb.preprocess(images())  # the second image fills 10 of 16 patch slots
    with torch.no_grad():
        tokens, ctx = bb.embed(px)
        out = bb.final(bb.run_blocks(tokens, 0, None, ctx))
        pooled = bb.pool(out, ctx)
    assert max_diff(pooled[0], out[0].mean(dim=0)) <= TOL
    assert max_diff(pooled[1], out[1, :10].mean(dim=0)) <= TOL


def test_non_native_resolution_interpolates_position_embeddings():
    for kind in ["clip", "siglip", "vit", "dinov2"]:
        model = build(kind)
        bb = load_backbone(model, image_size=48)  # a 6x6 grid against a 4x4 position table
        px = bb.preprocess(images())
        assert px.shape == (2, 3, 48, 48) and bb.grid_size(px) == (6, 6)
        with torch.no_grad():
            ref = model(pixel_values=px, interpolate_pos_encoding=True) if kind != "dinov2" else model(px)
            assert max_diff(bb.forward_features(px), ref.last_hidden_state) <= TOL


def test_train_mode_keeps_the_model_in_eval_and_frozen():
    model = build("dinov3")
    model.config.pos_embed_rescale = 2.0  # DINOv3's train-mode RoPE augmentation
    bb = load_backbone(model)
    px = bb.preprocess(images())
    with torch.no_grad():
        before = bb.forward_features(px)
        wrapper = nn.ModuleDict({"backbone": bb, "head": nn.Linear(32, 3)}).train()
        assert wrapper["head"].training and bb.training
        assert not any(m.training for m in bb.model.modules())
        assert torch.equal(bb.forward_features(px), before)
        # the guard matters: the same model in train mode gives different features
        model.train()
        assert max_diff(model(pixel_values=px).last_hidden_state, before) > 1e-4
    assert not any(p.requires_grad for p in bb.parameters())
    # frozen, yet gradients flow through the blocks to whatever feeds them (a stitch layer)
    tokens, ctx = bb.embed(px)
    tokens = tokens.detach().requires_grad_()
    bb.pool(bb.final(bb.run_blocks(tokens, 1, None, ctx))).sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())
    assert all(p.requires_grad for p in load_backbone(build("dinov2"), trainable=True).parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_save_backbone_round_trips(kind, tmp_path):
    bb = load_backbone(build(kind))
    px = bb.preprocess(images())
    save_backbone(bb, tmp_path / kind)
    loaded = load_backbone(tmp_path / kind)
    assert type(loaded.model) is type(bb.model)
    assert (loaded.image_size, loaded.mean, loaded.std) == (bb.image_size, bb.mean, bb.std)
    assert loaded.max_num_patches == bb.max_num_patches and loaded.resample == bb.resample
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(px), bb.forward_features(px))


def test_save_backbone_records_preprocessing(tmp_path):
    model = build("dinov2")
    save_backbone(model, tmp_path / "m", 48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    processor = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 48, "width": 48} and processor["image_mean"] == [0.1, 0.2, 0.3]
    bb = load_backbone(tmp_path / "m")
    assert (bb.image_size, bb.mean, bb.std) == (48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    # an HF-style processor config (resize shortest edge, then centre crop) gives the crop size
    (tmp_path / "m" / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True})
    )
    bb = load_backbone(tmp_path / "m")
    assert bb.image_size == 224 and bb.mean == (0.485, 0.456, 0.406)  # family default when not given


@pytest.mark.parametrize(
    "full_class, config_class, vision_class, vision",
    [
        (hf.CLIPModel, hf.CLIPConfig, hf.CLIPVisionModel, FIXED),
        (hf.SiglipModel, hf.SiglipConfig, hf.SiglipVisionModel, FIXED),
        (hf.Siglip2Model, hf.Siglip2Config, hf.Siglip2VisionModel, dict(TINY, num_patches=16, patch_size=8)),
    ],
)
def test_full_image_text_checkpoints_load_their_vision_tower(full_class, config_class, vision_class, vision, tmp_path):
    torch.manual_seed(0)
    full = _perturb(full_class(config_class(vision_config=vision, text_config=TEXT)))
    full.save_pretrained(tmp_path)
    bb = load_backbone(tmp_path)
    assert type(bb.model) is vision_class
    assert type(load_backbone(full).model) is vision_class
    px = bb.preprocess(images())
    kwargs = (
        dict(pixel_attention_mask=px.pixel_attention_mask, spatial_shapes=px.spatial_shapes, pixel_values=px.pixel_values)
        if isinstance(px, PatchifiedPixels)
        else dict(pixel_values=px)
    )
    with torch.no_grad():
        assert max_diff(bb.forward_features(px), full.vision_model(**kwargs).last_hidden_state) <= TOL


def test_a_vit_classification_checkpoint_loads_its_encoder(tmp_path):
    """ViTForImageClassification (google/vit-base-patch16-224) saves no pooler; the backbone never uses ViTModel's
    pooler, so the checkpoint loads, and reproduces the classifier's own encoder."""
    torch.manual_seed(0)
    classifier = _perturb(hf.ViTForImageClassification(hf.ViTConfig(**FIXED, num_labels=5)))
    classifier.save_pretrained(tmp_path)
    bb = load_backbone(tmp_path)
    px = bb.preprocess(images())
    with torch.no_grad():
        assert max_diff(bb.forward_features(px), classifier.vit(pixel_values=px).last_hidden_state) <= TOL


def test_hub_id_loads_from_the_local_cache_offline(tmp_path):
    """A hub id found in the Hugging Face cache loads with HF_HUB_OFFLINE=1, processor config included.

    Runs in a fresh interpreter because huggingface_hub reads HF_HOME once, at import.
    """
    repo = tmp_path / "hf_home" / "hub" / "models--stitchkit-tests--tiny-dinov3"
    revision = "0" * 40
    bb = load_backbone(build("dinov3"))
    save_backbone(bb, repo / "snapshots" / revision, image_size=40)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    pixels = torch.randn(1, 3, 40, 40)
    torch.save(pixels, tmp_path / "px.pt")
    script = (
        "import sys, torch; from stitchkit.backbones import load_backbone; "
        "bb = load_backbone('stitchkit-tests/tiny-dinov3'); assert bb.image_size == 40, bb.image_size; "
        "torch.save(bb.forward_features(torch.load(sys.argv[1])), sys.argv[2])"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "px.pt"), str(tmp_path / "out.pt")], env=env, check=True)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), bb.forward_features(pixels))


def test_unreachable_hub_fails_fast(tmp_path):
    """Without HF_HUB_OFFLINE and without a reachable hub, an id that is not cached fails in well under a
    second instead of after ~25 s of huggingface_hub retries, and a cached id lacking
    preprocessor_config.json still loads without waiting. A fresh interpreter, as HF_HOME and HF_ENDPOINT
    are read at import; the endpoint is a closed local port, so this holds with or without internet."""
    repo = tmp_path / "hf_home" / "hub" / "models--stitchkit-tests--tiny-vit"
    revision = "0" * 40
    save_backbone(build("vit"), repo / "snapshots" / revision)
    (repo / "snapshots" / revision / "preprocessor_config.json").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    script = (
        "import time; from stitchkit.backbones import load_backbone; from stitchkit.errors import ModelNotFoundError\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    load_backbone('stitchkit-tests/not-cached')\n"
        "    raise SystemExit('loaded a model that does not exist')\n"
        "except ModelNotFoundError as err:\n"
        "    assert 'not in the Hugging Face cache' in str(err) and 'cannot connect' in str(err), err\n"
        "assert load_backbone('stitchkit-tests/tiny-vit').image_size == 32\n"
        "elapsed = time.monotonic() - start\n"
        "assert elapsed < 8, f'took {elapsed:.1f} s'\n"
    )
    unset = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_missing_models_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_backbone("stitchkit-tests/no-such-model")
    message = str(err.value)
    assert "not in the Hugging Face cache" in message and "offline" in message and "local folder" in message

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_backbone(tmp_path / "empty")

    hf.BertConfig(**TEXT).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelNotFoundError, match="unsupported architecture 'bert'.*dinov2.*siglip2"):
        load_backbone(tmp_path / "bert")
    with pytest.raises(ModelNotFoundError, match="unsupported architecture"):
        load_backbone(nn.Linear(2, 2))

    # a checkpoint missing vision weights is refused rather than silently random-initialised
    save_backbone(build("dinov2"), tmp_path / "partial")
    weights = safetensors.torch.load_file(tmp_path / "partial" / "model.safetensors")
    del weights["layernorm.weight"]
    safetensors.torch.save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelNotFoundError, match="lacks 1 weights.*layernorm.weight"):
        load_backbone(tmp_path / "partial")


def test_preprocess_resizes_and_normalises_like_a_hand_computation():
    bb = load_backbone(build("dinov2"), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    image = images()[1]  # 20x50, not square
    resized = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    expected = ((resized - np.float32([0.1, 0.2, 0.3])) / np.float32([0.5, 0.25, 0.125])).transpose(2, 0, 1)
    px = bb.preprocess([image])
    assert px.dtype == torch.float32 and px.shape == (1, 3, 32, 32)
    assert np.abs(px[0].numpy() - expected).max() <= 1e-6

    # a uint8 batch gives the same bytes as the PIL images; an image already at size is not resampled
    batch = np.stack([np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC))] * 2)
    assert torch.equal(bb.preprocess(batch), bb.preprocess([Image.fromarray(batch[0])] * 2))
    assert torch.equal(bb.preprocess(batch)[0], px[0])
    exact = (batch[0].astype(np.float32) / 255 - np.float32([0.1, 0.2, 0.3])) / np.float32([0.5, 0.25, 0.125])
    assert np.abs(bb.preprocess(batch)[0].numpy().transpose(1, 2, 0) - exact).max() <= 1e-6


def test_naflex_preprocess_matches_the_hf_processor():
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
        get_image_size_for_max_num_patches,
    )

    for height in [1, 7, 16, 33, 100, 257]:
        for width in [5, 16, 48, 300]:
            for budget in [16, 64, 256]:
                assert naflex_image_size(height, width, 8, budget) == get_image_size_for_max_num_patches(
                    height, width, 8, budget
                )
    bb = load_backbone(build("siglip2_naflex"))
    # images already at their NaFlex size, so neither side resamples (a bare module resizes bicubic, the HF
    # class bilinear; test_preprocess_equals_the_checkpoints_own_processor covers resizing)
    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32), (16, 48)]]
    ours = bb.preprocess(pictures)
    theirs = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)(pictures, return_tensors="pt")
    assert max_diff(ours.pixel_values, theirs["pixel_values"]) <= 1e-6
    assert torch.equal(ours.pixel_attention_mask, theirs["pixel_attention_mask"].to(torch.int32))
    assert torch.equal(ours.spatial_shapes, theirs["spatial_shapes"])
    # a plain (N, 3, H, W) batch is patchified without padding
    square = bb.preprocess(pictures[:1])
    with torch.no_grad():
        as_image = torch.from_numpy((np.asarray(pictures[0], np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
        assert max_diff(bb.forward_features(as_image), bb.forward_features(square)) <= TOL


# The HF PIL processor of each kind, at the tiny models' size; their `resample` is the class default.
HF_PROCESSORS = {
    "vit": lambda: hf.ViTImageProcessorPil(size={"height": 32, "width": 32}),  # bilinear
    "siglip": lambda: hf.SiglipImageProcessorPil(size={"height": 32, "width": 32}),  # bicubic
    "siglip2_naflex": lambda: hf.Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16),  # bilinear
}


@pytest.mark.parametrize("config_names_the_filter", [True, False])
@pytest.mark.parametrize("kind", list(HF_PROCESSORS))
def test_preprocess_equals_the_checkpoints_own_processor(kind, config_names_the_filter, tmp_path):
    """A folder whose preprocessor_config.json is the HF processor's own gives the processor's pixels for images
    that need resizing (40x40, 20x50): same filter, or the family's default one when the file does not say."""
    processor = HF_PROCESSORS[kind]()
    build(kind).save_pretrained(tmp_path)
    written = processor.to_dict()
    if not config_names_the_filter:
        del written["resample"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(written))
    ours = load_backbone(tmp_path).preprocess(images())
    theirs = processor(images(), return_tensors="pt")
    if isinstance(ours, PatchifiedPixels):
        assert torch.equal(ours.spatial_shapes, theirs["spatial_shapes"])
        assert torch.equal(ours.pixel_attention_mask, theirs["pixel_attention_mask"].to(torch.int32))
        ours = ours.pixel_values
    assert ours.shape == theirs["pixel_values"].shape
    assert max_diff(ours, theirs["pixel_values"]) <= 1e-6


@pytest.mark.parametrize("name", sorted({family.name for family in FAMILIES.values()}))
def test_each_familys_default_filter_is_its_hf_processors(name):
    family = next(f for f in FAMILIES.values() if f.name == name)
    if name == "dinov3_vit":  # only a torchvision processor exists
        pytest.importorskip("torchvision")
        processor_class = hf.DINOv3ViTImageProcessor
    else:
        processor_class = getattr(hf, family.processor_class + "Pil")
    assert family.resample == processor_class.resample


def test_the_filter_is_kept_on_save_and_a_bare_module_stays_bicubic(tmp_path):
    """save_backbone writes the backbone's own filter; a bare module (a micro-zoo encoder) has no processor
    and is saved, and used, with bicubic, as before checkpoints' filters were read."""
    model = build("vit")
    model.save_pretrained(tmp_path / "no_processor")  # a checkpoint without preprocessor_config.json
    checkpoint = load_backbone(tmp_path / "no_processor")
    assert checkpoint.resample == Image.Resampling.BILINEAR  # ViTImageProcessor's default
    save_backbone(checkpoint, tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "preprocessor_config.json").read_text())["resample"] == 2
    assert load_backbone(tmp_path / "resaved").resample == Image.Resampling.BILINEAR

    assert load_backbone(model).resample == Image.Resampling.BICUBIC
    save_backbone(model, tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "preprocessor_config.json").read_text())["resample"] == 3
    bare = load_backbone(tmp_path / "bare", mean=(0, 0, 0), std=(1, 1, 1))
    hand = np.asarray(images()[1].resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255
    assert np.abs(bare.preprocess(images()[1:])[0].numpy().transpose(1, 2, 0) - hand).max() <= 1e-6
    assert load_backbone(tmp_path / "bare", resample=2).resample == Image.Resampling.BILINEAR  # an override

    processor = json.loads((tmp_path / "bare" / "preprocessor_config.json").read_text())
    (tmp_path / "bare" / "preprocessor_config.json").write_text(json.dumps(dict(processor, resample=9)))
    with pytest.raises(ModelNotFoundError, match="unreadable preprocessor_config.json: resample must be one of"):
        load_backbone(tmp_path / "bare")


def test_transparent_images_are_composited_onto_white_like_the_hf_processor():
    rgba = np.zeros((40, 40, 4), np.uint8)  # transparent black, with an opaque red square
    rgba[8:24, 8:24] = [255, 0, 0, 255]
    image = Image.fromarray(rgba, "RGBA")
    ours = load_backbone(build("siglip")).preprocess([image])
    theirs = hf.SiglipImageProcessorPil(size={"height": 32, "width": 32})([image], return_tensors="pt")
    assert max_diff(ours, theirs["pixel_values"]) <= 1e-6
    assert (ours[0, :, -1, -1] == 1.0).all()  # white, not the black the transparent pixels store


def test_a_bf16_checkpoint_loads_in_float32_unless_a_dtype_is_asked_for(tmp_path):
    model = build("dinov2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    bb = load_backbone(tmp_path)
    assert bb.dtype == torch.float32
    assert torch.equal(bb.model.embeddings.cls_token, model.embeddings.cls_token.float())  # same weights, upcast
    assert load_backbone(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_dtype_and_device():
    bb = load_backbone(build("dinov3"), dtype=torch.bfloat16, device="cpu")
    px = bb.preprocess(images())
    assert px.dtype == torch.float32
    with torch.no_grad():
        out = bb.forward_features(px)
    assert out.dtype == torch.bfloat16 and bb.dtype == torch.bfloat16 and out.device.type == "cpu"
