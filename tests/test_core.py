"""The substrate every suite relies on: configs, run folders, atomic writes, CLI error handling."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import stat
import re
import subprocess
import sys
from typing import Optional
import types
from pathlib import Path

import pytest

from stitchkit.config import Config, config_hash, load_config
from stitchkit.errors import ConfigError, InputError, TimeLimitReached
from stitchkit.runs import RunDir, atomic_path, atomic_write_json, discard_outputs_on_user_error, prepare_output

STITCHKIT = [sys.executable, "-m", "stitchkit.cli"]


class Inner(Config):
    lr: float = 1e-3
    steps: int


class Outer(Config):
    name: str
    train: Inner


def test_load_config_validates_and_fills_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  steps: 3\n")
    cfg = load_config(Outer, path)
    assert cfg.train.steps == 3 and cfg.train.lr == 1e-3


def test_a_typo_gets_the_closest_field_name_at_its_level(tmp_path):
    class Many(Config):
        runs: dict[str, list[Inner]] = {}
        train: Optional[Inner] = None

    for text, hint in (("name: x\ntrain:\n  steps: 3\n  lrr: 1\n", "train.lrr: Extra inputs are not permitted (did you mean `lr`?)"),
                       ("name: x\ntrian: {steps: 3}\n", "trian: Extra inputs are not permitted (did you mean `train`?)")):  # fmt: skip
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match=re.escape(hint)):
            load_config(Outer, tmp_path / "c.yaml")
    (tmp_path / "m.yaml").write_text("runs: {a: [{steps: 1}, {steps: 2, step: 3}]}\ntrain: {steps: 1, stpes: 2}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(Many, tmp_path / "m.yaml")
    assert "runs.a.1.step: Extra inputs are not permitted (did you mean `steps`?)" in str(caught.value)  # through dict and list
    assert "train.stpes: Extra inputs are not permitted (did you mean `steps`?)" in str(caught.value)  # through Optional
    (tmp_path / "z.yaml").write_text("name: x\ntrain: {steps: 1}\nzzzz: 1\n")
    with pytest.raises(ConfigError, match=r"zzzz: Extra inputs are not permitted$"):  # nothing close: no guess
        load_config(Outer, tmp_path / "z.yaml")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\ntrain:\n  steps: many\n", "train.steps"),  # wrong type names the nested path
        ("name: x\ntrain:\n  steps: 3\n  lrr: 1\n", "train.lrr"),  # a typo is an error, not ignored
        ("name: x\n", "train"),  # a missing field
        ("name: [x\n", "not valid YAML"),  # malformed YAML names the line
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(Outer, path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a config file"):  # e.g. `configs/stitch` for a YAML in it
        load_config(Outer, tmp_path)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}  # the old file survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp files left behind


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_atomic_writes_get_the_normal_file_mode(tmp_path):
    """Not mkstemp's 0o600: what open() would create under the current umask."""
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o640, "b.bin": 0o640, "plain.txt": 0o640}


def test_run_dir_records_manifest_and_skips_finished_steps(tmp_path):
    cfg = Outer(name="x", train=Inner(steps=2))
    run = RunDir(tmp_path / "run", config=cfg, seeds={"world": 7})
    calls = []
    assert run.step("render", lambda: calls.append(1)) is True
    # A fresh RunDir on the same folder (a re-run of the same command) skips the finished step.
    again = RunDir(tmp_path / "run", config=cfg)
    assert again.step("render", lambda: calls.append(2)) is False
    assert calls == [1]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["train"]["steps"] == 2
    assert manifest["seeds"] == {"world": 7}
    assert "torch" in manifest["versions"] and "transformers" in manifest["versions"]
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("name: x")


def test_run_dir_refuses_a_different_config(tmp_path):
    RunDir(tmp_path / "run", config=Outer(name="x", train=Inner(steps=2)))
    with pytest.raises(ConfigError, match=r"different config \(train.steps: 2 -> 3\)"):
        RunDir(tmp_path / "run", config=Outer(name="x", train=Inner(steps=3)))


def test_run_dir_accepts_its_config_after_the_config_class_gained_an_option(tmp_path):
    class Newer(Outer):  # Outer in a later release, with one more option at a default
        verbose: bool = False

    RunDir(tmp_path / "run", config=Outer(name="x", train=Inner(steps=2)))
    RunDir(tmp_path / "run", config=Newer(name="x", train=Inner(steps=2)))  # the same run: no error
    with pytest.raises(ConfigError, match=r"different config \(verbose: False -> True\);"):  # only what differs
        RunDir(tmp_path / "run", config=Newer(name="x", train=Inner(steps=2), verbose=True))


