"""Patch datasets: cut every image into f x f patches, pair each patch with its image's ID, save an HF dataset.

Cutting follows the official code exactly (visual_stitching.md §1.3): pw = floor(W / f), ph = floor(H / f);
patch (i, j) covers x in [j pw, (j+1) pw), y in [i ph, (i+1) ph), row-major; the right and bottom remainders
(W - f pw < f and H - f ph < f pixels) are dropped; no overlap, padding or resizing. f = 1 keeps the source
file's bytes, as the official runs train on the original files.

A built dataset folder:

    patches/<f>x<f>/<key>-<row>_<col>.png   every patch (but those patch dropout left out), official naming (0-based)
    manifest.jsonl                          one line per patch: key, f, row, col, box, file, sha256
    hf/                                     DatasetDict (datasets.load_from_disk): "f1", "f2", ... one row per
                                            (patch, id) with its grid position; "images": the full images
    dataset.json                            IDs, names, source files (relative to the folder) and their sha256,
                                            templates, splits, counts (written last)

Building into a folder that holds a dataset is safe to repeat: the same settings and source images (by sha256)
leave it as it is, changed source images or an incomplete folder are rebuilt, and other settings are refused
unless `force` (as `patches run` refuses a different config in an existing run folder).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from stitchkit.data import IMAGE_EXTENSIONS, load_image
from stitchkit.errors import InputError
from stitchkit.patches.ids import check_first_tokens, check_id_format, generate_ids
from stitchkit.runs import atomic_replace_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, file_sha256, prepare_output

PatchFormat = Literal["png", "jpeg"]
DATASET_JSON = "dataset.json"
KEY_PATTERN = re.compile(r"[^A-Za-z0-9_]+")
DEFAULT_SPLITS = (1, 2, 4, 8)
# The tests rank every image's ID among all the set's IDs: with one image there is nothing to rank against.
MIN_IMAGES = 2
# What a complete build has besides dataset.json (written last); a folder without them is rebuilt.
BUILT_PARTS = ("hf/dataset_dict.json", "manifest.jsonl")
# An image entry's source file and its sha256 are not settings: the path may be written another way (older folders
# hold it relative to the working directory, or absolute), and the contents are compared by hash.
SOURCE_FIELDS = ("file", "sha256")


LOCATION_FIELDS = ("row", "col")


@dataclass(frozen=True)
class Templates:
    """Prompt texts (visual_stitching.md §2). train: the prompt of a patch; it may hold {row} and {col}, filled
    per patch with its 0-based grid position, the numbering of the patch file names (the paper's location
    template "(row:{row}, col:{col})", Fig. 10, §5; the paper does not say its base and released no code for it).
    image: the prompt of a full image in the image-based test, by default the training prompt, which then must
    not hold {row} or {col} (a full image has no grid position). reference: the text-only prompt of the
    reference-based test, with {name}. response: the target continuation, with {id}, its leading space included."""

    train: str = "The shape shown is associated with ID"
    reference: str = "The {name} is associated with ID"
    response: str = " {id}"
    image: str | None = None

    def check(self) -> None:
        problem = (
            template_problem(self.response, "the response template", allowed=("id",), required=("id",))
            or template_problem(self.reference, "the reference template", allowed=("name",), required=("name",))
            or template_problem(self.train, "the training prompt", allowed=LOCATION_FIELDS)
        )
        if self.image is not None:
            problem = problem or template_problem(self.image, "the image prompt", allowed=())
        elif not problem and template_fields(self.train):
            problem = (f"the training prompt has {{row}}/{{col}}, which a full image does not have: give the prompt of "
                       f"the image-based test (image_prompt in a config, --image-prompt to `patches build`): {self.train!r}")  # fmt: skip
        if problem:
            raise InputError(problem)

    def patch_prompt(self, row: int, col: int) -> str:
        return self.train.format(row=row, col=col)

    @property
    def image_prompt(self) -> str:
        return (self.train if self.image is None else self.image).format()


def template_fields(text: str) -> set[str]:
    """The {fields} of a str.format template ({{ and }} are literal braces); ValueError if malformed."""
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def template_problem(text: str, what: str, allowed: Sequence[str], required: Sequence[str] = ()) -> str | None:
    """Why `text` is not a template with only the `allowed` fields and all the `required` ones; None if it is."""
    try:
        fields = template_fields(text)
    except ValueError as err:
        return f"{what} is not a valid template ({err}; write a literal brace as {{{{ or }}}}): {text!r}"
    missing = [f"{{{f}}}" for f in required if f not in fields]
    if missing:
        return f"{what} must contain {', '.join(missing)}: {text!r}"
    unknown = sorted(fields - set(allowed))
    if unknown:
        may = ", ".join(f"{{{f}}}" for f in allowed) or "none"
        return f"{what} has the unsupported field(s) {', '.join(f'{{{f}}}' for f in unknown)} (allowed: {may}): {text!r}"
    return None


@dataclass(frozen=True)
class SourceImage:
    key: str  # file-safe identifier (the file stem), used in patch file names
    file: Path
    name: str  # what the reference-based prompt calls the image ("red star", "apple pie")
    id: str | None = None  # a user-given ID; generated when None


@dataclass(frozen=True)
class Patch:
    row: int
    col: int
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive
    image: Image.Image


def too_fine(width: int, height: int, splits: Sequence[int]) -> list[int]:
    """The split factors whose f x f patches of a width x height image would be 0 px wide or tall."""
    return [f for f in splits if width // f == 0 or height // f == 0]


def cut_patches(image: Image.Image, f: int) -> list[Patch]:
    """The f x f grid of `image`, row-major, floor division as the official `src/utils.py`."""
    if f < 1:
        raise InputError(f"the split factor must be at least 1, got {f}")
    width, height = image.size
    if too_fine(width, height, [f]):
        raise InputError(f"a {width}x{height} image cannot be cut into {f}x{f} patches")
    pw, ph = width // f, height // f
    patches = []
    for row in range(f):
        for col in range(f):
            box = (col * pw, row * ph, (col + 1) * pw, (row + 1) * ph)
            patches.append(Patch(row, col, box, image.crop(box)))
    return patches


def patch_keeps(count: int, p: float, seed: int, f: int) -> list[bool]:
    """§1.3 patch dropout (the official, unused `patch_dropout_ratio`): each of the `count` patches of split
    factor f, in build order (image by image, row-major), is dropped i.i.d. with probability p. The generator
    is seeded by (seed, f), so a split's draw does not depend on which other splits are built."""
    if not 0 <= p < 1:
        raise InputError(f"the patch dropout ratio must be in [0, 1), got {p}")
    if p == 0:
        return [True] * count
    return (np.random.default_rng([seed, f]).random(count) >= p).tolist()


