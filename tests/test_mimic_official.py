"""`stitchkit mimic import-official`: the released MIMIC data (HF dataset anurag4446/mimic) as a benchmark folder.

The released data is mimicked locally in its hub layout -- one parquet folder per config with the README's
`configs:` block, so `load_dataset(DIR, "counting", split="test")` reads it exactly as it reads the hub repo -- and
as per-config save_to_disk folders. Oracles: the rows the test wrote (answers, pixels, ids), and scores of
hand-written predictions worked out by hand under the official scorer's rules (reference mimic.md 4.1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from stitchkit.cli import main
from stitchkit.errors import InputError
from stitchkit.multiimage import load_benchmark
from stitchkit.multiimage.official import import_official
from stitchkit.multiimage.scoring import score_benchmark_dir, score_predictions, scoring_mode

RNG = np.random.default_rng(0)


def picture(mode: str = "RGB", size=(10, 8)):
    pixels = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PILImage.fromarray(pixels).convert(mode)


SHARED = picture()  # one image in two counting queries: stored once
GREY = picture("L")  # stored as the RGB image every consumer sees
ROWS = {
    "counting": [
        {"idx": 10, "question": "How many dogs are there?", "gt": 4, "task": "s1_d0", "images": [picture(), SHARED]},
        {"idx": 11, "question": "How many cats are there?", "gt": 2, "task": "s1_d0", "images": [SHARED]},
        {"idx": 12, "question": "How many zebras are there?", "gt": 7, "task": "s2_d1", "images": [GREY, picture(), picture()]},
    ],
    "listing": [
        {"id": 0, "question": "Which animals appear?", "gt": "cat, dog", "task": "animal", "images": [picture()]},
        {"id": 1, "question": "Which animals can you see?", "gt": "bear, cat, zebra", "task": "animal",
         "images": [picture(), picture()]},
    ],
    "common": [
        {"id": 0, "question": "Which object is in every image?", "gt": "dog", "task": "n2", "images": [picture(), picture()]},
        {"id": 1, "question": "What do all images share?", "gt": "person", "task": "n3",
         "images": [picture(), picture(), picture()]},
    ],
    "oddone": [
        {"id": 0, "question": "Which object appears in only one image?", "gt": "cat", "task": "n3",
         "images": [picture(), picture(), picture()]},
        {"id": 1, "question": "Which object is the odd one?", "gt": "person", "task": "n3",
         "images": [picture(), picture(), picture()]},
    ],
}

# hand-written answers, scored by hand with the official rules: the output gets a leading space; counting strips
# , . ! ? ; : ' from the ends, then int(), word2number, the first digit run; common / odd-one pass when gt is a
# substring; listing splits on ", " unstripped (the first item keeps the space), micro P/R/F1
PREDICTIONS = {
    "counting-10": "4.",  # " 4." -> " 4" -> 4: right
    "counting-11": "two cats",  # word2number -> 2: right
    "counting-12": "I see 5 or 7",  # the first digit run, 5: wrong
    "common-0": "hot dog",  # "dog" is a substring: right
    "common-1": "people",  # "person" is not: wrong
    "oddone-0": "Cat",  # lowercased: right
    # oddone-1: no prediction -> wrong, counted as missing
    "listing-0": "cat, dog",  # items " cat", "dog": 1 of 2 matched, 2 predicted
    "listing-1": "bear, cat, zebra, dog",  # " bear", "cat", "zebra", "dog": 2 of 3 matched, 4 predicted
}
PRECISION, RECALL = 3 / 6, 3 / 5
EXPECTED = {"counting": 2 / 3, "common": 1 / 2, "oddone": 1 / 2, "listing": 2 * PRECISION * RECALL / (PRECISION + RECALL)}


def features(task: str):
    from datasets import Features, Image, List, Value

    key = "idx" if task == "counting" else "id"
    return Features({"question": Value("string"), "images": List(Image()), "task": Value("string"), key: Value("int64"),
                     "gt": Value("int64" if task == "counting" else "string")})


def dataset(task: str, rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows, features=features(task))


def write_hub_layout(root: Path, rows: dict[str, list[dict]]) -> Path:
    """What `hf download anurag4446/mimic --repo-type dataset` gives: <config>/test-*.parquet and a README whose
    `configs:` block names each config's files (the layout push_to_hub(config_name=...) writes)."""
    card = ["---", "configs:"]
    for task, task_rows in rows.items():
        (root / task).mkdir(parents=True)
        dataset(task, task_rows).to_parquet(str(root / task / "test-00000-of-00001.parquet"))
        card += [f"- config_name: {task}", "  data_files:", "  - split: test", f"    path: {task}/test-*"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))
    return root


