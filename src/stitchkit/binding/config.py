"""The config of `stitchkit binding run` (configs/binding/*.yaml): task, model, images, stages, branches, analysis.

Stages are defined once and branches list the stages they run in order; branches that start with the same
stages share those trainings (S1 is trained once for every branch of a seed). Defaults are the reference's
(binding.md §10); configs/binding/paper.yaml spells the paper scale out, configs/binding/quickstart.yaml is the
reduced CPU run.
"""

from __future__ import annotations

from typing import Literal, Optional

import pydantic

from stitchkit.binding.model import ModelSettings
from stitchkit.binding.render import MAX_FILL, Placement, check_fill, glyph_set
from stitchkit.binding.task import Vocabulary
from stitchkit.config import Config, MixedPrecision, field_error
from stitchkit.engine.loop import AdamBetas, warmup_error


class VocabSettings(Config):
    colours: int = pydantic.Field(216, ge=1)
    shapes: int = pydantic.Field(216, ge=1)
    items: int = pydantic.Field(32, ge=1)

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.colours, self.shapes, self.items)


class ImageSettings(Config):
    """The image version of the context (§3): rendered glyphs, a frozen encoder, a bank of encoded contexts."""

    encoder: str = pydantic.Field("zoo:supervised", description="hub id, local folder, or zoo:NAME (frozen)")
    glyphs: Literal["world", "parametric"] = pydantic.Field("world", description="world: the shapes world's 10 colours x 13 shapes")
    placement: Literal["grid", "uniform"] = pydantic.Field(
        "grid", description="grid: distinct random cells (the micro default); uniform: the spec's §3 placement"
    )
    cells: int = pydantic.Field(4, ge=1, description="grid: objects take distinct random cells")
    fill: float = pydantic.Field(
        0.8, gt=0, le=1, description=f"grid: object diameter as a fraction of the cell side (+-10%; at most {MAX_FILL:.3f})"
    )
    box: tuple[pydantic.PositiveFloat, pydantic.PositiveFloat] = pydantic.Field(
        (28 / 224, 40 / 224), description="uniform: object box side ~ U[box] of the canvas side (§3: 28-40 px at 224)"
    )
    gap: float = pydantic.Field(4 / 224, ge=0, description="uniform: least gap between boxes, of the canvas side (§3: 4 px)")
    pool: int = pydantic.Field(4096, ge=1, description="training contexts rendered and encoded once")
    eval_pool: int = pydantic.Field(1024, ge=1, description="held-out contexts for image-modality accuracy")
    gate_images: int = pydantic.Field(8, ge=1, description="single-object images per colour x shape for the separability gate")

    @pydantic.field_validator("fill")
    @classmethod
    def _fill_keeps_objects_in_their_cells(cls, fill: float) -> float:
        check_fill(fill)  # its ValueError is the field's error
        return fill

    @pydantic.model_validator(mode="after")
    def _box_range(self) -> "ImageSettings":
        if not self.box[0] <= self.box[1] < 1:
            raise field_error("box", f"must be lo <= hi < 1 (fractions of the canvas side), got {list(self.box)}")
        return self

    @property
    def layout(self) -> Placement:
        return Placement(self.placement, self.cells, self.fill, tuple(self.box), self.gap)


class NoiseSettings(Config):
    """Unattendable noise tokens (§5), as gaps in position ids. span: K ~ U{0..span - 2N}; None = image tokens."""

    span: Optional[int] = pydantic.Field(None, ge=1)
    between_pairs_only: bool = False


class OptimSettings(Config):
    lr: float = pydantic.Field(1e-4, gt=0)
    batch_size: int = pydantic.Field(256, ge=1)
    warmup_steps: int = pydantic.Field(1000, ge=0)
    weight_decay: float = pydantic.Field(0.01, ge=0)
    betas: AdamBetas = pydantic.Field(
        (0.9, 0.95), description="AdamW's (beta1, beta2), §4; the plateau studies of results/binding/ used torch's (0.9, 0.999)"
    )
    max_grad_norm: Optional[float] = pydantic.Field(1.0, gt=0)
    mixed_precision: MixedPrecision = "auto"
    checkpoint_every: int = pydantic.Field(1000, ge=1)
    carry_state: bool = pydantic.Field(
        True, description="each stage starts from the AdamW moments the previous stage ended with (§4); a parameter "
        "that starts training in a stage (the projector) starts fresh",
    )


