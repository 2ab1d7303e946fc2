"""Fixtures shared by several test modules."""

from __future__ import annotations

import os

import pytest
import torch

# Progress lines (printed off a terminal too, progress.py) would only clutter the captured output of tests.
os.environ.setdefault("STITCHKIT_PROGRESS", "0")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads per op
    collapse (measured 5x slower, OpenMP spin-waiting); other modules get their setting back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
