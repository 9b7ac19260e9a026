"""The model registry: architecture name (`model.arch`) -> builder, and building a model from its config."""

from __future__ import annotations

from torch import nn

from contrastive.checkpoint_io import load_model_weights
from contrastive.config import ModelConfig, SelfDistillationConfig
from contrastive.errors import ConfigError
from contrastive.registry import Registry

MODELS: Registry = Registry("model")


def list_models() -> list[str]:
    return MODELS.names()


def build_model(cfg: ModelConfig, self_distillation: SelfDistillationConfig | None = None) -> nn.Module:
    """`self_distillation` (the loss's, when enabled): also build its heads, mask token and teacher."""
    model = MODELS.get(cfg.arch)(cfg)
    if cfg.pretrained:
        load_model_weights(model, cfg.pretrained)
    if self_distillation is not None and self_distillation.enabled:
        if not hasattr(model, "attach_self_distillation"):
            raise ConfigError(f"loss.self_distillation needs a two-tower model (model.arch=clip), not {cfg.arch!r}")
        model.attach_self_distillation(self_distillation)
    return model
