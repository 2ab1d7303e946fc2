"""`stitchkit mimic ...` verbs: build a benchmark (or import the released one), export it, score predictions on it,
evaluate a VLM on it, run the paper's experiments from a config."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stitchkit.runs import command_line

app = typer.Typer(no_args_is_help=True)


def comma_separated(items: list[str]) -> list[str]:
    """A repeatable option's values, each of which may be a comma-separated list: ["a,b", "c"] -> [a, b, c]."""
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


@app.command()
def build(
    annotations: Path = typer.Option(..., "--annotations", help="COCO-format annotation file (instances_*.json)."),
    images: Path = typer.Option(..., "--images", help="Folder the annotation file's file_name entries live in."),
    out: Path = typer.Option(..., "--out", help="Benchmark folder (samples.jsonl, benchmark.json, summary.md)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML build config (configs/mimic/*.yaml)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Override the config's seed."),
) -> None:
    """Generate the four MIMIC tasks (counting, listing, common, odd-one) from annotated images."""
    from stitchkit.config import load_config, validate_config
    from stitchkit.multiimage.config import MimicConfig
    from stitchkit.multiimage.generator import build_benchmark

    overrides = {"seed": seed} if seed is not None else None
    cfg = (load_config(MimicConfig, config, overrides) if config
           else validate_config(MimicConfig, overrides, source="(command-line options)"))
    root = build_benchmark(annotations, images, out, cfg, command=command_line())
    typer.echo(f"wrote {root / 'samples.jsonl'} (summary: {root / 'summary.md'})")


@app.command(name="convert-openimages")
def convert_openimages(
    boxes: Path = typer.Option(..., "--boxes", help="OpenImages box file (*-annotations-bbox.csv)."),
    classes: Path = typer.Option(..., "--classes", help="Class descriptions (*class-descriptions-boxable.csv)."),
    images: Path = typer.Option(..., "--images", help="Folder of <ImageID>.jpg (a downloaded subset is fine)."),
    out: Path = typer.Option(..., "--out", help="The COCO-format annotation file to write (e.g. openimages.json)."),
    hierarchy: Optional[Path] = typer.Option(
        None, "--hierarchy", help="bbox_labels_600_hierarchy.json: supercategories from parents (for Listing)."
    ),
) -> None:
    """Turn OpenImages box annotations into a COCO-format file for `mimic build` (the paper's training source)."""
    from stitchkit.data.openimages import convert_openimages as convert

    counts = convert(boxes, classes, images, out, hierarchy)
    typer.echo(f"wrote {out}: " + ", ".join(f"{n:,} {what}" for what, n in counts.items()))


