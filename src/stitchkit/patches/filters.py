"""Moderation filters: images -> one Verdict (flagged or not) each (visual_stitching.md §6 "Filters").

    MarkerFilter          built in, offline: the proxy "forbidden" concept of the shapes world, i.e. at least
                          k complete white marker glyphs (shapes.py renders them). No harmful content anywhere.
    HFClassifierFilter    any Hugging Face image-classification model: flagged iff the probability of the
                          labels you name as forbidden reaches a threshold (softmax, or sigmoid for
                          multi-label models, as transformers' image-classification pipeline computes them)

Both are plain callables, so a user's own filter (an API client, ShieldGemma) plugs in the same way: from Python,
or from a config as `filter: {kind: python, target: "module:callable", options: {...}}` (`plugin_filter`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from stitchkit.errors import ConfigError, ModelNotFoundError, StitchkitError


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    score: float  # the evidence: complete markers seen, or the probability of the forbidden labels


@runtime_checkable  # so that a plug-in's object can be checked (attributes only: `name` and a __call__)
class ModerationFilter(Protocol):
    name: str

    def __call__(self, images: Sequence[Image.Image]) -> list[Verdict]: ...


@contextlib.contextmanager
def _current_directory_importable() -> Iterator[None]:
    """The current directory on the import path for a moment, as `python -m` has it (the `stitchkit` script
    does not), so that a filter in ./my_filters.py imports as `my_filters`."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def plugin_factory(target: str) -> Callable[..., Any]:
    """The callable that `target` ("package.module:name", the name may be dotted) names; a ConfigError that says
    what is missing if the module cannot be imported, lacks the name, or the name is not callable."""
    module_name, _, attribute = target.partition(":")
    where = f"moderation.filter.target {target!r}"
    with _current_directory_importable():
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"{where}: cannot import module {module_name!r} ({err})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {attribute!r} is a {type(obj).__name__}, not a callable that returns a filter")
    return obj


def checked_plugin_factory(target: str, options: dict[str, Any]) -> Callable[..., Any]:
    """`plugin_factory(target)`, with `options` checked against its signature without calling it (making the
    filter may load a model), so that a run can refuse a typo in the options before its first training."""
    factory = plugin_factory(target)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise ConfigError(f"moderation.filter.options do not fit {target!r}: {err}") from None
    except ValueError:  # no signature to check (some builtins): the call itself will tell
        pass
    return factory


def plugin_filter(target: str, options: dict[str, Any] | None = None) -> ModerationFilter:
    """A user's filter: `target`'s callable called with `options` as keyword arguments, checked to be a
    ModerationFilter (an object with a `name` and __call__(images) -> [Verdict])."""
    options = options or {}
    factory = checked_plugin_factory(target, options)
    try:
        made = factory(**options)
    except StitchkitError:
        raise
    except Exception as err:  # the plug-in's own failure: named, with its traceback under --debug (the cause)
        raise ConfigError(f"moderation.filter.target {target!r} raised {type(err).__name__} when called: {err}") from err
    if not isinstance(made, ModerationFilter):
        raise ConfigError(f"moderation.filter.target {target!r} returned a {type(made).__name__}, not a moderation "
                          "filter: an object with a `name` and a __call__(images) -> [Verdict] (stitchkit.patches.filters)")  # fmt: skip
    return made


