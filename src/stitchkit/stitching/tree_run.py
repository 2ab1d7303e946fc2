"""`stitchkit stitch tree`: a VFM Stitch Tree at every stitch point, against one model and all models.

For each point n and seed: every branch's S_i is trained by FFM against model i's own features at its feature
layer (patch tokens, raw, block N-1 by default: what a multi-encoder MLLM reads; spec §1.5), label-free, on the
task's train images or on ffm_data's generic images (spec §1.5: FFM stitches trained on LLaVA-1.5 images transfer
across tasks). The consumer is a linear probe (BatchNorm + Linear) on the concatenated mean-pooled patch features
of all branches, standing in for the MLLM of the paper. Baselines: the trunk model alone ("single") and every
model run in full ("dual", or k-model). Reported per n: score, normalised gain (tree - single)/(dual - single),
and extra cost over single in blocks, analytic FLOPs and measured forward time.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stitchkit.engine import seed_everything
from stitchkit.engine.devices import pick_device
from stitchkit.errors import ConfigError
from stitchkit.report import markdown_table
from stitchkit.runs import RunDir, atomic_write_json, atomic_write_text
from stitchkit.stitching.cache import ArrayDataset, FeatureStore, float_tensor, inference_autocast, layer_key
from stitchkit.stitching.config import TreeConfig, late_points_message
from stitchkit.stitching.data import load_task_data
from stitchkit.stitching.layers import build_stitch
from stitchkit.stitching.model import StitchedModel, check_joinable, check_match_after_point, check_point, check_resolution, map_depth
from stitchkit.stitching.objectives import final_feature_matching_loss, task_loss
from stitchkit.stitching.protocol import model_records, task_score, train_stage
from stitchkit.stitching.report import data_sentence, ffm_data_sentence, format_mean, models_sentence, tree_figure
from stitchkit.stitching.tree import (
    StitchTree,
    block_flops,
    feature_layer_of,
    normalised_gain,
    sequence_length,
    vst_overhead,
)
from stitchkit.zoo import load_frozen_backbone


def probe_head(dim: int, num_classes: int) -> nn.Module:
    """The stand-in consumer: BatchNorm (feature scales differ by model) and a linear map."""
    return nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, num_classes))


class TreeExperiment:
    def __init__(self, cfg: TreeConfig, out: str | Path, command: str | None = None):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.names = [cfg.trunk, *cfg.branches]
        self.models = {name: load_frozen_backbone(cfg.models[name], cfg.image_size.get(name), self.device) for name in self.names}
        self.trunk = self.models[cfg.trunk]
        self.bridge_options = {"prefix_policy": cfg.prefix_policy, "grid_policy": cfg.grid_policy}
        self.layers = {name: feature_layer_of(bb, cfg.feature_layer) for name, bb in self.models.items()}
        self._check()  # before the run folder exists: a tree that cannot run leaves nothing behind
        self.run = RunDir(out, config=cfg, seeds={"data": cfg.data.seed, "tree": cfg.seeds}, command=command)
        self.data = load_task_data(cfg.task, cfg.data, cfg.ffm_data)
        self.store = FeatureStore.for_run(self.run.root, cfg, self.device)
        for split in ("train", "val", "test"):
            for name in self.names:
                self.store.plan(name, split, [layer_key(self.layers[name])])
            self.store.plan(cfg.trunk, split, [layer_key(n) for n in cfg.points])
        # The branches' FFM split (ffm_data's images; without it the train split, planned above already).
        self.store.plan(cfg.trunk, self.data.ffm_split, [layer_key(n) for n in cfg.points])
        for name in cfg.branches:
            self.store.plan(name, self.data.ffm_split, [layer_key(self.layers[name])])

    def _check(self) -> None:
        """What the branches and baselines would refuse, from the config and the models' shapes: resolutions,
        feature layers, stitch points and every trunk → branch join."""
        cfg = self.cfg
        for name, backbone in self.models.items():
            check_resolution(name, backbone)
            if not 1 <= self.layers[name] <= backbone.num_blocks:
                raise ConfigError(f"feature_layer: {cfg.feature_layer} is no block of {name}")
        for point in cfg.points:
            check_point(point, self.trunk.num_blocks, field="points")
        late = late_points_message(cfg.points, cfg.feature_layer, self.layers[cfg.trunk])
        if late:
            raise ConfigError(late)
        for name in cfg.branches:
            check_joinable(cfg.trunk, self.trunk, name, self.models[name], stitch_kind=cfg.stitch.kind,
                           stitch_field="stitch", **self.bridge_options)  # fmt: skip
            for point in cfg.points:  # a shallower branch maps a late trunk point onto its own feature layer
                target_point = map_depth(point, self.trunk.num_blocks, self.models[name].num_blocks)
                check_match_after_point(self.layers[name], target_point, f" (branch {name}'s feature_layer, at points: {point})")

    def features(self, name: str, split: str, key: str) -> np.ndarray:
        return self.store.get(name, split, key, self.models[name], self.data.splits[split].images, self.cfg.task)

    def pooled(self, name: str, split: str) -> np.ndarray:
        """Mean-pooled patch tokens of a model at its own feature layer (the unstitched model)."""
        tokens = self.features(name, split, layer_key(self.layers[name]))
        patches = np.asarray(tokens[:, self.models[name].num_prefix_tokens :], dtype=np.float32)
        return patches.mean(1)

    def fit_probe(self, features: dict[str, np.ndarray], folder: Path, seed: int) -> dict[str, float]:
        seed_everything(seed)
        head = probe_head(features["train"].shape[1], self.data.num_classes)
        dataset = ArrayDataset(features=features["train"], label=self.data.splits["train"].labels)

        @torch.no_grad()
        def score(model: nn.Module, split: str) -> float:
            model.eval()
            device = next(model.parameters()).device  # where training left it
            predictions = model(float_tensor(features[split], device)).argmax(1).cpu().numpy()
            return task_score("classification", predictions, self.data.splits[split].labels, self.data.num_classes)

        train_stage(
            head,
            lambda model, batch: task_loss(model(batch["features"].float()), batch["label"]),
            dataset,
            self.cfg.probe,
            seed,
            folder,
            description="probe",
            val_score=lambda model: score(model, "val"),  # early stopping (probe.patience)
        )
        return {split: score(head, split) for split in ("val", "test")}

    def train_branch(self, name: str, point: int, seed: int) -> StitchedModel:
        """S_i for one branch, trained by FFM on model i's patch tokens at its feature layer (label-free), on the
        FFM split: learnable prefix tokens start from that split too, so with ffm_data a branch never sees the task."""
        target, split = self.models[name], self.data.ffm_split
        seed_everything(seed)
        stitch = build_stitch(self.cfg.stitch.kind, self.trunk.hidden_size, target.hidden_size, act=self.cfg.stitch.act, hidden=self.cfg.stitch.hidden)
        model = StitchedModel(self.trunk, target, point, stitch, match_layer=self.layers[name], **self.bridge_options)
        if model.prefix.tokens is not None:
            reference = np.asarray(self.features(name, split, layer_key(model.target_point))[:, : target.num_prefix_tokens], dtype=np.float32)
            model.prefix.init_learnable(torch.as_tensor(reference.mean(0)))
        weights = model.match_token_weights()  # a raw block: patch tokens only, what the consumer reads
        dataset = ArrayDataset(
            hidden=self.features(self.cfg.trunk, split, layer_key(point)),
            reference=self.features(name, split, layer_key(self.layers[name])),
        )

        def loss_fn(wrapped, batch):
            stitched = wrapped(batch["hidden"].float(), output="match")
            return final_feature_matching_loss(stitched, batch["reference"].float(), weights.to(stitched.device))

        if model.trainable_parameters():  # an identity S without learnable prefix slots stays as built
            folder = self.run.path("branches", f"n{point}", name, f"seed{seed}", ".")
            train_stage(model, loss_fn, dataset, self.cfg.ffm, seed, folder, description=f"branch {name} n{point}")
        return model

    @torch.no_grad()
    def tree_features(self, tree: StitchTree, point: int, split: str) -> np.ndarray:
        tree.to(self.device).eval()
        hidden_all = self.features(self.cfg.trunk, split, layer_key(point))
        outputs = []
        for start in range(0, len(hidden_all), self.cfg.eval_batch_size):
            hidden = float_tensor(hidden_all[start : start + self.cfg.eval_batch_size], self.device)
            with inference_autocast(self.device):
                branches = tree(hidden)
            outputs.append(torch.cat([branches[name].float().mean(1) for name in self.names], dim=1).cpu())
        return torch.cat(outputs).numpy()

    @torch.no_grad()
    def time_forward(self, single, other, px_by_model) -> dict:
        """Seconds per image of the forward passes `single` (the trunk alone) and `other` from pixels, timed in
        turns (single, other, single, other, ...) over `timing_batches` rounds after one warm-up round, so that a
        change in the machine's load reaches both alike. Returns both medians, and the extra time of `other` as
        the median of the rounds' ratios with their range (on a shared CPU rounds differ by up to 2x)."""
        batch = len(next(iter(px_by_model.values())))
        times = {"single": [], "other": []}
        for _ in range(self.cfg.timing_batches + 1):
            for name, forward in (("single", single), ("other", other)):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                with inference_autocast(self.device):
                    forward(px_by_model)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - started) / batch)
        single_times, other_times = times["single"][1:], times["other"][1:]  # the first round warms up
        extra = [o / s - 1 for s, o in zip(single_times, other_times)]
        return {
            "single_seconds_per_image": statistics.median(single_times),
            "seconds_per_image": statistics.median(other_times),
            "extra_time": statistics.median(extra),
            "extra_time_range": [min(extra), max(extra)],
            "timed_on": self.device.type,
        }

    def _model_forward(self, name: str):
        """Model `name` run in full up to its feature layer, from pixels (what a multi-encoder MLLM pays)."""
        backbone = self.models[name]

        def forward(pixels):
            tokens, ctx = backbone.embed(pixels[name])
            return backbone.run_blocks(tokens, 0, self.layers[name], ctx)

        return forward

    def baseline(self, seed: int) -> dict:
        """Linear probes on the trunk model alone ("single") and on all models run in full ("dual")."""
        step, folder = f"baselines/seed{seed}", self.run.path("baselines", f"seed{seed}", ".")
        if not self.run.done(step):
            splits = ("train", "val", "test")
            single = self.fit_probe({s: self.pooled(self.cfg.trunk, s) for s in splits}, folder / "single", seed)
            all_models = {s: np.concatenate([self.pooled(n, s) for n in self.names], 1) for s in splits}
            dual = self.fit_probe(all_models, folder / "dual", seed)
            atomic_write_json(folder / "result.json", {"seed": seed, "single": single, "dual": dual})
            self.run.finish(step)
        return json.loads((folder / "result.json").read_text())

    def tree(self, point: int, seed: int, pixels: dict) -> dict:
        """Train the branches of VST-n, probe its features, count and time it against the trunk alone."""
        step, folder = f"tree/n{point}/seed{seed}", self.run.path("trees", f"n{point}", f"seed{seed}", ".")
        if self.run.done(step):
            return json.loads((folder / "result.json").read_text())
        branches = {name: (self.models[name], self.train_branch(name, point, seed).stitch) for name in self.cfg.branches}
        tree = StitchTree(
            self.trunk, point, {self.cfg.trunk: (self.trunk, None), **branches}, feature_layer=self.cfg.feature_layer, **self.bridge_options
        )
        scores = self.fit_probe({s: self.tree_features(tree, point, s) for s in ("train", "val", "test")}, folder / "probe", seed)
        cost = tree.cost()
        single_blocks = self.layers[self.cfg.trunk]
        single_flops = single_blocks * block_flops(self.trunk, sequence_length(self.trunk))
        timing = self.time_forward(self._model_forward(self.cfg.trunk), lambda p: tree.forward_pixels(p[self.cfg.trunk]), pixels)
        record = {
            "point": point,
            "seed": seed,
            "score_val": scores["val"],
            "score_test": scores["test"],
            "blocks": cost["blocks"],
            "flops": cost["flops"],
            "extra_blocks": cost["blocks"] / single_blocks - 1,
            "extra_flops": cost["flops"] / single_flops - 1,
            **timing,
            "formula_overhead": vst_overhead(single_blocks, point, len(self.names)),
        }
        atomic_write_json(folder / "result.json", record)
        self.run.finish(step)
        return record

    def run_all(self) -> dict:
        images = self.data.splits["test"].images[: self.cfg.eval_batch_size]
        pixels = {name: bb.to(self.device).preprocess(images).to(self.device) for name, bb in self.models.items()}
        baselines = [self.baseline(seed) for seed in self.cfg.seeds]
        trees = [self.tree(point, seed, pixels) for seed in self.cfg.seeds for point in self.cfg.points]

        single_score = statistics.fmean(b["single"]["test"] for b in baselines)
        dual_score = statistics.fmean(b["dual"]["test"] for b in baselines)
        for record in trees:
            record["normalised_gain"] = normalised_gain(record["score_test"], single_score, dual_score)
        single_blocks = self.layers[self.cfg.trunk]
        single_flops = single_blocks * block_flops(self.trunk, sequence_length(self.trunk))
        dual_blocks = sum(self.layers.values())
        dual_flops = sum(self.layers[n] * block_flops(self.models[n], sequence_length(self.models[n])) for n in self.names)
        timing = self.time_forward(self._model_forward(self.cfg.trunk), lambda p: [self._model_forward(n)(p) for n in self.names], pixels)
        single_time = timing["single_seconds_per_image"]
        return {
            "ffm_data": self.data.ffm_record(),  # which images the branches trained on
            "data_context": self.data.context(),
            "models": model_records(self.cfg.models, self.models),
            "feature_blocks": dict(self.layers),  # the block feature_layer resolves to in each model
            "baselines": baselines,
            "trees": trees,
            "single": {"score_test": single_score, "blocks": single_blocks, "flops": single_flops, "seconds_per_image": single_time},
            "dual": {
                "score_test": dual_score,
                "blocks": dual_blocks,
                "flops": dual_flops,
                "extra_blocks": dual_blocks / single_blocks - 1,
                "extra_flops": dual_flops / single_flops - 1,
                **timing,
            },
        }


