"""Task data for the stitching protocol: in-memory uint8 images with class labels or semantic masks.

Four sources, one shape (`TaskData`: train / val / test splits of (N, S, S, 3) uint8 images at one size):
    shapes   the procedural shapes world (classification: one object, labelled by category/colour;
             segmentation: several objects, semantic maps)
    folder   an image folder with one sub-folder per class (classification only)
    coco     a COCO-format annotation file (segmentation: semantic maps from polygons or RLE, read by pycocotools;
             classification: the category of each image's largest annotation)
    masks    an image folder with a folder of label maps beside it (segmentation only; mmsegmentation's
             layout, as ADE20K, Cityscapes and Pascal VOC ship)
Folder, COCO and mask-folder images become squares of `image_size` (`crop`: the centre square, spec §7, or the whole
image squashed), label maps by the same crop, so every model sees the same field of view; each backbone then resizes
to its own resolution. Their splits are a seeded shuffle. TLT's training augmentation (spec §7) is in augment.py.

FFM can train on other images than the task's (`ffm_data`, spec §7 "FFM data", §1.5): the same three sources
read without labels and taken whole as one more split, 'ffm' (`ImageSetConfig`, `load_image_set`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydantic
from PIL import Image

from stitchkit.config import Config
from stitchkit.errors import InputError
from stitchkit.stitching.objectives import IGNORE_INDEX

Task = Literal["classification", "segmentation"]
SPLITS = ("train", "val", "test")
FFM_SPLIT = "ffm"  # the split of ffm_data's images (TaskData.ffm_split)
# Semantic maps in int16, not int64: 20k ADE20K maps at 512 px are 10 GB instead of 42 (the loss casts to long).
MAP_DTYPE = np.int16


class ImageSourceConfig(Config):
    """Where images come from: what `data` (the task) and `ffm_data` (FFM's own images) share."""

    source: Literal["shapes", "folder", "coco"] = "shapes"
    path: str | None = pydantic.Field(None, description="image folder root, or COCO annotation JSON (images beside it)")
    image_root: str | None = pydantic.Field(None, description="COCO image folder; default: the JSON's folder")
    image_size: int = pydantic.Field(64, ge=8, description="every image is resized to this square size first")
    crop: Literal["center", "squash"] = pydantic.Field(
        "center", description="how a non-square image becomes square: its centre square (spec §7: resize + centre "
        "crop), or the whole image squashed (nothing cut, aspect ratio changed)")  # fmt: skip
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _needs_path(self):
        if self.source != "shapes" and not self.path:
            raise ValueError(f"path is required for source {self.source!r}")
        return self

    @property
    def coco_image_root(self) -> Path:
        """Where a COCO file's image file names point: image_root, or the annotation file's folder."""
        return Path(self.image_root) if self.image_root else Path(self.path).parent


class MaskFolderConfig(Config):
    """Label maps for `source: masks`: one single-channel image per labelled image (a class index per pixel, as
    mmsegmentation reads them), at the image's relative path with `image_suffix` replaced by `mask_suffix`. The
    label maps drive the pairing, so images without one (most of Pascal VOC's JPEGImages) are not used."""

    path: str = pydantic.Field(description="the label-map folder, e.g. ADEChallengeData2016/annotations/training")
    image_suffix: str | None = pydantic.Field(
        None, description="the end of an image's name that mask_suffix replaces (Cityscapes: _leftImg8bit.png); "
        "None: the image is the label map's name with any image extension")  # fmt: skip
    mask_suffix: str = ".png"
    class_names: list[str] | str | None = pydantic.Field(
        None, description="names in label order (after reduce_zero_label), or a file of them: a JSON list or "
        "one name per line; None: 'class 0', 'class 1', ... up to the largest label found")  # fmt: skip
    reduce_zero_label: bool = pydantic.Field(
        False, description="label 0 means unlabelled and is ignored, and labels 1.. become 0.. (ADE20K)")
    ignore_label: int | None = pydantic.Field(255, description="pixels with this label carry none (VOC and Cityscapes: 255)")


class TestSplitConfig(Config):
    """The test split from other files of the data's own kind (e.g. a dataset's official validation set); the
    task's `path` then gives train and val only."""

    path: str = pydantic.Field(description="folder: a class-folder root; coco: an annotation file; masks: an image folder")
    image_root: str | None = pydantic.Field(None, description="coco: its image folder; default: the file's folder")
    masks: str | None = pydantic.Field(None, description="masks: the label-map folder of these images (required)")


class DataConfig(ImageSourceConfig):
    """The task's labelled images, in train / val / test splits."""

    source: Literal["shapes", "folder", "coco", "masks"] = "shapes"
    train: int = pydantic.Field(1024, ge=0, description="shapes: images per split; folder/coco/masks: cap (0 = all)")
    val: int = pydantic.Field(256, ge=0)
    test: int = pydantic.Field(512, ge=0)
    target: Literal["category", "colour", "both"] = "category"  # shapes classification label
    max_objects: int = pydantic.Field(3, ge=1)  # shapes segmentation
    val_fraction: float = pydantic.Field(0.1, gt=0, lt=1)  # folder / coco / masks splits
    test_fraction: float = pydantic.Field(0.2, gt=0, lt=1)
    masks: MaskFolderConfig | None = None  # source masks: where the label maps are and how to read them
    test_split: TestSplitConfig | None = None  # None: test is split from path like val (test_fraction)

    @pydantic.model_validator(mode="after")
    def _masks_with_their_source(self):
        if self.source == "shapes" and 0 in (self.train, self.val, self.test):
            raise ValueError("train, val, test: the shapes world draws that many images (0 = all is for file sources)")
        if self.source == "masks" and self.masks is None:
            raise ValueError("source 'masks' needs masks.path, the folder of label maps")
        if self.source != "masks" and self.masks is not None:
            raise ValueError(f"masks is read only with source 'masks', not {self.source!r}")
        if self.test_split is not None:
            if self.source == "shapes":
                raise ValueError("test_split: the shapes world draws its own test split (set test)")
            if (self.source == "masks") != (self.test_split.masks is not None):
                raise ValueError("test_split.masks: the label-map folder of the test images, with source 'masks' only")
            if self.source != "coco" and self.test_split.image_root is not None:
                raise ValueError("test_split.image_root is read with source 'coco' only")
        elif self.source != "shapes" and self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction: {self.val_fraction:g} + {self.test_fraction:g} leaves no images to "
                "train on; their sum must be below 1"
            )
        return self

    def for_test_split(self) -> "DataConfig":
        """This config reading test_split's files instead of path's."""
        split = self.test_split
        masks = self.masks.model_copy(update={"path": split.masks}) if self.masks else None
        return self.model_copy(update={"path": split.path, "image_root": split.image_root, "masks": masks, "test_split": None})


