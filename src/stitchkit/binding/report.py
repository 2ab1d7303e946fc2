"""Tables and figures of a binding run: the paper's table, accuracy vs context size, mechanisms and probes per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stitchkit.binding.interventions import OUTCOMES
from stitchkit.report import line_plot, markdown_table
from stitchkit.runs import RunDir, atomic_write_text, save_figure

# binding.md §9: text-modality OOD accuracy of the paper's controlled model (over 11 branches).
PAPER_OOD = {"text-only": 0.372, "noise-text": 0.575, "image-text": 0.695, "noise-image-text": 0.836}


def _pm(row: dict[str, Any], key: str) -> str:
    mean, sd = row.get(key), row.get(f"{key}_sd")
    if mean is None:
        return "–"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if row["runs"] > 1 else f"{100 * mean:.1f}"


def table_rows(results: dict[str, Any], stages: dict[str, list[str]]) -> list[dict[str, Any]]:
    rows = []
    for branch, row in results["table"].items():
        rows.append(
            {
                "branch": branch,
                "stages": " → ".join(stages[branch]),
                "runs": f"{row['runs']} ({row['diverged']} diverged)" if row.get("diverged") else row["runs"],
                "ID %": _pm(row, "id"),
                "OOD %": _pm(row, "ood"),
                "far OOD %": _pm(row, "ood_far"),
                "image ID %": _pm(row, "image_id"),
                "R (last block)": "–" if row["ratio_last_block"] is None else f"{row['ratio_last_block']:.2f}",
                "paper OOD %": f"{100 * PAPER_OOD[branch]:.1f}" if branch in PAPER_OOD else "",
            }
        )
    return rows


def stage_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in results["runs"]:
        for s in r["stages"]:
            rows.append(
                {
                    "seed": r["seed"], "branch": r["branch"], "encoder": r["encoder"] or "", "stage": s["stage"],
                    "steps": s["steps"], "ID %": 100 * s["id"], "OOD %": "–" if s["ood"] is None else 100 * s["ood"],
                    "image ID %": "–" if s.get("image_id") is None else 100 * s["image_id"],
                }
            )  # fmt: skip
    return _unique(rows)


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shared stages (S1 of every branch) once."""
    seen, out = set(), []
    for row in rows:
        key = tuple(v for k, v in row.items() if k != "branch")
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _mean_over_runs(runs: list[dict[str, Any]], get) -> np.ndarray:
    return np.mean([get(r) for r in runs], axis=0)


def accuracy_figure(path: Path, results: dict[str, Any]) -> Path:
    series = {}
    for branch in results["table"]:
        runs = [r for r in results["runs"] if r["branch"] == branch]
        if not runs:  # every run of the branch diverged
            continue
        ns = sorted(int(n) for n in runs[0]["stages"][-1]["text"])
        accs = _mean_over_runs(runs, lambda r: [r["stages"][-1]["text"][str(n)] for n in ns])
        series[branch] = (ns, 100 * accs)
    hi = results["train_objects"][1]
    return line_plot(path, series, xlabel=f"objects in context (trained on ≤ {hi})", ylabel="text accuracy %",
                     title="Accuracy vs context size (final stage of each branch)")  # fmt: skip


def outcome_figure(path: Path, panels: dict[str, list[dict[str, Any]]], title: str) -> Path:
    """Outcome shares per patched layer, one panel per entry {title: intervention layer rows}."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        for outcome in OUTCOMES:
            ax.plot([r["layer"] for r in rows], [100 * r[outcome] for r in rows], marker=".", label=outcome)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("patched layer (last = resid_post)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("% of pairs")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _mean_rows(rows_per_run: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Outcome shares averaged over runs, layer by layer."""
    return [{"layer": layer[0]["layer"], **{o: float(np.mean([r[o] for r in layer])) for o in OUTCOMES}} for layer in zip(*rows_per_run)]


def mechanism_figure(path: Path, results: dict[str, Any], n: str) -> Path:
    panels = {}
    for branch in results["table"]:
        runs = [r for r in results["runs"] if r["branch"] == branch and r["analysis"]]
        if runs:
            panels[branch] = _mean_rows([r["analysis"]["interventions"][n]["layers"] for r in runs])
    return outcome_figure(path, panels, f"Interchange interventions at the last token, N = {n}")


