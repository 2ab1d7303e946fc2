"""Visual stitching training and evaluation on tiny random-init VLMs: loss masking, ranks against Hugging Face's
own forward, curves and resume, the whole `patches run` pipeline, the build command."""

from __future__ import annotations

import json
import math

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from vlm_tiny import images, tiny_llava_onevision, tiny_qwen_vl

from stitchkit.config import validate_config
from stitchkit.errors import ConfigError, InputError
from stitchkit.patches import EvalItem, generate_ids, random_baseline, rank_of, score_items
from stitchkit.patches.config import ModelSettings, PatchesConfig, TrainSettings
from stitchkit.patches.models import prepare_images
from stitchkit.patches.train import PatchSample, eval_schedule, finetune_with_curve, patch_collate, reported_step
from stitchkit.vlm import load_vlm
from stitchkit.vlm.finetune import vlm_loss
from stitchkit.vlm.model import IGNORE_INDEX

IDS = [" ab123", " cd456", " ef789"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pil(n: int, seed: int = 0) -> list[Image.Image]:
    return [Image.fromarray(a) for a in images(n, seed)]


def samples() -> list[PatchSample]:
    ims = pil(4)
    # prompts of different lengths, so rows are padded
    return [PatchSample(ims[0], "the shape is id", IDS[0]), PatchSample(ims[1], "what shape is this id", IDS[1]),
            PatchSample(ims[2], "the shape is id", IDS[2]), PatchSample(ims[3], "what shape is this id", IDS[0])]  # fmt: skip


@pytest.mark.parametrize("build", [tiny_llava_onevision, tiny_qwen_vl], ids=["llava_onevision", "qwen2_vl"])
def test_loss_falls_on_the_id_tokens_only(build):
    vlm = load_vlm(*build())
    data = samples()
    batch = patch_collate(vlm, "id")(data)
    labels, input_ids = batch["labels"], batch["inputs"]["input_ids"]
    eos = vlm.tokenizer.eos_token_id
    for row, sample in enumerate(data):
        target = vlm.tokenizer(sample.response, add_special_tokens=False)["input_ids"]
        supervised = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(supervised) == len(target) == 5  # " ab123" -> a ##b ##1 ##2 ##3
        # the ID is the last thing before the appended end-of-turn, which is not supervised
        width = input_ids.shape[1]
        assert supervised == list(range(width - 1 - len(target), width - 1)) and input_ids[row, -1] == eos
        assert labels[row, supervised].tolist() == target

    # Oracle: cross-entropy of the ID tokens computed from Hugging Face's forward, without the labels tensor.
    with torch.no_grad():
        loss = vlm_loss(vlm.model, batch)
        logits = vlm.model(**batch["inputs"]).logits
    terms = []
    for row, sample in enumerate(data):
        target = vlm.tokenizer(sample.response, add_special_tokens=False)["input_ids"]
        start = input_ids.shape[1] - 1 - len(target)
        for i, token in enumerate(target):
            terms.append(-F.log_softmax(logits[row, start + i - 1].float(), -1)[token])
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_text_loss_skips_padding_images_and_the_end_of_turn():
    vlm = load_vlm(*tiny_llava_onevision())
    data = samples()
    encoded = vlm.encode([[s.image] for s in data], [s.prompt for s in data], [s.response for s in data])
    labels = patch_collate(vlm, "text")(data)["labels"]
    for row, spans in enumerate(encoded.spans):
        expected = encoded.attention_mask[row].bool().clone()
        for span in spans:
            expected[span.start : span.end] = False
        expected[-1] = False  # the appended end-of-turn
        assert torch.equal(labels[row] != IGNORE_INDEX, expected)
        assert torch.equal(labels[row][expected], encoded.input_ids[row][expected])


def test_ranks_agree_with_hugging_faces_forward():
    model, processor = tiny_llava_onevision(seed=3)
    vlm = load_vlm(model, processor)
    image = pil(1, seed=5)
    items = [EvalItem("x", "image", image, "the shape is id", 1), EvalItem("x", "reference", [], "the red star is id", 2)]
    records = score_items(vlm, items, IDS)
    for item, record in zip(items, records):
        # first-token logits and full log-probabilities straight from the model, one forward per candidate
        first, full = [], []
        for candidate in IDS:
            batch = vlm.encode([item.images], [item.prompt], [candidate])
            with torch.no_grad():
                logits = model(**vlm.model_kwargs(batch)).logits[0].float()
            target = vlm.tokenizer(candidate, add_special_tokens=False)["input_ids"]
            start = batch.input_ids.shape[1] - 1 - len(target)  # the end-of-turn token follows the candidate
            logprobs = F.log_softmax(logits, -1)
            first.append(float(logits[start - 1, target[0]]))
            full.append(sum(float(logprobs[start + i - 1, t]) for i, t in enumerate(target)))
        assert record["rank_logit"] == rank_of(first, item.gold)
        assert record["rank_logprob"] == rank_of(full, item.gold)
        assert record["top"] == IDS[int(np.argmax(first))].strip()


def test_a_random_initialised_model_ranks_at_chance():
    """§9 acceptance test: untrained, the mean rank falls within the confidence interval of (K-1)/2. Golds are drawn
    at random, independently of the model, so whatever it scores, E[rank] = (K-1)/2 and Var[rank] <= (K^2-1)/12
    per item (mid ties); the interval is +-3.29 standard errors (99.9%). A 1-based rank, a scaled one, or ties
    counted low (strict) under a flat model would leave it."""
    k, images_per_model = 5, 20
    rng = np.random.default_rng(0)
    ranks: dict[str, list[float]] = {}
    for build, seed in [(tiny_qwen_vl, 0), (tiny_qwen_vl, 1), (tiny_llava_onevision, 2), (tiny_llava_onevision, 3)]:
        vlm = load_vlm(*build(seed=seed))
        ids = [f" {i}" for i in generate_ids(k, seed, vlm.tokenizer)]
        items = []
        for j, image in enumerate(pil(images_per_model, seed=100 + seed)):
            items.append(EvalItem(str(j), "image", [image], "the shape is id", int(rng.integers(k))))
            items.append(EvalItem(str(j), "reference", [], "the red star is id", int(rng.integers(k))))
        for record in score_items(vlm, items, ids):
            for scoring in ("logit", "logprob"):
                ranks.setdefault(f"{record['mode']}_{scoring}", []).append(record[f"rank_{scoring}"])
    for metric, values in ranks.items():
        half_width = 3.29 * math.sqrt((k * k - 1) / 12 / len(values))
        assert abs(np.mean(values) - random_baseline(k)) <= half_width, (metric, np.mean(values), half_width)


@pytest.mark.parametrize("build", [tiny_llava_onevision, tiny_qwen_vl], ids=["llava_onevision", "qwen2_vl"])
def test_at_f1_a_tiny_model_trained_to_convergence_memorises_every_image(build, tmp_path):
    """§9 acceptance test: at f = 1 the image-based test shows the training images themselves, so a model trained
    to convergence ranks every true ID first; untrained, it does not (a constant answer would average (K-1)/2)."""
    images = pil(6, seed=11)
    ids = [f" {i}" for i in generate_ids(6, 0, load_vlm(*build()).tokenizer)]
    data = [PatchSample(image, "the shape is id", id_) for image, id_ in zip(images, ids)]
    items = [EvalItem(str(j), "image", [image], "the shape is id", j) for j, image in enumerate(images)]
    trained = settings(batch_size=3, epochs={1: 100})  # 200 steps at lr 1e-2 (measured: 120 were just enough)
    result = finetune_with_curve(lambda: load_vlm(*build()), data, trained, 1, 1, tmp_path, lambda vlm: score_items(vlm, items, ids))
    assert result["curve"][0]["image_logit"] > 1
    assert [r["rank_logit"] for r in result["final"]] == [0.0] * 6


# ---- the official Qwen pre-resize ---------------------------------------------------------------------


OFFICIAL_BOUNDS = dict(min_pixels=32 * 28 * 28, max_pixels=128 * 28 * 28)


def animal_patch() -> Image.Image:
    """The size of every animal patch at f = 8 (500 x 375 / 8)."""
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (46, 62, 3), dtype=np.uint8))


