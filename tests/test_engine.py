"""The training engine: against a hand-written PyTorch loop, resume after kills, and two processes."""

from __future__ import annotations

import json
import contextlib
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import engine_tiny_train as tiny
from ddp_launch import launch_two_cpu_processes
from stitchkit.config import validate_config
from stitchkit.engine import EarlyStopping, TrainConfig, seed_everything, train
from stitchkit.engine import checkpoint as checkpoint_module
from stitchkit.engine.loop import _global_batch_indices
from stitchkit.errors import ConfigError, InputError, StitchkitError, TrainingDiverged

HELPER = Path(__file__).with_name("engine_tiny_train.py")
def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_result(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: json.loads(v) for k, v in f.metadata().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_data_order_is_a_seeded_permutation_per_epoch():
    size, batch = 10, 4
    stream = np.concatenate([_global_batch_indices(step, batch, size, seed=3) for step in range(5)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # a new order every epoch
    assert np.array_equal(_global_batch_indices(2, batch, size, seed=3), stream[8:12])
    assert not np.array_equal(_global_batch_indices(0, batch, size, seed=4), stream[:4])


def hand_written_training(cfg: TrainConfig, data, lr_of: dict[str, float] | None = None):
    """Oracle: plain AdamW on the full global batch, decay only on matrices, clipping, and the warmup + cosine
    schedule written out by hand; lr_of gives named parameters their own base learning rate.
    Returns (model, losses, base lr per step, gradient norms)."""
    model = tiny.build_model()
    groups = {}  # (base lr, decayed) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(((lr_of or {}).get(name, cfg.lr), p.ndim >= 2), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "base_lr": lr, "weight_decay": cfg.weight_decay if decayed else 0.0}
         for (lr, decayed), ps in groups.items()],
        betas=cfg.betas,
    )

    def factor(step):  # linear warmup, then half a cosine down to 0
        if step < cfg.warmup_steps:
            return step / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)))

    permutations = [np.random.default_rng([cfg.seed, epoch]).permutation(len(data)) for epoch in range(cfg.steps)]
    if cfg.epoch_batches:  # each epoch cut into batches, the last one short
        batches = [perm[i:i + cfg.batch_size] for perm in permutations for i in range(0, len(data), cfg.batch_size)]
    else:
        stream = np.concatenate(permutations)
        batches = [stream[step * cfg.batch_size:(step + 1) * cfg.batch_size] for step in range(cfg.steps)]
    losses, lrs, grad_norms = [], [], []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor(step)
        indices = batches[step]
        x = torch.stack([data[i]["x"] for i in indices])
        y = torch.stack([data[i]["y"] for i in indices])
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        trainable = [p for ps in groups.values() for p in ps]
        grad_norms.append(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        lrs.append(cfg.lr * factor(step))
    return model, losses, lrs, grad_norms


def test_the_unused_parameter_probe_leaves_module_state_as_it_was():
    """The multi-process probe runs one real forward; a forward that moves buffers (DINO's EMA teacher and centre)
    must find them as they were, or two processes train from another state than one."""
    from stitchkit.engine.loop import _has_unused_trainable_parameters

    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.used(x).sum()

    model = Stateful()
    assert _has_unused_trainable_parameters(model, lambda m, batch: m(batch), torch.ones(3, 2), contextlib.nullcontext)
    assert model.calls.item() == 0 and all(p.grad is None for p in model.parameters())


def test_matches_a_hand_written_pytorch_loop():
    """The engine splits each batch into 2 micro-batches; the oracle does not."""
    cfg = TrainConfig(steps=6, batch_size=16, grad_accum=2, lr=3e-3, weight_decay=0.1, warmup_steps=2,
                      max_grad_norm=0.5, log_every=1, seed=5, mixed_precision="no", betas=(0.8, 0.95))
    data = tiny.make_dataset()
    result = train(tiny.build_model(), tiny.loss_fn, data, cfg, None)
    model, losses, lrs, grad_norms = hand_written_training(cfg, data)

    # Float32 sums in a different order (two half-batches vs one batch): agreement to ~1e-7 relative.
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in result.metrics], lrs, rtol=1e-12, atol=1e-15)
    # The gradient itself (before clipping): shows each micro-batch loss is scaled by 1/grad_accum.
    np.testing.assert_allclose([r["grad_norm"] for r in result.metrics], grad_norms, rtol=1e-5)
    trained = tiny.trainable_weights(result.model)
    for name, expected in tiny.trainable_weights(model).items():
        torch.testing.assert_close(trained[name], expected, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in result.metrics] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= r["accuracy"] <= 1 for r in result.metrics)


