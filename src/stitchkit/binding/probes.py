"""Linear probes of the residual stream and the binding signature (binding.md §7.4).

At every context shape position e_i and every layer (resid_pre 0..L-1, resid_post L) we fit linear probes for
    bound    the colour a_i bound to that shape (explicit binding moves it onto the shape),
    previous the previous pair's colour a_{i-1} (control: what mere proximity would give),
    index    the ordinal index i (a positional code),
and at the query position for the queried object's shape and its index q. The reference's control is the *next*
pair's colour a_{i+1}, but a causal model cannot see a_{i+1} at e_i, so that control stays at chance whatever the
model does; a_{i-1}, three tokens back, is as near as a proximity effect could reach. Probes are closed-form ridge
classifiers (stitchkit.zoo.probe, the same probe as the zoo's) fit on 80% of the examples and tested on the other
20% (disjoint examples). The reference proposes L2 logistic regression; a ridge classifier answers the same
"is it linearly decodable" question deterministically and without an optimiser.

Binding signature: strength = max_l acc_bound(l) - acc_bound(0); the surge layer is the first l whose rise reaches
half of that; the signature is present when strength >= 0.5, the accuracy rises by >= 0.3 between two consecutive
layers (a surge, not a gradual climb), and the control stays low (its own rise is less than half the bound colour's).
"""

from __future__ import annotations

import numpy as np
import torch

from stitchkit.binding.subjects import Subject, capture_residuals
from stitchkit.binding.task import example_rng, sample_example
from stitchkit.progress import track
from stitchkit.zoo.probe import ridge_probe_accuracy

TARGETS = ("bound", "previous", "index", "query_shape", "query_index")
TRAIN_SHARE = 0.8


def collect(subject: Subject, n: int, examples: int, seed: int, batch_size: int = 128) -> dict:
    """Residual features at shape positions and query positions, per layer, with their labels and example ids."""
    shape_feats, query_feats = [], []
    labels = {t: [] for t in TARGETS}
    owner = []
    exs = [sample_example(example_rng(seed, "probe", n, i), n, subject.vocab) for i in range(examples)]
    for start in track(range(0, examples, batch_size), description=f"probe features N={n}"):
        batch = exs[start : start + batch_size]
        ids = torch.tensor([subject.encode(ex) for ex in batch])
        residuals, _ = capture_residuals(subject, ids)
        stacked = torch.stack(residuals, dim=1).float().cpu()  # (B, L + 1, S, d)
        for row, ex in enumerate(batch):
            positions = subject.shape_positions(ex)
            shape_feats.append(stacked[row, :, positions].transpose(0, 1))  # (N, L + 1, d)
            query_feats.append(stacked[row, :, -1])
            labels["bound"] += list(ex.colours)
            labels["previous"] += [-1, *ex.colours[:-1]]  # the first object has no previous pair
            labels["index"] += list(range(ex.n))
            labels["query_shape"].append(ex.shapes[ex.query])
            labels["query_index"].append(ex.query)
            owner += [start + row] * ex.n
    return {
        "shape": torch.cat(shape_feats),
        "query": torch.stack(query_feats),
        "labels": {k: torch.tensor(v) for k, v in labels.items()},
        "owner": torch.tensor(owner),
        "examples": examples,
    }


def probe_layers(features: dict) -> dict[str, list[float]]:
    """Test accuracy of every probe at every layer."""
    cut = int(features["examples"] * TRAIN_SHARE)
    shape_train = features["owner"] < cut
    query_train = torch.arange(features["examples"]) < cut
    result = {}
    for target in TARGETS:
        on_query = target.startswith("query")
        x = features["query"] if on_query else features["shape"]
        y = features["labels"][target]
        train = query_train if on_query else shape_train
        valid = y >= 0
        result[target] = [
            ridge_probe_accuracy(x[train & valid, layer], y[train & valid], x[~train & valid, layer], y[~train & valid])
            for layer in range(x.shape[1])
        ]
    return result


def binding_signature(bound: list[float], control: list[float]) -> dict:
    bound_arr, control_arr = np.asarray(bound), np.asarray(control)
    rise = bound_arr - bound_arr[0]
    strength = float(rise.max())
    surge = int(np.argmax(rise >= strength / 2)) if strength > 0 else None
    steepest = float(np.max(np.diff(bound_arr))) if len(bound_arr) > 1 else 0.0
    control_rise = float(control_arr.max() - control_arr[0])
    present = strength >= 0.5 and steepest >= 0.3 and control_rise < strength / 2
    return {"strength": strength, "surge_layer": surge, "steepest_layer_rise": steepest, "control_rise": control_rise, "present": bool(present)}


def run_probes(subject: Subject, n: int = 8, examples: int = 1000, seed: int = 0) -> dict:
    layers = probe_layers(collect(subject, n, examples, seed))
    return {"n": n, "examples": examples, "accuracy": layers, "signature": binding_signature(layers["bound"], layers["previous"])}
