"""MIMIC generator, scoring and CLI on the shapes world and on COCO-like synthetic annotations.

`recompute_and_check` is the independent oracle: it reads the raw annotation JSON (not the generator's index)
and recomputes every sample's answer and control variables.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from PIL import Image

from stitchkit.config import load_config
from stitchkit.errors import ConfigError, InputError
from stitchkit.multiimage import MimicConfig, build_benchmark, load_benchmark
from stitchkit.multiimage.protocol import TASKS, plural
from stitchkit.multiimage.synthetic import synthetic_coco
from stitchkit.multiimage.scoring import read_predictions, score_benchmark_dir
from stitchkit.multiimage.templates import TEMPLATES, question_text
from stitchkit.world import WorldConfig, render_coco

SHAPES_CONFIG = {
    "seed": 3,
    "filter": {"min_box_area_frac": 0.02, "mode": "image_strict"},
    "min_images_per_class": 3,
    "counting": {"n_samples": 80, "k": [1, 2], "spread": [1, 2, 3, 4], "distractors": [0, 3, 8], "totals": [2, 4],
                 "max_count": 6},
    "listing": {"n_samples": 40, "spread": [1, 2, 3], "distractors": [0, 2]},
    "common": {"n_samples": 40, "n_images": [2, 3, 4]},
    "oddone": {"n_samples": 40, "n_images": [3, 4, 5]},
}
# the lead wires `stitchkit mimic`; until then the tests mount the sub-app on the real CLI themselves
RUN_CLI = (
    "import sys\nfrom stitchkit import cli\nfrom stitchkit.multiimage.commands import app\n"
    "if 'mimic' not in [g.name for g in cli.app.registered_groups]:\n    cli.app.add_typer(app, name='mimic')\n"
    "cli.main(sys.argv[1:])\n"
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic_shapes")
    render_coco(root / "world", n_images=360, size=64, seed=0, cfg=WorldConfig(max_objects=6))
    config = MimicConfig.model_validate(SHAPES_CONFIG)
    build_benchmark(root / "world" / "annotations.json", root / "world", root / "bench", config)
    return root


def raw_annotations(path: Path):
    """image id -> file name, image id -> [annotation], class id -> (name, supercategory)."""
    coco = json.loads(path.read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    sizes = {im["id"]: im["width"] * im["height"] for im in coco["images"]}
    anns = defaultdict(list)
    for a in coco["annotations"]:
        anns[a["image_id"]].append(a)
    classes = {c["id"]: (c["name"], c.get("supercategory") or c["name"]) for c in coco["categories"]}
    return files, sizes, anns, classes


def recompute_and_check(bench_dir: Path, annotations: Path, config: MimicConfig) -> list[dict]:
    files, sizes, anns, classes = raw_annotations(annotations)
    name_of = {cid: name for cid, (name, _) in classes.items()}
    members = defaultdict(set)
    for name, group in classes.values():
        members[group].add(name)
    samples = [json.loads(line) for line in (bench_dir / "samples.jsonl").read_text().splitlines()]
    t, mode = config.filter.min_box_area_frac, config.filter.mode
    uses = Counter()
    for s in samples:
        ids = s["image_ids"]
        assert len(set(ids)) == len(ids) == s["n_images"] <= 35, s["id"]
        assert s["images"] == [files[i] for i in ids]
        present = [{name_of[a["category_id"]] for a in anns[i]} for i in ids]
        count = [Counter(name_of[a["category_id"]] for a in anns[i] if not a.get("iscrowd")) for i in ids]
        crowd = [{name_of[a["category_id"]] for a in anns[i] if a.get("iscrowd")} for i in ids]
        small = [{name_of[a["category_id"]] for a in anns[i] if a["bbox"][2] * a["bbox"][3] < t * sizes[i]}
                 for i in ids]
        uses.update((s["task"], i) for i in ids)
        assert s["counts_per_image"] == [[c[name] for name in s["classes"]] for c in count]
        assert s["template_id"] in range(len(TEMPLATES[s["task"]]))
        assert s["filter_mode"] == mode and s["n_distractors"] == s["n_images"] - s["spread"]

        if s["task"] == "counting":
            queried = set(s["classes"])
            holders = [p for p, names in enumerate(present) if names & queried]
            assert s["target_positions"] == holders and s["spread"] == len(holders) and s["k"] == len(queried)
            totals = [sum(c[name] for c in count) for name in s["classes"]]
            expected = str(totals[0]) if s["k"] == 1 else ", ".join(f"{n}: {v}" for n, v in zip(s["classes"], totals))
            assert s["gt"] == expected
            if s["balanced"]:
                assert totals == [s["total_count"]] * s["k"]
            for p in holders:  # one queried class per target image, never under a crowd region of it
                assert len(present[p] & queried) == 1 and not (crowd[p] & queried)
            touched = [present[p] & queried for p in holders]
            assert s["question"] == question_text("counting", s["template_id"], classes=s["classes"])
            assert all(plural(name) in s["question"] for name in s["classes"])
        elif s["task"] == "listing":
            group = members[s["category"]]
            found = sorted(set().union(*present) & group)
            assert s["gt"] == ", ".join(found) and s["classes"] == found and s["k"] == len(found)
            holders = [p for p, names in enumerate(present) if names & group]
            assert s["target_positions"] == holders and s["spread"] == len(holders)
            touched = [present[p] & group for p in holders]
            assert not any(crowd[p] & group for p in holders)
        elif s["task"] == "common":
            shared = set.intersection(*present)
            assert shared == {s["gt"]} and s["spread"] == s["n_images"]
            touched = [{s["gt"]}] * len(ids)
        else:
            image_counts = Counter(name for names in present for name in names)
            minority = {name for name, n in image_counts.items() if 1 <= n < s["n_images"] / 2}
            assert minority == {s["gt"]} and image_counts[s["gt"]] == s["odd_images"] == s["spread"]
            assert s["target_positions"] == [p for p, names in enumerate(present) if s["gt"] in names]
            touched = [set(s["classes"]) & names for names in present]
        # the area filter, in the reading the config names
        if mode == "image_strict":
            assert not any(small), s["id"]
        elif mode == "targets_only":
            assert all(not (names & sm) for names, sm in zip(touched, small)), s["id"]
    assert max(uses.values()) <= config.max_image_reuse
    return samples


def test_every_answer_recomputed_from_the_annotations(shapes):
    samples = recompute_and_check(shapes / "bench", shapes / "world" / "annotations.json",
                                  MimicConfig.model_validate(SHAPES_CONFIG))
    assert Counter(s["task"] for s in samples) == {"counting": 80, "listing": 40, "common": 40, "oddone": 40}
    meta = json.loads((shapes / "bench" / "benchmark.json").read_text())
    assert meta["images_root"] == str((shapes / "world").resolve())
    assert set(meta["tasks"]) == {"counting", "listing", "common", "oddone"}
    assert all(isinstance(n, int) for n in meta["tasks"]["counting"]["pool_sizes"].values())
    skipped = {c["cell"] for c in meta["skipped_cells"]}
    assert "balanced_k1_s3_d0_C4" in skipped and "balanced_k2_s1_d0_C2" in skipped  # 3 does not divide 4; s < k
    by_cell = Counter(s["cell"] for s in samples if s["task"] == "counting")
    assert max(by_cell.values()) - min(by_cell.values()) <= 1  # samples cycle evenly over the usable cells


def test_same_seed_same_bytes_other_seed_differs(shapes, tmp_path):
    config = MimicConfig.model_validate(SHAPES_CONFIG)
    world = shapes / "world"
    again = build_benchmark(world / "annotations.json", world, tmp_path / "again", config)
    for name in ("samples.jsonl", "benchmark.json", "summary.md"):
        assert (again / name).read_bytes() == (shapes / "bench" / name).read_bytes()
    other = build_benchmark(world / "annotations.json", world, tmp_path / "other", config.model_copy(update={"seed": 4}))
    assert (other / "samples.jsonl").read_bytes() != (again / "samples.jsonl").read_bytes()
    # one task's size does not change another task's samples (separate RNG streams)
    bigger = config.model_copy(update={"common": config.common.model_copy(update={"n_samples": 50})})
    third = build_benchmark(world / "annotations.json", world, tmp_path / "third", bigger)
    odd = lambda root: [l for l in (root / "samples.jsonl").read_text().splitlines() if '"task":"oddone"' in l]
    assert odd(third) == odd(again)


def write_tiny_images(folder: Path, coco: dict) -> None:
    """A 2 x 2 PNG under every file name of `coco`: the generator checks that the files open, never their pixels."""
    tiny = io.BytesIO()
    Image.new("RGB", (2, 2)).save(tiny, format="PNG")
    folder.mkdir(exist_ok=True)
    for image in coco["images"]:
        (folder / image["file_name"]).write_bytes(tiny.getvalue())


def test_coco_like_annotations_all_filter_modes_and_class_balance(tmp_path):
    coco = synthetic_coco(n_images=2500, seed=1)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    write_tiny_images(tmp_path / "images", coco)
    base = {
        "counting": {"n_samples": 48, "k": [1, 3], "spread": [1, 4], "distractors": [0, 34], "max_count": 10},
        "listing": {"n_samples": 40, "spread": [2, 5], "distractors": [0, 4]},
        "common": {"n_samples": 60, "n_images": [2, 6]},
        "oddone": {"n_samples": 40, "n_images": [3, 8]},
    }
    for mode in ("image_strict", "targets_only", "off"):
        config = MimicConfig.model_validate({**base, "filter": {"mode": mode}, "max_image_reuse": 5})
        out = build_benchmark(path, tmp_path / "images", tmp_path / mode, config)
        samples = recompute_and_check(out, path, config)
        assert max(s["n_images"] for s in samples) == 35
        assert {s["k"] for s in samples if s["task"] == "counting"} == {1, 3}
    # class-balanced: queried classes are close to uniform over the pool (counting, k = 1, mode "off")
    config = MimicConfig.model_validate({"filter": {"mode": "off"}, "max_image_reuse": 10,
                                         "counting": {"n_samples": 1200, "splits": ["unbalanced"], "k": [1],
                                                      "spread": [1], "distractors": [0]},
                                         "listing": {"n_samples": 0}, "common": {"n_samples": 0},
                                         "oddone": {"n_samples": 0}})
    out = build_benchmark(path, tmp_path / "images", tmp_path / "balance", config)
    meta = json.loads((out / "benchmark.json").read_text())
    pool = meta["tasks"]["counting"]["cells"]["unbalanced_k1_s1_d0"]["pool_classes"]
    drawn = Counter(json.loads(l)["classes"][0] for l in (out / "samples.jsonl").read_text().splitlines())
    mean = 1200 / pool
    assert len(drawn) == pool and all(abs(n - mean) < 4.5 * math.sqrt(mean) for n in drawn.values())
    # without balancing, frequent classes dominate ("person" is in a third of the boxes)
    unbalanced = build_benchmark(path, tmp_path / "images", tmp_path / "natural",
                                 config.model_copy(update={"class_balanced": False}))
    natural = Counter(json.loads(l)["classes"][0] for l in (unbalanced / "samples.jsonl").read_text().splitlines())
    assert natural["person"] > 4 * drawn["person"]


def test_crowd_regions_and_small_boxes_never_carry_a_query(tmp_path):
    coco = synthetic_coco(n_images=1500, seed=2)
    crowded = {a["image_id"] for a in coco["annotations"] if a["iscrowd"]}
    assert crowded  # the synthetic file has crowd regions to avoid
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco))
    write_tiny_images(tmp_path / "im", coco)
    config = MimicConfig.model_validate({"filter": {"mode": "off"},
                                         "counting": {"n_samples": 300, "k": [1], "spread": [1, 2],
                                                      "distractors": [0], "splits": ["unbalanced"]},
                                         "listing": {"n_samples": 0}, "common": {"n_samples": 0},
                                         "oddone": {"n_samples": 0}})
    out = build_benchmark(path, tmp_path / "im", tmp_path / "b", config)
    recompute_and_check(out, path, config)  # asserts no target image has a crowd region of its class


def test_user_errors_are_one_clear_message(shapes, tmp_path):
    world = shapes / "world"
    with pytest.raises(InputError, match="image folder not found"):
        build_benchmark(world / "annotations.json", tmp_path / "nope", tmp_path / "o", MimicConfig())
    with pytest.raises(InputError, match="annotations.json is not a folder"):  # --images given a file
        build_benchmark(world / "annotations.json", world / "annotations.json", tmp_path / "o", MimicConfig())
    with pytest.raises(InputError, match="annotation file not found"):
        build_benchmark(tmp_path / "none.json", world, tmp_path / "o", MimicConfig())
    # too few images for the default COCO grid: names the task, the cell and what to change
    tiny = {**SHAPES_CONFIG, "common": {"n_samples": 400, "n_images": [4]}}
    with pytest.raises(InputError, match=r"common: no valid sample for grid cell n4 .* lower common.n_samples"):
        build_benchmark(world / "annotations.json", world, tmp_path / "t", MimicConfig.model_validate(tiny))
    with pytest.raises(ValueError, match="at most 35"):
        MimicConfig.model_validate({"common": {"n_images": [36]}})
    # an image the annotations name but the folder lacks
    (tmp_path / "partial").mkdir()
    with pytest.raises(InputError, match="missing under"):
        build_benchmark(world / "annotations.json", tmp_path / "partial", tmp_path / "p",
                        MimicConfig.model_validate(SHAPES_CONFIG))
    # images that are there but do not open: named before the benchmark is written
    broken = tmp_path / "broken"
    shutil.copytree(world, broken)
    for png in (broken / "images").glob("*.png"):
        png.write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot be read"):
        build_benchmark(broken / "annotations.json", broken, tmp_path / "b", MimicConfig.model_validate(SHAPES_CONFIG))
    assert not (tmp_path / "b" / "samples.jsonl").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"counting": {"n_sampels": 3}}))
    with pytest.raises(ConfigError, match="counting.n_sampels"):
        load_config(MimicConfig, bad)


def test_an_unquoted_off_in_yaml_is_the_filter_mode_off(tmp_path):
    """YAML 1.1 reads `mode: off` as the boolean false; it means the mode the docs name "off"."""
    path = tmp_path / "off.yaml"
    path.write_text("filter:\n  mode: off\n")
    assert yaml.safe_load(path.read_text())["filter"]["mode"] is False  # the trap
    assert load_config(MimicConfig, path).filter.mode == "off"
    path.write_text("filter:\n  mode: on\n")  # true is no mode
    with pytest.raises(ConfigError, match="filter.mode"):
        load_config(MimicConfig, path)


def test_class_names_are_lowercase_whatever_the_source(tmp_path):
    """A source with capitalised names (OpenImages: "Bus") gives the questions and answers of its lowercase twin."""
    coco = synthetic_coco(n_images=800, seed=3)
    capitalised = {**coco, "categories": [{**c, "name": c["name"].title(), "supercategory": c["supercategory"].title()}
                                          for c in coco["categories"]]}
    assert any(c["name"] != c["name"].lower() for c in capitalised["categories"])
    write_tiny_images(tmp_path / "images", coco)
    config = MimicConfig.model_validate({
        "filter": {"mode": "off"}, "max_image_reuse": 5,
        "counting": {"n_samples": 20, "k": [1, 2], "spread": [1, 2], "distractors": [0, 2]},
        "listing": {"n_samples": 10, "spread": [1, 2], "distractors": [0]},
        "common": {"n_samples": 10, "n_images": [2, 3]}, "oddone": {"n_samples": 10, "n_images": [3]},
    })
    built = {}
    for name, source in (("lower", coco), ("capitalised", capitalised)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(source))
        built[name] = build_benchmark(path, tmp_path / "images", tmp_path / name, config)
    assert (built["capitalised"] / "samples.jsonl").read_bytes() == (built["lower"] / "samples.jsonl").read_bytes()
    meta = load_benchmark(built["capitalised"]).meta
    assert meta["class_names"] == [c["name"] for c in coco["categories"]]
    assert set(meta["supercategories"]) == {c["supercategory"] for c in coco["categories"]}


def oracle_predictions(bench_dir: Path, path: Path, wrong: set[str] = frozenset()) -> Path:
    lines = []
    for s in load_benchmark(bench_dir).samples:
        if s.id not in wrong:
            lines.append(json.dumps({"id": s.id, "prediction": s.gt}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_scoring_report_breakdowns_and_figures(shapes, tmp_path):
    bench = load_benchmark(shapes / "bench")
    dropped = [s.id for s in bench.samples if s.task == "common"][:4]
    preds = oracle_predictions(shapes / "bench", tmp_path / "p.jsonl", wrong=set(dropped))
    out = score_benchmark_dir(shapes / "bench", preds, tmp_path / "clean")
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "clean" and results["missing"] == 4
    assert results["tasks"]["counting"]["score"] == results["tasks"]["listing"]["score"] == 1.0
    assert results["tasks"]["common"]["score"] == pytest.approx(36 / 40)
    assert results["mimic_avg"] == pytest.approx((1 + 1 + 1 + 0.9) / 4)
    counting = results["breakdowns"]["counting"]
    assert {"n_images", "spread", "n_distractors", "k", "balanced", "template_id", "cell"} <= set(counting)
    assert sum(r["n"] for r in counting["spread"]) == 80
    assert set(results["figures"]) == {"spread", "n_distractors", "n_images", "k"}
    for figure in results["figures"].values():
        assert (out / figure).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "clean" in report and "4 samples had no prediction" in report and "### by spread" in report
    assert "(mae: mean absolute count error" in report  # clean counting has an mae column
    assert len((out / "per_sample.jsonl").read_text().splitlines()) == 200
    # C, the balanced per-class total, is a control too (unbalanced samples have none)
    totals = Counter(s.total_count for s in bench.samples if s.task == "counting")
    assert {r["total_count"]: r["n"] for r in counting["total_count"]} == dict(totals) and len(totals) == 3
    assert "### by total_count" in report
    # no breakdown repeats another: common's s is its N, odd-one's D is N - m
    assert "n_images" in results["breakdowns"]["common"] and "spread" not in results["breakdowns"]["common"]
    assert "n_images" in results["breakdowns"]["oddone"] and "n_distractors" not in results["breakdowns"]["oddone"]

    legacy = score_benchmark_dir(shapes / "bench", preds, tmp_path / "legacy", legacy_official=True)
    legacy_results = json.loads((legacy / "results.json").read_text())
    assert "(mae:" not in (legacy / "report.md").read_text()  # the official scorer has no mae column
    # the official scorer: k > 1 counting never matches; one-item listing answers never match
    k1 = [s for s in bench.samples if s.task == "counting" and s.k == 1]
    assert legacy_results["tasks"]["counting"]["score"] == pytest.approx(len(k1) / 80)
    assert legacy_results["tasks"]["listing"]["score"] < 1.0


def test_predictions_file_errors(shapes, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "counting-000000", "prediction": "4"}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        read_predictions(bad)
    bad.write_text('{"id": "x-1", "prediction": "4"}\n')
    with pytest.raises(InputError, match="not in the benchmark"):
        score_benchmark_dir(shapes / "bench", bad, tmp_path / "o")
    bad.write_text('{"id": "a", "answer": "4"}\n')
    with pytest.raises(InputError, match='"id" and "prediction"'):
        read_predictions(bad)


def test_cli_build_and_score(shapes, tmp_path):
    from typer.testing import CliRunner

    from stitchkit.multiimage.commands import app

    config = tmp_path / "mimic.yaml"
    small = {**SHAPES_CONFIG, "counting": {**SHAPES_CONFIG["counting"], "n_samples": 12},
             "listing": {"n_samples": 4}, "common": {"n_samples": 4}, "oddone": {"n_samples": 4}}
    config.write_text(yaml.safe_dump(small))
    world = shapes / "world"
    runner = CliRunner()
    done = runner.invoke(app, ["build", "--annotations", str(world / "annotations.json"), "--images", str(world),
                               "--out", str(tmp_path / "b"), "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert len((tmp_path / "b" / "samples.jsonl").read_text().splitlines()) == 24
    preds = oracle_predictions(tmp_path / "b", tmp_path / "p.jsonl")
    done = runner.invoke(app, ["score", "--data", str(tmp_path / "b"), "--predictions", str(preds),
                               "--out", str(tmp_path / "s"), "--legacy-official"])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "s" / "results.json").read_text())["mode"] == "legacy_official"
    # through the real entry point: a user error is one message and exit code 2
    failed = subprocess.run([sys.executable, "-c", RUN_CLI, "mimic", "build", "--annotations",
                             str(tmp_path / "missing.json"), "--images", str(world), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "annotation file not found" in failed.stderr and "Traceback" not in failed.stderr


def test_a_corrupt_benchmark_names_its_file_and_line(tmp_path):
    (tmp_path / "benchmark.json").write_text("{}")
    (tmp_path / "samples.jsonl").write_text('{"id": 1\n')
    with pytest.raises(InputError, match=r"samples.jsonl:1: not a MIMIC sample"):
        load_benchmark(tmp_path)
    (tmp_path / "benchmark.json").write_text("{")
    with pytest.raises(InputError, match=r"benchmark.json is not valid JSON"):
        load_benchmark(tmp_path)


def test_max_per_task_takes_a_stratified_subset(shapes):
    """The first N samples of a task cover only the first values of the generator's outer loops; the subset must
    spread over every control, take one sample per cell in turn, and be the same every time."""
    from stitchkit.multiimage.evaluate import stratified_per_task

    bench = load_benchmark(shapes / "bench")
    counting = [s for s in bench.samples if s.task == "counting"]
    chosen = stratified_per_task(bench.samples, 8)
    assert chosen == stratified_per_task(bench.samples, 8)
    positions = [bench.samples.index(s) for s in chosen]
    assert positions == sorted(positions) and Counter(s.task for s in chosen) == {t: 8 for t in TASKS}
    subset = [s for s in chosen if s.task == "counting"]
    assert len({s.cell for s in subset}) == 8  # no cell twice while another waits
    controls = ("balanced", "k", "spread", "n_distractors")
    for control in controls:  # every value of every control of the grid is in the subset
        assert {getattr(s, control) for s in subset} == {getattr(s, control) for s in counting}, control
    # ... which the first 8 are not (the test would pass for a prefix otherwise)
    assert any({getattr(s, c) for s in counting[:8]} != {getattr(s, c) for s in counting} for c in controls)
    # more per task than cells: round robin, every cell's share within one of the others'
    cells = Counter(s.cell for s in counting)
    larger = Counter(s.cell for s in stratified_per_task(bench.samples, len(cells) + 5) if s.task == "counting")
    assert set(larger) == set(cells) and max(larger.values()) - min(larger.values()) <= 1
    assert stratified_per_task(bench.samples, 10_000) == bench.samples == stratified_per_task(bench.samples, None)


class ConstantModel:
    """A stand-in VLM for evaluate(): "2" to every prompt (what is tested here is the prediction file)."""

    def generate(self, images, prompts, max_new_tokens):
        return ["2"] * len(prompts)


def test_predictions_made_on_another_benchmark_are_refused(shapes, tmp_path, capsys):
    from test_mimic_exports import cli
    from stitchkit.multiimage.evaluate import evaluate

    world = shapes / "world"
    other = build_benchmark(world / "annotations.json", world, tmp_path / "other",
                            MimicConfig.model_validate({**SHAPES_CONFIG, "seed": 4}))
    bench = load_benchmark(shapes / "bench")
    assert {s.id for s in load_benchmark(other).samples} == {s.id for s in bench.samples}  # ids alone cannot tell
    evaluate(ConstantModel(), bench, tmp_path / "eval", settings={"model": "constant"})
    predictions = tmp_path / "eval" / "predictions.jsonl"
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert {line["benchmark"] for line in lines} == {hashlib.sha256((shapes / "bench" / "samples.jsonl").read_bytes()).hexdigest()}

    code, err = cli(["mimic", "score", "--data", str(other), "--predictions", str(predictions),
                     "--out", str(tmp_path / "wrong")], capsys)
    assert code == 2 and "made on another benchmark" in err and "Traceback" not in err
    assert not (tmp_path / "wrong").exists()
    code, err = cli(["mimic", "score", "--data", str(shapes / "bench"), "--predictions", str(predictions),
                     "--out", str(tmp_path / "right")], capsys)
    assert code == 0 and "note" not in err
    # a file without fingerprints (another tool's, an older evaluation's) is scored, with a one-line note
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"id": line["id"], "prediction": line["prediction"]}) + "\n" for line in lines))
    code, err = cli(["mimic", "score", "--data", str(other), "--predictions", str(plain), "--out", str(tmp_path / "p")],
                    capsys)
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert code == 0 and len(notes) == 1 and "no benchmark fingerprint" in notes[0]
    assert read_predictions(plain, "f" * 64) == ({line["id"]: "2" for line in lines}, len(lines))
    # an evaluation folder of the benchmark before a rebuild is not resumed on the rebuilt one
    with pytest.raises(InputError, match="predictions made on another benchmark"):
        evaluate(ConstantModel(), load_benchmark(other), tmp_path / "eval", settings={"model": "constant"})


def test_every_task_keeps_its_colour_in_every_figure(shapes, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from stitchkit import report
    from stitchkit.multiimage.scoring import TASK_COLORS, score_predictions, write_score_report

    drawn = {}

    def drawing_spy(path, series, **labels):  # draws as line_plot does, and records the colour each line gets
        fig, ax = plt.subplots()
        drawn[Path(path).name] = (labels["title"], {name: to_hex(ax.plot(xs, ys)[0].get_color())
                                                    for name, (xs, ys) in series.items()})
        plt.close(fig)
        return Path(path)

    monkeypatch.setattr(report, "line_plot", drawing_spy)
    bench = load_benchmark(shapes / "bench")
    predictions = {s.id: s.gt for s in bench.samples[::2]}
    write_score_report(tmp_path / "all", *score_predictions(bench, predictions))
    tasks_per_figure = {name: set(colours) for name, (_, colours) in drawn.items()}
    assert len({frozenset(t) for t in tasks_per_figure.values()}) > 1  # the figures hold different tasks
    for name, (_, colours) in drawn.items():
        assert colours == {task: to_hex(TASK_COLORS[task]) for task in colours}, name
    # one line: no legend to name it, so the title does
    drawn.clear()
    counting = bench.subset([s for s in bench.samples if s.task == "counting"])
    write_score_report(tmp_path / "one", *score_predictions(counting, {k: v for k, v in predictions.items()
                                                                       if k.startswith("counting")}))
    assert drawn["score_vs_spread.png"][0] == "MIMIC (clean): counting"