def encode_image(image: Image.Image, fmt: PatchFormat) -> bytes:
    """PNG (lossless) or JPEG at PIL's default quality 75, as the official patch files are saved."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG" if fmt == "png" else "JPEG")
    return buffer.getvalue()


# ---- the names file -------------------------------------------------------------------------------------


def _key(file: str) -> str:
    return KEY_PATTERN.sub("_", Path(file).stem).strip("_") or "image"


def read_names(names_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[SourceImage]:
    """Source images from a names file: CSV with a header `file,name[,id]`, or JSON, either
    {"file": "name", ...} or [{"file": ..., "name": ..., "id": ...}, ...]. Files are relative to images_dir."""
    names_file, images_dir = Path(names_file), Path(images_dir)
    if not names_file.is_file():
        raise InputError(f"names file not found: {names_file}")
    if not images_dir.is_dir():
        raise InputError(f"image folder not found: {images_dir}")
    rows = _read_rows(names_file)
    if len(rows) < MIN_IMAGES:
        raise InputError(f"{names_file} names {len(rows)} image(s); a set needs at least {MIN_IMAGES}, since each image's "
                         "ID is ranked among the IDs of all the set's images")  # fmt: skip
    items, keys = [], {}
    for i, row in enumerate(rows):
        where = f"{names_file}, entry {i + 1}"
        file, name = str(row.get("file") or "").strip(), str(row.get("name") or "").strip()
        if not file or not name:
            raise InputError(f"{where}: every entry needs a file and a name")
        path = images_dir / file
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise InputError(f"{where}: {file} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        if not path.is_file():
            raise InputError(f"{where}: image not found: {path}")
        key = _key(file)
        if key in keys:
            raise InputError(f"{where}: {file} and {keys[key]} give the same patch file name {key!r}")
        keys[key] = file
        items.append(SourceImage(key, path, name, (str(row.get("id") or "").strip() or None)))
    given = [item.id for item in items if item.id]
    if given and len(given) != len(items):
        raise InputError(f"{names_file}: give an id for every image or for none")
    names = [item.name for item in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{names_file}: names must be distinct (the reference-based test tells images apart by name); "
                         f"repeated: {', '.join(map(repr, repeated))}")  # fmt: skip
    return items


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read names file {path}: {err}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} is not valid JSON: {err}") from None
        if isinstance(data, dict):
            return [{"file": k, "name": v} for k, v in data.items()]
        if isinstance(data, list) and all(isinstance(r, dict) for r in data):
            return data
        raise InputError(f"{path}: expected {{file: name}} or a list of {{file, name[, id]}} objects")
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"file", "name"} <= set(reader.fieldnames):
        raise InputError(f"{path}: a CSV names file needs a header with the columns file,name (and optionally id)")
    return list(reader)


# ---- building -------------------------------------------------------------------------------------------


def check_splits(splits: Sequence[int]) -> list[int]:
    splits = list(splits)
    if not splits or any(int(f) < 1 for f in splits) or len(set(splits)) != len(splits):
        raise InputError(f"split factors must be distinct positive integers, got {splits}")
    return sorted(int(f) for f in splits)


def assign_ids(items: Sequence[SourceImage], seed: int, tokenizer=None, response: str = " {id}") -> list[str]:
    """The user's IDs (checked) or generated ones; first tokens distinct under `tokenizer` when given."""
    given = [item.id for item in items]
    if all(given):
        check_id_format(given)
        if tokenizer is not None:
            check_first_tokens(tokenizer, [response.format(id=i) for i in given])
        return list(given)
    return generate_ids(len(items), seed, tokenizer, response)


