"""`stitchkit patches run CONFIG.yaml --out DIR`: datasets, fine-tuning per split and seed, mean ranks, report.

Steps of the run folder (each skipped once finished; an interrupted training resumes from its checkpoint):

    data/<set>/                     the patch dataset of every image set (dataset.py), IDs checked for the model
    precheck/<set>.json             recognition before fine-tuning (§1.5): rank of the true name given the image
    train/<set>/f<f>/seed<s>/       one fine-tuning: engine folder, eval/step_*.json, result.json
    moderation/...                  the moderation study (moderation.py), when configured
    results.json, report.md, figures/*.png
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stitchkit.data import load_image
from stitchkit.errors import InputError
from stitchkit.patches.config import ImageSet, PatchesConfig
from stitchkit.patches.dataset import assign_ids, build_patch_dataset, load_patch_dataset, read_names, too_fine
from stitchkit.patches.evaluate import SCORINGS, EvalItem, random_baseline, score_items, summarize
from stitchkit.patches.ids import first_token_clashes
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
    are rendered in the run; the config checks their split factors against their size."""
    for set_name, image_set in cfg.image_sets.items():
        try:
            image_set.templates.check()
        except InputError as err:
            raise InputError(f"image set {set_name!r}: {err}") from None
        if image_set.shapes is not None:
            continue
        items = read_names(image_set.names, image_set.images)
        assign_ids(items, cfg.id_seed)  # no tokenizer yet: the first-token check waits for the model
        for item in items:
            width, height = load_image(item.file).size
            bad = too_fine(width, height, cfg.splits)
            if bad:
                raise InputError(f"image set {set_name!r}: {item.file} is {width}x{height} px, too small to cut into "
                                 f"f x f patches for split factor(s) {bad}")  # fmt: skip


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
    """§1.5: before fine-tuning, the rank of the image's true name among all names, given the full image.

    Ranked as the official evaluator ranks (the first-token logit) when the names' first tokens are distinct
    under the tokenizer; otherwise by full log-probability, since names such as "red star" and "red circle"
    share their first token and the logit could not tell them apart. `rule` says which; both are recorded."""
    names = [f" {row['name']}" for row in images]
    rule = "logprob" if first_token_clashes(vlm.tokenizer, names) else "logit"
    items = [EvalItem(row["key"], "recognition", [row["image"]], prompt, i) for i, row in enumerate(images)]
    records = score_items(vlm, items, names, ties, require_distinct_first_tokens=False)
    means = {scoring: float(np.mean([r[f"rank_{scoring}"] for r in records])) for scoring in SCORINGS}
    return {"mean_rank": means[rule], "rule": rule, "mean_ranks": means, "random": random_baseline(len(names)), "records": records}


def run_patches(cfg: PatchesConfig, out: str | os.PathLike, command: str | None = None) -> Path:
    """Run the whole experiment into `out`; returns the report path."""
    from stitchkit.patches.moderation import run_moderation
    from stitchkit.patches.report import write_report

    from stitchkit.vlm.micro import check_vlm_spec, resolve_vlm

    check_sources(cfg)
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
        build_patch_dataset(items, data_dir, cfg.splits, image_set.templates, id_seed=cfg.id_seed, tokenizer=tokenizer, fmt=cfg.patch_format)
        run.finish(f"data/{set_name}")
    dataset, meta = load_patch_dataset(data_dir)
    images = list(dataset["images"])
    items, candidates = stitching_items(images, meta)
    evaluate = lambda vlm: score_items(vlm, items, candidates, cfg.eval.ties)  # noqa: E731

    result: dict[str, Any] = {"k": len(candidates), "random_baseline": random_baseline(len(candidates)),
                              "ids": {e["key"]: e["id"] for e in meta["images"]}, "precheck": None, "splits": {}}  # fmt: skip
    if image_set.recognition_prompt:
        path = run.path("precheck", f"{set_name}.json")
        if not run.done(f"precheck/{set_name}"):
            atomic_write_json(path, precheck(load(), images, image_set.recognition_prompt, cfg.eval.ties))
            run.finish(f"precheck/{set_name}")
        check = json.loads(path.read_text())
        # a pre-check written before `rule` existed was ranked by full log-probability
        result["precheck"] = {"mean_rank": check["mean_rank"], "rule": check.get("rule", "logprob"), "random": check["random"]}

    for f in cfg.splits:
        samples = training_samples(dataset[f"f{f}"])
        per_seed = {}
        for seed in cfg.train.seeds:
            per_seed[seed] = finetune_step(run, f"train/{set_name}/f{f}/seed{seed}", load, samples, cfg.train, f, seed, evaluate)
        result["splits"][f] = aggregate_seeds(per_seed)
    return result


def aggregate_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of the last evaluation point (what the paper reports), and the mean curve."""
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
        "final_mean": {m: float(np.mean([f[m] for f in finals.values()])) for m in metrics},
        "final_std": {m: float(np.std([f[m] for f in finals.values()])) for m in metrics},
        "seeds": {str(seed): {"final": finals[seed], "curve": r["curve"]} for seed, r in per_seed.items()},
        "mean_curve": mean_curve,
    }
