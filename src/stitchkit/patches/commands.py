"""`stitchkit patches ...` verbs: build a patch dataset, generate/check IDs, stitch patches back, run an experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stitchkit.runs import command_line

app = typer.Typer(no_args_is_help=True)



def _parse_splits(text: str) -> list[int]:
    from stitchkit.errors import InputError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--splits takes comma-separated integers such as 1,2,4,8, got {text!r}") from None


@app.command()
def build(
    images: Path = typer.Option(..., "--images", help="Folder of the source images."),
    names: Path = typer.Option(..., "--names", help="CSV (file,name[,id]) or JSON ({file: name}) naming every image."),
    out: Path = typer.Option(..., "--out", help="Dataset folder (hf/, patches/, manifest.jsonl, dataset.json)."),
    splits: str = typer.Option("1,2,4,8", "--splits", help="Split factors f (f x f patches per image)."),
    model: Optional[str] = typer.Option(None, "--model", help="Check first-token distinctness of the IDs under this model's tokenizer (hub id, folder, zoo:micro_vlm)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the generated IDs."),
    fmt: str = typer.Option("png", "--format", help="png, or jpeg (quality 75, as the official patches)."),
    train_prompt: str = typer.Option("The shape shown is associated with ID", "--train-prompt", help="Prompt of every patch; may hold {row} and {col} (0-based)."),
    image_prompt: Optional[str] = typer.Option(None, "--image-prompt", help="Prompt of a full image in the image-based test (default: the training prompt)."),
    reference_prompt: str = typer.Option("The {name} is associated with ID", "--reference-prompt", help="Text-only prompt, with {name}."),
    response: str = typer.Option(" {id}", "--response", help="Target continuation, with {id}."),
    patch_dropout: float = typer.Option(0.0, "--patch-dropout", help="Leave out each patch with this probability (0 <= p < 1)."),
    dropout_seed: int = typer.Option(0, "--dropout-seed", min=0, help="Seed of --patch-dropout."),
    force: bool = typer.Option(False, "--force", help="Replace a dataset in --out that was built with other settings."),
) -> None:
    """Cut every image into f x f patches, one row per (patch, ID), as a Hugging Face dataset.

    Run again into the same --out, it rebuilds only what changed: nothing if the settings and the source images
    (by sha256) are the same, everything if an image changed. A dataset built there with other settings is
    refused unless --force."""
    from stitchkit.errors import InputError
    from stitchkit.patches.dataset import Templates, build_patch_dataset, read_names
    from stitchkit.vlm.loading import load_tokenizer
    from stitchkit.vlm.micro import resolve_vlm

    if fmt not in ("png", "jpeg"):
        raise InputError(f"--format must be png or jpeg, got {fmt!r}")
    items = read_names(names, images)
    tokenizer = load_tokenizer(resolve_vlm(model)[0]) if model else None
    build_patch_dataset(items, out, _parse_splits(splits), Templates(train_prompt, reference_prompt, response, image_prompt),
                        id_seed=seed, tokenizer=tokenizer, fmt=fmt, patch_dropout=patch_dropout, dropout_seed=dropout_seed,
                        force=force, report=typer.echo)  # fmt: skip
    if tokenizer is None:  # first-token ranking needs distinct first tokens under the model that is trained
        typer.echo("warning: the IDs' first tokens were not checked against any tokenizer; pass --model with the model "
                   "you will train (`patches run` checks them for its own model)", err=True)  # fmt: skip


@app.command()
def ids(
    n: int = typer.Option(20, "--n", min=1, max=26, help="How many IDs (distinct first letters: at most 26)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the IDs (the same seed and --n give the same IDs)."),
    model: Optional[str] = typer.Option(None, "--model", help="Tokenizer to check first-token distinctness under."),
    response: str = typer.Option(" {id}", "--response", help="Template the IDs are scored in, with {id}."),
) -> None:
    """Generate IDs (two letters + three digits) with distinct first tokens."""
    from stitchkit.errors import InputError
    from stitchkit.patches.dataset import template_problem
    from stitchkit.patches.ids import generate_ids
    from stitchkit.vlm.loading import load_tokenizer
    from stitchkit.vlm.micro import resolve_vlm

    problem = template_problem(response, "--response", allowed=("id",), required=("id",))  # as `build` checks it
    if problem:
        raise InputError(problem)
    tokenizer = load_tokenizer(resolve_vlm(model)[0]) if model else None
    typer.echo(" ".join(generate_ids(n, seed, tokenizer, response)))


@app.command()
def stitch(
    patches: Path = typer.Option(..., "--patches", help="Folder of patch files <name>-<row>_<col>.<ext>, searched recursively."),
    out: Path = typer.Option(..., "--out", help="Folder for the rebuilt images (<name>.png, sub-folders kept)."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Put the cells at seeded random positions."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of --shuffle."),
) -> None:
    """Rebuild every image from its patches for inspection: missing cells black, optionally shuffled (§1.4)."""
    from stitchkit.patches.stitch import stitch_folder

    written = stitch_folder(patches, out, shuffle=shuffle, seed=seed)
    typer.echo(f"wrote {len(written)} images to {out}")


@app.command()
def run(
    config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Experiment config (configs/patches/*.yaml)."),
    out: Path = typer.Option(..., "--out", help="Run folder (results.json, report.md, figures/)."),
) -> None:
    """Build the datasets, fine-tune per split factor and seed, evaluate mean ranks, write the report."""
    from stitchkit.config import load_config
    from stitchkit.patches.config import PatchesConfig
    from stitchkit.patches.experiment import run_patches

    report = run_patches(load_config(PatchesConfig, config), out, command=command_line())
    typer.echo(f"report: {report}")
