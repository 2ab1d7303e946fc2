"""The stitching sweep, the stitch tree and the CLI on tiny random-init models saved as local folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

import pytest
import torch
import transformers as hf
import yaml
from typer.testing import CliRunner

from stitchkit.backbones import save_backbone
from stitchkit.config import load_config, validate_config
from stitchkit.engine import EarlyStopping, seed_everything
from stitchkit.errors import ConfigError
from stitchkit.stitching import protocol
from stitchkit.stitching.commands import app
from stitchkit.stitching.config import OptimConfig, StitchLayerConfig, StitchRunConfig, TreeConfig
from stitchkit.stitching.experiment import run_sweep, run_tree
from stitchkit.stitching.model import build_head, readout_token_weights
from stitchkit.stitching.objectives import feature_distance
from stitchkit.stitching.protocol import Sweep, train_config

TINY = dict(num_hidden_layers=3, num_attention_heads=2, patch_size=8, image_size=32)
FAST = {"epochs": 1, "batch_size": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    models = {
        "dino": hf.Dinov2WithRegistersModel(
            hf.Dinov2WithRegistersConfig(**TINY, hidden_size=32, intermediate_size=64, num_register_tokens=2)
        ),
        "clip": hf.CLIPVisionModel(hf.CLIPVisionConfig(**TINY, hidden_size=48, intermediate_size=96)),
        "siglip": hf.SiglipVisionModel(hf.SiglipVisionConfig(**dict(TINY, image_size=48, patch_size=16), hidden_size=32, intermediate_size=64)),
    }
    return {name: str(save_backbone(model, root / name)) for name, model in models.items()}


def sweep_config(model_dirs, **overrides) -> dict:
    cfg = {
        "data": {"image_size": 32, "train": 32, "val": 16, "test": 16},
        "models": {"dino": model_dirs["dino"], "clip": model_dirs["clip"]},
        "pairs": [["dino", "clip"]],
        "points": [1, 2],
        "objectives": ["ffm_tlt", "lfm"],
        "lfm": FAST, "ffm": FAST, "tlt": FAST, "probe": FAST,
        "init_images": 16,
        "eval_batch_size": 16,
        "device": "cpu",
    }
    cfg.update(overrides)
    return cfg


def test_sweep_writes_the_paper_table_and_resumes_without_recomputing(model_dirs, tmp_path):
    cfg = validate_config(StitchRunConfig, sweep_config(model_dirs))
    report = run_sweep(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    cells = results["cells"]
    # dino->clip plus the self-stitch controls dino->dino and clip->clip, at 2 points x 2 objectives.
    assert len(cells) == 3 * 2 * 2 and {(c["source"], c["target"]) for c in cells} == {("dino", "clip"), ("dino", "dino"), ("clip", "clip")}
    assert {p["model"] for p in results["probes"]} == {"dino", "clip"}
    for cell in cells:
        assert 0 <= cell["score_test"] <= 100 and cell["distance_final_rel"] > 0
        assert sum(cell["overlap"][k] for k in ("000", "001", "010", "011", "100", "101", "110", "111")) == 16
        assert len(cell["profile_rel"]) == 3 - cell["target_point"] + 1
    text = report.read_text()
    assert "| pair / init | L1 | L2 |" in text and "dino→clip, FFM→TLT" in text and "dino→dino (self), LFM + head" in text
    assert "Cross − self" in text and (tmp_path / "run" / "results.csv").exists()
    # The context a score needs: classes and chance, split sizes, each model's resolution and grid, the budget.
    from stitchkit.world import ONTOLOGY

    classes = len(ONTOLOGY.categories)  # data.target: category
    assert f"labelled by category), 32 px: {classes} classes (chance {100 / classes:.2g}%); 32 train / 16 val / 16 test images" in text
    assert f"dino = `{model_dirs['dino']}` (32 px, patch 8: 4x4 grid, 3 blocks, width 32)" in text
    assert "Training budget: FFM 1 epoch, batch 16, lr 0.001; TLT 1 epoch, batch 16, lr 0.001; LFM 1 epoch" in text
    # One figure per kind for the cross pair, its self-stitch controls in the same axes; a profile for its LFM cells.
    figures = {path.name for path in (tmp_path / "run" / "figures").glob("*.png")}
    assert figures == {f"{kind}_dino--clip--mlp-relu.png" for kind in ("score", "final_distance", "profile")}

    # A second run finds every cell finished: no model pass, no training, the same report.
    again = Sweep(cfg, tmp_path / "run")
    assert again.run_all()["cells"] == cells and again.store.computed_passes == 0
    assert run_sweep(cfg, tmp_path / "run").read_text() == text


def test_same_seed_gives_the_same_results_and_cached_training_matches_online(model_dirs, tmp_path):
    base = sweep_config(model_dirs, points=[2], objectives=["ffm_tlt"], self_stitch=False, probes=False, cache_dtype="float32")
    runs = {}
    passes = {}
    settings = (("a", "memory", True), ("b", "memory", True), ("online", "none", True), ("target_only", "memory", False))
    for name, cache, cache_source in settings:
        cfg = validate_config(StitchRunConfig, {**base, "cache": cache, "cache_source": cache_source})
        sweep = Sweep(cfg, tmp_path / name)
        runs[name] = sweep.run_all()["cells"][0]
        passes[name] = sweep.store.computed_passes
    assert passes["target_only"] == passes["a"] - 3  # the source's train / val / test passes are never stored
    strip = lambda cell: {k: v for k, v in cell.items() if k != "train_seconds"}  # noqa: E731
    assert strip(runs["a"]) == strip(runs["b"])
    for other in ("online", "target_only"):  # recomputing the frozen prefix every step trains the same S
        for stage in ("ffm", "tlt"):
            assert runs[other]["final_losses"][stage] == pytest.approx(runs["a"]["final_losses"][stage], rel=1e-4)
        assert runs[other]["score_test"] == runs["a"]["score_test"]


def test_augmented_tlt_crops_images_online_whatever_the_cache(model_dirs, tmp_path):
    """tlt.augment trains on fresh crops of the images, so the source runs online even with a source cache: a
    cached and an uncached sweep train the same S, and the cached one never stores train activations."""
    from stitchkit.stitching.report import write_sweep_outputs

    base = sweep_config(model_dirs, points=[2], objectives=["tlt"], self_stitch=False, probes=False, cache_dtype="float32",
                        tlt={**FAST, "augment": True})  # fmt: skip
    runs, passes, reports = {}, {}, {}
    for name, overrides in (("cached", {}), ("again", {}), ("online", {"cache": "none"}), ("plain", {"tlt": FAST})):
        sweep = Sweep(validate_config(StitchRunConfig, {**base, **overrides}), tmp_path / name)
        results = sweep.run_all()
        runs[name], passes[name] = results["cells"][0], sweep.store.computed_passes
        reports[name] = write_sweep_outputs(tmp_path / name, sweep.cfg, sweep.data.description, results).read_text()
    assert "TLT trained on augmented images" in reports["cached"] and "augmented" not in reports["plain"]
    strip = lambda cell: {k: v for k, v in cell.items() if k != "train_seconds"}  # noqa: E731
    assert strip(runs["cached"]) == strip(runs["again"])  # same seed, same crops
    assert runs["online"]["final_losses"]["tlt"] == pytest.approx(runs["cached"]["final_losses"]["tlt"], rel=1e-4)
    assert runs["plain"]["final_losses"]["tlt"] != runs["cached"]["final_losses"]["tlt"]  # other pixels, another loss
    assert passes["cached"] == passes["plain"] - 1  # the source's train split is never stored

    # Segmentation: label maps are cut with their images; the cell trains and scores as usual.
    seg = sweep_config(model_dirs, task="segmentation", data={"image_size": 32, "train": 16, "val": 8, "test": 8},
                       points=[1], objectives=["ffm_tlt"], self_stitch=False, tlt={**FAST, "augment": True})  # fmt: skip
    (cell,) = Sweep(validate_config(StitchRunConfig, seg), tmp_path / "seg").run_all()["cells"]
    assert 0 <= cell["score_test"] <= 100 and np.isfinite(cell["final_losses"]["tlt"])


def test_segmentation_lora_and_least_squares_cells(model_dirs, tmp_path):
    cfg = sweep_config(
        model_dirs,
        task="segmentation",
        data={"image_size": 32, "train": 16, "val": 8, "test": 8, "max_objects": 2},
        models={"dino": model_dirs["dino"], "siglip": model_dirs["siglip"]},
        pairs=[["siglip", "dino"]],
        points=[2],
        objectives=["lfm_tlt"],
        self_stitch=False,
        grid_policy="bilinear",
        stitch_layers=[{"kind": "linear", "init": "lstsq"}, {"kind": "lora", "rank": 2}],
    )
    results = json.loads((run_sweep(validate_config(StitchRunConfig, cfg), tmp_path / "seg").parent / "results.json").read_text())
    assert [c["stitch"] for c in results["cells"]] == ["linear+lstsq", "lora-r2"]
    assert all(0 <= c["score_test"] <= 100 for c in results["cells"])
    assert results["cells"][0]["prefix"] == "learnable, learnable, learnable"  # SigLIP has no CLS or registers


def test_stitch_layers_differing_in_any_field_get_their_own_cells(model_dirs, tmp_path):
    """A finished cell is found by its layer's name: two layers that differ only in `hidden` (or any field) must
    train and report separately, and one layer listed twice is refused rather than reported twice."""
    defaults = {"mlp": "mlp-relu", "lora": "lora-r16", "linear": "linear", "identity": "identity"}
    for kind, name in defaults.items():  # earlier runs' folders keep their names
        assert StitchLayerConfig(kind=kind).name == name
    assert StitchLayerConfig(kind="linear", init="lstsq").name == "linear+lstsq"
    non_default = {
        "kind": "linear", "act": "gelu", "hidden": 256, "rank": 4, "alpha": 16.0, "init": "lstsq", "ridge": 0.01,
    }
    assert set(non_default) == set(StitchLayerConfig.model_fields)  # a new field needs a case here
    for kind in defaults:
        variants = [StitchLayerConfig(kind=kind)] + [
            StitchLayerConfig(**{"kind": kind, field: value}) for field, value in non_default.items() if field != "kind"
        ]
        names = [layer.name for layer in variants]
        assert len(set(names)) == len(names), names
    assert StitchLayerConfig(kind="lora", alpha=16.0).name == "lora-r16-a16"
    assert StitchLayerConfig(kind="mlp", hidden=256).name == "mlp-relu-h256"
    assert StitchLayerConfig(kind="linear", init="lstsq", ridge=1e-5).name == "linear+lstsq-ridge1e-05"

    twice = sweep_config(model_dirs, stitch_layers=[{"kind": "mlp"}, {"kind": "mlp", "act": "relu"}])
    message = r"stitch_layers.*stitch_layers\[1\] is the same stitch layer as stitch_layers\[0\] \('mlp-relu'\)"
    with pytest.raises(ConfigError, match=message):
        validate_config(StitchRunConfig, twice)

    layers = [{"kind": "mlp"}, {"kind": "mlp", "hidden": 8}]
    cfg = sweep_config(
        model_dirs, points=[2], objectives=["lfm"], self_stitch=False, probes=False, stitch_layers=layers
    )
    report = run_sweep(validate_config(StitchRunConfig, cfg), tmp_path / "run")
    cells = json.loads((tmp_path / "run" / "results.json").read_text())["cells"]
    # dino (32 wide) -> clip (48 wide): W1 (h x 32) + b1 + W2 (48 x h) + b2, for h = 48 (the target's width) and 8.
    assert {c["stitch"]: c["trainable_params"] for c in cells} == {
        "mlp-relu": 32 * 48 + 48 + 48 * 48 + 48,
        "mlp-relu-h8": 32 * 8 + 8 + 8 * 48 + 48,
    }
    assert cells[0]["distance_stitch"] != cells[1]["distance_stitch"]
    text = report.read_text()
    assert "dino→clip, LFM + head, mlp-relu |" in text and "dino→clip, LFM + head, mlp-relu-h8 |" in text


def test_reported_stitch_distance_is_the_lfm_loss_on_a_target_with_registers(model_dirs, tmp_path):
    """Spec §2: D_n is the LFM objective. On a target with registers (here learnable ones: CLIP has a CLS only)
    the reported D_n equals the loss LFM trains on, over the same images."""
    cfg = sweep_config(
        model_dirs, pairs=[["clip", "dino"]], points=[2], objectives=["lfm"], self_stitch=False, probes=False,
        cache_dtype="float32",
    )
    sweep = Sweep(validate_config(StitchRunConfig, cfg), tmp_path / "run")
    (cell,) = sweep.cells
    model = sweep.build_model(cell)
    assert model.prefix.describe() == "S(src[0]), learnable, learnable"
    with torch.no_grad():
        model.prefix.tokens.add_(1.0)  # registers far from the target's own, so leaving them out would show
    _, distances = sweep._predict(model, "clip", "test", with_distances=True)
    batch = {
        "hidden": torch.from_numpy(sweep.features("clip", "test", "h2")),
        "reference": torch.from_numpy(sweep.features("dino", "test", "h2")),
    }
    with torch.no_grad():
        lfm = sweep.loss_function(model, "lfm")(model, batch).item()
        patches_and_cls = feature_distance(
            model(batch["hidden"], output="bridge"), batch["reference"], readout_token_weights(model.target)
        ).item()
    assert distances["distance_stitch"] == pytest.approx(lfm, rel=1e-5)
    assert abs(patches_and_cls - lfm) > 0.05 * lfm  # the registers matter: the token set is what is tested


def test_ffm_at_a_raw_block_matches_patch_tokens_alone_in_the_loss_and_in_d_fin(model_dirs, tmp_path):
    """Spec §4.4, §7: at match_layer -2 (block N-1, raw: what an MLLM reads) FFM's loss and the reported D_fin cover
    the patch tokens alone; at the default (the normed last layer) the patches and the CLS. Oracle: the squared
    distance per token, averaged by hand over those tokens."""
    prefix = 3  # the tiny DINOv2 with registers: CLS + 2 registers, then 16 patches
    kept_by_layer = {"last_normed": [0, *range(prefix, prefix + 16)], -2: list(range(prefix, prefix + 16))}
    for match_layer, kept in kept_by_layer.items():
        cfg = sweep_config(model_dirs, pairs=[["clip", "dino"]], points=[1], objectives=["ffm"], self_stitch=False,
                           probes=False, cache_dtype="float32", match_layer=match_layer)  # fmt: skip
        sweep = Sweep(validate_config(StitchRunConfig, cfg), tmp_path / str(match_layer))
        (cell,) = sweep.cells
        model = sweep.build_model(cell)
        batch = {
            "hidden": torch.from_numpy(sweep.features("clip", "test", "h1")),
            "reference": torch.from_numpy(sweep.features("dino", "test", sweep.match_key("dino"))),
        }
        with torch.no_grad():
            ffm = sweep.loss_function(model, "ffm")(model, batch).item()
            per_token = (model(batch["hidden"], output="match") - batch["reference"]).pow(2).mean(-1)  # (B, T)
        _, distances = sweep._predict(model, "clip", "test", with_distances=True)
        assert ffm == pytest.approx(per_token[:, kept].mean().item(), rel=1e-5), match_layer
        assert distances["distance_final"] == pytest.approx(ffm, rel=1e-4), match_layer
        others = [0, *kept] if 0 not in kept else kept[1:]  # the CLS added or taken away
        assert abs(per_token[:, others].mean().item() - ffm) > 1e-3 * ffm  # the CLS matters: the token set is tested


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_heads_on_label_free_stitches_train_from_float16_features_as_from_float32(model_dirs, tmp_path, task):
    """The features a head is fitted on after LFM/FFM are stored like cached activations (float16), filled batch by
    batch (12, 12, 8 rows here): they equal the stitched model's float32 readout of the whole split at once (the
    oracle), and a head trained on them ends where one trained on the float32 features does, scoring the same."""
    cfg = sweep_config(model_dirs, task=task, points=[2], objectives=["ffm"], self_stitch=False, probes=False,
                       eval_batch_size=12, probe={"epochs": 3, "batch_size": 16})  # fmt: skip
    sweep = Sweep(validate_config(StitchRunConfig, cfg), tmp_path / "run")
    (cell,) = sweep.cells
    model = sweep.build_model(cell)
    stored = {split: sweep.stitched_features(model, "dino", split) for split in ("train", "test")}
    with torch.no_grad():
        oracle = {
            split: model(torch.from_numpy(np.asarray(sweep.features("dino", split, "h2"), dtype=np.float32)), output="features").numpy()
            for split in ("train", "test")
        }
    assert stored["train"].dtype == np.float16 and stored["train"].shape == oracle["train"].shape
    assert oracle["train"].shape == ((32, 48) if task == "classification" else (32, 16, 48))
    np.testing.assert_allclose(stored["train"].astype(np.float32), oracle["train"], rtol=1e-3, atol=1e-4)  # fp16 rounding

    def fit(features):
        seed_everything(1)
        head = build_head(task, model.target, sweep.data.num_classes, 32)
        sweep._fit_head(head, features["train"], None, tmp_path / str(features["train"].dtype), seed=0)
        return head

    half, full = fit(stored), fit(oracle)
    for name, value in full.state_dict().items():
        # measured: 3e-5 at most; a head trained on rows shifted by one image is 6e-3 away
        torch.testing.assert_close(half.state_dict()[name].float(), value.float(), rtol=1e-3, atol=1e-4)
    scores = [sweep.score(sweep._head_predictions(head, oracle["test"]), "test") for head in (half, full)]
    assert scores[0] == pytest.approx(scores[1], abs=1.0)  # top-1 or mIoU, %


def test_tree_reports_cost_and_normalised_gain(model_dirs, tmp_path):
    cfg = {
        "data": {"image_size": 32, "train": 32, "val": 16, "test": 16},
        "models": model_dirs,
        "trunk": "dino",
        "branches": ["clip", "siglip"],
        "points": [1],
        "grid_policy": "bilinear",
        "ffm": FAST, "probe": {"epochs": 2, "batch_size": 16, "patience": 1},  # early stopping on the probes' val score
        "timing_batches": 1,
        "eval_batch_size": 16,
        "device": "cpu",
    }
    path = tmp_path / "tree.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = run_tree(path, tmp_path / "tree")
    results = json.loads((tmp_path / "tree" / "results.json").read_text())
    (tree,) = results["trees"]
    # L = block 2 of 3 for every model: VST-1 with 3 models runs 1 + 3 * (2 - 1) blocks against single's 2.
    assert tree["blocks"] == 4 and tree["extra_blocks"] == pytest.approx(1.0) == tree["formula_overhead"]
    assert "normalised_gain" in tree and "VST-1" in report.read_text()
    # The table names its metric; every row is timed in turns with the trunk alone, and on the CPU marked indicative.
    assert "| variant | top-1 accuracy (%) | extra blocks | extra FLOPs | ms / image (vs trunk alone) | extra time (CPU: indicative) |" in report.read_text()
    low, high = tree["extra_time_range"]
    assert low <= tree["extra_time"] <= high and tree["timed_on"] == "cpu"
    assert results["feature_blocks"] == {"dino": 2, "clip": 2, "siglip": 2} and "`dino` block 2" in report.read_text()
    for probe in ("baselines/seed0/single", "trees/n1/seed0/probe"):
        records = [json.loads(line) for line in (tmp_path / "tree" / probe / "metrics.jsonl").read_text().splitlines()]
        assert next(r["step"] for r in records if "val_score" in r) == 2  # evaluated once per epoch


def test_cli_errors_name_the_field(model_dirs, tmp_path):
    runner = CliRunner()
    bad = {
        "points": ({**sweep_config(model_dirs), "points": [3]}, "points: stitch point 3 is out of range"),
        "objectives": ({**sweep_config(model_dirs), "objectives": ["ffn"]}, "objectives.0"),
        "pairs": ({**sweep_config(model_dirs), "pairs": [["dino", "vit"]]}, "pairs[0]: target 'vit'"),
    }
    for name, (cfg, message) in bad.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / name)])
        assert isinstance(result.exception, ConfigError) and message in str(result.exception), (name, result.exception)


# ---- problems the config and the models' shapes decide: refused before anything runs (issue 3 walkthrough) ----


def tree_config(model_dirs, **overrides) -> dict:
    cfg = {
        "data": {"image_size": 32, "train": 32, "val": 16, "test": 16},
        "models": model_dirs,
        "trunk": "dino",
        "branches": ["clip"],
        "points": [1],
        "ffm": FAST, "probe": FAST,
        "timing_batches": 1,
        "eval_batch_size": 16,
        "device": "cpu",
    }  # fmt: skip
    cfg.update(overrides)
    return cfg


def run_cli(capsys, tmp_path, verb: str, cfg: dict, name: str) -> tuple[int, str, Path]:
    """`stitchkit stitch VERB` as a user runs it (the CLI's error handling and folder clean-up included): its
    exit code, what it printed to stderr, and the --out folder it was given."""
    from stitchkit.cli import main

    path, out = tmp_path / f"{name}.yaml", tmp_path / f"out-{name}"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_info:
        main(["stitch", verb, str(path), "--out", str(out)])
    return exit_info.value.code, capsys.readouterr().err, out


def test_a_resolution_that_is_no_whole_number_of_patches_is_refused_before_any_folder(model_dirs, tmp_path, capsys):
    """Below one patch the patch embedding cannot run (it was a traceback, exit 1, and a left-over folder that
    blocked the corrected run); between multiples the model silently dropped pixels. Both: one message naming
    image_size.<model>, exit code 2, and no folder."""
    cases = {
        "small": ("run", sweep_config(model_dirs, image_size={"dino": 4}),
                  "error: image_size.dino: 4 px is smaller than dino's patch size (8 px)"),
        "between": ("run", sweep_config(model_dirs, image_size={"clip": 30}),
                    ("error: image_size.clip: 30 px is not a multiple of clip's patch size (8 px): the model would see a "
                     "3x3 grid and drop 6 px of every image; use 24 or 32")),
        "tree": ("tree", tree_config(model_dirs, image_size={"clip": 4}),
                 "error: image_size.clip: 4 px is smaller than clip's patch size (8 px)"),
    }  # fmt: skip
    for name, (verb, cfg, message) in cases.items():
        code, err, out = run_cli(capsys, tmp_path, verb, cfg, name)
        assert (code, message in err, "Traceback" in err, out.exists()) == (2, True, False, False), (name, err)


def test_joins_the_models_cannot_make_are_refused_naming_the_pair_before_any_folder(model_dirs, tmp_path, capsys):
    """A grid or prefix policy, or an identity stitch, that cannot join a pair used to fail when the first cell
    was built: after the probes had finished (or after many cells), keeping a folder the corrected config could
    not resume. Now every cell (and every trunk -> branch join) is checked once the models are loaded."""
    cases = {
        "grid": ("run", sweep_config(model_dirs, image_size={"dino": 48}),
                 ("error: grid_policy: 'identity' needs equal patch grids, but dino (48 px, patch 8) → clip (32 px, "
                  "patch 8) joins a 6x6 grid to a 4x4 grid")),
        "prefix": ("run", sweep_config(model_dirs, prefix_policy="drop"),
                   ("error: prefix_policy: 'drop' feeds the target no prefix tokens, but clip, the target of dino → "
                    "clip, reads 1")),
        "match": ("run", sweep_config(model_dirs, match_layer=-2, objectives=["ffm"]),  # -2: block 2 of 3
                  "error: match_layer: block 2 is not after the target stitch point 2 (clip at points: 2)"),
        "tree_prefix": ("tree", tree_config(model_dirs, prefix_policy="drop"), "but clip, the target of dino → clip, reads 1"),
        "tree_grid": ("tree", tree_config(model_dirs, branches=["siglip"]),
                      "dino (32 px, patch 8) → siglip (48 px, patch 16) joins a 4x4 grid to a 3x3 grid"),
        "tree_identity": ("tree", tree_config(model_dirs, stitch={"kind": "identity"}),
                          "error: stitch: 'identity' cannot join dino → clip: dino is 32 wide, clip 48"),
    }  # fmt: skip
    for name, (verb, cfg, message) in cases.items():
        code, err, out = run_cli(capsys, tmp_path, verb, cfg, name)
        assert (code, message in err, out.exists()) == (2, True, False), (name, err)


def test_an_identity_stitch_with_nothing_to_train_is_kept_as_the_untrained_control(model_dirs, tmp_path):
    """An identity S where the target has no prefix slot to learn gives LFM and FFM nothing to train (the engine
    refused, after other cells had run). The stage is skipped and the cell kept: a head fitted (or trained by
    TLT) on the untrained stitch. Oracle: an identity self-stitch is the model itself, so both distances are 0."""
    cfg = sweep_config(model_dirs, models={"dino": model_dirs["dino"]}, pairs=[["dino", "dino"]], points=[1],
                       stitch_layers=[{"kind": "identity"}], objectives=["lfm", "ffm_tlt"], probes=False,
                       cache_dtype="float32")  # fmt: skip
    run_sweep(validate_config(StitchRunConfig, cfg), tmp_path / "run")
    lfm, ffm_tlt = json.loads((tmp_path / "run" / "results.json").read_text())["cells"]
    for cell in (lfm, ffm_tlt):
        assert cell["trainable_params"] == 0 and "learnable" not in cell["prefix"]
        assert cell["distance_stitch"] == pytest.approx(0, abs=1e-9) and cell["distance_final"] == pytest.approx(0, abs=1e-9)
        assert 0 <= cell["score_test"] <= 100
    assert lfm["final_losses"] == {"lfm": None} and ffm_tlt["final_losses"]["ffm"] is None
    assert np.isfinite(ffm_tlt["final_losses"]["tlt"])  # TLT still trains the head
    cell_folder = tmp_path / "run" / "cells" / "dino--dino" / "n1" / "identity"
    assert (cell_folder / "lfm" / "seed0" / "head").is_dir() and not (cell_folder / "lfm" / "seed0" / "lfm").exists()

    # The tree: an identity branch into SigLIP (same width, no prefix tokens) keeps its S as built.
    tree = tree_config(model_dirs, branches=["siglip"], stitch={"kind": "identity"}, grid_policy="bilinear")
    report = run_tree(validate_config(TreeConfig, tree), tmp_path / "tree")
    assert "VST-1" in report.read_text() and not (tmp_path / "tree" / "branches").exists()


def test_repeated_points_and_seeds_and_a_sweep_without_pairs_are_refused(model_dirs):
    """A repeated point or seed was one training reported twice (a fake ± 0.0 over seeds [0, 0]); a sweep without
    pairs ran, drew the data and reported empty tables."""
    for field, values, message in (("points", [1, 1], "points: 1 listed more than once in [1, 1]"),
                                   ("seeds", [0, 1, 0], "seeds: 0 listed more than once in [0, 1, 0]")):  # fmt: skip
        for config, data in ((StitchRunConfig, sweep_config(model_dirs)), (TreeConfig, tree_config(model_dirs))):
            with pytest.raises(ConfigError, match=re.escape(message)):
                validate_config(config, {**data, field: values})
    one_model = sweep_config(model_dirs, models={"dino": model_dirs["dino"]}, pairs="all")
    with pytest.raises(ConfigError, match="pairs: the sweep has no pairs: 'all' with one model gives no cross pair"):
        validate_config(StitchRunConfig, one_model)
    with pytest.raises(ConfigError, match="pairs: the list is empty"):
        validate_config(StitchRunConfig, sweep_config(model_dirs, pairs=[]))
    assert validate_config(StitchRunConfig, {**one_model, "pairs": [["dino", "dino"]]}).all_pairs() == [("dino", "dino")]


def test_messages_name_the_field_to_fix(model_dirs, tmp_path):
    """The tree's point past its feature layer names the feature layer (not a wrong block count); fractions that
    leave no train split name both fractions; a missing data folder or file names data.path."""
    from stitchkit.errors import InputError
    from stitchkit.stitching.data import DataConfig, load_task_data

    late = r"points \[2\]: the trunk is read at feature_layer -2 \(block 2\), so it can be stitched after blocks 1..1 only"
    with pytest.raises(ConfigError, match=late):  # the tiny models have 3 blocks: -2 is block 2
        run_tree(validate_config(TreeConfig, tree_config(model_dirs, points=[2])), tmp_path / "tree")
    folder = {"source": "folder", "path": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"val_fraction \+ test_fraction: 0.6 \+ 0.5 leaves no images to train on"):
        validate_config(DataConfig, {**folder, "val_fraction": 0.6, "test_fraction": 0.5})
    # With a test split of its own, test_fraction is not used.
    validate_config(DataConfig, {**folder, "val_fraction": 0.6, "test_fraction": 0.5, "test_split": {"path": "t"}})
    with pytest.raises(InputError, match=f"^data.path: image folder not found: {tmp_path / 'nowhere'}$"):
        load_task_data("classification", validate_config(DataConfig, folder))
    with pytest.raises(InputError, match="^data.path: annotation file not found: "):
        load_task_data("segmentation", validate_config(DataConfig, {"source": "coco", "path": str(tmp_path / "a.json")}))


def test_the_python_snippet_of_the_docs_runs(model_dirs):
    """docs/stitching.md's snippet, with local model folders for its hub ids and point 1 for 14 (the tiny models
    have 3 blocks): it runs, and without head= it returns the target's pooled features, as the text says."""
    docs = (Path(__file__).parents[1] / "docs" / "stitching.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", docs, re.DOTALL).group(1)
    snippet = snippet.replace('"facebook/dinov2-large"', repr(model_dirs["dino"]))
    snippet = snippet.replace('"google/siglip2-large-patch16-256"', repr(model_dirs["clip"])).replace(", 14,", ", 1,")
    namespace = {"images": np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)}
    exec(snippet, namespace)  # noqa: S102 (the docs' own code)
    assert namespace["features"].shape == (4, 48)  # clip's width: the pooled output a head would read


