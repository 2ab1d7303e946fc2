"""Tables and figures of a patches run: the paper-style table, curves over training, the §5 analyses (patch
localization, Threshold-x) when the run has them, the moderation study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stitchkit.patches.dataset import cut_patches
from stitchkit.patches.stitch import stitch_cells
from stitchkit.report import image_grid, markdown_table
from stitchkit.runs import RunDir, atomic_write_text, save_figure

METRICS = {
    "image_logit": "image-based, first-token logit",
    "reference_logit": "reference-based, first-token logit",
    "image_logprob": "image-based, full log-prob",
    "reference_logprob": "reference-based, full log-prob",
}

PRECHECK_RULES = {"logit": "first-token logit", "logprob": "full log-prob"}


def _cell(split: dict[str, Any], metric: str) -> str:
    mean, std = split["final_mean"].get(metric), split["final_std"].get(metric)
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if len(split.get("seeds", {})) > 1 else f"{mean:.2f}"


def detailed_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for set_name, s in results["sets"].items():
        for f, split in s["splits"].items():
            row = {"set": set_name, "f": f, "patches": split["train_samples"], "steps": split["steps"],
                   "reported step": split.get("final_step", split["steps"]), "epochs": f"{split['epochs']:g}"}  # fmt: skip
            row.update({label: _cell(split, metric) for metric, label in METRICS.items()})
            row["random"] = s["random_baseline"]
            rows.append(row)
    return rows


def paper_rows(results: dict[str, Any], scoring: str = "logit") -> list[dict[str, Any]]:
    """The paper's Fig. 2 layout: per set, the mean rank (± std over seeds) at f = 1/2/4/... for reference and
    image tests."""
    rows = []
    for set_name, s in results["sets"].items():
        splits = s["splits"]
        label = "/".join(str(f) for f in splits)
        row = {"set": set_name, "K": s["k"], "random": s["random_baseline"]}
        for mode in ("reference", "image"):
            row[f"{mode} (f={label})"] = " / ".join(_cell(splits[f], f"{mode}_{scoring}") for f in splits)
        rows.append(row)
    return rows


Lines = dict[str, tuple[list[float], dict[str, list[float]]]]  # {label: (xs, {mode: mean ranks})}


def mode_panels(path: Path, set_name: str, lines: Lines, xlabel: str, random: float, xticks: list[float] | None = None,
                marks: Lines | None = None, mark_label: str = "") -> Path:  # fmt: skip
    """Image-based and reference-based panels side by side, one line per label; y from 0 (the best rank). `xticks`:
    ticks at exactly these values (integer x such as thresholds); `marks`: one ringed point per line (same labels)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, mode in zip(axes, ("image", "reference")):
        for label, (xs, ys) in lines.items():
            (line,) = ax.plot(xs, ys[mode], marker="o", markersize=3, label=label)
            if marks and label in marks:
                mark_x, mark_y = marks[label]
                ax.plot(mark_x, mark_y[mode], marker="o", markersize=9, markerfacecolor="none", linestyle="none", color=line.get_color())
        if marks:  # one legend entry for the rings of every line
            ax.plot([], [], marker="o", markersize=9, markerfacecolor="none", linestyle="none", color="black", label=mark_label)
        ax.axhline(random, color="grey", linestyle="--", linewidth=1, label="random (K-1)/2")
        ax.set_title(f"{set_name}: {mode}-based")
        ax.set_xlabel(xlabel)
        if xticks is not None:
            ax.set_xticks(xticks)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)  # mean ranks are >= 0: differences keep their size next to the random line
    axes[0].set_ylabel("mean rank of the true ID (first-token logit)")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


