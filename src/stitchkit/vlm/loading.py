"""load_vlm: a hub id, a local folder or a model object -> VLM; and the processor helpers behind it.

transformers 5 builds the video processor of LLaVA-OneVision / Qwen2-VL processors with torchvision.
Where torchvision is missing (our CPU environment), `load_processor` and `build_processor` make the
model's own processor class without its video part: same class name, same image processor and
tokenizer, same `__call__`, and it saves the same processor_config.json.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PretrainedConfig

from stitchkit.backbones.loading import first_line, from_hub
from stitchkit.errors import ModelNotFoundError
from stitchkit.vlm.attention import AttentionPolicy
from stitchkit.vlm.model import VLM

MODEL_CLASSES = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
LLAVA_NEXT_ARCHITECTURE = "LlavaQwenForCausalLM"  # the original LLaVA-NeXT training code's LLaVA-OneVision class


def load_vlm(
    source,
    processor=None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    policy: AttentionPolicy | None = None,
    **options,
) -> VLM:
    """A VLM from a hub id or folder (model + processor), or from a model object and its processor.

    LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL load with their own classes; any other image-text-to-text
    model through AutoModelForImageTextToText. options: pool_factor, pool_pad, image_layout, chat_template.
    """
    if isinstance(source, (str, os.PathLike)):
        model = _load_model(str(source), dtype, attn_implementation)
        processor = processor or load_processor(str(source))
    else:
        model = source
        if processor is None:  # the processor of the checkpoint the model was loaded from
            origin = getattr(model.config, "_name_or_path", "")
            if not origin:
                raise ModelNotFoundError("load_vlm(model) needs the model's processor: load_vlm(model, processor)")
            processor = load_processor(origin)
    if device is not None:
        model.to(device)
    model.eval()
    return VLM(model, processor, policy=policy, **options)


def _load_model(source: str, dtype, attn_implementation: str):
    check_transformers_format(source, from_hub(source, lambda **kw: PretrainedConfig.get_config_dict(source, **kw)[0]))
    config = from_hub(source, lambda **kw: AutoConfig.from_pretrained(source, **kw))
    name = MODEL_CLASSES.get(config.model_type)
    model_class = getattr(transformers, name) if name else AutoModelForImageTextToText
    return from_hub(source, lambda **kw: model_class.from_pretrained(source, dtype=dtype or "auto", attn_implementation=attn_implementation, **kw))


def check_transformers_format(source: str, config: dict) -> None:
    """Refuse a checkpoint in the original LLaVA-NeXT format (lmms-lab's llava-onevision-* releases, architecture
    LlavaQwenForCausalLM): transformers has no class for it, and its model_type "llava" would silently build
    LLaVA-1.5 with default settings. Their Hugging Face conversions are llava-hf's "-hf" checkpoints."""
    if LLAVA_NEXT_ARCHITECTURE not in (config.get("architectures") or []) and config.get("model_type") != "llava_qwen":
        return
    match = re.fullmatch(r"lmms-lab/(llava-onevision-[\w.-]+)", source)
    hint = (f"use its Hugging Face conversion 'llava-hf/{match[1]}-hf'" if match else
            "use its Hugging Face-format conversion (llava-hf's '-hf' checkpoints, e.g. "
            "llava-hf/llava-onevision-qwen2-0.5b-si-hf) or convert it with transformers' "
            "convert_llava_onevision_weights_to_hf.py")
    raise ModelNotFoundError(f"{source!r} is a checkpoint in the original LLaVA-NeXT format ({LLAVA_NEXT_ARCHITECTURE}), "
                             f"which transformers cannot load as LLaVA-OneVision: {hint}")


@functools.cache
def processor_without_video(cls: type) -> type:
    """`cls` with no video_processor argument: builds without torchvision, otherwise unchanged.

    ProcessorMixin takes a processor's parts from its __init__ signature, and from_pretrained keeps only the
    saved settings that are real __init__ parameters (it reads __init__.__code__), so the subclass gets a
    real __init__ with the base's parameters, video_processor left out.
    """
    signature = inspect.signature(cls.__init__)
    if "video_processor" not in signature.parameters:
        return cls
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p for p in list(signature.parameters.values())[1:] if p.kind in kinds and p.name != "video_processor"]
    defaults = {p.name: None if p.default is inspect.Parameter.empty else p.default for p in params}
    source = (
        "def __init__(self, " + "".join(f"{p.name}=_defaults[{p.name!r}], " for p in params) + "**kwargs):\n"
        "    _base(self, video_processor=None, " + "".join(f"{p.name}={p.name}, " for p in params) + "**kwargs)\n"
    )
    namespace = {"_defaults": defaults, "_base": cls.__init__}
    exec(source, namespace)  # noqa: S102 - a generated signature, from the base class's own parameter names
    return type(cls.__name__, (cls,), {"__init__": namespace["__init__"], "__module__": cls.__module__, "__doc__": cls.__doc__})


def _torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def build_processor(processor_class: type, image_processor, tokenizer, **kwargs):
    """processor_class(image_processor, tokenizer, **kwargs), without a video processor if torchvision is missing."""
    if _torchvision_available():
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
    return processor_without_video(processor_class)(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained(source): the local cache first, then the hub once; one clear error.
    `trust_remote_code` runs a checkpoint's own tokenizer class, for those transformers lacks."""
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): pass a language model or "
                                 "VLM folder saved with its tokenizer")
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    return from_hub(source, lambda **kw: transformers.AutoTokenizer.from_pretrained(source, **remote, **kw))


def load_processor(source: str):
    """AutoProcessor.from_pretrained(source), or the same processor class without its video part."""
    if _torchvision_available():
        try:
            return AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"cannot load the processor of {source!r}: {first_line(err)}") from None
    name = _processor_class_name(source)
    processor_class = getattr(transformers, name, None) if name else None
    if processor_class is None:
        raise ModelNotFoundError(f"cannot find the processor class of {source!r} (found {name!r})")
    try:
        return processor_without_video(processor_class).from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot load the processor of {source!r}: {first_line(err)}") from None


def _processor_class_name(source: str) -> str | None:
    from huggingface_hub import hf_hub_download

    for filename in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(source) / filename
        if not path.is_file():
            try:
                path = Path(hf_hub_download(source, filename))
            except Exception:  # noqa: BLE001 - a missing file or no network: try the next file
                continue
        name = json.loads(path.read_text()).get("processor_class")
        if name:
            return name
    return None