TIME_COLUMN = "ms / image (vs trunk alone)"


def _time_cells(record: dict, extra_column: str, indicative: bool) -> dict[str, str]:
    """A variant's measured time per image and its extra time over the trunk alone: the median of the rounds'
    ratios, with their range where timings are indicative only (the CPU)."""
    low, high = record.get("extra_time_range", (record["extra_time"],) * 2)
    spread = f" ({low:+.0%} to {high:+.0%})" if indicative else ""
    # The trunk alone as timed in the same rounds: another row's trunk time saw another machine load.
    alone = f" vs {record['single_seconds_per_image'] * 1000:.2f}" if "single_seconds_per_image" in record else ""
    return {TIME_COLUMN: f"{record['seconds_per_image'] * 1000:.2f}{alone}", extra_column: f"{record['extra_time']:.1%}{spread}"}


def write_tree_outputs(out: Path, cfg: TreeConfig, description: str, results: dict) -> Path:
    atomic_write_json(out / "results.json", {"data": description, **results})
    metric_name = "top-1 accuracy (%)"
    # On a CPU a forward pass of the micro zoo takes milliseconds and a shared machine's load changes them by up
    # to 2x between rounds, so the extra time is shown with its range and marked indicative.
    indicative = results["dual"].get("timed_on", "cpu") != "cuda"
    time_column = "extra time (CPU: indicative)" if indicative else "extra time"
    single_scores = [b["single"]["test"] for b in results["baselines"]]
    every_scores = [b["dual"]["test"] for b in results["baselines"]]
    rows = [
        {"variant": f"single ({cfg.trunk})", metric_name: format_mean(single_scores), "extra blocks": "0%",
         "extra FLOPs": "0%", TIME_COLUMN: f"{results['single']['seconds_per_image'] * 1000:.2f}", time_column: "0%",
         "norm. gain": "0"},
        {"variant": f"all {len(cfg.branches) + 1} models", metric_name: format_mean(every_scores),
         "extra blocks": f"{results['dual']['extra_blocks']:.1%}", "extra FLOPs": f"{results['dual']['extra_flops']:.1%}",
         **_time_cells(results["dual"], time_column, indicative), "norm. gain": "1"},
    ]  # fmt: skip
    by_point: dict[int, list[dict]] = {}
    for record in results["trees"]:
        by_point.setdefault(record["point"], []).append(record)
    for point, records in sorted(by_point.items()):
        timing = {key: statistics.fmean(r[key] for r in records) for key in ("seconds_per_image", "extra_time", "single_seconds_per_image")
                  if all(key in r for r in records)}  # fmt: skip
        if all("extra_time_range" in r for r in records):  # a tree timed before the range was recorded has none
            timing["extra_time_range"] = (min(r["extra_time_range"][0] for r in records), max(r["extra_time_range"][1] for r in records))
        rows.append(
            {
                "variant": f"VST-{point}",
                metric_name: format_mean([r["score_test"] for r in records]),
                "extra blocks": f"{records[0]['extra_blocks']:.1%}",
                "extra FLOPs": f"{records[0]['extra_flops']:.1%}",
                **_time_cells(timing, time_column, indicative),
                "norm. gain": f"{statistics.fmean(r['normalised_gain'] for r in records):.2f}",
            }
        )
    context = results.get("data_context") or {}
    figure = tree_figure(
        out / "figures" / "tree_score_vs_cost.png",
        f"VFM Stitch Tree, trunk {cfg.trunk} (VST-n: stitched after trunk block n)",
        by_point,
        (f"{cfg.trunk} alone", single_scores),
        ("all models in full", results["dual"]["extra_blocks"], every_scores),
        metric_name,
        context.get("chance"),
    )
    timing_note = (
        f"Times are medians over {cfg.timing_batches} rounds of one batch, each variant timed in turns with the "
        "trunk alone (its time in those rounds after 'vs'); extra time is the median of the rounds' ratios (not "
        "the ratio of the medians)"
        + (", with their range in brackets: on a CPU (and a shared one most of all) these are indicative only, "
           "so compare blocks and FLOPs, or time on a GPU." if indicative else ".")
    )  # fmt: skip
    text = "\n".join(
        [
            "# VFM Stitch Tree\n",
            f"Trunk `{cfg.trunk}`, branches {', '.join(f'`{b}`' for b in cfg.branches)}; features from "
            f"feature_layer {cfg.feature_layer} ("
            + ", ".join(f"`{name}` block {block}" for name, block in results["feature_blocks"].items())
            + f"; patch tokens, mean-pooled, concatenated) into a linear probe; data: {data_sentence(description, results)}. "
            f"Models: {models_sentence(results, {name: cfg.models[name] for name in [cfg.trunk, *cfg.branches]})}. "
            f"Scores are test {metric_name}, mean ± sample std over seeds {cfg.seeds}. "
            "Extra cost is relative to the trunk model alone; normalised gain = (tree − single)/(all − single)."
            + ffm_data_sentence(results, trained="each branch's S_i")
            + "\n",
            markdown_table(rows, ["variant", metric_name, "extra blocks", "extra FLOPs", TIME_COLUMN, time_column, "norm. gain"]),
            timing_note + "\n",
            f"![score vs cost](figures/{figure.name})\n",
        ]
    )
    report = out / "report.md"
    atomic_write_text(report, text)
    return report
