"""The paper's experiments on a built MIMIC benchmark, one function each (run by experiment.py, which owns the run
folder, the models and the resumable evaluations; every function here returns a JSON-able dict and draws its
figures under `figures`).

    flops_study         allowed query-key pairs and attention FLOPs of the block mask, measured on the
                        benchmark's own prompts and by the formula (mimic.md section 7)
    pooling_study       1-D vision-token pooling f = 1..16, and the pixel down/up-sampling control that keeps
                        the sequence length (section 8)
    stitching_study     the sample's images tiled into one canvas vs shown as N images (paper appendix)
    attention_study     inter- vs intra-image attention per layer (section 9)
    finetune_arm        LoRA (or full) fine-tuning on procedural MIMIC-style training data with the mask in a
                        given layer set, then evaluation under the same mask (section 6)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stitchkit.multiimage.benchmark import Benchmark, Sample
from stitchkit.multiimage.evaluate import LazyImages, sample_images, stratified_per_task, task_scores
from stitchkit.multiimage.imageops import encoder_side, resample_image, stitch_images
from stitchkit.multiimage.protocol import TASKS
from stitchkit.multiimage.scoring import TASK_COLORS

# Evaluate(vlm, tag, policy, pool, transform name, transform fn, max_per_task, description) -> results
Evaluate = Callable[..., dict]
LOG2_FACTOR = "log2 of the factor f (0: f=1, 4: f=16)"
# the reference's worked example (mimic.md section 7): LLaVA-OV geometry, 12 of 24 layers masked
REFERENCE_GEOMETRY = {"prefix": 20, "suffix": 30, "image_tokens": 730, "layers": 24, "masked": 12}


def probe_samples(samples: Sequence[Sample], per_task: int = 2) -> list[Sample]:
    """A few samples of every task, to measure sequence lengths without running the model."""
    return stratified_per_task(samples, per_task)


def sequence_stats(vlm, bench: Benchmark, samples: Sequence[Sample], transform=None) -> dict[str, float]:
    """Mean real tokens per prompt, vision tokens per prompt and per image, as the model encodes them now
    (pooling included): processing only, no forward."""
    total = vision = images = 0
    for sample in samples:
        pictures = sample_images(bench, sample)
        if transform is not None:
            pictures = transform(pictures, sample)
        batch = vlm.encode([pictures], [sample.prompt()])
        spans = batch.spans[0]
        total += int(batch.attention_mask.sum())
        vision += sum(len(span) for span in spans)
        images += len(spans)
    n = max(len(samples), 1)
    return {"sequence_length": total / n, "vision_tokens": vision / n, "vision_tokens_per_image": vision / max(images, 1)}


# ---- FLOPs --------------------------------------------------------------------------------------------------


def language_model_sizes(model) -> dict[str, int]:
    """Decoder layers L, hidden size d, and the language model's non-embedding parameters (the weights every
    token multiplies: attention projections and MLPs; the tied or separate output head is not counted)."""
    from stitchkit.vlm.attention import text_config_of
    from stitchkit.vlm.finetune import language_model

    config = text_config_of(model)
    lm = language_model(model)
    embeddings = sum(p.numel() for m in lm.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return {"layers": int(config.num_hidden_layers), "hidden_size": int(config.hidden_size),
            "non_embedding_params": sum(p.numel() for p in lm.parameters()) - embeddings}


def flops_reduction(dense_pairs: float, masked_pairs: float, tokens: float, sizes: dict[str, int],
                    masked_layers: int) -> dict:
    """Reductions of one masked layer set (mimic.md section 7), from allowed pairs E and real tokens S:
    per masked layer R = 1 - E_m / E_c; the attention core of the whole model R |M| / L; the whole language-model
    forward, where every layer adds 4 d E for QK^T and AV and 2 (non-embedding params) S covers the projections
    and MLPs (the vision tower is not counted)."""
    d, layers = sizes["hidden_size"], sizes["layers"]
    per_layer = 1 - masked_pairs / dense_pairs
    core_dense = layers * 4 * d * dense_pairs
    core_masked = core_dense - masked_layers * 4 * d * (dense_pairs - masked_pairs)
    other = 2 * sizes["non_embedding_params"] * tokens
    return {
        "masked_layers": masked_layers,
        "per_masked_layer": per_layer,
        "attention_core_model_wide": per_layer * masked_layers / layers,
        "whole_forward": 1 - (core_masked + other) / (core_dense + other),
        "attention_core_flops_dense": core_dense,
        "attention_core_flops_masked": core_masked,
        "forward_flops_dense": core_dense + other,
        "forward_flops_masked": core_masked + other,
    }


def formula_table(geometry: dict, layers: int, masked_layers: int, n_images: Sequence[int]) -> list[dict]:
    """E_c = S(S+1)/2 and E_m (mimic.md section 7) for N images of T tokens between P prefix and Q suffix tokens,
    with R = 1 - E_m / E_c per masked layer and R |M| / L model-wide."""
    from stitchkit.vlm.attention import causal_pairs, masked_pairs

    rows = []
    for n in n_images:
        seq = geometry["prefix"] + n * geometry["image_tokens"] + geometry["suffix"]
        e_c, e_m = causal_pairs(seq), masked_pairs(geometry["prefix"], n, geometry["image_tokens"], geometry["suffix"])
        rows.append({"n_images": n, "sequence_length": seq, "causal_pairs": e_c, "masked_pairs": e_m,
                     "per_masked_layer": 1 - e_m / e_c, "model_wide": (1 - e_m / e_c) * masked_layers / layers})
    return rows


def flops_study(vlm, bench: Benchmark, layer_sets: dict[str, list[int]], n_samples: int, formula_n: Sequence[int],
                seed: int = 0) -> dict:
    """Allowed pairs of dense and block-masked attention on `n_samples` seeded benchmark prompts (exact counts
    from their layouts, text between images included), the reductions of every layer set, and the formula
    table E_c, E_m at the benchmark's own geometry (P prefix, T tokens per image, Q suffix) for N images."""
    from stitchkit.vlm.attention import VisionLayout, layout_pairs

    sizes = language_model_sizes(vlm.model)
    multi = [s for s in bench.samples if s.n_images >= 2]
    picked = sorted(random.Random(f"flops:{seed}").sample(range(len(multi)), min(n_samples, len(multi))))
    dense = masked = tokens = 0
    prefix, suffix, block = [], [], []
    for i in picked:
        sample = multi[i]
        batch = vlm.encode([sample_images(bench, sample)], [sample.prompt()])
        layout = VisionLayout.build(batch.spans, batch.input_ids.shape[1])
        pairs = layout_pairs(layout, batch.attention_mask)
        dense, masked = dense + pairs[0], masked + pairs[1]
        real = int(batch.attention_mask.sum())
        pad = batch.input_ids.shape[1] - real  # rows are left-padded
        spans = batch.spans[0]
        tokens += real
        prefix.append(spans[0].start - pad)
        suffix.append(batch.input_ids.shape[1] - spans[-1].end)
        block += [len(span) for span in spans]
    n = max(len(picked), 1)
    geometry = {"prefix": round(sum(prefix) / n), "suffix": round(sum(suffix) / n),
                "image_tokens": round(sum(block) / max(len(block), 1))}
    measured = {
        "samples": len(picked), "mean_tokens": tokens / n, "mean_dense_pairs": dense / n, "mean_masked_pairs": masked / n,
        "layer_sets": {name: flops_reduction(dense / n, masked / n, tokens / n, sizes, len(layers))
                       for name, layers in layer_sets.items()} if picked else {},
    }

    half = sizes["layers"] - sizes["layers"] // 2
    return {
        "convention": "attention core F = 4 d E per layer (QK^T and AV, softmax ignored); whole forward adds "
                      "2 x non-embedding parameters x S for projections and MLPs; language model only",
        "model": sizes,
        "measured": measured,
        "geometry": geometry,
        "formula": formula_table(geometry, sizes["layers"], half, formula_n),
        "reference_formula": formula_table(REFERENCE_GEOMETRY, REFERENCE_GEOMETRY["layers"], REFERENCE_GEOMETRY["masked"],
                                           formula_n),
    }