def knockout_figure(path: Path, panels: dict[str, list[dict[str, Any]]], title: str) -> Path:
    """Change (knockout - unmodified, in points) of the positional and symbolic intervention shares per knocked-out
    window, one line per edge set; one column per entry {title: knockout window rows}."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 5.6), sharex=True, sharey=True, squeeze=False)
    for col, (name, rows) in enumerate(panels.items()):
        for row, outcome in enumerate(("positional", "symbolic")):
            ax = axes[row][col]
            for edge_set in dict.fromkeys(r["set"] for r in rows):
                mine = [r for r in rows if r["set"] == edge_set]
                ax.plot([r["start"] for r in mine], [100 * r["labels_delta"][outcome] for r in mine], marker=".", label=edge_set)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{name}: Δ {outcome}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[1][col].set_xlabel("first layer of the knocked-out window")
        axes[1][col].xaxis.set_major_locator(MaxNLocator(integer=True))
    for row in axes:
        row[0].set_ylabel("Δ % of pairs")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _mean_windows(knockouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Knockout windows with labels_delta averaged over runs (their sets and windows are the same)."""
    return [
        {"set": w[0]["set"], "start": w[0]["start"], "labels_delta": {o: float(np.mean([r["labels_delta"][o] for r in w])) for o in OUTCOMES}}
        for w in zip(*[k["windows"] for k in knockouts])
    ]


def _label_knockouts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The knockout results that carry label shares (analyses written before they existed do not)."""
    return [r["analysis"]["knockouts"] for r in runs if r["analysis"] and r["analysis"]["knockouts"] and "labels_baseline" in r["analysis"]["knockouts"]]


def knockout_label_figure(path: Path, results: dict[str, Any]) -> Path | None:
    per_branch = {b: _label_knockouts([r for r in results["runs"] if r["branch"] == b]) for b in results["table"]}
    per_branch = {b: k for b, k in per_branch.items() if k}
    if not per_branch:
        return None
    title = _knockout_title(next(iter(per_branch.values()))[0])
    return knockout_figure(path, {b: _mean_windows(k) for b, k in per_branch.items()}, title)


def _knockout_title(knockouts: dict[str, Any]) -> str:
    return f"Attention knockouts ({knockouts['window']}-layer windows): change of the interchange outcomes patched at layer {knockouts['label_layer']}"


def probe_figure(path: Path, results: dict[str, Any], n: str) -> Path:
    series = {}
    for branch in results["table"]:
        runs = [r for r in results["runs"] if r["branch"] == branch and r["analysis"]]
        if not runs:
            continue
        for target, label in (("bound", "bound colour"), ("previous", "previous colour (control)")):
            acc = _mean_over_runs(runs, lambda r: r["analysis"]["probes"][n]["accuracy"][target])
            series[f"{branch}: {label}"] = (range(len(acc)), 100 * acc)
    return line_plot(path, series, xlabel="layer (resid_pre; last = resid_post)", ylabel="probe accuracy %",
                     title=f"Colour decodable at shape positions, N = {n}")  # fmt: skip


def analysis_figures(result: dict[str, Any], figures: Path, link_base: Path) -> list[Path]:
    """The figures of `stitchkit binding analyze`: outcome shares per N, every probe per layer, and the
    knockouts' change of the outcome shares."""
    figures.mkdir(parents=True, exist_ok=True)
    panels = {f"N = {n}": inter["layers"] for n, inter in result["interventions"].items()}
    out = [outcome_figure(figures / "interventions.png", panels, f"Interchange interventions: {result['model']}")]
    n, probes = next(iter(result["probes"].items()))
    series = {target: (range(len(acc)), [100 * a for a in acc]) for target, acc in probes["accuracy"].items()}
    out.append(line_plot(figures / "probes.png", series, xlabel="layer", ylabel="probe accuracy %", title=f"Linear probes, N = {n}"))
    knockouts = result["knockouts"]
    if knockouts and knockouts["windows"]:
        out.append(knockout_figure(figures / "knockouts.png", {f"N = {knockouts['n']}": knockouts["windows"]}, _knockout_title(knockouts)))
    return out


