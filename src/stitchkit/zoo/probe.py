"""Linear probes on frozen pooled features: how much of a label an encoder's own pooled output makes linear.

The probe is closed-form ridge regression onto one-hot targets (a least-squares classifier), with the ridge
strength picked on a held-out fifth of the training features, then refit on all of them. It is deterministic,
needs no optimiser settings, and treats a trained and a random-init encoder exactly alike.
"""

from __future__ import annotations

import torch

RIDGE_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the number of fitted samples


@torch.no_grad()
def pooled_features(backbone, images, batch_size: int = 256) -> torch.Tensor:
    """The backbone's own pooled output (B, D) for uint8 images (N, H, W, 3), as float64 on the CPU."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = backbone.preprocess(images[start : start + batch_size])  # moved to its device by the backbone
        chunks.append(backbone.pool(backbone.forward_features(pixels)).double().cpu())
    return torch.cat(chunks)


def _fit_ridge(x: torch.Tensor, targets: torch.Tensor, strength: float) -> torch.Tensor:
    """Weights W minimising |[x, 1] W - targets|^2 + strength * n * |W|^2 (bias column not penalised)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    penalty = torch.eye(xb.shape[1], dtype=x.dtype) * strength * len(x)
    penalty[-1, -1] = 0.0
    return torch.linalg.solve(xb.T @ xb + penalty, xb.T @ targets)


def _predict(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1) @ weights).argmax(dim=1)


def ridge_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
) -> float:
    """Test accuracy of a ridge classifier fit on standardised train features."""
    train_x, test_x = train_features.double(), test_features.double()
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp_min(1e-8)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    targets = torch.nn.functional.one_hot(train_labels.long(), num_classes).double()

    n_fit = len(train_x) - len(train_x) // 5  # the sets are already in random order

    def held_out_accuracy(strength: float) -> float:
        weights = _fit_ridge(train_x[:n_fit], targets[:n_fit], strength)
        return (_predict(train_x[n_fit:], weights) == train_labels[n_fit:]).double().mean().item()

    weights = _fit_ridge(train_x, targets, max(RIDGE_STRENGTHS, key=held_out_accuracy))
    return (_predict(test_x, weights) == test_labels).double().mean().item()


def linear_probe(backbone, train_set, test_set) -> float:
    """Accuracy of a linear probe on `backbone`'s frozen pooled output, trained on one ClassificationSet
    and tested on another (same labelling)."""
    was_training = backbone.training
    backbone.eval()
    try:
        train_x = pooled_features(backbone, train_set.images)
        test_x = pooled_features(backbone, test_set.images)
    finally:
        backbone.train(was_training)
    return ridge_probe_accuracy(
        train_x,
        torch.as_tensor(train_set.labels),
        test_x,
        torch.as_tensor(test_set.labels),
        num_classes=len(train_set.class_names),
    )