# ---- sequence length: pooling and its pixel control ---------------------------------------------------------


def pooling_study(vlm, bench: Benchmark, evaluate: Evaluate, tag: str, policy: str, factors: Sequence[int],
                  pixel_control: bool, per_task: int | None, figures: Path, pool_pad: str = "exclude") -> dict:
    """Zero-shot 1-D average pooling of every image's vision tokens by f, and the control that removes the
    same information in pixel space but keeps every token (f = 1 is shared by both). pool_pad: how a short last
    group is averaged (VLM.pool_pad; "zeros" is the official code's)."""
    from stitchkit.report import line_plot

    samples = stratified_per_task(bench.samples, per_task)
    probes = probe_samples(samples)
    side = encoder_side(vlm)
    rows = []
    saved_pad, vlm.pool_pad = vlm.pool_pad, pool_pad
    try:
        for f in factors:
            vlm.pool_factor = f
            results = evaluate(vlm, tag, policy, f, "none", None, per_task, f"pooling f={f}")
            rows.append({"method": "token pooling", "factor": f, **sequence_stats(vlm, bench, probes),
                         **task_scores(results)})
    finally:
        vlm.pool_factor, vlm.pool_pad = 1, saved_pad
    if pixel_control:
        for f in factors:
            if f == 1:
                continue
            transform = pixel_transform(f, side)
            results = evaluate(vlm, tag, policy, 1, f"pixels{f}", transform, per_task, f"pixel control f={f}")
            rows.append({"method": "pixel down/up-sampling", "factor": f,
                         **sequence_stats(vlm, bench, probes, transform), **task_scores(results)})
    pooled = [r for r in rows if r["method"] == "token pooling"]
    # the best factor that pools at all (f = 1 is the unpooled run); None if only f = 1 was asked for
    best = max((r for r in pooled if r["factor"] > 1), key=lambda r: -1.0 if r["avg"] is None else r["avg"],
               default={"factor": None, "avg": None})
    # the control starts from the same unpooled point (f = 1 removes nothing)
    lines = {"token pooling": pooled,
             "pixel down/up-sampling": pooled[:1] + [r for r in rows if r["method"] != "token pooling"]}
    series = {name: ([math.log2(r["factor"]) for r in points], [100 * (r["avg"] or 0.0) for r in points])
              for name, points in lines.items() if len(points) > 1}
    figure_avg = line_plot(figures / "pooling_avg.png", series, xlabel=LOG2_FACTOR, ylabel="MIMIC Avg x100",
                           title="Sequence length: tokens pooled vs pixels removed")
    per_task_series = {t: ([math.log2(r["factor"]) for r in pooled], [100 * (r[t] or 0.0) for r in pooled])
                       for t in TASKS if t in pooled[0]}
    figure_tasks = line_plot(figures / "pooling_tasks.png", per_task_series, xlabel=LOG2_FACTOR,
                             ylabel="score x100", title="1-D token pooling, per task", colors=TASK_COLORS)
    return {"samples": len(samples), "max_per_task": per_task, "encoder_side": side, "pool_pad": pool_pad, "rows": rows,
            "best_factor": best["factor"], "unpooled_avg": pooled[0]["avg"], "best_avg": best["avg"],
            "figures": {"avg": figure_avg.name, "tasks": figure_tasks.name}}


