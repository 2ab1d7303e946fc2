"""Score predictions on a built MIMIC benchmark: task metrics, breakdowns by every control variable, a report.

Predictions are a JSONL file of {"id": sample id, "prediction": generated text}, so any model -- ours, an
lmms-eval run, a hand-written baseline -- can be scored; `mimic eval` adds "benchmark", the fingerprint of the
benchmark they were made on, and a file made on another benchmark is refused. A sample without a prediction is
scored as an empty answer (wrong) and counted in `missing`. Values are stored in [0, 1] and shown x100 in
report.md; every header names the scoring mode, and only `legacy_official` on the whole released data
(official.py) is comparable with the paper's numbers.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from stitchkit.errors import InputError
from stitchkit.multiimage.benchmark import CONTROLS, DERIVED_CONTROLS, Benchmark, load_benchmark
from stitchkit.multiimage.protocol import TASKS, aggregate, mimic_average, score_sample

# the figures the issue asks for: headline score against each of these controls, one line per task
FIGURE_VARIABLES = {"spread": "information spread s", "n_distractors": "distractor images D",
                    "n_images": "number of images N", "k": "concepts k"}
# one colour per task in every MIMIC figure, whichever tasks a figure holds ("avg": the MIMIC Avg)
TASK_COLORS = {"counting": "tab:blue", "listing": "tab:orange", "common": "tab:green", "oddone": "tab:red",
               "avg": "black"}


def read_predictions(path: str | os.PathLike, fingerprint: str | None = None) -> tuple[dict[str, str], int]:
    """({sample id: prediction}, the number of lines without a benchmark fingerprint) from JSONL lines
    {"id": ..., "prediction": ...}; a bad line names its number. Sample ids are the same in every build, so a file
    made on another benchmark would score plausibly and wrongly: a line whose "benchmark" (written by `mimic eval`)
    is not `fingerprint` (Benchmark.fingerprint) is refused. Lines without one -- other tools' files, evaluations
    made before it existed -- cannot be checked and are counted."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"predictions file not found: {path}")
    predictions: dict[str, str] = {}
    unchecked = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "id" not in record or "prediction" not in record:
            raise InputError(f"{path}:{number}: expected an object with \"id\" and \"prediction\"")
        if not isinstance(record["prediction"], str):
            raise InputError(f"{path}:{number}: \"prediction\" must be a string")
        made_on = record.get("benchmark")
        if made_on is None:
            unchecked += 1
        elif fingerprint is not None and made_on != fingerprint:
            raise InputError(f"{path}:{number}: these predictions were made on another benchmark (fingerprint "
                             f"{str(made_on)[:12]}; this benchmark's is {fingerprint[:12]}): score them against the "
                             "benchmark they were evaluated on")
        sample_id = str(record["id"])
        if sample_id in predictions:
            raise InputError(f"{path}:{number}: duplicate prediction for sample {sample_id}")
        predictions[sample_id] = record["prediction"]
    return predictions, unchecked


def scoring_mode(bench: Benchmark, legacy_official: bool | None = None) -> str:
    """The mode to score `bench` in: as asked, else the benchmark's default (clean; legacy_official for the
    released data). A mode its records cannot support is one clear error, before any model runs."""
    if legacy_official is None:
        return bench.scoring_modes[0]
    mode = "legacy_official" if legacy_official else "clean"
    bench.check_scoring_mode(mode)
    return mode


def score_predictions(bench: Benchmark, predictions: dict[str, str], mode: str = "clean") -> tuple[list[dict], dict]:
    """(per-sample rows, results) for every sample of `bench`. In a mode the benchmark's records cannot support
    (clean on the released data) no rows and no task scores, with the reason under `unsupported`: evaluations
    store both modes, and a score that cannot be computed is left empty, never guessed."""
    known = bench.by_id()
    unknown = [i for i in predictions if i not in known]
    if unknown:
        raise InputError(f"{len(unknown)} prediction id(s) are not in the benchmark, e.g. {', '.join(unknown[:3])}")
    released = bool(bench.meta.get("released_data"))
    about = {"mode": mode, "benchmark": str(bench.root), "benchmark_fingerprint": bench.fingerprint,
             "released_data": released, **({"released_source": bench.meta.get("source")} if released else {})}
    if mode not in bench.scoring_modes:
        return [], {**about, "n_samples": len(bench.samples),
                    "missing": sum(s.id not in predictions for s in bench.samples),
                    "unsupported": bench.meta.get("scoring_note"), "tasks": {}, "mimic_avg": None, "breakdowns": {}}
    vocab = bench.vocabulary() if mode == "clean" else None
    rows = []
    for sample in bench.samples:
        record = sample.to_dict()
        prediction = predictions.get(sample.id)
        score = score_sample(record, prediction or "", mode, vocab)
        rows.append({"id": sample.id, "task": sample.task, "prediction": prediction, "gt": sample.gt,
                     **{c: record[c] for c in CONTROLS}, "cell": sample.cell, "score": score})
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    tasks = {task: aggregate(task, [r["score"] for r in by_task[task]], mode) for task in TASKS if by_task[task]}
    results = {
        **about,
        "n_samples": len(rows),
        "missing": sum(r["prediction"] is None for r in rows),
        "tasks": tasks,
        "mimic_avg": mimic_average({t: m["score"] for t, m in tasks.items()}),
        "breakdowns": {task: breakdowns(task, by_task[task], mode) for task in tasks},
    }
    return rows, results