class ImageSetConfig(ImageSourceConfig):
    """Images without labels, taken whole as one set: FFM's generic images (`ffm_data`).

    shapes   `images` scenes of 1-4 objects, a draw no task split (of any seed) shares
    folder   every image file anywhere under `path` (an ImageNet class tree, LLaVA-1.5's image folders, a flat
             folder): sub-folders are not read as classes
    coco     every image the annotation file lists, annotated or not
    """

    images: int = pydantic.Field(
        1024, ge=1, description="shapes: how many to draw; folder / coco: at most this many (a seeded random choice)"
    )
    image_size: int | None = pydantic.Field(None, ge=8, description="resize to this square size; default: data's")


@dataclass
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8
    # (N,) int64 class index, or (N, S, S) semantic map in MAP_DTYPE (IGNORE_INDEX where unlabelled); None: FFM's
    # own images
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class TaskData:
    task: Task
    class_names: list[str]
    splits: dict[str, Split]  # train / val / test, and 'ffm' when ffm_data gives FFM its own images
    description: str
    ffm_description: str = "the task's train split"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def context(self) -> dict:
        """What a reader needs to judge a score, for results.json and the report: the number of classes, the
        chance level of top-1 accuracy (a uniform guess, 100 / classes %) and every split's size."""
        return {
            "classes": self.num_classes,
            "chance": 100.0 / self.num_classes if self.task == "classification" else None,
            "splits": {name: len(split) for name, split in self.splits.items()},
        }

    @property
    def ffm_split(self) -> str:
        """The split FFM trains S on: ffm_data's images if given, else the task's train split (labels unused)."""
        return FFM_SPLIT if FFM_SPLIT in self.splits else "train"

    def ffm_record(self) -> dict:
        """Which images FFM trained on, for results.json."""
        return {"split": self.ffm_split, "images": len(self.splits[self.ffm_split]), "description": self.ffm_description}


