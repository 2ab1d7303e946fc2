"""The micro VLM: LLaVA-OneVision at toy scale, trained from scratch on the shapes world.

Architecture (the real LlavaOnevisionForConditionalGeneration, nothing custom):
    vision tower   a micro zoo encoder (default: the SigLIP recipe); features of its last block
    projector      LLaVA-OneVision's 2-layer GELU MLP
    language model a small Qwen2 decoder
    tokenizer      word-level over the shapes-world vocabulary (digits and number words, colours, categories
                   and plurals, supercategories, sizes, positions, prompt words); unknown words such as ID
                   strings fall back to characters, first letter first
    processor      LlavaOnevisionProcessor with the model's own image processor and a ChatML template

Training data: seeded single- and multi-image shapes-world tasks, as (images, question, answer):
    caption       "describe the image."                        -> "two red stars and a blue circle"
    count         "how many shapes are there?"                 -> "3"
    count_class   "how many stars are there?"                  -> "2"
    name          "what shape is this?" / "what colour is this?" (one object)
    count_multi   "how many stars are there in the images?"    -> total over 2-3 images
    common        "which shape is in every image?"             -> the one category all images share
and, with `data.mimic`, MIMIC-format queries (counting, listing, common, odd-one, in MIMIC's own question templates
and prompt, up to 6 images) that stitchkit.multiimage's generator builds from a training shapes world -- the
micro-scale counterpart of the paper's procedural multi-image fine-tuning data. The vocabulary covers every
word of MIMIC's templates, so its prompts read word by word.

The result is saved with save_pretrained (model and processor) and loads with
LlavaOnevisionForConditionalGeneration.from_pretrained + AutoProcessor, or stitchkit's load_vlm.
`micro_vlm.json` records greedy accuracy on held-out scenes per task against the majority answer (headline:
single-image counting) and, with `eval.mimic`, the MIMIC scores on a benchmark from a held-out world against
the best constant answer.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
import yaml
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from stitchkit.config import Config, config_hash, load_config
from stitchkit.engine import TrainConfig, seed_everything, train
from stitchkit.engine.devices import BUILD_THREADS, torch_threads
from stitchkit.errors import ConfigError, InputError
from stitchkit.multiimage.benchmark import load_benchmark
from stitchkit.multiimage.evaluate import evaluate, task_scores
from stitchkit.multiimage.experiment import DataSource, benchmark_images, prepare_benchmark
from stitchkit.multiimage.studies import training_samples
from stitchkit.multiimage.templates import template_words
from stitchkit.paths import CONFIGS, stitchkit_home
from stitchkit.runs import atomic_write_json, library_versions, open_cached_build
from stitchkit.vlm.finetune import Sample, collate_for, vlm_loss
from stitchkit.vlm.loading import build_processor, load_vlm
from stitchkit.vlm.model import VLM
from stitchkit.vlm.tokenizer import CHAT_SPECIAL_TOKENS, chat_template, word_tokenizer
from stitchkit.world import ONTOLOGY, WorldConfig, caption, render_scene, sample_scene
from stitchkit.world.captions import NUMBER_WORDS
from stitchkit.world.scene import Scene, sample_object

RECIPE_FILE = CONFIGS / "zoo" / "micro_vlm.yaml"
MICRO_RECIPES = ("micro_vlm", "gpu/micro_vlm")  # the bundled micro VLM recipes, by name
MICRO_JSON = "micro_vlm.json"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
TASKS = ("caption", "count", "count_class", "name", "count_multi", "common")
PROMPT_WORDS = "describe the image images how many shapes shape are there in what is this colour which every".split()
CHAT_ROLES = ("user", "assistant")  # the chat template's role names: one token each, not 4 and 9 characters
# 2: MIMIC template words in the vocabulary, own-task scenes drawn from a stream apart from every rendered world
MICRO_FORMAT_VERSION = 2


class RandomTower(Config):
    """An untrained SigLIP vision tower (for tests and ablations): no zoo build needed."""

    image_size: int = pydantic.Field(32, ge=8)
    patch_size: int = pydantic.Field(8, ge=1)
    hidden_size: int = pydantic.Field(32, ge=8)
    num_layers: int = pydantic.Field(2, ge=1)
    num_heads: int = pydantic.Field(2, ge=1)


class LanguageModel(Config):
    hidden_size: int = pydantic.Field(128, ge=8)
    num_layers: int = pydantic.Field(4, ge=1)
    num_heads: int = pydantic.Field(4, ge=1)
    num_kv_heads: int = pydantic.Field(2, ge=1)
    mlp_ratio: int = pydantic.Field(4, ge=1)


class MicroData(Config):
    samples: int = pydantic.Field(6000, ge=1, description="training samples, rendered once")
    seed: int = 0
    tasks: dict[str, float] = pydantic.Field(
        default_factory=lambda: {"caption": 1, "count": 3, "count_class": 1, "name": 1, "count_multi": 1, "common": 1},
        description="relative frequency of each task",
    )
    max_objects: int = pydantic.Field(4, ge=1, le=8, description="objects per counting scene: 1..max_objects")
    world: WorldConfig = WorldConfig(min_size=0.25, max_size=0.45, max_overlap=0.0)
    mimic: DataSource | None = pydantic.Field(
        None, description="MIMIC-format training queries: a source (usually a world rendered into the build folder) "
        "and the generator's build config (n_samples per task); never the evaluation world",
    )

    @pydantic.field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; choose from: {', '.join(TASKS)}")
        if not any(w > 0 for w in tasks.values()):
            raise ValueError("at least one task needs a positive weight")
        return tasks


class MicroEval(Config):
    samples: int = pydantic.Field(200, ge=1, description="held-out samples per own task")
    seed: int = 1_000_000
    mimic: DataSource | None = pydantic.Field(None, description="a MIMIC benchmark to score the model on (held out)")


class MicroVLMRecipe(Config):
    name: str = "micro_vlm"
    description: str = ""
    vision: str = pydantic.Field("siglip", description="zoo recipe of the vision tower, or 'random' (see random_tower)")
    train_vision: bool = pydantic.Field(False, description="also train the vision tower (LLaVA-OneVision's later stages do)")
    random_tower: RandomTower = RandomTower()
    language: LanguageModel = LanguageModel()
    data: MicroData = MicroData()
    train: TrainConfig
    eval: MicroEval = MicroEval()

    @pydantic.model_validator(mode="after")
    def _held_out(self) -> MicroVLMRecipe:
        # Image i of a world rendered with seed s is drawn from default_rng([s, i]) (world/coco.py), so worlds of
        # different seeds share no scene; the same seed would put the evaluation images into the training data.
        train, held_out = self.data.mimic, self.eval.mimic
        if train and held_out and train.world and held_out.world and train.world.seed == held_out.world.seed:
            raise ValueError(f"data.mimic and eval.mimic render worlds with the same seed ({train.world.seed}): "
                             "the evaluation images would be training images; give the training world another seed")
        return self

    @property
    def folder_name(self) -> str:
        return f"{self.name.replace('/', '-')}-{micro_recipe_hash(self)}"


def load_micro_recipe(name_or_path: str | Path = RECIPE_FILE) -> MicroVLMRecipe:
    """A recipe file, or a bundled recipe by name: "micro_vlm" (CPU) or "gpu/micro_vlm"."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        return load_config(MicroVLMRecipe, name_or_path)
    if str(name_or_path) not in MICRO_RECIPES:
        raise ConfigError(
            f"unknown micro VLM recipe {str(name_or_path)!r}; choose from: {', '.join(MICRO_RECIPES)}, or a recipe "
            "file (.yaml). The zoo's other recipes (dino, clip, ...) are vision encoders, not VLMs"
        )
    return load_config(MicroVLMRecipe, CONFIGS / "zoo" / f"{name_or_path}.yaml")


