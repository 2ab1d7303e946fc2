"""The one command-line app: `stitchkit <suite> <verb>`, plus `stitchkit quickstart`.

Each layer that has verbs defines a small Typer sub-app in its own `commands.py`; this file only
assembles them and turns user errors (`StitchkitError`) into one message and exit code 2 (taking back the
output folders the failed command created: runs.discard_outputs_on_user_error).
Heavy imports (torch, transformers) happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from stitchkit.errors import DEADLINE_ENV, EXIT_INTERRUPTED, StitchkitError
from stitchkit.quickstart import SECTIONS

app = typer.Typer(
    name="stitchkit",
    help="Controlled experiments on how vision models and VLMs stitch information together.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for user errors."),
    time_limit: Optional[float] = typer.Option(
        None, "--time-limit", min=0, metavar="MINUTES",
        help="Wall-clock limit: a training that reaches it saves a checkpoint and stops (exit code 3, as on SIGTERM "
        "or Ctrl-C); run the same command again to resume. For batch jobs and machines with a per-command limit.",
    ),
) -> None:
    _state["debug"] = debug
    if time_limit is not None:
        os.environ[DEADLINE_ENV] = str(time.time() + 60 * time_limit)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Run folder for the report."),
    suite: Optional[list[str]] = typer.Option(None, "--suite", help=f"Only these suites (repeatable): {', '.join(SECTIONS)}."),
) -> None:
    """Run every suite on the shapes world and the micro zoo; write one report.md."""
    from stitchkit.quickstart import run_quickstart

    report = run_quickstart(out, suites=suite)
    typer.echo(f"report: {report}")


def _add_subapps() -> None:
    from stitchkit.binding.commands import app as binding_app
    from stitchkit.world.commands import app as world_app
    from stitchkit.multiimage.commands import app as mimic_app
    from stitchkit.patches.commands import app as patches_app
    from stitchkit.stitching.commands import app as stitch_app
    from stitchkit.zoo.commands import app as zoo_app

    app.add_typer(world_app, name="world", help="The procedural shapes world.")
    app.add_typer(zoo_app, name="zoo", help="The micro vision zoo.")
    app.add_typer(stitch_app, name="stitch", help="Model stitching of vision foundation models.")
    app.add_typer(mimic_app, name="mimic", help="MIMIC: the controlled multi-image benchmark.")
    app.add_typer(patches_app, name="patches", help="Visual stitching: scattered training patches.")
    app.add_typer(binding_app, name="binding", help="Binding shortcuts: indirect retrieval, curricula, mechanisms.")


_add_subapps()


GLOBAL_FLAGS, GLOBAL_OPTIONS = ("--debug",), ("--time-limit",)


def hoist_global_options(argv: list[str]) -> list[str]:
    """The app's own options (`--debug`, `--time-limit M`) moved before the suite, wherever they were written:
    `stitchkit stitch run c.yaml --time-limit 30` means what `stitchkit --time-limit 30 stitch run c.yaml` does
    (click would answer "No such option"). No verb has options of these names."""
    front, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        takes_value = arg in GLOBAL_OPTIONS  # `--time-limit 30`; `--time-limit=30` is one argument
        if arg in GLOBAL_FLAGS or takes_value or arg.split("=", 1)[0] in GLOBAL_OPTIONS:
            front += argv[i : i + 2] if takes_value else [arg]
            i += 2 if takes_value else 1
        else:
            rest.append(arg)
            i += 1
    return front + rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    argv = hoist_global_options(argv)
    if not sys.stderr.isatty():  # a log: Hugging Face's tqdm bars would add carriage-return noise beside our lines
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from stitchkit.runs import discard_outputs_on_user_error

    def report(folder) -> None:
        err_console.print(f"removed {folder}, the unfinished output of this command", style="dim", soft_wrap=True)

    try:
        with discard_outputs_on_user_error(report):
            app(args=argv, prog_name="stitchkit")  # standalone: usage errors exit 2 via click
    except SystemExit as stop:
        if stop.code == EXIT_INTERRUPTED:  # typer's exit for Ctrl-C outside a checkpointed training
            from stitchkit.runs import opened_runs

            resumable = "; finished steps are kept; run the same command again to resume" if opened_runs() else ""
            err_console.print(f"interrupted{resumable}", style="bold")
        raise
    except StitchkitError as err:
        if _state["debug"] or "--debug" in argv:
            raise
        err_console.print(Text.assemble((f"{err.label}: ", "bold red"), str(err)), soft_wrap=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
