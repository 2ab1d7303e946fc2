"""`stitchkit patches run CONFIG.yaml --out DIR`: datasets, fine-tuning per split and seed, mean ranks, report.

Steps of the run folder (each skipped once finished; an interrupted training resumes from its checkpoint):

    data/<set>/                     the patch dataset of every image set (dataset.py), IDs checked for the model
    precheck/<set>.json             recognition before fine-tuning (§1.5): rank of the true name given the image
    localization/<set>/f<f>.json    patch localization before fine-tuning (§5), when `analyses` asks (analyses.py)
    train/<set>/f<f>/seed<s>/       one fine-tuning: engine folder, eval/step_*.json, result.json
    threshold/<set>/x<x>/f<f>/seed<s>/   one Threshold-x fine-tuning (§5), laid out as train/...
    moderation/...                  the moderation study (moderation.py), when configured
    results.json, report.md, figures/*.png
"""

from __future__ import annotations

import functools
import gc
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stitchkit.data import load_image
from stitchkit.errors import InputError
from stitchkit.patches.analyses import (
    localization_summary,
    patch_localization,
    patch_name,
    patch_ranks,
    reference_names,
    threshold_keeps,
)
from stitchkit.patches.config import ImageSet, PatchesConfig
from stitchkit.patches.dataset import assign_ids, build_patch_dataset, load_patch_dataset, read_names, too_fine
from stitchkit.patches.evaluate import EvalItem, random_baseline, rank_true_names, score_items, summarize
from stitchkit.engine.devices import torch_threads
from stitchkit.patches.models import model_loader
from stitchkit.vlm.loading import load_tokenizer
from stitchkit.patches.shapes import render_shapes_set
from stitchkit.patches.train import PatchSample, finetune_step
from stitchkit.runs import RunDir, atomic_write_json

RESULTS_VERSION = 1


def source_items(image_set: ImageSet, folder: Path):
    """The set's source images: rendered into `folder` first for a shapes-world set."""
    if image_set.shapes is not None:
        names = render_shapes_set(image_set.shapes, folder)
        return read_names(names, folder)
    return read_names(image_set.names, image_set.images)


def check_sources(cfg: PatchesConfig) -> None:
    """Refuse bad data before the run folder exists and the model is resolved (zoo: builds the micro VLM, minutes):
    every set's templates; for a folder set its names file, every listed image (decoded), its IDs (given ones
    well-formed, or at most 26 to generate) and every split factor against every image's size. Shapes-world sets
    are rendered in the run; the config checks their split factors against their size. One error names the first
    problem of every set that has one, so that a config with several missing folders is fixed in one go."""
    problems = []
    for set_name, image_set in cfg.image_sets.items():
        try:
            check_source(cfg, image_set)
        except InputError as err:
            problems.append(f"image set {set_name!r}: {err}")
    if problems:
        raise InputError("\n".join(problems))


def check_source(cfg: PatchesConfig, image_set: ImageSet) -> None:
    """One set's part of `check_sources`."""
    image_set.templates.check()
    if image_set.shapes is not None:
        return
    items = read_names(image_set.names, image_set.images)
    assign_ids(items, cfg.id_seed)  # no tokenizer yet: the first-token check waits for the model
    for item in items:
        width, height = load_image(item.file).size
        bad = too_fine(width, height, cfg.splits)
        if bad:
            raise InputError(f"{item.file} is {width}x{height} px, too small to cut into f x f patches for split factor(s) {bad}")


def stitching_items(images, meta: dict[str, Any]) -> tuple[list[EvalItem], list[str]]:
    """Image-based items (full image + training prompt) and reference-based items (text only), and the
    candidates: every ID in the response template, leading space included (§4)."""
    candidates = [meta["templates"]["response"].format(id=entry["id"]) for entry in meta["images"]]
    gold = {entry["id"]: i for i, entry in enumerate(meta["images"])}
    items = []
    for row in images:
        items.append(EvalItem(row["key"], "image", [row["image"]], row["prompt"], gold[row["id"]]))
        items.append(EvalItem(row["key"], "reference", [], row["reference_prompt"], gold[row["id"]]))
    return items, candidates


def training_samples(rows) -> list[PatchSample]:
    return [PatchSample(row["image"].convert("RGB"), row["prompt"], row["response"]) for row in rows]