def is_micro_spec(spec: str) -> bool:
    """Every command that takes a VLM reads the same specs: a hub id, a folder, or the micro VLM as `micro` (the
    CPU recipe), `micro:RECIPE` or `zoo:RECIPE`, RECIPE a bundled micro VLM recipe (micro_vlm, gpu/micro_vlm) or a
    recipe file."""
    return spec == "micro" or spec.startswith(("micro:", "zoo:"))


def micro_spec_recipe(spec: str) -> MicroVLMRecipe | None:
    """The micro VLM recipe a model spec names (is_micro_spec), or None for a hub id or a folder."""
    if not is_micro_spec(spec):
        return None
    return load_micro_recipe(spec.partition(":")[2] or RECIPE_FILE)


def check_vlm_spec(spec: str) -> None:
    """Fail fast on a VLM spec that cannot load (an unknown recipe, a missing folder, a hub id that is neither
    cached nor downloadable), before the work that comes ahead of loading it; reads a config, builds nothing."""
    if micro_spec_recipe(spec) is None:
        from transformers import AutoConfig

        from stitchkit.backbones.loading import from_hub

        from_hub(spec, lambda **kw: AutoConfig.from_pretrained(spec, **kw))


def resolve_vlm(spec: str) -> tuple[str, str]:
    """(what load_vlm reads, the identity recorded with results) for a hub id, a folder or a micro VLM spec; a
    micro VLM is built first if it is not cached yet."""
    recipe = micro_spec_recipe(spec)
    if recipe is not None:
        return str(build_micro_vlm(recipe)), f"micro:{recipe.folder_name}"
    path = Path(spec).expanduser()
    return spec, str(path.resolve()) if path.exists() else spec


