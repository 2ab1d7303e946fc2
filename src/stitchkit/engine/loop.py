"""The one training loop, on Hugging Face accelerate: CPU, one GPU or several (DDP).

    result = train(model, loss_fn, dataset, TrainConfig(steps=500, batch_size=64), out_dir)

Determinism. The data order depends only on (seed, epoch): every epoch is a seeded permutation of
the dataset, epochs are concatenated into one endless stream, and optimizer step s trains on the
fixed slice [s * batch_size, (s + 1) * batch_size) of that stream (the global batch). Under N
processes, process r takes the r-th contiguous shard of the global batch, and splits it into
`grad_accum` micro-batches. So resuming needs no DataLoader replay, and N processes see exactly the
samples one process sees at the same global batch. The loss of each micro-batch is divided by
`grad_accum` and DDP averages gradients over processes, so the gradient equals the full-batch
gradient of the mean loss (up to float summation order), provided `loss_fn` returns a mean over
its batch. `epoch_batches` instead cuts every epoch's permutation into ceil(n / batch_size) batches, the last one
holding the rest (Hugging Face Trainer's dataloader, drop_last off), on one process without accumulation, for
recipes defined in epochs of a small set. A killed training re-run with the same out_dir resumes from its last checkpoint
(weights, optimizer, schedule, RNG states) and ends with exactly the weights of an uninterrupted run.

Early stopping is a function of the evaluation history alone, which the checkpoint keeps (like the
losses), so a resumed run stops at the same evaluation; the best evaluation's weights are written to
best.safetensors when they are reached, before any checkpoint that could be resumed from.

out_dir holds metrics.jsonl (one JSON record per logged step), checkpoint/ (see checkpoint.py),
best.safetensors (early stopping with restore_best) and done.json once finished; a finished training
is not run again: its weights are loaded.

Several CPU processes (to test DDP without GPUs): `accelerate launch --cpu` starts only one process
(accelerate issue #2741), so use its torchrun path with ACCELERATE_USE_CPU=1:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 script.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    broadcast_object_list,
    gather_object,
    is_tensorboard_available,
    parse_flag_from_env,
    send_to_device,
)
from torch import nn
from torch.utils.data import default_collate
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from stitchkit.config import Config, MixedPrecision
from stitchkit.engine.checkpoint import (
    CHECKPOINT,
    carry_optimizer_state,
    checkpoint_dir,
    finish_interrupted_swap,
    load_checkpoint,
    load_trainable_state_dict,
    read_checkpoint_state,
    save_checkpoint,
    save_trainable_state_dict,
    trainable_state_dict,
    wait_for_everyone,
)
from stitchkit.engine.seeding import rng_state, seed_everything, set_rng_state
from stitchkit.errors import DEADLINE_ENV, ConfigError, InputError, StitchkitError, TimeLimitReached, TrainingDiverged
from stitchkit.progress import make_progress
from stitchkit.runs import atomic_write_json, atomic_write_text

METRICS = "metrics.jsonl"
DONE = "done.json"
BEST = "best.safetensors"
# Config fields that do not change the trained weights; a resume may change them.
NOT_AFFECTING_RESULT = ("checkpoint_every", "log_every")

LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]
EvalFn = Callable[[nn.Module, int], dict[str, float]]
StopFn = Callable[[dict[str, float]], bool]


class EarlyStopping(Config):
    """Stop when the evaluation metric `metric` has not strictly improved for `patience` evaluations; with
    `restore_best` the model ends with the weights of its best evaluation rather than its last."""

    metric: str  # a key of what eval_fn returns
    mode: Literal["max", "min"] = "max"
    patience: int = pydantic.Field(ge=1)  # evaluations without improvement before stopping
    restore_best: bool = True

    def best(self, history: list[list[float]]) -> int:
        """Index of the best of the [step, value] evaluations in `history`. Only a strict improvement
        replaces the best (a tie keeps the earlier evaluation); a NaN value is never best."""
        sign = 1.0 if self.mode == "max" else -1.0
        best = 0
        for i, (_, value) in enumerate(history):
            incumbent = history[best][1]
            if not math.isnan(value) and (math.isnan(incumbent) or sign * value > sign * incumbent):
                best = i
        return best

    def exhausted(self, history: list[list[float]]) -> bool:
        """`patience` evaluations have passed since the best one."""
        return len(history) - 1 - self.best(history) >= self.patience


# AdamW's (beta1, beta2): moment decay rates in [0, 1).
AdamBetas = tuple[Annotated[float, pydantic.Field(ge=0, lt=1)], Annotated[float, pydantic.Field(ge=0, lt=1)]]


class TrainConfig(Config):
    """How `train` optimises: AdamW (decoupled weight decay) with linear warmup, then cosine decay to 0
    (`schedule: cosine`) or a constant learning rate (`schedule: constant`, for open-ended trainings that
    stop on an evaluation criterion). `lr_groups` gives parameters under a module their own learning rate
    (the schedule scales every group alike); `early_stopping` ends a training that stopped improving."""

    steps: int = pydantic.Field(ge=1)  # optimizer steps
    # The global batch of one optimizer step, over all processes and micro-batches.
    batch_size: int = pydantic.Field(ge=1)
    lr: float = pydantic.Field(1e-3, gt=0)
    # Module-name prefix (as in model.named_parameters(), e.g. "head" for head.weight, head.bias) -> its
    # learning rate; the longest matching prefix wins, other parameters use `lr`.
    lr_groups: dict[str, pydantic.PositiveFloat] = pydantic.Field(default_factory=dict)
    weight_decay: float = pydantic.Field(0.05, ge=0)
    betas: AdamBetas = (0.9, 0.999)  # torch's default
    warmup_steps: int = pydantic.Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_accum: int = pydantic.Field(1, ge=1)
    max_grad_norm: float | None = pydantic.Field(1.0, gt=0)
    checkpoint_every: int = pydantic.Field(200, ge=1)  # steps; a checkpoint is also written at the end
    log_every: int = pydantic.Field(10, ge=1)
    seed: int = 0
    mixed_precision: MixedPrecision = "auto"  # auto: bf16 on CUDA, no on CPU
    early_stopping: EarlyStopping | None = None  # needs eval_fn and eval_every
    # Epoch-aligned batches (module docstring): ceil(n / batch_size) steps per epoch, the last batch partial.
    epoch_batches: bool = False

    @pydantic.model_validator(mode="after")
    def _epoch_batches_alone(self) -> "TrainConfig":
        if self.epoch_batches and self.grad_accum != 1:
            raise ValueError("epoch_batches needs grad_accum = 1 (a partial last batch cannot be split evenly)")
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise ValueError(warmup_error(self.warmup_steps, self.steps))
        return self


def warmup_error(warmup_steps: int, steps: int) -> str:
    """Why a warm-up of warmup_steps cannot precede a training of `steps` (the suites check it before they start)."""
    return (f"warmup_steps ({warmup_steps}) must be fewer than the training's {steps} steps: the learning rate "
            "would still be rising when the training ends")  # fmt: skip


@dataclasses.dataclass
class TrainResult:
    """The trained model (the caller's object, on the training device) and what the training logged."""

    model: nn.Module
    steps: int
    losses: list[float]  # per optimizer step, mean over the global batch
    metrics: list[dict[str, Any]]  # the records of metrics.jsonl (main process only)
    resumed_from: int | None  # checkpoint step this run started from (= steps if already done), None if fresh
    best_step: int | None = None  # early stopping: the step of the best evaluation (None without early stopping)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Any,
    cfg: TrainConfig,
    out_dir: str | Path | None,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    description: str = "train",
    eval_fn: EvalFn | None = None,
    eval_every: int | None = None,
    stop_fn: StopFn | None = None,
    optimizer_from: str | Path | None = None,
) -> TrainResult:
    """Train the parameters of `model` that require grad with AdamW, warmup, then `cfg.schedule`.

    loss_fn(model, batch) returns the mean loss over `batch`, or (loss, {name: value}) with extra
    metrics. Under several processes `model` is the DDP wrapper: call it (its forward is what syncs
    gradients) rather than reading its attributes; close over your own model for those.
    dataset: anything with __len__ and __getitem__; `collate_fn` (default: torch's default_collate)
    makes a batch from a list of samples. eval_fn(model, step) runs on the main process in eval mode
    without gradients, every `eval_every` steps and at the end; it cannot disturb the training RNG.
    stop_fn(eval metrics) -> True ends the training early at that evaluation (a checkpoint is written there,
    and TrainResult.steps says where it stopped); the stop depends only on evaluations, so a resumed run
    stops at the same step. cfg.early_stopping stops the same way, after `patience` evaluations of its
    metric without improvement (either rule may stop); TrainResult.best_step is its best evaluation.
    optimizer_from: the out_dir of an earlier training of this model (the previous stage of a curriculum): this
    training starts from the AdamW moments that one ended with, for every parameter both train (by name);
    parameters that start training here get a fresh state. A resumed training restores its own checkpoint instead.
    out_dir=None trains in memory: no files, no resume. `model` is trained in place and left on the
    training device with its modules' train/eval modes as the caller had them.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise StitchkitError("nothing to train: no parameter of the model has requires_grad=True")
    if len(dataset) == 0:
        raise InputError("cannot train on an empty dataset")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    rule = cfg.early_stopping
    if rule is not None and (eval_fn is None or eval_every is None):
        raise ConfigError(
            f"early_stopping on {rule.metric!r} needs evaluations: pass eval_fn and eval_every to train()"
        )
    collate_fn = collate_fn or default_collate

    # Accelerator reads ACCELERATE_USE_CPU (set by `accelerate launch --cpu`) but PartialState does not;
    # we create the PartialState first (to probe the model before building the Accelerator), so pass it on.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > state.num_processes:
        # Without this check every process would train alone and all would write the same out_dir.
        raise StitchkitError(
            f"{launched} processes were launched but accelerate found no GPU to connect them over. "
            "For several CPU processes set ACCELERATE_USE_CPU=1, e.g. `ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu --num_processes 2 ...` (accelerate launch --cpu starts a single process)"
        )
    model.to(state.device)
    if out_dir is not None and (out_dir / DONE).exists():
        return _finished_training(model, cfg, out_dir)
    _check_batch_split(cfg, state.num_processes)
    if cfg.epoch_batches and state.num_processes > 1:
        raise ConfigError(f"epoch_batches trains on one process, not {state.num_processes} (a partial batch cannot be sharded evenly)")
    use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and state.device.type == "cuda")

    def autocast():
        # torch.autocast rather than Accelerator(mixed_precision=...): accelerate fixes the precision
        # once per process, and one process may run several trainings with different settings.
        return torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def micro_batches(step: int) -> Iterator[Any]:
        """This process's micro-batches of the global batch of `step`, on its device."""
        shard = _global_batch_indices(step, cfg.batch_size, len(dataset), cfg.seed, cfg.epoch_batches)
        shard = shard.reshape(state.num_processes, -1)[state.process_index]
        for indices in shard.reshape(cfg.grad_accum, -1):
            yield send_to_device(collate_fn([dataset[int(i)] for i in indices]), state.device)

    # Train mode for the whole model (dropout on); the caller's modes come back at the end.
    caller_modes = {module: module.training for module in model.modules()}
    model.train()
    # DDP must be told about trainable parameters the loss does not reach (find_unused_parameters),
    # which costs a graph traversal every step, so we ask for it only when a probe shows it is needed.
    find_unused = state.num_processes > 1 and any(
        gather_object([_has_unused_trainable_parameters(model, loss_fn, next(micro_batches(0)), autocast)])
    )
    # Ranks get different seeds so their dropout masks differ; rank 0 matches a one-process run.
    seed_everything(cfg.seed + state.process_index)

    use_tensorboard = out_dir is not None and is_tensorboard_available()
    accelerator = Accelerator(
        mixed_precision="no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        # We step the schedule once per optimizer step; accelerate would otherwise step it once per process.
        step_scheduler_with_optimizer=False,
        log_with="tensorboard" if use_tensorboard else None,
        project_dir=out_dir,
    )
    optimizer = torch.optim.AdamW(_parameter_groups(model, cfg), lr=cfg.lr, betas=cfg.betas)
    if optimizer_from is not None:
        carry_optimizer_state(Path(optimizer_from), model, optimizer)  # a resume's own checkpoint overrides it below
    if cfg.schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    # `prepared` is `model` itself in one process and its DDP wrapper in several; either way the
    # parameters are those of `model`, so we read and save `model` directly.
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # log_window: [loss, *extras] of the steps since the last log record, averaged into the next one.
    start_step, losses, log_window, metrics, resumed_from = 0, [], [], [], None
    stopped_at = None
    evaluations: list[list[float]] = []  # [step, value] of the early-stopping metric at every evaluation
    best_weights = None  # the best evaluation's trainable state, when out_dir=None (else in best.safetensors)
    if out_dir is not None:
        if accelerator.is_main_process:
            finish_interrupted_swap(out_dir)
        wait_for_everyone(accelerator)
        checkpoint = checkpoint_dir(out_dir)
        if checkpoint is not None:
            _check_same_config(read_checkpoint_state(checkpoint)["config"], cfg, out_dir)
            saved = load_checkpoint(checkpoint, model, optimizer, scheduler, accelerator.process_index)
            start_step = resumed_from = saved["step"]
            losses, log_window = saved["losses"], saved["log_window"]
            evaluations = saved.get("evaluations", [])
            if saved.get("stopped"):  # killed between the early stop's checkpoint and done.json
                stopped_at = start_step
        if accelerator.is_main_process:
            metrics = _truncate_metrics(out_dir / METRICS, start_step)
    if use_tensorboard:
        accelerator.init_trackers("tensorboard")

    progress = make_progress()
    progress.disable = progress.disable or not accelerator.is_main_process
    with progress, _stop_on_signals(out_dir is not None and state.num_processes == 1) as terminated:
        bar = progress.add_task(description, total=cfg.steps, completed=start_step, status="")
        pending: list[torch.Tensor] = []  # reduced [loss, *extras] per step, not yet turned into floats
        metric_names: list[str] = []
        final_step = stopped_at or cfg.steps
        for step in range(start_step, final_step):
            lr = scheduler.get_last_lr()[0]
            values: torch.Tensor | float = 0.0  # [loss, *extras], mean over this process's micro-batches
            for i, batch in enumerate(micro_batches(step)):
                # Gradients are all-reduced only on the last micro-batch of the step.
                last = i == cfg.grad_accum - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(prepared):
                    with autocast():
                        loss, extras = _split_loss(loss_fn(prepared, batch))
                    accelerator.backward(loss / cfg.grad_accum)
                metric_names = list(extras)
                extra_values = [torch.as_tensor(v).detach().to(loss.device, torch.float32) for v in extras.values()]
                values = values + torch.stack([loss.detach().float(), *extra_values]) / cfg.grad_accum
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending.append(accelerator.reduce(values, reduction="mean"))

            done = step + 1
            progress.update(bar, completed=done)
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            eval_due = done == cfg.steps or (eval_every is not None and done % eval_every == 0)
            eval_now = eval_fn is not None and eval_due
            # Every process evaluates the stop rule on the main process's metrics (broadcast below).
            stop_now = False
            out_of_time = out_dir is not None and done < final_step and (
                terminated["signal"] is not None or _deadline_passed(state.num_processes)
            )
            checkpoint_now = out_dir is not None and (
                done % cfg.checkpoint_every == 0 or done == cfg.steps or out_of_time
            )
            if not (log_now or eval_now or checkpoint_now):
                continue
            # Turning values into floats waits for the device, so we do it only here.
            new_values = torch.stack(pending).tolist()
            bad = next((i for i, v in enumerate(new_values) if not math.isfinite(v[0])), None)
            if bad is not None:  # before any checkpoint of this window: the last one on disk is from finite steps
                raise TrainingDiverged(done - len(new_values) + bad + 1, new_values[bad][0], description)
            pending = []
            losses.extend(v[0] for v in new_values)
            log_window.extend(new_values)
            record: dict[str, Any] = {"step": done}
            if log_now:
                means = np.mean(log_window, axis=0).tolist()
                log_window = []
                record.update(loss=means[0], lr=lr, epoch=done * cfg.batch_size / len(dataset))
                record.update(zip(metric_names, means[1:]))
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
            if eval_now:
                # [stop_fn says stop, early-stopping metric]: decided on the main process, followed by all.
                decision = [False, None]
                if accelerator.is_main_process:
                    evaluation = _evaluate(eval_fn, model, done)
                    record.update(evaluation)
                    user_stop = stop_fn is not None and done < cfg.steps and bool(stop_fn(evaluation))
                    decision = [user_stop, _tracked_metric(evaluation, rule)]
                if stop_fn is not None or rule is not None:
                    decision = broadcast_object_list(decision)
                stop_now = decision[0]
                if rule is not None:
                    evaluations.append([done, decision[1]])
                    if rule.restore_best and rule.best(evaluations) == len(evaluations) - 1:
                        best_weights = _keep_best(model, out_dir, accelerator)
                    stop_now = stop_now or (done < cfg.steps and rule.exhausted(evaluations))
                checkpoint_now = checkpoint_now or (stop_now and out_dir is not None)
            if len(record) > 1 and accelerator.is_main_process:
                metrics.append(record)
                if out_dir is not None:
                    with open(out_dir / METRICS, "a") as f:
                        f.write(json.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
            if checkpoint_now:
                checkpoint_state = {
                    "step": done,
                    "samples_seen": done * cfg.batch_size,
                    "losses": losses,
                    "log_window": log_window,
                    "evaluations": evaluations,
                    "stopped": stop_now,
                    "config": cfg.model_dump(mode="json"),
                }
                save_checkpoint(out_dir, accelerator, model, optimizer, scheduler, checkpoint_state)
            if log_now:
                progress.update(bar, status=f"loss {record['loss']:.4f}")
            if stop_now:
                final_step = done
                progress.update(bar, total=done)
                break
            if out_of_time:
                signum = terminated["signal"]
                reason = "the time limit passed" if signum is None else f"{_SIGNAL_REASONS[signum]} ({signal.Signals(signum).name})"
                raise TimeLimitReached(
                    f"{reason}: {description} saved a checkpoint after step {done} of {final_step}; "
                    "run the same command again to resume"
                )

    best_step = int(evaluations[rule.best(evaluations)][0]) if rule is not None and evaluations else None
    if best_step is not None and rule.restore_best:
        wait_for_everyone(accelerator)  # the main process has written best.safetensors
        if out_dir is None:
            model.load_state_dict(best_weights, strict=False)
        else:
            load_trainable_state_dict(model, out_dir / BEST)
    if out_dir is not None and accelerator.is_main_process:
        done_record = {"steps": final_step, "best_step": best_step, "losses": losses, "config": cfg.model_dump(mode="json")}
        atomic_write_json(out_dir / DONE, done_record)
    wait_for_everyone(accelerator)
    if terminated["signal"] is not None:  # it came in the last step, too late to stop early: its usual meaning now
        signal.raise_signal(terminated["signal"])
    # Not accelerator.end_training(): it also destroys the process group, which a later training in
    # this process still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    for module, training in caller_modes.items():
        module.training = training
    return TrainResult(
        model=model, steps=final_step, losses=losses, metrics=metrics, resumed_from=resumed_from, best_step=best_step
    )


_SIGNAL_REASONS = {signal.SIGTERM: "terminated", signal.SIGINT: "interrupted"}


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[dict[str, int | None]]:
    """While a checkpointed one-process training runs, SIGTERM (what `timeout`, SLURM and other schedulers send
    before they kill) and Ctrl-C (SIGINT) ask it to stop like --time-limit: at the end of the current step, after
    a checkpoint, so no step is lost. A second Ctrl-C interrupts at once, as usual. Elsewhere both signals keep
    their usual meaning, and so does a signal the process ignores (a background job of a script ignores SIGINT:
    a Ctrl-C meant for the foreground must not stop it). One that arrives in the last step, too late to stop
    early, is delivered again by `train` once the training is saved as finished and the handlers are back. (Several processes would
    have to agree on the step: not done.)"""
    request: dict[str, int | None] = {"signal": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    handled = [signum for signum in _SIGNAL_REASONS if signal.getsignal(signum) is not signal.SIG_IGN]

    def stop(signum, frame) -> None:
        request["signal"] = signum
        if signal.SIGINT in previous:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])  # a second Ctrl-C stops now

    previous = {signum: signal.signal(signum, stop) for signum in handled}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _deadline_passed(num_processes: int) -> bool:
    """Whether the `--time-limit` deadline (errors.DEADLINE_ENV) has passed; with several processes the main
    process decides for all, so they stop at the same step."""
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline is None:
        return False
    try:
        passed = time.time() >= float(deadline)
    except ValueError:
        raise ConfigError(
            f"{DEADLINE_ENV}={deadline!r} is not a Unix time in seconds (stitchkit --time-limit sets it)"
        ) from None
    return broadcast_object_list([passed])[0] if num_processes > 1 else passed


