"""MIMIC generator speed at COCO scale: 10,000 samples from ~120k images / ~860k boxes, target <= 30 s on one core.

The annotations are synthetic (no COCO download here) but shaped like instances_train2017
(stitchkit.multiimage.synthetic). Stages are timed separately; the index is built once.

Run: `.venv/bin/python -m benchmarks.bench_mimic` (or `python -m benchmarks mimic`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stitchkit.multiimage.synthetic import synthetic_coco


def main() -> list[dict]:
    from stitchkit.data import load_coco
    from stitchkit.multiimage.config import MimicConfig
    from stitchkit.multiimage.generator import generate
    from stitchkit.multiimage.index import MimicIndex

    n_images = 120_000  # the full grid's rarer cells need COCO's size (12,000 images cannot fill them)
    rows = []

    def timed(stage: str, fn):
        start = time.perf_counter()
        out = fn()
        rows.append({"stage": stage, "seconds": time.perf_counter() - start})
        return out

    coco_dict = timed("synthesise annotations", lambda: synthetic_coco(n_images))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotations.json"
        n_boxes = len(coco_dict["annotations"])
        timed("write json", lambda: path.write_text(json.dumps(coco_dict)))
        coco_dict = None  # about a GB of Python objects, not needed once written
        coco = timed("load_coco (validate)", lambda: load_coco(path))
    config = MimicConfig()  # counting 4000 + listing 2000 + common 2000 + odd-one 2000 = 10,000
    index = timed("index (once)", lambda: MimicIndex.build(coco, config.filter))
    samples, stats = timed("generate 10,000 samples", lambda: generate(index, config))
    generate_seconds = rows[-1]["seconds"]

    table = Table(title=f"MIMIC generator: {n_images:,} images, {n_boxes:,} boxes (one process)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for row in rows:
        table.add_row(row["stage"], f"{row['seconds']:.2f}")
    console = Console()
    console.print(table)
    eligible = int(index.image_eligible.sum())
    console.print(f"image_strict filter keeps {eligible:,} of {index.n_images:,} images; "
                  f"{len(samples):,} samples ({len(samples) / generate_seconds:,.0f}/s); rejection rates: "
                  + ", ".join(f"{t} {s['rejection_rate']:.1%}" for t, s in stats["tasks"].items()))
    verdict = "PASS" if generate_seconds <= 30 else "FAIL"
    console.print(f"target: 10,000 samples in <= 30 s -> {verdict} ({generate_seconds:.1f} s)")
    return rows


if __name__ == "__main__":
    main()
