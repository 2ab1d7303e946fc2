"""The stitching section of `stitchkit quickstart`: configs/stitch/quickstart.yaml on the micro zoo."""

from __future__ import annotations

import re

from stitchkit.paths import CONFIGS
from stitchkit.runs import RunDir

QUICKSTART_CONFIG = CONFIGS / "stitch" / "quickstart.yaml"


def quickstart(run: RunDir) -> str:
    """Run (or resume) the quickstart sweep in RUN/stitching and return its report as a markdown section."""
    from stitchkit.stitching.experiment import run_sweep

    folder = run.path("stitching", ".")
    report = run_sweep(QUICKSTART_CONFIG, folder, command="stitchkit quickstart").read_text()
    # One level deeper in the combined report, with figure links relative to the quickstart folder.
    report = re.sub(r"^(#+) ", r"#\1 ", report, flags=re.MULTILINE)
    return report.replace("](figures/", "](stitching/figures/")
