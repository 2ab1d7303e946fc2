"""Exports of a built benchmark: HF datasets (save_to_disk and parquet), an lmms-eval task folder, VLMEvalKit TSVs.

    OUT/hf/<task>/                 DatasetDict {"test": ...} (datasets.load_from_disk), images embedded as a
                                   sequence-of-Image feature
    OUT/parquet/<task>/test-00000-of-00001.parquet   the same rows (datasets.load_dataset("parquet", ...))
    OUT/lmms_eval/mimic/           group `mimic` (+ `mimic_legacy`), four task YAMLs, utils.py, the scorer
    OUT/vlmevalkit/                MIMIC.tsv, mimic.py (dataset class), the scorer, README.md
    OUT/manifest.json              which benchmark (path, sha256 of samples.jsonl); "export" is marked
                                   finished, with the formats written, only at the end

Every image is checked once before anything is written, so a missing or corrupt file is one error, not a
traceback from inside `datasets` or an export that cannot be read later. An OUT holding another benchmark's
export is refused (runs.RunDir), so two benchmarks never mix in one folder.

The scorer module (protocol.py) is copied byte for byte into both adapter folders, so an lmms-eval or
VLMEvalKit run scores exactly as `stitchkit mimic score` does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from stitchkit.errors import InputError, StitchkitError
from stitchkit.multiimage import protocol
from stitchkit.multiimage.benchmark import Benchmark, Sample
from stitchkit.runs import RunDir, atomic_path, atomic_replace_dir, atomic_write_text

FORMATS = ("hf", "parquet", "lmms-eval", "vlmevalkit")
ADAPTERS = Path(__file__).parent / "adapters"


def hf_features():
    from datasets import Features, Image, List, Value

    int32, string = Value("int32"), Value("string")
    # the official scorer's fields (question, images, gt, task, idx/id) and every record field; `task` is the task
    # name (the official sub-key is `cell`), `idx` the number in the id (the released row's own key, if imported),
    # `images` the pictures, so the record's file names move to `image_files`
    return Features({
        "id": string, "idx": Value("int64"), "task": string, "cell": string, "question": string,
        "template_id": int32, "gt": string, "images": List(Image()), "image_files": List(string),
        "image_ids": List(Value("int64")),
        "n_images": int32, "spread": int32, "n_distractors": int32, "k": int32, "classes": List(string),
        "counts_per_image": List(List(int32)), "target_positions": List(int32), "balanced": Value("bool"),
        "total_count": int32, "category": string, "odd_images": int32, "filter_mode": string,
        "seed": Value("int64"),
    })


def _read_image(bench: Benchmark, name: str) -> bytes:
    path = bench.images_root / name
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read image {path}: {err.strerror}") from None


def official_idx(sample: Sample) -> int:
    """The number in a sample id "<task>-<number>": the official `idx` / `id` of an imported released row
    (official.row_to_sample), the sample's number in a built benchmark."""
    number = sample.id.rpartition("-")[2]
    if not number.isdigit():
        raise InputError(f"sample {sample.id!r}: the id does not end in a number, which the official `idx` field needs")
    return int(number)


def _hf_rows(bench: Benchmark, samples: list[Sample]):
    for sample in samples:
        row = sample.to_dict()
        row["idx"] = official_idx(sample)
        row["image_files"] = row.pop("images")
        row["images"] = [{"bytes": _read_image(bench, n), "path": Path(n).name} for n in sample.images]
        yield row


def _stream_dataset(bench: Benchmark, samples: list[Sample], cache: str):
    """from_generator streams rows to arrow files, so COCO-size exports need not fit in memory. `datasets` wraps
    an error raised in the generator (an unreadable image) in DatasetGenerationError: ours is unwrapped."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_generator(
            _hf_rows, features=hf_features(), cache_dir=cache, gen_kwargs={"bench": bench, "samples": samples},
            fingerprint=hashlib.sha256(json.dumps([s.to_dict() for s in samples]).encode()).hexdigest()[:32],
        )
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, StitchkitError):
            raise err.__cause__ from None
        raise


def export_hf(bench: Benchmark, out: Path, parquet: bool = True, save_to_disk: bool = True) -> dict[str, Path]:
    """One DatasetDict per task (the official configs: counting, common, listing, oddone; split "test")."""
    from datasets import DatasetDict
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    written = {}
    with tempfile.TemporaryDirectory(dir=out if out.exists() else None) as cache:
        for task in bench.tasks():
            samples = [s for s in bench.samples if s.task == task]
            dataset = _stream_dataset(bench, samples, cache)
            if save_to_disk:
                target = out / "hf" / task
                atomic_replace_dir(target, DatasetDict({"test": dataset}).save_to_disk)
                written[f"hf/{task}"] = target
            if parquet:
                target = out / "parquet" / task / "test-00000-of-00001.parquet"
                with atomic_path(target) as tmp:
                    dataset.to_parquet(str(tmp))
                written[f"parquet/{task}"] = target
            del dataset
    return written


# -- lmms-eval -----------------------------------------------------------------------------------------------

DEFAULT_TEMPLATE = """\
# Shared by every MIMIC task in this folder (lmms-eval `include:`).
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_target: !function utils.doc_to_target
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: ""
metadata:
  - version: 1.0
