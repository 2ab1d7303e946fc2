"""The released MIMIC evaluation data (HF dataset `anurag4446/mimic`) as a stitchkit benchmark folder.

The paper's numbers were measured on this data, not on a benchmark built here, so `legacy_official` scores are
comparable with the paper only on it (reference mimic.md sections 1 and 4.1). `import_official` writes the same
folder `stitchkit mimic build` writes, so eval, score, export and `mimic run` work on it unchanged:

    DIR/samples.jsonl    one Sample per row: configs in the order of protocol.TASKS, rows in the dataset's order
    DIR/benchmark.json   the source, the scoring mode (legacy_official), the answer classes
    DIR/images/<sha256 of the pixels>.png   every distinct image once, as the model sees it (RGB)
    DIR/summary.md, DIR/manifest.json, DIR/config.yaml

A row has `question`, `images` (PIL), `gt` (counting: maybe an int; the official scorer compares with str(gt)),
`task` (a sub-configuration key, kept as the sample's `cell`) and `idx` (counting) or `id` (the other configs),
kept in the sample id "<task>-<idx/id>" so predictions can be matched to the official files. Nothing else is in
the data: the control variables (spread, distractors, k, balanced, ...) are None unless the task's definition fixes
them (common: every image holds the answer; listing: k = the answer's size; common and odd-one: k = 1). Clean
scoring needs each counting query's classes and per-image counts, and the classes a model may name -- none of
which the rows carry -- so the benchmark records legacy_official as its only scoring mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from stitchkit.backbones.loading import first_line, from_hub, looks_like_path
from stitchkit.errors import InputError
from stitchkit.multiimage.benchmark import META_FILE, SAMPLES_FILE, Sample, write_samples
from stitchkit.multiimage.protocol import TASKS, split_gt_list

OFFICIAL_DATASET = "anurag4446/mimic"
OFFICIAL_SPLIT = "test"
IMAGES_DIR = "images"
CLEAN_UNSUPPORTED = (
    "the released MIMIC data carries no class vocabulary, queried classes or per-image counts, which clean scoring "
    "needs; score it with the official scorer (--legacy-official, or eval.legacy_official: true in a "
    "`stitchkit mimic run` config)"
)


def id_field(task: str) -> str:
    """The column that keys a row: the official scorer reads `idx` for counting and `id` for the other tasks."""
    return "idx" if task == "counting" else "id"


# ---- reading the released data -------------------------------------------------------------------------------


def load_official_task(source: str, task: str):
    """The `test` split of one config (a datasets.Dataset), from a hub id (the local cache first, then the hub
    once) or a local copy: per-config folders written by save_to_disk, or a snapshot of the hub repo."""
    folder = Path(source).expanduser()
    if folder.exists():
        saved = folder / task
        if (saved / "dataset_dict.json").is_file() or (saved / "state.json").is_file():
            return _test_split(_read(lambda d: d.load_from_disk(str(saved)), str(saved)), str(saved))
        return _read(lambda d: d.load_dataset(str(folder), task, split=OFFICIAL_SPLIT), f"the {task} config of {folder}",
                     hint=f"; pass a snapshot of the hub repo (`hf download {OFFICIAL_DATASET} --repo-type dataset "
                          f"--local-dir DIR`) or a folder with one save_to_disk folder per config (DIR/{task}/)")
    if looks_like_path(source):
        raise InputError(f"cannot import the MIMIC data: there is no folder {folder}")
    return _load_from_hub(source, task)


def _test_split(data, where: str):
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if OFFICIAL_SPLIT not in data:
            raise InputError(f"{where} has no {OFFICIAL_SPLIT!r} split (it has: {', '.join(data) or 'none'})")
        return data[OFFICIAL_SPLIT]
    return data


def _read(load, where: str, hint: str = ""):
    """load(datasets) with every datasets failure turned into one message naming `where`."""
    import datasets

    try:
        with _quiet_datasets():
            return load(datasets)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise InputError(f"cannot read {where}: {first_line(err)}{hint}") from None


def _load_from_hub(dataset_id: str, task: str):
    """The project's cache-first rule for hub ids (backbones.loading.from_hub), with datasets' own offline switch."""
    import datasets

    def load(local_files_only: bool):
        with _datasets_offline() if local_files_only else contextlib.nullcontext(), _quiet_datasets():
            return datasets.load_dataset(dataset_id, task, split=OFFICIAL_SPLIT)

    hint = (f"Download it where there is internet (`hf download {dataset_id} --repo-type dataset --local-dir DIR`) and "
            "pass --source DIR, or copy the Hugging Face cache.")
    return from_hub(dataset_id, load, noun="dataset", hint=hint, error=InputError,
                    offline=lambda: datasets.config.HF_HUB_OFFLINE,
                    failures=(OSError, ValueError, datasets.exceptions.DatasetsError))  # fmt: skip


@contextlib.contextmanager
def _datasets_offline() -> Iterator[None]:
    """datasets reads its offline switch at call time: on for one call, the local cache answers alone."""
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "using the latest cached version" warnings or conversion bars: the import has its own progress bar."""
    from datasets.utils import logging as ds_logging

    verbosity, bars = ds_logging.get_verbosity(), ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity_error()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