def curves_figure(path: Path, set_name: str, s: dict[str, Any]) -> Path:
    """Mean rank (seed mean) over training epochs, one line per split factor, the reported evaluation point (the
    tables' `reported step`) ringed; image and reference panels."""
    lines, marks = {}, {}
    for f, split in s["splits"].items():
        curve = split["mean_curve"]
        lines[f"f={f}"] = ([p["epoch"] for p in curve], {mode: [p[f"{mode}_logit"] for p in curve] for mode in ("image", "reference")})
        reported = [p for p in curve if p["step"] == split.get("final_step", split["steps"])]
        marks[f"f={f}"] = ([p["epoch"] for p in reported], {mode: [p[f"{mode}_logit"] for p in reported] for mode in ("image", "reference")})
    return mode_panels(path, set_name, lines, "epoch", s["random_baseline"], marks=marks, mark_label="reported step")


def localization_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """§5 patch localization: per set and split factor, the mean rank of the true name given one patch."""
    return [{"set": set_name, "f": f, "patches": loc["patches"], "mean rank given one patch": loc["mean_rank"],
             "random": loc["random"], "ranked by": PRECHECK_RULES[loc["rule"]]}
            for set_name, s in results["sets"].items() for f, loc in s.get("localization", {}).items()]  # fmt: skip