class Stage(Config):
    """One training stage. image_fraction 0 = text, 1 = images, between = a mix (S3: 0.2)."""

    image_fraction: float = pydantic.Field(0.0, ge=0, le=1)
    noise: bool = pydantic.Field(False, description="noise gaps in the text examples")
    grounding: float = pydantic.Field(0.0, ge=0, le=1, description="share of image examples that are grounding questions")
    hop_practice: float = pydantic.Field(
        0.0, ge=0, lt=1, description="share of text examples that ask one hop alone (task.encode_hop): an aid against "
        "S1's plateau that the paper does not use (docs/binding.md); stop rule and evaluation stay on the task",
    )
    steps: int = pydantic.Field(ge=1, description="steps, or the cap when until_id_accuracy is set")
    until_id_accuracy: Optional[float] = pydantic.Field(None, gt=0, le=1, description="stop once text ID accuracy reaches this")
    eval_every: int = pydantic.Field(500, ge=1, description="how often the stop rule is checked")
    stop_examples: int = pydantic.Field(500, ge=1, description="held-out text examples per N for the stop rule")


def _default_stages() -> dict[str, Stage]:
    return {
        "S1": Stage(steps=200_000, until_id_accuracy=0.995),
        "SN": Stage(steps=50_000, noise=True),
        "S2": Stage(steps=50_000, image_fraction=1.0, grounding=0.25),
        "S3": Stage(steps=50_000, image_fraction=0.2),
        "S3N": Stage(steps=50_000, image_fraction=0.2, noise=True),
    }


def _default_branches() -> dict[str, list[str]]:
    return {
        "text-only": ["S1"],
        "noise-text": ["S1", "SN"],
        "image": ["S1", "S2"],  # analysed right after the image stage (R after S2, §9)
        "image-text": ["S1", "S2", "S3"],
        "noise-image-text": ["S1", "SN", "S2", "S3N"],
    }


class EvalSettings(Config):
    max_objects: int = pydantic.Field(32, ge=1, description="evaluate N = 1..max_objects (OOD = above the trained range; §2: 1..32)")
    ood_headline: Optional[int] = pydantic.Field(
        16, ge=1, description="the OOD average covers N above the trained range up to this (§6/§10: 9..16); larger N, "
        "up to max_objects, are far OOD (17..32); null: one OOD average over every N above the trained range",
    )
    per_n: int = pydantic.Field(2000, ge=1)
    batch_size: int = pydantic.Field(256, ge=1)


class AnalysisSettings(Config):
    """Mechanistic analysis of every branch's final model (§7)."""

    enabled: bool = True
    n: list[int] = pydantic.Field(default_factory=lambda: [8], min_length=1, description="context sizes (>= 4)")
    pairs: int = pydantic.Field(1000, ge=1)
    probe_examples: int = pydantic.Field(3000, ge=10)
    knockout_examples: int = pydantic.Field(1000, ge=1)
    knockout_window: int = pydantic.Field(3, ge=1)
    knockout_label_layer: Optional[int] = pydantic.Field(
        None, ge=0, description="read-out layer of the interventions under each knockout; None = L - 1, where R is reported"
    )

    @pydantic.field_validator("n")
    @classmethod
    def _at_least_four(cls, ns: list[int]) -> list[int]:
        if any(n < 4 for n in ns):
            raise ValueError(f"interchange interventions need N >= 4, got {ns}")
        return ns