def test_optim_config_becomes_the_engine_config():
    optim = OptimConfig(epochs=2, batch_size=10, lr=1e-4, head_lr=1e-3, patience=5)
    cfg = train_config(optim, 100, seed=3, head="head")
    assert (cfg.steps, cfg.lr, cfg.lr_groups) == (20, 1e-4, {"head": 1e-3})
    assert cfg.early_stopping == EarlyStopping(metric="val_score", mode="max", patience=5, restore_best=True)
    assert train_config(optim, 100, seed=3).lr_groups == {}  # no head in the trained model
    plain = train_config(OptimConfig(epochs=2, batch_size=10), 100, seed=3, head="head")
    assert plain.lr_groups == {} and plain.early_stopping is None


def test_stage_options_only_where_a_stage_can_use_them(model_dirs):
    paper = load_config(StitchRunConfig, Path(__file__).parents[1] / "configs" / "stitch" / "paper.yaml")
    assert (paper.tlt.epochs, paper.tlt.lr, paper.tlt.head_lr, paper.tlt.patience) == (100, 1e-4, 1e-3, 5)
    assert (paper.probe.epochs, paper.probe.patience, paper.ffm.epochs) == (100, 5, 1)
    assert paper.probe.lr_sweep == [1e-4, 3e-4, 1e-3] and paper.tlt.lr_sweep is None
    refused = [
        ("ffm", {"epochs": 1, "patience": 3}, "ffm.patience: FFM trains S without labels"),
        ("lfm", {"epochs": 1, "head_lr": 1e-3}, "lfm.head_lr: LFM trains S alone"),
        ("probe", {"epochs": 1, "head_lr": 1e-3}, "probe.head_lr: a probe is a head alone; set probe.lr"),
        ("tlt", {"epochs": 1, "lr_sweep": [1e-4, 1e-3]}, "tlt.lr_sweep: only the linear probes of the models sweep"),
        ("ffm", {"epochs": 1, "augment": True}, "ffm.augment: only TLT trains on augmented images"),
        ("probe", {"epochs": 1, "augment": True}, "probe.augment: only TLT trains on augmented images"),
    ]
    for stage, optim, message in refused:
        with pytest.raises(ConfigError, match=message):
            validate_config(StitchRunConfig, sweep_config(model_dirs, **{stage: optim}))
    tree = {"models": model_dirs, "trunk": "dino", "branches": ["clip"], "points": [1], "probe": {"epochs": 1, "lr_sweep": [1e-3]}}
    with pytest.raises(ConfigError, match="probe.lr_sweep: the tree's probes train at probe.lr"):
        validate_config(TreeConfig, tree)
    with pytest.raises(ConfigError, match="lr_sweep"):  # each lr names its training's folder
        validate_config(StitchRunConfig, sweep_config(model_dirs, probe={"epochs": 1, "lr_sweep": [1e-3, 1e-3]}))


