"""`stitchkit zoo ...` verbs: list the recipes and what is built, train (build) them."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """The recipes, whether each is built, its size, and its probe accuracy next to random init."""
    from rich.console import Console
    from rich.table import Table

    from stitchkit.vlm.micro import MICRO_RECIPES, load_micro_recipe, micro_summary_row
    from stitchkit.zoo import list_recipes, load_recipe, zoo_root
    from stitchkit.zoo.builder import summary_row

    def table(title: str, caption: str, rows: list[dict]) -> Table:
        shown = Table(title=title, caption=caption)
        for column in rows[0]:
            shown.add_column(column, justify="left" if column in ("recipe", "class") else "right", no_wrap=True)
        for row in rows:
            shown.add_row(*("-" if v is None else str(v) for v in row.values()))
        return shown

    console = Console()
    if not console.is_terminal:
        console.width = 140  # piped output has no terminal width to respect: do not truncate names
    encoders = [summary_row(load_recipe(name)) for name in list_recipes()]
    caption = ("probe: linear probe on held-out images, colour x category (% correct); category: the same probe "
               "by category (shape) alone")  # fmt: skip
    console.print(table(f"micro zoo in {zoo_root()}", caption, encoders))
    vlms = [micro_summary_row(load_micro_recipe(name)) for name in MICRO_RECIPES]
    caption = ("count: greedy single-image counting on held-out scenes, next to always giving the majority answer; "
               "MIMIC avg: the held-out MIMIC benchmark, next to each task's best constant answer")  # fmt: skip
    console.print(table("micro VLM", caption, vlms))


@app.command("train")
def train_command(
    name: str = typer.Argument(..., metavar="RECIPE", help="a recipe name (see `stitchkit zoo list`; micro_vlm for the micro VLM), a recipe YAML file, or 'all'"),
    force: bool = typer.Option(False, "--force", help="delete the cached model and train again"),
) -> None:
    """Build a recipe (train, save, probe), or all CPU recipes; built ones are reused unless --force."""
    from stitchkit.vlm.micro import MICRO_RECIPES, build_micro_vlm, load_micro_recipe, micro_info
    from stitchkit.errors import ConfigError
    from stitchkit.zoo import build_all, list_recipes, load_recipe, zoo_info

    if name in MICRO_RECIPES:
        folder = build_micro_vlm(load_micro_recipe(name), force=force)
        counting = micro_info(folder)["counting"]
        typer.echo(f"{name}: {folder}\n  single-image counting {100 * counting['accuracy']:.1f}% "
                   f"(majority answer {100 * counting['chance']:.1f}%)")  # fmt: skip
        return
    if name != "all" and Path(name).suffix not in {".yaml", ".yml"} and name not in list_recipes():
        choices = [*list_recipes(), *MICRO_RECIPES, "all"]  # every name this command takes, not load_recipe's alone
        raise ConfigError(f"unknown zoo recipe {name!r}; choose from {', '.join(choices)}, or a recipe YAML file")
    names = list_recipes(include_gpu=False) if name == "all" else [name]
    recipes = [load_recipe(n) for n in names]  # validate every recipe before training any
    for recipe, folder in zip(recipes, build_all(recipes, force=force)):
        info = zoo_info(recipe)
        probe, trained = info["probe"], info["train"]
        typer.echo(
            f"{recipe.name}: {folder}\n"
            f"  {info['hf_class']}, {info['params'] / 1e6:.2f}M vision params, {trained['steps']} steps in "
            f"{trained['seconds']:.0f} s on {trained['device']}; linear probe ({probe['target']}, "
            f"{probe['classes']} classes): {100 * probe['accuracy']:.1f}% vs {100 * probe['random_init_accuracy']:.1f}% "
            "at random init"
            + (f"; by category: {100 * probe['category_accuracy']:.1f}% vs "
               f"{100 * probe['category_random_init_accuracy']:.1f}%" if "category_accuracy" in probe else "")
        )  # fmt: skip
