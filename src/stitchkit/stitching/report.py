"""results.json, results.csv, report.md and figures of a stitching sweep or a stitch tree.

The main table has the paper's layout (Mai et al. 2026, Tab. 1): one row per pair and initialisation, one
column per stitch point, cells mean ± spread over seeds. Self-stitch controls sit beside the cross pairs, and the
gaps cross - self are given against the self-stitch of the same target and of the same source.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from stitchkit.report import markdown_table, write_csv
from stitchkit.runs import atomic_write_json, atomic_write_text
from stitchkit.stitching.objectives import LABEL_FREE, stages

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


# How a figure draws each stitch beside a cross pair (source a, target b): the cross stitch, and its self-stitch
# controls with the same target (b -> b) and the same source (a -> a). A model's probe is a dashed line in the
# colour of its self-stitch.
ROLE_STYLES = {
    "cross": {"color": "C0", "marker": "o", "linewidth": 2.0},
    "self, same target": {"color": "C1", "marker": "s", "linewidth": 1.3},
    "self, same source": {"color": "C2", "marker": "^", "linewidth": 1.3},
}
OBJECTIVE_LINESTYLES = {"lfm": "-", "ffm": "--"}


def figure_groups(cells: list[dict]) -> list[tuple[str, str, str, dict[str, list[dict]]]]:
    """(source, target, stitch, {role: cells}) per figure: a cross pair with its self-stitch controls (the
    comparison the control exists for, in one figure), and a self-stitch no cross pair uses on its own."""
    by_pair = defaultdict(list)
    for cell in cells:
        by_pair[(cell["source"], cell["target"], cell["stitch"])].append(cell)
    groups, shown = [], set()
    for (source, target, stitch), pair_cells in by_pair.items():
        if source == target:
            continue
        roles = {"cross": pair_cells, "self, same target": by_pair.get((target, target, stitch), []),
                 "self, same source": by_pair.get((source, source, stitch), [])}  # fmt: skip
        groups.append((source, target, stitch, {role: found for role, found in roles.items() if found}))
        shown.update({(target, target, stitch), (source, source, stitch)})
    for (source, target, stitch), pair_cells in by_pair.items():
        if source == target and (source, target, stitch) not in shown:
            groups.append((source, target, stitch, {"self, same target": pair_cells}))
    return groups


def _role_label(role: str, source: str, target: str) -> str:
    pair = {"cross": (source, target), "self, same target": (target, target), "self, same source": (source, source)}[role]
    return f"{pair[0]}→{pair[1]}" + ("" if role == "cross" else f" ({role})")


def _panel_grid(panels: int):
    """A figure with one panel per item (at most three per row, shared y axis) and room for a legend below."""
    import matplotlib.pyplot as plt

    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols if cols > 1 else 6.0, 3.3 * rows + 0.5), sharey=True, squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:panels])


def _legend_below(fig, axes, last=()) -> None:
    """One legend for every panel, below them; the labels in `last` (reference lines) after the data series."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    handles = dict(sorted(handles.items(), key=lambda item: item[0] in last))
    columns = min(len(handles), 3 if len(axes) > 1 else 2)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=columns, fontsize=8,
               bbox_to_anchor=(0.5, 0), frameon=False)  # fmt: skip
    rows = -(-len(handles) // columns)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 1))


def stitch_point_figure(path: Path, source: str, target: str, stitch: str, roles: dict[str, list[dict]], metric: str,
                        ylabel: str, points: list[int], references: dict[str, tuple[float, dict]]) -> Path:  # fmt: skip
    """One panel per objective: `metric` against the stitch point for the cross stitch and its self-stitch
    controls (mean over seeds, ± sample std as error bars when there are several), on integer ticks at the stitch
    points; `references` {label: (value, line style)} are horizontal lines (probes, chance), so they hide no data."""
    from stitchkit.runs import save_figure

    objectives = list(dict.fromkeys(cell["objective"] for found in roles.values() for cell in found))
    fig, axes = _panel_grid(len(objectives))
    for ax, objective in zip(axes, objectives):
        for role, found in roles.items():
            by_point = _group([c for c in found if c["objective"] == objective], metric)
            values = next(iter(by_point.values()), {})
            xs = sorted(values)
            if not xs:
                continue
            means, spreads = zip(*(mean_spread(values[n]) for n in xs))
            several = any(len(values[n]) > 1 for n in xs)
            ax.errorbar(xs, means, yerr=spreads if several else None, capsize=3, markersize=5,
                        label=_role_label(role, source, target), **ROLE_STYLES[role])  # fmt: skip
        for label, (value, style) in references.items():
            ax.axhline(value, linewidth=1, label=label, **style)
        ax.set_xticks(points)
        ax.set_title(OBJECTIVE_LABELS.get(objective, objective), fontsize=10)
        ax.set_xlabel("stitch point n (source blocks)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"{source} → {target} ({stitch})" if source != target else f"{source} self-stitch ({stitch})", fontsize=11)
    _legend_below(fig, axes, last=references)
    return save_figure(fig, path)


def profile_figure(path: Path, source: str, target: str, stitch: str, roles: dict[str, list[dict]]) -> Path | None:
    """D_k / Var after every target block k from the stitch point m to the last, for the label-free objectives
    (LFM, FFM), one panel per stitch point: the paper's "LFM: tiny error at the stitch point, large at the end"
    (Mai et al. 2026, Sec. 4). The cross stitch and its self-stitch with the same target share the x axis (the
    target's blocks); on a log scale when the errors span more than a factor 10 (at ViT-L scale: orders of
    magnitude). None when no cell has a profile."""
    from stitchkit.runs import save_figure

    roles = {role: [c for c in found if c["objective"] in OBJECTIVE_LINESTYLES and c.get("profile_rel")]
             for role, found in roles.items() if role != "self, same source"}  # fmt: skip
    points = sorted({c["point"] for found in roles.values() for c in found})
    if not points:
        return None
    fig, axes = _panel_grid(len(points))
    spans = []
    for ax, point in zip(axes, points):
        for role, found in roles.items():
            for objective, linestyle in OBJECTIVE_LINESTYLES.items():
                profiles = [c["profile_rel"] for c in found if c["point"] == point and c["objective"] == objective]
                if not profiles:
                    continue
                first = next(c["target_point"] for c in found if c["point"] == point)
                blocks = list(range(first, first + len(profiles[0])))
                mean = [statistics.fmean(values) for values in zip(*profiles)]
                label = f"{_role_label(role, source, target)}, {OBJECTIVE_LABELS[objective]}"
                ax.plot(blocks, mean, linestyle=linestyle, label=label, markersize=4, **ROLE_STYLES[role])
                ax.set_xticks(blocks)
                spans.extend(mean)
    if min(spans) > 0 and max(spans) > 10 * min(spans):
        for ax in axes:
            ax.set_yscale("log")
    for ax, point in zip(axes, points):
        ax.set_title(f"stitch point n = {point}", fontsize=10)
        ax.set_xlabel("target block k (first: the stitch point m)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("D_k / Var(target)")
    fig.suptitle(f"{source} → {target} ({stitch}): feature distance through the target", fontsize=11)
    _legend_below(fig, axes)
    return save_figure(fig, path)


def write_figures(cells: list[dict], probes: list[dict], points: list[int], figures: Path, metric_name: str,
                  chance: float | None = None) -> list[Path]:  # fmt: skip
    """Per cross pair and stitch layer, with its self-stitch controls: score and relative final distance against
    the stitch point (one panel per objective; probes and chance as reference lines), and for LFM and FFM cells
    the distance profile through the target."""
    paths = []
    probe_scores = defaultdict(list)
    for probe in probes:
        probe_scores[probe["model"]].append(probe["score_test"])
    for source, target, stitch, roles in figure_groups(cells):
        slug = f"{source}--{target}--{stitch}".replace("/", "_")
        references = {}
        for model, role in ((target, "self, same target"), (source, "self, same source")):
            if probe_scores.get(model) and f"probe {model}" not in references:
                style = {"color": ROLE_STYLES[role]["color"], "linestyle": "--"}
                references[f"probe {model}"] = (statistics.fmean(probe_scores[model]), style)
        if chance is not None:
            references[f"chance ({chance:.2g}%)"] = (chance, {"color": "grey", "linestyle": ":"})
        for metric, ylabel, name, lines in (
            ("score_test", metric_name, "score", references),
            ("distance_final_rel", "final-feature distance D_fin / Var(target)", "final_distance", {}),
        ):
            paths.append(stitch_point_figure(figures / f"{name}_{slug}.png", source, target, stitch, roles, metric,
                                             ylabel, points, lines))  # fmt: skip
        profile = profile_figure(figures / f"profile_{slug}.png", source, target, stitch, roles)
        if profile is not None:
            paths.append(profile)
    return paths


def tree_figure(path: Path, title: str, by_point: dict[int, list[dict]], single: tuple[str, list[float]],
                every: tuple[str, float, list[float]], metric_name: str, chance: float | None) -> Path:  # fmt: skip
    """Score against extra blocks over the trunk alone: VST-n (each point annotated with its n; ± sample std over
    seeds as error bars), the trunk alone, and every model in full; chance as a reference line."""
    import matplotlib.pyplot as plt

    from stitchkit.runs import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    several = any(len(records) > 1 for records in by_point.values()) or len(single[1]) > 1
    xs = [by_point[n][0]["extra_blocks"] * 100 for n in sorted(by_point)]
    stats = [mean_spread([r["score_test"] for r in by_point[n]]) for n in sorted(by_point)]
    ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats] if several else None, marker="o", capsize=3,
                color="C0", label="VST-n")  # fmt: skip
    for n, x, (mean, _) in zip(sorted(by_point), xs, stats):
        ax.annotate(f"n={n}", (x, mean), textcoords="offset points", xytext=(5, 5), fontsize=8, color="C0")
    for (label, x, scores), style in (((single[0], 0.0, single[1]), {"color": "C1", "marker": "s"}),
                                      ((every[0], every[1] * 100, every[2]), {"color": "C2", "marker": "D"})):  # fmt: skip
        mean, spread = mean_spread(scores)
        ax.errorbar([x], [mean], yerr=[spread] if several else None, capsize=3, linestyle="none", label=label, **style)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.2g}%)")
    ax.set_xlabel("extra cost over one model (% of blocks)")
    ax.set_ylabel(metric_name)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("chance"))  # the reference line last
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
    return save_figure(fig, path)


