"""Shapes-world throughput: scenes rendered per second, and classification-set images per second.

Run: `.venv/bin/python -m benchmarks.bench_world` (or through `python -m benchmarks`).
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.table import Table

from stitchkit.world import WorldConfig, classification_set, render_scene, sample_scene, segmentation_set


def _images_per_second(fn, n: int) -> float:
    start = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - start)


def _render_scenes(size: int, background: str):
    cfg = WorldConfig(background=background)

    def run(n: int) -> None:
        rng = np.random.default_rng(0)
        for _ in range(n):
            render_scene(sample_scene(rng, cfg), size, cfg)

    return run


def main(quick: bool = False) -> list[dict]:
    scale = 0.2 if quick else 1.0
    cases = [
        ("render_scene (1-4 objects)", "64 px, plain", _render_scenes(64, "plain"), 2000),
        ("render_scene (1-4 objects)", "64 px, noise", _render_scenes(64, "noise"), 2000),
        ("render_scene (1-4 objects)", "224 px, plain", _render_scenes(224, "plain"), 500),
        ("render_scene (1-4 objects)", "224 px, texture", _render_scenes(224, "texture"), 500),
        ("classification_set (both)", "32 px", lambda n: classification_set(n, 32, 0, "both"), 20000),
        ("classification_set (both)", "64 px", lambda n: classification_set(n, 64, 0, "both"), 20000),
        ("segmentation_set", "64 px", lambda n: segmentation_set(n, 64, 0), 2000),
    ]
    rows = []
    for name, setting, fn, n in cases:
        n = max(1, int(n * scale))
        rows.append({"benchmark": name, "setting": setting, "images": n, "images_per_s": _images_per_second(fn, n)})

    table = Table(title="shapes world throughput (one process)")
    for column in ("benchmark", "setting", "images", "images/s"):
        table.add_column(column, justify="right" if column in ("images", "images/s") else "left")
    for row in rows:
        table.add_row(row["benchmark"], row["setting"], str(row["images"]), f"{row['images_per_s']:,.0f}")
    Console().print(table)
    return rows


if __name__ == "__main__":
    main()