class BindingConfig(Config):
    name: str = "binding"
    description: str = ""
    seeds: list[int] = pydantic.Field(default_factory=lambda: [0], min_length=1)
    vocab: VocabSettings = VocabSettings()
    train_objects: tuple[int, int] = pydantic.Field((1, 8), description="N ~ U{lo..hi} in training (the ID range)")
    model: ModelSettings = ModelSettings()
    images: ImageSettings = ImageSettings()
    encoders: Optional[dict[str, str]] = pydantic.Field(
        None, description="name -> encoder; image branches run once per encoder (default: images.encoder alone)"
    )
    noise: NoiseSettings = NoiseSettings()
    optim: OptimSettings = OptimSettings()
    stages: dict[str, Stage] = pydantic.Field(default_factory=_default_stages)
    branches: dict[str, list[str]] = pydantic.Field(default_factory=_default_branches, min_length=1)
    eval: EvalSettings = EvalSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: Optional[int] = pydantic.Field(None, ge=1)

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> "BindingConfig":
        lo, hi = self.train_objects
        if not 1 <= lo <= hi:
            raise field_error("train_objects", f"must be 1 <= lo <= hi, got {list(self.train_objects)}")
        limit = self.vocab.vocabulary.max_objects
        for field, largest in (("train_objects", hi), ("eval.max_objects", self.eval.max_objects)):
            if largest > limit:
                raise field_error(field, f"contexts of up to {largest} objects need that many distinct colours, shapes and items; "
                                         f"vocab (colours {self.vocab.colours}, shapes {self.vocab.shapes}, items {self.vocab.items}) allows {limit}")
        for name, stage in self.stages.items():  # every stage warms up anew (the engine's schedule)
            if self.optim.warmup_steps and self.optim.warmup_steps >= stage.steps:
                raise field_error(f"stages.{name}", warmup_error(self.optim.warmup_steps, stage.steps))
        for branch, stages in self.branches.items():
            if not stages:
                raise field_error(f"branches.{branch}", "lists no stages")
            unknown = [s for s in stages if s not in self.stages]
            if unknown:
                raise field_error(f"branches.{branch}", f"names unknown stages {unknown} (defined: {sorted(self.stages)})")
        for field in ("stages", "branches", "encoders"):
            for name in getattr(self, field) or {}:
                if not name.replace("_", "").replace("-", "").isalnum():
                    raise field_error(field, f"stage, branch and encoder names must be letters, digits, - and _: {name!r}")
        label_layer = self.analysis.knockout_label_layer
        if label_layer is not None and label_layer > self.model.layers:
            raise field_error("analysis.knockout_label_layer", f"{label_layer} is past the model's last layer: model.layers "
                                                              f"{self.model.layers} has layers 0..{self.model.layers} (L = resid_post)")
        if len(set(self.seeds)) != len(self.seeds):
            raise field_error("seeds", f"seeds repeat: {self.seeds}")
        if any(self.uses_images(b) for b in self.branches):
            if not self.images.layout.fits(hi):
                field, what = ("images.cells", f"images.cells^2 = {self.images.cells**2} cells") if self.images.placement == "grid" else (
                    "images.box", f"a canvas at images.box up to {self.images.box[1]:.3f} of its side with images.gap {self.images.gap:.3f}")
                raise field_error(field, f"image contexts of up to {hi} objects (train_objects) do not fit in {what}")
            colours, shapes = glyph_set(self.images.glyphs).renderable
            if hi > min(colours, shapes):
                raise field_error("images.glyphs", f"image contexts of up to {hi} objects (train_objects) need {hi} distinct glyph "
                                                   f"colours and shapes; images.glyphs: {self.images.glyphs} has {colours} colours x {shapes} shapes")
        return self

    @property
    def encoder_specs(self) -> dict[str, str]:
        return self.encoders or {"encoder": self.images.encoder}

    def uses_images(self, branch: str) -> bool:
        return any(self.stages[s].image_fraction > 0 for s in self.branches[branch])

    def uses_noise(self) -> bool:
        """Whether any branch runs a stage with noise gaps."""
        return any(self.stages[s].noise for stages in self.branches.values() for s in stages)

    def hop_practice(self) -> dict[str, float]:
        """{stage: share} of the stages that branches run with hop practice (not in the paper: reports say so)."""
        used = dict.fromkeys(s for stages in self.branches.values() for s in stages)
        return {s: self.stages[s].hop_practice for s in used if self.stages[s].hop_practice}