def pixel_transform(factor: int, side: int | None):
    return lambda images, sample: [resample_image(im, factor, side) for im in images]


# ---- image stitching ---------------------------------------------------------------------------------------


def stitch_transform(side: int | None):
    def transform(images, sample):
        tile = side or max(max(im.size) for im in images)
        return [stitch_images(images, tile)]

    return transform


def stitching_study(vlm, bench: Benchmark, evaluate: Evaluate, tag: str, policy: str, per_task: int | None,
                    figures: Path) -> dict:
    """The same questions with the sample's N images tiled into one canvas (one image in the prompt) vs shown
    as N images; the vision-token counts of both are measured, not assumed."""
    from stitchkit.report import bar_plot

    samples = stratified_per_task(bench.samples, per_task)
    probes = probe_samples(samples)
    side = encoder_side(vlm)
    transform = stitch_transform(side)
    multi = evaluate(vlm, tag, policy, 1, "none", None, per_task, "multi-image")
    stitched = evaluate(vlm, tag, policy, 1, "stitch", transform, per_task, "stitched canvas")
    tokens = {"multi-image": sequence_stats(vlm, bench, probes),
              "stitched": sequence_stats(vlm, bench, probes, transform)}
    scores = {"multi-image": task_scores(multi), "stitched": task_scores(stitched)}
    by_n = {}
    for name, results in (("multi-image", multi), ("stitched", stitched)):
        for task, tables in results["breakdowns"].items():
            for row in tables.get("n_images", []):
                by_n.setdefault(task, {}).setdefault(row["n_images"], {})[name] = row["score"]
    groups = {t: {name: 100 * (scores[name][t] or 0.0) for name in scores}
              for t in [*TASKS, "avg"] if t in scores["multi-image"]}
    figure = bar_plot(figures / "stitching.png", groups, ylabel="score x100", title="N images vs one stitched canvas")
    return {"samples": len(samples), "max_per_task": per_task, "tile": side, "scores": scores, "tokens": tokens,
            "by_n_images": by_n,
            "figures": {"scores": figure.name}}


