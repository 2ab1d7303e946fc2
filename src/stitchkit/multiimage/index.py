"""The lookups the MIMIC generator needs, built once from a COCO-format file.

Two views of every image:
  raw        which classes are present (every annotation: any size, crowd included) -- what answers and
             uniqueness are computed from, so a tiny or crowd object still counts as "present"
  eligible   whether an image may carry a class in a query, under the box-area filter and the crowd rule
             (an image with an iscrowd region of class c is never used for a query that touches c, because
             its count of c is undefined)
Instance counts are the non-crowd annotations of a class. Pools (lists of image positions) are built on
first use and cached, so a 120k-image / 860k-box file is indexed in a few seconds and sampled from in
microseconds.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from stitchkit.data import CocoIndex
from stitchkit.errors import InputError
from stitchkit.multiimage.config import FilterConfig


@dataclass
class MimicIndex:
    file_names: list[str]  # image position -> file name (relative to the image folder)
    image_ids: list[int]  # image position -> COCO image id
    class_names: list[str]  # class position -> name (COCO category order)
    class_ids: list[int]
    class_group: list[str]  # class position -> supercategory
    counts: list[dict[int, int]]  # image -> {class: non-crowd instances}, every present class (crowd-only: 0)
    filter: FilterConfig
    # per (image, class) pair, sorted by image then class
    pair_image: np.ndarray
    pair_class: np.ndarray
    pair_count: np.ndarray
    pair_eligible: np.ndarray  # may carry this class in a query (area filter for targets + no crowd region)
    image_eligible: np.ndarray  # may appear in a query at all (image-level area filter)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, coco: CocoIndex, filter: FilterConfig | None = None, exclude: Collection[int] = ()) -> "MimicIndex":
        """Index `coco`; images whose COCO id is in `exclude` never enter a query (e.g. a training set that must
        not share images with an evaluation benchmark built from the same file)."""
        filter = filter or FilterConfig()
        image_ids = sorted(coco.images)
        position = {image_id: i for i, image_id in enumerate(image_ids)}
        class_ids = sorted(coco.categories)
        class_position = {cid: c for c, cid in enumerate(class_ids)}
        anns = coco.annotations
        n = len(anns)
        img = np.fromiter((position[a.image_id] for a in anns), np.int64, n)
        cls_ = np.fromiter((class_position[a.category_id] for a in anns), np.int64, n)
        box_area = np.fromiter((a.bbox[2] * a.bbox[3] for a in anns), np.float64, n)
        crowd = np.fromiter((a.iscrowd for a in anns), np.int64, n) > 0
        sizes = np.array([(coco.images[i].width * coco.images[i].height) for i in image_ids], np.float64)
        if (sizes <= 0).any():
            bad = image_ids[int(np.flatnonzero(sizes <= 0)[0])]
            raise InputError(f"{coco.path}: image {bad} has a zero width or height; box-area fractions need both")
        frac = box_area / sizes[img] if n else box_area

        image_min_frac = np.full(len(image_ids), np.inf)
        np.minimum.at(image_min_frac, img, frac)
        key = img * len(class_ids) + cls_
        pair_key, inverse = np.unique(key, return_inverse=True)
        pair_image, pair_class = pair_key // len(class_ids), pair_key % len(class_ids)
        pair_count = np.bincount(inverse, weights=~crowd, minlength=len(pair_key)).astype(np.int64)
        pair_crowd = np.bincount(inverse, weights=crowd, minlength=len(pair_key)) > 0
        pair_min_frac = np.full(len(pair_key), np.inf)
        np.minimum.at(pair_min_frac, inverse, frac)

        t = filter.min_box_area_frac
        image_eligible = image_min_frac >= t if filter.mode == "image_strict" else np.ones(len(image_ids), bool)
        if exclude:
            image_eligible &= ~np.isin(np.asarray(image_ids), np.fromiter(exclude, np.int64))
        pair_eligible = ~pair_crowd & image_eligible[pair_image]
        if filter.mode == "targets_only":
            pair_eligible &= pair_min_frac >= t

        counts: list[dict[int, int]] = [{} for _ in image_ids]
        for i, c, k in zip(pair_image.tolist(), pair_class.tolist(), pair_count.tolist()):
            counts[i][c] = k
        return cls(
            file_names=[coco.images[i].file_name for i in image_ids],
            image_ids=image_ids,
            # lowercase, as COCO's are: questions and answers read "buses", "car, truck" whatever the source's
            # capitals (OpenImages: "Bus"); the annotation file keeps the original names
            class_names=[coco.categories[c].name.lower() for c in class_ids],
            class_ids=class_ids,
            class_group=[coco.categories[c].supercategory.lower() for c in class_ids],
            counts=counts,
            filter=filter,
            pair_image=pair_image,
            pair_class=pair_class,
            pair_count=pair_count,
            pair_eligible=pair_eligible,
            image_eligible=image_eligible,
        )

    # -- raw presence -----------------------------------------------------------------------------------------

    @cached_property
    def present(self) -> list[frozenset[int]]:
        """image -> the classes present in it (raw: any size, crowd included)."""
        return [frozenset(c) for c in self.counts]

    @cached_property
    def eligible_classes(self) -> list[frozenset[int]]:
        """image -> the classes it may carry in a query (eligible pairs)."""
        out: list[set[int]] = [set() for _ in self.image_ids]
        for i, c in zip(self.pair_image[self.pair_eligible].tolist(), self.pair_class[self.pair_eligible].tolist()):
            out[i].add(c)
        return [frozenset(s) for s in out]

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @cached_property
    def groups(self) -> dict[str, list[int]]:
        """supercategory -> its member classes."""
        out: dict[str, list[int]] = {}
        for c, group in enumerate(self.class_group):
            out.setdefault(group, []).append(c)
        return out

    # -- pools ------------------------------------------------------------------------------------------------

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def eligible_images(self) -> list[int]:
        """Images that may appear in a query at all (as distractor or majority image)."""
        return self._cached("images", lambda: np.flatnonzero(self.image_eligible).tolist())

    def class_images(self, c: int, max_classes: int | None = None) -> list[int]:
        """Images that may carry class c (eligible pair), optionally only those with <= max_classes classes."""

        def build() -> list[int]:
            images = self.pair_image[(self.pair_class == c) & self.pair_eligible].tolist()
            if max_classes is not None:
                images = [i for i in images if len(self.counts[i]) <= max_classes]
            return images

        return self._cached(("class", c, max_classes), build)

    def count_images(self, c: int, low: int, high: int) -> list[int]:
        """Images that may carry class c with low <= (instances of c) <= high."""

        def build() -> list[int]:
            mask = (self.pair_class == c) & self.pair_eligible & (self.pair_count >= low) & (self.pair_count <= high)
            return self.pair_image[mask].tolist()

        return self._cached(("count", c, low, high), build)

    def group_images(self, group: str, c: int) -> list[int]:
        """Listing targets: images containing class c whose every member class of `group` is eligible."""

        def blocked() -> np.ndarray:  # images holding a member class that is not eligible there
            members = np.isin(self.pair_class, self.groups[group])
            bad = np.zeros(self.n_images, bool)
            bad[self.pair_image[members & ~self.pair_eligible]] = True
            return bad

        def build() -> list[int]:
            bad = self._cached(("group_blocked", group), blocked)
            images = self.pair_image[(self.pair_class == c) & self.pair_eligible]
            return images[~bad[images]].tolist()

        return self._cached(("group", group, c), build)
