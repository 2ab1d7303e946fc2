"""Tables and figures of a binding run: the paper's table, accuracy vs context size, mechanisms and probes per layer.

Mechanism numbers over too few counterfactual pairs (interventions.enough_pairs) are shown as "n/a (k of M pairs)",
left out of means and figures, and a warning line says the model has not learned the task at that N.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from stitchkit.binding.interventions import OUTCOMES, enough_pairs, not_learned_warning, pairs_note
from stitchkit.binding.task import noise_room, noise_warning
from stitchkit.report import markdown_table
from stitchkit.runs import RunDir, atomic_write_text, save_figure

# binding.md §9: text-modality OOD accuracy of the paper's controlled model (over 11 branches).
PAPER_OOD = {"text-only": 0.372, "noise-text": 0.575, "image-text": 0.695, "noise-image-text": 0.836}


def warn(message: str) -> None:
    """One line on stderr, so that a batch log shows it too; reports repeat their warnings in report.md."""
    print(f"warning: {message}", file=sys.stderr)


def _first_interventions(run: dict[str, Any]) -> dict[str, Any]:
    """The interventions at the first analysed N, which the table's R and the mechanism section report."""
    return next(iter(run["analysis"]["interventions"].values()))


def _pm(row: dict[str, Any], key: str) -> str:
    mean, sd = row.get(key), row.get(f"{key}_sd")
    if mean is None:
        return "–"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if row["runs"] > 1 else f"{100 * mean:.1f}"


def _pairs_of_runs(interventions: list[dict[str, Any]]) -> str:
    """The pairs behind several runs' shares: "0, 1, 150 of 200 pairs" (one count per run)."""
    requested = {i.get("requested") for i in interventions}
    if len(requested) == 1 and None not in requested:
        return f"{', '.join(str(i['pairs']) for i in interventions)} of {requested.pop()} pairs"
    return ", ".join(pairs_note(i) for i in interventions)