def _check_batch_split(cfg: TrainConfig, num_processes: int) -> None:
    """Every process and micro-batch gets an equal share of the global batch."""
    parts = num_processes * cfg.grad_accum
    if cfg.batch_size % parts:
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes ({num_processes}) x grad_accum "
            f"({cfg.grad_accum}) = {parts}"
        )


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, dataset_size: int) -> np.ndarray:
    # SeedSequence mixes (seed, epoch) properly: nearby seeds give unrelated orders.
    return np.random.default_rng([seed, epoch]).permutation(dataset_size)


def _global_batch_indices(step: int, batch_size: int, dataset_size: int, seed: int, epoch_batches: bool = False) -> np.ndarray:
    """Dataset indices of the global batch of optimizer step `step`: a slice of the epoch stream, or with
    `epoch_batches` batch step mod ceil(n / batch_size) of epoch step div ceil(n / batch_size) (the last one short)."""
    if epoch_batches:
        epoch, batch = divmod(step, math.ceil(dataset_size / batch_size))
        return _epoch_permutation(seed, epoch, dataset_size)[batch * batch_size : (batch + 1) * batch_size]
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, dataset_size)
    return np.array([_epoch_permutation(seed, int(e), dataset_size)[o] for e, o in zip(epochs, offsets)])


