"""The substrate every suite relies on: configs, run folders, atomic writes, CLI error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stitchkit.config import Config, load_config
from stitchkit.errors import ConfigError
from stitchkit.runs import RunDir, atomic_path, atomic_write_json

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


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}  # the old file survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp files left behind


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
    with pytest.raises(ConfigError, match="different config"):
        RunDir(tmp_path / "run", config=Outer(name="x", train=Inner(steps=3)))


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "STITCHKIT_PROGRESS": "0"}
    return subprocess.run([*STITCHKIT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_cli_help_lists_the_suites():
    out = _run_cli("--help")
    assert out.returncode == 0
    for verb in ("quickstart", "world", "zoo"):
        assert verb in out.stdout


def test_cli_unknown_command_exits_2():
    out = _run_cli("no-such-verb")
    assert out.returncode == 2
