"""SigLIP 2's late self-distillation (Tschannen et al. 2025), the model side: prototype heads, a learned mask token,
an EMA teacher and its centres. The loss side is contrastive.losses.self_distillation.

Built with the model (so the optimiser, FSDP and checkpoints see every part from the start), unused until the switch
step: the heads and mask token get no gradient before it, so AdamW leaves them at their initial values, and they
start fresh there; the teacher (a frozen copy of the image tower and heads) is re-initialised from the student at
the switch, then follows it by EMA. Per step the trainer calls `begin_step` before the forward and `end_step`
after the optimiser step.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from contrastive.config import SelfDistillationConfig
from contrastive.errors import ConfigError
from contrastive.models.ema import lerp_towards


class PrototypeHead(nn.Module):
    """DINO's head: a 3-layer MLP to an L2-normalised bottleneck, then cosines with K unit-norm prototypes (DINO's
    weight-normalised last layer with its norm fixed at 1)."""

    def __init__(self, width: int, hidden: int, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (..., width) -> (..., K)
        return F.normalize(self.mlp(features), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


def vit_tokens(visual: nn.Module, images: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, D), patch tokens (B, N, D)) of open_clip's timm tower `visual` (trunk: a class-token-free timm
    VisionTransformer), the same computation as its forward, for any image size a multiple of the patch (position
    embeddings resampled), with the patches where `mask` (B, N) is true replaced by `mask_token` (iBOT)."""
    trunk = visual.trunk
    x = trunk.patch_embed.proj(images)  # (B, D, h, w)
    grid = x.shape[-2:]
    x = trunk.patch_embed.norm(x.flatten(2).transpose(1, 2))  # (B, N, D)
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    position = trunk.pos_embed
    if tuple(grid) != tuple(trunk.patch_embed.grid_size):
        position = resample_abs_pos_embed(position, new_size=list(grid), num_prefix_tokens=0)
    x = trunk.norm_pre(trunk.pos_drop(x + position))
    for block in trunk.blocks:
        x = block(x)
    patches = trunk.norm(x)
    pooled = visual.head(trunk.forward_head(patches, pre_logits=True))
    return pooled, patches


class SelfDistillation(nn.Module):
    def __init__(self, visual: nn.Module, cfg: SelfDistillationConfig) -> None:
        super().__init__()
        trunk = getattr(visual, "trunk", None)
        if not isinstance(trunk, VisionTransformer) or trunk.num_prefix_tokens or not hasattr(trunk, "attn_pool"):
            raise ConfigError("loss.self_distillation needs a timm ViT image tower without class token "
                              "(model.vision.timm_model_name, e.g. model=tiny_siglip)")
        self.cfg = cfg
        width = trunk.embed_dim
        pooled_width = visual.head(torch.zeros(1, width)).shape[-1]  # the tower's output width (after any proj)
        head_shape = (cfg.head_hidden, cfg.head_bottleneck, cfg.prototypes)
        self.global_head = PrototypeHead(pooled_width, *head_shape)
        self.patch_head = PrototypeHead(width, *head_shape)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))  # iBOT's zero-initialised mask token
        teacher = nn.ModuleDict({"visual": copy.deepcopy(visual), "global_head": copy.deepcopy(self.global_head),
                                 "patch_head": copy.deepcopy(self.patch_head)})
        self.teacher = teacher.requires_grad_(False)
        self.register_buffer("global_centre", torch.zeros(cfg.prototypes))
        self.register_buffer("patch_centre", torch.zeros(cfg.prototypes))
        self.active = False
        self.start_step = self.max_steps = 0

    def schedule(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.start_step = math.floor(self.cfg.start * max_steps)

    def _pairs(self, student_visual: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(teacher tensor, student tensor) for every teacher parameter."""
        students = {"visual": student_visual, "global_head": self.global_head, "patch_head": self.patch_head}
        return [(teacher_parameter, student_parameter)
                for name, part in self.teacher.items()
                for teacher_parameter, student_parameter in zip(part.parameters(), students[name].parameters(),
                                                                strict=True)]

    @torch.no_grad()
    def begin_step(self, step: int, student_visual: nn.Module) -> None:
        """Before step `step` (0-based)'s forward: on from the start step, whose teacher starts as the student."""
        self.active = step >= self.start_step
        if step == self.start_step:
            for teacher, student in self._pairs(student_visual):
                teacher.copy_(student.detach())
            self.global_centre.zero_()
            self.patch_centre.zero_()

    def teacher_momentum(self, step: int) -> float:
        """DINO's cosine schedule from cfg.teacher_momentum at the switch to 1 at the last step."""
        span = max(1, self.max_steps - self.start_step)
        progress = min(1.0, (step - self.start_step) / span)
        return 1 - (1 - self.cfg.teacher_momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def end_step(self, step: int, student_visual: nn.Module, teacher_statistics: dict[str, torch.Tensor]) -> None:
        """After step `step`'s optimiser step: the teacher follows the student, the centres this batch's teacher."""
        if not self.active:
            return
        pairs = self._pairs(student_visual)
        lerp_towards([t for t, _ in pairs], [s.detach() for _, s in pairs], 1 - self.teacher_momentum(step))
        weight = 1 - self.cfg.centre_momentum
        self.global_centre.lerp_(teacher_statistics["global_centre"].to(self.global_centre.dtype), weight)
        self.patch_centre.lerp_(teacher_statistics["patch_centre"].to(self.patch_centre.dtype), weight)

    def forward(self, student_visual: nn.Module, global_views: torch.Tensor, local_views: torch.Tensor,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The ModelOutput fields of self-distillation for (B, G, 3, g, g) global and (B, L, 3, l, l) local views;
        masks draw from `generator` (the model's, so a replayed forward draws the same)."""
        batch, views = global_views.shape[:2]
        flat_global = global_views.flatten(0, 1)
        with torch.no_grad():
            teacher_pooled, teacher_patches = vit_tokens(self.teacher["visual"], flat_global)
            teacher_global = self.teacher["global_head"](teacher_pooled)
            teacher_patch = self.teacher["patch_head"](teacher_patches)
        patches = teacher_patches.shape[1]
        scores = torch.rand(batch * views, patches, generator=generator, device=generator.device)
        masked_count = max(1, round(self.cfg.mask_ratio * patches))
        mask = scores.argsort(dim=1).argsort(dim=1) < masked_count  # exactly masked_count random patches per view
        mask = mask.to(flat_global.device)
        _, student_patches = vit_tokens(student_visual, flat_global, mask, self.mask_token)
        local_pooled, _ = vit_tokens(student_visual, local_views.flatten(0, 1))
        return {
            "student_local_logits": self.global_head(local_pooled).unflatten(0, (batch, -1)),
            "teacher_global_logits": teacher_global.unflatten(0, (batch, views)),
            "student_patch_logits": self.patch_head(student_patches).unflatten(0, (batch, views)),
            "teacher_patch_logits": teacher_patch.unflatten(0, (batch, views)),
            "patch_mask": mask.unflatten(0, (batch, views)),
            "global_centre": self.global_centre.clone(),
            "patch_centre": self.patch_centre.clone(),
        }