@pytest.mark.parametrize(("pre_resize", "grid"), [("qwen_fetch_image", [[1, 12, 12]]), ("none", [[1, 10, 14]])])
def test_the_qwen_pre_resize_gives_the_official_grid(pre_resize, grid):
    # The official pipeline: 62 x 46 -> fetch_image -> 56 x 56 -> processor (32..128 tokens) -> 168 x 168, 12 x 12
    # patches of 14 px. Without the pre-resize the processor scales 62 x 46 itself: 196 x 140, 14 x 10.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model, processor = tiny_qwen_vl()
    processor.image_processor = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2)  # the real geometry
    vlm = load_vlm(model, processor)
    prepare_images(vlm, ModelSettings(**OFFICIAL_BOUNDS, pre_resize=pre_resize))
    encoded = vlm.encode([[animal_patch()]], ["the shape is id"])
    assert encoded.pixels["image_grid_thw"].tolist() == grid
    assert encoded.spans[0][0].tokens[1] - encoded.spans[0][0].tokens[0] == grid[0][1] * grid[0][2] // 4  # merged tokens
    batch = patch_collate(vlm)([PatchSample(animal_patch(), "the shape is id", IDS[0])])  # training sees the same
    assert batch["inputs"]["image_grid_thw"].tolist() == grid