def test_prepare_output_refuses_a_file_and_an_uncreatable_folder(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(InputError, match="is an existing file"):
        prepare_output(tmp_path / "afile")
    with pytest.raises(InputError, match="cannot create the output folder"):
        prepare_output(tmp_path / "afile" / "run")
    assert prepare_output(tmp_path / "new" / "run").is_dir()


def test_a_user_error_takes_back_the_folders_its_command_created(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ConfigError):
        with discard_outputs_on_user_error():
            RunDir(tmp_path / "runs" / "fresh", config=Outer(name="x", train=Inner(steps=1)))  # creates runs/ too
            prepare_output(existing / "inner")
            RunDir(existing, config=Outer(name="x", train=Inner(steps=1)))
            raise ConfigError("bad input found late")
    assert not (tmp_path / "runs").exists() and not (existing / "inner").exists()
    assert (existing / "manifest.json").is_file()  # a folder that was there before is never removed


def test_finished_steps_and_time_limits_keep_their_folders(tmp_path):
    with pytest.raises(InputError):
        with discard_outputs_on_user_error():
            run = RunDir(tmp_path / "done", config=Outer(name="x", train=Inner(steps=1)))
            prepare_output(run.root / "data" / "built")  # a sub-folder a run records as a finished step of its own
            run.finish("data/built")  # resumable work
            raise InputError("a later step's input is bad")
    assert (tmp_path / "done" / "manifest.json").is_file() and (tmp_path / "done" / "data" / "built").is_dir()
    with pytest.raises(TimeLimitReached):
        with discard_outputs_on_user_error():
            prepare_output(tmp_path / "stopped")
            raise TimeLimitReached("checkpoint saved")  # exit code 3: the same command resumes
    assert (tmp_path / "stopped").is_dir()


def test_cli_bad_input_leaves_no_output_folder(tmp_path):
    (tmp_path / "afile").write_text("")
    out = _run_cli("world", "render", "--out", str(tmp_path / "afile"), "--images", "2")
    assert out.returncode == 2 and "is an existing file" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "images").mkdir()
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}], "categories": [{"id": 1, "name": "star"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}]}  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = _run_cli("mimic", "build", "--annotations", str(tmp_path / "ann.json"), "--images", str(tmp_path / "images"),
                   "--out", str(tmp_path / "bench"))  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert not (tmp_path / "bench").exists()


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "STITCHKIT_PROGRESS": "0"}
    return subprocess.run([*STITCHKIT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("opens_a_run", [False, True])
def test_ctrl_c_says_interrupted_and_how_to_resume_a_run(tmp_path, opens_a_run):
    """Ctrl-C outside a checkpointed training (which stops at the end of its step, test_engine): exit 130, one
    line, no traceback, the output so far kept; "run the same command again" only where a run folder was opened."""
    opened = f"from stitchkit.runs import RunDir\nRunDir({str(tmp_path / 'run')!r}, config={{'a': 1}})\n" if opens_a_run else ""
    script = (
        "import os, signal, sys, threading\n"
        "threading.Timer(4, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        f"{opened}from stitchkit.cli import main\n"
        f"main(['world', 'render', '--out', {str(tmp_path / 'w')!r}, '--images', '1000000'])\n"
    )
    env = {**os.environ, "STITCHKIT_PROGRESS": "0"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 130 and "Traceback" not in out.stderr
    resume = "interrupted; finished steps are kept; run the same command again to resume"
    assert (resume in out.stderr) if opens_a_run else ("interrupted" in out.stderr and resume not in out.stderr)
    assert (tmp_path / "w").is_dir()


def test_off_a_terminal_each_progress_logs_one_line_to_stderr_when_it_finishes():
    """A batch job's log shows what a long run has done; stdout stays the command's own output."""
    script = "from stitchkit.progress import track\nfor _ in track(range(50), 'cells of the sweep'): pass\nprint('result')\n"
    env = {k: v for k, v in os.environ.items() if k != "STITCHKIT_PROGRESS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout == "result\n"
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cells of the sweep" in lines[0] and "50/50" in lines[0]
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**env, "STITCHKIT_PROGRESS": "0"}, timeout=60)
    assert quiet.stderr == "" and quiet.stdout == "result\n"


def test_global_options_work_after_the_verb_too(tmp_path):
    from stitchkit.cli import hoist_global_options

    assert hoist_global_options(["stitch", "run", "c.yaml", "--time-limit", "30", "--debug"]) == [
        "--time-limit", "30", "--debug", "stitch", "run", "c.yaml"]  # fmt: skip
    assert hoist_global_options(["mimic", "eval", "--time-limit=5", "--pool", "2"]) == ["--time-limit=5", "mimic", "eval", "--pool", "2"]
    out = _run_cli("world", "render", "--out", str(tmp_path / "w"), "--images", "2", "--time-limit", "5")
    assert out.returncode == 0, out.stderr


def test_cli_help_lists_the_suites():
    out = _run_cli("--help")
    assert out.returncode == 0
    for verb in ("quickstart", "world", "zoo"):
        assert verb in out.stdout


def test_cli_import_stays_light():
    """`stitchkit --help` must not pay for torch/transformers: package __init__ files export lazily."""
    code = "import sys, stitchkit.cli; heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_python_dash_m_runs_the_cli_with_its_exit_codes():
    """`python -m stitchkit` is the console script (what a machine without the editable install runs)."""
    shown = subprocess.run([sys.executable, "-m", "stitchkit", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "quickstart" in shown.stdout
    bad = subprocess.run([sys.executable, "-m", "stitchkit", "zoo", "train", "no_such_recipe"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown zoo recipe 'no_such_recipe'" in bad.stderr and "Traceback" not in bad.stderr


def _packages() -> list[str]:
    import stitchkit

    return sorted(m.name for m in pkgutil.iter_modules(stitchkit.__path__) if m.ispkg)


@pytest.mark.parametrize("name", _packages())
def test_package_public_names_resolve(name):
    """Every name in a package's __all__ resolves (lazily) to the object, never to a same-named submodule."""
    package = importlib.import_module(f"stitchkit.{name}")
    submodules = {m.name for m in pkgutil.iter_modules(package.__path__)}
    public = getattr(package, "__all__", [])
    assert not set(public) & submodules, "a public name equal to a submodule's is hidden once that submodule loads"
    for attr in public:
        assert attr in dir(package)
        assert not isinstance(getattr(package, attr), types.ModuleType), attr


def test_cli_unknown_command_exits_2():
    out = _run_cli("no-such-verb")
    assert out.returncode == 2


def test_config_hash_ignores_fields_at_their_default():
    """Adding an option (at a default that keeps behaviour) must not invalidate every cached build."""

    class Inner(Config):
        lr: float = 1e-3

    class Old(Config):
        steps: int = 10
        inner: Inner = Inner()

    class New(Old):  # the same config class after a release added two options
        schedule: str = "cosine"
        extra: dict[str, float] = {}

    assert config_hash(Old(steps=5), 1) == config_hash(New(steps=5), 1) == config_hash(New(steps=5, schedule="cosine"), 1)
    assert config_hash(Old(steps=5, inner=Inner(lr=1e-3)), 1) == config_hash(Old(steps=5), 1)
    assert config_hash(New(steps=5, schedule="constant"), 1) != config_hash(Old(steps=5), 1)
    assert config_hash(Old(steps=5, inner=Inner(lr=2e-3)), 1) != config_hash(Old(steps=5), 1)
    assert config_hash(Old(steps=5), 2) != config_hash(Old(steps=5), 1)  # the format version is part of it


def test_every_bundled_config_validates():
    """configs/**/*.yaml are what users run first (and what the GPU sessions run): each must load with its suite's
    config class, so a renamed field never ships broken in a config that no test runs."""
    from stitchkit.binding.config import BindingConfig
    from stitchkit.multiimage.config import MimicConfig
    from stitchkit.multiimage.experiment import ExperimentConfig
    from stitchkit.patches.config import PatchesConfig
    from stitchkit.paths import CONFIGS
    from stitchkit.stitching.config import StitchRunConfig, TreeConfig
    from stitchkit.vlm.micro import MicroVLMRecipe
    from stitchkit.zoo.recipes import ZooRecipe

    classes = {
        "binding": [BindingConfig],
        "stitch": [StitchRunConfig, TreeConfig],
        "mimic": [ExperimentConfig, MimicConfig],
        "patches": [PatchesConfig],
        "zoo": [ZooRecipe, MicroVLMRecipe],
    }
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert len(paths) >= 20
    for path in paths:
        errors = []
        for config_class in classes[path.relative_to(CONFIGS).parts[0]]:
            try:
                load_config(config_class, path)
                break
            except ConfigError as err:
                errors.append(str(err))
        else:
            pytest.fail(f"{path} loads with none of its suite's config classes:\n" + "\n".join(errors))