def test_probe_lr_sweep_keeps_the_best_val_lr_and_resumes(model_dirs, tmp_path, monkeypatch):
    """probe.lr_sweep trains a model's probe once per lr (early stopping inside each), keeps the best val score,
    and reports that lr's test score and predictions: the same as a plain probe trained at that lr."""
    lrs = [1e-4, 3e-1]  # far apart, so the two val scores differ
    probe = {"epochs": 3, "batch_size": 16, "lr": 1e-3, "patience": 1}

    def sweep(folder, **probe_overrides):
        cfg = sweep_config(model_dirs, points=[2], objectives=["lfm"], self_stitch=False, probe={**probe, **probe_overrides})
        return Sweep(validate_config(StitchRunConfig, cfg), tmp_path / folder)

    swept = sweep("swept", lr_sweep=lrs)
    result = swept.probe("dino", 0)
    folder = tmp_path / "swept" / "probes" / "dino" / "seed0"
    assert [r["lr"] for r in result["lr_sweep"]] == lrs
    for lr in lrs:  # each lr trained in its own folder, with its val score evaluated per epoch (patience)
        records = [json.loads(line) for line in (folder / f"train-lr{lr!r}" / "metrics.jsonl").read_text().splitlines()]
        assert any("val_score" in r for r in records)
    val = [r["score_val"] for r in result["lr_sweep"]]
    assert val[0] != val[1]
    chosen = lrs[val.index(max(val))]
    assert (result["lr"], result["score_val"]) == (chosen, max(val))
    plain = sweep("plain", lr=chosen).probe("dino", 0)
    assert "lr_sweep" not in plain and plain["lr"] == chosen
    assert (result["score_val"], result["score_test"]) == (plain["score_val"], plain["score_test"])
    plain_predictions = np.load(tmp_path / "plain" / "probes" / "dino" / "seed0" / "test_predictions.npy")
    assert np.array_equal(np.load(folder / "test_predictions.npy"), plain_predictions)

    # Re-running the probe (as after a crash before result.json) loads both finished trainings instead of training.
    resumed = []

    def recording_train(model, loss_fn, dataset, cfg, out_dir, **kwargs):
        out = real_train(model, loss_fn, dataset, cfg, out_dir, **kwargs)
        resumed.append((out_dir.name, out.resumed_from == out.steps))
        return out

    real_train = protocol.train
    monkeypatch.setattr(protocol, "train", recording_train)
    again = sweep("swept", lr_sweep=lrs)
    del again.run.manifest["steps"]["probe/dino/seed0"]
    strip = lambda r: {k: v for k, v in r.items() if k != "train_seconds"}
    assert strip(again.probe("dino", 0)) == strip(result)
    assert resumed == [(f"train-lr{lr!r}", True) for lr in lrs]

    # The report names the chosen lr.
    from stitchkit.stitching.report import probe_table

    assert f"| dino | {result['score_test']:.1f} | {chosen:g} |" in probe_table({"dino": [result]}, "top-1")
    assert "chosen" not in probe_table({"dino": [plain]}, "top-1")


