"""The stitching report's figures and the tree's timing, on hand-made results (the numbers are the oracle)."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stitchkit.stitching import report, tree_run

CLASSES = 130


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the report saves, by file name, still open for inspection (save_figure closes them)."""
    import matplotlib.pyplot as plt

    figures = {}

    def keep(fig, path, dpi=120):
        figures[Path(path).name] = fig
        return Path(path)

    monkeypatch.setattr("stitchkit.runs.save_figure", keep)
    yield figures
    for fig in figures.values():
        plt.close(fig)


def cell(source: str, target: str, objective: str, point: int, seed: int, score: float, profile=None) -> dict:
    return {
        "source": source, "target": target, "stitch": "mlp-relu", "objective": objective, "point": point,
        "target_point": point, "seed": seed, "self_stitch": source == target, "score_test": score,
        "distance_final_rel": score / 100, "profile_rel": profile,
    }  # fmt: skip


# Two seeds of every cell: (source, target) -> objective -> point -> scores.
SCORES = {
    ("dino", "clip"): {"tlt": {1: [10.0, 14.0], 3: [20.0, 21.0]}, "ffm_tlt": {1: [30.0, 26.0], 3: [8.0, 9.0]}},
    ("clip", "clip"): {"tlt": {1: [40.0, 44.0], 3: [50.0, 52.0]}, "ffm_tlt": {1: [45.0, 47.0], 3: [51.0, 55.0]}},
    ("dino", "dino"): {"tlt": {1: [5.0, 6.0], 3: [7.0, 9.0]}, "ffm_tlt": {1: [11.0, 12.0], 3: [13.0, 17.0]}},
}
PROBES = [{"model": "dino", "score_test": 15.0}, {"model": "dino", "score_test": 17.0},
          {"model": "clip", "score_test": 60.0}, {"model": "clip", "score_test": 62.0}]  # fmt: skip


def cells_of(scores: dict, seeds: int = 2) -> list[dict]:
    return [
        cell(source, target, objective, point, seed, values[seed])
        for (source, target), by_objective in scores.items()
        for objective, by_point in by_objective.items()
        for point, values in by_point.items()
        for seed in range(seeds)
    ]


def series(ax) -> dict[str, tuple[list, list, list | None]]:
    """label -> (xs, ys, half-widths of the error bars or None) of an axes' errorbar series."""
    found = {}
    for container in ax.containers:
        line, _, bars = container.lines
        errors = [abs(seg[1][1] - seg[0][1]) / 2 for seg in bars[0].get_segments()] if bars else None
        found[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), errors)
    return found


def reference_lines(ax) -> dict[str, tuple[float, str]]:
    """label -> (height, line style) of an axes' horizontal reference lines (axhline: x from 0 to 1 in axes units)."""
    return {
        line.get_label(): (line.get_ydata()[0], line.get_linestyle())
        for line in ax.get_lines()
        if list(line.get_xdata()) == [0, 1] and not line.get_label().startswith("_")
    }


