"""The patches suite's part of `stitchkit quickstart`: configs/patches/quickstart.yaml on the micro VLM, on CPU."""

from __future__ import annotations

import json

from stitchkit.config import load_config
from stitchkit.paths import CONFIGS
from stitchkit.patches.config import PatchesConfig
from stitchkit.patches.experiment import run_patches
from stitchkit.patches.report import results_markdown
from stitchkit.runs import RunDir

CONFIG = CONFIGS / "patches" / "quickstart.yaml"


def quickstart(run: RunDir) -> str:
    cfg = load_config(PatchesConfig, CONFIG)
    folder = run.root / "patches"
    run_patches(cfg, folder, command="stitchkit quickstart")
    results = json.loads((folder / "results.json").read_text())
    return (
        results_markdown(folder, results, run.root / "figures", run.root)
        + f"\nConfig `configs/patches/quickstart.yaml`; the full run folder is `{folder.relative_to(run.root)}/`.\n"
    )