def test_head_lr_and_early_stopping_reach_the_trainings(model_dirs, tmp_path, monkeypatch):
    """tlt.head_lr gives the stitched model's head (and only it) its own learning rate in the optimizer; patience
    evaluates the val score once per epoch in TLT, probes and heads on label-free stitches, and each ends at its
    best epoch: the score_val reported afterwards is the best val score seen in training."""
    optimizers, trainings = [], {}

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    def recording_train(model, loss_fn, dataset, cfg, out_dir, **kwargs):
        result = real_train(model, loss_fn, dataset, cfg, out_dir, **kwargs)
        lr_of = {id(p): group["initial_lr"] for group in optimizers[-1].param_groups for p in group["params"]}
        lrs = {name: lr_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}
        trainings[out_dir.relative_to(tmp_path / "run").as_posix()] = (cfg, kwargs.get("eval_every"), result, lrs)
        return result

    real_train = protocol.train
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(protocol, "train", recording_train)
    cfg = sweep_config(
        model_dirs, points=[2], objectives=["tlt", "ffm"], self_stitch=False,
        tlt={"epochs": 4, "batch_size": 16, "lr": 1e-4, "head_lr": 1e-2, "patience": 1},
        probe={"epochs": 4, "batch_size": 16, "lr": 1e-3, "patience": 1},
    )
    results = Sweep(validate_config(StitchRunConfig, cfg), tmp_path / "run").run_all()

    tlt_cfg, _, _, lrs = trainings["cells/dino--clip/n2/mlp-relu/tlt/seed0/tlt"]
    assert tlt_cfg.lr_groups == {"head": 1e-2}
    assert {n for n, lr in lrs.items() if lr == 1e-2} == {"head.linear.weight", "head.linear.bias"}
    assert {lr for n, lr in lrs.items() if not n.startswith("head.")} == {1e-4}  # S (and prefix tokens)
    assert trainings["cells/dino--clip/n2/mlp-relu/ffm/seed0/ffm"][0].early_stopping is None

    reported = {f"probes/{p['model']}/seed0/train": p["score_val"] for p in results["probes"]}
    for cell in results["cells"]:
        stage = "tlt" if cell["objective"] == "tlt" else "head"
        reported[f"cells/dino--clip/n2/mlp-relu/{cell['objective']}/seed0/{stage}"] = cell["score_val"]
    assert len(reported) == 4
    for folder, score_val in reported.items():
        cfg, eval_every, result, _ = trainings[folder]
        assert cfg.early_stopping.patience == 1 and eval_every == 2  # 32 images, batch 16: 2 steps per epoch
        evaluations = [(r["step"], r["val_score"]) for r in result.metrics if "val_score" in r]
        assert [step for step, _ in evaluations] == list(range(2, result.steps + 1, 2)), folder
        best_step, best = max(evaluations, key=lambda e: (e[1], -e[0]))  # the first of the best
        assert (result.best_step, score_val) == (best_step, best), folder


