"""`stitchkit binding analyze --model M --out DIR`: the mechanistic analysis of one model, ours or pretrained.

For a pretrained LLM or VLM (binding.md §8) the prompts are natural language (subjects.WordSubject) and the
interventions and probes run as on our model; knockouts need the token format's positions and run on our
models only. The peak layer (argmax of positional + symbolic share) is reported for comparing an LLM with its VLM;
`base_peak_layer` (the base LLM's peak, §7.2) adds R and the shares at that layer, so the VLM's report holds both
its own peak and the base's layer. A model that answers fewer than interventions.MIN_PAIRS pairs right has not
learned the task at that N: it gets no peak layer and no shares ("n/a"), and a warning says so; so does an N
outside the context sizes one of our models was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stitchkit.binding.interventions import enough_pairs, not_learned_warning, pairs_note, peak_layer, run_interventions
from stitchkit.binding.probes import run_probes
from stitchkit.binding.subjects import TokenSubject, load_subject
from stitchkit.engine.devices import pick_device
from stitchkit.errors import ConfigError
from stitchkit.report import markdown_table
from stitchkit.runs import RunDir, atomic_write_json, atomic_write_text


def analyze_subject(
    spec: str, out: str | os.PathLike, ns: list[int], pairs: int | None = None, probe_examples: int | None = None,
    knockouts: bool = True, seed: int = 0, device: str = "auto", command: str | None = None,
    knockout_label_layer: int | None = None, chat_template: bool = False, knockout_examples: int | None = None,
    base_peak_layer: int | None = None, trust_remote_code: bool = False, knockout_window: int | None = None,
) -> Path:  # fmt: skip
    """Interventions, probes and (our models) knockouts of one model. `pairs`, `probe_examples`,
    `knockout_examples` and `knockout_window` default to a binding config's `analysis` settings, so `binding analyze`
    and `binding run` measure alike; `base_peak_layer` (the base LLM's peak, §7.2) adds R and the shares at that
    layer to the report; `trust_remote_code` goes to from_pretrained (subjects.load_subject)."""
    from stitchkit.binding.config import AnalysisSettings
    from stitchkit.binding.knockouts import read_out_layer, run_knockouts
    from stitchkit.binding.report import analysis_figures, warn

    defaults = AnalysisSettings()
    pairs = defaults.pairs if pairs is None else pairs
    probe_examples = defaults.probe_examples if probe_examples is None else probe_examples
    knockout_examples = defaults.knockout_examples if knockout_examples is None else knockout_examples
    knockout_window = defaults.knockout_window if knockout_window is None else knockout_window
    if any(n < 4 for n in ns):
        raise ConfigError(f"--n: interchange interventions need N >= 4, got {ns}")
    subject = load_subject(spec, str(pick_device(device)), chat_template, trust_remote_code)
    read_out_layer(knockout_label_layer, subject.layers, "--knockout-label-layer")  # before the run folder exists
    if base_peak_layer is not None:
        read_out_layer(base_peak_layer, subject.layers, "--peak-layer")
    too_big = [n for n in ns if n > subject.vocab.max_objects]
    if too_big:
        raise ConfigError(f"--n {too_big}: this model's prompt vocabulary allows at most {subject.vocab.max_objects} objects "
                          f"({subject.vocabulary_counts})")
    settings = {"model": spec, "n": ns, "pairs": pairs, "probe_examples": probe_examples, "seed": seed}
    if knockout_label_layer is not None:  # only when given, so earlier analysis folders still match their settings
        settings["knockout_label_layer"] = knockout_label_layer
    if chat_template:  # likewise
        settings["chat_template"] = True
    if base_peak_layer is not None:  # likewise
        settings["peak_layer"] = base_peak_layer
    if trust_remote_code:  # likewise
        settings["trust_remote_code"] = True
    if knockout_examples != probe_examples:  # earlier folders ran their knockouts on probe_examples examples
        settings["knockout_examples"] = knockout_examples
    if knockout_window != defaults.knockout_window:  # earlier folders ran the default window
        settings["knockout_window"] = knockout_window
    outside = outside_training_warning(subject, ns)
    warnings = [outside] if outside else []
    if outside:  # before the long part, so a log shows it at once
        warn(outside)
    run = RunDir(out, config=settings, command=command)
    v = subject.vocab
    result: dict[str, Any] = {
        "model": spec, "layers": subject.layers, "vocab": {"colours": v.colours, "shapes": v.shapes, "items": v.items},
        "train_objects": list(subject.train_objects) if subject.train_objects else None,
        "base_peak_layer": base_peak_layer, "interventions": {}, "probes": {}, "knockouts": None,
    }  # fmt: skip
    for n in ns:
        inter = run_interventions(subject, n, pairs, seed)
        inter["peak_layer"] = peak_layer(inter["layers"][1:-1]) if enough_pairs(inter) else None
        result["interventions"][str(n)] = inter
        result["probes"][str(n)] = run_probes(subject, n, probe_examples, seed)
        if not enough_pairs(inter):
            warnings.append(not_learned_warning(inter, "the model"))
            warn(warnings[-1])
    if knockouts and isinstance(subject, TokenSubject):
        result["knockouts"] = run_knockouts(
            subject.model, ns[0], knockout_examples, seed, window=knockout_window, pairs=pairs, label_layer=knockout_label_layer
        )
    atomic_write_json(run.path("analysis.json"), result)
    figures = analysis_figures(result, run.root / "figures", run.root)
    atomic_write_text(run.path("report.md"), analysis_markdown(result, warnings, figures, run.root))
    run.finish("analysis")
    return run.path("report.md")


def outside_training_warning(subject, ns: list[int]) -> str | None:
    """Our models know the context sizes they were trained on (binding.json): N outside them is out of
    distribution, where a model that is perfect in distribution may still answer at chance."""
    if subject.train_objects is None:
        return None
    lo, hi = subject.train_objects
    outside = [n for n in ns if not lo <= n <= hi]
    if not outside:
        return None
    return (f"--n {outside}: the model was trained on N = {lo}..{hi} (binding.json), so these contexts are out of "
            f"distribution; its mechanism there may not be the one it learned (pass --n within {lo}..{hi} for that)")


def analysis_markdown(result: dict[str, Any], warnings: list[str], figures: list[Path], link_base: Path) -> str:
    """report.md of `binding analyze`: what was analysed, warnings, the mechanism per N, the knockouts, figures."""
    v, trained = result["vocab"], result.get("train_objects")
    about = (f"{result['layers']} layers (patched sites 0..{result['layers']}, {result['layers']} = resid_post); "
             f"prompt vocabulary {v['colours']} colours, {v['shapes']} shapes, {v['items']} items"
             + (f"; trained on N = {trained[0]}..{trained[1]}" if trained else ""))  # fmt: skip
    parts = [f"# Binding analysis of `{result['model']}`\n\n{about}.\n\n"]
    parts += [f"**Warning:** {line}.\n\n" for line in warnings]
    parts.append(markdown_table(mechanism_rows(result), digits=2))
    parts.append("\naccuracy: the candidates' originals answered right, choosing among their N listed items (chance 1/N); "
                 "pairs: candidates also answered right as counterfactuals, the pairs the shares are over.\n")  # fmt: skip
    knockouts = result["knockouts"]
    if knockouts and knockouts["windows"]:
        parts.append(f"\nKnockouts (N = {knockouts['n']}, {knockouts['window']}-layer windows, {knockouts['examples']} "
                     f"examples; argmax over the whole vocabulary, as in evaluation): accuracy {100 * knockouts['baseline']:.1f}% "
                     "unmodified; change in points with each edge set blocked in each window of layers:\n\n")  # fmt: skip
        parts.append(markdown_table(knockout_rows(knockouts), digits=1))
    parts.append("\n" + "".join(f"![{f.stem}]({f.relative_to(link_base)})\n\n" for f in figures))
    return "".join(parts)


def mechanism_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per N: accuracy, pairs, the peak layer and the shares there (and at the base's peak layer), the
    binding signature; "n/a (k of M pairs)" where the pairs are too few to report shares."""
    base = result["base_peak_layer"]
    rows = []
    def shares(inter: dict[str, Any], layer: int | None) -> tuple:
        """Positional %, symbolic % and R at `layer`: n/a without enough pairs, – without a layer."""
        if not enough_pairs(inter):
            return ("n/a",) * 3
        if layer is None:
            return (None,) * 3
        at = inter["layers"][layer]
        return 100 * at["positional"], 100 * at["symbolic"], at["ratio"]

    for n, inter in result["interventions"].items():
        peak = inter["peak_layer"] if enough_pairs(inter) else f"n/a ({pairs_note(inter)})"
        row = {"N": n, "accuracy %": 100 * inter["accuracy"] if "accuracy" in inter else None, "candidates": inter["candidates"],
               "pairs": inter["pairs"], "peak layer": peak}  # fmt: skip
        row |= dict(zip(("positional %", "symbolic %", "R at peak"), shares(inter, inter["peak_layer"])))
        if base is not None:
            row |= dict(zip((f"positional % at {base}", f"symbolic % at {base}", f"R at {base}"), shares(inter, base)))
        rows.append({**row, "binding signature": "yes" if result["probes"][n]["signature"]["present"] else "no"})
    return rows


def knockout_rows(knockouts: dict[str, Any]) -> list[dict[str, Any]]:
    """Δ accuracy (points) per edge set (rows) and knocked-out window (columns)."""
    rows: dict[str, dict[str, Any]] = {}
    for w in knockouts["windows"]:
        row = rows.setdefault(w["set"], {"edge set": w["set"], "edges": knockouts["edge_sets"][w["set"]]})
        row[f"L{w['layers'][0]}-{w['layers'][1]}"] = 100 * w["delta"]
    return list(rows.values())
