"""Where stitchkit keeps things: the cache home and the repository's bundled configs."""

from __future__ import annotations

import os
from pathlib import Path

# The repository root when installed in editable mode (the documented way: `make demo`).
REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"


def stitchkit_home() -> Path:
    """Cache root for built artefacts (micro zoo, rendered worlds): $STITCHKIT_HOME or ~/.cache/stitchkit."""
    return Path(os.environ.get("STITCHKIT_HOME", Path.home() / ".cache" / "stitchkit")).expanduser()
