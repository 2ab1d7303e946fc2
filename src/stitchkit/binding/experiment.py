"""`stitchkit binding run CONFIG.yaml --out DIR`: curricula, evaluation per stage, mechanistic analysis, report.

Steps of the run folder (each skipped once finished; an interrupted training resumes from its checkpoint):

    images/<encoder>/                 images.safetensors + images.json (the training contexts through the frozen
                                      encoder, and their colours and shapes), eval_images.safetensors + eval_images.json
                                      (the held-out contexts), gate.json (the separability gate), sample.png
    train/seed<s>/<stage>/<stage>/... one engine folder per stage, nested along the branch, so branches that share
                                      their first stages share those trainings; image stages are named <stage>-<encoder>.
                                      Each holds model/ (the saved model), eval.json, and analysis.json when it ends a branch
    results.json, report.md, figures/*.png

<encoder> is a key of the config's `encoders`, or `encoder` when the config names only images.encoder.

Every stage is one engine training with its own warmup; with `optim.carry_state` (the default, §4) it starts from
the AdamW moments the previous stage of its branch ended with (the engine's `optimizer_from`), and the projector,
which starts training at the first image stage, gets a fresh state.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stitchkit.binding.config import BindingConfig
from stitchkit.binding.data import ENCODE_BATCH, ExampleStream, ImageBank, StreamSpec, build_bank, collate, patch_tokens
from stitchkit.binding.evaluate import accuracy_of_samples, image_accuracy, ood_ranges, summarize, text_accuracy, text_samples
from stitchkit.binding.model import BindingModel, answer_loss, load_binding_model, save_binding_model
from stitchkit.binding.render import glyph_set, render_context
from stitchkit.binding.task import Vocabulary, example_rng, noise_warning, sample_example
from stitchkit.engine import TrainConfig, seed_everything, train
from stitchkit.engine.devices import pick_device, torch_threads
from stitchkit.errors import ConfigError, TrainingDiverged
from stitchkit.runs import RunDir, atomic_write_json
from stitchkit.zoo import load_frozen_backbone

RESULTS_VERSION = 2  # 2: noise_span, vocab; interventions' requested and accuracy; ratio_last_block leaves out too few pairs
GATE_THRESHOLD = 0.95


# ---- images: the bank of encoded contexts and the separability gate -------------------------------------


@dataclass
class Banks:
    train: ImageBank
    eval: ImageBank


def gate_features(backbone, vocab: Vocabulary, cfg: BindingConfig, seed: int, batch_size: int = ENCODE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled patch tokens (N, D) of `gate_images` single-object images per renderable colour x shape, and
    their (colour, shape) labels (N, 2). The images are rendered as the encoder consumes them, one batch at a
    time: at paper scale (216 x 216 glyphs) they are ~93k."""
    glyphs = glyph_set(cfg.images.glyphs)
    colours = min(glyphs.renderable[0], vocab.colours)
    shapes = min(glyphs.renderable[1], vocab.shapes)
    labels = []

    def images():
        for c, s, k in itertools.product(range(colours), range(shapes), range(cfg.images.gate_images)):
            labels.append((c, s))
            yield render_context([c], [s], glyphs, backbone.image_size, example_rng(seed, "gate", c * shapes + s, k), cfg.images.layout)[0]

    pooled = patch_tokens(backbone, images(), batch_size, pool=True)
    return pooled, torch.tensor(labels)


def separability_gate(backbone, vocab: Vocabulary, cfg: BindingConfig, seed: int, batch_size: int = ENCODE_BATCH) -> dict[str, Any]:
    """§3: a linear probe on mean-pooled patch tokens of single-object images must reach >= 95% on colour and
    on shape. Reported, not enforced: a failing encoder still runs, and the report says so."""
    from stitchkit.zoo.probe import ridge_probe_accuracy

    pooled, labels = gate_features(backbone, vocab, cfg, seed, batch_size)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    pooled, labels = pooled[order], labels[order]
    cut = len(labels) * 4 // 5  # the probe is fit on four fifths and tested on the rest
    sizes = labels.max(dim=0).values + 1  # every renderable colour and shape occurs
    result = {"colours": int(sizes[0]), "shapes": int(sizes[1]), "images": len(labels), "test_images": len(labels) - cut}
    for i, what in enumerate(("colour", "shape")):
        result[f"{what}_accuracy"] = ridge_probe_accuracy(pooled[:cut], labels[:cut, i], pooled[cut:], labels[cut:, i])
    result["passed"] = min(result["colour_accuracy"], result["shape_accuracy"]) >= GATE_THRESHOLD
    return result


