"""`stitchkit mimic run CONFIG.yaml --out DIR`: the paper's experiments from one config, resumable.

A config names a model, the data of the evaluation benchmark (a built benchmark folder, a COCO-format file and
its images, or a rendered shapes world) and the studies to run; a study runs when its section is present:

    baseline    always: the model as released (dense attention, no pooling) on the whole benchmark
    finetune    LoRA (or full) fine-tuning on procedural MIMIC-style data from a training source (never the
                evaluation images), one arm per masked layer set (none / all / first_half / second_half or
                ranges), each evaluated under its own mask: the before/after table and the layer ablation
    flops       allowed query-key pairs and FLOPs of the block mask on the benchmark's prompts (section 7)
    pooling     1-D token pooling f = 1..16 and the pixel down/up-sampling control (section 8)
    stitching   one stitched canvas instead of N images (appendix)
    attention   inter- vs intra-image attention per layer, base model and fine-tuned arms (section 9)

The diagnostics (pooling, stitching) run on `diagnostics_model`: "base" (zero-shot, as in the paper) or a
fine-tuning arm, for models that never saw MIMIC's question format. With `model: micro` an evaluation world of the
micro VLM's own training seed is refused (check_micro_held_out).

DIR holds data/ (worlds, benchmarks), evals/<model>-<policy>-pool<f>-<transform>-<subset>/ (one resumable
evaluation each, shared between studies that need the same one), finetune/<arm>/train/ (the engine's folder),
<study>/<study>.json, figures/, results.json and report.md. Every step is skipped once finished, so a killed
run continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from stitchkit.config import Config, load_config
from stitchkit.engine import TrainConfig
from stitchkit.engine.devices import check_device_name, torch_threads
from stitchkit.errors import ConfigError, InputError
from stitchkit.multiimage.benchmark import Benchmark, load_benchmark
from stitchkit.multiimage.config import MimicConfig
from stitchkit.multiimage.evaluate import (
    LAYER_SETS,
    attention_policy,
    check_policy_spec,
    default_threads,
    evaluate,
    load_model,
    masked_layer_list,
    stratified_per_task,
    task_scores,
)
from stitchkit.multiimage.protocol import TASKS
from stitchkit.multiimage.scoring import layer_span
from stitchkit.paths import REPO_ROOT
from stitchkit.runs import RunDir, atomic_write_json, atomic_write_text
from stitchkit.vlm.pooling import PoolPad
from stitchkit.world import WorldConfig

# ---- config -------------------------------------------------------------------------------------------------


class WorldSource(Config):
    """A shapes world rendered into the run folder (stitchkit.world.render_coco)."""

    images: int = Field(400, ge=1)
    size: int = Field(128, ge=16)
    seed: int = 0
    config: WorldConfig = WorldConfig()


class DataSource(Config):
    """Where a benchmark comes from -- exactly one of: `benchmark_dir` (built by `stitchkit mimic build`),
    `annotations` + `images` (any COCO-format file and its image folder), `world` (rendered here) -- and, unless
    it is already built, how to build it: `build` is a build config inline or the path of one
    (e.g. configs/mimic/coco.yaml). Relative paths are read from the current folder, then the repository."""

    benchmark_dir: Optional[str] = None
    annotations: Optional[str] = None
    images: Optional[str] = None
    world: Optional[WorldSource] = None
    build: Union[str, MimicConfig] = MimicConfig()

    @model_validator(mode="after")
    def _one_source(self) -> "DataSource":
        sources = {"benchmark_dir": self.benchmark_dir, "annotations/images": self.annotations or self.images,
                   "world": self.world}
        given = [name for name, value in sources.items() if value]
        if len(given) != 1:
            got = f" (got {', '.join(given)})" if given else ""
            raise ValueError(f"give exactly one of benchmark_dir, annotations + images, world{got}")
        if (self.annotations is None) != (self.images is None):
            raise ValueError("annotations and images go together")
        return self


class EvalOptions(Config):
    batch_size: int = Field(8, ge=1)
    max_images_per_batch: Optional[int] = Field(None, ge=1)  # long prompts (many images) get smaller batches
    # headline scores from the released scorer (both modes are stored); None: the benchmark's own mode (clean, and
    # legacy_official for the released data, which supports no other)
    legacy_official: Optional[bool] = None
    max_per_task: Optional[int] = Field(None, ge=1)  # at most N samples of each task (evaluate.stratified_per_task)
    # the official code's quirk (mimic.md 6.1 b): prompts longer than N tokens are evaluated without the mask
    legacy_maxlen_fallback: Optional[int] = Field(None, ge=1)


class PoolingStudy(Config):
    factors: list[int] = [1, 2, 4, 8, 16]
    # a short last group: "exclude" averages its real tokens, "zeros" the official code's zero-padded tail (mimic.md 8)
    pool_pad: PoolPad = "exclude"
    pixel_control: bool = True
    max_per_task: Optional[int] = Field(None, ge=1)  # None: eval.max_per_task

    @field_validator("factors")
    @classmethod
    def _factors(cls, factors: list[int]) -> list[int]:
        from stitchkit.vlm import POOL_FACTORS

        bad = [f for f in factors if f not in POOL_FACTORS]
        if bad or 1 not in factors:
            raise ValueError(f"factors must include 1 and come from {POOL_FACTORS}" + (f"; got {bad}" if bad else ""))
        return sorted(set(factors))


class StitchingStudy(Config):
    max_per_task: Optional[int] = Field(None, ge=1)


class AttentionStudy(Config):
    n_images: list[int] = [4, 6]
    samples: int = Field(50, ge=1)
    seed: int = 0
    finetuned: bool = True  # also analyse every fine-tuned arm (under its own mask)


class FlopsStudy(Config):
    samples: int = Field(200, ge=1)  # benchmark prompts encoded to count allowed pairs
    n_images: list[int] = [2, 4, 5, 6, 10]  # rows of the formula table
    seed: int = 0


class FinetuneStudy(Config):
    data: DataSource  # the training source; images of the evaluation benchmark are never used
    arms: list[str] = list(LAYER_SETS)
    method: Literal["lora", "full"] = "lora"
    lora_r: int = Field(128, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    train: TrainConfig
    # the official code's quirk (mimic.md 6.1 a): each arm masks only its run of layers from layer 0 (12-23 none),
    # in training and evaluation
    legacy_layer_loop: bool = False

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: list[str]) -> list[str]:
        for number, arm in enumerate(arms):
            try:
                check_policy_spec(f"masked:{arm}")
            except ConfigError:  # a ValueError, so that pydantic names the config file and the field
                raise ValueError(f"arms[{number}] {arm!r} is not a layer set: use one of {', '.join(LAYER_SETS)} "
                                 "or ranges like '12-23' or '0-3,8'") from None
        if len(set(arms)) != len(arms):
            raise ValueError(f"arms repeat a layer set: {arms}")
        return arms


class ExperimentConfig(Config):
    name: str = "mimic"
    model: str = "micro"  # micro[:RECIPE], a hub id or a local folder
    device: str = "auto"
    dtype: str = "auto"
    threads: Optional[int] = Field(None, ge=1)  # torch CPU threads (None: 1 for the micro VLM on CPU)
    data: DataSource
    eval: EvalOptions = EvalOptions()
    diagnostics_model: str = "base"  # base, or a fine-tuning arm
    finetune: Optional[FinetuneStudy] = None
    flops: Optional[FlopsStudy] = None
    pooling: Optional[PoolingStudy] = None
    stitching: Optional[StitchingStudy] = None
    attention: Optional[AttentionStudy] = None

    _device_name = field_validator("device")(check_device_name)

    @model_validator(mode="after")
    def _diagnostics_model(self) -> "ExperimentConfig":
        arms = self.finetune.arms if self.finetune else []
        if self.diagnostics_model != "base" and self.diagnostics_model not in arms:
            raise ValueError(f"diagnostics_model must be 'base' or a finetune arm ({', '.join(arms) or 'none configured'})")
        return self


def load_experiment(path: str | os.PathLike) -> ExperimentConfig:
    return load_config(ExperimentConfig, path)


def find_path(value: str) -> Path:
    """A config's relative path: from the current folder if it exists there, else from the repository."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


