"""`stitchkit stitch ...` verbs: the protocol sweep and the VFM Stitch Tree."""

from __future__ import annotations

from pathlib import Path

import typer

from stitchkit.runs import command_line

app = typer.Typer(no_args_is_help=True, help="Model stitching: LFM, TLT, FFM, FFM→TLT, self-stitch, stitch tree.")



@app.command("run")
def run(
    config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Sweep config YAML (see configs/stitch/)."),
    out: Path = typer.Option(..., "--out", help="Run folder; re-running resumes and skips finished cells."),
) -> None:
    """Sweep pairs x stitch points x stitch layers x objectives (+ self-stitches and linear probes)."""
    from stitchkit.stitching.experiment import run_sweep

    report = run_sweep(config, out, command=command_line())
    typer.echo(f"report: {report}")


@app.command("tree")
def tree(
    config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Stitch-tree config YAML (see configs/stitch/tree_quickstart.yaml)."),
    out: Path = typer.Option(..., "--out", help="Run folder; re-running resumes."),
) -> None:
    """VFM Stitch Tree: accuracy vs extra cost at every stitch point, and the normalised gain."""
    from stitchkit.stitching.experiment import run_tree

    report = run_tree(config, out, command=command_line())
    typer.echo(f"report: {report}")