def test_image_folder_and_coco_data(tmp_path):
    from PIL import Image

    from stitchkit.stitching.data import DataConfig, load_task_data
    from stitchkit.world.coco import render_coco
    from stitchkit.world.ontology import ONTOLOGY

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "folder" / name / f"{i}.png")
    folder = load_task_data("classification", DataConfig(source="folder", path=str(tmp_path / "folder"), image_size=16))
    assert folder.class_names == ["cats", "dogs"] and folder.splits["train"].images.shape[1:] == (16, 16, 3)
    assert sum(len(s) for s in folder.splits.values()) == 12

    annotations = render_coco(tmp_path / "coco", n_images=12, size=32, seed=0)
    seg = load_task_data("segmentation", DataConfig(source="coco", path=str(annotations), image_size=32))
    categories = [c.name for c in ONTOLOGY.categories]
    assert seg.class_names == ["background", *categories]
    labels = np.concatenate([s.labels for s in seg.splits.values()])
    assert labels.shape == (12, 32, 32) and 0 < (labels > 0).mean() < 1 and labels.max() <= len(categories)
    cls = load_task_data("classification", DataConfig(source="coco", path=str(annotations), image_size=32))
    assert cls.class_names == categories




def test_coco_segmentations_compressed_or_not_give_the_annotated_pixels(tmp_path):
    """Semantic maps from a COCO file equal a recount from the annotations (decoded by the world's own RLE
    reader, largest object painted first), whether the file holds uncompressed or compressed RLE."""
    from pycocotools import mask as coco_mask

    from stitchkit.errors import InputError
    from stitchkit.stitching.data import DataConfig, load_task_data
    from stitchkit.world.coco import render_coco, rle_to_mask

    annotations = render_coco(tmp_path / "coco", n_images=6, size=32, seed=3)
    coco = json.loads(annotations.read_text())
    classes = {c["id"]: k + 1 for k, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    expected = {}
    for image in coco["images"]:
        semantic = np.zeros((32, 32), dtype=np.int64)
        for ann in sorted((a for a in coco["annotations"] if a["image_id"] == image["id"]), key=lambda a: -a["area"]):
            semantic[rle_to_mask(ann["segmentation"])] = classes[ann["category_id"]]
        expected[image["id"]] = semantic
    compressed = json.loads(annotations.read_text())
    for ann in compressed["annotations"]:
        rle = coco_mask.encode(np.asfortranarray(rle_to_mask(ann["segmentation"]).astype(np.uint8)))
        ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    (tmp_path / "coco" / "compressed.json").write_text(json.dumps(compressed))
    for name in ("annotations.json", "compressed.json"):
        data = load_task_data("segmentation", DataConfig(source="coco", path=str(tmp_path / "coco" / name), image_size=32,
                                                         train=0, val=0, test=0, val_fraction=0.2, test_fraction=0.2))  # fmt: skip
        labels = np.concatenate([split.labels for split in data.splits.values()]).astype(np.int64)
        assert sorted(map(bytes, labels)) == sorted(bytes(m) for m in expected.values())  # every image's map, in some split
    # Runs that do not cover the image (pycocotools would fill the rest from memory) are refused, in either form.
    for counts in ("zzzz", [10, 1014, 1]):
        compressed["annotations"][0]["segmentation"]["counts"] = counts
        (tmp_path / "coco" / "corrupt.json").write_text(json.dumps(compressed))
        with pytest.raises(InputError, match="corrupt.json: cannot decode a segmentation: its RLE runs cover"):
            load_task_data("segmentation", DataConfig(source="coco", path=str(tmp_path / "coco" / "corrupt.json"), image_size=32))

def write_mask_dataset(root: Path, n: int = 10, image_suffix: str = ".jpg", mask_suffix: str = ".png") -> dict[str, np.ndarray]:
    """An ADE20K-like folder pair: images/<sub>/x<image_suffix> and annotations/<sub>/x<mask_suffix>, 30 x 20 px
    label maps with values 0..3 and 255; plus one image without a label map. Returns the raw maps by image path."""
    from PIL import Image

    rng = np.random.default_rng(1)
    raw = {}
    for i in range(n):
        sub = f"part{i % 2}"
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        image = root / "images" / sub / f"x{i}{image_suffix}"
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(image, format="PNG")
        labels = rng.choice(np.array([0, 1, 2, 3, 255], dtype=np.uint8), size=(20, 30))
        Image.fromarray(labels).save(root / "annotations" / sub / f"x{i}{mask_suffix}", format="PNG")
        raw[str(image)] = labels
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(root / "images" / "part0" / "unlabelled.jpg", format="PNG")
    return raw


def square(array: np.ndarray, crop: str) -> np.ndarray:
    """A 20 x 30 image's centre 20 x 20 (crop 'center'), or all of it (crop 'squash')."""
    return array[:, 5:25] if crop == "center" else array


def expected_labels(raw: np.ndarray, size: int, reduce_zero_label: bool, crop: str = "center") -> np.ndarray:
    """The oracle: the centre square (or all), nearest-neighbour resize, then 255 (and with reduce_zero_label 0)
    unlabelled, the rest shifted."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(square(raw, crop)).resize((size, size), Image.Resampling.NEAREST)).astype(np.int64)
    if not reduce_zero_label:
        return np.where(resized == 255, -100, resized)
    return np.where((resized == 255) | (resized == 0), -100, resized - 1)


@pytest.mark.parametrize("reduce_zero_label, crop", [(False, "center"), (True, "center"), (False, "squash")])
def test_mask_folder_data_pairs_label_maps_with_their_images(tmp_path, reduce_zero_label, crop):
    from stitchkit.stitching.data import DataConfig, load_task_data

    raw = write_mask_dataset(tmp_path)
    names = ["wall", "floor", "sky"] if reduce_zero_label else ["other", "wall", "floor", "sky"]
    cfg = DataConfig(source="masks", path=str(tmp_path / "images"), image_size=16, val_fraction=0.2, test_fraction=0.2, crop=crop,
                     masks={"path": str(tmp_path / "annotations"), "class_names": names, "reduce_zero_label": reduce_zero_label})
    data = load_task_data("segmentation", cfg)
    assert data.class_names == names and data.task == "segmentation"
    assert sum(len(s) for s in data.splits.values()) == 10  # the image without a label map is not used
    # Every split's rows are pairs from the folder: find each row's image by its pixels, check its labels.
    from PIL import Image

    def pixels(path):
        return np.asarray(Image.fromarray(square(np.asarray(Image.open(path).convert("RGB")), crop)).resize((16, 16), Image.Resampling.BICUBIC))

    pixels = {path: pixels(path) for path in raw}
    for split in data.splits.values():
        for image, labels in zip(split.images, split.labels):
            (path,) = [p for p, px in pixels.items() if np.array_equal(px, image)]
            np.testing.assert_array_equal(labels, expected_labels(raw[path], 16, reduce_zero_label, crop))


def test_mask_folder_suffixes_and_class_name_files(tmp_path):
    from stitchkit.stitching.data import DataConfig, load_task_data

    write_mask_dataset(tmp_path, n=6, image_suffix="_leftImg8bit.png", mask_suffix="_gtFine_labelTrainIds.png")
    names = tmp_path / "names.txt"
    names.write_text("road\nsidewalk\n\nbuilding\nwall\n")
    masks = {"path": str(tmp_path / "annotations"), "image_suffix": "_leftImg8bit.png",
             "mask_suffix": "_gtFine_labelTrainIds.png", "class_names": str(names)}
    data = load_task_data("segmentation", DataConfig(source="masks", path=str(tmp_path / "images"), image_size=8, masks=masks))
    assert data.class_names == ["road", "sidewalk", "building", "wall"] and sum(len(s) for s in data.splits.values()) == 6
    numbered = load_task_data("segmentation", DataConfig(source="masks", path=str(tmp_path / "images"), image_size=8,
                                                         masks={**masks, "class_names": None}))
    assert numbered.class_names == ["class 0", "class 1", "class 2", "class 3"]


def test_bad_mask_folders_are_one_clear_error(tmp_path):
    from PIL import Image

    from stitchkit.errors import InputError
    from stitchkit.stitching.data import DataConfig, load_task_data

    write_mask_dataset(tmp_path, n=4)
    good = {"source": "masks", "path": str(tmp_path / "images"), "image_size": 8, "masks": {"path": str(tmp_path / "annotations")}}

    def error(task="segmentation", **masks):
        cfg = validate_config(DataConfig, {**good, "masks": {**good["masks"], **masks}})
        with pytest.raises(InputError) as info:
            load_task_data(task, cfg)
        return str(info.value)

    assert "use task segmentation" in error(task="classification")
    assert "lists 2 classes" in error(class_names=["a", "b"])
    assert "folder not found" in error(path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="masks.path"):
        validate_config(DataConfig, {**good, "masks": None})
    with pytest.raises(ConfigError, match="masks is read only with source 'masks'"):
        validate_config(DataConfig, {**good, "source": "coco"})
    mask = tmp_path / "annotations" / "part0" / "x0.png"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(mask)
    assert "not a RGB image" in error()
    Image.fromarray(np.zeros((10, 30), dtype=np.uint8)).save(mask)
    assert "label map is 30x10 but its image" in error()
    (tmp_path / "images" / "part0" / "x0.jpg").unlink()
    assert "has no image" in error() and "x0" in error()


def test_a_test_split_of_its_own_files(tmp_path):
    """test_split: train and val from path, test from other files (e.g. ADE20K's validation folder)."""
    from PIL import Image

    from stitchkit.errors import InputError
    from stitchkit.stitching.data import DataConfig, load_task_data
    from stitchkit.world.coco import render_coco

    write_mask_dataset(tmp_path / "train", n=10)
    write_mask_dataset(tmp_path / "val", n=4)
    masks = {"source": "masks", "path": str(tmp_path / "train" / "images"), "image_size": 8, "val_fraction": 0.2,
             "masks": {"path": str(tmp_path / "train" / "annotations")},
             "test_split": {"path": str(tmp_path / "val" / "images"), "masks": str(tmp_path / "val" / "annotations")}}
    data = load_task_data("segmentation", validate_config(DataConfig, masks))
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 2, "test": 4}
    assert "test: label maps" in data.description and data.class_names == [f"class {k}" for k in range(4)]
    capped = load_task_data("segmentation", validate_config(DataConfig, {**masks, "test": 3}))
    assert len(capped.splits["test"]) == 3
    uncapped = load_task_data("segmentation", validate_config(DataConfig, {**masks, "train": 0, "val": 0, "test": 0}))
    assert {k: len(v) for k, v in uncapped.splits.items()} == {"train": 8, "val": 2, "test": 4}  # 0: all
    with pytest.raises(ConfigError, match="0 = all is for file sources"):
        validate_config(DataConfig, {"source": "shapes", "train": 0})
    # A missing test folder is named by the test_split field that gave it, not by the data field it stood in for.
    for field, missing in (("path", {"path": str(tmp_path / "nowhere")}), ("masks", {"masks": str(tmp_path / "nowhere")})):
        with pytest.raises(InputError, match=f"^data.test_split.{field}: folder not found: .*nowhere$"):
            load_task_data("segmentation", validate_config(DataConfig, {**masks, "test_split": {**masks["test_split"], **missing}}))

    rng = np.random.default_rng(0)
    for split, classes in (("train", ("cats", "dogs")), ("val", ("cats", "dogs")), ("odd", ("cats", "owls"))):
        for name in classes:
            (tmp_path / split / "folder" / name).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / "folder" / name / f"{i}.png")
    folder = {"source": "folder", "path": str(tmp_path / "train" / "folder"), "image_size": 8,
              "test_split": {"path": str(tmp_path / "val" / "folder")}}
    data = load_task_data("classification", validate_config(DataConfig, folder))
    assert len(data.splits["test"]) == 10 and len(data.splits["train"]) + len(data.splits["val"]) == 10
    test_pixels = {np.asarray(Image.open(f)).tobytes() for f in (tmp_path / "val" / "folder").rglob("*.png")}
    assert {image.tobytes() for image in data.splits["test"].images} == test_pixels
    with pytest.raises(InputError, match="data.test_split: its classes"):
        load_task_data("classification", validate_config(DataConfig, {**folder, "test_split": {"path": str(tmp_path / "odd" / "folder")}}))
    with pytest.raises(InputError, match="^data.test_split.path: image folder not found: .*none$"):
        load_task_data("classification", validate_config(DataConfig, {**folder, "test_split": {"path": str(tmp_path / "none")}}))

    coco = {"source": "coco", "path": str(render_coco(tmp_path / "coco_train", n_images=10, size=16, seed=0)), "image_size": 16,
            "test_split": {"path": str(render_coco(tmp_path / "coco_val", n_images=3, size=16, seed=1))}}
    data = load_task_data("segmentation", validate_config(DataConfig, coco))
    assert len(data.splits["test"]) == 3 and len(data.splits["train"]) + len(data.splits["val"]) == 10

    refused = {
        "the shapes world draws its own": {"source": "shapes", "test_split": {"path": "x"}},
        "test_split.masks": {**masks, "test_split": {"path": "x"}},
        "test_split.image_root is read with source 'coco' only": {**folder, "test_split": {"path": "x", "image_root": "y"}},
    }
    for message, cfg in refused.items():
        with pytest.raises(ConfigError, match=message):
            validate_config(DataConfig, cfg)