def test_epoch_batches_end_every_epoch_with_a_short_batch_as_hf_trainer_does():
    """20 samples, batch 8: steps 0-2 are epoch 0 (8, 8, 4 samples), step 3 opens epoch 1; training equals the
    hand-written loop over those batches."""
    epoch0 = np.random.default_rng([3, 0]).permutation(20)
    assert np.array_equal(_global_batch_indices(2, 8, 20, seed=3, epoch_batches=True), epoch0[16:])
    assert np.array_equal(_global_batch_indices(3, 8, 20, seed=3, epoch_batches=True), np.random.default_rng([3, 1]).permutation(20)[:8])
    cfg = TrainConfig(steps=7, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, seed=3, mixed_precision="no", epoch_batches=True)
    data = tiny.make_dataset(20)
    result = train(tiny.build_model(), tiny.loss_fn, data, cfg, None)
    model, losses, *_ = hand_written_training(cfg, data)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    for name, expected in tiny.trainable_weights(model).items():
        torch.testing.assert_close(tiny.trainable_weights(result.model)[name], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="epoch_batches needs grad_accum = 1"):
        validate_config(TrainConfig, {"steps": 1, "batch_size": 8, "grad_accum": 2, "epoch_batches": True})


def test_a_non_finite_loss_stops_the_training_before_it_is_checkpointed(tmp_path):
    """The loss turns NaN at the 5th step: a clear error naming step 5, and the checkpoint on disk is step 4's."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, extras = tiny.loss_fn(model, batch)
        return (loss * float("nan") if calls["n"] >= 5 else loss), extras

    cfg = TrainConfig(steps=10, batch_size=8, log_every=3, checkpoint_every=2, mixed_precision="no")
    with pytest.raises(TrainingDiverged, match="diverged: the loss is nan at step 5") as err:
        train(tiny.build_model(), loss_fn, tiny.make_dataset(), cfg, tmp_path, description="tiny")
    assert err.value.exit_code == 4 and err.value.step == 5
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 4


def test_lr_groups_give_parameters_their_own_learning_rate_under_the_common_schedule():
    """Longest prefix wins (hidden.bias over hidden), prefixes are whole module names ("h" would match nothing),
    unmatched parameters (norm) keep lr, and the logged lr is the base lr."""
    cfg = TrainConfig(steps=5, batch_size=16, lr=1e-3, warmup_steps=2, log_every=1, mixed_precision="no",
                      lr_groups={"head": 2e-2, "hidden": 5e-3, "hidden.bias": 1e-1})
    data = tiny.make_dataset()
    result = train(tiny.build_model(), tiny.loss_fn, data, cfg, None)
    per_name = {"head.weight": 2e-2, "head.bias": 2e-2, "hidden.weight": 5e-3, "hidden.bias": 1e-1}
    model, losses, lrs, _ = hand_written_training(cfg, data, per_name)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in result.metrics], lrs, rtol=1e-12, atol=1e-15)
    trained = tiny.trainable_weights(result.model)
    for name, expected in tiny.trainable_weights(model).items():
        torch.testing.assert_close(trained[name], expected, rtol=1e-5, atol=1e-6)
    # The oracle is sensitive to the groups: with one lr for all it ends elsewhere.
    plain, *_ = hand_written_training(cfg, data)
    assert not torch.allclose(tiny.trainable_weights(plain)["head.weight"], trained["head.weight"], atol=1e-4)
    for prefix in ("h", "frozen"):  # not a module name; a module without trainable parameters
        with pytest.raises(ConfigError, match=f"lr_groups: '{prefix}' matches no trainable parameter"):
            train(tiny.build_model(), tiny.loss_fn, data, cfg.model_copy(update={"lr_groups": {prefix: 1e-2}}), None)


def test_a_module_exempts_its_own_matrices_from_weight_decay_by_name():
    """A module names parameters in `no_weight_decay` (a collection, or timm's method returning one), relative to
    itself and at any depth; they train undecayed, other matrices keep the decay. Oracle: with a zero gradient
    AdamW moves a parameter by its decay alone, p <- p (1 - lr wd) per step."""

    class Tokens(nn.Module):
        no_weight_decay = ("tokens",)

        def __init__(self):
            super().__init__()
            self.tokens, self.other = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(2, 3))

    class TimmLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token, self.weight, self.inner = nn.Parameter(torch.ones(1, 3)), nn.Parameter(torch.ones(3, 3)), Tokens()

        def no_weight_decay(self):
            return {"cls_token"}

        def forward(self, x):
            return x.sum() * sum(p.sum() for p in self.parameters()) * 0.0  # every gradient exactly 0

    cfg = TrainConfig(steps=3, batch_size=2, lr=0.1, weight_decay=0.5, schedule="constant", mixed_precision="no")
    model = TimmLike()
    train(model, lambda m, batch: m(batch["x"]), [{"x": torch.ones(1)}] * 2, cfg, None)
    for exempt in (model.cls_token, model.inner.tokens):
        assert torch.equal(exempt.detach(), torch.ones_like(exempt))
    for decayed in (model.weight, model.inner.other):
        torch.testing.assert_close(decayed.detach(), torch.full_like(decayed, (1 - 0.1 * 0.5) ** 3))


def test_a_second_stage_carries_the_optimizer_moments_over_by_name(tmp_path):
    """Stage 2 (optimizer_from = stage 1's folder) equals ONE hand-written AdamW that keeps going, including a
    parameter that only starts training in stage 2 (fresh moments, as binding's projector)."""
    cfg = TrainConfig(steps=6, batch_size=16, lr=3e-3, weight_decay=0.1, schedule="constant", mixed_precision="no")
    data = tiny.make_dataset()
    model = tiny.build_model()
    train(model, tiny.loss_fn, data, cfg, tmp_path / "stage1")
    model.frozen.requires_grad_(True)
    second = cfg.model_copy(update={"steps": 4})
    train(model, tiny.loss_fn, data, second, tmp_path / "stage2", optimizer_from=tmp_path / "stage1")

    oracle = tiny.build_model()
    optimizer = torch.optim.AdamW([{"params": [p for p in oracle.parameters() if p.requires_grad and p.ndim >= 2]},
                                   {"params": [p for p in oracle.parameters() if p.requires_grad and p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)  # fmt: skip

    def steps(n):
        # Each training's data stream starts over: seeded permutations of the dataset, epoch after epoch.
        order = np.concatenate([np.random.default_rng([cfg.seed, epoch]).permutation(len(data)) for epoch in range(2)])
        for step in range(n):
            batch = [data[i] for i in order[step * 16 : (step + 1) * 16]]
            loss = nn.functional.cross_entropy(oracle(torch.stack([b["x"] for b in batch])), torch.stack([b["y"] for b in batch]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in oracle.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()

    steps(6)
    oracle.frozen.requires_grad_(True)
    optimizer.add_param_group({"params": [oracle.frozen.weight]})
    optimizer.add_param_group({"params": [oracle.frozen.bias], "weight_decay": 0.0})
    steps(4)
    for name, expected in oracle.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=1e-5, atol=1e-6)

    # Fresh moments in stage 2 end elsewhere (the comparison above can fail).
    fresh = tiny.build_model()
    train(fresh, tiny.loss_fn, data, cfg, None)
    fresh.frozen.requires_grad_(True)
    train(fresh, tiny.loss_fn, data, second, None)
    assert not torch.allclose(fresh.head.weight, model.head.weight, atol=1e-4)
    with pytest.raises(InputError, match="holds no training checkpoint"):
        train(tiny.build_model(), tiny.loss_fn, data, second, None, optimizer_from=tmp_path / "nothing")


def test_checkpoint_holds_trainable_state_only_and_a_finished_training_is_loaded_not_rerun(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    data = tiny.make_dataset()
    model = tiny.build_model(dropout=0.1)
    frozen_before = model.frozen.weight.clone()
    first = train(model, tiny.loss_fn, data, cfg, tmp_path / "a")
    assert torch.equal(model.frozen.weight.cpu(), frozen_before)
    assert first.resumed_from is None and len(first.losses) == 4
    with safe_open(str(tmp_path / "a" / "checkpoint" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert "hidden.weight" in saved and "norm.bias" in saved and not any(k.startswith("frozen.") for k in saved)
    assert metrics_steps(tmp_path / "a") == [1, 2, 3, 4]
    written = {p.name for p in tmp_path.joinpath("a").iterdir()} - {"tensorboard"}  # if tensorboard is installed
    assert written == {"checkpoint", "done.json", "metrics.jsonl"}

    # Same seed, same bytes.
    train(tiny.build_model(dropout=0.1), tiny.loss_fn, data, cfg, tmp_path / "b")
    for name in ("checkpoint/model.safetensors", "metrics.jsonl", "done.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    def must_not_train(model, batch):
        raise AssertionError("a finished training was run again")

    fresh = tiny.build_model(dropout=0.1)
    again = train(fresh, must_not_train, data, cfg, tmp_path / "a")
    assert again.model is fresh and again.resumed_from == 4
    assert again.losses == first.losses and again.metrics == first.metrics
    assert_same_weights(tiny.trainable_weights(fresh), tiny.trainable_weights(first.model))

    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.01"):
        train(tiny.build_model(), must_not_train, data, cfg.model_copy(update={"lr": 0.01}), tmp_path / "a")


def test_resume_after_a_crash_while_checkpointing(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=6, batch_size=8, grad_accum=2, checkpoint_every=2, log_every=1)
    data = tiny.make_dataset()
    reference = train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, None)

    # Die while writing the second checkpoint (step 4), after its weights are written.
    writes = 0
    real_write = checkpoint_module.atomic_write_json

    def dying_write(path, obj):
        nonlocal writes
        writes += 1
        if writes == 2:
            raise RuntimeError("simulated kill")
        real_write(path, obj)

    monkeypatch.setattr(checkpoint_module, "atomic_write_json", dying_write)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, out)
    monkeypatch.undo()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (out / "checkpoint.tmp" / "model.safetensors").exists()
    # And as if a kill had also hit a swap between its two renames.
    os.replace(out / "checkpoint", out / "checkpoint.old")

    resumed = train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, out)
    assert resumed.resumed_from == 2
    assert resumed.losses == reference.losses
    assert_same_weights(tiny.trainable_weights(resumed.model), tiny.trainable_weights(reference.model))
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()


def test_a_passed_time_limit_checkpoints_the_step_and_stops_then_the_same_call_resumes(tmp_path, monkeypatch):
    from stitchkit.errors import DEADLINE_ENV, TimeLimitReached

    cfg = TrainConfig(steps=6, batch_size=8, checkpoint_every=4, log_every=1)
    data = tiny.make_dataset()
    reference = train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, None)
    monkeypatch.setenv(DEADLINE_ENV, "0")  # long passed
    in_memory = train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, None)
    assert in_memory.steps == 6  # nothing to resume from: the limit does not apply
    out = tmp_path / "run"
    with pytest.raises(TimeLimitReached, match="after step 1 of 6; run the same command again"):
        train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, out)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1  # before checkpoint_every
    monkeypatch.delenv(DEADLINE_ENV)
    resumed = train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, out)
    assert resumed.resumed_from == 1 and resumed.losses == reference.losses
    assert_same_weights(tiny.trainable_weights(resumed.model), tiny.trainable_weights(reference.model))


def test_a_malformed_deadline_is_a_config_error_naming_it(tmp_path, monkeypatch):
    from stitchkit.errors import DEADLINE_ENV

    monkeypatch.setenv(DEADLINE_ENV, "soon")
    with pytest.raises(ConfigError, match="STITCHKIT_DEADLINE='soon' is not a Unix time"):
        train(tiny.build_model(), tiny.loss_fn, tiny.make_dataset(), TrainConfig(steps=2, batch_size=8), tmp_path / "run")


@pytest.mark.parametrize("signame, reason", [("SIGTERM", "terminated"), ("SIGINT", "interrupted")])
def test_sigterm_or_ctrl_c_during_a_training_checkpoints_the_step_and_stops_then_the_same_call_resumes(tmp_path, signame, reason):
    import signal

    from stitchkit.errors import TimeLimitReached

    signum = getattr(signal, signame)

    cfg = TrainConfig(steps=6, batch_size=8, checkpoint_every=4, log_every=1)
    data = tiny.make_dataset()
    reference = train(tiny.build_model(), tiny.loss_fn, data, cfg, None)
    calls = []

    def terminated_in_step_3(model, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)  # as `timeout`, a scheduler or Ctrl-C would
        return tiny.loss_fn(model, batch)

    before = signal.getsignal(signum)
    out = tmp_path / "run"
    with pytest.raises(TimeLimitReached, match=rf"{reason} \({signame}\): .* after step 3 of 6"):
        train(tiny.build_model(), terminated_in_step_3, data, cfg, out)
    assert signal.getsignal(signum) is before  # restored once the training is over
    resumed = train(tiny.build_model(), tiny.loss_fn, data, cfg, out)
    assert resumed.resumed_from == 3 and resumed.losses == reference.losses
    assert_same_weights(tiny.trainable_weights(resumed.model), tiny.trainable_weights(reference.model))


def run_helper(args: list[str]):
    """The tiny training as a script, on one process of its own."""
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.update(STITCHKIT_PROGRESS="0")
    return subprocess.run([sys.executable, str(HELPER), *args], env=env, capture_output=True, text=True, timeout=120)


def test_a_killed_training_resumes_to_exactly_the_weights_of_an_uninterrupted_one(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=8, grad_accum=2, checkpoint_every=3, log_every=1)
    out, result = tmp_path / "run", tmp_path / "result.safetensors"
    args = ["--out", str(out), "--result", str(result), "--config", cfg.model_dump_json(), "--dropout", "0.3"]

    killed = run_helper([*args, "--crash-at-step", "5"])  # dies in step 6, after the step-3 checkpoint
    assert killed.returncode == 1, killed.stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert metrics_steps(out) == [1, 2, 3, 4, 5] and not (out / "done.json").exists()

    rerun = run_helper(args)
    assert rerun.returncode == 0, rerun.stderr
    weights, info = read_result(result)
    assert info["resumed_from"] == 3

    reference = train(tiny.build_model(dropout=0.3), tiny.loss_fn, tiny.make_dataset(), cfg, None)
    assert_same_weights(weights, tiny.trainable_weights(reference.model))
    assert info["losses"] == reference.losses
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one_at_the_same_global_batch(tmp_path):
    """DDP over gloo (tests/ddp_launch.py), with a frozen layer and a trainable head the loss never uses
    (which makes the engine turn on find_unused_parameters)."""
    cfg = TrainConfig(steps=6, batch_size=16, grad_accum=2, checkpoint_every=4, log_every=1, mixed_precision="no")
    out, result = tmp_path / "run", tmp_path / "result.safetensors"
    launched = launch_two_cpu_processes(HELPER, ["--out", str(out), "--result", str(result), "--config",
                                                 cfg.model_dump_json(), "--unused-head", "--again"])
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoint").glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    weights, info = read_result(result)

    single = train(tiny.build_model(unused_head=True), tiny.loss_fn, tiny.make_dataset(), cfg, None)
    # Same samples, same math; only float32 summation order differs (per-process micro-batches of 4
    # vs 8, then an all-reduce mean), which moves losses by ~1e-7 relative: rtol 1e-5 leaves margin.
    np.testing.assert_allclose(info["losses"], single.losses, rtol=1e-5)
    assert info["losses_again"] == info["losses"]  # a second training in the same processes works alike
    for name, expected in tiny.trainable_weights(single.model).items():
        torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(weights["unused_head.weight"], tiny.build_model(unused_head=True).unused_head.weight)


def test_bf16_autocast_wraps_the_loss(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=8, mixed_precision="bf16", log_every=1)

    def autocast_checking_loss(model, batch):
        device = batch["x"].device.type
        assert torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        return tiny.loss_fn(model, batch)

    bf16 = train(tiny.build_model(), autocast_checking_loss, tiny.make_dataset(), cfg, None)
    fp32_cfg = cfg.model_copy(update={"mixed_precision": "no"})
    fp32 = train(tiny.build_model(), tiny.loss_fn, tiny.make_dataset(), fp32_cfg, None)
    np.testing.assert_allclose(bf16.losses, fp32.losses, rtol=3e-2)  # bf16 keeps ~3 significant digits
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def test_eval_fn_is_logged_and_does_not_disturb_training():
    cfg = TrainConfig(steps=4, batch_size=8, log_every=2)
    data = tiny.make_dataset()
    evaluated = []

    def eval_fn(model, step):
        assert not model.training and not torch.is_grad_enabled()
        torch.rand(3), random.random(), np.random.rand()  # consumes every RNG the training uses
        evaluated.append(step)
        everything = torch.utils.data.default_collate(data)
        device = next(model.parameters()).device
        return {"eval_loss": tiny.loss_fn(model, {k: v.to(device) for k, v in everything.items()})[0]}

    with_eval = train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, None, eval_fn=eval_fn, eval_every=3)
    plain = train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, None)
    assert evaluated == [3, 4]
    assert with_eval.losses == plain.losses
    assert [sorted(r) for r in with_eval.metrics] == [
        ["accuracy", "epoch", "grad_norm", "loss", "lr", "step"],
        ["eval_loss", "step"],
        ["accuracy", "epoch", "eval_loss", "grad_norm", "loss", "lr", "step"],
    ]
    assert with_eval.metrics[0]["loss"] == pytest.approx(np.mean(plain.losses[:2]))


def test_stop_fn_ends_training_early_and_a_rerun_loads_it(tmp_path):
    """An early stop at an evaluation: the run ends there, its weights equal an uninterrupted run's weights at
    that step, and a re-run finds it finished instead of training on."""
    data = tiny.make_dataset()
    cfg = TrainConfig(steps=20, batch_size=8, schedule="constant", warmup_steps=2, checkpoint_every=100, log_every=2)
    stop_at = lambda metrics: metrics["step_seen"] >= 6  # noqa: E731
    eval_fn = lambda model, step: {"step_seen": step}  # noqa: E731
    stopped = train(tiny.build_model(), tiny.loss_fn, data, cfg, tmp_path / "a", eval_fn=eval_fn, eval_every=3, stop_fn=stop_at)
    assert stopped.steps == 6 and len(stopped.losses) == 6
    assert json.loads((tmp_path / "a" / "done.json").read_text())["steps"] == 6
    short = train(tiny.build_model(), tiny.loss_fn, data, cfg.model_copy(update={"steps": 6}), None)
    assert stopped.losses == short.losses  # constant schedule: the first 6 steps do not depend on `steps`
    assert_same_weights(stopped.model.state_dict(), short.model.state_dict())
    again = train(tiny.build_model(), tiny.loss_fn, data, cfg, tmp_path / "a", eval_fn=eval_fn, eval_every=3, stop_fn=stop_at)
    assert again.steps == 6 and again.resumed_from == 6
    assert_same_weights(again.model.state_dict(), short.model.state_dict())
    lrs = [r["lr"] for r in stopped.metrics if "lr" in r]
    assert lrs[-1] == cfg.lr  # warmup done, then constant


# Planted evaluations at steps 2, 4, 6, ...: best 5 at step 8; 4, 4 and 4.5 are no improvement, so patience 3
# stops at step 14. Patience 4 sees the 6 at step 16, then four 0s: it stops at step 24.
PLANTED = [1, 3, 2, 5, 4, 4, 4.5, 6] + [0] * 12


def test_early_stopping_stops_after_patience_evaluations_and_ends_at_the_best_weights(tmp_path):
    data = tiny.make_dataset()
    cfg = TrainConfig(steps=40, batch_size=8, schedule="constant", checkpoint_every=100, log_every=5,
                      early_stopping=EarlyStopping(metric="score", patience=3))
    evaluate = tiny.planted_eval(PLANTED, 2)

    def run(cfg, out=None, **kwargs):
        return train(tiny.build_model(dropout=0.3), tiny.loss_fn, data, cfg, out, eval_fn=evaluate, eval_every=2, **kwargs)

    def weights_after(steps):  # constant schedule: the first steps do not depend on `steps`
        return run(cfg.model_copy(update={"steps": steps, "early_stopping": None})).model.state_dict()

    best = weights_after(8)

    stopped = run(cfg, tmp_path / "a")
    assert (stopped.steps, stopped.best_step, len(stopped.losses)) == (14, 8, 14)
    assert_same_weights(stopped.model.state_dict(), best)
    assert json.loads((tmp_path / "a" / "done.json").read_text())["best_step"] == 8
    assert json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())["step"] == 14  # written at the stop
    again = run(cfg, tmp_path / "a")  # finished: loads the best weights without training
    assert (again.steps, again.best_step, again.resumed_from) == (14, 8, 14)
    assert_same_weights(again.model.state_dict(), best)

    # In memory; restore_best off keeps the last weights; the stop itself is the same.
    in_memory = run(cfg)
    assert (in_memory.steps, in_memory.best_step) == (14, 8)
    assert_same_weights(in_memory.model.state_dict(), best)
    last = run(cfg.model_copy(update={"early_stopping": EarlyStopping(metric="score", patience=3, restore_best=False)}))
    assert (last.steps, last.best_step) == (14, 8)
    assert_same_weights(last.model.state_dict(), weights_after(14))

    # mode min on the negated sequence stops alike; patience 4 reaches the later best.
    evaluate = tiny.planted_eval([-v for v in PLANTED], 2)
    assert run(cfg.model_copy(update={"early_stopping": EarlyStopping(metric="score", mode="min", patience=3)})).steps == 14
    evaluate = tiny.planted_eval(PLANTED, 2)
    longer = run(cfg.model_copy(update={"early_stopping": EarlyStopping(metric="score", patience=4)}))
    assert (longer.steps, longer.best_step) == (24, 16)
    # With stop_fn, whichever rule fires first stops the training.
    both = run(cfg, stop_fn=lambda metrics: metrics["score"] >= 5)
    assert (both.steps, both.best_step) == (8, 8)


def test_early_stopping_errors_are_clear():
    data = tiny.make_dataset()
    cfg = TrainConfig(steps=4, batch_size=8, early_stopping=EarlyStopping(metric="accuracy", patience=2))
    with pytest.raises(ConfigError, match="needs evaluations: pass eval_fn and eval_every"):
        train(tiny.build_model(), tiny.loss_fn, data, cfg, None)
    with pytest.raises(ConfigError, match=r"'accuracy' is not among the metrics eval_fn returned \(score\)"):
        train(tiny.build_model(), tiny.loss_fn, data, cfg, None, eval_fn=tiny.planted_eval(PLANTED, 2), eval_every=2)
    with pytest.raises(ConfigError, match="patience"):
        validate_config(TrainConfig, {"steps": 1, "batch_size": 8, "early_stopping": {"metric": "a", "patience": 0}})


def test_a_killed_training_with_early_stopping_stops_where_an_uninterrupted_one_does(tmp_path):
    """Killed after the new best at step 8 was saved but before a checkpoint took it in (the last is at step 5):
    the re-run replays steps 6-9, stops at 14 and ends with the step-8 weights, like an uninterrupted run."""
    cfg = TrainConfig(steps=40, batch_size=8, grad_accum=2, checkpoint_every=5, log_every=1,
                      early_stopping=EarlyStopping(metric="score", patience=3))
    out, result = tmp_path / "run", tmp_path / "result.safetensors"
    args = ["--out", str(out), "--result", str(result), "--config", cfg.model_dump_json(), "--dropout", "0.3",
            "--planted", json.dumps(PLANTED), "--eval-every", "2"]

    killed = run_helper([*args, "--crash-at-step", "9"])
    assert killed.returncode == 1, killed.stderr
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and state["evaluations"] == [[2, 1], [4, 3]]
    assert (out / "best.safetensors").exists() and not (out / "done.json").exists()

    rerun = run_helper(args)
    assert rerun.returncode == 0, rerun.stderr
    weights, info = read_result(result)
    assert (info["resumed_from"], info["steps"], info["best_step"]) == (5, 14, 8)

    reference = train(tiny.build_model(dropout=0.3), tiny.loss_fn, tiny.make_dataset(), cfg, None,
                      eval_fn=tiny.planted_eval(PLANTED, 2), eval_every=2)
    assert (reference.steps, reference.best_step) == (14, 8)
    assert_same_weights(weights, tiny.trainable_weights(reference.model))
    assert info["losses"] == reference.losses
    assert metrics_steps(out) == list(range(1, 15))


def test_user_errors_are_one_clear_message(tmp_path, monkeypatch):
    data = tiny.make_dataset()
    with pytest.raises(ConfigError, match="divisible by processes"):
        train(tiny.build_model(), tiny.loss_fn, data, TrainConfig(steps=1, batch_size=10, grad_accum=4), None)
    with pytest.raises(ConfigError, match="steps"):
        validate_config(TrainConfig, {"steps": 0, "batch_size": 8})
    with pytest.raises(ConfigError, match="lrr"):
        validate_config(TrainConfig, {"steps": 1, "batch_size": 8, "lrr": 0.1})
    frozen = tiny.build_model().requires_grad_(False)
    with pytest.raises(StitchkitError, match="nothing to train"):
        train(frozen, tiny.loss_fn, data, TrainConfig(steps=1, batch_size=8), None)

    cfg = TrainConfig(steps=1, batch_size=8)
    train(tiny.build_model(), tiny.loss_fn, data, cfg, tmp_path / "run")
    with pytest.raises(InputError, match="do not fit this model"):
        train(tiny.build_model(unused_head=True), tiny.loss_fn, data, cfg, tmp_path / "run")

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(StitchkitError, match="ACCELERATE_USE_CPU=1"):
        train(tiny.build_model(), tiny.loss_fn, data, cfg, None)


def test_seed_everything_seeds_every_rng():
    seed_everything(11)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(11)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_a_seed_numpy_cannot_take_is_a_config_error():
    from stitchkit.errors import ConfigError

    seed_everything(2**32 - 1)
    for bad in (-1, 2**32):
        with pytest.raises(ConfigError, match=f"seed {bad} is out of range"):
            seed_everything(bad)


def test_a_warmup_as_long_as_the_training_is_refused():
    from stitchkit.config import validate_config
    from stitchkit.errors import ConfigError

    assert validate_config(TrainConfig, {"steps": 10, "batch_size": 2, "warmup_steps": 9}).warmup_steps == 9
    with pytest.raises(ConfigError, match=r"warmup_steps \(10\) must be fewer than the training's 10 steps"):
        validate_config(TrainConfig, {"steps": 10, "batch_size": 2, "warmup_steps": 10})


def test_an_unquoted_yaml_no_is_the_precision_no():
    """YAML 1.1 reads `mixed_precision: no` as false; every suite's optimiser block shares the type that reads it
    back as "no" (stitchkit.config.MixedPrecision)."""
    import pydantic
    import yaml

    cfg = TrainConfig.model_validate(yaml.safe_load("steps: 3\nbatch_size: 2\nmixed_precision: no\n"))
    assert cfg.mixed_precision == "no"
    with pytest.raises(pydantic.ValidationError):
        TrainConfig.model_validate(yaml.safe_load("steps: 3\nbatch_size: 2\nmixed_precision: yes\n"))  # true: no such value


def test_an_ignored_sigint_stays_ignored_and_a_stop_in_the_last_step_comes_after_the_training(tmp_path):
    """A background job of a script inherits SIGINT ignored: a training must not start honouring it. A Ctrl-C in
    the last step cannot stop the training early: it keeps its usual meaning once the training is saved."""
    import signal

    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=4)
    data = tiny.make_dataset()

    def ctrl_c_in_step(step):
        calls = []

        def loss(model, batch):
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGINT)
            return tiny.loss_fn(model, batch)

        return loss

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = train(tiny.build_model(), ctrl_c_in_step(2), data, cfg, tmp_path / "ignored")
        assert result.steps == 4 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    with pytest.raises(KeyboardInterrupt):
        train(tiny.build_model(), ctrl_c_in_step(4), data, cfg, tmp_path / "last")
    assert (tmp_path / "last" / "done.json").is_file()  # saved as finished before the interrupt
