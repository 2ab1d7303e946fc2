"""Fine-tuning on (patch, ID) pairs, with evaluation at step 0 and at evenly spaced points (visual_stitching.md §3).

The loss falls on the ID tokens only (the official `--mask_prompt`): labels are the response's tokens and
nothing else, not the prompt, not the image, not the end-of-turn token the VLM layer appends (the official
code appends none). `loss_on="text"` supervises every token that is neither padding nor part of an image
block, as the official moderation runs do. Training runs on the engine, so a killed run resumes from the
last evaluation point (checkpoints are written where evaluations are) and a finished one is not redone.

    out_dir/train/           the engine's folder (metrics.jsonl, checkpoint/, done.json)
    out_dir/eval/step_XXXXXX.json   per-item records of every evaluation point
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stitchkit.engine import TrainConfig, train
from stitchkit.engine.loop import warmup_error
from stitchkit.errors import ConfigError, IncompatibleError
from stitchkit.patches.config import TrainSettings
from stitchkit.patches.evaluate import summarize
from stitchkit.runs import RunDir, atomic_write_json
from stitchkit.vlm.finetune import FinetuneConfig, prepare, vlm_loss
from stitchkit.vlm.model import IGNORE_INDEX, VLM, VLMBatch

VISION_TOWERS = ("vision_tower", "visual")  # LLaVA-style; Qwen2-VL


@dataclass(frozen=True)
class PatchSample:
    image: Image.Image
    prompt: str
    response: str


def supervised_labels(vlm: VLM, batch: VLMBatch, loss_on: str = "id") -> torch.Tensor:
    """Next-token targets of a batch encoded with responses: the response tokens only ("id"), or every
    token that is not padding, not in an image span and not the appended end-of-turn ("text")."""
    eos = vlm.tokenizer.eos_token or ""
    eos_length = len(vlm.tokenizer(eos, add_special_tokens=False)["input_ids"]) if eos else 0
    if loss_on == "id":
        labels = batch.labels.clone()
    else:
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)
        for row, spans in enumerate(batch.spans):
            for span in spans:
                labels[row, span.start : span.end] = IGNORE_INDEX
    if eos_length:  # rows are left-padded, so every row ends with the appended end-of-turn
        labels[:, -eos_length:] = IGNORE_INDEX
    return labels


def patch_collate(vlm: VLM, loss_on: str = "id"):
    def collate(samples: list[PatchSample]) -> dict[str, Any]:
        batch = vlm.encode([[s.image] for s in samples], [s.prompt for s in samples], [s.response for s in samples])
        return {"inputs": vlm.model_kwargs(batch), "labels": supervised_labels(vlm, batch, loss_on)}

    return collate


def vision_tower(model) -> torch.nn.Module:
    inner = getattr(model, "model", model)
    for name in VISION_TOWERS:
        if hasattr(inner, name):
            return getattr(inner, name)
    raise IncompatibleError(f"{type(model).__name__}: cannot find its vision tower")


def eval_schedule(steps: int, eval_points: int) -> tuple[int, list[int]]:
    """(every, steps evaluated): step 0, every `every` steps and the last step; `every` = ceil(steps / points)."""
    every = max(1, math.ceil(steps / eval_points))
    return every, sorted({0, *range(every, steps + 1, every), steps})


def reported_step(steps: int, every: int, trainer_schedule: bool) -> int:
    """The evaluation point a training reports as its "final" (§4: the last evaluation point): the end of
    training, or with the HF Trainer's schedule (`step_rule: epochs`) the Trainer's last evaluation, the last
    multiple of `every`. The official runs evaluate when step % eval_steps == 0, eval_steps = ceil(0.1 x
    max_steps), and not at the end, so a 195-step run's last point is 180 (45/50/200/800 steps end on one).
    The end of training is still evaluated (the engine always does, and checkpoints there): the curves show
    it, the reported numbers do not use it."""
    return steps - steps % every if trainer_schedule else steps


def finetune_with_curve(
    load: Callable[[], VLM],
    samples: Sequence[PatchSample],
    settings: TrainSettings,
    split: int,
    seed: int,
    out_dir: str | Path,
    evaluate: Callable[[VLM], list[dict[str, Any]]],
    description: str | None = None,
) -> dict[str, Any]:
    """Fine-tune a fresh model from `load()` on `samples`; evaluate at step 0 and evenly spaced points.
    `description` names the training in its progress line (default: its split factor and seed).

    Returns {"steps", "epochs", "samples", "curve": [{"step", "epoch", <summary>}], "final_step", "final": <records
    at final_step (`reported_step`)>}.
    """
    out_dir = Path(out_dir)
    steps = settings.steps_for(split, len(samples))
    if settings.warmup_steps and settings.warmup_steps >= steps:  # steps depend on the data: checked once it is built
        raise ConfigError(f"train: at split factor {split}, {warmup_error(settings.warmup_steps, steps)}")
    every, schedule = eval_schedule(steps, settings.eval_points)
    final_step = reported_step(steps, every, trainer_schedule=settings.step_rule == "epochs")

    def eval_path(step: int) -> Path:
        return out_dir / "eval" / f"step_{step:06d}.json"

    _train_with_evals(load, samples, settings, seed, out_dir, evaluate, steps, every, eval_path,
                      description or f"f={split} seed={seed}")  # fmt: skip
    gc.collect()  # the model went with _train_with_evals's frame; give its memory back before the next one loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    curve, final = [], []
    for step in schedule:
        point = json.loads(eval_path(step).read_text())
        curve.append({"step": step, "epoch": point["epoch"], **summarize(point["records"])})
        if step == final_step:
            final = point["records"]
    return {"steps": steps, "epochs": settings.epochs_for(split), "samples": len(samples), "curve": curve,
            "final_step": final_step, "final": final}  # fmt: skip


def _train_with_evals(load, samples, settings: TrainSettings, seed, out_dir: Path, evaluate, steps, every, eval_path, description: str) -> None:
    """The training of finetune_with_curve, with an evaluation written to eval_path(step) at step 0 and every
    `every` steps. The model lives only in this frame, so it is freed when this returns."""
    train_cfg = TrainConfig(
        steps=steps, batch_size=settings.batch_size, lr=settings.lr, weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps, grad_accum=settings.grad_accum, max_grad_norm=settings.max_grad_norm,
        checkpoint_every=every, log_every=min(10, every), seed=seed, mixed_precision=settings.mixed_precision,
        epoch_batches=settings.step_rule == "epochs",
    )  # fmt: skip
    vlm = load()
    prepare(vlm, FinetuneConfig(method=settings.method, lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                lora_dropout=settings.lora_dropout, train=train_cfg))  # fmt: skip
    if settings.train_vision_tower:
        vision_tower(vlm.model).requires_grad_(True)

    def run_eval(step: int) -> dict[str, float]:
        vlm.model.eval()
        with torch.no_grad():
            records = evaluate(vlm)
        atomic_write_json(eval_path(step), {"step": step, "epoch": settings.epoch_at(step, len(samples)), "records": records})
        return summarize(records)

    if not eval_path(0).is_file():
        run_eval(0)
    vlm.model.train()
    train(vlm.model, vlm_loss, list(samples), train_cfg, out_dir / "train", collate_fn=patch_collate(vlm, settings.loss_on),
          description=description, eval_fn=lambda model, step: run_eval(step), eval_every=every)  # fmt: skip


def finetune_step(run: RunDir, step: str, load, samples, settings: TrainSettings, split: int, seed: int, evaluate) -> dict[str, Any]:
    """One fine-tuning as a step of the run folder (folder = the step's path): trained once, with its curve,
    then read back from result.json on later runs."""
    folder = run.path(*step.split("/"))
    if not run.done(step):
        result = finetune_with_curve(load, samples, settings, split, seed, folder, evaluate, description=step)
        atomic_write_json(folder / "result.json", result)
        run.finish(step)
    return json.loads((folder / "result.json").read_text())
