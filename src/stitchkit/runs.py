"""Run folders: atomic writes, a manifest that records how a run was made, and step skipping.

A run folder (`runs/NAME`) holds:
    manifest.json   config, package and library versions, seeds, input hashes, finished steps
    config.yaml     the effective (validated, defaults filled in) config
    results.json, report.md, figures/*.png, and one sub-folder per step if the step needs one

Every file is written to a temporary sibling and renamed into place, so a killed process never
leaves a half-written file. A step is marked finished in the manifest only after its outputs are
written; re-running the same command skips finished steps. Output folders are made by `prepare_output`, so
that a command ended by a user error can take back the folders it created (`discard_outputs_on_user_error`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pydantic
import yaml

from stitchkit.errors import EXIT_USER_ERROR, ConfigError, InputError, StitchkitError

TRACKED_LIBRARIES = ("torch", "transformers", "accelerate", "peft", "datasets", "numpy", "pillow")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The file gets the mode a plainly created file would have (0o666 minus the umask), not mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_replace_dir(target: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a folder next to `target`, which is then swapped in, so a killed writer never
    leaves half a folder (e.g. a Hugging Face dataset written by save_to_disk)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# The topmost folder each prepare_output call created, in order (see discard_outputs_on_user_error).
_created_outputs: list[Path] = []
_opened_runs: list[Path] = []  # run folders this process opened (RunDir): what an interrupted command can resume


def opened_runs() -> list[Path]:
    return list(_opened_runs)


def prepare_output(folder: str | os.PathLike) -> Path:
    """Create the output folder `folder` (with its parents), or say in one message why it cannot be."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the output folder {folder} is an existing file; choose another --out")
    if not folder.exists():
        topmost = next(p for p in [folder, *folder.parents] if p.parent.exists() or p.parent == p)
        try:
            folder.mkdir(parents=True)
        except OSError as err:
            raise InputError(f"cannot create the output folder {folder}: {err.strerror or err}") from None
        _created_outputs.append(topmost.resolve())
    return folder


def _records_finished_step(manifest: Path) -> bool:
    try:
        return bool(json.loads(manifest.read_text()).get("steps"))
    except (OSError, ValueError, AttributeError):
        return False


def _holds_finished_step(folder: Path) -> bool:
    """Whether `folder` is, holds or lies inside a run folder with a finished step: resumable work. Inside counts
    too, since a run may record a sub-folder (a built dataset, say) as a finished step of its own manifest."""
    around = (parent / "manifest.json" for parent in [folder, *folder.parents])
    return any(_records_finished_step(m) for m in around) or any(_records_finished_step(m) for m in folder.rglob("manifest.json"))


@contextlib.contextmanager
def discard_outputs_on_user_error(report: Callable[[Path], Any] = lambda folder: None) -> Iterator[None]:
    """Output folders created inside the block are removed again when a user error (exit code 2) ends it: bad
    input leaves nothing half-written behind. A folder whose manifest records a finished step is resumable
    work and stays, and so does everything after a time limit (exit code 3), which saved a checkpoint."""
    start = len(_created_outputs)
    try:
        yield
    except StitchkitError as err:
        if err.exit_code == EXIT_USER_ERROR:
            for folder in reversed(_created_outputs[start:]):
                if folder.is_dir() and not _holds_finished_step(folder):
                    shutil.rmtree(folder, ignore_errors=True)
                    report(folder)
        raise
    finally:
        del _created_outputs[start:]


