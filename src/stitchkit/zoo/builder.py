"""Build (train, save, probe) a zoo recipe once; later calls reuse the cached model.

stitchkit_home()/zoo/<name>-<hash>/ holds
    config.json, model.safetensors, preprocessor_config.json   the model, loadable with load_backbone
    vocab.json      the word vocabulary (image-text recipes only)
    recipe.yaml     the recipe in canonical form, every field spelled out (the hash covers those not at their default)
    train/          the engine's folder: metrics.jsonl, checkpoint/, done.json; a killed build resumes here
    zoo.json        written last: metadata, probe accuracies, train time; its presence means "built"
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from stitchkit.backbones import VisionBackbone, load_backbone, save_backbone
from stitchkit.engine import seed_everything, train
from stitchkit.engine.devices import BUILD_THREADS, is_main_process, torch_threads, wait_for_other_processes
from stitchkit.paths import stitchkit_home
from stitchkit.progress import track
from stitchkit.runs import atomic_write_json, library_versions, open_cached_build
from stitchkit.world import ONTOLOGY, classification_set
from stitchkit.zoo.models import make_trainable
from stitchkit.zoo.probe import linear_probe
from stitchkit.zoo.recipes import ZooRecipe, load_recipe, recipe_hash, recipe_yaml
from stitchkit.zoo.text import WordVocab

ZOO_JSON = "zoo.json"
VOCAB_JSON = "vocab.json"


class ColumnDataset(torch.utils.data.Dataset):
    """Equal-length tensors as columns; item i is {column: tensor[i]}."""

    def __init__(self, **columns: torch.Tensor):
        self.columns = columns
        self.length = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: column[i] for name, column in self.columns.items()}


def zoo_root() -> Path:
    return stitchkit_home() / "zoo"


def _resolve(name_or_recipe: str | ZooRecipe) -> ZooRecipe:
    return name_or_recipe if isinstance(name_or_recipe, ZooRecipe) else load_recipe(name_or_recipe)


def zoo_path(name_or_recipe: str | ZooRecipe) -> Path | None:
    """The folder of the built model for this recipe (as it is now), or None if it is not built."""
    folder = zoo_root() / _resolve(name_or_recipe).folder_name
    return folder if (folder / ZOO_JSON).is_file() else None


def zoo_info(name_or_recipe: str | ZooRecipe) -> dict[str, Any] | None:
    """zoo.json of the built model, or None if it is not built."""
    folder = zoo_path(name_or_recipe)
    return json.loads((folder / ZOO_JSON).read_text()) if folder else None


def summary_row(recipe: ZooRecipe) -> dict[str, Any]:
    """One row of display strings for tables of the zoo (`stitchkit zoo list`, the quickstart report);
    None where the recipe is not built."""
    info = zoo_info(recipe)
    grid = f"{recipe.encoder.grid}x{recipe.encoder.grid}"
    probe, trained = (info["probe"], info["train"]) if info else ({}, {})
    return {
        "recipe": recipe.name,
        "class": recipe.hf_class,
        "tokens": f"{grid}+{info['prefix_tokens']}" if info else grid,
        "params": f"{info['params'] / 1e6:.2f}M" if info else None,
        "train s": round(trained["seconds"]) if info else None,
        "probe %": f"{100 * probe['accuracy']:.1f}" if info else None,
        "random init %": f"{100 * probe['random_init_accuracy']:.1f}" if info else None,
        "chance %": f"{100 * probe['chance']:.1f}" if info else None,
        # Builds made before the category probe existed have none (weights unchanged, so no rebuild for it).
        "category % (random init)": (
            f"{100 * probe['category_accuracy']:.1f} ({100 * probe['category_random_init_accuracy']:.1f})"
            if "category_accuracy" in probe
            else None
        ),
    }


def load_zoo_backbone(name_or_recipe: str | ZooRecipe, **load_kwargs) -> VisionBackbone:
    """The recipe's trained encoder as a VisionBackbone, built first if it is not cached yet."""
    return load_backbone(build(name_or_recipe), **load_kwargs)


