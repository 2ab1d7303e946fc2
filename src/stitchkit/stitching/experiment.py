"""Entry points shared by the CLI, the quickstart and Python users: config file in, report out."""

from __future__ import annotations

import os
from pathlib import Path

from stitchkit.config import load_config
from stitchkit.stitching.config import StitchRunConfig, TreeConfig


def run_sweep(config: str | os.PathLike | StitchRunConfig, out: str | os.PathLike, command: str | None = None) -> Path:
    """Run (or resume) a stitching sweep; returns the path of report.md."""
    from stitchkit.stitching.protocol import Sweep
    from stitchkit.stitching.report import write_sweep_outputs

    cfg = config if isinstance(config, StitchRunConfig) else load_config(StitchRunConfig, config)
    sweep = Sweep(cfg, out, command=command)
    results = sweep.run_all()
    return write_sweep_outputs(Path(out), cfg, sweep.data.description, results)


def run_tree(config: str | os.PathLike | TreeConfig, out: str | os.PathLike, command: str | None = None) -> Path:
    """Run (or resume) a VFM Stitch Tree experiment; returns the path of report.md."""
    from stitchkit.stitching.tree_run import TreeExperiment, write_tree_outputs

    cfg = config if isinstance(config, TreeConfig) else load_config(TreeConfig, config)
    experiment = TreeExperiment(cfg, out, command=command)
    results = experiment.run_all()
    return write_tree_outputs(Path(out), cfg, experiment.data.description, results)
