"""Experiment configs: YAML in, validated by pydantic, echoed into every run folder.

Each suite defines its config as a `Config` subclass (extra keys forbidden, so a typo is an error,
not a silently ignored field). `load_config` turns any problem into a `ConfigError` whose message
names the file, the field path and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml

from stitchkit.errors import ConfigError


class Config(pydantic.BaseModel):
    """Base of every config: unknown keys are errors; values are validated on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


C = TypeVar("C", bound=Config)

def yaml_false_as(word: str) -> pydantic.BeforeValidator:
    """YAML 1.1 reads an unquoted `no` or `off` as the boolean false: for a field whose choices include such a
    word, false means that word, not an error (`mode: off`, `mixed_precision: no`)."""
    return pydantic.BeforeValidator(lambda value: word if value is False else value)


# The engine's precision setting, shared by every suite's optimiser block.
MixedPrecision = Annotated[Literal["auto", "no", "bf16"], yaml_false_as("no")]


def config_hash(config: pydantic.BaseModel, version: int | str) -> str:
    """12 hex digits of sha256 over the fields that differ from their defaults (canonical JSON) and a format
    version: the cache key of what a config builds. Defaults are left out so that adding an option to a config
    class (at a default that keeps today's behaviour) keeps every cached build valid; a change to a default, or
    to the code that builds, is a change of `version`."""
    fields = config.model_dump(mode="json", exclude_defaults=True)
    canonical = json.dumps({"config": fields, "format": version}, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def field_error(path: str, message: str) -> pydantic.ValidationError:
    """A problem found across fields, raised from a model validator and reported at the field `path` (dotted)
    the user has to change: the loader prints `path: message`, where a plain ValueError would read
    `message` alone, naming no field."""
    import pydantic_core

    error = pydantic_core.PydanticCustomError("config_field", message)
    return pydantic_core.ValidationError.from_exception_data("Config", [{"type": error, "loc": tuple(path.split(".")), "input": None}])


def format_validation_error(err: pydantic.ValidationError, source: str, model: type[pydantic.BaseModel] | None = None) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        # pydantic prefixes a validator's own message with "Value error, ": noise to a reader of our messages
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and model is not None:
            message += _did_you_mean(model, e["loc"])
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def _did_you_mean(model: type[pydantic.BaseModel], loc: tuple) -> str:
    """For an unknown key at `loc`: the closest field name of the config class that holds it, if one is close."""
    import difflib
    import typing

    holder: Any = model
    for part in loc[:-1]:
        if isinstance(holder, type) and issubclass(holder, pydantic.BaseModel) and isinstance(part, str) and part in holder.model_fields:
            holder = holder.model_fields[part].annotation
        # through Optional[X], list[X], dict[K, X]: the config class among the arguments (a list index or a dict
        # key in `loc` stays on it)
        while not (isinstance(holder, type) and issubclass(holder, pydantic.BaseModel)):
            models = [a for a in typing.get_args(holder) if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]
            nested = [a for a in typing.get_args(holder) if typing.get_args(a)]
            if models:
                holder = models[-1]
            elif nested:
                holder = nested[-1]
            else:
                return ""
    close = difflib.get_close_matches(str(loc[-1]), list(holder.model_fields), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def validate_config(model: type[C], data: Any, source: str = "(config)") -> C:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model)) from None


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file: pass a YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file") from None


def load_config(model: type[C], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> C:
    """Read `path` as YAML, apply `overrides` (top-level keys), validate against `model`."""
    data = read_yaml(path)
    if overrides:
        data = {**(data or {}), **overrides}
    return validate_config(model, data, source=str(path))