def load_frozen_backbone(spec: str, image_size: int | None = None, device: torch.device | None = None) -> VisionBackbone:
    """A hub id, a local folder, or zoo:NAME -> a frozen VisionBackbone (`image_size` overrides its resolution).

    On a GPU the frozen weights are loaded in bf16 (they only serve features; trainable parts on top stay fp32
    under autocast), which also saves autocast's per-step weight casts.
    """
    kwargs: dict[str, Any] = {"image_size": image_size}
    if device is not None and device.type == "cuda":
        kwargs.update(dtype=torch.bfloat16, device=device)
    if spec.startswith("zoo:"):
        return load_zoo_backbone(spec[4:], **kwargs)
    return load_backbone(spec, **kwargs)


def caption_vocabulary(captions: list[str]) -> WordVocab:
    """Every word of the training captions, plus every category (singular and plural) and colour name, so
    captions of other images of the same world rarely need <unk>."""
    names = [c.name for c in ONTOLOGY.categories] + [c.plural for c in ONTOLOGY.categories]
    return WordVocab.from_texts(captions + names + [c.name for c in ONTOLOGY.colours])


def training_data(recipe: ZooRecipe) -> tuple[ColumnDataset, int, WordVocab | None]:
    """The recipe's training images as a dataset of batches for its model, the number of label classes, and
    the caption vocabulary (image-text objectives only)."""
    encoder, objective, data_spec = recipe.encoder, recipe.objective, recipe.data
    labels = objective.target if objective.kind == "supervised" else "both"  # "both": every colour x category
    data = classification_set(data_spec.images, encoder.image_size, data_spec.seed, labels, data_spec.world)
    columns = {"image": torch.from_numpy(data.images), "label": torch.from_numpy(data.labels)}
    vocab = None
    if objective.kind in ("clip", "siglip"):
        vocab = caption_vocabulary(data.captions)
        columns["caption_ids"], columns["caption_mask"] = vocab.encode(data.captions, objective.text.max_words)
    return ColumnDataset(**columns), len(data.class_names), vocab


def probe_sets(recipe: ZooRecipe, target: str | None = None):
    """The held-out (train, test) ClassificationSets of the recipe's probe; `target` overrides its label."""
    probe, size, world = recipe.probe, recipe.encoder.image_size, recipe.data.world
    target = target or probe.target
    return (
        classification_set(probe.train_images, size, probe.seed, target, world),
        classification_set(probe.test_images, size, probe.seed + 1, target, world),
    )


def build(name_or_recipe: str | ZooRecipe, force: bool = False) -> Path:
    """Train, save and probe a recipe, unless it is already built (force: delete and rebuild). Returns its folder."""
    recipe = _resolve(name_or_recipe)
    folder = zoo_root() / recipe.folder_name
    if open_cached_build(folder, ZOO_JSON, recipe_yaml(recipe), force):
        return folder
    with torch_threads(BUILD_THREADS):  # training and probe: same bytes and numbers on every machine
        _train_save_probe(recipe, folder)
    return folder


def build_all(recipes: list[ZooRecipe], force: bool = False, processes: int | None = None) -> list[Path]:
    """Build several recipes (see `build`); returns their folders. On a CPU the unbuilt ones train side by side
    in `processes` processes (default: one per core): each build is pinned to BUILD_THREADS threads, so this
    gives the same bytes as building them one after another, in about half the time on two cores."""
    todo = list({recipe.folder_name: recipe for recipe in recipes if force or zoo_path(recipe) is None}.values())
    if processes is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = cores // BUILD_THREADS
    workers = min(len(todo), processes)
    # Under a several-process launch (accelerate launch, torchrun) the launched processes build each recipe
    # together, one after another, instead.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    parallel = workers > 1 and not torch.cuda.is_available() and not launched
    if parallel:
        spawn = multiprocessing.get_context("spawn")  # a fork after torch has started its thread pools can hang
        with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_quiet_worker) as pool:
            futures = [pool.submit(build, recipe, force) for recipe in todo]
            try:
                for future in track(as_completed(futures), f"zoo: {len(todo)} builds, {workers} at a time", len(todo)):
                    future.result()  # a failed build raises here, with its own message
            except BaseException:
                pool.shutdown(cancel_futures=True)  # builds not started yet are dropped; running ones finish
                raise
    return [build(recipe, force=force and not parallel) for recipe in recipes]