def micro_recipe_hash(recipe: MicroVLMRecipe) -> str:
    """The recipe's content hash, with its zoo tower's recipe hash in it: a changed tower recipe (or zoo code)
    builds a new micro VLM instead of reusing one trained on the old tower."""
    from stitchkit.zoo import load_recipe, recipe_hash

    tower = "random" if recipe.vision == "random" else recipe_hash(load_recipe(recipe.vision))
    return config_hash(recipe, f"{MICRO_FORMAT_VERSION}+{tower}")


# ---- vocabulary, tokenizer, processor, model ---------------------------------------------------------


def vocabulary() -> list[str]:
    words = [*NUMBER_WORDS, *(str(i) for i in range(21)), "a", "an", "and", "nothing", *PROMPT_WORDS, *CHAT_ROLES]
    words += template_words()  # MIMIC's prompts, word by word
    words += [c.name for c in ONTOLOGY.categories] + [c.plural for c in ONTOLOGY.categories]
    words += ONTOLOGY.supercategories + [c.name for c in ONTOLOGY.colours] + ONTOLOGY.sizes
    words += [w for position in ONTOLOGY.positions for w in position.split()]
    return words


def micro_processor(image_size: int, mean, std) -> LlavaOnevisionProcessor:
    tokenizer = word_tokenizer(vocabulary(), (*CHAT_SPECIAL_TOKENS, IMAGE_TOKEN, VIDEO_TOKEN), chat_template=chat_template(IMAGE_TOKEN))
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[[image_size, image_size]],
        image_mean=list(mean),
        image_std=list(std),
    )
    return build_processor(
        LlavaOnevisionProcessor,
        image_processor,
        tokenizer,
        num_image_tokens=0,  # set by micro_model once the tower's grid is known
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
    )


def _vision_tower(recipe: MicroVLMRecipe):
    """(SiglipVisionConfig-like config, state dict or None, image size, mean, std)."""
    if recipe.vision == "random":
        tower = recipe.random_tower
        config = dict(
            model_type="siglip_vision_model", image_size=tower.image_size, patch_size=tower.patch_size,
            hidden_size=tower.hidden_size, intermediate_size=4 * tower.hidden_size,
            num_hidden_layers=tower.num_layers, num_attention_heads=tower.num_heads,
        )  # fmt: skip
        return config, None, tower.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    from stitchkit.backbones import load_backbone
    from stitchkit.zoo import build

    backbone = load_backbone(build(recipe.vision))
    model = backbone.model
    if backbone.num_prefix_tokens:
        raise ConfigError(f"the micro VLM needs a vision tower without prefix tokens (SigLIP); {recipe.vision!r} has some")
    config = model.config.to_dict()
    config["model_type"] = "siglip_vision_model"
    return config, model.state_dict(), backbone.image_size, backbone.mean, backbone.std


