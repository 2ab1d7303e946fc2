"""Load a VisionBackbone from a hub id, a local folder or a built module; save one so it loads back.

The architecture is chosen by `config.model_type` (families.py). Normalisation, resolution and the
resize filter come from the checkpoint's preprocessor_config.json when it has one, else from per-family
defaults (those of the family's HF processor class).
`save_backbone` writes the same two files a hub checkpoint has (save_pretrained output plus
preprocessor_config.json), so the micro zoo's models load exactly like hub checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from stitchkit.backbones.backbone import VisionBackbone, default_image_size, family_of, size_pair, vision_tower
from stitchkit.backbones.preprocess import DEFAULT_RESAMPLE, resampling_filter
from stitchkit.errors import InputError, ModelNotFoundError, StitchkitError
from stitchkit.runs import atomic_write_json

PROCESSOR_CONFIG = "preprocessor_config.json"
_TRUE = {"1", "true", "yes", "on"}


def load_backbone(
    source: str | os.PathLike | nn.Module,
    *,
    trainable: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    image_size: int | None = None,
    mean=None,
    std=None,
    resample: int | None = None,
) -> VisionBackbone:
    """A hub id, a local folder, or an already built HF module -> VisionBackbone.

    Full image-text checkpoints (CLIPModel, SiglipModel, Siglip2Model) give their vision tower.
    Parameters are frozen unless `trainable` (the model runs in eval mode either way, see
    VisionBackbone); `image_size`, `mean`, `std`, `resample` (a PIL filter number) override the
    checkpoint's preprocessing.
    `dtype=None` loads a hub id or folder in float32, whatever dtype its weights were saved in (the exactness
    checks and the fp32 pipeline assume it; transformers 5 would otherwise keep a bf16 checkpoint in bf16); a
    built module keeps its own dtype unless one is given.
    """
    settings: dict = {}
    if isinstance(source, nn.Module):
        model = source.to(dtype) if dtype is not None else source
    else:
        model, settings = _load_pretrained(str(source), dtype if dtype is not None else torch.float32)
    bb = VisionBackbone(
        model,
        image_size=image_size or settings.get("image_size"),
        mean=mean if mean is not None else settings.get("mean"),
        std=std if std is not None else settings.get("std"),
        max_num_patches=None if image_size else settings.get("max_num_patches"),
        resample=resample if resample is not None else settings.get("resample"),
        trainable=trainable,
    )
    return bb.to(device) if device is not None else bb


def save_backbone(
    bb_or_model: VisionBackbone | nn.Module,
    path: str | os.PathLike,
    image_size: int | None = None,
    mean=None,
    std=None,
    resample: int | None = None,
) -> Path:
    """save_pretrained plus a preprocessor_config.json, so `load_backbone(path)` rebuilds the same backbone.

    Settings left out come from the VisionBackbone, or for a bare module from its config and family; a bare
    module has no processor, so its filter is DEFAULT_RESAMPLE (bicubic), as `load_backbone(module)` uses:
    the micro zoo saves its encoders this way, so their saved filter never changes.
    """
    if isinstance(bb_or_model, VisionBackbone):
        bb = bb_or_model
        model, family, patch_size = bb.model, bb.family, bb.patch_size
        mean = bb.mean if mean is None else mean
        std = bb.std if std is None else std
        resample = bb.resample if resample is None else resample
        max_num_patches = bb.max_num_patches if image_size is None else None
        image_size = image_size or bb.image_size
    else:
        model = bb_or_model
        config = getattr(vision_tower(model), "config", None)
        family = family_of(config)
        patch_size = size_pair(config.patch_size)[0]
        mean = family.mean if mean is None else mean
        std = family.std if std is None else std
        max_num_patches = None if image_size else getattr(config, "num_patches", None)
        image_size = image_size or default_image_size(config, family)
        resample = DEFAULT_RESAMPLE if resample is None else resample
    path = Path(path)
    with _quiet_transformers():
        model.save_pretrained(path)
    processor = {
        "image_processor_type": family.processor_class,
        "do_resize": True,
        "resample": int(resampling_filter(resample)),  # the PIL filter preprocess() resizes with
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(m) for m in mean],
        "image_std": [float(s) for s in std],
    }
    if family.patchified:
        max_num_patches = max_num_patches or (int(image_size) // patch_size) ** 2
        processor.update(patch_size=patch_size, max_num_patches=int(max_num_patches))
    else:
        processor["size"] = {"height": int(image_size), "width": int(image_size)}
    atomic_write_json(path / PROCESSOR_CONFIG, processor)
    return path


def processor_settings(processor: dict) -> dict:
    """image_size, mean, std, resample (and NaFlex max_num_patches) from an HF preprocessor_config.json.

    The model's input size is the crop size when the processor centre-crops, else the resize size.
    We resize straight to it without cropping (model_stitching.md §4.1). A setting the file lacks is
    left out (the caller falls back on the family's defaults).
    """
    settings = {}
    if processor.get("image_mean") is not None:
        settings["mean"] = _triple(processor["image_mean"])
    if processor.get("image_std") is not None:
        settings["std"] = _triple(processor["image_std"])
    size = processor.get("crop_size") if processor.get("do_center_crop") else None
    size = size or processor.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if size:
        settings["image_size"] = int(size)
    if processor.get("max_num_patches"):
        settings["max_num_patches"] = int(processor["max_num_patches"])
    if processor.get("resample") is not None:
        settings["resample"] = resampling_filter(processor["resample"])
    return settings


def _triple(value) -> tuple[float, float, float]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def _hub_offline() -> bool:
    import huggingface_hub.constants

    env = (os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(env) or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _load_pretrained(source: str, dtype: torch.dtype | None) -> tuple[nn.Module, dict]:
    import transformers

    folder = Path(source).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"{folder} has no config.json: pass a folder written by save_pretrained or save_backbone "
                "(config.json, the weights and ideally preprocessor_config.json)"
            )
        source = str(folder)

    config = from_hub(source, lambda **kw: transformers.AutoConfig.from_pretrained(source, **kw))
    family = family_of(config)
    vision_class = getattr(transformers, family.vision_class)
    model, info = from_hub(
        source,
        lambda **kw: vision_class.from_pretrained(source, dtype=dtype, output_loading_info=True, **kw),
    )
    # A full image-text checkpoint has text weights the vision class ignores, but a vision weight
    # missing from the checkpoint would be silently random: refuse it.
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(family.unused_weights))
    if missing:
        raise ModelNotFoundError(
            f"{source}: the checkpoint lacks {len(missing)} weights of its {family.vision_class} "
            f"(e.g. {', '.join(missing[:3])})"
        )
    settings = {}
    processor_file = _optional_file(source, PROCESSOR_CONFIG)
    if processor_file is not None:
        try:
            settings = processor_settings(json.loads(Path(processor_file).read_text()))
        except (ValueError, TypeError, AttributeError, InputError) as err:
            raise ModelNotFoundError(f"{source}: unreadable {PROCESSOR_CONFIG}: {first_line(err)}") from None
    # A checkpoint's processor that does not name its filter uses its class default, and so do we.
    settings.setdefault("resample", family.resample)
    return vision_tower(model), settings


def looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else with a separator or a leading ./~ is a path."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def from_hub(
    source: str,
    load,
    *,
    noun: str = "model",
    hint: str | None = None,
    offline=None,
    failures: tuple[type[BaseException], ...] = (OSError, ValueError),
    error: type[StitchkitError] = ModelNotFoundError,
):
    """Call `load(local_files_only=...)`: the local cache first, then the hub unless offline.

    Every failure (`failures`) becomes one `error` that says where to get the `noun` from (`hint`). Models by
    default; a data set passes its library's offline switch (`offline()`) and failures (multiimage/official.py).
    """
    offline = offline or _hub_offline
    if looks_like_path(source) and not Path(source).expanduser().exists():
        raise error(f"cannot load the {noun}: there is no folder {Path(source).expanduser()}")
    try:
        with _quiet_transformers():
            return load(local_files_only=True)
    except failures as err:
        reason = err
    if not offline() and not Path(source).exists():
        # Not in the cache: ask the hub once, without retries, before the library's download (which
        # retries a dead connection for ~25 s); an unreachable hub fails right away with the same error.
        unreachable = hub_connection_error(source, "config.json")
        if unreachable is not None:
            reason = unreachable
        else:
            try:
                with _quiet_transformers():
                    return load(local_files_only=False)
            except failures as err:
                reason = err
    if Path(source).exists():
        raise error(f"cannot load the {noun} in {source}: {first_line(reason)}") from None
    how = "offline mode (HF_HUB_OFFLINE) is on" if offline() else f"downloading failed: {first_line(reason)}"
    hint = hint or (f"Download it where there is internet (`hf download {source}`) and copy the cache, "
                    "or pass the path of a local folder holding config.json and the weights.")
    raise error(f"{noun} {source!r} is not a local folder and not in the Hugging Face cache, and {how}.\n{hint}") from None


def _optional_file(source: str, filename: str) -> str | None:
    """A file of a local folder or a (cached or downloadable) hub repo, or None when it has none."""
    local = Path(source) / filename
    if Path(source).exists():
        return str(local) if local.is_file() else None
    from transformers.utils import cached_file

    for local_only in (True, False) if not _hub_offline() else (True,):
        if not local_only and hub_connection_error(source, filename) is not None:
            return None
        try:
            found = cached_file(
                source,
                filename,
                local_files_only=local_only,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except (OSError, ValueError):
            found = None
        if found:
            return found
    return None


def hub_connection_error(source: str, filename: str) -> ConnectionError | None:
    """One HEAD request for a file of a hub repo, without retries: a ConnectionError when the hub cannot
    be reached (no network, DNS, proxy, timeout after HF_HUB_ETAG_TIMEOUT seconds), else None, including
    when the hub answers with an error (missing repo or file, gated repo) that the real load reports itself."""
    import httpx
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(source, filename), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except httpx.TransportError as err:
        return ConnectionError(f"cannot connect to {constants.ENDPOINT} ({first_line(err)})")
    except Exception:  # noqa: BLE001 - any answer from the hub means it is reachable
        return None
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars (a full CLIP checkpoint loaded as its vision
    tower reports every text weight as 'unexpected', which is expected here)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
