"""Where work runs: the device a config asks for, and how many CPU threads torch uses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from stitchkit.errors import ConfigError

# Zoo and micro-VLM builds train on this many CPU threads, whatever the machine has: float sums split over
# another number of threads come out in another order, so a build is byte-reproducible only per thread count
# (docs/zoo.md), and one thread is what every machine has. Tiny models lose little by it (see torch_threads).
BUILD_THREADS = 1


def pick_device(setting: str) -> torch.device:
    """"auto" (CUDA when torch sees one, else CPU), "cpu", "cuda" or any torch device string."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {setting} was asked for, but torch sees no CUDA device")
    try:
        return torch.device(setting)
    except RuntimeError as err:
        raise ConfigError(f"device {setting!r}: {err}") from None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use n CPU threads inside the block (None, or a CUDA machine: leave torch's setting alone). Tiny models
    on a busy machine run fastest on one thread: OpenMP threads of small ops spin waiting for each other
    (measured for the micro VLM: 10 s per step with 2 threads, 0.7 s with 1)."""
    if n is None or torch.cuda.is_available():
        yield
        return
    if n < 1:
        raise ConfigError(f"threads must be at least 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
