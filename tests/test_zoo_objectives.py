"""The zoo's formulas on hand-made inputs: losses, DINO teacher updates, augmentations, vocabulary, probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from stitchkit.zoo.augment import Augmentation, augment, random_resized_crop
from stitchkit.zoo.objectives import (
    clip_contrastive_loss,
    cosine_momentum,
    dino_cross_entropy,
    ema_update,
    sigmoid_pairwise_loss,
    update_center,
)
from stitchkit.zoo.probe import ridge_probe_accuracy
from stitchkit.zoo.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, WordVocab


def test_clip_loss_is_the_symmetric_cross_entropy_of_the_logit_matrix():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    # Explicit: mean over rows of -log softmax(row)[i], and the same over columns.
    row_terms = [-(logits[i, i] - torch.logsumexp(logits[i, :], dim=0)) for i in range(5)]
    column_terms = [-(logits[i, i] - torch.logsumexp(logits[:, i], dim=0)) for i in range(5)]
    expected = (sum(row_terms) / 5 + sum(column_terms) / 5) / 2
    assert torch.allclose(clip_contrastive_loss(logits), expected, atol=1e-6)
    assert torch.allclose(clip_contrastive_loss(logits), image_text_contrastive_loss(logits), atol=1e-6)  # HF's own


def test_clip_loss_is_near_zero_for_a_confident_diagonal():
    assert clip_contrastive_loss(torch.eye(4) * 50).item() < 1e-6


def test_sigmoid_loss_matches_an_explicit_double_loop():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 4 - 2
    n = len(logits)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * logits[i, j].item())))
    assert sigmoid_pairwise_loss(logits).item() == pytest.approx(total / n, rel=1e-6)


def test_sigmoid_loss_of_the_siglip_initialisation():
    # SigLIP's init (t = 10, b = -10) on orthogonal embeddings: diagonal logits 10 - 10 = 0, others -10.
    logits = torch.eye(3) * 10 - 10
    expected = (3 * math.log(2) + 6 * math.log(1 + math.exp(-10))) / 3
    assert sigmoid_pairwise_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_on_a_planted_case():
    # K = 2, B = 1, both temperatures 1, no centre. Teacher view 0 = softmax([ln 2, 0]) = [2/3, 1/3];
    # teacher view 1 = [1/2, 1/2]. Student view 1 is uniform, student view 0 = [2/3, 1/3].
    teacher = torch.tensor([[[math.log(2), 0.0]], [[0.0, 0.0]]])
    student = torch.tensor([[[math.log(2), 0.0]], [[0.0, 0.0]]])
    # H(t0, s1) = -(2/3 ln 1/2 + 1/3 ln 1/2) = ln 2; H(t1, s0) = -(1/2 ln 2/3 + 1/2 ln 1/3).
    expected = (math.log(2) - 0.5 * (math.log(2 / 3) + math.log(1 / 3))) / 2
    loss = dino_cross_entropy(student, teacher, torch.zeros(2), 1.0, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_pairs_each_view_with_the_other_and_is_minimal_at_the_teacher():
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(2, 3, 5, generator=generator)
    center = torch.randn(5, generator=generator)
    t_s, t_t = 0.1, 0.04
    target = F.softmax((teacher - center) / t_t, dim=-1)
    # A student whose view-v logits reproduce the teacher's *other* view exactly: the loss is the teacher
    # entropy, and its gradient vanishes.
    student = (t_s * target.clamp_min(1e-30).log()).flip(0).clone().requires_grad_(True)
    loss = dino_cross_entropy(student, teacher, center, t_s, t_t)
    entropy = -(target * target.clamp_min(1e-30).log()).sum(-1).mean()
    assert loss.item() == pytest.approx(entropy.item(), abs=1e-5)
    loss.backward()
    assert student.grad.abs().max().item() < 1e-6
    # The same student not flipped (each view matched to its own teacher view) is worse.
    assert dino_cross_entropy(student.detach().flip(0), teacher, center, t_s, t_t) > loss


def test_dino_center_and_momentum_schedule():
    center = torch.tensor([1.0, 0.0])
    update_center(center, torch.tensor([[[3.0, 2.0]], [[5.0, 4.0]]]), momentum=0.9)
    assert torch.allclose(center, torch.tensor([0.9 * 1 + 0.1 * 4, 0.1 * 3]))
    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)


def test_teacher_ema_and_the_dino_model_keep_the_teacher_in_buffers():
    student = torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
        student.bias.fill_(4.0)
    teacher = {"weight": torch.zeros(1, 2), "bias": torch.tensor([8.0])}
    ema_update(teacher, student, momentum=0.75)
    assert torch.allclose(teacher["weight"], torch.tensor([[0.25, 0.5]])) and teacher["bias"].item() == 7.0

    from stitchkit.zoo.models import SelfDistillation
    from stitchkit.zoo.recipes import load_recipe

    model = SelfDistillation(load_recipe("dino"))
    assert not list(model.teacher.parameters())  # not optimised, but in state_dict (the engine's checkpoint)
    assert any(k.startswith("teacher.backbone.") for k in model.state_dict())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = dict(model.teacher.named_buffers())["head.prototypes"].clone()
    m = model.update_teacher()
    after = dict(model.teacher.named_buffers())["head.prototypes"]
    assert torch.allclose(after, m * before + (1 - m) * (before + 1.0), atol=1e-6)


def test_default_augmentation_is_the_identity_and_flip_only_mirrors():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(augment(images, Augmentation()), images)
    torch.manual_seed(0)
    flipped = random_resized_crop(images, (1.0, 1.0), flip=True)
    for original, out in zip(images, flipped):
        same = torch.allclose(out, original, atol=1e-5)
        mirrored = torch.allclose(out, original.flip(-1), atol=1e-5)
        assert same or mirrored


def test_brightness_and_contrast_keep_the_hue_of_a_flat_colour():
    red = torch.zeros(4, 3, 4, 4)
    red[:, 0] = 0.8
    red[:, 1:] = 0.1
    torch.manual_seed(0)
    out = augment(red, Augmentation(brightness=0.3, contrast=0.3))
    pixel = out[:, :, 0, 0]
    assert (pixel[:, 0] > pixel[:, 1]).all() and torch.allclose(pixel[:, 1], pixel[:, 2])
    assert out.min() >= 0 and out.max() <= 1


def test_vocabulary_encodes_pads_and_round_trips(tmp_path):
    vocab = WordVocab.from_texts(["a red star", "two blue crosses and a red star"])
    ids, mask = vocab.encode(["a red star", "a green star", "two blue crosses and a red star"], length=6)
    index = {tok: i for i, tok in enumerate(vocab.tokens)}
    assert ids[0].tolist() == [BOS_ID, index["a"], index["red"], index["star"], EOS_ID, PAD_ID]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[1, 2].item() == UNK_ID  # "green" was never seen
    assert ids[2].tolist() == [BOS_ID, index["two"], index["blue"], index["crosses"], index["and"], EOS_ID]
    vocab.save(tmp_path / "vocab.json")
    assert WordVocab.load(tmp_path / "vocab.json") == vocab


def test_probe_separates_separable_features_and_not_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 5
    labels = torch.from_numpy(rng.integers(0, 4, size=300))
    features = torch.from_numpy(centres[labels.numpy()] + rng.normal(size=(300, 8)))
    assert ridge_probe_accuracy(features[:200], labels[:200], features[200:], labels[200:]) > 0.95
    shuffled = labels[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    assert ridge_probe_accuracy(features[:200], shuffled[:200], features[200:], shuffled[200:]) < 0.5


def test_grayscale_replaces_colour_by_luminance():
    images = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    out = augment(images, Augmentation(grayscale=0.5))
    luminance = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    grey = [torch.allclose(o, luminance[i].expand(3, 4, 4), atol=1e-6) for i, o in enumerate(out)]
    kept = [torch.equal(o, images[i]) for i, o in enumerate(out)]
    assert all(g or k for g, k in zip(grey, kept)) and 10 < sum(grey) < 54