def precheck(vlm, images, prompt: str, ties: str) -> dict[str, Any]:
    """§1.5: before fine-tuning, the rank of the image's true name among all names, given the full image
    (first-token logit unless the names share first tokens: `rank_true_names`)."""
    items = [EvalItem(row["key"], "recognition", [row["image"]], prompt, i) for i, row in enumerate(images)]
    return rank_true_names(vlm, items, reference_names(images), ties)


def run_patches(cfg: PatchesConfig, out: str | os.PathLike, command: str | None = None) -> Path:
    """Run the whole experiment into `out`; returns the report path."""
    from stitchkit.patches.moderation import check_filter, run_moderation
    from stitchkit.patches.report import write_report

    from stitchkit.vlm.micro import check_vlm_spec, resolve_vlm

    check_sources(cfg)
    if cfg.moderation is not None:
        check_filter(cfg.moderation.filter)  # a plug-in that cannot be imported, before the run folder exists
    check_vlm_spec(cfg.model.source)  # a missing model or unknown recipe, before the run folder and any build
    run = RunDir(out, config=cfg, seeds={"ids": cfg.id_seed, **{f"train_{s}": s for s in cfg.train.seeds}}, command=command)
    with torch_threads(cfg.model.cpu_threads):
        source = resolve_vlm(cfg.model.source)[0]
        load = model_loader(cfg.model, source)
        tokenizer = load_tokenizer(source)
        sets: dict[str, Any] = {}
        for set_name, image_set in cfg.image_sets.items():
            sets[set_name] = run_image_set(run, cfg, set_name, image_set, load, tokenizer)
        moderation = run_moderation(run, cfg, load, tokenizer) if cfg.moderation is not None else None
    results = {"version": RESULTS_VERSION, "name": cfg.name, "model": cfg.model.source, "sets": sets, "moderation": moderation}
    atomic_write_json(run.path("results.json"), results)
    # Read back, so the report sees exactly what results.json holds (JSON keys are strings).
    report = write_report(run, cfg, json.loads(run.path("results.json").read_text()))
    run.finish("report")
    return report


def run_image_set(run: RunDir, cfg: PatchesConfig, set_name: str, image_set: ImageSet, load, tokenizer) -> dict[str, Any]:
    data_dir = run.path("data", set_name)
    if not run.done(f"data/{set_name}"):
        items = source_items(image_set, run.path("sources", set_name))
        # force: the folder belongs to this run (its config is the run's), whatever an unfinished step left there
        build_patch_dataset(items, data_dir, cfg.splits, image_set.templates, id_seed=cfg.id_seed, tokenizer=tokenizer,
                            fmt=cfg.patch_format, patch_dropout=cfg.patch_dropout, dropout_seed=cfg.patch_dropout_seed,
                            force=True)  # fmt: skip
        run.finish(f"data/{set_name}")
    dataset, meta = load_patch_dataset(data_dir)
    images = list(dataset["images"])
    items, candidates = stitching_items(images, meta)
    evaluate = lambda vlm: score_items(vlm, items, candidates, cfg.eval.ties)  # noqa: E731

    result: dict[str, Any] = {"k": len(candidates), "random_baseline": random_baseline(len(candidates)),
                              "ids": {e["key"]: e["id"] for e in meta["images"]}, "precheck": None, "splits": {}}  # fmt: skip
    check, localization = before_finetuning(run, cfg, set_name, image_set, dataset, images, load)
    if check is not None:
        # a pre-check written before `rule` existed was ranked by full log-probability
        result["precheck"] = {"mean_rank": check["mean_rank"], "rule": check.get("rule", "logprob"), "random": check["random"]}
    if localization:  # keys only when asked for, so that runs without the analyses keep their results.json
        result["localization"] = {f: localization_summary(loc) for f, loc in localization.items()}

    for f in cfg.splits:
        result["splits"][f] = train_seeds(run, cfg, f"train/{set_name}/f{f}", training_samples(dataset[f"f{f}"]), f, load, evaluate)
    if cfg.analyses.threshold_x:
        result["threshold_x"] = threshold_x_trainings(run, cfg, set_name, dataset, localization, load, evaluate)
    return result


