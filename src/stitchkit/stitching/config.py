"""Configs of `stitchkit stitch run` (the protocol sweep) and `stitchkit stitch tree` (the VFM Stitch Tree).

Defaults follow the reference spec §7 where it has one; learning rates and epochs are sized for the micro zoo.
A model is named by a hub id, a local folder, or `zoo:NAME` for a micro-zoo model.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

import pydantic

from stitchkit.config import Config, MixedPrecision
from stitchkit.stitching.data import DataConfig, ImageSetConfig
from stitchkit.stitching.objectives import LABEL_FREE, Objective, stages


class StitchLayerConfig(Config):
    kind: Literal["identity", "linear", "mlp", "lora"] = "mlp"
    act: Literal["relu", "gelu"] = "relu"  # mlp only
    hidden: int | None = pydantic.Field(None, ge=1, description="mlp hidden width; default: the target's width")
    rank: int = pydantic.Field(16, ge=1)  # lora only
    alpha: float = pydantic.Field(32.0, gt=0)  # lora only
    init: Literal["random", "lstsq"] = "random"  # lstsq: closed-form LFM (linear, or lora's width projection)
    ridge: float = pydantic.Field(1e-4, ge=0)

    @property
    def name(self) -> str:
        """The layer's name in cell names, run folders and reports. A sweep reuses a finished cell by its name, so
        every field that differs from its default is in it (mlp-relu-h256, lora-r16-a16, linear+lstsq-ridge0.01):
        distinct layers, distinct names. Default settings add nothing, so the names of earlier runs stay valid."""
        base = {"mlp": f"mlp-{self.act}", "lora": f"lora-r{self.rank}"}.get(self.kind, self.kind)
        shown = {"kind", "init", *{"mlp": ["act"], "lora": ["rank"]}.get(self.kind, [])}
        name = base + ("+lstsq" if self.init == "lstsq" else "")
        for field, info in type(self).model_fields.items():
            value = getattr(self, field)
            if field not in shown and value != info.default:
                name += f"-{_NAME_LABELS.get(field, field)}{_name_value(value)}"
        return name


# How StitchLayerConfig.name labels a non-default field (a field not listed here is labelled by its own name).
_NAME_LABELS = {"act": "", "hidden": "h", "rank": "r", "alpha": "a"}


def _name_value(value) -> str:
    """A field value in a layer name: whole floats without '.0' (alpha 16.0 -> 16), others as repr (exact, so two
    values never share a name)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


class OptimConfig(Config):
    """One training stage: AdamW with warm-up and cosine decay (the engine's loop), optionally stopped early."""

    epochs: float = pydantic.Field(gt=0, description="at most this many epochs (fewer if early stopping ends it)")
    batch_size: int = pydantic.Field(64, ge=1)
    lr: float = pydantic.Field(1e-3, gt=0, description="S's learning rate (TLT), or the head's (probe)")
    head_lr: float | None = pydantic.Field(
        None, gt=0, description="TLT: the head's own learning rate (spec §7: S 1e-4, head 1e-3); None = lr"
    )
    patience: int | None = pydantic.Field(
        None,
        ge=1,
        description="early stopping: evaluate the val task score once per epoch, stop after this many epochs "
        "without improvement and keep the best epoch's weights (spec §2: patience 5); None = off",
    )
    lr_sweep: list[pydantic.PositiveFloat] | None = pydantic.Field(
        None,
        min_length=1,
        description="probe only: train each model's linear probe once per learning rate and keep the one with "
        "the best val score, the first on ties (spec §7: sweep {1e-4, 3e-4, 1e-3} on val, for fair baselines); "
        "None = train once at lr",
    )
    augment: bool = pydantic.Field(
        False,
        description="TLT only: a fresh RandomResizedCrop (scale 0.5-1) and horizontal flip of every training image, "
        "and of its label map (spec §7); the source's blocks 1..n then run online in TLT, since a cached activation "
        "cannot be cropped",
    )
    weight_decay: float = pydantic.Field(0.05, ge=0)
    warmup_fraction: float = pydantic.Field(0.03, ge=0, lt=1)
    max_grad_norm: float | None = pydantic.Field(1.0, gt=0)
    mixed_precision: MixedPrecision = "auto"

    @pydantic.field_validator("lr_sweep")
    @classmethod
    def _distinct_lrs(cls, lrs: list[float] | None) -> list[float] | None:
        # Each lr trains in a folder named after it, so a repeated lr would only repeat a finished training.
        if lrs is not None and len(set(lrs)) != len(lrs):
            raise ValueError(f"learning rates must be distinct, got {lrs}")
        return lrs

    def steps(self, examples: int) -> int:
        return max(1, round(self.epochs * examples / self.batch_size))