# ---- data ---------------------------------------------------------------------------------------------------


def prepare_benchmark(source: DataSource, folder: Path, exclude: list[Path] | None = None,
                      command: str | None = None, exclude_pictures: frozenset[str] = frozenset()) -> Path:
    """The benchmark folder of `source`: given, or built into `folder`/benchmark (a world rendered first) without
    the image files `exclude` and the pictures `exclude_pictures` (generator.build_benchmark)."""
    from stitchkit.multiimage.generator import build_benchmark
    from stitchkit.world import render_coco

    if source.benchmark_dir:
        root = find_path(source.benchmark_dir)
        load_benchmark(root)  # a clear error now rather than mid-study
        return root
    if source.world:
        world = folder / "world"
        if not (world / "annotations.json").is_file():  # written last: its presence means the render finished
            render_coco(world, source.world.images, source.world.size, source.world.seed, source.world.config)
        annotations, images = world / "annotations.json", world
    else:
        annotations, images = find_path(source.annotations), find_path(source.images)
    return build_benchmark(annotations, images, folder / "benchmark", build_config(source), command=command,
                           exclude_images=exclude or [], exclude_pictures=exclude_pictures)


def build_config(source: DataSource) -> MimicConfig:
    """The source's build config: inline, or read from its path (a missing or bad file is a clear error)."""
    return source.build if isinstance(source.build, MimicConfig) else load_config(MimicConfig, find_path(source.build))