# ---- attention analysis ------------------------------------------------------------------------------------


def attention_samples(bench: Benchmark, n_images: int, count: int, seed: int) -> list[Sample]:
    """`count` seeded benchmark samples (any task) with exactly n_images images; fewer if the benchmark has fewer."""
    pool = [s for s in bench.samples if s.n_images == n_images]
    picked = sorted(random.Random(f"attention:{seed}:{n_images}").sample(range(len(pool)), min(count, len(pool))))
    return [pool[i] for i in picked]


class AnswerAttention:
    """Probe for the answer-to-image variant (mimic.md section 9, step 7): the attention of the last prompt token --
    the position whose output is the first answer token -- on every image block, head-averaged, per layer."""

    def __init__(self, spans, seq_len: int, num_layers: int):
        self.spans, self.last = spans, seq_len - 1
        self.mass = torch.zeros(len(spans), num_layers, max(len(s) for s in spans))

    def __call__(self, layer: int, probs: torch.Tensor, q0: int) -> None:
        q = self.last - q0
        if 0 <= q < probs.shape[2]:
            row = probs[:, :, q].mean(1).float().cpu()  # (B, S)
            for b, spans in enumerate(self.spans):
                for j, span in enumerate(spans):
                    self.mass[b, layer, j] = row[b, span.start : span.end].sum()


@torch.no_grad()
def answer_attention(vlm, samples: Sequence[tuple[list, str, Sample]]) -> dict:
    """Per layer, over samples whose evidence is in some but not all images: the share of the answer position's
    attention that lands on images, and the share of that image attention on the images holding the evidence
    (`target_positions`), against the share their tokens would get under uniform attention."""
    useful = [(images, prompt, s) for images, prompt, s in samples if 0 < len(s.target_positions) < s.n_images]
    if not useful:
        return {"samples": 0}
    image_mass, target_share, expected = [], [], []
    for images, prompt, sample in useful:
        batch = vlm.encode([images], [prompt])
        probe = AnswerAttention(batch.spans, batch.input_ids.shape[1], vlm.num_layers)
        vlm.forward(batch, probe=probe)
        mass = probe.mass[0, :, : sample.n_images]  # (L, N)
        total = mass.sum(-1)
        image_mass.append(total)
        target_share.append(mass[:, sample.target_positions].sum(-1) / total.clamp_min(1e-30))
        lengths = torch.tensor([len(span) for span in batch.spans[0]], dtype=torch.float)
        expected.append(float(lengths[sample.target_positions].sum() / lengths.sum()))
    return {"samples": len(useful), "image_mass": torch.stack(image_mass).mean(0).tolist(),
            "target_share": torch.stack(target_share).mean(0).tolist(),
            "uniform_target_share": sum(expected) / len(expected)}