def test_the_loaded_model_pre_resizes_every_image_it_scores(tmp_path):
    from stitchkit.patches.models import model_loader, qwen_fetch_image

    load_vlm(*tiny_qwen_vl(seed=4)).save_pretrained(tmp_path / "qwen")
    plain = model_loader(ModelSettings(), str(tmp_path / "qwen"))()
    pre_resized = model_loader(ModelSettings(pre_resize="qwen_fetch_image"), str(tmp_path / "qwen"))()
    image = animal_patch()

    def logits(vlm, im):
        return [s.first_token_logit for s in vlm.score([im], "the shape is id", IDS)]

    assert logits(pre_resized, image) == pytest.approx(logits(plain, qwen_fetch_image(image)), abs=1e-5)
    assert logits(pre_resized, image) != pytest.approx(logits(plain, image), abs=1e-5)
    with pytest.raises(ConfigError, match="Qwen2-VL-style image processors only"):
        prepare_images(load_vlm(*tiny_llava_onevision()), ModelSettings(pre_resize="qwen_fetch_image"))


def settings(**kw) -> TrainSettings:
    base = dict(lr=1e-2, batch_size=2, epochs={1: 2}, seeds=[1], eval_points=2, mixed_precision="no")
    return TrainSettings(**{**base, **kw})


def evaluate_fn():
    image = pil(1, seed=9)
    items = [EvalItem("a", "image", image, "the shape is id", 0), EvalItem("a", "reference", [], "the star is id", 0)]
    return lambda vlm: score_items(vlm, items, IDS)


def test_the_epochs_step_rule_counts_steps_as_the_hf_trainer():
    """f = 1, 20 images, batch 8, 15 epochs: 15 x ceil(20 / 8) = 45 steps (the official runs; 38 by samples),
    evaluated every ceil(45 / 10) = 5 steps; f = 2 (80 patches, 5 epochs) is 50 either way."""
    hf, by_samples = TrainSettings(batch_size=8, step_rule="epochs"), TrainSettings(batch_size=8)
    assert (hf.steps_for(1, 20), by_samples.steps_for(1, 20)) == (45, 38)
    assert hf.steps_for(2, 80) == by_samples.steps_for(2, 80) == 50
    assert eval_schedule(45, 10)[0] == 5 and hf.epoch_at(45, 20) == 15
    with pytest.raises(pydantic.ValidationError, match="grad_accum = 1"):
        TrainSettings(step_rule="epochs", grad_accum=2)