def test_a_sweep_on_a_mask_folder_scores_labelled_pixels_only(model_dirs, tmp_path):
    from stitchkit.stitching.data import load_task_data

    write_mask_dataset(tmp_path / "data", n=12)
    data = {"source": "masks", "path": str(tmp_path / "data" / "images"), "image_size": 32, "val_fraction": 0.25,
            "test_fraction": 0.25, "masks": {"path": str(tmp_path / "data" / "annotations"), "reduce_zero_label": True}}
    cfg = validate_config(StitchRunConfig, sweep_config(model_dirs, task="segmentation", data=data, points=[1], objectives=["tlt"]))
    folder = run_sweep(cfg, tmp_path / "run").parent
    (cell,) = [c for c in json.loads((folder / "results.json").read_text())["cells"] if c["source"] == "dino" and c["target"] == "clip"]
    labels = load_task_data("segmentation", cfg.data).splits["test"].labels
    predictions = np.load(folder / "cells" / "dino--clip" / "n1" / "mlp-relu" / "tlt" / "seed0" / "test_predictions.npy")
    # The oracle: mIoU by hand over the labelled pixels, averaged over the classes that occur in either.
    labelled = labels != -100
    ious = []
    for k in range(3):
        truth, guess = labels[labelled] == k, predictions[labelled] == k
        if (truth | guess).any():
            ious.append((truth & guess).sum() / (truth | guess).sum())
    assert cell["score_test"] == pytest.approx(100 * np.mean(ious))
    assert sum(cell["overlap"][k] for k in ("000", "001", "010", "011", "100", "101", "110", "111")) == labelled.sum()


