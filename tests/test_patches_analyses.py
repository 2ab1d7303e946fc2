"""The visual-stitching paper's auxiliary analyses (visual_stitching.md §5: patch localization, Threshold-x) and
filters as plug-ins from a config (§6, §9 `kind: python`)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_patches import ScriptedVLM
from vlm_tiny import tiny_llava_onevision

from stitchkit.config import validate_config
from stitchkit.errors import ConfigError
from stitchkit.patches.analyses import patch_localization, patch_ranks, threshold_keeps
from stitchkit.patches.config import PatchesConfig
from stitchkit.patches.dataset import read_names
from stitchkit.patches.filters import Verdict
from stitchkit.patches.moderation import cut_all, filter_patches, make_filter, pass_rates
from stitchkit.patches.shapes import ModerationSet, render_moderation_set
from stitchkit.vlm import load_vlm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- patch localization -------------------------------------------------------------------------------

# Candidate scores of four patches of images a and b (names in the order of the images a, b, c):
# (first-token logits, full log-probabilities). The true name of an a-patch is candidate 0, of a b-patch 1.
PATCH_SCORES = {
    "a-0_0": ([3, 1, 2], [-1, -2, -3]),  # logit rank 0               log-prob rank 0
    "a-0_1": ([1, 3, 2], [-1, -2, -3]),  # logit rank 2               log-prob rank 0
    "b-0_0": ([2, 2, 1], [-1, -2, -3]),  # logit: 0 above, 1 tie: 0.5  log-prob rank 1
    "b-0_1": ([3, 1, 2], [-3, -1, -2]),  # logit rank 2               log-prob rank 0
}


def localization_inputs(names):
    images = [{"key": key, "name": name, "image": key} for key, name in zip("abc", names)]
    # the stand-in scores by image, so each patch's "image" is its name
    patches = [{"key": n[0], "row": int(n[2]), "col": int(n[4]), "image": n} for n in PATCH_SCORES]
    return images, patches


@pytest.mark.parametrize(
    ("names", "rule", "mean_rank", "ranks"),
    [
        # distinct first tokens: the first-token logit, as the pre-check: (0 + 2 + 0.5 + 2) / 4
        (["star", "circle", "square"], "logit", 1.125, [0, 2, 0.5, 2]),
        # " red star" / " red circle" share their first token: full log-probability, (0 + 0 + 1 + 0) / 4
        (["red star", "red circle", "blue square"], "logprob", 0.25, [0, 0, 1, 0]),
    ],
)
def test_patch_localization_gives_the_hand_computed_mean_rank_by_the_prechecks_rule(names, rule, mean_rank, ranks):
    images, patches = localization_inputs(names)
    result = patch_localization(ScriptedVLM(PATCH_SCORES), images, patches, "The shape shown is", "mid")
    assert (result["rule"], result["mean_rank"], result["patches"]) == (rule, mean_rank, 4)
    assert result["mean_ranks"] == {"logit": 1.125, "logprob": 0.25} and result["random"] == 1.0
    assert patch_ranks(result) == dict(zip(PATCH_SCORES, ranks))  # keyed by the official patch file stem


def test_patch_localization_with_strict_ties():
    images, patches = localization_inputs(["star", "circle", "square"])
    result = patch_localization(ScriptedVLM(PATCH_SCORES), images, patches, "The shape shown is", "strict")
    assert result["mean_rank"] == (0 + 2 + 0 + 2) / 4  # the tie of b-0_0 no longer counts


# ---- Threshold-x --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "kept"),
    [
        (0, [True] * 6),  # x = 0 keeps every patch
        (1, [False, True, False, True, True, False]),  # rank 0 and 0.5 reveal the image: dropped
        (2, [False, True, False, False, True, False]),
        (3, [False, False, False, False, True, False]),
        (4, [False] * 6),
    ],
)
def test_threshold_x_keeps_exactly_the_patches_whose_name_ranks_at_x_or_worse(x, kept):
    # §5: "drop the patches whose correct reference already ranks below x" (rank 0 is the best)
    assert threshold_keeps([0, 2, 0.5, 1, 3, 0], x) == kept


def test_analyses_settings_are_checked():
    shapes = {"shapes": {"shapes": {"images": 3, "size": 32}}}
    cfg = validate_config(PatchesConfig, {"image_sets": shapes, "analyses": {"threshold_x": 2}})
    assert cfg.analyses.threshold_x == [2]  # one value or a list
    assert cfg.analyses.localization_splits([1, 2]) == [1, 2]  # Threshold-x needs the ranks where it trains
    assert validate_config(PatchesConfig, {}).analyses.localization_splits([1, 2, 4, 8]) == []  # off by default
    with pytest.raises(ConfigError, match="threshold_splits must be distinct split factors"):
        validate_config(PatchesConfig, {"splits": [1, 2], "analyses": {"threshold_x": [0, 1], "threshold_splits": [4]}})
    with pytest.raises(ConfigError, match="threshold values repeat"):
        validate_config(PatchesConfig, {"analyses": {"threshold_x": [1, 1]}})
    no_prompt = {"shapes": {"shapes": {"images": 3, "size": 32}, "recognition_prompt": None}}
    with pytest.raises(ConfigError, match=r"set\(s\) \['shapes'\] do not have: give them a recognition_prompt"):
        validate_config(PatchesConfig, {"image_sets": no_prompt, "analyses": {"patch_localization": True}})


# ---- filters as plug-ins ------------------------------------------------------------------------------


class FlagEverything:
    """A plug-in filter: every image is flagged."""

    name = "flag everything"

    def __init__(self, score: float = 1.0):
        self.score = score

    def __call__(self, images):
        return [Verdict(True, self.score) for _ in images]


NOT_CALLABLE = 3


def not_a_filter():
    return "a string"


def flag_everything_but_one(images):
    return [Verdict(True, 1.0) for _ in images[1:]]


def answers_with_bools(images):
    return [True for _ in images]


def returns_nothing(images):
    return None


class Crashes:
    name = "crashes"

    def __call__(self, images):
        raise RuntimeError("the moderation API is down")


def crashing_factory(threshold: float = 0.5):
    raise ValueError(f"threshold {threshold} is not calibrated")


def python_filter(target: str, **options) -> dict:
    return {"kind": "python", "target": target, "options": options}


def test_a_python_filter_from_the_config_is_used_and_flags_every_patch(tmp_path):
    settings = {"moderation": {"filter": python_filter(f"{__name__}:FlagEverything", score=0.7)}}
    filt = make_filter(validate_config(PatchesConfig, settings).moderation.filter)
    assert isinstance(filt, FlagEverything) and filt.score == 0.7  # the options are the call's keyword arguments
    names = render_moderation_set(ModerationSet(per_category=1, size=64, markers=4, marker_scale=0.12), tmp_path)
    verdicts = filter_patches(filt, cut_all(read_names(names, tmp_path), [1, 2, 4], "png"))
    rates = pass_rates(verdicts)
    # two marker images (A01, B01): 2 f^2 patches, none passing
    assert rates == {f: {"passed": 0, "total": 2 * f * f, "rate": 0.0} for f in (1, 2, 4)}
    assert all(c["score"] == 0.7 for cells in verdicts[2].values() for c in cells)


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ("no_such_module_here:make", {}, "cannot import module 'no_such_module_here'"),
        (f"{__name__}:NoSuchFilter", {}, "has no attribute 'NoSuchFilter'"),
        (f"{__name__}:NOT_CALLABLE", {}, "'NOT_CALLABLE' is a int, not a callable"),
        (f"{__name__}:not_a_filter", {}, "returned a str, not a moderation filter"),
        (f"{__name__}:FlagEverything", {"colour": "red"}, "options do not fit"),
    ],
)
def test_a_python_filter_that_cannot_be_made_is_one_clear_error(target, options, message):
    cfg = validate_config(PatchesConfig, {"moderation": {"filter": python_filter(target, **options)}})
    with pytest.raises(ConfigError, match=message):
        make_filter(cfg.moderation.filter)


def test_filter_options_that_do_not_fit_are_refused_before_the_run_starts():
    from stitchkit.patches.moderation import check_filter

    settings = validate_config(PatchesConfig, {"moderation": {"filter": python_filter(f"{__name__}:FlagEverything", treshold=150)}})
    with pytest.raises(ConfigError, match=r"options do not fit .*FlagEverything.*unexpected keyword argument 'treshold'"):
        check_filter(settings.moderation.filter)
    check_filter(validate_config(PatchesConfig, {"moderation": {"filter": python_filter(f"{__name__}:FlagEverything", score=2)}}).moderation.filter)


def test_filter_options_that_do_not_fit_exit_2_before_the_run_folder_exists(tmp_path, capsys):
    import yaml

    from stitchkit.cli import main

    config = tmp_path / "bad.yaml"
    filt = python_filter(f"{__name__}:FlagEverything", treshold=150)
    config.write_text(yaml.safe_dump({"model": {"source": str(tmp_path / "no_model")}, "moderation": {"filter": filt}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["patches", "run", str(config), "--out", str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "moderation.filter.options do not fit" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("filt", "message"),
    [
        (answers_with_bools, r"filter 'answers_with_bools' returned True \(bool\) for image 1 of 4, not a Verdict\(flagged, score\)"),
        (returns_nothing, r"filter 'returns_nothing' returned a NoneType, not a list of Verdict"),
        (Crashes(), r"filter 'crashes' raised RuntimeError: the moderation API is down"),
    ],
)
def test_a_filter_that_raises_or_returns_no_verdicts_is_one_error_naming_it(filt, message):
    with pytest.raises(ConfigError, match=message) as error:
        filter_patches(filt, {2: {"A01": cut_all_stub(4)}})
    if isinstance(filt, Crashes):
        assert isinstance(error.value.__cause__, RuntimeError)  # the plug-in's traceback, for --debug


def test_a_filter_factory_that_raises_is_one_error_naming_it():
    cfg = validate_config(PatchesConfig, {"moderation": {"filter": python_filter(f"{__name__}:crashing_factory", threshold=0.2)}})
    with pytest.raises(ConfigError, match=r"crashing_factory' raised ValueError when called: threshold 0.2 is not calibrated"):
        make_filter(cfg.moderation.filter)


def test_a_python_filter_target_must_name_module_and_callable():
    with pytest.raises(ConfigError, match="moderation.filter.python.target: .*'module:callable'"):
        validate_config(PatchesConfig, {"moderation": {"filter": python_filter("my_filters")}})


def test_a_filter_that_loses_verdicts_is_refused():
    patches = {2: {"A01": cut_all_stub(4)}}
    with pytest.raises(ConfigError, match="gave 3 verdicts for 4 images"):
        filter_patches(flag_everything_but_one, patches)


def cut_all_stub(n: int):
    from stitchkit.patches.dataset import Patch

    return [Patch(0, i, (0, 0, 1, 1), Image.new("RGB", (4, 4))) for i in range(n)]


def test_a_missing_filter_module_exits_2_before_the_run_folder_exists(tmp_path, capsys):
    import yaml

    from stitchkit.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"moderation": {"filter": python_filter("no_such_module_here:make")}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["patches", "run", str(config), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "cannot import module 'no_such_module_here'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- end to end ---------------------------------------------------------------------------------------


def test_patches_run_with_the_analyses_and_a_python_filter(tmp_path):
    from stitchkit.patches.experiment import run_patches

    load_vlm(*tiny_llava_onevision()).save_pretrained(tmp_path / "model")
    config = {
        "model": {"source": str(tmp_path / "model")},
        "splits": [1, 2],
        "image_sets": {"shapes": {"shapes": {"images": 3, "size": 32}}},
        "train": {"lr": 1e-2, "batch_size": 2, "epochs": {1: 2}, "default_epochs": 1, "seeds": [1], "eval_points": 1},
        "analyses": {"patch_localization": True, "threshold_x": [0, 1, 3], "threshold_splits": [2]},
        "moderation": {"images": {"per_category": 1, "size": 64, "markers": 4, "marker_scale": 0.12}, "splits": [2],
                       "arrangements": [1], "filter": python_filter(f"{__name__}:FlagEverything"),
                       "train": {"lr": 1e-2, "batch_size": 2, "epochs": {2: 1}, "seeds": [1], "eval_points": 1}},
    }  # fmt: skip
    cfg = validate_config(PatchesConfig, config)
    run = tmp_path / "run"
    report = run_patches(cfg, run)
    results = json.loads((run / "results.json").read_text())
    shapes = results["sets"]["shapes"]

    # patch localization at every split factor: one rank per patch, averaged
    assert set(shapes["localization"]) == {"1", "2"}
    for f, patches in (("1", 3), ("2", 12)):
        stored = json.loads((run / "localization" / "shapes" / f"f{f}.json").read_text())
        ranks = list(patch_ranks(stored).values())
        assert shapes["localization"][f]["patches"] == len(ranks) == patches
        assert shapes["localization"][f]["mean_rank"] == pytest.approx(sum(ranks) / patches)
        assert shapes["localization"][f]["rule"] == shapes["precheck"]["rule"]  # the pre-check's ranking rule
    # at f = 1 the single patch is the full image (the source file's bytes): exactly the recognition pre-check
    assert shapes["localization"]["1"]["mean_rank"] == shapes["precheck"]["mean_rank"]

    # Threshold-x at f = 2 only: x = 0 is the main training; x = 3 drops every patch (3 names: ranks <= 2)
    ranks = list(patch_ranks(json.loads((run / "localization" / "shapes" / "f2.json").read_text())).values())
    threshold = shapes["threshold_x"]
    assert set(threshold) == {"0", "1", "3"} and all(set(t) == {"2"} for t in threshold.values())
    assert threshold["0"]["2"]["trained_in"] == "train/shapes/f2"
    assert threshold["0"]["2"]["final_mean"] == shapes["splits"]["2"]["final_mean"]
    assert threshold["3"]["2"] == {"patches_kept": 0, "patches_total": 12, "trained_in": None,
                                   "note": "every patch ranks below x = 3: nothing to train"}  # fmt: skip
    kept = sum(rank >= 1 for rank in ranks)
    assert 0 < kept < 12  # the untrained model places some patches' names first, not all
    one = threshold["1"]["2"]
    assert (one["patches_kept"], one["train_samples"], one["trained_in"]) == (kept, kept, "threshold/shapes/x1/f2")
    assert json.loads((run / "threshold" / "shapes" / "x1" / "f2" / "seed1" / "result.json").read_text())["samples"] == kept

    # the plug-in filter flags everything: nothing passes at any f, and the filtered training has no data
    moderation = results["moderation"]
    assert {f: r["rate"] for f, r in moderation["pass_rates"].items()} == {"1": 0.0, "2": 0.0}
    assert moderation["arrangements"]["1"]["splits"]["2"]["filtered"]["train_samples"] == 0

    text = report.read_text()
    assert "Patch localization before fine-tuning" in text and "Threshold-x (§5, Fig. 5)" in text
    assert f"| shapes | 1 | 2 | {kept}/12 |" in text and "| shapes | 3 | 2 | 0/12 | every patch ranks below" in text
    for figure in ("patches_localization_shapes.png", "patches_threshold_shapes.png"):
        assert (run / "figures" / figure).is_file()

    # a second run skips every finished step and gives the same results
    def steps():  # every step but the report, which is written again each time
        return {k: v for k, v in json.loads((run / "manifest.json").read_text())["steps"].items() if k != "report"}

    finished = steps()
    assert {"localization/shapes/f1", "localization/shapes/f2", "threshold/shapes/x1/f2/seed1"} <= set(finished)
    run_patches(cfg, run)
    assert json.loads((run / "results.json").read_text()) == results
    assert steps() == finished