def check_columns(data, task: str, where: str) -> None:
    required = ("question", "images", "gt", id_field(task))
    missing = [c for c in required if c not in data.column_names]
    if missing:
        raise InputError(f"{where}: the {task} rows have no {', '.join(missing)} (columns: "
                         f"{', '.join(data.column_names)}); is this the released MIMIC data?")


# ---- rows -> samples -----------------------------------------------------------------------------------------


def pixel_digest(rgb) -> str:
    """The identity of a picture by content: a hash of an RGB PIL image's size and pixels. An imported image is
    stored as <pixel_digest>.png, and a training image is matched against the released pictures with it
    (picture_digest), so a copy is recognised whatever its file name or lossless encoding."""
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()[:24]


def picture_digest(path: str | os.PathLike) -> str:
    """pixel_digest of an image file decoded as the released rows were: by the datasets Image feature (which
    applies EXIF orientation), then the official doc_to_visual's plain convert("RGB"). A file whose bytes are
    those of a released picture -- the release built from COCO train2017 files, say -- gets that picture's
    name; a re-encoded copy (other pixels) does not."""
    from datasets import Image

    try:
        image = Image().decode_example({"path": None, "bytes": Path(path).read_bytes()})
        return pixel_digest(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"cannot read image {path}: {first_line(err)}") from None


def picture_digests(paths: Sequence[Path]) -> list[str]:
    """picture_digest of every file, in order, on a few threads (decoding and hashing release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from stitchkit.progress import track

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(picture_digest, paths)
        return list(track(digests, "matching images to the released pictures", total=len(paths)))


def released_pictures(bench) -> frozenset[str]:
    """The pixel digests of an imported benchmark's pictures (its file names, as ImageStore wrote them); empty
    for a benchmark built here, whose images are files of their source and are matched by path instead."""
    if not bench.meta.get("released_data"):
        return frozenset()
    return frozenset(Path(name).stem for sample in bench.samples for name in sample.images)


class ImageStore:
    """DIR/images/: every distinct image (by its RGB pixels) written once as PNG, named by its pixel_digest, so
    the same data gives the same files wherever it is imported; image ids count distinct images in import order."""

    def __init__(self, root: Path):
        self.root = root
        self.ids: dict[str, int] = {}

    def add(self, image) -> tuple[str, int]:
        """(file name relative to the benchmark folder, image id) of one PIL image."""
        # The official doc_to_visual's plain convert("RGB") (not data.to_rgb's compositing on white): the model
        # sees what the paper's evaluation gave it, and load_image reads the stored RGB PNG back unchanged.
        rgb = image.convert("RGB")
        digest = pixel_digest(rgb)
        name = f"{IMAGES_DIR}/{digest}.png"
        if digest not in self.ids:
            from stitchkit.runs import atomic_write_bytes

            self.ids[digest] = len(self.ids)
            buffer = io.BytesIO()
            rgb.save(buffer, format="PNG")
            atomic_write_bytes(self.root / name, buffer.getvalue())
        return name, self.ids[digest]


def answer_text(gt, where: str) -> str:
    """The ground truth as the official scorer reads it: str(gt) (counting answers may be stored as ints)."""
    if isinstance(gt, str) or (isinstance(gt, int) and not isinstance(gt, bool)):
        return str(gt)
    raise InputError(f"{where}: gt must be a string or an integer, got {type(gt).__name__} {gt!r}")


def row_to_sample(task: str, row: dict, store: ImageStore, where: str) -> Sample:
    """One released row -> a Sample: what the row says, what the task's definition fixes, None for the rest."""
    from PIL import Image

    images = row["images"]
    if not isinstance(images, list) or not images or not all(isinstance(im, Image.Image) for im in images):
        raise InputError(f"{where}: images must be a non-empty list of images")
    if not isinstance(row["question"], str):
        raise InputError(f"{where}: question must be a string, got {type(row['question']).__name__}")
    gt = answer_text(row["gt"], where)
    if row[id_field(task)] is None:
        raise InputError(f"{where}: no {id_field(task)}")
    files, image_ids = zip(*(store.add(im) for im in images))
    n = len(images)
    answer_classes = {"listing": split_gt_list(gt), "common": [gt], "oddone": [gt]}.get(task)
    return Sample(
        id=f"{task}-{row[id_field(task)]}", task=task, cell=str(row.get("task", task)), question=row["question"],
        template_id=None, gt=gt, images=list(files), image_ids=list(image_ids), n_images=n,
        spread=n if task == "common" else None, n_distractors=0 if task == "common" else None,
        k=len(answer_classes) if answer_classes is not None else None, classes=answer_classes,
        counts_per_image=None, target_positions=list(range(n)) if task == "common" else [],
        balanced=None, total_count=None, category=None, odd_images=None, filter_mode=None, seed=None,
    )