# ---- FFM on its own images (ffm_data; spec §7 "FFM data", §1.5) ---------------------------------------------

FFM_SHAPES = {"source": "shapes", "image_size": 24, "images": 20, "seed": 5}  # unlike the task: 32 px, 32 train images


def ffm_shapes_images() -> np.ndarray:
    """The oracle: the shapes-world draw docs/stitching.md promises for FFM_SHAPES (scenes, seed * 1000 + 3)."""
    from stitchkit.world.sets import segmentation_set

    return segmentation_set(20, 24, 5 * 1000 + 3).images


@torch.no_grad()
def hidden_states_of(backbone, images: np.ndarray) -> list[np.ndarray]:
    return [state.numpy() for state in backbone.hidden_states(backbone.preprocess(images))]


def recording_trainings(monkeypatch, root: Path) -> dict[str, object]:
    """Every training's dataset, by its folder relative to `root` (protocol.train also trains the tree)."""
    datasets = {}
    real_train = protocol.train

    def recording_train(model, loss_fn, dataset, cfg, out_dir, **kwargs):
        datasets[out_dir.relative_to(root).as_posix()] = dataset
        return real_train(model, loss_fn, dataset, cfg, out_dir, **kwargs)

    monkeypatch.setattr(protocol, "train", recording_train)
    return datasets


def test_ffm_data_trains_the_ffm_stage_alone_through_the_cache_or_online(model_dirs, tmp_path, monkeypatch):
    """With ffm_data, ffm_tlt's FFM stage trains on its images (their number and size) and TLT on the task's train
    split. Each model runs once over the split 'ffm'; cached, target-only and online training give the same S;
    results.json and the report say which images FFM used."""
    from stitchkit.stitching.report import write_sweep_outputs

    datasets = recording_trainings(monkeypatch, tmp_path)
    expected = ffm_shapes_images()
    base = sweep_config(model_dirs, points=[2], objectives=["ffm_tlt"], self_stitch=False, probes=False, cache_dtype="float32")
    settings = {"cached": ("memory", True), "target_only": ("memory", False), "online": ("none", True), "plain": ("memory", True)}
    sweeps, results = {}, {}
    for name, (cache, cache_source) in settings.items():
        ffm_data = {} if name == "plain" else {"ffm_data": FFM_SHAPES}
        cfg = validate_config(StitchRunConfig, {**base, **ffm_data, "cache": cache, "cache_source": cache_source})
        sweeps[name] = Sweep(cfg, tmp_path / name)
        results[name] = sweeps[name].run_all()
    dino, clip = sweeps["cached"].models["dino"], sweeps["cached"].models["clip"]
    train_images = sweeps["cached"].data.splits["train"].images
    stage = "cells/dino--clip/n2/mlp-relu/ffm_tlt/seed0"

    # What each FFM training read: the ffm_data images, as images (online) or as features of them (cached).
    assert expected.shape == (20, 24, 24, 3)
    online = datasets[f"online/{stage}/ffm"].arrays
    assert set(online) == {"images"} and np.array_equal(online["images"], expected)  # no labels: there are none
    target_only = datasets[f"target_only/{stage}/ffm"].arrays
    assert set(target_only) == {"images", "reference"} and np.array_equal(target_only["images"], expected)
    clip_states = hidden_states_of(clip, expected)
    normed = clip.final_norm(torch.from_numpy(clip_states[-1])).detach().numpy()
    np.testing.assert_allclose(target_only["reference"], normed, atol=1e-5)
    cached = datasets[f"cached/{stage}/ffm"].arrays
    assert set(cached) == {"hidden", "reference"} and len(cached["hidden"]) == 20
    np.testing.assert_allclose(cached["hidden"], hidden_states_of(dino, expected)[2], atol=1e-5)
    np.testing.assert_allclose(cached["reference"], normed, atol=1e-5)
    # TLT is unchanged: the task's train split with its labels.
    for name in ("cached", "target_only", "online"):
        tlt = datasets[f"{name}/{stage}/tlt"]
        assert len(tlt) == 32 and np.array_equal(tlt.arrays["label"], sweeps[name].data.splits["train"].labels)
    assert np.array_equal(datasets[f"online/{stage}/tlt"].arrays["images"], train_images)
    assert len(datasets[f"plain/{stage}/ffm"]) == 32  # without ffm_data, FFM reads the train split as before

    # One pass per (model, split): the source over train / val / test and the FFM images, the target over the FFM
    # images only (without ffm_data it is the target's train split instead).
    computed = lambda sweep: {(model, split) for model, split, _ in sweep.store._memory}
    assert computed(sweeps["cached"]) == {("dino", s) for s in ("train", "val", "test", "ffm")} | {("clip", "ffm")}
    assert sweeps["cached"].store.computed_passes == 5
    assert computed(sweeps["target_only"]) == {("clip", "ffm")} and sweeps["target_only"].store.computed_passes == 1
    assert computed(sweeps["plain"]) == {("dino", s) for s in ("train", "val", "test")} | {("clip", "train")}

    # Recomputing what the cache holds trains the same S (as without ffm_data).
    cell = results["cached"]["cells"][0]
    for name in ("target_only", "online"):
        other = results[name]["cells"][0]
        for stage_name in ("ffm", "tlt"):
            assert other["final_losses"][stage_name] == pytest.approx(cell["final_losses"][stage_name], rel=1e-4)
        assert other["score_test"] == cell["score_test"]
    assert cell["final_losses"]["ffm"] != results["plain"]["cells"][0]["final_losses"]["ffm"]

    description = "shapes world scenes (1-4 objects, seed 5), 24 px"
    assert results["cached"]["ffm_data"] == {"split": "ffm", "images": 20, "description": description}
    assert results["plain"]["ffm_data"] == {"split": "train", "images": 32, "description": "the task's train split"}
    report = write_sweep_outputs(tmp_path / "cached", sweeps["cached"].cfg, sweeps["cached"].data.description, results["cached"])
    assert json.loads((tmp_path / "cached" / "results.json").read_text())["ffm_data"]["description"] == description
    assert f"FFM trained S label-free on 20 images of {description}." in report.read_text()
    manifest = json.loads((tmp_path / "cached" / "manifest.json").read_text())
    assert manifest["config"]["ffm_data"] == {**FFM_SHAPES, "path": None, "image_root": None, "crop": "center"}


