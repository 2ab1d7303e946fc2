"""Run a VLM on a built MIMIC benchmark: batched greedy generation, resumable, then the scorer's report.

    vlm, model_id = load_model("micro")                  # or a hub id / local folder
    vlm.policy = attention_policy("masked:12-23", vlm.num_layers)
    results = evaluate(vlm, load_benchmark(DIR), OUT, settings={"model": model_id, ...})

Every sample is shown as in the official runs: its images first, then `sample.prompt()`, greedy decoding,
16 new tokens (Listing 32). Samples are grouped by (task, number of images) so a batch holds prompts of one
length and one generation budget. After every batch its predictions are appended to OUT/predictions.jsonl
in one write (flushed and synced); a killed evaluation, re-run with the same settings, drops a torn last
line and continues with the samples that have no prediction. Scoring then writes results.json, report.md,
per_sample.jsonl and figures/ (scoring.write_score_report), in both scoring modes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

from stitchkit.errors import ConfigError, InputError
from stitchkit.multiimage.benchmark import Benchmark, Sample
from stitchkit.multiimage.protocol import GENERATION_MAX_NEW_TOKENS, TASKS
from stitchkit.multiimage.scoring import TASK_COLORS, describe_evaluation, score_predictions, write_score_report

PREDICTIONS_FILE = "predictions.jsonl"
# named layer sets of the masking study (mimic.md section 6; Table 5 right): what "masked:NAME" means
LAYER_SETS = ("none", "all", "first_half", "second_half")

ImageTransform = Callable[[list, Sample], list]


# ---- models and policies ----------------------------------------------------------------------------------


def masked_layer_list(name: str, num_layers: int, legacy_layer_loop: bool = False) -> list[int]:
    """The decoder layers a named layer set masks: none, all, first_half (0 .. L/2-1), second_half
    (floor(L/2) .. L-1, MIMIC's best setting), or a range string such as "12-23" or "0-3,8". legacy_layer_loop:
    the layers the official decoder loop actually masks (AttentionPolicy.legacy_layer_loop)."""
    from stitchkit.vlm import AttentionPolicy

    half = num_layers // 2
    named = {"none": [], "all": list(range(num_layers)), "first_half": list(range(half)),
             "second_half": list(range(half, num_layers)), "default": list(range(half, num_layers))}
    listed = named[name] if name in named else name
    return sorted(AttentionPolicy(masked_layers=listed, legacy_layer_loop=legacy_layer_loop).layers(num_layers))


def check_policy_spec(spec: str) -> str:
    """Validate `dense | masked | masked:LAYERS` before a model is loaded; returns the LAYERS part ("none" for
    dense, "second_half" for a bare "masked")."""
    from stitchkit.vlm import parse_layer_spec

    kind, _, layers = spec.partition(":")
    if kind == "dense" and not layers:
        return "none"
    if kind != "masked":
        raise ConfigError(f"--policy {spec!r}: expected dense, masked or masked:LAYERS (e.g. masked:12-23, masked:all)")
    layers = layers or "second_half"
    if layers not in (*LAYER_SETS, "default"):
        parse_layer_spec(layers)  # raises ConfigError with the reason
    return layers


def attention_policy(spec: str, num_layers: int, legacy_layer_loop: bool = False, legacy_maxlen_fallback: int | None = None):
    """An AttentionPolicy from `dense | masked | masked:LAYERS` for a model with `num_layers` decoder layers, with
    the official code's quirks if asked (AttentionPolicy.legacy_layer_loop, legacy_maxlen_fallback)."""
    from stitchkit.vlm import AttentionPolicy

    layers = masked_layer_list(check_policy_spec(spec), num_layers, legacy_layer_loop)
    return AttentionPolicy(masked_layers=layers or "none", legacy_maxlen_fallback=legacy_maxlen_fallback)


def load_model(spec: str, device: str = "auto", dtype: str = "auto"):
    """(VLM, model identity) for a micro VLM spec (`micro`, `micro:RECIPE`), a hub id or a local folder."""
    import torch

    from stitchkit.engine.devices import pick_device
    from stitchkit.vlm import load_vlm
    from stitchkit.vlm.micro import resolve_vlm

    source, identity = resolve_vlm(spec)
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    vlm = load_vlm(source, dtype=torch_dtype, device=pick_device(device))
    return vlm, identity


def default_threads(spec: str, device: str) -> int | None:
    """One CPU thread for the micro VLM on a CPU: its matrices are tiny, and on a busy machine OpenMP threads of
    small ops spin waiting for each other (vlm/micro.py measured 10 s per step with 2 threads, 0.7 s with 1)."""
    from stitchkit.engine.devices import pick_device
    from stitchkit.vlm.micro import is_micro_spec

    return 1 if is_micro_spec(spec) and pick_device(device).type == "cpu" else None


# ---- samples and images -----------------------------------------------------------------------------------


def stratified_per_task(samples: Sequence[Sample], per_task: int | None) -> list[Sample]:
    """At most `per_task` samples of every task (all if None), spread over the task's grid cells: one sample of
    each cell in turn (round robin), the cells in `spread_order`, each cell's samples in benchmark order; returned
    in benchmark order. Deterministic. A prefix would not do: the generator walks the cells in nested-loop order,
    so a task's first N samples hold only the first values of its outer controls (all balanced, k = 1, s <= 2)."""
    if per_task is None:
        return list(samples)
    cells: dict[str, dict[str, list[int]]] = {}
    for position, sample in enumerate(samples):
        cells.setdefault(sample.task, {}).setdefault(sample.cell, []).append(position)
    chosen: list[int] = []
    for by_cell in cells.values():
        queues = [by_cell[cell] for cell in spread_order(list(by_cell))]
        picked: list[int] = []
        for depth in range(max(len(queue) for queue in queues)):
            picked += [queue[depth] for queue in queues if depth < len(queue)]
        chosen += picked[:per_task]
    return [samples[position] for position in sorted(chosen)]


def spread_order(cells: Sequence[str]) -> list[str]:
    """Grid cells reordered so that every prefix spreads over the values of every control: the next cell is the
    one whose values -- the "_"-separated parts of its key, e.g. "unbalanced", "k2", "s3", "d8" -- were used least
    so far (ties: generator order)."""
    from collections import Counter

    used: Counter[str] = Counter()
    left, order = list(cells), []
    while left:
        cell = min(left, key=lambda key: sum(used[part] for part in key.split("_")))
        left.remove(cell)
        order.append(cell)
        used.update(cell.split("_"))
    return order


def generation_batches(samples: Sequence[Sample], batch_size: int, max_images: int | None = None) -> list[list[Sample]]:
    """Batches of samples with the same task and number of images (one prompt length, one token budget),
    in a fixed order: task order, then N, then sample order. `max_images` caps the images of a batch (a 35-image
    MIMIC prompt is ~25k LLaVA-OV tokens), so batches of long prompts hold fewer of them."""
    order = {t: i for i, t in enumerate(TASKS)}
    ranked = sorted(enumerate(samples), key=lambda p: (order[p[1].task], p[1].n_images, p[0]))
    batches = []
    for (_, n_images), group in groupby((s for _, s in ranked), key=lambda s: (s.task, s.n_images)):
        group = list(group)
        size = batch_size if max_images is None else max(1, min(batch_size, max_images // max(n_images, 1)))
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    return batches


def sample_images(bench: Benchmark, sample: Sample) -> list:
    from stitchkit.data import load_image

    return [load_image(path) for path in bench.image_paths(sample)]


class LazyImages(Sequence):
    """A sample's images, read from disk when indexed: training sets of thousands of multi-image samples are
    not held in memory."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from stitchkit.data import load_image

        if isinstance(i, slice):
            return [load_image(p) for p in self.paths[i]]
        return load_image(self.paths[i])


# ---- the prediction log -----------------------------------------------------------------------------------


class PredictionLog:
    """OUT/predictions.jsonl: one {"id", "prediction", "benchmark"} line per sample, appended one batch per write.
    "benchmark" is the fingerprint of the benchmark the prediction was made on (Benchmark.fingerprint): sample
    ids repeat in every build, so it is what tells `mimic score` (and a resumed evaluation) that a file belongs to
    another benchmark. Lines without one (written before it existed) are read as they are."""

    def __init__(self, path: str | os.PathLike, fingerprint: str | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[str, str] = {}
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # a batch torn by a kill: its complete lines stay, the torn one goes
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
                self.done[str(record["id"])] = str(record["prediction"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{self.path}:{number}: corrupt prediction line; delete the file to start over") from None
            made_on = record.get("benchmark")
            if fingerprint and made_on and made_on != fingerprint:
                raise InputError(f"{self.path} holds predictions made on another benchmark (fingerprint "
                                 f"{str(made_on)[:12]}, this one's {fingerprint[:12]}): the benchmark was rebuilt "
                                 "since; choose another --out folder or delete this one")

    def append(self, records: list[dict[str, Any]]) -> None:
        stamped = [{**r, "benchmark": self.fingerprint} if self.fingerprint else r for r in records]
        data = "".join(json.dumps(r) + "\n" for r in stamped).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.done[r["id"]] = r["prediction"]


# ---- evaluation -------------------------------------------------------------------------------------------


def evaluate(
    vlm,
    bench: Benchmark,
    out: str | os.PathLike,
    *,
    settings: dict[str, Any],
    samples: Sequence[Sample] | None = None,
    batch_size: int = 8,
    max_images_per_batch: int | None = None,
    transform: ImageTransform | None = None,
    legacy_official: bool = False,
    description: str = "MIMIC eval",
    command: str | None = None,
) -> dict:
    """Generate (resumably) and score `samples` (default: the whole benchmark) with the VLM as it is set up
    (policy, pooling). `settings` must name everything that changes the predictions (model, policy, pooling,
    image transform, sample selection): a folder holding predictions made with other settings is refused.
    `transform(images, sample)` changes a sample's PIL images before the model sees them (the studies'
    controls). The prompt is the official one (`sample.prompt(legacy=True)`) when scoring legacy_official, the
    clean one otherwise (they differ only for a Listing question that ends in "?"). A finished folder is not
    evaluated again: its results are returned."""
    from stitchkit.progress import make_progress
    from stitchkit.runs import RunDir

    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    samples = list(bench.samples if samples is None else samples)
    if not samples:
        raise InputError(f"{bench.root}: no samples to evaluate")
    run = RunDir(out, config=settings, command=command)
    mode = "legacy_official" if legacy_official else "clean"
    log = PredictionLog(run.root / PREDICTIONS_FILE, bench.fingerprint)  # refuses predictions of another benchmark
    if run.done("eval") and (run.root / "results.json").is_file():
        results = json.loads((run.root / "results.json").read_text())
        if results["mode"] == mode and "answers" in results:
            return results  # else: re-score the stored predictions (other mode, older format); nothing is generated
    todo = [s for s in samples if s.id not in log.done]
    started, generated = time.perf_counter(), 0
    with make_progress() as progress:
        bar = progress.add_task(description, total=len(samples), completed=len(samples) - len(todo), status="")
        for batch in generation_batches(todo, batch_size, max_images_per_batch):
            images = [sample_images(bench, s) for s in batch]
            if transform is not None:
                images = [transform(ims, s) for ims, s in zip(images, batch)]
            prompts = [s.prompt(legacy=legacy_official) for s in batch]
            answers = vlm.generate(images, prompts, max_new_tokens=GENERATION_MAX_NEW_TOKENS[batch[0].task])
            log.append([{"id": s.id, "prediction": a} for s, a in zip(batch, answers)])
            generated += len(batch)
            progress.update(bar, advance=len(batch), status=f"{batch[0].task} N={batch[0].n_images}")
    seconds = time.perf_counter() - started

    subset = bench.subset(samples)
    predictions = {s.id: log.done[s.id] for s in samples}
    rows, results = score_predictions(subset, predictions, mode)
    other = score_predictions(subset, predictions, "clean" if legacy_official else "legacy_official")[1]
    results[other["mode"]] = {"tasks": {t: m["score"] for t, m in other["tasks"].items()},
                              "mimic_avg": other["mimic_avg"]}
    results["answers"] = answer_statistics(samples, predictions, mode, subset.vocabulary() if mode == "clean" else None)
    results["eval"] = {**settings, "batch_size": batch_size, "max_images_per_batch": max_images_per_batch,
                       "generated_now": generated, "seconds_now": seconds,
                       "samples_per_second": generated / seconds if generated else None}
    write_score_report(run.root, rows, results)
    run.finish("eval", samples=len(samples))
    return json.loads((run.root / "results.json").read_text())


def answer_statistics(samples: Sequence[Sample], predictions: dict[str, str], mode: str, vocab) -> dict:
    """Context a score needs, per task: the share of the most common (normalised) answer -- a model that always
    says the same thing scores whatever that answer is worth, and its trends across controls are artefacts of
    the ground-truth mix -- and the score of the best constant answer among the 10 most common ground truths,
    the floor a model that ignores the images can reach."""
    from collections import Counter

    from stitchkit.multiimage.protocol import aggregate, normalize, score_sample

    out: dict[str, dict] = {"top_answer_share": {}, "top_answer": {}, "constant_answer_score": {}, "constant_answer": {}}
    for task in TASKS:
        rows = [s for s in samples if s.task == task]
        if not rows:
            continue
        answers = Counter(normalize(predictions.get(s.id, "")) for s in rows)
        answer, count = answers.most_common(1)[0]
        out["top_answer"][task], out["top_answer_share"][task] = answer, count / len(rows)
        best = (None, -1.0)
        for candidate, _ in Counter(s.gt for s in rows).most_common(10):
            score = aggregate(task, [score_sample(s.to_dict(), candidate, mode, vocab) for s in rows], mode)["score"]
            best = max(best, (candidate, score), key=lambda pair: pair[1])
        out["constant_answer"][task], out["constant_answer_score"][task] = best
    return out


def task_scores(results: dict) -> dict[str, float | None]:
    """{task: headline score, ..., "avg": MIMIC Avg} of one evaluation's results."""
    return {**{t: m["score"] for t, m in results["tasks"].items()}, "avg": results["mimic_avg"]}


def eval_command(
    model: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    policy: str = "dense",
    pools: Sequence[int] = (1,),
    batch_size: int = 8,
    max_per_task: int | None = None,
    legacy_official: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    max_images_per_batch: int | None = None,
    command: str | None = None,
    legacy_layer_loop: bool = False,
    legacy_maxlen_fallback: int | None = None,
    pool_pad: str = "exclude",
) -> Path:
    """`stitchkit mimic eval`. One pooling factor: OUT holds the evaluation. Several: OUT/pool<F>/ each, and
    OUT/results.json + report.md + figures/score_vs_pool_factor.png across every pool<F>/ in OUT; a later call
    with the same shared settings (one factor or several) adds its factors there. max_per_task: a stratified
    subset (stratified_per_task). pool_pad: VLM.pool_pad, how a short last pooling group is averaged ("zeros":
    the official code's zero-padded tail)."""
    from stitchkit.engine.devices import torch_threads
    from stitchkit.multiimage.benchmark import load_benchmark
    from stitchkit.runs import RunDir
    from stitchkit.vlm.pooling import check_pool_factor

    check_policy_spec(policy)  # a bad --policy fails before the model loads
    pools = list(dict.fromkeys(pools or [1]))
    for f in pools:
        check_pool_factor(f)
    check_pool_pad(pool_pad)
    bench = load_benchmark(data)
    samples = stratified_per_task(bench.samples, max_per_task)
    threads = threads if threads is not None else default_threads(model, device)
    with torch_threads(threads):
        vlm, identity = load_model(model, device, dtype)
        vlm.policy = attention_policy(policy, vlm.num_layers, legacy_layer_loop, legacy_maxlen_fallback)
        vlm.pool_pad = pool_pad
        # the quirks enter the settings only when on, so folders evaluated before they existed still resume
        quirks = {"legacy_layer_loop": legacy_layer_loop, "legacy_maxlen_fallback": legacy_maxlen_fallback,
                  "pool_pad": pool_pad if pool_pad != "exclude" else None}
        quirks = {k: v for k, v in quirks.items() if v}
        # a subset says how it was drawn: a folder evaluated on a prefix (before stratified_per_task) is refused
        subset = {"subset": "stratified"} if max_per_task is not None else {}
        shared = {"model": identity, "data": str(Path(data).resolve()), "policy": policy, "max_per_task": max_per_task,
                  **subset, **quirks}
        several = len(pools) > 1 or holds_pool_factors(Path(out))
        if several:  # OUT is a run folder of its own (manifest, config); more factors may join it later
            RunDir(out, config=shared, command=command)
        for f in pools:
            vlm.pool_factor = f
            folder = Path(out) / f"pool{f}" if several else Path(out)
            settings = {**shared, "masked_layers": sorted(vlm.masked_layers), "pool_factor": f, "pool_pad": vlm.pool_pad,
                        "transform": "none"}
            evaluate(vlm, bench, folder, settings=settings, samples=samples, batch_size=batch_size,
                     max_images_per_batch=max_images_per_batch, legacy_official=legacy_official,
                     description=f"MIMIC eval (pool {f})", command=command)
    if several:
        write_pool_summary(Path(out), "legacy_official" if legacy_official else "clean")
    return Path(out)


def holds_pool_factors(out: Path) -> bool:
    """Whether OUT is a folder of several pooling factors (its manifest holds the settings they share, no pool
    factor), which a later call with a single --pool joins as OUT/pool<F>/."""
    try:
        config = json.loads((out / "manifest.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(config, dict) and "pool_factor" not in config


def check_pool_pad(pool_pad: str) -> str:
    """A --pool-pad typo fails before the model loads (VLM.pool_pad itself takes any string)."""
    from typing import get_args

    from stitchkit.vlm.pooling import PoolPad

    if pool_pad not in get_args(PoolPad):
        raise ConfigError(f"--pool-pad {pool_pad!r}: choose {' or '.join(get_args(PoolPad))}")
    return pool_pad


def pool_evaluations(out: Path) -> dict[int, dict]:
    """{factor: results} of every scored OUT/pool<F>/, in factor order: whatever call evaluated it."""
    runs = {}
    for folder in out.glob("pool*"):
        factor = folder.name.removeprefix("pool")
        if factor.isdigit() and (folder / "results.json").is_file():
            runs[int(factor)] = json.loads((folder / "results.json").read_text())
    return dict(sorted(runs.items()))


def scores_in_mode(results: dict, mode: str) -> dict[str, float | None] | None:
    """task_scores of an evaluation in `mode`: its headline scores, or the other mode's that it stores as well."""
    if results["mode"] == mode:
        return task_scores(results)
    other = results.get(mode)
    return {**other["tasks"], "avg": other["mimic_avg"]} if other else None


def write_pool_summary(out: Path, mode: str) -> None:
    """OUT/results.json, report.md and figures/score_vs_pool_factor.png over every pool<F>/ in OUT, in `mode`."""
    from stitchkit.report import line_plot, markdown_table
    from stitchkit.runs import atomic_write_json, atomic_write_text

    runs = pool_evaluations(out)
    rows = [{"pool_factor": f, **scores} for f, results in runs.items()
            if (scores := scores_in_mode(results, mode)) is not None]
    tasks = [t for t in TASKS if any(r.get(t) is not None for r in rows)]
    xs = [math.log2(r["pool_factor"]) for r in rows]
    series = {name: (xs, [100 * r[name] if r.get(name) is not None else float("nan") for r in rows])
              for name in [*tasks, "avg"]}
    figure = line_plot(out / "figures" / "score_vs_pool_factor.png", series,
                       xlabel="log2 of the pooling factor f", ylabel="score x100",
                       title=f"MIMIC vs 1-D token pooling ({mode})", colors=TASK_COLORS)
    settings = next(iter(runs.values()))["eval"]
    described = describe_evaluation(settings)
    atomic_write_json(out / "results.json", {"model": settings["model"], "policy": settings["policy"],
                                             "masked_layers": settings.get("masked_layers"), "mode": mode,
                                             "pool_factors": rows,
                                             "runs": {f"pool{r['pool_factor']}": f"pool{r['pool_factor']}/results.json"
                                                      for r in rows},
                                             "figures": {"pool_factor": str(figure.relative_to(out))}})
    table = [{k: (100 * v if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    header = "; ".join(text for part, text in described.items() if part != "pooling")
    atomic_write_text(out / "report.md", f"# MIMIC vs pooling factor ({mode})\n\n{header[0].upper()}{header[1:]}; "
                      "scores x100 (listing: micro F1).\n\n" + markdown_table(table, digits=1)
                      + f"\n![score vs pooling factor]({figure.relative_to(out)})\n")
