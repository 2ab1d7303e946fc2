"""results.json, results.csv, report.md and figures of a stitching sweep or a stitch tree.

The main table has the paper's layout (Mai et al. 2026, Tab. 1): one row per pair and initialisation, one
column per stitch point, cells mean ± spread over seeds. Self-stitch controls sit beside the cross pairs, and the
gaps cross - self are given against the self-stitch of the same target and of the same source.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from stitchkit.report import line_plot, markdown_table, write_csv
from stitchkit.runs import atomic_write_json, atomic_write_text

OBJECTIVE_LABELS = {
    "tlt": "TLT (none)",
    "ffm_tlt": "FFM→TLT",
    "lfm_tlt": "LFM→TLT",
    "lfm": "LFM + head",
    "ffm": "FFM + head",
}
CSV_COLUMNS = [
    "source", "target", "self_stitch", "point", "target_point", "stitch", "objective", "seed", "score_val",
    "score_test", "distance_stitch", "distance_stitch_rel", "distance_final", "distance_final_rel", "rescue",
    "interference", "trainable_params", "train_seconds",
]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean, spread = mean_spread(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def flat_rows(cells: list[dict]) -> list[dict]:
    rows = []
    for cell in cells:
        row = {k: cell.get(k) for k in CSV_COLUMNS}
        overlap = cell.get("overlap") or {}
        row["rescue"], row["interference"] = overlap.get("rescue"), overlap.get("interference")
        rows.append(row)
    return rows


def _group(cells: list[dict], metric: str) -> dict[tuple, dict[int, list[float]]]:
    """(source, target, stitch, objective) -> point -> values over seeds."""
    grouped: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        value = cell.get(metric)
        if value is not None:
            grouped[(cell["source"], cell["target"], cell["stitch"], cell["objective"])][cell["point"]].append(value)
    return grouped


def paper_table(cells: list[dict], points: list[int], metric: str = "score_test", digits: int = 1) -> str:
    """Rows: pair and initialisation; columns: stitch points (the paper's layout)."""
    grouped = _group(cells, metric)
    several_layers = len({key[2] for key in grouped}) > 1
    rows = []
    for (source, target, stitch, objective), by_point in grouped.items():
        label = f"{source}→{target}" + (" (self)" if source == target else "")
        label += f", {OBJECTIVE_LABELS.get(objective, objective)}" + (f", {stitch}" if several_layers else "")
        row = {"pair / init": label}
        row.update({f"L{n}": format_mean(by_point.get(n, []), digits) for n in points})
        rows.append(row)
    return markdown_table(rows, ["pair / init"] + [f"L{n}" for n in points])


def self_gap_table(cells: list[dict], points: list[int]) -> str:
    """cross - self(same target) and cross - self(same source), per stitch point (means over seeds)."""
    grouped = _group(cells, "score_test")
    means = {key: {n: statistics.fmean(v) for n, v in by_point.items()} for key, by_point in grouped.items()}
    rows = []
    for (source, target, stitch, objective), by_point in means.items():
        if source == target:
            continue
        same_target = means.get((target, target, stitch, objective), {})
        same_source = means.get((source, source, stitch, objective), {})
        row = {"pair / init": f"{source}→{target}, {OBJECTIVE_LABELS.get(objective, objective)}, {stitch}"}
        for n in points:
            gaps = [by_point[n] - ref[n] if n in by_point and n in ref else None for ref in (same_target, same_source)]
            row[f"L{n}"] = " / ".join("–" if g is None else f"{g:+.1f}" for g in gaps)
        rows.append(row)
    return markdown_table(rows, ["pair / init"] + [f"L{n}" for n in points])


def overlap_table(cells: list[dict]) -> str:
    totals: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for cell in cells:
        overlap = cell.get("overlap")
        if overlap:
            key = (f"{cell['source']}→{cell['target']}", OBJECTIVE_LABELS.get(cell["objective"], cell["objective"]), cell["stitch"])
            for name in ("rescue", "interference"):
                totals[key][name] += overlap[name]
    rows = [
        {"pair": k[0], "objective": k[1], "stitch": k[2], "rescue": v["rescue"], "interference": v["interference"]}
        for k, v in totals.items()
    ]
    return markdown_table(rows)


def probe_table(probe_rows: dict[str, list[dict]], metric_name: str) -> str:
    """One row per model: test score over seeds and, when probe.lr_sweep ran, the lr chosen on val per seed."""
    swept = any("lr_sweep" in p for rows in probe_rows.values() for p in rows)
    rows = []
    for model, results in probe_rows.items():
        row = {"model": model, metric_name: format_mean([p["score_test"] for p in results])}
        if swept:
            row["lr (chosen on val, per seed)"] = ", ".join(f"{p['lr']:g}" for p in results)
        rows.append(row)
    return markdown_table(rows)


def write_figures(cells: list[dict], probes: list[dict], points: list[int], figures: Path, metric_name: str) -> list[Path]:
    """Per pair and stitch layer: score vs stitch point per objective; relative final distance vs stitch point."""
    paths = []
    probe_scores = defaultdict(list)
    for probe in probes:
        probe_scores[probe["model"]].append(probe["score_test"])
    by_pair = defaultdict(list)
    for cell in cells:
        by_pair[(cell["source"], cell["target"], cell["stitch"])].append(cell)
    for (source, target, stitch), pair_cells in by_pair.items():
        slug = f"{source}--{target}--{stitch}".replace("/", "_")
        for metric, ylabel, name in (
            ("score_test", metric_name, "score"),
            ("distance_final_rel", "final-feature distance / Var(target)", "final_distance"),
        ):
            series = {}
            for (_, _, _, objective), by_point in _group(pair_cells, metric).items():
                xs = sorted(by_point)
                series[OBJECTIVE_LABELS.get(objective, objective)] = (xs, [statistics.fmean(by_point[n]) for n in xs])
            if metric == "score_test":
                for model in dict.fromkeys((source, target)):
                    if probe_scores.get(model):
                        series[f"probe {model}"] = (points, [statistics.fmean(probe_scores[model])] * len(points))
            if series:
                title = f"{source} → {target} ({stitch})"
                paths.append(line_plot(figures / f"{name}_{slug}.png", series, xlabel="stitch point n", ylabel=ylabel, title=title))
    return paths


def ffm_data_sentence(results: dict, trained: str = "S") -> str:
    """Which images FFM trained on (results['ffm_data'], from TaskData.ffm_record), as a report sentence."""
    record = results.get("ffm_data")
    if record is None:
        return ""
    return f" FFM trained {trained} label-free on {record['images']} images of {record['description']}."


def write_sweep_outputs(out: Path, cfg, data_description: str, results: dict) -> Path:
    """results.json, results.csv, figures/*.png and report.md for a finished sweep."""
    cells, probes = results["cells"], results["probes"]
    metric_name = "top-1 accuracy (%)" if cfg.task == "classification" else "mIoU (%)"
    atomic_write_json(out / "results.json", {"task": cfg.task, "data": data_description, **results})
    write_csv(out / "results.csv", flat_rows(cells), CSV_COLUMNS)
    figures = write_figures(cells, probes, cfg.points, out / "figures", metric_name)
    probe_rows = defaultdict(list)
    for probe in probes:
        probe_rows[probe["model"]].append(probe)
    parts = [
        "# Model stitching sweep\n",
        f"Task: {cfg.task} on {data_description}; test {metric_name}, mean ± sample std over seeds {cfg.seeds}. "
        f"Models: {', '.join(f'{k} = `{v}`' for k, v in cfg.models.items())}. Stitch points are source blocks n "
        "(1-indexed); 'none' = S from random init, 'FFM→TLT' = the paper's recipe." + ffm_data_sentence(results)
        + (" TLT trained on augmented images (a fresh RandomResizedCrop 0.5–1 and flip per draw)." if cfg.tlt.augment else "")
        + "\n",
        f"## {metric_name} (rows: pair and initialisation; columns: stitch points)\n",
        paper_table(cells, cfg.points),
    ]
    if probe_rows:
        parts += ["\n## Linear probes\n", probe_table(probe_rows, metric_name)]
    if any(c["self_stitch"] for c in cells) and any(not c["self_stitch"] for c in cells):
        parts += ["\n## Cross − self (same target / same source)\n", self_gap_table(cells, cfg.points)]
    parts += [
        "\n## Relative distance at the stitch point, D_n / Var\n",
        paper_table(cells, cfg.points, "distance_stitch_rel", digits=3),
        "\n## Relative distance at the match layer, D_fin / Var\n",
        paper_table(cells, cfg.points, "distance_final_rel", digits=3),
    ]
    if any(c.get("overlap") for c in cells):
        parts += ["\n## Prediction overlap (test, summed over points and seeds)\n", overlap_table(cells)]
    if figures:
        parts += ["\n## Figures\n"] + [f"![{p.stem}](figures/{p.name})\n" for p in figures]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report
