"""`stitchkit quickstart`: every suite that exists, on the shapes world and the micro zoo, in one report.

Each suite contributes one function `quickstart(run: RunDir) -> str` (a markdown section, with figures written
under the run folder). Sections run in order; a finished section is skipped on re-run (its markdown is kept
in the run folder), so an interrupted quickstart continues where it stopped.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from stitchkit.errors import ConfigError
from stitchkit.runs import RunDir, atomic_write_text

# name -> "module:function"; a suite joins the quickstart by adding one line here.
SECTIONS: dict[str, str] = {
    "world": "stitchkit.world.quickstart:quickstart",
    "zoo": "stitchkit.zoo.quickstart:quickstart",
    "stitch": "stitchkit.stitching.quickstart:quickstart",
    "mimic": "stitchkit.multiimage.quickstart:quickstart",
    "patches": "stitchkit.patches.quickstart:quickstart",
    "binding": "stitchkit.binding.quickstart:quickstart",
}


def available_sections() -> dict[str, str]:
    """The sections whose module is importable (suites land one issue at a time)."""
    found = {}
    for name, target in SECTIONS.items():
        module = target.split(":")[0]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue
            raise
        found[name] = target
    return found


def run_quickstart(out: str | os.PathLike, suites: list[str] | None = None) -> Path:
    sections = available_sections()
    if suites:
        unknown = sorted(set(suites) - set(sections))
        if unknown:
            raise ConfigError(f"unknown --suite {', '.join(unknown)}; available: {', '.join(sections)}")
        sections = {k: v for k, v in sections.items() if k in suites}
    # No config: sections are independent, so a later call with other --suite values adds to the same folder.
    run = RunDir(out, command="stitchkit quickstart")
    parts = ["# stitchkit quickstart\n", "Everything below ran offline on the shapes world and the micro zoo.\n"]
    for name, target in sections.items():
        section_file = run.path("sections", f"{name}.md")
        if not run.done(name):
            module, func = target.split(":")
            markdown = getattr(importlib.import_module(module), func)(run)
            atomic_write_text(section_file, markdown)
            run.finish(name)
        parts.append(section_file.read_text())
    report = run.path("report.md")
    atomic_write_text(report, "\n".join(parts))
    return report
