"""The stitching protocol sweep: pairs x stitch points x stitch layers x objectives x seeds, plus controls.

For every cross pair (a, b) the self-stitches (a, a) and (b, b) run with the same S, point, objective, data
and seed (the control of Mai et al. 2026: cross > self means complementary knowledge, not extra capacity),
and every model gets a linear probe on its own pooled output (the baseline, and the reference for prediction
overlap). Each finished cell is written to cells/<cell>.json and marked in the run manifest, so a killed
sweep resumes where it stopped; an interrupted training resumes from its checkpoint (engine).

One cell:
    1. build S (seeded) and the stitched model; optionally least-squares init; learnable prefix tokens
       start at the mean of the target's own prefix tokens at the stitch point
    2. train S by the objective's stages on cached source activations (cache.py); FFM stages on the task's train
       images, or on ffm_data's own images (the split 'ffm'); TLT with tlt.augment on fresh crops of the train
       images (augment.py), the source prefix recomputed every step
    3. label-free objectives (LFM, FFM) fit a head on the frozen stitch; TLT stages train S and head
       (optionally at their own learning rates, and stopped early on the val score: OptimConfig)
    4. evaluate on the test split: score, D_n / D_fin / per-layer profile, prediction overlap
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stitchkit.engine import EarlyStopping, TrainConfig, TrainResult, seed_everything, train
from stitchkit.engine.devices import pick_device
from stitchkit.errors import ConfigError
from stitchkit.runs import RunDir, atomic_write_json
from stitchkit.zoo import load_frozen_backbone
from stitchkit.stitching.augment import random_resized_crop
from stitchkit.stitching.cache import (
    ArrayDataset,
    FeatureArray,
    FeatureStore,
    batch_features,
    float_tensor,
    inference_autocast,
    layer_key,
    match_key,
)
from stitchkit.stitching.config import OptimConfig, StitchLayerConfig, StitchRunConfig
from stitchkit.stitching.data import TaskData, load_task_data
from stitchkit.stitching.diagnostics import DistanceMeter, prediction_overlap
from stitchkit.stitching.layers import build_stitch, least_squares_init, stitch_input_layer
from stitchkit.stitching.model import (
    StitchedModel,
    build_head,
    check_joinable,
    check_match_after_point,
    check_point,
    check_resolution,
    map_depth,
    match_features,
    native_grid,
    resolution,
)
from stitchkit.stitching.objectives import (
    IGNORE_INDEX,
    LABEL_FREE,
    final_feature_matching_loss,
    layer_feature_matching_loss,
    resolve_match_layer,
    stages,
    task_loss,
)


# ---- training settings ---------------------------------------------------------------------------


VAL_SCORE = "val_score"  # the metric early stopping watches: the task score on the val split (higher is better)


def train_config(optim: OptimConfig, examples: int, seed: int, head: str | None = None) -> TrainConfig:
    """The engine's settings for one stage. `head`: the module name of the head inside the trained model
    (the prefix of its parameter names), which trains at optim.head_lr."""
    steps = optim.steps(examples)
    return TrainConfig(
        steps=steps,
        batch_size=min(optim.batch_size, examples),
        lr=optim.lr,
        lr_groups={head: optim.head_lr} if head is not None and optim.head_lr is not None else {},
        weight_decay=optim.weight_decay,
        warmup_steps=int(optim.warmup_fraction * steps),
        max_grad_norm=optim.max_grad_norm,
        checkpoint_every=max(1, steps // 4),
        log_every=max(1, steps // 10),
        seed=seed,
        mixed_precision=optim.mixed_precision,
        early_stopping=None if optim.patience is None else EarlyStopping(metric=VAL_SCORE, patience=optim.patience),
    )


def train_stage(
    model: torch.nn.Module,
    loss_fn,
    dataset,
    optim: OptimConfig,
    seed: int,
    out_dir: Path,
    *,
    description: str,
    head: str | None = None,
    val_score: Callable[[torch.nn.Module], float] | None = None,
) -> TrainResult:
    """Train one stage by `optim`. With optim.patience, val_score(model) (the task score on val) is evaluated
    once per epoch, and the training stops after `patience` epochs without improvement, at the best epoch's
    weights (spec §2). `head` as in train_config."""
    cfg = train_config(optim, len(dataset), seed, head)
    evaluation = {}
    if cfg.early_stopping is not None:
        if val_score is None:
            raise ValueError("early stopping needs a val_score function")
        evaluation = {
            "eval_fn": lambda model, step: {VAL_SCORE: val_score(model)},
            "eval_every": max(1, round(len(dataset) / cfg.batch_size)),  # once per epoch
        }
    return train(model, loss_fn, dataset, cfg, out_dir, description=description, **evaluation)


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The name of `module` inside `model`, i.e. the prefix of its parameters in model.named_parameters()."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


# ---- metrics ------------------------------------------------------------------------------------


def task_score(task: str, predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Top-1 accuracy (%) or mean IoU (%) over the classes present in labels or predictions."""
    valid = labels != IGNORE_INDEX
    if task == "classification":
        return float((predictions[valid] == labels[valid]).mean() * 100)
    pred, true = predictions[valid].astype(np.int64), labels[valid].astype(np.int64)
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean() * 100)


