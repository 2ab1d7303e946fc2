"""Loading images safely, and image folders with one sub-folder per class."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from stitchkit.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, with any transparency (RGBA, LA, or a palette/RGB image with a transparent colour)
    composited onto white, as Hugging Face's processors do (`convert_to_rgb`). A plain `convert("RGB")` drops
    the alpha channel and shows whatever colour the transparent pixels happen to store, often black."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (so truncation is caught here, not mid-training) and convert it to RGB (`to_rgb`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {err}") from None


def check_images(paths) -> None:
    """Every file must open as an image: a cheap check (headers and checksums, no decoding) for work that
    records image paths now and reads the pixels later, so a corrupt file is named before anything is written."""
    from stitchkit.progress import track

    bad = []
    for path in track(list(paths), "checking images"):
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            bad.append(f"{path} ({err})")
    if bad:
        raise InputError(f"{len(bad)} image file(s) cannot be read, e.g. {bad[0]}")


def visible_files(root: Path, pattern: str = "*") -> list[Path]:
    """The files under `root` matching `pattern`, at any depth, sorted, skipping hidden files and folders (e.g.
    macOS '._x.jpg')."""
    return sorted(
        path
        for path in root.rglob(pattern)
        if not any(part.startswith(".") for part in path.relative_to(root).parts) and path.is_file()
    )


def image_files(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root`, at any depth (no class layout), sorted, skipping hidden files and folders."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    files = [path for path in visible_files(root) if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise InputError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


@dataclass(frozen=True)
class ImageFolder:
    """`root/<class name>/<image>` (torchvision's ImageFolder layout): sorted class names, (path, label) pairs."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]

    def __len__(self) -> int:
        return len(self.samples)


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    samples = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in samples)]
    if empty:
        raise InputError(f"{root}: class folder(s) without images: {', '.join(empty)}")
    return ImageFolder(root, classes, samples)
