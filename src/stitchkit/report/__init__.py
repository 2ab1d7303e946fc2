"""Tables (markdown, CSV, JSON) and matplotlib figures shared by every suite.

Suites turn their results into rows (dicts) and call these; nothing here knows about a suite.
"""

from __future__ import annotations

import csv
import io
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless everywhere: CI, servers, the GPU machine
import matplotlib.pyplot as plt  # noqa: E402

from stitchkit.runs import atomic_write_text, save_figure  # noqa: E402


def format_cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table; columns default to the keys of the first row."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def line_plot(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    baseline: float | None = None,
    baseline_label: str = "chance",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One line per named series {name: (xs, ys)}, each named in the legend (a single one too: the legend says
    which task or model it is); an optional dashed horizontal baseline. `colors` {name: colour} fixes a series'
    colour across figures (MIMIC's tasks); the other series take matplotlib's cycle, without those colours.
    Integer x values (stitch points, split factors, image counts) get ticks at exactly those values, not at
    fractions between them."""
    from itertools import cycle

    from matplotlib.colors import to_hex

    colors = colors or {}
    taken = {to_hex(color) for color in colors.values()}
    spare = cycle([c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if to_hex(c) not in taken])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name, color=colors.get(name) or next(spare))
    _integer_ticks(ax, [x for xs, _ in series.values() for x in xs])
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=baseline_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series or baseline is not None:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _integer_ticks(ax, xs: Sequence[float], most: int = 12) -> None:
    """Ticks at the x values themselves when they are few integers; integer ticks when they are many."""
    from matplotlib.ticker import MaxNLocator

    values = sorted({float(x) for x in xs})
    if not values or any(not v.is_integer() for v in values):
        return
    if len(values) <= most:
        ax.set_xticks(values, [str(int(v)) for v in values])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def bar_plot(
    path: str | os.PathLike,
    groups: Mapping[str, Mapping[str, float]],
    *,
    ylabel: str,
    title: str = "",
) -> Path:
    """Grouped bars: {group: {bar name: value}} (e.g. {recipe: {trained: acc, random init: acc}})."""
    import numpy as np

    group_names = list(groups)
    bar_names = list(dict.fromkeys(k for g in groups.values() for k in g))
    width = 0.8 / max(len(bar_names), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(group_names) + 2), 3.6))
    x = np.arange(len(group_names))
    for i, bar in enumerate(bar_names):
        values = [groups[g].get(bar, float("nan")) for g in group_names]
        ax.bar(x + (i - (len(bar_names) - 1) / 2) * width, values, width, label=bar)
    ax.set_xticks(x, group_names)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def image_grid(path: str | os.PathLike, images: Sequence[Any], titles: Sequence[str] | None = None, cols: int = 4) -> Path:
    """A grid of images (PIL or uint8 arrays) with optional titles, e.g. sample scenes with captions."""
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(img)
        if titles:
            ax.set_title(textwrap.fill(titles[i], 32), fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
