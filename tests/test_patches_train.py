"""Visual stitching training and evaluation on tiny random-init VLMs: loss masking, ranks against Hugging Face's
own forward, curves and resume, the whole `patches run` pipeline, the build command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from vlm_tiny import images, tiny_llava_onevision, tiny_qwen_vl

from stitchkit.config import validate_config
from stitchkit.errors import ConfigError, InputError
from stitchkit.patches import EvalItem, rank_of, score_items
from stitchkit.patches.config import PatchesConfig, TrainSettings
from stitchkit.patches.train import PatchSample, finetune_with_curve, patch_collate
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


def settings(**kw) -> TrainSettings:
    base = dict(lr=1e-2, batch_size=2, epochs={1: 2}, seeds=[1], eval_points=2, mixed_precision="no")
    return TrainSettings(**{**base, **kw})


def evaluate_fn():
    image = pil(1, seed=9)
    items = [EvalItem("a", "image", image, "the shape is id", 0), EvalItem("a", "reference", [], "the star is id", 0)]
    return lambda vlm: score_items(vlm, items, IDS)


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
                       "arrangements": [1], "train": {"lr": 1e-2, "batch_size": 2, "epochs": {2: 1}, "seeds": [1], "eval_points": 1}},
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
    text = report.read_text()
    assert "reference (f=1/2)" in text and "Adversarial labels" in text
    assert (tmp_path / "run" / "figures" / "patches_curves_shapes.png").is_file()

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
