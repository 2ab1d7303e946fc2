"""The dataset tools of visual_stitching.md §1.3 and §1.4: patch dropout at build time, and the stitch tool that
rebuilds images from patch files (missing cells black, optional seeded shuffle)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stitchkit.errors import InputError
from stitchkit.patches import build_patch_dataset, read_names
from stitchkit.patches.stitch import stitch_folder


def source_images(tmp_path: Path, n: int, size: tuple[int, int] = (32, 24)) -> list:
    """n random PNG images of `size` (divisible by 1, 2, 4 and 8) and their names file."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (tmp_path / "names.json").write_text(json.dumps({f"im{i}.png": f"shape {i}" for i in range(n)}))
    return read_names(tmp_path / "names.json", folder)


def manifest_cells(folder: Path) -> set[tuple[str, int, int, int]]:
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    return {(m["key"], m["f"], m["row"], m["col"]) for m in map(json.loads, lines)}


# ---- patch dropout ------------------------------------------------------------------------------------


def test_patch_dropout_keeps_about_n_f2_times_1_minus_p_patches_and_is_seeded(tmp_path):
    items, p = source_images(tmp_path, 10), 0.3
    meta = build_patch_dataset(items, tmp_path / "a", [2, 4, 8], patch_dropout=p, dropout_seed=7)
    for f in (2, 4, 8):
        total = len(items) * f * f
        sd = math.sqrt(total * p * (1 - p))  # binomial: each patch dropped i.i.d. with probability p
        assert abs(meta["counts"][f"f{f}"] - total * (1 - p)) <= 4 * sd, (f, meta["counts"])
        assert meta["counts"][f"f{f}"] < total  # at 4 sd below the mean, nothing dropped is impossible here
    # every kept patch is a file, in the manifest and in the split; every dropped one is none of these
    kept = manifest_cells(tmp_path / "a")
    files = {p.stem for p in (tmp_path / "a" / "patches" / "4x4").iterdir()}
    assert files == {f"{key}-{row}_{col}" for key, f, row, col in kept if f == 4}
    assert meta["patch_dropout"] == {"p": p, "seed": 7}

    again = build_patch_dataset(items, tmp_path / "b", [2, 4, 8], patch_dropout=p, dropout_seed=7)
    assert again["counts"] == meta["counts"] and manifest_cells(tmp_path / "b") == kept  # same seed, same patches
    build_patch_dataset(items, tmp_path / "c", [4], patch_dropout=p, dropout_seed=7)
    assert {c for c in manifest_cells(tmp_path / "c")} == {c for c in kept if c[1] == 4}  # independent of other splits
    build_patch_dataset(items, tmp_path / "d", [2, 4, 8], patch_dropout=p, dropout_seed=8)
    assert manifest_cells(tmp_path / "d") != kept  # another seed, another draw


def test_no_dropout_keeps_every_patch_and_the_old_dataset_json(tmp_path):
    items = source_images(tmp_path, 3)
    meta = build_patch_dataset(items, tmp_path / "out", [1, 2])
    assert meta["counts"] == {"f1": 3, "f2": 12, "images": 3} and "patch_dropout" not in meta


@pytest.mark.parametrize(("p", "message"), [(1.0, r"in \[0, 1\)"), (-0.1, r"in \[0, 1\)"), (0.99, "no patch at split factor")])
def test_bad_patch_dropout_is_one_clear_error(tmp_path, p, message):
    items = source_images(tmp_path, 2)
    with pytest.raises(InputError, match=message):
        build_patch_dataset(items, tmp_path / "out", [1], patch_dropout=p)
    assert not (tmp_path / "out").exists()


def test_patch_dropout_in_a_config_is_bounded():
    import pydantic

    from stitchkit.patches.config import PatchesConfig

    assert PatchesConfig(patch_dropout=0.25, patch_dropout_seed=3).patch_dropout == 0.25
    with pytest.raises(pydantic.ValidationError, match="patch_dropout"):
        PatchesConfig(patch_dropout=1.0)


# ---- the stitch tool ----------------------------------------------------------------------------------


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_crop_then_stitch_gives_back_every_png_image_exactly(tmp_path):
    items = source_images(tmp_path, 3)
    build_patch_dataset(items, tmp_path / "data", [1, 2, 4, 8])
    written = stitch_folder(tmp_path / "data" / "patches", tmp_path / "stitched")
    assert len(written) == 3 * 4
    for item in items:
        for f in (1, 2, 4, 8):
            np.testing.assert_array_equal(pixels(tmp_path / "stitched" / f"{f}x{f}" / f"{item.key}.png"), pixels(item.file))


def test_missing_cells_are_black_and_the_grid_comes_from_the_folder_name(tmp_path):
    items = source_images(tmp_path, 2)
    build_patch_dataset(items, tmp_path / "data", [4])
    folder = tmp_path / "data" / "patches" / "4x4"
    for cell in ("3_0", "3_1", "3_2", "3_3", "1_2"):  # the whole bottom row and one more: f stays 4 (folder name)
        (folder / f"im0-{cell}.png").unlink()
    stitch_folder(folder, tmp_path / "stitched")
    got, source = pixels(tmp_path / "stitched" / "im0.png"), pixels(items[0].file)  # 32 x 24: cells of 8 x 6
    assert got.shape == source.shape
    assert (got[18:24] == 0).all() and (got[6:12, 16:24] == 0).all()
    np.testing.assert_array_equal(got[:6], source[:6])
    np.testing.assert_array_equal(got[6:12, :16], source[6:12, :16])