def _unused_option(stage: str, option: str) -> str | None:
    """Why a stage has no use for an OptimConfig option, or None if it has. Validation refuses such an option
    rather than ignore it, so a config never looks like it does something it does not."""
    if stage in LABEL_FREE and option == "patience":
        return (
            f"{stage.upper()} trains S without labels, so there is no val score to stop on (the head fitted "
            "afterwards stops by probe.patience)"
        )
    if stage in LABEL_FREE and option == "head_lr":
        return f"{stage.upper()} trains S alone (the head fitted afterwards trains at probe.lr)"
    if stage == "probe" and option == "head_lr":
        return "a probe is a head alone; set probe.lr"
    if stage != "probe" and option == "lr_sweep":
        return "only the linear probes of the models sweep their learning rate (set probe.lr_sweep)"
    if stage != "tlt" and option == "augment":
        return "only TLT trains on augmented images (LFM, FFM and the probes read features cached from the images as they are)"
    return None


def _check_stage_options(cfg: Config) -> None:
    """Refuse early stopping, head_lr, lr_sweep and augment in the stages (the OptimConfig fields of `cfg`) that
    cannot use them."""
    for stage, optim in cfg:
        if isinstance(optim, OptimConfig):
            for option in ("patience", "head_lr", "lr_sweep", "augment"):
                why = _unused_option(stage, option)
                if getattr(optim, option) not in (None, False) and why:
                    raise ValueError(f"{stage}.{option}: {why}")


def _check_distinct(values: list) -> list:
    """Refuse a value listed twice. Points and seeds name cells and run folders, so a repeated one would only be
    one training reported twice (and a spread over seeds [0, 0] would be a fake 0)."""
    repeated = sorted({v for i, v in enumerate(values) if v in values[:i]})
    if repeated:
        raise ValueError(f"{', '.join(map(str, repeated))} listed more than once in {values}; list each value once")
    return values


def _check_points(points: list[int]) -> list[int]:
    """Refuse stitch points below 1 (and repeated ones) at validation, before any model is built; the upper bound
    (N - 1) depends on the model's depth and is checked by model.check_point once the models are loaded."""
    bad = [n for n in points if n < 1]
    if bad:
        raise ValueError(
            f"stitch point(s) {bad} out of range: point n stitches after block n (1-indexed), so n >= 1 "
            "(and at most the model's number of blocks - 1)"
        )
    return _check_distinct(points)


# The stitch points of a sweep or a tree (_check_points).
StitchPoints = Annotated[list[int], pydantic.AfterValidator(_check_points)]
# The seeds of a sweep or a tree: each seed is one training of every cell (_check_distinct).
Seeds = Annotated[
    list[pydantic.NonNegativeInt], pydantic.AfterValidator(_check_distinct), pydantic.Field(min_length=1)
]


def late_points_message(points: list[int], feature_layer: int, block: int) -> str | None:
    """Why the tree cannot stitch its trunk at some of `points`, or None: the trunk is read at `block` (what
    `feature_layer` resolves to), so a branch must start before it. Validation checks a positive feature_layer;
    a negative one counts from the model's last block and is checked once the trunk is loaded."""
    late = [n for n in points if n >= block]
    if not late:
        return None
    at = f"feature_layer {feature_layer}" + (f" (block {block})" if feature_layer < 0 else "")
    return f"points {late}: the trunk is read at {at}, so it can be stitched after blocks 1..{block - 1} only"


