"""`stitchkit mimic eval`: batched, resumable generation on a built benchmark, its scores, and the image controls.

Oracles: Hugging Face's own `generate` run one sample at a time (for the batched predictions), an uninterrupted
evaluation (for a killed and resumed one), an explicit allowed-pair count (for the FLOPs), the reference's
worked FLOPs values, and PIL's bicubic resize (for the pixel control).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner
from vlm_tiny import tiny_llava_onevision, tiny_qwen_vl

from stitchkit.cli import app, main
from stitchkit.errors import ConfigError
from stitchkit.multiimage import MimicConfig, MimicIndex, build_benchmark, load_benchmark
from stitchkit.multiimage.evaluate import (
    PredictionLog,
    attention_policy,
    check_policy_spec,
    evaluate,
    generation_batches,
    load_model,
    sample_images,
)
from stitchkit.multiimage.imageops import encoder_side, resample_image, stitch_grid, stitch_images
from stitchkit.multiimage.protocol import GENERATION_MAX_NEW_TOKENS
from stitchkit.multiimage.studies import flops_reduction, formula_table, REFERENCE_GEOMETRY
from stitchkit.vlm import VLM, load_vlm
from stitchkit.world import WorldConfig, render_coco

BUILD = {
    "seed": 0,
    "filter": {"min_box_area_frac": 0.02},
    "min_images_per_class": 3,
    "counting": {"n_samples": 6, "splits": ["balanced"], "k": [1], "spread": [1, 2], "distractors": [0, 2],
                 "totals": [2], "max_count": 4},
    "listing": {"n_samples": 3, "spread": [1, 2], "distractors": [0, 1]},
    "common": {"n_samples": 3, "n_images": [2, 3]},
    "oddone": {"n_samples": 3, "n_images": [3, 4]},
}
WORLD = WorldConfig(min_size=0.25, max_size=0.45, max_overlap=0.0, max_objects=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny LLaVA-OneVision saved as a folder, and a small benchmark from a rendered shapes world."""
    root = tmp_path_factory.mktemp("mimic_eval")
    model, processor = tiny_llava_onevision()
    VLM(model, processor).save_pretrained(root / "model")
    render_coco(root / "world", n_images=160, size=48, seed=0, cfg=WORLD)
    build_benchmark(root / "world" / "annotations.json", root / "world", root / "bench", MimicConfig.model_validate(BUILD))
    return root