@pytest.mark.parametrize(("steps", "every", "official_last"), [(195, 20, 180), (75, 8, 72), (45, 5, 45), (50, 5, 50),
                                                           (200, 20, 200), (800, 80, 800)])  # fmt: skip
def test_the_reported_point_is_the_hf_trainers_last_evaluation(steps, every, official_last):
    """Oracle: the HF Trainer evaluates when step % ceil(0.1 x max_steps) == 0 and never at the end of training."""
    trainer_points = [s for s in range(1, steps + 1) if s % math.ceil(0.1 * steps) == 0]
    assert eval_schedule(steps, 10)[0] == every and trainer_points[-1] == official_last
    assert reported_step(steps, every, trainer_schedule=True) == official_last
    assert reported_step(steps, every, trainer_schedule=False) == steps  # step_rule: samples reports the end
    assert eval_schedule(steps, 10)[1][-1] == steps  # the end is still evaluated (a point of the curves)


def test_a_training_by_the_epochs_rule_reports_its_last_trainer_evaluation(tmp_path):
    # 3 samples at batch 2: 2 batches per epoch, 2.5 epochs = 5 steps; 2 points: every 3 steps -> 0, 3, and the end 5
    trainer = settings(step_rule="epochs", epochs={1: 2.5})
    result = finetune_with_curve(lambda: load_vlm(*tiny_llava_onevision()), samples()[:3], trainer, 1, 1, tmp_path, evaluate_fn())
    assert result["steps"] == 5 and [p["step"] for p in result["curve"]] == [0, 3, 5]
    assert result["final_step"] == 3
    at = {step: json.loads((tmp_path / "eval" / f"step_{step:06d}.json").read_text())["records"] for step in (3, 5)}
    assert result["final"] == at[3]
    from stitchkit.patches.experiment import aggregate_seeds

    summary = aggregate_seeds({1: result})
    assert summary["final_step"] == 3 and [p["step"] for p in summary["mean_curve"]] == [0, 3, 5]
    assert summary["final_mean"]["image_prob"] == pytest.approx(np.mean([r["prob"] for r in at[3] if r["mode"] == "image"]))


def test_a_training_by_the_epochs_rule_runs_its_short_batches(tmp_path):
    result = finetune_with_curve(lambda: load_vlm(*tiny_llava_onevision()), samples()[:3], settings(step_rule="epochs"), 1, 1,
                                 tmp_path, evaluate_fn())  # fmt: skip
    assert result["steps"] == 4  # 2 epochs of 3 samples at batch 2: batches of 2, 1, 2, 1
    assert [p["epoch"] for p in result["curve"]] == [0, 1, 2]


def test_finetuning_evaluates_on_schedule_and_a_finished_run_is_not_redone(tmp_path):
    load = lambda: load_vlm(*tiny_llava_onevision())  # noqa: E731
    data = samples()
    result = finetune_with_curve(load, data, settings(), 1, 1, tmp_path, evaluate_fn())
    assert result["steps"] == 4  # 2 epochs of 4 samples at batch 2
    assert [p["step"] for p in result["curve"]] == [0, 2, 4]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step_000000.json", "step_000002.json", "step_000004.json"]
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert set(result["curve"][-1]) >= {"image_logit", "reference_logit", "image_logprob", "reference_logprob"}

    again = finetune_with_curve(load, data, settings(), 1, 1, tmp_path, evaluate_fn())
    assert again == result
    with pytest.raises(ConfigError, match="different config"):
        finetune_with_curve(load, data, settings(lr=2e-2), 1, 1, tmp_path, evaluate_fn())


def test_lora_finetuning_starts_from_the_base_model(tmp_path):
    base = load_vlm(*tiny_llava_onevision())
    before = score_items(base, [EvalItem("a", "image", pil(1, seed=9), "the shape is id", 0)], IDS)
    load = lambda: load_vlm(*tiny_llava_onevision())  # noqa: E731
    result = finetune_with_curve(load, samples(), settings(method="lora", lora_r=4), 1, 1, tmp_path, evaluate_fn())
    step0 = json.loads((tmp_path / "eval" / "step_000000.json").read_text())["records"]
    assert step0[0]["rank_logit"] == before[0]["rank_logit"]  # LoRA's B starts at zero
    assert len(result["curve"]) == 3


