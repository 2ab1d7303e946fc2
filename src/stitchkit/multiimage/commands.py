"""`stitchkit mimic ...` verbs: build a benchmark, export it, score predictions on it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True)


def _command_line() -> str:
    return "stitchkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
def build(
    annotations: Path = typer.Option(..., "--annotations", help="COCO-format annotation file (instances_*.json)."),
    images: Path = typer.Option(..., "--images", help="Folder the annotation file's file_name entries live in."),
    out: Path = typer.Option(..., "--out", help="Benchmark folder (samples.jsonl, benchmark.json, summary.md)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML build config (configs/mimic/*.yaml)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the config's seed."),
) -> None:
    """Generate the four MIMIC tasks (counting, listing, common, odd-one) from annotated images."""
    from stitchkit.config import load_config, validate_config
    from stitchkit.multiimage.config import MimicConfig
    from stitchkit.multiimage.generator import build_benchmark

    overrides = {"seed": seed} if seed is not None else None
    cfg = (load_config(MimicConfig, config, overrides) if config
           else validate_config(MimicConfig, overrides, source="(command-line options)"))
    root = build_benchmark(annotations, images, out, cfg, command=_command_line())
    typer.echo(f"wrote {root / 'samples.jsonl'} (summary: {root / 'summary.md'})")


@app.command()
def export(
    data: Path = typer.Option(..., "--data", help="A folder written by `stitchkit mimic build`."),
    out: Path = typer.Option(..., "--out", help="Export folder."),
    formats: list[str] = typer.Option(
        ["hf", "parquet", "lmms-eval", "vlmevalkit"], "--format",
        help="hf | parquet | lmms-eval | vlmevalkit (repeatable; default all).",
    ),
) -> None:
    """Write HF datasets (save_to_disk, parquet), an lmms-eval task folder and VLMEvalKit TSVs."""
    from stitchkit.multiimage.benchmark import load_benchmark
    from stitchkit.multiimage.exports import export_benchmark

    written = export_benchmark(load_benchmark(data), out, formats)
    for name, path in written.items():
        typer.echo(f"{name}: {path}")


@app.command()
def score(
    data: Path = typer.Option(..., "--data", help="A folder written by `stitchkit mimic build`."),
    predictions: Path = typer.Option(..., "--predictions", help='JSONL lines {"id": ..., "prediction": ...}.'),
    out: Path = typer.Option(..., "--out", help="Folder for results.json, report.md, figures/."),
    legacy_official: bool = typer.Option(
        False, "--legacy-official", help="Score exactly as the released MIMIC scorer (quirks included)."
    ),
) -> None:
    """Score model answers: task metrics, breakdowns by every control variable, figures."""
    from stitchkit.multiimage.scoring import score_benchmark_dir

    root = score_benchmark_dir(data, predictions, out, legacy_official, command=_command_line())
    typer.echo(f"wrote {root / 'results.json'} and {root / 'report.md'}")