def _no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters their modules exempt from weight decay. A module lists its own in
    `no_weight_decay` (names, or timm's method returning them): learned tokens (timm's cls/reg tokens, a stitch's
    learnable prefix tokens) are matrices, but decay would pull them to 0 rather than keep them near their init."""
    exempt = set()
    for prefix, module in model.named_modules():
        names = getattr(module, "no_weight_decay", ())
        exempt.update(f"{prefix}.{name}" if prefix else name for name in (names() if callable(names) else names))
    return exempt


def _parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups by (learning rate, decayed): decay matrices (weights, embeddings) only, not biases, norm
    scales and other 1-D tensors, nor what a module exempts (_no_weight_decay); a parameter under an `lr_groups`
    prefix gets that group's learning rate (the longest prefix wins). The two base groups (lr = cfg.lr) come
    first, so get_last_lr()[0] is theirs."""
    longest_first = sorted(cfg.lr_groups, key=len, reverse=True)
    exempt = _no_weight_decay(model)
    groups: dict[tuple[str | None, bool], list[nn.Parameter]] = {(None, True): [], (None, False): []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            prefix = next((q for q in longest_first if name == q or name.startswith(q + ".")), None)
            groups.setdefault((prefix, parameter.ndim >= 2 and name not in exempt), []).append(parameter)
    unmatched = set(cfg.lr_groups) - {prefix for prefix, _ in groups}
    if unmatched:
        trainable = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad})
        raise ConfigError(
            f"lr_groups: {', '.join(map(repr, sorted(unmatched)))} matches no trainable parameter; prefixes are "
            f"module names, e.g. one of {', '.join(trainable[:8])}"
        )
    return [
        {"params": params, "lr": cfg.lr_groups.get(prefix, cfg.lr), "weight_decay": cfg.weight_decay if decayed else 0.0}
        for (prefix, decayed), params in groups.items()
    ]