def _features():
    from datasets import Features, Image as ImageFeature, List, Value

    int32, string = Value("int32"), Value("string")
    common = {"image": ImageFeature(), "id": string, "name": string, "key": string, "file": string}
    patch = Features({**common, "split_factor": int32, "row": int32, "col": int32, "box": List(int32),
                      "prompt": string, "response": string})  # fmt: skip
    full = Features({**common, "width": int32, "height": int32, "prompt": string, "reference_prompt": string,
                     "response": string})  # fmt: skip
    return patch, full


def build_patch_dataset(
    items: Sequence[SourceImage],
    out: str | os.PathLike,
    splits: Sequence[int] = DEFAULT_SPLITS,
    templates: Templates = Templates(),
    *,
    id_seed: int = 0,
    tokenizer=None,
    fmt: PatchFormat = "png",
    patch_dropout: float = 0.0,
    dropout_seed: int = 0,
    force: bool = False,
    report: Callable[[str], Any] = lambda message: None,
) -> dict[str, Any]:
    """Cut every image at every split factor and write the dataset folder (see the module docstring); with
    `patch_dropout` p, each patch is left out with probability p (`patch_keeps`; its cell is then missing from
    patches/, the manifest and the split). Returns the contents of dataset.json.

    A folder that already holds a complete build with these settings and source images (by sha256) is returned
    as it is; one built from other source images, or left incomplete, is rebuilt; one built with other settings
    is refused unless `force`. `report` gets one line saying what was done."""
    from datasets import Dataset, DatasetDict
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    templates.check()
    splits = check_splits(splits)
    keeps = {f: patch_keeps(len(items) * f * f, patch_dropout, dropout_seed, f) for f in splits}
    emptied = [f for f in splits if not any(keeps[f])]
    if emptied:
        raise InputError(f"patch dropout {patch_dropout} leaves no patch at split factor(s) {emptied}: lower it or use more images")
    ids = assign_ids(items, id_seed, tokenizer, templates.response)
    meta = {
        "images": [image_entry(item, id_, out) for item, id_ in zip(items, ids)],
        "splits": splits,
        # "image" only when given, so that folders built before it existed still match
        "templates": {"train": templates.train, "reference": templates.reference, "response": templates.response,
                      **({"image": templates.image} if templates.image is not None else {})},
        "id_seed": id_seed,
        "format": fmt,
        "first_tokens_checked_with": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
        # only when used, as "image" above
        **({"patch_dropout": {"p": patch_dropout, "seed": dropout_seed}} if patch_dropout else {}),
    }
    out = prepare_output(out)
    existing = _read_dataset_json(out)
    if existing is not None and _up_to_date(out, existing, meta, force, report):
        return existing

    # An earlier build: dataset.json goes first (it is written last), so a build that fails half-way never leaves
    # a folder that passes for complete.
    (out / DATASET_JSON).unlink(missing_ok=True)
    shutil.rmtree(out / "patches", ignore_errors=True)
    patch_features, full_features = _features()
    rows: dict[str, list[dict[str, Any]]] = {f"f{f}": [] for f in splits}
    full_rows, manifest = [], []
    ext = "png" if fmt == "png" else "jpg"
    drawn = {f: iter(keep) for f, keep in keeps.items()}  # one draw per patch, in build order
    for item, id_ in zip(items, ids):
        image = load_image(item.file)
        source_bytes = item.file.read_bytes()
        response = templates.response.format(id=id_)
        full_rows.append({
            "image": {"bytes": source_bytes, "path": item.file.name}, "id": id_, "name": item.name, "key": item.key,
            "file": item.file.name, "width": image.width, "height": image.height, "prompt": templates.image_prompt,
            "reference_prompt": templates.reference.format(name=item.name), "response": response,
        })  # fmt: skip
        for f in splits:
            for patch in cut_patches(image, f):
                if not next(drawn[f]):
                    continue
                # f = 1 trains on the original file, as the official runs do
                data = source_bytes if f == 1 else encode_image(patch.image, fmt)
                suffix = item.file.suffix.lstrip(".") if f == 1 else ext
                rel = f"patches/{f}x{f}/{item.key}-{patch.row}_{patch.col}.{suffix}"
                atomic_write_bytes(out / rel, data)
                manifest.append({"key": item.key, "f": f, "row": patch.row, "col": patch.col, "box": list(patch.box),
                                 "file": rel, "source": item.file.name, "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
                rows[f"f{f}"].append({
                    "image": {"bytes": data, "path": Path(rel).name}, "id": id_, "name": item.name, "key": item.key,
                    "file": item.file.name, "split_factor": f, "row": patch.row, "col": patch.col,
                    "box": list(patch.box), "prompt": templates.patch_prompt(patch.row, patch.col), "response": response,
                })  # fmt: skip
    atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(m) + "\n" for m in manifest))
    datasets = {name: Dataset.from_list(r, features=patch_features) for name, r in rows.items()}
    datasets["images"] = Dataset.from_list(full_rows, features=full_features)
    atomic_replace_dir(out / "hf", lambda tmp: DatasetDict(datasets).save_to_disk(str(tmp)))
    meta["counts"] = {name: len(d) for name, d in datasets.items()}
    atomic_write_json(out / DATASET_JSON, meta)
    report(f"wrote {out / 'hf'} ({', '.join(f'{k}: {v}' for k, v in meta['counts'].items())}); IDs in {out / DATASET_JSON}")
    return meta


