"""The MIMIC build config: which tasks, how many samples, which grid of control variables, which filters.

Every task lists its grid as plain lists; the generator takes their product ("cells"), drops the cells that
cannot exist (they are recorded in benchmark.json), and cycles through the rest, so samples spread evenly over
the grid. Defaults follow the reference's proposal (mimic.md sections 2.1-2.2).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from stitchkit.config import Config, yaml_false_as

FilterMode = Literal["image_strict", "targets_only", "off"]
CountingSplit = Literal["balanced", "unbalanced"]

MAX_IMAGES_PER_SAMPLE = 35  # the paper's largest query (1 target + 34 distractors)


class FilterConfig(Config):
    """Minimum box-area filter (paper: "object bounding boxes less than 5% of the image").

    image_strict  drop any image with a box under the threshold (the literal reading; default)
    targets_only  every instance of each queried or answer class must clear the threshold
    off           no area filter
    In every mode, images with an iscrowd region of a class the query touches are never used for that class.
    """

    min_box_area_frac: float = Field(0.05, ge=0.0, lt=1.0)
    mode: Annotated[FilterMode, yaml_false_as("off")] = "image_strict"


class CountingConfig(Config):
    """Counting: k classes, spread s (images holding target instances), D distractors, N = s + D.

    balanced    every queried class has the same total C (`totals`), split over its share of the s images:
                equal parts C/s_j (composition "equal", s_j must divide C) or any parts >= 1 ("any")
    unbalanced  each target image keeps its natural count of the class, 1..max_count
    With k > 1 every target image holds exactly one queried class; the s images are shared out as evenly as
    possible (s >= k).
    """

    n_samples: int = Field(4000, ge=0)
    splits: list[CountingSplit] = ["balanced", "unbalanced"]
    k: list[int] = [1, 2, 3]
    spread: list[int] = [1, 2, 3, 4, 5, 6, 7]
    distractors: list[int] = [0, 1, 2, 4, 8, 16, 34]
    totals: list[int] = [4]
    composition: Literal["equal", "any"] = "equal"
    max_count: int = Field(10, ge=1)


class ListingConfig(Config):
    """Listing: name every class of a supercategory (>= 3 member classes) present in s images, plus D images
    without any member class."""

    n_samples: int = Field(2000, ge=0)
    spread: list[int] = [1, 2, 3, 4, 5, 6]
    distractors: list[int] = [0, 1, 2, 4, 8]
    min_members: int = Field(3, ge=2)


class CommonConfig(Config):
    """Common: N images that all contain class c, and c is the only class present in all of them."""

    n_samples: int = Field(2000, ge=0)
    n_images: list[int] = [2, 3, 4, 5, 6, 8, 10]
    max_classes_per_image: Optional[int] = Field(None, ge=1)


class OddOneConfig(Config):
    """Odd-One: the odd class o is in `odd_images` of the N images (always fewer than N/2), the other images
    show a majority class c, and o is the only class whose image count lies in [1, N/2).

    pure  True: majority images hold only c and odd images only o (and maybe c), as far as the annotations
          go -- every draw is valid. False: any images with <= max_classes_per_image classes, rejected until
          the odd class is unique (few COCO draws pass: every extra class must also reach N/2 images).
    """

    n_samples: int = Field(2000, ge=0)
    n_images: list[int] = [3, 4, 5, 6, 8, 10]
    odd_images: list[int] = [1]
    pure: bool = True
    max_classes_per_image: Optional[int] = Field(3, ge=1)


class MimicConfig(Config):
    seed: int = 0
    filter: FilterConfig = FilterConfig()
    class_balanced: bool = True  # draw a class uniformly, then an image within it (paper); else images uniformly
    min_images_per_class: int = Field(5, ge=1)
    max_image_reuse: int = Field(3, ge=1)  # how many queries (of one task) may use the same image
    max_attempts: int = Field(400, ge=1)  # draws per sample before the generator gives up with an error
    counting: CountingConfig = CountingConfig()
    listing: ListingConfig = ListingConfig()
    common: CommonConfig = CommonConfig()
    oddone: OddOneConfig = OddOneConfig()

    @model_validator(mode="after")
    def _check_grid(self) -> "MimicConfig":
        lists = {
            "counting.k": self.counting.k, "counting.spread": self.counting.spread,
            "counting.totals": self.counting.totals, "listing.spread": self.listing.spread,
            "common.n_images": self.common.n_images, "oddone.n_images": self.oddone.n_images,
            "oddone.odd_images": self.oddone.odd_images,
        }
        for where, values in lists.items():
            if not values or min(values) < 1:
                raise ValueError(f"{where} must be a non-empty list of integers >= 1")
        for where, values in {"counting.distractors": self.counting.distractors,
                              "listing.distractors": self.listing.distractors}.items():
            if not values or min(values) < 0:
                raise ValueError(f"{where} must be a non-empty list of integers >= 0")
        # counting / listing cells with s + D over the limit are skipped (and recorded) by the generator
        for where, values in {"common.n_images": self.common.n_images, "oddone.n_images": self.oddone.n_images,
                              "counting.spread": self.counting.spread, "listing.spread": self.listing.spread}.items():
            if max(values) > MAX_IMAGES_PER_SAMPLE:
                raise ValueError(f"{where}: {max(values)} images per sample; at most {MAX_IMAGES_PER_SAMPLE} allowed")
        if min(self.common.n_images) < 2:
            raise ValueError("common.n_images: a common class needs at least 2 images")
        return self

    def task_config(self, task: str):
        return getattr(self, task)
