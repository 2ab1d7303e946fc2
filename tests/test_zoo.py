"""Zoo recipes, builds and the `stitchkit zoo` verbs, on tiny variants of the bundled recipes (a few steps each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from torch.utils.data import default_collate

from stitchkit.backbones import load_backbone
from stitchkit.config import validate_config
from stitchkit.engine.checkpoint import load_trainable_state_dict
from stitchkit.errors import ConfigError
from stitchkit.world import classification_set
from stitchkit.zoo import ZooRecipe, build, linear_probe, list_recipes, load_recipe, recipe_hash, zoo_info, zoo_path
from stitchkit.zoo.augment import Augmentation
from stitchkit.zoo.builder import VOCAB_JSON, caption_vocabulary, summary_row, training_data
from stitchkit.zoo.models import make_trainable, training_pixels
from stitchkit.zoo.recipes import RECIPES_DIR
from stitchkit.zoo.text import WordVocab

CPU_RECIPES = ("supervised", "clip", "siglip", "dino")
DDP_HELPER = Path(__file__).with_name("zoo_ddp_build.py")


@pytest.fixture(autouse=True)
def zoo_home(tmp_path, monkeypatch):
    monkeypatch.setenv("STITCHKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STITCHKIT_PROGRESS", "0")


def tiny(name: str) -> ZooRecipe:
    """The bundled recipe shrunk to seconds: same objective, class and prefix tokens, 2 blocks, 16 px."""
    data = load_recipe(name).model_dump(mode="json")
    patch = 8 if data["encoder"]["patch_size"] == 16 else 4  # keep the 64 px / 128 px models' grids equal
    data["encoder"].update(image_size=4 * patch, patch_size=patch, hidden_size=16, num_layers=2, num_heads=2)
    if "text" in data["objective"]:
        data["objective"]["text"].update(hidden_size=16, num_layers=1, num_heads=2)
    if data["objective"]["kind"] == "dino":
        data["objective"].update(head_hidden_size=16, bottleneck_size=8, num_prototypes=16)
    data["data"]["images"] = 24
    data["train"].update(steps=3, batch_size=8, warmup_steps=1, checkpoint_every=2)
    data["probe"].update(train_images=40, test_images=10)
    return validate_config(ZooRecipe, data, source=f"tiny {name}")


def test_bundled_recipes_are_valid_and_comparable():
    names = list_recipes()
    assert set(CPU_RECIPES) <= set(names)
    assert {f"gpu/{n}" for n in CPU_RECIPES} <= set(names)
    for tier in (CPU_RECIPES, [f"gpu/{n}" for n in CPU_RECIPES]):
        recipes = [load_recipe(n) for n in tier]
        assert len({r.encoder.num_layers for r in recipes}) == 1  # same depth: stitching compares block k to k
        assert len({r.encoder.grid for r in recipes}) == 1  # same patch grid
        assert {r.objective.kind: r.hf_class for r in recipes} == {
            "supervised": "ViTModel",
            "clip": "CLIPModel",
            "siglip": "SiglipModel",
            "dino": "Dinov2WithRegistersModel",
        }
        assert [r.encoder.num_registers for r in recipes] == [0, 0, 0, 4]


def test_a_typo_in_a_recipe_names_the_field(tmp_path):
    text = (RECIPES_DIR / "dino.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("hidden_size:", "hiden_size:"))
    with pytest.raises(ConfigError, match=r"encoder\.hiden_size: Extra inputs"):
        load_recipe(bad)
    bad.write_text(text.replace("num_prototypes:", "prototypes:"))
    with pytest.raises(ConfigError, match=r"objective\.dino\.prototypes"):
        load_recipe(bad)
    bad.write_text(text.replace("patch_size: 8", "patch_size: 7"))
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        load_recipe(bad)
    bad.write_text(text.replace("kind: dino", "kind: mae"))
    with pytest.raises(ConfigError, match="objective"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="unknown zoo recipe 'dinov9'; choose from: clip, dino"):
        load_recipe("dinov9")


def test_registers_need_the_dino_objective():
    data = load_recipe("clip").model_dump(mode="json")
    data["encoder"]["num_registers"] = 4
    with pytest.raises(ConfigError, match="num_registers needs the dino objective"):
        validate_config(ZooRecipe, data)


@pytest.mark.parametrize("name", ["clip", "siglip", "dino"])
def test_whole_batch_objectives_refuse_gradient_accumulation(name):
    """Contrastive negatives and DINO's centre come from the batch of one forward pass: split across micro-batches,
    the objective would be another one. (Several processes gather the batch instead: the two-process test below.)"""
    data = load_recipe(name).model_dump(mode="json")
    data["train"]["grad_accum"] = 2
    with pytest.raises(ConfigError, match=f"the {name} objective needs train.grad_accum = 1"):
        validate_config(ZooRecipe, data)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_image_text_logits_are_hugging_faces_own_on_one_process(name):
    """The loss reads logits rebuilt from the (gathered) embeddings; on one process the gather is the identity and
    they are CLIPModel's / SiglipModel's own logits_per_image bit for bit, so one-process builds are unchanged."""
    recipe = tiny(name)
    dataset, num_classes, vocab = training_data(recipe)
    model = make_trainable(recipe, num_classes, len(vocab))
    with torch.no_grad():  # logit_scale and SigLIP's bias away from their init, so a missing term would show
        model.model.logit_scale.fill_(1.7)
        if name == "siglip":
            model.model.logit_bias.fill_(-3.0)
    batch = default_collate([dataset[i] for i in range(6)])
    pixels = training_pixels(batch["image"], Augmentation(), recipe.encoder)
    mask = {"attention_mask": batch["caption_mask"]} if name == "clip" else {}
    out = model.model(input_ids=batch["caption_ids"], pixel_values=pixels, **mask)
    assert torch.equal(model.global_logits_per_image(out.image_embeds, out.text_embeds), out.logits_per_image)


def test_hash_follows_the_content_not_the_formatting(tmp_path):
    recipe = load_recipe("supervised")
    text = (RECIPES_DIR / "supervised.yaml").read_text()
    reformatted = tmp_path / "supervised.yaml"
    lr_line = next(line for line in text.splitlines() if line.strip().startswith("lr:"))
    same_value = lr_line.split(":")[0] + f": {float(lr_line.split(':')[1]):.10f}"  # same number, other spelling
    reformatted.write_text("# a comment\n" + text.replace(lr_line, same_value))
    assert recipe_hash(load_recipe(reformatted)) == recipe_hash(recipe)
    changed = recipe.model_copy(update={"train": recipe.train.model_copy(update={"lr": recipe.train.lr * 2})})
    assert recipe_hash(changed) != recipe_hash(recipe)
    assert changed.folder_name.startswith("supervised-") and changed.folder_name != recipe.folder_name
    assert load_recipe("gpu/dino").folder_name.startswith("gpu-dino-")


def _hf_pooled(recipe: ZooRecipe, folder, pixels: torch.Tensor) -> torch.Tensor:
    """The trained model's pooled image features from Hugging Face's own forward, rebuilt from the engine's
    final checkpoint (independent of save_backbone / load_backbone)."""
    vocab_size = len(WordVocab.load(folder / VOCAB_JSON)) if (folder / VOCAB_JSON).exists() else 0
    model = make_trainable(recipe, num_classes=130, vocab_size=vocab_size)
    load_trainable_state_dict(model, folder / "train" / "checkpoint" / "model.safetensors")
    model.eval()
    with torch.no_grad():
        kind = recipe.objective.kind
        if kind == "supervised":
            return model.encoder(pixel_values=pixels).last_hidden_state[:, 0]
        if kind in ("clip", "siglip"):
            return model.model.vision_model(pixel_values=pixels).pooler_output
        return model.teacher.backbone(pixel_values=pixels).pooler_output  # DINO saves its teacher


@pytest.mark.parametrize("name", CPU_RECIPES)
def test_tiny_build_saves_a_backbone_that_loads_with_identical_features(name):
    recipe = tiny(name)
    folder = build(recipe)
    assert zoo_path(recipe) == folder and folder.name == recipe.folder_name
    info = zoo_info(recipe)
    assert info["train"]["steps"] == 3 and len(info["recipe"]) > 0
    assert 0 <= info["probe"]["accuracy"] <= 1 and 0 <= info["probe"]["random_init_accuracy"] <= 1
    assert 0 <= info["probe"]["category_accuracy"] <= 1 and info["probe"]["category_chance"] == 1 / 13
    shown = summary_row(recipe)["category % (random init)"]  # what `stitchkit zoo list` shows
    assert shown == f"{100 * info['probe']['category_accuracy']:.1f} ({100 * info['probe']['category_random_init_accuracy']:.1f})"
    assert info["prefix_tokens"] == {"supervised": 1, "clip": 1, "siglip": 0, "dino": 5}[name]

    images = classification_set(6, recipe.encoder.image_size, seed=5, target="both").images
    bb = load_backbone(folder)
    assert type(bb.model).__name__ == {
        "supervised": "ViTModel",
        "clip": "CLIPVisionModel",
        "siglip": "SiglipVisionModel",
        "dino": "Dinov2WithRegistersModel",
    }[name]
    with torch.no_grad():
        loaded = bb.pool(bb.forward_features(bb.preprocess(images)))
    pixels = training_pixels(torch.from_numpy(images), Augmentation(), recipe.encoder)
    assert torch.allclose(loaded, _hf_pooled(recipe, folder, pixels), atol=1e-5)
    # Training moved the weights away from the random init the probe compares against.
    baseline = load_backbone(make_trainable(recipe, 130, 64).vision_encoder(), image_size=recipe.encoder.image_size)
    trained_weights, initial_weights = bb.model.state_dict(), baseline.model.state_dict()
    assert trained_weights.keys() == initial_weights.keys()
    assert any(not torch.equal(trained_weights[k], initial_weights[k]) for k in trained_weights)


def test_build_is_cached_deterministic_and_forced_rebuilds_match():
    recipe = tiny("dino")
    folder = build(recipe)
    weights = (folder / "model.safetensors").read_bytes()
    stamp = (folder / "zoo.json").stat().st_mtime_ns
    assert build(recipe) == folder and (folder / "zoo.json").stat().st_mtime_ns == stamp  # cached: not rebuilt
    (folder / "zoo.json").unlink()  # as if killed after training: the engine's finished training is reused
    build(recipe)
    assert zoo_info(recipe)["train"]["resumed_from"] == 3
    assert (folder / "model.safetensors").read_bytes() == weights
    build(recipe, force=True)
    assert zoo_info(recipe)["train"]["resumed_from"] is None
    assert (folder / "model.safetensors").read_bytes() == weights  # same seed, same bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU builds only: on a GPU the thread count is left alone")
def test_builds_train_on_build_threads_whatever_the_callers_setting(monkeypatch):
    """Float sums split over another number of threads give other weights, so a build pins its thread count:
    a build started at 2 threads trains and probes at BUILD_THREADS and gives the bytes of one started at 1."""
    from stitchkit.engine.devices import BUILD_THREADS
    from stitchkit.zoo import builder

    seen = []
    real_train, real_probe = builder.train, builder.linear_probe
    monkeypatch.setattr(builder, "train", lambda *a, **k: seen.append(torch.get_num_threads()) or real_train(*a, **k))
    monkeypatch.setattr(builder, "linear_probe", lambda *a: seen.append(torch.get_num_threads()) or real_probe(*a))
    recipe, before = tiny("siglip"), torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        weights = (build(recipe) / "model.safetensors").read_bytes()
        assert torch.get_num_threads() == 2  # the caller's setting is restored
        torch.set_num_threads(1)
        assert (build(recipe, force=True) / "model.safetensors").read_bytes() == weights
    finally:
        torch.set_num_threads(before)
    assert seen == [BUILD_THREADS] * 10  # (train, 2 probes, 2 random-init probes) per build


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, build_all builds one after another")
def test_build_all_in_parallel_processes_gives_the_bytes_of_one_by_one_builds(tmp_path, monkeypatch):
    from stitchkit.zoo import build_all, builder

    def not_here(*args):
        raise AssertionError("trained in the calling process, not in a worker")

    recipes = [tiny("clip"), tiny("dino")]
    with monkeypatch.context() as patch:
        patch.setattr(builder, "_train_save_probe", not_here)  # spawned workers import the real one
        parallel = build_all(recipes, processes=2)
    assert [zoo_info(r)["train"]["resumed_from"] for r in recipes] == [None, None]  # trained in the workers
    monkeypatch.setenv("STITCHKIT_HOME", str(tmp_path / "one_by_one"))
    one_by_one = [build(r) for r in recipes]
    for a, b in zip(parallel, one_by_one):
        assert a != b and (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def same_pixels_tiny(name: str) -> ZooRecipe:
    """tiny(name) with augmentation off, 4 steps, every step logged, fp32. The engine seeds each process's RNG
    with seed + rank, so random views drawn by two processes differ from one process's; without augmentation
    both see the same pixels."""
    data = tiny(name).model_dump(mode="json")
    data["augment"] = Augmentation().model_dump(mode="json")
    data["train"].update(steps=4, log_every=1, mixed_precision="no")
    return validate_config(ZooRecipe, data, source=f"tiny {name} without augmentation")


def without_key_biases(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights but the attention key biases (k_proj.bias; the middle third of nn.MultiheadAttention's
    in_proj_bias, SigLIP's pooling head). A key bias adds q.b to all of a query's logits, which the softmax
    cancels: its gradient is zero but for float noise (~1e-8, against ~0.1 elsewhere), and AdamW, dividing by
    that noise's own RMS, moves it by up to the learning rate per step wherever the noise points. Other float
    summation orders (two processes) give other noise, so these entries differ at ~1e-4; they change no output."""
    kept = {}
    for name, weight in weights.items():
        if name.endswith("k_proj.bias"):
            continue
        if name.endswith("in_proj_bias"):
            third = len(weight) // 3
            weight = torch.cat([weight[:third], weight[2 * third :]])
        kept[name] = weight
    return kept