def stack_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([b[key] for b in batches]) for key in batches[0]}


def model_records(specs: dict[str, str], models: dict) -> dict[str, dict]:
    """name -> the model's id, resolution, patch size, grid, blocks and width, as a sweep or a tree ran it."""
    return {
        name: {"model": specs[name], "image_size": bb.image_size, "patch_size": bb.patch_size,
               "grid": list(native_grid(bb)), "blocks": bb.num_blocks, "width": bb.hidden_size, "resolution": resolution(bb)}
        for name, bb in models.items()
    }  # fmt: skip


# ---- the sweep ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    source: str
    target: str
    point: int
    stitch: StitchLayerConfig
    objective: str
    seed: int

    @property
    def is_self(self) -> bool:
        return self.source == self.target

    @property
    def name(self) -> str:
        return f"{self.source}--{self.target}/n{self.point}/{self.stitch.name}/{self.objective}/seed{self.seed}"


class Sweep:
    """Everything one `stitchkit stitch run` needs: data, models, feature cache, run folder."""

    def __init__(self, cfg: StitchRunConfig, out: str | Path, command: str | None = None):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.models = {name: load_frozen_backbone(spec, cfg.image_size.get(name), self.device) for name, spec in cfg.models.items()}
        self.cells = [
            Cell(source, target, point, stitch, objective, seed)
            for seed in cfg.seeds
            for source, target in cfg.all_pairs()
            for point in cfg.points
            for stitch in cfg.stitch_layers
            for objective in cfg.objectives
        ]
        # Everything the config and the models' shapes decide is checked before the run folder exists: a config
        # that cannot run leaves nothing behind, and never fails after some cells have trained.
        for name, backbone in self.models.items():
            check_resolution(name, backbone)
        for cell in self.cells:
            self._check_cell(cell)
        self.run = RunDir(out, config=cfg, seeds={"data": cfg.data.seed, "sweep": cfg.seeds}, command=command)
        self.data: TaskData = load_task_data(cfg.task, cfg.data, cfg.ffm_data)
        self.store = FeatureStore.for_run(self.run.root, cfg, self.device)
        self._plan()
        self.init_images = self.data.splits["train"].images[: cfg.init_images]

    # ---- setup ------------------------------------------------------------------------------

    def _check_cell(self, cell: Cell) -> None:
        """What building and training the cell would refuse, checked from the config and the models' shapes."""
        source, target = self.models[cell.source], self.models[cell.target]
        check_point(cell.point, source.num_blocks, field="points")
        match_end, _ = resolve_match_layer(self.cfg.match_layer, target.num_blocks)
        check_match_after_point(match_end, self.target_point(cell), f" ({cell.target} at points: {cell.point})")
        field = f"stitch_layers[{self.cfg.stitch_layers.index(cell.stitch)}]"
        check_joinable(cell.source, source, cell.target, target, stitch_kind=cell.stitch.kind, stitch_field=field,
                       prefix_policy=self.cfg.prefix_policy, grid_policy=self.cfg.grid_policy)  # fmt: skip
        if cell.stitch.init == "lstsq" and not (
            cell.stitch.kind == "linear" or (cell.stitch.kind == "lora" and source.hidden_size != target.hidden_size)
        ):
            raise ConfigError(
                f"{field}: init 'lstsq' needs kind 'linear' (or 'lora' between different widths), got {cell.stitch.kind!r}"
            )

    def target_point(self, cell: Cell) -> int:
        return map_depth(cell.point, self.models[cell.source].num_blocks, self.models[cell.target].num_blocks)

    def match_key(self, target_name: str) -> str:
        return match_key(*resolve_match_layer(self.cfg.match_layer, self.models[target_name].num_blocks))

    def _plan(self) -> None:
        """Tell the store every feature the sweep will read, so each (model, split) is computed in one pass."""
        if self.cfg.cache == "none":
            return
        for name in self.models:
            if self.cfg.probes:
                for split in ("train", "val", "test"):
                    self.store.plan(name, split, ["readout"])
        for cell in self.cells:
            source_layer = stitch_input_layer(cell.stitch.kind, cell.point)
            ffm_split = [self.data.ffm_split] if "ffm" in stages(cell.objective) else []
            # Augmented TLT crops images afresh every step, so a TLT-only cell reads no cached train activations.
            train = [] if cell.objective == "tlt" and self.cfg.tlt.augment else ["train"]
            for split in (*train, "val", "test", *ffm_split) if self.cfg.cache_source else ():
                self.store.plan(cell.source, split, [layer_key(source_layer)])
            m = self.target_point(cell)
            self.store.plan(cell.target, "init", [layer_key(m)])
            if cell.stitch.init == "lstsq":
                self.store.plan(cell.source, "init", [layer_key(cell.point)])
            if "lfm" in stages(cell.objective):
                self.store.plan(cell.target, "train", [layer_key(m)])
            if "ffm" in stages(cell.objective):
                self.store.plan(cell.target, self.data.ffm_split, [self.match_key(cell.target)])

    def features(self, model: str, split: str, key: str) -> np.ndarray:
        images = self.init_images if split == "init" else self.data.splits[split].images
        return self.store.get(model, split, key, self.models[model], images, self.cfg.task)

    # ---- probes -----------------------------------------------------------------------------

    def probe(self, model: str, seed: int) -> dict:
        """Linear probe of one frozen model on its own readout (the baseline; spec §2). With probe.lr_sweep the
        probe trains once per learning rate, each from the same initial head, and the one with the best val score
        is kept, the first on ties (spec §7: fair baselines); its scores and predictions are the result."""
        step = f"probe/{model}/seed{seed}"
        folder = self.run.path("probes", model, f"seed{seed}", ".")
        if self.run.done(step):
            return json.loads((folder / "result.json").read_text())
        backbone = self.models[model]
        features = {split: self._readout_features(model, split) for split in ("train", "val", "test")}
        sweep = self.cfg.probe.lr_sweep
        started = time.perf_counter()
        best, val_scores = None, []
        for lr in sweep or [self.cfg.probe.lr]:
            seed_everything(seed)
            head = build_head(self.cfg.task, backbone, self.data.num_classes, self.cfg.data.image_size)
            # Without a sweep the training keeps its folder "train" (runs made before lr_sweep resume there).
            out_dir = folder / (f"train-lr{lr!r}" if sweep else "train")  # repr: distinct lrs, distinct names
            self._fit_head(head, features["train"], features["val"], out_dir, seed, lr=lr)
            scores = {split: self._head_predictions(head, features[split]) for split in ("val", "test")}
            score_val = self.score(scores["val"], "val")
            val_scores.append({"lr": lr, "score_val": score_val})
            if best is None or score_val > best["score_val"]:  # strictly better: ties keep the first lr
                best = {"lr": lr, "score_val": score_val, "test_predictions": scores["test"]}
        result = {"kind": "probe", "model": model, "seed": seed, "lr": best["lr"]}
        if sweep:
            result["lr_sweep"] = val_scores  # the val score of every lr tried, in lr_sweep's order
        result["train_seconds"] = time.perf_counter() - started
        result["score_val"] = best["score_val"]
        result["score_test"] = self.score(best["test_predictions"], "test")
        np.save(folder / "test_predictions.npy", best["test_predictions"])
        atomic_write_json(folder / "result.json", result)
        self.run.finish(step)
        return result

    def _readout_features(self, model: str, split: str) -> np.ndarray:
        if self.cfg.cache != "none":
            return self.features(model, split, "readout")
        from stitchkit.stitching.cache import compute_features

        images = self.data.splits[split].images
        return compute_features(self.models[model], images, ["readout"], self.cfg.task, self.cfg.eval_batch_size, self.device)["readout"]

    def score(self, predictions: np.ndarray, split: str) -> float:
        return task_score(self.cfg.task, predictions, self.data.splits[split].labels, self.data.num_classes)

    def _fit_head(
        self,
        head: torch.nn.Module,
        train_features: np.ndarray,
        val_features: np.ndarray | None,
        out_dir: Path,
        seed: int,
        lr: float | None = None,
    ) -> None:
        """Train a head on fixed features by the probe settings, at `lr` if given (one lr of probe.lr_sweep), else at
        probe.lr. val_features: for early stopping."""
        optim = self.cfg.probe if lr is None else self.cfg.probe.model_copy(update={"lr": lr})
        labels = self.data.splits["train"].labels
        dataset = ArrayDataset(features=train_features, label=labels)

        def loss_fn(model, batch):
            return task_loss(model(batch["features"].float()), batch["label"])

        def val_score(model):
            return self.score(self._head_predictions(model, val_features), "val")

        train_stage(head, loss_fn, dataset, optim, seed, out_dir, description="head", val_score=val_score)

    @torch.no_grad()
    def _head_predictions(self, head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
        head.eval()
        device = next(head.parameters()).device  # where training left it (also while it trains: early stopping)
        predictions = []
        for start in range(0, len(features), self.cfg.eval_batch_size):
            batch = float_tensor(features[start : start + self.cfg.eval_batch_size], device)
            predictions.append(head(batch).argmax(1).cpu().numpy())
        return np.concatenate(predictions)

    # ---- cells ------------------------------------------------------------------------------

    def build_model(self, cell: Cell) -> StitchedModel:
        """S (seeded), prefix tokens, least-squares init: everything before training."""
        source, target = self.models[cell.source], self.models[cell.target]
        seed_everything(cell.seed)
        m = self.target_point(cell)
        stitch = build_stitch(
            cell.stitch.kind,
            source.hidden_size,
            target.hidden_size,
            act=cell.stitch.act,
            hidden=cell.stitch.hidden,
            rank=cell.stitch.rank,
            alpha=cell.stitch.alpha,
            source_block=source.block(cell.point - 1),
            call_block=source.call_block,
        )
        model = StitchedModel(
            source,
            target,
            cell.point,
            stitch,
            target_point=m,
            prefix_policy=self.cfg.prefix_policy,
            grid_policy=self.cfg.grid_policy,
            task=self.cfg.task,
            match_layer=self.cfg.match_layer,
        )
        if model.prefix.tokens is not None or cell.stitch.init == "lstsq":
            target_init = float_tensor(self._init_features(cell.target, layer_key(m)))
            model.prefix.init_learnable(target_init[:, : target.num_prefix_tokens].mean(0))
            if cell.stitch.init == "lstsq":
                source_init = float_tensor(self._init_features(cell.source, layer_key(cell.point)))
                # Pair source and target patch tokens on the target grid (a linear S commutes with resampling).
                patches = model.grid(source_init[:, source.num_prefix_tokens :])
                least_squares_init(stitch, patches, target_init[:, target.num_prefix_tokens :], cell.stitch.ridge)
        return model

    def _init_features(self, model: str, key: str) -> np.ndarray:
        if self.cfg.cache != "none":
            return self.features(model, "init", key)
        from stitchkit.stitching.cache import compute_features

        return compute_features(self.models[model], self.init_images, [key], self.cfg.task, self.cfg.eval_batch_size, self.device)[key]

    @property
    def source_cached(self) -> bool:
        return self.cfg.cache != "none" and self.cfg.cache_source

    def stage_dataset(self, cell: Cell, model: StitchedModel, stage: str) -> ArrayDataset:
        """Training rows for one stage: the source activations (or the images, when the source runs online) plus
        the stage's cached target, or the labels. What a row lacks, the loss computes online. FFM reads the FFM
        split (ffm_data's images, or the train split), every other stage the train split."""
        name = self.data.ffm_split if stage == "ffm" else "train"
        split = self.data.splits[name]
        if self.source_cached and not (stage == "tlt" and self.cfg.tlt.augment):
            arrays = {"hidden": self.features(cell.source, name, layer_key(model.source_layer))}
        else:
            arrays = {"images": split.images}
        if stage == "tlt":
            arrays["label"] = split.labels
        elif self.cfg.cache != "none":
            key = layer_key(model.target_point) if stage == "lfm" else self.match_key(cell.target)
            arrays["reference"] = self.features(cell.target, name, key)
        return ArrayDataset(**arrays)

    @staticmethod
    def _online_hidden(model: StitchedModel, images: torch.Tensor) -> torch.Tensor:
        """The source prefix recomputed from a batch's images (no source cache)."""
        return model.source_hidden(model.source.preprocess(images.cpu().numpy()).to(images.device))

    def _online_reference(self, model: StitchedModel, stage: str, images: torch.Tensor) -> torch.Tensor:
        """The stage's target recomputed from a batch's images (no cache)."""
        key = layer_key(model.target_point) if stage == "lfm" else match_key(model.match_end, model.match_normed)
        px = model.target.preprocess(images.cpu().numpy()).to(images.device)
        return batch_features(model.target, px, [key], self.cfg.task)[key]

    def loss_function(self, model: StitchedModel, stage: str):
        """The stage's loss on a batch; every term goes through model.forward (DDP-safe)."""
        token_weights = model.match_token_weights()
        compiled = {}
        augment = stage == "tlt" and self.cfg.tlt.augment

        def loss_fn(wrapped, batch):
            if augment:  # a new crop and flip of each image (and its label map) every time it is drawn
                images, labels = random_resized_crop(batch["images"].cpu().numpy(), batch["label"].cpu().numpy())
                device = batch["images"].device
                batch = {"images": torch.from_numpy(images).to(device), "label": torch.from_numpy(labels).to(device)}
            if self.cfg.compile:
                # Compiled once per stage; benchmarks/bench_stitch.py measures exactly this path.
                if "forward" not in compiled:
                    compiled["forward"] = torch.compile(wrapped)
                wrapped = compiled["forward"]
            hidden = batch["hidden"].float() if "hidden" in batch else self._online_hidden(model, batch["images"])
            reference = None
            if stage in ("lfm", "ffm"):
                cached = batch.get("reference")
                reference = cached.float() if cached is not None else self._online_reference(model, stage, batch["images"])
            if stage == "lfm":
                return layer_feature_matching_loss(wrapped(hidden, output="bridge"), reference)
            if stage == "ffm":
                weights = token_weights.to(hidden.device)
                return final_feature_matching_loss(wrapped(hidden, output="match"), reference, weights)
            return task_loss(wrapped(hidden), batch["label"])

        return loss_fn

    def run_cell(self, cell: Cell, probes: dict[tuple[str, int], dict]) -> dict:
        step = f"cell/{cell.name}"
        folder = self.run.path("cells", *cell.name.split("/"), ".")
        if self.run.done(step):
            return json.loads((folder / "result.json").read_text())
        model = self.build_model(cell)
        started = time.perf_counter()
        losses = {}
        for stage in stages(cell.objective):
            if stage == "tlt":
                seed_everything(cell.seed + 1)  # a fresh head, the same for every cell with this seed
                model.head = build_head(self.cfg.task, model.target, self.data.num_classes, self.cfg.data.image_size)
            if not model.trainable_parameters():
                # An identity S and no learnable prefix slot: LFM or FFM has nothing to move, so the stitch stays
                # as built and the cell is the untrained stitch's control (a head is still fitted, or trained by TLT).
                losses[stage] = None
                continue
            dataset = self.stage_dataset(cell, model, stage)
            result = train_stage(
                model,
                self.loss_function(model, stage),
                dataset,
                getattr(self.cfg, stage),
                cell.seed,
                folder / stage,
                description=f"{cell.name} {stage}",
                head=module_name(model, model.head) if model.head is not None else None,
                val_score=lambda model: self.stitch_score(model, cell.source, "val"),
            )
            losses[stage] = result.losses[-1] if result.losses else None
        if cell.objective in LABEL_FREE:
            # S was trained without labels: the task score comes from a head fitted on the frozen stitch.
            seed_everything(cell.seed + 1)
            model.head = build_head(self.cfg.task, model.target, self.data.num_classes, self.cfg.data.image_size)
            train_features = self.stitched_features(model, cell.source, "train")
            # Val features serve only early stopping.
            val_features = self.stitched_features(model, cell.source, "val") if self.cfg.probe.patience else None
            # At probe.lr even when probe.lr_sweep is set: only the models' own probes (the baselines) sweep, so a
            # stitch cell costs one head training whatever the sweep.
            self._fit_head(model.head, train_features, val_features, folder / "head", cell.seed)
        train_seconds = time.perf_counter() - started
        result = {
            "kind": "stitch",
            "source": cell.source,
            "target": cell.target,
            "self_stitch": cell.is_self,
            "point": cell.point,
            "target_point": model.target_point,
            "stitch": cell.stitch.name,
            "objective": cell.objective,
            "seed": cell.seed,
            "trainable_params": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")),
            "prefix": model.prefix.describe(),
            "final_losses": losses,
            "train_seconds": train_seconds,
        }
        result.update(self.evaluate(model, cell, probes, folder))
        atomic_write_json(folder / "result.json", result)
        self.run.finish(step)
        return result

    @torch.no_grad()
    def stitched_features(self, model: StitchedModel, source: str, split: str) -> np.ndarray:
        """What a head fitted on the frozen stitch reads, for a whole split: stored like cached activations
        (cache_dtype, float16 by default) and filled batch by batch, since a segmentation split's patch tokens
        are the size of a cached layer (8000 images at a 32x32 grid: 17 GB in float16, twice that in float32)."""
        model.to(self.device).eval()
        length = len(self.data.splits[split].images)
        features, start = None, 0
        with inference_autocast(self.device):
            for hidden in self._hidden_batches(model, source, split):
                rows = model(hidden, output="features")
                if features is None:
                    shape = tuple(rows.shape[1:])
                    features = FeatureArray(None, length, shape, np.dtype(self.cfg.cache_dtype), "stitched features")
                features.write(start, rows)
                start += len(rows)
        return features.finish()

    def _hidden_batches(self, model: StitchedModel, source: str, split: str):
        """Source activations at the stitch point for a split, batch by batch, on the model's device."""
        size = self.cfg.eval_batch_size
        device = next(model.parameters()).device  # where training left it (also while it trains: early stopping)
        if self.source_cached:
            cached = self.features(source, split, layer_key(model.source_layer))
            for start in range(0, len(cached), size):
                yield float_tensor(cached[start : start + size], device)
        else:
            images = self.data.splits[split].images
            for start in range(0, len(images), size):
                yield model.source_hidden(model.source.preprocess(images[start : start + size]).to(device))

    def stitch_score(self, model: StitchedModel, source: str, split: str) -> float:
        """The stitched model's task score on a split (TLT's early stopping watches it on val)."""
        with inference_autocast(self.device):
            predictions, _ = self._predict(model, source, split, with_distances=False)
        return self.score(predictions, split)

    @torch.no_grad()
    def evaluate(self, model: StitchedModel, cell: Cell, probes: dict, folder: Path) -> dict:
        """Scores on val and test; on test also D_n, D_fin, the per-layer profile and prediction overlap."""
        model.to(self.device).eval()
        out: dict = {}
        with inference_autocast(self.device):
            for split in ("val", "test"):
                predictions, distances = self._predict(model, cell.source, split, with_distances=split == "test")
                labels = self.data.splits[split].labels
                out[f"score_{split}"] = self.score(predictions, split)
        np.save(folder / "test_predictions.npy", predictions)
        out.update(distances)
        if (cell.source, cell.seed) in probes and (cell.target, cell.seed) in probes:
            probe_predictions = [
                np.load(self.run.root / "probes" / name / f"seed{cell.seed}" / "test_predictions.npy")
                for name in (cell.source, cell.target)
            ]
            labelled = labels != IGNORE_INDEX  # unlabelled pixels are nobody's right or wrong
            out["overlap"] = prediction_overlap(*((p == labels)[labelled] for p in [*probe_predictions, predictions]))
        return out

    def _predict(self, model: StitchedModel, source: str, split: str, with_distances: bool) -> tuple[np.ndarray, dict]:
        """Predictions on a split and, if asked, distances to the target's own features on the same images.

        Each distance covers the tokens of the objective it reports (spec §2): D_n (the LFM objective) every token
        target block m+1 receives, registers included, as LFM trains; D_fin (the FFM objective) the tokens FFM
        weighs at the match layer (patches and CLS at the normed last layer, patches alone at a raw block). The
        profile D_k after every target block m..N covers the same tokens (FFM leaves the others free, so they
        would swamp it); its first entry is D_n only when FFM weighs every token the target receives.
        """
        target = model.target
        keep = model.match_token_weights().bool()
        images = self.data.splits[split].images
        predictions, profile, stitch, final, start = [], None, DistanceMeter(), DistanceMeter(), 0
        for hidden in self._hidden_batches(model, source, split):
            predictions.append(model(hidden).argmax(1).cpu().numpy())
            if not with_distances:
                continue
            reference = target.hidden_states(target.preprocess(images[start : start + len(hidden)]).to(self.device))
            start += len(hidden)
            stitched = model.target_profile(model.bridge(hidden))  # states after blocks m, m+1, ..., N
            stitch.update(stitched[0], reference[model.target_point])
            profile = profile or [DistanceMeter() for _ in stitched]
            for meter, state, k in zip(profile, stitched, range(model.target_point, target.num_blocks + 1)):
                meter.update(state[:, keep], reference[k][:, keep])
            end, normed = model.match_end, model.match_normed
            stitched_match = match_features(target, stitched[end - model.target_point], normed)
            final.update(stitched_match[:, keep], match_features(target, reference[end], normed)[:, keep])
        distances = {}
        if with_distances:
            layers = [meter.result() for meter in profile]
            distances = {
                "distance_stitch": stitch.result()["distance"],
                "distance_stitch_rel": stitch.result()["relative"],
                "distance_final": final.result()["distance"],
                "distance_final_rel": final.result()["relative"],
                "profile_rel": [r["relative"] for r in layers],
            }
        return np.concatenate(predictions), distances

    # ---- everything -------------------------------------------------------------------------

    def run_all(self) -> dict:
        from stitchkit.progress import track

        probes = {}
        if self.cfg.probes:
            for seed in self.cfg.seeds:
                for name in self.models:
                    probes[(name, seed)] = self.probe(name, seed)
        cells = [self.run_cell(cell, probes) for cell in track(self.cells, "stitch cells")]
        results = {
            "data_context": self.data.context(),  # classes, chance and split sizes, for the report
            "models": model_records(self.cfg.models, self.models),
            "probes": list(probes.values()),
            "cells": cells,
        }
        if any("ffm" in stages(cell.objective) for cell in self.cells):
            results["ffm_data"] = self.data.ffm_record()  # which images the FFM stages trained on
        return results