def ffm_data_sentence(results: dict, trained: str = "S") -> str:
    """Which images FFM trained on (results['ffm_data'], from TaskData.ffm_record), as a report sentence."""
    record = results.get("ffm_data")
    if record is None:
        return ""
    return f" FFM trained {trained} label-free on {record['images']} images of {record['description']}."


def data_sentence(description: str, results: dict) -> str:
    """The data as the report names it: what it is, how many classes (and chance, for accuracy) and split sizes
    (results['data_context'], from TaskData.context)."""
    context = results.get("data_context")
    if not context:
        return description
    chance = f" (chance {context['chance']:.2g}%)" if context.get("chance") is not None else ""
    splits = " / ".join(f"{size} {name}" for name, size in context["splits"].items() if name in ("train", "val", "test"))
    return f"{description}: {context['classes']} classes{chance}; {splits} images"


def models_sentence(results: dict, specs: dict[str, str]) -> str:
    """Each model with its id, resolution and patch grid (results['models']), or its id alone."""
    records = results.get("models") or {}
    return ", ".join(
        f"{name} = `{spec}`" + (f" ({records[name]['resolution']}, {records[name]['blocks']} blocks, width "
                                f"{records[name]['width']})" if name in records else "")
        for name, spec in specs.items()
    )  # fmt: skip