def image_entry(item: SourceImage, id_: str, out: str | os.PathLike) -> dict[str, Any]:
    """dataset.json's record of one image. Its source file is written relative to the dataset folder `out`, so that
    two builds of the same data read the same wherever they ran from, and its sha256 tells a later build whether
    the image changed."""
    try:
        sha256 = file_sha256(item.file)
    except OSError as err:
        raise InputError(f"cannot read image {item.file}: {err.strerror or err}") from None
    file = os.path.relpath(os.path.abspath(item.file), os.path.abspath(out))
    return {"key": item.key, "file": file, "name": item.name, "id": id_, "sha256": sha256}


def _read_dataset_json(folder: Path) -> dict[str, Any] | None:
    """An earlier build's dataset.json, or None if there is none (or it cannot be read: that build is redone)."""
    try:
        existing = json.loads((folder / DATASET_JSON).read_text())
    except (OSError, ValueError):
        return None
    images = existing.get("images") if isinstance(existing, dict) else None
    return existing if isinstance(images, list) and all(isinstance(entry, dict) for entry in images) else None


def _up_to_date(out: Path, existing: dict[str, Any], meta: dict[str, Any], force: bool, report) -> bool:
    """Whether the build in `out` (`existing`, its dataset.json) can stay as it is; if not, says why it is redone.
    Other settings are refused unless `force`: they would replace a dataset, and with it IDs, without a word."""
    differences = settings_differences(existing, meta)
    if differences and not force:
        raise InputError(f"{out} holds a patch dataset built with other settings ({', '.join(differences)} differ); "
                         "replace it with --force, or choose another --out folder")  # fmt: skip
    missing = [part for part in BUILT_PARTS if not (out / part).is_file()]
    changed = changed_sources(existing, meta)
    if differences:
        report(f"replacing {out}, built with other settings ({', '.join(differences)} differ)")
    elif missing:
        report(f"{out} is an incomplete build (no {', '.join(missing)}): building it again")
    elif changed:
        report(f"source image(s) {', '.join(changed)} changed since {out} was built: building it again")
    else:
        report(f"{out}: up to date, nothing written")
        return True
    return False