def _split_loss(output: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    loss, extras = output if isinstance(output, tuple) else (output, {})
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0):
        raise TypeError(f"loss_fn must return a scalar tensor (or (tensor, dict)), got {type(loss).__name__}")
    return loss, extras


def _has_unused_trainable_parameters(model: nn.Module, loss_fn: LossFn, batch: Any, autocast) -> bool:
    """One forward/backward: does some trainable parameter get no gradient? RNG states and buffers are restored,
    so a loss whose forward updates module state (DINO's teacher EMA and centre) trains as if it never ran."""
    saved = rng_state()
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    with autocast():
        loss, _ = _split_loss(loss_fn(model, batch))
    loss.backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    set_rng_state(saved)
    return unused


def _evaluate(eval_fn: EvalFn, model: nn.Module, step: int) -> dict[str, float]:
    # Saving and restoring the RNGs makes a training with evaluation match one without.
    saved = rng_state()
    model.eval()
    with torch.no_grad():
        results = eval_fn(model, step)
    model.train()
    set_rng_state(saved)
    return {k: float(v) for k, v in results.items()}


def _tracked_metric(evaluation: dict[str, float], rule: EarlyStopping | None) -> float | None:
    if rule is None:
        return None
    if rule.metric not in evaluation:
        raise ConfigError(
            f"early_stopping.metric {rule.metric!r} is not among the metrics eval_fn returned "
            f"({', '.join(evaluation) or 'none'})"
        )
    return evaluation[rule.metric]


