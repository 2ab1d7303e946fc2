"""The MIMIC generator: controlled multi-image queries from any COCO-format annotation file.

Each task is a grid of cells (one value per control variable); sample i of a task is drawn for cell
i mod (number of cells), from the task's own RNG stream seeded with (seed, task), so the same config gives the
same samples, and changing one task's size leaves the others untouched. A draw is:
  1. pick the query's classes: uniformly from the cell's class pool (class-balanced, as in the paper), or in
     proportion to their image counts;
  2. pick images uniformly from the pools of the index (eligible under the area filter and the crowd rule),
     never the same image twice in a query, and no image in more than `max_image_reuse` queries of a task;
  3. recompute the answer from the raw annotations (every box, any size, crowd included) and reject the draw
     unless it is exactly what the cell asked for (unique common / odd class, distractors free of targets).
Rejections are counted by reason and written to benchmark.json.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Callable, Optional

import stitchkit
from stitchkit.errors import InputError
from stitchkit.multiimage.benchmark import META_FILE, SAMPLES_FILE, Sample, write_samples
from stitchkit.multiimage.config import MAX_IMAGES_PER_SAMPLE, MimicConfig
from stitchkit.multiimage.index import MimicIndex
from stitchkit.multiimage.protocol import TASKS, counting_gt
from stitchkit.multiimage.templates import TEMPLATES, question_text

# draws of one image (or one distractor) before the whole query draw is rejected
IMAGE_TRIES = 64


@dataclass(frozen=True)
class Cell:
    task: str
    key: str
    n_targets: int  # s
    n_distractors: int  # D (odd-one: the majority images)
    k: int = 1
    split: Optional[str] = None  # counting: balanced | unbalanced
    total: Optional[int] = None  # counting balanced: C


def shares(spread: int, k: int) -> list[int]:
    """Split s target images over k classes as evenly as possible, larger shares first."""
    return [spread // k + (1 if j < spread % k else 0) for j in range(k)]


def counting_cells(config: MimicConfig) -> tuple[list[Cell], list[dict]]:
    cfg = config.counting
    cells, skipped = [], []
    for split, k, s, d in product(cfg.splits, cfg.k, cfg.spread, cfg.distractors):
        for total in (cfg.totals if split == "balanced" else [None]):
            key = f"{split}_k{k}_s{s}_d{d}" + (f"_C{total}" if total else "")
            reason = None
            if s + d > MAX_IMAGES_PER_SAMPLE:
                reason = f"{s + d} images; at most {MAX_IMAGES_PER_SAMPLE} per sample"
            elif s < k:
                reason = f"spread {s} < k {k}: every queried class needs a target image"
            elif split == "balanced" and cfg.composition == "equal" and any(total % sj for sj in shares(s, k)):
                reason = f"C={total} cannot be split into equal parts over {shares(s, k)} images"
            elif split == "balanced" and any(sj > total for sj in shares(s, k)):
                reason = f"C={total} instances cannot fill {max(shares(s, k))} images"
            if reason:
                skipped.append({"task": "counting", "cell": key, "reason": reason})
            else:
                cells.append(Cell("counting", key, s, d, k, split, total))
    return cells, skipped


def task_cells(task: str, config: MimicConfig) -> tuple[list[Cell], list[dict]]:
    if task == "counting":
        return counting_cells(config)
    if task == "listing":
        cells, skipped = [], []
        for s, d in product(config.listing.spread, config.listing.distractors):
            if s + d > MAX_IMAGES_PER_SAMPLE:
                reason = f"{s + d} images; at most {MAX_IMAGES_PER_SAMPLE}"
                skipped.append({"task": task, "cell": f"s{s}_d{d}", "reason": reason})
            else:
                cells.append(Cell(task, f"s{s}_d{d}", s, d))
        return cells, skipped
    if task == "common":
        return [Cell(task, f"n{n}", n, 0) for n in config.common.n_images], []
    cells, skipped = [], []
    for n, m in product(config.oddone.n_images, config.oddone.odd_images):
        if 2 * m < n:
            cells.append(Cell(task, f"n{n}_m{m}", m, n - m))
        else:
            skipped.append({"task": task, "cell": f"n{n}_m{m}", "reason": f"{m} odd images is not fewer than {n}/2"})
    return cells, skipped


def max_classes_per_image(task: str, config: MimicConfig) -> int | None:
    """The cap on classes per image of a task's pools; odd-one "pure" majority images hold one class only
    (its odd images are checked per draw)."""
    task_config = config.task_config(task)
    if getattr(task_config, "pure", False):
        return 1
    return getattr(task_config, "max_classes_per_image", None)


class Rejected(Exception):
    """One draw failed; the reason is counted and the draw retried."""


class TaskSampler:
    """Draws the samples of one task. State: the task's RNG, image reuse counts, rejection counts."""

    def __init__(self, task: str, index: MimicIndex, config: MimicConfig):
        self.task, self.index, self.config = task, index, config
        self.rng = random.Random(f"mimic:{config.seed}:{task}")  # string seeds hash with SHA-512: stable
        self.uses = [0] * index.n_images
        self.rejections: Counter[str] = Counter()
        self.max_classes = max_classes_per_image(task, config)

    # -- building blocks --------------------------------------------------------------------------------------

    def pick_image(self, pool: list[int], taken: set[int], ok: Callable[[int], bool] = lambda i: True) -> int:
        """A uniform draw from `pool` that is unused in this query, under the reuse cap, and passes `ok`."""
        cap = self.config.max_image_reuse
        if pool:
            for _ in range(IMAGE_TRIES):
                image = pool[self.rng.randrange(len(pool))]
                if image not in taken and self.uses[image] < cap and ok(image):
                    taken.add(image)
                    return image
        raise Rejected("no usable image in pool (reuse cap, duplicates or conflicts)")

    def pick_classes(self, pool: list[int], sizes: list[int], k: int) -> list[int]:
        """k distinct classes: uniform (class-balanced) or in proportion to `sizes` (their eligible images)."""
        if self.config.class_balanced:
            return self.rng.sample(pool, k)
        pool, sizes, chosen = list(pool), list(sizes), []
        for _ in range(k):
            j = self.rng.choices(range(len(pool)), weights=sizes)[0]
            chosen.append(pool.pop(j))
            sizes.pop(j)
        return chosen

    def distractors(self, n: int, taken: set[int], excluded: frozenset[int] | set[int]) -> list[int]:
        """n eligible images in which no class of `excluded` is present at all (raw annotations)."""
        pool, present = self.index.eligible_images(), self.index.present
        return [self.pick_image(pool, taken, lambda i: present[i].isdisjoint(excluded)) for _ in range(n)]

    # -- class pools per cell -----------------------------------------------------------------------------------

    def counting_parts(self, cell: Cell, share: int) -> list[tuple[int, int]]:
        """(low, high) instance-count range of each of a class's `share` target images."""
        cfg = self.config.counting
        if cell.split == "unbalanced":
            return [(1, cfg.max_count)] * share
        if cfg.composition == "equal":
            return [(cell.total // share,) * 2] * share
        cuts = sorted(self.rng.sample(range(1, cell.total), share - 1))
        return [(b - a,) * 2 for a, b in zip([0, *cuts], [*cuts, cell.total])]

    def count_ranges(self, cell: Cell) -> set[tuple[int, int]]:
        """The instance-count ranges a counting cell may ask a class's target images for."""
        cfg = self.config.counting
        if cell.split == "unbalanced":
            return {(1, cfg.max_count)}
        if cfg.composition == "any":
            return {(1, cell.total)}
        return {(cell.total // share,) * 2 for share in shares(cell.n_targets, cell.k)}

    def class_pool(self, cell: Cell) -> tuple[list[int], list[int]]:
        """Classes with at least max(min_images_per_class, images needed) eligible images for this cell, and
        their eligible image counts (the pool sizes that are logged)."""
        index, need = self.index, self.config.min_images_per_class
        if self.task == "counting":
            needed = max(need, max(shares(cell.n_targets, cell.k)))
        else:  # common: N images of c; odd-one: N - m of the majority class (more than the m odd ones)
            needed = max(need, cell.n_targets + cell.n_distractors if self.task == "common" else cell.n_distractors)
        classes, sizes = [], []
        for c in range(len(index.class_names)):
            if self.task == "counting":
                n = min(len(index.count_images(c, low, high)) for low, high in self.count_ranges(cell))
            else:
                n = len(index.class_images(c, self.max_classes))
            if n >= needed:
                classes.append(c)
                sizes.append(n)
        return classes, sizes

    def group_pool(self, cell: Cell) -> tuple[list[str], dict[str, list[int]]]:
        """Listing: supercategories with >= min_members classes, and their members with enough eligible images."""
        index, need = self.index, self.config.min_images_per_class
        groups, members = [], {}
        for group, classes in index.groups.items():
            if len(classes) < self.config.listing.min_members:
                continue
            usable = [c for c in classes if len(index.group_images(group, c)) >= need]
            if usable and len({i for c in usable for i in index.group_images(group, c)}) >= cell.n_targets:
                groups.append(group)
                members[group] = usable
        return groups, members

    # -- one draw per task ------------------------------------------------------------------------------------

    def draw_counting(self, cell: Cell, pool: tuple[list[int], list[int]]) -> dict:
        index = self.index
        classes = self.pick_classes(*pool, cell.k)
        queried = frozenset(classes)
        taken: set[int] = set()
        targets = []
        for c, share in zip(classes, shares(cell.n_targets, cell.k)):
            others = queried - {c}
            for low, high in self.counting_parts(cell, share):
                pool_c = index.count_images(c, low, high)
                targets.append(self.pick_image(pool_c, taken, lambda i: index.present[i].isdisjoint(others)))
        distractors = self.distractors(cell.n_distractors, taken, queried)
        return {"classes": classes, "targets": targets, "others": distractors}

    def draw_listing(self, cell: Cell, pool: tuple[list[str], dict[str, list[int]]]) -> dict:
        groups, members = pool
        if self.config.class_balanced:
            group = groups[self.rng.randrange(len(groups))]
        else:
            sizes = [sum(len(self.index.group_images(g, c)) for c in members[g]) for g in groups]
            group = self.rng.choices(groups, weights=sizes)[0]
        taken: set[int] = set()
        targets = []
        for _ in range(cell.n_targets):
            if self.config.class_balanced:
                c = members[group][self.rng.randrange(len(members[group]))]
                targets.append(self.pick_image(self.index.group_images(group, c), taken))
            else:
                union = sorted({i for c in members[group] for i in self.index.group_images(group, c)})
                targets.append(self.pick_image(union, taken))
        distractors = self.distractors(cell.n_distractors, taken, set(self.index.groups[group]))
        return {"group": group, "targets": targets, "others": distractors}

    def draw_common(self, cell: Cell, pool: tuple[list[int], list[int]]) -> dict:
        (c,) = self.pick_classes(*pool, 1)
        taken: set[int] = set()
        images = [self.pick_image(self.index.class_images(c, self.max_classes), taken) for _ in range(cell.n_targets)]
        return {"classes": [c], "targets": images, "others": []}

    def draw_oddone(self, cell: Cell, pool: tuple[list[int], list[int]]) -> dict:
        odd, majority = self.pick_classes(*pool, 2)
        present, taken = self.index.present, set()
        if self.config.oddone.pure:
            # an odd image may also show the majority class, if that class is eligible there
            allowed, eligible = {odd, majority}, self.index.eligible_classes
            odd_pool = self.index.class_images(odd, 2)
            odd_ok = lambda i: present[i] <= allowed and (majority not in present[i] or majority in eligible[i])
        else:
            odd_pool, odd_ok = self.index.class_images(odd, self.max_classes), lambda i: True
        odd_images = [self.pick_image(odd_pool, taken, odd_ok) for _ in range(cell.n_targets)]
        majority_images = [
            self.pick_image(self.index.class_images(majority, self.max_classes), taken, lambda i: odd not in present[i])
            for _ in range(cell.n_distractors)
        ]
        return {"classes": [odd, majority], "targets": odd_images, "others": majority_images}

    # -- answers from the raw annotations ---------------------------------------------------------------------

    def answer(self, cell: Cell, draw: dict, images: list[int]) -> tuple[str, list[int], int]:
        """(gt, classes, k) recomputed from the raw annotations of the drawn images; Rejected if the draw is not
        what the cell asked for."""
        index = self.index
        present = [index.present[i] for i in images]
        if self.task == "counting":
            classes = draw["classes"]
            totals = [sum(index.counts[i].get(c, 0) for i in images) for c in classes]
            holders = sum(1 for p in present if not p.isdisjoint(classes))
            if holders != cell.n_targets:
                raise Rejected("target instances spread over the wrong number of images")
            if cell.split == "balanced" and any(t != cell.total for t in totals):
                raise Rejected("balanced total not met")
            names = [index.class_names[c] for c in classes]
            return counting_gt(names, totals), classes, len(classes)
        if self.task == "listing":
            members = set(index.groups[draw["group"]])
            found = sorted({c for p in present for c in p & members}, key=lambda c: index.class_names[c])
            if sum(1 for p in present if p & members) != cell.n_targets:
                raise Rejected("member classes spread over the wrong number of images")
            return ", ".join(index.class_names[c] for c in found), found, len(found)
        if self.task == "common":
            shared = frozenset.intersection(*present)
            if shared != {draw["classes"][0]}:
                raise Rejected("common class not unique")
            return index.class_names[draw["classes"][0]], draw["classes"], 1
        image_counts = Counter(c for p in present for c in p)
        minority = {c for c, n in image_counts.items() if 1 <= n and 2 * n < len(images)}
        if minority != {draw["classes"][0]}:
            raise Rejected("odd class not unique")
        return index.class_names[draw["classes"][0]], draw["classes"], 1

    def sample(self, number: int, cell: Cell, pool) -> Sample:
        draw_fn = getattr(self, f"draw_{self.task}")
        for _ in range(self.config.max_attempts):
            try:
                draw = draw_fn(cell, pool)
                images = draw["targets"] + draw["others"]
                self.rng.shuffle(images)
                gt, classes, k = self.answer(cell, draw, images)
                break
            except Rejected as why:
                self.rejections[str(why)] += 1
        else:
            reasons = "; ".join(f"{r}: {n}" for r, n in self.rejections.most_common(3))
            raise InputError(
                f"{self.task}: no valid sample for grid cell {cell.key} after {self.config.max_attempts} draws "
                f"({reasons}). The annotation file is too small or too filtered for this config: lower "
                f"{self.task}.n_samples, raise max_image_reuse, or relax the filter."
            )
        for i in images:
            self.uses[i] += 1
        index, targets = self.index, set(draw["targets"])
        template_id = self.rng.randrange(len(TEMPLATES[self.task]))
        names = [index.class_names[c] for c in classes]
        group = draw.get("group")
        n_targets = len(targets) if self.task != "common" else len(images)
        return Sample(
            id=f"{self.task}-{number:06d}",
            task=self.task,
            cell=cell.key,
            question=question_text(self.task, template_id, classes=names, group=group),
            template_id=template_id,
            gt=gt,
            images=[index.file_names[i] for i in images],
            image_ids=[index.image_ids[i] for i in images],
            n_images=len(images),
            spread=n_targets,
            n_distractors=len(images) - n_targets,
            k=k,
            classes=names,
            counts_per_image=[[index.counts[i].get(c, 0) for c in classes] for i in images],
            target_positions=[p for p, i in enumerate(images) if i in targets],
            balanced=(cell.split == "balanced") if self.task == "counting" else None,
            total_count=cell.total if self.task == "counting" else None,
            category=group,
            odd_images=cell.n_targets if self.task == "oddone" else None,
            filter_mode=self.config.filter.mode,
            seed=self.config.seed,
        )


def generate(index: MimicIndex, config: MimicConfig, progress=None) -> tuple[list[Sample], dict]:
    """All samples of every task with n_samples > 0, and the build statistics for benchmark.json."""
    samples: list[Sample] = []
    stats: dict = {"tasks": {}, "skipped_cells": []}
    for task in TASKS:
        n_samples = config.task_config(task).n_samples
        if n_samples == 0:
            continue
        sampler = TaskSampler(task, index, config)
        cells, skipped = task_cells(task, config)
        pools = {}
        for cell in cells:
            pool = sampler.group_pool(cell) if task == "listing" else sampler.class_pool(cell)
            classes_needed = cell.k if task == "counting" else 2 if task == "oddone" else 1
            if len(pool[0]) >= classes_needed:
                pools[cell] = pool
            else:
                reason = "not enough classes with enough eligible images"
                skipped.append({"task": task, "cell": cell.key, "reason": reason})
        stats["skipped_cells"] += skipped
        usable = [c for c in cells if c in pools]
        if not usable:
            raise InputError(
                f"{task}: no grid cell can be built from these annotations "
                f"(e.g. {skipped[0]['cell']}: {skipped[0]['reason']}); check the {task} grid and the filter"
            )
        task_id = progress.add_task(f"mimic {task}", total=n_samples, status="") if progress else None
        per_cell: Counter[str] = Counter()
        for number in range(n_samples):
            cell = usable[number % len(usable)]
            samples.append(sampler.sample(number, cell, pools[cell]))
            per_cell[cell.key] += 1
            if progress:
                progress.advance(task_id)
        stats["tasks"][task] = {
            "samples": n_samples,
            "cells": {c.key: {"samples": per_cell[c.key], "pool_classes": len(pools[c][0])} for c in usable},
            "draws": n_samples + sum(sampler.rejections.values()),
            "rejections": dict(sampler.rejections.most_common()),
            "rejection_rate": sum(sampler.rejections.values()) / (n_samples + sum(sampler.rejections.values())),
            "pool_sizes": pool_sizes(task, index, config),
        }
    return samples, stats


def pool_sizes(task: str, index: MimicIndex, config: MimicConfig) -> dict[str, int]:
    """Per class: the eligible images that may carry it in this task (what the area filter leaves)."""
    if task == "listing":
        return {f"{index.class_group[c]}/{index.class_names[c]}": len(index.group_images(index.class_group[c], c))
                for c in range(len(index.class_names))
                if len(index.groups[index.class_group[c]]) >= config.listing.min_members}
    if task == "counting":
        high = config.counting.max_count
        return {name: len(index.count_images(c, 1, high)) for c, name in enumerate(index.class_names)}
    max_classes = max_classes_per_image(task, config)
    return {name: len(index.class_images(c, max_classes)) for c, name in enumerate(index.class_names)}


def build_benchmark(
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    config: MimicConfig | None = None,
    command: str | None = None,
    exclude_images: Collection[str | os.PathLike] = (),
    exclude_pictures: Collection[str] = (),
) -> Path:
    """Load the COCO file, index it once, generate every task, check the used images exist, write DIR.

    `exclude_images`: image files (paths) that must not be used, e.g. every image of an evaluation benchmark
    when this one is its training data; matched by normalised absolute path, so any source file works.
    `exclude_pictures`: pixel digests (official.picture_digest) of pictures that must not be used whatever their
    file, e.g. those of the imported released data, whose files are renamed copies (see copies_of)."""
    from stitchkit.data import check_images, load_coco
    from stitchkit.progress import make_progress
    from stitchkit.runs import RunDir, atomic_write_json, atomic_write_text

    config = config or MimicConfig()
    images_root = Path(images).resolve()
    if images_root.exists() and not images_root.is_dir():
        raise InputError(f"image folder {images} is not a folder: give the folder the file_name entries live in")
    if not images_root.is_dir():
        raise InputError(f"image folder not found: {images}")
    coco = load_coco(annotations)
    if not coco.images or not coco.categories or not coco.annotations:
        raise InputError(f"{annotations}: no images, categories or annotations to build questions from")
    run = RunDir(out, config=config, seeds={"mimic": config.seed}, inputs={"annotations": annotations}, command=command)
    excluded_files = {os.path.normpath(os.path.abspath(p)) for p in exclude_images}
    excluded = [i for i, im in coco.images.items() if os.path.normpath(images_root / im.file_name) in excluded_files]
    index = MimicIndex.build(coco, config.filter, exclude=excluded)
    copies = copies_of(index, images_root, exclude_pictures) if exclude_pictures else []
    if copies:
        index = MimicIndex.build(coco, config.filter, exclude=[*excluded, *copies])
    with make_progress() as progress:
        samples, stats = generate(index, config, progress)
    missing = sorted({name for s in samples for name in s.images if not (images_root / name).is_file()})
    if missing:
        raise InputError(
            f"{len(missing)} image file(s) used by the benchmark are missing under {images_root}, "
            f"e.g. {', '.join(missing[:3])}"
        )
    check_images(sorted({images_root / name for s in samples for name in s.images}))
    meta = {
        "format": "stitchkit-mimic/1",
        "stitchkit_version": stitchkit.__version__,
        "images_root": str(images_root),
        "annotations": str(Path(annotations).resolve()),
        "class_names": index.class_names,
        "supercategories": {g: [index.class_names[c] for c in cs] for g, cs in index.groups.items()},
        "filter": config.filter.model_dump(),
        "config": config.model_dump(mode="json"),
        "n_samples": {t: sum(s.task == t for s in samples) for t in TASKS},
        "excluded_images": len(excluded),
        **({"excluded_copies": len(copies)} if exclude_pictures else {}),
        **stats,
    }
    write_samples(run.path(SAMPLES_FILE), samples)
    atomic_write_json(run.path(META_FILE), meta)
    atomic_write_text(run.path("summary.md"), summary_markdown(samples, meta))
    run.finish("build", samples=len(samples))
    return run.root


def copies_of(index: MimicIndex, images_root: Path, pictures: Collection[str]) -> list[int]:
    """COCO ids of the images a query could use (eligible, and present under images_root) whose decoded pixels
    are one of `pictures`. Every candidate is decoded once, which takes minutes for COCO train2017; it runs only
    when pictures are given."""
    from stitchkit.multiimage.official import picture_digests

    candidates = [(image_id, images_root / name) for image_id, name, eligible
                  in zip(index.image_ids, index.file_names, index.image_eligible) if eligible]
    candidates = [(image_id, path) for image_id, path in candidates if path.is_file()]
    digests = picture_digests([path for _, path in candidates])
    pictures = frozenset(pictures)
    return [image_id for (image_id, _), digest in zip(candidates, digests) if digest in pictures]


def summary_markdown(samples: list[Sample], meta: dict) -> str:
    from stitchkit.report import markdown_table

    lines = ["# MIMIC benchmark\n", f"{len(samples)} samples from `{meta['annotations']}`, "
             f"filter {meta['filter']['mode']} (min box area {meta['filter']['min_box_area_frac']}), "
             f"seed {meta['config']['seed']}.\n"]
    rows = [{"task": t, "samples": n, "cells": len(meta["tasks"].get(t, {}).get("cells", {})),
             "rejection rate": meta["tasks"].get(t, {}).get("rejection_rate")}
            for t, n in meta["n_samples"].items() if n]
    lines.append(markdown_table(rows))
    for variable in ("n_images", "spread", "n_distractors", "k"):
        counts = Counter((s.task, getattr(s, variable)) for s in samples)
        values = sorted({v for _, v in counts})
        table = [{"task": t, **{str(v): counts.get((t, v), 0) for v in values}}
                 for t in TASKS if any(s.task == t for s in samples)]
        lines.append(f"\n## samples by {variable}\n\n" + markdown_table(table))
    if meta["skipped_cells"]:
        lines.append(f"\n{len(meta['skipped_cells'])} grid cells were skipped (see benchmark.json, skipped_cells).\n")
    return "\n".join(lines)

