"""Seeding, and capturing/restoring every RNG a training touches (so dropout resumes exactly)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from stitchkit.errors import ConfigError


MAX_SEED = 2**32 - 1  # NumPy's global RNG takes seeds 0..2^32 - 1


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch (CPU and every CUDA device)."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed {seed} is out of range: seeds are integers from 0 to {MAX_SEED}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def rng_state() -> dict[str, Any]:
    """All global RNG states, as plain Python values and tensors (loadable with torch.load(weights_only=True))."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # The current device only: reading every device's state would make each DDP rank create a
        # CUDA context on every GPU.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
