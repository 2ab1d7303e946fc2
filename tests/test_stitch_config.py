"""The shipped stitching configs: they validate, and they load only models their pairs use."""

from __future__ import annotations

from pathlib import Path

import pytest

from stitchkit.config import load_config
from stitchkit.stitching.config import StitchRunConfig

CONFIGS = Path(__file__).parents[1] / "configs" / "stitch"


@pytest.mark.parametrize("name", ["paper.yaml", "paper_segmentation.yaml"])
def test_paper_configs_list_only_models_their_pairs_use(name):
    """Every listed model is loaded and gets a linear probe (one ViT-L pass per split, a probe lr sweep), so a model
    no pair uses costs a run for nothing and may need a checkpoint the user cannot get (DINOv3 is gated)."""
    cfg = load_config(StitchRunConfig, CONFIGS / name)
    paired = {model for pair in cfg.cross_pairs() for model in pair}
    assert set(cfg.models) == paired
    assert set(cfg.image_size) <= paired


def test_paper_config_runs_the_spec_baselines():
    """Spec §2: TLT from a random S and LFM->TLT beside the recipe FFM->TLT, and self-stitches and probes."""
    cfg = load_config(StitchRunConfig, CONFIGS / "paper.yaml")
    assert {"tlt", "ffm_tlt", "lfm_tlt"} <= set(cfg.objectives)
    assert cfg.self_stitch and cfg.probes


def test_quickstart_probes_train_to_convergence():
    """The probes are the baselines the stitches are read against: with 4 fixed epochs the micro dino's probe was
    at 8.8% (13% once converged), and a self-stitch appeared to beat it. They stop on val now, like the paper's."""
    cfg = load_config(StitchRunConfig, CONFIGS / "quickstart.yaml")
    assert cfg.probes and cfg.probe.patience is not None and cfg.probe.epochs >= 10 * cfg.probe.patience