def breakdowns(task: str, rows: list[dict], mode: str) -> dict[str, list[dict]]:
    """For every control variable that takes more than one value in this task and is not derived from another
    one (DERIVED_CONTROLS: common's s is N): one row per value."""
    out = {}
    for variable in (*CONTROLS, "cell"):
        if variable in DERIVED_CONTROLS.get(task, ()):
            continue
        groups: dict[Any, list[dict]] = defaultdict(list)
        for row in rows:
            groups[row[variable]].append(row["score"])
        if len(groups) < 2:
            continue
        out[variable] = [{variable: value, **aggregate(task, groups[value], mode)}
                         for value in sorted(groups, key=lambda v: (v is None, str(type(v)), v))]
    return out


def write_score_report(out: str | os.PathLike, rows: list[dict], results: dict) -> Path:
    """results.json, per_sample.jsonl, report.md and figures/*.png under `out`."""
    from stitchkit.report import line_plot, markdown_table
    from stitchkit.runs import atomic_write_json, atomic_write_text

    out = Path(out)
    figures = {}
    for variable, label in FIGURE_VARIABLES.items():
        series = {}
        for task, table in results["breakdowns"].items():
            points = [(r[variable], r["score"]) for r in table.get(variable, []) if r["score"] is not None]
            if len(points) >= 2:
                series[task] = ([x for x, _ in points], [100 * y for _, y in points])
        if series:
            # a lone task is named in the title too
            title = f"MIMIC ({results['mode']})" + (f": {next(iter(series))}" if len(series) == 1 else "")
            path = line_plot(out / "figures" / f"score_vs_{variable}.png", series, xlabel=label,
                             ylabel="score x100 (accuracy; listing F1)", title=title, colors=TASK_COLORS)
            figures[variable] = str(path.relative_to(out))
    results = {**results, "figures": figures}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "per_sample.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def pct(table: list[dict], keys: tuple[str, ...]) -> list[dict]:
        return [{k: (100 * v if k in keys and v is not None else v) for k, v in r.items()} for r in table]

    score_keys = ("score", "precision", "recall", "f1", "macro_f1", "class_accuracy", "contains",
                  "legacy_substring", "unparsed_rate", "multi_number_rate")
    lines = [f"# MIMIC scores ({results['mode']})\n",
             f"Benchmark `{results['benchmark']}`, {results['n_samples']} samples, scoring mode "
             f"**{results['mode']}** (scores x100; listing: micro F1). {comparability(results)}\n"]
    if results.get("eval"):
        described = describe_evaluation(results["eval"])
        lines.append("Evaluated with " + "; ".join(described.values()) + ".\n")
    if results["missing"]:
        lines.append(f"**{results['missing']} samples had no prediction and were scored as wrong.**\n")
    headline = [{"task": t, **m} for t, m in results["tasks"].items()]
    columns = list(dict.fromkeys(["task", "n", "score", *(k for row in headline for k in row)]))
    lines.append(markdown_table(pct(headline, score_keys), columns=columns, digits=1))
    if "mae" in columns:
        lines.append("\n(mae: mean absolute count error, in instances; every other column x100.)\n")
    if results["mimic_avg"] is not None:
        lines.append(f"\nMIMIC Avg (mean of common, counting, odd-one accuracy and listing F1): "
                     f"**{100 * results['mimic_avg']:.1f}**\n")
    for variable, path in figures.items():
        lines.append(f"\n![score vs {variable}]({path})\n")
    for task, tables in results["breakdowns"].items():
        lines.append(f"\n## {task}: breakdowns\n")
        for variable, table in tables.items():
            keep = (variable, "n", "score", *(("precision", "recall") if task == "listing" else ()))
            lines.append(f"\n### by {variable}\n\n"
                         + markdown_table(pct([{k: r.get(k) for k in keep} for r in table], score_keys), digits=1))
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out


