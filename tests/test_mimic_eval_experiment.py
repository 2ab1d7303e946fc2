"""`stitchkit mimic run`: every study of the paper from one config, on a tiny LLaVA-OneVision and a rendered shapes
world; resumable; and the quickstart section built from the same machinery."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner
from vlm_tiny import tiny_llava_onevision

from stitchkit.cli import app, main
from stitchkit.multiimage import load_benchmark
from stitchkit.multiimage.experiment import ExperimentConfig, benchmark_images, load_experiment
from stitchkit.paths import CONFIGS
from stitchkit.runs import RunDir
from stitchkit.vlm import VLM

WORLD = {"images": 160, "size": 48, "seed": 0,
         "config": {"max_objects": 4, "min_size": 0.25, "max_size": 0.45, "max_overlap": 0.0}}
BUILD = {
    "seed": 0,
    "filter": {"min_box_area_frac": 0.02},
    "min_images_per_class": 3,
    "counting": {"n_samples": 4, "splits": ["balanced"], "k": [1], "spread": [1, 2], "distractors": [0, 2], "totals": [2]},
    "listing": {"n_samples": 2, "spread": [1, 2], "distractors": [0]},
    "common": {"n_samples": 2, "n_images": [2]},
    "oddone": {"n_samples": 2, "n_images": [3]},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic_run")
    VLM(*tiny_llava_onevision()).save_pretrained(root / "model")
    config = {
        "name": "tiny",
        "model": str(root / "model"),
        "threads": 1,
        "data": {"world": WORLD, "build": BUILD},
        "eval": {"batch_size": 4},
        "diagnostics_model": "second_half",
        "finetune": {
            "data": {"world": {**WORLD, "seed": 1}, "build": {**BUILD, "seed": 1}},
            "arms": ["none", "second_half"],
            "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "mixed_precision": "no"},
        },
        "flops": {"samples": 3, "n_images": [2, 4]},
        "pooling": {"factors": [1, 2], "max_per_task": 1, "pool_pad": "zeros"},
        "stitching": {"max_per_task": 1},
        "attention": {"n_images": [2, 3], "samples": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished(config_file):
    """The tiny experiment, run once into <root>/quick/mimic: where the quickstart section expects it."""
    out = config_file.parent / "quick" / "mimic"
    result = CliRunner().invoke(app, ["mimic", "run", str(config_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_run_writes_every_study_and_resumes(config_file, finished):
    out = finished
    results = json.loads((out / "results.json").read_text())
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert list(steps) == ["data", "baseline", "finetune/none", "finetune/second_half", "flops", "pooling", "stitching",
                           "attention"]

    # training data never shares an image with the evaluation benchmark
    eval_bench, train_bench = load_benchmark(results["benchmark"]), load_benchmark(results["train_benchmark"])
    assert not set(benchmark_images(eval_bench)) & set(benchmark_images(train_bench))

    assert set(results["baseline"]["scores"]) == {"counting", "listing", "common", "oddone", "avg"}
    arms = results["finetune"]
    assert arms["none"]["masked_layers"] == [] and arms["second_half"]["masked_layers"] == [2, 3]
    assert all(r["steps"] == 2 and len(r["losses"]) == 2 for r in arms.values())
    assert (out / "finetune" / "second_half" / "train" / "done.json").is_file()
    evals = {p.name for p in (out / "evals").iterdir()}
    assert {"base-dense-pool1-none-all", "ft-none-dense-pool1-none-all", "ft-second_half-masked-second_half-pool1-none-all",
            "ft-second_half-masked-second_half-pool2-none-stratified1",
            "ft-second_half-masked-second_half-pool1-pixels2-stratified1",
            "ft-second_half-masked-second_half-pool1-stitch-stratified1"} <= evals
    masked_eval = json.loads((out / "evals" / "ft-second_half-masked-second_half-pool1-none-all" / "results.json").read_text())
    assert masked_eval["eval"]["masked_layers"] == [2, 3]

    flops = results["flops"]["measured"]["layer_sets"]
    assert set(flops) == {"second_half"} and 0 < flops["second_half"]["per_masked_layer"] < 1
    # pooling.pool_pad reaches the model for the pooled evaluations; f = 1 pools nothing and records no pad
    def pooling_settings(f: int) -> dict:
        folder = out / "evals" / f"ft-second_half-masked-second_half-pool{f}-none-stratified1"
        return json.loads((folder / "results.json").read_text())["eval"]

    assert pooling_settings(2)["pool_pad"] == "zeros" and "pool_pad" not in pooling_settings(1)
    assert results["pooling"]["pool_pad"] == "zeros"
    pooling = {(r["method"], r["factor"]): r for r in results["pooling"]["rows"]}
    assert pooling[("token pooling", 2)]["vision_tokens_per_image"] < pooling[("token pooling", 1)]["vision_tokens_per_image"]
    assert pooling[("pixel down/up-sampling", 2)]["vision_tokens_per_image"] == pooling[("token pooling", 1)]["vision_tokens_per_image"]
    stitching = results["stitching"]
    assert stitching["tokens"]["stitched"]["vision_tokens"] != stitching["tokens"]["multi-image"]["vision_tokens"]
    attention = results["attention"]["models"]
    assert set(attention) == {"base", "ft-none", "ft-second_half"}
    assert attention["ft-second_half"]["2"]["inter"][2:] == [0.0, 0.0]  # masked layers: no attention across images
    assert all(v > 0 for v in attention["base"]["2"]["inter"][1:])
    answer = attention["base"]["3"]["answer"]  # 3 images: counting and odd-one samples with evidence in some images
    assert answer["samples"] > 0 and 0 < answer["uniform_target_share"] < 1
    assert all(0 <= v <= 1 for v in answer["target_share"] + answer["image_mass"])
    report = (out / "report.md").read_text()
    for heading in ("Baseline", "Masked-attention fine-tuning", "FLOPs", "Sequence length", "Image stitching", "Inter- vs intra"):
        assert heading in report
    for figure in ("finetune_scores.png", "finetune_loss.png", "pooling_avg.png", "stitching.png", "attention_inter_N2.png",
                   "attention_answer_N3.png"):
        assert (out / "figures" / figure).is_file()
    # every attention figure written is in the report (the density-corrected ones too)
    assert set(results["attention"]["figures"]) >= {"inter_N2", "inter_density_N2", "answer_N3"}
    for name in results["attention"]["figures"].values():
        assert f"(figures/{name})" in report, name
    # "best pooled" is a factor that pools (f = 1 is the unpooled run), and T of the FLOPs is explained
    assert results["pooling"]["best_factor"] == 2 and "best pooled (f > 1) f=2" in report
    assert "T is the mean vision tokens per image of these multi-image prompts" in report

    # a second run skips every finished step
    before = {name: step["finished"] for name, step in steps.items()}
    result = CliRunner().invoke(app, ["mimic", "run", str(config_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    after = json.loads((out / "manifest.json").read_text())["steps"]
    assert {name: step["finished"] for name, step in after.items()} == before


def test_config_errors_are_one_clear_message(config_file, tmp_path, capsys):
    data = yaml.safe_load(config_file.read_text())
    for change, message in (({"diagnostics_model": "first_half"}, "diagnostics_model"),
                            ({"pooling": {"factors": [2, 3]}}, "factors"),
                            ({"data": {"world": WORLD, "annotations": "x.json", "images": "x"}}, "exactly one"),
                            ({"finetune": {**data["finetune"], "arms": ["none", "secnd_half"]}},
                             "finetune.arms: arms[1] 'secnd_half' is not a layer set: use one of none, "
                             "all, first_half, second_half or ranges like '12-23' or '0-3,8'"),
                            ({"studies": {}}, "studies")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**data, **change}))
        with pytest.raises(SystemExit) as exit_info:
            main(["mimic", "run", str(path), "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_bundled_configs_validate():
    quick = load_experiment(CONFIGS / "mimic" / "quickstart.yaml")
    assert quick.model == "micro" and quick.finetune.arms == ["none", "all", "first_half", "second_half"]
    assert quick.pooling.factors == [1, 2, 4, 8, 16] and quick.pooling.pixel_control
    paper = load_experiment(CONFIGS / "mimic" / "paper.yaml")
    assert paper.model == "llava-hf/llava-onevision-qwen2-0.5b-si-hf"  # the HF conversion; lmms-lab's is LLaVA-NeXT format
    assert paper.eval.batch_size == 1  # the official wrapper's
    assert "train2017" in paper.data.images and paper.diagnostics_model == "base"
    assert paper.finetune.lora_r == 128 and paper.finetune.lora_alpha == 32 and paper.finetune.train.lr == 2.5e-5
    assert paper.pooling.pool_pad == "zeros" and quick.pooling.pool_pad == "exclude"  # the official tail for the paper
    assert isinstance(paper, ExperimentConfig)
    micro = load_experiment(CONFIGS / "mimic" / "micro.yaml")
    assert micro.model == "micro" and micro.diagnostics_model == quick.diagnostics_model == "base"


def test_official_quirk_switches_reach_the_arms_and_the_evaluations(tmp_path, monkeypatch):
    """finetune.legacy_layer_loop: every arm masks what the official decoder loop masks (training, evaluation, FLOPs);
    eval.legacy_maxlen_fallback: every evaluation runs under it and records it."""
    from types import SimpleNamespace

    from stitchkit.multiimage import experiment
    from stitchkit.vlm import AttentionPolicy

    def make(**quirks):
        cfg = ExperimentConfig.model_validate({
            "data": {"world": WORLD}, "eval": {"legacy_maxlen_fallback": quirks.get("fallback")},
            "finetune": {"data": {"world": WORLD}, "train": {"steps": 1, "batch_size": 1}, "legacy_layer_loop": quirks.get("loop", False)},
        })
        return experiment.Experiment(cfg, RunDir(tmp_path / str(len(quirks)), config=cfg))

    plain, legacy = make(), make(loop=True, fallback=20000)
    assert plain.arm_layers("second_half", 24) == list(range(12, 24))
    assert legacy.arm_layers("second_half", 24) == [] and legacy.arm_layers("12-23", 24) == []
    assert legacy.arm_layers("first_half", 24) == list(range(12)) and legacy.arm_layers("all", 24) == list(range(24))

    seen = {}
    def fake_evaluate(vlm, bench, folder, settings, **options):
        seen.update(policy=vlm.policy, settings=settings)

    monkeypatch.setattr(experiment, "evaluate", fake_evaluate)
    vlm = SimpleNamespace(policy=AttentionPolicy(masked_layers=[0, 1]), masked_layers=frozenset({0, 1}))
    for exp, expected in ((plain, None), (legacy, 20000)):
        exp._bench = SimpleNamespace(root=tmp_path, samples=[], scoring_modes=("clean", "legacy_official"))
        exp.evaluate(vlm, "ft-all", "masked:all", 1, "none", None, None, "eval")
        assert seen["policy"].legacy_maxlen_fallback == expected and seen["policy"].masked_layers == [0, 1]
        assert seen["settings"].get("legacy_maxlen_fallback") == expected


def test_quickstart_section_copies_its_figures(config_file, finished):
    from stitchkit.multiimage.quickstart import quickstart

    run = RunDir(finished.parent)  # its experiment is finished: the section only reads and links it
    section = quickstart(run, config_file)
    assert section.startswith("## MIMIC")
    assert "### Masked-attention fine-tuning" in section
    links = [line.split("](")[1].rstrip(")") for line in section.splitlines() if line.startswith("![")]
    assert links and all(link.startswith("figures/mimic_") and (run.root / link).is_file() for link in links)