def _check_block_index(name: str, value: int) -> int:
    """A block given as k in 1..N or as -j for HF `hidden_states[-j]`; 0 is neither (the embeddings are no block)."""
    if value == 0:
        raise ValueError(f"{name} 0 is no block: give a block k >= 1 (1-indexed) or -j for hidden_states[-j]")
    return value


# The images FFM trains on, in a sweep and a tree (spec §7 "FFM data", §1.5).
FFMData = Annotated[
    ImageSetConfig | None,
    pydantic.Field(
        description="images FFM trains S on instead of the task's train split (generic images, e.g. an ImageNet "
        "or LLaVA-1.5 image folder; no labels needed); None = the task's train split"
    ),
]


class StitchRunConfig(Config):
    task: Literal["classification", "segmentation"] = "classification"
    data: DataConfig = DataConfig()
    ffm_data: FFMData = None
    models: dict[str, str] = pydantic.Field(description="name -> hub id, local folder or zoo:NAME")
    image_size: dict[str, pydantic.PositiveInt] = pydantic.Field(default_factory=dict, description="per-model resolution override")
    pairs: list[tuple[str, str]] | Literal["all"] = pydantic.Field(
        "all", description="ordered (source, target) cross pairs; 'all' = every ordered pair of distinct models"
    )
    points: StitchPoints = pydantic.Field(min_length=1, description="source stitch points n (after block n, 1-indexed)")
    stitch_layers: list[StitchLayerConfig] = pydantic.Field(default_factory=lambda: [StitchLayerConfig()], min_length=1)
    objectives: list[Objective] = pydantic.Field(default_factory=lambda: ["tlt", "ffm_tlt"], min_length=1)
    self_stitch: bool = True  # the control: source = target, same S, point, objective, data and seed
    probes: bool = True  # linear probes of every model (baselines, and prediction overlap)
    seeds: Seeds = pydantic.Field(default_factory=lambda: [0])
    match_layer: Literal["last_normed", "last_raw"] | int = "last_normed"
    prefix_policy: Literal["map", "learnable", "drop"] = "map"
    grid_policy: Literal["identity", "bilinear", "avgpool"] = "identity"
    lfm: OptimConfig = OptimConfig(epochs=3, lr=1e-3)
    ffm: OptimConfig = OptimConfig(epochs=1, lr=1e-3)
    tlt: OptimConfig = OptimConfig(epochs=5, lr=1e-3)
    probe: OptimConfig = OptimConfig(epochs=10, lr=1e-3)
    init_images: int = pydantic.Field(256, ge=1, description="train images for least squares and prefix-token init")
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_source: bool = pydantic.Field(
        True, description="false: cache only the target's features and run the source's blocks 1..n online every "
        "step (the spec's default, §1.2): far less memory or disk, one source forward per step more",
    )
    cache_dtype: Literal["float16", "float32"] = "float16"
    eval_batch_size: int = pydantic.Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = pydantic.Field(
        False, description="torch.compile the stitched model for training (GPU: ~1.4x faster steps at ViT-L size)"
    )

    @pydantic.field_validator("match_layer")
    @classmethod
    def _match_block(cls, match_layer: str | int) -> str | int:
        return match_layer if isinstance(match_layer, str) else _check_block_index("match_layer", match_layer)

    @pydantic.field_validator("stitch_layers")
    @classmethod
    def _distinct_layers(cls, layers: list[StitchLayerConfig]) -> list[StitchLayerConfig]:
        # A cell is found by its layer's name, so a repeated layer would only be reported twice from one training.
        names = [layer.name for layer in layers]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(
                    f"stitch_layers[{i}] is the same stitch layer as stitch_layers[{names.index(name)}] ({name!r}); "
                    "list each layer once"
                )
        return layers

    @pydantic.model_validator(mode="after")
    def _names_exist(self):
        names = set(self.models)
        if self.pairs != "all":
            for i, (source, target) in enumerate(self.pairs):
                for role, name in (("source", source), ("target", target)):
                    if name not in names:
                        raise ValueError(f"pairs[{i}]: {role} {name!r} is not in models ({', '.join(sorted(names))})")
        if not self.all_pairs():
            raise ValueError(
                "pairs: the sweep has no pairs: 'all' with one model gives no cross pair (and so no self-stitch); "
                "add a model, or list pairs (a self pair such as [[a, a]] runs that self-stitch alone)"
                if self.pairs == "all" else "pairs: the list is empty; list (source, target) pairs or use 'all'"
            )
        unknown = set(self.image_size) - names
        if unknown:
            raise ValueError(f"image_size: {', '.join(sorted(unknown))} not in models")
        if self.ffm_data is not None and not any("ffm" in stages(objective) for objective in self.objectives):
            raise ValueError(
                f"ffm_data: no objective trains by FFM (objectives: {', '.join(self.objectives)}); add ffm or "
                "ffm_tlt, or remove ffm_data"
            )
        _check_stage_options(self)
        return self

    def cross_pairs(self) -> list[tuple[str, str]]:
        if self.pairs == "all":
            return [(a, b) for a, b in itertools.permutations(self.models, 2)]
        return [tuple(p) for p in self.pairs]

    def all_pairs(self) -> list[tuple[str, str]]:
        """Cross pairs, then (if self_stitch) each model that takes part as a self-stitch, in first-seen order."""
        pairs = self.cross_pairs()
        if self.self_stitch:
            seen = list(dict.fromkeys(name for pair in pairs for name in pair))
            pairs += [(name, name) for name in seen if (name, name) not in pairs]
        return list(dict.fromkeys(pairs))


