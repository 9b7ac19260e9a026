"""The model registry: architecture name (`model.arch`) -> builder, and building a model from its config."""

from __future__ import annotations

from torch import nn

from contrastive.checkpoint_io import load_model_weights
from contrastive.config import ModelConfig
from contrastive.registry import Registry

MODELS: Registry = Registry("model")


def list_models() -> list[str]:
    return MODELS.names()


def build_model(cfg: ModelConfig) -> nn.Module:
    model = MODELS.get(cfg.arch)(cfg)
    if cfg.pretrained:
        load_model_weights(model, cfg.pretrained)
    return model