# Stage names in the report's budget sentence.
STAGE_LABELS = {"lfm": "LFM", "ffm": "FFM", "tlt": "TLT", "probe": "probes"}


def optim_summary(optim) -> str:
    """One stage's training budget (an OptimConfig) in a few words."""
    text = f"{optim.epochs:g} epoch{'' if optim.epochs == 1 else 's'}" + (f" (early stopping, patience {optim.patience})" if optim.patience else "")
    text += f", batch {optim.batch_size}, lr " + (
        "/".join(f"{lr:g}" for lr in optim.lr_sweep) + " (best on val)" if optim.lr_sweep else f"{optim.lr:g}"
    )
    return text + (f", head lr {optim.head_lr:g}" if optim.head_lr else "")


def budget_sentence(cfg) -> str:
    """The training budget of every stage the sweep ran, so a reader can tell a converged baseline from a short
    one (the probes' settings also fit the heads on LFM and FFM stitches)."""
    used = list(dict.fromkeys(stage for objective in cfg.objectives for stage in stages(objective)))
    if cfg.probes or any(objective in LABEL_FREE for objective in cfg.objectives):
        used.append("probe")
    return " Training budget: " + "; ".join(f"{STAGE_LABELS[stage]} {optim_summary(getattr(cfg, stage))}" for stage in used) + "."


def write_sweep_outputs(out: Path, cfg, data_description: str, results: dict) -> Path:
    """results.json, results.csv, figures/*.png and report.md for a finished sweep."""
    cells, probes = results["cells"], results["probes"]
    metric_name = "top-1 accuracy (%)" if cfg.task == "classification" else "mIoU (%)"
    atomic_write_json(out / "results.json", {"task": cfg.task, "data": data_description, **results})
    write_csv(out / "results.csv", flat_rows(cells), CSV_COLUMNS)
    chance = (results.get("data_context") or {}).get("chance")
    figures = write_figures(cells, probes, cfg.points, out / "figures", metric_name, chance)
    probe_rows = defaultdict(list)
    for probe in probes:
        probe_rows[probe["model"]].append(probe)
    parts = [
        "# Model stitching sweep\n",
        f"Task: {cfg.task} on {data_sentence(data_description, results)}; test {metric_name}, mean ± sample std "
        f"over seeds {cfg.seeds}. Models: {models_sentence(results, cfg.models)}. Stitch points are source blocks n "
        "(1-indexed); 'none' = S from random init, 'FFM→TLT' = the paper's recipe." + ffm_data_sentence(results)
        + (" TLT trained on augmented images (a fresh RandomResizedCrop 0.5–1 and flip per draw)." if cfg.tlt.augment else "")
        + budget_sentence(cfg) + "\n",
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