class TreeConfig(Config):
    task: Literal["classification"] = "classification"
    data: DataConfig = DataConfig()
    ffm_data: FFMData = None  # the branches' FFM and their learnable prefix tokens' init
    models: dict[str, str] = pydantic.Field(description="name -> hub id, local folder or zoo:NAME")
    image_size: dict[str, pydantic.PositiveInt] = pydantic.Field(default_factory=dict)
    trunk: str = pydantic.Field(description="the model whose blocks 1..n are shared")
    branches: list[str] = pydantic.Field(min_length=1, description="the other models; each gets a branch")
    points: StitchPoints = pydantic.Field(min_length=1)
    feature_layer: int = pydantic.Field(-2, description="block the consumer reads (-2 = N-1, LLaVA's choice)")
    stitch: StitchLayerConfig = StitchLayerConfig()
    prefix_policy: Literal["map", "learnable", "drop"] = "map"
    grid_policy: Literal["identity", "bilinear", "avgpool"] = "identity"
    ffm: OptimConfig = OptimConfig(epochs=2, lr=1e-3)
    probe: OptimConfig = OptimConfig(epochs=10, lr=1e-3)
    seeds: Seeds = pydantic.Field(default_factory=lambda: [0])
    timing_batches: int = pydantic.Field(5, ge=1, description="batches timed per variant")
    eval_batch_size: int = pydantic.Field(64, ge=1)
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_dtype: Literal["float16", "float32"] = "float16"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @pydantic.field_validator("feature_layer")
    @classmethod
    def _feature_block(cls, feature_layer: int) -> int:
        return _check_block_index("feature_layer", feature_layer)

    @pydantic.model_validator(mode="after")
    def _names_exist(self):
        for field, names in (("trunk", [self.trunk]), ("branches", self.branches)):
            for name in names:
                if name not in self.models:
                    raise ValueError(f"{field}: {name!r} is not in models ({', '.join(sorted(self.models))})")
        late = self.feature_layer > 0 and late_points_message(self.points, self.feature_layer, self.feature_layer)
        if late:
            raise ValueError(late)
        if self.trunk in self.branches:
            raise ValueError(f"branches: the trunk {self.trunk!r} has its own branch already; list only the others")
        if self.stitch.kind == "lora":
            raise ValueError("stitch.kind: tree branches share the trunk's block n, so 'lora' cannot be used")
        if self.stitch.init == "lstsq":
            raise ValueError("stitch.init: the tree's branches start from a random S and train by FFM ('lstsq' is a "
                             "`stitch run` option)")
        if self.probe.lr_sweep is not None:
            raise ValueError("probe.lr_sweep: the tree's probes train at probe.lr (the sweep is a `stitch run` option)")
        _check_stage_options(self)
        return self