def prepare_images(run: RunDir, cfg: BindingConfig, name: str, spec: str, device: torch.device) -> Banks:
    folder = run.path("images", name)
    step = f"images/{name}"
    if not run.done(step):
        backbone = load_frozen_backbone(spec, device=device)
        vocab, glyphs = cfg.vocab.vocabulary, glyph_set(cfg.images.glyphs)
        seed = cfg.seeds[0]
        for split, size in (("images", cfg.images.pool), ("eval_images", cfg.images.eval_pool)):
            bank = build_bank(backbone, size, seed, split, cfg.train_objects, vocab, glyphs, cfg.images.layout)
            bank.save(folder / f"{split}.safetensors")
        atomic_write_json(folder / "gate.json", {"encoder": spec, **separability_gate(backbone, vocab, cfg, seed)})
        _save_samples(cfg, backbone.image_size, folder / "sample.png")
        run.finish(step)
    return Banks(ImageBank.load(folder / "images.safetensors"), ImageBank.load(folder / "eval_images.safetensors"))


def _save_samples(cfg: BindingConfig, size: int, path: Path) -> None:
    from stitchkit.report import image_grid

    glyphs, vocab = glyph_set(cfg.images.glyphs), cfg.vocab.vocabulary
    images, titles = [], []
    for index in range(8):
        rng = example_rng(cfg.seeds[0], "images", 0, index)
        n = int(rng.integers(cfg.train_objects[0], cfg.train_objects[1] + 1))
        ex = sample_example(rng, n, vocab, min(glyphs.renderable[0], vocab.colours), min(glyphs.renderable[1], vocab.shapes))
        images.append(render_context(ex.colours, ex.shapes, glyphs, size, rng, cfg.images.layout)[0])
        titles.append(", ".join(glyphs.name(c, s) for c, s in zip(ex.colours, ex.shapes)) if n <= 3 else f"N = {n}")
    image_grid(path, images, titles, cols=4)


# ---- training along a branch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRun:
    """One stage of one (seed, branch, encoder): where it lives and what it trained on."""

    stage: str
    folder: Path
    relative: str  # train/seed0/S1/... (the step name)
    images_seen: bool  # an image stage ran here or before

DIVERGED = "diverged.json"  # in a stage folder: its training diverged (step, loss); every branch through it stops there


def branch_stages(cfg: BindingConfig, run: RunDir, seed: int, branch: str, encoder: str | None) -> list[StageRun]:
    parts, out, images_seen = ["train", f"seed{seed}"], [], False
    for stage in cfg.branches[branch]:
        is_image = cfg.stages[stage].image_fraction > 0
        parts.append(f"{stage}-{encoder}" if is_image else stage)
        images_seen = images_seen or is_image
        out.append(StageRun(stage, run.path(*parts), "/".join(parts), images_seen))
    return out


def noise_span(cfg: BindingConfig, banks: dict[str, Banks]) -> int:
    """The noise's K ~ U{0..span - 2N} (§5) stands in for an image's tokens: span = the encoders' token count (196
    at 224 px / 16, also when no branch uses images) unless noise.span sets it. One value per run, so the text
    branch's SN (shared by every branch that runs it) and an image branch's S3N draw their noise alike."""
    if cfg.noise.span is not None:
        return cfg.noise.span
    tokens = sorted({bank.train.tokens for bank in banks.values()})
    if len(tokens) > 1:
        raise ConfigError(f"the encoders give {tokens} image tokens per context: set noise.span to choose one noise span")
    return tokens[0] if tokens else 196


