"""Zoo recipes: one YAML file per micro foundation model, validated by `ZooRecipe`.

A recipe fixes everything a build depends on: the encoder's shape, the objective (which also fixes the
Hugging Face class), augmentations, the training images, the engine's TrainConfig and the probe. Bundled
recipes live in configs/zoo/<name>.yaml (CPU, minutes) and configs/zoo/gpu/<name>.yaml (named "gpu/<name>").
A built model is cached under a folder named by the recipe's name and content hash, so editing a recipe
builds a new model instead of silently reusing a stale one.

Why the CPU recipes use 4x4 patch grids (32 px / patch 8, SigLIP 64 px / patch 16): small ViTs learn shape
slowly (a few hundred steps buy tens of percent), and a 4x4 grid costs about a quarter of an 8x8 one per step,
so within the ~4 minutes the four CPU builds may take together they learn visibly more
(benchmarks/bench_zoo.py prints the learning curves). The GPU recipes use 16x16 grids.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal, Union

import pydantic
import yaml

from stitchkit.config import Config, config_hash, load_config, read_yaml
from stitchkit.engine import TrainConfig
from stitchkit.errors import ConfigError
from stitchkit.paths import CONFIGS
from stitchkit.world import WorldConfig
from stitchkit.world.sets import Target
from stitchkit.zoo.augment import Augmentation

RECIPES_DIR = CONFIGS / "zoo"
# Part of every recipe hash: bump it when a change to the zoo's training code changes what a recipe builds,
# so cached models made by the old code are not reused.
ZOO_FORMAT_VERSION = 2  # 2: builds train on BUILD_THREADS CPU threads (1 built with torch's default)


class Encoder(Config):
    """The vision transformer's shape; its Hugging Face class follows from the objective."""

    image_size: int = pydantic.Field(ge=8)
    patch_size: int = pydantic.Field(ge=1)
    hidden_size: int = pydantic.Field(ge=8)
    num_layers: int = pydantic.Field(ge=1)
    num_heads: int = pydantic.Field(ge=1)
    mlp_ratio: int = pydantic.Field(4, ge=1)
    num_registers: int = pydantic.Field(0, ge=0, description="register tokens (Dinov2WithRegistersModel only)")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @pydantic.model_validator(mode="after")
    def _check(self) -> "Encoder":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * self.mlp_ratio


class TextTower(Config):
    """The small text transformer of the image-text objectives; it reads word-level caption ids."""

    hidden_size: int = pydantic.Field(64, ge=8)
    num_layers: int = pydantic.Field(2, ge=1)
    num_heads: int = pydantic.Field(4, ge=1)
    max_words: int = pydantic.Field(16, ge=3, description="sequence length, <bos> and <eos> included")

    @pydantic.model_validator(mode="after")
    def _check(self) -> "TextTower":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class Supervised(Config):
    """ViTModel + linear head on the normed CLS token, cross-entropy on shapes-world labels."""

    kind: Literal["supervised"]
    target: Target = "both"
    label_smoothing: float = pydantic.Field(0.0, ge=0, lt=1)


class Clip(Config):
    """CLIPModel: softmax contrastive loss between image and caption embeddings."""

    kind: Literal["clip"]
    text: TextTower = TextTower()
    projection_dim: int = pydantic.Field(64, ge=1)
    init_temperature: float = pydantic.Field(0.07, gt=0, description="CLIP's initial softmax temperature")


class Siglip(Config):
    """SiglipModel: pairwise sigmoid loss with a learnable temperature and bias."""

    kind: Literal["siglip"]
    text: TextTower = TextTower()
    init_logit_scale: float = pydantic.Field(math.log(10), description="t' in the SigLIP paper; temperature t = exp(t')")
    init_logit_bias: float = -10.0


class Dino(Config):
    """Dinov2WithRegistersModel: DINO self-distillation of an EMA teacher into the student over two views."""

    kind: Literal["dino"]
    head_hidden_size: int = pydantic.Field(256, ge=1)
    bottleneck_size: int = pydantic.Field(64, ge=1)
    num_prototypes: int = pydantic.Field(512, ge=2, description="K, the output dimension of the DINO head")
    student_temperature: float = pydantic.Field(0.1, gt=0)
    teacher_temperature: float = pydantic.Field(0.04, gt=0)
    center_momentum: float = pydantic.Field(0.9, ge=0, lt=1)
    teacher_momentum: float = pydantic.Field(0.996, ge=0, le=1, description="start of the cosine schedule to 1")


