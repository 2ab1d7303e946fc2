"""The training objectives of the micro zoo, one function per formula.

Each function takes already-computed logits or head outputs, so it can be checked on hand-made inputs
without any model (tests/test_zoo_objectives.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stitchkit.engine.devices import mean_across_processes


def clip_contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric softmax cross-entropy over an image-text logit matrix (CLIP, Radford et al. 2021, Figure 3).

    `logits_per_image[i, j]` = exp(t) * <image_i, text_j>; matching pairs lie on the diagonal. The loss averages
    image->text and text->image cross-entropy.
    """
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_image.t(), targets)
    return (image_to_text + text_to_image) / 2


def sigmoid_pairwise_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP loss (Zhai et al. 2023, Eq. 1): -1/|B| sum_i sum_j log sigmoid(z_ij * (t x_i.y_j + b)).

    `logits[i, j]` already holds t x_i.y_j + b; z_ij = +1 on the diagonal (matching pair), -1 elsewhere. Every
    pair is an independent binary problem, so no softmax normalisation over the batch is needed.
    """
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def dino_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """DINO self-distillation loss (Caron et al. 2021, Eq. 1 and Algorithm 1) for two views.

    Student and teacher logits are (2, B, K): view 0 and view 1 of the same images. The teacher output is
    centred (subtract `center`) and sharpened (low temperature), then each view's teacher distribution supervises
    the student's prediction for the *other* view: H(P_t(v0), P_s(v1)) and H(P_t(v1), P_s(v0)), averaged.
    """
    teacher = F.softmax((teacher_logits.detach() - center) / teacher_temperature, dim=-1)
    student_log = F.log_softmax(student_logits / student_temperature, dim=-1)
    cross_0_1 = -(teacher[0] * student_log[1]).sum(dim=-1).mean()
    cross_1_0 = -(teacher[1] * student_log[0]).sum(dim=-1).mean()
    return (cross_0_1 + cross_1_0) / 2


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
    """DINO centering (Caron et al. 2021, Eq. 4): c <- m c + (1 - m) mean of the batch's teacher outputs.

    The batch is the global one: under several processes the mean is all-reduced over them, as DINO's code does,
    so every process keeps the centre one process would have at the same global batch."""
    batch_mean = mean_across_processes(teacher_logits.reshape(-1, teacher_logits.shape[-1]).mean(dim=0))
    center.mul_(momentum).add_(batch_mean, alpha=1 - momentum)


@torch.no_grad()
def ema_update(teacher: dict[str, torch.Tensor], student: torch.nn.Module, momentum: float) -> None:
    """Momentum teacher (DINO, Caron et al. 2021, Section 3.1): theta_t <- m theta_t + (1 - m) theta_s,
    for every parameter of `student`; `teacher` holds the teacher's tensors under the same names."""
    for name, param in student.named_parameters():
        teacher[name].mul_(momentum).add_(param.detach(), alpha=1 - momentum)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """DINO's teacher momentum schedule: cosine from `base` at step 0 to 1 at the last step."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