def check_micro_held_out(cfg: ExperimentConfig) -> None:
    """The micro VLM trains on MIMIC-format queries from a shapes world of its own (its recipe's data.mimic); an
    evaluation world rendered with the same seed would hold the same scenes (image i of a world comes from
    default_rng([seed, i])), so it is refused."""
    from stitchkit.vlm.micro import micro_spec_recipe

    recipe = micro_spec_recipe(cfg.model)
    if recipe is None or cfg.data.world is None:
        return
    train = recipe.data.mimic
    if train is not None and train.world is not None and train.world.seed == cfg.data.world.seed:
        raise InputError(f"data.world.seed {cfg.data.world.seed} is the seed of the micro VLM's training world: its "
                         "images were training data; render the evaluation world with another seed")


def benchmark_images(bench: Benchmark) -> list[Path]:
    return sorted({path for sample in bench.samples for path in bench.image_paths(sample)})


def check_disjoint(train: Benchmark, evaluation: Benchmark, pictures: frozenset[str]) -> None:
    """Training data never shows an evaluation image: no shared file, and, against the released data (whose
    files are renamed copies, official.ImageStore), no file holding one of its `pictures`. Built with the
    exclusions this holds already; a given training benchmark_dir is where it can fail."""
    from stitchkit.multiimage.official import picture_digests

    train_images = benchmark_images(train)
    shared = set(benchmark_images(evaluation)) & set(train_images)
    if shared:
        raise InputError(f"the training benchmark {train.root} shares {len(shared)} images with the evaluation "
                         f"benchmark, e.g. {sorted(shared)[0]}; build it from other images")
    if not pictures:
        return
    copies = [path for path, digest in zip(train_images, picture_digests(train_images)) if digest in pictures]
    if copies:
        raise InputError(f"the training benchmark {train.root} shows {len(copies)} pictures of the released evaluation "
                         f"data {evaluation.root}, e.g. {copies[0]}; give finetune.data as annotations + images "
                         "(`mimic run` then builds it without them) or build it from other images")


# ---- the run ------------------------------------------------------------------------------------------------


