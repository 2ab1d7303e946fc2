"""`python -m stitchkit ...` = the `stitchkit` console script, for environments where the package is importable
(e.g. PYTHONPATH=src on a machine without the editable install) but the script is not on PATH."""

from stitchkit.cli import main

main()