def before_finetuning(run: RunDir, cfg: PatchesConfig, set_name: str, image_set: ImageSet, dataset, images, load):
    """The steps on the model as loaded: the recognition pre-check (§1.5) and patch localization (§5, at the
    splits `analyses` needs). They share one load of the model, made only if a step is not finished yet and
    released before any fine-tuning. Returns (pre-check or None, {f: localization with every patch's record})."""
    model = functools.cache(load)
    check = None
    if image_set.recognition_text:
        path = run.path("precheck", f"{set_name}.json")
        if not run.done(f"precheck/{set_name}"):
            atomic_write_json(path, precheck(model(), images, image_set.recognition_text, cfg.eval.ties))
            run.finish(f"precheck/{set_name}")
        check = json.loads(path.read_text())
    localization = {}
    for f in cfg.analyses.localization_splits(cfg.splits):
        path, step = run.path("localization", set_name, f"f{f}.json"), f"localization/{set_name}/f{f}"
        if not run.done(step):
            found = patch_localization(model(), images, dataset[f"f{f}"], image_set.recognition_text, cfg.eval.ties)
            atomic_write_json(path, {"f": f, **found})
            run.finish(step)
        localization[f] = json.loads(path.read_text())
    del model
    gc.collect()
    return check, localization


def threshold_x_trainings(run: RunDir, cfg: PatchesConfig, set_name: str, dataset, localization, load, evaluate) -> dict[int, Any]:
    """§5 Threshold-x: per x and split, train on the patches whose true name ranks >= x given the patch alone
    (`analyses.threshold_keeps`), every seed, evaluated as the main trainings. A threshold that drops nothing is
    the main training itself (`trained_in` names the steps); one that drops everything trains nothing."""
    results: dict[int, Any] = {}
    for x in cfg.analyses.threshold_x:
        results[x] = {}
        for f in cfg.analyses.threshold_at(cfg.splits):
            rows = dataset[f"f{f}"]
            ranks = patch_ranks(localization[f])
            keeps = threshold_keeps([ranks[patch_name(row)] for row in rows.select_columns(["key", "row", "col"])], x)
            kept = [i for i, keep in enumerate(keeps) if keep]
            counts = {"patches_kept": len(kept), "patches_total": len(rows)}
            if not kept:
                results[x][f] = {**counts, "trained_in": None, "note": f"every patch ranks below x = {x}: nothing to train"}
                continue
            prefix = f"train/{set_name}/f{f}" if len(kept) == len(rows) else f"threshold/{set_name}/x{x}/f{f}"
            trained = train_seeds(run, cfg, prefix, training_samples(rows.select(kept)), f, load, evaluate)
            results[x][f] = {**counts, "trained_in": prefix, **trained}
    return results


def train_seeds(run: RunDir, cfg: PatchesConfig, prefix: str, samples: list[PatchSample], f: int, load, evaluate) -> dict[str, Any]:
    """Fine-tune on `samples` once per seed, each as the run-folder step `<prefix>/seed<s>`; aggregated over seeds."""
    per_seed = {seed: finetune_step(run, f"{prefix}/seed{seed}", load, samples, cfg.train, f, seed, evaluate) for seed in cfg.train.seeds}
    return aggregate_seeds(per_seed)


def aggregate_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of the reported evaluation point (the last one, as the paper reports: `final_step`,
    see train.reported_step), and the mean curve (every evaluation point, the end of training included)."""
    finals = {seed: summarize(r["final"]) for seed, r in per_seed.items()}
    metrics = list(next(iter(finals.values())))
    first = next(iter(per_seed.values()))
    curves = [r["curve"] for r in per_seed.values()]
    mean_curve = [
        {"step": point["step"], "epoch": point["epoch"],
         **{m: float(np.mean([c[i][m] for c in curves])) for m in metrics}}
        for i, point in enumerate(curves[0])
    ]  # fmt: skip
    return {
        "train_samples": first["samples"],
        "steps": first["steps"],
        "epochs": first["epochs"],
        "final_step": first.get("final_step", first["steps"]),  # trainings finished before final_step: the end
        "final_mean": {m: float(np.mean([f[m] for f in finals.values()])) for m in metrics},
        "final_std": {m: float(np.std([f[m] for f in finals.values()])) for m in metrics},
        "seeds": {str(seed): {"final": finals[seed], "curve": r["curve"]} for seed, r in per_seed.items()},
        "mean_curve": mean_curve,
    }