def test_tree_branches_train_on_ffm_data(model_dirs, tmp_path, monkeypatch):
    """The tree's branches train by FFM on ffm_data's images (trunk activations and branch targets of those
    images); its probes keep the task's train split."""
    from stitchkit.stitching.tree_run import TreeExperiment, write_tree_outputs

    datasets = recording_trainings(monkeypatch, tmp_path / "tree")
    models = {"dino": model_dirs["dino"], "clip": model_dirs["clip"]}
    cfg = validate_config(TreeConfig, tree_config(models, ffm_data=FFM_SHAPES, cache_dtype="float32"))
    experiment = TreeExperiment(cfg, tmp_path / "tree")
    results = experiment.run_all()
    expected = ffm_shapes_images()
    branch = datasets["branches/n1/clip/seed0"].arrays
    np.testing.assert_allclose(branch["hidden"], hidden_states_of(experiment.models["dino"], expected)[1], atol=1e-5)
    layer = experiment.layers["clip"]
    np.testing.assert_allclose(branch["reference"], hidden_states_of(experiment.models["clip"], expected)[layer], atol=1e-5)
    assert len(datasets["trees/n1/seed0/probe"]) == len(datasets["baselines/seed0/single"]) == 32
    assert results["ffm_data"] == {"split": "ffm", "images": 20, "description": "shapes world scenes (1-4 objects, seed 5), 24 px"}
    report = write_tree_outputs(tmp_path / "tree", cfg, experiment.data.description, results)
    assert "FFM trained each branch's S_i label-free on 20 images of shapes world scenes" in report.read_text()


def test_ffm_data_reads_images_without_labels(tmp_path):
    """A folder gives every image under it, at any depth (no class folders needed, hidden files skipped), a COCO
    file every image it lists, annotated or not; `images` caps them by a seeded choice."""
    from PIL import Image

    from stitchkit.stitching.data import DataConfig, ImageSetConfig, load_image_set, load_task_data
    from stitchkit.world.coco import render_coco

    rng = np.random.default_rng(0)
    root = tmp_path / "generic"
    saved = {}
    for name in ("a.png", "sub/b.jpg", "sub/deeper/c.png", ".hidden/d.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        saved[name] = np.asarray(Image.open(root / name).convert("RGB"))  # as stored (the jpg is lossy)
    (root / "._a.png").write_bytes(b"not an image")  # macOS metadata next to a copied file
    (root / "notes.txt").write_text("not an image")
    rows = lambda images: sorted(image.tobytes() for image in images)

    images, description = load_image_set(ImageSetConfig(source="folder", path=str(root), image_size=16, images=10))
    assert rows(images) == rows(saved[n] for n in ("a.png", "sub/b.jpg", "sub/deeper/c.png"))
    assert description == f"image folder {root} (drawn from its 3 images with seed 0), centre squares at 16 px"
    capped = [load_image_set(ImageSetConfig(source="folder", path=str(root), image_size=16, images=2, seed=s))[0] for s in (0, 0, 1, 2)]
    assert all(len(c) == 2 and set(rows(c)) <= set(rows(images)) for c in capped)
    assert rows(capped[0]) == rows(capped[1]) and len({tuple(rows(c)) for c in capped}) > 1  # seeded, and the seed matters

    annotations = render_coco(tmp_path / "coco", n_images=6, size=16, seed=0)
    data = json.loads(annotations.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in (0, 1)]  # two images unlabelled
    annotations.write_text(json.dumps(data))
    images, _ = load_image_set(ImageSetConfig(source="coco", path=str(annotations), image_size=16, images=100))
    files = sorted((tmp_path / "coco" / "images").glob("*.png"))
    assert len(files) == 6 and rows(images) == rows(np.asarray(Image.open(f).convert("RGB")) for f in files)

    # Without a size of its own, ffm_data takes the task's; the task's splits stay as they were.
    task = DataConfig(image_size=20, train=4, val=2, test=2)
    data = load_task_data("classification", task, ImageSetConfig(source="folder", path=str(root)))
    assert data.splits["ffm"].images.shape == (3, 20, 20, 3) and data.splits["ffm"].labels is None
    alone = load_task_data("classification", task)
    assert all(np.array_equal(data.splits[s].images, alone.splits[s].images) for s in ("train", "val", "test"))


def test_bad_ffm_data_is_one_clear_error(model_dirs, tmp_path):
    from stitchkit.errors import InputError

    missing, empty = tmp_path / "no_such_folder", tmp_path / "empty"
    empty.mkdir()
    bad = {
        "missing": ({"source": "folder", "path": str(missing)}, InputError, f"ffm_data: image folder not found: {missing}"),
        "empty": ({"source": "folder", "path": str(empty)}, InputError, f"ffm_data: {empty} holds no image files"),
        "coco": ({"source": "coco", "path": str(missing / "a.json")}, InputError, "ffm_data: annotation file not found"),
        "no_path": ({"source": "folder"}, ConfigError, "ffm_data: path is required for source 'folder'"),
    }
    runner = CliRunner()
    for name, (ffm_data, error, message) in bad.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sweep_config(model_dirs, ffm_data=ffm_data)))
        result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / name)])
        assert isinstance(result.exception, error) and message in str(result.exception), (name, result.exception)
        assert result.exception.exit_code == 2
    with pytest.raises(ConfigError, match="ffm_data: no objective trains by FFM"):
        validate_config(StitchRunConfig, sweep_config(model_dirs, objectives=["tlt", "lfm"], ffm_data=FFM_SHAPES))
    tree = {"models": model_dirs, "trunk": "dino", "branches": ["clip"], "points": [1], "device": "cpu",
            "ffm_data": {"source": "folder", "path": str(missing)}}  # fmt: skip
    with pytest.raises(InputError, match="ffm_data: image folder not found"):
        run_tree(validate_config(TreeConfig, tree), tmp_path / "tree")