def _settings(meta: dict[str, Any]) -> dict[str, Any]:
    """What decides a build besides the source images' contents: dataset.json but the counts (a result)."""
    images = [{k: v for k, v in entry.items() if k not in SOURCE_FIELDS} for entry in meta["images"]]
    return {**{k: v for k, v in meta.items() if k != "counts"}, "images": images}


def settings_differences(existing: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """The dataset.json fields in which an earlier build's settings (`existing`) differ from `meta`'s."""
    old, new = _settings(existing), _settings(meta)
    return [key for key in dict.fromkeys([*new, *old]) if old.get(key) != new.get(key)]


def changed_sources(existing: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """The keys of the images whose source file's sha256 differs from the earlier build's (every image of a
    folder built before the hashes were recorded)."""
    built = {entry.get("key"): entry.get("sha256") for entry in existing["images"]}
    return [entry["key"] for entry in meta["images"] if built.get(entry["key"]) != entry["sha256"]]


def load_patch_dataset(folder: str | os.PathLike):
    """(DatasetDict, dataset.json contents) of a built folder."""
    from datasets import load_from_disk

    folder = Path(folder)
    if not (folder / DATASET_JSON).is_file():
        raise InputError(f"{folder} is not a built patch dataset (no {DATASET_JSON}); run `stitchkit patches build`")
    return load_from_disk(str(folder / "hf")), json.loads((folder / DATASET_JSON).read_text())
