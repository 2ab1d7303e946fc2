"""The training checkpoint: one folder, replaced atomically, so a kill never corrupts the last one.

out_dir/checkpoint/ holds
    model.safetensors   trainable parameters and the model's buffers (frozen parameters are not saved)
    optimizer.pt        optimizer state
    scheduler.pt        learning-rate schedule state
    rng_<rank>.pt       every global RNG state of each process (dropout etc. resume exactly)
    state.json          step, samples seen, per-step losses so far, unlogged metrics, the config, and the name
                        of every parameter the optimizer holds (in its order; a later training can then take
                        over the moments by name: `carry_optimizer_state`)

A new checkpoint is written into checkpoint.tmp/, then swapped in with two renames
(checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint). A directory cannot be renamed over a
non-empty one, so the swap is not a single rename; `finish_interrupted_swap` completes a swap that
a kill interrupted. We do not fsync: this guards against killed processes, not against power loss.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from safetensors.torch import load_file, save_file

from stitchkit.engine.seeding import rng_state, set_rng_state
from stitchkit.errors import InputError
from stitchkit.runs import atomic_write_json

CHECKPOINT = "checkpoint"


def frozen_parameter_names(model: torch.nn.Module) -> set[str]:
    # remove_duplicate=False: a tied parameter is listed under every name it has in state_dict().
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict() without the frozen parameters. Buffers are kept: they are small and may change
    in training (BatchNorm statistics), so an exact resume needs them."""
    frozen = frozen_parameter_names(model)
    # clone(): tied weights share storage, which safetensors refuses to save.
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if k not in frozen}


def save_trainable_state_dict(model: torch.nn.Module, path: Path) -> None:
    """Write `trainable_state_dict(model)` to `path` atomically: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(trainable_state_dict(model), str(tmp))
    os.replace(tmp, path)


def load_trainable_state_dict(model: torch.nn.Module, path: Path) -> None:
    """Load a `trainable_state_dict` file into `model`; it must fit the model exactly."""
    try:
        tensors = load_file(str(path))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (OSError, RuntimeError) as err:  # unreadable file, or tensor shapes that do not fit
        raise InputError(f"cannot load trained weights from {path}: {err}") from None
    missing = set(missing) - frozen_parameter_names(model)
    if missing or unexpected:
        raise InputError(
            f"the weights in {path} do not fit this model "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]}); "
            "delete that training folder or use another one"
        )


def wait_for_everyone(accelerator: Accelerator) -> None:
    """A barrier across processes. accelerate's own passes device_ids=[local rank] even to gloo, which
    then fails for CPU processes on a machine with fewer GPUs than processes; gloo needs no device."""
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        torch.distributed.barrier()
    else:
        accelerator.wait_for_everyone()


def finish_interrupted_swap(out_dir: Path) -> None:
    """Leave out_dir/checkpoint as the last complete checkpoint if a kill hit a swap or a write.
    Call on the main process only, before any process looks for a checkpoint."""
    current, old, tmp = out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.old", out_dir / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # never complete until renamed to `current`
    if old.exists():
        if current.exists():
            shutil.rmtree(old)  # killed after the swap, before the clean-up
        else:
            os.replace(old, current)  # killed between the two renames: the old one is the last complete one


def checkpoint_dir(out_dir: Path) -> Path | None:
    """out_dir/checkpoint if it holds a complete checkpoint (state.json is written last)."""
    current = out_dir / CHECKPOINT
    return current if (current / "state.json").exists() else None


def save_checkpoint(
    out_dir: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> None:
    """Write a checkpoint (all processes call this; each saves its own RNG state)."""
    current, old, tmp = out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.old", out_dir / f"{CHECKPOINT}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait_for_everyone(accelerator)
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(trainable_state_dict(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        atomic_write_json(tmp / "state.json", {**state, "optimizer_params": optimizer_parameter_names(model, optimizer)})
    wait_for_everyone(accelerator)  # every process's RNG file is in tmp before it becomes `current`
    if accelerator.is_main_process:
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            os.replace(current, old)
        os.replace(tmp, current)
        shutil.rmtree(old, ignore_errors=True)
    wait_for_everyone(accelerator)


def optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in the order its state_dict() numbers them (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def carry_optimizer_state(source: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Start `optimizer` from the AdamW moments (and step counts) that the training in `source` (an out_dir) last
    checkpointed, for every parameter both trainings train, matched by name; parameters new to this training keep
    a fresh state. Returns how many parameters took over a state."""
    checkpoint = checkpoint_dir(Path(source))
    if checkpoint is None:
        raise InputError(f"cannot carry the optimizer state over from {source}: it holds no training checkpoint")
    names = read_checkpoint_state(checkpoint).get("optimizer_params")
    if names is None:
        raise InputError(
            f"cannot carry the optimizer state over from {source}: its checkpoint predates saved parameter names; "
            "re-run that training"
        )
    saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    by_name = {names[index]: state for index, state in saved.items()}
    carried = 0
    for name in optimizer_parameter_names(model, optimizer):
        if name not in by_name:
            continue
        parameter = model.get_parameter(name)
        state = by_name[name]
        if state["exp_avg"].shape != parameter.shape:
            raise InputError(f"cannot carry the optimizer state of {name} over from {source}: its shape changed")
        # Moments live with the parameter; AdamW keeps its step count on the CPU.
        optimizer.state[parameter] = {k: v.to(parameter.device) if v.ndim else v.clone() for k, v in state.items()}
        carried += 1
    return carried


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    process_index: int,
) -> dict[str, Any]:
    """Restore model, optimizer, schedule and this process's RNG states; return state.json."""
    load_trainable_state_dict(model, path / "model.safetensors")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_{process_index}.pt"
    # Missing when resuming with more processes than before: then this process keeps its fresh seed.
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return read_checkpoint_state(path)