def analysis_rows(results: dict[str, Any], n: str) -> list[dict[str, Any]]:
    rows = []
    for r in results["runs"]:
        if not r["analysis"]:
            continue
        inter = r["analysis"]["interventions"][n]
        layers = inter["layers"]
        sig = r["analysis"]["probes"][n]["signature"]
        knock = r["analysis"]["knockouts"]
        worst = min(knock["windows"], key=lambda w: w["delta"]) if knock["windows"] else None
        rows.append(
            {
                "seed": r["seed"], "branch": r["branch"], "encoder": r["encoder"] or "", "pairs": inter["pairs"],
                "sym@0 %": 100 * layers[0]["symbolic"], "refl@post %": 100 * layers[-1]["reflexive"],
                "R per layer": " ".join(f"{row['ratio']:.1f}" for row in layers[1:-1]),
                "signature": f"{'yes' if sig['present'] else 'no'} ({sig['strength']:.2f})",
                "largest knockout drop": "–" if worst is None else f"{worst['set']} L{worst['layers'][0]}-{worst['layers'][1]}: {100 * worst['delta']:+.0f}",
            }
        )  # fmt: skip
    return rows


def results_markdown(results: dict[str, Any], stages: dict[str, list[str]], figures: Path, link_base: Path, heading: str = "##") -> str:
    figures.mkdir(parents=True, exist_ok=True)
    lo, hi = results["train_objects"]
    ranges = results.get("ood_ranges") or {"ood": [hi + 1, "…"], "ood_far": None}  # results from before ood_ranges
    spans = [f"ID (N = {lo}..{hi})"] + [f"{what} (N = {r[0]}..{r[1]})" for what, r in (("OOD", ranges["ood"]), ("far OOD", ranges["ood_far"])) if r]
    parts = [f"{heading} Binding: indirect retrieval, {', '.join(spans)} text accuracy\n\n"]
    parts.append("Final stage of each branch; mean ± sd over seeds × encoders. R = symbolic / positional share of "
                 "interchange outcomes at the last block's input (paper: < 1 text-only, > 1 after images). "
                 "The paper's OOD numbers are for its 12-layer model at full scale, shown for orientation only.\n\n")  # fmt: skip
    parts.append(markdown_table(table_rows(results, stages), digits=1))
    if results.get("diverged"):
        parts.append("\nDiverged (left out of the table and everything below; its last checkpoint stays in the stage folder):\n\n")
        parts.append(markdown_table([{"seed": r["seed"], "branch": r["branch"], "encoder": r["encoder"] or "",
                                      **r["diverged"]} for r in results["diverged"]]))  # fmt: skip
    figure = accuracy_figure(figures / "binding_accuracy_vs_n.png", results)
    parts.append(f"\n![accuracy vs N]({figure.relative_to(link_base)})\n")
    if results["gates"]:
        parts.append("\nSeparability gate (§3: ridge probe on mean-pooled patch tokens of single-object images; pass ≥ 95% on both):\n\n")
        gate_rows = [{"encoder": name, "spec": g["encoder"], "colours": g["colours"], "shapes": g["shapes"],
                      "colour acc %": 100 * g["colour_accuracy"], "shape acc %": 100 * g["shape_accuracy"],
                      "passed": "yes" if g["passed"] else "**no**"} for name, g in results["gates"].items()]  # fmt: skip
        parts.append(markdown_table(gate_rows, digits=1))
    parts.append("\n\nEvery stage:\n\n" + markdown_table(stage_rows(results), digits=1))
    analysed = [r for r in results["runs"] if r["analysis"]]
    if analysed:
        n = next(iter(analysed[0]["analysis"]["interventions"]))
        parts.append(f"\n\n{heading}# Mechanisms (N = {n})\n\n")
        parts.append("Sanity: patching layer 0 swaps only the query embedding, so it should be ~100% symbolic; patching "
                     "resid_post should be ~100% reflexive.\n\n")  # fmt: skip
        parts.append(markdown_table(analysis_rows(results, n), digits=1))
        for make, name in ((mechanism_figure, "mechanisms"), (probe_figure, "probes")):
            figure = make(figures / f"binding_{name}.png", results, n)
            parts.append(f"\n\n![{name}]({figure.relative_to(link_base)})\n")
        figure = knockout_label_figure(figures / "binding_knockout_labels.png", results)
        if figure is not None:
            parts.append("\nAttention knockouts (§7.3): the change in the positional and symbolic shares of the "
                         "interchange interventions when an edge set is blocked in a window of layers, on the cf "
                         "and the patched forward, against the same pairs unmodified (mean over runs).\n")  # fmt: skip
            parts.append(f"\n![knockout labels]({figure.relative_to(link_base)})\n")
    return "".join(parts)


def write_report(run: RunDir, cfg, results: dict[str, Any]) -> Path:
    text = f"# {cfg.name}\n\n{cfg.description}\n\n" + results_markdown(results, cfg.branches, run.root / "figures", run.root)
    path = run.path("report.md")
    atomic_write_text(path, text)
    return path
