"""The four trainable micro foundation models, one nn.Module per objective.

Each module's forward(batch) returns (loss, metrics), the shape stitchkit.engine.train expects from a loss
function, so the engine (and DDP under several GPUs) calls the module itself. `vision_encoder()` returns the
Hugging Face model that gets saved: ViTModel, the full CLIPModel / SiglipModel (load_backbone takes their
vision tower, like a hub checkpoint), or the DINO *teacher* as a Dinov2WithRegistersModel (DINO evaluates
its teacher).

A batch is a dict of tensors: "image" uint8 (B, H, W, 3), "label" int64 (B,), and for the image-text
objectives "caption_ids" / "caption_mask" int64 (B, max_words).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PreTrainedModel,
    SiglipConfig,
    SiglipModel,
    ViTConfig,
    ViTModel,
)

from stitchkit.engine.devices import gather_across_processes, mean_across_processes
from stitchkit.zoo.augment import Augmentation, augment
from stitchkit.zoo.objectives import (
    clip_contrastive_loss,
    cosine_momentum,
    dino_cross_entropy,
    ema_update,
    sigmoid_pairwise_loss,
    update_center,
)
from stitchkit.zoo.recipes import Encoder, TextTower, ZooRecipe
from stitchkit.zoo.text import BOS_ID, EOS_ID, PAD_ID


def training_pixels(images: torch.Tensor, aug: Augmentation, encoder: Encoder) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> one augmented, normalised float view (B, 3, H, W), as the backbone's preprocess
    normalises: (x / 255 - mean) / std."""
    x = augment(images.permute(0, 3, 1, 2).float() / 255.0, aug)
    mean = torch.tensor(encoder.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _vision_config(encoder: Encoder) -> dict:
    return dict(
        image_size=encoder.image_size,
        patch_size=encoder.patch_size,
        hidden_size=encoder.hidden_size,
        num_hidden_layers=encoder.num_layers,
        num_attention_heads=encoder.num_heads,
        intermediate_size=encoder.intermediate_size,
    )


def _text_config(text: TextTower, vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=4 * text.hidden_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        max_position_embeddings=text.max_words,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # CLIP pools the text at the first <eos>
    )


class SupervisedClassifier(nn.Module):
    """ViTModel + a linear head on the normed CLS token (as ViTForImageClassification), cross-entropy."""

    def __init__(self, recipe: ZooRecipe, num_classes: int):
        super().__init__()
        self.recipe = recipe
        # ViTModel always builds its tanh pooler and from_pretrained expects its weights, so it stays in the
        # model; the loss never reaches it, and the backbone's pool reads the normed CLS, like this head.
        self.encoder = ViTModel(ViTConfig(**_vision_config(recipe.encoder)))
        self.head = nn.Linear(recipe.encoder.hidden_size, num_classes)

    def forward(self, batch: dict[str, torch.Tensor]):
        pixels = training_pixels(batch["image"], self.recipe.augment, self.recipe.encoder)
        cls = self.encoder(pixel_values=pixels).last_hidden_state[:, 0]
        logits = self.head(cls)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.recipe.objective.label_smoothing)
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        return loss, {"accuracy": accuracy}

    def vision_encoder(self) -> PreTrainedModel:
        return self.encoder


class ImageTextContrastive(nn.Module):
    """CLIPModel with the softmax contrastive loss, or SiglipModel with the pairwise sigmoid loss."""

    def __init__(self, recipe: ZooRecipe, vocab_size: int):
        super().__init__()
        self.recipe = recipe
        objective, vision = recipe.objective, _vision_config(recipe.encoder)
        text = _text_config(objective.text, vocab_size)
        if objective.kind == "clip":
            config = CLIPConfig(
                text_config=text,
                vision_config=vision,
                projection_dim=objective.projection_dim,
                logit_scale_init_value=math.log(1 / objective.init_temperature),
            )
            self.model = CLIPModel(config)
        else:
            # SigLIP has no projection on the image side: the text head maps to the vision width.
            config = SiglipConfig(text_config={**text, "projection_size": recipe.encoder.hidden_size}, vision_config=vision)
            self.model = SiglipModel(config)
            with torch.no_grad():  # SigLIP paper, Section 3.2: t' = log 10, b = -10 (HF initialises both to 0)
                self.model.logit_scale.fill_(objective.init_logit_scale)
                self.model.logit_bias.fill_(objective.init_logit_bias)

    def forward(self, batch: dict[str, torch.Tensor]):
        pixels = training_pixels(batch["image"], self.recipe.augment, self.recipe.encoder)
        clip = self.recipe.objective.kind == "clip"
        if clip:
            out = self.model(input_ids=batch["caption_ids"], attention_mask=batch["caption_mask"], pixel_values=pixels)
        else:
            # SigLIP reads every position of its max-length padded text (no mask) and pools the last one.
            out = self.model(input_ids=batch["caption_ids"], pixel_values=pixels)
        logits = self.global_logits_per_image(out.image_embeds, out.text_embeds)
        loss = clip_contrastive_loss(logits) if clip else sigmoid_pairwise_loss(logits)
        matched = logits.argmax(dim=1) == torch.arange(len(logits), device=logits.device)
        return loss, {"retrieval": matched.float().mean(), "temperature": self.model.logit_scale.exp().detach().reshape(())}

    def global_logits_per_image(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """The image-text logits of the global batch: every process's normalised embeddings, gathered with their
        gradient, scaled (and for SigLIP shifted) by the same operations as CLIPModel's and SiglipModel's forward,
        so one process gets their logits_per_image bit for bit.

        Why several processes then train like one at the same global batch (OpenCLIP's gather_features): every
        process computes the same global loss L. On process r, all_gather's backward sums what the W processes
        computed for r's embeddings, W * dL/de_r, which flows into r's encoders; DDP sums the W processes'
        parameter gradients and divides by W, leaving sum_r dL/de_r * de_r/dtheta = dL/dtheta. The temperature
        and bias are used outside the gather: each process has dL/dt itself, and the mean of W equal values is it.
        """
        images, texts = gather_across_processes(image_embeds), gather_across_processes(text_embeds)
        logits_per_text = torch.matmul(texts, images.t()) * self.model.logit_scale.exp()
        if self.recipe.objective.kind == "siglip":
            logits_per_text = logits_per_text + self.model.logit_bias
        return logits_per_text.t()

    def vision_encoder(self) -> PreTrainedModel:
        return self.model


class DinoHead(nn.Module):
    """DINO projection head: 3-layer MLP -> bottleneck -> l2-normalised -> weight-normalised prototypes.

    Normalising the prototype rows in the forward equals DINO's weight-normed last layer with its norm fixed
    to 1 (Caron et al. 2021, Section 3.1 and Appendix).
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, num_prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, bottleneck_dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class DinoNetwork(nn.Module):
    def __init__(self, backbone: Dinov2WithRegistersModel, head: DinoHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=pixels).pooler_output)  # pooler_output = normed CLS


def as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of `module` into a buffer of the same name, in place.

    The DINO teacher is updated by EMA, never by the optimiser. As buffers its weights are outside the
    optimiser, yet inside state_dict(), so the engine's checkpoint holds them and a killed build resumes
    with the teacher it had (the engine does not save frozen parameters).
    """
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach().clone())
    return module


