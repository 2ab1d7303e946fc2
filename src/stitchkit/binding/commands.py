"""`stitchkit binding ...` verbs: run a curriculum experiment; analyse a trained model or a pretrained LM / VLM."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stitchkit.runs import command_line

app = typer.Typer(no_args_is_help=True)


@app.command()
def run(
    config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Experiment config (configs/binding/*.yaml)."),
    out: Path = typer.Option(..., "--out", help="Run folder (results.json, report.md, figures/, train/...)."),
) -> None:
    """Train every branch's curriculum, evaluate each stage per context size, analyse the final models."""
    from stitchkit.binding.config import BindingConfig
    from stitchkit.binding.experiment import run_binding
    from stitchkit.config import load_config

    report = run_binding(load_config(BindingConfig, config), out, command=command_line())
    typer.echo(f"report: {report}")


@app.command()
def analyze(
    model: str = typer.Option(..., "--model", help="A model folder from `binding run` (train/.../model), or a hub id / folder of a causal LM or VLM."),
    out: Path = typer.Option(..., "--out", help="Folder for analysis.json, report.md and figures/."),
    n: list[int] = typer.Option([8], "--n", min=4, help="Context sizes (>= 4; repeatable). Pretrained models: the paper's 20 fits few tokenizers' single-token word lists, see docs."),
    pairs: Optional[int] = typer.Option(None, "--pairs", min=1, help="Counterfactual pairs per N (kept if the model is right on both). Default: 1000, the binding config default analysis.pairs."),
    probe_examples: Optional[int] = typer.Option(
        None, "--probe-examples", min=10, help="Examples per N for the probes, the last 20% held out. Default: 3000, the binding config default analysis.probe_examples."
    ),
    knockout_examples: Optional[int] = typer.Option(
        None, "--knockout-examples", min=1, help="Examples for the knockouts (our token models). Default: 1000, the binding config default analysis.knockout_examples."
    ),
    knockouts: bool = typer.Option(True, "--knockouts/--no-knockouts", help="Attention knockouts (our token models only)."),
    knockout_window: Optional[int] = typer.Option(
        None, "--knockout-window", min=1, help="Layers blocked at once, the window slid over depth (our token models). Default: 3, the binding config default analysis.knockout_window."
    ),
    knockout_label_layer: Optional[int] = typer.Option(
        None, "--knockout-label-layer", min=0, help="Layer whose intervention outcomes each knockout is read at (default L - 1)."
    ),
    seed: int = typer.Option(0, "--seed", min=0),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    chat_template: bool = typer.Option(
        False, "--chat-template", help="Pretrained models: the prompt inside the user turn of the model's chat template (the query colour stays last)."
    ),
    peak_layer: Optional[int] = typer.Option(
        None, "--peak-layer", min=0, help="Also report R and the outcome shares at this layer: the base LLM's peak layer, when analysing its VLM (§7.2)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Pretrained models: run the checkpoint's own Python code (config, model, tokenizer) from its repository."
    ),
) -> None:
    """Interchange interventions per layer, probes (binding signature) and knockouts of one model."""
    from stitchkit.binding.analyze import analyze_subject

    report = analyze_subject(
        model, out, n, pairs, probe_examples, knockouts, seed, device, command_line(), knockout_label_layer, chat_template,
        knockout_examples=knockout_examples, base_peak_layer=peak_layer, trust_remote_code=trust_remote_code,
        knockout_window=knockout_window,
    )  # fmt: skip
    typer.echo(f"report: {report}")