def hf_generate_one(model, processor, vlm: VLM, images, prompt: str, max_new_tokens: int) -> str:
    """Hugging Face's own greedy generate on one unpadded row, cut at the first end-of-sequence token."""
    inputs = processor(text=[vlm.build_prompt(prompt, len(images))], images=[images], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    ends = [i for i, t in enumerate(out) if t in vlm.eos_token_ids]
    return processor.tokenizer.decode(out[: ends[0]] if ends else out, skip_special_tokens=True).strip()


def test_eval_cli_writes_the_report_and_batches_equal_one_sample_hf_generate(data, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["mimic", "eval", "--model", str(data / "model"), "--data", str(data / "bench"),
                                      "--out", str(out), "--batch-size", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    bench = load_benchmark(data / "bench")
    results = json.loads((out / "results.json").read_text())
    assert results["n_samples"] == len(bench.samples) and results["missing"] == 0
    assert set(results["tasks"]) == {"counting", "listing", "common", "oddone"}
    assert results["legacy_official"]["tasks"].keys() == results["tasks"].keys()  # both scoring modes are kept
    assert results["eval"]["policy"] == "dense" and results["eval"]["pool_factor"] == 1
    for name in ("score_vs_spread", "score_vs_n_distractors", "score_vs_n_images"):
        assert (out / "figures" / f"{name}.png").is_file()
    assert "MIMIC scores" in (out / "report.md").read_text()

    predictions = PredictionLog(out / "predictions.jsonl").done
    assert set(predictions) == {s.id for s in bench.samples}
    vlm = load_vlm(str(data / "model"))
    for sample in bench.samples[::4]:  # every task, several image counts
        expected = hf_generate_one(vlm.model, vlm.processor, vlm, sample_images(bench, sample), sample.prompt(),
                                   GENERATION_MAX_NEW_TOKENS[sample.task])
        assert predictions[sample.id] == expected, sample.id


def test_eval_cli_takes_the_official_quirks_and_records_them(data, tmp_path):
    out = tmp_path / "quirks"
    result = CliRunner().invoke(app, ["mimic", "eval", "--model", str(data / "model"), "--data", str(data / "bench"),
                                      "--out", str(out), "--policy", "masked:2-3", "--legacy-layer-loop",
                                      "--legacy-maxlen-fallback", "20000", "--max-per-task", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "results.json").read_text())["eval"]
    assert settings["masked_layers"] == [] and settings["legacy_layer_loop"] is True
    assert settings["legacy_maxlen_fallback"] == 20000


def test_eval_cli_pool_pad_reaches_the_model(data, tmp_path, monkeypatch):
    """--pool-pad zeros: the official zero-padded pooling tail, handed to the VLM's pooling and recorded."""
    from stitchkit.vlm import model as vlm_model

    pooled, pool = [], vlm_model.pool_image_features

    def spy(features, factor, trailing, pad="exclude"):
        pooled.append((factor, pad))
        return pool(features, factor, trailing, pad)

    monkeypatch.setattr(vlm_model, "pool_image_features", spy)
    for pad in ("zeros", "exclude"):
        pooled.clear()
        out = tmp_path / pad
        result = CliRunner().invoke(app, ["mimic", "eval", "--model", str(data / "model"), "--data",
                                          str(data / "bench"), "--out", str(out), "--pool", "2", "--pool-pad", pad,
                                          "--max-per-task", "1", "--threads", "1"])
        assert result.exit_code == 0, result.output
        assert pooled and set(pooled) == {(2, pad)}
        assert json.loads((out / "results.json").read_text())["eval"]["pool_pad"] == pad


def test_batches_group_one_task_and_image_count():
    class S:
        def __init__(self, i, task, n):
            self.id, self.task, self.n_images = str(i), task, n

    samples = [S(0, "common", 3), S(1, "counting", 2), S(2, "common", 2), S(3, "counting", 2), S(4, "counting", 5)]
    batches = generation_batches(samples, 1 + 1)
    assert [[s.id for s in b] for b in batches] == [["1", "3"], ["4"], ["2"], ["0"]]


def test_a_killed_evaluation_resumes_where_it_stopped(data, tmp_path):
    bench = load_benchmark(data / "bench")
    vlm = load_vlm(str(data / "model"))
    settings = {"model": "tiny", "policy": "dense"}
    reference = evaluate(vlm, bench, tmp_path / "reference", settings=settings, batch_size=3)
    n_batches = len(generation_batches(bench.samples, 3))

    calls = {"n": 0}
    generate = vlm.generate

    def dying_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while generating the third batch
        return generate(*args, **kwargs)

    vlm.generate = dying_generate
    with pytest.raises(KeyboardInterrupt):
        evaluate(vlm, bench, tmp_path / "killed", settings=settings, batch_size=3)
    log = tmp_path / "killed" / "predictions.jsonl"
    done_before = len(log.read_text().splitlines())
    assert 0 < done_before < len(bench.samples)
    with open(log, "ab") as f:  # a batch torn mid-write
        f.write(b'{"id": "counting-000005", "predic')

    calls["n"], vlm.generate = 0, lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), generate(*a, **k))[1]
    resumed = evaluate(vlm, bench, tmp_path / "killed", settings=settings, batch_size=3)
    assert calls["n"] == n_batches - 2  # only the batches without predictions ran again
    assert resumed["tasks"] == reference["tasks"]
    assert PredictionLog(log).done == PredictionLog(tmp_path / "reference" / "predictions.jsonl").done
    calls["n"] = 0
    evaluate(vlm, bench, tmp_path / "killed", settings=settings, batch_size=3)  # finished: nothing runs
    legacy = evaluate(vlm, bench, tmp_path / "killed", settings=settings, batch_size=3, legacy_official=True)
    assert calls["n"] == 0  # the other scoring mode re-scores the stored predictions
    assert legacy["mode"] == "legacy_official" and legacy["clean"]["tasks"] == {t: m["score"] for t, m in reference["tasks"].items()}
    with pytest.raises(ConfigError, match="different config"):
        evaluate(vlm, bench, tmp_path / "killed", settings={**settings, "policy": "masked"}, batch_size=3)


def test_policy_specs_and_user_errors(data, tmp_path, capsys):
    assert check_policy_spec("dense") == "none"
    assert check_policy_spec("masked") == "second_half"
    assert attention_policy("masked", 24).layers(24) == frozenset(range(12, 24))
    assert attention_policy("masked:first_half", 24).layers(24) == frozenset(range(12))
    assert attention_policy("masked:all", 4).layers(4) == frozenset(range(4))
    assert attention_policy("masked:1-2,0", 4).layers(4) == frozenset({0, 1, 2})
    assert attention_policy("dense", 4).layers(4) == frozenset()
    assert attention_policy("masked:2-3", 4, legacy_layer_loop=True).layers(4) == frozenset()  # the official loop
    assert attention_policy("masked:0-1", 4, legacy_layer_loop=True).layers(4) == frozenset({0, 1})
    assert attention_policy("masked", 4, legacy_maxlen_fallback=20000).legacy_maxlen_fallback == 20000
    for bad in ("sparse", "masked:middle", "dense:3"):
        with pytest.raises(ConfigError):
            check_policy_spec(bad)
    base = ["mimic", "eval", "--model", str(data / "model"), "--data", str(data / "bench"), "--out", str(tmp_path / "x")]
    for extra, message in ((["--policy", "masked:middle"], "masked_layers"), (["--pool", "3"], "pool_factor"),
                           (["--policy", "masked:9"], "do not exist"), (["--pool-pad", "mean"], "--pool-pad 'mean'")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["mimic", "eval", "--model", str(tmp_path / "no_model"), "--data", str(data / "bench"), "--out", str(tmp_path / "y")])
    assert exit_info.value.code == 2 and "cannot load" in capsys.readouterr().err


def test_several_pool_factors_masked_policy_and_max_per_task(data, tmp_path):
    out = tmp_path / "pools"
    where = ["mimic", "eval", "--model", str(data / "model"), "--data", str(data / "bench"), "--out", str(out)]
    base = [*where, "--policy", "masked", "--max-per-task", "2", "--threads", "1"]
    result = CliRunner().invoke(app, [*base, "--pool", "1", "--pool", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert [r["pool_factor"] for r in summary["pool_factors"]] == [1, 4]
    assert (out / "figures" / "score_vs_pool_factor.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())  # OUT is a run folder too: what every factor shares
    assert manifest["config"]["policy"] == "masked" and manifest["config"]["max_per_task"] == 2 and "pool_factor" not in manifest["config"]
    for f in (1, 4):
        run = json.loads((out / f"pool{f}" / "results.json").read_text())
        assert run["n_samples"] == 8 and run["eval"]["pool_factor"] == f
        assert run["eval"]["masked_layers"] == [2, 3]  # the tiny model has 4 decoder layers
    # each report names what made it: model, policy and its layers, pooling, the subset
    report = (out / "pool4" / "report.md").read_text()
    for words in (f"model `{data / 'model'}`", "policy `masked` (masked layers 2-3)", "pool factor 4, pad exclude",
                  "a stratified subset of at most 2 samples per task"):
        assert words in report, words
    assert "policy `masked` (masked layers 2-3)" in (out / "report.md").read_text()

    # a later single --pool with the same shared settings joins the folder; the summary covers every factor in it
    result = CliRunner().invoke(app, [*base, "--pool", "2"])
    assert result.exit_code == 0, result.output
    assert not (out / "predictions.jsonl").exists() and (out / "pool2" / "predictions.jsonl").is_file()
    summary = json.loads((out / "results.json").read_text())
    assert [r["pool_factor"] for r in summary["pool_factors"]] == [1, 2, 4]
    pool4 = json.loads((out / "pool4" / "results.json").read_text())
    assert summary["pool_factors"][2] == {"pool_factor": 4, **{t: m["score"] for t, m in pool4["tasks"].items()},
                                          "avg": pool4["mimic_avg"]}
    # a summary in the other scoring mode takes every factor's stored scores in that mode
    result = CliRunner().invoke(app, [*base, "--pool", "1", "--legacy-official"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["mode"] == "legacy_official" and [r["pool_factor"] for r in summary["pool_factors"]] == [1, 2, 4]
    assert summary["pool_factors"][2]["avg"] == pool4["legacy_official"]["mimic_avg"]
    # other shared settings are still refused
    result = CliRunner().invoke(app, [*where, "--policy", "dense", "--max-per-task", "2", "--threads", "1", "--pool", "8"])
    assert result.exit_code != 0 and "different config" in str(result.exception)


def test_micro_spec_loads_the_cached_micro_vlm(tmp_path, monkeypatch):
    import yaml

    from stitchkit.engine import TrainConfig
    from stitchkit.vlm.micro import MICRO_JSON, MicroVLMRecipe, micro_model

    recipe = MicroVLMRecipe(name="tiny_micro", vision="random", language={"hidden_size": 16, "num_layers": 2, "num_heads": 2,
                                                                           "num_kv_heads": 1}, train=TrainConfig(steps=1, batch_size=2))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    monkeypatch.setenv("STITCHKIT_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "zoo" / recipe.folder_name
    VLM(*micro_model(recipe)).save_pretrained(folder)
    (folder / MICRO_JSON).write_text("{}")  # what marks a finished build
    vlm, identity = load_model(f"micro:{path}", device="cpu")
    assert identity == f"micro:{recipe.folder_name}" and vlm.num_layers == 2


# ---- image controls ------------------------------------------------------------------------------------------


def test_encoder_side_reads_the_processor():
    assert encoder_side(VLM(*tiny_llava_onevision())) == 16
    assert encoder_side(VLM(*tiny_qwen_vl())) is None  # native resolution: no fixed side


def test_pixel_control_keeps_the_size_and_removes_detail():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    assert resample_image(image, 1, 40) is image
    out = resample_image(image, 4, 40)
    assert out.size == (40, 30)  # the longer side at the encoder's resolution, aspect kept
    seen = image.resize((40, 30), Image.Resampling.BICUBIC)
    expected = seen.resize((20, 15), Image.Resampling.BICUBIC).resize((40, 30), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    detail = lambda im: np.abs(np.diff(np.asarray(im, dtype=float), axis=1)).mean()  # noqa: E731
    assert detail(out) < 0.6 * detail(seen)
    assert resample_image(image, 16, None).size == image.size  # no fixed side: the image's own resolution


def test_stitched_canvas_tiles_images_in_order():
    assert [stitch_grid(n) for n in (1, 2, 3, 4, 5, 6, 9, 10)] == [(1, 1), (2, 1), (2, 2), (2, 2), (3, 2), (3, 2), (3, 3), (4, 3)]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (20, 10), c) for c in colours]
    canvas = stitch_images(images, 20)
    assert canvas.size == (40, 40)
    pixels = np.asarray(canvas)
    # tile i sits at column i % 2, row i // 2, centred vertically (20 x 10 in a 20 x 20 cell), white around it
    for i, colour in enumerate(colours):
        x, y = (i % 2) * 20, (i // 2) * 20
        assert tuple(pixels[y + 10, x + 10]) == colour
        assert tuple(pixels[y + 2, x + 10]) == (255, 255, 255)
    assert tuple(pixels[30, 30]) == (255, 255, 255)  # the empty fourth cell


# ---- FLOPs ---------------------------------------------------------------------------------------------------


def test_flops_formula_reproduces_the_reference_worked_values():
    rows = formula_table(REFERENCE_GEOMETRY, 24, 12, [2, 4, 5, 6, 10])
    expected = {2: (1510, 49.3, 24.6), 4: (2970, 73.8, 36.9), 5: (3700, 78.9, 39.4), 6: (4430, 82.3, 41.2),
                10: (7350, 89.3, 44.7)}
    for row in rows:
        seq, per_layer, model_wide = expected[row["n_images"]]
        assert row["sequence_length"] == seq
        assert 100 * row["per_masked_layer"] == pytest.approx(per_layer, abs=0.05)
        assert 100 * row["model_wide"] == pytest.approx(model_wide, abs=0.05)
    sizes = {"layers": 4, "hidden_size": 8, "non_embedding_params": 1000}
    r = flops_reduction(100.0, 40.0, 20.0, sizes, 2)
    dense = 4 * 4 * 8 * 100 + 2 * 1000 * 20
    masked = dense - 2 * 4 * 8 * 60
    assert r["per_masked_layer"] == pytest.approx(0.6) and r["attention_core_model_wide"] == pytest.approx(0.3)
    assert r["whole_forward"] == pytest.approx(1 - masked / dense)


def test_measured_pairs_equal_an_explicit_mask_count(data):
    from stitchkit.multiimage.studies import flops_study

    bench = load_benchmark(data / "bench")
    vlm = load_vlm(str(data / "model"))
    result = flops_study(vlm, bench, {"second_half": [2, 3]}, n_samples=3, formula_n=[2])
    multi = [s for s in bench.samples if s.n_images >= 2]
    import random

    picked = sorted(random.Random("flops:0").sample(range(len(multi)), 3))
    dense = masked = 0
    for i in picked:
        batch = vlm.encode([sample_images(bench, multi[i])], [multi[i].prompt()])
        seq = batch.input_ids.shape[1]
        image = torch.full((seq,), -1)
        for j, span in enumerate(batch.spans[0]):
            image[span.start : span.end] = j
        q, k = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        causal = k <= q
        dense += int(causal.sum())
        masked += int((causal & ((image[:, None] < 0) | (image[:, None] == image[None, :]))).sum())
    assert result["measured"]["mean_dense_pairs"] == pytest.approx(dense / 3)
    assert result["measured"]["mean_masked_pairs"] == pytest.approx(masked / 3)
    layer_set = result["measured"]["layer_sets"]["second_half"]
    assert layer_set["per_masked_layer"] == pytest.approx(1 - masked / dense)
    assert result["geometry"]["image_tokens"] == 17  # 16 patch tokens + LLaVA-OV's image-newline


# ---- training data --------------------------------------------------------------------------------------------


def test_training_benchmark_never_uses_evaluation_images(data, tmp_path):
    from stitchkit.data import load_coco
    from stitchkit.multiimage.experiment import benchmark_images

    bench = load_benchmark(data / "bench")
    eval_images = benchmark_images(bench)
    train_cfg = MimicConfig.model_validate({**BUILD, "seed": 5})
    train = build_benchmark(data / "world" / "annotations.json", data / "world", tmp_path / "train", train_cfg,
                            exclude_images=eval_images)
    train_bench = load_benchmark(train)
    assert not set(benchmark_images(train_bench)) & set(eval_images)
    assert train_bench.meta["excluded_images"] == len(eval_images)
    index = MimicIndex.build(load_coco(data / "world" / "annotations.json"), exclude=[0, 1, 2])
    assert not index.image_eligible[[index.image_ids.index(i) for i in (0, 1, 2)]].any()
    assert math.isclose(len(train_bench.samples), len(bench.samples))


def test_answer_attention_equals_hugging_face_eager_attentions():
    from vlm_tiny import images

    from stitchkit.multiimage.studies import AnswerAttention

    model, processor = tiny_llava_onevision(attn_implementation="eager")
    vlm = VLM(model, processor)
    batch = vlm.encode([images(3)], ["Question: which shape is in every image?\nAnswer:"])
    probe = AnswerAttention(batch.spans, batch.input_ids.shape[1], vlm.num_layers)
    with torch.no_grad():
        vlm.forward(batch, probe=probe)
        hf = model(**batch.text, **batch.pixels, position_ids=batch.position_ids, output_attentions=True)
    for layer, attentions in enumerate(hf.attentions):
        last = attentions[0, :, -1].mean(0)  # head-averaged attention of the last prompt token
        expected = torch.stack([last[s.start : s.end].sum() for s in batch.spans[0]])
        assert torch.allclose(probe.mass[0, layer], expected, atol=1e-5), layer
    assert 0 < float(probe.mass[0].sum(-1).min()) <= 1


def test_answer_statistics_flag_constant_answers_and_the_blind_floor(data):
    from collections import Counter

    from stitchkit.multiimage.evaluate import answer_statistics

    bench = load_benchmark(data / "bench")
    predictions = {s.id: "Two." if s.task == "counting" else s.gt for s in bench.samples}
    stats = answer_statistics(bench.samples, predictions, "clean", bench.vocabulary())
    counting = [s for s in bench.samples if s.task == "counting"]
    assert stats["top_answer"]["counting"] == "two" and stats["top_answer_share"]["counting"] == 1.0
    # the best constant counting answer is right exactly on the samples whose count it names
    assert stats["constant_answer_score"]["counting"] == max(Counter(s.gt for s in counting).values()) / len(counting)
    common = [s for s in bench.samples if s.task == "common"]
    assert stats["top_answer_share"]["common"] == max(Counter(s.gt for s in common).values()) / len(common)