def _keep_best(model: nn.Module, out_dir: Path | None, accelerator: Accelerator) -> dict[str, torch.Tensor] | None:
    """Save the weights of a new best evaluation: to out_dir/best.safetensors (atomically; a resumed run and a
    re-run of a finished one need it), or, without out_dir, as an in-memory copy, which is returned."""
    if out_dir is None:
        return trainable_state_dict(model)
    if accelerator.is_main_process:
        save_trainable_state_dict(model, out_dir / BEST)
    return None


def _check_same_config(saved: dict[str, Any], cfg: TrainConfig, out_dir: Path) -> None:
    current = cfg.model_dump(mode="json")
    # A field added to TrainConfig after the training was saved counts as its default.
    defaults = {k: TrainConfig.model_fields[k].get_default(call_default_factory=True) for k in current}
    saved = {k: saved.get(k, defaults[k]) for k in current}
    changed = [k for k in current if k not in NOT_AFFECTING_RESULT and saved[k] != current[k]]
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"{out_dir} holds a training made with a different config ({diff}); "
            "use another output folder or delete this one"
        )


def _truncate_metrics(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records up to `last_step` (later steps are re-run) and drop a torn last line."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= last_step:
                records.append(record)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _finished_training(model: nn.Module, cfg: TrainConfig, out_dir: Path) -> TrainResult:
    """A training that already finished: load its final trainable weights (the best ones, with early
    stopping's restore_best) into `model`."""
    done = json.loads((out_dir / DONE).read_text())
    _check_same_config(done["config"], cfg, out_dir)
    best_step = done.get("best_step")
    restored = best_step is not None and cfg.early_stopping.restore_best
    load_trainable_state_dict(model, out_dir / BEST if restored else out_dir / CHECKPOINT / "model.safetensors")
    metrics_path = out_dir / METRICS
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    steps = done["steps"]
    return TrainResult(
        model=model, steps=steps, losses=done["losses"], metrics=metrics, resumed_from=steps, best_step=best_step
    )