Objective = Annotated[Union[Supervised, Clip, Siglip, Dino], pydantic.Field(discriminator="kind")]

HF_CLASSES = {"supervised": "ViTModel", "clip": "CLIPModel", "siglip": "SiglipModel", "dino": "Dinov2WithRegistersModel"}


class TrainingImages(Config):
    images: int = pydantic.Field(ge=2, description="single-object shapes-world images, rendered once")
    seed: int = 0
    world: WorldConfig | None = None  # None: the world's classification defaults


class Probe(Config):
    """Linear probe on held-out images (seeds far from the training data's)."""

    target: Target = "both"
    train_images: int = pydantic.Field(2000, ge=10)
    test_images: int = pydantic.Field(1000, ge=1)
    seed: int = 1_000_000


# Objectives whose loss is not a mean of per-image terms: a step's loss must cover its whole batch at once, so
# they train with grad_accum 1 (micro-batches would give fewer negatives and a micro-batch centre, and move the
# DINO teacher once per micro-batch). Several processes are fine: each gathers the others' share of the batch
# (zoo.models, engine.devices.gather_across_processes and mean_across_processes).
BATCH_OBJECTIVES = {
    "clip": "every other caption of the batch is a negative",
    "siglip": "every other caption of the batch is a negative",
    "dino": "the teacher moves and the centre is the batch mean, once per forward pass",
}


class ZooRecipe(Config):
    name: str = pydantic.Field(pattern=r"^[a-z0-9][a-z0-9_-]*(/[a-z0-9][a-z0-9_-]*)?$")
    description: str = ""
    encoder: Encoder
    objective: Objective
    augment: Augmentation = Augmentation()
    data: TrainingImages
    train: TrainConfig
    probe: Probe = Probe()

    @pydantic.model_validator(mode="after")
    def _check(self) -> "ZooRecipe":
        if self.encoder.num_registers and self.objective.kind != "dino":
            raise ValueError("encoder.num_registers needs the dino objective (only Dinov2WithRegistersModel has registers)")
        if self.objective.kind in BATCH_OBJECTIVES and self.train.grad_accum != 1:
            raise ValueError(
                f"the {self.objective.kind} objective needs train.grad_accum = 1: {BATCH_OBJECTIVES[self.objective.kind]}"
            )
        return self

    @property
    def hf_class(self) -> str:
        return HF_CLASSES[self.objective.kind]

    @property
    def folder_name(self) -> str:
        """`<name>-<hash>`, the recipe's folder under stitchkit_home()/zoo."""
        return f"{self.name.replace('/', '-')}-{recipe_hash(self)}"


def recipe_yaml(recipe: ZooRecipe) -> str:
    """The recipe in canonical YAML: every field, defaults filled in, keys sorted."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=True)


def recipe_hash(recipe: ZooRecipe) -> str:
    """The recipe's content hash (config_hash: comments, key order and fields at their defaults do not matter)."""
    return config_hash(recipe, ZOO_FORMAT_VERSION)


def _is_encoder_recipe(path: Path) -> bool:
    """configs/zoo also holds recipes of other zoo members (the micro VLM); ours have an encoder and an objective."""
    data = read_yaml(path)
    return isinstance(data, dict) and "encoder" in data and "objective" in data


def list_recipes(include_gpu: bool = True) -> list[str]:
    """Names of the bundled vision-encoder recipes: the CPU ones, then "gpu/<name>"."""
    cpu = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if _is_encoder_recipe(p))
    gpu_dir = RECIPES_DIR / "gpu"
    gpu = sorted(f"gpu/{p.stem}" for p in gpu_dir.glob("*.yaml") if _is_encoder_recipe(p)) if include_gpu else []
    return cpu + gpu


def load_recipe(name_or_path: str | os.PathLike) -> ZooRecipe:
    """A bundled recipe by name ("dino", "gpu/dino") or any recipe YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"}:
        return load_config(ZooRecipe, path)
    names = list_recipes()
    if str(name_or_path) not in names:
        raise ConfigError(f"unknown zoo recipe {str(name_or_path)!r}; choose from: {', '.join(names)}")
    path = RECIPES_DIR / f"{name_or_path}.yaml"
    recipe = load_config(ZooRecipe, path)
    if recipe.name != str(name_or_path):
        raise ConfigError(f"{path}: name {recipe.name!r} differs from the file's recipe name {str(name_or_path)!r}")
    return recipe