@app.command(name="import-official")
def import_official(
    source: Optional[str] = typer.Option(
        None, "--source",
        help="Hub id of the released data (default anurag4446/mimic), or a local copy: a snapshot of the hub repo "
             "(hf download ... --repo-type dataset) or a folder of save_to_disk folders, one per config.",
    ),
    out: Path = typer.Option(..., "--out", help="Benchmark folder (samples.jsonl, benchmark.json, images/)."),
    tasks: list[str] = typer.Option(
        [], "--tasks", help="counting | listing | common | oddone (repeatable or comma-separated; default all)."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N rows of each task."),
) -> None:
    """Import the released MIMIC data (the paper's benchmark) as a benchmark folder; scored with legacy_official."""
    from stitchkit.multiimage.official import import_official as run_import

    root = run_import(source, out, comma_separated(tasks) or None, limit, command=command_line())
    typer.echo(f"wrote {root / 'samples.jsonl'} (summary: {root / 'summary.md'})")


@app.command()
def export(
    data: Path = typer.Option(..., "--data", help="A folder written by `stitchkit mimic build`."),
    out: Path = typer.Option(..., "--out", help="Export folder."),
    formats: list[str] = typer.Option(
        ["hf", "parquet", "lmms-eval", "vlmevalkit"], "--format",
        help="hf | parquet | lmms-eval | vlmevalkit (repeatable or comma-separated; default all).",
    ),
) -> None:
    """Write HF datasets (save_to_disk, parquet), an lmms-eval task folder and VLMEvalKit TSVs."""
    from stitchkit.multiimage.benchmark import load_benchmark
    from stitchkit.multiimage.exports import export_benchmark

    written = export_benchmark(load_benchmark(data), out, comma_separated(formats), command=command_line())
    for name, path in written.items():
        typer.echo(f"{name}: {path}")


@app.command(name="export-training")
def export_training(
    data: Path = typer.Option(..., "--data", help="A folder written by `stitchkit mimic build`."),
    out: Path = typer.Option(
        ..., "--out", help="LLaVA conversation JSON (FILE.json or FILE.jsonl); counts in FILE.summary.json beside it."
    ),
    multi_turn: float = typer.Option(0.2, "--multi-turn", min=0.0, max=1.0,
                                     help="Share of each task's records with 1-2 follow-up questions (2-3 turns)."),
    options: float = typer.Option(0.2, "--options", min=0.0, max=1.0,
                                  help="Share of each task's records asked with a lettered option list."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the record kinds, options, follow-ups and order."),
) -> None:
    """Write MIMIC training data in LLaVA conversation format, for LLaVA-NeXT's trainer (reference section 5)."""
    from stitchkit.multiimage.benchmark import load_benchmark
    from stitchkit.multiimage.llava_json import export_training as run_export, summary_path

    summary = run_export(load_benchmark(data), out, multi_turn, options, seed)
    kinds = ", ".join(f"{kind.replace('_', '-')} {n}" for kind, n in summary["kinds"].items())
    typer.echo(f"wrote {out}: {summary['records']} records ({kinds}; turns {summary['turns']}); "
               f"counts in {summary_path(out)}")
    typer.echo(f"LLaVA-NeXT: --data_path {out} --image_folder {summary['image_folder']}")


@app.command()
def score(
    data: Path = typer.Option(..., "--data", help="A folder written by `stitchkit mimic build` or `import-official`."),
    predictions: Path = typer.Option(..., "--predictions", help='JSONL lines {"id": ..., "prediction": ...}.'),
    out: Path = typer.Option(..., "--out", help="Folder for results.json, report.md, figures/."),
    legacy_official: Optional[bool] = typer.Option(
        None, "--legacy-official/--clean",
        help="Score exactly as the released MIMIC scorer (quirks included), or with the clean one; default: the "
             "benchmark's own mode (clean; legacy_official for the released data).",
    ),
) -> None:
    """Score model answers: task metrics, breakdowns by every control variable, figures."""
    from stitchkit.multiimage.scoring import score_benchmark_dir

    root = score_benchmark_dir(data, predictions, out, legacy_official, command=command_line())
    typer.echo(f"wrote {root / 'results.json'} and {root / 'report.md'}")


@app.command(name="eval")
def eval_(
    model: str = typer.Option(..., "--model", help="Hub id, local folder, or `micro` (the micro VLM; micro:RECIPE)."),
    data: Path = typer.Option(..., "--data", help="A folder written by `stitchkit mimic build` or `import-official`."),
    out: Path = typer.Option(..., "--out", help="Folder for predictions.jsonl, results.json, report.md, figures/."),
    policy: str = typer.Option(
        "dense", "--policy",
        help="dense, or masked[:LAYERS]: image-block-diagonal attention in LAYERS (default second_half = "
             "floor(L/2)..L-1; also all, first_half, or ranges like 12-23).",
    ),
    pool: list[int] = typer.Option(
        [1], "--pool", help="1-D vision-token pooling factor 1|2|4|8|16 (repeatable: one evaluation each, and a figure)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generation batch."),
    max_images_per_batch: Optional[int] = typer.Option(
        None, "--max-images-per-batch", min=1, help="Cap on the images of one batch (long prompts get smaller batches)."
    ),
    max_per_task: Optional[int] = typer.Option(
        None, "--max-per-task", min=1, help="At most N samples of each task, spread round robin over its grid cells."
    ),
    legacy_official: Optional[bool] = typer.Option(
        None, "--legacy-official/--clean",
        help="Headline scores from the released MIMIC scorer or the clean one (both are stored where the data "
             "allows); default: the benchmark's own mode (clean; legacy_official for the released data).",
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if available), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's), float32, bfloat16, float16."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: 1 for the micro VLM on CPU)."),
    legacy_layer_loop: bool = typer.Option(
        False, "--legacy-layer-loop", help="The official code's quirk: mask only the run of listed layers from layer 0 (12-23 masks none)."
    ),
    legacy_maxlen_fallback: Optional[int] = typer.Option(
        None, "--legacy-maxlen-fallback", min=1, help="The official code's quirk: prompts longer than N tokens run without the mask (official: 20000)."
    ),
    pool_pad: str = typer.Option(
        "exclude", "--pool-pad",
        help="A short last pooling group: exclude (average its real tokens) or zeros (the official zero-padded tail).",
    ),
) -> None:
    """Evaluate a VLM on a MIMIC benchmark: batched greedy generation (resumable), scores, report, figures."""
    from stitchkit.multiimage.benchmark import load_benchmark
    from stitchkit.multiimage.evaluate import eval_command
    from stitchkit.multiimage.scoring import scoring_mode

    legacy = scoring_mode(load_benchmark(data), legacy_official) == "legacy_official"  # before the model loads
    root = eval_command(model, data, out, policy, pool, batch_size, max_per_task, legacy, device, dtype,
                        threads, max_images_per_batch, command=command_line(), legacy_layer_loop=legacy_layer_loop,
                        legacy_maxlen_fallback=legacy_maxlen_fallback, pool_pad=pool_pad)
    typer.echo(f"wrote {root / 'results.json'} and {root / 'report.md'}")


@app.command()
def run(
    config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Experiment config (configs/mimic/quickstart.yaml, configs/mimic/paper.yaml)."),
    out: Path = typer.Option(..., "--out", help="Run folder (finished steps are skipped on re-run)."),
) -> None:
    """Run the paper's experiments from a config: baseline, masked fine-tuning, FLOPs, pooling, stitching, attention."""
    from stitchkit.multiimage.experiment import load_experiment, run_experiment

    root = run_experiment(load_experiment(config), out, command=command_line())
    typer.echo(f"wrote {root / 'results.json'} and {root / 'report.md'}")