def test_patches_run_end_to_end_on_a_tiny_model(tmp_path):
    from stitchkit.patches.experiment import run_patches

    model, processor = tiny_llava_onevision()
    load_vlm(model, processor).save_pretrained(tmp_path / "model")
    config = {
        "model": {"source": str(tmp_path / "model")},
        "splits": [1, 2],
        "image_sets": {"shapes": {"shapes": {"images": 3, "size": 32}}},
        "train": {"lr": 1e-2, "batch_size": 2, "epochs": {1: 2}, "default_epochs": 1, "seeds": [1, 2], "eval_points": 1},
        "moderation": {"images": {"per_category": 1, "size": 64, "markers": 4, "marker_scale": 0.12}, "splits": [2],
                       "arrangements": [1], "arrangement_labels": {1: {"unsafe": "none"}},
                       "train": {"lr": 1e-2, "batch_size": 2, "epochs": {2: 1}, "seeds": [1], "eval_points": 1}},
    }  # fmt: skip
    cfg = validate_config(PatchesConfig, config)
    report = run_patches(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    shapes = results["sets"]["shapes"]
    assert shapes["k"] == 3 and shapes["random_baseline"] == 1.0
    assert set(shapes["splits"]) == {"1", "2"} and shapes["splits"]["2"]["train_samples"] == 12
    assert set(shapes["splits"]["2"]["seeds"]) == {"1", "2"}
    assert 0 <= shapes["splits"]["2"]["final_mean"]["image_logit"] <= 2
    moderation = results["moderation"]
    assert moderation["pass_rates"]["1"]["rate"] == 0.0  # full marker images are flagged
    assert set(moderation["arrangements"]["1"]["splits"]["2"]) == {"filtered", "unfiltered"}
    assert moderation["arrangements"]["1"]["labels"] == {"B": "safe", "A": "none"}  # arrangement_labels
    records = json.loads((tmp_path / "run" / "moderation" / "arr1" / "f2" / "unfiltered" / "seed1" / "result.json").read_text())["final"]
    assert {r["key"][0]: r["gold"] for r in records} == {"A": "none", "B": "safe"}
    assert {r["top"] for r in records} <= {"none", "safe"}  # ranked between the arrangement's own two labels
    text = report.read_text()
    assert "reference (f=1/2)" in text and "Adversarial labels" in text and "ref prob" in text and "A none" in text
    assert shapes["splits"]["1"]["final_step"] == shapes["splits"]["1"]["steps"]  # step_rule: samples reports the end
    assert shapes["precheck"]["rule"] in ("logit", "logprob") and "ranked by" in text  # which rule the pre-check used
    assert (tmp_path / "run" / "figures" / "patches_curves_shapes.png").is_file()
    # the §5 analyses are off by default: no steps, no keys, no report sections (tests/test_patches_analyses.py)
    assert "localization" not in shapes and "threshold_x" not in shapes and "Threshold-x" not in text
    assert not (tmp_path / "run" / "localization").exists() and not (tmp_path / "run" / "threshold").exists()

    # a second run skips every finished step and gives the same results
    run_patches(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results


def test_build_command(tmp_path):
    from typer.testing import CliRunner

    from stitchkit.patches.commands import app

    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(pil(2)):
        im.save(folder / f"im{i}.png")
    (tmp_path / "names.csv").write_text("file,name\nim0.png,red star\nim1.png,blue ring\n")
    args = ["build", "--images", str(folder), "--names", str(tmp_path / "names.csv"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--splits", "1,2"])
    assert result.exit_code == 0, result.output
    assert "f1: 2, f2: 8, images: 2" in result.output
    result = CliRunner().invoke(app, [*args, "--splits", "1,x"])
    assert isinstance(result.exception, InputError)
