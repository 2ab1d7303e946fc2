"""Where work runs: the device a config asks for, how many CPU threads torch uses, and what the processes of a
several-process training (accelerate launch, torchrun) share."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

from stitchkit.errors import ConfigError

# Zoo and micro-VLM builds train on this many CPU threads, whatever the machine has: float sums split over
# another number of threads come out in another order, so a build is byte-reproducible only per thread count
# (docs/zoo.md), and one thread is what every machine has. Tiny models lose little by it (see torch_threads).
BUILD_THREADS = 1


def check_device_name(setting: str) -> str:
    """`setting` if it is "auto" or a device string torch can parse, else a ValueError saying what to write; for
    config validators, so a typo is refused with the config's other errors, before any work (whether the device
    exists is pick_device's question, at run time)."""
    if setting != "auto":
        try:
            torch.device(setting)
        except RuntimeError:
            raise ValueError(f"{setting!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    return setting


def pick_device(setting: str) -> torch.device:
    """"auto" (CUDA when torch sees one, else CPU), "cpu", "cuda" or any torch device string."""
    try:
        check_device_name(setting)
    except ValueError as err:
        raise ConfigError(f"device: {err}") from None
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {setting} was asked for, but torch sees no CUDA device")
    return torch.device(setting)


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


# The process helpers read torch.distributed directly: accelerate's PartialState(), made outside the engine's
# Accelerator, initialises its own state without the engine's cpu flag and fails on a CPU-only launch.
def process_count() -> int:
    """How many processes train together: torch.distributed's world size once a launcher has connected them
    (the engine's accelerate state does so), else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes shared files."""
    return process_count() == 1 or dist.get_rank() == 0


def wait_for_other_processes() -> None:
    """A barrier across the processes (nothing on one); torch's own, which gloo runs without a device."""
    if process_count() > 1:
        dist.barrier()


def gather_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor`, concatenated along dim 0 in rank order; on one process `tensor` itself (so a
    one-process training computes exactly what it did before).

    The gather carries gradients (torch.distributed.nn.functional.all_gather, as OpenCLIP gathers features;
    accelerate's gather does not): its backward hands each process the *sum* over all processes of the
    gradients of its own rows (reduce-scatter on NCCL; all_to_all and a sum on gloo). So when every process
    computes the same loss over the gathered tensor, each gets W times the gradient of its rows, and DDP's
    average over the W processes brings it back to the gradient of that loss (zoo.models.ImageTextContrastive).
    Every process must pass a tensor of the same shape.
    """
    if process_count() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather  # imported only where a process group exists

    # torch 2.13 deprecates it for the private _functional_collectives.all_gather_single, which older torch
    # (pyproject allows 2.4) lacks; this public one is in all of them, and its backward runs on gloo too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor), dim=0)


@torch.no_grad()
def mean_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the processes (an all-reduce, no gradient); on one process `tensor` itself.
    With equal shares of the batch on every process, the mean of per-process batch means is the mean over the
    global batch (DINO's centre)."""
    if process_count() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / process_count()