def load_task_data(task: Task, cfg: DataConfig, ffm_data: ImageSetConfig | None = None) -> TaskData:
    """The task's train / val / test splits; with `ffm_data`, also its images as the unlabelled split 'ffm'."""
    data = _labelled_splits(task, cfg)
    if ffm_data is not None:
        if ffm_data.image_size is None:  # the task's size, so a forgotten size never shrinks the images silently
            ffm_data = ffm_data.model_copy(update={"image_size": cfg.image_size})
        try:
            images, data.ffm_description = load_image_set(ffm_data)
        except InputError as err:  # the config has two image sources: say which one is wrong
            raise InputError(f"ffm_data: {err}") from None
        data.splits[FFM_SPLIT] = Split(images, None)
    return data


def _labelled_splits(task: Task, cfg: DataConfig) -> TaskData:
    if cfg.source == "shapes":
        return _shapes(task, cfg)
    if cfg.source == "folder" and task != "classification":
        raise InputError("data.source 'folder' has class labels only; use task classification or a COCO file")
    if cfg.source == "masks" and task != "segmentation":
        raise InputError("data.source 'masks' holds label maps; use task segmentation")
    loader = {"folder": _folder, "coco": _coco, "masks": _mask_folder}[cfg.source]

    def load(task: Task, cfg: DataConfig, which: tuple[str, ...]) -> TaskData:
        # The shared loaders name only the missing file; the config's field is what the user edits.
        if cfg.source != "masks" and not Path(cfg.path).exists():
            what = "annotation file" if cfg.source == "coco" else "image folder"
            raise InputError(f"data.path: {what} not found: {cfg.path}")
        return loader(task, cfg, which)

    if cfg.test_split is None:
        return load(task, cfg, SPLITS)
    try:
        test = load(task, cfg.for_test_split(), ("test",))
    except InputError as err:  # two places hold images: say which one is wrong
        raise InputError(_in_test_split(str(err))) from None
    return _with_test(load(task, cfg, ("train", "val")), test)


# The fields of `data` that for_test_split fills from test_split's, as loader messages name them.
_TEST_SPLIT_FIELDS = {"data.masks.path": "data.test_split.masks", "data.masks": "data.test_split.masks", "data.path": "data.test_split.path"}


def _in_test_split(message: str) -> str:
    """A loader's message about the test split's files, naming test_split's fields (it read them as data's)."""
    for field, own in _TEST_SPLIT_FIELDS.items():
        if message.startswith(f"{field}:"):
            return own + message[len(field) :]
    return f"data.test_split: {message}"


def _with_test(data: TaskData, test: TaskData) -> TaskData:
    """`data` (train and val) with the test split of `test`, which must have the same classes."""
    names = data.class_names
    if test.class_names != names:
        # Label maps without class names are numbered up to the largest label found, which may differ by split.
        numbered = [f"class {k}" for k in range(max(len(names), len(test.class_names)))]
        if names != numbered[: len(names)] or test.class_names != numbered[: len(test.class_names)]:
            raise InputError(f"data.test_split: its classes ({', '.join(test.class_names[:8])}, ...) differ from "
                             f"the task's ({', '.join(names[:8])}, ...)")  # fmt: skip
        names = numbered
    return TaskData(data.task, names, {**data.splits, "test": test.splits["test"]}, f"{data.description}; test: {test.description}")


# What a shapes-world class is, by `data.target`, in descriptions.
_LABELLED_BY = {"category": "category", "colour": "colour", "both": "colour × category"}


def _shapes(task: Task, cfg: DataConfig) -> TaskData:
    from stitchkit.world.sets import classification_set, segmentation_set

    splits, names = {}, []
    # A different seed per split makes the splits disjoint draws of the same world.
    for offset, split in enumerate(SPLITS):
        n, seed = getattr(cfg, split), cfg.seed * 1000 + offset
        if task == "classification":
            data = classification_set(n, cfg.image_size, seed, target=cfg.target)
            splits[split] = Split(data.images, data.labels.astype(np.int64))
        else:
            data = segmentation_set(n, cfg.image_size, seed, max_objects=cfg.max_objects)
            splits[split] = Split(data.images, data.masks.astype(MAP_DTYPE))
        names = data.class_names
    what = f"one object per image, labelled by {_LABELLED_BY[cfg.target]}" if task == "classification" else f"segmentation, <= {cfg.max_objects} objects"
    return TaskData(task, list(names), splits, f"shapes world ({what}), {cfg.image_size} px")