class SelfDistillation(nn.Module):
    """DINO: a student matches a momentum teacher's centred, sharpened output on another view of the image."""

    def __init__(self, recipe: ZooRecipe):
        super().__init__()
        self.recipe = recipe
        objective = recipe.objective
        vision = _vision_config(recipe.encoder)
        del vision["intermediate_size"]  # Dinov2 sizes its MLP by mlp_ratio instead
        self.backbone_config = Dinov2WithRegistersConfig(
            **vision,
            mlp_ratio=recipe.encoder.mlp_ratio,
            num_register_tokens=recipe.encoder.num_registers,
        )
        head = DinoHead(
            recipe.encoder.hidden_size, objective.head_hidden_size, objective.bottleneck_size, objective.num_prototypes
        )
        self.student = DinoNetwork(Dinov2WithRegistersModel(self.backbone_config), head)
        self.teacher = as_buffers(copy.deepcopy(self.student))  # DINO starts the teacher as a copy of the student
        self.register_buffer("center", torch.zeros(objective.num_prototypes))
        self.register_buffer("teacher_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_teacher(self) -> float:
        """One EMA step of the teacher towards the student, with the momentum on DINO's cosine schedule."""
        m = cosine_momentum(self.recipe.objective.teacher_momentum, int(self.teacher_updates), self.recipe.train.steps)
        ema_update(dict(self.teacher.named_buffers()), self.student, m)
        self.teacher_updates += 1
        return m

    def forward(self, batch: dict[str, torch.Tensor]):
        objective = self.recipe.objective
        # The engine calls us once per optimiser step (recipes keep grad_accum = 1), so updating here, before
        # the loss, moves the teacher after every optimiser step: it trails the student by one step.
        # Several processes train like one at the same global batch: the loss is a mean of per-image terms, so
        # DDP's average of the processes' gradients is the global batch's; the centre and the prototype metric use
        # the global batch mean (mean_across_processes); and the teachers stay equal because the students are.
        momentum = self.update_teacher()
        images = batch["image"]
        views = torch.cat([training_pixels(images, self.recipe.augment, self.recipe.encoder) for _ in range(2)])
        student_logits = self.student(views).unflatten(0, (2, len(images)))
        with torch.no_grad():
            teacher_logits = self.teacher(views).unflatten(0, (2, len(images)))
        loss = dino_cross_entropy(
            student_logits, teacher_logits, self.center, objective.student_temperature, objective.teacher_temperature
        )
        with torch.no_grad():
            # Perplexity of the (global) batch-mean teacher distribution: a collapse onto one prototype shows as ~1.
            probs = F.softmax((teacher_logits - self.center) / objective.teacher_temperature, dim=-1)
            mean_probs = mean_across_processes(probs.mean(dim=(0, 1)))
            used_prototypes = torch.exp(-(mean_probs * mean_probs.clamp_min(1e-12).log()).sum())
        update_center(self.center, teacher_logits, objective.center_momentum)
        return loss, {"prototypes_used": used_prototypes, "teacher_momentum": momentum}

    def vision_encoder(self) -> PreTrainedModel:
        """The teacher's backbone as an ordinary Dinov2WithRegistersModel (parameters, not buffers)."""
        model = Dinov2WithRegistersModel(self.backbone_config)
        model.load_state_dict(self.teacher.backbone.state_dict())
        return model.to(self.center.device)


def make_trainable(recipe: ZooRecipe, num_classes: int, vocab_size: int) -> nn.Module:
    kind = recipe.objective.kind
    if kind == "supervised":
        return SupervisedClassifier(recipe, num_classes)
    if kind in ("clip", "siglip"):
        return ImageTextContrastive(recipe, vocab_size)
    return SelfDistillation(recipe)