class Experiment:
    """One run folder and what its steps share: the benchmark, the base model, the evaluations."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self.figures = run.root / "figures"
        self._bench: Benchmark | None = None
        self._base = None
        self.identity: str | None = None

    # -- shared pieces --
    @property
    def bench(self) -> Benchmark:
        if self._bench is None:
            self._bench = load_benchmark(self.run.manifest["steps"]["data"]["benchmark"])
        return self._bench

    @property
    def legacy_official(self) -> bool:
        """Whether the headline scores are the official scorer's (eval.legacy_official, else the benchmark's mode)."""
        from stitchkit.multiimage.scoring import scoring_mode

        return scoring_mode(self.bench, self.cfg.eval.legacy_official) == "legacy_official"

    def fresh_model(self):
        vlm, self.identity = load_model(self.cfg.model, self.cfg.device, self.cfg.dtype)
        return vlm

    def base_model(self):
        """The released model, shared by the steps that do not train it (policy and pooling reset)."""
        if self._base is None:
            self._base = self.fresh_model()
        self._base.policy = attention_policy("dense", self._base.num_layers)
        self._base.pool_factor = 1
        return self._base

    def finetuned_model(self, arm: str):
        """The model of a finished fine-tuning arm (its weights loaded from the arm's folder, LoRA merged),
        with the arm's mask installed."""
        from stitchkit.multiimage.studies import finetune_arm

        vlm = self.fresh_model()
        finetune_arm(vlm, self.train_samples(), self.arm_layers(arm, vlm.num_layers), self.finetune_settings(),
                     self.run.path("finetune", arm, "train"))
        return vlm

    def arm_layers(self, arm: str, num_layers: int) -> list[int]:
        """The layers a fine-tuning arm masks (in training and evaluation); finetune.legacy_layer_loop applies."""
        legacy = bool(self.cfg.finetune and self.cfg.finetune.legacy_layer_loop)
        return masked_layer_list(arm, num_layers, legacy_layer_loop=legacy)

    def diagnostics_model(self) -> tuple[object, str, str]:
        """(model, tag, policy) the pooling and stitching studies run on."""
        arm = self.cfg.diagnostics_model
        if arm == "base":
            return self.base_model(), "base", "dense"
        return self.finetuned_model(arm), f"ft-{arm}", arm_policy(arm)

    def train_samples(self) -> list:
        from stitchkit.multiimage.studies import training_samples

        return training_samples(load_benchmark(self.run.manifest["steps"]["data"]["train_benchmark"]))

    def finetune_settings(self) -> dict:
        return self.cfg.finetune.model_dump(mode="json", exclude={"data", "arms"})

    def evaluate(self, vlm, tag: str, policy: str, pool: int, transform: str, transform_fn, per_task: int | None,
                 description: str) -> dict:
        """One resumable evaluation in evals/<tag>-<policy>-pool<f>-<transform>-<subset>/ (reused when another
        study asks for the same one)."""
        subset = f"stratified{per_task}" if per_task else "all"  # stratified_per_task
        folder = self.run.path("evals", f"{tag}-{policy.replace(':', '-')}-pool{pool}-{transform}-{subset}")
        settings = {"model": self.identity, "model_tag": tag, "benchmark": str(self.bench.root), "policy": policy,
                    "masked_layers": sorted(vlm.masked_layers), "pool_factor": pool, "transform": transform,
                    "max_per_task": per_task}
        options = self.cfg.eval
        if options.legacy_maxlen_fallback is not None:  # only when set: evaluations made before it stay resumable
            vlm.policy = vlm.policy.model_copy(update={"legacy_maxlen_fallback": options.legacy_maxlen_fallback})
            settings["legacy_maxlen_fallback"] = options.legacy_maxlen_fallback
        if pool > 1 and vlm.pool_pad != "exclude":  # likewise; and f = 1 pools nothing, so it stays shared
            settings["pool_pad"] = vlm.pool_pad
        samples = stratified_per_task(self.bench.samples, per_task)
        return evaluate(vlm, self.bench, folder, settings=settings, samples=samples, batch_size=options.batch_size,
                        max_images_per_batch=options.max_images_per_batch, transform=transform_fn,
                        legacy_official=self.legacy_official, description=description)

    def step(self, name: str, fn: Callable[[], dict | None]) -> None:
        """Run a step unless finished; record its seconds (and what fn returns) in the manifest."""
        if self.run.done(name):
            return
        started = time.perf_counter()
        extra = fn() or {}
        self.run.finish(name, seconds=round(time.perf_counter() - started, 2), **extra)

    # -- steps --
    def data_step(self) -> dict:
        cfg, root = self.cfg, self.run.root
        check_micro_held_out(cfg)
        bench_dir = prepare_benchmark(cfg.data, root / "data" / "eval", command=self.run.manifest.get("command"))
        out = {"benchmark": str(bench_dir)}
        if cfg.finetune:
            from stitchkit.multiimage.official import released_pictures

            evaluation = load_benchmark(bench_dir)
            pictures = released_pictures(evaluation)
            train_dir = prepare_benchmark(cfg.finetune.data, root / "data" / "train",
                                          exclude=benchmark_images(evaluation), exclude_pictures=pictures)
            # a built one left the pictures out already: only a given benchmark_dir needs its images decoded
            given = cfg.finetune.data.benchmark_dir is not None
            check_disjoint(load_benchmark(train_dir), evaluation, pictures if given else frozenset())
            out["train_benchmark"] = str(train_dir)
        return out

    def baseline_step(self) -> None:
        results = self.evaluate(self.base_model(), "base", "dense", 1, "none", None, self.cfg.eval.max_per_task, "baseline")
        atomic_write_json(self.run.path("baseline", "baseline.json"), {"model": self.identity, **summary(results)})

    def finetune_step(self, arm: str) -> None:
        from stitchkit.multiimage.studies import finetune_arm

        vlm = self.fresh_model()
        layers = self.arm_layers(arm, vlm.num_layers)
        trained = finetune_arm(vlm, self.train_samples(), layers, self.finetune_settings(), self.run.path("finetune", arm, "train"))
        results = self.evaluate(vlm, f"ft-{arm}", arm_policy(arm), 1, "none", None, self.cfg.eval.max_per_task, f"eval {arm}")
        atomic_write_json(self.run.path("finetune", arm, "arm.json"), {"arm": arm, **trained, **summary(results)})

    def flops_step(self) -> None:
        from stitchkit.multiimage.studies import flops_study

        vlm = self.base_model()
        arms = self.cfg.finetune.arms if self.cfg.finetune else ["second_half"]
        layer_sets = {arm: self.arm_layers(arm, vlm.num_layers) for arm in arms if arm != "none"}
        study = self.cfg.flops
        result = flops_study(vlm, self.bench, layer_sets, study.samples, study.n_images, study.seed)
        atomic_write_json(self.run.path("flops", "flops.json"), result)

    def pooling_step(self) -> None:
        from stitchkit.multiimage.studies import pooling_study

        study = self.cfg.pooling
        vlm, tag, policy = self.diagnostics_model()
        result = pooling_study(vlm, self.bench, self.evaluate, tag, policy, study.factors, study.pixel_control,
                               study.max_per_task or self.cfg.eval.max_per_task, self.figures, study.pool_pad)
        atomic_write_json(self.run.path("pooling", "pooling.json"), {"model": tag, **result})

    def stitching_step(self) -> None:
        from stitchkit.multiimage.studies import stitching_study

        vlm, tag, policy = self.diagnostics_model()
        per_task = self.cfg.stitching.max_per_task or self.cfg.eval.max_per_task
        result = stitching_study(vlm, self.bench, self.evaluate, tag, policy, per_task, self.figures)
        atomic_write_json(self.run.path("stitching", "stitching.json"), {"model": tag, **result})

    def attention_step(self) -> None:
        from stitchkit.multiimage.studies import attention_study

        study = self.cfg.attention
        models = [("base", self.base_model)]
        if self.cfg.finetune and study.finetuned:
            models += [(f"ft-{arm}", lambda arm=arm: self.finetuned_model(arm)) for arm in self.cfg.finetune.arms]
        result = attention_study(models, self.bench, study.n_images, study.samples, study.seed, self.figures)
        atomic_write_json(self.run.path("attention", "attention.json"), result)


def arm_policy(arm: str) -> str:
    return "dense" if arm == "none" else f"masked:{arm}"


def summary(results: dict) -> dict:
    """What the experiment keeps of one evaluation: headline scores, the other mode's, where the folder is."""
    other = "legacy_official" if results["mode"] == "clean" else "clean"
    return {"mode": results["mode"], "scores": task_scores(results), other: results.get(other),
            "n_samples": results["n_samples"], "answers": results.get("answers"), "breakdowns": results["breakdowns"],
            "eval": results["eval"]}


def run_experiment(cfg: ExperimentConfig, out: str | os.PathLike, command: str | None = None) -> Path:
    """Run every configured study into `out` (finished steps are skipped), then write results.json and report.md."""
    from stitchkit.vlm.micro import check_vlm_spec

    check_vlm_spec(cfg.model)  # before the data step renders and builds benchmarks
    for source in [cfg.data, *([cfg.finetune.data] if cfg.finetune else [])]:
        if not source.benchmark_dir:
            build_config(source)  # likewise a build config file that is missing or invalid
    run = RunDir(out, config=cfg, command=command)
    exp = Experiment(cfg, run)
    threads = cfg.threads if cfg.threads is not None else default_threads(cfg.model, cfg.device)
    with torch_threads(threads):
        exp.step("data", exp.data_step)
        exp.legacy_official  # a scoring mode the benchmark cannot support is refused before any model runs
        exp.step("baseline", exp.baseline_step)
        for arm in cfg.finetune.arms if cfg.finetune else []:
            exp.step(f"finetune/{arm}", lambda arm=arm: exp.finetune_step(arm))
        for name in ("flops", "pooling", "stitching", "attention"):
            if getattr(cfg, name) is not None:
                exp.step(name, getattr(exp, f"{name}_step"))
    results = collect_results(run)
    if results["finetune"] and results["baseline"]:
        from stitchkit.multiimage.studies import finetune_figures

        results["finetune_figures"] = finetune_figures(results["baseline"]["scores"], results["finetune"], run.root / "figures")
    atomic_write_json(run.path("results.json"), results)
    atomic_write_text(run.path("report.md"), f"# MIMIC experiments: {cfg.name}\n\n" + experiment_markdown(results, level=2))
    return run.root


# ---- results and report -------------------------------------------------------------------------------------


def _read(run: RunDir, *parts: str) -> dict | None:
    path = run.root.joinpath(*parts)
    return json.loads(path.read_text()) if path.is_file() else None


def collect_results(run: RunDir) -> dict:
    """results.json: every finished study's JSON, the step timings, the config."""
    cfg = run.manifest["config"]
    arms = (cfg.get("finetune") or {}).get("arms", [])
    steps = run.manifest["steps"]
    return {
        "name": cfg["name"],
        "model": cfg["model"],
        "config": cfg,
        "benchmark": steps.get("data", {}).get("benchmark"),
        "train_benchmark": steps.get("data", {}).get("train_benchmark"),
        "seconds": {name: step.get("seconds") for name, step in steps.items()},
        "baseline": _read(run, "baseline", "baseline.json"),
        "finetune": {arm: r for arm in arms if (r := _read(run, "finetune", arm, "arm.json"))},
        "flops": _read(run, "flops", "flops.json"),
        "pooling": _read(run, "pooling", "pooling.json"),
        "stitching": _read(run, "stitching", "stitching.json"),
        "attention": _read(run, "attention", "attention.json"),
    }


def sample_count(study: dict) -> str:
    """ "64 samples", or "32 samples: a stratified subset, at most 8 per task" (evaluate.stratified_per_task)."""
    per_task = study.get("max_per_task")
    subset = f": a stratified subset, at most {per_task} per task" if per_task else ""
    return f"{study['samples']} samples{subset}"


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def score_row(name: str, scores: dict) -> dict:
    return {"model": name, **{t: pct(scores.get(t)) for t in (*TASKS, "avg")}}


def constant_row(evaluation: dict) -> list[dict]:
    """The best constant answer's scores (ignoring the images): the floor every row should be read against."""
    if not evaluation.get("answers"):
        return []
    scores = evaluation["answers"]["constant_answer_score"]
    values = [scores.get(t) for t in TASKS]
    avg = sum(values) / len(values) if all(v is not None for v in values) else None
    return [score_row("best constant answer (no images)", {**scores, "avg": avg})]


def same_answer(evaluation: dict) -> str:
    shares = list((evaluation.get("answers") or {}).get("top_answer_share", {}).values())
    return pct(sum(shares) / len(shares)) if shares else "–"


def answer_note(evaluations: dict[str, dict], threshold: float = 0.8) -> str:
    """A warning for models that give (nearly) one answer per task: their scores and trends follow the
    ground-truth mix, not the images."""
    flagged = []
    for name, evaluation in evaluations.items():
        answers = evaluation.get("answers")
        if not answers:
            continue
        constant = [f"{t} '{answers['top_answer'][t]}' ({pct(v)}%)" for t, v in answers["top_answer_share"].items()
                    if v >= threshold]
        if constant:
            flagged.append(f"{name}: {', '.join(constant)}")
    if not flagged:
        return ""
    return ("\n**Near-constant answers** (one answer for at least 80% of a task's samples) -- "
            + "; ".join(flagged) + ". For these, scores and their trends over the controls reflect the ground-truth "
            "mix, not multi-image reasoning.\n")


def trend(rows: list[dict], variable: str) -> str | None:
    """ "score 75.0 at spread=1 -> 25.0 at spread=4 (n=...)" from a breakdown table, or None."""
    rows = [r for r in rows if r.get("score") is not None]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    return (f"{pct(first['score'])} at {variable}={first[variable]} (n={first['n']}) -> "
            f"{pct(last['score'])} at {variable}={last[variable]} (n={last['n']})")


def experiment_markdown(results: dict, level: int = 2, link: Callable[[str], str] = lambda p: p) -> str:
    """The report's sections (headings at `level`); `link` maps a path relative to the run folder to the link
    written (the quickstart copies figures elsewhere)."""
    h = "#" * level
    parts = [f"Model `{results['model']}`; benchmark `{results['benchmark']}`. Scores x100 "
             "(listing: micro F1; Avg: the paper's MIMIC Avg). Step times (s): "
             + ", ".join(f"{k} {v}" for k, v in results["seconds"].items() if v is not None) + ".\n"]
    from stitchkit.report import markdown_table

    base = results.get("baseline")
    if base:
        subset = {"samples": base["n_samples"], "max_per_task": base["eval"].get("max_per_task")}
        parts.append(f"\n{h} Baseline ({base['mode']} scoring, {sample_count(subset)})\n\n")
        parts.append(markdown_table([score_row("base", base["scores"]), *constant_row(base)]))
        parts.append(answer_note({"base": base}))
        lines = []
        for task, variable in (("counting", "spread"), ("counting", "n_distractors"), ("counting", "n_images"),
                               ("counting", "k"), ("listing", "n_images"), ("common", "n_images"), ("oddone", "n_images")):
            text = trend(base["breakdowns"].get(task, {}).get(variable, []), variable)
            if text:
                lines.append(f"- {task}: {text}")
        if lines:
            parts.append("\nHow the score moves with the controls (first vs last value):\n\n" + "\n".join(lines) + "\n")
    ft = results.get("finetune") or {}
    if ft and base:
        parts.append(f"\n{h} Masked-attention fine-tuning\n\n")
        rows = [{**score_row("base (before)", base["scores"]), "same answer": same_answer(base)}]
        for arm, r in ft.items():
            rows.append({**score_row(f"{arm} (layers {layer_span(r['masked_layers'])})", r["scores"]),
                         "same answer": same_answer(r),
                         "final loss": f"{r['final_loss']:.3f}"})
        rows += constant_row(base)
        parts.append(markdown_table(rows, columns=["model", *TASKS, "avg", "same answer", "final loss"]))
        parts.append("\n(same answer: the share of samples given the most common answer of their task, mean over "
                     "tasks, x100.)\n" + answer_note({"base": base, **ft}))
        verdict = masking_verdict(ft)
        if verdict:
            parts.append(f"\n{verdict}\n")
        parts += [f"\n![{name}]({link('figures/' + path)})\n" for name, path in results["finetune_figures"].items()]
    flops = results.get("flops")
    if flops:
        parts.append(f"\n{h} FLOPs of the block mask\n\n")
        m = flops["measured"]
        parts.append(f"Measured on {m['samples']} multi-image benchmark prompts (mean {m['mean_tokens']:.0f} tokens; "
                     f"geometry P={flops['geometry']['prefix']}, T={flops['geometry']['image_tokens']}, "
                     f"Q={flops['geometry']['suffix']}); convention: {flops['convention']}. T is the mean vision "
                     "tokens per image of these multi-image prompts (the mask acts only there); the pooling "
                     "table's tokens/image averages every prompt, one-image ones included, which a model may give "
                     "more tokens (LLaVA-OneVision's anyres tiling), so it can be larger.\n\n")
        rows = [{"layer set": name, "masked layers": r["masked_layers"], "per masked layer": pct(r["per_masked_layer"]),
                 "attention core, model-wide": pct(r["attention_core_model_wide"]),
                 "whole LM forward": pct(r["whole_forward"]),
                 "attention GFLOPs dense -> masked":
                     f"{r['attention_core_flops_dense'] / 1e9:.3f} -> {r['attention_core_flops_masked'] / 1e9:.3f}"}
                for name, r in m["layer_sets"].items()]
        parts.append(markdown_table(rows) + "\nFormula at this geometry (second half masked), reductions in %:\n\n")
        parts.append(markdown_table([{**r, "per_masked_layer": pct(r["per_masked_layer"]),
                                      "model_wide": pct(r["model_wide"])} for r in flops["formula"]]))
    pooling = results.get("pooling")
    if pooling:
        parts.append(f"\n{h} Sequence length: token pooling and the pixel control (model {pooling['model']})\n\n")
        rows = [{"method": r["method"], "f": r["factor"], "tokens/image": f"{r['vision_tokens_per_image']:.0f}",
                 "sequence": f"{r['sequence_length']:.0f}", **{t: pct(r.get(t)) for t in (*TASKS, "avg")}}
                for r in pooling["rows"]]
        parts.append(markdown_table(rows))
        best = (f"; best pooled (f > 1) f={pooling['best_factor']} with {pct(pooling['best_avg'])}"
                if pooling.get("best_factor") else "")
        parts.append(f"\nUnpooled Avg {pct(pooling['unpooled_avg'])}{best} ({sample_count(pooling)}).\n")
        parts += [f"\n![pooling]({link('figures/' + p)})\n" for p in pooling["figures"].values()]
    stitching = results.get("stitching")
    if stitching:
        parts.append(f"\n{h} Image stitching control (model {stitching['model']})\n\n")
        tokens = stitching["tokens"]
        rows = [{**score_row(name, s), "vision tokens": f"{tokens[name]['vision_tokens']:.0f}",
                 "sequence": f"{tokens[name]['sequence_length']:.0f}"} for name, s in stitching["scores"].items()]
        tile = f"{stitching['tile']} px" if stitching["tile"] else "the largest image's size (native-resolution model)"
        parts.append(markdown_table(rows) + f"\n({sample_count(stitching)}; canvas tiles of {tile}.)\n")
        parts.append(f"\n![stitching]({link('figures/' + stitching['figures']['scores'])})\n")
    attention = results.get("attention")
    if attention:
        parts.append(f"\n{h} Inter- vs intra-image attention\n\n")
        rows = []
        for name, per_n in attention["models"].items():
            for n, r in per_n.items():
                inter = r["inter"]
                half = len(inter) // 2
                density = [1 - v for v in r["density_intra"]]
                uniform = sum(i / (i + 1) for i in range(1, int(n))) / (int(n) - 1)
                rows.append({"model": name, "N": n, "samples": r["samples"], "uniform (density)": pct(uniform),
                             "inter, first half of layers": pct(sum(inter[:half]) / max(half, 1)),
                             "inter, second half": pct(sum(inter[half:]) / max(len(inter) - half, 1)),
                             "inter per layer": " ".join(pct(v) for v in inter),
                             "density-corrected per layer": " ".join(pct(v) for v in density)})
        answer_rows = []
        for name, per_n in attention["models"].items():
            for n, r in per_n.items():
                a = r.get("answer") or {}
                if a.get("samples"):
                    share = a["target_share"]
                    answer_rows.append({"model": name, "N": n, "samples": a["samples"],
                                        "uniform": pct(a["uniform_target_share"]),
                                        "on evidence, per layer": " ".join(pct(v) for v in share),
                                        "on images at all, per layer": " ".join(pct(v) for v in a["image_mass"])})
        parts.append(markdown_table(rows) + "\n(inter: the share of a vision token's attention on vision tokens that goes "
                     "to other images, mean over images 1..N-1, x100; density-corrected: each image's share divided by "
                     "its number of visible keys first, so attention spread evenly over keys reads i/(i+1) for "
                     "image i, the `uniform (density)` column on average. Masked layers read 0 by construction.)\n")
        if answer_rows:
            parts.append("\nAnswer-to-image attention: of the attention the last prompt token (whose output is the first "
                         "answer token) pays to images, the share on the images that hold the evidence, x100, over "
                         "samples with evidence in some but not all images; uniform = their share of image tokens.\n\n"
                         + markdown_table(answer_rows))
        parts += [f"\n![attention {key}]({link('figures/' + p)})\n" for key, p in attention["figures"].items()]
    return "".join(parts)


def masking_verdict(arms: dict[str, dict]) -> str | None:
    """One sentence: is masking the second half (the paper's best) above masking none, all, the first half?"""
    if "second_half" not in arms or arms["second_half"]["scores"]["avg"] is None:
        return None
    best = arms["second_half"]["scores"]["avg"]
    others = {a: r["scores"]["avg"] for a, r in arms.items() if a != "second_half" and r["scores"]["avg"] is not None}
    if not others:
        return None
    groups = {"higher than": [a for a, v in others.items() if best > v],
              "equal to": [a for a, v in others.items() if best == v],
              "lower than": [a for a, v in others.items() if best < v]}
    return (f"Masking the second half gives MIMIC Avg {pct(best)}: "
            + "; ".join(f"{how} {', '.join(f'{a} ({pct(others[a])})' for a in names)}" for how, names in groups.items() if names)
            + ".")
