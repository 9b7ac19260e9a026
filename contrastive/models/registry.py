"""The model registry and the open_clip tower configuration shared by every architecture (and its input size)."""

from __future__ import annotations

import dataclasses
from typing import Any

import open_clip
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from contrastive.checkpoint_io import load_model_weights
from contrastive.config import ModelConfig
from contrastive.registry import Registry
from contrastive.errors import ConfigError

MODELS: Registry = Registry("model")


def list_models() -> list[str]:
    return MODELS.names()


def build_model(cfg: ModelConfig) -> nn.Module:
    model = MODELS.get(cfg.arch)(cfg)
    if cfg.pretrained:
        load_model_weights(model, cfg.pretrained)
    return model


def _checked_fields(values: dict[str, Any], schema: type, section: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"model.{section} has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(values)


def tower_configs(cfg: ModelConfig) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(embed_dim, vision_cfg, text_cfg) as open_clip expects them: an open_clip base config plus our overrides."""
    base: dict[str, Any] = {}
    if cfg.open_clip_name:
        base = open_clip.get_model_config(cfg.open_clip_name)
        if base is None:
            raise ConfigError(
                f"model.open_clip_name={cfg.open_clip_name!r} is not an open_clip model config; "
                f"see open_clip.list_models()"
            )
    vision = {**base.get("vision_cfg", {}), **_checked_fields(cfg.vision, CLIPVisionCfg, "vision")}
    text = {**base.get("text_cfg", {}), **_checked_fields(cfg.text, CLIPTextCfg, "text")}
    embed_dim = cfg.embed_dim if cfg.embed_dim is not None else base.get("embed_dim")
    if embed_dim is None:
        raise ConfigError("model.embed_dim is required when model.open_clip_name is not set")
    if vision.get("timm_model_pretrained"):
        raise ConfigError("model.vision.timm_model_pretrained downloads weights; use model.pretrained with a local file")
    return embed_dim, vision, text


def model_image_size(cfg: ModelConfig) -> int:
    """The side of the square images the image tower takes."""
    _, vision, _ = tower_configs(cfg)
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ConfigError(f"model.vision.image_size={size}: only square images are supported")
        size = size[0]
    return int(size)
