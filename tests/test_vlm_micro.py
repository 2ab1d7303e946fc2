"""The micro VLM's MIMIC side: its vocabulary reads MIMIC's prompts word by word, its MIMIC-format training queries
answer what the raw annotations say, they never share an image with the evaluation, and a tiny build reports the
MIMIC scores next to the best constant answer. Tiny recipes only (random tower, a few steps)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from stitchkit.errors import InputError
from stitchkit.multiimage.protocol import plural, prompt_text
from stitchkit.multiimage.templates import (
    MULTI_CLASS_INSTRUCTION,
    TEMPLATES,
    question_text,
)
from stitchkit.world import ONTOLOGY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = {"min_objects": 1, "max_objects": 3, "min_size": 0.3, "max_size": 0.45, "max_overlap": 0.0, "max_rotation": 0}
BUILD = {
    "seed": 0,
    "filter": {"min_box_area_frac": 0.02},
    "min_images_per_class": 2,
    "max_image_reuse": 6,
    "counting": {"n_samples": 12, "splits": ["balanced", "unbalanced"], "k": [1], "spread": [1, 2], "distractors": [0, 1],
                 "totals": [2], "max_count": 3},
    "listing": {"n_samples": 6, "spread": [1, 2], "distractors": [0, 1]},
    "common": {"n_samples": 6, "n_images": [2, 3]},
    "oddone": {"n_samples": 6, "n_images": [3, 4]},
}


def tiny_recipe(train_seed: int = 5, eval_seed: int = 6):
    from stitchkit.vlm.micro import MicroVLMRecipe

    return MicroVLMRecipe.model_validate({
        "name": "tiny_micro", "vision": "random",
        "language": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
        "data": {"samples": 8, "mimic": {"world": {"images": 150, "size": 32, "seed": train_seed, "config": WORLD},
                                         "build": BUILD}},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3},
        "eval": {"samples": 4, "mimic": {"world": {"images": 100, "size": 32, "seed": eval_seed, "config": WORLD},
                                         "build": {**BUILD, "counting": {**BUILD["counting"], "n_samples": 4},
                                                   **{t: {**BUILD[t], "n_samples": 2} for t in ("listing", "common", "oddone")}}}},
    })


# ---- vocabulary ---------------------------------------------------------------------------------------------


def test_every_mimic_prompt_tokenises_word_by_word():
    """No MIMIC prompt word falls back to characters: every template, every class and supercategory filled in,
    the multi-class instruction, the Listing suffix, and the answer forms ("3", "circle: 2, star: 1", "a, b")."""
    from stitchkit.vlm.micro import micro_processor, vocabulary

    tokenizer = micro_processor(32, (0.5,) * 3, (0.5,) * 3).tokenizer
    classes = [c.name for c in ONTOLOGY.categories]
    texts = []
    for task, templates in TEMPLATES.items():
        for template_id in range(len(templates)):
            if task == "counting":
                fills = [question_text(task, template_id, classes=[c]) for c in classes]
                fills.append(question_text(task, template_id, classes=classes[:2]))  # with MULTI_CLASS_INSTRUCTION
            elif task == "listing":
                fills = [question_text(task, template_id, group=g) for g in ONTOLOGY.supercategories]
            else:
                fills = [question_text(task, template_id)]
            texts += [prompt_text(task, q) for q in fills]
    texts += ["3", "circle: 2, star: 1", "ellipse, ring, semicircle", MULTI_CLASS_INSTRUCTION]
    known = set(vocabulary())
    for text in texts:
        tokens = tokenizer.tokenize(text)
        assert not [t for t in tokens if t.startswith("##") or t == tokenizer.unk_token], (text, tokens)
        assert [t for t in tokens if t.isalnum()] == re.findall(r"[a-z0-9]+", text.lower()), text
        assert set(re.findall(r"[a-z]+", text.lower())) <= known
    # one token per word and punctuation mark (it was 45 tokens, most of them characters), chat roles too
    assert len(tokenizer.tokenize(prompt_text("common", TEMPLATES["common"][1]))) == 16
    assert tokenizer.tokenize("user assistant") == ["user", "assistant"]


# ---- MIMIC-format training data -----------------------------------------------------------------------------


def recomputed_answer(question: str, files: list[str], world: Path) -> str:
    """The answer of a MIMIC query from the raw annotations.json of its world and its question text alone (not
    from the generator's index): the task is found by matching the question against the templates."""
    coco = json.loads((world / "annotations.json").read_text())
    image_id = {im["file_name"]: im["id"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    groups = defaultdict(set)
    for c in coco["categories"]:
        groups[c["supercategory"]].add(c["name"])
    per_image = defaultdict(Counter)
    for a in coco["annotations"]:
        per_image[a["image_id"]][names[a["category_id"]]] += 0 if a.get("iscrowd") else 1
    counts = [per_image[image_id[f]] for f in files]
    present = [set(c) for c in counts]
    for task, templates in TEMPLATES.items():
        for template in templates:
            pattern = re.escape(template).replace(r"\{things\}", "(?P<things>.+)").replace(r"\{group\}", "(?P<group>.+)")
            match = re.fullmatch(pattern, question)
            if not match:
                continue
            if task == "counting":
                (name,) = [n for n in names.values() if plural(n) == match["things"]]
                return str(sum(c[name] for c in counts))
            if task == "listing":
                return ", ".join(sorted(set().union(*present) & groups[match["group"]]))
            if task == "common":
                (shared,) = set.intersection(*present)
                return shared
            seen = Counter(n for p in present for n in p)
            (odd,) = [n for n, k in seen.items() if 1 <= k < len(files) / 2]
            return odd
    raise AssertionError(f"no template matches {question!r}")


def image_digests(paths) -> set[str]:
    return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def test_mimic_training_answers_recomputed_and_held_out(tmp_path):
    from stitchkit.multiimage.benchmark import load_benchmark
    from stitchkit.multiimage.experiment import benchmark_images
    from stitchkit.vlm.micro import mimic_training_samples

    samples = mimic_training_samples(tiny_recipe(), tmp_path)
    assert len(samples) == 30
    world = tmp_path / "train" / "world"
    tasks = Counter()
    for s in samples:
        question = re.fullmatch(r"Question: (.*?)(?:\. Please provide the list of category names directly\.)?\nAnswer:",
                                s.prompt, re.DOTALL)[1]
        files = [str(Path(p).relative_to(world)) for p in s.images.paths]
        assert s.response == recomputed_answer(question, files, world), s.prompt
        tasks[next(t for t, ts in TEMPLATES.items() if any(question.startswith(x.split("{")[0]) for x in ts))] += 1
    assert set(tasks) == set(TEMPLATES)
    assert all(len(s.images) >= 1 and s.images[0].size == (32, 32) for s in samples[:3])  # images read when batched

    # the evaluation benchmark (built first) and the training queries share no image, not even by content
    used = {p for s in samples for p in s.images.paths}
    evaluation = benchmark_images(load_benchmark(tmp_path / "eval" / "benchmark"))
    assert all(Path(p).is_relative_to(world) for p in used) and not image_digests(used) & image_digests(evaluation)


def test_training_and_evaluation_worlds_need_different_seeds(tmp_path):
    import pydantic

    from stitchkit.multiimage.experiment import check_micro_held_out, load_experiment

    with pytest.raises(pydantic.ValidationError, match="same seed"):
        tiny_recipe(train_seed=4, eval_seed=4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe().model_dump(mode="json")))
    experiment = {"model": f"micro:{recipe}", "data": {"world": {"images": 20, "size": 32, "seed": 5}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(experiment))
    with pytest.raises(InputError, match="training world"):
        check_micro_held_out(load_experiment(tmp_path / "run.yaml"))
    experiment["data"]["world"]["seed"] = 0
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(experiment))
    check_micro_held_out(load_experiment(tmp_path / "run.yaml"))


def test_bundled_recipe_trains_on_mimic_queries_from_its_own_world():
    from stitchkit.multiimage.experiment import load_experiment
    from stitchkit.paths import CONFIGS
    from stitchkit.vlm.micro import load_micro_recipe

    recipe = load_micro_recipe()
    train, held_out = recipe.data.mimic.world, recipe.eval.mimic.world
    assert train.seed != held_out.seed
    for name in ("quickstart", "micro"):
        cfg = load_experiment(CONFIGS / "mimic" / f"{name}.yaml")
        assert cfg.data.world.seed != train.seed
        assert cfg.data.world.config == held_out.config == train.config  # one world, evaluated where it was trained


def test_tiny_build_reports_own_tasks_and_mimic_against_the_constant(tmp_path, monkeypatch):
    from transformers import LlavaOnevisionForConditionalGeneration

    from stitchkit.vlm.micro import build_micro_vlm, micro_info, micro_summary_row

    monkeypatch.setenv("STITCHKIT_HOME", str(tmp_path))
    folder = build_micro_vlm(tiny_recipe())
    info = micro_info(folder)
    assert set(info["tasks"]) == {"count", "count_class", "name", "count_multi", "common"}
    assert info["counting"] == info["tasks"]["count"] and info["train"]["mimic_samples"] == 30
    mimic = info["mimic"]
    assert set(mimic["scores"]) == {"counting", "listing", "common", "oddone", "avg"}
    assert all(0 <= mimic["constant_answer_score"][t] <= 1 for t in TEMPLATES)
    assert (folder / "mimic" / "eval" / "scores" / "report.md").is_file()
    row = micro_summary_row(tiny_recipe())  # what `stitchkit zoo list` shows
    assert row["count %"] == f"{100 * info['counting']['accuracy']:.1f}" and row["MIMIC avg %"] == f"{100 * mimic['scores']['avg']:.1f}"
    assert type(LlavaOnevisionForConditionalGeneration.from_pretrained(folder)) is LlavaOnevisionForConditionalGeneration


def test_editing_the_tower_recipe_changes_the_micro_vlm_cache_key(tmp_path):
    """The micro VLM's cache folder is keyed by its tower's recipe too: a micro VLM trained on an old tower is
    not reused after the tower's recipe changes."""
    from stitchkit.paths import CONFIGS
    from stitchkit.vlm.micro import micro_recipe_hash

    tower = yaml.safe_load((CONFIGS / "zoo" / "siglip.yaml").read_text())
    tower_file = tmp_path / "tower.yaml"
    tower_file.write_text(yaml.safe_dump(tower))
    recipe = tiny_recipe().model_copy(update={"vision": str(tower_file)})
    before = micro_recipe_hash(recipe)
    assert micro_recipe_hash(recipe) == before
    tower["train"]["steps"] += 1
    tower_file.write_text(yaml.safe_dump(tower))
    assert micro_recipe_hash(recipe) != before


@pytest.mark.parametrize("train_vision", [False, True])
def test_train_vision_decides_whether_the_tower_learns(tmp_path, monkeypatch, train_vision):
    """The projector and LM always train; the vision tower only with `train_vision` (the GPU recipe's setting)."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from stitchkit.vlm.micro import MicroVLMRecipe, build_micro_vlm, micro_model

    monkeypatch.setenv("STITCHKIT_HOME", str(tmp_path))
    data = tiny_recipe().model_dump(mode="json")
    data["data"]["mimic"] = data["eval"]["mimic"] = None
    recipe = MicroVLMRecipe.model_validate({**data, "train_vision": train_vision})
    initial, _ = micro_model(recipe)
    trained = LlavaOnevisionForConditionalGeneration.from_pretrained(build_micro_vlm(recipe))

    def changed(module: str) -> bool:
        before, after = initial.get_submodule(module).state_dict(), trained.get_submodule(module).state_dict()
        return any(not torch.equal(before[name], after[name]) for name in before)

    assert changed("model.multi_modal_projector") and changed("model.language_model")
    assert changed("model.vision_tower") == train_vision


def test_every_vlm_command_reads_the_same_micro_specs(tmp_path):
    from stitchkit.errors import ConfigError, ModelNotFoundError
    from stitchkit.vlm.loading import load_tokenizer
    from stitchkit.vlm.micro import micro_spec_recipe, resolve_vlm

    assert micro_spec_recipe("org/model") is None and micro_spec_recipe(str(tmp_path)) is None
    assert micro_spec_recipe("micro").name == micro_spec_recipe("zoo:micro_vlm").name == "micro_vlm"
    assert micro_spec_recipe("micro:gpu/micro_vlm").name == "gpu/micro_vlm"
    with pytest.raises(ConfigError, match="unknown micro VLM recipe 'dino'.*vision encoders"):
        micro_spec_recipe("zoo:dino")
    assert resolve_vlm(str(tmp_path)) == (str(tmp_path), str(tmp_path.resolve()))  # folders and hub ids pass through
    with pytest.raises(ModelNotFoundError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path))
