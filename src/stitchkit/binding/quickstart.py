"""The binding suite's part of `stitchkit quickstart`: configs/binding/quickstart.yaml on CPU."""

from __future__ import annotations

import json

from stitchkit.binding.config import BindingConfig
from stitchkit.binding.experiment import run_binding
from stitchkit.binding.report import results_markdown
from stitchkit.config import load_config
from stitchkit.paths import CONFIGS
from stitchkit.runs import RunDir

CONFIG = CONFIGS / "binding" / "quickstart.yaml"


def quickstart(run: RunDir) -> str:
    cfg = load_config(BindingConfig, CONFIG)
    folder = run.root / "binding"
    run_binding(cfg, folder, command="stitchkit quickstart")
    results = json.loads((folder / "results.json").read_text())
    return (
        results_markdown(folder, results, cfg, run.root / "figures", run.root)
        + f"\nConfig `configs/binding/quickstart.yaml`; the full run folder is `{folder.relative_to(run.root)}/`.\n"
    )
