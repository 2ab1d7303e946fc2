"""A built MIMIC benchmark on disk, and its sample record.

    DIR/samples.jsonl    one sample per line (the record below), tasks in the order of protocol.TASKS
    DIR/benchmark.json   images_root, class names and supercategories, the config, per-class pool sizes,
                         rejection counts, skipped grid cells
    DIR/summary.md       samples per task and control value
    DIR/manifest.json, DIR/config.yaml   how it was made (runs.RunDir)

A record carries everything a VLM evaluation needs -- the image files in order, the question, the answer --
and every control variable, so scores can be broken down without the annotations. A benchmark imported from the
released data (official.py) does not know the controls: those fields are None there, and benchmark.json says which
scoring modes its records support. Sample ids repeat in every build, so the sha256 of samples.jsonl (computed on
load) is the benchmark's fingerprint: predictions (`mimic eval`) and exports record it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from stitchkit.errors import InputError
from stitchkit.multiimage.protocol import MODES, TASKS, Vocabulary, prompt_text

SAMPLES_FILE = "samples.jsonl"
META_FILE = "benchmark.json"

# the control variables a breakdown can group by (reference section 4.2, "Reporting")
CONTROLS = ("n_images", "spread", "n_distractors", "k", "balanced", "total_count", "category", "template_id",
            "odd_images")
# controls whose value a task's definition derives from the others, so a breakdown by them repeats another one:
# common's s is N (and D is 0), odd-one's D is N - m
DERIVED_CONTROLS = {"common": ("spread", "n_distractors"), "oddone": ("n_distractors",)}


@dataclass
class Sample:
    id: str  # "<task>-NNNNNN" ("<task>-<official idx/id>" for the released data)
    task: str  # counting | listing | common | oddone
    cell: str  # the grid cell it was drawn for, e.g. "balanced_k1_s2_d8_C4" (the official `task` sub-key)
    question: str  # raw question; the prompt is protocol.prompt_text(task, question)
    template_id: Optional[int]  # None for the released data, as every field it does not carry
    gt: str  # "4" | "zebra: 4, giraffe: 2" | "bear, cat, dog" | "dog"
    images: list[str]  # file names relative to images_root, in the order shown to the model
    image_ids: list[int]
    n_images: int  # N
    spread: Optional[int]  # s: images holding target instances (counting / listing), the odd images (odd-one), N (common)
    n_distractors: Optional[int]  # N - s
    k: Optional[int]  # concepts: queried classes (counting), classes in the answer (listing), 1 otherwise
    classes: Optional[list[str]]  # counting: queried; listing: answer; common: [c]; odd-one: [odd, majority] (released: [odd])
    counts_per_image: Optional[list[list[int]]]  # [image][class]: non-crowd instances of classes[j] in image i
    target_positions: list[int]  # positions (0-based, in `images`) of the images holding target instances (known ones)
    balanced: Optional[bool]  # counting only
    total_count: Optional[int]  # counting balanced: C, the per-class total
    category: Optional[str]  # listing: the supercategory
    odd_images: Optional[int]  # odd-one: images holding the odd class
    filter_mode: Optional[str]
    seed: Optional[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def prompt(self, legacy: bool = False) -> str:
        return prompt_text(self.task, self.question, legacy=legacy)


@dataclass
class Benchmark:
    root: Path
    samples: list[Sample]
    meta: dict[str, Any]
    # sha256 of samples.jsonl: which benchmark predictions and exports were made on (sample ids repeat across builds)
    fingerprint: Optional[str] = None

    def subset(self, samples: list[Sample]) -> "Benchmark":
        """The same benchmark (root, meta, fingerprint) restricted to `samples`."""
        return Benchmark(self.root, samples, self.meta, self.fingerprint)

    @property
    def images_root(self) -> Path:
        # a relative images_root lies inside the folder (an imported benchmark carries its images and can move)
        return self.root / self.meta["images_root"]

    def image_paths(self, sample: Sample) -> list[Path]:
        return [self.images_root / name for name in sample.images]

    @property
    def scoring_modes(self) -> tuple[str, ...]:
        """The scoring modes its records support, the default first: both for a built benchmark, legacy_official
        alone for the released data, which lacks what clean scoring needs (official.py)."""
        return tuple(self.meta.get("scoring_modes", MODES))

    def check_scoring_mode(self, mode: str) -> None:
        if mode not in self.scoring_modes:
            raise InputError(f"{self.root} cannot be scored in {mode} mode: {self.meta.get('scoring_note', '')}")

    def vocabulary(self) -> Vocabulary:
        self.check_scoring_mode("clean")  # clean scoring is the vocabulary's only user
        return Vocabulary(self.meta["class_names"])

    def by_id(self) -> dict[str, Sample]:
        return {s.id: s for s in self.samples}

    def tasks(self) -> list[str]:
        present = {s.task for s in self.samples}
        return [t for t in TASKS if t in present]


def write_samples(path: str | os.PathLike, samples: list[Sample]) -> None:
    from stitchkit.runs import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(s.to_dict(), separators=(",", ":")) + "\n" for s in samples))


def load_benchmark(root: str | os.PathLike) -> Benchmark:
    """Read a folder written by `stitchkit mimic build`."""
    root = Path(root)
    samples_path, meta_path = root / SAMPLES_FILE, root / META_FILE
    for path in (samples_path, meta_path):
        if not path.is_file():
            raise InputError(
                f"{root} is not a MIMIC benchmark folder (no {path.name}); build one with `stitchkit mimic build`"
            )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{meta_path} is not valid JSON ({err})") from None
    data = samples_path.read_bytes()
    samples = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                samples.append(Sample(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise InputError(f"{samples_path}:{number}: not a MIMIC sample ({err})") from None
    return Benchmark(root, samples, meta, hashlib.sha256(data).hexdigest())