def logged_records(build_folder: Path) -> list[dict]:
    return [json.loads(line) for line in (build_folder / "train" / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(build_folder: Path) -> dict[str, torch.Tensor]:
    """The engine's last checkpoint of a build: trainable weights and buffers (DINO's teacher and centre)."""
    with safe_open(str(build_folder / "train" / "checkpoint" / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_batch_objectives_on_two_processes_train_like_one_at_the_same_global_batch(tmp_path):
    """CLIP and SigLIP gather every process's embeddings with their gradient and DINO all-reduces its centre, so
    two DDP processes of 4 images each give the losses, logged metrics and weights of one process with 8.
    Without the gathers the losses differ from the first step (fewer negatives) or the second (DINO's centre).
    Launched like the engine's two-process test (tests/ddp_launch.py), through zoo.build as `zoo train` does."""
    from ddp_launch import launch_two_cpu_processes

    recipes = [same_pixels_tiny(name) for name in ("clip", "siglip", "dino")]
    files = [tmp_path / f"{recipe.name}.yaml" for recipe in recipes]
    for recipe, path in zip(recipes, files):
        path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    launched = launch_two_cpu_processes(DDP_HELPER, [str(f) for f in files],
                                        {"STITCHKIT_HOME": str(tmp_path / "two_processes")}, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]

    for recipe in recipes:
        two = tmp_path / "two_processes" / "zoo" / recipe.folder_name
        one = build(recipe)  # one process: this one
        assert (two / "zoo.json").is_file()  # the main process saved and probed it
        # Per step: the loss and every logged metric (retrieval, temperature, prototypes_used, grad_norm, ...).
        # Same images, same math; only float summation order differs (measured: up to ~1e-6 relative).
        two_records, one_records = logged_records(two), logged_records(one)
        assert [r["step"] for r in two_records] == [r["step"] for r in one_records] == [1, 2, 3, 4]
        for two_record, one_record in zip(two_records, one_records):
            assert two_record.keys() == one_record.keys()
            for key, expected in one_record.items():
                where = f"{recipe.name} step {one_record['step']} {key}"
                assert two_record[key] == pytest.approx(expected, rel=1e-5), where
        # Weights and buffers: measured ~1e-7 apart, key biases aside.
        two_weights = without_key_biases(checkpoint_weights(two))
        one_weights = without_key_biases(checkpoint_weights(one))
        assert two_weights.keys() == one_weights.keys()
        for name, expected in one_weights.items():
            torch.testing.assert_close(two_weights[name], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_time_limit_stops_a_build_with_exit_3_and_the_same_command_resumes_it(tmp_path):
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny("supervised").model_dump(mode="json")))
    command = [sys.executable, "-m", "stitchkit", "zoo", "train", str(recipe_file)]
    env = {**os.environ, "STITCHKIT_HOME": str(tmp_path / "home"), "STITCHKIT_PROGRESS": "0"}
    stopped = subprocess.run([*command[:3], "--time-limit", "0", *command[3:]], env=env, capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == 3, stopped.stderr
    assert "stopped: the time limit passed: zoo supervised saved a checkpoint after step 1 of 3" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    info = json.loads(next((tmp_path / "home" / "zoo").glob("supervised-*/zoo.json")).read_text())
    assert info["train"]["resumed_from"] == 1


def test_image_text_builds_store_their_vocabulary():
    recipe = tiny("clip")
    folder = build(recipe)
    vocab = WordVocab.load(folder / VOCAB_JSON)
    assert {"star", "stars", "red", "a"} <= set(vocab.tokens)
    data = json.loads((folder / "config.json").read_text())
    assert data["model_type"] == "clip" and data["text_config"]["vocab_size"] == len(vocab)


def test_probe_of_a_random_encoder_reads_colour_far_above_chance():
    # Colour is linear in the mean pixel, so even a random-init encoder's pooled output separates it.
    recipe = tiny("supervised")
    bb = load_backbone(make_trainable(recipe, 10, 0).vision_encoder(), image_size=recipe.encoder.image_size)
    train_set = classification_set(200, 16, seed=1, target="colour")
    test_set = classification_set(100, 16, seed=2, target="colour")
    assert linear_probe(bb, train_set, test_set) > 0.6  # chance: 0.1


def _cli(*args: str, home) -> subprocess.CompletedProcess:
    env = {"STITCHKIT_HOME": str(home), "STITCHKIT_PROGRESS": "0", "PATH": ""}
    return subprocess.run([sys.executable, "-m", "stitchkit.cli", *args], capture_output=True, text=True, env=env)


def test_cli_lists_recipes_and_rejects_unknown_ones(tmp_path):
    listed = _cli("zoo", "list", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in CPU_RECIPES:
        assert name in listed.stdout
    assert "micro VLM" in listed.stdout and "gpu/micro_vlm" in listed.stdout  # not built here: its row shows "-"
    unknown = _cli("zoo", "train", "nosuch", home=tmp_path)
    assert unknown.returncode == 2
    assert "unknown zoo recipe 'nosuch'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_caption_vocabulary_covers_every_category_and_colour():
    vocab = caption_vocabulary(["a red star"])
    assert {"hexagons", "crosses", "brown", "cyan"} <= set(vocab.tokens)
