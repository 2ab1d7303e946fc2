"""Exports of a MIMIC benchmark: HF datasets and parquet, the lmms-eval task folder, VLMEvalKit TSVs + class.

lmms-eval would replace this venv's torch (it pulls a CUDA build), so the task folder is checked by a loader
that follows lmms-eval's own rules (tasks/__init__.py and utils.load_yaml_config: `include:`, `!function`
relative to the YAML's folder, groups are YAMLs whose `task` is a list) against the fields of its TaskConfig,
GroupConfig and AggMetricConfig dataclasses (lmms_eval/api/task.py, api/group.py); then the callbacks run on
the exported dataset and must score exactly as stitchkit does. VLMEvalKit is likewise replaced by a stub of
the ImageBaseDataset behaviour the class relies on (vlmeval/dataset/image_base.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stitchkit.cli import main
from stitchkit.errors import InputError
from stitchkit.multiimage import MimicConfig, Sample, build_benchmark, load_benchmark
from stitchkit.multiimage.exports import export_benchmark, export_hf
from stitchkit.multiimage.protocol import mimic_average
from stitchkit.multiimage.scoring import score_predictions
from stitchkit.world import WorldConfig, render_coco

# lmms_eval/api/task.py TaskConfig, api/group.py GroupConfig and AggMetricConfig (plus the loader's `include`)
LMMS_TASK_FIELDS = {
    "task", "task_alias", "tag", "group", "group_alias", "dataset_path", "dataset_name", "dataset_kwargs",
    "training_split", "validation_split", "test_split", "fewshot_split", "full_docs", "process_results_use_image",
    "process_docs", "doc_to_visual", "doc_to_text", "doc_to_target", "doc_to_choice", "doc_to_messages",
    "process_results", "use_prompt", "description", "target_delimiter", "fewshot_delimiter", "fewshot_config",
    "num_fewshot", "metric_list", "output_type", "generation_kwargs", "repeats", "filter_list",
    "should_decontaminate", "doc_to_decontamination_query", "cluster_key", "score_key", "metadata",
    "lmms_eval_specific_kwargs", "model_specific_generation_kwargs", "model_specific_target_kwargs",
    "reasoning_tags",
}
LMMS_GROUP_FIELDS = {"group", "group_alias", "task", "aggregate_metric_list", "postprocess_results", "metadata"}
LMMS_AGG_FIELDS = {"metric", "aggregation", "weight_by_size", "filter_list"}
LMMS_OUTPUT_TYPES = {"loglikelihood", "multiple_choice", "generate_until", "generate_until_multi_round",
                     "generate_until_agentic"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic_export")
    render_coco(root / "world", n_images=200, size=48, seed=1, cfg=WorldConfig(max_objects=6))
    config = MimicConfig.model_validate({
        "filter": {"min_box_area_frac": 0.02}, "min_images_per_class": 2,
        "counting": {"n_samples": 16, "k": [1, 2], "spread": [1, 2, 3], "distractors": [0, 2], "totals": [2]},
        "listing": {"n_samples": 8, "spread": [1, 2], "distractors": [0, 1]},
        "common": {"n_samples": 8, "n_images": [2, 3]},
        "oddone": {"n_samples": 8, "n_images": [3, 4]},
    })
    bench_dir = build_benchmark(root / "world" / "annotations.json", root / "world", root / "bench", config)
    export_benchmark(load_benchmark(bench_dir), root / "export")
    return root


def noisy_predictions(bench) -> dict[str, str]:
    """Right, wrong, and quirk-revealing answers, so clean and legacy scores both differ from 0 and 1."""
    out = {}
    for n, s in enumerate(bench.samples):
        if n % 3 == 0:
            out[s.id] = "I am not sure."
        elif s.task == "listing" and n % 3 == 1:
            out[s.id] = s.gt.split(", ")[0]
        elif s.task in ("common", "oddone") and n % 3 == 1:
            out[s.id] = f"{s.gt} and a {bench.meta['class_names'][0]}"
        else:
            out[s.id] = s.gt
    return out


def test_hf_save_to_disk_and_parquet_hold_the_images(exported):
    from datasets import Dataset, Image as ImageFeature, List, load_from_disk

    bench = load_benchmark(exported / "bench")
    for task in ("counting", "listing", "common", "oddone"):
        dataset = load_from_disk(str(exported / "export" / "hf" / task))["test"]
        parquet = Dataset.from_parquet(str(exported / "export" / "parquet" / task / "test-00000-of-00001.parquet"),
                                       cache_dir=str(exported / "hf_cache"))
        samples = [s for s in bench.samples if s.task == task]
        for ds in (dataset, parquet):
            assert isinstance(ds.features["images"], List) and isinstance(ds.features["images"].feature, ImageFeature)
            assert ds["id"] == [s.id for s in samples] and ds["gt"] == [s.gt for s in samples]
            # the official scorer's fields: counting_utils.process_results reads task, idx and gt
            assert ds["idx"] == [int(s.id.removeprefix(f"{task}-")) for s in samples]
            row = ds[len(ds) - 1]
            sample = samples[-1]
            assert row["counts_per_image"] == sample.counts_per_image and row["n_images"] == len(row["images"])
            for image, path in zip(row["images"], bench.image_paths(sample)):
                np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(Image.open(path).convert("RGB")))


def load_lmms_yaml(path: Path) -> dict:
    """lmms-eval's full-mode YAML loading: `!function module.name` imports module.py next to the YAML."""

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        module_name, name = loader.construct_scalar(node).rsplit(".", 1)
        spec = importlib.util.spec_from_file_location(module_name, path.parent / f"{module_name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, name)

    Loader.add_constructor("!function", function)
    config = yaml.load(path.read_text(), Loader)
    if "include" in config:
        config = {**load_lmms_yaml(path.parent / config.pop("include")), **config}
    return config


def test_lmms_eval_folder_loads_and_scores_like_stitchkit(exported):
    from datasets import load_from_disk

    folder = exported / "export" / "lmms_eval" / "mimic"
    tasks, groups = {}, {}
    for path in sorted(folder.rglob("*.yaml")):  # lmms-eval indexes files ending in .yaml only
        config = load_lmms_yaml(path)
        (groups if isinstance(config["task"], list) else tasks)[config.get("group", config["task"])] = config
    assert set(groups) == {"mimic", "mimic_legacy"}
    assert set(tasks) == {f"mimic{p}_{t}" for p in ("", "_legacy") for t in ("counting", "listing", "common", "oddone")}

    bench = load_benchmark(exported / "bench")
    predictions = noisy_predictions(bench)
    for group_name, group in groups.items():
        assert set(group) <= LMMS_GROUP_FIELDS
        (aggregate,) = group["aggregate_metric_list"]
        assert set(aggregate) <= LMMS_AGG_FIELDS and aggregate["aggregation"] == "mean"
        mode = "legacy_official" if "legacy" in group_name else "clean"
        _, expected = score_predictions(bench, predictions, mode)
        task_scores = {}
        for task_name in group["task"]:
            config = tasks[task_name]
            assert set(config) <= LMMS_TASK_FIELDS, set(config) - LMMS_TASK_FIELDS
            assert config["output_type"] in LMMS_OUTPUT_TYPES and config["dataset_kwargs"]["load_from_disk"]
            docs = load_from_disk(config["dataset_path"])[config["test_split"]]
            kwargs = config["lmms_eval_specific_kwargs"]["default"]
            metric_names = [m["metric"] for m in config["metric_list"]]
            task = config["task_alias"].split()[0]
            assert f"{task}_score_overall" in metric_names and "mimic_score" in metric_names
            records = {m: [] for m in metric_names}
            for doc in docs:
                sample = bench.by_id()[doc["id"]]
                visuals = config["doc_to_visual"](doc)
                assert len(visuals) == sample.n_images and all(v.mode == "RGB" for v in visuals)
                assert config["doc_to_text"](doc, kwargs) == sample.prompt(legacy=mode == "legacy_official")
                assert config["doc_to_target"](doc) == sample.gt
                out = config["process_results"](doc, [predictions[doc["id"]]])
                assert set(out) == set(metric_names)
                json.dumps(out)  # lmms-eval logs the records
                for m in metric_names:
                    records[m].append(out[m])
            scores = {m["metric"]: m["aggregation"](records[m["metric"]]) for m in config["metric_list"]}
            assert all(m["higher_is_better"] is True for m in config["metric_list"])
            assert scores[f"{task}_score_overall"] == pytest.approx(expected["tasks"][task]["score"])
            if task == "listing":
                assert scores["listing_precision"] == pytest.approx(expected["tasks"][task]["precision"])
            task_scores[task] = scores["mimic_score"]
        # the group's unweighted mean of mimic_score is the paper's MIMIC Avg
        assert mimic_average(task_scores) == pytest.approx(expected["mimic_avg"])
        assert 0 < expected["mimic_avg"] < 1


VLMEVAL_STUB = {
    "vlmeval/__init__.py": "",
    "vlmeval/smp.py": '''
        import base64, io, os
        import pandas as pd
        from PIL import Image

        def LMUDataRoot():
            return os.environ["LMUData"]

        def load(path):
            return pd.read_csv(path, sep="\\t")

        def dump(data, path):
            data.to_csv(path, index=False)

        def toliststr(s):
            if isinstance(s, str) and s[:1] == "[" and s[-1:] == "]":
                return [str(x) for x in eval(s)]
            return [str(s)] if isinstance(s, str) else [str(x) for x in s]

        def read_ok(path):
            return os.path.exists(path)

        def decode_base64_to_image_file(b64, path):
            Image.open(io.BytesIO(base64.b64decode(b64))).save(path)
    ''',
    "vlmeval/dataset/__init__.py": "",
    "vlmeval/dataset/image_base.py": '''
        import os
        import os.path as osp
        import pandas as pd
        from ..smp import LMUDataRoot, decode_base64_to_image_file, read_ok, toliststr

        class ImageBaseDataset:  # the constructor and dump_image of VLMEvalKit's class, nothing else
            MODALITY = "IMAGE"
            DATASET_URL = {}
            DATASET_MD5 = {}

            def __init__(self, dataset="MMBench", skip_noimg=True):
                self.dataset_name = dataset
                self.img_root = osp.join(LMUDataRoot(), "images", dataset)
                data = self.load_data(dataset)
                data["index"] = [str(x) for x in data["index"]]
                self.meta_only = True
                if "image" in data:
                    data["image"] = [str(x) for x in data["image"]]
                    images = [toliststr(x) for x in data["image"]]
                    data["image"] = [x[0] if len(x) == 1 else x for x in images]
                    self.meta_only = False
                if "image_path" in data:
                    paths = [toliststr(x) for x in data["image_path"]]
                    data["image_path"] = [x[0] if len(x) == 1 else x for x in paths]
                self.data = data

            def dump_image(self, line):
                os.makedirs(self.img_root, exist_ok=True)
                if isinstance(line["image"], list):
                    paths = []
                    for img, name in zip(line["image"], line["image_path"]):
                        path = osp.join(self.img_root, name)
                        if not read_ok(path):
                            decode_base64_to_image_file(img, path)
                        paths.append(path)
                    return paths
                path = osp.join(self.img_root, f"{line['index']}.jpg")
                if not read_ok(path):
                    decode_base64_to_image_file(line["image"], path)
                return [path]
    ''',
}


def load_vlmevalkit_class(folder: Path, root: Path, monkeypatch):
    """The exported MIMICDataset as VLMEvalKit imports it: the files of `folder` (an export's vlmevalkit/) in the
    stub's vlmeval/dataset/ under `root`, MIMIC.tsv in $LMUData."""
    for name, text in VLMEVAL_STUB.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    for name in ("mimic.py", "mimic_protocol.py", "mimic_vocabulary.json"):
        shutil.copy(folder / name, root / "vlmeval" / "dataset" / name)
    lmu = root / "LMUData"
    lmu.mkdir()
    for tsv in folder.glob("*.tsv"):
        shutil.copy(tsv, lmu / tsv.name)
    monkeypatch.setenv("LMUData", str(lmu))
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "vlmeval" or m.startswith("vlmeval.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("vlmeval.dataset.mimic").MIMICDataset


def vlmevalkit_predictions(dataset, predictions: dict[str, str], path: Path) -> str:
    """A VLMEvalKit prediction file: the dataset's table without the images, plus a `prediction` column."""
    table = dataset.data.drop(columns=["image"]).copy()
    table["prediction"] = [predictions.get(i, "") for i in table["id"]]
    table.to_csv(path, sep="\t", index=False)
    return str(path)


def test_vlmevalkit_tsv_and_dataset_class(exported, tmp_path, monkeypatch):
    import hashlib

    folder = exported / "export" / "vlmevalkit"
    MIMICDataset = load_vlmevalkit_class(folder, tmp_path, monkeypatch)

    bench = load_benchmark(exported / "bench")
    names = {"MIMIC", "MIMIC_Counting", "MIMIC_Common", "MIMIC_OddOne", "MIMIC_Listing"}
    legacy_names = {name.replace("MIMIC", "MIMIC_Legacy", 1) for name in names}
    assert set(MIMICDataset.supported_datasets()) == set(MIMICDataset.DATASET_MD5) == names | legacy_names
    assert set(MIMICDataset.DATASET_MD5.values()) == {hashlib.md5((folder / "MIMIC.tsv").read_bytes()).hexdigest()}
    dataset = MIMICDataset("MIMIC")
    assert len(dataset.data) == len(bench.samples)
    positions = [0, len(bench.samples) - 1, next(p for p, s in enumerate(bench.samples) if s.n_images > 2)]
    for position in positions:
        sample = bench.samples[position]
        messages = dataset.build_prompt(position)
        assert [m["type"] for m in messages] == ["image"] * sample.n_images + ["text"]
        assert messages[-1]["value"] == sample.prompt()
        for message, path in zip(messages, bench.image_paths(sample)):
            shown = np.asarray(Image.open(message["value"]).convert("RGB"), dtype=np.int16)
            source = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
            if sample.n_images == 1:  # VLMEvalKit dumps one-image rows as <index>.jpg (lossy)
                assert np.abs(shown - source).mean() < 12
            else:
                np.testing.assert_array_equal(shown, source)
    for name in ("MIMIC_Counting", "MIMIC_Legacy_Counting"):
        assert len(MIMICDataset(name).data) == sum(s.task == "counting" for s in bench.samples)
    legacy_dataset = MIMICDataset("MIMIC_Legacy")
    for position in positions:  # the official prompt (identical to the clean one for stitchkit's templates)
        assert legacy_dataset.build_prompt(position)[-1]["value"] == bench.samples[position].prompt(legacy=True)

    predictions = noisy_predictions(bench)
    # clean; the official scorer by judge kwarg; the official scorer by the legacy name
    runs = (("clean", dataset, {}), ("legacy_official", dataset, {"legacy_official": True}),
            ("legacy_official", legacy_dataset, {}))
    for n, (mode, scored, judge_kwargs) in enumerate(runs):
        eval_file = vlmevalkit_predictions(dataset, predictions, tmp_path / f"model_MIMIC_{n}.tsv")
        result = scored.evaluate(eval_file, **judge_kwargs)
        _, expected = score_predictions(bench, predictions, mode)
        overall = result[result["variable"] == "all"].set_index("task")["score"]
        for task, metrics in expected["tasks"].items():
            assert overall[task] == pytest.approx(metrics["score"])
        assert overall["MIMIC Avg"] == pytest.approx(expected["mimic_avg"])
        assert set(result["variable"]) >= {"all", "n_images", "spread", "n_distractors", "total_count"}
        assert pd.read_csv(eval_file.rsplit(".", 1)[0] + "_score.csv")["mode"].iloc[0] == mode


def test_the_tsv_carries_every_record_field(exported):
    tsv = pd.read_csv(exported / "export" / "vlmevalkit" / "MIMIC.tsv", sep="\t")
    # gt is `answer`, the image files are `image` (base64) and `image_path`
    assert set(Sample.__dataclass_fields__) - {"gt", "images"} <= set(tsv.columns)
    bench = load_benchmark(exported / "bench")
    for (_, row), sample in zip(tsv.iterrows(), bench.samples):
        assert row["id"] == sample.id and row["answer"] == sample.gt
        for field in ("total_count", "odd_images", "seed"):
            assert (None if pd.isna(row[field]) else int(row[field])) == getattr(sample, field), field
        for field in ("target_positions", "image_ids", "classes", "counts_per_image"):
            assert json.loads(row[field]) == getattr(sample, field), field


def test_export_rejects_unknown_formats(exported, tmp_path):
    from stitchkit.errors import InputError

    with pytest.raises(InputError, match="unknown export format"):
        export_benchmark(load_benchmark(exported / "bench"), tmp_path, ["hf", "csv"])
    # the scorer shipped with the adapters is byte-for-byte stitchkit's
    from stitchkit.multiimage import protocol

    source = Path(protocol.__file__).read_bytes()
    assert (exported / "export" / "lmms_eval" / "mimic" / "mimic_protocol.py").read_bytes() == source
    assert (exported / "export" / "vlmevalkit" / "mimic_protocol.py").read_bytes() == source


def cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of the real entry point."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(args)
    return done.value.code, capsys.readouterr().err


def test_a_missing_or_corrupt_image_is_one_message_and_leaves_no_export(exported, tmp_path, capsys):
    shutil.copytree(exported / "world", tmp_path / "world")  # a copy of the benchmark whose images can be spoiled
    shutil.copytree(exported / "bench", tmp_path / "bench")
    meta = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    (tmp_path / "bench" / "benchmark.json").write_text(json.dumps({**meta, "images_root": str(tmp_path / "world")}))
    bench = load_benchmark(tmp_path / "bench")
    image = bench.image_paths(bench.samples[-1])[0]
    # corrupt (exported with exit 0 before, unreadable later), then missing (a traceback from inside datasets)
    for spoil, formats in ((lambda: image.write_bytes(b"garbage"), "parquet"), (image.unlink, "hf"),
                           (lambda: None, "vlmevalkit")):
        spoil()
        out = tmp_path / f"out_{formats}"
        code, err = cli(["mimic", "export", "--data", str(tmp_path / "bench"), "--out", str(out), "--format", formats],
                        capsys)
        assert code == 2 and "Traceback" not in err and err.count("error:") == 1 and str(image) in err, err
        assert not out.exists()
    # an error inside datasets' generator (an image gone after the check) is ours again, not DatasetGenerationError
    with pytest.raises(InputError, match=f"cannot read image {image}"):
        export_hf(bench, tmp_path / "direct", parquet=False)


def test_an_export_folder_holds_one_benchmark_and_says_when_it_is_finished(exported, tmp_path, capsys, monkeypatch):
    import hashlib

    from stitchkit.multiimage import exports

    bench_dir, out = exported / "bench", tmp_path / "export"
    code, err = cli(["mimic", "export", "--data", str(bench_dir), "--out", str(out), "--format", "hf,vlmevalkit"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "hf", "manifest.json", "vlmevalkit"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["samples_sha256"] == hashlib.sha256((bench_dir / "samples.jsonl").read_bytes()).hexdigest()
    assert manifest["steps"]["export"]["formats"] == ["hf", "vlmevalkit"]
    code, err = cli(["mimic", "export", "--data", str(bench_dir), "--out", str(out), "--format", "parquet"], capsys)
    assert code == 0 and json.loads((out / "manifest.json").read_text())["steps"]["export"]["formats"] == \
        ["hf", "parquet", "vlmevalkit"]
    # another benchmark into the same folder is refused, and the export there is left as it was
    shutil.copytree(bench_dir, tmp_path / "other")
    lines = (bench_dir / "samples.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "other" / "samples.jsonl").write_text("".join(lines[:-1]))
    tsv = (out / "vlmevalkit" / "MIMIC.tsv").read_bytes()
    code, err = cli(["mimic", "export", "--data", str(tmp_path / "other"), "--out", str(out), "--format", "vlmevalkit"],
                    capsys)
    assert code == 2 and "different config" in err and (out / "vlmevalkit" / "MIMIC.tsv").read_bytes() == tsv
    # an export cut short is not marked finished
    def interrupted(bench, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(exports, "export_vlmevalkit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_benchmark(load_benchmark(bench_dir), tmp_path / "cut", ["parquet", "vlmevalkit"])
    assert (tmp_path / "cut" / "parquet").is_dir()
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["steps"] == {}