def layer_span(layers: list[int]) -> str:
    """Masked decoder layers as read by a person: "2-3" for a contiguous run, the list otherwise, "none"."""
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def describe_evaluation(settings: dict) -> dict[str, str]:
    """What made an evaluation's predictions, from its settings (results["eval"]), in words: model, attention
    policy and the layers it masks, pooling, image transform, samples, the official code's quirks if on."""
    per_task = settings.get("max_per_task")
    factor = settings.get("pool_factor") or 1
    policy = f"policy `{settings.get('policy')}`"
    if settings.get("policy") != "dense":
        policy += f" (masked layers {layer_span(settings.get('masked_layers') or [])})"
    tag = settings.get("model_tag")  # mimic run: base, or the fine-tuning arm
    parts = {
        "model": f"model `{settings.get('model')}`" + (f" ({tag})" if tag else ""),
        "policy": policy,
        "pooling": f"pool factor {factor}" + (f", pad {settings.get('pool_pad') or 'exclude'}" if factor > 1 else ""),
        "samples": (f"a stratified subset of at most {per_task} samples per task (round robin over the grid cells)"
                    if per_task else "every sample"),
    }
    if settings.get("transform") not in (None, "none"):
        parts["transform"] = f"images transformed: {settings['transform']}"
    quirks = [name for name in ("legacy_layer_loop", "legacy_maxlen_fallback") if settings.get(name)]
    if quirks:
        parts["quirks"] = "official quirks " + ", ".join(f"{q}={settings[q]}" for q in quirks)
    return parts


def comparability(results: dict) -> str:
    """Whether the paper's numbers compare: that needs its scorer and its data -- the whole released benchmark,
    every sample answered, the images as released."""
    if results["mode"] != "legacy_official":
        return "Not the paper's scorer: use --legacy-official to compare with published numbers."
    if not results.get("released_data"):
        return ("The paper's scorer on a benchmark built here: comparable with the paper's numbers in scorer, not in "
                "data (`stitchkit mimic import-official` brings the released data).")
    reasons = not_the_full_release(results)
    if reasons:
        return (f"The paper's scorer on part of the released data ({'; '.join(reasons)}): not comparable with the "
                "paper's table.")
    return "The paper's scorer on the whole released data: comparable with the paper's numbers."


def not_the_full_release(results: dict) -> list[str]:
    """Why scores on the released data are not the paper's whole-set numbers (empty if they are): an import
    limit, tasks left out, a max_per_task subset, changed images, samples without a prediction."""
    reasons = []
    limit = (results.get("released_source") or {}).get("limit")
    if limit:
        reasons.append(f"imported with limit {limit}")
    absent = [t for t in TASKS if t not in results["tasks"]]
    if absent:
        reasons.append(f"no {', '.join(absent)} samples")
    settings = results.get("eval") or {}
    if settings.get("max_per_task"):
        reasons.append(f"a subset of at most {settings['max_per_task']} samples per task")
    if settings.get("transform") not in (None, "none"):
        reasons.append(f"images transformed ({settings['transform']})")
    if results["missing"]:
        reasons.append(f"{results['missing']} of {results['n_samples']} samples without a prediction")
    return reasons


def score_benchmark_dir(data: str | os.PathLike, predictions: str | os.PathLike, out: str | os.PathLike,
                        legacy_official: bool | None = None, command: str | None = None) -> Path:
    """`stitchkit mimic score`: read DIR and the predictions, write the report folder. legacy_official None: the
    benchmark's own default mode."""
    from stitchkit.runs import RunDir

    bench = load_benchmark(data)
    mode = scoring_mode(bench, legacy_official)
    preds, unchecked = read_predictions(predictions, bench.fingerprint)
    if unchecked:
        print(f"note: {unchecked} line(s) of {predictions} carry no benchmark fingerprint (`stitchkit mimic eval` "
              f"writes one), so they cannot be checked against {data}: make sure they were made on it",
              file=sys.stderr)
    rows, results = score_predictions(bench, preds, mode)
    run = RunDir(out, config={"data": str(Path(data).resolve()), "predictions": str(Path(predictions).resolve()),
                              "mode": mode}, inputs={"predictions": predictions}, command=command)
    write_score_report(run.root, rows, results)
    run.finish("score", mode=mode)
    return run.root