def test_score_figure_puts_a_cross_pair_beside_its_self_stitch_controls(tmp_path, drawn):
    """One figure per cross pair, one panel per objective: the cross stitch and both self-stitch controls in the
    same axes with ± sample std over seeds, integer ticks at the stitch points, probes and chance as horizontal
    reference lines (not data series that could hide a stitch's point)."""
    paths = report.write_figures(cells_of(SCORES), PROBES, [1, 3], tmp_path, "top-1 accuracy (%)", 100 / CLASSES)
    assert [p.name for p in paths] == ["score_dino--clip--mlp-relu.png", "final_distance_dino--clip--mlp-relu.png"]
    axes = [ax for ax in drawn["score_dino--clip--mlp-relu.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["TLT (none)", "FFM→TLT"]
    labels = {("dino", "clip"): "dino→clip", ("clip", "clip"): "clip→clip (self, same target)",
              ("dino", "dino"): "dino→dino (self, same source)"}  # fmt: skip
    for ax, objective in zip(axes, ("tlt", "ffm_tlt")):
        assert list(ax.get_xticks()) == [1, 3]
        drawn_series = series(ax)
        assert set(drawn_series) == set(labels.values())
        for pair, label in labels.items():
            xs, ys, errors = drawn_series[label]
            by_point = SCORES[pair][objective]
            assert xs == [1, 3]
            assert ys == pytest.approx([statistics.fmean(by_point[n]) for n in (1, 3)])
            assert errors == pytest.approx([statistics.stdev(by_point[n]) for n in (1, 3)])
        lines = reference_lines(ax)
        assert lines["probe dino"] == (pytest.approx(16.0), "--") and lines["probe clip"] == (pytest.approx(61.0), "--")
        assert lines[f"chance ({100 / CLASSES:.2g}%)"][0] == pytest.approx(100 / CLASSES)


def test_one_seed_draws_no_error_bars_and_a_lone_self_stitch_gets_its_own_figure(tmp_path, drawn):
    scores = {("dino", "clip"): {"tlt": {2: [12.0]}}, ("siglip", "siglip"): {"tlt": {2: [33.0]}}}
    paths = report.write_figures(cells_of(scores, seeds=1), [], [2], tmp_path, "top-1 accuracy (%)")
    assert {p.name for p in paths} == {f"{kind}_{pair}--mlp-relu.png" for kind in ("score", "final_distance")
                                       for pair in ("dino--clip", "siglip--siglip")}  # fmt: skip
    (ax,) = [ax for ax in drawn["score_dino--clip--mlp-relu.png"].axes if ax.get_visible()]
    assert series(ax) == {"dino→clip": ([2], [12.0], None)} and list(ax.get_xticks()) == [2]
    assert reference_lines(ax) == {}  # no probes ran, and no chance level was given


def test_profile_figure_draws_lfm_and_ffm_through_the_target_blocks(tmp_path, drawn):
    """The per-block distance D_k / Var from the stitch point to the last target block, LFM solid and FFM dashed,
    one panel per stitch point; on a log scale when it spans orders of magnitude (the paper's LFM: tiny at the
    stitch point, large at the end)."""
    lfm, ffm = [1e-3, 1e-2, 0.5, 2.0], [0.2, 0.2, 0.15, 0.1]
    cells = [cell("dino", "clip", "lfm", 2, 0, 5.0, lfm), cell("dino", "clip", "ffm", 2, 0, 6.0, ffm),
             cell("dino", "clip", "tlt", 2, 0, 7.0, [9.0, 9.0, 9.0, 9.0])]  # fmt: skip
    paths = report.write_figures(cells, [], [2], tmp_path, "top-1 accuracy (%)")
    assert paths[-1].name == "profile_dino--clip--mlp-relu.png"
    (ax,) = [ax for ax in drawn["profile_dino--clip--mlp-relu.png"].axes if ax.get_visible()]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"dino→clip, LFM + head", "dino→clip, FFM + head"}  # TLT's profile is not the claim's
    for name, values, style in (("LFM", lfm, "-"), ("FFM", ffm, "--")):
        line = lines[f"dino→clip, {name} + head"]
        assert list(line.get_xdata()) == [2, 3, 4, 5] and list(line.get_ydata()) == values and line.get_linestyle() == style
    assert ax.get_yscale() == "log" and list(ax.get_xticks()) == [2, 3, 4, 5]


def test_tree_figure_labels_every_point_with_its_n(tmp_path, drawn):
    by_point = {1: [{"extra_blocks": 0.8, "score_test": 19.0}, {"extra_blocks": 0.8, "score_test": 21.0}],
                4: [{"extra_blocks": 0.2, "score_test": 18.0}, {"extra_blocks": 0.2, "score_test": 18.5}]}  # fmt: skip
    report.tree_figure(tmp_path / "tree.png", "tree", by_point, ("dino alone", [17.0, 16.0]),
                       ("all models in full", 1.0, [21.0, 22.0]), "top-1 accuracy (%)", 100 / CLASSES)  # fmt: skip
    (ax,) = drawn["tree.png"].axes
    notes = {text.get_text(): text.xy for text in ax.texts}
    assert notes == {"n=1": (pytest.approx(80.0), pytest.approx(20.0)), "n=4": (pytest.approx(20.0), pytest.approx(18.25))}
    xs, _, errors = series(ax)["VST-n"]
    assert xs == pytest.approx([80.0, 20.0]) and errors == pytest.approx([statistics.stdev([19, 21]), statistics.stdev([18, 18.5])])
    assert series(ax)["dino alone"][:2] == ([0.0], [16.5])


def test_tree_times_the_trunk_and_a_variant_in_turns(monkeypatch):
    """A/B/A/B: every round times the trunk alone and then the variant, so a change in machine load reaches both;
    the extra time is the median of the rounds' ratios. A fake clock makes each forward take a set time."""
    clock = {"now": 0.0}
    calls = []
    # Per round (the first warms up): the machine slows down 4x over the rounds, the variant always costs 1.5x.
    single_times, other_times = [9.0, 1.0, 2.0, 4.0], [9.0, 1.5, 3.0, 6.0]

    def forward(name, times):
        def run(pixels):
            clock["now"] += times[sum(1 for c in calls if c == name)]
            calls.append(name)

        return run

    monkeypatch.setattr(tree_run.time, "perf_counter", lambda: clock["now"])
    experiment = SimpleNamespace(cfg=SimpleNamespace(timing_batches=3), device=torch.device("cpu"))
    pixels = {"dino": torch.zeros(2, 3, 8, 8)}  # a batch of 2: times are per image
    timing = tree_run.TreeExperiment.time_forward(experiment, forward("single", single_times), forward("other", other_times), pixels)
    assert calls == ["single", "other"] * 4
    assert timing["single_seconds_per_image"] == pytest.approx(np.median(single_times[1:]) / 2)
    assert timing["seconds_per_image"] == pytest.approx(np.median(other_times[1:]) / 2)
    assert timing["extra_time"] == pytest.approx(0.5) and timing["extra_time_range"] == pytest.approx([0.5, 0.5])
