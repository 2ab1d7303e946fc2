"""`stitchkit binding analyze --model M --out DIR`: the mechanistic analysis of one model, ours or pretrained.

For a pretrained LLM or VLM (binding.md §8) the prompts are natural language (subjects.WordSubject) and the
interventions and probes run as on our model; knockouts need the token format's positions and run on our
models only. The peak layer (argmax of positional + symbolic share) is reported for comparing an LLM with its VLM;
`base_peak_layer` (the base LLM's peak, §7.2) adds R and the shares at that layer, so the VLM's report holds both
its own peak and the base's layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stitchkit.binding.interventions import peak_layer, run_interventions
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
    base_peak_layer: int | None = None, trust_remote_code: bool = False,
) -> Path:  # fmt: skip
    """Interventions, probes and (our models) knockouts of one model. `pairs`, `probe_examples` and
    `knockout_examples` default to a binding config's `analysis` settings, so `binding analyze` and `binding run`
    measure alike; `base_peak_layer` (the base LLM's peak, §7.2) adds R and the shares at that layer to the report;
    `trust_remote_code` goes to from_pretrained (subjects.load_subject)."""
    from stitchkit.binding.config import AnalysisSettings
    from stitchkit.binding.knockouts import read_out_layer, run_knockouts
    from stitchkit.binding.report import analysis_figures

    defaults = AnalysisSettings()
    pairs = defaults.pairs if pairs is None else pairs
    probe_examples = defaults.probe_examples if probe_examples is None else probe_examples
    knockout_examples = defaults.knockout_examples if knockout_examples is None else knockout_examples
    if any(n < 4 for n in ns):
        raise ConfigError(f"--n: interchange interventions need N >= 4, got {ns}")
    subject = load_subject(spec, str(pick_device(device)), chat_template, trust_remote_code)
    read_out_layer(knockout_label_layer, subject.layers, "--knockout-label-layer")  # before the run folder exists
    if base_peak_layer is not None:
        read_out_layer(base_peak_layer, subject.layers, "--peak-layer")
    too_big = [n for n in ns if n > subject.vocab.max_objects]
    if too_big:
        raise ConfigError(f"--n {too_big}: this model's prompt vocabulary allows at most {subject.vocab.max_objects} objects")
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
    run = RunDir(out, config=settings, command=command)
    result: dict[str, Any] = {"model": spec, "layers": subject.layers, "base_peak_layer": base_peak_layer, "interventions": {}, "probes": {}, "knockouts": None}
    for n in ns:
        inter = run_interventions(subject, n, pairs, seed)
        inter["peak_layer"] = peak_layer(inter["layers"][1:-1])
        result["interventions"][str(n)] = inter
        result["probes"][str(n)] = run_probes(subject, n, probe_examples, seed)
    if knockouts and isinstance(subject, TokenSubject):
        result["knockouts"] = run_knockouts(subject.model, ns[0], knockout_examples, seed, pairs=pairs, label_layer=knockout_label_layer)
    atomic_write_json(run.path("analysis.json"), result)
    rows = []
    for n, inter in result["interventions"].items():
        peak = inter["layers"][inter["peak_layer"]]
        row = {"N": n, "pairs": inter["pairs"], "peak layer": inter["peak_layer"], "positional %": 100 * peak["positional"],
               "symbolic %": 100 * peak["symbolic"], "R at peak": peak["ratio"]}  # fmt: skip
        if base_peak_layer is not None:
            at = inter["layers"][base_peak_layer]
            row |= {f"positional % at {base_peak_layer}": 100 * at["positional"], f"symbolic % at {base_peak_layer}": 100 * at["symbolic"],
                    f"R at {base_peak_layer}": at["ratio"]}  # fmt: skip
        rows.append({**row, "binding signature": "yes" if result["probes"][n]["signature"]["present"] else "no"})
    figures = analysis_figures(result, run.root / "figures", run.root)
    text = f"# Binding analysis of `{spec}`\n\n{markdown_table(rows, digits=2)}\n\n" + "".join(f"![{f.stem}]({f.relative_to(run.root)})\n\n" for f in figures)
    atomic_write_text(run.path("report.md"), text)
    run.finish("analysis")
    return run.path("report.md")