def _ratio_cell(results: dict[str, Any], branch: str, ratio: float | None) -> str:
    """Mean R of a branch, saying how many runs were left out for too few pairs: "n/a (k of M pairs)" if all were."""
    analysed = [_first_interventions(r) for r in results["runs"] if r["branch"] == branch and r["analysis"]]
    few = [i for i in analysed if not enough_pairs(i)]
    if ratio is None:
        return f"n/a ({_pairs_of_runs(few)})" if few else "–"
    return f"{ratio:.2f}" + (f" ({len(few)} of {len(analysed)} runs left out: too few pairs)" if few else "")


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
                "R (last block)": _ratio_cell(results, branch, row["ratio_last_block"]),
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
    """Text accuracy per context size of every branch's final stage, against chance (1/N: a model that picks one
    of the N listed items at random) and the trained range (shaded)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    ns: list[int] = []
    for branch in results["table"]:
        runs = [r for r in results["runs"] if r["branch"] == branch]
        if not runs:  # every run of the branch diverged
            continue
        ns = sorted(int(n) for n in runs[0]["stages"][-1]["text"])
        accs = _mean_over_runs(runs, lambda r: [r["stages"][-1]["text"][str(n)] for n in ns])
        ax.plot(ns, 100 * accs, marker="o", label=branch)
    lo, hi = results["train_objects"]
    ax.axvspan(lo - 0.5, hi + 0.5, color="grey", alpha=0.12, label=f"trained N = {lo}..{hi}")
    if ns:
        ax.plot(ns, [100 / n for n in ns], color="grey", linestyle="--", linewidth=1, label="chance (1/N)")
        ax.set_xticks(ns)
    ax.set_ylim(0, 102)
    ax.set_xlabel("objects in context N")
    ax.set_ylabel("text accuracy %")
    ax.set_title("Accuracy vs context size (final stage of each branch)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="grey")


def _finish_panels(fig, axes, panels: dict[str, Any], ylabel: str, title: str) -> None:
    """Axis labels and legend where some panel has data; where none has, no ticks or scales that would read as
    measured."""
    if any(panels.values()):
        for row in axes:
            row[0].set_ylabel(ylabel)
        last_with_data = max(col for col, rows in enumerate(panels.values()) if rows)
        axes[0][last_with_data].legend(fontsize=7)
    else:
        for ax in axes.flat:
            ax.set_xlabel("")
            ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()


def outcome_figure(path: Path, panels: dict[str, list[dict[str, Any]] | None], title: str) -> Path:
    """Outcome shares per patched layer, one panel per entry {title: intervention layer rows, or None where the
    pairs were too few to show any}."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        ax.set_title(name, fontsize=8)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        if rows is None:
            _no_data(ax, "n/a: too few pairs")
            ax.set_xticks([])
            continue
        for outcome in OUTCOMES:
            ax.plot([r["layer"] for r in rows], [100 * r[outcome] for r in rows], marker=".", label=outcome)
        ax.set_xlabel("patched layer (last = resid_post)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish_panels(fig, axes, panels, "% of pairs", title)
    return save_figure(fig, path)


def _mean_rows(rows_per_run: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Outcome shares averaged over runs, layer by layer."""
    return [{"layer": layer[0]["layer"], **{o: float(np.mean([r[o] for r in layer])) for o in OUTCOMES}} for layer in zip(*rows_per_run)]


def _panel_title(branch: str, interventions: list[dict[str, Any]]) -> str:
    """A branch's panel title with the pairs behind it: "image-text (180 of 200 pairs)", or per run, and how many
    runs were left out for too few pairs."""
    notes = _pairs_of_runs(interventions)
    left_out = sum(not enough_pairs(i) for i in interventions)
    suffix = f"; {left_out} of {len(interventions)} runs left out" if left_out and left_out < len(interventions) else ""
    return f"{branch}\n({notes}{suffix})"


def _analysed(results: dict[str, Any], branch: str) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["branch"] == branch and r["analysis"]]


def mechanism_figure(path: Path, results: dict[str, Any], n: str) -> Path:
    """Interchange outcome shares per layer of every branch, averaged over its runs with enough pairs."""
    panels = {}
    for branch in results["table"]:
        inters = [r["analysis"]["interventions"][n] for r in _analysed(results, branch)]
        if inters:
            good = [i["layers"] for i in inters if enough_pairs(i)]
            panels[_panel_title(branch, inters)] = _mean_rows(good) if good else None
    return outcome_figure(path, panels, f"Interchange interventions at the last token, N = {n}")


def knockout_figure(path: Path, panels: dict[str, list[dict[str, Any]] | None], title: str) -> Path:
    """Change (knockout - unmodified, in points) of the positional and symbolic intervention shares per knocked-out
    window, one line per edge set; one column per entry {title: knockout window rows, or None where the pairs were
    too few to show any}."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 5.8), sharex=True, sharey=True, squeeze=False)
    for col, (name, rows) in enumerate(panels.items()):
        for row, outcome in enumerate(("positional", "symbolic")):
            ax = axes[row][col]
            if rows is None:
                _no_data(ax, "n/a: too few pairs")
            for edge_set in dict.fromkeys(r["set"] for r in rows or ()):
                mine = [r for r in rows if r["set"] == edge_set]
                ax.plot([r["start"] for r in mine], [100 * r["labels_delta"][outcome] for r in mine], marker=".", label=edge_set)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{name}: Δ {outcome}", fontsize=8)
            ax.grid(alpha=0.3)
        axes[1][col].set_xlabel("first layer of the knocked-out window")
        axes[1][col].xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish_panels(fig, axes, panels, "Δ % of pairs", title)
    return save_figure(fig, path)


def _mean_windows(knockouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Knockout windows with labels_delta averaged over runs (their sets and windows are the same)."""
    return [
        {"set": w[0]["set"], "start": w[0]["start"], "labels_delta": {o: float(np.mean([r["labels_delta"][o] for r in w])) for o in OUTCOMES}}
        for w in zip(*[k["windows"] for k in knockouts])
    ]


def _has_labels(run: dict[str, Any]) -> bool:
    """Whether a run's knockouts carry label shares (analyses written before they existed do not)."""
    knockouts = run["analysis"]["knockouts"]
    return bool(knockouts) and "labels_baseline" in knockouts


def knockout_label_figure(path: Path, results: dict[str, Any]) -> Path | None:
    """The knockouts' change of the outcome shares per branch, averaged over its runs with enough pairs."""
    panels, first = {}, None
    for branch in results["table"]:
        runs = [r for r in _analysed(results, branch) if _has_labels(r)]
        if runs:
            first = first or runs[0]["analysis"]["knockouts"]
            good = [r["analysis"]["knockouts"] for r in runs if enough_pairs(_first_interventions(r))]
            panels[_panel_title(branch, [_first_interventions(r) for r in runs])] = _mean_windows(good) if good else None
    if not panels:
        return None
    return knockout_figure(path, panels, _knockout_title(first))


def _knockout_title(knockouts: dict[str, Any]) -> str:
    return f"Attention knockouts ({knockouts['window']}-layer windows): change of the interchange outcomes patched at layer {knockouts['label_layer']}"


def _chance_line(ax, share: float, label: str) -> None:
    ax.axhline(100 * share, color="grey", linestyle=":", linewidth=1)
    ax.annotate(label, (1, 100 * share), xycoords=("axes fraction", "data"), xytext=(-2, 2), textcoords="offset points",
                ha="right", va="bottom", fontsize=7, color="grey")  # fmt: skip


def probe_figure(path: Path, results: dict[str, Any], n: str) -> Path:
    """The bound colour (solid) and its control, the previous pair's colour (dashed), decodable at the shape
    positions, one colour per branch, against chance (1 / colours)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    handles = []
    for index, branch in enumerate(results["table"]):
        runs = _analysed(results, branch)
        if not runs:
            continue
        colour = f"C{index % 10}"
        for target, style in (("bound", "-"), ("previous", "--")):
            acc = _mean_over_runs(runs, lambda r: r["analysis"]["probes"][n]["accuracy"][target])
            ax.plot(range(len(acc)), 100 * acc, color=colour, linestyle=style, marker="." if style == "-" else None)
        handles.append(Line2D([], [], color=colour, label=branch))
    handles += [Line2D([], [], color="black", label="bound colour"), Line2D([], [], color="black", linestyle="--", label="previous colour (control)")]
    colours = (results.get("vocab") or {}).get("colours")
    if colours:
        _chance_line(ax, 1 / colours, f"chance 1/{colours}")
    _probe_axes(ax, f"Colour decodable at shape positions, N = {n}", handles=handles)
    return save_figure(fig, path)


def analysis_probe_figure(path: Path, probes: dict[str, Any], vocab: dict[str, int] | None) -> Path:
    """Every probe of `binding analyze` per layer, each with its chance level (dotted, in its colour)."""
    import matplotlib.pyplot as plt

    n = probes["n"]
    classes = {"bound": "colours", "previous": "colours", "index": None, "query_shape": "shapes", "query_index": None}
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for index, (target, acc) in enumerate(probes["accuracy"].items()):
        colour = f"C{index % 10}"
        ax.plot(range(len(acc)), [100 * a for a in acc], color=colour, marker=".", label=target)
        kind = classes.get(target, "")
        count = n if kind is None else (vocab or {}).get(kind)
        if count:
            ax.axhline(100 / count, color=colour, linestyle=":", linewidth=1)
    ax.plot([], [], color="grey", linestyle=":", label="chance (1 / classes)")
    _probe_axes(ax, f"Linear probes, N = {n}")
    return save_figure(fig, path)


def _probe_axes(ax, title: str, handles=None) -> None:
    """The axes of a probe-accuracy-per-layer figure: integer layers, 0..100 %, the legend outside on the right."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 102)
    ax.set_xlabel("layer (resid_pre; last = resid_post)")
    ax.set_ylabel("probe accuracy %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def analysis_figures(result: dict[str, Any], figures: Path, link_base: Path) -> list[Path]:
    """The figures of `stitchkit binding analyze`: outcome shares per N, every probe per layer, and the
    knockouts' change of the outcome shares; panel titles give the pairs behind them."""
    figures.mkdir(parents=True, exist_ok=True)
    panels = {f"N = {n} ({pairs_note(inter)})": inter["layers"] if enough_pairs(inter) else None for n, inter in result["interventions"].items()}
    out = [outcome_figure(figures / "interventions.png", panels, f"Interchange interventions: {result['model']}")]
    probes = next(iter(result["probes"].values()))
    out.append(analysis_probe_figure(figures / "probes.png", probes, result.get("vocab")))
    knockouts = result["knockouts"]
    if knockouts and knockouts["windows"]:
        inter = result["interventions"][str(knockouts["n"])]
        rows = knockouts["windows"] if enough_pairs(inter) else None
        out.append(knockout_figure(figures / "knockouts.png", {f"N = {knockouts['n']} ({pairs_note(inter)})": rows}, _knockout_title(knockouts)))
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
        mechanism = {"sym@0 %": 100 * layers[0]["symbolic"], "refl@post %": 100 * layers[-1]["reflexive"],
                     "R per layer": " ".join(f"{row['ratio']:.1f}" for row in layers[1:-1])}  # fmt: skip
        if not enough_pairs(inter):
            mechanism = {"sym@0 %": "n/a", "refl@post %": "n/a", "R per layer": f"n/a ({pairs_note(inter)})"}
        rows.append(
            {
                "seed": r["seed"], "branch": r["branch"], "encoder": r["encoder"] or "", "pairs": inter["pairs"], **mechanism,
                "signature": f"{'yes' if sig['present'] else 'no'} ({sig['strength']:.2f})",
                "largest knockout drop": "–" if worst is None else f"{worst['set']} L{worst['layers'][0]}-{worst['layers'][1]}: {100 * worst['delta']:+.0f}",
            }
        )  # fmt: skip
    return rows


def _run_name(run: dict[str, Any]) -> str:
    return f"{run['branch']} (seed {run['seed']}{', ' + run['encoder'] if run['encoder'] else ''})"


def not_learned_line(results: dict[str, Any], n: str) -> str | None:
    """One warning line for every analysed run whose interventions at N rest on too few pairs."""
    few = [(r, r["analysis"]["interventions"][n]) for r in results["runs"] if r["analysis"] and not enough_pairs(r["analysis"]["interventions"][n])]
    if not few:
        return None
    if len(few) == 1:
        return not_learned_warning(few[0][1], f"the model of {_run_name(few[0][0])}")
    counts = "; ".join(f"{_run_name(r)} {i['pairs']} of {i['candidates']}" for r, i in few)
    return (f"{len(few)} models answer too few candidate pairs right on both sides at N = {n} ({counts}): they have not "
            f"learned the task at that N, so their mechanism shares are not meaningful (n/a; left out of mean R and the figures)")


def noise_line(results: dict[str, Any], cfg) -> str:
    """The noise actually drawn (noise.span null means the encoders' token count), and a warning if it is too little."""
    span, hi = results["noise_span"], results["train_objects"][1]
    if cfg.noise.span is not None:
        source = "noise.span"
    else:  # null: the encoders' token count, or the paper's 196 when no branch uses an encoder (experiment.noise_span)
        source = "the encoders' token count (noise.span: null)" if results["gates"] else "the paper's 196 image tokens (noise.span: null, no encoder)"
    text = (f"Noise: K ~ U{{0..span − 2N}} position gaps with span = {span}, {source}: at most {noise_room(span, hi)} "
            f"positions at the largest trained N = {hi}.\n")
    note = noise_warning(span, hi)
    return text + (f"\n**Warning:** {note}.\n" if note else "")


def hop_practice_line(cfg) -> str:
    """Hop practice is not in the paper: a run that uses it says so next to its mechanisms (docs/binding.md)."""
    used = cfg.hop_practice()
    if not used:
        return ""
    shares = ", ".join(f"{share:g} in {stage}" for stage, share in used.items())
    branches = [b for b, stages in cfg.branches.items() if any(s in used for s in stages)]
    return (f"**Hop practice** (not in the paper): a share of the text examples ({shares}) asks one hop of the task "
            f"alone; the models of {', '.join(branches)} were trained with it.\n\n")


def gate_markdown(results: dict[str, Any], run_root: Path, link_base: Path) -> str:
    """The separability gate per encoder, and the encoder's sample context images."""
    parts = ["\nSeparability gate (§3: ridge probe on mean-pooled patch tokens of single-object images, tested on the "
             "held-out fifth; pass ≥ 95% on both):\n\n"]  # fmt: skip
    gate_rows = [{"encoder": name, "spec": g["encoder"], "colours": g["colours"], "shapes": g["shapes"], "test images": g.get("test_images"),
                  "colour acc %": 100 * g["colour_accuracy"], "shape acc %": 100 * g["shape_accuracy"],
                  "passed": "yes" if g["passed"] else "**no**"} for name, g in results["gates"].items()]  # fmt: skip
    parts.append(markdown_table(gate_rows, digits=1))
    samples = [(name, run_root / "images" / name / "sample.png") for name in results["gates"]]
    links = [f"[{name}]({path.relative_to(link_base)})" for name, path in samples if path.is_file()]
    if links:
        parts.append(f"\nSample context images (as the encoder sees them): {', '.join(links)}.\n")
    return "".join(parts)


def results_markdown(run_root: Path, results: dict[str, Any], cfg, figures: Path, link_base: Path, heading: str = "##") -> str:
    """The run's report body: `run_root` the run folder, `figures` where figures go, `link_base` what links are
    relative to (the run folder, or the quickstart's folder above it)."""
    figures.mkdir(parents=True, exist_ok=True)
    lo, hi = results["train_objects"]
    ranges = results.get("ood_ranges") or {"ood": [hi + 1, "…"], "ood_far": None}  # results from before ood_ranges
    spans = [f"ID (N = {lo}..{hi})"] + [f"{what} (N = {r[0]}..{r[1]})" for what, r in (("OOD", ranges["ood"]), ("far OOD", ranges["ood_far"])) if r]
    parts = [f"{heading} Binding: indirect retrieval, {', '.join(spans)} text accuracy\n\n"]
    parts.append("Final stage of each branch; mean ± sd over seeds × encoders. R = symbolic / positional share of "
                 "interchange outcomes at the last block's input (paper: < 1 text-only, > 1 after images), over runs "
                 "whose model answers enough counterfactual pairs right. The paper's OOD numbers are for its 12-layer "
                 "model at full scale, shown for orientation only.\n\n")  # fmt: skip
    parts.append(markdown_table(table_rows(results, cfg.branches), digits=1))
    if results.get("diverged"):
        parts.append("\nDiverged (left out of the table and everything below; its last checkpoint stays in the stage folder):\n\n")
        parts.append(markdown_table([{"seed": r["seed"], "branch": r["branch"], "encoder": r["encoder"] or "",
                                      **r["diverged"]} for r in results["diverged"]]))  # fmt: skip
    figure = accuracy_figure(figures / "binding_accuracy_vs_n.png", results)
    parts.append(f"\n![accuracy vs N]({figure.relative_to(link_base)})\n")
    if cfg.uses_noise() and "noise_span" in results:
        parts.append("\n" + noise_line(results, cfg))
    if results["gates"]:
        parts.append(gate_markdown(results, run_root, link_base))
    parts.append("\n\nEvery stage:\n\n" + markdown_table(stage_rows(results), digits=1))
    analysed = [r for r in results["runs"] if r["analysis"]]
    if analysed:
        n = next(iter(analysed[0]["analysis"]["interventions"]))
        parts.append(f"\n\n{heading}# Mechanisms (N = {n})\n\n")
        parts.append(hop_practice_line(cfg))
        warning = not_learned_line(results, n)
        if warning:
            parts.append(f"**Warning:** {warning}.\n\n")
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
                         "and the patched forward, against the same pairs unmodified (mean over runs with enough pairs).\n")  # fmt: skip
            parts.append(f"\n![knockout labels]({figure.relative_to(link_base)})\n")
    else:
        parts.append("\n" + hop_practice_line(cfg))
    return "".join(parts)


def write_report(run: RunDir, cfg, results: dict[str, Any]) -> Path:
    text = f"# {cfg.name}\n\n{cfg.description}\n\n" + results_markdown(run.root, results, cfg, run.root / "figures", run.root)
    path = run.path("report.md")
    atomic_write_text(path, text)
    return path