def _quiet_worker() -> None:
    os.environ["STITCHKIT_PROGRESS"] = "0"  # one progress bar (the parent's), not one per process on one terminal


def _train_save_probe(recipe: ZooRecipe, folder: Path) -> None:
    """Train (on every process of a several-process launch: the batch objectives gather across processes, see
    zoo.models), then save and probe on the main process alone while the others wait, so no two processes
    write the same file and none returns before the model is there."""
    encoder, objective = recipe.encoder, recipe.objective
    dataset, num_classes, vocab = training_data(recipe)
    seed_everything(recipe.train.seed)  # the initial weights; the engine reseeds for the data order
    model = make_trainable(recipe, num_classes=num_classes, vocab_size=len(vocab) if vocab else 0)
    random_init = copy.deepcopy(model.vision_encoder())  # the baseline: same architecture, untrained

    started = time.perf_counter()
    result = train(
        model, lambda m, batch: m(batch), dataset, recipe.train, folder / "train", description=f"zoo {recipe.name}"
    )
    train_seconds = time.perf_counter() - started
    if not is_main_process():
        wait_for_other_processes()  # until the main process has written zoo.json
        return

    trained = model.vision_encoder()
    save_backbone(trained, folder, image_size=encoder.image_size, mean=encoder.mean, std=encoder.std)
    if vocab is not None:
        vocab.save(folder / VOCAB_JSON)

    device = "cuda" if torch.cuda.is_available() else None
    backbone = load_backbone(folder, device=device)
    baseline = load_backbone(random_init, image_size=encoder.image_size, mean=encoder.mean, std=encoder.std, device=device)
    probe = recipe.probe
    probe_train, probe_test = probe_sets(recipe)
    started = time.perf_counter()
    accuracy = linear_probe(backbone, probe_train, probe_test)
    random_accuracy = linear_probe(baseline, probe_train, probe_test)
    # The same probe by category (shape) alone: the colour x category probe is mostly colour for these tiny ViTs
    # (results/zoo/shape_learning.md), so shape gets its own number.
    category_sets = probe_sets(recipe, "category")
    category_accuracy = linear_probe(backbone, *category_sets)
    category_random_accuracy = linear_probe(baseline, *category_sets)
    probe_seconds = time.perf_counter() - started

    atomic_write_json(
        folder / ZOO_JSON,
        {
            "name": recipe.name,
            "hash": recipe_hash(recipe),
            "description": recipe.description,
            "objective": objective.kind,
            "hf_class": type(trained).__name__,
            "vision_class": type(backbone.model).__name__,
            "params": sum(p.numel() for p in backbone.model.parameters()),
            "saved_params": sum(p.numel() for p in trained.parameters()),
            "image_size": encoder.image_size,
            "patch_size": encoder.patch_size,
            "grid": encoder.grid,
            "hidden_size": encoder.hidden_size,
            "num_layers": encoder.num_layers,
            "prefix_tokens": backbone.num_prefix_tokens,
            "probe": {
                "target": probe.target,
                "classes": len(probe_train.class_names),
                "chance": 1 / len(probe_train.class_names),
                "train_images": probe.train_images,
                "test_images": probe.test_images,
                "accuracy": accuracy,
                "random_init_accuracy": random_accuracy,
                "category_accuracy": category_accuracy,
                "category_random_init_accuracy": category_random_accuracy,
                "category_chance": 1 / len(category_sets[0].class_names),
                "seconds": probe_seconds,
            },
            "train": {
                "steps": result.steps,
                "images": recipe.data.images,
                "final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
                "first_loss": result.losses[0],
                "seconds": train_seconds,
                "resumed_from": result.resumed_from,
                "device": str(next(model.parameters()).device),
            },
            "recipe": recipe.model_dump(mode="json"),
            "versions": library_versions(),
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    wait_for_other_processes()