"""


def _task_yaml(task: str, dataset_path: Path, legacy: bool) -> str:
    name = f"mimic_legacy_{task}" if legacy else f"mimic_{task}"
    suffix = "_legacy" if legacy else ""
    metrics = [(f"{task}_score_overall", "aggregate_score"), ("mimic_score", "aggregate_score")]
    if task == "listing":
        metrics += [("listing_precision", "aggregate_precision"), ("listing_recall", "aggregate_recall")]
    metric_lines = "".join(
        f"  - metric: {metric}\n    aggregation: !function utils.{fn}\n    higher_is_better: true\n"
        for metric, fn in metrics
    )
    return (
        f"task: {name}\n"
        f"task_alias: {task}{' (legacy_official)' if legacy else ''}\n"
        f"include: _default_template_yaml\n"
        f"dataset_path: {json.dumps(str(dataset_path))}\n"
        f"doc_to_text: !function utils.doc_to_text{suffix}\n"
        f"process_results: !function utils.process_results{suffix}\n"
        f"generation_kwargs:\n"
        f"  max_new_tokens: {protocol.GENERATION_MAX_NEW_TOKENS[task]}\n"
        f"  temperature: 0\n"
        f"  do_sample: false\n"
        f"metric_list:\n{metric_lines}"
    )


def _group_yaml(group: str, tasks: list[str]) -> str:
    task_lines = "".join(f"  - {t}\n" for t in tasks)
    return (
        f"group: {group}\n"
        f"task:\n{task_lines}"
        f"# the paper's MIMIC Avg: the unweighted mean of the four task scores (listing: F1)\n"
        f"aggregate_metric_list:\n"
        f"  - metric: mimic_score\n"
        f"    aggregation: mean\n"
        f"    weight_by_size: false\n"
        f"metadata:\n"
        f"  version: 1.0\n"
    )


def export_lmms_eval(bench: Benchmark, out: Path, hf_root: Path) -> Path:
    """The task folder for `lmms-eval --include_path OUT/lmms_eval/mimic --tasks mimic` (needs export_hf): the
    groups of the scoring modes the benchmark supports (the released data: only `mimic_legacy`, since its rows
    lack what clean scoring reads)."""
    folder = out / "lmms_eval" / "mimic"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = bench.tasks()
    files = {
        "_default_template_yaml": DEFAULT_TEMPLATE,
        "utils.py": (ADAPTERS / "lmms_eval_utils.py").read_text(),
        "mimic_protocol.py": Path(protocol.__file__).read_text(),
        "mimic_vocabulary.json": json.dumps(bench.meta["class_names"]) + "\n",
    }
    for group, legacy in (("mimic", False), ("mimic_legacy", True)):
        if ("legacy_official" if legacy else "clean") not in bench.scoring_modes:
            continue
        files[f"{group}.yaml"] = _group_yaml(group, [f"{group}_{t}" for t in tasks])
        for task in tasks:
            files[f"{group}_{task}.yaml"] = _task_yaml(task, (hf_root / task).resolve(), legacy=legacy)
    for name, text in files.items():
        atomic_write_text(folder / name, text)
    return folder


# -- VLMEvalKit ----------------------------------------------------------------------------------------------

# every record field (`image_ids`, `classes`, `counts_per_image`, `target_positions` as JSON lists), the answer as
# `answer`, and VLMEvalKit's own columns (index, image, image_path, split)
TSV_COLUMNS = ("index", "image", "image_path", "question", "answer", "task", "category", "n_images", "spread",
               "n_distractors", "k", "balanced", "total_count", "odd_images", "split", "id", "cell", "template_id",
               "classes", "counts_per_image", "target_positions", "image_ids", "filter_mode", "seed")

VLMEVALKIT_README = """\
# MIMIC for VLMEvalKit

1. Copy `mimic.py`, `mimic_protocol.py` and `mimic_vocabulary.json` into `vlmeval/dataset/`.
2. Register the class in `vlmeval/dataset/__init__.py`: add `from .mimic import MIMICDataset` and append
   `MIMICDataset` to the image-dataset class list (`IMAGE_DATASET`). Unregistered names silently fall back to
   the generic custom-VQA class, which computes the wrong metrics.
3. Copy `MIMIC.tsv` into `$LMUData` (default `~/LMUData`); every dataset name reads it, filtered by task.
4. `python run.py --data MIMIC --model <model>` (or MIMIC_Counting, MIMIC_Common, MIMIC_OddOne, MIMIC_Listing):
   the clean prompt and scorer (`legacy_official=True` in the judge kwargs scores with the official scorer).
   `--data MIMIC_Legacy` (or MIMIC_Legacy_Counting, ...) sends the official prompt -- a Listing question ending in
   "?" keeps it before ". Please ..." -- and scores with the official scorer: use these names for the released
   MIMIC data, which supports no other scoring, and to compare with the paper.