def attention_study(models: Sequence[tuple[str, Callable[[], Any]]], bench: Benchmark, n_images: Sequence[int],
                    count: int, seed: int, figures: Path) -> dict:
    """A_l (mimic.md section 9) for every model on the same seeded samples, one figure of inter-image attention
    per layer for every N (and its density-corrected variant), and the answer-to-image attention. `models` are
    (name, loader) pairs, loaded one at a time; each is analysed under its own attention policy."""
    from stitchkit.report import line_plot
    from stitchkit.vlm.analysis import attention_analysis

    chosen = {n: attention_samples(bench, n, count, seed) for n in n_images}
    inputs = {n: [(sample_images(bench, s), s.prompt(), s) for s in samples] for n, samples in chosen.items() if samples}
    results: dict[str, dict] = {}
    for name, load in models:
        vlm = load()
        results[name] = {}
        for n, data in inputs.items():
            analysis = attention_analysis(vlm, [(images, prompt) for images, prompt, _ in data])
            results[name][str(n)] = {**analysis.to_dict(), "masked_layers": sorted(vlm.masked_layers),
                                     "answer": answer_attention(vlm, data)}
        del vlm
    figure_names = {}
    for n in inputs:
        for variant, key in (("inter", "inter"), ("inter_density", "density_intra")):
            series = {}
            for name, per_n in results.items():
                values = per_n[str(n)][key]
                values = values if key == "inter" else [1 - v for v in values]
                series[name] = (list(range(len(values))), values)
            title = f"{n} images: attention of vision tokens to other images"
            title += " (density-corrected)" if key != "inter" else ""
            path = line_plot(figures / f"attention_{variant}_N{n}.png", series, xlabel="decoder layer",
                             ylabel="inter-image share", title=title)
            figure_names[f"{variant}_N{n}"] = path.name
        answers = {name: per_n[str(n)]["answer"] for name, per_n in results.items() if per_n[str(n)]["answer"]["samples"]}
        if answers:
            series = {name: (list(range(len(a["target_share"]))), a["target_share"]) for name, a in answers.items()}
            uniform = next(iter(answers.values()))["uniform_target_share"]
            path = line_plot(figures / f"attention_answer_N{n}.png", series, xlabel="decoder layer",
                             ylabel="share of image attention on evidence", baseline=uniform,
                             baseline_label="uniform over image tokens",
                             title=f"{n} images: where the answer position looks")
            figure_names[f"answer_N{n}"] = path.name
    return {"samples": {str(n): len(s) for n, s in chosen.items()},
            "sample_ids": {str(n): [s.id for s in samples] for n, samples in chosen.items()},
            "models": results, "figures": figure_names}


# ---- masked-attention fine-tuning --------------------------------------------------------------------------


def training_samples(bench: Benchmark) -> list:
    """Procedural MIMIC-style training data: every sample of a benchmark built from the training source, as
    (images, the same prompt as at evaluation, the ground-truth answer); images are read when batched."""
    from stitchkit.vlm.finetune import Sample as TrainSample

    return [TrainSample(LazyImages(bench.image_paths(s)), s.prompt(), s.gt) for s in bench.samples]


def finetune_arm(vlm, samples: Sequence, layers: list[int], settings: dict, out: Path) -> dict:
    """Fine-tune `vlm` (in place; LoRA is merged afterwards) with the block mask in `layers` during training.
    A finished training in `out` is loaded, not repeated (the engine's rule)."""
    from stitchkit.engine import TrainConfig
    from stitchkit.vlm import AttentionPolicy
    from stitchkit.vlm.finetune import FinetuneConfig, finetune, merge_lora

    cfg = FinetuneConfig(method=settings["method"], lora_r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                         lora_dropout=settings["lora_dropout"], policy=AttentionPolicy(masked_layers=layers or "none"),
                         train=TrainConfig.model_validate(settings["train"]))
    started = time.perf_counter()
    result = finetune(vlm, samples, cfg, out)
    seconds = time.perf_counter() - started
    merge_lora(vlm)
    losses = result.losses
    tail = losses[-max(1, len(losses) // 10):]
    return {"masked_layers": layers, "steps": result.steps, "first_loss": losses[0] if losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None, "losses": losses, "train_seconds": seconds,
            "resumed_from": result.resumed_from}


def finetune_figures(before: dict, arms: dict[str, dict], figures: Path) -> dict:
    from stitchkit.report import bar_plot, line_plot

    models = {"base (before)": before,
              **{f"masked {a}" if a != "none" else "no mask": r["scores"] for a, r in arms.items()}}
    groups = {t: {m: 100 * (s.get(t) or 0.0) for m, s in models.items()} for t in [*TASKS, "avg"]}
    bars = bar_plot(figures / "finetune_scores.png", groups, ylabel="score x100", title="MIMIC after masked fine-tuning")
    curves = {}
    for arm, r in arms.items():
        losses = r["losses"]
        if losses:
            step = max(1, len(losses) // 100)
            curves[arm] = (list(range(0, len(losses), step)), losses[::step])
    loss = line_plot(figures / "finetune_loss.png", curves, xlabel="step", ylabel="training loss",
                     title="fine-tuning loss by masked layer set")
    return {"scores": bars.name, "loss": loss.name}