def localization_figure(path: Path, set_name: str, localization: dict[str, Any]) -> Path:
    """The paper's Fig. 4 before fine-tuning: mean rank of the true name given one patch vs the split factor, on a
    log2 axis with a tick at every f; y from 0 (the best rank) up to at least the random line."""
    import matplotlib.pyplot as plt

    fs = sorted(int(f) for f in localization)
    ranks = [localization[str(f)]["mean_rank"] for f in fs]
    random = localization[str(fs[0])]["random"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(fs, ranks, marker="o", label=set_name)
    ax.axhline(random, color="grey", linestyle="--", linewidth=1, label="random (K-1)/2")
    ax.set_xscale("log", base=2)
    ax.set_xticks(fs, [str(f) for f in fs])
    ax.minorticks_off()
    ax.set_ylim(0, max(random, *ranks) * 1.08)
    ax.set_xlabel("split factor f (f x f patches)")
    ax.set_ylabel("mean rank of the true name")
    ax.set_title(f"{set_name}: patch localization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def threshold_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """§5 Threshold-x: per set, x and split factor, the patches kept and the final mean ranks."""
    rows = []
    for set_name, s in results["sets"].items():
        for x, per_split in s.get("threshold_x", {}).items():
            for f, t in per_split.items():
                row = {"set": set_name, "x": x, "f": f, "patches kept": f"{t['patches_kept']}/{t['patches_total']}"}
                if "final_mean" in t:
                    row.update({"reference rank": _cell(t, "reference_logit"), "image rank": _cell(t, "image_logit"),
                                "trained in": f"`{t['trained_in']}`"})  # fmt: skip
                else:
                    row["reference rank"] = t["note"]
                rows.append(row)
    return rows


def threshold_figure(path: Path, set_name: str, s: dict[str, Any]) -> Path | None:
    """The paper's Fig. 5: final mean rank (seed mean) vs x, one line per split factor, a tick at every x; image
    and reference panels. None (no figure) when no threshold trained anything: the table says why."""
    lines = {}
    for f in dict.fromkeys(f for per_split in s["threshold_x"].values() for f in per_split):
        trained = [(int(x), per_split[f]["final_mean"]) for x, per_split in s["threshold_x"].items() if "final_mean" in per_split.get(f, {})]
        if trained:
            lines[f"f={f}"] = ([x for x, _ in trained], {mode: [m[f"{mode}_logit"] for _, m in trained] for mode in ("image", "reference")})
    if not lines:
        return None
    return mode_panels(path, set_name, lines, "threshold x (patches whose name ranks < x dropped)", s["random_baseline"],
                       xticks=sorted(int(x) for x in s["threshold_x"]))  # fmt: skip


def analyses_sections(results: dict[str, Any], figures: Path, link_base: Path) -> str:
    """The §5 analyses the run has (none: an empty string)."""
    text = ""
    rows = localization_rows(results)
    if rows:
        text += ("\n### Patch localization before fine-tuning (§5, Fig. 4)\n\nMean rank of the true name among all names "
                 "given a single patch with the recognition prompt, over all patches of each split factor (ranked as "
                 "the recognition pre-check ranks).\n\n" + markdown_table(rows, digits=2))  # fmt: skip
        for set_name, s in results["sets"].items():
            if s.get("localization"):
                figure = localization_figure(figures / f"patches_localization_{set_name}.png", set_name, s["localization"])
                text += f"\n![{set_name} patch localization]({figure.relative_to(link_base)})\n"
    rows = threshold_rows(results)
    if rows:
        text += ("\n### Threshold-x (§5, Fig. 5)\n\nTrained only on the patches whose true name ranks >= x given the patch "
                 "alone (the localization ranks); last evaluation point, mean ± std over seeds, first-token logit. "
                 "A threshold that drops no patch is the main training (`trained in`).\n\n" + markdown_table(rows))  # fmt: skip
        for set_name, s in results["sets"].items():
            figure = threshold_figure(figures / f"patches_threshold_{set_name}.png", set_name, s) if s.get("threshold_x") else None
            if figure is not None:
                text += f"\n![{set_name} Threshold-x]({figure.relative_to(link_base)})\n"
    return text


def stitched_with_holes(image: Image.Image, f: int, cells: list[dict[str, Any]]) -> np.ndarray:
    """The stitch tool's view (stitch.py) of the patches that pass the filter: every flagged cell black."""
    passed = {(cell["row"], cell["col"]) for cell in cells if not cell["flagged"]}
    kept = {(p.row, p.col): p.image for p in cut_patches(image, f) if (p.row, p.col) in passed}
    return np.asarray(stitch_cells(kept, f, (image.width // f, image.height // f)))


def moderation_sections(run_root: Path, moderation: dict[str, Any], figures: Path, link_base: Path) -> str:
    import json

    rates = moderation["pass_rates"]
    rows = [{"f": f, "A and B patches passing": f"{r['passed']}/{r['total']} ({r['rate']:.0%})",
             "benign (C) passing": f"{moderation['benign_pass_rates'][f]['passed']}/{moderation['benign_pass_rates'][f]['total']}"}
            for f, r in rates.items()]  # fmt: skip
    text = "### Moderation filter: pass rates\n\n" + markdown_table(rows)

    verdicts = json.loads((run_root / "moderation" / "filter.json").read_text())["verdicts"]
    example = sorted(k for k in verdicts["1"] if k[0] == "A")[:1]
    if example:
        image = Image.open(run_root / "moderation" / "images" / f"{example[0]}.png")
        panels = [np.asarray(image.convert("RGB"))] + [stitched_with_holes(image, int(f), verdicts[f][example[0]]) for f in verdicts]
        titles = ["original"] + [f"f={f}: {sum(not c['flagged'] for c in verdicts[f][example[0]])}/{len(verdicts[f][example[0]])} pass" for f in verdicts]
        grid = image_grid(figures / "patches_moderation_filter.png", panels, titles, cols=len(panels))
        text += f"\nWhat passes the filter (flagged patches black), image {example[0]}:\n\n![filter]({grid.relative_to(link_base)})\n"

    arrangements = "; ".join(f"{a} = " + ", ".join(f"{category} {label}" for category, label in v["labels"].items())
                             for a, v in moderation["arrangements"].items())  # fmt: skip
    text += (
        "\n### Adversarial labels\n\nMean rank of the attacker's label (K = 2, random "
        f"{moderation['random_baseline']}) for full images (img) and descriptions (ref), its probability (softmax "
        "over the two labels' first-token logits; random 0.5), and the attacker-label rate: the fraction of items "
        "whose top label (first-token logit) is the attacker's, a tie between the two labels counting half (random "
        f"0.5). Arrangements (category and the attacker's label): {arrangements}.\n\n"
        + markdown_table(moderation_rows(moderation))
    )
    return text


MODERATION_METRICS = (("reference_logit", "ref rank"), ("image_logit", "img rank"), ("reference_prob", "ref prob"),
                      ("image_prob", "img prob"), ("reference_attacker_rate", "ref attacker-label rate"),
                      ("image_attacker_rate", "img attacker-label rate"))  # fmt: skip


def moderation_rows(moderation: dict[str, Any]) -> list[dict[str, Any]]:
    """§6 "both rank and prob are reported": per arrangement, split and training variant, the attacker's label's
    mean rank and probability, and its attacker-label rate (mean ± std over seeds)."""
    rows = []
    for arrangement, a in moderation["arrangements"].items():
        for f, variants in a["splits"].items():
            for variant, v in variants.items():
                row = {"arrangement": arrangement, "f": f, "training": variant, "patches": v["train_samples"]}
                if "final_mean" in v:
                    m, sd, many = v["final_mean"], v["final_std"], len(v["seeds"]) > 1
                    for key, label in MODERATION_METRICS:
                        row[label] = f"{m[key]:.2f} ± {sd[key]:.2f}" if many else f"{m[key]:.2f}"
                else:
                    row["ref rank"] = v.get("note", "–")
                rows.append(row)
    return rows


def results_markdown(run_root: Path, results: dict[str, Any], figures: Path, link_base: Path, heading: str = "##") -> str:
    """The results of the run in `run_root` as markdown; figures are written to `figures` and linked
    relative to `link_base` (the folder of the markdown file)."""
    figures.mkdir(parents=True, exist_ok=True)
    parts = [f"{heading} Visual stitching: mean rank of the true ID (model `{results['model']}`)\n"]
    parts.append("Last evaluation point (`reported step`: with `step_rule: epochs` the HF Trainer's last evaluation, "
                 "which may come before the end of training), mean over seeds (± population std where there are several); "
                 "lower is better; random = (K-1)/2.\n")
    parts.append(markdown_table(paper_rows(results)))
    parts.append("\n" + markdown_table(detailed_rows(results)))
    prechecks = [{"set": n, "recognition mean rank": s["precheck"]["mean_rank"], "random": s["precheck"]["random"],
                  "ranked by": PRECHECK_RULES[s["precheck"].get("rule", "logprob")]}
                 for n, s in results["sets"].items() if s.get("precheck")]  # fmt: skip
    if prechecks:
        parts.append("\nRecognition before fine-tuning (rank of the true name given the full image; first-token logit as "
                     "the official code, or full log-prob where names share a first token):\n\n")
        parts.append(markdown_table(prechecks, digits=2))
        weak = [row["set"] for row in prechecks if row["recognition mean rank"] > 1]
        if weak:  # §9: a model that cannot name the images has no link for reference-based stitching to use
            parts.append(f"\n**Warning**: recognition mean rank > 1 for {', '.join(weak)}: the model cannot tell these "
                         "images apart by name before fine-tuning, so reference-based stitching is not expected.\n")
    for set_name, s in results["sets"].items():
        figure = curves_figure(figures / f"patches_curves_{set_name}.png", set_name, s)
        parts.append(f"\n![{set_name} curves]({figure.relative_to(link_base)})\n")
    parts.append(analyses_sections(results, figures, link_base))
    if results.get("moderation"):
        parts.append("\n" + moderation_sections(run_root, results["moderation"], figures, link_base))
    return "".join(parts)


def write_report(run: RunDir, cfg, results: dict[str, Any]) -> Path:
    description = f"{cfg.description}\n\n" if cfg.description.strip() else ""
    text = f"# {cfg.name}\n\n{description}" + results_markdown(run.root, results, run.root / "figures", run.root)
    path = run.path("report.md")
    atomic_write_text(path, text)
    return path
