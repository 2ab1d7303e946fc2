"""`stitchkit zoo ...` verbs: list the recipes and what is built, train (build) them."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """The recipes, whether each is built, its size, and its probe accuracy next to random init."""
    from rich.console import Console
    from rich.table import Table

    from stitchkit.zoo import list_recipes, load_recipe, zoo_root
    from stitchkit.zoo.builder import summary_row

    rows = [summary_row(load_recipe(name)) for name in list_recipes()]
    table = Table(title=f"micro zoo in {zoo_root()}", caption="probe: linear probe on held-out images (% correct)")
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("recipe", "class") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row.values()))
    console = Console()
    if not console.is_terminal:
        console.width = 140  # piped output has no terminal width to respect: do not truncate names
    console.print(table)


@app.command("train")
def train_command(
    name: str = typer.Argument(..., help="a recipe name (see `stitchkit zoo list`), a recipe YAML file, or 'all'"),
    force: bool = typer.Option(False, "--force", help="delete the cached model and train again"),
) -> None:
    """Build a recipe (train, save, probe), or all CPU recipes; built ones are reused unless --force."""
    from stitchkit.zoo import build, list_recipes, load_recipe, zoo_info

    names = list_recipes(include_gpu=False) if name == "all" else [name]
    recipes = [load_recipe(n) for n in names]  # validate every recipe before training any
    for recipe in recipes:
        folder = build(recipe, force=force)
        info = zoo_info(recipe)
        probe, trained = info["probe"], info["train"]
        typer.echo(
            f"{recipe.name}: {folder}\n"
            f"  {info['hf_class']}, {info['params'] / 1e6:.2f}M vision params, {trained['steps']} steps in "
            f"{trained['seconds']:.0f} s on {trained['device']}; linear probe ({probe['target']}, "
            f"{probe['classes']} classes): {100 * probe['accuracy']:.1f}% vs {100 * probe['random_init_accuracy']:.1f}% "
            "at random init"
        )