def train_stage(
    model: BindingModel, cfg: BindingConfig, seed: int, stage_run: StageRun, banks: Banks | None, span: int,
    previous: StageRun | None = None,
) -> dict[str, Any]:
    """Train one stage in place (or load it when finished), after stage `previous` of its branch; returns its step
    count and stop evaluations."""
    stage = cfg.stages[stage_run.stage]
    vocab = cfg.vocab.vocabulary
    spec = StreamSpec(
        stage.image_fraction, stage.noise, span, cfg.noise.between_pairs_only, stage.grounding, stage.hop_practice
    )
    dataset = ExampleStream(spec, stage.steps * cfg.optim.batch_size, seed, stage_run.relative, vocab, cfg.train_objects, banks.train if banks else None)
    if model.projector is not None:
        model.projector.requires_grad_(stage_run.images_seen)
    o = cfg.optim
    train_cfg = TrainConfig(
        steps=stage.steps, batch_size=o.batch_size, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, warmup_steps=o.warmup_steps,
        schedule="constant", max_grad_norm=o.max_grad_norm, checkpoint_every=o.checkpoint_every, log_every=50,
        seed=seed, mixed_precision=o.mixed_precision,
    )  # fmt: skip
    eval_fn = stop_fn = None
    if stage.until_id_accuracy is not None:
        lo, hi = cfg.train_objects
        held_out = {n: text_samples(vocab, n, stage.stop_examples, seed, "stop") for n in range(lo, hi + 1)}

        def eval_fn(m, step):
            return {"id_accuracy": float(np.mean([accuracy_of_samples(m, s, cfg.eval.batch_size) for s in held_out.values()]))}

        def stop_fn(metrics):
            return metrics["id_accuracy"] >= stage.until_id_accuracy

    result = train(model, answer_loss, dataset, train_cfg, stage_run.folder, collate_fn=collate,
                   description=f"{stage_run.relative}", eval_fn=eval_fn, eval_every=stage.eval_every, stop_fn=stop_fn,
                   optimizer_from=previous.folder if previous is not None and o.carry_state else None)  # fmt: skip
    evaluations = [r for r in result.metrics if "id_accuracy" in r]
    return {"steps": result.steps, "stop_evaluations": evaluations}


def evaluate_stage(model: BindingModel, cfg: BindingConfig, stage_run: StageRun, banks: Banks | None, seed: int) -> dict[str, Any]:
    vocab = cfg.vocab.vocabulary
    per_n = text_accuracy(model, vocab, range(1, cfg.eval.max_objects + 1), cfg.eval.per_n, seed, cfg.eval.batch_size)
    result: dict[str, Any] = {"text": {str(n): a for n, a in per_n.items()}, **summarize(per_n, cfg.train_objects, cfg.eval.ood_headline)}
    if banks is not None and stage_run.images_seen:
        image = image_accuracy(model, vocab, banks.eval, seed, cfg.eval.batch_size)
        result["image"] = {str(n): a for n, a in image.items()}
        result["image_id"] = summarize(image, cfg.train_objects, cfg.eval.ood_headline)["id"]
    return result


def analyze_model(model: BindingModel, cfg: BindingConfig, seed: int) -> dict[str, Any]:
    from stitchkit.binding.knockouts import run_knockouts
    from stitchkit.binding.interventions import run_interventions
    from stitchkit.binding.probes import run_probes
    from stitchkit.binding.subjects import TokenSubject

    a = cfg.analysis
    subject = TokenSubject(model.eval(), model.vocab)
    return {
        "interventions": {str(n): run_interventions(subject, n, a.pairs, seed) for n in a.n},
        "probes": {str(n): run_probes(subject, n, a.probe_examples, seed) for n in a.n},
        "knockouts": run_knockouts(model, a.n[0], a.knockout_examples, seed, a.knockout_window, pairs=a.pairs, label_layer=a.knockout_label_layer),
    }


def run_branch(
    run: RunDir, cfg: BindingConfig, seed: int, branch: str, encoder: str | None, banks: Banks | None, span: int, device
) -> dict[str, Any]:
    seed_everything(seed)
    model = BindingModel(cfg.model, cfg.vocab.vocabulary, banks.train.features.shape[-1] if banks else None).to(device)
    if banks is not None:
        model.image_bank = banks.train.features.to(device)
    stages, stage_runs = [], branch_stages(cfg, run, seed, branch, encoder)
    for previous, stage_run in zip([None, *stage_runs], stage_runs):
        step = stage_run.relative
        marker = stage_run.folder / DIVERGED
        if marker.is_file():  # a shared stage that diverged in an earlier branch, or an earlier run
            return {"seed": seed, "branch": branch, "encoder": encoder, "diverged": json.loads(marker.read_text())}
        if not run.done(step):
            try:
                training = train_stage(model, cfg, seed, stage_run, banks, span, previous)
            except TrainingDiverged as err:  # the paper excludes diverged branches (§5); so does the table
                record = {"stage": step, "step": err.step, "loss": str(err.loss)}
                atomic_write_json(marker, record)
                return {"seed": seed, "branch": branch, "encoder": encoder, "diverged": record}
            evaluation = evaluate_stage(model, cfg, stage_run, banks, seed)
            meta = {"stage": stage_run.stage, "seed": seed, "encoder": encoder if stage_run.images_seen else None,
                    "train_objects": list(cfg.train_objects)}  # fmt: skip
            save_binding_model(model, stage_run.folder / "model", meta, with_projector=stage_run.images_seen)
            atomic_write_json(stage_run.folder / "eval.json", {**training, **evaluation})
            run.finish(step)
        else:
            loaded, _ = load_binding_model(stage_run.folder / "model")
            model.lm.load_state_dict(loaded.lm.state_dict())
            # Only a stage that has seen images has a trained projector. A text stage is shared with other encoders'
            # branches, and runs of RESULTS_VERSION 1 saved its untrained projector, maybe of another encoder's width.
            if stage_run.images_seen:
                model.projector.load_state_dict(loaded.projector.state_dict())
        stages.append({"stage": stage_run.stage, "folder": step, **json.loads((stage_run.folder / "eval.json").read_text())})
    final = stage_runs[-1]
    analysis = None
    if cfg.analysis.enabled:
        step = f"{final.relative}/analysis"
        if not run.done(step):
            atomic_write_json(final.folder / "analysis.json", analyze_model(model, cfg, seed))
            run.finish(step)
        analysis = json.loads((final.folder / "analysis.json").read_text())
    return {"seed": seed, "branch": branch, "encoder": encoder, "stages": stages, "analysis": analysis}