def test_outside_a_grid_folder_f_is_the_largest_index_plus_one(tmp_path):
    folder = tmp_path / "loose"
    folder.mkdir()
    tile = np.full((5, 4, 3), 200, dtype=np.uint8)
    Image.fromarray(tile).save(folder / "cat-0_0.png")
    Image.fromarray(tile).save(folder / "cat-2_1-filtered.jpg")  # a trailing -<suffix> is allowed
    (folder / "notes.txt").write_text("not a patch")
    (folder / "cat.png").write_bytes(b"")  # not a patch name: skipped
    stitch_folder(folder, tmp_path / "out")
    got = pixels(tmp_path / "out" / "cat.png")
    assert got.shape == (15, 12, 3)  # 3 x 3 cells of 4 x 5 px
    assert (got[:5, :4] == 200).all() and abs(got[10:15, 4:8].astype(int) - 200).max() <= 3  # JPEG
    assert got[5:10].sum() == 0 and got[:5, 4:].sum() == 0


def test_a_seeded_shuffle_moves_whole_cells_and_repeats_with_the_seed(tmp_path):
    items = source_images(tmp_path, 2)
    build_patch_dataset(items, tmp_path / "data", [4])
    folder = tmp_path / "data" / "patches" / "4x4"
    (folder / "im0-0_0.png").unlink()  # a black cell moves too
    stitch_folder(folder, tmp_path / "a", shuffle=True, seed=3)
    stitch_folder(folder, tmp_path / "b", shuffle=True, seed=3)
    stitch_folder(folder, tmp_path / "c", shuffle=True, seed=4)
    stitch_folder(folder, tmp_path / "plain")

    def cells(image: np.ndarray) -> list[bytes]:
        return [image[r * 6 : (r + 1) * 6, c * 8 : (c + 1) * 8].tobytes() for r in range(4) for c in range(4)]

    for item in items:
        shuffled, plain = pixels(tmp_path / "a" / f"{item.key}.png"), pixels(tmp_path / "plain" / f"{item.key}.png")
        assert sorted(cells(shuffled)) == sorted(cells(plain))  # the same 16 cells (black one included), moved
        assert cells(shuffled) != cells(plain)
        np.testing.assert_array_equal(shuffled, pixels(tmp_path / "b" / f"{item.key}.png"))
    assert any((pixels(tmp_path / "a" / f"{i.key}.png") != pixels(tmp_path / "c" / f"{i.key}.png")).any() for i in items)


def test_stitch_input_errors_are_one_clear_message(tmp_path):
    with pytest.raises(InputError, match="patch folder not found"):
        stitch_folder(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no patch files"):
        stitch_folder(tmp_path / "empty", tmp_path / "out")
    grid = tmp_path / "2x2"
    grid.mkdir()
    Image.new("RGB", (4, 4)).save(grid / "cat-0_0.png")
    Image.new("RGB", (4, 4)).save(grid / "cat-0_0.jpg")
    with pytest.raises(InputError, match=r"both cell \(row 0, col 0\) of 'cat'"):
        stitch_folder(grid, tmp_path / "out")
    (grid / "cat-0_0.jpg").unlink()
    Image.new("RGB", (4, 4)).save(grid / "cat-2_0.png")
    with pytest.raises(InputError, match="outside the 2x2 grid"):
        stitch_folder(grid, tmp_path / "out")
    (grid / "cat-2_0.png").unlink()
    Image.new("RGB", (4, 3)).save(grid / "cat-1_1.png")
    with pytest.raises(InputError, match="differ in size"):
        stitch_folder(grid, tmp_path / "out")


def test_stitching_into_the_patch_folder_or_over_other_images_is_refused(tmp_path):
    items = source_images(tmp_path, 2)
    build_patch_dataset(items, tmp_path / "data", [2])
    patches = tmp_path / "data" / "patches"
    before = sorted(p.relative_to(patches) for p in patches.rglob("*"))
    for inside in (patches, patches / "2x2" / "stitched"):
        with pytest.raises(InputError, match="lies inside --patches"):
            stitch_folder(patches, inside)
    assert sorted(p.relative_to(patches) for p in patches.rglob("*")) == before  # nothing written among the patches

    first = stitch_folder(patches, tmp_path / "out")
    assert stitch_folder(patches, tmp_path / "out", shuffle=True) == first  # the same images again: allowed
    Image.new("RGB", (4, 4)).save(tmp_path / "out" / "2x2" / "old.png")  # left by an earlier stitch of other patches
    with pytest.raises(InputError, match=r"already holds 1 image\(s\) that this stitch does not write \(e.g. .*old.png\)"):
        stitch_folder(patches, tmp_path / "out")


def test_the_stitch_command(tmp_path, capsys):
    from stitchkit.cli import main

    items = source_images(tmp_path, 2)
    build_patch_dataset(items, tmp_path / "data", [2])
    with pytest.raises(SystemExit) as exit_info:
        main(["patches", "stitch", "--patches", str(tmp_path / "data" / "patches"), "--out", str(tmp_path / "out"), "--shuffle", "--seed", "1"])
    assert exit_info.value.code == 0 and "wrote 2 images" in capsys.readouterr().out
    assert (tmp_path / "out" / "2x2" / "im1.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["patches", "stitch", "--patches", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2")])
    assert exit_info.value.code == 2 and "patch folder not found" in capsys.readouterr().err