def write_saved_layout(root: Path, rows: dict[str, list[dict]]) -> Path:
    from datasets import DatasetDict

    for task, task_rows in rows.items():
        DatasetDict({"test": dataset(task, task_rows)}).save_to_disk(str(root / task))
    return root


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The fake release in both layouts, and one import of the hub layout (the datasets cache kept in tmp)."""
    import datasets

    root = tmp_path_factory.mktemp("mimic_official")
    saved_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(root / "hf_cache")
    try:
        write_hub_layout(root / "hub", ROWS)
        write_saved_layout(root / "saved", ROWS)
        import_official(root / "hub", root / "bench")
        yield root
    finally:
        datasets.config.HF_DATASETS_CACHE = saved_cache


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file the import writes for the data (manifest.json and config.yaml record when and how: left out)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "config.yaml")}


def write_predictions(path: Path, predictions: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in predictions.items()))
    return path


def test_every_row_becomes_a_sample_with_its_answer_id_and_pixels(released):
    bench = load_benchmark(released / "bench")
    assert [s.task for s in bench.samples] == ["counting"] * 3 + ["listing"] * 2 + ["common"] * 2 + ["oddone"] * 2
    by_id = bench.by_id()
    for task, rows in ROWS.items():
        for row in rows:
            sample = by_id[f"{task}-{row['idx' if task == 'counting' else 'id']}"]
            assert sample.gt == str(row["gt"]) and sample.question == row["question"] and sample.cell == row["task"]
            assert sample.n_images == len(row["images"])
            for path, source in zip(bench.image_paths(sample), row["images"], strict=True):
                with PILImage.open(path) as stored:
                    assert stored.format == "PNG" and stored.mode == "RGB"
                    assert np.array_equal(np.asarray(stored), np.asarray(source.convert("RGB")))
    # the shared image is one file with one id; every other image is distinct
    first, second = by_id["counting-10"], by_id["counting-11"]
    assert first.images[1] == second.images[0] and first.image_ids[1] == second.image_ids[0]
    assert len({i for s in bench.samples for i in s.image_ids}) == sum(len(r["images"]) for rs in ROWS.values() for r in rs) - 1
    # what the data says, what the task's definition fixes, None for the rest
    assert by_id["listing-1"].classes == ["bear", "cat", "zebra"] and by_id["listing-1"].k == 3
    assert by_id["common-1"].spread == 3 and by_id["common-1"].n_distractors == 0
    assert by_id["common-1"].target_positions == [0, 1, 2]
    assert by_id["counting-12"].spread is None and by_id["counting-12"].counts_per_image is None
    assert bench.meta["released_data"] and bench.scoring_modes == ("legacy_official",)
    assert bench.meta["class_names"] == ["bear", "cat", "dog", "person", "zebra"]


def test_the_official_scorer_on_hand_written_predictions(released, tmp_path):
    bench = load_benchmark(released / "bench")
    _, results = score_predictions(bench, PREDICTIONS, "legacy_official")
    for task, expected in EXPECTED.items():
        assert results["tasks"][task]["score"] == pytest.approx(expected), task
    assert results["tasks"]["listing"]["precision"] == pytest.approx(PRECISION)
    assert results["tasks"]["listing"]["recall"] == pytest.approx(RECALL)
    assert results["missing"] == 1
    assert results["mimic_avg"] == pytest.approx(sum(EXPECTED.values()) / 4)
    # breakdowns only by what the data carries: the number of images and the official `task` key
    assert {"n_images", "cell"} <= set(results["breakdowns"]["counting"])
    assert "spread" not in results["breakdowns"]["counting"]
    # `mimic score` defaults to the benchmark's mode; with a prediction missing the numbers do not compare
    out = score_benchmark_dir(released / "bench", write_predictions(tmp_path / "p.jsonl", PREDICTIONS), tmp_path / "s")
    written = json.loads((out / "results.json").read_text())
    assert written["mode"] == "legacy_official" and written["mimic_avg"] == pytest.approx(results["mimic_avg"])
    assert ("part of the released data (1 of 9 samples without a prediction): not comparable"
            in (out / "report.md").read_text())


def test_the_paper_comparison_only_for_the_whole_released_set(released, tmp_path):
    """"Comparable with the paper's numbers" needs the official scorer on every released sample, each answered, the
    images as released; a report on anything less says why it is not comparable."""
    from stitchkit.multiimage.evaluate import evaluate, stratified_per_task

    bench = load_benchmark(released / "bench")
    every = write_predictions(tmp_path / "every.jsonl", {s.id: PREDICTIONS.get(s.id, "cat") for s in bench.samples})
    report = (score_benchmark_dir(released / "bench", every, tmp_path / "whole") / "report.md").read_text()
    assert "The paper's scorer on the whole released data: comparable with the paper's numbers." in report
    # an import with a limit, of two tasks
    part = import_official(released / "saved", tmp_path / "part", tasks=["common", "counting"], limit=1)
    answers = write_predictions(tmp_path / "part.jsonl", {"counting-10": "4", "common-0": "dog"})
    report = (score_benchmark_dir(part, answers, tmp_path / "scored_part") / "report.md").read_text()
    assert ("part of the released data (imported with limit 1; no listing, oddone samples): not comparable with the "
            "paper's table") in report and "comparable with the paper's numbers" not in report

    class Cat:
        def generate(self, images, prompts, max_new_tokens):
            return ["cat"] * len(prompts)

    # an evaluation of a max_per_task subset, and one with changed images
    subset = evaluate(Cat(), bench, tmp_path / "subset", settings={"model": "cat", "max_per_task": 1},
                      samples=stratified_per_task(bench.samples, 1), legacy_official=True)
    assert subset["n_samples"] == 4
    report = (tmp_path / "subset" / "report.md").read_text()
    assert "(a subset of at most 1 samples per task): not comparable" in report
    evaluate(Cat(), bench, tmp_path / "pixels", settings={"model": "cat", "transform": "pixels4"}, legacy_official=True,
             transform=lambda images, sample: images)
    assert "(images transformed (pixels4)): not comparable" in (tmp_path / "pixels" / "report.md").read_text()


def test_clean_scoring_is_refused_and_never_guessed(released):
    bench = load_benchmark(released / "bench")
    assert scoring_mode(bench) == "legacy_official" and scoring_mode(bench, True) == "legacy_official"
    with pytest.raises(InputError, match="cannot be scored in clean mode: the released MIMIC data carries no class"):
        scoring_mode(bench, False)
    rows, results = score_predictions(bench, PREDICTIONS, "clean")  # what an evaluation stores as the other mode
    assert rows == [] and results["tasks"] == {} and results["mimic_avg"] is None and results["unsupported"]


def test_evaluation_defaults_to_the_official_scorer(released, tmp_path):
    """evaluate() as `mimic eval` runs it, with a stand-in model that gives the hand-written answers."""
    from stitchkit.multiimage.evaluate import evaluate

    bench = load_benchmark(released / "bench")
    # the official prompt keeps a listing question's "?" before ". Please ..."; the clean one drops it
    answer = {s.prompt(legacy=legacy): PREDICTIONS.get(s.id, "") for s in bench.samples for legacy in (True, False)}

    seen = []

    class HandWritten:
        def generate(self, images, prompts, max_new_tokens):
            seen.extend(prompts)
            return [answer[p] for p in prompts]

    results = evaluate(HandWritten(), bench, tmp_path / "eval", settings={"model": "hand"},
                       legacy_official=scoring_mode(bench) == "legacy_official")
    assert results["mode"] == "legacy_official"
    assert sorted(seen) == sorted(s.prompt(legacy=True) for s in bench.samples)  # the official prompts
    for task, expected in EXPECTED.items():
        assert results["tasks"][task]["score"] == pytest.approx(expected), task
    assert results["clean"] == {"tasks": {}, "mimic_avg": None}
    with pytest.raises(InputError, match="cannot be scored in clean mode"):
        evaluate(HandWritten(), bench, tmp_path / "eval_clean", settings={"model": "hand"}, legacy_official=False)


def test_reimport_and_other_layouts_give_the_same_bytes(released, tmp_path):
    before = folder_bytes(released / "bench")
    import_official(released / "hub", released / "bench")
    assert folder_bytes(released / "bench") == before
    # elsewhere (images_root is relative: the folder moves) and from save_to_disk folders: the same samples
    import_official(released / "hub", tmp_path / "again")
    assert folder_bytes(tmp_path / "again") == before
    import_official(released / "saved", tmp_path / "saved")
    saved = folder_bytes(tmp_path / "saved")
    assert {k: v for k, v in saved.items() if k not in ("benchmark.json", "summary.md")} == \
        {k: v for k, v in before.items() if k not in ("benchmark.json", "summary.md")}


def test_exports_carry_the_released_rows(released, tmp_path, monkeypatch):
    from datasets import load_from_disk
    from test_mimic_exports import load_vlmevalkit_class, vlmevalkit_predictions

    from stitchkit.multiimage.exports import export_benchmark

    bench = load_benchmark(released / "bench")
    written = export_benchmark(bench, tmp_path / "export", ["hf", "lmms-eval", "vlmevalkit"])
    # lmms-eval: only the legacy group, the one scoring this data supports
    lmms = {p.name for p in written["lmms-eval"].iterdir()}
    assert "mimic_legacy.yaml" in lmms and "mimic_legacy_counting.yaml" in lmms
    assert not {name for name in lmms if name.startswith("mimic") and not name.startswith("mimic_legacy") and name.endswith(".yaml")}
    counting = load_from_disk(str(written["hf/counting"]))["test"]
    assert counting["gt"] == [str(r["gt"]) for r in ROWS["counting"]]
    assert counting["id"] == [f"counting-{r['idx']}" for r in ROWS["counting"]]
    # what the official counting_utils.process_results reads: the released idx, the task key, gt
    assert counting["idx"] == [r["idx"] for r in ROWS["counting"]] and set(counting.column_names) >= {"task", "gt"}
    first = counting[0]["images"][0]
    assert np.array_equal(np.asarray(first), np.asarray(ROWS["counting"][0]["images"][0].convert("RGB")))
    tsv = (written["vlmevalkit"] / "MIMIC.tsv").read_text().splitlines()
    assert len(tsv) == 1 + sum(len(rows) for rows in ROWS.values())

    # VLMEvalKit: its empty classes / counts cells read back as NaN; the legacy names send the official prompt
    # and score with the official scorer; clean scoring is refused with the reason
    MIMICDataset = load_vlmevalkit_class(written["vlmevalkit"], tmp_path / "vlmevalkit", monkeypatch)
    dataset, legacy = MIMICDataset("MIMIC"), MIMICDataset("MIMIC_Legacy")
    position = [s.id for s in bench.samples].index("listing-0")  # "Which animals appear?"
    assert legacy.build_prompt(position)[-1]["value"] == bench.samples[position].prompt(legacy=True)
    assert "appear?. Please" in legacy.build_prompt(position)[-1]["value"]
    assert dataset.build_prompt(position)[-1]["value"] == bench.samples[position].prompt()
    eval_file = vlmevalkit_predictions(dataset, PREDICTIONS, tmp_path / "model_MIMIC.tsv")
    for scored, judge_kwargs in ((dataset, {"legacy_official": True}), (legacy, {})):
        result = scored.evaluate(eval_file, **judge_kwargs)
        overall = result[result["variable"] == "all"].set_index("task")["score"]
        for task, expected in EXPECTED.items():
            assert overall[task] == pytest.approx(expected), task
        assert overall["MIMIC Avg"] == pytest.approx(sum(EXPECTED.values()) / 4)
    with pytest.raises(ValueError, match="cannot be scored in clean mode.*Evaluate the dataset MIMIC_Legacy"):
        dataset.evaluate(eval_file)


def test_finetuning_data_never_shows_a_released_picture(tmp_path):
    """`mimic run`'s data step with the released data as the evaluation benchmark, and fine-tuning data from a
    COCO-format source that holds the release's pictures (as COCO train2017 would: the release's rows carry the
    same file bytes). The import renames them (<pixel hash>.png), so only their content can match: a built training
    benchmark leaves them out, a given one that shows them is refused."""
    from stitchkit.data import load_coco
    from stitchkit.multiimage import MimicConfig, build_benchmark
    from stitchkit.multiimage.experiment import Experiment, ExperimentConfig, benchmark_images
    from stitchkit.runs import RunDir
    from stitchkit.world import WorldConfig, render_coco

    world = tmp_path / "world"
    render_coco(world, n_images=80, size=48, seed=3, cfg=WorldConfig(min_size=0.25, max_size=0.45, max_overlap=0.0,
                                                                     max_objects=4))
    files = sorted(world / image.file_name for image in load_coco(world / "annotations.json").images.values())
    shown = files[::2]  # the release: every other picture of the source, two per common query
    rows = {"common": [{"id": i, "question": "Which object is in every image?", "gt": "circle", "task": "n2",
                        "images": [{"bytes": path.read_bytes(), "path": None} for path in shown[2 * i : 2 * i + 2]]}
                       for i in range(len(shown) // 2)]}
    release = import_official(write_saved_layout(tmp_path / "saved", rows), tmp_path / "release", tasks=["common"])
    build = {"seed": 1, "filter": {"mode": "off"}, "min_images_per_class": 2,
             "counting": {"n_samples": 8, "splits": ["unbalanced"], "k": [1], "spread": [1, 2], "distractors": [0, 1]},
             "listing": {"n_samples": 0}, "common": {"n_samples": 8, "n_images": [2]},
             "oddone": {"n_samples": 0}}

    def data_step(train_source: dict, name: str) -> dict:
        cfg = ExperimentConfig.model_validate({"model": "hand", "data": {"benchmark_dir": str(release)}, "finetune": {
            "data": train_source, "train": {"steps": 1, "batch_size": 1}}})
        return Experiment(cfg, RunDir(tmp_path / name, config=cfg)).data_step()

    # the oracle: without the exclusion this source's training data shows released pictures
    plain = build_benchmark(world / "annotations.json", world, tmp_path / "plain", MimicConfig.model_validate(build))
    assert set(benchmark_images(load_benchmark(plain))) & set(shown)
    built = data_step({"annotations": str(world / "annotations.json"), "images": str(world), "build": build}, "built")
    train = load_benchmark(built["train_benchmark"])
    assert benchmark_images(train) and not set(benchmark_images(train)) & set(shown)
    assert train.meta["excluded_copies"] == len(shown)  # filter off: every released picture was a candidate
    with pytest.raises(InputError, match=f"shows [0-9]+ pictures of the released evaluation data {release}"):
        data_step({"benchmark_dir": str(plain)}, "given")


def test_tasks_and_limit(released, tmp_path):
    root = import_official(released / "saved", tmp_path / "two", tasks=["oddone", "counting"], limit=1)
    bench = load_benchmark(root)
    assert [s.id for s in bench.samples] == ["counting-10", "oddone-0"]


def test_cli_import_then_score_with_the_default_mode(released, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["mimic", "import-official", "--source", str(released / "saved"), "--out", str(tmp_path / "b"),
              "--tasks", "common,listing"])
    assert done.value.code == 0
    assert {s.task for s in load_benchmark(tmp_path / "b").samples} == {"common", "listing"}
    predictions = write_predictions(tmp_path / "p.jsonl", {k: v for k, v in PREDICTIONS.items()
                                                            if k.startswith(("common", "listing"))})
    with pytest.raises(SystemExit) as done:
        main(["mimic", "score", "--data", str(tmp_path / "b"), "--predictions", str(predictions), "--out", str(tmp_path / "s")])
    assert done.value.code == 0
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert results["mode"] == "legacy_official"
    assert results["tasks"]["common"]["score"] == pytest.approx(EXPECTED["common"])
    assert results["tasks"]["listing"]["score"] == pytest.approx(EXPECTED["listing"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["mimic", "score", "--data", str(tmp_path / "b"), "--predictions", str(predictions),
              "--out", str(tmp_path / "c"), "--clean"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "cannot be scored in clean mode" in err and "Traceback" not in err


@pytest.mark.usefixtures("one_torch_thread")
def test_eval_and_run_on_the_imported_folder_with_a_tiny_vlm(released, tmp_path, capsys):
    """`mimic eval` (default mode: the benchmark's) and `mimic run` (every study but fine-tuning) unchanged."""
    import yaml
    from vlm_tiny import tiny_llava_onevision

    from stitchkit.vlm import VLM

    VLM(*tiny_llava_onevision()).save_pretrained(tmp_path / "model")
    bench = load_benchmark(released / "bench")
    with pytest.raises(SystemExit) as done:
        main(["mimic", "eval", "--model", str(tmp_path / "model"), "--data", str(released / "bench"),
              "--out", str(tmp_path / "eval"), "--batch-size", "4", "--threads", "1"])
    assert done.value.code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    predictions = {json.loads(line)["id"]: json.loads(line)["prediction"]
                   for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()}
    assert results["mode"] == "legacy_official" and results["clean"] == {"tasks": {}, "mimic_avg": None}
    assert results["tasks"] == score_predictions(bench, predictions, "legacy_official")[1]["tasks"]
    config = {"name": "released", "model": str(tmp_path / "model"), "threads": 1,
              "data": {"benchmark_dir": str(released / "bench")}, "eval": {"batch_size": 4},  # the folder's own mode
              "flops": {"samples": 2, "n_images": [2, 3]}, "pooling": {"factors": [1, 2], "max_per_task": 1},
              "stitching": {"max_per_task": 1}, "attention": {"n_images": [2, 3], "samples": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as done:
        main(["mimic", "run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")])
    assert done.value.code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run["baseline"]["mode"] == "legacy_official"
    assert run["baseline"]["scores"] == {**{t: m["score"] for t, m in results["tasks"].items()}, "avg": results["mimic_avg"]}
    assert {"flops", "pooling", "stitching", "attention"} <= set(run)


def user_error(args: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with one message and no traceback. Returns the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


def test_bad_input_is_one_message_and_leaves_nothing(released, tmp_path, capsys, monkeypatch):
    import datasets

    out = tmp_path / "out"
    err = user_error(["mimic", "import-official", "--source", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert "there is no folder" in err and not out.exists()
    err = user_error(["mimic", "import-official", "--source", str(released / "saved"), "--out", str(out),
                      "--tasks", "count"], capsys)
    assert "unknown MIMIC task(s) count" in err and not out.exists()
    # a hub id that is not in the (empty) cache, offline: where to get it, and no network attempt
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    err = user_error(["mimic", "import-official", "--out", str(out), "--tasks", "common"], capsys)
    assert "'anurag4446/mimic'" in err and "not in the Hugging Face cache" in err and "offline" in err
    assert not out.exists()
    # counting rows keyed `id` instead of `idx`: the column is named
    rows = {"counting": [{("id" if k == "idx" else k): v for k, v in r.items()} for r in ROWS["counting"]]}
    from datasets import DatasetDict, Features

    wrong = Features({("id" if k == "idx" else k): v for k, v in features("counting").items()})
    DatasetDict({"test": datasets.Dataset.from_list(rows["counting"], features=wrong)}).save_to_disk(
        str(tmp_path / "wrong" / "counting"))
    err = user_error(["mimic", "import-official", "--source", str(tmp_path / "wrong"), "--out", str(out),
                      "--tasks", "counting"], capsys)
    assert "the counting rows have no idx" in err and not out.exists()
