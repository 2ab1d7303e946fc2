"""`stitchkit world ...` verbs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def render(
    out: Path = typer.Option(..., "--out", help="Folder for images/*.png and annotations.json."),
    images: int = typer.Option(100, "--images", help="Number of images."),
    size: int = typer.Option(224, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    max_objects: Optional[int] = typer.Option(None, "--max-objects", help="Most objects per image (default 4)."),
    background: Optional[str] = typer.Option(None, "--background", help="plain | noise | texture (default plain)."),
    max_overlap: Optional[float] = typer.Option(
        None, "--max-overlap", help="Largest covered fraction of an object's box; 0 = no overlap (default 0.2)."
    ),
) -> None:
    """Render a COCO-format shapes-world dataset."""
    from stitchkit.config import validate_config
    from stitchkit.world.coco import render_coco
    from stitchkit.world.scene import WorldConfig

    given = {"max_objects": max_objects, "background": background, "max_overlap": max_overlap}
    settings = {k: v for k, v in given.items() if v is not None}
    cfg = validate_config(WorldConfig, settings, source="(command-line options)")
    path = render_coco(out, images, size, seed, cfg)
    typer.echo(f"wrote {images} images and {path}")