def task_rows(data, task: str, where: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row, an unreadable one (a corrupt image) named by its number."""
    rows = iter(data)
    for number in range(len(data)):
        at = f"{where}, {task} row {number}"
        try:
            row = next(rows)
        except (OSError, ValueError, SyntaxError) as err:
            raise InputError(f"cannot read {at}: {first_line(err)}") from None
        yield at, row


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    tasks = list(dict.fromkeys(tasks or TASKS))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown MIMIC task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return [t for t in TASKS if t in tasks]


def import_official(
    source: str | os.PathLike | None,
    out: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    command: str | None = None,
) -> Path:
    """Read the released data (a hub id, None for anurag4446/mimic, or a local copy), then write the benchmark
    folder `out`; returns it.

    tasks: configs to import (default all four); limit: only the first N rows of each. Everything is read and
    checked before the folder is made; the samples and benchmark.json are written last, atomically, so a failed
    import leaves no benchmark behind (the CLI also takes back the folder it created). Same input, same bytes."""
    from stitchkit.progress import make_progress
    from stitchkit.runs import RunDir, atomic_write_json, atomic_write_text

    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    tasks = check_tasks(tasks)
    source = str(source or OFFICIAL_DATASET)
    local = Path(source).expanduser()
    label = str(local.resolve()) if local.exists() else str(source)
    data = {}
    for task in tasks:
        data[task] = load_official_task(source, task)
        check_columns(data[task], task, label)
        if limit is not None:
            data[task] = data[task].select(range(min(limit, len(data[task]))))
    source_info = {"dataset": label, "split": OFFICIAL_SPLIT, "tasks": tasks, "limit": limit}
    run = RunDir(out, config=source_info, command=command)
    store = ImageStore(run.root)
    samples: list[Sample] = []
    with make_progress() as progress:
        for task in tasks:
            bar = progress.add_task(f"import {task}", total=len(data[task]), status="")
            for where, row in task_rows(data[task], task, label):
                samples.append(row_to_sample(task, row, store, where))
                progress.advance(bar)
    duplicated = [i for i, n in Counter(s.id for s in samples).items() if n > 1]
    if duplicated:
        raise InputError(f"{label}: duplicate row ids, e.g. {', '.join(duplicated[:3])}")
    meta = official_meta(samples, source_info, len(store.ids))
    write_samples(run.path(SAMPLES_FILE), samples)
    atomic_write_json(run.path(META_FILE), meta)
    atomic_write_text(run.path("summary.md"), summary_markdown(samples, meta))
    run.finish("import", samples=len(samples))
    return run.root


def official_meta(samples: list[Sample], source_info: dict, n_images: int) -> dict:
    """benchmark.json of an imported benchmark: where it came from and what it supports (no timestamps, no
    absolute image paths: the same data gives the same bytes)."""
    return {
        "format": "stitchkit-mimic/1",
        "source": source_info,
        "released_data": True,
        "images_root": ".",
        "scoring_modes": ["legacy_official"],
        "scoring_note": CLEAN_UNSUPPORTED,
        # the classes the answers name (common, odd-one, listing): what the data says about its vocabulary
        "class_names": sorted({c for s in samples if s.task != "counting" for c in s.classes}),
        "supercategories": {},
        "n_samples": {t: sum(s.task == t for s in samples) for t in TASKS},
        "n_distinct_images": n_images,
        "cells": {t: dict(sorted(Counter(s.cell for s in samples if s.task == t).items())) for t in TASKS},
    }


def summary_markdown(samples: list[Sample], meta: dict) -> str:
    from stitchkit.report import markdown_table

    lines = ["# MIMIC benchmark: the released data\n",
             f"{len(samples)} samples from `{meta['source']['dataset']}` (split {meta['source']['split']}), "
             f"{meta['n_distinct_images']} distinct images. Scoring: legacy_official only; no control variables "
             "beyond the number of images and the official `task` key (`cell`).\n"]
    lines.append(markdown_table([{"task": t, "samples": n, "task keys": len(meta["cells"][t])}
                                 for t, n in meta["n_samples"].items() if n]))
    counts = Counter((s.task, s.n_images) for s in samples)
    values = sorted({v for _, v in counts})
    table = [{"task": t, **{str(v): counts.get((t, v), 0) for v in values}} for t in TASKS if meta["n_samples"][t]]
    lines.append("\n## samples by n_images\n\n" + markdown_table(table))
    return "\n".join(lines)
