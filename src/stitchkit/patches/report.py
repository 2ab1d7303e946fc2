"""Tables and figures of a patches run: the paper-style table, curves over training, the moderation study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
            row = {"set": set_name, "f": f, "patches": split["train_samples"], "steps": split["steps"], "epochs": split["epochs"]}
            row.update({label: _cell(split, metric) for metric, label in METRICS.items()})
            row["random"] = s["random_baseline"]
            rows.append(row)
    return rows


def paper_rows(results: dict[str, Any], scoring: str = "logit") -> list[dict[str, Any]]:
    """The paper's Fig. 2 layout: per set, the mean rank at f = 1/2/4/... for reference and image tests."""
    rows = []
    for set_name, s in results["sets"].items():
        splits = s["splits"]
        label = "/".join(str(f) for f in splits)
        row = {"set": set_name, "K": s["k"], "random": s["random_baseline"]}
        for mode in ("reference", "image"):
            row[f"{mode} (f={label})"] = "/".join(f"{splits[f]['final_mean'][f'{mode}_{scoring}']:.2f}" for f in splits)
        rows.append(row)
    return rows


def curves_figure(path: Path, set_name: str, s: dict[str, Any]) -> Path:
    """Mean rank (seed mean) over training epochs, one line per split factor; image and reference panels."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, mode in zip(axes, ("image", "reference")):
        for f, split in s["splits"].items():
            curve = split["mean_curve"]
            ax.plot([p["epoch"] for p in curve], [p[f"{mode}_logit"] for p in curve], marker="o", markersize=3, label=f"f={f}")
        ax.axhline(s["random_baseline"], color="grey", linestyle="--", linewidth=1, label="random (K-1)/2")
        ax.set_title(f"{set_name}: {mode}-based")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean rank of the true ID (first-token logit)")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


def stitched_with_holes(image: Image.Image, f: int, cells: list[dict[str, Any]]) -> np.ndarray:
    """The official stitch tool's view: the image with every flagged patch painted black."""
    pixels = np.asarray(image.convert("RGB")).copy()
    pw, ph = image.width // f, image.height // f
    for cell in cells:
        if cell["flagged"]:
            pixels[cell["row"] * ph : (cell["row"] + 1) * ph, cell["col"] * pw : (cell["col"] + 1) * pw] = 0
    return pixels


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

    rows = []
    for arrangement, a in moderation["arrangements"].items():
        for f, variants in a["splits"].items():
            for variant, v in variants.items():
                row = {"arrangement": arrangement, "f": f, "training": variant, "patches": v["train_samples"]}
                if "final_mean" in v:
                    m, sd, many = v["final_mean"], v["final_std"], len(v["seeds"]) > 1
                    for key, label in (("reference_logit", "ref rank"), ("image_logit", "img rank"),
                                       ("reference_attacker_rate", "ref attacker label"), ("image_attacker_rate", "img attacker label")):  # fmt: skip
                        row[label] = f"{m[key]:.2f} ± {sd[key]:.2f}" if many else f"{m[key]:.2f}"
                else:
                    row["ref rank"] = v.get("note", "–")
                rows.append(row)
    text += (
        "\n### Adversarial labels\n\nMean rank of the attacker's label (K = 2, random "
        f"{moderation['random_baseline']}) for full images (img) and descriptions (ref), and the fraction of items "
        "whose top label is the attacker's; arrangements: 1 = B safe / A unsafe, 2 = A safe / B unsafe, "
        "3 = A and B safe / C unsafe.\n\n" + markdown_table(rows)
    )
    return text


def results_markdown(run_root: Path, results: dict[str, Any], figures: Path, link_base: Path, heading: str = "##") -> str:
    """The results of the run in `run_root` as markdown; figures are written to `figures` and linked
    relative to `link_base` (the folder of the markdown file)."""
    figures.mkdir(parents=True, exist_ok=True)
    parts = [f"{heading} Visual stitching: mean rank of the true ID (model `{results['model']}`)\n"]
    parts.append("Last evaluation point, mean ± std over seeds; lower is better; random = (K-1)/2.\n")
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
    if results.get("moderation"):
        parts.append("\n" + moderation_sections(run_root, results["moderation"], figures, link_base))
    return "".join(parts)


def write_report(run: RunDir, cfg, results: dict[str, Any]) -> Path:
    text = f"# {cfg.name}\n\n{cfg.description}\n\n" + results_markdown(run.root, results, run.root / "figures", run.root)
    path = run.path("report.md")
    atomic_write_text(path, text)
    return path