def command_line() -> str:
    """The `stitchkit ...` command this process runs, shell-quoted, for a run's manifest."""
    return "stitchkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def open_cached_build(folder: Path, done_file: str, recipe_text: str, force: bool = False) -> bool:
    """The folder of a cached build (a zoo model, the micro VLM), keyed by its recipe's hash: True if the build is
    already finished (`done_file`, written last, exists); otherwise the folder is created with recipe.yaml in it
    and the caller builds into it (a killed build finds its training checkpoint there). force: start over."""
    if force:
        shutil.rmtree(folder, ignore_errors=True)
    if (folder / done_file).is_file():
        return True
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "recipe.yaml", recipe_text)
    return False


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("stitchkit", *TRACKED_LIBRARIES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _same_config(saved: Any, config: Any) -> bool:
    """Whether a run folder's saved config is `config`. A saved pydantic config is read back through today's
    class, so an option added since (at its default) does not make an old run folder "different"."""
    if saved is None:
        return True
    if not isinstance(config, pydantic.BaseModel):
        return saved == config
    try:
        return type(config).model_validate(saved) == config
    except pydantic.ValidationError:  # a field was removed or changed meaning
        return False


def _as_today(saved: Any, config: Any) -> Any:
    """A saved config read through today's class (options added since at their defaults), as _same_config reads
    it, so that only real differences are named; as saved when that is not possible."""
    if isinstance(config, pydantic.BaseModel):
        try:
            return type(config).model_validate(saved).model_dump(mode="json")
        except pydantic.ValidationError:
            pass
    return saved


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix or "(config)": value}


def config_changes(saved: Any, config: Any, limit: int = 4) -> str:
    """What differs between a run folder's saved config and this one, as `field: old -> new` (at most `limit`)."""
    before, after = _flatten(saved), _flatten(config)
    missing = object()
    keys = [k for k in {**before, **after} if before.get(k, missing) != after.get(k, missing)]
    shown = [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}" for k in keys[:limit]]
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


class RunDir:
    """One run folder. Create it with the effective config; steps are skipped once finished.

    >>> run = RunDir("runs/demo", config=cfg, seeds={"world": 0})
    >>> if not run.done("render"):
    ...     render(...); run.finish("render")
    """

    def __init__(
        self,
        root: str | os.PathLike,
        config: Any = None,
        seeds: dict[str, int] | None = None,
        inputs: dict[str, str | os.PathLike] | None = None,
        command: str | None = None,
    ):
        self.root = prepare_output(root)
        _opened_runs.append(self.root)
        config_dict = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
        existing = self._read_manifest()
        if existing and config_dict is not None and not _same_config(existing.get("config"), config):
            changes = config_changes(_as_today(existing.get("config"), config), config_dict)
            raise ConfigError(
                f"{self.root} already holds a run made with a different config"
                + (f" ({changes})" if changes else "")
                + "; choose another --out folder or delete this one"
            )
        self.manifest: dict[str, Any] = existing or {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "steps": {},
        }
        self.manifest.update(
            {
                "command": command or self.manifest.get("command"),
                "config": config_dict,
                "versions": library_versions(),
                "seeds": {**self.manifest.get("seeds", {}), **(seeds or {})},
                "inputs": {
                    **self.manifest.get("inputs", {}),
                    **{k: _hash_input(v) for k, v in (inputs or {}).items()},
                },
            }
        )
        if config_dict is not None:
            atomic_write_text(self.root / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
        self._write_manifest()

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def _read_manifest(self) -> dict[str, Any] | None:
        if self.manifest_path.exists():
            try:
                return json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError:
                return None
        return None

    def _write_manifest(self) -> None:
        atomic_write_json(self.manifest_path, self.manifest)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def done(self, step: str) -> bool:
        return step in self.manifest["steps"]

    def finish(self, step: str, **info: Any) -> None:
        self.manifest["steps"][step] = {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **info,
        }
        self._write_manifest()

    def step(self, name: str, fn: Callable[[], Any]) -> bool:
        """Run `fn` unless `name` is finished; return True if it ran."""
        if self.done(name):
            return False
        fn()
        self.finish(name)
        return True


def _hash_input(path: str | os.PathLike) -> str:
    p = Path(path)
    if p.is_file():
        return "sha256:" + file_sha256(p)
    return str(p)
