"""Two-tower contrastive model (CLIP, SigLIP): an open_clip image tower and text tower with a learnable temperature."""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from contrastive.config import ModelConfig, SelfDistillationConfig
from contrastive.models.build import MODELS
from contrastive.models.distillation_heads import DistillationHeads, captured_patch_tokens
from contrastive.models.input_size import allow_any_image_size, encode_image_any_size, encode_text_any_length
from contrastive.models.naflex import encode_naflex
from contrastive.models.randomness import ModelRandomness, draw_patch_dropout_from
from contrastive.models.self_distillation import SelfDistillation
from contrastive.models.towers import check_timm_image_size, tower_configs
from contrastive.types import ModelOutput


def capped_logit_scale(log_logit_scale: torch.Tensor, max_logit_scale: float) -> torch.Tensor:
    """The temperature from its learnable log, capped at max_logit_scale."""
    # Clamping the log-parameter in the forward pass zeroes its gradient at the cap, so it stays there.
    return log_logit_scale.clamp(max=math.log(max_logit_scale)).exp()


class OpenClipFeatures(nn.Module):
    """An open_clip model held as `clip` (its state dict stays loadable by open_clip under `clip.`), encoding
    images and texts to features, L2-normalised in fp32 by default. Images may have any multiple of the patch size
    and texts any length up to the context length (contrastive.models.input_size); a NaFlex tower also takes
    patch sequences with their coordinates and padding mask (contrastive.models.naflex)."""

    clip: nn.Module

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    def encode_image(self, images: torch.Tensor, normalize: bool = True, patch_coord: torch.Tensor | None = None,
                     patch_valid: torch.Tensor | None = None) -> torch.Tensor:
        if patch_coord is not None:  # NaFlex: images are (B, N, P*P*3) patches
            features = encode_naflex(self.clip.visual, images, patch_coord, patch_valid)  # (B, D)
        else:
            features = encode_image_any_size(self.clip.visual, images)  # (B, D)
        # In fp32: bf16 keeps ~3 digits, and an error of 0.004 in a cosine is 0.4 in a logit at temperature 100.
        return F.normalize(features.float(), dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = encode_text_any_length(self.clip, tokens)  # (B, D)
        return F.normalize(features.float(), dim=-1) if normalize else features


@MODELS.register("clip")
class TwoTowerModel(OpenClipFeatures):
    """Wraps an open_clip `CLIP` (or `CustomTextCLIP`), so its state dict stays loadable by open_clip under `clip.`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        embed_dim, vision, text = tower_configs(cfg)
        custom_text = bool(cfg.open_clip_name and open_clip.get_model_config(cfg.open_clip_name).get("custom_text"))
        model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        text_cfg = CLIPTextCfg(**text)
        self.clip = model_class(
            embed_dim,
            CLIPVisionCfg(**vision),
            text_cfg,
            quick_gelu=cfg.quick_gelu,
            init_logit_scale=cfg.init_logit_scale,
            init_logit_bias=cfg.init_logit_bias,
        )
        check_timm_image_size(self.clip.visual, vision)
        self.randomness = ModelRandomness()
        draw_patch_dropout_from(self.clip.visual, self.randomness)
        allow_any_image_size(self.clip.visual)
        self.embed_dim = embed_dim
        self.context_length = text_cfg.context_length
        self.self_distillation: SelfDistillation | None = None  # attached by build_model when the loss asks
        self.distillation_heads: DistillationHeads | None = None  # attached by the trainer for distillation

    def attach_self_distillation(self, cfg: SelfDistillationConfig) -> None:
        self.self_distillation = SelfDistillation(self.clip.visual, cfg)

    def attach_distillation_heads(self, teachers: dict[str, tuple[int, int | None]], hidden: int) -> None:
        """`teachers`: name -> (pooled width, patch token width or None)."""
        token_width = getattr(self.clip.visual, "transformer", None)
        token_width = token_width.width if token_width is not None else self.embed_dim
        self.distillation_heads = DistillationHeads(self.embed_dim, token_width, teachers, hidden)

    def _encode_image_for_distillation(self, images: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """(normalised features, adapted pooled features, adapted patch tokens) from one pass of the image tower."""
        if not self.distillation_heads.tokens:
            features = encode_image_any_size(self.clip.visual, images)
            return F.normalize(features.float(), dim=-1), *self.distillation_heads(features, None)
        with captured_patch_tokens(self.clip.visual) as captured:
            features = encode_image_any_size(self.clip.visual, images)
        return F.normalize(features.float(), dim=-1), *self.distillation_heads(features, captured["tokens"])

    def logit_scale(self) -> torch.Tensor:
        return capped_logit_scale(self.clip.logit_scale, self.cfg.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, global_views: torch.Tensor | None = None,
                local_views: torch.Tensor | None = None, patch_coord: torch.Tensor | None = None,
                patch_valid: torch.Tensor | None = None) -> ModelOutput:
        bias = self.clip.logit_bias if getattr(self.clip, "logit_bias", None) is not None else None
        distilled = {}
        if self.self_distillation is not None and self.self_distillation.active:
            distilled = self.self_distillation(self.clip.visual, global_views, local_views, self.randomness.generator)
        adapted = {}
        if self.distillation_heads is not None:
            image_features, adapted["adapted_features"], adapted["adapted_patch_tokens"] = \
                self._encode_image_for_distillation(images)
        else:
            image_features = self.encode_image(images, patch_coord=patch_coord, patch_valid=patch_valid)
        return ModelOutput(
            image_features=image_features,
            text_features=self.encode_text(tokens),
            logit_scale=self.logit_scale(),
            logit_bias=bias,
            **distilled,
            **adapted,
        )
