"""Bad numbers and bad data are refused with one message and exit code 2 before any expensive work: option
ranges by the CLI itself, model-free config checks at validation, patches data before the model is resolved."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stitchkit.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    """An empty cache: a zoo model or micro VLM built by mistake would land here."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("STITCHKIT_HOME", str(home))
    return home


# ---- option ranges --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, option",
    [
        (["patches", "ids", "--n", "3", "--seed", "-1"], "--seed"),
        (["patches", "ids", "--n", "27"], "--n"),
        (["patches", "build", "--images", "IMAGES", "--names", "IMAGES/names.csv", "--out", "OUT", "--seed", "-4"], "--seed"),
        (["mimic", "build", "--annotations", "a.json", "--images", "IMAGES", "--out", "OUT", "--seed", "-1"], "--seed"),
        (["mimic", "eval", "--model", "NOPE", "--data", "IMAGES", "--out", "OUT", "--batch-size", "0"], "--batch-size"),
        (["mimic", "eval", "--model", "NOPE", "--data", "IMAGES", "--out", "OUT", "--max-per-task", "-1"], "--max-per-task"),
        (["mimic", "eval", "--model", "NOPE", "--data", "IMAGES", "--out", "OUT", "--threads", "0"], "--threads"),
        (["binding", "analyze", "--model", "NOPE", "--out", "OUT", "--pairs", "0"], "--pairs"),
        (["binding", "analyze", "--model", "NOPE", "--out", "OUT", "--probe-examples", "-5"], "--probe-examples"),
        (["binding", "analyze", "--model", "NOPE", "--out", "OUT", "--seed", "-2"], "--seed"),
    ],
)
def test_out_of_range_options_are_refused_by_the_cli(tmp_path, empty_home, capsys, args, option):
    folders = {"IMAGES": str(tmp_path), "OUT": str(tmp_path / "out"), "NOPE": str(tmp_path / "no_model")}
    args = [next((arg.replace(k, v) for k, v in folders.items() if arg.startswith(k)), arg) for arg in args]
    code, err = run_cli(args, capsys)
    assert code == 2 and f"Invalid value for '{option}'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not any(empty_home.iterdir())


# ---- stitch configs: what needs no model fails at validation -------------------------------------------


SWEEP = {"models": {"dino": "zoo:dino", "clip": "zoo:clip"}, "pairs": [["dino", "clip"]], "points": [1, 3]}
TREE = {"models": {"dino": "zoo:dino", "clip": "zoo:clip"}, "trunk": "dino", "branches": ["clip"], "points": [1, 3]}


@pytest.mark.parametrize(
    "verb, changes, message",
    [
        ("run", {"points": [-1, 3]}, "stitch point(s) [-1] out of range"),
        ("run", {"points": [0]}, "stitch point(s) [0] out of range"),
        ("run", {"seeds": [0, -1]}, "seeds.1"),
        ("run", {"match_layer": 0}, "match_layer 0 is no block"),
        ("run", {"image_size": {"dino": 0}}, "image_size.dino"),
        ("tree", {"points": [0, 3]}, "stitch point(s) [0] out of range"),
        ("tree", {"feature_layer": 0}, "feature_layer 0 is no block"),
        ("tree", {"feature_layer": 3}, "points [3]: the trunk is read at feature_layer 3"),
    ],
)
def test_stitch_configs_are_refused_before_any_model_is_built(tmp_path, empty_home, capsys, verb, changes, message):
    config = tmp_path / "stitch.yaml"
    config.write_text(yaml.safe_dump({**(SWEEP if verb == "run" else TREE), **changes}))
    start = time.monotonic()
    code, err = run_cli(["stitch", verb, str(config), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "invalid config" in err and message in " ".join(err.split()), err
    assert time.monotonic() - start < 10  # building zoo:dino and zoo:clip takes minutes
    assert not any(empty_home.iterdir()) and not (tmp_path / "out").exists()



@pytest.mark.parametrize(
    "changes, message",
    [
        ({"device": "gpu"}, "'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
        ({"data": {"world": {"images": 8}, "build": "no_such_build.yaml"}}, "config file not found"),
    ],
)
def test_mimic_run_configs_are_refused_before_the_world_is_rendered(tmp_path, empty_home, capsys, changes, message):
    config = tmp_path / "mimic.yaml"
    config.write_text(yaml.safe_dump({"data": {"world": {"images": 8}}, **changes}))
    code, err = run_cli(["mimic", "run", str(config), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not any(empty_home.iterdir()) and not (tmp_path / "out").exists()


# ---- patches run: the image sets before the model -------------------------------------------------------


def image_set(tmp_path: Path, n: int = 2) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "names.csv").write_text("file,name\n" + "".join(f"img{i}.png,thing {i}\n" for i in range(n)))
    return folder


def patches_config(tmp_path: Path, folder: Path, **changes) -> Path:
    cfg = {"model": {"source": str(tmp_path / "no_model")}, "splits": [1, 2],
           "image_sets": {"mine": {"images": str(folder), "names": str(folder / "names.csv")}}, **changes}  # fmt: skip
    path = tmp_path / "patches.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_patches_run_checks_the_names_file_before_the_model(tmp_path, empty_home, capsys):
    folder = image_set(tmp_path)
    (folder / "names.csv").unlink()
    code, err = run_cli(["patches", "run", str(patches_config(tmp_path, folder)), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "names file not found" in err  # not the missing model's error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("corrupt", "cannot read image"),
        ("splits", "too small to cut into f x f patches for split factor(s) [64]"),
        ("id_seed", "id_seed"),
        ("shapes_splits", "split factors must be 1..32; got [64]"),
    ],
)
def test_patches_run_checks_images_ids_and_splits_before_the_model(tmp_path, empty_home, capsys, breakage, message):
    folder = image_set(tmp_path)
    changes = {}
    if breakage == "corrupt":
        (folder / "img1.png").write_bytes(b"not a png")
    elif breakage == "splits":
        changes = {"splits": [1, 64]}  # the images are 32x24
    elif breakage == "id_seed":
        changes = {"id_seed": -1}
    else:  # a shapes-world set of 32 px, rendered only in the run
        changes = {"splits": [1, 64], "image_sets": {"shapes": {"shapes": {"images": 2, "size": 32}}}}
    code, err = run_cli(["patches", "run", str(patches_config(tmp_path, folder, **changes)), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in " ".join(err.split()), err
    assert not (tmp_path / "out").exists() and not any(empty_home.iterdir())


def test_good_image_sets_pass_the_early_check(tmp_path):
    from stitchkit.config import load_config
    from stitchkit.patches.config import PatchesConfig
    from stitchkit.patches.experiment import check_sources

    folder = image_set(tmp_path)
    check_sources(load_config(PatchesConfig, patches_config(tmp_path, folder, splits=[1, 2, 24])))  # 24: 1 px tall patches