def micro_model(recipe: MicroVLMRecipe) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    vision_config, vision_state, image_size, mean, std = _vision_tower(recipe)
    processor = micro_processor(image_size, mean, std)
    grid = image_size // vision_config["patch_size"]
    processor.num_image_tokens = grid * grid
    tokenizer = processor.tokenizer
    lm = recipe.language
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=lm.hidden_size,
            intermediate_size=lm.mlp_ratio * lm.hidden_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),  # fmt: skip
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[image_size, image_size]],
        tie_word_embeddings=True,
    )
    seed_everything(recipe.train.seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    if vision_state is not None:
        model.model.vision_tower.load_state_dict(vision_state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


# ---- tasks ---------------------------------------------------------------------------------------------


def _render(scene: Scene, size: int, world: WorldConfig) -> tuple[np.ndarray, Scene]:
    rendered = render_scene(scene, size, world)
    return np.asarray(rendered.image), rendered.scene  # the scene as drawn (hidden objects left out)


def make_sample(task: str, rng: np.random.Generator, size: int, data: MicroData) -> Sample:
    """One (images, question, answer) of a task, drawn from `rng`."""
    world = data.world.model_copy(update={"min_objects": 1, "max_objects": data.max_objects})
    categories = world.category_list()
    if task in ("caption", "count", "count_class"):
        image, scene = _render(sample_scene(rng, world), size, world)
        if task == "caption":
            return Sample([image], "describe the image.", caption(scene))
        if task == "count":
            return Sample([image], "how many shapes are there?", str(len(scene.objects)))
        category = categories[int(rng.integers(len(categories)))]
        count = sum(o.category == category for o in scene.objects)
        return Sample([image], f"how many {category.plural} are there?", str(count))
    if task == "name":
        scene = Scene((sample_object(rng, world),), int(rng.integers(2**31)))
        image, scene = _render(scene, size, world)
        obj = scene.objects[0]
        if rng.random() < 0.5:
            return Sample([image], "what shape is this?", obj.category.name)
        return Sample([image], "what colour is this?", obj.colour.name)
    n_images = int(rng.integers(2, 4))
    if task == "count_multi":
        category = categories[int(rng.integers(len(categories)))]
        images, total = [], 0
        for _ in range(n_images):
            image, scene = _render(sample_scene(rng, world.model_copy(update={"max_objects": 2})), size, world)
            images.append(image)
            total += sum(o.category == category for o in scene.objects)
        return Sample(images, f"how many {category.plural} are there in the images?", str(total))
    # common: every image holds the shared category; other objects come from a disjoint pool per image.
    shared = categories[int(rng.integers(len(categories)))]
    others = [c for c in categories if c != shared]
    picks = rng.permutation(len(others))
    images = []
    for i in range(n_images):
        objects = [sample_object(rng, world, category=shared), sample_object(rng, world, category=others[picks[i]])]
        image, _ = _render(Scene(tuple(objects), int(rng.integers(2**31))), size, world)
        images.append(image)
    return Sample(images, "which shape is in every image?", shared.name)


def make_samples(n: int, seed: int, size: int, data: MicroData, tasks: dict[str, float] | None = None) -> list[Sample]:
    tasks = {k: v for k, v in (tasks or data.tasks).items() if v > 0}
    names, weights = list(tasks), np.array(list(tasks.values()), dtype=float)
    # A rendered world draws image i from default_rng([world seed, i]) and SeedSequence ignores trailing zeros,
    # so default_rng(seed) would be image 0's generator of the world with that seed; the spawn key gives these
    # scenes a stream of their own, apart from every world a MIMIC benchmark is built from.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    chosen = rng.choice(len(names), size=n, p=weights / weights.sum())
    return [make_sample(names[i], rng, size, data) for i in chosen]


# ---- evaluation ----------------------------------------------------------------------------------------


@torch.no_grad()
def answer_accuracy(vlm: VLM, samples: list[Sample], batch_size: int = 32) -> dict[str, float]:
    """Greedy-decoding accuracy on one-word answers (first word of the answer == the response) and the
    majority-answer baseline."""
    correct = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        answers = vlm.generate([s.images for s in chunk], [s.prompt for s in chunk], max_new_tokens=3)
        correct += sum((a.split() or [""])[0] == s.response for a, s in zip(answers, chunk))
    counts = np.unique([s.response for s in samples], return_counts=True)[1]
    return {"accuracy": correct / len(samples), "chance": float(counts.max() / len(samples)), "samples": len(samples)}


def own_task_accuracies(vlm: VLM, recipe: MicroVLMRecipe, size: int) -> dict[str, dict[str, float]]:
    """answer_accuracy on `eval.samples` held-out samples of every one-word task of the recipe's mix."""
    tasks = [t for t, w in recipe.data.tasks.items() if w > 0 and t != "caption"]
    return {task: answer_accuracy(vlm, make_samples(recipe.eval.samples, recipe.eval.seed, size, recipe.data, {task: 1}))
            for task in tasks}


# ---- MIMIC-format data and evaluation ---------------------------------------------------------------------


def mimic_benchmark(source: DataSource, folder: Path, exclude: list[Path] | None = None):
    """The benchmark of `source`, built (a world rendered first) into `folder` by stitchkit.multiimage's generator:
    the same data path as `stitchkit mimic run`."""
    return load_benchmark(prepare_benchmark(source, folder, exclude=exclude))


def mimic_training_samples(recipe: MicroVLMRecipe, folder: Path) -> list[Sample]:
    """MIMIC-format training queries (images, MIMIC's prompt, ground truth), held out from the evaluation:
    the evaluation benchmark is built first and none of its image files may be used (the mechanism of the
    experiments' fine-tuning data), and the recipe refuses training and evaluation worlds of one seed."""
    exclude = benchmark_images(mimic_benchmark(recipe.eval.mimic, folder / "eval")) if recipe.eval.mimic else []
    bench = mimic_benchmark(recipe.data.mimic, folder / "train", exclude=exclude)
    shared = set(exclude) & set(benchmark_images(bench))
    if shared:
        raise InputError(f"MIMIC training data shares {len(shared)} images with the evaluation, e.g. {min(shared)}")
    return training_samples(bench)


def mimic_scores(vlm: VLM, source: DataSource, folder: Path) -> dict[str, Any]:
    """The model on a held-out MIMIC benchmark (MIMIC's prompts, greedy decoding, clean scoring), next to the best
    constant answer of each task; the full report is in folder/scores/."""
    bench = mimic_benchmark(source, folder)
    results = evaluate(vlm, bench, folder / "scores", settings={"model": "micro VLM build"}, batch_size=32,
                       description="micro VLM: MIMIC eval")
    answers = results["answers"]
    return {"samples": {t: m["n"] for t, m in results["tasks"].items()}, "scores": task_scores(results),
            "constant_answer": answers["constant_answer"], "constant_answer_score": answers["constant_answer_score"],
            "top_answer_share": answers["top_answer_share"], "legacy_official": results["legacy_official"]}


# ---- build ---------------------------------------------------------------------------------------------


def micro_root() -> Path:
    return stitchkit_home() / "zoo"


def build_micro_vlm(recipe: MicroVLMRecipe | str | Path = RECIPE_FILE, force: bool = False) -> Path:
    """Train, save and evaluate the micro VLM once; later calls return the cached folder.

    stitchkit_home()/zoo/<name>-<hash>/ holds the Hugging Face files (config.json, model.safetensors,
    tokenizer, processor), recipe.yaml, train/ (the engine's folder, so a killed build resumes), mimic/train and
    mimic/eval (the MIMIC training and evaluation worlds and benchmarks, with the evaluation's report in
    mimic/eval/scores) and micro_vlm.json (written last: accuracies, timings).
    """
    if not isinstance(recipe, MicroVLMRecipe):
        recipe = load_micro_recipe(recipe)
    folder = micro_root() / recipe.folder_name
    if open_cached_build(folder, MICRO_JSON, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), force):
        return folder

    model, processor = micro_model(recipe)
    vlm = VLM(model, processor)
    size = processor.image_processor.size["height"]
    started = time.perf_counter()
    samples = make_samples(recipe.data.samples, recipe.data.seed, size, recipe.data)
    mimic_train = mimic_training_samples(recipe, folder / "mimic") if recipe.data.mimic else []
    render_seconds = time.perf_counter() - started

    model.requires_grad_(True)
    model.model.vision_tower.requires_grad_(recipe.train_vision)
    model.train()
    with torch_threads(BUILD_THREADS):
        started = time.perf_counter()
        result = train(model, vlm_loss, samples + mimic_train, recipe.train, folder / "train",
                       collate_fn=collate_for(vlm), description="micro VLM")
        train_seconds = time.perf_counter() - started
        model.eval()
        started = time.perf_counter()
        tasks = own_task_accuracies(vlm, recipe, size)
        mimic = mimic_scores(vlm, recipe.eval.mimic, folder / "mimic" / "eval") if recipe.eval.mimic else None
        eval_seconds = time.perf_counter() - started
    vlm.save_pretrained(folder)
    atomic_write_json(
        folder / MICRO_JSON,
        {
            "name": recipe.name,
            "hash": micro_recipe_hash(recipe),
            "description": recipe.description,
            "vision": recipe.vision,
            "params": sum(p.numel() for p in model.parameters()),
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "vocab_size": len(processor.tokenizer),
            "image_size": size,
            "counting": tasks.get("count"),  # the headline: single-image counting
            "tasks": tasks,
            "mimic": mimic,
            "train": {
                "steps": result.steps,
                "samples": len(samples) + len(mimic_train),
                "mimic_samples": len(mimic_train),
                "first_loss": result.losses[0],
                "final_loss": float(np.mean(result.losses[-10:])),
                "render_seconds": render_seconds,
                "seconds": train_seconds,
                "eval_seconds": eval_seconds,
                "device": str(next(model.parameters()).device),
            },
            "recipe": recipe.model_dump(mode="json"),
            "versions": library_versions(),
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return folder


def micro_info(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MICRO_JSON).read_text())


def micro_summary_row(recipe: MicroVLMRecipe) -> dict[str, Any]:
    """One row of display strings for `stitchkit zoo list`; None where the recipe is not built. Scores are %:
    single-image counting against the majority answer, the MIMIC average against the best constant answers'."""
    path = micro_root() / recipe.folder_name / MICRO_JSON
    info = json.loads(path.read_text()) if path.is_file() else None
    mimic = (info or {}).get("mimic")
    percent = lambda value: f"{100 * value:.1f}"  # noqa: E731
    return {
        "recipe": recipe.name,
        "params": f"{info['params'] / 1e6:.2f}M" if info else None,
        "train s": round(info["train"]["seconds"]) if info else None,
        "count %": percent(info["counting"]["accuracy"]) if info else None,
        "majority %": percent(info["counting"]["chance"]) if info else None,
        "MIMIC avg %": percent(mimic["scores"]["avg"]) if mimic else None,
        "constant avg %": percent(float(np.mean(list(mimic["constant_answer_score"].values())))) if mimic else None,
    }


def load_micro_vlm(recipe: MicroVLMRecipe | str | Path = RECIPE_FILE, **options) -> VLM:
    """The micro VLM as a VLM (built first if it is not cached yet)."""
    return load_vlm(build_micro_vlm(recipe), **options)