def _split_indices(n: int, cfg: DataConfig, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Which of n images go to each of `splits`: a seeded shuffle cut by test_fraction and val_fraction (a
    split not asked for gets none), train taking the rest; each then capped at its size in cfg."""
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_test = max(1, round(n * cfg.test_fraction)) if "test" in splits else 0
    n_val = max(1, round(n * cfg.val_fraction)) if "val" in splits else 0
    if "train" in splits and n - n_test - n_val < 1:
        raise InputError(f"{cfg.path}: {n} images are too few to split into {' / '.join(splits)}")
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    if "train" not in splits:
        parts = {"test": order}  # a test split of its own: every image
    # The per-split sizes cap how many images are used (handy for a quick run on a large folder); 0: all.
    return {k: np.sort(parts[k][: getattr(cfg, k) or None]) for k in splits}


def _square(image: Image.Image, cfg: ImageSourceConfig, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """`image` as a square of cfg.image_size by cfg.crop. A label map passes here too, with NEAREST, so it keeps
    lining up with its image."""
    width, height = image.size
    if cfg.crop == "center" and width != height:
        side = min(width, height)
        # Whole-pixel offsets, so an image and its label map are cut at exactly the same pixels.
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((cfg.image_size, cfg.image_size), resample))


def _square_description(cfg: ImageSourceConfig) -> str:
    """How _square made the images square, for descriptions (reports name what the models saw)."""
    return f"centre squares at {cfg.image_size} px" if cfg.crop == "center" else f"squashed to {cfg.image_size} px"


def _folder(task: Task, cfg: DataConfig, which: tuple[str, ...]) -> TaskData:
    from stitchkit.data import load_image, scan_image_folder

    folder = scan_image_folder(cfg.path)
    splits = {}
    for split, idx in _split_indices(len(folder), cfg, which).items():
        images = np.stack([_square(load_image(folder.samples[i][0]), cfg) for i in idx])
        labels = np.array([folder.samples[i][1] for i in idx], dtype=np.int64)
        splits[split] = Split(images, labels)
    return TaskData("classification", folder.classes, splits, f"image folder {cfg.path}, {_square_description(cfg)}")


def _coco(task: Task, cfg: DataConfig, which: tuple[str, ...]) -> TaskData:
    from stitchkit.data import load_coco, load_image

    index = load_coco(cfg.path)
    image_root = cfg.coco_image_root
    category_ids = sorted(index.categories)
    image_ids = sorted(i for i in index.images if index.by_image.get(i))
    if not image_ids:
        raise InputError(f"{cfg.path}: no image has an annotation")
    if task == "classification":
        # The label of an image is the category of its largest object.
        class_of = {cid: k for k, cid in enumerate(category_ids)}
        class_names = [index.categories[c].name for c in category_ids]
    else:
        class_of = {cid: k + 1 for k, cid in enumerate(category_ids)}  # 0 = background
        class_names = ["background"] + [index.categories[c].name for c in category_ids]
        segmentations = _raw_segmentations(Path(cfg.path))
    splits = {}
    for split, idx in _split_indices(len(image_ids), cfg, which).items():
        images, labels = [], []
        for i in idx:
            info = index.images[image_ids[i]]
            annotations = index.by_image[info.id]
            images.append(_square(load_image(image_root / info.file_name), cfg))
            if task == "classification":
                labels.append(class_of[max(annotations, key=lambda a: a.area).category_id])
            else:
                semantic = np.zeros((info.height, info.width), dtype=np.int32)  # PIL mode I; uint8 would wrap at 256 classes
                # Largest first, so a smaller object in front of a larger one stays visible.
                for ann in sorted(annotations, key=lambda a: -a.area):
                    mask = _annotation_mask(segmentations.get(ann.id), ann.bbox, info.height, info.width, cfg.path)
                    semantic[mask] = class_of[ann.category_id]
                labels.append(_square(Image.fromarray(semantic), cfg, Image.Resampling.NEAREST))
        splits[split] = Split(np.stack(images), np.stack(labels).astype(MAP_DTYPE) if task != "classification" else np.array(labels, dtype=np.int64))
    return TaskData(task, class_names, splits, f"COCO file {cfg.path}, {_square_description(cfg)}")


def _mask_folder(task: Task, cfg: DataConfig, which: tuple[str, ...]) -> TaskData:
    from stitchkit.data import load_image

    pairs = _mask_pairs(cfg)
    splits, largest = {}, -1
    for split, idx in _split_indices(len(pairs), cfg, which).items():
        images = np.stack([_square(load_image(pairs[i][0]), cfg) for i in idx])
        labels = np.stack([_label_map(*pairs[i], cfg) for i in idx])
        largest = max(largest, int(labels.max()))
        splits[split] = Split(images, labels)
    names = _class_names(cfg.masks, largest)
    if largest >= len(names):
        raise InputError(f"data.masks: a label map holds label {largest}, but class_names lists {len(names)} classes")
    description = f"label maps {cfg.masks.path} of images {cfg.path} ({len(pairs)} pairs), {_square_description(cfg)}"
    return TaskData("segmentation", names, splits, description)


def _mask_pairs(cfg: DataConfig) -> list[tuple[Path, Path]]:
    """(image, label map) for every label map under masks.path, each with its image under path."""
    from stitchkit.data.images import IMAGE_EXTENSIONS, visible_files

    images, masks = Path(cfg.path), Path(cfg.masks.path)
    for what, folder in (("path", images), ("masks.path", masks)):
        if not folder.is_dir():
            raise InputError(f"data.{what}: folder not found: {folder}")
    suffix = cfg.masks.mask_suffix
    # An image is the label map's name with image_suffix, or with any image extension (either case: .jpg, .JPG).
    endings = [cfg.masks.image_suffix] if cfg.masks.image_suffix else [e for x in IMAGE_EXTENSIONS for e in (x, x.upper())]
    pairs = []
    for mask in visible_files(masks, f"*{suffix}"):
        relative = mask.relative_to(masks)
        stem = str(images / relative.parent / relative.name[: -len(suffix)])
        image = next((Path(stem + e) for e in endings if Path(stem + e).is_file()), None)
        if image is None:
            wanted = stem + (endings[0] if cfg.masks.image_suffix else ".<image extension>")
            raise InputError(f"data.masks: label map {mask} has no image {wanted}")
        pairs.append((image, mask))
    if not pairs:
        raise InputError(f"data.masks.path: {masks} holds no label maps ending in {suffix!r}")
    return pairs


def _label_map(image_path: Path, mask_path: Path, cfg: DataConfig) -> np.ndarray:
    """The label map cut and resized as its image (nearest neighbour), as class indices with IGNORE_INDEX where unlabelled."""
    try:
        with Image.open(mask_path) as mask, Image.open(image_path) as image:
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise InputError(f"{mask_path}: a label map holds one class index per pixel (mode L, P or I), "
                                 f"not a {mask.mode} image; convert colour-coded masks to class indices first")
            if mask.size != image.size:
                raise InputError(f"{mask_path}: label map is {mask.size[0]}x{mask.size[1]} but its image {image_path} "
                                 f"is {image.size[0]}x{image.size[1]}")
            raw = _square(mask, cfg, Image.Resampling.NEAREST).astype(np.int64)
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read label map {mask_path}: {err}") from None
    unlabelled = raw == cfg.masks.ignore_label if cfg.masks.ignore_label is not None else np.zeros_like(raw, dtype=bool)
    if cfg.masks.reduce_zero_label:  # ADE20K: 0 is "other", not one of the 150 classes
        unlabelled |= raw == 0
        raw = raw - 1
    labelled = raw[~unlabelled]
    if (labelled < 0).any():
        raise InputError(f"{mask_path}: negative labels")
    if labelled.max(initial=0) > np.iinfo(MAP_DTYPE).max:
        raise InputError(f"{mask_path}: labels above {np.iinfo(MAP_DTYPE).max} are not supported")
    return np.where(unlabelled, IGNORE_INDEX, raw).astype(MAP_DTYPE)


def _class_names(cfg: MaskFolderConfig, largest: int) -> list[str]:
    if cfg.class_names is None:
        return [f"class {k}" for k in range(largest + 1)]
    if isinstance(cfg.class_names, list):
        return cfg.class_names
    path = Path(cfg.class_names)
    if not path.is_file():
        raise InputError(f"data.masks.class_names: file not found: {path}")
    if path.suffix == ".json":
        try:
            names = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"data.masks.class_names: {path} is not valid JSON: {err}") from None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise InputError(f"data.masks.class_names: {path} must hold a JSON list of names")
        return names
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_image_set(cfg: ImageSetConfig) -> tuple[np.ndarray, str]:
    """The images of an image set, (N, S, S, 3) uint8, and a description naming them (source, images to draw
    from, seed, size) that the run records."""
    from stitchkit.data import image_files, load_image

    if cfg.source == "shapes":
        from stitchkit.world.sets import segmentation_set

        # Seed offset len(SPLITS): task splits draw at offsets 0..2 of seed * 1000, so no task split repeats this draw.
        images = segmentation_set(cfg.images, cfg.image_size, cfg.seed * 1000 + len(SPLITS)).images
        return images, f"shapes world scenes (1-4 objects, seed {cfg.seed}), {cfg.image_size} px"
    files = image_files(cfg.path) if cfg.source == "folder" else _coco_images(cfg)
    chosen = np.sort(np.random.default_rng(cfg.seed).permutation(len(files))[: cfg.images])
    images = np.stack([_square(load_image(files[i]), cfg) for i in chosen])
    what = "image folder" if cfg.source == "folder" else "COCO file"
    return images, f"{what} {cfg.path} (drawn from its {len(files)} images with seed {cfg.seed}), {_square_description(cfg)}"


def _coco_images(cfg: ImageSetConfig) -> list[Path]:
    """The files of every image a COCO file lists, in image-id order, with or without annotations."""
    from stitchkit.data import load_coco

    index = load_coco(cfg.path)
    if not index.images:
        raise InputError(f"{cfg.path}: lists no images")
    return [cfg.coco_image_root / index.images[i].file_name for i in sorted(index.images)]


def _raw_segmentations(path: Path) -> dict[int, object]:
    # stitchkit.data.load_coco validates the file but does not keep segmentations; read them here.
    data = json.loads(path.read_text())
    return {int(a.get("id", i)): a.get("segmentation") for i, a in enumerate(data["annotations"])}


def _annotation_mask(segmentation, bbox, height: int, width: int, path) -> np.ndarray:
    """An annotation's pixels as COCO's own API reads them (pycocotools, as `COCO.annToMask`): polygons,
    uncompressed or compressed RLE; with no segmentation (or only degenerate polygons), its box."""
    from pycocotools import mask as coco_mask

    polygons = [p for p in segmentation if not isinstance(p, list) or len(p) >= 6] if isinstance(segmentation, list) else None
    if segmentation is None or polygons == []:
        x, y, w, h = bbox
        mask = np.zeros((height, width), dtype=bool)
        mask[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
        return mask
    if polygons:  # flat [x0, y0, x1, y1, ...] lists, parts of one object
        try:
            rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
        except (TypeError, ValueError) as err:
            raise InputError(f"{path}: cannot decode a segmentation: polygons are lists of x, y numbers ({err})") from None
    else:
        size = segmentation.get("size") if isinstance(segmentation, dict) else None
        if size is None or list(size) != [height, width]:
            raise InputError(f"{path}: a segmentation is neither polygons nor an RLE of its image's size "
                             f"[{height}, {width}] (got size {size})")  # fmt: skip
        counts = _rle_counts(segmentation.get("counts"))
        # pycocotools does not check run lengths: too few leave pixels of whatever memory held, too many are cut.
        if counts is None or sum(counts) != height * width or min(counts, default=0) < 0:
            total = "unreadable" if counts is None else f"{sum(counts)} pixels"
            raise InputError(f"{path}: cannot decode a segmentation: its RLE runs cover {total}, not {height} x {width}")
        compressed = isinstance(segmentation["counts"], str)
        rle = segmentation if compressed else coco_mask.frPyObjects(segmentation, height, width)
    return coco_mask.decode(rle).astype(bool)


def _rle_counts(counts) -> list[int] | None:
    """The run lengths of an RLE's counts: a list as it is, a compressed string decoded as pycocotools' rleFrString
    (6-bit groups offset by 48, 5 value bits, sign-extended; runs after the second stored as differences to the
    run two before). None when it is neither."""
    if isinstance(counts, list):
        return counts if all(isinstance(c, int) for c in counts) else None
    if not isinstance(counts, str):
        return None
    runs, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                return None  # the string ends inside a number
            chunk = ord(counts[position]) - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position, shift = position + 1, shift + 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs
