"""MIMIC's part of `stitchkit quickstart`: every experiment of configs/mimic/quickstart.yaml on the micro VLM and the
shapes world (CPU, about 3 minutes once the micro VLM is built), as one markdown section."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stitchkit.paths import CONFIGS
from stitchkit.runs import RunDir, atomic_write_bytes

QUICKSTART_CONFIG = CONFIGS / "mimic" / "quickstart.yaml"


def quickstart(run: RunDir, config: str | os.PathLike = QUICKSTART_CONFIG) -> str:
    """Run the experiments into run.root/mimic (resumable), copy their figures to run.root/figures/mimic_*.png,
    and return the report section."""
    from stitchkit.multiimage.experiment import experiment_markdown, load_experiment, run_experiment

    cfg = load_experiment(config)
    root = run_experiment(cfg, run.root / "mimic", command="stitchkit quickstart")
    results = json.loads((root / "results.json").read_text())

    def link(relative: str) -> str:
        target = run.path("figures", "mimic_" + Path(relative).name)
        atomic_write_bytes(target, (root / relative).read_bytes())
        return str(target.relative_to(run.root))

    return (
        "## MIMIC: where multi-image VLMs fail\n\n"
        "The controlled multi-image benchmark (counting, listing, common, odd-one) built from the shapes world, and "
        "the paper's experiments on the micro VLM: baseline, masked-attention LoRA fine-tuning with its layer "
        "ablation and FLOPs, 1-D token pooling with its pixel control, the image-stitching control and the "
        "inter- vs intra-image attention analysis. At this size the scores are a smoke test, not findings; "
        f"full results: `{root.relative_to(run.root)}/report.md`.\n\n"
        + experiment_markdown(results, level=3, link=link)
    )