def checked_verdicts(filt: ModerationFilter, images: Sequence[Image.Image]) -> list[Verdict]:
    """filt(images) as Verdicts, one per image. A filter may be user code (a plug-in): one that returns something
    other than one (flagged, score) verdict per image, or loses verdicts (which zip would hide), is one error naming
    the filter, and so is a plug-in that raises (its traceback is the error's cause, shown under --debug)."""
    name = getattr(filt, "name", None) or getattr(filt, "__name__", type(filt).__name__)  # a plain function has no `name`
    try:
        results = filt(images)
    except StitchkitError:
        raise
    except Exception as err:
        if isinstance(filt, (MarkerFilter, HFClassifierFilter)):  # the built-in filters' failures are ours: a traceback
            raise
        raise ConfigError(f"filter {name!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(results, (list, tuple)):
        raise ConfigError(f"filter {name!r} returned a {type(results).__name__}, not a list of Verdict(flagged, score)")
    if len(results) != len(images):
        raise ConfigError(f"filter {name!r} gave {len(results)} verdicts for {len(images)} images")
    verdicts = []
    for i, result in enumerate(results):
        try:
            verdicts.append(Verdict(bool(result.flagged), float(result.score)))
        except (AttributeError, TypeError, ValueError):
            raise ConfigError(f"filter {name!r} returned {result!r} ({type(result).__name__}) for image {i + 1} of "
                              f"{len(images)}, not a Verdict(flagged, score) (stitchkit.patches.filters)") from None  # fmt: skip
    return verdicts


def complete_components(mask: np.ndarray, min_area: int) -> int:
    """Number of 4-connected components of `mask` with >= min_area pixels that do not touch the border
    (a glyph cut by a patch edge is not a complete glyph)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, area, touches = deque([(y0, x0)]), 0, False
        while queue:
            y, x = queue.popleft()
            area += 1
            touches |= y == 0 or x == 0 or y == height - 1 or x == width - 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        count += area >= min_area and not touches
    return count


class MarkerFilter:
    """Flags an image that shows at least `min_markers` complete marker glyphs: regions of the marker colour
    (within `tolerance` per channel, so JPEG patches work) of at least `min_area` pixels, not cut by the edge."""

    name = "markers"

    def __init__(self, min_markers: int = 3, min_area: int = 12, tolerance: int = 40, colour=(255, 255, 255)):
        if min_markers < 1 or min_area < 1:
            raise ConfigError("the marker filter needs min_markers >= 1 and min_area >= 1")
        self.min_markers, self.min_area, self.tolerance = min_markers, min_area, tolerance
        self.colour = np.array(colour, dtype=np.int16)

    def count(self, image: Image.Image) -> int:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        mask = (np.abs(pixels - self.colour) <= self.tolerance).all(-1)
        return complete_components(mask, self.min_area)

    def __call__(self, images: Sequence[Image.Image]) -> list[Verdict]:
        counts = [self.count(image) for image in images]
        return [Verdict(c >= self.min_markers, float(c)) for c in counts]


class HFClassifierFilter:
    """Any Hugging Face image-classification model (hub id or folder) as a filter.

    flagged iff P(forbidden) >= threshold, where P(forbidden) is the summed softmax probability of the
    `flagged_labels` (single-label models) or the largest sigmoid among them (multi-label models).
    """

    def __init__(self, model: str, flagged_labels: Sequence[str], threshold: float = 0.5, batch_size: int = 32, device=None):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            self.model = AutoModelForImageClassification.from_pretrained(model).eval()
            self.processor = AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"cannot load image classifier {model!r}: {str(err).splitlines()[0]}") from None
        if device is not None:
            self.model.to(device)
        labels = {name: int(i) for i, name in self.model.config.id2label.items()}
        unknown = [name for name in flagged_labels if name not in labels]
        if not flagged_labels or unknown:
            raise ConfigError(f"flagged_labels must name labels of {model!r}: unknown {unknown}; it has {sorted(labels)}")
        self.name = f"hf:{model}"
        self.flagged_ids = [labels[name] for name in flagged_labels]
        self.threshold, self.batch_size = threshold, batch_size
        self.multi_label = self.model.config.problem_type == "multi_label_classification" or len(labels) == 1

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image]) -> list[float]:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            inputs = self.processor(images=chunk, return_tensors="pt").to(self.model.device)
            logits = self.model(**inputs).logits.float()
            if self.multi_label:
                out += logits.sigmoid()[:, self.flagged_ids].amax(-1).tolist()
            else:
                out += logits.softmax(-1)[:, self.flagged_ids].sum(-1).tolist()
        return out

    def __call__(self, images: Sequence[Image.Image]) -> list[Verdict]:
        return [Verdict(p >= self.threshold, p) for p in self.probabilities(images)]
