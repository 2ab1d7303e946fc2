"""A tiny CPU training for the engine tests, importable and runnable as a script.

As a script (also under `accelerate launch`) it trains and writes the per-step losses and final
trainable weights to --result (a .safetensors file). --crash-at-step K makes the process die with
os._exit(1) when it starts step K, i.e. after the checkpoints before K were written, as a kill would.
--planted SCORES --eval-every E evaluates every E steps with `planted_eval` (for early stopping).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from stitchkit.engine import TrainConfig, train

IN, HIDDEN, CLASSES = 8, 16, 4


class TinyNet(nn.Module):
    """frozen input layer -> trainable MLP with LayerNorm and dropout; optionally an unused trainable head."""

    def __init__(self, dropout: float = 0.0, unused_head: bool = False):
        super().__init__()
        self.frozen = nn.Linear(IN, HIDDEN)
        self.frozen.requires_grad_(False)
        self.hidden = nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(HIDDEN, CLASSES)
        # Trainable but never used in forward: DDP then needs find_unused_parameters.
        self.unused_head = nn.Linear(HIDDEN, CLASSES) if unused_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.frozen(x))
        h = self.dropout(torch.relu(self.norm(self.hidden(h))))
        return self.head(h)


def build_model(dropout: float = 0.0, unused_head: bool = False, init_seed: int = 123) -> TinyNet:
    torch.manual_seed(init_seed)
    return TinyNet(dropout, unused_head)


def make_dataset(size: int = 48, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, IN, generator=g)
    y = torch.randint(0, CLASSES, (size,), generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(size)]


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]):
    logits = model(batch["x"])
    loss = nn.functional.cross_entropy(logits, batch["y"])
    accuracy = (logits.argmax(-1) == batch["y"]).float().mean()
    return loss, {"accuracy": accuracy}


def planted_eval(scores: list[float], every: int):
    """An eval_fn returning a scripted metric: scores[i] at the i-th evaluation (step (i + 1) * every)."""
    return lambda model, step: {"score": scores[step // every - 1]}


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--unused-head", action="store_true")
    parser.add_argument("--crash-at-step", type=int)
    parser.add_argument("--again", action="store_true", help="then train once more, in memory, in this process")
    parser.add_argument("--planted", help="JSON list of scores for planted_eval")
    parser.add_argument("--eval-every", type=int)
    args = parser.parse_args(argv)
    cfg = TrainConfig.model_validate_json(args.config)

    calls = 0

    def crashing_loss_fn(model, batch):
        nonlocal calls
        if args.crash_at_step is not None and calls == args.crash_at_step * cfg.grad_accum:
            sys.stdout.flush()
            os._exit(1)
        calls += 1
        return loss_fn(model, batch)

    model = build_model(args.dropout, args.unused_head)
    evaluation = {}
    if args.planted is not None:
        evaluation = {"eval_fn": planted_eval(json.loads(args.planted), args.eval_every), "eval_every": args.eval_every}
    result = train(model, crashing_loss_fn, make_dataset(), cfg, args.out, **evaluation)
    metadata = {
        "losses": json.dumps(result.losses),
        "resumed_from": json.dumps(result.resumed_from),
        "steps": json.dumps(result.steps),
        "best_step": json.dumps(result.best_step),
    }
    if args.again:
        again = train(build_model(args.dropout, args.unused_head), loss_fn, make_dataset(), cfg, None)
        metadata["losses_again"] = json.dumps(again.losses)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file(trainable_weights(result.model), str(args.result), metadata=metadata)
    if torch.distributed.is_initialized():
        # Tear gloo down before the interpreter exits: left to exit-time destructors, its threads have
        # aborted a rank ("terminate called without an active exception") on a heavily loaded machine.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