VLMEvalKit's base class dumps the images of a one-image row as `<index>.jpg` (re-encoded as JPEG); rows with
several images keep their original encoding under the names in `image_path`.

Keep the prompt, the image order and greedy decoding identical when comparing with lmms-eval or stitchkit;
VLMEvalKit models apply their own chat templates and preprocessing, so record them next to the scores.
"""


def _tsv_cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("\t", " ").replace("\r", " ").replace("\n", "\\n")


def _fill_in(source: str, name: str, value) -> str:
    """The adapter's module-level `NAME = ...` line set to this export's value (a str or a tuple of them)."""
    line = re.compile(rf"^{name} = .*$", re.MULTILINE)
    if len(line.findall(source)) != 1:
        raise RuntimeError(f"the VLMEvalKit adapter has no single `{name} = ...` line to fill in")
    return line.sub(lambda _: f"{name} = {value!r}", source)


def export_vlmevalkit(bench: Benchmark, out: Path) -> Path:
    """MIMIC.tsv: one row per query, images inline as a list of base64 strings (streamed to disk: a COCO-size
    benchmark does not fit in memory). The per-task dataset names read the same file, filtered by task."""
    folder = out / "vlmevalkit"
    folder.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5()
    with atomic_path(folder / "MIMIC.tsv") as tmp, open(tmp, "w", encoding="utf-8", newline="") as tsv:
        header = "\t".join(TSV_COLUMNS) + "\n"
        tsv.write(header)
        md5.update(header.encode("utf-8"))
        for index, sample in enumerate(bench.samples):
            suffixes = [Path(n).suffix or ".png" for n in sample.images]
            row = {
                "index": index,
                "image": repr([base64.b64encode(_read_image(bench, n)).decode("ascii") for n in sample.images]),
                # dump names: one file per source image, shared by every query that reuses it
                "image_path": repr([f"mimic_{i}{ext}" for i, ext in zip(sample.image_ids, suffixes)]),
                "question": sample.question, "answer": sample.gt, "task": sample.task, "category": sample.category,
                "n_images": sample.n_images, "spread": sample.spread, "n_distractors": sample.n_distractors,
                "k": sample.k, "balanced": sample.balanced, "total_count": sample.total_count,
                "odd_images": sample.odd_images, "split": "test", "id": sample.id, "cell": sample.cell,
                "template_id": sample.template_id, "classes": json.dumps(sample.classes),
                "counts_per_image": json.dumps(sample.counts_per_image),
                "target_positions": json.dumps(sample.target_positions), "image_ids": json.dumps(sample.image_ids),
                "filter_mode": sample.filter_mode, "seed": sample.seed,
            }
            line = "\t".join(_tsv_cell(row[c]) for c in TSV_COLUMNS) + "\n"
            tsv.write(line)
            md5.update(line.encode("utf-8"))
    source = (ADAPTERS / "vlmevalkit_mimic.py").read_text()
    source = _fill_in(source, "TSV_MD5", md5.hexdigest())
    source = _fill_in(source, "SCORING_MODES", tuple(bench.scoring_modes))
    atomic_write_text(folder / "mimic.py", source)
    atomic_write_text(folder / "mimic_protocol.py", Path(protocol.__file__).read_text())
    atomic_write_text(folder / "mimic_vocabulary.json", json.dumps(bench.meta["class_names"]) + "\n")
    atomic_write_text(folder / "README.md", VLMEVALKIT_README)
    return folder


def export_formats(formats: list[str] | None) -> list[str]:
    """The formats asked for (default all), in FORMATS order; an unknown one is an error."""
    asked = list(formats or FORMATS)
    unknown = sorted(set(asked) - set(FORMATS))
    if unknown:
        raise InputError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in asked]


def export_benchmark(bench: Benchmark, out: str | os.PathLike, formats: list[str] | None = None,
                     command: str | None = None) -> dict[str, Path]:
    from stitchkit.data import check_images

    formats = export_formats(formats)
    check_images(sorted({path for sample in bench.samples for path in bench.image_paths(sample)}))
    run = RunDir(out, config={"benchmark": str(bench.root.resolve()), "samples_sha256": bench.fingerprint},
                 command=command)
    out = run.root
    written: dict[str, Path] = {}
    if "hf" in formats or "parquet" in formats or "lmms-eval" in formats:
        written.update(export_hf(bench, out, parquet="parquet" in formats,
                                 save_to_disk="hf" in formats or "lmms-eval" in formats))
    if "lmms-eval" in formats:
        written["lmms-eval"] = export_lmms_eval(bench, out, out / "hf")
    if "vlmevalkit" in formats:
        written["vlmevalkit"] = export_vlmevalkit(bench, out)
    exported = {*run.manifest["steps"].get("export", {}).get("formats", []), *formats}
    run.finish("export", formats=[f for f in FORMATS if f in exported])
    return written