def aggregate(runs: list[dict[str, Any]], branches: list[str]) -> dict[str, Any]:
    """Mean and sd over seeds x encoders of every branch's final stage (the paper's table); diverged runs are
    counted apart and left out, as the paper left out its one diverged branch. Mean R leaves out the runs whose
    interventions rest on too few pairs (interventions.enough_pairs): their R is 0 / (1 / 1) = 0, not a finding."""
    table = {}
    for branch in branches:
        finals = [r["stages"][-1] for r in runs if r["branch"] == branch and "diverged" not in r]
        row = {"runs": len(finals), "diverged": sum(r["branch"] == branch and "diverged" in r for r in runs)}
        for key in ("id", "ood", "ood_far", "image_id"):
            values = [f[key] for f in finals if f.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_sd"] = float(np.std(values)) if values else None
        ratios = [_final_ratio(r["analysis"]) for r in runs if r["branch"] == branch and r.get("analysis") and _enough_pairs(r["analysis"])]
        row["ratio_last_block"] = float(np.mean(ratios)) if ratios else None
        table[branch] = row
    return table


def _final_ratio(analysis: dict[str, Any]) -> float:
    """R at the last block's input (interventions.ratio_layer; layers 0..L are all patched here), at the first N."""
    from stitchkit.binding.interventions import ratio_layer

    rows = next(iter(analysis["interventions"].values()))["layers"]
    return rows[ratio_layer(len(rows) - 1)]["ratio"]


def _enough_pairs(analysis: dict[str, Any]) -> bool:
    """Whether the interventions behind _final_ratio rest on enough pairs."""
    from stitchkit.binding.interventions import enough_pairs

    return enough_pairs(next(iter(analysis["interventions"].values())))


def run_binding(cfg: BindingConfig, out: str | os.PathLike, command: str | None = None) -> Path:
    from stitchkit.binding.report import warn, write_report

    run = RunDir(out, config=cfg, seeds={f"seed{s}": s for s in cfg.seeds}, command=command)
    device = pick_device(cfg.device)
    with torch_threads(cfg.cpu_threads):
        banks = {}
        if any(cfg.uses_images(b) for b in cfg.branches):
            banks = {name: prepare_images(run, cfg, name, spec, device) for name, spec in cfg.encoder_specs.items()}
        span, runs = noise_span(cfg, banks), []
        if cfg.uses_noise() and (note := noise_warning(span, cfg.train_objects[1])):
            warn(note)
        for seed in cfg.seeds:
            for branch in cfg.branches:
                for encoder in (list(banks) if cfg.uses_images(branch) else [None]):
                    runs.append(run_branch(run, cfg, seed, branch, encoder, banks.get(encoder), span, device))
    gates = {name: json.loads(run.path("images", name, "gate.json").read_text()) for name in banks}
    results = {
        "version": RESULTS_VERSION,
        "name": cfg.name,
        "train_objects": list(cfg.train_objects),
        "vocab": cfg.vocab.model_dump(),
        "noise_span": span,
        "ood_ranges": ood_ranges(cfg.train_objects, cfg.eval),
        "gates": gates,
        "table": aggregate(runs, list(cfg.branches)),
        "runs": [r for r in runs if "diverged" not in r],
        "diverged": [r for r in runs if "diverged" in r],
    }
    atomic_write_json(run.path("results.json"), results)
    report = write_report(run, cfg, json.loads(run.path("results.json").read_text()))
    run.finish("report")
    return report
